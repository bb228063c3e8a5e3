"""The memorisation audit's report: closest pairs side by side, a histogram and a Markdown section.

`write_audit` turns an `synth.memorisation.AuditResult` into files in a folder and the Markdown that
links them, for stage C's section of the workdir report. Every file is written atomically.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from synth import memorisation
from synth.writer import image_grid, to_uint8

PAIRS_FILE = "memorisation_pairs.png"
HISTOGRAM_FILE = "memorisation_similarity.png"
MAX_LISTED_IDS = 20  # Flagged ids listed in the Markdown table; the rest are counted.


def _atomic_write(out_dir: str, name: str, write: Callable[[str], None]) -> str:
    """Call ``write(temp_path)`` for a temp file in ``out_dir``, then rename it to ``name``."""
    path = os.path.join(out_dir, name)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _display(picture: np.ndarray, modality: int | None) -> np.ndarray:
    """One (H, W, K) image as the (H, W) or RGB (H, W, 3) tile shown, upscaled so small images are legible."""
    tile = picture if modality is None else picture[..., modality]
    scale = max(1, 128 // max(tile.shape[:2]))  # Nearest-neighbour, so the pixels stay the data's pixels.
    return np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)


def _write_pairs(
    out_dir: str,
    synthetic: Any,
    real: Any,
    result: memorisation.AuditResult,
    order: np.ndarray,
    modality: int | None,
) -> str:
    rows = []
    for i in order:
        synthetic_image = np.asarray(synthetic[int(i)], np.float32)
        real_image = np.asarray(real[int(result.nearest_index[i])], np.float32)
        difference = np.abs(synthetic_image - real_image)
        rows.append([_display(x, modality) for x in (synthetic_image, real_image, difference)])
    pixels = to_uint8(image_grid(rows))

    def save(tmp: str) -> None:
        from PIL import Image

        Image.fromarray(pixels).save(tmp, format="PNG")

    return _atomic_write(out_dir, PAIRS_FILE, save)


def _metric_label(metric: str) -> str:
    return "SSIM" if metric == "ssim" else "feature cosine similarity"


def _write_histogram(out_dir: str, result: memorisation.AuditResult) -> str:
    # Figure + Agg canvas directly instead of pyplot: no global backend switch, no shared figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = [result.similarity]
    if result.reference_similarity is not None:
        values.append(result.reference_similarity)
    everything = np.concatenate([*values, [result.threshold]])
    low, high = float(np.min(everything)), float(np.max(everything))
    edges = np.linspace(low, high if high > low else low + 1e-3, 41)

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(result.similarity, bins=edges, density=True, alpha=0.6, label="synthetic → nearest real")
    if result.reference_similarity is not None:
        axes.hist(
            result.reference_similarity,
            bins=edges,
            density=True,
            histtype="step",
            linewidth=2.0,
            label="real → nearest other real (reference)",
        )
    axes.axvline(result.threshold, color="crimson", linestyle="--", label=f"threshold {result.threshold:g}")
    axes.set_xlabel(f"{_metric_label(result.metric)} to the nearest real training image")
    axes.set_ylabel("density")
    axes.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    return _atomic_write(out_dir, HISTOGRAM_FILE, lambda tmp: figure.savefig(tmp, format="png"))


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _ids(ids: Sequence[Any] | None, count: int, name: str) -> list[str]:
    if ids is None:
        return [str(i) for i in range(count)]
    if len(ids) != count:
        raise ValueError(f"{name} has {len(ids)} entries for {count} images.")
    return [str(i) for i in ids]


def _summary(values: np.ndarray | None) -> str:
    if values is None:
        return "— (not computed)"
    return f"{np.median(values):.4f} / {np.percentile(values, 95):.4f}"


def write_audit(
    out_dir: str | os.PathLike,
    synthetic: Any,
    real: Any,
    result: memorisation.AuditResult,
    *,
    num_pairs: int = 8,
    synthetic_ids: Sequence[Any] | None = None,
    real_ids: Sequence[Any] | None = None,
    modality: int | None = 0,
    relative_to: str | os.PathLike | None = None,
) -> str:
    """Write the audit's closest pairs and similarity histogram into ``out_dir``; return its Markdown.

    Files (each written to a temp file and renamed, so a reader never sees half an image):

    * ``memorisation_pairs.png``: the ``num_pairs`` most similar synthetic samples, most similar first,
      one row each: synthetic | its nearest real image | absolute difference (black = identical), for
      the channel ``modality``. Images under 128 px are enlarged by pixel repetition.
    * ``memorisation_similarity.png``: histogram (densities) of the synthetic samples' similarity to
      their nearest real image, the real reference's overlaid, the threshold as a dashed line.

    Args:
        out_dir: directory for the two PNGs (created if missing).
        synthetic: the (N, H, W, K) images given to :func:`audit`.
        real: the (M, H, W, K) real images given to :func:`audit`.
        result: :func:`audit`'s result.
        num_pairs: pairs shown (at most N).
        synthetic_ids: N names of the synthetic samples for the report (default their indices).
        real_ids: M names of the real images (default their indices).
        modality: the channel shown; None shows the three channels as RGB (K = 3 only).
        relative_to: directory the Markdown's image links are relative to: that of the document it goes
            into, e.g. the workdir for ``report.md`` (default ``out_dir``).

    Returns:
        A Markdown section: ``## Memorisation audit``, a summary table (N, M, metric, threshold, flagged
        count and ids, median / 95th percentile of similarity for the synthetic samples and the real
        reference), a table of the pairs shown, and the two images.
    """
    memorisation.check_sets(synthetic, real)
    n, m, k = synthetic.shape[0], real.shape[0], synthetic.shape[-1]
    if result.similarity.shape != (n,) or result.nearest_index.shape != (n,):
        raise ValueError(
            f"result covers {result.similarity.shape[0]} synthetic samples but synthetic has {n}; "
            "pass the images the audit was run on."
        )
    if np.any(result.nearest_index >= m) or np.any(result.nearest_index < 0):
        raise ValueError(f"result refers to real images beyond the {m} given; pass the audit's real set.")
    if modality is None and k != 3:
        raise ValueError(f"modality=None (RGB) needs K = 3 channels, got K = {k}.")
    if modality is not None and not -k <= modality < k:
        raise ValueError(f"modality {modality} is out of range for K = {k} channels.")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be ≥ 1, got {num_pairs}.")
    synthetic_names = _ids(synthetic_ids, n, "synthetic_ids")
    real_names = _ids(real_ids, m, "real_ids")

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    order = np.argsort(-result.similarity, kind="stable")[:num_pairs]
    pairs_path = _write_pairs(out_dir, synthetic, real, result, order, modality)
    histogram_path = _write_histogram(out_dir, result)
    link_base = out_dir if relative_to is None else os.fspath(relative_to)

    flagged = result.flagged_indices
    listed = ", ".join(f"`{_cell(synthetic_names[i])}`" for i in flagged[:MAX_LISTED_IDS])
    if len(flagged) > MAX_LISTED_IDS:
        listed += f", … and {len(flagged) - MAX_LISTED_IDS} more"
    metric = _metric_label(result.metric)
    if result.metric == "ssim":
        metric += f" (mean over K = {k} channels)"
    lines = [
        "## Memorisation audit",
        "",
        "Each synthetic sample against its most similar real training image. A sample closer to a training "
        "image than real images are to one another (the reference: each real image against the other real "
        "images) may be a near-copy.",
        "",
        "| quantity | value |",
        "| --- | --- |",
        f"| synthetic samples (N) | {n} |",
        f"| real training images (M) | {m} |",
        f"| metric | {metric} |",
        f"| threshold | {result.threshold:g} |",
        f"| flagged (similarity ≥ threshold) | {len(flagged)}{': ' + listed if len(flagged) else ''} |",
        f"| synthetic → nearest real: median / 95th percentile | {_summary(result.similarity)} |",
        f"| real → nearest other real (reference): median / 95th percentile | "
        f"{_summary(result.reference_similarity)} |",
    ]
    if result.reference_similarity is not None:
        # Against the reference's 95th percentile rather than its maximum, which one duplicated real
        # image would push to 1. About 5 % of samples lie above it if they are as close as real images.
        above = int(np.sum(result.similarity > np.percentile(result.reference_similarity, 95)))
        lines.append(
            f"| synthetic samples above the reference's 95th percentile (≈ 5 % expected) | "
            f"{above} ({100 * above / n:.1f} %) |"
        )
    channel = "RGB" if modality is None else f"channel {modality}"
    lines += [
        "",
        f"Closest pairs ({channel}; synthetic | nearest real | absolute difference):",
        "",
        "| rank | synthetic | nearest real | similarity |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {rank + 1} | `{_cell(synthetic_names[i])}` | `{_cell(real_names[result.nearest_index[i]])}` | "
        f"{result.similarity[i]:.4f} |"
        for rank, i in enumerate(order)
    ]
    lines += [
        "",
        f"![Closest synthetic–real pairs]({os.path.relpath(pairs_path, link_base)})",
        "",
        f"![Similarity to the nearest real image]({os.path.relpath(histogram_path, link_base)})",
        "",
    ]
    return "\n".join(lines)
