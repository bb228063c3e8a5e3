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
metadata), optionally exported to NIfTI/PNG, and the stage writes its report section
(`synth.stages.dataset_report`): acceptance counts, the lesion-Dice distribution, accepted against
rejected samples, and a memorisation audit against the real training images.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from synth import (
    boxes,
    configlib,
    extraction,
    generate,
    input_pipeline,
    label_files,
    label_pool,
    lesion,
    scoring,
    sharding,
    train,
)
from synth import workdir as workdir_lib
from synth.stages import dataset_report

NAME = "dataset"
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
    # More samples may be asked for later: num_examples does not change what is generated either.
    fingerprint = workdir_lib.fingerprint(
        NAME, config, provenance, resumable=_RESUMABLE_KEYS + ("num_examples",)
    )
    fingerprint["rules"] = {
        "label_rule": config.synthesis.label_rule,
        "structure_filter": config.structure.filter.to_dict(),
    }
    return fingerprint


def make_label_pool(config: ml_collections.ConfigDict, image_hw) -> tuple[np.ndarray, str]:
    """The lesion labels stage C draws from, and a description for the provenance.

    The user's label maps when `config.dataset.labels_dir` is set (used as they are); otherwise the
    augmented pool of real training labels.
    """
    ds = config.dataset
    if ds.labels_dir:
        labels, _ = label_files.load_user_labels(
            ds.labels_dir, image_hw=tuple(image_hw), num_classes=config.data.num_classes
        )
        return labels, f"user labels from {os.path.abspath(ds.labels_dir)} ({len(labels)})"
    source = input_pipeline.open_source(config.data, config.data.train_split)
    labels = dataset_report.real_examples(source, ds.pool.max_sources, keys=("label",))["label"]
    params = label_pool.AugmentParams.from_config(ds.pool.augment)
    pool = label_pool.make_pool(
        labels, ds.pool.size, seed=config.seed, params=params, keep_empty=ds.pool.get("keep_empty", False)
    )
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
    if lesion.task(config) != "detect":
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
        "rejected": np.array(
            [np.sum(batch["reason"] == r) for r in range(len(dataset_report.REJECTION_REASONS))]
        ),
        "scored_dice": batch["dice"][batch["scored"]],
        "seconds": np.asarray(batch["seconds"], np.float64),
        "rejected_image": batch["images"][rejected].astype(np.float32),
        "rejected_label": batch["labels"][rejected].astype(np.uint8),
        "rejected_structure": batch["maps"][rejected].astype(np.uint8),
        "rejected_dice": batch["dice"][rejected],
        "rejected_reason": batch["reason"][rejected],
    }


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
    out_dir = workdir_lib.stage_dir(workdir, NAME)
    if workdir_lib.done_with(out_dir, "num_examples", ds.num_examples):
        log.info("[%s] complete: nothing to do", NAME)
        return None
    gen = generate.Generator.from_workdir(workdir, config)
    fingerprint = _fingerprint(config, gen.provenance)
    workdir_lib.check_same_config(NAME, out_dir, fingerprint)
    chunks_dir = os.path.join(out_dir, "chunks")
    if sharding.is_main_process():
        os.makedirs(chunks_dir, exist_ok=True)
    workdir_lib.write_fingerprint(out_dir, fingerprint)
    pool, pool_description = make_label_pool(config, gen.image_hw)

    tally = dataset_report.Tally()
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
            reasons = dataset_report.REJECTION_REASONS
            worst = reasons[int(np.argmax(tally.rejected))]
            raise RuntimeError(
                f"[{NAME}] only {tally.accepted} of {ds.num_examples} samples accepted after {index} batches "
                f"(rejected: {dict(zip(reasons, tally.rejected.tolist(), strict=True))}). Most "
                f"were rejected by the {worst} filter: {_REMEDIES[worst]}, or raise "
                "config.dataset.max_batches and rerun (the accepted samples are kept)."
            )
        arrays = _chunk_arrays(generate_batch(gen, pool, index, config), index)
        t0 = time.perf_counter()
        if sharding.is_main_process():
            chunks.write_chunk(chunks_dir, index, arrays)
        tally.add(arrays, time.perf_counter() - t0)
        index += 1
        if index % ds.log_every == 0 or tally.accepted >= ds.num_examples:
            elapsed = time.perf_counter() - t_start
            rate = (tally.accepted - accepted_at_start) / max(elapsed, 1e-9)
            eta = (ds.num_examples - tally.accepted) / rate if rate > 0 else float("inf")
            log.info(tally.line(index, ds.num_examples, rate, max(eta, 0.0)))

    builder = None
    if sharding.is_main_process():
        builder = dataset_report.finish(config, gen, chunks_dir, out_dir, tally, index, pool_description)
    return builder


def _check_config(config: ml_collections.ConfigDict) -> None:
    ds = config.dataset
    configlib.check_choice("dataset.dice.kind", ds.dice.kind, scoring.DICE_KINDS)
    for key in ("num_examples", "batch_size", "label_tries", "log_every"):
        value = ds[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.dataset.{key} must be a positive integer, got {value!r}")
    configlib.check_choice("dataset.synthetic_label", ds.get("synthetic_label", "lesion"), SYNTHETIC_LABELS)
    unknown = sorted(set(ds.export) - {"nifti", "png"})
    if unknown:
        raise ValueError(f"config.dataset.export: unknown format(s) {unknown}; choose from 'nifti', 'png'")
