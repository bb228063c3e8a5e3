"""Stage `compare`'s report: what each variant is and uses, T1's and T4's tables, the side-by-side grid.

Pure formatting of the numbers `synth.stages.compare` gathered: `summary_lines` is the stage's section of
the workdir report, `write_outputs` writes it with `results.json`, `results.csv` and the grid (atomically).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from PIL import Image

from synth import flow_synthesis, synthesis_nets
from synth import workdir as workdir_lib
from synth import writer as writer_lib
from synth.lesion import base as lesion_base

NAME = "compare"
REAL = "real"  # The reference row: the real test slices themselves.
TITLES = {
    "basegan": "A (BaseGAN)",
    "skrgan": "SkrGAN*",
    "full": "F (method)",
    "ecai": "ECAI (old design)",
    REAL: "real slices",
}


def description(name: str, config: ml_collections.ConfigDict) -> str:
    """What variant `name` is, in one line (`config.compare.variant_descriptions`)."""
    if name == REAL:
        return "The real test slices (reference)."
    return config.compare.get("variant_descriptions", {}).get(name, name)


def title(name: str) -> str:
    return TITLES.get(name, name)


def settings(vconfig: ml_collections.ConfigDict) -> dict[str, bool]:
    """What a variant's stage B uses, as T1's columns, read from its config."""
    sy = vconfig.synthesis
    if flow_synthesis.is_flow(vconfig):
        # The flow family: conditioned on the clean map and the label, noise is its starting point, the
        # modalities are one sample, and its optional terms are its own weights.
        weights = sy.flow.weights
        return {
            "structure_map": True,
            "noise": True,
            "registration_loss": len(vconfig.data.modalities) > 1 and weights.registration > 0,
            "lesion_label_loss": sy.lesion_processor != "none" and weights.lesion > 0,
            "placement_check": False,
            "separate_models": False,
        }
    structure = sy.g_input != "noise"
    lesion = sy.label_fusion != "none" and sy.lesion_processor != "none" and sy.loss.weights.lesion > 0
    return {
        "structure_map": structure,
        "noise": sy.g_input == "noise" or (sy.g_input == "structure" and float(sy.noise[1]) > 0),
        # The method's through the frozen G_t; the old design's through its own EC_M and DC_M (§6.7).
        "registration_loss": synthesis_nets.registers(vconfig),
        "lesion_label_loss": lesion,
        "placement_check": lesion and sy.label_rule != "none",
        "separate_models": bool(sy.separate_models),
    }


SETTING_COLUMNS = (
    ("uses_structure_map", "structure map"),
    ("uses_noise", "noise"),
    ("uses_registration_loss", "L_reg"),
    ("uses_lesion_label_loss", "lesion label + L_les"),
    ("uses_placement_check", "placement check"),
    ("uses_separate_models", "K separate G/D"),
)


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _pm(entry: dict, key: str, digits: int = 3) -> str:
    if key not in entry:
        return "–"
    std = entry.get(key.replace("/", "_std/") if "/" in key else key + "_std")
    return _num(entry[key], digits) + ("" if std is None else f" ± {_num(std, digits)}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def main_table(entries: Sequence[dict], *, fid: bool) -> list[str]:
    """T1's layout: one row per method, its settings, then the scores averaged over modalities."""
    header = ["method", *(h for _, h in SETTING_COLUMNS), "G params", "MS-SSIM ↑"]
    header += ["FID ↓", "KID ↓"] if fid else []
    # Between the modalities of one sample: the real row is the target; far above it, modalities alike.
    header += [
        "inter-modality MS-SSIM",
        "lesion Dice ↑ (chance)",
        "structure agreement ↑",
        "translation MSE ↓",
    ]
    rows = []
    for e in entries:
        flags = (
            ["✓" if e[k] else "×" for k, _ in SETTING_COLUMNS]
            if "g_params" in e
            else ["" for _ in SETTING_COLUMNS]
        )
        row = [e["title"], *flags, f"{e['g_params']:,}" if "g_params" in e else "", _num(e.get("ms_ssim"))]
        row += [_num(e.get("fid"), 2), _num(e.get("kid"), 4)] if fid else []
        lesion = (
            "–" if "lesion_dice" not in e else f"{_num(e['lesion_dice'])} ({_num(e['lesion_dice_chance'])})"
        )
        between = e.get("intermodality/synthetic", e.get("intermodality/real"))
        row += [_num(between), lesion, _pm(e, "structure_agreement"), _pm(e, "translation_mse", 4)]
        rows.append(row)
    return markdown_table(header, rows)


