"""Apply one network definition with per-member parameters stacked on a leading axis.

The N per-modality lesion segmentors (and any other "one network per modality" part of the method) keep
their parameters as one pytree whose leaves have a leading axis of size N. `map_stacked` applies them:
- `vmap`: one batched call. On GPU this is the fast form; XLA lowers the batched kernels to grouped
  convolutions.
- `unrolled`: N calls on slices of the stacked parameters, unrolled at trace time. XLA:CPU runs grouped
  convolutions very slowly (a U-Net training step was 27× slower with `vmap` than unrolled on a 2-core
  CPU; see BENCHMARKS.md), so this is what `auto` picks on CPU. Both give the same numbers.
  `auto` picks it on several devices too: XLA's SPMD partitioner does not split a grouped convolution
  (nor `vmap`'s merged (N·B) batch) along a batch split over devices; it gathers the batch and every device
  computes all of it (found in the compiled programs on 4 devices; `tests/test_models.py`).
`jax.lax.map` (a scan) was also measured and is 8× slower than unrolled on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

MODES = ("auto", "vmap", "unrolled")


def resolve_mode(mode: str) -> str:
    """`auto` -> `unrolled` on CPU, `vmap` elsewhere; other modes are checked and returned."""
    if mode not in MODES:
        raise ValueError(f"Unknown stacking mode {mode!r}; choose one of {MODES}")
    if mode == "auto":
        return "unrolled" if jax.default_backend() == "cpu" else "vmap"
    return mode


def map_stacked(
    fn: Callable[..., jax.Array], params: Any, *xs: Any, shared_params: bool = False, mode: str = "auto"
) -> jax.Array:
    """Computes `stack([fn(params[i], *(x[i] for x in xs)) for i in range(N)])`.

    Args:
      fn: `(params, *inputs) -> array`, e.g. a Linen module's `apply`.
      params: parameters with a leading member axis on every leaf, or one shared set if `shared_params`.
      *xs: inputs with a leading member axis of size N (pytrees allowed, e.g. rng keys).
      shared_params: apply the same parameters to every member (the "1 SEG" variant).
      mode: `auto`, `vmap` or `unrolled` (see the module docstring).

    Returns:
      The stacked outputs, leading axis N.
    """
    mode = "unrolled" if mode == "auto" and jax.device_count() > 1 else resolve_mode(mode)
    if mode == "vmap":
        return jax.vmap(fn, in_axes=(None if shared_params else 0,) + (0,) * len(xs))(params, *xs)
    n = jax.tree.leaves(xs)[0].shape[0]
    outs = []
    for i in range(n):
        p = params if shared_params else jax.tree.map(lambda a, i=i: a[i], params)
        outs.append(fn(p, *jax.tree.map(lambda a, i=i: a[i], xs)))
    return jnp.stack(outs)
