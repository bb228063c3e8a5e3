"""Pixel-level vessel-segmentation metrics for DRIVE (METHOD §8.2): sensitivity, specificity, accuracy, AUC.

Inputs are a vessel probability map ``probabilities`` (any shape, e.g. (B, H, W)), the manual annotation
``manual`` of the same shape (nonzero = vessel: bool, 0/1 or DRIVE's 0/255 all work) and an optional
field-of-view mask ``fov`` (nonzero = inside), also of that shape.

**FOV handling** (unspecified in the paper, §8.2): only pixels inside the FOV count, for every metric; the
dark border outside the fundus disc is left out, since it would add tens of thousands of trivially correct
background pixels per image and inflate specificity, accuracy and AUC. DRIVE ships a FOV mask per image
(``test/mask/*.gif``). ``fov=None`` counts every pixel (to compare with papers that do so).

All pixels of all images are pooled (one confusion table, one ROC curve over the batch), the usual
DRIVE protocol; ``jax.vmap`` a metric for per-image values. A pixel is predicted vessel when its
probability is ≥ ``threshold`` (0.5). Undefined ratios (e.g. sensitivity with no vessel pixel) are NaN,
so they cannot pass for a score. Everything is ``jax.numpy`` and jit-able.
"""

import jax
import jax.numpy as jnp


def _flatten(probabilities: jax.Array, manual: jax.Array, fov: jax.Array | None):
    if manual.shape != probabilities.shape or (fov is not None and fov.shape != probabilities.shape):
        raise ValueError(
            f"Shapes differ: probabilities {probabilities.shape}, manual {manual.shape}, "
            f"fov {None if fov is None else fov.shape}."
        )
    inside = jnp.ones(probabilities.size, bool) if fov is None else fov.reshape(-1) != 0
    vessel = manual.reshape(-1) != 0
    return probabilities.reshape(-1).astype(jnp.float32), vessel & inside, ~vessel & inside


def confusion_counts(
    probabilities: jax.Array, manual: jax.Array, fov: jax.Array | None = None, *, threshold: float = 0.5
) -> dict[str, jax.Array]:
    """Count true/false positives/negatives inside the FOV, vessel = positive.

    Args:
        probabilities: vessel probabilities, any shape.
        manual: reference annotation of the same shape, nonzero = vessel.
        fov: field-of-view mask of the same shape, nonzero = counted; None counts every pixel.
        threshold: probabilities ≥ threshold are predicted vessel.

    Returns:
        ``"tp"``, ``"fp"``, ``"tn"``, ``"fn"``: int32 scalar pixel counts.
    """
    scores, positive, negative = _flatten(probabilities, manual, fov)
    predicted = scores >= threshold
    return {
        "tp": jnp.sum(predicted & positive, dtype=jnp.int32),
        "fp": jnp.sum(predicted & negative, dtype=jnp.int32),
        "tn": jnp.sum(~predicted & negative, dtype=jnp.int32),
        "fn": jnp.sum(~predicted & positive, dtype=jnp.int32),
    }


def _ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    return jnp.where(denominator > 0, numerator / jnp.maximum(denominator, 1), jnp.nan).astype(jnp.float32)


def sensitivity(
    probabilities: jax.Array, manual: jax.Array, fov: jax.Array | None = None, *, threshold: float = 0.5
) -> jax.Array:
    """Compute the sensitivity (recall of vessel pixels) TP / (TP + FN) inside the FOV (module docstring)."""
    c = confusion_counts(probabilities, manual, fov, threshold=threshold)
    return _ratio(c["tp"], c["tp"] + c["fn"])


def specificity(
    probabilities: jax.Array, manual: jax.Array, fov: jax.Array | None = None, *, threshold: float = 0.5
) -> jax.Array:
    """Compute the specificity TN / (TN + FP) inside the FOV (module docstring)."""
    c = confusion_counts(probabilities, manual, fov, threshold=threshold)
    return _ratio(c["tn"], c["tn"] + c["fp"])


def accuracy(
    probabilities: jax.Array, manual: jax.Array, fov: jax.Array | None = None, *, threshold: float = 0.5
) -> jax.Array:
    """Compute the pixel accuracy (TP + TN) / (pixels in the FOV) (module docstring)."""
    c = confusion_counts(probabilities, manual, fov, threshold=threshold)
    return _ratio(c["tp"] + c["tn"], c["tp"] + c["tn"] + c["fp"] + c["fn"])


def auc(probabilities: jax.Array, manual: jax.Array, fov: jax.Array | None = None) -> jax.Array:
    """Compute the exact area under the ROC curve of the FOV pixels, ties counted as one half.

    AUC = (#{(v, b): p_v > p_b} + ½·#{(v, b): p_v = p_b}) / (V·N) over all pairs of a vessel pixel v and
    a background pixel b inside the FOV (V and N their counts): the Mann–Whitney statistic, which equals
    the trapezoidal area under the ROC curve with one point per distinct probability. Computed in
    O(n log n) by sorting, not by a threshold grid.

    Args:
        probabilities: vessel probabilities, any shape.
        manual: reference annotation of the same shape, nonzero = vessel.
        fov: field-of-view mask of the same shape; None counts every pixel.

    Returns:
        Scalar float32 AUC; NaN without vessel or without background pixels in the FOV.
    """
    scores, positive, negative = _flatten(probabilities, manual, fov)
    order = jnp.argsort(scores)
    sorted_scores = scores[order]
    # Exact int32 prefix counts of vessel pixels in ascending score order; pixels outside the FOV are
    # neither positive nor negative, so they add nothing.
    vessels_up_to = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(positive[order], dtype=jnp.int32)])
    tie_start = jnp.searchsorted(sorted_scores, sorted_scores, side="left")
    tie_end = jnp.searchsorted(sorted_scores, sorted_scores, side="right")
    num_vessel = vessels_up_to[-1]
    vessels_above = num_vessel - vessels_up_to[tie_end]
    vessels_tied = vessels_up_to[tie_end] - vessels_up_to[tie_start]
    # Per background pixel, twice its correctly ordered pairs (a tie counts 1 instead of 2): whole
    # numbers, so the float32 sum is exact until it passes 2^24.
    doubled = jnp.where(negative[order], 2 * vessels_above + vessels_tied, 0)
    doubled_wins = jnp.sum(doubled.astype(jnp.float32))
    num_background = jnp.sum(negative, dtype=jnp.int32)
    pairs = 2.0 * num_vessel.astype(jnp.float32) * num_background.astype(jnp.float32)
    return jnp.where(pairs > 0, doubled_wins / jnp.maximum(pairs, 1.0), jnp.nan)


def vessel_metrics(
    probabilities: jax.Array, manual: jax.Array, fov: jax.Array | None = None, *, threshold: float = 0.5
) -> dict[str, jax.Array]:
    """Compute all four metrics of §8.2 at once.

    Args:
        probabilities: vessel probabilities, any shape.
        manual: reference annotation of the same shape, nonzero = vessel.
        fov: field-of-view mask of the same shape; None counts every pixel.
        threshold: probabilities ≥ threshold are predicted vessel.

    Returns:
        ``"sensitivity"``, ``"specificity"``, ``"accuracy"``, ``"auc"``: float32 scalars.
    """
    c = confusion_counts(probabilities, manual, fov, threshold=threshold)
    return {
        "sensitivity": _ratio(c["tp"], c["tp"] + c["fn"]),
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        "accuracy": _ratio(c["tp"] + c["tn"], c["tp"] + c["tn"] + c["fp"] + c["fn"]),
        "auc": auc(probabilities, manual, fov),
    }
