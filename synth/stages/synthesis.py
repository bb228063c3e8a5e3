"""Stage `synthesis`: one conditional generator G makes every modality, registered, with the chosen lesion.

METHOD §4.1, §6.0-6.1. Per step, for a batch of real slices:
  1. a structure map s and organ mask come from the real images (the authors' code) or, after
     pre-training, from the frozen stage-A generator (`structure_source="stage_a"`, the paper);
  2. a lesion label l is drawn from the training pool (the other slices of the shuffled batch) subject to
     the placement check of §3.7; during pre-training the slice's own label is used, since the target is
     the real image;
  3. s' = s + U(0.5, 0.6) inside the organ off the edges (§3.5), fused with l (§3.6: the paper's
     concatenation by default; `label_fusion="none"` is the authors' BRATS code, §11.13);
  4. G maps s' (tiled K times) and the K modality one-hots (at its bottleneck) to all K modalities in one
     batched call;
  5. frozen networks from earlier stages score the result: the translator G_t makes all K·(K−1)
     translations in one call (registration and translation-agreement losses), the lesion processor
     (the real-trained segmentors) gives the lesion-guidance loss. Their parameters are arguments of the
     step that take no gradient, while gradients flow through their activations into G;
  6. a two-head D (real/fake and modality category, ACGAN) is trained against G (LSGAN).
Steps below `pretrain_steps` add the self-supervised loss L_pre of §6.1.4 against the real images.

Single-modality families (K = 1) use the same code: no condition input and no registration terms. The
lesion processor is a pluggable part (`LESION_PROCESSORS`): the X-ray classifier and the TC detector plug
in there without changes to this trainer.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import ecai, extraction, input_pipeline, losses, metrics, optim, registration, sharding, train
from synth import writer as writer_lib
from synth.models import ecai as ecai_models
from synth.models import sizes
from synth.models.discriminator import PatchDiscriminator
from synth.models.ecai import EcaiDiscriminator, EcaiGenerator
from synth.models.unet import UNet

NAME = "synthesis"
STRUCTURE_SOURCES = ("real", "stage_a")
G_TERMS = (
    "g_adversarial",
    "g_category",
    "registration",
    "agreement",
    "lesion",
    "pretrain",
    "pretrain_background",
    "reconstruction",
)
D_TERMS = ("d_real", "d_fake", "d_category")
# config.synthesis.g_input: what G is fed (§9.1-9.2). "structure": the noise-fused structure map with the
# lesion label (the method); "noise": N(0, 1) of the image's size (BaseGAN, ablation A); "inverse_structure":
# the binary inverted map 1 − s without noise (SkrGAN*).
G_INPUTS = ("structure", "noise", "inverse_structure")
# config.synthesis.design: "unet", the final design's conditional U-Net G and two-head D; "ecai", the
# AAAI/ECAI drafts' encoders, decoder and code discriminator with their extra losses (§6.7, `synth.ecai`).
DESIGNS = ("unet", "ecai")
# At most this many pool labels are tried per sample and step (the batch's other slices).
MAX_LABEL_CANDIDATES = 8


@flax.struct.dataclass
class SynthesisState:
    """All mutable state of the stage: one pytree. The frozen networks are not part of it."""

    step: jax.Array
    g_params: Any
    d_params: Any
    g_opt: Any
    d_opt: Any


class LesionProcessor(NamedTuple):
    """A frozen network that tells whether a synthetic image shows the lesion it was asked for.

    Attributes:
      load: `(config, workdir) -> (params, provenance)`: the trained parameters and what they came from.
      loss: `(params, images (B, H, W, K·C), inputs) -> (K,)` lesion-guidance loss per modality against
        what G was asked for: `inputs` is the step's `Inputs` (its `label`; a detector its `boxes` and
        `box_classes`, which follow the drawn label).
      predict: `(params, images) -> (K, B, H, W)` predicted labels (for evaluation and stage C's filter);
        a classifier gives constant maps of its class, like the class-map labels; a detector paints its
        confident boxes with their class, like the filled-box labels.
      kind: "segment" (lesion fidelity is the Dice of the lesion), "classify" (whether the class is
        the asked-for one) or "detect" (the Dice of the painted detections against the filled boxes).
    """

    load: Callable[[ml_collections.ConfigDict, str], tuple[Any, dict]]
    loss: Callable[[Any, jax.Array, jax.Array], jax.Array]
    predict: Callable[[Any, jax.Array], jax.Array]
    kind: str = "segment"


def _segmentor_processor(config: ml_collections.ConfigDict, image_hw) -> LesionProcessor:
    """The real-trained segmentors of stage `segmentor` (§6.3) as the lesion processor."""
    from synth.stages import segmentor  # Imported here: only this processor needs it.

    seg = config.segmentor
    model = segmentor.make_model(config, image_hw)
    logits_fn = functools.partial(
        segmentor.predict_logits,
        model=model,
        variant=seg.variant,
        stacking=seg.stacking,
        channels=channels_per_modality(config),
    )
    lesion = config.synthesis.loss.lesion

    def load(cfg, workdir):
        state = segmentor.load_state(cfg, workdir)
        return state.params, {"segmentor_step": int(jax.device_get(state.step))}

    def loss(params, images, inputs):
        logits = logits_fn(params, images)
        return jax.vmap(
            lambda lg: losses.segmentation_loss(
                lg,
                inputs.label,
                kind=lesion.kind,
                num_classes=config.data.num_classes,
                dice_weight=lesion.dice_weight,
                class_weights=tuple(lesion.class_weights) or None,
            )
        )(logits)

    def predict(params, images):
        return jnp.argmax(logits_fn(params, images), axis=-1)

    return LesionProcessor(load=load, loss=loss, predict=predict)


def _classifier_processor(config: ml_collections.ConfigDict, image_hw) -> LesionProcessor:
    """The real-trained classifier (X-ray, §6.4) as the lesion processor."""
    from synth.stages import classifier

    return classifier.lesion_processor(config, image_hw)


def _detector_processor(config: ml_collections.ConfigDict, image_hw) -> LesionProcessor:
    """The real-trained SSD detector (Tianchi lung CT, §6.6) as the lesion processor."""
    from synth.stages import detector

    return detector.lesion_processor(config, image_hw)


# config.synthesis.lesion_processor -> factory (config, image_hw) -> LesionProcessor; "none": no lesion loss.
LESION_PROCESSORS: dict[str, Callable[..., LesionProcessor]] = {
    "segmentor": _segmentor_processor,
    "classifier": _classifier_processor,
    "detector": _detector_processor,
}


class Models(NamedTuple):
    """Stage B's networks: the trained G and D, and the frozen ones' definitions."""

    generator: UNet | EcaiGenerator
    discriminator: PatchDiscriminator | EcaiDiscriminator
    translator: Any  # synth.stages.translator.Models, or None for K = 1 or registration off.
    lesion: LesionProcessor | None
    structure: Any  # synth.stages.structure.Models, or None unless structure_source="stage_a".
    # K independent G/D pairs (BaseGAN, SkrGAN*): parameters stacked on a leading K axis, no modality
    # code, single-head Ds; else one G for every modality with its code and one two-head D.
    separate: bool = False
    design: str = "unet"  # `DESIGNS`; "ecai": G = EC_R + EC_M + DC_M, D = D_M + FD_R (§6.7).


def make_models(config: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> Models:
    sy = config.synthesis
    k = len(config.data.modalities)
    separate = bool(sy.separate_models)
    common = dict(activation=sy.model.activation, kernel_init=sy.model.kernel_init)
    translator_models = structure_models = lesion = None
    if _uses_translator(config):
        from synth.stages import translator

        translator_models = translator.make_models(config, image_hw)
    if sy.structure_source == "stage_a":
        from synth.stages import structure

        structure_models = structure.make_models(config, image_hw)
    if sy.lesion_processor != "none":
        lesion = LESION_PROCESSORS[sy.lesion_processor](config, image_hw)
    if sy.design == "ecai":
        features = sizes.ecai_kwargs(sy.model.size, image_hw)["features"]
        return Models(
            generator=EcaiGenerator(features=features, out_channels=channels_per_modality(config), **common),
            discriminator=EcaiDiscriminator(
                **sizes.discriminator_kwargs(sy.model.size, image_hw),
                code_features=sizes.code_discriminator_kwargs(sy.model.size, image_hw)["features"],
                code_channels=features * ecai_models.CODE_MULTIPLIER,
                category_channels=registration.category_channels(sy.loss.category_kind, k),
                dropout_rate=sy.model.disc_dropout,
                **common,
            ),
            translator=None,  # The design translates with its own EC_M and DC_M.
            lesion=lesion,
            structure=structure_models,
            design="ecai",
        )
    return Models(
        generator=UNet(
            **sizes.unet_kwargs(sy.model.size, image_hw),
            out_channels=channels_per_modality(config),
            norm_output=sy.model.norm_output,
            **common,
        ),
        discriminator=PatchDiscriminator(
            **sizes.discriminator_kwargs(sy.model.size, image_hw),
            heads=2 if k > 1 and not separate else 1,
            category_channels=registration.category_channels(sy.loss.category_kind, k),
            dropout_rate=sy.model.disc_dropout,
            **common,
        ),
        translator=translator_models,
        lesion=lesion,
        structure=structure_models,
        separate=separate,
    )


def channels_per_modality(config: ml_collections.ConfigDict) -> int:
    """C: 1 for grey modalities, 3 for the RGB retina (`config.data.channels`)."""
    return int(config.data.get("channels", 1))


def registers(config) -> bool:
    """Whether stage B has registration terms: K > 1 and a registration or agreement weight."""
    weights = config.synthesis.loss.weights
    return len(config.data.modalities) > 1 and (weights.registration > 0 or weights.agreement > 0)


def _uses_translator(config) -> bool:
    """Whether stage B needs the frozen G_t (the old design translates with its own networks)."""
    return registers(config) and config.synthesis.design != "ecai"


def load_frozen(config: ml_collections.ConfigDict, workdir: str, models: Models) -> tuple[dict, dict]:
    """The frozen networks' parameters from the earlier stages in `workdir`, and their provenance."""
    frozen, provenance = {}, {}
    if models.translator is not None:
        from synth.stages import translator

        state = translator.load_state(config, workdir)
        frozen["translator"] = state.g_params
        provenance["translator_step"] = int(jax.device_get(state.step))
    if models.lesion is not None:
        frozen["lesion"], lesion_provenance = models.lesion.load(config, workdir)
        provenance.update(lesion_provenance)
    if models.structure is not None:
        from synth.stages import structure

        state = structure.load_state(config, workdir)
        frozen["structure"] = state.g_params
        provenance["structure_step"] = int(jax.device_get(state.step))
    return frozen, provenance


# --------------------------------------------------------------------------------------------------
# The forward pass.


def draw_labels(labels: jax.Array, organ: jax.Array, *, rule: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Algorithm 4 (§3.7) on device: for each sample, the first label of the other slices that fits.

    The batch is a uniform shuffle of the training set, so its other slices' labels are uniform draws from
    the training pool. Candidates are tried in a fixed order (the next slice, then the one after, …).

    Args:
      labels: (B, H, W) the batch's own labels.
      organ: (B, H, W, 1) the organ masks the labels must fit.
      rule: "code" or "paper" (see `extraction.label_fits`).

    Returns:
      `(label, fitted, source)`: (B, H, W) drawn labels, (B,) whether one fitted, and (B,) the batch row
      each label came from (-1 for the empty fallback), so what belongs to a label (its boxes) can follow
      it. When none fits, the code rule falls back to the empty label (no lesion, which always fits); the
      paper rule keeps the last draw, as the authors' generation script does.
    """
    b = labels.shape[0]
    shifts = range(1, min(b, MAX_LABEL_CANDIDATES + 1)) if b > 1 else range(1)
    candidates = jnp.stack([jnp.roll(labels, -r, axis=0) for r in shifts])  # (R, B, H, W)
    fits = jax.vmap(lambda c: extraction.label_fits(c, organ, rule=rule))(candidates)  # (R, B)
    first = jnp.argmax(fits, axis=0)
    fitted = jnp.any(fits, axis=0)
    chosen = candidates[first, jnp.arange(b)]
    fallback = jnp.zeros_like(labels) if rule == "code" else candidates[-1]
    rows = jnp.arange(b)
    shift = jnp.asarray(list(shifts))
    source = jnp.where(fitted, (rows + shift[first]) % b, -1 if rule == "code" else (rows + shift[-1]) % b)
    return jnp.where(fitted[:, None, None], chosen, fallback), fitted, source


def synthesize(models: Models, g_params, g_input: jax.Array, num_modalities: int) -> jax.Array:
    """All K modalities of a batch of generator inputs in one call of G.

    Args:
      g_input: (B, H, W, C_in) fused structure map and label.

    Returns:
      (K, B, H, W, channels) images by modality.
    """
    if models.separate:  # K models, each on its own input (K, B, …) or on the shared one (B, …).
        inputs = (
            g_input
            if g_input.ndim == 5
            else jnp.broadcast_to(g_input[None], (num_modalities,) + g_input.shape)
        )
        return jax.vmap(lambda p, x: models.generator.apply(p, x, None))(g_params, inputs)
    k, b = num_modalities, g_input.shape[0]
    tiled = jnp.broadcast_to(g_input[None], (k,) + g_input.shape).reshape((k * b,) + g_input.shape[1:])
    cond = registration.modality_conditions(np.arange(k), b, k) if k > 1 else None
    out = models.generator.apply(g_params, tiled, cond)
    return out.reshape((k, b) + out.shape[1:])


def generator_input(key, s, organ, label, *, config) -> jax.Array:
    """G's input (`config.synthesis.g_input`, `G_INPUTS`).

    The method's is the noise-fused structure map s', fused with the lesion label as configured (§3.5,
    §3.6): (B, H, W, C_in). BaseGAN's is N(0, 1) noise of the image's size, one draw per modality when the
    modalities have separate models: (K, B, H, W, 1). SkrGAN*'s is the inverted binary map 1 − s.
    """
    sy = config.synthesis
    if sy.g_input == "noise":
        k = len(config.data.modalities) if sy.separate_models else 1
        noise = jax.random.normal(key, (k,) + s.shape, s.dtype)
        return noise if sy.separate_models else noise[0]
    if sy.g_input == "inverse_structure":
        return 1.0 - (s > 0.5).astype(s.dtype)
    noisy = extraction.fuse_noise(key, s, organ, low=sy.noise[0], high=sy.noise[1])
    return extraction.fuse_label(noisy, label, mode=sy.label_fusion, num_classes=config.data.num_classes)


class Inputs(NamedTuple):
    """One step's generator inputs and targets."""

    structure: jax.Array  # (B, H, W, 1) the structure map s (before noise).
    organ: jax.Array  # (B, H, W, 1), 1 = organ.
    label: jax.Array  # (B, H, W) the lesion label G is asked for.
    g_input: jax.Array  # (B, H, W, C_in)
    # The drawn label's boxes (B, M, 4) normalised corners and classes (B, M), 0 = padding, for a
    # detector lesion processor; None when the batch has no boxes.
    boxes: jax.Array | None = None
    box_classes: jax.Array | None = None


def make_inputs(batch, rng, frozen, *, models: Models, config, pretraining) -> Inputs:
    """Structure maps, masks and lesion labels for a step (see the module docstring, steps 1-3)."""
    sy = config.synthesis
    params = extraction.ExtractionParams.from_config(config.structure.extraction)
    own = batch["label"]
    s, organ = extraction.extract(batch["image"], own, params, remove_lesions=config.structure.remove_lesions)
    noise_key, structure_key = jax.random.split(rng)
    if models.structure is not None:
        from synth.models import vae
        from synth.stages import structure

        code = vae.code_shape(s.shape[1:3], models.structure.encoder.code_channels)
        maps, masks, _ = structure.generate_maps(
            frozen["structure"], structure_key, s.shape[0], models=models.structure, code_shape=code
        )
        use_real = pretraining  # Pre-training needs paired (structure, image); then the paper's s_g.
        s = jnp.where(use_real, s, maps[..., None].astype(s.dtype))
        organ = jnp.where(use_real, organ, masks[..., None].astype(organ.dtype))
    drawn, _, source = draw_labels(own, organ, rule=sy.label_rule)
    label = jnp.where(pretraining, own, drawn)
    boxes = box_classes = None
    if "boxes" in batch:  # The boxes follow the label (none for the empty fallback).
        rows = jnp.where(pretraining, jnp.arange(own.shape[0]), source)
        keep = (rows >= 0)[:, None]
        boxes = jnp.where(keep[..., None], batch["boxes"][jnp.maximum(rows, 0)], 0.0)
        box_classes = jnp.where(keep, batch["box_classes"][jnp.maximum(rows, 0)], 0)
    g_input = generator_input(noise_key, s, organ, label, config=config)
    return Inputs(s, organ, label, g_input, boxes, box_classes)


def _discriminate(models: Models, d_params, images: jax.Array, rng=None):
    """D's (real/fake, category or None) maps for images (K, B, H, W, C), keeping the leading axes."""
    train_mode = rng is not None and models.discriminator.dropout_rate > 0
    if models.separate:  # Modality k's own single-head D on its images.
        keys = jax.random.split(rng if rng is not None else jax.random.key(0), images.shape[0])
        apply = lambda p, x, key: models.discriminator.apply(  # noqa: E731
            p, x, train=train_mode, rngs={"dropout": key} if train_mode else None
        )
        return jax.vmap(apply)(d_params, images, keys), None
    out = models.discriminator.apply(
        d_params, registration.flat(images), train=train_mode, rngs={"dropout": rng} if train_mode else None
    )
    d, c = out if isinstance(out, tuple) else (out, None)
    lead = images.shape[:-3]
    reshape = lambda a: None if a is None else a.reshape(lead + a.shape[1:])  # noqa: E731
    return reshape(d), reshape(c)


def in_dtype(dtype, fn: Callable) -> Callable:
    """`fn` computed in `dtype` (mixed precision; identity for float32).

    Its floating arguments, parameters included, are cast to `dtype` and its floating results back to
    float32, so losses are reduced in float32 and gradients reach float32 parameters through the casts.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return fn

    def cast(tree, to):
        return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    return lambda *args: cast(fn(*cast(args, dtype)), jnp.float32)


def generator_loss(g_params, d_params, frozen, batch, rng, step, *, models: Models, config):
    """L_G of §6.1.3 (plus L_pre of §6.1.4 while pre-training) for one batch of real slices.

    Returns:
      `(loss, (terms, fakes, inputs, for_d))`; fakes are (K, B, H, W, C) for D's update, and `for_d`
      what else D judges (the old design's real translations and codes; empty for the U-Net design).
    """
    sy = config.synthesis
    w, kind = sy.loss.weights, sy.loss.category_kind
    pretraining = step < sy.pretrain_steps
    input_key, d_key, ecai_key = jax.random.split(rng, 3)
    # Frozen: no gradient into their parameters; gradients still flow through their activations.
    frozen = jax.lax.stop_gradient(frozen)
    inputs = make_inputs(batch, input_key, frozen, models=models, config=config, pretraining=pretraining)
    real = registration.by_modality(batch["image"], channels_per_modality(config))  # (K, B, H, W, C)
    k = real.shape[0]
    dtype = sy.compute_dtype
    fakes = in_dtype(dtype, functools.partial(synthesize, models, num_modalities=k))(g_params, inputs.g_input)
    d_fake, c_fake = in_dtype(dtype, functools.partial(_discriminate, models))(d_params, fakes, d_key)
    zero = jnp.zeros((), jnp.float32)
    terms = {
        "g_adversarial": registration.per_modality_mse(d_fake, 1.0),
        "g_category": registration.category_sum(c_fake, kind=kind, num_modalities=k),
        "registration": zero,
        "agreement": zero,
        "lesion": zero,
    }
    if models.translator is not None:
        translate = functools.partial(
            in_dtype(dtype, models.translator.generator.apply), frozen["translator"]
        )
        translations = registration.translate_pairs(translate, fakes)
        terms["registration"] = registration.registration_loss(fakes, translations)
        terms["agreement"] = registration.agreement_loss(translations)
    for_d = {}
    if models.design == "ecai":  # Registration by its own networks, and its real-data training (§6.7).
        ecai_terms, for_d = ecai.generator_terms(
            g_params,
            d_params,
            inputs.g_input,
            fakes,
            real,
            inputs.organ,
            ecai_key,
            nets=_ecai_networks(models, dtype, real.shape[2:4]),
            category_kind=sy.loss.category_kind,
        )
        terms.update(ecai_terms)
    if models.lesion is not None:
        terms["lesion"] = jnp.sum(
            # Only the network and the images go to `dtype`: the targets (boxes) keep float32's precision.
            in_dtype(dtype, lambda params, images: models.lesion.loss(params, images, inputs))(
                frozen["lesion"], registration.channels_last(fakes)
            )
        )
    # L_pre: the whole image and, re-weighted, its background (the authors' mask M = 1 - organ).
    background = 1.0 - inputs.organ[None]
    gate = pretraining.astype(jnp.float32)
    terms["pretrain"] = gate * registration.per_modality_mse(fakes - real, 0.0)
    terms["pretrain_background"] = gate * registration.per_modality_mse((fakes - real) * background, 0.0)
    # SkrGAN*'s self-supervised term, in every step alongside the adversarial one (§9.1).
    terms["reconstruction"] = registration.per_modality_mse(fakes - real, 0.0)
    loss = sum(w[name] * terms[name] for name in G_TERMS)
    if models.design == "ecai":
        loss += sum(sy.ecai.weights[name] * terms[name] for name in ecai.ECAI_G_TERMS)
    return loss, (terms, fakes, inputs, for_d)


def _ecai_networks(models: Models, dtype, image_hw: tuple[int, int]) -> ecai.Networks:
    """The old design's network calls, each computed in `dtype` (its losses stay float32, as the method's)."""
    g, d = models.generator, models.discriminator
    return ecai.Networks(
        encode_fusion=in_dtype(dtype, functools.partial(g.apply, method="encode_fusion")),
        encode_image=in_dtype(dtype, functools.partial(g.apply, method="encode_image")),
        decode=in_dtype(dtype, functools.partial(g.apply, image_hw=tuple(image_hw), method="decode")),
        judge_code=in_dtype(dtype, functools.partial(d.apply, method="judge_code")),
        discriminate=in_dtype(dtype, functools.partial(_discriminate, models)),
    )


def discriminator_loss(d_params, batch, fakes, rng, for_d=None, *, models: Models, config):
    """L_D of §6.1.3: real slices against the synthetic ones, plus the category head.

    `for_d`: the old design's real translations and codes, for its extra terms (§6.7).
    """
    loss_config = config.synthesis.loss
    w, kind = loss_config.weights, loss_config.category_kind
    real = registration.by_modality(batch["image"], channels_per_modality(config))
    k = real.shape[0]
    real_key, fake_key, ecai_key = jax.random.split(rng, 3)
    discriminate = in_dtype(config.synthesis.compute_dtype, functools.partial(_discriminate, models))
    d_real, c_real = discriminate(d_params, real, real_key)
    d_fake, c_fake = discriminate(d_params, fakes, fake_key)
    category = registration.category_sum(c_real, kind=kind, num_modalities=k)
    if loss_config.category_on_fakes:
        category += registration.category_sum(c_fake, kind=kind, num_modalities=k)
    terms = {
        "d_real": registration.per_modality_mse(d_real, 1.0),
        "d_fake": registration.per_modality_mse(d_fake, 0.0),
        "d_category": category,
        "d_accuracy": 0.5 * (jnp.mean(d_real > 0.5) + jnp.mean(d_fake < 0.5)),
    }
    loss = sum(w[name] * terms[name] for name in D_TERMS)
    if models.design == "ecai":
        nets = _ecai_networks(models, config.synthesis.compute_dtype, real.shape[2:4])
        terms.update(ecai.discriminator_terms(d_params, for_d, ecai_key, nets=nets))
        loss += sum(config.synthesis.ecai.weights[name] * terms[name] for name in ecai.ECAI_D_TERMS)
    return loss, terms


def init_state(rng, batch, *, models: Models, config, g_tx, d_tx):
    k = len(config.data.modalities)
    s, organ = jnp.zeros_like(batch["image"][..., :1]), jnp.ones_like(batch["image"][..., :1])
    g_input = generator_input(jax.random.key(0), s, organ, batch["label"], config=config)
    g_key, d_key = jax.random.split(rng)
    one_image = batch["image"][..., : channels_per_modality(config)]
    if models.separate:  # K independent models: K independent inits, stacked.
        g_one = g_input[0] if g_input.ndim == 5 else g_input
        g_params = jax.vmap(lambda key: models.generator.init(key, g_one, None))(jax.random.split(g_key, k))
        d_params = jax.vmap(lambda key: models.discriminator.init(key, one_image))(jax.random.split(d_key, k))
    else:
        cond = registration.modality_conditions(np.zeros(1, int), g_input.shape[0], k) if k > 1 else None
        g_params = models.generator.init(g_key, g_input, cond)
        d_params = models.discriminator.init(d_key, one_image)
    return SynthesisState(
        step=jnp.zeros((), jnp.int32),
        g_params=g_params,
        d_params=d_params,
        g_opt=g_tx.init(g_params),
        d_opt=d_tx.init(d_params),
    )


def train_step(state: SynthesisState, batch, rng, frozen, *, models: Models, config, g_tx, d_tx):
    """One simultaneous G/D update; only G and D are optimised, the frozen networks are arguments."""
    g_key, d_key = jax.random.split(rng)
    (g_loss, (terms, fakes, _, for_d)), g_grads = jax.value_and_grad(generator_loss, has_aux=True)(
        state.g_params, state.d_params, frozen, batch, g_key, state.step, models=models, config=config
    )
    (d_loss, d_terms), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
        state.d_params,
        batch,
        jax.lax.stop_gradient(fakes),
        d_key,
        jax.lax.stop_gradient(for_d),
        models=models,
        config=config,
    )
    new, norms = registration.gan_update(state, g_grads, d_grads, g_tx=g_tx, d_tx=d_tx)
    metrics_out = dict(terms, **d_terms, **norms, g_loss=g_loss, d_loss=d_loss)
    metrics_out["pretraining"] = (state.step < config.synthesis.pretrain_steps).astype(jnp.float32)
    return new, metrics_out


# --------------------------------------------------------------------------------------------------
# Evaluation.

# Decoded BRATS-like example -> the arrays this stage consumes.
preprocess = input_pipeline.image_and_label


def _pairwise_dice(maps: jax.Array) -> jax.Array:
    """(B,) mean Dice between every pair of modalities' binary maps (K, B, H, W)."""
    k = maps.shape[0]
    scores = []
    for i in range(k):
        for j in range(i + 1, k):
            inter = jnp.sum(maps[i] * maps[j], axis=(1, 2))
            total = jnp.sum(maps[i], axis=(1, 2)) + jnp.sum(maps[j], axis=(1, 2))
            scores.append(2.0 * inter / jnp.maximum(total, 1.0))
    return jnp.mean(jnp.stack(scores), axis=0) if scores else jnp.ones(maps.shape[1])


def structure_agreement(
    images: jax.Array, organ: jax.Array, params: extraction.ExtractionParams, channels: int = 1
):
    """(B,) registration consistency: mean pairwise Dice of the structure maps extracted from each modality.

    Each modality's map uses the same organ mask, so only the edges inside it are compared.
    """
    x = registration.by_modality(images, channels)  # (K, B, H, W, C)
    k, b = x.shape[:2]
    flat = registration.flat(x)
    s = extraction.structure_map_with(flat, jnp.tile(organ, (k, 1, 1, 1)), params)
    return _pairwise_dice(s.reshape((k, b) + s.shape[1:3]))


def evaluation_outputs(state_params, frozen, batch, key, *, models: Models, config):
    """Everything the evaluator reports for one batch, as per-image values (masked by the caller)."""
    g_params, d_params = state_params
    k, channels = len(config.data.modalities), channels_per_modality(config)
    inputs = make_inputs(batch, key, frozen, models=models, config=config, pretraining=jnp.asarray(False))
    fakes = synthesize(models, g_params, inputs.g_input, k)
    images = registration.channels_last(fakes)
    params = extraction.ExtractionParams.from_config(config.structure.extraction)
    out = {
        "valid": batch["valid"],
        "structure_agreement": structure_agreement(images, inputs.organ, params, channels),
        "structure_agreement_real": structure_agreement(batch["image"], inputs.organ, params, channels),
    }
    d_fake, _ = _discriminate(models, d_params, fakes)
    d_real, _ = _discriminate(models, d_params, registration.by_modality(batch["image"], channels))
    out["d_accuracy_fake"] = jnp.mean(d_fake < 0.5, axis=(0, 2, 3, 4))
    out["d_accuracy_real"] = jnp.mean(d_real > 0.5, axis=(0, 2, 3, 4))
    if models.translator is not None:
        translate = functools.partial(models.translator.generator.apply, frozen["translator"])
        translations = registration.translate_pairs(translate, fakes)
        out["translation_mse"] = jnp.mean(jnp.square(translations - fakes[:, None]), axis=(0, 1, 3, 4, 5))
    predicted = None
    if models.lesion is not None and models.lesion.kind == "classify":
        predicted = models.lesion.predict(frozen["lesion"], images)  # (K, B, H, W) constant class maps
        said = predicted[:, :, 0, 0]
        out["lesion_accuracy"] = jnp.mean(said == inputs.label[None, :, 0, 0], axis=0)
        out["lesion_accuracy_chance"] = jnp.mean(
            said == jnp.roll(inputs.label, 1, axis=0)[None, :, 0, 0], axis=0
        )
    elif models.lesion is not None:
        predicted = models.lesion.predict(frozen["lesion"], images)  # (K, B, H, W)
        target = metrics.region_mask(inputs.label, "whole")
        other = jnp.roll(target, 1, axis=0)  # Chance reference: another sample's lesion.
        found = metrics.region_mask(predicted, "whole")
        dice = jax.vmap(lambda p: metrics.binary_dice_per_image(p, target)[0])(found)  # (K, B)
        chance = jax.vmap(lambda p: metrics.binary_dice_per_image(p, other)[0])(found)
        out["lesion_dice"], out["lesion_dice_chance"] = dice.mean(0), chance.mean(0)
        out["has_lesion"] = jnp.any(target, axis=(1, 2))
        out["other_has_lesion"] = jnp.any(other, axis=(1, 2))
    return out, (inputs, images, predicted)


def make_evaluator(config, *, models: Models, frozen, mesh):
    """Lesion fidelity, registration consistency, D accuracy, and a grid of samples."""
    source = input_pipeline.open_source(config.data, config.data.eval_split)
    batch_sh = sharding.batch_sharding(mesh)
    fn = jax.jit(
        functools.partial(evaluation_outputs, models=models, config=config),
        out_shardings=sharding.replicated(mesh),
    )
    key = jax.random.fold_in(jax.random.key(config.seed), 11)  # The same noise every evaluation.
    modalities = tuple(config.data.modalities)

    def evaluate(state: SynthesisState, step: int):
        sums, counts, grid_rows = {}, {}, []
        batches = input_pipeline.eval_batches(
            source,
            preprocess=preprocess,
            batch_size=config.synthesis.train.batch_size,
            max_examples=config.synthesis.eval.num_examples,
        )
        for n, local in enumerate(batches):
            batch = sharding.to_global(local, batch_sh)
            out, (inputs, images, predicted) = jax.device_get(
                fn((state.g_params, state.d_params), frozen, batch, jax.random.fold_in(key, n))
            )
            valid = np.asarray(out["valid"])
            for name, values in out.items():
                if name in ("valid", "has_lesion", "other_has_lesion"):
                    continue
                weight = valid.astype(np.float64)
                if name == "lesion_dice":
                    weight = weight * out["has_lesion"]
                elif name == "lesion_dice_chance":
                    weight = weight * (out["has_lesion"] | out["other_has_lesion"])
                sums[name] = sums.get(name, 0.0) + float(np.sum(np.asarray(values) * weight))
                counts[name] = counts.get(name, 0.0) + float(np.sum(weight))
            if not grid_rows:
                grid_rows = _grid_rows(inputs, images, predicted, config.data.num_classes)
        scalars = {name: sums[name] / max(counts[name], 1.0) for name in sums}
        if "d_accuracy_fake" in scalars:
            scalars["d_accuracy"] = 0.5 * (scalars["d_accuracy_fake"] + scalars["d_accuracy_real"])
        images_out = {}
        if grid_rows:
            images_out["structure_label_" + "_".join(modalities)] = writer_lib.image_grid(grid_rows)
        return scalars, images_out

    return evaluate


def _grid_rows(inputs: Inputs, images, predicted, num_classes: int, max_rows: int = 4):
    """One row per sample: structure map, lesion label, each synthetic modality, the segmentor's reading."""
    rows = []
    for b in range(min(max_rows, images.shape[0])):
        row = [
            np.asarray(inputs.structure[b, ..., 0]),
            writer_lib.label_colours(inputs.label[b], num_classes),
        ]
        row += [images[b, ..., j] for j in range(images.shape[-1])]
        if predicted is not None:
            row.append(writer_lib.label_colours(predicted[0, b], num_classes))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# The stage.


COMPUTE_DTYPES = ("float32", "bfloat16")  # config.synthesis.compute_dtype; bfloat16 = mixed (`in_dtype`).


def _check_config(config: ml_collections.ConfigDict) -> None:
    sy = config.synthesis
    if sy.structure_source not in STRUCTURE_SOURCES:
        raise ValueError(
            f"Unknown config.synthesis.structure_source {sy.structure_source!r}; "
            f"choose one of {STRUCTURE_SOURCES}"
        )
    if sy.lesion_processor != "none" and sy.lesion_processor not in LESION_PROCESSORS:
        raise ValueError(
            f"Unknown config.synthesis.lesion_processor {sy.lesion_processor!r}; "
            f"choose one of {sorted(LESION_PROCESSORS) + ['none']}"
        )
    if sy.label_rule not in extraction.LABEL_FIT_RULES:
        raise ValueError(
            f"Unknown config.synthesis.label_rule {sy.label_rule!r}; "
            f"choose one of {extraction.LABEL_FIT_RULES}"
        )
    extraction.fused_channels(sy.label_fusion, config.data.num_classes)  # Validates the fusion mode.
    registration.check_loss_weights(NAME, sy.loss.weights, G_TERMS + D_TERMS)
    if sy.g_input not in G_INPUTS:
        raise ValueError(f"Unknown config.synthesis.g_input {sy.g_input!r}; choose one of {G_INPUTS}")
    if sy.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"Unknown config.synthesis.compute_dtype {sy.compute_dtype!r}; choose one of {COMPUTE_DTYPES}"
        )
    if sy.design not in DESIGNS:
        raise ValueError(f"Unknown config.synthesis.design {sy.design!r}; choose one of {DESIGNS}")
    if sy.design == "ecai":
        registration.check_loss_weights(
            NAME, sy.ecai.weights, ecai.ECAI_TERMS, where="config.synthesis.ecai.weights"
        )
        if sy.separate_models or len(config.data.modalities) < 2 or sy.structure_source != "real":
            raise ValueError(
                "config.synthesis.design='ecai' is the multimodal design of §6.7: it needs K >= 2 "
                "modalities, separate_models=False and structure_source='real'"
            )
    low, high = sy.noise
    if not 0.0 <= low <= high:
        raise ValueError(f"config.synthesis.noise must be (low, high) with 0 <= low <= high, got {sy.noise}")


def build(config: ml_collections.ConfigDict, mesh=None, *, workdir: str | os.PathLike) -> train.StageSpec:
    """The stage's spec; loads the frozen networks from the earlier stages in `workdir`."""
    _check_config(config)
    sy = config.synthesis
    source = input_pipeline.gan_training_source(config.data)
    image = preprocess(source[0])["image"]
    from synth.stages import segmentor

    segmentor.check_channels(config, image)
    models = make_models(config, image.shape[:2])
    frozen, provenance = load_frozen(config, os.fspath(workdir), models)
    g_tx, d_tx = optim.make_optimizer(sy.optim.g), optim.make_optimizer(sy.optim.d)
    mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    return train.StageSpec(
        name=NAME,
        train=sy.train,
        source=source,
        preprocess=preprocess,
        init_state=functools.partial(init_state, models=models, config=config, g_tx=g_tx, d_tx=d_tx),
        train_step=functools.partial(train_step, models=models, config=config, g_tx=g_tx, d_tx=d_tx),
        evaluate=make_evaluator(config, models=models, frozen=frozen, mesh=mesh),
        frozen=frozen,
        provenance=provenance,
    )


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at=None):
    """Trains G and D in `workdir/synthesis` unless already complete (the earlier stages must be done)."""
    return train.run_unless_complete(
        NAME, functools.partial(build, workdir=workdir), config, workdir, stop_at=stop_at
    )


def load_state(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> SynthesisState:
    """The latest trained stage-B state of a run, for stage C's generation."""
    return train.load_trained_state(build(config, workdir=workdir), config, workdir)
