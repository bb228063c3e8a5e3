"""Numbers of the method that differ per dataset or design, which the configs hand to the library.

`synth` holds no dataset facts: a config file puts these rows into the config, and the stages read them
from there (`config.structure.extraction`, `config.structure.loss.weights`, `config.synthesis.ecai`).

- `EXTRACTION`: the structure-map and organ-mask extraction parameters of METHOD §3.3 per dataset
  (`synth.extraction.ExtractionParams`' fields), plus the tuned phantom row;
- `STAGE_A_CODE_WEIGHTS`, `STAGE_A_PAPER_WEIGHTS`: stage A's loss weights (§5.2), the authors' code and the
  paper's unit weights (`synth.structure_losses`);
- `ECAI_CODE_WEIGHTS`: the old encoder/decoder design's extra terms (§6.7, `synth.ecai_losses`).
"""

import ml_collections

# Per-dataset values exactly as METHOD §3.3 (code_demo), plus the tuned phantom entry.
# fmt: off
EXTRACTION: dict[str, dict] = {
    "brats2015": dict(
        alpha=0.035, sigma1=0.01, sigma2=0.01, beta=0.0, median_s=5,
        gamma=0.30, expand=10, median_m=5, size=(184, 144), channel=0,
    ),
    "drive_fire": dict(
        alpha=0.014, sigma1=0.4, sigma2=0.3, beta=0.05, median_s=5,
        gamma=0.30, expand=10, median_m=17, size=(512, 512), channel="all",
    ),
    "chest_xray": dict(
        alpha=0.009, sigma1=0.4, sigma2=0.5, beta=0.05, median_s=3,
        gamma=0.15, expand=2, median_m=17, size=(1500, 1500), channel=0,
    ),
    "lung_ct": dict(
        alpha=0.0125, sigma1=0.4, sigma2=0.3, beta=0.05, median_s=7,
        gamma=0.48, expand=2, median_m=3, size=(512, 512), channel=0,
    ),
    "tianchi": dict(
        alpha=0.0125, sigma1=0.4, sigma2=0.3, beta=0.05, median_s=5,
        gamma=0.48, expand=2, median_m=3, size=(512, 512), channel="each",
    ),
    # Tuned by eye on phantom/default (128²) and phantom/demo (64²) T1 slices. Unlike BRATS the phantom
    # is not skull-stripped, so the organ is the whole head: the skull is as dark as the Rician noise
    # floor (~0.05), so γ = 0.06 with a 7×7 median gives a solid head (γ ≥ 0.1 cuts the skull ring
    # out of the mask). Its noise makes α = 0.035 mark ~20% of pixels; α = 0.09 keeps the scalp/skull
    # layers, ventricles, fissure and grey/white boundaries (~14%). p = 4 (BRATS' 10 at 184 px
    # overshoots at 64 px). "background" border: the head nearly touches the edge at 64², and the
    # authors' zero padding would then grow a stalk of mask out to the border. size=None: the phantom
    # is extracted at whatever size it was built.
    "phantom": dict(
        alpha=0.09, sigma1=0.01, sigma2=0.01, beta=0.0, median_s=3,
        gamma=0.06, expand=4, median_m=7, size=None, channel=0, mask_border="background",
    ),
}
# fmt: on
# ExtractionParams' fields that a row may leave at their defaults.
EXTRACTION_DEFAULTS = dict(blur_kind="tf_replica", size=None, channel=0, mask_border="authors")


def extraction(dataset: str, **overrides) -> ml_collections.ConfigDict:
    """`config.structure.extraction` for `dataset`: its row of `EXTRACTION`, every field spelled out.

    Args:
      dataset: a key of `EXTRACTION`.
      **overrides: fields to change (e.g. `size=None` to extract at the image's own size).

    Raises:
      ValueError: an unknown dataset (naming the known ones) or field.
    """
    if dataset not in EXTRACTION:
        raise ValueError(f"No extraction parameters for {dataset!r}. Known: {', '.join(sorted(EXTRACTION))}.")
    row = {**EXTRACTION_DEFAULTS, **EXTRACTION[dataset]}
    unknown = sorted(set(overrides) - set(row))
    if unknown:
        raise ValueError(f"Unknown extraction field(s) {unknown}; the fields are {sorted(row)}")
    return ml_collections.ConfigDict({**row, **overrides})


# The authors' stage-A weights (METHOD §5.2, code_demo GET_S_AND_MASK), the default. For the TC lung CT set
# both edge-density weights to 0: its code has no such terms. The code has no KL term (§11.11).
STAGE_A_CODE_WEIGHTS = {
    "g_code_adv": 0.001,
    "code_mean": 0.001,
    "code_std": 0.001,
    "code_kl": 0.0,
    "g_map_adv": 0.1,
    "recon_l2": 25.0,
    "recon_l1": 10.0,
    "edge_density_recon": 1e-4,
    "edge_density_gen": 1e-4,
    "mask_exclusion_recon": 1.0,
    "mask_exclusion_gen": 1.0,
    "mask_recon": 15.0,
    "d_code_real": 10.0,
    "d_code_fake": 10.0,
    "d_map_real": 25.0,
    "d_map_fake": 25.0,
}

# The thesis/ICANN losses with unit weights (§5.2 [PAPER]): L_m, L_r = ‖s − s_r‖² + ‖m ⊙ s_r‖², the LSGAN
# code losses L_{d,z}, L_{g,z}, L_{d,s}, and L_{g,s} = ‖D_s(s_g) − 1‖² + ‖m_g ⊙ s_g‖². Terms the paper
# does not have (L1, moment losses, edge density, KL) get 0.
STAGE_A_PAPER_WEIGHTS = {
    "g_code_adv": 1.0,
    "code_mean": 0.0,
    "code_std": 0.0,
    "code_kl": 0.0,
    "g_map_adv": 1.0,
    "recon_l2": 1.0,
    "recon_l1": 0.0,
    "edge_density_recon": 0.0,
    "edge_density_gen": 0.0,
    "mask_exclusion_recon": 1.0,
    "mask_exclusion_gen": 1.0,
    "mask_recon": 1.0,
    "d_code_real": 1.0,
    "d_code_fake": 1.0,
    "d_map_real": 1.0,
    "d_map_fake": 1.0,
}

# §6.7's weights of the old design's extra terms, from the code (`synth.ecai_losses.ECAI_TERMS`).
ECAI_CODE_WEIGHTS = dict(
    synthetic_background=1.5,
    translation_adversarial=5.0,
    translation_category=50.0,
    code_adversarial=4.0,
    code_adversarial_real=1.0,
    real_reconstruction=5.0,
    real_reconstruction_background=0.5,
    real_translation_background=1.0,
    cycle=10.0,
    cycle_agreement=2.0,
    semantic_synthetic=1.0,
    semantic_synthetic_agreement=0.2,
    semantic_translation=5.0,
    semantic_translation_agreement=1.0,
    d_translation=5.0,
    d_code_fake=4.0,
    d_code_real=1.0,
)
