"""Stage `dataset` (stage C, METHOD §7): registered multimodal samples with known lesions, as many as asked.

Per batch, with the frozen networks of the earlier stages (`synth.generate.Generator`):
  1. structure maps and organ masks are drawn from the stage-A generator through its quality filter
     (§5.4); a slot whose draws all fail is rejected by the structure filter;
  2. each slot tries up to `label_tries` lesion labels from the pool, keeping the first that lies inside
     its organ (§3.7); none fitting rejects the slot (placement). The pool is made of real training
     labels, randomly rotated, flipped, scaled and shifted with nearest resampling (label-safe, fixing
     §2.2), or of the user's own label maps (`labels_dir`);
  3. G synthesises all K modalities of the batch at once, split over the device mesh;
  4. the real-trained segmentors read every modality, and a sample is kept only if its lesion Dice
     against the label it was made from reaches `dice.threshold` (§7.1 step 8; the Dice definition is
     `dice.kind`, see `synth.generate`).

Each batch's accepted samples are written at once, atomically, to `dataset/chunks/batch_NNNNNN.npz`; batch
b's randomness is a pure function of (seed, b), so a resumed run continues at the first missing batch and
ends with the same samples, ids and count as an uninterrupted one. When enough samples are accepted, the
chunks become the TFDS dataset `synthetic/<dataset>_<config>` in `dataset/tfds` (provenance in its
metadata), optionally exported to NIfTI/PNG, and the stage writes its report section: acceptance counts,
the lesion-Dice distribution, accepted against rejected samples, and a memorisation audit against the
real training images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from synth import boxes, extraction, generate, input_pipeline, label_pool, sharding, train
from synth import writer as writer_lib
from synth.stages import segmentor

NAME = "dataset"
REJECTION_REASONS = ("structure", "placement", "dice")
_KEPT_REJECTED_PER_BATCH = 2  # Rejected samples kept for the report's grid.
# Settings that may change between a run and its resumption: they do not change what is generated.
_RESUMABLE_KEYS = ("log_every", "export", "audit", "max_batches")
_REMEDIES = {
    "structure": "train stage A longer, or relax config.structure.filter (or dataset.structure_filter)",
    "placement": "raise config.dataset.label_tries, or use smaller lesion labels",
    "dice": "train the segmentors and the generator longer, or lower config.dataset.dice.threshold",
}
log = logging.getLogger("synth")


def _fingerprint(config: ml_collections.ConfigDict, provenance: dict) -> dict:
    fingerprint = train._fingerprint(NAME, config, provenance)  # noqa: SLF001
    for key in _RESUMABLE_KEYS:
        fingerprint[NAME].pop(key, None)
    fingerprint[NAME].pop("num_examples", None)  # More samples may be asked for later.
    fingerprint["rules"] = {
        "label_rule": config.synthesis.label_rule,
        "structure_filter": config.structure.filter.to_dict(),
    }
    return fingerprint


def _real_examples(source, max_count: int, *, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Up to `max_count` examples of a real split, evenly spread over it, stacked."""
    n = len(source)
    index = np.unique(np.linspace(0, n - 1, num=min(n, max_count)).astype(int))
    rows = [source[int(i)] for i in index]
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in keys}


def make_label_pool(config: ml_collections.ConfigDict, image_hw) -> tuple[np.ndarray, str]:
    """The lesion labels stage C draws from, and a description for the provenance.

    The user's label maps when `config.dataset.labels_dir` is set (used as they are); otherwise the
    augmented pool of real training labels.
    """
    ds = config.dataset
    if ds.labels_dir:
        labels, _ = label_pool.load_user_labels(
            ds.labels_dir, image_hw=tuple(image_hw), num_classes=config.data.num_classes
        )
        return labels, f"user labels from {os.path.abspath(ds.labels_dir)} ({len(labels)})"
    source = input_pipeline.open_source(config.data, config.data.train_split)
    labels = _real_examples(source, ds.pool.max_sources, keys=("label",))["label"]
    params = label_pool.AugmentParams.from_config(ds.pool.augment)
    pool = label_pool.make_pool(labels, ds.pool.size, seed=config.seed, params=params)
    return pool, f"augmented pool of {len(pool)} from {len(labels)} real training labels"


