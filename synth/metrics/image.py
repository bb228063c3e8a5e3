"""Image-quality metrics: MSE, PSNR, SSIM and multi-scale SSIM, plus the pairing protocols of METHOD §9.3.

Every function takes float images in NHWC layout, (B, H, W, C), and returns one value per image, (B,);
the two inputs must have the same shape. ``max_val`` / ``data_range`` is the dynamic range of the pixel
values (1.0 for images in [0, 1]). All but the pairing helpers are pure ``jax.numpy`` and jit-able with
the keyword arguments static.

SSIM and MS-SSIM follow TensorFlow's ``tf.image.ssim`` and ``tf.image.ssim_multiscale`` operation for
operation, because the authors' MS-SSIM numbers come from the latter (§9.3):

* local statistics through an 11×11 Gaussian window (σ 1.5, normalised to sum 1) applied with VALID
  padding, so the SSIM map is (H − 10) × (W − 10) and the image sides must be ≥ 11;
* C1 = (K1·max_val)², C2 = (K2·max_val)², K1 0.01, K2 0.03, and no covariance bias correction (TF's
  ``compensation = 1`` to match MATLAB);
* SSIM per channel = mean over the map of luminance × contrast-structure, then mean over channels.

MS-SSIM runs 5 scales; between scales each image is halved by 2×2 average pooling with VALID padding,
after an odd side has been padded at its end by one SYMMETRIC (edge-repeating) row or column, exactly as
TF does, so a side n becomes ceil(n / 2). The contrast-structure term is kept at scales 1–4 and the full
SSIM at scale 5, each clipped at 0 (TF's ReLU), raised to the power factors (0.0448, 0.2856, 0.3001,
0.2363, 0.1333), multiplied, then averaged over channels.

**Small images.** The coarsest scale must still be ≥ 11 px, so every side must be ≥ (11 − 1)·2⁴ + 1 =
161 px (:data:`MS_SSIM_MIN_SIZE`; METHOD's "176" assumes exact halving). TF fails on smaller images, and
so does :func:`ms_ssim`, with a ValueError naming the sizes. The documented protocol for smaller data
(BRATS slices are 184×144, §11.28) is to pass ``min_size=MS_SSIM_MIN_SIZE``: both images are first
resized bilinearly by :func:`upsample_for_ms_ssim`, keeping the aspect ratio, so that the shorter side is
exactly ``min_size`` (184×144 becomes 206×161). Report this resize together with any number computed so.

**Pairing (§11.28).** The authors paired real and synthetic images by directory-listing order, which is
arbitrary. :func:`ms_ssim_real_vs_synthetic` pairs them at random from a JAX key (reproducible), and
:func:`ms_ssim_diversity` scores distinct pairs within one set (lower = more diverse). Both return the
mean and the standard deviation over the pairs.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MS_SSIM_POWER_FACTORS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # TF's _MSSSIM_WEIGHTS.


def ms_ssim_min_size(filter_size: int = 11, num_scales: int = len(MS_SSIM_POWER_FACTORS)) -> int:
    """Return the smallest image side TF's MS-SSIM accepts: (filter_size − 1)·2^(num_scales − 1) + 1."""
    return (filter_size - 1) * 2 ** (num_scales - 1) + 1


MS_SSIM_MIN_SIZE = ms_ssim_min_size()  # 161 px.


def _check_pair(a: jax.Array, b: jax.Array) -> None:
    if a.shape != b.shape:
        raise ValueError(f"Images {a.shape} and {b.shape} differ in shape.")
    if a.ndim != 4:
        raise ValueError(f"Expected NHWC images (B, H, W, C), got shape {a.shape}.")


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """Compute the mean squared error per image.

    Args:
        a: (B, H, W, C) images.
        b: (B, H, W, C) images.

    Returns:
        (B,) mean of (a − b)² over H, W and C.
    """
    _check_pair(a, b)
    diff = a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.mean(jnp.square(diff), axis=(1, 2, 3))


def psnr(a: jax.Array, b: jax.Array, *, data_range: float = 1.0) -> jax.Array:
    """Compute the peak signal-to-noise ratio per image, in dB.

    Args:
        a: (B, H, W, C) images.
        b: (B, H, W, C) images.
        data_range: the pixel values' dynamic range (max − min possible value), 1.0 for [0, 1] images.

    Returns:
        (B,) 10·log10(data_range² / MSE), with the MSE of :func:`mse`; +inf for identical images.
    """
    return 10.0 * jnp.log10(data_range**2 / mse(a, b))


