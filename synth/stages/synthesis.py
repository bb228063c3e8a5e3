"""Stage `synthesis`: one conditional generator G makes every modality, registered, with the chosen lesion.

METHOD §4.1, §6.0-6.1. Per step, for a batch of real slices:
  1-3. G's inputs (`synth.conditioning`): a structure map and organ mask, from the real images (the
     authors' code) or, after pre-training, from the frozen stage-A generator (the paper); a lesion label
     drawn from the training pool under the placement check of §3.7 (the slice's own while
     pre-training); the noise-fused map s' with the label fused in (§3.5, §3.6);
  4. G maps s' (tiled K times) and the K modality one-hots (at its bottleneck) to all K modalities in one
     batched call (`synth.synthesis_nets`);
  5. frozen networks from earlier stages score the result: the translator G_t makes all K·(K−1)
     translations in one call (registration and translation-agreement losses), the lesion processor
     (the real-trained segmentors, classifier or detector, `synth.lesion`) gives the lesion-guidance
     loss. Their parameters are arguments of the step that take no gradient, while gradients flow
     through their activations into G; they are loaded by `synth.frozen`;
  6. a two-head D (real/fake and modality category, ACGAN) is trained against G (LSGAN).
Steps below `pretrain_steps` add the self-supervised loss L_pre of §6.1.4 against the real images.

With `config.synthesis.generator="flow"` the stage trains the flow family instead (`synth.flow_synthesis`):
one velocity network makes all K modalities as one sample from [s, one-hot l, organ], on the same data,
against the same frozen networks, evaluated and drawn the same way (without D).

Single-modality families (K = 1) use the same code: no condition input and no registration terms. The
evaluator reports lesion fidelity against its chance level, registration consistency (structure agreement
between the synthetic modalities, and G_t's translation error) and D's accuracy, with a grid of samples.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import (
    conditioning,
    configlib,
    ecai_losses,
    evaluation,
    flow_synthesis,
    flow_train,
    frozen,
    fusion,
    gan,
    input_pipeline,
    lesion,
    metrics,
    optim,
    registration,
    scoring,
    sharding,
    state,
    structure_flow,
    structure_nets,
    synthesis_nets,
    train,
    translator_nets,
)
from synth import writer as writer_lib
from synth.lesion import base as lesion_base
from synth.models import grouped
from synth.models.unet import CONDITIONS, configured_condition
from synth.synthesis_nets import discriminate, in_dtype, synthesize

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
    "paired_l1",
)
D_TERMS = ("d_real", "d_fake", "d_category")
# Decoded BRATS-like example -> the arrays this stage consumes.
preprocess = input_pipeline.image_and_label


def generator_loss(
    g_params, d_params, frozen_params, batch, rng, step, *, models: synthesis_nets.Models, config
):
    """L_G of §6.1.3 (plus L_pre of §6.1.4 while pre-training) for one batch of real slices.

    D judges the fakes once for both updates (`gan.judged_once`): G's terms take gradients through the
    images only, and the second copy of D's output, `judged_fakes`, carries D's own loss on the fakes
    (`discriminator_loss`) to D's parameters. Differentiated alone, this loss gives D no gradient.

    Returns:
      `(loss, (terms, fakes, inputs, for_d, judged_fakes))`; fakes are (K, B, H, W, C), `for_d` what
      else D judges (the old design's real translations and codes; empty for the U-Net design), and
      `judged_fakes` D's (real/fake, category) maps of the fakes for D's loss.
    """
    sy = config.synthesis
    w, kind = sy.loss.weights, sy.loss.category_kind
    pretraining = step < sy.pretrain_steps
    input_key, d_key, ecai_key = jax.random.split(rng, 3)
    # Frozen: no gradient into their parameters; gradients still flow through their activations.
    frozen_params = jax.lax.stop_gradient(frozen_params)
    inputs = conditioning.make_inputs(
        batch,
        input_key,
        frozen_params,
        models=models,
        config=config,
        pretraining=pretraining,
        paired_fraction=sy.paired_fraction,
    )
    channels = lesion_base.channels_per_modality(config)
    real = registration.by_modality(batch["image"], channels)  # (K, B, H, W, C)
    k = real.shape[0]
    dtype = sy.compute_dtype
    fakes = in_dtype(dtype, functools.partial(synthesize, models, num_modalities=k))(g_params, inputs.g_input)
    judge = gan.judged_once(in_dtype(dtype, functools.partial(discriminate, models)))
    (d_fake, c_fake), judged_fakes = judge(d_params, fakes, d_key)
    d_params = jax.lax.stop_gradient(d_params)  # G's other terms (the old design's) judge with D frozen.
    zero = jnp.zeros((), jnp.float32)
    terms = {
        "g_adversarial": gan.per_modality_mse(d_fake, 1.0),
        "g_category": gan.category_sum(c_fake, kind=kind, num_modalities=k),
        "registration": zero,
        "agreement": zero,
        "lesion": zero,
    }
    if models.translator is not None:
        translate_many = functools.partial(
            in_dtype(dtype, functools.partial(translator_nets.translate_many, models.translator)),
            frozen_params["translator"],
        )
        # One call per source where the batched call's maps exceed one Winograd chunk on CPU
        # (`grouped.group_size`): G_t is frozen, so no filter gradients multiply with the calls, and a
        # smaller call's convolutions take Winograd's form (the 184×144 step 14 % faster).
        images = fakes.shape[0] * fakes.shape[1]
        width = models.translator.generator.features
        group = grouped.group_size(images, fakes.shape[2:4], width, itemsize=jnp.dtype(dtype).itemsize)
        translations = registration.translate_pairs(translate_many, fakes, per_source=group < images)
        terms["registration"] = registration.registration_loss(fakes, translations)
        terms["agreement"] = registration.agreement_loss(translations)
    for_d = {}
    if models.design == "ecai":  # Registration by its own networks, and its real-data training (§6.7).
        ecai_terms, for_d = ecai_losses.generator_terms(
            g_params,
            d_params,
            inputs.g_input,
            fakes,
            real,
            inputs.organ,
            ecai_key,
            nets=synthesis_nets.ecai_networks(models, dtype, real.shape[2:4]),
            category_kind=sy.loss.category_kind,
        )
        terms.update(ecai_terms)
    if models.lesion is not None:
        terms["lesion"] = jnp.sum(
            # Only the network and the images go to `dtype`: the targets (boxes) keep float32's precision.
            in_dtype(dtype, lambda params, images: models.lesion.loss(params, images, inputs))(
                frozen_params["lesion"], registration.channels_last(fakes)
            )
        )
    # L_pre: the whole image and, re-weighted, its background (the authors' mask M = 1 - organ).
    background = 1.0 - inputs.organ[None]
    gate = pretraining.astype(jnp.float32)
    terms["pretrain"] = gate * gan.per_modality_mse(fakes - real, 0.0)
    terms["pretrain_background"] = gate * gan.per_modality_mse((fakes - real) * background, 0.0)
    # SkrGAN*'s self-supervised term, in every step alongside the adversarial one (§9.1).
    terms["reconstruction"] = gan.per_modality_mse(fakes - real, 0.0)
    # The paired rows' anchor after pre-training (conditioning.paired_rows): L1 to their own real slice,
    # summed over modalities like the other terms, averaged over the paired rows only.
    paired = inputs.paired.astype(jnp.float32)
    row_l1 = jnp.mean(jnp.abs(fakes - real), axis=(2, 3, 4))  # (K, B)
    terms["paired_l1"] = (1.0 - gate) * jnp.sum(row_l1 * paired) / jnp.maximum(jnp.sum(paired), 1.0)
    loss = gan.weighted_sum(w, terms, G_TERMS)
    if models.design == "ecai":
        loss += gan.weighted_sum(sy.ecai.weights, terms, ecai_losses.ECAI_G_TERMS)
    return loss, (terms, fakes, inputs, for_d, judged_fakes)


def discriminator_loss(
    d_params, batch, judged_fakes, rng, for_d=None, *, models: synthesis_nets.Models, config
):
    """L_D of §6.1.3: real slices against the synthetic ones, plus the category head.

    `judged_fakes`: D's (real/fake, category) maps of the fakes, from `generator_loss`'s one pass of D
    over them (differentiable in `d_params`). `for_d`: the old design's real translations and codes, for
    its extra terms (§6.7).
    """
    loss_config = config.synthesis.loss
    w, kind = loss_config.weights, loss_config.category_kind
    real = registration.by_modality(batch["image"], lesion_base.channels_per_modality(config))
    k = real.shape[0]
    real_key, ecai_key = jax.random.split(rng)
    judge = in_dtype(config.synthesis.compute_dtype, functools.partial(discriminate, models))
    d_real, c_real = judge(d_params, real, real_key)
    d_fake, c_fake = judged_fakes
    category = gan.category_sum(c_real, kind=kind, num_modalities=k)
    if loss_config.category_on_fakes:
        category += gan.category_sum(c_fake, kind=kind, num_modalities=k)
    terms = gan.discriminator_terms(d_real, d_fake, category)
    loss = gan.weighted_sum(w, terms, D_TERMS)
    if models.design == "ecai":
        nets = synthesis_nets.ecai_networks(models, config.synthesis.compute_dtype, real.shape[2:4])
        terms.update(ecai_losses.discriminator_terms(d_params, for_d, ecai_key, nets=nets))
        loss += gan.weighted_sum(config.synthesis.ecai.weights, terms, ecai_losses.ECAI_D_TERMS)
    return loss, terms


def init_state(rng, batch, *, models: synthesis_nets.Models, config, g_tx, d_tx) -> state.GanState:
    g_params, d_params = synthesis_nets.init_params(rng, batch, models=models, config=config)
    return state.init_gan(g_params, d_params, g_tx=g_tx, d_tx=d_tx)


def train_step(gan_state: state.GanState, batch, rng, frozen_params, *, models, config, g_tx, d_tx):
    """One simultaneous G/D update; only G and D are optimised, the frozen networks are arguments.

    One backward pass of L_G + L_D: G's gradient is L_G's (L_D reaches G through nothing), D's is L_D's
    (L_G judges the fakes through `gan.judged_once`, which routes its gradient to the images only), so
    each update is what two separate passes gave, with D run on the fakes once instead of twice.
    """
    g_key, d_key = jax.random.split(rng)

    def both_losses(g_params, d_params):
        g_loss, (terms, _, inputs, for_d, judged_fakes) = generator_loss(
            g_params, d_params, frozen_params, batch, g_key, gan_state.step, models=models, config=config
        )
        d_loss, d_terms = discriminator_loss(
            d_params,
            batch,
            judged_fakes,
            d_key,
            jax.lax.stop_gradient(for_d),
            models=models,
            config=config,
        )
        return g_loss + d_loss, (g_loss, d_loss, terms, d_terms, inputs)

    (_, (g_loss, d_loss, terms, d_terms, inputs)), (g_grads, d_grads) = jax.value_and_grad(
        both_losses, argnums=(0, 1), has_aux=True
    )(gan_state.g_params, gan_state.d_params)
    new, norms = state.gan_update(gan_state, g_grads, d_grads, g_tx=g_tx, d_tx=d_tx)
    metrics_out = dict(terms, **d_terms, **norms, g_loss=g_loss, d_loss=d_loss)
    metrics_out["pretraining"] = (gan_state.step < config.synthesis.pretrain_steps).astype(jnp.float32)
    # Rows whose drawn label fitted none of the bounded candidates and got the empty label instead.
    metrics_out["label_fallback"] = 1.0 - jnp.mean(inputs.fitted.astype(jnp.float32))
    return new, metrics_out


# --------------------------------------------------------------------------------------------------
# Evaluation.


def _per_batch(gan_state, frozen_params, batch, key, *, models: synthesis_nets.Models, config, shards=1):
    """Everything the evaluator reports for one batch, per image (the masked sums are the loop's).

    `shards`: the batch's data-parallel split (`synthesis_nets.generate`).
    """
    k, channels = len(config.data.modalities), lesion_base.channels_per_modality(config)
    inputs = conditioning.make_inputs(
        batch, key, frozen_params, models=models, config=config, pretraining=jnp.asarray(False)
    )
    fakes = synthesis_nets.generate(models, gan_state.g_params, inputs.g_input, k, shards=shards)
    values, predicted = _image_values(fakes, inputs, batch, frozen_params, models=models, config=config)
    d_fake, _ = discriminate(models, gan_state.d_params, fakes)
    d_real, _ = discriminate(models, gan_state.d_params, registration.by_modality(batch["image"], channels))
    values["d_accuracy_fake"] = jnp.mean(d_fake < 0.5, axis=(0, 2, 3, 4))
    values["d_accuracy_real"] = jnp.mean(d_real > 0.5, axis=(0, 2, 3, 4))
    return values, (inputs, registration.channels_last(fakes), predicted)


def _flow_per_batch(
    flow_state, frozen_params, batch, key, *, models: flow_synthesis.Models, config, shards=1
):
    """The flow family's evaluation: samples from the EMA parameters, scored as the GAN's are."""
    channels = lesion_base.channels_per_modality(config)
    label_key, sample_key = jax.random.split(key)
    inputs = conditioning.make_inputs(
        batch, label_key, frozen_params, models=models, config=config, pretraining=jnp.asarray(False)
    )
    images = flow_synthesis.sample_images(
        flow_state.ema_params,
        inputs.structure,
        inputs.organ,
        inputs.label,
        sample_key,
        velocity=models.velocity,
        config=config,
        shards=shards,
    )
    fakes = registration.by_modality(images, channels)
    values, predicted = _image_values(fakes, inputs, batch, frozen_params, models=models, config=config)
    return values, (inputs, images, predicted)


def _image_values(fakes, inputs, batch, frozen_params, *, models, config):
    """Registration consistency and lesion fidelity of synthetic images (K, B, H, W, C), per image."""
    channels = lesion_base.channels_per_modality(config)
    images = registration.channels_last(fakes)
    params = structure_nets.extraction_params(config)
    values = {
        "structure_agreement": scoring.structure_agreement(images, inputs.organ, params, channels),
        "structure_agreement_real": scoring.structure_agreement(
            batch["image"], inputs.organ, params, channels
        ),
    }
    if models.translator is not None:
        translate_many = functools.partial(
            translator_nets.translate_many, models.translator, frozen_params["translator"]
        )
        values["translation_mse"] = scoring.translation_error(translate_many, fakes)
    predicted = None
    if models.lesion is not None:
        predicted = models.lesion.predict(frozen_params["lesion"], images)  # (K, B, H, W)
    if models.lesion is not None and models.lesion.kind == "classify":
        accuracy, chance = scoring.class_accuracy_and_chance(predicted, inputs.label)
        values["lesion_accuracy"], values["lesion_accuracy_chance"] = accuracy.mean(1), chance.mean(1)
    elif models.lesion is not None:
        fidelity = scoring.lesion_dice_and_chance(metrics.region_mask(predicted, "whole"), inputs.label)
        # Dice and its chance level over the same rows (`scoring.lesion_dice_and_chance`).
        scored = fidelity["scored"].astype(jnp.float32)
        values["lesion_dice"], values["lesion_dice/weight"] = fidelity["dice"].mean(1) * scored, scored
        values["lesion_dice_chance"] = fidelity["chance"].mean(1) * scored
        values["lesion_dice_chance/weight"] = scored
    return values, predicted


def _finish(totals, count) -> dict[str, float]:
    scalars = {}
    for name, total in totals.items():
        if not name.endswith("/weight"):
            weight = totals.get(f"{name}/weight", count)
            scalars[name] = float(total / max(weight, 1.0))
    if "d_accuracy_fake" in scalars:
        scalars["d_accuracy"] = 0.5 * (scalars["d_accuracy_fake"] + scalars["d_accuracy_real"])
    return scalars


def _grid(local, shown, *, num_classes: int, modalities, max_rows: int = 4):
    """One row per sample: structure map, lesion label, each synthetic modality, the segmentor's reading."""
    del local  # The inputs G was given are drawn on device.
    inputs, images, predicted = shown
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
    return {"structure_label_" + "_".join(modalities): writer_lib.image_grid(rows)} if rows else {}


def hooks(
    config, *, models: synthesis_nets.Models | flow_synthesis.Models, shards: int = 1
) -> evaluation.Hooks:
    """Lesion fidelity, registration consistency, D's accuracy (the GAN), and a grid of samples.

    `shards`: the data-parallel size of the evaluator's mesh (on CPU both families generate a batch a
    few examples per shard at a time, `synth.models.grouped`).
    """
    per_batch = _flow_per_batch if isinstance(models, flow_synthesis.Models) else _per_batch
    return evaluation.Hooks(
        per_batch=functools.partial(per_batch, models=models, config=config, shards=shards),
        finish=_finish,
        grid=functools.partial(
            _grid, num_classes=config.data.num_classes, modalities=tuple(config.data.modalities)
        ),
    )


# --------------------------------------------------------------------------------------------------
# The stage.


COMPUTE_DTYPES = ("float32", "bfloat16")  # config.synthesis.compute_dtype; bfloat16 = mixed (`in_dtype`).


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises a ValueError naming the key of any unknown or inconsistent stage-B setting."""
    sy = config.synthesis
    configlib.check_choice("synthesis.structure_source", sy.structure_source, STRUCTURE_SOURCES)
    if sy.structure_source == "stage_a" and structure_flow.is_flow(config):
        raise ValueError(
            "config.synthesis.structure_source='stage_a' draws maps from stage A's VAE-GAN inside G's step; "
            "with config.structure.generator='flow' use structure_source='real' (stage C still draws from "
            "the flow)"
        )
    if flow_synthesis.is_flow(config):
        flow_synthesis.check_config(config)
        if sy.structure_source != "real":
            raise ValueError(
                "config.synthesis.generator='flow' learns p(image | structure, label, organ) from real "
                "slices and their own maps: it needs config.synthesis.structure_source='real'"
            )
    processors = sorted(lesion.PROCESSOR_NAMES.values()) + ["none"]
    configlib.check_choice("synthesis.lesion_processor", sy.lesion_processor, processors)
    expected = lesion.PROCESSOR_NAMES[lesion.task(config)]
    if sy.lesion_processor not in ("none", expected):
        # The processor is stage `segmentor`'s network, whose kind config.segmentor.task names.
        raise ValueError(
            f"config.synthesis.lesion_processor={sy.lesion_processor!r} does not match "
            f"config.segmentor.task={lesion.task(config)!r}: use {expected!r} or 'none'"
        )
    configlib.check_choice("synthesis.label_rule", sy.label_rule, fusion.LABEL_FIT_RULES)
    fusion.fused_channels(sy.label_fusion, config.data.num_classes)  # Validates the fusion mode.
    gan.check_loss_weights(NAME, sy.loss.weights, G_TERMS + D_TERMS)
    configlib.check_choice("synthesis.g_input", sy.g_input, conditioning.G_INPUTS)
    configlib.check_choice("synthesis.compute_dtype", sy.compute_dtype, COMPUTE_DTYPES)
    configlib.check_choice("synthesis.design", sy.design, synthesis_nets.DESIGNS)
    if sy.design == "ecai":
        gan.check_loss_weights(
            NAME, sy.ecai.weights, ecai_losses.ECAI_TERMS, where="config.synthesis.ecai.weights"
        )
        if sy.separate_models or len(config.data.modalities) < 2 or sy.structure_source != "real":
            raise ValueError(
                "config.synthesis.design='ecai' is the multimodal design of §6.7: it needs K >= 2 "
                "modalities, separate_models=False and structure_source='real'"
            )
    configlib.check_choice("synthesis.model.condition", configured_condition(sy.model), CONDITIONS)
    conditioning.check_paired_fraction(sy.paired_fraction)
    low, high = sy.noise
    if not 0.0 <= low <= high:
        raise ValueError(f"config.synthesis.noise must be (low, high) with 0 <= low <= high, got {sy.noise}")


def build(config: ml_collections.ConfigDict, mesh=None, *, workdir: str | os.PathLike) -> train.StageSpec:
    """The stage's spec; loads the frozen networks from the earlier stages in `workdir`.

    Both families read the same data and frozen networks and are evaluated and drawn alike; they differ
    in their networks, state and step (`step_parts`).
    """
    check_config(config)
    sy = config.synthesis
    source = input_pipeline.gan_training_source(config.data)
    image = preprocess(source[0])["image"]
    lesion_base.check_channels(config, image)
    models, init_state_fn, train_step_fn = step_parts(config, image.shape[:2])
    mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    frozen_params, provenance = frozen.load_stage_b_frozen(config, workdir, mesh=mesh)
    evaluate = evaluation.make_evaluator(
        input_pipeline.open_source(config.data, config.data.eval_split),
        preprocess=preprocess,
        batch_size=sy.train.batch_size,
        max_examples=sy.eval.num_examples,
        mesh=mesh,
        hooks=hooks(config, models=models, shards=sharding.data_parallel_size(mesh)),
        frozen=frozen_params,
        key=jax.random.fold_in(jax.random.key(config.seed), 11),  # The same noise every evaluation.
    )
    return train.StageSpec(
        name=NAME,
        train=sy.train,
        source=source,
        preprocess=preprocess,
        init_state=init_state_fn,
        train_step=train_step_fn,
        evaluate=evaluate,
        frozen=frozen_params,
        provenance=provenance,
    )


def step_parts(config: ml_collections.ConfigDict, hw: tuple[int, int]):
    """`(models, init_state, train_step)` of the configured family for images of `hw`, options bound.

    What `build` hands the loop, without data: `benchmarks.memory` compiles the step from these.
    """
    return _flow_parts(config, hw) if flow_synthesis.is_flow(config) else _gan_parts(config, hw)


def _gan_parts(config: ml_collections.ConfigDict, hw):
    """The paper's G and D: networks, `init_state` and `train_step` with their options bound."""
    models = synthesis_nets.make_models(config, hw)
    g_tx, d_tx = (optim.make_optimizer(config.synthesis.optim[net]) for net in ("g", "d"))
    options = dict(models=models, config=config, g_tx=g_tx, d_tx=d_tx)
    return models, functools.partial(init_state, **options), functools.partial(train_step, **options)


def _flow_parts(config: ml_collections.ConfigDict, hw):
    """The flow family: velocity net (and the frozen networks' definitions), state init and step."""
    lesion_processor = lesion.processor(config, hw) if flow_synthesis.uses_lesion_processor(config) else None
    g_t = translator_nets.make_models(config, hw) if flow_synthesis.uses_translator(config) else None
    models = flow_synthesis.make_models(config, hw, lesion=lesion_processor, translator=g_t)
    tx = optim.make_optimizer(config.synthesis.flow.optim)
    init = functools.partial(flow_synthesis.init_state, models=models, config=config, tx=tx)
    step = functools.partial(flow_train.train_step, tx=tx, **flow_synthesis.train_options(config, models))
    return models, init, step


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at=None):
    """Trains G and D in `workdir/synthesis` unless already complete (the earlier stages must be done)."""
    return train.run_unless_complete(
        NAME, functools.partial(build, workdir=workdir), config, workdir, stop_at=stop_at
    )
