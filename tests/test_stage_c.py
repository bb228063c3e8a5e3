"""Stage C end to end on the tiny phantom, and the two notebooks that drive it.

One `runlocal` pipeline run (the quickstart notebook, so it never rots) trains every stage and writes a
synthetic dataset; the tests below read that dataset back in a fresh process, resume an interrupted
generation in a copy of the workdir, and run the synthesize notebook on the trained workdir.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import nbformat
import numpy as np
import pytest
import tensorflow_datasets as tfds
from nbclient import NotebookClient

from data_builders import schema
from data_builders.synthetic import synthetic_dataset_builder as chunks
from synth import generate, mixes, pipeline, structure_filter
from synth import workdir as workdir_lib
from synth.stages import dataset, verify

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks")


def _execute(name: str, monkeypatch, **env) -> str:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # As in-process tests: faster compiles.
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "strip outputs"
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
    ).execute()
    outputs = [out for c in nb.cells if c.cell_type == "code" for out in c.outputs]
    assert any("image/png" in out.get("data", {}) for out in outputs)
    return "".join(out.get("text", "") for out in outputs)


@pytest.fixture(scope="module")
def quickstart(phantom_data_dir, tmp_path_factory):
    """The quickstart notebook's runlocal pipeline, in a workdir the other tests read."""
    workdir = tmp_path_factory.mktemp("quickstart")
    with pytest.MonkeyPatch.context() as mp:
        text = _execute(
            "quickstart.ipynb", mp, SYNTH_DATA_DIR=phantom_data_dir, SYNTH_QUICKSTART_WORKDIR=str(workdir)
        )
    return text, workdir


def test_quickstart_notebook_runs_every_stage(quickstart):
    text, workdir = quickstart
    assert "stages run: ['structure', 'segmentor', 'translator', 'synthesis', 'dataset', 'verify']" in text
    report = (workdir / "report.md").read_text()
    assert "## dataset" in report and "Memorisation audit" in report
    # Stage D's matrix: one row per mix, in the T5 layout, and the plot.
    assert "## verify" in report and "score_vs_synthetic.png" in report
    assert "| flair | " in report and "Lesion fidelity" in report  # The generator-quality table (T3/T4).
    for row in ("| 100 % | 25 % | 0 | M |", "| 100 % | 25 % | 0 | S |", "| 50 % | 25 % | 0 | R |"):
        assert row in report
    for picture in ("accepted_then_rejected.png", "lesion_dice.png", "memorisation_pairs.png"):
        assert (workdir / "dataset" / "samples" / picture).exists()


def test_dataset_reads_back_elsewhere_with_the_real_schema_and_the_used_labels(quickstart):
    _, workdir = quickstart
    config = workdir_lib.load_config(workdir)
    tfds_dir = workdir / "dataset" / "tfds"
    reader = (
        "import sys, json, numpy as np, tensorflow_datasets as tfds\n"
        f"s = tfds.data_source('synthetic/phantom_tiny', split='train', data_dir={str(tfds_dir)!r})\n"
        "assert 'synth' not in sys.modules and 'data_builders' not in sys.modules\n"
        "np.savez(sys.argv[1], label=np.stack([s[i]['label'] for i in range(len(s))]),\n"
        "         image=np.stack([s[i]['image'] for i in range(len(s))]),\n"
        "         id=np.array([s[i]['id'].decode() for i in range(len(s))]))\n"
        "print(json.dumps(sorted(s.dataset_info.features.keys())))\n"
    )
    out_file = workdir / "read_back.npz"
    out = subprocess.run(
        [sys.executable, "-c", reader, str(out_file)], capture_output=True, text=True, cwd=workdir
    )
    assert out.returncode == 0, out.stderr
    real_keys = set(schema.brats_like_features(32, 32, 4).keys())
    assert set(eval(out.stdout.strip().splitlines()[-1])) == real_keys | {"structure", "organ", "lesion_dice"}
    back = np.load(out_file)
    assert len(back["id"]) == config.dataset.num_examples == len(set(back["id"]))
    # The labels stored are those G was given: regenerate batch 0 and compare.
    gen = generate.Generator.from_workdir(workdir, config)
    pool, _ = dataset.make_label_pool(config, gen.image_hw)
    batch = dataset.generate_batch(gen, pool, 0, config)
    kept = np.flatnonzero(batch["reason"] < 0)
    first = [i for i, name in enumerate(back["id"]) if name.startswith("000000-")]
    assert [f"000000-{k:03d}" for k in kept] == [back["id"][i] for i in first]
    np.testing.assert_array_equal(back["label"][first], batch["labels"][kept])
    np.testing.assert_allclose(back["image"][first], batch["images"][kept], atol=1e-6)


