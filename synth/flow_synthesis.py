"""Stage B by flow matching: one velocity network makes all K modalities jointly, registered by construction.

The flow family's stage B (`config.synthesis.generator = "flow"`, issue 18), beside the paper's GAN
(`"gan"`). The K·C image channels are one sample of a rectified flow (`synth.flow`) conditioned on the
clean structure map, the lesion label (one-hot) and the organ mask, concatenated to the noisy input; the
modalities share every pixel's path from noise, so they line up by construction rather than through a
registration loss. Training pairs each real slice with its own extracted structure map, organ mask and
label (the conditional distribution p(image | s, l, m) is learnt from data, not through a discriminator);
labels are dropped at `label_dropout` so classifier-free guidance works at sampling time; an exponential
moving average of the parameters samples.

Optional terms reach the frozen real-trained networks through the one-step estimate x̂₁ of the clean
sample (`flow.flow_matching_loss`): the lesion processor's loss against the slice's own label (`lesion`)
and G_t's registration loss (`registration`), each with its weight in `config.synthesis.flow.weights`;
0 switches a term off, and its frozen network is then not needed for training.

This module holds the networks, the step and sampling; `synth.stages.synthesis` wires them as the stage,
and `synth.generate` samples through `sample_images`, so stage C, stage D, compare and the notebooks run
a flow-made pipeline unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from synth import flow, flow_train, gan, registration, structure_nets, translator_nets
from synth.lesion import base as lesion_base
from synth.models import sizes
from synth.models.flow_unet import FlowUNet
from synth.models.unet import configured_remat

FLOW_TERMS = ("lesion", "registration")  # config.synthesis.flow.weights


class Models(NamedTuple):
    """The flow stage's velocity network and the frozen networks its optional terms and evaluation read."""

    velocity: FlowUNet
    lesion: lesion_base.LesionProcessor | None  # The real-trained lesion processor (None: not loaded).
    translator: translator_nets.Models | None  # G_t (None for K = 1).
    structure: None = None  # Maps are always the real slices' own (read by `conditioning.make_inputs`).


def is_flow(config: ml_collections.ConfigDict) -> bool:
    """Whether stage B is the flow family (`config.synthesis.generator`)."""
    return flow_train.is_flow_stage(config, "synthesis")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises a ValueError naming the key of any unknown or inconsistent flow setting."""
    fl = config.synthesis.flow
    flow_train.check_settings(fl, "synthesis.flow")
    if not 0.0 <= fl.label_dropout <= 1.0:
        raise ValueError(f"config.synthesis.flow.label_dropout must be in [0, 1], got {fl.label_dropout}")
    if fl.sampler.guidance != 1.0 and fl.label_dropout == 0.0:
        raise ValueError(
            "config.synthesis.flow.sampler.guidance other than 1 needs a model trained with label dropout: "
            "set config.synthesis.flow.label_dropout > 0 (e.g. 0.1)"
        )
    gan.check_loss_weights("synthesis", fl.weights, FLOW_TERMS, where="config.synthesis.flow.weights")
    if any(float(v) < 0 for v in fl.weights.values()):
        raise ValueError(f"config.synthesis.flow.weights must be >= 0, got {dict(fl.weights)}")


def uses_lesion_processor(config: ml_collections.ConfigDict) -> bool:
    """The frozen lesion processor is read for the lesion term and for evaluating lesion fidelity."""
    return config.synthesis.lesion_processor != "none"


def uses_translator(config: ml_collections.ConfigDict) -> bool:
    """G_t is read (K > 1) for the registration term, or for the evaluation's translation error.

    `config.synthesis.flow.score_registration`: whether the evaluation scores the samples with G_t's
    translation error when no term trains against it (G_t then costs a stage of its own).
    """
    fl = config.synthesis.flow
    scored = fl.get("score_registration", True) or fl.weights.registration > 0
    return len(config.data.modalities) > 1 and bool(scored)


def image_channels(config: ml_collections.ConfigDict) -> int:
    """K·C: every modality's channels, generated as one sample."""
    return len(config.data.modalities) * lesion_base.channels_per_modality(config)


