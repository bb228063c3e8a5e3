"""Stage `compare` (synth/stages/compare.py): the baselines and ablations of §9.1-9.2 beside the method.

The fast tests pin what needs no training: the config checks (which run before anything trains) and the
pure scoring and table helpers on hand-made numbers. The whole stage on the tiny phantom (the frozen
networks, stage-B trainings, sampling and the report) is `slow` and runs in `make test-slow`, and prints
the registration-consistency numbers it saw. With five variants of 150 steps it took 23-27 minutes on a
2-core CPU shared with other jobs (BaseGAN's four vmapped models alone ~7), and three still ran over the
10-minute per-test limit in CI: it trains the two ends, BaseGAN and the method, for 40 steps of 4 at the
demo's learning rate (segmentor 40 steps, G_t 16), which separates a registered G from K independent ones
clearly (structure agreement 0.91 against 0.53) in 268 s alone on 2 cores (2026-12-05; ~490 s beside the
other slow tests).
"""

import json
import math
import os
import time

import numpy as np
import pytest
from compile_mode import optimised

from configs import phantom
from synth import configlib, frozen, pipeline
from synth.stages import compare, compare_report

MODALITIES = ("t1", "t2", "t1c", "flair")


def test_the_config_is_checked_before_anything_trains(tmp_path):
    config = phantom.get_config("runlocal,stage=compare")
    assert compare.check_config(config) == ["basegan", "skrgan", "B", "C", "D", "E", "full"]
    config.compare.variants = ("A", "basegan", "D", "F", "full")  # Aliases train once, in order.
    assert compare.check_config(config) == ["basegan", "D", "full"]

    config.compare.variants = ("basegan", "G")
    with pytest.raises(ValueError, match=r"config\.compare\.variants.*'G'"):
        compare.run(config, tmp_path)
    config.compare.variants = ()
    with pytest.raises(ValueError, match=r"config\.compare\.variants is empty"):
        compare.check_config(config)
    config.compare.variants = ("D",)
    config.compare.batch_size = 6  # Four test devices.
    with pytest.raises(ValueError, match=r"config\.compare\.batch_size=6"):
        compare.check_config(config)
    config.compare.num_samples = 1
    with pytest.raises(ValueError, match=r"config\.compare\.num_samples"):
        compare.check_config(config)

    for base in ("B", "basegan"):  # The base config must be the method.
        with pytest.raises(ValueError, match=f"variant={base!r}"):
            compare.run(phantom.get_config(f"runlocal,stage=compare,variant={base}"), tmp_path)
    assert compare.check_config(phantom.get_config("runlocal,variant=F"))  # F is the method.
    assert not os.listdir(tmp_path), "a rejected config trains nothing"


def test_settings_follow_each_variants_config():
    base = phantom.get_config("runlocal")
    flags = {
        name: compare_report.settings(compare.variant_config(base, name))
        for name in ("basegan", "skrgan", "B", "C", "D", "E", "full", "ecai", "flow")
    }
    assert base.variant == "full" and base.synthesis.g_input == "structure"  # The base is left alone.
    on = {name: {k for k, v in f.items() if v} for name, f in flags.items()}
    assert on["basegan"] == {"noise", "separate_models"}
    assert on["skrgan"] == {"structure_map", "separate_models"}
    assert on["B"] == {"structure_map"}
    assert on["C"] == {"structure_map", "noise"}
    assert on["D"] == {"structure_map", "noise", "registration_loss"}
    assert on["E"] == {"structure_map", "noise", "registration_loss", "lesion_label_loss"}
    assert on["full"] == on["E"] | {"placement_check"}
    # The old design registers through its own translations, on a fusion map without noise (§6.7).
    assert on["ecai"] == {"structure_map", "registration_loss", "lesion_label_loss", "placement_check"}
    # The flow family: map-conditioned from noise; none of the GAN's terms unless its own weights say so.
    assert on["flow"] == {"structure_map", "noise"}
    assert compare_report.description("D", base).startswith("D: C with the frozen G_t")
    assert list(frozen.needs(base, "compare")) == ["segmentor", "translator"]


