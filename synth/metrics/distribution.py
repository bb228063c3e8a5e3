"""Distances between two sets of images through their features: FID (Fréchet distance) and KID.

Both compare *features*, (N, D) arrays produced by a :class:`FeatureExtractor`: any callable from images
(B, H, W, C) with values in [0, 1] to features (B, D). The standard one is
:func:`~synth.metrics.inception.inception_v3_extractor`, the 2015 Inception-v3 of FID (pool3, D = 2048),
which needs a local weight file (see :mod:`synth.metrics.inception` for which file and how to make it).
A typical FID::

    extract = inception_v3_extractor("weights/pt_inception-2015-12-05.npz")
    fid = frechet_distance(*feature_statistics(extract(real)), *feature_statistics(extract(synthetic)))

To reproduce the authors' numbers (§9.3), first rescale each image with
:func:`synth.metrics.image.minmax_per_image` and quantise it to 8 bits (``round(x·255) / 255``).

The Fréchet distance works on host-side float64 numpy arrays: FID subtracts traces of 2048×2048
matrices of similar size, and float32 loses the digits that matter. KID is a jitted ``jax.numpy``
computation on the features.
"""

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from synth.metrics.inception import inception_v3_extractor

__all__ = [
    "FeatureExtractor",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "inception_v3_extractor",
    "kid",
    "mmd2_unbiased",
    "polynomial_kernel",
]


