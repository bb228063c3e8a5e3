"""PASCAL VOC average precision and mAP at IoU 0.5 from box lists (METHOD §8.4, §9.3), numpy on the host.

The evaluation follows the Detectron copy of the VOC evaluator that the authors used, without its XML
reading: per class, all detections of all images are sorted by descending score (stable, so equal scores
keep their input order); each is matched to the ground-truth box of its image and class with the highest
IoU; it is a true positive if that IoU reaches the threshold and that box is not yet taken (the box is then
taken), otherwise a false positive, even when another free box also overlaps enough (VOC's rule). AP is the
area under the precision–recall curve after making precision monotone from the right ("all-point"
interpolation, VOC 2010+, not the 11-point VOC 2007 metric); mAP is the mean AP over the classes that have
at least one ground-truth box (a class without any has no defined AP: NaN, left out of the mean).
"Difficult" flags are not supported.

**Boxes** are ``(y0, x0, y1, x1)`` float corner coordinates with y0 ≤ y1, x0 ≤ x1, one array (N, 4) per
image. By default a box's area is (y1 − y0)·(x1 − x0) (continuous coordinates) and a detection matches at
IoU ≥ 0.5. The authors' code (§11.29) instead treats coordinates as inclusive pixel indices, area
(y1 − y0 + 1)·(x1 − x0 + 1), and requires IoU > 0.5: pass ``**VOC_PARITY`` (``pixel_plus_one=True,
strict_iou=True``) to reproduce it.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

VOC_PARITY = {"pixel_plus_one": True, "strict_iou": True}  # The authors' Detectron/VOC conventions (§11.29).


def box_iou(boxes_a: Any, boxes_b: Any, *, pixel_plus_one: bool = False) -> np.ndarray:
    """Compute the intersection over union of every pair of boxes.

    Args:
        boxes_a: (N, 4) boxes ``(y0, x0, y1, x1)``.
        boxes_b: (M, 4) boxes.
        pixel_plus_one: treat coordinates as inclusive pixel indices (side = y1 − y0 + 1), as VOC code.

    Returns:
        (N, M) float64 IoU.
    """
    a = np.asarray(boxes_a, np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, np.float64).reshape(-1, 4)
    extra = 1.0 if pixel_plus_one else 0.0
    top = np.maximum(a[:, None, 0], b[None, :, 0])
    left = np.maximum(a[:, None, 1], b[None, :, 1])
    bottom = np.minimum(a[:, None, 2], b[None, :, 2])
    right = np.minimum(a[:, None, 3], b[None, :, 3])
    intersection = np.maximum(bottom - top + extra, 0.0) * np.maximum(right - left + extra, 0.0)
    area_a = (a[:, 2] - a[:, 0] + extra) * (a[:, 3] - a[:, 1] + extra)
    area_b = (b[:, 2] - b[:, 0] + extra) * (b[:, 3] - b[:, 1] + extra)
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def voc_ap(recall: Any, precision: Any) -> float:
    """Compute VOC's all-point interpolated AP from a precision–recall curve.

    Precision is replaced by its running maximum from the right (the best precision at any higher recall),
    and AP = Σ (r_{k+1} − r_k)·p_interp(r_{k+1}) over the points where recall changes, starting from
    recall 0.

    Args:
        recall: (K,) non-decreasing recall after each ranked detection.
        precision: (K,) precision after each ranked detection.

    Returns:
        The AP in [0, 1].
    """
    recall = np.concatenate([[0.0], np.asarray(recall, np.float64), [1.0]])
    precision = np.concatenate([[0.0], np.asarray(precision, np.float64), [0.0]])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def average_precision(
    pred_boxes: Sequence[Any],
    pred_scores: Sequence[Any],
    gt_boxes: Sequence[Any],
    *,
    iou_threshold: float = 0.5,
    pixel_plus_one: bool = False,
    strict_iou: bool = False,
) -> float:
    """Compute the VOC AP of one class (module docstring).

    Args:
        pred_boxes: per image, (N_i, 4) detected boxes of this class.
        pred_scores: per image, (N_i,) their confidences.
        gt_boxes: per image, (M_i, 4) ground-truth boxes of this class (same number of images).
        iou_threshold: the matching threshold.
        pixel_plus_one: inclusive-pixel box areas (see :func:`box_iou`).
        strict_iou: match at IoU > threshold instead of ≥.

    Returns:
        The AP; NaN if there is no ground-truth box.
    """
    if not len(pred_boxes) == len(pred_scores) == len(gt_boxes):
        raise ValueError(f"Image counts differ: {len(pred_boxes)}, {len(pred_scores)}, {len(gt_boxes)}.")
    gt_boxes = [np.asarray(g, np.float64).reshape(-1, 4) for g in gt_boxes]
    num_gt = sum(len(g) for g in gt_boxes)
    if num_gt == 0:
        return float("nan")
    image_of = np.concatenate([np.full(np.asarray(s).size, i) for i, s in enumerate(pred_scores)])
    boxes = np.concatenate([np.asarray(b, np.float64).reshape(-1, 4) for b in pred_boxes])
    scores = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in pred_scores])
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} detected boxes but {len(scores)} scores.")
    taken = [np.zeros(len(g), bool) for g in gt_boxes]
    true_positive = np.zeros(len(scores), bool)
    for rank, det in enumerate(np.argsort(-scores, kind="stable")):
        image = image_of[det]
        if len(gt_boxes[image]) == 0:
            continue
        ious = box_iou(boxes[det], gt_boxes[image], pixel_plus_one=pixel_plus_one)[0]
        best = int(np.argmax(ious))
        matches = ious[best] > iou_threshold if strict_iou else ious[best] >= iou_threshold
        if matches and not taken[image][best]:
            taken[image][best] = True
            true_positive[rank] = True
    tp = np.cumsum(true_positive)
    fp = np.cumsum(~true_positive)
    return voc_ap(tp / num_gt, tp / np.maximum(tp + fp, np.finfo(np.float64).eps))


def mean_average_precision(
    pred_boxes: Sequence[Any],
    pred_scores: Sequence[Any],
    pred_labels: Sequence[Any],
    gt_boxes: Sequence[Any],
    gt_labels: Sequence[Any],
    *,
    classes: Sequence[int] | None = None,
    iou_threshold: float = 0.5,
    pixel_plus_one: bool = False,
    strict_iou: bool = False,
) -> tuple[float, dict[int, float]]:
    """Compute the VOC mAP over classes from per-image box lists (module docstring).

    Args:
        pred_boxes: per image, (N_i, 4) detected boxes ``(y0, x0, y1, x1)``.
        pred_scores: per image, (N_i,) confidences.
        pred_labels: per image, (N_i,) integer classes.
        gt_boxes: per image, (M_i, 4) ground-truth boxes.
        gt_labels: per image, (M_i,) integer classes.
        classes: the classes to evaluate; default: those with a ground-truth box.
        iou_threshold: the matching threshold (0.5 for mAP@0.5).
        pixel_plus_one: inclusive-pixel box areas (see :func:`box_iou`).
        strict_iou: match at IoU > threshold instead of ≥.

    Returns:
        ``(mAP, ap_per_class)``: the mean AP over the classes with ground truth (NaN if none) and each
        evaluated class's AP (NaN where it has no ground-truth box).
    """
    if not len(pred_boxes) == len(pred_scores) == len(pred_labels) == len(gt_boxes) == len(gt_labels):
        raise ValueError("Every per-image list must have one entry per image.")
    pred_labels = [np.asarray(p).reshape(-1) for p in pred_labels]
    gt_labels = [np.asarray(g).reshape(-1) for g in gt_labels]
    if classes is None:
        classes = sorted({int(c) for g in gt_labels for c in g})
    ap = {}
    for cls in classes:
        ap[int(cls)] = average_precision(
            [np.asarray(b).reshape(-1, 4)[p == cls] for b, p in zip(pred_boxes, pred_labels)],
            [np.asarray(s).reshape(-1)[p == cls] for s, p in zip(pred_scores, pred_labels)],
            [np.asarray(b).reshape(-1, 4)[g == cls] for b, g in zip(gt_boxes, gt_labels)],
            iou_threshold=iou_threshold,
            pixel_plus_one=pixel_plus_one,
            strict_iou=strict_iou,
        )
    defined = [v for v in ap.values() if not np.isnan(v)]
    return (float(np.mean(defined)) if defined else float("nan")), ap