def draw_fitting_labels(pool, organs, rng: np.random.Generator, *, tries: int, rule: str):
    """For each organ mask, the first of `tries` random pool labels that lies inside it.

    Returns:
      `(labels (B, H, W) uint8, placed (B,) bool)`; slots where none fitted get an empty label.
    """
    b = organs.shape[0]
    candidates = rng.integers(len(pool), size=(b, tries))
    labels = pool[candidates]  # (B, T, H, W)
    organs_t = np.repeat(organs[:, None], tries, axis=1)
    flat = (-1,) + labels.shape[2:]
    fits = label_pool.fits(labels.reshape(flat), organs_t.reshape(flat), rule=rule)
    fits = np.asarray(fits).reshape(b, tries)
    placed = fits.any(axis=1)
    chosen = labels[np.arange(b), np.argmax(fits, axis=1)]
    return np.where(placed[:, None, None], chosen, 0).astype(np.uint8), placed


def generate_batch(gen: generate.Generator, pool, index: int, config) -> dict[str, Any]:
    """Batch `index` of the stage: samples, their scores and why each rejected one was rejected."""
    ds = config.dataset
    key = jax.random.fold_in(train.stage_rngs(config.seed, NAME)[1], index)
    structure_key, noise_key = jax.random.split(key)
    t0 = time.perf_counter()
    structures = gen.sample_structures(structure_key, ds.batch_size)
    rng = np.random.default_rng([config.seed, index])
    labels, placed = draw_fitting_labels(
        pool, structures["masks"], rng, tries=ds.label_tries, rule=config.synthesis.label_rule
    )
    images = gen.synthesize(structures["maps"], structures["masks"], labels, noise_key)
    t1 = time.perf_counter()
    dice = gen.lesion_dice(images, labels, kind=ds.dice.kind)
    labels = synthetic_labels(gen, images, labels, structures, config)
    boxes = _label_boxes(labels, config)
    t2 = time.perf_counter()
    structure_ok = structures["accepted"] | (not ds.structure_filter)
    reason = np.where(~structure_ok, 0, np.where(~placed, 1, np.where(dice < ds.dice.threshold, 2, -1)))
    return dict(
        images=images,
        labels=labels,
        maps=structures["maps"],
        masks=structures["masks"],
        dice=dice.astype(np.float32),
        reason=reason,
        scored=structure_ok & placed,
        seconds=(t1 - t0, t2 - t1),
        **boxes,
    )


def _label_boxes(labels: np.ndarray, config) -> dict[str, np.ndarray]:
    """A detection family's boxes of each written label (its filled boxes, moved by the augmentation)."""
    if segmentor.task(config) != "detect":
        return {}
    options = config.data.adapter_options
    pairs = [
        boxes.boxes_from_label_map(m, max_boxes=options.max_boxes, num_classes=config.data.num_classes)
        for m in labels
    ]
    return {"boxes": np.stack([b for b, _ in pairs]), "box_classes": np.stack([c for _, c in pairs])}


SYNTHETIC_LABELS = ("lesion", "vessels", "segmentor")


def synthetic_labels(gen: generate.Generator, images, labels, structures, config) -> np.ndarray:
    """The label each synthetic sample is written with, for stage D (`config.dataset.synthetic_label`).

    - `lesion`: the lesion label it was made from (BRATS, X-ray class maps);
    - `vessels`: coarse vessels from its own structure map inside its field of view shrunk by
      `vessel_shrink` (a fraction of the image height), so the outer contour of the fundus disc is not a
      vessel (retina, §8.2, which the authors described but never implemented);
    - `segmentor`: what the real-trained segmentor (modality 0's) finds in it, a pseudo-label, for
      families without lesion input whose downstream task still needs labels (lung CT's lung masks).
    """
    kind = config.dataset.get("synthetic_label", "lesion")
    if kind == "lesion":
        return labels
    if kind == "vessels":
        shrink = max(1, round(config.dataset.get("vessel_shrink", 0.03) * gen.image_hw[0]))
        return extraction.coarse_vessel_labels(structures["maps"], structures["masks"], shrink=shrink)
    if kind == "segmentor":
        return gen.segment(images)[0].astype(np.uint8)
    raise ValueError(f"Unknown config.dataset.synthetic_label {kind!r}; choose one of {SYNTHETIC_LABELS}")


