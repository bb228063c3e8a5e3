"""Stage `verify` (stage D, METHOD §8.1): whether the synthetic data helps a downstream segmentor.

Each row of the experiment matrix (`config.verify.mixes`) is a training mix, written like
`"real=1 syn=0.5 aug=0 mode=S"`:
  - `real`: the fraction of the real training set used (a seeded subset);
  - `syn`: synthetic samples from stage C, as a multiple of the real training set's size (0.5 = 50 %,
    2 = ×2), read from the run's synthetic TFDS dataset;
  - `aug`: classically augmented ("enhanced", §2.2 with its defects fixed) real examples, likewise;
  - `mode`: M mixes everything at random; S trains on the synthetic part first, then on the real part
    (real and augmented); R the reverse. Each part gets steps in proportion to its size.
Every mix trains the config's segmentor (`config.segmentor`, with the optimiser `config.verify.optim` where
the config has one, e.g. BRATS's lr 1e-4 of §8.1, else `config.segmentor.optim`) for the same number of
steps, the §8.1 budget: `budget_epochs` epochs of the whole real training set, whatever the mix's size.
Each mix runs once per seed (`seeds`), with its own subset, order and initialisation, and is evaluated on
the real test split. Each training step logs the fraction of its batch drawn from each source
(`train/frac_synthetic`, `train/frac_augmented`), so the order of S and R is visible in the metrics.

Runs go to `verify/<mix>/seed<k>/<phase>` with the shared loop's checkpoints, so an interrupted matrix
resumes; the stage then writes `verify/results.csv` (per run), `verify/summary.md` (the T5 layout: mean ±
std over seeds) and a plot of Dice against the synthetic amount for each mode.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os

import jax
import ml_collections
import numpy as np

from synth import configlib, frozen, input_pipeline, label_pool, lesion, mixes, scoring, train
from synth import workdir as workdir_lib
from synth.metrics import inception
from synth.stages import segmentor

NAME = "verify"
log = logging.getLogger("synth")


def _identity(example):
    return example


def source_fractions(batch):
    """Takes the source tags out of a host batch: the fractions of it drawn from each source.

    Computed on the host, so the training step is the segmentor stage's own program, served from the
    compilation cache instead of compiled again (the demo's stage D: ~20 s less).
    """
    batch = dict(batch)
    source = batch.pop("source")
    return batch, {
        "frac_synthetic": float(np.mean(source == mixes.SYNTHETIC)),
        "frac_augmented": float(np.mean(source == mixes.AUGMENTED)),
    }


def synthetic_source(config, workdir):
    """The stage-C dataset of this run (or `config.verify.synthetic_data_dir`)."""
    import tensorflow_datasets as tfds

    done = os.path.join(workdir_lib.stage_dir(workdir, "dataset"), workdir_lib.DONE_FILE)
    if not os.path.exists(done):
        raise FileNotFoundError(
            f"A mix asks for synthetic data, but {workdir} has no complete stage-C dataset ({done}): "
            "run stage=dataset first"
        )
    with open(done) as f:
        name = json.load(f)["dataset"]
    data_dir = config.verify.synthetic_data_dir or os.path.join(
        workdir_lib.stage_dir(workdir, "dataset"), "tfds"
    )
    return tfds.data_source(name, split="train", data_dir=data_dir, download=False), name


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at=None):
    """Trains and evaluates every mix of the matrix (resuming), then writes the report."""
    del stop_at  # Each run has its own budget; an interrupted matrix resumes run by run.
    v = config.verify
    matrix = [mixes.parse_mix(text) for text in v.mixes]
    if not v.seeds:
        raise ValueError("config.verify.seeds is empty")
    workdir = os.fspath(workdir)
    real = input_pipeline.open_source(config.data, config.data.train_split)
    subjects = mixes.subjects_of(real) if any(0 < m.real < 1 for m in matrix) else None
    synthetic, synthetic_name = (None, None)
    if any(m.syn > 0 for m in matrix):
        synthetic, synthetic_name = synthetic_source(config, workdir)
    total_steps = max(1, math.ceil(v.budget_epochs * len(real) / v.batch_size))
    test_config = config.copy_and_resolve_references()
    test_config.data.eval_split = config.data.test_split
    test_config.data.eval_max_examples = v.eval_max_examples
    test_config.segmentor.train.batch_size = v.batch_size
    if v.get("optim") is not None:  # The downstream model's own optimiser (§8.1), else the segmentor's.
        test_config.segmentor.optim = v.optim
    base = segmentor.build(test_config)
    scores = segmentor.scores(config)
    class_labels = lesion.task(config) == "classify"
    # A detection task trains on boxes: padded to the real data's count, classes as in the label maps.
    max_boxes = config.data.adapter_options.max_boxes if lesion.task(config) == "detect" else 0
    augment = label_pool.AugmentParams.from_config(v.augment)
    rows = []
    for mix in matrix:
        for seed in v.seeds:
            run_config = config.copy_and_resolve_references()
            run_config.seed = int(config.seed) + int(seed)
            parts = mixes.mix_parts(
                mix, len(real), len(synthetic) if synthetic is not None else 0, run_config.seed, subjects
            )
            plan = mixes.phases(mix, parts, total_steps)
            state, previous = None, None
            for i, (phase, end, entries) in enumerate(plan):
                last = i == len(plan) - 1
                spec = dataclasses.replace(
                    base,
                    name=f"{NAME}/{mix.name}/seed{seed}/{phase}",
                    train=configlib.loop_config(
                        num_steps=end,
                        batch_size=v.batch_size,
                        log_every=min(v.log_every, end),
                        checkpoint_every=end,
                        eval_every=end,
                    ),
                    source=mixes.MixSource(
                        entries,
                        real,
                        synthetic,
                        seed=run_config.seed,
                        augment=augment,
                        class_labels=class_labels,
                        max_boxes=max_boxes,
                        num_classes=config.data.num_classes,
                    ),
                    preprocess=_identity,
                    train_step=base.train_step,  # One compile for all runs (the loop caches it).
                    batch_metrics=source_fractions,
                    evaluate=base.evaluate if last else None,
                    provenance={"mix": mix.name, "synthetic": synthetic_name or "", "phase": phase},
                )
                if workdir_lib.is_complete(workdir, spec.name, end):
                    state, previous = None, spec
                    continue
                if state is None and previous is not None:
                    state = train.load_trained_state(previous, run_config, workdir)
                log.info(
                    "[%s] %s seed %d: %s, %d examples, to step %d",
                    NAME,
                    mix.name,
                    seed,
                    phase,
                    len(entries),
                    end,
                )
                state = train.run_stage(spec, run_config, workdir, initial_state=state)
                previous = spec
            with open(os.path.join(workdir_lib.stage_dir(workdir, previous.name), "last_eval.json")) as f:
                evaluated = json.load(f)
            sizes = {k: int(len(p)) for k, p in parts.items()}
            rows.append(
                {
                    "mix": mix.name,
                    "real": mix.real,
                    "syn": mix.syn,
                    "aug": mix.aug,
                    "mode": mix.mode,
                    "seed": int(seed),
                    "examples": sizes["real"] + sizes["synthetic"],
                    "steps": total_steps,
                    **{key: float(evaluated[f"eval/{key}"]) for key, _ in scores},
                }
            )
    quality = []
    if synthetic is not None and v.quality.num_pairs > 0:
        test = input_pipeline.open_source(config.data, config.data.test_split)
        quality = generator_quality(config, workdir, test, synthetic, real_train=real)
    _write_report(workdir, config, rows, len(real), synthetic_name, quality)
    workdir_lib.done(workdir_lib.stage_dir(workdir, NAME), {"runs": len(rows)})
    return rows


def aggregate(rows: list[dict], scores) -> list[dict]:
    """Mean and std over seeds of each mix, in the matrix's order."""
    out = []
    for name in dict.fromkeys(r["mix"] for r in rows):
        runs = [r for r in rows if r["mix"] == name]
        entry = {k: runs[0][k] for k in ("mix", "real", "syn", "aug", "mode", "examples", "steps")}
        entry["seeds"] = len(runs)
        for s, _ in scores:
            values = np.array([r[s] for r in runs])
            entry[s], entry[s + "_std"] = float(values.mean()), float(values.std())
        out.append(entry)
    return out


# Synthetic modalities more alike than the real ones by more than this (inter-modality MS-SSIM) are reported.
INTERMODALITY_GAP = 0.1


def generator_quality(config, workdir: str, real_test, synthetic, real_train=None) -> list[str]:
    """The generator's image quality against the real test split, in the layout of Tables T3/T4.

    Per modality: MS-SSIM of seeded random real-synthetic pairs (higher = more alike) and within each set
    (diversity, lower = more diverse), small images upsampled to MS-SSIM's 161 px (`synth.scoring`);
    FID and KID when `config.verify.quality.inception_weights` names the FID Inception weights; with
    `real_train`, the Fréchet distance in the real-trained segmentors' features; and the lesion fidelity
    of stage C: the real-trained segmentors' Dice on every sample that reached the filter (Table T2's
    "lesion effectiveness") and on the kept ones.
    """
    from data_builders.synthetic import synthetic_dataset_builder as chunks

    q = config.verify.quality

    def take(source, n):
        index = np.linspace(0, len(source) - 1, n).astype(int)
        return np.stack([np.asarray(source[int(i)]["image"], np.float32) for i in index])

    n = min(q.max_images, len(real_test), len(synthetic))
    if n < 2:
        return [f"Generator quality needs at least 2 real test and 2 synthetic images; there are {n}."]
    pairs = min(q.num_pairs, n * (n - 1) // 2)
    extractor = inception.inception_v3_extractor(q.inception_weights) if q.inception_weights else None
    quality = scoring.image_quality(
        take(real_test, n),
        take(synthetic, n),
        key=jax.random.key(config.seed),
        num_pairs=pairs,
        modalities=config.data.modalities,
        channels=int(config.data.get("channels", 1)),
        extractor=extractor,
        within=True,
    )
    lines = [
        f"Generator quality against the real test split ({n} images per set, {pairs} random pairs per "
        "MS-SSIM; small images upsampled to 161 px):",
        "",
        "| modality | MS-SSIM real–synthetic ↑ | MS-SSIM within synthetic | MS-SSIM within real "
        "| FID ↓ | KID ↓ |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in config.data.modalities:
        fid = f"{quality[f'fid/{name}']:.2f}" if extractor is not None else "no weights"
        kid = f"{quality[f'kid/{name}']:.4f}" if extractor is not None else "no weights"
        cross, std = quality[f"ms_ssim/{name}"], quality[f"ms_ssim_std/{name}"]
        synthetic_only, real_only = (quality[f"ms_ssim_within_{s}/{name}"] for s in ("synthetic", "real"))
        lines.append(
            f"| {name} | {cross:.3f} ± {std:.3f} | {synthetic_only:.3f} | {real_only:.3f} | {fid} | {kid} |"
        )
    if "intermodality/synthetic" in quality:
        synthetic_between, real_between = quality["intermodality/synthetic"], quality["intermodality/real"]
        verdict = (
            " Well above the real value: the synthetic modalities came out alike."
            if synthetic_between > real_between + INTERMODALITY_GAP
            else ""
        )
        lines += [
            "",
            "MS-SSIM between the modalities of one sample (registered modalities share the anatomy, not the "
            f"contrast): synthetic {synthetic_between:.3f}, real {real_between:.3f}.{verdict}",
        ]
    if real_train is not None and lesion.task(config) == "segment":
        params = frozen.load(config, workdir, "segmentor")[0]["params"]
        fd = scoring.segmentor_frechet(
            config, params, take(real_train, n), take(real_test, n), take(synthetic, n)
        )
        if fd is not None:
            lines += [
                "",
                f"Fréchet distance in the real-trained segmentors' bottleneck features ({n} images each): "
                f"real test↔synthetic {fd['real_synthetic']:.3g}, real train↔test {fd['real_real']:.3g} "
                f"({fd['real_synthetic'] / max(fd['real_real'], 1e-12):.1f}×).",
            ]
    kind = config.dataset.dice.kind
    if kind == "none":  # No lesion processor: nothing to say about lesions.
        return lines + _inception_note(extractor)
    chunks_dir = os.path.join(workdir_lib.stage_dir(workdir, "dataset"), "chunks")
    scored = np.concatenate(
        [chunks.read_chunk(chunks_dir, i)["scored_dice"] for i in range(chunks.chunk_count(chunks_dir))]
    )
    kept = np.asarray([float(synthetic[i]["lesion_dice"]) for i in range(len(synthetic))])
    reading = f"the real-trained segmentors on synthetic images, {kind} Dice"
    if kind == "class":
        reading = "the real-trained classifier on synthetic images, fraction given the asked-for class"
    elif lesion.task(config) == "detect":
        reading = (
            f"the real-trained detector's confident boxes on synthetic images against the asked-for ones, "
            f"{kind} Dice"
        )
    lines += [
        "",
        f"Lesion fidelity ({reading}): "
        f"{np.mean(scored):.3f} mean over the {len(scored)} samples that reached stage C's filter, "
        f"{np.mean(kept):.3f} over the {len(kept)} it kept.",
    ]
    return lines + _inception_note(extractor)


def _inception_note(extractor) -> list[str]:
    if extractor is not None:
        return []
    return [
        "",
        "FID/KID need the FID Inception-v3 weights: set `config.verify.quality.inception_weights` to the "
        "converted file (see `synth/metrics/inception.py` for which file and how to make it).",
    ]


def _write_report(workdir: str, config, rows: list[dict], num_real: int, synthetic_name, quality) -> None:
    out_dir = workdir_lib.stage_dir(workdir, NAME)
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    with open(os.path.join(out_dir, "results.csv.tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(os.path.join(out_dir, "results.csv.tmp"), os.path.join(out_dir, "results.csv"))
    scores = segmentor.scores(config)
    table = aggregate(rows, scores)
    pct = lambda x: f"{x * 100:g} %"  # noqa: E731
    amount = lambda x: "0" if x == 0 else (f"×{x:g}" if x >= 1 and float(x).is_integer() else pct(x))  # noqa: E731
    if lesion.task(config) == "classify":
        model, meaning = "classifier", "accuracy is the fraction of test images given their class (T7)"
    elif lesion.task(config) == "detect":
        model = "detector"
        meaning = "mAP@0.5 is VOC's all-point average precision at IoU 0.5, mean over the box classes (T8)"
    elif config.segmentor.get("metrics", "dice") == "vessel":
        model = "vessel segmentor"
        meaning = "sensitivity, accuracy and AUC count the pixels inside the field of view only (T6)"
    else:
        model = "segmentor"
        meaning = (
            "Dice is the standard per-image region Dice, mean over the modalities' segmentors; parity "
            "Dice/MSE are the authors' (§9.4)"
        )
    lines = [
        f"Downstream {model} (`config.segmentor`: "
        f"{'SSD' if model == 'detector' else config.segmentor.variant}, {config.segmentor.model.size}) "
        f"trained on each mix for the same {rows[0]['steps']} steps ({config.verify.budget_epochs:g} "
        f"epochs of the {num_real} real training images, §8.1), evaluated on the real test split; mean ± std "
        f"over {table[0]['seeds']} seed(s). Synthetic data: `{synthetic_name or 'none'}`. Amounts are "
        f"relative to the real training set; {meaning}.",
        "",
        "| real | synthetic | augmented | mode | examples | " + " | ".join(h for _, h in scores) + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in scores) + " |",
    ]
    for e in table:
        cells = [f"{e[s]:.3f} ± {e[s + '_std']:.3f}" for s, _ in scores]
        lines.append(
            f"| {pct(e['real'])} | {amount(e['syn'])} | {amount(e['aug'])} | {e['mode']} | {e['examples']} | "
            + " | ".join(cells)
            + " |"
        )
    _plot(os.path.join(out_dir, "samples", "score_vs_synthetic.png"), table, scores[0])
    lines += [
        "",
        "Per run: `verify/results.csv`.",
        "",
        f"![{scores[0][1]} against synthetic amount](verify/samples/score_vs_synthetic.png)",
        "",
        *quality,
    ]
    with open(os.path.join(out_dir, "summary.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out_dir, "summary.md.tmp"), os.path.join(out_dir, "summary.md"))


def _plot(path: str, table: list[dict], score: tuple[str, str]) -> None:
    """The main score (e.g. whole-tumour Dice) against the synthetic amount, per mode and real fraction."""
    key, heading = score
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    # One line per mode and real fraction: "synthetic only" is not a point on the real-100 % curve.
    for mode, real in dict.fromkeys((e["mode"], e["real"]) for e in table):
        points = sorted(
            (e["syn"], e[key], e[key + "_std"]) for e in table if (e["mode"], e["real"]) == (mode, real)
        )
        x, y, err = zip(*points, strict=True)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"mode {mode}, real {real * 100:g} %")
    ax.set_xlabel("synthetic amount (× real training set)")
    ax.set_ylabel(f"{heading} (real test split)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
