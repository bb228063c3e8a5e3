"""Stage B's networks (METHOD §4.1-4.2, §6.0, §6.7): the generator G, its discriminator D, and their calls.

`make_models` builds, from the config, the trained G and D and the definitions of the frozen networks
stage B uses: the translator G_t (registration terms), the lesion processor (lesion guidance) and stage
A's generator (`structure_source="stage_a"`). Two designs (`config.synthesis.design`):

  unet   the final design: one conditional U-Net G makes all K modalities of a batch in one call (its
         input tiled K times, the K modality one-hots at the bottleneck); a two-head D (real/fake and
         modality category, ACGAN). With `separate_models`, K independent G/D pairs (BaseGAN, SkrGAN*);
  ecai   the AAAI/ECAI drafts' encoders, decoder and code discriminator (§6.7, `synth.models.ecai`).

`synthesize` and `discriminate` are the calls every consumer shares (stage B's step and evaluator, the
comparison, generation); `generate` is `synthesize` for inference, a few examples per call of G on CPU
(`synth.models.grouped`); `in_dtype` runs a call in bfloat16 with float32 results (mixed precision).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import (
    conditioning,
    ecai_losses,
    flow_synthesis,
    gan,
    lesion,
    registration,
    structure_nets,
    translator_nets,
)
from synth.lesion import base as lesion_base
from synth.models import ecai as ecai_models
from synth.models import grouped, sizes
from synth.models.discriminator import PatchDiscriminator
from synth.models.ecai import EcaiDiscriminator, EcaiGenerator
from synth.models.unet import UNet, apply_per_condition, configured_condition, configured_remat

# config.synthesis.design: "unet", the final design's conditional U-Net G and two-head D; "ecai", the
# AAAI/ECAI drafts' encoders, decoder and code discriminator with their extra losses (§6.7).
DESIGNS = ("unet", "ecai")


class Models(NamedTuple):
    """Stage B's networks: the trained G and D, and the frozen ones' definitions."""

    generator: UNet | EcaiGenerator
    discriminator: PatchDiscriminator | EcaiDiscriminator
    translator: translator_nets.Models | None  # None for K = 1, registration off, or the ecai design.
    lesion: lesion_base.LesionProcessor | None  # None with `lesion_processor="none"`.
    structure: structure_nets.Models | None  # None unless structure_source="stage_a".
    # K independent G/D pairs (BaseGAN, SkrGAN*): parameters stacked on a leading K axis, no modality
    # code, single-head Ds; else one G for every modality with its code and one two-head D.
    separate: bool = False
    design: str = "unet"  # `DESIGNS`; "ecai": G = EC_R + EC_M + DC_M, D = D_M + FD_R (§6.7).


def registers(config: ml_collections.ConfigDict) -> bool:
    """Whether stage B has registration terms: K > 1 and a registration or agreement weight."""
    weights = config.synthesis.loss.weights
    return len(config.data.modalities) > 1 and (weights.registration > 0 or weights.agreement > 0)


def uses_translator(config: ml_collections.ConfigDict) -> bool:
    """Whether stage B needs the frozen G_t (the old design translates with its own networks)."""
    if flow_synthesis.is_flow(config):
        return flow_synthesis.uses_translator(config)
    return registers(config) and config.synthesis.design != "ecai"


def uses_lesion_processor(config: ml_collections.ConfigDict) -> bool:
    """Whether stage B's loss reads the frozen lesion processor (`config.synthesis.lesion_processor`)."""
    if flow_synthesis.is_flow(config):
        return flow_synthesis.uses_lesion_processor(config)
    return config.synthesis.lesion_processor != "none"


def uses_stage_a(config: ml_collections.ConfigDict) -> bool:
    """Whether stage B draws its structure maps from the frozen stage-A generator after pre-training."""
    return config.synthesis.structure_source == "stage_a" and not flow_synthesis.is_flow(config)