def _chunk_arrays(batch: dict[str, Any], index: int) -> dict[str, np.ndarray]:
    keep = batch["reason"] < 0
    ids = np.array([f"{index:06d}-{slot:03d}" for slot in np.flatnonzero(keep)], dtype=str)
    rejected = np.flatnonzero(~keep)[:_KEPT_REJECTED_PER_BATCH]
    return {
        "id": ids,
        "image": batch["images"][keep].astype(np.float32),
        "label": batch["labels"][keep].astype(np.uint8),
        "structure": batch["maps"][keep].astype(np.uint8),
        "organ": batch["masks"][keep].astype(np.uint8),
        "lesion_dice": batch["dice"][keep],
        **{k: batch[k][keep] for k in ("boxes", "box_classes") if k in batch},
        # Statistics for the report.
        "generated": np.int64(len(keep)),
        "rejected": np.array([np.sum(batch["reason"] == r) for r in range(len(REJECTION_REASONS))]),
        "scored_dice": batch["dice"][batch["scored"]],
        "seconds": np.asarray(batch["seconds"], np.float64),
        "rejected_image": batch["images"][rejected].astype(np.float32),
        "rejected_label": batch["labels"][rejected].astype(np.uint8),
        "rejected_structure": batch["maps"][rejected].astype(np.uint8),
        "rejected_dice": batch["dice"][rejected],
        "rejected_reason": batch["reason"][rejected],
    }


class _Tally:
    """Running counts over the chunks written so far (re-read on resume)."""

    def __init__(self):
        self.accepted = self.generated = 0
        self.rejected = np.zeros(len(REJECTION_REASONS), np.int64)
        self.seconds = np.zeros(3)  # generation, filtering, writing

    def add(self, chunk: dict[str, np.ndarray], write_seconds: float = 0.0) -> None:
        self.accepted += len(chunk["id"])
        self.generated += int(chunk["generated"])
        self.rejected += np.asarray(chunk["rejected"], np.int64)
        self.seconds += np.append(np.asarray(chunk["seconds"]), write_seconds)

    def line(self, index: int, wanted: int, rate: float, eta: float) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in zip(REJECTION_REASONS, self.rejected, strict=True))
        share = 100.0 * self.accepted / max(self.generated, 1)
        return (
            f"[{NAME}] batch {index} | accepted {self.accepted}/{wanted} ({share:.0f}% of "
            f"{self.generated}) | rejected: {reasons} | {rate:.2f} accepted/s | "
            f"ETA {writer_lib.format_seconds(eta)}"
        )


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at: int | None = None):
    """Generates, filters and writes the synthetic dataset in `workdir/dataset`, resuming if interrupted.

    Args:
      stop_at: stop after this many batches in all (for tests and notebooks); the run can be resumed.

    Returns:
      The built TFDS builder, or None when stopped early or already complete.
    """
    from data_builders.synthetic import synthetic_dataset_builder as chunks

    ds = config.dataset
    _check_config(config)
    out_dir = train.stage_dir(workdir, NAME)
    done_path = os.path.join(out_dir, "done.json")
    if sharding.agree(_done_for(done_path, ds.num_examples)):
        log.info("[%s] complete: nothing to do", NAME)
        return None
    gen = generate.Generator.from_workdir(workdir, config)
    fingerprint = _fingerprint(config, gen.provenance)
    train._check_same_config(NAME, out_dir, fingerprint)  # noqa: SLF001
    chunks_dir = os.path.join(out_dir, "chunks")
    if jax.process_index() == 0:
        os.makedirs(chunks_dir, exist_ok=True)
        train._write_json(os.path.join(out_dir, "stage_config.json"), fingerprint)  # noqa: SLF001
    pool, pool_description = make_label_pool(config, gen.image_hw)

    tally = _Tally()
    start = chunks.chunk_count(chunks_dir)
    for index in range(start):
        tally.add(chunks.read_chunk(chunks_dir, index))
    if start:
        log.info("[%s] resuming at batch %d with %d accepted samples", NAME, start, tally.accepted)
    max_batches = ds.max_batches or max(10, 20 * math.ceil(ds.num_examples / ds.batch_size))
    index, t_start, accepted_at_start = start, time.perf_counter(), tally.accepted
    while tally.accepted < ds.num_examples:
        if stop_at is not None and index >= stop_at:
            log.info("[%s] stopped at batch %d (stop_at); rerun to resume", NAME, index)
            return None
        if index >= max_batches:
            worst = REJECTION_REASONS[int(np.argmax(tally.rejected))]
            raise RuntimeError(
                f"[{NAME}] only {tally.accepted} of {ds.num_examples} samples accepted after {index} batches "
                f"(rejected: {dict(zip(REJECTION_REASONS, tally.rejected.tolist(), strict=True))}). Most "
                f"were rejected by the {worst} filter: {_REMEDIES[worst]}, or raise "
                "config.dataset.max_batches and rerun (the accepted samples are kept)."
            )
        arrays = _chunk_arrays(generate_batch(gen, pool, index, config), index)
        t0 = time.perf_counter()
        if jax.process_index() == 0:
            chunks.write_chunk(chunks_dir, index, arrays)
        tally.add(arrays, time.perf_counter() - t0)
        index += 1
        if index % ds.log_every == 0 or tally.accepted >= ds.num_examples:
            elapsed = time.perf_counter() - t_start
            rate = (tally.accepted - accepted_at_start) / max(elapsed, 1e-9)
            eta = (ds.num_examples - tally.accepted) / rate if rate > 0 else float("inf")
            log.info(tally.line(index, ds.num_examples, rate, max(eta, 0.0)))

    builder = None
    if jax.process_index() == 0:
        builder = _finish(config, gen, chunks_dir, out_dir, tally, index, pool_description)
    return builder


