"""Quality filter for sampled structure maps (METHOD §5.4, the paper's Algorithm 3). Host side.

A generated map s_g is kept when either

1. the structure-map discriminator likes it: j = spatial mean of D_s(G_s(z)) ≥ ``min_j_s`` (0.55;
   a code-only shortcut), or
2. its closed contours agree with the generated mask m_g: draw s_g·255 as 8-bit, OpenCV
   ``GaussianBlur`` 3×3 (σ automatic, 0.8), ``threshold`` (> 0 → 255), ``findContours``
   (``RETR_EXTERNAL``, ``CHAIN_APPROX_SIMPLE``), ``drawContours`` all of them filled onto the
   unblurred map; the filled region must match the mask, MAE ≤ ``mae`` (0.05). This rejects maps
   whose organ outline is open (e.g. torn by lesion removal), whose fill leaves the organ empty.

Otherwise the sampler draws again, remembers the draw with the largest j, and after ``max_count``
(50) draws outputs that one (`sample_until_pass`).

Everything here is numpy/OpenCV on single images, outside jit: call it on device arrays fetched to
the host (``np.asarray``). Masks are OUR convention, 1 = organ. The authors compare
m' = 1 − fill/255 with their background=1 mask; |(1 − a) − (1 − b)| = |a − b|, so the MAE is the
same in either convention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import cv2
import numpy as np


@dataclasses.dataclass(frozen=True)
class FilterParams:
    """Thresholds of the §5.4 filter (defaults: the authors' ``gen_s_and_m_from_noise.py``).

    Attributes:
        min_j_s: accept at once when the discriminator score j is at least this.
        mae: accept when the contour-fill mask differs from the mask by at most this (mean |·|).
        max_count: draws before giving up and returning the best-scoring draw.
        blur_size: OpenCV GaussianBlur kernel size before thresholding (3; σ derived by OpenCV).
    """

    min_j_s: float = 0.55
    mae: float = 0.05
    max_count: int = 50
    blur_size: int = 3


def _as_hw(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (H, W) or (H, W, 1), got shape {a.shape}")
    return a


def contour_fill(structure_map: np.ndarray, *, blur_size: int = 3) -> np.ndarray:
    """The region enclosed by the map's external contours, as the authors' filter computes it.

    Args:
        structure_map: (H, W) or (H, W, 1) binary map, 1 = edge.
        blur_size: odd GaussianBlur kernel size.

    Returns:
        (H, W) float32 in {0, 1}: 1 inside (or on) a closed outer contour, i.e. OUR organ convention
        (the authors' m' is 1 minus this).
    """
    s = _as_hw(structure_map, "structure_map")
    img = (np.clip(s, 0.0, 1.0) * 255.0).astype(np.uint8)
    blurred = cv2.GaussianBlur(img, (blur_size, blur_size), 0)
    _, binary = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY)
    # OpenCV 3 returns (image, contours, hierarchy), 4+ (contours, hierarchy).
    contours = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[-2]
    filled = img.copy()
    cv2.drawContours(filled, contours, -1, 255, thickness=-1)
    return filled.astype(np.float32) / 255.0


def contour_mask_mae(structure_map: np.ndarray, mask: np.ndarray, *, blur_size: int = 3) -> float:
    """Mean absolute difference between `contour_fill` of the map and the organ mask.

    Args:
        structure_map: (H, W) or (H, W, 1) binary map.
        mask: (H, W) or (H, W, 1) organ mask, 1 = organ.
        blur_size: see `contour_fill`.

    Returns:
        The MAE, a Python float in [0, 1].
    """
    fill = contour_fill(structure_map, blur_size=blur_size)
    m = _as_hw(mask, "mask").astype(np.float32)
    if m.shape != fill.shape:
        raise ValueError(f"structure_map and mask shapes differ: {fill.shape} vs {m.shape}")
    return float(np.mean(np.abs(fill - m)))


def passes_filter(
    structure_map: np.ndarray,
    mask: np.ndarray,
    *,
    d_score: float | None = None,
    params: FilterParams = FilterParams(),
) -> bool:
    """Whether one sampled (structure map, mask) pair passes the §5.4 filter.

    Args:
        structure_map: (H, W) or (H, W, 1) binary map (argmax of G_s), 1 = edge.
        mask: (H, W) or (H, W, 1) binary mask (argmax of G_m), 1 = organ.
        d_score: j, the spatial mean of D_s's output on the map, or None to use only the contour
            test (the paper's Algorithm 3).
        params: thresholds.

    Returns:
        True if accepted.
    """
    if d_score is not None and d_score >= params.min_j_s:
        return True
    return contour_mask_mae(structure_map, mask, blur_size=params.blur_size) <= params.mae


def passes_filter_batch(
    structure_maps: np.ndarray,
    masks: np.ndarray,
    *,
    d_scores: np.ndarray | None = None,
    params: FilterParams = FilterParams(),
) -> np.ndarray:
    """`passes_filter` over a batch.

    Args:
        structure_maps: (B, H, W) or (B, H, W, 1).
        masks: (B, H, W) or (B, H, W, 1), 1 = organ.
        d_scores: (B,) discriminator scores, or None.
        params: thresholds.

    Returns:
        (B,) bool numpy array.
    """
    structure_maps, masks = np.asarray(structure_maps), np.asarray(masks)
    if len(structure_maps) != len(masks):
        raise ValueError(f"batch sizes differ: {len(structure_maps)} maps, {len(masks)} masks")
    scores = [None] * len(masks) if d_scores is None else [float(j) for j in np.asarray(d_scores)]
    return np.array(
        [passes_filter(s, m, d_score=j, params=params) for s, m, j in zip(structure_maps, masks, scores)],
        dtype=bool,
    )


def sample_until_pass(
    draw: Callable[[], tuple[np.ndarray, np.ndarray, float]],
    *,
    params: FilterParams = FilterParams(),
) -> tuple[np.ndarray, np.ndarray, bool, int]:
    """The authors' sampling loop: draw until a pair passes, else return the best-scoring draw.

    ``max_count`` counts draws in total (the original's off-by-one bookkeeping is not kept).

    Args:
        draw: returns one (structure_map, mask, d_score) sample per call (e.g. a jitted G_s/G_m/D_s
            forward pass on a fresh z, fetched to the host).
        params: thresholds and ``max_count``.

    Returns:
        (structure_map, mask, passed, number of draws). If nothing passed, the draw with the largest
        d_score and ``passed=False``.
    """
    if params.max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {params.max_count}")
    best = None
    for count in range(1, params.max_count + 1):
        s, m, j = draw()
        if passes_filter(s, m, d_score=j, params=params):
            return s, m, True, count
        if best is None or j > best[2]:
            best = (s, m, j)
    return best[0], best[1], False, params.max_count


def sample_filtered(
    draw: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    n: int,
    *,
    params: FilterParams = FilterParams(),
) -> dict[str, np.ndarray]:
    """The §5.4 loop over a batch of n slots: redraw the rejected ones, up to ``max_count`` draws each.

    Args:
        draw: ``draw(attempt) -> (maps, masks, scores)`` of n fresh samples, maps and masks (n, H, W)
            in {0, 1}; ``scores`` are D_s's (n,), or None for a generator without a discriminator,
            whose maps then pass on the contour test alone.
        n: slots.
        params: thresholds and ``max_count``.

    Returns:
        ``maps``, ``masks`` (n, H, W) uint8; ``scores`` (n,) of the kept draws (D_s's, or minus the
        contour-fill MAE without a discriminator); ``accepted`` (n,) bool; ``draws`` (n,) draws used.
        A slot that never passes keeps its best-scored draw.
    """
    if params.max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {params.max_count}")
    best = None
    done = np.zeros(n, bool)
    draws = np.zeros(n, np.int32)
    for attempt in range(params.max_count):
        maps, masks, d_scores = draw(attempt)
        maps, masks = np.asarray(maps), np.asarray(masks)
        if d_scores is None:
            # No discriminator: rank draws by how well the map's filled contours match its mask.
            maes = np.array([contour_mask_mae(s, m, blur_size=params.blur_size) for s, m in zip(maps, masks)])
            scores, ok = -maes, maes <= params.mae
        else:
            scores = np.asarray(d_scores, np.float32)
            ok = passes_filter_batch(maps, masks, d_scores=scores, params=params)
        if best is None:
            best = dict(maps=maps.copy(), masks=masks.copy(), scores=scores.copy())
        todo = ~done
        better = todo & ((scores > best["scores"]) | ok)
        for name, value in (("maps", maps), ("masks", masks), ("scores", scores)):
            best[name][better] = value[better]
        draws[todo] += 1
        done |= todo & ok
        if done.all():
            break
    return dict(
        maps=best["maps"].astype(np.uint8),
        masks=best["masks"].astype(np.uint8),
        scores=best["scores"],
        accepted=done,
        draws=draws,
    )
