"""What every lesion processor offers, and the helpers its kinds share.

A lesion processor is the network of stage `segmentor`, trained on real images and frozen afterwards: the
segmentors (BRATS, phantom, lung, retina), the X-ray classifier or the Tianchi detector. The later stages
use it through `LesionProcessor`, whatever its kind:

  - stage B's lesion-guidance loss: `loss(params, images, inputs)`, per modality, against what G was
    asked for (the step's `synth.conditioning.Inputs`);
  - stage B's evaluator, stage C's filter and the comparison: `predict(params, images)`, label maps like
    the dataset's (a classifier paints its class, a detector its confident boxes).

Each kind (`synth.lesion.segment`, `classify`, `detect`) runs one network per modality: the images
(B, H, W, K·C) are split into K modality images of C channels (3 for RGB), and the networks' parameters
are stacked on a leading K axis (`stacked_init`, `stacked_apply`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import evaluation, registration


class LesionProcessor(NamedTuple):
    """A frozen network that tells whether a synthetic image shows the lesion it was asked for.

    Attributes:
      loss: `(params, images (B, H, W, K·C), inputs) -> (K,)` lesion-guidance loss per modality against
        what G was asked for: `inputs` is the step's `Inputs` (its `label`; a detector its `boxes` and
        `box_classes`, which follow the drawn label).
      predict: `(params, images) -> (K, B, H, W)` predicted labels (for evaluation and stage C's filter);
        a classifier gives constant maps of its class, like the class-map labels; a detector paints its
        confident boxes with their class, like the filled-box labels.
      kind: "segment" (lesion fidelity is the Dice of the lesion), "classify" (whether the class is
        the asked-for one) or "detect" (the Dice of the painted detections against the filled boxes).
    """

    loss: Callable[[Any, jax.Array, Any], jax.Array]
    predict: Callable[[Any, jax.Array], jax.Array]
    kind: str = "segment"


class StageParts(NamedTuple):
    """What stage `segmentor` trains and evaluates for one kind (`<kind>.stage_parts`)."""

    init_state: Callable  # (rng, batch) -> state.TrainState
    train_step: Callable  # (state, batch, rng) -> (state, metrics)
    hooks: evaluation.Hooks  # The evaluator's per-batch function, reduction and grid.


def constant_scores(*scores: tuple[str, str]) -> Callable[[ml_collections.ConfigDict], tuple]:
    """A kind's `scores(config)` when its downstream scores do not depend on the config."""
    return lambda config: scores


def channels_per_modality(config: ml_collections.ConfigDict) -> int:
    """C: 1 for grey modalities, 3 for the RGB retina (`config.data.channels`)."""
    return int(config.data.get("channels", 1))


def check_channels(config: ml_collections.ConfigDict, image: np.ndarray) -> int:
    """C, the channels per modality, after checking the dataset's images against `config.data`."""
    data = config.data
    channels = channels_per_modality(config)
    expected = len(data.modalities) * channels
    if image.shape[-1] != expected:
        raise ValueError(
            f"The dataset's images have {image.shape[-1]} channels but config.data.modalities lists "
            f"{len(data.modalities)} modalities of config.data.channels={channels}: {data.modalities}"
        )
    return channels


def stacked_init(model, rng: jax.Array, images: jax.Array, channels: int) -> Any:
    """One network per modality, initialised from K keys and stacked on a leading K axis."""
    x = registration.by_modality(images, channels)
    keys = jax.random.split(rng, x.shape[0])
    return jax.vmap(lambda key, xi: model.init(key, xi))(keys, x)


def stacked_abstract_params(model, config: ml_collections.ConfigDict, image_shape) -> Any:
    """The shapes of `stacked_init`'s parameters for images of `image_shape` (H, W, K·C), via eval_shape."""
    init = functools.partial(stacked_init, model, channels=channels_per_modality(config))
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return jax.eval_shape(init, jax.random.key(0), images)


def stacked_apply(model, params, images: jax.Array, channels: int, *, rng=None, train_mode: bool = False):
    """Every modality's network on that modality's images (input dropout when `train_mode`).

    Returns:
      The network's outputs with a leading modality axis K.
    """
    x = registration.by_modality(images, channels)
    keys = jax.random.split(rng if rng is not None else jax.random.key(0), x.shape[0])

    def one(p, xi, key):
        return model.apply(p, xi, train=train_mode, rngs={"dropout": key} if train_mode else None)

    return jax.vmap(one)(params, x, keys)
