"""The one evaluation loop: a stage supplies a per-batch function, a reduction and a grid hook.

`make_evaluator` runs one ordered pass over an evaluation split in global batches split over the mesh
(`input_pipeline.eval_batches`: the last batch padded, a `valid` row mask), calls the stage's jitted
`per_batch` once per batch, fetches its outputs (replicated, so every process can reduce them and draw
the grid), and reduces them over the valid rows only:

  - `reduce="sum"`: every output is a per-example array with the batch axis first; the loop keeps its
    sum over the valid rows (in float64) and the number of valid rows, and the stage's `finish` turns
    these into scalars (a mean is `sum / count`; a metric averaged over some of the images returns its
    own weights as another output, e.g. `dice` and `dice/weight`);
  - `reduce="rows"`: the loop keeps the valid rows themselves, concatenated, for metrics that are not
    sums (mAP).

The first batch's `shown` outputs go to the stage's `grid` hook, which returns the sample grids. A key
folded with the batch index is handed to `per_batch`, so an evaluator that draws noise draws the same at
every evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from synth import input_pipeline, sharding

Scalars = Mapping[str, float]
Images = Mapping[str, np.ndarray]
REDUCTIONS = ("sum", "rows")


class Hooks(NamedTuple):
    """A stage's part of the evaluation.

    Attributes:
      per_batch: `(state, frozen, batch, key) -> (values, shown)`, jittable: `values` is a dict of
        per-example arrays (batch axis first) to reduce, `shown` anything the grid hook draws (fetched
        for the first batch only).
      finish: `(totals, count) -> scalars`: `totals` are the masked sums of `values` (or, for
        `reduce="rows"`, their valid rows), `count` the number of valid examples.
      grid: `(local batch, shown) -> {name: image}` for the first batch, or None. `local` holds this
        process's rows of the batch (host arrays), `shown` the whole batch's.
      reduce: `"sum"` or `"rows"` (see the module docstring).
    """

    per_batch: Callable[..., tuple[dict[str, Any], Any]]
    finish: Callable[[dict[str, np.ndarray], float], Scalars]
    grid: Callable[[dict[str, np.ndarray], Any], Images] | None = None
    reduce: str = "sum"


def _with_valid(state, frozen, batch, key, *, per_batch):
    values, shown = per_batch(state, frozen, batch, key)
    return values, shown, batch["valid"]


def make_evaluator(
    source: Any,
    *,
    preprocess: input_pipeline.Preprocess,
    batch_size: int,
    max_examples: int,
    mesh,
    hooks: Hooks,
    frozen: Any = None,
    key: jax.Array | None = None,
) -> Callable[[Any, int], tuple[Scalars, Images]]:
    """The evaluator `(state, step) -> (scalars, images)` of a stage, for the shared training loop.

    Args:
      source: the evaluation split (random access), read in order.
      preprocess: decoded example -> the arrays `per_batch` reads.
      batch_size: the global batch size (split over the mesh's data axis).
      max_examples: evaluate the first this many examples (0: all).
      mesh: the device mesh.
      hooks: the stage's per-batch function, reduction and grid.
      frozen: arrays of earlier stages `per_batch` reads (passed as an argument, never baked into the
        compiled function).
      key: folded with the batch index for `per_batch`'s randomness (default: key 0).
    """
    if hooks.reduce not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {hooks.reduce!r}; choose one of {REDUCTIONS}")
    batch_sh = sharding.batch_sharding(mesh)
    fn = jax.jit(
        functools.partial(_with_valid, per_batch=hooks.per_batch), out_shardings=sharding.replicated(mesh)
    )
    key = jax.random.key(0) if key is None else key

    def evaluate(state, step: int) -> tuple[Scalars, Images]:
        del step  # Every evaluation scores the same examples with the same keys.
        totals: dict[str, Any] | None = None
        count, images = 0.0, {}
        batches = input_pipeline.eval_batches(
            source, preprocess=preprocess, batch_size=batch_size, max_examples=max_examples
        )
        for n, local in enumerate(batches):
            batch = sharding.to_global(local, batch_sh)
            values, shown, valid = fn(state, frozen, batch, jax.random.fold_in(key, n))
            values, valid = jax.device_get((values, valid))
            valid = np.asarray(valid, bool)
            totals = _accumulate(totals, values, valid, hooks.reduce)
            count += float(valid.sum())
            if n == 0 and hooks.grid is not None:
                images = dict(hooks.grid(local, jax.device_get(shown)))
        if hooks.reduce == "rows":
            totals = {name: np.concatenate(parts) for name, parts in totals.items()}
        return hooks.finish(totals, count), images

    return evaluate


def _accumulate(totals, values: dict, valid: np.ndarray, reduce: str) -> dict:
    """Adds one batch's valid rows (their sum, or the rows themselves) to the running totals."""
    if reduce == "rows":
        totals = totals or {name: [] for name in values}
        for name, value in values.items():
            totals[name].append(np.asarray(value)[valid])
        return totals
    sums = masked_sum(values, valid)
    return sums if totals is None else {name: totals[name] + sums[name] for name in sums}


def masked_sum(values: Mapping[str, Any], valid: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-example array (batch axis first) summed over the valid examples, in float64."""
    weight = np.asarray(valid).astype(np.float64)
    return {name: np.tensordot(weight, np.asarray(v, np.float64), axes=(0, 0)) for name, v in values.items()}


def mean_over(totals: Mapping[str, np.ndarray], count: float) -> dict[str, np.ndarray]:
    """Every total divided by the number of valid examples (a mean over the evaluated examples)."""
    return {name: np.asarray(value) / max(count, 1.0) for name, value in totals.items()}


def per_modality(name: str, values: np.ndarray, modalities) -> dict[str, float]:
    """`<name>/<modality>` for each of the K values and `<name>/mean` over them."""
    out = {f"{name}/{m}": float(values[k]) for k, m in enumerate(modalities)}
    out[f"{name}/mean"] = float(np.mean(values))
    return out
