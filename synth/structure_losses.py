"""Stage A's loss terms (METHOD §5.2): the structure-map VAE-GAN and the mask generator.

:func:`structure_losses` returns every term by name plus the weighted G and D totals. The weights are the
config's (`config.structure.loss.weights`); the presets (the authors' code weights and the paper's unit
weights) are tables of the configs. Conventions as `synth.losses`: means over all elements, least-squares
adversarial terms.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from synth.losses import lsgan_g_loss, mae, mse


def _all_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim))


# Channel layout: a binary map with S slices, (B, H, W, S), becomes a "paired one-hot" (B, H, W, 2S):
# channel 2k is value 0 of slice k and channel 2k+1 value 1 (`paired_one_hot`). Structure maps (1 = edge)
# give pairs [P(no edge), P(edge)]; organ masks (1 = organ, the project's convention, DATASETS.md) give
# pairs [background, organ]; G_s and G_m output the same layouts. The authors' mask M is 1 = background,
# so their one-hot pairs are [organ, background]: the terms below name the channels they use, and
# `parity=True` reproduces the code's values exactly.

# Generator-side terms (E_s + G_s + G_m) and discriminator-side terms (D_s + D_z), in logging order.
STAGE_A_G_TERMS = (
    "g_code_adv",
    "code_mean",
    "code_std",
    "code_kl",
    "g_map_adv",
    "recon_l2",
    "recon_l1",
    "edge_density_recon",
    "edge_density_gen",
    "mask_exclusion_recon",
    "mask_exclusion_gen",
    "mask_recon",
)
STAGE_A_D_TERMS = ("d_code_real", "d_code_fake", "d_map_real", "d_map_fake")


def paired_one_hot(x: jax.Array) -> jax.Array:
    """One-hot a binary map per slice into channel pairs [value 0, value 1] (METHOD §5.1, S1h / M1h).

    Args:
        x: (..., S) binary map (0/1, any dtype), S slices (1 in general, 3 for the TC lung CT).

    Returns:
        (..., 2S) float32: channel 2k = (x[..., k] == 0), channel 2k + 1 = (x[..., k] == 1).
    """
    onehot = jax.nn.one_hot(x.astype(jnp.int32), 2, dtype=jnp.float32)  # (..., S, 2)
    return onehot.reshape(*x.shape[:-1], 2 * x.shape[-1])


def _split_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split paired channels (..., 2S) into the value-0 and the value-1 channels, (..., S) each."""
    if x.shape[-1] % 2:
        raise ValueError(f"Expected paired channels (an even count), got shape {x.shape}.")
    return x[..., 0::2], x[..., 1::2]


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Compute KL(N(μ, σ²) ‖ N(0, I)), summed over each image's code, averaged over the batch.

    KL_b = ½ Σ_i (μ_bi² + σ_bi² − 1 − log σ_bi²) over the code elements i of image b; the loss is
    mean_b KL_b. The reductions are per image (cf. METHOD §11.7), so the value does not depend on the
    batch size or its split over devices. The authors' code has no KL (§11.11); weight 0 in both presets.

    Args:
        mean: μ, (B, ...) code means.
        logvar: log σ², same shape.

    Returns:
        Scalar (0 for μ = 0, log σ² = 0).
    """
    per_element = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    per_image = jnp.sum(per_element, axis=tuple(range(1, mean.ndim)))
    return jnp.mean(per_image, axis=0)


def code_moment_losses(mean: jax.Array, logvar: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Compute the code's weak prior terms on the encoder's code (METHOD §5.2, §11.11).

    With σ = exp(½ logvar): ``mean_b (mean_i μ_bi − 0)²`` and ``mean_b (mean_i σ_bi − 1)²``. The code
    squares the mean over all elements of one GPU's batch of 1 and averages the 4 towers' gradients,
    i.e. it squares per image and averages over images, as here.

    Args:
        mean: μ, (B, ...) code means.
        logvar: log σ², same shape.

    Returns:
        ``(mean_term, std_term)``, scalars.
    """
    axes = tuple(range(1, mean.ndim))
    mean_term = jnp.mean(jnp.square(jnp.mean(mean, axis=axes)), axis=0)
    std_term = jnp.mean(jnp.square(jnp.mean(jnp.exp(0.5 * logvar), axis=axes) - 1.0), axis=0)
    return mean_term, std_term


