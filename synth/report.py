"""The run report: `<workdir>/report.md`, one section per stage with its metrics and its latest samples."""

from __future__ import annotations

import glob
import os

from synth.configlib import EXTRA_STAGES, PIPELINE_STAGES
from synth.writer import read_jsonl


def _last_rows(path: str) -> tuple[dict, dict]:
    """The last training row and the last evaluation row of a `metrics.jsonl`."""
    train, evaluation = {}, {}
    for row in read_jsonl(path):
        if any(k.startswith("train/") for k in row):
            train = row
        if any(k.startswith("eval/") for k in row):
            evaluation = row
    return train, evaluation


def _table(row: dict, prefix: str) -> list[str]:
    items = [(k[len(prefix) :], v) for k, v in sorted(row.items()) if k.startswith(prefix)]
    if not items:
        return []
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in items]
    return lines


def write_report(workdir: str) -> str:
    """Writes `report.md` from what the stages left in `workdir`; returns its path."""
    lines = ["# synth run report", "", f"Workdir: `{os.path.abspath(workdir)}`", ""]
    for name in PIPELINE_STAGES + EXTRA_STAGES:
        metrics = os.path.join(workdir, name, "metrics.jsonl")
        summary = os.path.join(workdir, name, "summary.md")
        if not os.path.exists(metrics) and not os.path.exists(summary):
            continue
        train, evaluation = _last_rows(metrics) if os.path.exists(metrics) else ({}, {})
        done = os.path.exists(os.path.join(workdir, name, "done.json"))
        lines += [f"## {name}", "", f"Status: {'complete' if done else 'in progress'}", ""]
        if train:
            lines += [f"Training, step {train['step']}:", "", *_table(train, "train/"), ""]
        if evaluation:
            lines += [
                f"Evaluation, step {evaluation['step']}:",
                "",
                *_table(evaluation, "eval/"),
                "",
            ]
        summary = os.path.join(workdir, name, "summary.md")
        if os.path.exists(summary):  # A stage's own section (stage C: counts, plots, the audit).
            with open(summary) as f:
                lines += [f.read().rstrip(), ""]
            continue
        samples = sorted(glob.glob(os.path.join(workdir, name, "samples", "*.png")))
        latest: dict[str, str] = {}
        for path in samples:  # Sorted by step within each name, so the last one wins.
            latest[os.path.basename(path).rsplit("_", 1)[0]] = path
        for title, path in sorted(latest.items()):
            lines += [f"![{title}]({os.path.relpath(path, workdir)})", ""]
    path = os.path.join(workdir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    return path
