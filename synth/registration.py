"""Modality pairs, batched translation and the registration-type losses of stage B (METHOD §6.1-6.2).

Images of K modalities travel "by modality": an array (K, B, H, W, C) whose leading axis is the modality.
The K·(K−1) ordered pairs (i → j, i ≠ j) are grouped by target j, so the translations of a batch reshape to
(K, K−1, B, H, W, C): every source that was translated into modality j, side by side. One call of the
translator makes all of them (K·(K−1)·B images), as METHOD §12 asks; for K = 4 these are the 12
translations of the paper.

Losses are the code's sums of per-pair mean squared errors (§6.1.3, §6.2), so the weights of the config
mean what the authors' weights mean.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from synth import losses, optim

CATEGORY_KINDS = ("index_mse", "cross_entropy")


def ordered_pairs(num_modalities: int) -> tuple[tuple[int, int], ...]:
    """All (source, target) pairs with source ≠ target, grouped by target: (1,0), (2,0), (3,0), (0,1)…."""
    k = num_modalities
    return tuple((i, j) for j in range(k) for i in range(k) if i != j)


def by_modality(images: jax.Array, channels: int = 1) -> jax.Array:
    """(B, H, W, K·C) -> (K, B, H, W, C): modality-major, C channels each (C = 3 for RGB retina)."""
    b, h, w, kc = images.shape
    if kc % channels:
        raise ValueError(f"{kc} image channels do not split into modalities of {channels} channels")
    return jnp.moveaxis(images.reshape(b, h, w, kc // channels, channels), 3, 0)


def channels_last(x: jax.Array) -> jax.Array:
    """(K, B, H, W, C) -> (B, H, W, K·C); the inverse of `by_modality`."""
    k, b, h, w, c = x.shape
    return jnp.moveaxis(x, 0, 3).reshape(b, h, w, k * c)


def modality_conditions(targets: np.ndarray | jax.Array, batch: int, num_modalities: int) -> jax.Array:
    """One-hot conditions (len(targets)·batch, K), target-major, for a flattened (targets, batch) input."""
    return jax.nn.one_hot(jnp.repeat(jnp.asarray(targets), batch), num_modalities, dtype=jnp.float32)


def translate_pairs(translate: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Translates every modality into every other one in one batched call.

    Args:
      translate: `(images (N, H, W, C), one-hot targets (N, K)) -> (N, H, W, C)`, e.g. G_t's apply.
      x: (K, B, H, W, C) images by modality.

    Returns:
      (K, K−1, B, H, W, C): `out[j, n]` is the n-th source (in `ordered_pairs` order) translated into j.
    """
    k, b = x.shape[:2]
    pairs = ordered_pairs(k)
    sources = np.array([i for i, _ in pairs])
    targets = np.array([j for _, j in pairs])
    flat = x[sources].reshape((len(pairs) * b,) + x.shape[2:])
    out = translate(flat, modality_conditions(targets, b, k))
    return out.reshape((k, k - 1, b) + out.shape[1:])


def pair_sources(num_modalities: int) -> np.ndarray:
    """(K, K−1) source index of each translation in `translate_pairs`'s output."""
    pairs = ordered_pairs(num_modalities)
    return np.array([i for i, _ in pairs]).reshape(num_modalities, num_modalities - 1)


def registration_loss(images: jax.Array, translations: jax.Array) -> jax.Array:
    """Σ_j Σ_{i≠j} mse(x_j, x_{i→j}): every translation into j should equal modality j (12 terms for K=4).

    Args:
      images: (K, B, H, W, C) images by modality.
      translations: (K, K−1, B, H, W, C) from `translate_pairs`.
    """
    per_pair = jnp.mean(jnp.square(translations - images[:, None]), axis=tuple(range(2, translations.ndim)))
    return jnp.sum(per_pair)


def agreement_loss(translations: jax.Array) -> jax.Array:
    """Σ_j Σ_{i<k; i,k≠j} mse(x_{i→j}, x_{k→j}): translations into one modality agree (12 terms for K=4)."""
    m = translations.shape[1]
    total = jnp.zeros((), jnp.float32)
    for a in range(m):
        for b in range(a + 1, m):
            diff = translations[:, a] - translations[:, b]
            total = total + jnp.sum(jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim))))
    return total


def cycle_loss(images: jax.Array, cycled: jax.Array) -> jax.Array:
    """Σ_{i≠j} mse(x_i, x_{i→j→i}).

    Args:
      images: (K, B, H, W, C).
      cycled: (K, K−1, B, H, W, C), `cycled[j, n]` = the n-th source of j translated to j and back.
    """
    k = images.shape[0]
    originals = images[pair_sources(k)]
    return jnp.sum(jnp.mean(jnp.square(cycled - originals), axis=tuple(range(2, cycled.ndim))))


