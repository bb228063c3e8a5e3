"""Modality pairs, batched translation and the registration-type losses of stage B (METHOD §6.1-6.2).

Images of K modalities travel "by modality": an array (K, B, H, W, C) whose leading axis is the modality.
The K·(K−1) ordered pairs (i → j, i ≠ j) are grouped by target j, so the translations of a batch reshape to
(K, K−1, B, H, W, C): every source that was translated into modality j, side by side. One call of the
translator makes all of them (K·(K−1)·B images), as METHOD §12 asks; for K = 4 these are the 12
translations of the paper.

Where such leading axes merge into one batch axis for a network call (`flat`, `modality_conditions`), they
merge example-major: one example's images side by side. A batch split over devices (its axis B) then stays
split, each device running the network on its own examples. Merged modality-major, B would be the minor
part of the merged axis, which XLA cannot keep split: it gathers the batch and every device computes all of
it (stage B's step on 4 devices did 3.6× one device's work per device so).

Losses are the code's sums of per-pair mean squared errors (§6.1.3, §6.2), so the weights of the config
mean what the authors' weights mean.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


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
    """One-hot conditions (batch·len(targets), K) for a `flat`-tened (targets, batch) input: example-major."""
    return jax.nn.one_hot(jnp.tile(jnp.asarray(targets), batch), num_modalities, dtype=jnp.float32)


def translate_pairs(
    translate_many: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, *, per_source: bool = False
) -> jax.Array:
    """Translates every modality into every other one, in one batched call or one call per source.

    Each source is handed to the translator once with its K−1 target conditions, so a translator whose
    encoder does not see the condition (G_t with FiLM, `synth.models.unet.apply_per_condition`) encodes
    K images instead of K·(K−1): 4 encoder passes instead of 12 for K = 4.

    Args:
      translate_many: `(images (N, H, W, C), one-hot targets (T, N, K)) -> (T, N, H, W, C)`: the images
        under each of T conditions, e.g. `translator_nets.translate_many`.
      x: (K, B, H, W, C) images by modality.
      per_source: K calls of batch B (each source modality's images) instead of one of batch K·B. The
        same results; on XLA:CPU a frozen translator under differentiation (stage B's registration
        terms) runs faster so, as a batch-1 call's maps fit one Winograd chunk
        (`synth.models.conv`; BENCHMARKS.md, "Decoder paths sharing the skips").

    Returns:
      (K, K−1, B, H, W, C): `out[j, n]` is the n-th source (in `ordered_pairs` order) translated into j.
    """
    k, b = x.shape[:2]
    # Source i's t-th target is the t-th modality other than i.
    targets = np.array([[j for j in range(k) if j != i] for i in range(k)]).T  # (K−1, K)
    if per_source:
        conds = jax.nn.one_hot(jnp.repeat(jnp.asarray(targets), b, axis=1), k, dtype=jnp.float32)
        by_source = conds.reshape((k - 1, k, b, k))
        out = jnp.stack([translate_many(x[i], by_source[:, i]) for i in range(k)], axis=1)
    else:
        # Example-major (`flat`): a batch split over devices stays split (module docstring).
        conds = jax.nn.one_hot(jnp.tile(jnp.asarray(targets), (1, b)), k, dtype=jnp.float32)  # (K−1, B·K, K)
        out = jax.vmap(lambda y: unflat(y, (k, b)))(translate_many(flat(x), conds))  # (K−1, K, B, …)
    # Back to target-major: into j, the sources i ≠ j in order; source i's slot for j is j, or j−1 past i.
    sources = pair_sources(k)
    slots = np.array([[j if j < i else j - 1 for i in row] for j, row in enumerate(sources)])
    return out[slots, sources]


def tiled(
    translate: Callable[[jax.Array, jax.Array], jax.Array],
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A `translate_pairs` translator from a one-condition-per-image call `(x (N, …), cond (N, K))`.

    For a translator whose input meets the condition early (ECAI's decoder takes `[code, c]`) there is no
    encoder pass to share: the T copies of each input are simply stacked into one batched call.
    """

    def translate_many(x: jax.Array, conds: jax.Array) -> jax.Array:
        t, n = conds.shape[:2]
        tiled_x = jnp.broadcast_to(x[None], (t,) + x.shape)
        return unflat(translate(flat(tiled_x), flat(conds, item_ndim=1)), (t, n))

    return translate_many


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


def by_target(translations: jax.Array) -> jax.Array:
    """(K, K−1, B, …) -> (K, B·(K−1), …): every translation into modality j in row j, example-major."""
    return jnp.swapaxes(translations, 1, 2).reshape((translations.shape[0], -1) + translations.shape[3:])


def translate_back(translate: Callable[[jax.Array, jax.Array], jax.Array], translations: jax.Array):
    """Translates each `translate_pairs` output back into its source modality (one batched call)."""
    k, b = translations.shape[0], translations.shape[2]
    out = translate(flat(translations), modality_conditions(pair_sources(k).reshape(-1), b, k))
    return unflat(out, translations.shape[:3])


def flat(x: jax.Array, item_ndim: int = 3) -> jax.Array:
    """Merges the leading axes before each item's into one batch axis, example-major (module docstring).

    Items are images (H, W, C) or, with `item_ndim=1`, conditions (K,). The batch is the last leading
    axis (…, B, H, W, C): item n·M + m of the result is example n's m-th, its other leading axes taken in
    order (M = their product).
    """
    lead = x.ndim - item_ndim
    return jnp.moveaxis(x, lead - 1, 0).reshape((-1,) + x.shape[lead:])


def unflat(y: jax.Array, lead: tuple[int, ...]) -> jax.Array:
    """`flat`'s inverse for a result per image: (N, …) back to `lead` + (…), lead's last axis the batch."""
    y = y.reshape((lead[-1],) + tuple(lead[:-1]) + y.shape[1:])
    return jnp.moveaxis(y, 0, len(lead) - 1)
