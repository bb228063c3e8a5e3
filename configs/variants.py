"""The baselines and ablations of §9.1-9.2 as config overrides of the one trainer (no copied folders).

`variant=<name>` on the phantom and BRATS configs applies one of `VARIANTS` to the method's config: each
is a table of overrides (dotted config key -> value, `overrides`), applied by
`synth.configlib.apply_variant`, which also records `config.variant`. The config keeps the whole table
(`config.compare.variant_overrides`, with `config.compare.variant_descriptions`), so stage `compare`
builds every variant's config from it.

- `full` (= `F`): the method: one G for all K modalities on the noise-fused structure map and the lesion
  label, with every loss.
- `basegan` (= `A`): K separate G/D pairs on image-sized N(0, 1) noise; D 100/70, G 70; no structure map,
  label, G_t or lesion loss.
- `skrgan` (SkrGAN*): K separate G/D pairs on the inverted binary map 1 − s without noise; D 5/3,
  G 3 + 5·mse(x_g, x) in every step; no pre-training, no lesion or registration loss.
- `B`: one G on the raw structure map (no noise); the ACGAN D (5/3/3, category 5); no G_t, label or lesion.
- `C`: B with the noise fusion.
- `D`: C with the frozen G_t: registration 20 and translation agreement 5.
- `E`: D with the lesion label and the frozen segmentors' lesion loss, but no placement check.
- `ecai`: the AAAI/ECAI drafts' design (§6.7): encoders EC_R (fusion map) and EC_M (images), a decoder
  DC_M conditioned at H/4, D_M plus the code discriminator FD_R, trained on generation together with
  reconstruction, translation and cycle on unpaired real images; its own EC_M/DC_M translate for the
  registration terms (no frozen G_t). The fusion map is 0.8·s + 0.2·one_hot(l) without noise; the code's
  weights (D 50/35/50 + 5 on translations, G 35/50, registration 2, agreement 1, the rest in
  `config.synthesis.ecai.weights`); no pre-training, category on real images only (the code). The
  lesion term is the method's (the same frozen segmentors and loss), not the old 4-seg weighted MSE.

Each applies to any dataset config built on the phantom's (BRATS); stage C and D then run on the variant's
generator as on the method's. Where the variant does not use a network (G_t, segmentors) its stage is
skipped or its loss weight is 0, exactly as the method's config switches it off. The authors' BRATS
ablations D–F never give G the label (§3.6); here E and F feed it the way the method does (concatenation,
the paper), so E and F differ only by the placement check (§9.2's note). §11.24's defect (SkrGAN*
unpacking two outputs from single-head discriminators) cannot occur: separate models have single-head Ds
by construction.
"""

from collections.abc import Sequence

# §9.1, BaseGAN (= ablation A): L_D = 100·mse(d(x), 1) + 70·mse(d(x_g), 0); L_G = 70·mse(d(x_g), 1).
BASEGAN_WEIGHTS = dict(g_adversarial=70.0, d_real=100.0, d_fake=70.0)
# §9.1: SkrGAN*'s: L_D = 5·mse(d(x), 1) + 3·mse(d(x_g), 0); L_G = 3·mse(d(x_g), 1) + 5·mse(x_g, x).
SKRGAN_WEIGHTS = dict(g_adversarial=3.0, d_real=5.0, d_fake=3.0, reconstruction=5.0)
# §6.7's D_M and G weights of the shared terms (the rest: configs/tables.py ECAI_CODE_WEIGHTS).
ECAI_WEIGHTS = dict(
    g_adversarial=35.0,
    g_category=50.0,
    registration=2.0,
    agreement=1.0,
    d_real=50.0,
    d_fake=35.0,
    d_category=50.0,
)


def _weights(terms: Sequence[str], weights: dict, *, keep: tuple[str, ...] = ()) -> dict:
    """Stage B's loss weights `weights`, its other `terms` 0 (but those in `keep`, left as they are).

    A variant that sets its own weights sets every term, so no weight of the method leaks into a baseline.
    """
    return {f"synthesis.loss.weights.{t}": float(weights.get(t, 0.0)) for t in terms if t not in keep}