def make_models(config: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> Models:
    """Stage B's networks for images of `image_hw`, sized from the one table (`synth.models.sizes`)."""
    sy = config.synthesis
    k = len(config.data.modalities)
    channels = lesion_base.channels_per_modality(config)
    common = dict(activation=sy.model.activation, kernel_init=sy.model.kernel_init)
    structure = structure_nets.make_models(config, image_hw) if uses_stage_a(config) else None
    lesion_processor = lesion.processor(config, image_hw) if uses_lesion_processor(config) else None
    category = gan.category_channels(sy.loss.category_kind, k)
    if sy.design == "ecai":
        features = sizes.ecai_kwargs(sy.model.size, image_hw)["features"]
        return Models(
            generator=EcaiGenerator(features=features, out_channels=channels, **common),
            discriminator=EcaiDiscriminator(
                **sizes.discriminator_kwargs(sy.model.size, image_hw),
                code_features=sizes.code_discriminator_kwargs(sy.model.size, image_hw)["features"],
                code_channels=features * ecai_models.CODE_MULTIPLIER,
                category_channels=category,
                dropout_rate=sy.model.disc_dropout,
                **common,
            ),
            translator=None,  # The design translates with its own EC_M and DC_M.
            lesion=lesion_processor,
            structure=structure,
            design="ecai",
        )
    separate = bool(sy.separate_models)
    return Models(
        generator=UNet(
            **sizes.unet_kwargs(sy.model.size, image_hw),
            out_channels=channels,
            norm_output=sy.model.norm_output,
            condition=configured_condition(sy.model),
            remat=configured_remat(sy.model),
            **common,
        ),
        discriminator=PatchDiscriminator(
            **sizes.discriminator_kwargs(sy.model.size, image_hw),
            heads=2 if k > 1 and not separate else 1,
            category_channels=category,
            dropout_rate=sy.model.disc_dropout,
            **common,
        ),
        translator=translator_nets.make_models(config, image_hw) if uses_translator(config) else None,
        lesion=lesion_processor,
        structure=structure,
        separate=separate,
    )


def init_params(rng: jax.Array, batch, *, models: Models, config) -> tuple[Any, Any]:
    """`(g_params, d_params)` for batches like `batch` (`image`, `label`); K stacked pairs if separate."""
    k = len(config.data.modalities)
    s, organ = jnp.zeros_like(batch["image"][..., :1]), jnp.ones_like(batch["image"][..., :1])
    g_input = conditioning.generator_input(jax.random.key(0), s, organ, batch["label"], config=config)
    g_key, d_key = jax.random.split(rng)
    one_image = batch["image"][..., : lesion_base.channels_per_modality(config)]
    if models.separate:  # K independent models: K independent inits, stacked.
        g_one = g_input[0] if g_input.ndim == 5 else g_input
        g_params = jax.vmap(lambda key: models.generator.init(key, g_one, None))(jax.random.split(g_key, k))
        d_params = jax.vmap(lambda key: models.discriminator.init(key, one_image))(jax.random.split(d_key, k))
        return g_params, d_params
    cond = registration.modality_conditions(np.zeros(1, int), g_input.shape[0], k) if k > 1 else None
    return models.generator.init(g_key, g_input, cond), models.discriminator.init(d_key, one_image)


def abstract_params(config: ml_collections.ConfigDict, image_shape) -> dict:
    """The shapes of the trained `g_params` and `d_params`, for loading them frozen (`synth.frozen`).

    The flow family's are its `params` and `ema_params` (`flow_synthesis.abstract_params`).
    """
    if flow_synthesis.is_flow(config):
        return flow_synthesis.abstract_params(config, image_shape)
    models = make_models(config, tuple(image_shape[:2]))
    batch = {
        "image": jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
        "label": jax.ShapeDtypeStruct((1, *image_shape[:2]), jnp.int32),
    }
    init = functools.partial(init_params, models=models, config=config)
    g, d = jax.eval_shape(init, jax.random.key(0), batch)
    return {"g_params": g, "d_params": d}


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
    if k == 1:
        return models.generator.apply(g_params, g_input, None)[None]
    if isinstance(models.generator, UNet):  # FiLM: one encoder pass for all K (unet.apply_per_condition).
        conds = jnp.broadcast_to(jnp.eye(k)[:, None], (k, b, k))
        return apply_per_condition(models.generator, g_params, g_input, conds)
    tiled = registration.flat(jnp.broadcast_to(g_input[None], (k,) + g_input.shape))
    out = models.generator.apply(g_params, tiled, registration.modality_conditions(np.arange(k), b, k))
    return registration.unflat(out, (k, b))


def generation_group(
    models: Models, g_input_shape: tuple[int, ...], *, itemsize: int = 4, shards: int = 1, mode: str = "auto"
) -> int:
    """Examples per shard in each of `generate`'s calls of G for inputs of `g_input_shape` (B, H, W, C)."""
    features = getattr(models.generator, "features", 64)
    b, h, w = g_input_shape[:3]
    return grouped.group_size(b, (h, w), features, itemsize=itemsize, shards=shards, mode=mode)


def generate(
    models: Models, g_params, g_input: jax.Array, num_modalities: int, *, shards: int = 1, mode: str = "auto"
) -> jax.Array:
    """`synthesize` for inference (generation, stage C, evaluation): the same (K, B, H, W, channels).

    On CPU ("auto", or "grouped") the batch goes through G `generation_group` examples per shard at a
    time (`synth.models.grouped`), where G's convolutions run fastest on XLA:CPU; the results equal one
    batched call's. `shards` is the batch's data-parallel split (`sharding.data_parallel_size`).
    """
    if g_input.ndim != 4:  # Separate models' own inputs (K, B, …): `synthesize` as it is.
        return synthesize(models, g_params, g_input, num_modalities)
    group = generation_group(models, g_input.shape, itemsize=g_input.dtype.itemsize, shards=shards, mode=mode)
    return grouped.apply(
        lambda x: synthesize(models, g_params, x, num_modalities), g_input, group, shards=shards, out_axis=1
    )


def discriminate(models: Models, d_params, images: jax.Array, rng=None):
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
    return registration.unflat(d, lead), None if c is None else registration.unflat(c, lead)


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


def ecai_networks(models: Models, dtype, image_hw: tuple[int, int]) -> ecai_losses.Networks:
    """The old design's network calls, each computed in `dtype` (its losses stay float32, as the method's)."""
    g, d = models.generator, models.discriminator
    return ecai_losses.Networks(
        encode_fusion=in_dtype(dtype, functools.partial(g.apply, method="encode_fusion")),
        encode_image=in_dtype(dtype, functools.partial(g.apply, method="encode_image")),
        decode=in_dtype(dtype, functools.partial(g.apply, image_hw=tuple(image_hw), method="decode")),
        judge_code=in_dtype(dtype, functools.partial(d.apply, method="judge_code")),
        discriminate=in_dtype(dtype, functools.partial(discriminate, models)),
    )
