"""The SSD lesion detector (Tianchi lung CT, METHOD §6.6, §8.4): stage `segmentor` when the lesion is boxes.

It plays the segmentors' roles for a box-labelled family: trained on real images in stage `segmentor`
(`config.segmentor.task = "detect"`), frozen as stage B's lesion processor (its multibox loss on the
synthetic image against the boxes of the asked-for label, §6.6), stage C's filter and stage D's downstream
model (VOC mAP@0.5 on the real test split, T8).

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
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from synth import boxes, input_pipeline, optim, registration, sharding, train
from synth import writer as writer_lib
from synth.metrics.detection import mean_average_precision
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
GRID_ROWS = 4  # Images drawn in the evaluator's grid.
GT_COLOUR = (0.2, 1.0, 0.2)  # Ground-truth outlines: green.
DETECTION_COLOUR = (1.0, 0.2, 0.2)  # Detections (score above score_threshold): red.


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
    x = registration.by_modality(images, channels)
    keys = jax.random.split(rng if rng is not None else jax.random.key(0), x.shape[0])

    def one(p, xi, key):
        return model.apply(p, xi, train=train_mode, rngs={"dropout": key} if train_mode else None)

    return jax.vmap(one)(params, x, keys)


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


def detection_maps(found: dict[str, jax.Array], image_hw: tuple[int, int]) -> jax.Array:
    """(K, B, H, W) int32 class maps painted from (K, B, D, ...) detections (`boxes.filled_box_maps`)."""
    paint = functools.partial(boxes.filled_box_maps, image_hw=tuple(image_hw))
    return jax.vmap(paint)(found["boxes"], found["classes"], found["valid"])


def init_state(rng, batch, *, model: SSD, tx: optax.GradientTransformation, channels: int):
    """The stage's state: K detectors' parameters stacked on a leading axis, and their optimiser state."""
    from synth.stages.segmentor import SegmentorState

    x = registration.by_modality(batch["image"], channels)
    keys = jax.random.split(rng, x.shape[0])
    params = jax.vmap(lambda key, xi: model.init(key, xi))(keys, x)
    return SegmentorState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def train_step(state, batch, rng, *, model, tx, priors, channels: int, neg_pos_ratio: float):
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

    (loss, (per_modality, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {
        "loss": loss,
        "classification": jnp.mean(terms["classification"]),
        "localisation": jnp.mean(terms["localisation"]),
        # The same targets for every modality: the batch's number of positive default boxes.
        "positives": terms["num_positives"][0].astype(jnp.float32),
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
    }
    out.update({f"loss_modality{k}": per_modality[k] for k in range(per_modality.shape[0])})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out


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


def mean_average_precisions(
    found: dict[str, Any], gt_boxes: Any, gt_classes: Any, valid: Any = None, *, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """VOC mAP@0.5 of every modality's detections over the foreground classes (numpy, host).

    Args:
        found: `detections`' dict of host arrays with the images stacked: `boxes` (K, N, D, 4), `scores`,
            `classes` and `valid` (K, N, D).
        gt_boxes: (N, M, 4) ground-truth corners.
        gt_classes: (N, M) classes 1..C, 0 = padding (skipped).
        valid: (N,) bool, False on padding images (left out); None = all images.
        num_classes: background + foreground classes (`config.data.num_classes`).

    Returns:
        `(map, ap)`: (K,) mAP over the foreground classes with ground truth and (K, num_classes − 1) AP
        per class 1..C; NaN where there is no ground truth at all.
    """
    gt_boxes, gt_classes = np.asarray(gt_boxes), np.asarray(gt_classes)
    images = np.ones(len(gt_classes), bool) if valid is None else np.asarray(valid, bool)
    classes = range(1, num_classes)
    gt_b = [b[c > 0] for b, c in zip(gt_boxes[images], gt_classes[images])]
    gt_c = [c[c > 0] for c in gt_classes[images]]
    maps, aps = [], []
    for k in range(np.asarray(found["valid"]).shape[0]):
        keep = np.asarray(found["valid"][k])[images]
        per_image = [np.asarray(found[key][k])[images] for key in ("boxes", "scores", "classes")]
        mean_ap, ap = mean_average_precision(
            *([a[v] for a, v in zip(array, keep)] for array in per_image), gt_b, gt_c, classes=classes
        )
        maps.append(mean_ap)
        aps.append([ap[c] for c in classes])
    return np.asarray(maps, np.float64), np.asarray(aps, np.float64).reshape(len(maps), len(classes))


def make_evaluator(config, *, model: SSD, mesh, channels: int):
    """VOC mAP@0.5 of every modality's detector on the eval split, plus a grid of boxes.

    Scalars: `map/<modality>` and `map/mean`; with several foreground classes also
    `ap_class<c>/<modality>`. The grid shows, per image and modality, the ground-truth boxes (green) and
    the detections scoring above `score_threshold` (red).
    """
    det = check_config(config)
    data = config.data
    modalities = tuple(data.modalities)
    num_classes = data.num_classes
    source = input_pipeline.open_source(data, data.eval_split)
    batch_sh = sharding.batch_sharding(mesh)
    detect = functools.partial(
        detections,
        model=model,
        channels=channels,
        score_threshold=det.eval_score_threshold,
        iou_threshold=det.iou_threshold,
        max_detections=det.max_detections,
    )

    # Detections and ground truth of the global batch, replicated: every process scores the whole split.
    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def batch_detections(params, images, gt_boxes, gt_classes, valid):
        return detect(params, images), gt_boxes, gt_classes, valid

    def evaluate(state, step: int):
        found, gt_boxes, gt_classes, valid = [], [], [], []
        grid_rows = []
        batches = input_pipeline.eval_batches(
            source,
            preprocess=preprocess,
            batch_size=config.segmentor.train.batch_size,
            max_examples=data.eval_max_examples,
        )
        for local in batches:
            batch = sharding.to_global(local, batch_sh)
            out = jax.device_get(
                batch_detections(
                    state.params, batch["image"], batch["boxes"], batch["box_classes"], batch["valid"]
                )
            )
            for store, value in zip((found, gt_boxes, gt_classes, valid), out):
                store.append(value)
            if not grid_rows:
                grid_rows = _grid_rows(local, out[0], channels, det.score_threshold)
        stacked = {key: np.concatenate([f[key] for f in found], axis=1) for key in found[0]}
        maps, aps = mean_average_precisions(
            stacked,
            np.concatenate(gt_boxes),
            np.concatenate(gt_classes),
            np.concatenate(valid),
            num_classes=num_classes,
        )
        scalars = {f"map/{name}": maps[k] for k, name in enumerate(modalities)}
        scalars["map/mean"] = float(np.mean(maps))
        if num_classes > 2:
            for c in range(1, num_classes):
                for k, name in enumerate(modalities):
                    scalars[f"ap_class{c}/{name}"] = aps[k, c - 1]
        images = {"detected": writer_lib.image_grid(grid_rows)} if grid_rows else {}
        return scalars, images

    return evaluate


def _grid_rows(local, found, channels: int, score_threshold: float) -> list[list[np.ndarray]]:
    """Per image: for each modality, its centre channel with the true boxes, then with its detections."""
    rows = []
    image = np.asarray(local["image"])
    num_modalities = image.shape[-1] // channels
    for b in range(min(GRID_ROWS, image.shape[0])):
        truth = np.asarray(local["boxes"][b])[np.asarray(local["box_classes"][b]) > 0]
        row = []
        for k in range(num_modalities):
            grey = image[b, ..., k * channels + channels // 2]  # Tianchi: slice k of k−1, k, k+1.
            shown = found["valid"][k, b] & (found["scores"][k, b] > score_threshold)
            row.append(draw_boxes(grey, truth, GT_COLOUR))
            row.append(draw_boxes(grey, found["boxes"][k, b][shown], DETECTION_COLOUR))
        rows.append(row)
    return rows


def draw_boxes(image: np.ndarray, corners: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    """An (H, W) grey image in [0, 1] as RGB with the normalised boxes' 1-pixel outlines in `colour`."""
    rgb = np.repeat(np.clip(np.asarray(image, np.float32), 0.0, 1.0)[..., None], 3, axis=-1)
    height, width = rgb.shape[:2]
    for y0, x0, y1, x1 in np.asarray(corners, np.float64).reshape(-1, 4):
        # The pixels a box covers (pixel-edge convention): first and last row and column, clipped.
        top, left = (
            int(np.clip(np.floor(y0 * height), 0, height - 1)),
            int(np.clip(np.floor(x0 * width), 0, width - 1)),
        )
        bottom = int(np.clip(np.ceil(y1 * height) - 1, top, height - 1))
        right = int(np.clip(np.ceil(x1 * width) - 1, left, width - 1))
        rgb[[top, bottom], left : right + 1] = colour
        rgb[top : bottom + 1, [left, right]] = colour
    return rgb