def modality_table(entries: Sequence[dict], modalities: Sequence[str], *, fid: bool) -> list[str]:
    """T4's layout per modality: MS-SSIM (mean ± std over pairs), lesion Dice, FID and KID."""
    header = ["method"] + [f"{m} MS-SSIM ↑" for m in modalities] + [f"{m} lesion Dice ↑" for m in modalities]
    if fid:
        header += [f"{m} FID ↓" for m in modalities] + [f"{m} KID ↓" for m in modalities]
    rows = []
    for e in entries:
        row = [e["title"]] + [_pm(e, f"ms_ssim/{m}") for m in modalities]
        row += [_num(e.get(f"lesion_dice/{m}")) for m in modalities]
        if fid:
            row += [_num(e.get(f"fid/{m}"), 2) for m in modalities] + [
                _num(e.get(f"kid/{m}"), 4) for m in modalities
            ]
        rows.append(row)
    return markdown_table(header, rows)


def summary_lines(
    entries: Sequence[dict], config, *, frozen: Sequence[str], num_samples: int, fid: bool
) -> list[str]:
    """The stage's report section (report.py adds the `## compare` heading above it)."""
    modalities = tuple(config.data.modalities)
    methods = [e for e in entries if e["method"] != REAL]
    steps = sorted({e["synthesis_step"] for e in methods})
    lines = [
        f"Baselines and ablations of METHOD §9.1-9.2 beside the method (Tables T1, T4): each trained its own "
        f"stage B ({', '.join(map(str, steps))} steps) in `compare/<name>/` against this workdir's frozen "
        f"{', '.join(frozen)}, then made one sample for each of the same {num_samples} real test slices "
        "(evenly spread over the test split), from the same structure maps, lesion labels and keys.",
        "",
        *markdown_table(["method", "what it is"], [[e["title"], e["description"]] for e in entries]),
        "",
        "### Scores (T1's layout; means over the modalities)",
        "",
        *main_table(entries, fid=fid),
        "",
        "MS-SSIM: real vs synthetic, mean over seeded random pairs per modality, small images upsampled to "
        "161 px (the real row: between distinct real slices). Lesion Dice: whole-lesion Dice of the frozen "
        "real-trained segmentors on each method's images against the label it was given, over the samples "
        "whose label has a lesion; in brackets the chance level (another sample's label); the real row "
        "scores the real slices against their own labels. Structure agreement: mean pairwise Dice of the "
        "structure maps extracted from the K modalities (higher = more registered). Translation MSE: mean "
        "squared difference between each modality and the frozen G_t's translations of the others into it "
        "(lower = more registered). Mean ± std over the samples.",
        "",
        "### Per modality (T4's layout)",
        "",
        *modality_table(entries, modalities, fid=fid),
        "",
        "Every number per method and modality: `compare/results.json`, `compare/results.csv`.",
        "",
        "![side by side](compare/samples/side_by_side.png)",
        "",
        "Each row is one test slice: its structure map, the method's lesion label, the real "
        + ", ".join(modalities)
        + ", then each method's "
        + ", ".join(modalities)
        + " in the table's order ("
        + ", ".join(e["title"] for e in methods)
        + ").",
    ]
    if not fid:
        lines += [
            "",
            "FID/KID need the FID Inception-v3 weights: set `config.verify.quality.inception_weights` to the "
            "converted file (see `synth/metrics/inception.py` for which file and how to make it).",
        ]
    return lines


def side_by_side(real: dict, outputs: dict[str, dict], config, rows: int) -> np.ndarray:
    """The grid: per slice its structure map, the method's label, the real modalities, each method's."""
    c = lesion_base.channels_per_modality(config)
    k = len(config.data.modalities)
    reference = outputs.get("full", next(iter(outputs.values())))

    def modalities(images, b):
        return [images[b, ..., j * c : (j + 1) * c] for j in range(k)]

    grid = []
    for b in range(min(rows, len(real["image"]))):
        row = [
            reference["structure"][b],
            writer_lib.label_colours(reference["label"][b], config.data.num_classes),
        ]
        row += modalities(real["image"], b)
        for out in outputs.values():
            row += modalities(out["image"], b)
        grid.append(row)
    return writer_lib.image_grid(grid)


def json_ready(entry: dict) -> dict:
    """NaN (no sample with a lesion) as null: results.json stays standard JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()}


def write_outputs(
    workdir: str, entries: list[dict], lines: list[str], grid: np.ndarray | None, meta: dict
) -> None:
    """results.json, results.csv, summary.md and the grid in `W/compare/` (process 0; atomic writes)."""
    out_dir = workdir_lib.stage_dir(workdir, NAME)
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    results = {**meta, "methods": [json_ready(e) for e in entries]}
    workdir_lib.write_json(os.path.join(out_dir, "results.json"), results)
    # A variant's row has every column (the real row lacks the settings): its order is the header's.
    fields = list(dict.fromkeys(k for e in reversed(entries) for k in e))
    tmp = os.path.join(out_dir, "results.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(entries)
    os.replace(tmp, os.path.join(out_dir, "results.csv"))
    if grid is not None:
        path = os.path.join(out_dir, "samples", "side_by_side.png")
        Image.fromarray(writer_lib.to_uint8(grid)).save(path + ".tmp", format="PNG")
        os.replace(path + ".tmp", path)
    with open(os.path.join(out_dir, "summary.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out_dir, "summary.md.tmp"), os.path.join(out_dir, "summary.md"))
