"""The extra losses of the earlier encoder/decoder design (METHOD §6.7), `config.synthesis.design="ecai"`.

Stage B's trainer computes what both designs share (adversarial and category terms on the synthetic
images, lesion guidance through the frozen segmentors, the loop, the evaluation). This module adds what
only the old design has, all from its own networks (`synth.models.ecai`): there is no frozen translator;
EC_M and DC_M translate, and are trained on real images at the same time:

* **synthetic registration**: the synthetic images' translations x_gt,j→i = DC_M([EC_M(x_g,j), c_i])
  against x_g,i and each other (the shared `registration` and `agreement` terms, so their weights live
  with the method's), and their background;
* **real reconstruction, translation and cycle** on real images: x_r,i = DC_M([EC_M(x_i), c_i]),
  x_t,i→j, x_rc,i→j→i, and their backgrounds; the translations also face D_M (with their category);
* **codes**: FD_R tells the fusion map's code EC_R(f) from real images' codes EC_M(x_i);
* **semantic consistency**: the synthetic images' codes match the fusion code and each other, the
  translations' codes match their source's code and each other.

The real images of each modality are taken from differently rolled batch rows, so the real-data losses
never see registered pairs: the authors drew x, y, z, w from independently shuffled lists. The authors'
structure-consistency terms are left out: their thresholded Sobel maps carry no gradient (§6.7).
Weights are `config.synthesis.ecai.weights` (the code's, §6.7, handed in by the config); D's extra terms
are `ECAI_D_TERMS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from synth import gan, registration

# G's extra terms (weights in config.synthesis.ecai.weights, with D's extra terms).
ECAI_G_TERMS = (
    "synthetic_background",  # 1.5: mean((x_g ⊙ M)²) and mean((x_gt ⊙ M)²), M = 1 − organ.
    "translation_adversarial",  # 5: D_M(x_t,j→i) → 1.
    "translation_category",  # 50: category of x_t,j→i → i.
    "code_adversarial",  # 4: FD_R(EC_R(f)) → 1.
    "code_adversarial_real",  # 1: FD_R(EC_M(x_i)) → 0.
    "real_reconstruction",  # 5: mse(x_i, x_r,i).
    "real_reconstruction_background",  # 0.5: mean((x_r,i ⊙ M_i)²).
    "real_translation_background",  # 1: mean((x_t,i→j ⊙ M_i)²).
    "cycle",  # 10: mse(x_i, x_rc,i→j→i).
    "cycle_agreement",  # 2: cycles of the same source agree.
    "semantic_synthetic",  # 1: mse(EC_R(f), EC_M(x_g,i)).
    "semantic_synthetic_agreement",  # 0.2: mse(EC_M(x_g,i), EC_M(x_g,j)).
    "semantic_translation",  # 5: mse(EC_M(x_i), EC_M(x_t,i→j)).
    "semantic_translation_agreement",  # 1: codes of translations of the same source agree.
)
ECAI_D_TERMS = (
    "d_translation",  # 5: D_M(x_t,j→i) → 0.
    "d_code_fake",  # 4: FD_R(EC_R(f)) → 0.
    "d_code_real",  # 1: FD_R(EC_M(x_i)) → 1.
)
ECAI_TERMS = ECAI_G_TERMS + ECAI_D_TERMS


class Networks(NamedTuple):
    """The design's network calls, parameters first (stage B wraps each for its compute dtype)."""

    encode_fusion: Callable  # (g_params, fusion maps (N, H, W, C_in)) -> codes, EC_R.
    encode_image: Callable  # (g_params, images (N, H, W, C)) -> codes, EC_M.
    decode: Callable  # (g_params, codes, one-hot conditions (N, K)) -> images (N, H, W, C), DC_M.
    judge_code: Callable  # (d_params, codes) -> FD_R's raw score maps.
    discriminate: Callable  # (d_params, images (K, N, H, W, C), key) -> D_M's (real/fake, category) maps.


def unpaired(x: jax.Array) -> jax.Array:
    """(K, B, …) with modality i's rows rolled by i: no row holds a registered set (the authors' lists)."""
    return jnp.stack([jnp.roll(x[i], i, axis=0) for i in range(x.shape[0])])


def by_source(translations: jax.Array) -> jax.Array:
    """`translate_pairs`' (K targets, K−1, …) regrouped as (K sources, K−1 targets, …)."""
    sources = registration.pair_sources(translations.shape[0])
    where = [np.argwhere(sources == i) for i in range(translations.shape[0])]
    return translations[np.stack([w[:, 0] for w in where]), np.stack([w[:, 1] for w in where])]


def _sum_of_means(x: jax.Array, lead: int) -> jax.Array:
    """Σ over the first `lead` axes of the mean of x² over the rest."""
    return jnp.sum(jnp.mean(jnp.square(x), axis=tuple(range(lead, x.ndim))))