def edge_density_bias(structure_probs: jax.Array) -> jax.Array:
    """Compute the code's signed edge-density term ``mean(P(no edge)) − mean(P(edge))`` (METHOD §5.2).

    Un-squared and unbounded below (§11.10): minimising it pushes every pixel towards "edge"; only its
    tiny weight (1e-4) keeps it a bias. Means run over all elements of the respective channels.

    Args:
        structure_probs: (B, H, W, 2S) paired [P(no edge), P(edge)] probabilities (G_s's output).

    Returns:
        Scalar in [−1, 1].
    """
    no_edge, edge = _split_pairs(structure_probs)
    return jnp.mean(no_edge, axis=_all_axes(no_edge)) - jnp.mean(edge, axis=_all_axes(edge))


def mask_exclusion_loss(
    structure_probs: jax.Array, mask_probs: jax.Array, *, parity: bool = False
) -> jax.Array:
    """Penalise edge probability outside the organ (METHOD §5.2, defect §11.10 fixed by default).

    With N = B·H·W·2S (the number of elements of ``structure_probs``), bg = the mask's background
    channels and P_edge = the structure map's edge channels:

    * fixed (default): ``Σ (bg ⊙ P_edge)² / N`` — edges are penalised only on the background;
    * ``parity=True``: ``Σ (bg ⊙ P_edge)² / N + Σ (organ ⊙ P_no_edge)² / N``, which equals the code's
      ``mean((M1h ⊙ ŝ)²)`` with its background-is-1 one-hot M1h (pairs [organ, background]): the
      channel-wise product also pushes P(no edge) down inside the organ (§11.10).

    The fixed term keeps the code's normaliser N, so it is exactly the code's term minus the unintended
    organ part and the code's weight (1) keeps its effect on the intended part.

    Args:
        structure_probs: (B, H, W, 2S) paired [P(no edge), P(edge)] (G_s's output).
        mask_probs: (B, H, W, 2S) paired [background, organ]: ``paired_one_hot(organ_mask)`` for real
            masks or G_m's output for generated ones (two independent sigmoids, not a softmax).
        parity: reproduce the authors' channel-wise version.

    Returns:
        Scalar.
    """
    if structure_probs.shape != mask_probs.shape:
        raise ValueError(f"structure {structure_probs.shape} and mask {mask_probs.shape} shapes differ.")
    no_edge, edge = _split_pairs(structure_probs)
    background, organ = _split_pairs(mask_probs)
    count = structure_probs.size
    loss = jnp.sum(jnp.square(background * edge), axis=_all_axes(edge)) / count
    if parity:
        loss = loss + jnp.sum(jnp.square(organ * no_edge), axis=_all_axes(no_edge)) / count
    return loss


def _weighted_sum(
    terms: Mapping[str, jax.Array], names: Sequence[str], weights: Mapping[str, float]
) -> jax.Array:
    total = jnp.zeros((), jnp.float32)
    for name in names:
        weight = weights[name]
        # Leave out terms switched off by a literal 0: 0·inf = nan (e.g. the KL of an extreme logvar)
        # would otherwise poison the total and its gradient.
        if isinstance(weight, int | float) and weight == 0:
            continue
        total = total + weight * terms[name]
    return total