def translate_back(translate: Callable[[jax.Array, jax.Array], jax.Array], translations: jax.Array):
    """Translates each `translate_pairs` output back into its source modality (one batched call)."""
    k, m, b = translations.shape[:3]
    sources = pair_sources(k).reshape(-1)
    flat = translations.reshape((k * m * b,) + translations.shape[3:])
    out = translate(flat, modality_conditions(sources, b, k))
    return out.reshape(translations.shape)


def category_loss(category_out: jax.Array, index: jax.Array, *, kind: str, num_modalities: int) -> jax.Array:
    """The ACGAN category term of a batch whose images all belong to modality `index` (a scalar or (B,)).

    Kinds (§4.2, §11.15): `index_mse`, the authors' 1-channel map regressed to the modality index;
    `cross_entropy`, a K-channel map with softmax cross-entropy per patch.
    """
    index = jnp.asarray(index)
    if kind == "index_mse":
        target = jnp.broadcast_to(index.reshape(index.shape + (1,) * (4 - index.ndim)), category_out.shape)
        return losses.mse(category_out, target.astype(category_out.dtype))
    if kind == "cross_entropy":
        target = jnp.broadcast_to(
            index.reshape(index.shape + (1,) * (3 - index.ndim)), category_out.shape[:3]
        )
        log_probs = jax.nn.log_softmax(category_out.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(log_probs, target[..., None].astype(jnp.int32), axis=-1)
        return -jnp.mean(picked)
    raise ValueError(f"Unknown category loss kind {kind!r}; choose one of {CATEGORY_KINDS}")


def category_channels(kind: str, num_modalities: int) -> int:
    """Channels of the discriminator's category head for `kind`."""
    if kind not in CATEGORY_KINDS:
        raise ValueError(f"Unknown category loss kind {kind!r}; choose one of {CATEGORY_KINDS}")
    return 1 if kind == "index_mse" else num_modalities


def predicted_category(category_out: jax.Array, *, kind: str) -> jax.Array:
    """(B,) modality index each image's category map points to (for the D accuracy metric)."""
    if kind == "index_mse":
        return jnp.round(jnp.mean(category_out, axis=(1, 2, 3))).astype(jnp.int32)
    return jnp.argmax(jnp.mean(category_out, axis=(1, 2)), axis=-1).astype(jnp.int32)


def flat(x: jax.Array) -> jax.Array:
    """Merges every leading axis before (H, W, C) into one batch axis."""
    return x.reshape((-1,) + x.shape[-3:])


def per_modality_mse(out: jax.Array, value: float) -> jax.Array:
    """Σ_j mse(out[j], value) for outputs (K, …) grouped by modality, e.g. LSGAN targets of D maps."""
    return jnp.sum(jnp.mean(jnp.square(out - value), axis=tuple(range(1, out.ndim))))


def category_sum(category: jax.Array | None, *, kind: str, num_modalities: int) -> jax.Array:
    """Σ_j category_loss(category[j], j) for category maps (K, N, h, w, c); 0 without a category head."""
    if category is None:
        return jnp.zeros((), jnp.float32)
    return sum(
        category_loss(category[j], j, kind=kind, num_modalities=num_modalities) for j in range(num_modalities)
    )


def check_loss_weights(section: str, weights, terms: tuple[str, ...], *, where: str = "") -> None:
    """Raises a ValueError naming `config.<section>.loss.weights` (or `where`) if its terms differ."""
    unknown, missing = sorted(set(weights) - set(terms)), sorted(set(terms) - set(weights))
    if unknown or missing:
        raise ValueError(
            f"{where or f'config.{section}.loss.weights'}: unknown terms {unknown}, missing terms {missing}; "
            f"the terms are {terms}"
        )


def gan_update(state, g_grads, d_grads, *, g_tx, d_tx):
    """Both sides' optimiser updates of a GAN state (fields g_params, d_params, g_opt, d_opt, step)."""
    g_params, g_opt, _ = optim.apply(g_tx, g_grads, state.g_opt, state.g_params)
    d_params, d_opt, _ = optim.apply(d_tx, d_grads, state.d_opt, state.d_params)
    norms = {"g_grad_norm": optax.global_norm(g_grads), "d_grad_norm": optax.global_norm(d_grads)}
    new = state.replace(step=state.step + 1, g_params=g_params, d_params=d_params, g_opt=g_opt, d_opt=d_opt)
    return new, norms