def gaussian_window(size: int, sigma: float) -> jax.Array:
    """1-D Gaussian taps summing to 1; their outer product is TF's ``_fspecial_gauss`` 2-D window."""
    coords = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
    taps = jnp.exp(-0.5 * jnp.square(coords) / sigma**2)
    return taps / jnp.sum(taps)


def _gaussian_band_matrix(length: int, filter_size: int = 11, filter_sigma: float = 1.5) -> np.ndarray:
    """(length − filter_size + 1, length) matrix whose product with a signal is its VALID Gaussian filter."""
    # The taps evaluated now (also at trace time), so the matrix is a constant of the program.
    with jax.ensure_compile_time_eval():
        taps = np.asarray(gaussian_window(filter_size, filter_sigma), np.float32)
    rows = length - filter_size + 1
    return sum(tap * np.eye(rows, length, k=shift, dtype=np.float32) for shift, tap in enumerate(taps))


def gaussian_filter_valid(x: jax.Array, filter_size: int = 11, filter_sigma: float = 1.5) -> jax.Array:
    """The separable Gaussian window applied to every channel of (B, H, W, C), VALID padding.

    As two banded matrix products. XLA:CPU runs the equivalent depthwise convolution ~10x slower, which
    made MS-SSIM the slow part of stage D's generator-quality scores; sums of shifted slices filter faster
    on their own but make MS-SSIM and the memorisation audit slower (`benchmarks.metrics_throughput`, 2
    Zen 3 cores: MS-SSIM at 161² 242 pairs/s, against 36 by convolution and 185 by slices; at 512² 14.2
    against 3.8 and 15.2; the audit's all-pairs SSIM at 128²×4 ~500 pairs/s, against ~70 and ~100).
    """
    rows = _gaussian_band_matrix(x.shape[1], filter_size, filter_sigma)
    columns = _gaussian_band_matrix(x.shape[2], filter_size, filter_sigma)
    # HIGHEST precision: GPUs may otherwise use TF32 (10-bit mantissa), and SSIM subtracts nearly equal
    # local moments.
    return jnp.einsum("ih,bhwk,jw->bijk", rows, x, columns, precision=jax.lax.Precision.HIGHEST)


def _ssim_per_channel(
    x: jax.Array, y: jax.Array, *, max_val: float, filter_size: int, filter_sigma: float, k1: float, k2: float
) -> tuple[jax.Array, jax.Array]:
    """TF's ``_ssim_per_channel``: (ssim, contrast-structure), each (B, C), averaged over the map."""
    if min(x.shape[1:3]) < filter_size:
        raise ValueError(
            f"SSIM needs each side ≥ filter_size {filter_size}; got H×W {x.shape[1]}×{x.shape[2]}."
        )
    c1 = (k1 * max_val) ** 2
    c2 = (k2 * max_val) ** 2
    # One filter pass over the four statistics' inputs stacked along the channel axis.
    stats = gaussian_filter_valid(
        jnp.concatenate([x, y, x * y, jnp.square(x) + jnp.square(y)], axis=-1), filter_size, filter_sigma
    )
    mean_x, mean_y, mean_xy, mean_sq = jnp.split(stats, 4, axis=-1)
    num0 = 2.0 * mean_x * mean_y
    den0 = jnp.square(mean_x) + jnp.square(mean_y)
    luminance = (num0 + c1) / (den0 + c1)
    contrast_structure = (2.0 * mean_xy - num0 + c2) / (mean_sq - den0 + c2)
    return jnp.mean(luminance * contrast_structure, axis=(1, 2)), jnp.mean(contrast_structure, axis=(1, 2))