def generator_terms(
    g_params,
    d_params,
    g_input: jax.Array,
    fakes: jax.Array,
    real: jax.Array,
    organ: jax.Array,
    d_key: jax.Array,
    *,
    nets: Networks,
    category_kind: str,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The old design's G terms (`ECAI_G_TERMS` plus `registration` and `agreement`), and D's inputs.

    Args:
      g_input: (B, H, W, C_in) the fusion maps f the fakes were made from.
      fakes: (K, B, H, W, C) x_g = DC_M([EC_R(f), c]).
      real: (K, B, H, W, C) the batch's real images by modality (registered; unpaired here).
      organ: (B, H, W, 1) the batch's organ masks.
      nets: the networks' calls.

    Returns:
      `(terms, for_d)`: `for_d` holds what D's extra terms judge (gradients stopped by the caller):
      the real translations and the codes.
    """
    k, b = real.shape[:2]
    encode = lambda x: nets.encode_image(g_params, x)  # noqa: E731
    decode = lambda z, c: nets.decode(g_params, z, c)  # noqa: E731
    judge_code = lambda z: nets.judge_code(d_params, z)  # noqa: E731
    background = 1.0 - organ  # (B, H, W, 1)

    # Synthetic registration: the fakes' translations by the design's own EC_M/DC_M, each fake encoded once.
    synthetic_codes = encode(registration.flat(fakes))
    synthetic_codes = registration.unflat(synthetic_codes, fakes.shape[:2])
    synthetic_t = registration.translate_pairs(
        registration.tiled(decode), synthetic_codes
    )  # (K, K−1, B, H, W, C)
    terms = {
        "registration": registration.registration_loss(fakes, synthetic_t),
        "agreement": registration.agreement_loss(synthetic_t),
        "synthetic_background": _sum_of_means(fakes * background, 1)
        + _sum_of_means(synthetic_t * background, 2),
    }

    # Real reconstruction, translation and cycle, on unpaired real images.
    x = unpaired(real)
    real_background = unpaired(jnp.broadcast_to(background[None], (k,) + background.shape))
    codes = encode(registration.flat(x))
    codes = registration.unflat(codes, (k, b))
    reconstructions = registration.unflat(
        decode(registration.flat(codes), registration.modality_conditions(np.arange(k), b, k)), (k, b)
    )
    translations = registration.translate_pairs(
        registration.tiled(decode), codes
    )  # Decoded from the codes just computed.
    translation_codes = registration.unflat(encode(registration.flat(translations)), translations.shape[:3])
    sources = registration.pair_sources(k)
    cycled = registration.unflat(
        decode(
            registration.flat(translation_codes),
            registration.modality_conditions(sources.reshape(-1), b, k),
        ),
        translations.shape[:3],
    )
    terms["real_reconstruction"] = _sum_of_means(reconstructions - x, 1)
    terms["real_reconstruction_background"] = _sum_of_means(reconstructions * real_background, 1)
    terms["real_translation_background"] = _sum_of_means(translations * real_background[sources], 2)
    terms["cycle"] = registration.cycle_loss(x, cycled)
    terms["cycle_agreement"] = registration.agreement_loss(by_source(cycled))

    # The translations face D_M as modality j's images.
    d_t, c_t = nets.discriminate(d_params, registration.by_target(translations), d_key)
    terms["translation_adversarial"] = gan.per_modality_mse(d_t, 1.0)
    terms["translation_category"] = gan.category_sum(c_t, kind=category_kind, num_modalities=k)

    # Codes: FD_R, and semantic consistency.
    fusion_code = nets.encode_fusion(g_params, g_input)  # (B, h, w, c)
    terms["code_adversarial"] = jnp.mean(jnp.square(judge_code(fusion_code) - 1.0))
    terms["code_adversarial_real"] = gan.per_modality_mse(
        registration.unflat(judge_code(registration.flat(codes)), (k, b)).reshape((k, b, -1)), 0.0
    )
    terms["semantic_synthetic"] = _sum_of_means(synthetic_codes - fusion_code[None], 1)
    terms["semantic_synthetic_agreement"] = registration.agreement_loss(synthetic_codes[None])
    terms["semantic_translation"] = _sum_of_means(translation_codes - codes[sources], 2)
    terms["semantic_translation_agreement"] = registration.agreement_loss(by_source(translation_codes))
    for_d = {"translations": translations, "fusion_code": fusion_code, "image_codes": codes}
    return terms, for_d


def discriminator_terms(
    d_params, for_d: dict[str, jax.Array], d_key: jax.Array, *, nets: Networks
) -> dict[str, jax.Array]:
    """D's extra terms (`ECAI_D_TERMS`): real translations are fakes to D_M; FD_R tells codes apart."""
    translations = for_d["translations"]
    d_t, _ = nets.discriminate(d_params, registration.by_target(translations), d_key)
    judge_code = lambda z: nets.judge_code(d_params, z)  # noqa: E731
    codes = for_d["image_codes"]
    return {
        "d_translation": gan.per_modality_mse(d_t, 0.0),
        "d_code_fake": jnp.mean(jnp.square(judge_code(for_d["fusion_code"]))),
        "d_code_real": gan.per_modality_mse(
            registration.unflat(judge_code(registration.flat(codes)), codes.shape[:2]).reshape(
                codes.shape[:2] + (-1,)
            ),
            1.0,
        ),
    }