def test_interrupted_generation_resumes_to_the_same_samples(quickstart, tmp_path):
    _, workdir = quickstart
    config = workdir_lib.load_config(workdir)
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("dataset"))
    assert dataset.run(config, copy, stop_at=1) is None
    assert chunks.chunk_count(str(copy / "dataset" / "chunks")) == 1
    assert not (copy / "dataset" / "done.json").exists() and not (copy / "dataset" / "tfds").exists()
    builder = dataset.run(config, copy)
    resumed = builder.as_data_source("train")
    original = chunks.Builder(config=builder.builder_config, data_dir=str(workdir / "dataset" / "tfds"))
    original = original.as_data_source("train")
    assert len(resumed) == len(original) == config.dataset.num_examples
    ids = [resumed[i]["id"] for i in range(len(resumed))]
    assert len(set(ids)) == len(ids) and ids == [original[i]["id"] for i in range(len(original))]
    for i in range(len(resumed)):
        np.testing.assert_array_equal(resumed[i]["label"], original[i]["label"])
        np.testing.assert_allclose(resumed[i]["image"], original[i]["image"], atol=1e-6)
    # Complete: a rerun does nothing; asking for a different filter is refused, naming the key.
    assert dataset.run(config, copy) is None
    config.dataset.num_examples += 1
    config.dataset.dice.threshold = 0.5
    with pytest.raises(ValueError, match="dataset.dice.threshold"):
        dataset.run(config, copy)


def test_synthesize_notebook_makes_every_modality_with_the_chosen_lesion(quickstart, monkeypatch):
    _, workdir = quickstart
    text = _execute("synthesize.ipynb", monkeypatch, SYNTH_WORKDIR=str(workdir))
    assert "lesion Dice" in text and "stage C's pool: augmented pool" in text


def test_curricula_train_in_their_order(quickstart):
    _, workdir = quickstart

    def sources(path):  # The fraction of each logged step's batch that was synthetic.
        rows = (workdir / "verify" / path / "metrics.jsonl").read_text().splitlines()
        return [
            (r["step"], r["train/frac_synthetic"])
            for r in map(json.loads, rows)
            if "train/frac_synthetic" in r
        ]

    s_first, s_then = (
        sources("real100_syn25_aug0_S/seed0/synthetic"),
        sources("real100_syn25_aug0_S/seed0/real"),
    )
    assert s_first and all(f == 1.0 for _, f in s_first) and all(f == 0.0 for _, f in s_then)
    assert max(step for step, _ in s_first) < min(step for step, _ in s_then)
    r_first, r_then = (
        sources("real50_syn25_aug0_R/seed0/real"),
        sources("real50_syn25_aug0_R/seed0/synthetic"),
    )
    assert all(f == 0.0 for _, f in r_first) and all(f == 1.0 for _, f in r_then)
    assert max(step for step, _ in r_first) < min(step for step, _ in r_then)
    mixed = sources("real100_syn25_aug0_M/seed0/all")
    assert len(mixed) == 6 and 0.0 < np.mean([f for _, f in mixed]) < 1.0  # 6 synthetic of 30 examples.
    rows = list(csv.DictReader((workdir / "verify" / "results.csv").open()))
    assert [r["mix"] for r in rows] == ["real100_syn25_aug0_M", "real100_syn25_aug0_S", "real50_syn25_aug0_R"]
    # A rerun finds every run complete: nothing trains again, and the scores are the same.
    config = workdir_lib.load_config(workdir)
    config.verify.quality.num_pairs = 0
    again = verify.run(config, workdir)
    assert [(r["mix"], r["dice_whole/mean"]) for r in again] == [
        (r["mix"], float(r["dice_whole/mean"])) for r in rows
    ]
    assert (
        len((workdir / "verify" / "real100_syn25_aug0_M/seed0/all/metrics.jsonl").read_text().splitlines())
        == 7
    )


