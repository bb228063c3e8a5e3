"""Memorisation audit of a synthetic dataset: the nearest real training image of every synthetic sample.

A generator that memorised its training set emits near-copies of training images. For each synthetic
sample this module finds the most similar real training image and flags the samples whose similarity
reaches a threshold; `synth.memorisation_report` writes the closest pairs side by side, a histogram and a
Markdown section for the workdir report (issue #5, item 5).

Images are float arrays (count, H, W, K) in [0, 1], K registered modalities (K = 1 and RGB K = 3 work
alike); numpy or JAX arrays, read one block at a time, so a memory-mapped set need not fit on device.

**Similarities** (higher = more alike, 1 for identical images):

* ``metric="ssim"``: :func:`synth.metrics.image.ssim` with its defaults (TF-compatible, 11-px Gaussian
  window, ``max_val`` 1), averaged over the K channels. For all pairs it is evaluated in an equivalent
  arrangement (:func:`_ssim_pairs`: per-image moments once, the window as banded matrix products), about
  25× faster on CPU than calling ``ssim`` per pair and equal to it to float32 rounding (tested). Images
  smaller than the window are refused with a ValueError rather than upsampled: an SSIM of upsampled
  images is not comparable with the usual values, and ``metric="feature"`` works at any size.
* ``metric="feature"``: the cosine similarity of features from a fixed extractor ``feature_fn``, any
  :class:`synth.metrics.distribution.FeatureExtractor` (it receives all K channels). The default,
  :func:`thumbnail_features`, needs no trained network: each channel is resized to 16×16 (linear,
  antialiased, i.e. an area-like average when shrinking) and standardised to zero mean and unit variance,
  so the cosine is the mean over channels of the Pearson correlation of the thumbnails. It ignores global
  brightness and contrast changes per modality and, through the thumbnail, pixel noise and one-pixel
  shifts: the usual ways a memorised image differs from its source. It also sees mostly the coarse layout,
  so unrelated images of one anatomy score high; judge it against the real reference (below).

**Blocking.** All N×M pairs are scored in tiles of ``block`` synthetic × ``block`` real images by one
jitted function that keeps only the running best per synthetic sample, so memory is bounded by one tile
and the N×M matrix never exists. The last tile along either axis is padded (by repeating its last image)
to the full tile shape and the padding masked out, so every tile reuses one compiled program. Within an
SSIM tile, ``jax.lax.map`` over the synthetic images scores one synthetic image against the ``block`` real
ones at a time, so at most ``block`` SSIM maps are live. Ties go to the lowest real index.

**What "close" means.** :func:`reference_nearest` scores every real image against the *other* real
images (leave-one-out). A synthetic sample closer to a training image than real images are to each other
is suspicious; the report sets the two distributions side by side. The threshold is metric-specific:
the default 0.9 is meant for SSIM; for the feature metric, read it off the reference distribution.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from synth.metrics import image as image_metrics
from synth.metrics.distribution import FeatureExtractor

__all__ = [
    "METRICS",
    "AuditResult",
    "audit",
    "check_sets",
    "nearest_real",
    "reference_nearest",
    "thumbnail_features",
]

METRICS = ("ssim", "feature")
THUMBNAIL_SIZE = 16
# synth.metrics.image.ssim's defaults, which the tiled SSIM reproduces.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2, SSIM_MAX_VAL = 11, 1.5, 0.01, 0.03, 1.0
# Default tile sides: an SSIM tile keeps a few arrays of `block` images' size live per step (32 × 512² px ×
# 4 channels × 4 B is 134 MB each); a feature tile is a small matrix product, so it can be much larger.
DEFAULT_BLOCK = {"ssim": 32, "feature": 1024}
# Images per call of the feature extractor (padded to this size, so a jitted extractor compiles once).
FEATURE_BATCH = 256


# --------------------------------------------------------------------------------------------------
# Input checks


def _check_images(name: str, images: Any) -> None:
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(
            f"{name} must be images of shape (count, H, W, K), got rank {len(shape)} shape {shape}."
        )
    if shape[0] < 1:
        raise ValueError(f"{name} is empty (shape {shape}).")


def check_sets(synthetic: Any, real: Any) -> None:
    """Raises a ValueError unless both are (count, H, W, K) image sets of the same H, W and K."""
    _check_images("synthetic", synthetic)
    _check_images("real", real)
    (_, h_s, w_s, k_s), (_, h_r, w_r, k_r) = synthetic.shape, real.shape
    if (h_s, w_s) != (h_r, w_r):
        raise ValueError(
            f"synthetic and real images differ in size: H×W {h_s}×{w_s} vs {h_r}×{w_r} "
            f"(shapes {tuple(synthetic.shape)} and {tuple(real.shape)})."
        )
    if k_s != k_r:
        raise ValueError(
            f"synthetic and real images differ in channels (modalities): K {k_s} vs {k_r} "
            f"(shapes {tuple(synthetic.shape)} and {tuple(real.shape)})."
        )


def _check_metric(metric: str, images: Any) -> None:
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; valid: {', '.join(map(repr, METRICS))}.")
    if metric == "ssim" and min(images.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(
            f"metric='ssim' needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW} px (its Gaussian window); "
            f"got H×W {images.shape[1]}×{images.shape[2]}. Use metric='feature' for smaller images."
        )


def _block_size(block: int | None, metric: str) -> int:
    block = DEFAULT_BLOCK[metric] if block is None else block
    if block < 1:
        raise ValueError(f"block must be ≥ 1, got {block}.")
    return block


# --------------------------------------------------------------------------------------------------
# Similarities


def thumbnail_features(images: Any, *, size: int = THUMBNAIL_SIZE) -> jax.Array:
    """The default fixed feature space: per-channel standardised size×size thumbnails.

    Each channel is resized to ``size``×``size`` (linear with antialiasing, whatever the aspect ratio),
    then shifted and scaled to zero mean and unit variance over its thumbnail; a constant channel becomes
    zeros. The cosine similarity of two such vectors is the mean over channels of the Pearson
    correlation of the thumbnails (a constant channel adds 0).

    Args:
        images: (B, H, W, K) images.
        size: thumbnail side.

    Returns:
        (B, K·size²) float32 features, channel-major.
    """
    x = jnp.asarray(images, jnp.float32)
    b, _, _, k = x.shape
    thumbs = jax.image.resize(x, (b, size, size, k), method="linear", antialias=True)
    centred = thumbs - jnp.mean(thumbs, axis=(1, 2), keepdims=True)
    std = jnp.sqrt(jnp.mean(jnp.square(centred), axis=(1, 2), keepdims=True))
    # The threshold keeps float rounding of a constant channel from being blown up into noise.
    standardised = jnp.where(std > 1e-6, centred / jnp.where(std > 1e-6, std, 1.0), 0.0)
    return jnp.transpose(standardised, (0, 3, 1, 2)).reshape(b, k * size * size)


_thumbnail_features_jit = jax.jit(thumbnail_features, static_argnames="size")


def _ssim_pairs(query: jax.Array, base: jax.Array) -> jax.Array:
    """(Q, H, W, K) × (B, H, W, K) -> (Q, B) SSIM, equal to ``image_metrics.ssim`` with its defaults.

    The same statistics as :func:`synth.metrics.image.ssim`, arranged for all pairs: the local means
    and second moments of each image are filtered once per tile, and only the cross moment G * (x·y) per
    pair, with the same banded-matrix filter (`image_metrics.gaussian_filter_valid`). The tests check
    equality with ``image_metrics.ssim``.
    """

    def local_mean(z: jax.Array) -> jax.Array:
        return image_metrics.gaussian_filter_valid(z, SSIM_WINDOW, SSIM_SIGMA)

    c1, c2 = (SSIM_K1 * SSIM_MAX_VAL) ** 2, (SSIM_K2 * SSIM_MAX_VAL) ** 2
    mean_q, square_q = local_mean(query), local_mean(jnp.square(query))
    mean_b, square_b = local_mean(base), local_mean(jnp.square(base))

    def one_query(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        x, mean_x, square_x = args
        cross = local_mean(x[None] * base)
        num0 = 2.0 * mean_x[None] * mean_b
        den0 = jnp.square(mean_x)[None] + jnp.square(mean_b)
        luminance = (num0 + c1) / (den0 + c1)
        contrast_structure = (2.0 * cross - num0 + c2) / (square_x[None] + square_b - den0 + c2)
        # Mean over the map per channel, then over channels: one mean, as the map is the same size.
        return jnp.mean(luminance * contrast_structure, axis=(1, 2, 3))

    return jax.lax.map(one_query, (query, mean_q, square_q))


def _cosine_pairs(query: jax.Array, base: jax.Array) -> jax.Array:
    """(Q, D) × (B, D) unit-norm features -> (Q, B) cosine similarities."""
    # HIGHEST precision: GPUs may otherwise use TF32, and near-copies differ in the third decimal.
    return jnp.matmul(query, base.T, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames="pair_fn")
def _tile_best(
    query: jax.Array,
    base: jax.Array,
    query_start: jax.Array,
    base_start: jax.Array,
    base_count: jax.Array,
    exclude_self: jax.Array,
    best_value: jax.Array,
    best_index: jax.Array,
    *,
    pair_fn: Callable[[jax.Array, jax.Array], jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """Score one tile and fold it into the running best per query row.

    The offsets, the count of real (unpadded) base rows and the leave-one-out switch are traced
    arguments, not static ones, so every tile of one shape runs the same compiled program.
    """
    similarity = pair_fn(query, base)
    rows = query_start + jnp.arange(query.shape[0])
    columns = base_start + jnp.arange(base.shape[0])
    invalid = (jnp.arange(base.shape[0]) >= base_count)[None, :] | (
        exclude_self & (rows[:, None] == columns[None, :])
    )
    similarity = jnp.where(invalid, -jnp.inf, similarity)
    tile_arg = jnp.argmax(similarity, axis=1)
    tile_max = jnp.take_along_axis(similarity, tile_arg[:, None], axis=1)[:, 0]
    # Strictly greater: on a tie the earlier real image (an earlier tile) is kept.
    better = tile_max > best_value
    return jnp.where(better, tile_max, best_value), jnp.where(better, columns[tile_arg], best_index)


def _padded_block(items: Any, start: int, size: int) -> np.ndarray:
    """items[start : start + size] as float32, the tail padded by repeating the last item."""
    chunk = np.asarray(items[start : start + size], dtype=np.float32)
    if chunk.shape[0] < size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - chunk.shape[0], axis=0)])
    return chunk


def _best_matches(
    query: Any, base: Any, *, pair_fn: Callable, block: int, exclude_self: bool
) -> tuple[np.ndarray, np.ndarray]:
    """For each query item, the index of the most similar base item and that similarity, tile by tile."""
    n, m = query.shape[0], base.shape[0]
    # A tile never exceeds its set, so a small set does not pay for padding up to a large block.
    query_block, base_block = min(block, n), min(block, m)
    index = np.empty(n, np.int64)
    value = np.empty(n, np.float32)
    for query_start in range(0, n, query_block):
        query_tile = jnp.asarray(_padded_block(query, query_start, query_block))
        best_value = jnp.full((query_block,), -jnp.inf, jnp.float32)
        best_index = jnp.full((query_block,), -1, jnp.int32)
        for base_start in range(0, m, base_block):
            best_value, best_index = _tile_best(
                query_tile,
                jnp.asarray(_padded_block(base, base_start, base_block)),
                query_start,
                base_start,
                min(base_block, m - base_start),
                exclude_self,
                best_value,
                best_index,
                pair_fn=pair_fn,
            )
        count = min(query_block, n - query_start)
        index[query_start : query_start + count] = np.asarray(best_index)[:count]
        value[query_start : query_start + count] = np.asarray(best_value)[:count]
    return index, value


def _unit_features(images: Any, feature_fn: FeatureExtractor | None) -> np.ndarray:
    """Features of all images, in padded batches of FEATURE_BATCH, each row scaled to unit length."""
    extract = _thumbnail_features_jit if feature_fn is None else feature_fn
    n = images.shape[0]
    batch = min(FEATURE_BATCH, n)
    chunks = []
    for start in range(0, n, batch):
        features = np.asarray(extract(_padded_block(images, start, batch)), dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != batch:
            raise ValueError(
                f"feature_fn must map (B, H, W, K) images to (B, D) features; got {features.shape} "
                f"for a batch of {batch}."
            )
        chunks.append(features[: min(batch, n - start)])
    features = np.concatenate(chunks)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    # An all-zero feature vector (e.g. a blank image) is similar to nothing rather than NaN.
    return np.where(norms > 0, features / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)


def nearest_real(
    synthetic: Any,
    real: Any,
    *,
    metric: str = "ssim",
    block: int | None = None,
    feature_fn: FeatureExtractor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Find, for each synthetic sample, the most similar real image (module docstring: metrics, blocking).

    Args:
        synthetic: (N, H, W, K) images in [0, 1].
        real: (M, H, W, K) real training images in [0, 1].
        metric: ``"ssim"`` (H, W ≥ 11) or ``"feature"``.
        block: tile side, in images of each set (default 32 for SSIM, 1024 for features).
        feature_fn: the extractor of ``metric="feature"``; default :func:`thumbnail_features`.

    Returns:
        ``(index, similarity)``: (N,) int64 index into ``real`` of each sample's nearest real image and
        (N,) float32 similarity to it.

    Raises:
        ValueError: either set is not (count, H, W, K) or empty, the sets differ in H, W or K, the metric
            is unknown, or SSIM images are smaller than its window.
    """
    check_sets(synthetic, real)
    _check_metric(metric, synthetic)
    block = _block_size(block, metric)
    if metric == "ssim":
        return _best_matches(synthetic, real, pair_fn=_ssim_pairs, block=block, exclude_self=False)
    return _best_matches(
        _unit_features(synthetic, feature_fn),
        _unit_features(real, feature_fn),
        pair_fn=_cosine_pairs,
        block=block,
        exclude_self=False,
    )