def structure_losses(
    *,
    structure_onehot: jax.Array,
    mask_onehot: jax.Array,
    recon: jax.Array,
    generated: jax.Array,
    mask_recon: jax.Array,
    mask_generated: jax.Array,
    code_mean: jax.Array,
    code_logvar: jax.Array,
    d_code_prior: jax.Array,
    d_code_posterior: jax.Array,
    d_map_real: jax.Array,
    d_map_fake: jax.Array,
    weights: Mapping[str, float],
    parity: bool = False,
) -> dict[str, jax.Array]:
    """Compute every Stage A loss term of METHOD §5.2 from one forward pass (§5.1).

    Forward pass (§5.1): f = μ + σ ⊙ ε from E_s, ŝ_r = G_s(f), ŝ_g = G_s(z) with z ~ N(0, I),
    m̂_r = G_m(S1h), m̂_g = G_m(ŝ_g), and D_s, D_z applied to (S1h, ŝ_g) and (z, f). Unweighted terms:

    ==========================  =====================================  ==============
    name                        formula                                code weight
    ==========================  =====================================  ==============
    g_code_adv                  mse(D_z(f), 1)                         0.001
    code_mean                   mean_b (mean_i μ_bi)²                  0.001
    code_std                    mean_b (mean_i σ_bi − 1)²              0.001
    code_kl                     mean_b KL(N(μ_b, σ_b²) ‖ N(0, I))      0 (not in code)
    g_map_adv                   mse(D_s(ŝ_g), 1)                       0.1
    recon_l2                    mse(S1h, ŝ_r)                          25
    recon_l1                    mae(S1h, ŝ_r)                          10
    edge_density_recon          mean(ŝ_r[no edge]) − mean(ŝ_r[edge])   1e-4 (TC: 0)
    edge_density_gen            the same for ŝ_g                       1e-4 (TC: 0)
    mask_exclusion_recon        mask_exclusion_loss(ŝ_r, M1h)          1
    mask_exclusion_gen          mask_exclusion_loss(ŝ_g, m̂_g)          1
    mask_recon                  mse(M1h, m̂_r)                          15
    d_code_real                 mse(D_z(z), 1)                         10
    d_code_fake                 mse(D_z(f), 0)                         10
    d_map_real                  mse(D_s(S1h), 1)                       25
    d_map_fake                  mse(D_s(ŝ_g), 0)                       25
    ==========================  =====================================  ==============

    The D terms are the two halves of :func:`synth.losses.lsgan_d_loss`, the G adversarial terms
    :func:`synth.losses.lsgan_g_loss`. No gradient is stopped here: differentiate ``g_loss`` with
    respect to the E_s + G_s + G_m parameters and ``d_loss`` with respect to the D_s + D_z parameters
    (the code steps both optimisers from this one forward pass, §1).

    Args:
        structure_onehot: S1h, (B, H, W, 2S) ``paired_one_hot`` of the real structure map.
        mask_onehot: M1h, (B, H, W, 2S) ``paired_one_hot`` of the real organ mask (1 = organ).
        recon: ŝ_r = G_s(f), (B, H, W, 2S) probabilities.
        generated: ŝ_g = G_s(z), (B, H, W, 2S) probabilities.
        mask_recon: m̂_r = G_m(S1h), (B, H, W, 2S) [background, organ] probabilities.
        mask_generated: m̂_g = G_m(ŝ_g), same layout.
        code_mean: μ from E_s, (B, h, w, c).
        code_logvar: log σ² from E_s, same shape.
        d_code_prior: D_z(z), raw scores.
        d_code_posterior: D_z(f), raw scores.
        d_map_real: D_s(S1h), raw scores.
        d_map_fake: D_s(ŝ_g), raw scores.
        weights: a weight for every name in :data:`STAGE_A_G_TERMS` and :data:`STAGE_A_D_TERMS`, e.g.
            the config's ``config.structure.loss.weights``.
        parity: use the authors' mask-exclusion term (§11.10) instead of the fixed one.

    Returns:
        Every unweighted term by name, plus ``g_loss`` and ``d_loss``, the weighted sums of the G and D
        terms.

    Raises:
        ValueError: a weight missing or unknown, or inconsistent shapes.
    """
    names = (*STAGE_A_G_TERMS, *STAGE_A_D_TERMS)
    missing, unknown = set(names) - set(weights.keys()), set(weights.keys()) - set(names)
    if missing or unknown:
        raise ValueError(f"Stage A weights: missing {sorted(missing)}, unknown {sorted(unknown)}.")
    maps = {"recon": recon, "generated": generated, "mask_onehot": mask_onehot}
    maps |= {"mask_recon": mask_recon, "mask_generated": mask_generated}
    for name, value in maps.items():
        if value.shape != structure_onehot.shape:
            raise ValueError(
                f"{name} shape {value.shape} differs from structure_onehot {structure_onehot.shape}."
            )

    code_mean_term, code_std_term = code_moment_losses(code_mean, code_logvar)
    terms = {
        "g_code_adv": lsgan_g_loss(d_code_posterior),
        "code_mean": code_mean_term,
        "code_std": code_std_term,
        "code_kl": gaussian_kl(code_mean, code_logvar),
        "g_map_adv": lsgan_g_loss(d_map_fake),
        "recon_l2": mse(structure_onehot, recon),
        "recon_l1": mae(structure_onehot, recon),
        "edge_density_recon": edge_density_bias(recon),
        "edge_density_gen": edge_density_bias(generated),
        "mask_exclusion_recon": mask_exclusion_loss(recon, mask_onehot, parity=parity),
        "mask_exclusion_gen": mask_exclusion_loss(generated, mask_generated, parity=parity),
        "mask_recon": mse(mask_onehot, mask_recon),
        "d_code_real": mse(d_code_prior, 1.0),
        "d_code_fake": mse(d_code_posterior, 0.0),
        "d_map_real": mse(d_map_real, 1.0),
        "d_map_fake": mse(d_map_fake, 0.0),
    }
    terms["g_loss"] = _weighted_sum(terms, STAGE_A_G_TERMS, weights)
    terms["d_loss"] = _weighted_sum(terms, STAGE_A_D_TERMS, weights)
    return terms
