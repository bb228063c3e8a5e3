"""Stage A by flow matching: structure map and organ mask drawn together from noise, as one 2-channel sample.

The flow family's stage A (`config.structure.generator = "flow"`, issue 18), beside the paper's VAE-GAN
(`"gan"`, `synth.structure_nets`). One velocity network (`synth.models.flow_unet`, sized in the one table)
learns the joint distribution of a real slice's extracted structure map and organ mask (§3.3, with the
lesion removed, §3.4) as a rectified flow (`synth.flow`), unconditional; an exponential moving average of
its parameters samples. A sample's two channels are thresholded into the map and the mask, so the mask is
drawn with its map rather than inferred from it (the GAN's G_m).

What comes out feeds the same §5.4 filter as the GAN's draws. The filter's first test is D_s's score,
and this family has no discriminator: a map passes on the contour test alone (its filled contour must
match its own mask), the paper's Algorithm 3 without the shortcut. Of several failed draws the one whose
contour fill is nearest its mask is kept (the GAN keeps the best-scored one).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import flow, flow_train, sharding, structure_filter, structure_nets
from synth.models import sizes
from synth.models.flow_unet import FlowUNet
from synth.models.unet import configured_remat

SAMPLE_CHANNELS = 2  # Structure map and organ mask.


class Models(NamedTuple):
    """Stage A's flow network (static: a module definition, no parameters)."""

    velocity: FlowUNet


def is_flow(config: ml_collections.ConfigDict) -> bool:
    """Whether stage A is the flow family (`config.structure.generator`)."""
    return flow_train.is_flow_stage(config, "structure")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises a ValueError naming the key of any unknown or inconsistent stage-A flow setting."""
    fl = config.structure.flow
    flow_train.check_settings(fl, "structure.flow")
    if not 0.0 < float(fl.threshold) < 1.0:
        raise ValueError(f"config.structure.flow.threshold must be in (0, 1), got {fl.threshold}")


def make_models(config: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> Models:
    """The velocity network, sized from the one table (`sizes.flow_unet_kwargs`)."""
    kwargs = sizes.flow_unet_kwargs(config.structure.flow.size, tuple(image_hw))
    remat = configured_remat(config.structure.flow)
    return Models(FlowUNet(out_channels=SAMPLE_CHANNELS, remat=remat, **kwargs))


def prepare(batch, rng, *, config: ml_collections.ConfigDict):
    """Flow targets of a batch of real images: their extracted (map, mask) as one 2-channel sample."""
    structure, organ = structure_nets.real_structures(batch, **structure_nets.extract_kwargs(config))
    return flow_train.structure_targets({"structure": structure, "organ": organ}, rng)


def train_options(config: ml_collections.ConfigDict, models: Models) -> dict[str, Any]:
    """`flow_train.train_step`'s keyword options from the config."""
    return flow_train.step_options(
        config.structure.flow, model=models.velocity, prepare=functools.partial(prepare, config=config)
    )


def init_state(rng, batch, *, models: Models, config, tx) -> flow_train.FlowState:
    return flow_train.init_state(
        rng, batch, model=models.velocity, tx=tx, prepare=functools.partial(prepare, config=config)
    )


def abstract_params(config: ml_collections.ConfigDict, image_shape) -> dict:
    """The shapes of the trained `params` and `ema_params`, for loading them frozen (`synth.frozen`)."""
    velocity = make_models(config, tuple(image_shape[:2])).velocity
    h, w = image_shape[:2]
    x = jax.ShapeDtypeStruct((1, h, w, SAMPLE_CHANNELS), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    params = jax.eval_shape(velocity.init, jax.random.key(0), x, t)
    return {"params": params, "ema_params": params}


def generate(ema_params, key, n: int, *, models: Models, config: ml_collections.ConfigDict, image_hw):
    """Draws n structure maps and organ masks, unfiltered: `(maps, masks)`, each (n, H, W) int32 in {0, 1}.

    Traced under a mesh (`jax.set_mesh`), the draws are split over its `data` axis (n padded to a multiple
    of its size and cut back), as `structure_nets.generate`'s.
    """
    shards = sharding.context_data_size()
    size = sharding.padded_size(n, shards)
    samples = flow_train.sample_configured(
        functools.partial(models.velocity.apply, ema_params),
        key,
        None,
        settings=config.structure.flow,
        shape=(size, *image_hw, SAMPLE_CHANNELS),
        features=models.velocity.features,  # On CPU a few draws at a time (`synth.models.grouped`).
        shards=shards,
    )
    maps, masks = flow.structure_from_sample(samples, threshold=float(config.structure.flow.threshold))
    return sharding.gathered((maps[:n], masks[:n]))


def make_generate_fn(models: Models, config: ml_collections.ConfigDict, image_hw):
    """`generate` jitted for this network: `(ema_params, key, n) -> (maps, masks)`."""
    return jax.jit(
        functools.partial(generate, models=models, config=config, image_hw=tuple(image_hw)), static_argnums=2
    )


def sample_structures(
    ema_params, key: jax.Array, n: int, *, generate_fn, filter_params: structure_filter.FilterParams
) -> dict[str, np.ndarray]:
    """Draws n filtered structure maps and masks (§5.4 without D_s: the contour test alone).

    Args:
      generate_fn: `make_generate_fn(...)`, made once by a caller that samples repeatedly.

    Returns:
      As `structure_filter.sample_filtered`: `maps`, `masks` (n, H, W) uint8, `scores` (minus each kept
      draw's contour-fill MAE), `accepted`, `draws`.
    """

    def draw(attempt: int):
        maps, masks = jax.device_get(generate_fn(ema_params, jax.random.fold_in(key, attempt), n))
        return np.asarray(maps), np.asarray(masks), None

    return structure_filter.sample_filtered(draw, n, params=filter_params)