def test_scores_and_tables_on_hand_made_numbers():
    config = phantom.get_config("runlocal")
    # Lesion Dice: 3 samples, 2 modalities; sample 2 has no lesion, so only 0 and 1 count.
    label = np.zeros((3, 4, 4), np.int32)
    label[0, :2, :2] = 2  # 4 pixels
    label[1, 2:, 2:] = 4  # 4 pixels
    found = np.zeros((2, 3, 4, 4), bool)
    found[0, 0, :2, :2] = True  # modality 0 finds sample 0's lesion exactly ...
    found[0, 1, 2:, :2] = True  # ... and misses sample 1's: Dice 0.
    found[1] = label > 0  # modality 1 finds both.
    scores = compare.lesion_scores(found, label, ("a", "b"))
    assert scores["lesion_samples"] == 2
    assert scores["lesion_dice/a"] == pytest.approx(0.5) and scores["lesion_dice/b"] == pytest.approx(1.0)
    assert scores["lesion_dice"] == pytest.approx(0.75)
    # Chance: each sample against the next other lesion (cyclically): every such pair is disjoint.
    assert scores["lesion_dice_chance"] == pytest.approx(0.0, abs=1e-5)
    reg = compare.registration_scores({"structure_agreement": np.array([0.5, 0.7]), "label": label})
    assert reg == pytest.approx({"structure_agreement": 0.6, "structure_agreement_std": 0.1})

    def entry(name, **numbers):
        e = {
            "method": name,
            "title": compare_report.title(name),
            "description": compare_report.description(name, config),
        }
        return e | numbers

    flags = {f"uses_{k}": k == "noise" for k in ("structure_map", "noise", "registration_loss")}
    flags |= {f"uses_{k}": False for k in ("lesion_label_loss", "placement_check", "separate_models")}
    per_modality = {f"ms_ssim/{m}": 0.1 * i for i, m in enumerate(MODALITIES)}
    per_modality |= {f"ms_ssim_std/{m}": 0.01 for m in MODALITIES}
    entries = [
        entry(
            "real",
            ms_ssim=0.5,
            structure_agreement=0.8,
            structure_agreement_std=0.05,
            lesion_dice=0.9,
            lesion_dice_chance=0.1,
        ),
        entry(
            "basegan",
            g_params=1234567,
            synthesis_step=150,
            ms_ssim=0.15,
            structure_agreement=0.2,
            structure_agreement_std=0.02,
            translation_mse=0.05,
            translation_mse_std=0.01,
            lesion_dice=float("nan"),
            lesion_dice_chance=0.0,
            **flags,
            **per_modality,
        ),
    ]
    table = compare_report.main_table(entries, fid=False)
    assert table[0].startswith("| method | structure map | noise | L_reg |") and "FID" not in table[0]
    assert (
        table[2].startswith("| real slices |") and "0.800 ± 0.050" in table[2] and "0.900 (0.100)" in table[2]
    )
    assert "| A (BaseGAN) | × | ✓ | × | × | × | × | 1,234,567 | 0.150 |" in table[3]
    assert "| – (0.000) |" in table[3] and "0.0500 ± 0.0100" in table[3]
    assert (
        "| 0.100 ± 0.010 | 0.200 ± 0.010 | 0.300 ± 0.010 |"
        in compare_report.modality_table(entries, MODALITIES, fid=False)[3]
    )
    assert "FID" in compare_report.main_table(entries, fid=True)[0]

    lines = compare_report.summary_lines(entries, config, frozen=["segmentor"], num_samples=8, fid=False)
    text = "\n".join(lines)
    assert "(150 steps)" in text and "same 8 real test slices" in text and "side_by_side.png" in text
    assert "| A (BaseGAN) | BaseGAN = ablation A:" in text and "inception_weights" in text
    assert compare_report.json_ready(entries[1])["lesion_dice"] is None


# One G on the structure map with the registration loss (D, E, F) against K independent models on noise
# (A = BaseGAN): structure agreement between the synthetic modalities, and the translation MSE under the
# frozen G_t, after 150 steps (printed with -s; two seeds, 2-core CPU shared with other jobs, 2026-11-26):
#   seed 0: A 0.569, D 0.970, E 0.898, F 0.896 (real 0.847); translation MSE A 0.041, D 0.0016, E/F 0.0035
#   seed 1: A 0.559, D 0.954, E 0.935, F 0.937 (real 0.847); translation MSE A 0.043, D 0.0022, E/F 0.0038
# This test's 40 steps at 5e-4 (seed 0, 2026-12-05): A 0.530, F 0.907; translation MSE A 0.022, F 0.022.
# The translation MSE is below the real slices' (0.11) for every method: G_t had few steps, and G learnt
# against it (D-F) or makes smooth images (A), so only the structure agreement is asserted.
# `SYNTH_COMPARE_SEEDS=0,1 make test-slow` runs it for other seeds.
SEEDS = [int(s) for s in os.environ.get("SYNTH_COMPARE_SEEDS", "0").split(",")]
REGISTERED = ("full",)