# No label given to G and no lesion loss (its segmentors are not needed in stage B). Stage C then has no
# asked-for lesion to check (no Dice filter), and writes each sample with what the real-trained segmentors
# find in it (pseudo-labels) for stage D.
NO_LESION = {
    "synthesis.label_fusion": "none",
    "synthesis.lesion_processor": "none",
    "synthesis.loss.weights.lesion": 0.0,
    "dataset.dice.kind": "none",
    "dataset.dice.threshold": 0.0,
    "dataset.synthetic_label": "segmentor",
}


def _separate(terms: Sequence[str], g_input: str, weights: dict) -> dict:
    """K independent G/D pairs on `g_input`, with only `weights` (§9.1's baselines)."""
    return {
        "synthesis.g_input": g_input,
        "synthesis.separate_models": True,
        **NO_LESION,
        **_weights(terms, weights),
        # No pre-training: BaseGAN has no (structure, image) pairs; SkrGAN*'s reconstruction runs every step.
        "synthesis.pretrain_steps": 0,
        "synthesis.paired_fraction": 0.0,
    }


ABLATION_D = dict(NO_LESION)
ABLATION_C = {
    **ABLATION_D,
    "synthesis.loss.weights.registration": 0.0,
    "synthesis.loss.weights.agreement": 0.0,
}
ABLATION_B = {**ABLATION_C, "synthesis.noise": (0.0, 0.0)}  # s' = s + 0: the raw map.

# variant -> one line on what it is (the report's table).
DESCRIPTIONS = {
    "full": "F: the method as configured.",
    "basegan": "BaseGAN = ablation A: K unconditional U-Nets on image-sized N(0, 1) noise, single-head Ds.",
    "skrgan": "SkrGAN*: K U-Nets on the inverted binary structure map, adversarial + self-supervised loss.",
    "B": "B: the conditional G on the structure map without noise; ACGAN D; no G_t, no lesion.",
    "C": "C: B with the noise fusion of §3.5.",
    "D": "D: C with the frozen G_t's registration (20) and translation-agreement (5) losses.",
    "E": (
        "E: D with the lesion label and loss, but no placement check (labels drawn regardless of the organ)."
    ),
    "ecai": "The old encoder/decoder design of the AAAI/ECAI drafts (§6.7) on the one trainer.",
    "flow": "Flow matching: one velocity U-Net makes all K modalities jointly from [s, one-hot l, organ].",
}
DESCRIPTIONS["A"], DESCRIPTIONS["F"] = DESCRIPTIONS["basegan"], DESCRIPTIONS["full"]
VARIANTS = tuple(DESCRIPTIONS)


def overrides(terms: Sequence[str]) -> dict[str, dict]:
    """Every variant's overrides, for a config whose stage-B loss weighs `terms` (its own weight names)."""
    table = {
        "full": {},
        "basegan": _separate(terms, "noise", BASEGAN_WEIGHTS),
        "skrgan": {**_separate(terms, "inverse_structure", SKRGAN_WEIGHTS), "synthesis.noise": (0.0, 0.0)},
        "B": ABLATION_B,
        "C": ABLATION_C,
        "D": ABLATION_D,
        "E": {"synthesis.label_rule": "none"},
        "ecai": {
            "synthesis.design": "ecai",
            # f_rm: channel k = 0.8·s + 0.2·one_hot(l)_k (§3.6 [OLD]).
            "synthesis.label_fusion": "weighted_sum",
            "synthesis.noise": (0.0, 0.0),
            "synthesis.pretrain_steps": 0,
            "synthesis.paired_fraction": 0.0,
            "synthesis.loss.category_on_fakes": False,
            **_weights(terms, ECAI_WEIGHTS, keep=("lesion",)),  # The method's lesion weight stays.
        },
    }
    table["flow"] = {"synthesis.generator": "flow"}  # The second family (synth/flow_synthesis.py).
    table["A"], table["F"] = table["basegan"], table["full"]
    return {name: table[name] for name in VARIANTS}
