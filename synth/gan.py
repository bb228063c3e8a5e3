"""The adversarial and category terms that the G/D stages share (translator, stage B, its old design).

Outputs of discriminators travel "by modality", with a leading axis K (see `synth.registration`), and the
terms are the code's sums over modalities of per-modality means (§6.1.3, §6.2), so the config's weights
mean what the authors' weights mean. Every adversarial term is least squares (targets 1 real, 0 fake).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from synth import losses

CATEGORY_KINDS = ("index_mse", "cross_entropy")


def judged_once(judge: Callable) -> Callable:
    """`judge(params, images, rng)` computed once and returned twice, for a G/D step in one backward pass.

    `both(params, images, rng) -> (for_g, for_d)`: two copies of D's output on the fakes. Gradients reach
    the images (and so G) only through `for_g`, and D's parameters only through `for_d`, as if G's loss
    judged the fakes with frozen D and D's loss judged `stop_gradient(fakes)`; but the forward pass (and
    its saved activations) is shared, where the two losses' separate passes ran D on the fakes twice.
    The two pullbacks each need only half of D's backward pass (input or parameter gradients); XLA drops
    the other half of each as dead code.
    """

    @jax.custom_vjp
    def both(params, images, rng):
        out = judge(params, images, rng)
        return out, out

    def forward(params, images, rng):
        out, pullback = jax.vjp(lambda p, x: judge(p, x, rng), params, images)
        return (out, out), pullback

    def backward(pullback, cotangents):
        for_g, for_d = cotangents
        _, images_grad = pullback(for_g)
        params_grad, _ = pullback(for_d)
        return params_grad, images_grad, None  # The key takes no gradient.

    both.defvjp(forward, backward)
    return both


def per_modality_mse(out: jax.Array, value: float) -> jax.Array:
    """Σ_j mse(out[j], value) for outputs (K, …) grouped by modality, e.g. LSGAN targets of D maps."""
    return jnp.sum(jnp.mean(jnp.square(out - value), axis=tuple(range(1, out.ndim))))


def category_loss(category_out: jax.Array, index: jax.Array, *, kind: str, num_modalities: int) -> jax.Array:
    """The ACGAN category term of a batch whose images all belong to modality `index` (a scalar or (B,)).

    Kinds (§4.2, §11.15): `index_mse`, the authors' 1-channel map regressed to the modality index;
    `cross_entropy`, a K-channel map with softmax cross-entropy per patch.
    """
    del num_modalities  # The K-channel map carries K itself.
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


def category_sum(category: jax.Array | None, *, kind: str, num_modalities: int) -> jax.Array:
    """Σ_j category_loss(category[j], j) for category maps (K, N, h, w, c); 0 without a category head."""
    if category is None:
        return jnp.zeros((), jnp.float32)
    return sum(
        category_loss(category[j], j, kind=kind, num_modalities=num_modalities) for j in range(num_modalities)
    )


def discriminator_terms(d_real: jax.Array, d_fake: jax.Array, category: jax.Array) -> dict[str, jax.Array]:
    """D's LSGAN terms on its real and fake maps (K, …), the category sum, and its accuracy (logged)."""
    return {
        "d_real": per_modality_mse(d_real, 1.0),
        "d_fake": per_modality_mse(d_fake, 0.0),
        "d_category": category,
        "d_accuracy": 0.5 * (jnp.mean(d_real > 0.5) + jnp.mean(d_fake < 0.5)),
    }


def weighted_sum(weights, terms: dict[str, jax.Array], names: Iterable[str]) -> jax.Array:
    """Σ weights[name] · terms[name] over `names`."""
    return sum(weights[name] * terms[name] for name in names)


def check_loss_weights(section: str, weights, terms: tuple[str, ...], *, where: str = "") -> None:
    """Raises a ValueError naming `config.<section>.loss.weights` (or `where`) if its terms differ."""
    unknown, missing = sorted(set(weights) - set(terms)), sorted(set(terms) - set(weights))
    if unknown or missing:
        raise ValueError(
            f"{where or f'config.{section}.loss.weights'}: unknown terms {unknown}, missing terms {missing}; "
            f"the terms are {terms}"
        )