# Alone on a 2-core Zen 3 machine 318 s (2026-12-07); beside another whole-pipeline test on the same two
# cores it ran past the suite's 600 s limit in CI (still compiling its last step, not hung): its own limit.
@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("seed", SEEDS)
def test_compare_stage_on_the_tiny_phantom(phantom_data_dir, tmp_path, seed):
    config = phantom.get_config("runlocal,stage=compare")
    config.seed = seed
    config.data.data_dir = phantom_data_dir
    # Two variants, the two ends, keep the run short (three and five ran over the 10-minute limit on 2 busy
    # cores); each variant has its own fast and slow step tests (test_variants.py). Alone on 2
    # cores: 572 s with 60 steps at 1e-4 and every stage compiled with optimisations (2026-12-03), 268 s
    # now, which also separates the two far better (60 steps at 1e-4: agreement 0.56 against 0.51).
    config.compare.variants = ("basegan", "full")
    config.compare.update(dict(num_samples=16, batch_size=8, num_pairs=16, grid_samples=3))
    config.segmentor.train = configlib.loop_config(
        num_steps=40, batch_size=8, log_every=20, checkpoint_every=40, eval_every=40
    )
    config.translator.loss.weights.supervised = 20.0  # As the demo: a usable G_t in few steps.
    config.translator.train = configlib.loop_config(
        num_steps=16, batch_size=4, log_every=8, checkpoint_every=16, eval_every=16
    )
    config.synthesis.pretrain_steps = 15
    # The demo's rate (configs/phantom.py:demo): the configs' 1e-4 barely moves G in 40 steps.
    config.synthesis.optim.g.learning_rate = config.synthesis.optim.d.learning_rate = 5e-4
    config.synthesis.train = configlib.loop_config(
        num_steps=40, batch_size=4, log_every=20, checkpoint_every=40, eval_every=40
    )
    start = time.perf_counter()
    # The frozen networks' few steps first, compiled fast (the run below finds them complete); then the
    # variants' stage B, whose steps dominate, with XLA's optimisations on.
    compare.train_frozen(config, str(tmp_path))
    with optimised():
        pipeline.train_and_evaluate(config, tmp_path)
    seconds = time.perf_counter() - start

    out = tmp_path / "compare"
    for name in ("results.json", "results.csv", "summary.md", "samples/side_by_side.png", "done.json"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    by_name = {e["method"]: e for e in results["methods"]}
    assert list(by_name) == ["real", "basegan", "full"]
    summary = (out / "summary.md").read_text()
    for title in ("real slices", "A (BaseGAN)", "F (method)"):
        assert f"| {title} |" in summary
    assert "## compare" in (tmp_path / "report.md").read_text() and "side_by_side.png" in summary
    for name in ("basegan", "full"):
        e = by_name[name]
        assert e["synthesis_step"] == 40 and e["g_params"] > 0
        assert all(0.0 <= e[f"ms_ssim/{m}"] <= 1.0 for m in MODALITIES)
        assert 0.0 <= e["structure_agreement"] <= 1.0 and math.isfinite(e["translation_mse"])
        assert (tmp_path / "compare" / name / "segmentor").is_symlink()
    # BaseGAN's K separate Gs have K times the parameters of one G of the same size (no modality code).
    assert by_name["basegan"]["g_params"] > by_name["full"]["g_params"]

    shown = {n: round(by_name[n]["structure_agreement"], 3) for n in by_name}
    mse = {n: round(by_name[n]["translation_mse"], 4) for n in by_name}
    print(f"\nseed {seed}, {seconds:.0f} s: structure agreement {shown}; translation MSE {mse}")
    for name in REGISTERED:  # Registration consistency: D-F clearly above A (seen 0.86-0.91 against 0.53).
        assert by_name[name]["structure_agreement"] > by_name["basegan"]["structure_agreement"] + 0.15, shown
