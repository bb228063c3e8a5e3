"""Box utilities of the SSD lesion detector (METHOD §6.6, §8.4): encoding, matching, loss, decoding + NMS.

This is the *standard* SSD box pipeline (Liu et al. 2016; ssd.pytorch), replacing the authors' variant
(§11.22: raw boxes as location targets, random negatives, non-negative logits). Everything but
:func:`tianchi_ground_truth` and :func:`boxes_from_label_map` is pure ``jax.numpy`` with static shapes,
so it runs under ``jit`` and ``vmap`` (batch the per-image :func:`match` with ``jax.vmap``).

Conventions:

* **Corners** ``(y0, x0, y1, x1)``, the project's box format (:mod:`synth.metrics.detection`, the
  Tianchi builder). Ground truth and detections are corners in *normalised* units (fractions of the
  image height/width, in [0, 1]); :func:`tianchi_ground_truth` converts the builder's pixel-edge boxes.
* **Centre form** ``(cy, cx, h, w)``: default boxes ("priors", :func:`synth.models.detector.default_boxes`)
  and the input of :func:`encode`.
* **Offsets**: SSD's encoding with variances (0.1, 0.2), ``t_yx = (g_yx − p_yx) / (0.1·p_hw)``,
  ``t_hw = log(g_hw / p_hw) / 0.2``.
* **Classes**: 0 = background (and padding of ground-truth rows), 1..C = foreground classes; detector
  logits have C + 1 channels.
* **Box maps**: a filled-box class map (the Tianchi builder's ``label``, stage B's lesion labels) is the
  same information as a box list: :func:`filled_box_maps` paints boxes (jittable),
  :func:`boxes_from_label_map` reads them back (numpy/OpenCV, host). Pixel (i, j), centre
  ((i + ½)/H, (j + ½)/W), lies in a box when y0 <= (i + ½)/H < y1 and x0 <= (j + ½)/W < x1.
"""

import logging
from collections.abc import Sequence
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np

VARIANCES = (0.1, 0.2)  # SSD's centre and size variances.
# torchvision's bound on decoded log-size changes, log(1000/16): keeps exp() finite for wild offsets
# (an untrained head) so NMS never sees inf/NaN boxes; far beyond any real box.
MAX_LOG_SCALE = float(np.log(1000.0 / 16.0))
MIN_SIZE = 1e-6  # Floor on box sizes before log(): a degenerate box encodes to a finite target.
TIANCHI_CLASSES = (1, 5, 31, 32)  # Nodule, stripe, arteriosclerosis/calcification, lymph-node calcification.
LABEL_CONNECTIVITY = 8  # boxes_from_label_map: diagonal neighbours join a region (a rotated box stays whole).

log = logging.getLogger("synth")


def corners_to_centre(boxes: jax.Array) -> jax.Array:
    """Convert (..., 4) corners ``(y0, x0, y1, x1)`` to centre form ``(cy, cx, h, w)``."""
    top_left, bottom_right = boxes[..., :2], boxes[..., 2:]
    return jnp.concatenate([(top_left + bottom_right) / 2, bottom_right - top_left], axis=-1)


def centre_to_corners(boxes: jax.Array) -> jax.Array:
    """Convert (..., 4) centre form ``(cy, cx, h, w)`` to corners ``(y0, x0, y1, x1)``."""
    centre, size = boxes[..., :2], boxes[..., 2:]
    return jnp.concatenate([centre - size / 2, centre + size / 2], axis=-1)


def box_iou(boxes_a: jax.Array, boxes_b: jax.Array) -> jax.Array:
    """Compute the IoU of every pair of corner boxes (continuous areas, as the mAP metric's default).

    Args:
        boxes_a: (M, 4) corners.
        boxes_b: (N, 4) corners.

    Returns:
        (M, N) IoU; 0 where the union is empty (two degenerate boxes).
    """
    top_left = jnp.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = jnp.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    extent = jnp.maximum(bottom_right - top_left, 0.0)
    intersection = extent[..., 0] * extent[..., 1]
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    union = area_a[:, None] + area_b[None, :] - intersection
    return jnp.where(union > 0, intersection / jnp.where(union > 0, union, 1.0), 0.0)