def test_a_flow_pipeline_runs_stages_a_to_d_beside_the_same_frozen_networks(quickstart, tmp_path):
    """Issue 18: flow-matching stages A and B drop in; generation, stage C and D are unchanged.

    `structure.generator=flow` and `synthesis.generator=flow`; the segmentors and G_t are the quickstart's.
    """
    _, workdir = quickstart
    config = workdir_lib.load_config(workdir)
    config.structure.generator = config.synthesis.generator = "flow"
    config.verify.mixes = ("real=1 syn=0.25 mode=M",)
    copy = tmp_path / "flow"
    ignored = ("structure", "synthesis", "dataset", "verify")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(*ignored))
    for stage in ignored:
        config.stage = stage
        pipeline.train_and_evaluate(config, copy)
    stage_a = json.loads((copy / "structure" / "last_eval.json").read_text())
    assert 0.0 <= stage_a["eval/acceptance_first_draw"] <= stage_a["eval/acceptance"] <= 1.0
    assert {"eval/edge_fraction_sampled", "eval/diversity", "eval/contour_mae_sampled"} <= set(stage_a)
    assert list((copy / "structure" / "samples").glob("samples_map_mask*.png"))
    last_eval = json.loads((copy / "synthesis" / "last_eval.json").read_text())
    assert {"eval/lesion_dice", "eval/lesion_dice_chance", "eval/translation_mse"} <= set(last_eval)
    assert list((copy / "synthesis" / "samples").glob("*.png"))
    gen = generate.Generator.from_workdir(copy)
    assert gen.is_flow and gen.provenance["synthesis_step"] == config.synthesis.train.num_steps
    assert gen.provenance["structure_step"] == config.structure.train.num_steps
    structures = gen.sample_structures(jax.random.key(0), 3)
    assert structures["maps"].shape == structures["masks"].shape == (3, 32, 32)
    assert set(np.unique(structures["maps"])) <= {0, 1} and (structures["draws"] >= 1).all()
    again = gen.sample_structures(jax.random.key(0), 3)
    np.testing.assert_array_equal(structures["maps"], again["maps"])  # One key, one draw.
    maps = np.stack([np.eye(32, dtype=np.uint8)] * 2)
    masks, labels = np.ones_like(maps), np.zeros((2, 32, 32), np.int32)
    labels[:, 10:14, 10:14] = 2
    key = jax.random.key(3)
    images = gen.synthesize(maps, masks, labels, key)
    assert images.shape == (2, 32, 32, 4) and images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(images, gen.synthesize(maps, masks, labels, key))  # One key, one sample.
    assert not np.allclose(images, gen.synthesize(maps, masks, labels, jax.random.key(4)))
    (version_dir,) = (copy / "dataset" / "tfds" / "synthetic" / "phantom_tiny").iterdir()
    written = tfds.builder_from_directory(str(version_dir)).as_data_source("train")
    assert len(written) == config.dataset.num_examples
    rows = list(csv.DictReader((copy / "verify" / "results.csv").open()))
    assert [r["mix"] for r in rows] == ["real100_syn25_aug0_M"]
    # stage=compare puts the flow family beside the method's GAN, sharing the frozen segmentors and G_t.
    config.stage, config.synthesis.generator = "compare", "gan"
    config.compare.variants = ("flow",)
    pipeline.train_and_evaluate(config, copy)
    by_name = {e["method"]: e for e in json.loads((copy / "compare" / "results.json").read_text())["methods"]}
    assert list(by_name) == ["real", "flow"] and by_name["flow"]["g_params"] > 0
    assert 0.0 <= by_name["flow"]["structure_agreement"] <= 1.0


def test_stage_d_reports_mean_and_std_over_seeds():
    base = dict(real=1.0, syn=0.5, aug=0.0, mode="M", examples=30, steps=10)
    rows = [dict(base, mix="a", seed=s, dice=d) for s, d in ((0, 0.6), (1, 0.7), (2, 0.8))]
    rows.append(dict(base, mix="b", seed=0, dice=0.5))
    table = verify.aggregate(rows, (("dice", "Dice"),))
    assert [(r["mix"], r["seeds"]) for r in table] == [("a", 3), ("b", 1)]
    assert table[0]["dice"] == pytest.approx(0.7) and table[0]["dice_std"] == pytest.approx(
        np.std([0.6, 0.7, 0.8])
    )
    assert table[1]["dice_std"] == 0.0


def test_real_subsets_are_drawn_by_subject_and_augment_only_themselves():
    subjects = np.repeat(np.arange(10), 5)  # 10 patients of 5 slices.
    for seed in range(3):
        parts = mixes.mix_parts(mixes.parse_mix("real=0.2 aug=1"), 50, 0, seed, subjects)
        real = parts["real"][parts["real"][:, 0] == mixes.REAL, 1]
        aug = parts["real"][parts["real"][:, 0] == mixes.AUGMENTED, 1]
        assert len(real) == 10 and len(set(real)) == 10 and len(aug) == 50
        assert len(np.unique(subjects[real])) == 2  # Two whole patients, not slices of all ten.
        assert set(aug) <= set(real)  # Augmented copies of the mix's real subset only.
    with pytest.raises(ValueError, match="aug= makes augmented copies"):
        mixes.mix_parts(mixes.parse_mix("syn=1 aug=1"), 50, 50, 0)
    source = [{"subject_id": f"s{i // 2}"} for i in range(6)] + [{}]
    groups = mixes.subjects_of(source).tolist()
    assert groups[0:6:2] == groups[1:6:2] and len(set(groups)) == 4  # Pairs share; no id: its own.


