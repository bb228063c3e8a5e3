"""Segmentation metrics as jittable ``jax.numpy`` functions; every reduction names its axes.

Segmentation metrics take integer label maps ``pred`` and ``target`` of shape (B, H, W), where
the prediction is the argmax of the segmentor's outputs. Two families (METHOD §9.4):

* **Standard**: per-class Dice (:func:`dice_per_class`) and the BRATS regions whole / core /
  enhancing (:func:`brats_region_dice`). Dice is computed per image, then averaged over the
  images where the class (region) is present in the target *or* the prediction. Images where it
  is absent from both are left out of the mean (their Dice is undefined), and each mean comes
  with the number of images it averages, so batch results merge exactly as
  ``Σ mean·count / Σ count``. A mean over zero images is reported as 0 with count 0 (never
  NaN). Note: the BRATS challenge tools instead score 1 for empty-vs-empty.
* **Code parity** (:func:`parity_dice`, :func:`parity_mse`): the authors' numbers, for
  comparability with their tables only.

The other metric families live beside this module in :mod:`synth.metrics`.
"""

import jax
import jax.numpy as jnp

# BRATS 2015 labels: 1 necrosis, 2 oedema, 3 non-enhancing tumour, 4 enhancing tumour.
BRATS_REGIONS: dict[str, tuple[int, ...]] = {
    "whole": (1, 2, 3, 4),
    "core": (1, 3, 4),
    "enhancing": (4,),
}

PARITY_SMOOTH = 1e-5  # Smoothing constant of the authors' Dice (§9.4).


def _check_same_shape(pred: jax.Array, target: jax.Array) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ.")