def encode(
    gt_centre_boxes: jax.Array, priors: jax.Array, variances: tuple[float, float] = VARIANCES
) -> jax.Array:
    """Encode centre-form boxes as SSD offsets relative to the priors (module docstring).

    Args:
        gt_centre_boxes: (..., N, 4) boxes ``(cy, cx, h, w)``, e.g. each prior's matched ground truth.
        priors: (N, 4) default boxes ``(cy, cx, h, w)`` (broadcast against the boxes).
        variances: (centre, size) variances.

    Returns:
        (..., N, 4) offsets ``(t_cy, t_cx, t_h, t_w)``. Sizes are floored at :data:`MIN_SIZE`, so a
        degenerate box gives a large but finite target.
    """
    centre = (gt_centre_boxes[..., :2] - priors[..., :2]) / (variances[0] * priors[..., 2:])
    size = jnp.log(jnp.maximum(gt_centre_boxes[..., 2:], MIN_SIZE) / priors[..., 2:]) / variances[1]
    return jnp.concatenate([centre, size], axis=-1)


def decode(offsets: jax.Array, priors: jax.Array, variances: tuple[float, float] = VARIANCES) -> jax.Array:
    """Invert :func:`encode`: SSD offsets back to centre-form boxes.

    Args:
        offsets: (..., N, 4) ``(t_cy, t_cx, t_h, t_w)``, e.g. the detector's location output.
        priors: (N, 4) default boxes ``(cy, cx, h, w)``.
        variances: (centre, size) variances, as in :func:`encode`.

    Returns:
        (..., N, 4) boxes ``(cy, cx, h, w)``. The log-size change is capped at :data:`MAX_LOG_SCALE`
        (a 62× growth), so that untrained outputs stay finite; below the cap this is the exact inverse.
    """
    centre = priors[..., :2] + offsets[..., :2] * variances[0] * priors[..., 2:]
    size = priors[..., 2:] * jnp.exp(jnp.minimum(offsets[..., 2:] * variances[1], MAX_LOG_SCALE))
    return jnp.concatenate([centre, size], axis=-1)


def match(
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    priors: jax.Array,
    *,
    iou_threshold: float = 0.5,
    variances: tuple[float, float] = VARIANCES,
) -> tuple[jax.Array, jax.Array]:
    """Assign ground truth to the default boxes of one image (SSD matching).

    Each prior takes the ground-truth box it overlaps most; it is positive if that IoU is at least
    ``iou_threshold``. Every valid ground-truth box is also forced onto its best prior, so that even a
    box no prior overlaps enough (a small nodule between prior centres) gets a positive. Two boxes with
    the same best prior share it: only one of them gets it (as in ssd.pytorch). Use ``jax.vmap`` for a
    batch.

    Args:
        gt_boxes: (M, 4) normalised corners; M >= 1 (pad with class-0 rows).
        gt_classes: (M,) int classes 1..C; 0 marks a padding row, which is ignored.
        priors: (N, 4) default boxes ``(cy, cx, h, w)``.
        iou_threshold: IoU at or above which a prior is positive.
        variances: the encoding's variances.

    Returns:
        ``(class_targets, loc_targets)``: (N,) int32 classes (0 = background) and (N, 4) encoded offsets
        of each positive's box (0 for background priors).
    """
    if gt_boxes.shape[0] == 0:
        raise ValueError("match needs at least one (possibly padding) ground-truth row; got M = 0.")
    num_priors = priors.shape[0]
    valid = gt_classes > 0
    # Padding rows get IoU −1 so that no prior picks them while any valid row overlaps it by >= 0.
    overlaps = jnp.where(valid[:, None], box_iou(gt_boxes, centre_to_corners(priors)), -1.0)  # (M, N)
    best_gt = jnp.argmax(overlaps, axis=0)  # (N,)
    best_gt_overlap = jnp.max(overlaps, axis=0)
    best_prior = jnp.argmax(overlaps, axis=1)  # (M,)
    # Force each valid box onto its best prior; padding rows scatter out of bounds and are dropped.
    forced_rows = jnp.where(valid, best_prior, num_priors)
    best_gt = best_gt.at[forced_rows].set(jnp.arange(gt_boxes.shape[0]), mode="drop")
    best_gt_overlap = best_gt_overlap.at[forced_rows].set(2.0, mode="drop")  # 2 > any IoU: positive.

    positive = best_gt_overlap >= iou_threshold
    class_targets = jnp.where(positive, gt_classes[best_gt], 0).astype(jnp.int32)
    loc_targets = encode(corners_to_centre(gt_boxes[best_gt]), priors, variances)
    # Background priors may point at padding (zero) boxes: zero their targets, they carry no loss anyway.
    loc_targets = jnp.where(positive[:, None], loc_targets, 0.0)
    return class_targets, loc_targets


