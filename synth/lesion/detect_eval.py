"""The detector's evaluation: VOC mAP@0.5 per modality, and a grid of true and detected boxes (§8.4, T8).

mAP is not a sum over images, so the evaluation loop keeps the detections and ground truth of every
evaluated image (`reduce="rows"`) and `mean_average_precisions` scores them on the host at the end.
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections
import numpy as np

from synth import evaluation
from synth import writer as writer_lib
from synth.metrics.detection import mean_average_precision

GRID_ROWS = 4  # Images drawn in the evaluator's grid.
GT_COLOUR = (0.2, 1.0, 0.2)  # Ground-truth outlines: green.
DETECTION_COLOUR = (1.0, 0.2, 0.2)  # Detections (score above score_threshold): red.
FOUND = ("boxes", "scores", "classes", "valid")  # The keys of `detections`' dict.


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


def _per_batch(train_state, frozen, batch, key, *, detect):
    """Every image's detections and ground truth (batch axis first), kept whole by the loop."""
    del frozen, key
    found = detect(train_state.params, batch["image"])  # (K, B, ...)
    values = {f"found/{k}": found[k].swapaxes(0, 1) for k in FOUND}
    values.update(gt_boxes=batch["boxes"], gt_classes=batch["box_classes"])
    return values, found


def _finish(rows, count, *, modalities, num_classes: int) -> dict[str, float]:
    """MAP per modality and its mean; with several foreground classes also the AP per class."""
    del count
    found = {k: np.swapaxes(rows[f"found/{k}"], 0, 1) for k in FOUND}
    maps, aps = mean_average_precisions(found, rows["gt_boxes"], rows["gt_classes"], num_classes=num_classes)
    scalars = evaluation.per_modality("map", maps, modalities)
    if num_classes > 2:
        for c in range(1, num_classes):
            for k, name in enumerate(modalities):
                scalars[f"ap_class{c}/{name}"] = aps[k, c - 1]
    return scalars


def hooks(config: ml_collections.ConfigDict, *, detect, channels: int) -> evaluation.Hooks:
    """VOC mAP@0.5 of every modality's detector on the eval split, plus a grid of boxes.

    Scalars: `map/<modality>` and `map/mean`; with several foreground classes also
    `ap_class<c>/<modality>`. The grid shows, per image and modality, the ground-truth boxes (green) and
    the detections scoring above `score_threshold` (red).

    Args:
      detect: `(params, images) -> detections` at the evaluation's score threshold (`detect.detections`).
    """
    data = config.data
    score_threshold = config.segmentor.detector.score_threshold

    def grid(local, found):
        rows = grid_rows(local, found, channels, score_threshold)
        return {"detected": writer_lib.image_grid(rows)} if rows else {}

    return evaluation.Hooks(
        per_batch=functools.partial(_per_batch, detect=detect),
        finish=functools.partial(_finish, modalities=tuple(data.modalities), num_classes=data.num_classes),
        grid=grid,
        reduce="rows",
    )


def grid_rows(local, found, channels: int, score_threshold: float) -> list[list[np.ndarray]]:
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
