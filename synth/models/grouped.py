"""Inference a few examples at a time: a network's batch in groups, looped over by `jax.lax.map`.

On XLA:CPU a 3×3 convolution of inference runs fastest when its input fits one Winograd chunk
(`winograd.CHUNK_BYTES`): then `synth.models.conv`'s ``auto`` takes Winograd's unchunked form, and a batch
over it the chunked form or XLA's direct one. So for the paper's image sizes a batch of generation runs
faster as a loop over groups of examples than as one call: the 184×144 generator at batch 8 a fifth
faster per set, the 512² retina's at batch 2 a quarter (BENCHMARKS.md, "Generation a few examples at a
time"). XLA hoists what depends only on the parameters (Winograd's filter transforms) out of the loop.

`group_size` picks the group, `apply` runs a function over the groups of its batch. Networks whose
examples do not interact (instance or group norm, never batch norm: every network here) give the same
results either way, summation order aside. GPUs keep one call (``mode="auto"``), and a differentiated
call should too: there the batched form's filter gradients are one convolution per layer, not one per
group. XLA's cost analysis counts a loop's body once, so count FLOPs on a batch of one group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from synth.models import winograd

# "batched": one call on the whole batch, the GPU's form; "grouped": `group_size` examples per shard per
# call, in a loop; "auto": "grouped" on CPU.
MODES = ("auto", "batched", "grouped")


def group_size(
    batch: int,
    hw: tuple[int, int],
    features: int,
    *,
    itemsize: int = 4,
    shards: int = 1,
    mode: str = "auto",
) -> int:
    """Examples per shard in each call: the shard's whole batch unless grouped.

    Grouped: the most examples, dividing the shard's batch, whose first-level maps (H·W·`features`
    values of `itemsize` bytes each: the network's widest full-size activation) fit one Winograd chunk,
    at least one.

    Raises:
      ValueError: an unknown mode, or a batch that does not split into `shards`.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown grouping mode {mode!r}; choose one of {MODES}")
    if batch % shards:
        raise ValueError(f"A batch of {batch} does not split into {shards} shards")
    per_shard = batch // shards
    if mode == "batched" or (mode == "auto" and jax.default_backend() != "cpu"):
        return per_shard
    cap = max(1, winograd.CHUNK_BYTES // max(hw[0] * hw[1] * features * itemsize, 1))
    return max(d for d in range(1, min(cap, per_shard) + 1) if per_shard % d == 0)


def apply(fn: Callable[[Any], Any], x: Any, group: int, *, shards: int = 1, out_axis: int = 0):
    """`fn(x)`, computed `group` examples per shard at a time.

    `x` is an array or a pytree of arrays with the batch on axis 0; `fn` maps it to arrays (or a pytree
    of them) with the batch on `out_axis`. `shards` is the batch's data-parallel split
    (`sharding.data_parallel_size`): each call takes `group` examples from every shard, so a sharded
    batch stays where it is.
    """
    b = jax.tree.leaves(x)[0].shape[0]
    per_shard = b // shards
    if group == per_shard:
        return fn(x)
    calls = per_shard // group

    def to_groups(a: jax.Array) -> jax.Array:
        # (calls, shards, group, …): call i takes examples i·group … of every shard.
        return jnp.swapaxes(a.reshape((shards, calls, group) + a.shape[1:]), 0, 1)

    def one_call(g: jax.Array) -> jax.Array:
        return g.reshape((shards * group,) + g.shape[2:])

    outs = jax.lax.map(lambda g: fn(jax.tree.map(one_call, g)), jax.tree.map(to_groups, x))

    def ungroup(out: jax.Array) -> jax.Array:
        out = jnp.moveaxis(out, 0, out_axis)  # The calls beside the batch: (…, calls, shards · group, …).
        lead, tail = out.shape[:out_axis], out.shape[out_axis + 2 :]
        out = out.reshape(lead + (calls, shards, group) + tail)
        out = jnp.swapaxes(out, out_axis, out_axis + 1)  # (…, shards, calls, group, …): shards in order.
        return out.reshape(lead + (b,) + tail)

    return jax.tree.map(ungroup, outs)
