"""Loss functions: pure, jittable, keyword-only options; weights come from ``config.loss``.

Conventions (METHOD §1): ``mse``/``mae`` average over *all* elements and broadcast scalars; every
adversarial loss is least-squares GAN (targets 1 real / 0 fake, no sigmoid on D's output).
Segmentation losses take logits (B, H, W, C) and integer labels (B, H, W); every reduction names
its axes. Stage A's terms (§5.2) are in `synth.structure_losses`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

SEGMENTATION_LOSS_KINDS = ("cross_entropy", "cross_entropy_dice", "weighted_mse_parity")

# Class weights of the code_demo lesion processors' MSE loss (METHOD §6.3, §6.1.3), BRATS classes
# 0..4. Older runs used (1, 5, 15, 15, 15), (1, 10, 50, 50, 50) and (1, 15, 85, 85, 85)
# (§11.19). Configs pass these explicitly; no function defaults to them.
PARITY_SEG_CLASS_WEIGHTS = (2.5, 25.0, 125.0, 125.0, 125.0)


def _all_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim))


def mse(a: jax.Array, b: jax.Array | float) -> jax.Array:
    """Compute the mean over all elements of (a − b)², broadcasting, like the code's mse_loss.

    Args:
        a: any array.
        b: an array broadcastable with ``a``, or a scalar target (e.g. ``mse(d_out, 1.0)``).

    Returns:
        Scalar.
    """
    diff = jnp.asarray(a) - b
    return jnp.mean(jnp.square(diff), axis=_all_axes(diff))


def mae(a: jax.Array, b: jax.Array | float) -> jax.Array:
    """Compute the mean over all elements of |a − b|, broadcasting (scalar)."""
    diff = jnp.asarray(a) - b
    return jnp.mean(jnp.abs(diff), axis=_all_axes(diff))


def lsgan_d_loss(
    real_out: jax.Array,
    fake_out: jax.Array,
    *,
    real_weight: float = 1.0,
    fake_weight: float = 1.0,
) -> jax.Array:
    """Compute the least-squares GAN discriminator loss.

    ``real_weight · mse(real_out, 1) + fake_weight · mse(fake_out, 0)``.

    Args:
        real_out: raw D outputs on real images (any shape).
        fake_out: raw D outputs on generated images (any shape).
        real_weight: weight of the real term (code: 5 for D_X, §6.1.3).
        fake_weight: weight of the fake term (code: 3 for D_X).

    Returns:
        Scalar loss.
    """
    return real_weight * mse(real_out, 1.0) + fake_weight * mse(fake_out, 0.0)


def lsgan_g_loss(fake_out: jax.Array) -> jax.Array:
    """Compute the least-squares GAN generator loss ``mse(D(fake), 1)`` (scalar)."""
    return mse(fake_out, 1.0)


def _check_segmentation_inputs(
    logits: jax.Array,
    labels: jax.Array,
    num_classes: int,
    class_weights: Sequence[float] | jax.Array | None,
) -> None:
    """Check shapes shared by the segmentation losses (static, so free under jit)."""
    if logits.shape[-1] != num_classes:
        raise ValueError(f"logits have {logits.shape[-1]} channels, expected {num_classes}.")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {labels.shape} does not match logits {logits.shape}.")
    if class_weights is not None and len(class_weights) != num_classes:
        raise ValueError(f"{len(class_weights)} class weights given for {num_classes} classes.")


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    class_weights: Sequence[float] | jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Compute per-pixel softmax cross-entropy, weighted-averaged over all pixels of the batch.

    Each pixel's weight is ``class_weights[label] · mask``; the loss is Σ w·CE / Σ w over
    (B, H, W). Without weights and mask it is the plain mean; class weights re-balance classes
    without changing the loss scale (PyTorch's ``CrossEntropyLoss(weight=...)`` convention).

    Args:
        logits: (B, H, W, C) unnormalised scores.
        labels: (B, H, W) integer class indices in [0, C).
        num_classes: C; checked against ``logits``.
        class_weights: optional length-C weights.
        mask: optional (B, H, W) weights in [0, 1] (1 = pixel counts); ``None`` = all pixels.

    Returns:
        Scalar loss (0 if every pixel has zero weight).
    """
    _check_segmentation_inputs(logits, labels, num_classes, class_weights)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    labels = labels.astype(jnp.int32)
    nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    weights = jnp.ones_like(nll)
    if class_weights is not None:
        weights = jnp.asarray(class_weights, jnp.float32)[labels]
    if mask is not None:
        weights = weights * mask.astype(jnp.float32)
    axes = _all_axes(nll)
    total_weight = jnp.sum(weights, axis=axes)
    return jnp.sum(weights * nll, axis=axes) / jnp.maximum(total_weight, 1e-12)