def build(config: ml_collections.ConfigDict, mesh=None) -> train.StageSpec:
    """The detector's spec for the shared loop (stage `segmentor` with `task = "detect"`)."""
    from synth.stages import segmentor

    seg = config.segmentor
    det = check_config(config)
    source = input_pipeline.open_source(config.data, config.data.train_split)
    first = preprocess(source[0])
    channels = segmentor.check_channels(config, first["image"])
    image_hw = first["image"].shape[:2]
    model = make_model(config, image_hw)
    tx = optim.make_optimizer(seg.optim)
    mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    return train.StageSpec(
        name=segmentor.NAME,
        train=seg.train,
        source=source,
        preprocess=preprocess,
        init_state=functools.partial(init_state, model=model, tx=tx, channels=channels),
        train_step=functools.partial(
            train_step,
            model=model,
            tx=tx,
            priors=model.priors(image_hw),
            channels=channels,
            neg_pos_ratio=det.neg_pos_ratio,
        ),
        evaluate=make_evaluator(config, model=model, mesh=mesh, channels=channels),
    )


def load_state(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """The latest trained detector state of a run (stage `segmentor`'s checkpoint)."""
    return train.load_trained_state(build(config), config, workdir)


def lesion_processor(config: ml_collections.ConfigDict, image_hw) -> Any:
    """The frozen real-trained detectors as stage B's lesion processor (§6.6) and stage C's filter.

    `loss(params, images, inputs)` is the (K,) multibox loss of every modality's detector on images
    (B, H, W, K·C) against `inputs.boxes` and `inputs.box_classes` (stage B's `Inputs`); `predict(params,
    images)` the (K, B, H, W) int32 class maps painted from the detections scoring above
    `config.segmentor.detector.score_threshold`.
    """
    from synth.stages import synthesis

    det = check_config(config)
    model = make_model(config, image_hw)
    priors = model.priors(tuple(image_hw))
    channels = synthesis.channels_per_modality(config)

    def load(cfg, workdir):
        state = load_state(cfg, workdir)
        return state.params, {"segmentor_step": int(jax.device_get(state.step))}

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

    def predict(params, images):
        found = detections(
            params,
            images,
            model=model,
            channels=channels,
            score_threshold=det.score_threshold,
            iou_threshold=det.iou_threshold,
            max_detections=det.max_detections,
        )
        return detection_maps(found, images.shape[1:3])

    return synthesis.LesionProcessor(load=load, loss=loss, predict=predict, kind="detect")