def _masked_mean(values: jax.Array, present: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Average ``values`` over axis 0 where ``present``: (mean, count), mean 0 if count is 0."""
    count = jnp.sum(present, axis=0).astype(jnp.int32)
    total = jnp.sum(jnp.where(present, values, 0.0), axis=0)
    return total / jnp.maximum(count, 1).astype(values.dtype), count


def region_mask(labels: jax.Array, region: str) -> jax.Array:
    """Return the boolean mask of a BRATS region (a key of :data:`BRATS_REGIONS`).

    Args:
        labels: integer label map of any shape (values 0–4).
        region: ``"whole"``, ``"core"`` or ``"enhancing"``.

    Returns:
        Boolean array of ``labels``' shape, True where the label belongs to the region.

    Raises:
        ValueError: unknown region, naming the valid ones.
    """
    if region not in BRATS_REGIONS:
        raise ValueError(f"Unknown BRATS region {region!r}; valid: {tuple(BRATS_REGIONS)}.")
    return jnp.isin(labels, jnp.asarray(BRATS_REGIONS[region]))


def binary_dice_per_image(
    pred: jax.Array, target: jax.Array, *, eps: float = 1e-6
) -> tuple[jax.Array, jax.Array]:
    """Compute the Dice of two binary masks, per image.

    Args:
        pred: (B, ...) boolean (or 0/1) predicted mask.
        target: (B, ...) boolean (or 0/1) reference mask.
        eps: smoothing, Dice = (2|P∩T| + eps) / (|P| + |T| + eps); it keeps empty-vs-empty finite
            and changes non-empty values by O(eps / (|P| + |T|)).

    Returns:
        ``(dice, present)``, both (B,): the per-image Dice and whether the mask is non-empty in
        either input.
    """
    _check_same_shape(pred, target)
    axes = tuple(range(1, pred.ndim))
    p = pred.astype(jnp.float32)
    t = target.astype(jnp.float32)
    inter = jnp.sum(p * t, axis=axes)
    size = jnp.sum(p, axis=axes) + jnp.sum(t, axis=axes)
    return (2.0 * inter + eps) / (size + eps), size > 0


def dice_per_class(
    pred: jax.Array, target: jax.Array, *, num_classes: int, eps: float = 1e-6
) -> tuple[jax.Array, jax.Array]:
    """Compute the standard per-class Dice per image, averaged over images with the class.

    Args:
        pred: (B, H, W) integer predicted labels.
        target: (B, H, W) integer reference labels.
        num_classes: number of classes C (static under jit); classes 0..C−1, background included.
        eps: see :func:`binary_dice_per_image`.

    Returns:
        ``(dice, count)``, both (C,): each class's mean Dice over the images where it is present
        in ``target`` or ``pred``, and the number of those images (Dice 0 where count is 0).
    """
    _check_same_shape(pred, target)
    classes = jnp.arange(num_classes)
    # One-hot masks (B, H, W, C); the per-image sums run over the spatial axes only.
    p = pred[..., None] == classes
    t = target[..., None] == classes
    spatial = tuple(range(1, pred.ndim))
    inter = jnp.sum(p & t, axis=spatial).astype(jnp.float32)  # (B, C)
    size = (jnp.sum(p, axis=spatial) + jnp.sum(t, axis=spatial)).astype(jnp.float32)  # (B, C)
    dice = (2.0 * inter + eps) / (size + eps)
    return _masked_mean(dice, size > 0)


def brats_region_dice(pred: jax.Array, target: jax.Array, *, eps: float = 1e-6) -> dict[str, jax.Array]:
    """Compute the BRATS region Dice: whole (labels 1–4), core (1, 3, 4), enhancing (4).

    Args:
        pred: (B, H, W) integer predicted labels (0–4).
        target: (B, H, W) integer reference labels (0–4).
        eps: see :func:`binary_dice_per_image`.

    Returns:
        ``"whole"``, ``"core"``, ``"enhancing"``: the scalar mean Dice over the images where the
        region is present in either map; ``"<region>_count"``: the number of such images (int32).
    """
    _check_same_shape(pred, target)
    out = {}
    for name in BRATS_REGIONS:
        dice, present = binary_dice_per_image(region_mask(pred, name), region_mask(target, name), eps=eps)
        out[name], out[f"{name}_count"] = _masked_mean(dice, present)
    return out


def parity_dice(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Compute the authors' "Dice" (METHOD §9.4, §11.27), for comparability only.

    Per image: (2·Σ l·l̂ + 1e-5) / (Σ l² + Σ l̂² + 1e-5), with l, l̂ the class *index* values
    (0–4) as floats, then the mean over images. How it differs from a standard Dice: it is one
    number over all classes, not per class or region; a pixel counts with weight ~index², so
    enhancing tumour (4) counts 16× necrosis (1); confusing two tumour classes still earns
    partial credit (l = 4, l̂ = 3 adds 24 to the numerator and 25 to the denominator); and
    images with no tumour in either map score 1 instead of being left out.

    Args:
        pred: (B, H, W) integer predicted labels.
        target: (B, H, W) integer reference labels.

    Returns:
        Scalar mean over the B images (merge batches weighted by their size).
    """
    _check_same_shape(pred, target)
    lh = pred.astype(jnp.float32)
    lt = target.astype(jnp.float32)
    spatial = tuple(range(1, lt.ndim))
    numer = 2.0 * jnp.sum(lt * lh, axis=spatial) + PARITY_SMOOTH
    denom = jnp.sum(lt * lt, axis=spatial) + jnp.sum(lh * lh, axis=spatial) + PARITY_SMOOTH
    return jnp.mean(numer / denom, axis=0)


def parity_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Compute the authors' segmentation "MSE" (§9.4): mean of (l − l̂)² on class indices.

    Unlike a per-class error, it penalises confusing label 1 with 4 nine times more than 3 with
    4. For images of equal size, the per-image mean followed by the image mean equals this mean
    over (B, H, W).

    Args:
        pred: (B, H, W) integer predicted labels.
        target: (B, H, W) integer reference labels.

    Returns:
        Scalar.
    """
    _check_same_shape(pred, target)
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(diff), axis=tuple(range(diff.ndim)))