def _channel_names(config) -> list[str]:
    """One name per image channel for the exports: the modalities, or `fundus_0..2` for RGB ones."""
    channels = int(config.data.get("channels", 1))
    if channels == 1:
        return list(config.data.modalities)
    return [f"{m}_{c}" for m in config.data.modalities for c in range(channels)]


def _lesion_setting(dice) -> str:
    """How stage C's lesion filter is set, in words, for the report's table."""
    if dice.kind == "none":
        return "off (no lesion input)"
    if dice.kind == "class":
        return f"classifier agrees on ≥ {dice.threshold:g} of the modalities"
    return f"{dice.kind} Dice ≥ {dice.threshold}"


def _done_for(path: str, num_examples: int) -> bool:
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("num_examples", -1) >= num_examples


def _check_config(config: ml_collections.ConfigDict) -> None:
    ds = config.dataset
    if ds.dice.kind not in generate.DICE_KINDS:
        raise ValueError(f"config.dataset.dice.kind {ds.dice.kind!r}: choose one of {generate.DICE_KINDS}")
    for key in ("num_examples", "batch_size", "label_tries", "log_every"):
        value = ds[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.dataset.{key} must be a positive integer, got {value!r}")
    if ds.get("synthetic_label", "lesion") not in SYNTHETIC_LABELS:
        raise ValueError(
            f"Unknown config.dataset.synthetic_label {ds.synthetic_label!r}; choose one of {SYNTHETIC_LABELS}"
        )
    unknown = sorted(set(ds.export) - {"nifti", "png"})
    if unknown:
        raise ValueError(f"config.dataset.export: unknown format(s) {unknown}; choose from 'nifti', 'png'")


def _finish(config, gen, chunks_dir, out_dir, tally: _Tally, num_batches: int, pool_description: str):
    """The TFDS dataset, exports, report section and done marker of a complete generation."""
    from data_builders.synthetic import synthetic_dataset_builder as chunks

    ds = config.dataset
    source = input_pipeline.open_source(config.data, config.data.train_split)
    counts = {
        "num_examples": int(ds.num_examples),
        "generated": int(tally.generated),
        **{f"rejected_{r}": int(n) for r, n in zip(REJECTION_REASONS, tally.rejected, strict=True)},
    }
    manifest = {
        "num_examples": int(ds.num_examples),
        "modalities": list(gen.modalities),
        "label_names": _label_names(config),
        "spacing": np.asarray(source[0].get("spacing", (1.0, 1.0, 1.0)), float).tolist(),
        "source_workdir": gen.workdir,
        "source_dataset": f"{config.data.name}/{config.data.builder_config}",
        **{k: v for k, v in gen.provenance.items()},
        "seed": int(config.seed),
        "dice_kind": ds.dice.kind,
        "dice_threshold": float(ds.dice.threshold),
        "structure_filter": bool(ds.structure_filter),
        "label_rule": config.synthesis.label_rule,
        "label_source": pool_description,
        **counts,
    }
    chunks.write_manifest(chunks_dir, manifest)
    channels = next(chunks.iterate_samples(chunks_dir, 1))["image"].shape[-1]
    detect = segmentor.task(config) == "detect"
    builder_config = chunks.config_for(
        manifest["source_dataset"],
        gen.image_hw,
        channels,
        gen.modalities,
        manifest["label_names"],
        box_label_ids=tuple(config.data.adapter_options.classes) if detect else (),
    )
    tfds_dir = os.path.join(out_dir, "tfds")
    builder = chunks.build(chunks_dir, tfds_dir, builder_config)
    name = f"synthetic/{builder_config.name}"
    log.info("[%s] wrote %d samples as %s in %s", NAME, ds.num_examples, name, tfds_dir)
    for fmt in ds.export:
        from synth import export

        target = os.path.join(out_dir, "export", fmt)
        examples = builder.as_data_source("train")
        if fmt == "nifti":
            export.export_nifti(examples, target, modalities=_channel_names(config))
        else:
            export.export_png(
                examples, target, modalities=_channel_names(config), num_classes=config.data.num_classes
            )
        log.info("[%s] exported %s files to %s", NAME, fmt, target)
    lines = _summary(config, gen, chunks_dir, out_dir, tally, num_batches, name, tfds_dir, source)
    with open(os.path.join(out_dir, "summary.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out_dir, "summary.md.tmp"), os.path.join(out_dir, "summary.md"))
    train._write_json(  # noqa: SLF001
        os.path.join(out_dir, "done.json"), {**counts, "dataset": name, "finished": time.time()}
    )
    return builder


def _label_names(config) -> list[str]:
    """The real dataset's label names (its builder's metadata), else BRATS's or numbered ones."""
    import data_builders
    from data_builders import schema

    builder = data_builders.get_builder(config.data.name, **input_pipeline.builder_kwargs(config.data))
    names = (builder.info.metadata or {}).get("label_names", [])
    if segmentor.task(config) == "detect" and isinstance(names, dict):  # Box classes by dataset id.
        return ["background"] + [
            str(names.get(str(c), f"class_{c}")) for c in config.data.adapter_options.classes
        ]
    names = list(names)
    if len(names) == config.data.num_classes:
        return [str(n) for n in names]
    if config.data.num_classes == len(schema.BRATS_LABEL_NAMES):
        return list(schema.BRATS_LABEL_NAMES)
    return [f"class_{i}" for i in range(config.data.num_classes)]


def _summary(config, gen, chunks_dir, out_dir, tally: _Tally, num_batches, name, tfds_dir, source):
    """The stage's report section: counts, timing, the Dice distribution, sample grids, the audit."""
    from data_builders.synthetic import synthetic_dataset_builder as chunks
    from synth import memorisation

    ds = config.dataset
    samples_dir = os.path.join(out_dir, "samples")
    os.makedirs(samples_dir, exist_ok=True)
    scored, rejected = [], []
    for index in range(num_batches):
        chunk = chunks.read_chunk(chunks_dir, index)
        scored.append(chunk["scored_dice"])
        rejected += [
            (chunk["rejected_image"][i], chunk["rejected_label"][i], chunk["rejected_structure"][i])
            for i in range(len(chunk["rejected_reason"]))
        ]
    scored = np.concatenate(scored) if scored else np.zeros(0)
    accepted = list(chunks.iterate_samples(chunks_dir, ds.num_examples))
    gen_s, filter_s, write_s = tally.seconds
    total = max(gen_s + filter_s + write_s, 1e-9)
    lines = [
        f"Dataset `{name}` in `{os.path.relpath(tfds_dir, os.path.dirname(out_dir))}`: {ds.num_examples} "
        f"kept of {tally.generated} generated; {tally.accepted} were accepted "
        f"({100.0 * tally.accepted / max(tally.generated, 1):.1f}%), the last batch's extras are not used.",
        "",
        "| filter | rejected | setting |",
        "| --- | --- | --- |",
        f"| structure (§5.4) | {tally.rejected[0]} | {'on' if ds.structure_filter else 'off'}, "
        f"max_count {config.structure.filter.max_count} |",
        f"| placement (§3.7) | {tally.rejected[1]} | rule {config.synthesis.label_rule}, "
        f"{ds.label_tries} tries |",
        f"| lesion (§7.1) | {tally.rejected[2]} | {_lesion_setting(ds.dice)} |",
        "",
        f"Time: generation {gen_s:.1f} s ({100 * gen_s / total:.0f}%), filtering {filter_s:.1f} s "
        f"({100 * filter_s / total:.0f}%), writing {write_s:.1f} s ({100 * write_s / total:.0f}%).",
        "",
    ]
    if len(scored) and ds.dice.kind != "none":
        q = np.percentile(scored, [10, 50, 90])
        lines += [
            f"Lesion Dice of the {len(scored)} samples that reached the Dice filter: 10th/50th/90th "
            f"percentile {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}.",
            "",
        ]
        _write_histogram(os.path.join(samples_dir, "lesion_dice.png"), scored, ds.dice.threshold)
        lines += ["![lesion Dice](dataset/samples/lesion_dice.png)", ""]
    rows = [_row(s["image"], s["label"], s["structure"], config) for s in accepted[:4]]
    rows += [_row(image, label, s, config) for image, label, s in rejected[:4]]
    if rows:
        grid = writer_lib.image_grid(rows)
        _save_png(os.path.join(samples_dir, "accepted_then_rejected.png"), grid)
        lines += [
            f"Accepted (top {min(4, len(accepted))} rows) and rejected (bottom {min(4, len(rejected))}) "
            "samples: structure map, label, " + ", ".join(gen.modalities) + ".",
            "",
            "![accepted and rejected](dataset/samples/accepted_then_rejected.png)",
            "",
        ]
    audit = ds.audit
    synthetic = np.stack([s["image"] for s in accepted[: audit.max_synthetic]])
    real = _real_examples(source, audit.max_real, keys=("image", "id"))
    result = memorisation.audit(
        synthetic, real["image"].astype(np.float32), metric=audit.metric, threshold=audit.threshold
    )
    section = memorisation.write_audit(
        samples_dir,
        synthetic,
        real["image"].astype(np.float32),
        result,
        num_pairs=audit.num_pairs,
        synthetic_ids=[str(s["id"]) for s in accepted[: audit.max_synthetic]],
        real_ids=[r.decode() if isinstance(r, bytes) else str(r) for r in real["id"]],
    )
    lines += [_relink(section, "dataset/samples/")]
    return lines


def _relink(markdown: str, prefix: str) -> str:
    """Makes the audit's image links (relative to the samples folder) relative to the workdir report."""
    import re

    markdown = re.sub(r"^## ", "### ", markdown, flags=re.MULTILINE)  # A subsection of the stage's.
    return re.sub(r"\]\((?!/|https?:)([^)]+)\)", lambda m: f"]({prefix}{m.group(1)})", markdown)


def _row(image, label, structure, config) -> list[np.ndarray]:
    row = [np.asarray(structure, np.float32), writer_lib.label_colours(label, config.data.num_classes)]
    return row + [np.asarray(image)[..., j] for j in range(np.shape(image)[-1])]


def _save_png(path: str, image: np.ndarray) -> None:
    import cv2

    tmp = path + ".tmp.png"
    cv2.imwrite(tmp, writer_lib.to_uint8(image)[..., ::-1])
    os.replace(tmp, path)


def _write_histogram(path: str, values: np.ndarray, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(values, bins=20, range=(0.0, 1.0), color="tab:blue")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold}")
    ax.set_xlabel("lesion Dice (real-trained segmentors)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
