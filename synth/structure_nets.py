"""Stage A's networks (METHOD §4.3-4.6, §5.4): built from the config, initialised, sampled through the filter.

The VAE-GAN of stage `structure`: encoder E_s, decoder G_s and mask generator G_m (the G side), structure
and code discriminators D_s, D_z (the D side). Stage A trains them (`synth.stages.structure`); stage B
(with `structure_source="stage_a"`) and stage C draw structure maps and organ masks from the trained G_s
and G_m here, and stage C filters them with D_s's score and the contour check of §5.4
(`sample_structures`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import extraction, sharding, structure_filter
from synth import structure_losses as losses_a
from synth.models import grouped, sizes, vae
from synth.models.discriminator import CodeDiscriminator, PatchDiscriminator
from synth.models.unet import UNet


class Models(NamedTuple):
    """Stage A's five networks (static: module definitions, no parameters)."""

    encoder: vae.VAEEncoder
    decoder: vae.VAEDecoder
    mask: UNet
    map_disc: PatchDiscriminator
    code_disc: CodeDiscriminator


def make_models(config: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> Models:
    """Stage A's networks, sized from the one table (`synth.models.sizes`)."""
    m = config.structure.model
    common = dict(activation=m.activation, kernel_init=m.kernel_init)
    vae_sizes = sizes.vae_kwargs(m.size, image_hw)
    # Workdirs from before the key had the code's output instance norm (§11.18).
    norm_output = m.get("norm_output", True)
    # E_s's σ at most the prior's 1 (`vae.bounded_logvar`); workdirs from before the key: unbounded.
    max_logvar = 0.0 if m.get("bound_logvar", False) else None
    return Models(
        encoder=vae.VAEEncoder(**vae_sizes, dropout_rate=m.encoder_dropout, max_logvar=max_logvar, **common),
        decoder=vae.VAEDecoder(
            image_hw=tuple(image_hw), **vae_sizes, out_channels=2, norm_output=norm_output, **common
        ),
        mask=UNet(
            **sizes.mask_generator_kwargs(m.size, image_hw),
            out_channels=2,
            dropout_rate=m.mask_dropout,
            norm_output=norm_output,
            **common,
        ),
        map_disc=PatchDiscriminator(
            **sizes.discriminator_kwargs(m.size, image_hw), dropout_rate=m.disc_dropout, **common
        ),
        code_disc=CodeDiscriminator(**sizes.code_discriminator_kwargs(m.size, image_hw), **common),
    )


def extraction_params(config: ml_collections.ConfigDict) -> extraction.ExtractionParams:
    """The dataset's extraction parameters (§3.3), `config.structure.extraction`."""
    return extraction.ExtractionParams.from_config(config.structure.extraction)


def extract_kwargs(config: ml_collections.ConfigDict) -> dict:
    """`real_structures`' settings from the config: the extraction parameters and lesion removal."""
    return dict(params=extraction_params(config), remove_lesions=config.structure.remove_lesions)


def real_structures(batch, *, params: extraction.ExtractionParams, remove_lesions: bool):
    """(structure map, organ mask), each (B, H, W, 1) in {0, 1}, of a batch of real images."""
    return extraction.extract(batch["image"], batch["label"], params, remove_lesions=remove_lesions)


def init_params(rng: jax.Array, s: jax.Array, *, models: Models) -> tuple[dict, dict]:
    """`(g_params, d_params)` of stage A's five networks for structure maps `s` (B, H, W, S)."""
    s1h = losses_a.paired_one_hot(s)
    keys = jax.random.split(rng, 5)
    code_shape = vae.code_shape(s.shape[1:3], models.encoder.code_channels)
    code = jnp.zeros((s.shape[0], *code_shape), jnp.float32)
    g_params = {
        "encoder": models.encoder.init(keys[0], vae.encoder_input(s)),
        "decoder": models.decoder.init(keys[1], code),
        "mask": models.mask.init(keys[2], s1h),
    }
    d_params = {"map": models.map_disc.init(keys[3], s1h), "code": models.code_disc.init(keys[4], code)}
    return g_params, d_params


def abstract_params(config: ml_collections.ConfigDict, image_shape) -> dict:
    """The shapes of the trained `g_params` and `d_params`, for loading them frozen (`synth.frozen`)."""
    models = make_models(config, tuple(image_shape[:2]))
    image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    label = jax.ShapeDtypeStruct((1, *image_shape[:2]), jnp.int32)
    extract = functools.partial(real_structures, **extract_kwargs(config))
    s = jax.eval_shape(lambda x, lab: extract({"image": x, "label": lab})[0], image, label)
    g, d = jax.eval_shape(functools.partial(init_params, models=models), jax.random.key(0), s)
    return {"g_params": g, "d_params": d}


def generate_maps(g_params, key, n: int, *, models: Models, code_shape):
    """Draws n structure maps and their organ masks from noise, unfiltered (G_s, then G_m on the map).

    Returns:
      `(maps, masks, map_probs)`: maps and masks (n, H, W) int32 in {0, 1} (masks: 1 = organ), and the
      map's soft paired one-hot (n, H, W, 2).
    """
    return decode(g_params, jax.random.normal(key, (n, *code_shape)), models=models)


def decode(g_params, prior: jax.Array, *, models: Models):
    """`generate_maps` from given prior draws (n, *code_shape)."""
    probs = models.decoder.apply(g_params["decoder"], prior)
    # Kept split under a mesh: XLA would otherwise gather the maps here for a replicated result and run
    # G_m on all of them on every device.
    maps = sharding.split_like_batch(jnp.argmax(probs, axis=-1))
    mask_probs = models.mask.apply(
        g_params["mask"], losses_a.paired_one_hot(maps[..., None].astype(jnp.float32))
    )
    return maps, jnp.argmax(mask_probs, axis=-1), probs


def generate(g_params, d_params, key, n: int, *, models: Models, code_shape, mode: str = "auto"):
    """Draws n structure maps and masks from noise, with D_s's score of each (§5.4 step 1).

    On CPU a few draws per call of the networks (`synth.models.grouped`, `mode`): at 184², batch 8,
    8.1 maps/s against one call's 5.8 (BENCHMARKS.md, "Generation a few examples at a time"). Traced
    under a mesh (`jax.set_mesh`), the draws are split over its `data` axis, n padded to a multiple of
    its size and cut back: each device decodes its share instead of all n.

    Returns:
      `(maps, masks, scores)`: maps and masks (n, H, W) int32 in {0, 1} (masks: 1 = organ), scores (n,).
    """

    def scored(prior):
        maps, masks, probs = decode(g_params, prior, models=models)
        # The authors score the soft map (dropout on); ours is deterministic: D_s in inference mode.
        return maps, masks, jnp.mean(models.map_disc.apply(d_params["map"], probs), axis=(1, 2, 3))

    shards = sharding.context_data_size()
    size = sharding.padded_size(n, shards)
    prior = sharding.split_like_batch(jax.random.normal(key, (size, *code_shape)))
    # The decoder's last level has `features` channels at full size.
    decoder = models.decoder
    group = grouped.group_size(size, decoder.image_hw, decoder.features, mode=mode, shards=shards)
    drawn = grouped.apply(scored, prior, group, shards=shards)
    return sharding.gathered(jax.tree.map(lambda x: x[:n], drawn))


def make_generate_fn(models: Models, code_shape):
    """`generate` jitted for these networks: `(g_params, d_params, key, n) -> (maps, masks, scores)`."""
    return jax.jit(functools.partial(generate, models=models, code_shape=tuple(code_shape)), static_argnums=3)


def sample_structures(
    g_params,
    d_params,
    key: jax.Array,
    n: int,
    *,
    models: Models,
    code_shape,
    filter_params: structure_filter.FilterParams,
    generate_fn=None,
) -> dict[str, np.ndarray]:
    """Draws n filtered structure maps and masks (§5.4, Algorithm 3).

    A sample is accepted if D_s scores it at least `min_j_s`, or if the filled-contour mask of its map agrees
    with G_m's mask within MAE `mae`. Rejected slots are redrawn, up to `max_count` draws each; a slot that
    never passes keeps its best-scored draw. The filter runs on the host (OpenCV), outside jit.

    Args:
      generate_fn: `make_generate_fn(models, code_shape)`, made once by a caller that samples repeatedly
        (a new jit per call would compile again); made here when None.

    Returns:
      `maps`, `masks` (n, H, W) uint8; `scores` (n,); `accepted` (n,) bool; `draws` (n,) draws used.
    """
    gen = generate_fn or make_generate_fn(models, code_shape)

    def draw(attempt: int):
        maps, masks, scores = jax.device_get(gen(g_params, d_params, jax.random.fold_in(key, attempt), n))
        return np.asarray(maps), np.asarray(masks), np.asarray(scores)

    return structure_filter.sample_filtered(draw, n, params=filter_params)