def reference_nearest(
    real: Any,
    *,
    metric: str = "ssim",
    block: int | None = None,
    feature_fn: FeatureExtractor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Find, for each real image, the most similar *other* real image (leave-one-out).

    This is the yardstick of the audit: how close real images are to one another. An image is never
    compared with itself (by position; a duplicated image in ``real`` does match its duplicate).

    Args:
        real: (M, H, W, K) images in [0, 1], M ≥ 2.
        metric: as :func:`nearest_real`.
        block: as :func:`nearest_real`.
        feature_fn: as :func:`nearest_real`.

    Returns:
        ``(index, similarity)``: (M,) int64 index of each image's nearest other image (never itself) and
        (M,) float32 similarity.

    Raises:
        ValueError: ``real`` is not (M, H, W, K) with M ≥ 2, or as :func:`nearest_real`.
    """
    _check_images("real", real)
    if real.shape[0] < 2:
        raise ValueError(f"reference_nearest needs at least 2 real images, got {real.shape[0]}.")
    _check_metric(metric, real)
    block = _block_size(block, metric)
    if metric == "ssim":
        return _best_matches(real, real, pair_fn=_ssim_pairs, block=block, exclude_self=True)
    features = _unit_features(real, feature_fn)
    return _best_matches(features, features, pair_fn=_cosine_pairs, block=block, exclude_self=True)


# --------------------------------------------------------------------------------------------------
# Audit


@dataclasses.dataclass
class AuditResult:
    """The outcome of :func:`audit`.

    Attributes:
        nearest_index: (N,) index into the real set of each synthetic sample's nearest real image.
        similarity: (N,) similarity to it.
        flagged: (N,) bool, similarity ≥ threshold: suspected near-copies.
        metric: ``"ssim"`` or ``"feature"``.
        threshold: the flagging threshold.
        reference_similarity: (M,) each real image's similarity to its nearest other real image, or None.
        reference_index: (M,) that other image's index, or None.
    """

    nearest_index: np.ndarray
    similarity: np.ndarray
    flagged: np.ndarray
    metric: str
    threshold: float
    reference_similarity: np.ndarray | None = None
    reference_index: np.ndarray | None = None

    @property
    def flagged_indices(self) -> np.ndarray:
        """Indices of the flagged synthetic samples, most similar first."""
        order = np.argsort(-self.similarity, kind="stable")
        return order[self.flagged[order]]


def audit(
    synthetic: Any,
    real: Any,
    *,
    metric: str = "ssim",
    threshold: float = 0.9,
    reference: bool = True,
    block: int | None = None,
    feature_fn: FeatureExtractor | None = None,
) -> AuditResult:
    """Run the memorisation audit: nearest real image per synthetic sample, flags, and the real reference.

    Args:
        synthetic: (N, H, W, K) synthetic images in [0, 1].
        real: (M, H, W, K) real training images in [0, 1] (M ≥ 2 when ``reference``).
        metric: ``"ssim"`` or ``"feature"`` (module docstring).
        threshold: samples with similarity ≥ this are flagged. 0.9 suits SSIM; choose the feature
            metric's from its reference distribution.
        reference: also compute :func:`reference_nearest` on ``real`` (costs about M² more pairs).
        block: as :func:`nearest_real`.
        feature_fn: as :func:`nearest_real`.

    Returns:
        An :class:`AuditResult`.
    """
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}.")
    index, similarity = nearest_real(synthetic, real, metric=metric, block=block, feature_fn=feature_fn)
    result = AuditResult(
        nearest_index=index,
        similarity=similarity,
        flagged=similarity >= threshold,
        metric=metric,
        threshold=float(threshold),
    )
    if reference:
        result.reference_index, result.reference_similarity = reference_nearest(
            real, metric=metric, block=block, feature_fn=feature_fn
        )
    return result
