"""Noise and label fusion, and label placement (METHOD §3.5–3.7): what the generator is fed.

`fuse_noise` fills the organ of a structure map with uniform noise (§3.5), `fuse_label` adds the lesion
label as the configured channels (§3.6), and `label_fits` checks that a label lies inside an organ (§3.7,
pure; `sample_fitting_label` is the host-side rejection sampling around it).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from synth import image_ops

LABEL_FUSION_MODES = ("concat_onehot", "concat_onehot_plus_0.1", "concat_raw", "none", "weighted_sum")
# METHOD §12 spells the [OLD] mode this way in its config list; accept it as a synonym.
_LABEL_FUSION_ALIASES = {"old_weighted_0.8_0.2": "weighted_sum"}
# "none": every label fits, as for X-ray class maps and TC box labels (§3.7) and ablation E (§9.2).
LABEL_FIT_RULES = ("code", "paper", "none")


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
    label = image_ops.label_bhw1(label)
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
    lesion = image_ops.label_bhw1(label) > 0
    inside = organ > 0.5
    if rule == "none":
        return jnp.ones(lesion.shape[:1], bool)
    if rule == "code":
        return ~jnp.any(lesion & ~inside, axis=image_ops.IMAGE_AXES)
    return jnp.any(lesion & inside, axis=image_ops.IMAGE_AXES)


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