def smooth_l1(x: jax.Array) -> jax.Array:
    """Elementwise smooth L1 (Huber, δ = 1): 0.5·x² for |x| < 1, else |x| − 0.5."""
    absolute = jnp.abs(x)
    return jnp.where(absolute < 1.0, 0.5 * jnp.square(x), absolute - 0.5)


def multibox_loss(
    class_logits: jax.Array,
    offsets: jax.Array,
    class_targets: jax.Array,
    loc_targets: jax.Array,
    *,
    negative_ratio: float = 3.0,
    min_negatives: int = 3,
    loc_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Compute SSD's multibox loss with hard-negative mining.

    Classification: softmax cross-entropy over every positive prior and, per image, the
    ``negative_ratio``·(#positives) background priors with the highest loss (hard negatives; at least
    ``min_negatives`` so that lesion-free images still teach "background"). Localisation: smooth L1 on
    the encoded offsets of positives. Both sums run over the batch and are divided by the batch's number
    of positives (at least 1), as in the SSD paper.

    Args:
        class_logits: (B, N, C + 1) raw scores, background at index 0.
        offsets: (B, N, 4) predicted offsets.
        class_targets: (B, N) int targets from :func:`match` (0 = background).
        loc_targets: (B, N, 4) encoded targets from :func:`match`.
        negative_ratio: hard negatives per positive.
        min_negatives: hard negatives of an image without positives.
        loc_weight: weight of the localisation term (SSD's α = 1).

    Returns:
        ``(loss, terms)``: the scalar total and a dict with ``"classification"``, ``"localisation"`` and
        ``"num_positives"``.
    """
    if class_logits.shape[:2] != class_targets.shape or offsets.shape != loc_targets.shape:
        raise ValueError(
            f"Shapes disagree: logits {class_logits.shape}, targets {class_targets.shape}, "
            f"offsets {offsets.shape}, loc targets {loc_targets.shape}."
        )
    log_probs = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
    class_targets = class_targets.astype(jnp.int32)
    cross_entropy = -jnp.take_along_axis(log_probs, class_targets[..., None], axis=-1)[..., 0]  # (B, N)
    positive = class_targets > 0
    num_positives = jnp.sum(positive, axis=1)  # (B,)

    # Hard-negative mining is a selection, not part of the objective: no gradient through the ranking.
    # Positives rank last (−1 < any cross-entropy); the double argsort gives each prior its rank.
    mining_loss = jax.lax.stop_gradient(jnp.where(positive, -1.0, cross_entropy))
    rank = jnp.argsort(jnp.argsort(-mining_loss, axis=1), axis=1)
    num_priors = class_targets.shape[1]
    wanted = jnp.maximum(jnp.round(negative_ratio * num_positives), min_negatives)
    num_negatives = jnp.minimum(wanted, num_priors - num_positives)
    negative = (rank < num_negatives[:, None]) & ~positive

    normaliser = jnp.maximum(jnp.sum(num_positives), 1).astype(jnp.float32)
    classification = jnp.sum(jnp.where(positive | negative, cross_entropy, 0.0)) / normaliser
    loc_error = jnp.sum(smooth_l1(offsets.astype(jnp.float32) - loc_targets), axis=-1)  # (B, N)
    localisation = jnp.sum(jnp.where(positive, loc_error, 0.0)) / normaliser
    loss = classification + loc_weight * localisation
    return loss, {
        "classification": classification,
        "localisation": localisation,
        "num_positives": jnp.sum(num_positives),
    }


def _greedy_nms(boxes: jax.Array, candidate: jax.Array, iou_threshold: float) -> jax.Array:
    """Greedy NMS over boxes sorted by descending score: which candidates survive.

    Args:
        boxes: (K, 4) corners, best first.
        candidate: (K,) bool, boxes allowed to be kept (e.g. above the score threshold).
        iou_threshold: a box is suppressed by a kept, better box overlapping it by more than this.

    Returns:
        (K,) bool kept mask.
    """
    overlaps = box_iou(boxes, boxes)
    num = boxes.shape[0]

    def visit(i: int, keep: jax.Array) -> jax.Array:
        # Only boxes before i can be kept yet, so this checks exactly the better, kept boxes.
        suppressed = jnp.any(keep & (overlaps[i] > iou_threshold))
        return keep.at[i].set(candidate[i] & ~suppressed)

    return jax.lax.fori_loop(0, num, visit, jnp.zeros(num, bool))


def detect(
    class_logits: jax.Array,
    offsets: jax.Array,
    priors: jax.Array,
    *,
    score_threshold: float = 0.01,
    iou_threshold: float = 0.45,
    max_detections: int = 100,
    pre_nms_top_k: int = 200,
    variances: tuple[float, float] = VARIANCES,
) -> dict[str, jax.Array]:
    """Turn detector outputs into final detections: softmax, decoding, per-class greedy NMS.

    Per image and foreground class, the ``pre_nms_top_k`` best-scoring priors are decoded and
    suppressed greedily (IoU > ``iou_threshold``) among those scoring above ``score_threshold``; the
    survivors of all classes are ranked and the best ``max_detections`` returned. Jittable: sizes are
    static (``max_detections`` and ``pre_nms_top_k`` must be Python ints; wrap with
    ``functools.partial`` before ``jax.jit``), and the NMS loop runs ``pre_nms_top_k`` vectorised steps
    whatever N is, so thousands of priors cost little. Standard SSD settings are the defaults; the
    authors' code (§6.6) used score 0.5, suppression IoU 0.3 and top N/20 boxes.

    Args:
        class_logits: (B, N, C + 1) raw scores, background at index 0.
        offsets: (B, N, 4) predicted offsets.
        priors: (N, 4) default boxes ``(cy, cx, h, w)``.
        score_threshold: minimum class probability of a detection.
        iou_threshold: suppression IoU of the per-class NMS.
        max_detections: detections returned per image (padded).
        pre_nms_top_k: candidates per class and image entering NMS (capped at N).
        variances: the encoding's variances.

    Returns:
        A dict of padded arrays, best first: ``"boxes"`` (B, max_detections, 4) normalised corners,
        clipped to the image; ``"scores"`` (B, max_detections); ``"classes"`` (B, max_detections)
        int32 in 1..C; ``"valid"`` (B, max_detections) bool. Padding has zero box, score and class.
    """
    num_priors = priors.shape[0]
    top_k = min(pre_nms_top_k, num_priors)
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[..., 1:]  # (B, N, C)
    num_classes = probs.shape[-1]
    boxes = jnp.clip(centre_to_corners(decode(offsets.astype(jnp.float32), priors, variances)), 0.0, 1.0)

    def one_class(scores: jax.Array, image_boxes: jax.Array) -> tuple[jax.Array, jax.Array]:
        best_scores, best = jax.lax.top_k(scores, top_k)
        candidates = image_boxes[best]
        keep = _greedy_nms(candidates, best_scores > score_threshold, iou_threshold)
        return candidates, jnp.where(keep, best_scores, -1.0)

    # Classes along the last axis of probs; boxes are shared by all classes of an image.
    per_class = jax.vmap(one_class, in_axes=(1, None))  # -> (C, K, 4), (C, K)
    class_boxes, class_scores = jax.vmap(per_class)(probs, boxes)  # (B, C, K, 4), (B, C, K)
    batch = probs.shape[0]
    flat_boxes = class_boxes.reshape(batch, num_classes * top_k, 4)
    flat_scores = class_scores.reshape(batch, num_classes * top_k)
    flat_classes = jnp.broadcast_to(
        jnp.arange(1, num_classes + 1, dtype=jnp.int32)[:, None], (num_classes, top_k)
    ).reshape(-1)

    kept = min(max_detections, num_classes * top_k)
    scores, order = jax.lax.top_k(flat_scores, kept)  # (B, kept)
    valid = scores >= 0.0  # Suppressed or sub-threshold entries carry −1; kept ones a probability.
    out_boxes = jnp.where(valid[..., None], jnp.take_along_axis(flat_boxes, order[..., None], axis=1), 0.0)
    out_classes = jnp.where(valid, flat_classes[order], 0)
    out_scores = jnp.where(valid, scores, 0.0)
    pad = max_detections - kept  # Fewer candidates than slots: pad to the static output size.
    return {
        "boxes": jnp.pad(out_boxes, ((0, 0), (0, pad), (0, 0))),
        "scores": jnp.pad(out_scores, ((0, 0), (0, pad))),
        "classes": jnp.pad(out_classes, ((0, 0), (0, pad))),
        "valid": jnp.pad(valid, ((0, 0), (0, pad))),
    }


def tianchi_ground_truth(
    boxes: Any,
    box_labels: Any,
    image_hw: tuple[int, int],
    *,
    max_boxes: int,
    selected_classes: Sequence[int] = (1,),
) -> tuple[np.ndarray, np.ndarray]:
    """Convert a Tianchi example's boxes to the detector's padded, normalised ground truth (numpy, host).

    Args:
        boxes: (M, 4) ``[y_min, x_min, y_max, x_max]`` in pixel-edge units (the builder's ``boxes``).
        box_labels: (M,) Tianchi class ids in {1, 5, 31, 32} (the builder's ``box_labels``).
        image_hw: (H, W) of the image the boxes belong to.
        max_boxes: rows of the output; padding rows have class 0.
        selected_classes: Tianchi ids to keep, in the order of the detector's classes: id
            ``selected_classes[i]`` becomes class i + 1. Boxes of other classes are dropped. Default:
            nodules only.

    Returns:
        ``(gt_boxes, gt_classes)``: (max_boxes, 4) float32 corners in [0, 1] (clipped to the image) and
        (max_boxes,) int32 classes 1..len(selected_classes), 0 = padding. Boxes with no area after
        clipping are dropped.

    Raises:
        ValueError: unknown or repeated class ids, mismatched inputs, or more kept boxes than
            ``max_boxes`` (dropping lesions silently would bias training; raise ``max_boxes``).
    """
    selected = tuple(int(c) for c in selected_classes)
    if not selected or len(set(selected)) != len(selected) or not set(selected) <= set(TIANCHI_CLASSES):
        raise ValueError(
            f"selected_classes must be distinct ids of {TIANCHI_CLASSES}, got {selected_classes}."
        )
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    box_labels = np.asarray(box_labels).reshape(-1)
    if len(boxes) != len(box_labels):
        raise ValueError(f"{len(boxes)} boxes but {len(box_labels)} labels.")
    height, width = image_hw
    scale = np.array([height, width, height, width], np.float32)
    normalised = np.clip(boxes / scale, 0.0, 1.0)
    index_of = {tianchi_id: i + 1 for i, tianchi_id in enumerate(selected)}
    classes = np.array([index_of.get(int(label), 0) for label in box_labels], np.int32)
    has_area = (normalised[:, 2] > normalised[:, 0]) & (normalised[:, 3] > normalised[:, 1])
    keep = (classes > 0) & has_area
    if keep.sum() > max_boxes:
        raise ValueError(f"{keep.sum()} boxes of classes {selected} but max_boxes = {max_boxes}.")
    gt_boxes = np.zeros((max_boxes, 4), np.float32)
    gt_classes = np.zeros((max_boxes,), np.int32)
    gt_boxes[: keep.sum()] = normalised[keep]
    gt_classes[: keep.sum()] = classes[keep]
    return gt_boxes, gt_classes


def filled_box_maps(
    det_boxes: jax.Array, det_classes: jax.Array, valid: jax.Array, image_hw: tuple[int, int]
) -> jax.Array:
    """Paint boxes with their classes on a background of 0: the filled-box class maps of a batch.

    Pixel (i, j) is inside a box when ``y0 <= (i + ½)/H < y1`` and ``x0 <= (j + ½)/W < x1`` (its centre,
    half-open box), so a box with pixel-edge corners divided by (H, W) paints exactly its pixels. Where
    boxes overlap, the higher class wins. Vectorised over the boxes (a max over a broadcast, which XLA
    fuses into one reduction); jittable, ``image_hw`` static.

    Args:
        det_boxes: (B, D, 4) normalised corners ``(y0, x0, y1, x1)``, e.g. :func:`detect`'s boxes.
        det_classes: (B, D) int classes 1..C.
        valid: (B, D) bool; invalid rows (padding, suppressed or low-scoring detections) paint nothing.
        image_hw: the (H, W) of the maps.

    Returns:
        (B, H, W) int32 maps, 0 = background.
    """
    height, width = image_hw
    det_boxes = jnp.asarray(det_boxes, jnp.float32)
    centre_y = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height  # (H,)
    centre_x = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width  # (W,)
    in_y = (det_boxes[..., 0:1] <= centre_y) & (centre_y < det_boxes[..., 2:3])  # (B, D, H)
    in_x = (det_boxes[..., 1:2] <= centre_x) & (centre_x < det_boxes[..., 3:4])  # (B, D, W)
    classes = jnp.where(valid, det_classes, 0).astype(jnp.int32)  # (B, D)
    painted = jnp.where(in_y[..., :, None] & in_x[..., None, :], classes[..., None, None], 0)  # (B, D, H, W)
    return jnp.max(painted, axis=1, initial=0)


def boxes_from_label_map(label: Any, *, max_boxes: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read the boxes of a filled-box class map back (numpy/OpenCV, on the host): the inverse of painting.

    Each connected region of class c (1..``num_classes`` − 1; 8-connectivity, so a box that rotation and
    nearest resampling left touching only at corners stays one region) gives one box: its bounding box in
    pixel-edge units divided by (H, W). For maps made of non-touching filled rectangles,
    ``filled_box_maps(boxes_from_label_map(m)) == m``. Overlapping or touching boxes of one class are
    one region, hence one (enclosing) box.

    Args:
        label: (H, W) integer map, 0 = background, values in 0..``num_classes`` − 1.
        max_boxes: rows of the output. With more regions (an augmented label broken into pieces), the
            ``max_boxes`` largest by pixel count are kept and a warning names the count; nothing raises.
        num_classes: background + foreground classes (``config.data.num_classes``).

    Returns:
        ``(boxes, classes)``: (max_boxes, 4) float32 normalised corners ``(y0, x0, y1, x1)`` and
        (max_boxes,) int32 classes, 0 = padding (zero box). Regions are ordered by class, then by
        OpenCV's scan order (top to bottom); when some are dropped, by size, largest first.

    Raises:
        ValueError: ``label`` is not 2-D or holds values outside 0..``num_classes`` − 1.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"Expected an (H, W) label map, got shape {label.shape}.")
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(
            f"Label values must lie in 0..{num_classes - 1} (num_classes = {num_classes}); "
            f"got {label.min()}..{label.max()}."
        )
    height, width = label.shape
    regions = []  # (area, class, y0, x0, y1, x1) in pixel-edge units.
    for cls in range(1, num_classes):
        mask = np.ascontiguousarray(label == cls, np.uint8)
        if not mask.any():
            continue
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=LABEL_CONNECTIVITY)
        for x0, y0, w, h, area in stats[1:count]:  # Row 0 is the background.
            regions.append((int(area), cls, y0, x0, y0 + h, x0 + w))
    if len(regions) > max_boxes:
        log.warning(
            "The label map has %d lesion regions but max_boxes = %d: keeping the %d largest.",
            len(regions),
            max_boxes,
            max_boxes,
        )
        regions = sorted(regions, key=lambda r: -r[0])[:max_boxes]  # Stable: ties keep their order.
    boxes = np.zeros((max_boxes, 4), np.float32)
    classes = np.zeros((max_boxes,), np.int32)
    scale = np.array([height, width, height, width], np.float32)
    for row, (_, cls, *corners) in enumerate(regions):
        boxes[row] = np.asarray(corners, np.float32) / scale
        classes[row] = cls
    return boxes, classes
