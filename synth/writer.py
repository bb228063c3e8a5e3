"""Metric writing without TensorFlow: JSONL and TensorBoard event files, PNG sample grids, console progress.

Only process 0 writes; the other processes get a writer that does nothing, so stage code never checks the
process index itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping

import numpy as np
from PIL import Image

log = logging.getLogger("synth")


class MetricWriter:
    """Writes scalars to `metrics.jsonl` and TensorBoard, images to PNG files and TensorBoard."""

    def __init__(
        self, logdir: str | os.PathLike, *, enabled: bool | None = None, resume_step: int | None = None
    ):
        """Opens the writer.

        Args:
          logdir: directory for `metrics.jsonl`, `tensorboard/` and `samples/`.
          enabled: write at all (default: on process 0 only).
          resume_step: the step a resumed run restarts from: rows logged after it (by a run that died
            before its next checkpoint) are dropped from the JSONL and hidden in TensorBoard.
        """
        self.logdir = os.fspath(logdir)
        if enabled is None:
            import jax  # Here, not at the top: the PNG exporter uses this module's pictures without JAX.

            enabled = jax.process_index() == 0
        self.enabled = enabled
        self._tb = None
        if self.enabled:
            os.makedirs(self.logdir, exist_ok=True)
            if resume_step is not None:
                _truncate_jsonl(os.path.join(self.logdir, "metrics.jsonl"), resume_step)
            # Imported here so that processes other than 0 never open event files.
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                logdir=os.path.join(self.logdir, "tensorboard"),
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends one JSON line `{"step": step, ...}` and one TensorBoard scalar per entry."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _json_number(v) for k, v in scalars.items()})
        with open(os.path.join(self.logdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(value), global_step=int(step))
        self._tb.flush()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> list[str]:
        """Saves each (H, W) or (H, W, C) image in [0, 1] as `samples/<name>_<step>.png` and to TensorBoard.

        Returns:
          The paths of the PNG files written (empty on processes other than 0).
        """
        if not self.enabled:
            return []
        paths = []
        os.makedirs(os.path.join(self.logdir, "samples"), exist_ok=True)
        for name, image in images.items():
            pixels = to_uint8(image)
            path = os.path.join(self.logdir, "samples", f"{name}_{int(step):07d}.png")
            Image.fromarray(pixels if pixels.shape[-1] == 3 else pixels[..., 0]).save(path)
            self._tb.add_image(name, pixels, global_step=int(step), dataformats="HWC")
            paths.append(path)
        self._tb.flush()
        return paths

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str) -> list[dict]:
    """The rows of a `metrics.jsonl`, skipping a last line cut short by a killed process."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Keeps the rows of steps <= last_step (atomically)."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def _json_number(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else str(value)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W[, C]) floats in [0, 1] -> (H, W, 1|3) uint8."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_grid(rows: list[list[np.ndarray]], *, pad: int = 2) -> np.ndarray:
    """Tiles a list of rows of (H, W) or (H, W, 3) images in [0, 1] into one RGB image with a white gap."""
    tiles = [[_rgb(t) for t in row] for row in rows]
    h = max(t.shape[0] for row in tiles for t in row)
    w = max(t.shape[1] for row in tiles for t in row)
    ncols = max(len(row) for row in tiles)
    grid = np.ones((len(tiles) * (h + pad) + pad, ncols * (w + pad) + pad, 3), np.float32)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    return grid


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


def label_colours(label: np.ndarray, num_classes: int) -> np.ndarray:
    """An integer label map as RGB in [0, 1], background black, classes in distinct colours."""
    palette = np.array(
        [
            [0, 0, 0],
            [0.9, 0.2, 0.2],
            [0.2, 0.8, 0.2],
            [0.2, 0.4, 1.0],
            [1.0, 0.9, 0.1],
            [0.8, 0.3, 0.9],
        ],
        np.float32,
    )
    return palette[np.clip(np.asarray(label), 0, min(num_classes, len(palette)) - 1)]


class Progress:
    """Console progress for a training loop: step, rate, ETA and the latest metrics."""

    def __init__(self, name: str, start_step: int, num_steps: int):
        self.name, self.start_step, self.num_steps = name, start_step, num_steps
        self._last_t, self._last_step = time.perf_counter(), start_step

    def rate(self, step: int) -> float:
        """Steps per second since the previous call."""
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_t, 1e-9)
        self._last_t, self._last_step = now, step
        return rate

    def line(self, step: int, rate: float, metrics: Mapping[str, float]) -> str:
        # The recent rate, not the average since start: that one includes compilation.
        eta = (self.num_steps - step) / rate if rate > 0 else float("inf")
        shown = " ".join(f"{k}={float(v):.4g}" for k, v in sorted(metrics.items()))
        pct = 100.0 * step / max(self.num_steps, 1)
        return (
            f"[{self.name}] step {step}/{self.num_steps} ({pct:.0f}%) | {rate:.2f} steps/s | "
            f"ETA {format_seconds(eta)} | {shown}"
        )


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
