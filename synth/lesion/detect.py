"""The SSD lesion detector (Tianchi lung CT, METHOD §6.6, §8.4): stage `segmentor` when the lesion is boxes.

It plays the segmentors' roles for a box-labelled family: trained on real images in stage `segmentor`
(`config.segmentor.task = "detect"`), frozen as stage B's lesion processor (its multibox loss on the
synthetic image against the boxes of the asked-for label, §6.6), stage C's filter and stage D's downstream
model (VOC mAP@0.5 on the real test split, T8; `synth.lesion.detect_eval`).

The network is `synth.models.detector.SSD` with the standard SSD box pipeline of `synth.boxes` (matching,
multibox loss with hard-negative mining, decoding and per-class NMS), replacing the authors' variant
(§11.22). One detector per modality (K = 1 for Tianchi, whose C = 3 channels are the slices k−1, k, k+1),
stacked on a leading axis and applied with `vmap`, as the classifier's networks.

Batches carry, besides `image` (B, H, W, K·C) and the filled-box class map `label` (B, H, W), the same
lesions as boxes: `boxes` (B, M, 4) normalised corners (y0, x0, y1, x1) and `box_classes` (B, M), 1..C
foreground, 0 = padding row. For stage B and stage C the detector paints its detections (score above
`config.segmentor.detector.score_threshold`) back into a class map (`synth.boxes.filled_box_maps`), so the
Dice-based lesion fidelity and filter apply unchanged.

Config read (no defaults: every key must be set): `config.data.num_classes` (background + foreground; the
SSD has num_classes − 1 foreground classes), `config.segmentor.model.{size, activation, dropout_rate}`,
`config.segmentor.optim`, `config.segmentor.train`, and `config.segmentor.detector` (`DETECTOR_FIELDS`,
checked by `check_config`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from synth import boxes, input_pipeline, optim, state
from synth.lesion import base, detect_eval
from synth.models import detector as detector_model
from synth.models import sizes
from synth.models.detector import SSD

# config.segmentor.detector's fields (see check_config for their meaning and ranges).
DETECTOR_FIELDS = (
    "num_maps",
    "min_scale",
    "max_scale",
    "neg_pos_ratio",
    "score_threshold",
    "iou_threshold",
    "max_detections",
    "eval_score_threshold",
)

# Decoded example -> the arrays this kind consumes (checked: `preprocess`).


def check_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check the detector's settings and return `config.segmentor.detector`.

    Fields: `num_maps` (SSD heads, 1..6: 6 at 512², 3 for 32²–64²), `min_scale` <= `max_scale` (default
    box scales of the first and last head, fractions of the image side), `neg_pos_ratio` (hard negatives
    per positive, SSD's 3), `score_threshold` (a detection counts as finding the lesion in stage B/C's
    maps), `iou_threshold` (NMS), `max_detections` (per image) and `eval_score_threshold` (detections
    entering the mAP, 0.01 as VOC practice).

    Raises:
        ValueError: a missing or out-of-range setting, naming its key.
    """
    num_classes = config.data.num_classes
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(
            f"config.data.num_classes={num_classes!r} must be an int >= 2 (background + foreground classes)"
        )
    seg = config.segmentor
    if "detector" not in seg:
        raise ValueError(
            "config.segmentor.detector is missing: the detector (config.segmentor.task = 'detect') needs "
            f"the fields {DETECTOR_FIELDS}"
        )
    det = seg.detector
    missing = [f"config.segmentor.detector.{name}" for name in DETECTOR_FIELDS if name not in det]
    if missing:
        raise ValueError(f"Missing detector settings: {', '.join(missing)}")

    def fail(name: str, requirement: str):
        raise ValueError(f"config.segmentor.detector.{name}={det[name]!r} {requirement}")

    if not _is_int(det.num_maps) or not 1 <= det.num_maps <= detector_model.MAX_MAPS:
        fail("num_maps", f"must be an int in 1..{detector_model.MAX_MAPS}")
    if not det.min_scale > 0:
        fail("min_scale", "must be > 0")
    if not det.max_scale >= det.min_scale:
        fail("max_scale", f"must be >= config.segmentor.detector.min_scale={det.min_scale}")
    if not det.neg_pos_ratio >= 0:
        fail("neg_pos_ratio", "must be >= 0")
    for name in ("score_threshold", "eval_score_threshold"):
        if not 0 <= det[name] < 1:
            fail(name, "must be a probability in [0, 1)")
    if not 0 < det.iou_threshold <= 1:
        fail("iou_threshold", "must be in (0, 1]")
    if not _is_int(det.max_detections) or det.max_detections < 1:
        fail("max_detections", "must be an int >= 1")
    return det


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def make_model(config: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> SSD:
    """One modality's detector, sized from the table (`synth.models.sizes`) and `config.segmentor.detector`.

    Raises:
        ValueError: a bad detector setting, or an image too small for `num_maps` heads, naming the key.
    """
    det = check_config(config)
    seg = config.segmentor
    needed = 2 ** (det.num_maps + 2)
    if min(image_hw) < needed:
        raise ValueError(
            f"Images of {tuple(image_hw)} are too small for config.segmentor.detector.num_maps="
            f"{det.num_maps}: head k reads an H/2**(k+2) map, so H, W >= {needed} are needed"
        )
    return SSD(
        **sizes.detector_kwargs(seg.model.size, image_hw, det.num_maps),
        num_classes=config.data.num_classes - 1,
        num_maps=det.num_maps,
        min_scale=det.min_scale,
        max_scale=det.max_scale,
        activation=seg.model.activation,
        dropout_rate=seg.model.dropout_rate,
    )


def outputs(params, images, *, model: SSD, channels: int, rng=None, train_mode: bool = False):
    """Every modality's detector on that modality's images.

    Args:
        params: stacked parameters (leading axis K).
        images: (B, H, W, K·C).
        model: one modality's SSD (`make_model`).
        channels: C, channels per modality.
        rng: dropout key when `train_mode`.
        train_mode: enables input dropout.

    Returns:
        `(class_logits, offsets)`: (K, B, N, classes) and (K, B, N, 4), one row per default box.
    """
    return base.stacked_apply(model, params, images, channels, rng=rng, train_mode=train_mode)


def multibox_losses(
    params,
    images,
    gt_boxes,
    gt_classes,
    *,
    model: SSD,
    priors,
    channels: int,
    neg_pos_ratio: float,
    rng=None,
    train_mode: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SSD's multibox loss of every modality's detector against the same ground truth.

    Args:
        params: stacked parameters (leading axis K).
        images: (B, H, W, K·C).
        gt_boxes: (B, M, 4) normalised corners.
        gt_classes: (B, M) classes 1..C, 0 = padding.
        model: one modality's SSD.
        priors: (N, 4) its default boxes (`model.priors(image_hw)`).
        channels: C, channels per modality.
        neg_pos_ratio: hard negatives per positive.
        rng: dropout key when `train_mode`.
        train_mode: enables input dropout.

    Returns:
        `(losses, terms)`: (K,) losses and `boxes.multibox_loss`'s terms, each (K,).
    """
    class_logits, offsets = outputs(
        params, images, model=model, channels=channels, rng=rng, train_mode=train_mode
    )
    # Boxes in float32 whatever the compute dtype: IoUs of small nodules need the precision.
    match = jax.vmap(functools.partial(boxes.match, priors=jnp.asarray(priors, jnp.float32)))
    class_targets, loc_targets = match(jnp.asarray(gt_boxes, jnp.float32), gt_classes)
    return jax.vmap(
        lambda lg, off: boxes.multibox_loss(lg, off, class_targets, loc_targets, negative_ratio=neg_pos_ratio)
    )(class_logits, offsets)


def detections(
    params,
    images,
    *,
    model: SSD,
    channels: int,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
) -> dict[str, jax.Array]:
    """Every modality's detections: `boxes.detect`'s dict with a leading modality axis (boxes (K, B, D, 4)).

    `max_detections` must be a Python int (static); the priors follow the images' static (H, W).
    """
    class_logits, offsets = outputs(params, images, model=model, channels=channels)
    detect = functools.partial(
        boxes.detect,
        priors=jnp.asarray(model.priors(images.shape[1:3])),
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
    )
    return jax.vmap(detect)(class_logits, offsets)


def detector_fn(det: ml_collections.ConfigDict, *, model: SSD, channels: int, score_threshold: float):
    """`detections` with `config.segmentor.detector`'s NMS settings: `(params, images) -> detections`."""
    return functools.partial(
        detections,
        model=model,
        channels=channels,
        score_threshold=score_threshold,
        iou_threshold=det.iou_threshold,
        max_detections=det.max_detections,
    )


def detection_maps(found: dict[str, jax.Array], image_hw: tuple[int, int]) -> jax.Array:
    """(K, B, H, W) int32 class maps painted from (K, B, D, ...) detections (`boxes.filled_box_maps`)."""
    paint = functools.partial(boxes.filled_box_maps, image_hw=tuple(image_hw))
    return jax.vmap(paint)(found["boxes"], found["classes"], found["valid"])


def init_params(rng, images, *, model: SSD, channels: int):
    """K detectors' parameters stacked on a leading axis."""
    return base.stacked_init(model, rng, images, channels)


def init_state(
    rng, batch, *, model: SSD, tx: optax.GradientTransformation, channels: int
) -> state.TrainState:
    """The stage's state: K detectors' parameters stacked on a leading axis, and their optimiser state."""
    return state.init(init_params(rng, batch["image"], model=model, channels=channels), tx)


def train_step(train_state, batch, rng, *, model, tx, priors, channels: int, neg_pos_ratio: float):
    """One optimisation step of every modality's detector on a batch of real images and their boxes."""

    def loss_fn(params):
        per_modality, terms = multibox_losses(
            params,
            batch["image"],
            batch["boxes"],
            batch["box_classes"],
            model=model,
            priors=priors,
            channels=channels,
            neg_pos_ratio=neg_pos_ratio,
            rng=rng,
            train_mode=True,
        )
        return jnp.mean(per_modality), (per_modality, terms)

    (loss, (per_modality, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_state.params)
    new, norms = state.update(train_state, grads, tx)
    out = {
        "loss": loss,
        "classification": jnp.mean(terms["classification"]),
        "localisation": jnp.mean(terms["localisation"]),
        # The same targets for every modality: the batch's number of positive default boxes.
        "positives": terms["num_positives"][0].astype(jnp.float32),
        **norms,
    }
    out.update({f"loss_modality{k}": per_modality[k] for k in range(per_modality.shape[0])})
    return new, out


def preprocess(example) -> dict[str, np.ndarray]:
    """`input_pipeline.image_and_label` (which keeps the `boxes` adapter's boxes), checked for this stage.

    Raises:
        KeyError: the example has no boxes (the dataset's adapter must provide them).
        ValueError: boxes outside [0, 1] (pixel units instead of normalised corners).
    """
    out = input_pipeline.image_and_label(example)
    if "boxes" not in out:
        raise KeyError(
            "The detector needs 'boxes' and 'box_classes' in every example (padded normalised boxes and "
            f"their classes); this one has {sorted(example)}: check config.data.adapter"
        )
    corners = out["boxes"]
    if corners.size and (corners.min() < -1e-6 or corners.max() > 1 + 1e-6):
        raise ValueError(
            f"The example's boxes span {corners.min()}..{corners.max()}: the detector needs normalised "
            "corners in [0, 1] (pixel-edge boxes divided by (H, W))"
        )
    return out


# The (evaluator key, report heading) of the downstream score stage D tabulates.
scores = base.constant_scores(("map/mean", "mAP@0.5"))


def stage_parts(
    config: ml_collections.ConfigDict, image_hw: tuple[int, int], channels: int
) -> base.StageParts:
    """What stage `segmentor` trains and evaluates for this kind."""
    det = check_config(config)
    model = make_model(config, image_hw)
    tx = optim.make_optimizer(config.segmentor.optim)
    detect = detector_fn(det, model=model, channels=channels, score_threshold=det.eval_score_threshold)
    return base.StageParts(
        init_state=functools.partial(init_state, model=model, tx=tx, channels=channels),
        train_step=functools.partial(
            train_step,
            model=model,
            tx=tx,
            priors=model.priors(image_hw),
            channels=channels,
            neg_pos_ratio=det.neg_pos_ratio,
        ),
        hooks=detect_eval.hooks(config, detect=detect, channels=channels),
    )


def abstract_params(config: ml_collections.ConfigDict, image_shape) -> Any:
    """The shapes of the trained parameters, for loading them frozen (`synth.frozen`)."""
    return base.stacked_abstract_params(make_model(config, image_shape[:2]), config, image_shape)


def processor(config: ml_collections.ConfigDict, image_hw) -> Any:
    """The frozen real-trained detectors as stage B's lesion processor (§6.6) and stage C's filter.

    `loss(params, images, inputs)` is the (K,) multibox loss of every modality's detector on images
    (B, H, W, K·C) against `inputs.boxes` and `inputs.box_classes` (stage B's `Inputs`); `predict(params,
    images)` the (K, B, H, W) int32 class maps painted from the detections scoring above
    `config.segmentor.detector.score_threshold`.
    """
    det = check_config(config)
    model = make_model(config, image_hw)
    priors = model.priors(tuple(image_hw))
    channels = base.channels_per_modality(config)

    def loss(params, images, inputs):
        per_modality, _ = multibox_losses(
            params,
            images,
            inputs.boxes,
            inputs.box_classes,
            model=model,
            priors=priors,
            channels=channels,
            neg_pos_ratio=det.neg_pos_ratio,
        )
        return per_modality

    detect = detector_fn(det, model=model, channels=channels, score_threshold=det.score_threshold)

    def predict(params, images):
        return detection_maps(detect(params, images), images.shape[1:3])

    return base.LesionProcessor(loss=loss, predict=predict, kind="detect")
