"""Stage C's bookkeeping and report: the running tally, the finished TFDS dataset, exports, the summary.

`Tally` counts accepted and rejected samples over the chunks written so far (`synth.stages.dataset`
prints it as progress). When enough samples are accepted, `finish` builds the TFDS dataset from the
chunks (provenance in its metadata), exports files, and writes the stage's report section: acceptance
counts per filter, timing, the lesion-Dice distribution, accepted against rejected samples, and a
memorisation audit against the real training images (`synth.memorisation`).
"""

from __future__ import annotations

import logging
import os
import re
import time

import cv2
import numpy as np

from synth import export, input_pipeline, lesion, memorisation, memorisation_report, workdir
from synth import writer as writer_lib

NAME = "dataset"
REJECTION_REASONS = ("structure", "placement", "dice")
log = logging.getLogger("synth")


def real_examples(source, max_count: int, *, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Up to `max_count` examples of a real split, evenly spread over it, stacked."""
    n = len(source)
    index = np.unique(np.linspace(0, n - 1, num=min(n, max_count)).astype(int))
    rows = [source[int(i)] for i in index]
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in keys}


class Tally:
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


def finish(config, gen, chunks_dir, out_dir, tally: Tally, num_batches: int, pool_description: str):
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
    detect = lesion.task(config) == "detect"
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
    workdir.done(out_dir, {**counts, "dataset": name, "finished": time.time()})
    return builder


def _label_names(config) -> list[str]:
    """The real dataset's label names (its builder's metadata), else BRATS's or numbered ones."""
    import data_builders
    from data_builders import schema

    builder = data_builders.get_builder(config.data.name, **input_pipeline.builder_kwargs(config.data))
    names = (builder.info.metadata or {}).get("label_names", [])
    if lesion.task(config) == "detect" and isinstance(names, dict):  # Box classes by dataset id.
        return ["background"] + [
            str(names.get(str(c), f"class_{c}")) for c in config.data.adapter_options.classes
        ]
    names = list(names)
    if len(names) == config.data.num_classes:
        return [str(n) for n in names]
    if config.data.num_classes == len(schema.BRATS_LABEL_NAMES):
        return list(schema.BRATS_LABEL_NAMES)
    return [f"class_{i}" for i in range(config.data.num_classes)]


def _summary(config, gen, chunks_dir, out_dir, tally: Tally, num_batches, name, tfds_dir, source):
    """The stage's report section: counts, timing, the Dice distribution, sample grids, the audit."""
    from data_builders.synthetic import synthetic_dataset_builder as chunks

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
    real = real_examples(source, audit.max_real, keys=("image", "id"))
    result = memorisation.audit(
        synthetic, real["image"].astype(np.float32), metric=audit.metric, threshold=audit.threshold
    )
    section = memorisation_report.write_audit(
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
    markdown = re.sub(r"^## ", "### ", markdown, flags=re.MULTILINE)  # A subsection of the stage's.
    return re.sub(r"\]\((?!/|https?:)([^)]+)\)", lambda m: f"]({prefix}{m.group(1)})", markdown)


def _row(image, label, structure, config) -> list[np.ndarray]:
    row = [np.asarray(structure, np.float32), writer_lib.label_colours(label, config.data.num_classes)]
    return row + [np.asarray(image)[..., j] for j in range(np.shape(image)[-1])]


def _save_png(path: str, image: np.ndarray) -> None:
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
