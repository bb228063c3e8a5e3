"""The baselines and ablations of §9.1-9.2 as config changes of the one trainer (no copied folders).

`variant=<name>` on the phantom and BRATS configs applies one of `VARIANTS` to the method's config:

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

Each is a function of the config (`apply`), so any dataset config built on the phantom's (BRATS) takes
them; stage C and D then run on the variant's generator as on the method's. Where the variant does not
use a network (G_t, segmentors) its stage is skipped or its loss weight is 0, exactly as the method's
config switches it off. The authors' BRATS ablations D–F never give G the label (§3.6); here E and F
feed it the way the method does (concatenation, the paper), so E and F differ only by the placement check
(§9.2's note). §11.24's defect (SkrGAN* unpacking two outputs from single-head discriminators) cannot occur:
separate models have single-head Ds by construction.
"""

from collections.abc import Callable

import ml_collections

# §9.1, BaseGAN (= ablation A): L_D = 100·mse(d(x), 1) + 70·mse(d(x_g), 0); L_G = 70·mse(d(x_g), 1).
BASEGAN_WEIGHTS = dict(g_adversarial=70.0, d_real=100.0, d_fake=70.0)
# §9.1: SkrGAN*'s: L_D = 5·mse(d(x), 1) + 3·mse(d(x_g), 0); L_G = 3·mse(d(x_g), 1) + 5·mse(x_g, x).
SKRGAN_WEIGHTS = dict(g_adversarial=3.0, d_real=5.0, d_fake=3.0, reconstruction=5.0)


def _only(config: ml_collections.ConfigDict, **weights: float) -> None:
    """Sets stage B's loss weights to `weights`, every other term 0."""
    for name in config.synthesis.loss.weights:
        config.synthesis.loss.weights[name] = float(weights.get(name, 0.0))


def _no_lesion(config: ml_collections.ConfigDict) -> None:
    """No label given to G and no lesion loss (its segmentors are not needed in stage B).

    Stage C then has no asked-for lesion to check (no Dice filter), and writes each sample with what the
    real-trained segmentors find in it (pseudo-labels) for stage D.
    """
    config.synthesis.label_fusion = "none"
    config.synthesis.lesion_processor = "none"
    config.synthesis.loss.weights.lesion = 0.0
    config.dataset.dice.kind, config.dataset.dice.threshold = "none", 0.0
    config.dataset.synthetic_label = "segmentor"


def _separate(config: ml_collections.ConfigDict, g_input: str, weights: dict) -> None:
    """K independent G/D pairs on `g_input`, with only `weights` (§9.1's baselines)."""
    config.synthesis.g_input = g_input
    config.synthesis.separate_models = True
    _no_lesion(config)
    _only(config, **weights)


def basegan(config: ml_collections.ConfigDict) -> None:
    """BaseGAN = ablation A: K unconditional U-Nets on image-sized N(0, 1) noise, single-head Ds."""
    _separate(config, "noise", BASEGAN_WEIGHTS)
    config.synthesis.pretrain_steps = 0  # No (structure, image) pairs to pre-train on.


def skrgan(config: ml_collections.ConfigDict) -> None:
    """SkrGAN*: K U-Nets on the inverted binary structure map, adversarial + self-supervised loss."""
    _separate(config, "inverse_structure", SKRGAN_WEIGHTS)
    config.synthesis.noise = (0.0, 0.0)
    config.synthesis.pretrain_steps = 0  # The reconstruction term runs in every step instead.


def ablation_b(config: ml_collections.ConfigDict) -> None:
    """B: the conditional G on the structure map without noise; ACGAN D; no G_t, no lesion."""
    ablation_c(config)
    config.synthesis.noise = (0.0, 0.0)  # s' = s + 0: the raw map.


def ablation_c(config: ml_collections.ConfigDict) -> None:
    """C: B with the noise fusion of §3.5."""
    ablation_d(config)
    config.synthesis.loss.weights.registration = config.synthesis.loss.weights.agreement = 0.0


def ablation_d(config: ml_collections.ConfigDict) -> None:
    """D: C with the frozen G_t's registration (20) and translation-agreement (5) losses."""
    _no_lesion(config)


def ablation_e(config: ml_collections.ConfigDict) -> None:
    """E: D with the lesion label and loss, but no placement check (labels drawn regardless of the organ)."""
    config.synthesis.label_rule = "none"


# §6.7's D_M and G weights of the shared terms (the rest: synth.ecai.CODE_WEIGHTS).
ECAI_WEIGHTS = dict(
    g_adversarial=35.0,
    g_category=50.0,
    registration=2.0,
    agreement=1.0,
    d_real=50.0,
    d_fake=35.0,
    d_category=50.0,
)


def ecai(config: ml_collections.ConfigDict) -> None:
    """The old encoder/decoder design of the AAAI/ECAI drafts (§6.7) on the one trainer."""
    sy = config.synthesis
    sy.design = "ecai"
    sy.label_fusion = "weighted_sum"  # f_rm: channel k = 0.8·s + 0.2·one_hot(l)_k (§3.6 [OLD]).
    sy.noise = (0.0, 0.0)
    sy.pretrain_steps = 0
    sy.loss.category_on_fakes = False
    _only(config, lesion=sy.loss.weights.lesion, **ECAI_WEIGHTS)


def full(config: ml_collections.ConfigDict) -> None:
    """F: the method as configured."""
    del config


VARIANTS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "full": full,
    "basegan": basegan,
    "skrgan": skrgan,
    "A": basegan,
    "B": ablation_b,
    "C": ablation_c,
    "D": ablation_d,
    "E": ablation_e,
    "F": full,
    "ecai": ecai,
}


def apply(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`config` changed into variant `name` (in place; also returned), recorded as `config.variant`."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown variant={name!r}; choose one of {', '.join(VARIANTS)}")
    VARIANTS[name](config)
    config.variant = name
    return config