def test_mixes_parse_split_and_fail_clearly():
    mix = mixes.parse_mix("real=0.8 syn=2 aug=0.2 mode=S")
    assert (mix.real, mix.syn, mix.aug, mix.mode, mix.name) == (0.8, 2.0, 0.2, "S", "real80_syn200_aug20_S")
    parts = mixes.mix_parts(mix, num_real=10, num_synthetic=20, seed=0)
    assert len(parts["real"]) == 8 + 2 and len(parts["synthetic"]) == 20
    assert (parts["real"][:8, 0] == mixes.REAL).all() and (parts["real"][8:, 0] == mixes.AUGMENTED).all()
    # S: the synthetic part first, the steps split by the parts' sizes (20 : 10 of 30 steps).
    assert [(p, end) for p, end, _ in mixes.phases(mix, parts, 30)] == [("synthetic", 20), ("real", 30)]
    with pytest.raises(ValueError, match="needs 20 synthetic samples.*has 5"):
        mixes.mix_parts(mix, num_real=10, num_synthetic=5, seed=0)
    for bad, message in (
        ("real=1 sny=1", "'sny=1' is not one of"),
        ("real=2", "real at most 1"),
        ("real=1 mode=X", "mode must be one of"),
        ("real=0", "no training data"),
        ("real=abc", "is not a number"),
    ):
        with pytest.raises(ValueError, match=message):
            mixes.parse_mix(bad)


# --------------------------------------------------------------------------------------------------
# The filters, each on inputs it must reject (no trained networks needed).


class _FixedGenerator:
    """Stands in for `generate.Generator`: fixed structures, blank images, given lesion Dice."""

    def __init__(self, maps, masks, dice):
        self.maps, self.masks, self.dice = maps, masks, dice

    def sample_structures(self, key, n):
        params = structure_filter.FilterParams(min_j_s=0.55, mae=0.05, max_count=1)
        scores = np.zeros(n)  # D_s never vouches: only the contour test can accept.
        accepted = structure_filter.passes_filter_batch(self.maps, self.masks, d_scores=scores, params=params)
        return dict(maps=self.maps, masks=self.masks, accepted=accepted, scores=scores, draws=np.ones(n))

    def synthesize(self, maps, masks, labels, key):
        return np.zeros(maps.shape + (4,), np.float32)

    def lesion_dice(self, images, labels, *, kind):
        return self.dice


def _ring(size=32, radius=11, gap_degrees=0):
    """A circular contour map (torn open by `gap_degrees`) and its organ mask, a little wider."""
    import cv2

    contour = np.zeros((size, size), np.uint8)
    cv2.ellipse(
        contour, (size // 2, size // 2), (radius, radius), 0, gap_degrees / 2, 360 - gap_degrees / 2, 1, 1
    )
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, (size // 2, size // 2), radius + 2, 1, -1)
    return contour, mask


def test_each_filter_rejects_what_it_should(tiny_config):
    closed, mask = _ring()
    opened, _ = _ring(gap_degrees=90)
    maps = np.stack([closed, opened, closed, closed])
    masks = np.stack([mask] * 4)
    inside = np.zeros((32, 32), np.uint8)
    inside[14:18, 14:18] = 4
    outside = np.zeros((32, 32), np.uint8)
    outside[0:3, 0:3] = 2
    config = tiny_config
    config.dataset.batch_size, config.dataset.label_tries = 4, 1
    config.dataset.structure_filter = True  # runlocal turns it off: untrained maps never pass.
    config.dataset.dice.threshold = 0.8
    fake = _FixedGenerator(maps, masks, dice=np.array([0.9, 0.9, 0.9, 0.1], np.float32))
    # Reasons: -1 accepted, 0 structure, 1 placement, 2 Dice; a pool of one label decides every draw.
    for index in range(3):  # Several batches: the random draws differ, the verdicts must not.
        batch = dataset.generate_batch(fake, np.stack([inside]), index, config)
        assert batch["reason"].tolist() == [-1, 0, -1, 2]  # The open contour; the low Dice.
        batch = dataset.generate_batch(fake, np.stack([outside]), index, config)
        assert batch["reason"].tolist() == [1, 0, 1, 1]  # The structure filter is checked first.
    config.dataset.structure_filter = False
    batch = dataset.generate_batch(fake, np.stack([inside]), 0, config)
    assert batch["reason"].tolist() == [-1, -1, -1, 2]