def make_velocity(config: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> FlowUNet:
    """The velocity network, sized from the one table (`sizes.flow_unet_kwargs`)."""
    dtype = jnp.bfloat16 if config.synthesis.compute_dtype == "bfloat16" else None
    kwargs = sizes.flow_unet_kwargs(config.synthesis.flow.size, tuple(image_hw))
    remat = configured_remat(config.synthesis.flow)
    return FlowUNet(out_channels=image_channels(config), dtype=dtype, remat=remat, **kwargs)


def make_models(
    config: ml_collections.ConfigDict, image_hw: tuple[int, int], *, lesion=None, translator=None
) -> Models:
    """The stage's networks; `lesion` and `translator` are the frozen ones' definitions when loaded."""
    return Models(make_velocity(config, image_hw), lesion, translator)


def prepare(batch, rng, *, config: ml_collections.ConfigDict):
    """Flow targets of a batch of real slices: ``(x1, cond)`` with their own extracted maps and labels."""
    structure, organ = structure_nets.real_structures(batch, **structure_nets.extract_kwargs(config))
    return flow_train.image_targets(
        {**batch, "structure": structure, "organ": organ},
        rng,
        num_classes=config.data.num_classes,
        label_dropout=config.synthesis.flow.label_dropout,
    )


def extra_loss(aux, batch, frozen_params, *, models: Models, config: ml_collections.ConfigDict):
    """The optional lesion and registration terms on the one-step estimate x̂₁ (weights 0: none)."""
    weights = config.synthesis.flow.weights
    images = flow.to_image_space(aux["x1_hat"])  # (B, H, W, K·C), unclipped so gradients always flow.
    total, metrics = jnp.zeros((), jnp.float32), {}
    if weights.lesion > 0:
        inputs = _own_inputs(batch)
        per_modality = models.lesion.loss(frozen_params["lesion"], images, inputs)
        metrics["lesion"] = jnp.sum(per_modality)
        total += weights.lesion * metrics["lesion"]
    if weights.registration > 0:
        x = registration.by_modality(images, lesion_base.channels_per_modality(config))
        g_t = frozen_params["translator"]
        many = functools.partial(translator_nets.translate_many, models.translator, g_t)
        metrics["registration"] = registration.registration_loss(x, registration.translate_pairs(many, x))
        total += weights.registration * metrics["registration"]
    return total, metrics


class _OwnLabel(NamedTuple):
    """What a lesion processor's loss reads of a step's inputs, for the slice's own label."""

    label: jax.Array
    boxes: jax.Array | None = None
    box_classes: jax.Array | None = None


def _own_inputs(batch) -> _OwnLabel:
    return _OwnLabel(batch["label"], batch.get("boxes"), batch.get("box_classes"))


def frozen_for_training(config: ml_collections.ConfigDict) -> bool:
    """Whether the train step reads frozen networks (a term with a weight above 0)."""
    return any(float(v) > 0 for v in config.synthesis.flow.weights.values())


def train_options(config: ml_collections.ConfigDict, models: Models) -> dict[str, Any]:
    """`flow_train.train_step`'s keyword options from the config."""
    return flow_train.step_options(
        config.synthesis.flow,
        model=models.velocity,
        prepare=functools.partial(prepare, config=config),
        extra_loss=functools.partial(extra_loss, models=models, config=config)
        if frozen_for_training(config)
        else None,
    )


def init_state(rng, batch, *, models: Models, config, tx) -> flow_train.FlowState:
    return flow_train.init_state(
        rng, batch, model=models.velocity, tx=tx, prepare=functools.partial(prepare, config=config)
    )


def abstract_params(config: ml_collections.ConfigDict, image_shape) -> dict:
    """The shapes of the trained `params` and `ema_params`, for loading them frozen (`synth.frozen`)."""
    velocity = make_velocity(config, tuple(image_shape[:2]))
    h, w = image_shape[:2]
    x = jax.ShapeDtypeStruct((1, h, w, image_channels(config)), jnp.float32)
    cond = jax.ShapeDtypeStruct((1, h, w, flow.conditioning_channels(config.data.num_classes)), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    params = jax.eval_shape(velocity.init, jax.random.key(0), x, t, cond)
    return {"params": params, "ema_params": params}


def sample_images(
    ema_params,
    structure,
    organ,
    label,
    key,
    *,
    velocity: FlowUNet,
    config: ml_collections.ConfigDict,
    shards=1,
) -> jax.Array:
    """All K registered modalities (B, H, W, K·C) in [0, 1] for maps (B, H, W, 1), masks and labels (B, H, W).

    The configured sampler (`config.synthesis.flow.sampler`: method, steps, guidance scale); deterministic
    for a key. On CPU a few examples per shard at a time (`flow_train.sample_configured`; `shards`: the
    batch's data-parallel split).
    """
    num_classes = config.data.num_classes
    cond = flow.conditioning_maps(structure, label.astype(jnp.int32), organ, num_classes=num_classes)
    guided = float(config.synthesis.flow.sampler.guidance) != 1.0
    null_cond = flow.null_conditioning(cond, num_classes=num_classes) if guided else None
    return flow_train.sample_configured(
        functools.partial(velocity.apply, ema_params),
        key,
        cond,
        null_cond,
        settings=config.synthesis.flow,
        shape=structure.shape[:3] + (velocity.out_channels,),
        features=velocity.features,
        shards=shards,
    )
