"""The modality translator's networks (METHOD §4.1, §6.2): G_t and its two-head D_t, built from the config.

G_t is the conditional U-Net of §4.1: one modality's image and a target modality's one-hot code (injected
at the bottleneck) in, the image in the target modality out. Stage `translator` trains it; frozen, it
supplies stage B's registration loss and the comparison's translation error.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import gan, registration
from synth.models import sizes, unet
from synth.models.discriminator import PatchDiscriminator
from synth.models.unet import UNet, configured_condition, configured_remat


class Models(NamedTuple):
    """The stage's two networks (module definitions, no parameters)."""

    generator: UNet
    discriminator: PatchDiscriminator


def make_models(config: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> Models:
    """G_t (out 1 channel, sigmoid) and the two-head D_t, sized from the one table."""
    tr = config.translator
    common = dict(activation=tr.model.activation, kernel_init=tr.model.kernel_init)
    k = len(config.data.modalities)
    return Models(
        generator=UNet(
            **sizes.unet_kwargs(tr.model.size, image_hw),
            out_channels=1,
            norm_output=tr.model.norm_output,
            condition=configured_condition(tr.model),
            remat=configured_remat(tr.model),
            **common,
        ),
        discriminator=PatchDiscriminator(
            **sizes.discriminator_kwargs(tr.model.size, image_hw),
            heads=2,
            category_channels=gan.category_channels(tr.loss.category_kind, k),
            **common,
        ),
    )


def translate(models: Models, g_params, images: jax.Array, targets: jax.Array) -> jax.Array:
    """G_t: images (N, H, W, 1) into the modalities of the one-hot `targets` (N, K)."""
    return models.generator.apply(g_params, images, targets)


def translate_many(models: Models, g_params, images: jax.Array, targets: jax.Array) -> jax.Array:
    """G_t: images (N, H, W, 1) into T modalities each, one-hot `targets` (T, N, K) -> (T, N, H, W, 1).

    With FiLM the encoder runs once per image whatever T is (`unet.apply_per_condition`).
    """
    return unet.apply_per_condition(models.generator, g_params, images, targets)


def init_params(rng: jax.Array, images: jax.Array, *, models: Models) -> tuple[dict, dict]:
    """`(g_params, d_params)` of G_t and D_t for registered images (B, H, W, K)."""
    x = registration.by_modality(images)[:, :1]  # One image per modality is enough to init.
    k = x.shape[0]
    g_key, d_key = jax.random.split(rng)
    g_params = models.generator.init(g_key, x[0], registration.modality_conditions(np.zeros(1, int), 1, k))
    d_params = models.discriminator.init(d_key, x[0])
    return g_params, d_params


def abstract_params(config: ml_collections.ConfigDict, image_shape) -> dict:
    """The shapes of the trained `g_params` and `d_params`, for loading them frozen (`synth.frozen`)."""
    init = functools.partial(init_params, models=make_models(config, tuple(image_shape[:2])))
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    g, d = jax.eval_shape(init, jax.random.key(0), images)
    return {"g_params": g, "d_params": d}
