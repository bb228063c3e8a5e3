"""Structural maps, organ masks, lesion removal, noise and label fusion (METHOD §3.1–3.7).

Everything here except the host-side helpers at the end is a pure ``jax.numpy`` function on
batches: images are NHWC float32 ``(B, H, W, C)``, every reduction names its axes and runs per
image. (The authors' ``tf_norm`` and mean subtraction reduce over axes [1, 2, 3] to shape [B] and
then broadcast that against the channel axis, which is only right for batch 1, METHOD §11.7; here
reductions keep their dims, so a batch gives exactly what each image gives alone.)

Mask convention. Ours (DATASETS.md) is **1 = organ/foreground, 0 = background**. The authors'
extraction mask ``M`` is the opposite (1 = background, METHOD §1); `to_authors_mask` converts at the
edges, e.g. when writing files the authors' scripts read or when comparing with their outputs.

Static arguments. Blur widths (``sigma``), median sizes, ``expand``, ``kind``/``mode``/``rule``
strings and `ExtractionParams` are Python values that shape the computation: under ``jax.jit`` bind
them with ``functools.partial`` or mark them static. Thresholds (``alpha``, ``beta``, ``gamma``)
may be traced.

Where each median runs:

* `binary_median_filter` (device, separable ``lax.reduce_window`` box count): exact ``medfilt2d``
  for {0, 1} inputs at any odd size, under a millisecond for 17×17 at 512² on CPU. `structure_map`
  and `organ_mask` filter binary maps only, so they use it and all of Algorithms 1 and 2 runs on
  device under jit.
* `median_filter` (device, sorts the k² neighbours): exact for any values, memory ∝ k²·H·W; fine
  for small k, heavy for k = 17 at 512² (about 0.3 GB per image-channel of patches).
* `median_filter_host` (scipy, outside jit): the reference, for arbitrary float images.

Label placement (§3.7) is a pure check `label_fits`; the rejection sampling around it is host
side (`sample_fitting_label`), as it loops a data-dependent number of times.

Readings of METHOD where it leaves a choice (parity first, the alternative behind a flag):

* A constant map normalises to 0, not 0/0 = NaN (TF would give NaN; every threshold on NaN is
  false, so the maps agree).
* ``crop_center`` starts at ``in // 2 − out // 2`` (the common idiom the authors' helper is named
  after); with odd size differences the crop is one pixel off-centre towards the bottom/right.
* The authors' blur keeps channel 0 of its input; we slice channel 0 first and blur that.
* Zero padding of the authors' background=1 mask makes the outside count as organ in the mask's
  median: image corners (and any organ close to the border) grow mask there. Kept by default
  (``mask_border="authors"``); ``"background"`` treats the outside as background.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.signal
from jax import lax

BLUR_KINDS = ("tf_replica", "gaussian")
MASK_BORDERS = ("authors", "background")
LABEL_FUSION_MODES = ("concat_onehot", "concat_onehot_plus_0.1", "concat_raw", "none", "weighted_sum")
# METHOD §12 spells the [OLD] mode this way in its config list; accept it as a synonym.
_LABEL_FUSION_ALIASES = {"old_weighted_0.8_0.2": "weighted_sum"}
# "none": every label fits, as for X-ray class maps and TC box labels (§3.7) and ablation E (§9.2).
LABEL_FIT_RULES = ("code", "paper", "none")

# TF `sobel_edges` kernels (METHOD §3.1), applied as cross-correlation: dy first, then dx.
_SOBEL_KY = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float32)
_SOBEL_KX = _SOBEL_KY.T

_IMAGE_AXES = (1, 2, 3)  # H, W, C of an NHWC batch: the axes of every per-image reduction.


# --------------------------------------------------------------------------------------------------
# Small helpers.


def _check_nhwc(x: jax.Array, name: str = "x") -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be NHWC (B, H, W, C), got shape {x.shape}")


def _check_odd(k: int, name: str) -> None:
    if k < 1 or k % 2 == 0:
        raise ValueError(f"{name} must be a positive odd integer (scipy medfilt2d), got {k}")


def _label_bhw1(label: jax.Array) -> jax.Array:
    """Integer label map as (B, H, W, 1); accepts (B, H, W) or (B, H, W, 1)."""
    label = jnp.asarray(label)
    if label.ndim == 3:
        return label[..., None]
    if label.ndim == 4 and label.shape[-1] == 1:
        return label
    raise ValueError(f"label must be (B, H, W) or (B, H, W, 1), got shape {label.shape}")


def minmax_normalise(x: jax.Array) -> jax.Array:
    """Min–max normalise each image to [0, 1] over all its pixels and channels.

    A constant image maps to 0 (like the authors' ``mynorm``) instead of 0/0 = NaN.

    Args:
        x: (B, H, W, C).

    Returns:
        (B, H, W, C), each image's values in [0, 1].
    """
    _check_nhwc(x)
    lo = jnp.min(x, axis=_IMAGE_AXES, keepdims=True)
    hi = jnp.max(x, axis=_IMAGE_AXES, keepdims=True)
    span = hi - lo
    return jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def _correlate_separable(xp: jax.Array, taps: np.ndarray, axis: int, out_len: int) -> jax.Array:
    """Cross-correlate a padded array with a 1-D filter along `axis` (VALID), by shifted slices.

    Shifted slices instead of ``lax.conv``: exact float32 arithmetic on every backend (GPU convs may
    run in TF32) and taps that are exactly zero are skipped, so σ = 0.01 costs nothing.
    """
    out = None
    for t, w in enumerate(taps):
        if w == 0.0:
            continue
        term = lax.slice_in_dim(xp, t, t + out_len, axis=axis) * np.float32(w)
        out = term if out is None else out + term
    if out is None:  # all-zero filter
        return jnp.zeros_like(lax.slice_in_dim(xp, 0, out_len, axis=axis))
    return out


# --------------------------------------------------------------------------------------------------
# Sobel, blur, median.


def sobel(x: jax.Array) -> jax.Array:
    """Sobel gradients with TF ``tf.image.sobel_edges`` semantics.

    REFLECT padding by 1 (mirror without repeating the edge, numpy ``"reflect"``), then
    cross-correlation with ky = [[−1,−2,−1],[0,0,0],[1,2,1]] and kx = kyᵀ.

    Args:
        x: (B, H, W, C) float images, H, W ≥ 2.

    Returns:
        (B, H, W, C, 2): ``[..., 0]`` = dy (bottom minus top), ``[..., 1]`` = dx (right minus left),
        as TF orders them.
    """
    _check_nhwc(x)
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    outs = []
    for kernel in (_SOBEL_KY, _SOBEL_KX):
        acc = None
        for i in range(3):
            for j in range(3):
                if kernel[i, j] == 0:
                    continue
                term = xp[:, i : i + h, j : j + w, :] * kernel[i, j]
                acc = term if acc is None else acc + term
        outs.append(acc)
    return jnp.stack(outs, axis=-1)


def blur_taps(sigma: float, *, kind: str = "tf_replica") -> np.ndarray:
    """The 1-D filter that `gaussian_blur` applies along rows and then columns.

    Args:
        sigma: standard deviation in pixels (a Python number). σ ≤ 0 gives the identity filter.
        kind: ``"tf_replica"``: the authors' ``gaussian_blur_op`` (METHOD §3.1, §11.6): the
            normalised 3×3 Gaussian, flattened row-major to 9 taps (so its effective 2-D kernel is
            9×9 with gaps). ``"gaussian"``: a true sampled, normalised Gaussian of radius ⌈3σ⌉.

    Returns:
        float32 taps, odd length (9 for ``tf_replica``).
    """
    if kind not in BLUR_KINDS:
        raise ValueError(f"Unknown blur kind {kind!r}. Valid kinds: {', '.join(BLUR_KINDS)}.")
    if kind == "tf_replica":
        if sigma <= 0:
            # The authors' kernel would replace σ = 0 by OpenCV's automatic 0.8; nobody uses that, and
            # "no blur" is the only sensible reading of a non-positive width.
            taps = np.zeros(9)
            taps[4] = 1.0
            return taps.astype(np.float32)
        d = np.arange(3, dtype=np.float64) - 1.0
        g = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2.0 * sigma**2))
        return (g / g.sum()).reshape(-1).astype(np.float32)
    if sigma <= 0:
        return np.ones(1, np.float32)
    radius = max(1, math.ceil(3.0 * sigma))
    d = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(d**2) / (2.0 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def gaussian_blur(x: jax.Array, sigma: float, *, kind: str = "tf_replica") -> jax.Array:
    """Separable blur of every channel, REFLECT padded to keep the size.

    ``kind="tf_replica"`` reproduces ``gaussian_blur_op`` exactly: REFLECT pad 4, the 9-tap vector of
    `blur_taps` as a 1×9 row filter, then as a 9×1 column filter. ``kind="gaussian"`` is a proper
    Gaussian (radius ⌈3σ⌉, REFLECT pad by the radius). For tiny σ both are the identity (taps that
    underflow to 0 are skipped).

    Args:
        x: (B, H, W, C) with H, W larger than the pad (≥ 5 for ``tf_replica``).
        sigma: Python number, the Gaussian's σ in pixels.
        kind: ``"tf_replica"`` or ``"gaussian"``.

    Returns:
        (B, H, W, C), same dtype.

    Note:
        The authors' op blurs only channel 0 of its input; callers that need that slice first
        (`structure_map` does).
    """
    _check_nhwc(x)
    taps = blur_taps(sigma, kind=kind)
    r = len(taps) // 2
    if r == 0 or (np.count_nonzero(taps) == 1 and taps[r] == 1.0):
        return x
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    rows = _correlate_separable(xp, taps, axis=2, out_len=w)  # 1×9 filter along W first, as TF does
    return _correlate_separable(rows, taps, axis=1, out_len=h)


def binary_median_filter(x: jax.Array, k: int, *, pad_value: float = 0.0) -> jax.Array:
    """k×k median of a {0, 1} image, by counting ones in each window (on device).

    For an odd number k² of values in {0, 1} the median is 1 exactly when at least (k²+1)/2 of
    them are 1, so a box count gives scipy ``medfilt2d``'s result exactly, at O(1) memory per pixel.
    Inputs that are not binary give a meaningless result.

    Args:
        x: (B, H, W, C) with values in {0, 1}.
        k: odd window size (static).
        pad_value: value assumed outside the image; 0 is ``medfilt2d``'s zero padding.

    Returns:
        (B, H, W, C) float32 in {0, 1}.
    """
    _check_nhwc(x)
    _check_odd(k, "k")
    if k == 1:
        return x.astype(jnp.float32)
    r = k // 2
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (r, r), (r, r), (0, 0)), constant_values=pad_value)
    # Separable box count (a row sum, then a column sum of those): exact, as the sums are integers
    # far below 2²⁴, and O(k) instead of O(k²) per pixel.
    counts = lax.reduce_window(xp, 0.0, lax.add, (1, 1, k, 1), (1, 1, 1, 1), "VALID")
    counts = lax.reduce_window(counts, 0.0, lax.add, (1, k, 1, 1), (1, 1, 1, 1), "VALID")
    return (counts > (k * k) // 2).astype(jnp.float32)


def median_filter(x: jax.Array, k: int) -> jax.Array:
    """Zero-padded k×k median of arbitrary values (scipy ``medfilt2d`` semantics, on device).

    Builds the k² shifted copies of each image (as k column shifts, then k row shifts of those) and
    takes the middle of their sort. Exact, but memory grows as k²·B·H·W·C; for binary images
    prefer `binary_median_filter`, for big k on float images `median_filter_host`.

    Args:
        x: (B, H, W, C).
        k: odd window size (static).

    Returns:
        (B, H, W, C), same dtype.
    """
    _check_nhwc(x)
    _check_odd(k, "k")
    if k == 1:
        return x
    _, h, w, _ = x.shape
    r = k // 2
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    cols = jnp.stack([xp[:, :, j : j + w, :] for j in range(k)], axis=-1)  # (B, H+2r, W, C, k)
    patches = jnp.concatenate([cols[:, i : i + h] for i in range(k)], axis=-1)  # (B, H, W, C, k²)
    return jnp.sort(patches, axis=-1)[..., (k * k) // 2]


def median_filter_host(x: np.ndarray, k: int) -> np.ndarray:
    """``scipy.signal.medfilt2d`` on every image and channel of a batch (host side, outside jit).

    Args:
        x: (B, H, W, C) numpy array (float32 or float64).
        k: odd window size.

    Returns:
        (B, H, W, C) numpy array of the same dtype.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC (B, H, W, C), got shape {x.shape}")
    _check_odd(k, "k")
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        for c in range(x.shape[3]):
            out[b, :, :, c] = scipy.signal.medfilt2d(x[b, :, :, c], k)
    return out


def resize_nearest_tf(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize with TF-1 ``resize_images(method=1, align_corners=False)`` indexing.

    Output pixel i reads input pixel ``min(floor(i · in/out), in − 1)`` (scale computed in float32 as
    TF does), not the half-pixel centres of ``jax.image.resize``.

    Args:
        x: (B, H, W, C).
        size: (out_H, out_W), Python ints.

    Returns:
        (B, out_H, out_W, C).
    """
    _check_nhwc(x)
    _, h, w, _ = x.shape
    out_h, out_w = size
    if (out_h, out_w) == (h, w):
        return x

    def index(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(src, n_in - 1)

    return x[:, index(h, out_h)][:, :, index(w, out_w)]


def crop_center(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Centre crop as the authors' ``crop_center``: start at ``in // 2 − out // 2`` on each axis.

    Args:
        x: (B, H, W, C) with H ≥ size[0], W ≥ size[1].
        size: (out_H, out_W).

    Returns:
        (B, out_H, out_W, C).
    """
    _check_nhwc(x)
    _, h, w, _ = x.shape
    out_h, out_w = size
    top, left = h // 2 - out_h // 2, w // 2 - out_w // 2
    return x[:, top : top + out_h, left : left + out_w, :]


# --------------------------------------------------------------------------------------------------
# Algorithms 1 and 2.


def organ_mask(
    x: jax.Array,
    *,
    gamma: float,
    expand: int,
    median_size: int,
    border: str = "authors",
) -> jax.Array:
    """Algorithm 2 (METHOD §3.2): the expanded organ region, in OUR convention (1 = organ).

    Per image: foreground = [minmax(x) > γ] (min–max over all pixels and channels, channel 0
    kept, as for DRIVE); nearest-resize (TF floor indexing) to (H+p, W+p) and centre-crop back to
    (H, W), which scales the region up about the centre by ≈ p/2 px per side; then a k_m×k_m median.

    Args:
        x: (B, H, W, C) images.
        gamma: intensity threshold on the normalised image (may be traced).
        expand: p, the enlargement in pixels (static).
        median_size: k_m, odd (static).
        border: what the median assumes outside the image. ``"authors"`` (default, parity): the
            authors filter their background=1 mask with zero padding, so outside counts as ORGAN and
            image corners can turn into organ when k_m is large; ``"background"``: outside counts as
            background.

    Returns:
        (B, H, W, 1) float32 in {0, 1}, 1 = organ. `to_authors_mask` gives the authors' M.
    """
    _check_nhwc(x)
    if border not in MASK_BORDERS:
        raise ValueError(f"Unknown mask border {border!r}. Valid borders: {', '.join(MASK_BORDERS)}.")
    _, h, w, _ = x.shape
    organ = (minmax_normalise(x)[..., :1] > gamma).astype(jnp.float32)
    if expand:
        organ = crop_center(resize_nearest_tf(organ, (h + expand, w + expand)), (h, w))
    # medfilt2d(1 − organ) with zero padding == 1 − median(organ) with one-padding: complementing a
    # binary window complements its median, so the authors' result is reproduced exactly.
    pad_value = 1.0 if border == "authors" else 0.0
    return binary_median_filter(organ, median_size, pad_value=pad_value)


def to_authors_mask(m: jax.Array) -> jax.Array:
    """Convert an organ mask (ours, 1 = organ) to the authors' M (1 = background), or back."""
    return 1.0 - m


def structure_map(
    x: jax.Array,
    organ_mask: jax.Array | None,
    *,
    alpha: float,
    sigma1: float,
    sigma2: float,
    beta: float,
    median_size: int,
    blur_kind: str = "tf_replica",
) -> jax.Array:
    """Algorithm 1 (METHOD §3.1) with the authors' code semantics, per image.

    1. TF Sobel → (dy, dx) per channel; 2. element-wise min and max over the two directions;
    3. each min–max normalised over the whole image (all pixels and channels); 4. blur σ1, keeping
    only channel 0; 5. a = mean(g_min) − g_min, b = g_max − mean(g_max) (per-image means);
    6. s = [a > α] OR [b > α]; 7. s = [blur_σ2(s) > β]; 8. zero-padded k_s×k_s median;
    9. s ← organ ⊙ s (the authors' (1 − M) ⊙ s).

    A flat image has no gradient: its normalised gradients are 0 (not NaN), so its map is empty.
    As in the original, step 3 stretches whatever range a gradient map has to [0, 1]: a map that holds
    only float rounding noise (e.g. g_min of a single rising step between non-dyadic levels) turns
    that noise into "edges". Real images always have gradients of both signs.

    Args:
        x: (B, H, W, C) images in [0, 1] (H, W ≥ 5 for the ``tf_replica`` blur).
        organ_mask: (B, H, W, 1), 1 = organ (see `organ_mask`), or None to skip step 9.
        alpha: edge threshold α (step 6).
        sigma1: blur σ of step 4 (static).
        sigma2: blur σ of step 7 (static).
        beta: threshold β of step 7.
        median_size: k_s, odd (static).
        blur_kind: ``"tf_replica"`` (parity) or ``"gaussian"`` (see `gaussian_blur`).

    Returns:
        (B, H, W, 1) float32 in {0, 1}, 1 = edge.
    """
    _check_nhwc(x)
    edges = sobel(x.astype(jnp.float32))
    g_min = minmax_normalise(jnp.min(edges, axis=-1))
    g_max = minmax_normalise(jnp.max(edges, axis=-1))
    g_min = gaussian_blur(g_min[..., :1], sigma1, kind=blur_kind)
    g_max = gaussian_blur(g_max[..., :1], sigma1, kind=blur_kind)
    a = jnp.mean(g_min, axis=_IMAGE_AXES, keepdims=True) - g_min
    b = g_max - jnp.mean(g_max, axis=_IMAGE_AXES, keepdims=True)
    s = ((a > alpha) | (b > alpha)).astype(jnp.float32)
    s = (gaussian_blur(s, sigma2, kind=blur_kind) > beta).astype(jnp.float32)
    s = binary_median_filter(s, median_size)
    if organ_mask is not None:
        s = s * organ_mask
    return s


# --------------------------------------------------------------------------------------------------
# Lesion removal, noise and label fusion, label placement.


def remove_lesion(s: jax.Array, label: jax.Array) -> jax.Array:
    """METHOD §3.4: zero the structure map wherever the lesion label is non-zero.

    Equals the paper's ``s ⊙ m_l`` with m_l = Algorithm 2 of the label at p = 0.

    Args:
        s: (B, H, W, C) structure map(s).
        label: (B, H, W) or (B, H, W, 1) integer lesion label, 0 = no lesion.

    Returns:
        (B, H, W, C).
    """
    return s * (_label_bhw1(label) == 0).astype(s.dtype)


def fuse_noise(
    key: jax.Array, s: jax.Array, organ: jax.Array, *, low: float = 0.5, high: float = 0.6
) -> jax.Array:
    """METHOD §3.5: ``s' = s + z ⊙ organ ⊙ (1 − s)``, z ~ U(low, high) per pixel and channel.

    Edges stay 1, the organ's interior becomes noise in [low, high), background stays 0. (The
    authors write ``(1 − m)`` with their background=1 mask; ``organ`` is ours, 1 = organ.)

    Args:
        key: PRNG key; draw a fresh one per call (the authors draw fresh noise every pass).
        s: (B, H, W, C) binary structure map(s).
        organ: (B, H, W, 1) or (B, H, W, C) organ mask, 1 = organ.
        low: lower bound of the noise.
        high: upper bound of the noise.

    Returns:
        (B, H, W, C) float.
    """
    z = jax.random.uniform(key, s.shape, dtype=s.dtype, minval=low, maxval=high)
    return s + z * organ * (1.0 - s)


def _canonical_fusion_mode(mode: str) -> str:
    mode = _LABEL_FUSION_ALIASES.get(mode, mode)
    if mode not in LABEL_FUSION_MODES:
        raise ValueError(
            f"Unknown label fusion mode {mode!r}. Valid modes: {', '.join(LABEL_FUSION_MODES)} "
            f"(alias: {', '.join(_LABEL_FUSION_ALIASES)})."
        )
    return mode


def fused_channels(mode: str, num_classes: int, s_channels: int = 1) -> int:
    """Number of channels `fuse_label` returns, e.g. for the generator's input width.

    Args:
        mode: a `LABEL_FUSION_MODES` entry.
        num_classes: K, number of label classes (incl. background).
        s_channels: channels of the noisy structure map.

    Returns:
        The channel count.
    """
    mode = _canonical_fusion_mode(mode)
    if mode in ("concat_onehot", "concat_onehot_plus_0.1"):
        return s_channels + num_classes
    if mode == "concat_raw":
        return s_channels + 1
    if mode == "none":
        return s_channels
    return num_classes  # weighted_sum


def fuse_label(
    s_noisy: jax.Array, label: jax.Array, *, mode: str = "concat_onehot", num_classes: int
) -> jax.Array:
    """METHOD §3.6: combine the noisy structure map with the lesion label as the generator's input.

    Modes:
      * ``"concat_onehot"`` [PAPER, default]: ``concat([s', one_hot(l)])``.
      * ``"concat_onehot_plus_0.1"`` [CODE X-ray, TC]: ``concat([s', one_hot(l) + 0.1])``.
      * ``"concat_raw"``: ``concat([s', l / (K − 1)])``, the label as one channel in [0, 1].
      * ``"none"`` [CODE BRATS]: ``s'`` alone; the label is not an input of G (§11.13).
      * ``"weighted_sum"`` [OLD] (alias ``"old_weighted_0.8_0.2"``): K channels,
        channel k = 0.8·s' + 0.2·one_hot(l)_k; needs a 1-channel s'.

    Args:
        s_noisy: (B, H, W, C) noisy structure map(s).
        label: (B, H, W) or (B, H, W, 1) integer class map in [0, K).
        mode: one of the modes above.
        num_classes: K.

    Returns:
        (B, H, W, `fused_channels(mode, K, C)`) float.

    Raises:
        ValueError: unknown mode, or ``weighted_sum`` with a multi-channel s'.
    """
    mode = _canonical_fusion_mode(mode)
    if mode == "none":
        return s_noisy
    label = _label_bhw1(label)
    dtype = s_noisy.dtype
    if mode == "concat_raw":
        return jnp.concatenate([s_noisy, label.astype(dtype) / max(num_classes - 1, 1)], axis=-1)
    one_hot = jax.nn.one_hot(label[..., 0], num_classes, dtype=dtype)
    if mode == "concat_onehot":
        return jnp.concatenate([s_noisy, one_hot], axis=-1)
    if mode == "concat_onehot_plus_0.1":
        return jnp.concatenate([s_noisy, one_hot + 0.1], axis=-1)
    if s_noisy.shape[-1] != 1:
        raise ValueError(f"weighted_sum fusion needs a 1-channel structure map, got {s_noisy.shape[-1]}")
    return 0.8 * s_noisy + 0.2 * one_hot


def label_fits(label: jax.Array, organ: jax.Array, *, rule: str = "code") -> jax.Array:
    """METHOD §3.7: whether each lesion label fits the organ (pure; rejection sampling is host side).

    Args:
        label: (B, H, W) or (B, H, W, 1) integer lesion labels, 0 = no lesion.
        organ: (B, H, W, 1) organ masks, 1 = organ.
        rule: ``"code"`` (default): no labelled pixel outside the organ (an empty label fits).
            ``"paper"``: the label overlaps the organ in at least one pixel (an empty label does
            not fit), the weaker condition of the printed Algorithm 4. ``"none"``: no check.

    Returns:
        (B,) bool.
    """
    if rule not in LABEL_FIT_RULES:
        raise ValueError(f"Unknown label-fit rule {rule!r}. Valid rules: {', '.join(LABEL_FIT_RULES)}.")
    lesion = _label_bhw1(label) > 0
    inside = organ > 0.5
    if rule == "none":
        return jnp.ones(lesion.shape[:1], bool)
    if rule == "code":
        return ~jnp.any(lesion & ~inside, axis=_IMAGE_AXES)
    return jnp.any(lesion & inside, axis=_IMAGE_AXES)


def _label_fits_np(label: np.ndarray, organ: np.ndarray, rule: str) -> bool:
    """`label_fits` for one image in numpy (host side, no device round trip per draw)."""
    lesion = np.asarray(label).reshape(np.shape(organ)[:2]) > 0
    inside = np.asarray(organ).reshape(lesion.shape) > 0.5
    if rule == "none":
        return True
    if rule == "code":
        return not np.any(lesion & ~inside)
    return bool(np.any(lesion & inside))


def sample_fitting_label(
    rng: np.random.Generator,
    pool: Sequence[np.ndarray],
    organ: np.ndarray,
    *,
    rule: str = "code",
    max_tries: int = 100,
) -> tuple[np.ndarray, int, bool]:
    """Algorithm 4 (METHOD §3.7), host side: draw labels uniformly from a pool until one fits.

    The authors' generation script gives up after 100 draws and uses the last draw anyway (their
    training loop retries forever); this does the former and reports it in ``fitted``, so a caller
    can count or drop such samples.

    Args:
        rng: numpy Generator (explicit, so the draw sequence is reproducible).
        pool: random-access sequence of (H, W) or (H, W, 1) integer labels.
        organ: (H, W) or (H, W, 1) organ mask of the target image, 1 = organ.
        rule: ``"code"`` or ``"paper"``, see `label_fits`.
        max_tries: number of draws before giving up (≥ 1).

    Returns:
        (label, index into pool, fitted). If nothing fitted, the last draw with ``fitted=False``.
    """
    if rule not in LABEL_FIT_RULES:
        raise ValueError(f"Unknown label-fit rule {rule!r}. Valid rules: {', '.join(LABEL_FIT_RULES)}.")
    if max_tries < 1 or len(pool) == 0:
        raise ValueError(f"need max_tries >= 1 and a non-empty pool, got {max_tries} and {len(pool)}")
    for _ in range(max_tries):
        index = int(rng.integers(len(pool)))
        label = np.asarray(pool[index])
        if _label_fits_np(label, organ, rule):
            return label, index, True
    return label, index, False


# --------------------------------------------------------------------------------------------------
# Parameters and the convenience entry point.


@dataclasses.dataclass(frozen=True)
class ExtractionParams:
    """Extraction parameters of one dataset (METHOD §3.3). Frozen and hashable: a valid jit static.

    Attributes:
        alpha: α, the edge threshold of Algorithm 1 step 6.
        sigma1: σ1, blur before thresholding (step 4).
        sigma2: σ2, blur of the binary map (step 7).
        beta: β, threshold after blur #2 (step 7).
        median_s: k_s, median size on the structure map (step 8).
        gamma: γ, intensity threshold of the mask (Algorithm 2).
        expand: p, mask enlargement in pixels.
        median_m: k_m, median size on the mask.
        blur_kind: ``"tf_replica"`` (parity) or ``"gaussian"``.
        size: working (H, W) at which extraction runs (inputs are nearest-resized to it and the
            results back, as the authors do for X-ray, §11.4), or None for the input's size.
        channel: which input channel(s) to extract from: an int (BRATS: 0 = T1), ``"all"``
            (normalise over all channels, edges and mask of channel 0: DRIVE), or ``"each"`` (every
            channel separately, one map per channel: TC's three slices).
        mask_border: median padding of the mask, see `organ_mask` (``"authors"`` = parity).
    """

    alpha: float
    sigma1: float
    sigma2: float
    beta: float
    median_s: int
    gamma: float
    expand: int
    median_m: int
    blur_kind: str = "tf_replica"
    size: tuple[int, int] | None = None
    channel: int | str = 0
    mask_border: str = "authors"

    def __post_init__(self):
        if self.blur_kind not in BLUR_KINDS:
            raise ValueError(f"Unknown blur kind {self.blur_kind!r}. Valid kinds: {', '.join(BLUR_KINDS)}.")
        if self.mask_border not in MASK_BORDERS:
            raise ValueError(
                f"Unknown mask border {self.mask_border!r}. Valid borders: {', '.join(MASK_BORDERS)}."
            )
        if isinstance(self.channel, str) and self.channel not in ("all", "each"):
            raise ValueError(f"channel must be an int, 'all' or 'each', got {self.channel!r}")
        _check_odd(self.median_s, "median_s")
        _check_odd(self.median_m, "median_m")
        if self.size is not None:  # ConfigDicts hand back lists; keep the dataclass hashable
            object.__setattr__(self, "size", tuple(int(v) for v in self.size))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ExtractionParams:
        """Build from a ConfigDict or mapping.

        Args:
            config: either ``dataset`` (a `DATASET_EXTRACTION` key) plus any fields to override, or
                every field spelled out.

        Returns:
            ExtractionParams.
        """
        values = dict(config.items()) if hasattr(config, "items") else dict(config)
        name = values.pop("dataset", None)
        if name is not None:
            return dataclasses.replace(extraction_params(name), **values)
        return cls(**values)


# Per-dataset values exactly as METHOD §3.3 (code_demo), plus the tuned phantom entry.
# fmt: off
DATASET_EXTRACTION: dict[str, ExtractionParams] = {
    "brats2015": ExtractionParams(
        alpha=0.035, sigma1=0.01, sigma2=0.01, beta=0.0, median_s=5,
        gamma=0.30, expand=10, median_m=5, size=(184, 144), channel=0,
    ),
    "drive_fire": ExtractionParams(
        alpha=0.014, sigma1=0.4, sigma2=0.3, beta=0.05, median_s=5,
        gamma=0.30, expand=10, median_m=17, size=(512, 512), channel="all",
    ),
    "chest_xray": ExtractionParams(
        alpha=0.009, sigma1=0.4, sigma2=0.5, beta=0.05, median_s=3,
        gamma=0.15, expand=2, median_m=17, size=(1500, 1500), channel=0,
    ),
    "lung_ct": ExtractionParams(
        alpha=0.0125, sigma1=0.4, sigma2=0.3, beta=0.05, median_s=7,
        gamma=0.48, expand=2, median_m=3, size=(512, 512), channel=0,
    ),
    "tianchi": ExtractionParams(
        alpha=0.0125, sigma1=0.4, sigma2=0.3, beta=0.05, median_s=5,
        gamma=0.48, expand=2, median_m=3, size=(512, 512), channel="each",
    ),
    # Tuned by eye on phantom/default (128²) and phantom/demo (64²) T1 slices. Unlike BRATS the phantom
    # is not skull-stripped, so the organ is the whole head: the skull is as dark as the Rician noise
    # floor (~0.05), so γ = 0.06 with a 7×7 median gives a solid head (γ ≥ 0.1 cuts the skull ring
    # out of the mask). Its noise makes α = 0.035 mark ~20% of pixels; α = 0.09 keeps the scalp/skull
    # layers, ventricles, fissure and grey/white boundaries (~14%). p = 4 (BRATS' 10 at 184 px
    # overshoots at 64 px). "background" border: the head nearly touches the edge at 64², and the
    # authors' zero padding would then grow a stalk of mask out to the border. size=None: the phantom
    # is extracted at whatever size it was built.
    "phantom": ExtractionParams(
        alpha=0.09, sigma1=0.01, sigma2=0.01, beta=0.0, median_s=3,
        gamma=0.06, expand=4, median_m=7, size=None, channel=0, mask_border="background",
    ),
}
# fmt: on


def extraction_params(dataset: str, **overrides: Any) -> ExtractionParams:
    """The `DATASET_EXTRACTION` entry of `dataset`, with fields replaced by `overrides`.

    Args:
        dataset: a key of `DATASET_EXTRACTION`.
        **overrides: `ExtractionParams` fields to change.

    Returns:
        ExtractionParams.
    """
    if dataset not in DATASET_EXTRACTION:
        raise ValueError(
            f"No extraction parameters for {dataset!r}. Known: {', '.join(sorted(DATASET_EXTRACTION))}."
        )
    return dataclasses.replace(DATASET_EXTRACTION[dataset], **overrides)


def structure_map_with(x: jax.Array, organ: jax.Array | None, params: ExtractionParams) -> jax.Array:
    """`structure_map` of x (B, H, W, C) at its own size, with a dataset's `ExtractionParams`."""
    return structure_map(
        x,
        organ,
        alpha=params.alpha,
        sigma1=params.sigma1,
        sigma2=params.sigma2,
        beta=params.beta,
        median_size=params.median_s,
        blur_kind=params.blur_kind,
    )


def extract(
    x: jax.Array,
    label: jax.Array | None,
    params: ExtractionParams,
    *,
    remove_lesions: bool,
) -> tuple[jax.Array, jax.Array]:
    """Structure map and organ mask of a batch (Algorithms 1 and 2, optional lesion removal).

    Jit with ``params`` and ``remove_lesions`` static (e.g. ``functools.partial``).

    Args:
        x: (B, H, W, C) images in [0, 1]; ``params.channel`` picks what is used.
        label: (B, H, W) or (B, H, W, 1) lesion labels at the input's size, or None (only allowed
            when ``remove_lesions`` is False).
        params: see `ExtractionParams`.
        remove_lesions: zero the map under the lesion (§3.4; the paper does it for BRATS, the demo
            code never does).

    Returns:
        (structure_map, organ_mask), each (B, H, W, 1) float32 in {0, 1} (organ: 1 = organ), or
        (B, H, W, C) for ``channel="each"``.
    """
    _check_nhwc(x)
    if remove_lesions and label is None:
        raise ValueError("remove_lesions=True needs a label")
    batch, h, w, c = x.shape
    x = x.astype(jnp.float32)
    if params.channel == "each":
        # One independent extraction per channel: fold the channels into the batch axis.
        x = jnp.moveaxis(x, -1, 1).reshape(batch * c, h, w, 1)
    elif isinstance(params.channel, int):
        x = x[..., params.channel : params.channel + 1]
    if params.size is not None:
        x = resize_nearest_tf(x, params.size)
    organ = organ_mask(
        x, gamma=params.gamma, expand=params.expand, median_size=params.median_m, border=params.mask_border
    )
    s = structure_map_with(x, organ, params)
    if params.size is not None:
        s = resize_nearest_tf(s, (h, w))
        organ = resize_nearest_tf(organ, (h, w))
    if params.channel == "each":
        s = jnp.moveaxis(s.reshape(batch, c, h, w), 1, -1)
        organ = jnp.moveaxis(organ.reshape(batch, c, h, w), 1, -1)
    if remove_lesions:
        s = remove_lesion(s, label)
    return s, organ


def coarse_vessel_labels(structure: np.ndarray, organ: np.ndarray, *, shrink: int) -> np.ndarray:
    """Coarse vessel labels of synthetic retinas (METHOD §8.2), host side.

    A retina's structure map holds its vessels and the outer contour of the fundus disc; keeping only the
    edges inside the field of view shrunk by `shrink` pixels drops that contour, and what remains are the
    vessel lines.

    Args:
        structure: (B, H, W) structure maps, nonzero = edge.
        organ: (B, H, W) field-of-view (organ) masks, nonzero = inside.
        shrink: erosion radius in pixels (≥ 1).

    Returns:
        (B, H, W) uint8, 1 = vessel.
    """
    import scipy.ndimage

    if shrink < 1:
        raise ValueError(f"shrink must be at least 1 pixel, got {shrink}")
    structure, organ = np.asarray(structure), np.asarray(organ)
    if structure.shape != organ.shape or structure.ndim != 3:
        raise ValueError(f"structure {structure.shape} and organ {organ.shape} must both be (B, H, W)")
    disc = np.ones((2 * shrink + 1, 2 * shrink + 1), bool)
    yy, xx = np.mgrid[-shrink : shrink + 1, -shrink : shrink + 1]
    disc &= yy**2 + xx**2 <= shrink**2
    # Outside the image counts as outside the FOV, so a disc touching the border shrinks there too.
    inner = np.stack([scipy.ndimage.binary_erosion(m > 0, disc, border_value=0) for m in organ])
    return ((structure > 0) & inner).astype(np.uint8)