class FeatureExtractor(Protocol):
    """Maps images (B, H, W, C), C 1 or 3, values in [0, 1], to features (B, D)."""

    def __call__(self, images: Any) -> Any: ...


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Compute the mean and covariance of features, in float64 on the host.

    Args:
        features: (N, D) array, N ≥ 2.

    Returns:
        ``(mu, sigma)``: (D,) mean and (D, D) unbiased covariance (divided by N − 1), as
        ``np.cov(features, rowvar=False)`` and the FID reference implementations.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Expected features (N, D) with N ≥ 2, got shape {x.shape}.")
    mu = np.mean(x, axis=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; rounding's tiny negative eigenvalues become 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(
    mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, *, method: str = "eigh", eps: float = 1e-6
) -> float:
    """Compute the Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    d² = ‖mu1 − mu2‖² + Tr(sigma1) + Tr(sigma2) − 2·Tr((sigma1·sigma2)^½), in float64.

    The trace of the matrix square root is computed one of two ways:

    * ``"eigh"`` (default): sigma1·sigma2 is similar to the symmetric PSD matrix
      S = sigma1^½·sigma2·sigma1^½, so Tr((sigma1·sigma2)^½) = Σ √λ_i(S). Both square roots come from
      symmetric eigendecompositions with rounding's tiny negative eigenvalues clipped to 0; the result
      is real by construction and stays accurate for the singular covariances of N < D samples.
    * ``"sqrtm"``: ``scipy.linalg.sqrtm(sigma1 @ sigma2)``, real part, as the TTUR / pytorch-fid code the
      authors used (§9.3); if it is not finite, ``eps``·I is added to both covariances first, and an
      imaginary diagonal part above 1e-3 raises. For parity checks.

    Args:
        mu1: (D,) mean of the first set.
        sigma1: (D, D) covariance of the first set.
        mu2: (D,) mean of the second set.
        sigma2: (D, D) covariance of the second set.
        method: ``"eigh"`` or ``"sqrtm"``.
        eps: the ``"sqrtm"`` fallback's diagonal offset.

    Returns:
        The squared Fréchet distance (what is reported as FID) as a Python float.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"Shapes differ: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}.")
    if method == "eigh":
        sqrt1 = _psd_sqrt((sigma1 + sigma1.T) / 2)
        inner = sqrt1 @ ((sigma2 + sigma2.T) / 2) @ sqrt1
        trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)))
    elif method == "sqrtm":
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.all(np.isfinite(root)):
            offset = eps * np.eye(sigma1.shape[0])
            root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(root):
            if not np.allclose(np.diagonal(root).imag, 0.0, atol=1e-3):
                raise ValueError(f"sqrtm has a large imaginary part: {np.max(np.abs(root.imag)):.3g}.")
            root = root.real
        trace_sqrt = np.trace(root)
    else:
        raise ValueError(f"Unknown method {method!r}; valid: 'eigh', 'sqrtm'.")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_from_features(features_a: Any, features_b: Any, **kwargs: Any) -> float:
    """Compute the Fréchet distance between the Gaussians fitted to two feature sets.

    Args:
        features_a: (N, D) features of the first set.
        features_b: (M, D) features of the second set.
        **kwargs: passed to :func:`frechet_distance`.

    Returns:
        :func:`frechet_distance` of the two sets' :func:`feature_statistics`.
    """
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b), **kwargs)


def polynomial_kernel(x: jax.Array, y: jax.Array) -> jax.Array:
    """Compute KID's kernel k(x, y) = (x·y / D + 1)³ for every pair of rows.

    Args:
        x: (N, D) features.
        y: (M, D) features.

    Returns:
        (N, M) kernel matrix.
    """
    # HIGHEST precision: GPUs may otherwise use TF32 for float32 products of 2048-d features.
    dots = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
    return (dots / x.shape[-1] + 1.0) ** 3


def mmd2_unbiased(x: jax.Array, y: jax.Array) -> jax.Array:
    """Compute the unbiased estimate of the squared MMD with :func:`polynomial_kernel`.

    MMD² = Σ_{i≠i'} k(x_i, x_i') / (n(n−1)) + Σ_{j≠j'} k(y_j, y_j') / (m(m−1)) − 2 Σ_{i,j} k(x_i, y_j) / (nm):
    diagonal terms are left out, so the estimate is unbiased and can be slightly negative.

    Args:
        x: (n, D) features, n ≥ 2.
        y: (m, D) features, m ≥ 2.

    Returns:
        Scalar MMD² estimate.
    """
    n, m = x.shape[0], y.shape[0]
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within_x = (jnp.sum(k_xx) - jnp.trace(k_xx)) / (n * (n - 1))
    within_y = (jnp.sum(k_yy) - jnp.trace(k_yy)) / (m * (m - 1))
    return within_x + within_y - 2.0 * jnp.mean(polynomial_kernel(x, y))


def _kid_subsets(a: jax.Array, b: jax.Array, key: jax.Array, subset_size: int, num_subsets: int) -> jax.Array:
    def one_subset(subset_key: jax.Array) -> jax.Array:
        key_a, key_b = jax.random.split(subset_key)
        take_a = jax.random.choice(key_a, a.shape[0], (subset_size,), replace=False)
        take_b = jax.random.choice(key_b, b.shape[0], (subset_size,), replace=False)
        return mmd2_unbiased(a[take_a], b[take_b])

    # lax.map keeps one subset's kernel matrices in memory at a time.
    return jax.lax.map(one_subset, jax.random.split(key, num_subsets))


_kid_subsets_jit = jax.jit(_kid_subsets, static_argnames=("subset_size", "num_subsets"))


def kid(
    features_a: Any, features_b: Any, subset_size: int, num_subsets: int, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Compute the kernel inception distance: the unbiased MMD² averaged over random subsets.

    For each of ``num_subsets`` subsets, ``subset_size`` rows are drawn without replacement from each
    set (independently per subset, from ``key``) and :func:`mmd2_unbiased` is taken between them. The
    usual settings are subset_size 1000 and num_subsets 100 (Bińkowski et al. 2018, torch-fidelity).

    Args:
        features_a: (N, D) features of the first set, N ≥ ``subset_size``.
        features_b: (M, D) features of the second set, M ≥ ``subset_size``.
        subset_size: rows per subset, ≥ 2.
        num_subsets: number of subsets.
        key: JAX random key.

    Returns:
        ``(mean, std)`` over the subsets (population std); about 0 for sets from one distribution.
    """
    a, b = jnp.asarray(features_a, jnp.float32), jnp.asarray(features_b, jnp.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"Expected features (N, D) and (M, D), got {a.shape} and {b.shape}.")
    if not 2 <= subset_size <= min(a.shape[0], b.shape[0]):
        raise ValueError(
            f"subset_size {subset_size} must be ≥ 2 and ≤ both set sizes ({a.shape[0]}, {b.shape[0]})."
        )
    values = _kid_subsets_jit(a, b, key, subset_size, num_subsets)
    return jnp.mean(values), jnp.std(values)