def soft_dice_loss(
    probs: jax.Array,
    labels_onehot: jax.Array,
    *,
    eps: float = 1.0,
    exclude_background: bool = True,
) -> jax.Array:
    """Compute 1 − the mean over images and classes of the per-image, per-class soft Dice.

    For image b and class c, Dice = (2·Σ_hw p·y + eps) / (Σ_hw p + Σ_hw y + eps). The sums run
    over the spatial axes of each image separately, never over the batch (cf. METHOD §11.7), so
    the loss does not depend on how a batch is split across devices. With ``eps > 0`` a class
    absent from both prediction and target scores 1 (no penalty).

    Args:
        probs: (B, H, W, C) class probabilities (e.g. softmax of logits).
        labels_onehot: (B, H, W, C) one-hot targets.
        eps: smoothing added to numerator and denominator.
        exclude_background: drop class 0 from the mean.

    Returns:
        Scalar loss in [0, 1].
    """
    if probs.shape != labels_onehot.shape:
        raise ValueError(f"probs {probs.shape} and labels_onehot {labels_onehot.shape} differ.")
    spatial = tuple(range(1, probs.ndim - 1))
    inter = jnp.sum(probs * labels_onehot, axis=spatial)  # (B, C)
    denom = jnp.sum(probs, axis=spatial) + jnp.sum(labels_onehot, axis=spatial)  # (B, C)
    dice = (2.0 * inter + eps) / (denom + eps)
    if exclude_background:
        dice = dice[:, 1:]
    return 1.0 - jnp.mean(dice, axis=(0, 1))


def class_weighted_mse(
    probs: jax.Array,
    targets: jax.Array,
    *,
    class_weights: Sequence[float] | jax.Array,
) -> jax.Array:
    """Compute the code's class-weighted MSE, Σ_k w_k · mse(targets[..., k], probs[..., k]).

    Each channel's mse averages over all other axes (B, H, W), since the code calls its mse_loss
    on one channel slice at a time; the channel terms are then summed (not averaged) with the
    weights. This is both the lesion processors' training loss (METHOD §6.3) and the generator's
    lesion-guidance term L_les (§6.1.3).

    Args:
        probs: (B, H, W, C) per-channel probabilities (the code: independent sigmoids).
        targets: (B, H, W, C) one-hot labels.
        class_weights: length-C weights, e.g. :data:`PARITY_SEG_CLASS_WEIGHTS`.

    Returns:
        Scalar loss.
    """
    if probs.shape != targets.shape:
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} differ.")
    if len(class_weights) != probs.shape[-1]:
        raise ValueError(f"{len(class_weights)} class weights given for {probs.shape[-1]} channels.")
    non_channel = tuple(range(probs.ndim - 1))
    per_channel = jnp.mean(jnp.square(targets - probs), axis=non_channel)  # (C,)
    return jnp.sum(jnp.asarray(class_weights, per_channel.dtype) * per_channel, axis=0)


def segmentation_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    kind: str,
    num_classes: int,
    dice_weight: float = 1.0,
    class_weights: Sequence[float] | jax.Array | None = None,
) -> jax.Array:
    """Compute the loss of a lesion segmentor (lesion processor) from its logits.

    Kinds:
        * ``"cross_entropy"``: :func:`softmax_cross_entropy` with ``class_weights``.
        * ``"cross_entropy_dice"``: the above + ``dice_weight`` · :func:`soft_dice_loss` of the
          softmax (background excluded, eps 1).
        * ``"weighted_mse_parity"``: the authors' loss (METHOD §6.3): an independent sigmoid per
          channel and :func:`class_weighted_mse` against one_hot(labels). code_demo's weights are
          :data:`PARITY_SEG_CLASS_WEIGHTS` and must be passed explicitly (``None`` means all
          ones, which no authors' run used). The code's segmentor applies instance norm and then
          a sigmoid to its output conv; a :class:`~synth.models.unet.UNet` with
          ``norm_output=True, out_activation="none"`` returns exactly the pre-sigmoid values, so
          this kind matches the code. The older runs' extra ``5·mse(l/4, argmax/4)`` term is
          left out: argmax has no gradient, so that term only shifts the logged value.

    For every kind the prediction is the argmax over channels (for the sigmoid kind, the argmax
    of the logits equals the argmax of the sigmoids).

    Args:
        logits: (B, H, W, C) unnormalised outputs.
        labels: (B, H, W) integer labels in [0, C).
        kind: one of :data:`SEGMENTATION_LOSS_KINDS`.
        num_classes: C.
        dice_weight: weight of the Dice term (``"cross_entropy_dice"`` only).
        class_weights: optional length-C class weights, used by every kind (``None`` = uniform).

    Returns:
        Scalar loss.

    Raises:
        ValueError: unknown ``kind`` or inconsistent shapes.
    """
    if kind not in SEGMENTATION_LOSS_KINDS:
        raise ValueError(f"Unknown segmentation loss kind {kind!r}; valid: {SEGMENTATION_LOSS_KINDS}.")
    _check_segmentation_inputs(logits, labels, num_classes, class_weights)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if kind == "weighted_mse_parity":
        weights = (1.0,) * num_classes if class_weights is None else class_weights
        probs = jax.nn.sigmoid(logits.astype(jnp.float32))
        return class_weighted_mse(probs, onehot, class_weights=weights)
    loss = softmax_cross_entropy(logits, labels, num_classes=num_classes, class_weights=class_weights)
    if kind == "cross_entropy_dice":
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        loss = loss + dice_weight * soft_dice_loss(probs, onehot)
    return loss
