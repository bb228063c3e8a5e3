"""The whole pipeline on the tiny phantom, and the two notebooks that drive it (`make test-slow`).

One `runlocal` pipeline run (the quickstart notebook, so it never rots) trains every stage and writes a
synthetic dataset; the tests below read that dataset back in a fresh process, resume an interrupted
generation in a copy of the workdir, run the synthesize notebook on the trained workdir, and run a
flow-matching pipeline beside the quickstart's frozen networks. These are whole-pipeline runs (about 7
minutes of the 2 cores' time, nearly all compiles), so they are in the slow suite; one xdist group keeps
them on one worker, which trains the quickstart once. tests/test_stage_c.py has stage C's and D's parts.
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
from synth import generate, pipeline
from synth import workdir as workdir_lib
from synth.stages import dataset, verify

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("quickstart")]

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
    assert 0.0 <= stage_a["eval/edge_pattern_distance_real"] <= 1.0
    assert 0.0 <= stage_a["eval/edge_pattern_distance_sampled"] <= 1.0
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