def ssim(
    a: jax.Array,
    b: jax.Array,
    *,
    max_val: float = 1.0,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Compute the structural similarity per image, as ``tf.image.ssim`` does (see the module docstring).

    Args:
        a: (B, H, W, C) images, H and W ≥ ``filter_size``.
        b: (B, H, W, C) images.
        max_val: the pixel values' dynamic range.
        filter_size: side of the Gaussian window.
        filter_sigma: its standard deviation, in pixels.
        k1: luminance stabiliser, C1 = (k1·max_val)².
        k2: contrast stabiliser, C2 = (k2·max_val)².

    Returns:
        (B,) the mean over the VALID SSIM map, averaged over channels; 1 for identical images.
    """
    _check_pair(a, b)
    per_channel, _ = _ssim_per_channel(
        a.astype(jnp.float32),
        b.astype(jnp.float32),
        max_val=max_val,
        filter_size=filter_size,
        filter_sigma=filter_sigma,
        k1=k1,
        k2=k2,
    )
    return jnp.mean(per_channel, axis=-1)


def _halve_like_tf(x: jax.Array) -> jax.Array:
    """2×2 VALID average pooling after SYMMETRIC end padding of odd sides: side n -> ceil(n / 2)."""
    _, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="symmetric")
    b, h, w, c = x.shape
    return jnp.mean(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def upsample_for_ms_ssim(images: jax.Array, min_size: int = MS_SSIM_MIN_SIZE) -> jax.Array:
    """Resize images bilinearly so that their shorter side is ``min_size``, keeping the aspect ratio.

    This is the small-image protocol of :func:`ms_ssim` (module docstring). Images whose sides are
    already ≥ ``min_size`` are returned unchanged; images are never shrunk.

    Args:
        images: (B, H, W, C) images.
        min_size: the shorter side after resizing, :data:`MS_SSIM_MIN_SIZE` for TF's default MS-SSIM.

    Returns:
        (B, H', W', C) with min(H', W') = ``min_size`` and the longer side scaled by the same factor
        (rounded to the nearest pixel), or ``images`` itself when no resize is needed.
    """
    b, h, w, c = images.shape
    if min(h, w) >= min_size:
        return images
    scale = min_size / min(h, w)
    size = (max(min_size, round(h * scale)), max(min_size, round(w * scale)))
    return jax.image.resize(images.astype(jnp.float32), (b, *size, c), method="bilinear")


def ms_ssim(
    a: jax.Array,
    b: jax.Array,
    *,
    max_val: float = 1.0,
    power_factors: Sequence[float] = MS_SSIM_POWER_FACTORS,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    min_size: int | None = None,
) -> jax.Array:
    """Compute multi-scale SSIM per image, following ``tf.image.ssim_multiscale`` (module docstring).

    Args:
        a: (B, H, W, C) images; both sides ≥ :func:`ms_ssim_min_size` (161 px by default) unless
            ``min_size`` is given.
        b: (B, H, W, C) images.
        max_val: the pixel values' dynamic range.
        power_factors: one exponent per scale; their number is the number of scales.
        filter_size: side of the Gaussian window.
        filter_sigma: its standard deviation, in pixels.
        k1: luminance stabiliser.
        k2: contrast stabiliser.
        min_size: if given, first resize both images with :func:`upsample_for_ms_ssim` so that the
            shorter side is at least ``min_size`` (use :data:`MS_SSIM_MIN_SIZE`).

    Returns:
        (B,) Π_s relu(cs_s)^p_s · relu(ssim_last)^p_last, averaged over channels; 1 for identical images.

    Raises:
        ValueError: the images (after the optional resize) are too small for the coarsest scale; the
            message names the sizes and the ``min_size`` protocol.
    """
    _check_pair(a, b)
    if min_size is not None:
        a, b = upsample_for_ms_ssim(a, min_size), upsample_for_ms_ssim(b, min_size)
    needed = ms_ssim_min_size(filter_size, len(power_factors))
    if min(a.shape[1:3]) < needed:
        raise ValueError(
            f"MS-SSIM with {len(power_factors)} scales and a {filter_size}-px window needs each image side "
            f"≥ {needed} px (as tf.image.ssim_multiscale), got H×W {a.shape[1]}×{a.shape[2]}. Pass "
            f"min_size={needed} to resize bilinearly first (see synth.metrics.image.upsample_for_ms_ssim)."
        )
    x, y = a.astype(jnp.float32), b.astype(jnp.float32)
    kwargs = dict(max_val=max_val, filter_size=filter_size, filter_sigma=filter_sigma, k1=k1, k2=k2)
    terms = []
    for scale in range(len(power_factors)):
        if scale > 0:
            x, y = _halve_like_tf(x), _halve_like_tf(y)
        full, contrast_structure = _ssim_per_channel(x, y, **kwargs)
        terms.append(jax.nn.relu(contrast_structure))
    # The coarsest scale contributes its full SSIM (luminance included) instead of its cs term.
    terms[-1] = jax.nn.relu(full)
    stacked = jnp.stack(terms, axis=-1)  # (B, C, scales)
    per_channel = jnp.prod(stacked ** jnp.asarray(power_factors, jnp.float32), axis=-1)
    return jnp.mean(per_channel, axis=-1)


def minmax_per_image(images: jax.Array) -> jax.Array:
    """Rescale each image to [0, 1] by its own minimum and maximum, as the authors' metric scripts do.

    Args:
        images: (B, H, W, C) images.

    Returns:
        (B, H, W, C) float32 (x − min) / (max − min), min and max over each image's H, W and C; a
        constant image becomes all zeros.
    """
    x = images.astype(jnp.float32)
    lo = jnp.min(x, axis=(1, 2, 3), keepdims=True)
    hi = jnp.max(x, axis=(1, 2, 3), keepdims=True)
    return jnp.where(hi > lo, (x - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0)


# --------------------------------------------------------------------------------------------------
# Pairing protocols (host-side loops over jitted batches).

_ms_ssim_jit = jax.jit(
    ms_ssim,
    static_argnames=("max_val", "power_factors", "filter_size", "filter_sigma", "k1", "k2", "min_size"),
)


def _numpy_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded from a JAX key (typed or raw), so pair sampling is reproducible."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng(np.asarray(data, dtype=np.uint32).ravel())


def unordered_pair(index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Map indices in [0, n(n−1)/2) one-to-one onto the unordered pairs {i, j}, i ≠ j, of n items.

    Index k < n·⌊(n−1)/2⌋ is the pair (k mod n, (k mod n + k div n + 1) mod n), i.e. each item with the
    item d = 1..⌊(n−1)/2⌋ places further round a circle; for even n the remaining n/2 indices pair each
    i < n/2 with i + n/2. Integer arithmetic only, so it is exact for any n.

    Args:
        index: integer array of pair indices.
        n: number of items.

    Returns:
        ``(i, j)``, integer arrays of ``index``'s shape with i ≠ j.
    """
    index = np.asarray(index, dtype=np.int64)
    circular = n * ((n - 1) // 2)
    first = np.where(index < circular, index % n, index - circular)
    second = np.where(index < circular, (index % n + index // n + 1) % n, index - circular + n // 2)
    return first, second


def _ms_ssim_over_pairs(
    images_a: Any, images_b: Any, index_a: np.ndarray, index_b: np.ndarray, batch_size: int, kwargs: dict
) -> tuple[float, float]:
    if "power_factors" in kwargs:
        kwargs = {**kwargs, "power_factors": tuple(kwargs["power_factors"])}  # Static jit args must hash.
    batch_size = min(batch_size, len(index_a))  # Never pad a short run of pairs up to a full batch.
    scores = []
    for start in range(0, len(index_a), batch_size):
        take_a, take_b = index_a[start : start + batch_size], index_b[start : start + batch_size]
        count = len(take_a)
        # Pad the last batch by repeating its first pair so that every call has one shape (one compile).
        take_a = np.concatenate([take_a, np.full(batch_size - count, take_a[0])])
        take_b = np.concatenate([take_b, np.full(batch_size - count, take_b[0])])
        batch_a, batch_b = jnp.asarray(images_a[take_a]), jnp.asarray(images_b[take_b])
        scores.append(np.asarray(_ms_ssim_jit(batch_a, batch_b, **kwargs))[:count])
    scores = np.concatenate(scores)
    return float(np.mean(scores)), float(np.std(scores))


def _check_pair_count(num_pairs: int) -> None:
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be ≥ 1, got {num_pairs}.")


def ms_ssim_real_vs_synthetic(
    real: Any, synthetic: Any, key: jax.Array, num_pairs: int, *, batch_size: int = 16, **ms_ssim_kwargs: Any
) -> tuple[float, float]:
    """Average MS-SSIM between randomly paired real and synthetic images (higher = more alike).

    Pair k is (real[i_k], synthetic[j_k]); the i_k are drawn uniformly from the real set and the j_k,
    independently, from the synthetic set, each without replacement when ``num_pairs`` ≤ the set's size
    (with replacement otherwise), from a numpy generator seeded by ``key``. This replaces the authors'
    pairing by listing order (§11.28) with one that a seed reproduces.

    Args:
        real: (N, H, W, C) images, a numpy or JAX array (only the sampled batches are moved to device).
        synthetic: (M, H, W, C) images of the same H, W, C.
        key: JAX random key.
        num_pairs: number of pairs scored.
        batch_size: pairs per jitted call.
        **ms_ssim_kwargs: passed to :func:`ms_ssim` (e.g. ``min_size=MS_SSIM_MIN_SIZE``).

    Returns:
        ``(mean, std)`` of the per-pair MS-SSIM (population std, ddof 0).
    """
    _check_pair_count(num_pairs)
    if real.shape[1:] != synthetic.shape[1:]:
        raise ValueError(f"Real images {real.shape[1:]} and synthetic {synthetic.shape[1:]} differ in shape.")
    rng = _numpy_rng(key)
    index_real = rng.choice(real.shape[0], num_pairs, replace=num_pairs > real.shape[0])
    index_synthetic = rng.choice(synthetic.shape[0], num_pairs, replace=num_pairs > synthetic.shape[0])
    return _ms_ssim_over_pairs(real, synthetic, index_real, index_synthetic, batch_size, ms_ssim_kwargs)


def ms_ssim_between_modalities(
    modalities: Any, key: jax.Array, num_pairs: int, *, batch_size: int = 16, **ms_ssim_kwargs: Any
) -> tuple[float, float]:
    """Average MS-SSIM between two modalities of one sample (registered images: high = alike contrasts).

    Pair k is (modalities[i_k][n_k], modalities[j_k][n_k]): a sample n_k and two different modalities
    i_k ≠ j_k, drawn uniformly (with replacement) from a numpy generator seeded by ``key``. Real
    T1/T2/T1c/FLAIR share the anatomy but not the contrast; synthetic modalities that come out nearly
    identical score far above the real ones.

    Args:
        modalities: (K, N, H, W, C) images by modality, K ≥ 2.
        key: JAX random key.
        num_pairs: number of pairs scored.
        batch_size: pairs per jitted call.
        **ms_ssim_kwargs: passed to :func:`ms_ssim`.

    Returns:
        ``(mean, std)`` of the per-pair MS-SSIM.
    """
    _check_pair_count(num_pairs)
    k, n = modalities.shape[:2]
    if k < 2:
        raise ValueError(f"Need at least two modalities, got {k}.")
    rng = _numpy_rng(key)
    sample = rng.integers(0, n, num_pairs)
    first = rng.integers(0, k, num_pairs)
    second = (first + rng.integers(1, k, num_pairs)) % k  # Uniform over the other K − 1.
    flat = modalities.reshape((k * n,) + modalities.shape[2:])
    return _ms_ssim_over_pairs(
        flat, flat, first * n + sample, second * n + sample, batch_size, ms_ssim_kwargs
    )


def ms_ssim_diversity(
    images: Any, key: jax.Array, num_pairs: int, *, batch_size: int = 16, **ms_ssim_kwargs: Any
) -> tuple[float, float]:
    """Average MS-SSIM between distinct pairs of one set (lower = more diverse).

    ``num_pairs`` different unordered pairs {i, j}, i ≠ j, are drawn uniformly without replacement from
    the N(N−1)/2 possible ones (numpy generator seeded by ``key``, decoded by :func:`unordered_pair`),
    so no image is compared with itself and no pair is scored twice (MS-SSIM is symmetric).

    Args:
        images: (N, H, W, C) images, a numpy or JAX array.
        key: JAX random key.
        num_pairs: number of pairs scored, at most N(N−1)/2.
        batch_size: pairs per jitted call.
        **ms_ssim_kwargs: passed to :func:`ms_ssim`.

    Returns:
        ``(mean, std)`` of the per-pair MS-SSIM (population std, ddof 0).
    """
    _check_pair_count(num_pairs)
    n = images.shape[0]
    total = math.comb(n, 2)
    if num_pairs > total:
        raise ValueError(f"{n} images have only {total} distinct pairs; asked for {num_pairs}.")
    first, second = unordered_pair(_numpy_rng(key).choice(total, num_pairs, replace=False), n)
    return _ms_ssim_over_pairs(images, images, first, second, batch_size, ms_ssim_kwargs)
