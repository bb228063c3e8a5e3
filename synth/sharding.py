"""Device mesh and shardings, written down once for every stage.

The state is replicated (`P()`) and batches are split along the leading axis over the `data` mesh axis.
Under `jax.jit` with these shardings, batch means and gradient averages are global automatically, so no
stage ever calls `pmean` or names an axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(shape: Sequence[int], axes: Sequence[str]) -> Mesh:
    """Builds the device mesh from `config.mesh`; a -1 in `shape` takes all remaining devices.

    Args:
      shape: size of each mesh axis; at most one entry may be -1.
      axes: the axis names; must include `data`.

    Returns:
      A mesh over all devices of all processes.
    """
    shape, axes = tuple(int(s) for s in shape), tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"config.mesh.shape {shape} and config.mesh.axes {axes} differ in length")
    if DATA_AXIS not in axes:
        raise ValueError(f"config.mesh.axes {axes} must contain {DATA_AXIS!r}")
    n = jax.device_count()
    known = int(np.prod([s for s in shape if s != -1]))
    if shape.count(-1) > 1 or n % known:
        raise ValueError(f"config.mesh.shape {shape} does not fit {n} devices")
    shape = tuple(n // known if s == -1 else s for s in shape)
    used = int(np.prod(shape))
    if used > n:
        raise ValueError(f"config.mesh.shape {shape} needs {used} devices, but {n} are present")
    if used < n and jax.process_count() > 1:
        raise ValueError(f"config.mesh.shape {shape} must use all {n} devices of a multi-process run")
    # Auto axes: stage code is written for global arrays and needs no sharding annotations inside models.
    axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
    # A mesh smaller than the machine uses its first devices (e.g. shape=(1,) to compare with 1 device).
    return jax.make_mesh(shape, axes, axis_types=axis_types, devices=jax.devices()[:used])


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of the state, the rng and the metrics: a full copy on every device."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: the leading axis split over the `data` mesh axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def split_like_batch(x: jax.Array) -> jax.Array:
    """`x`, whose leading axis is the batch, split over the `data` axis of the mesh the step runs under.

    For arrays a step makes itself at batch size from a replicated key (noise drawn from the prior): XLA
    otherwise computes them whole on every device, and with them every network applied to them (stage A's
    generated branch did 2.3x one device's work per device). A no-op outside `jax.set_mesh` (the loop jits
    its steps under it) and on one device.
    """
    if context_data_size() == 1:
        return x
    return jax.lax.with_sharding_constraint(x, P(DATA_AXIS))


def gathered(tree: Any) -> Any:
    """`tree`'s arrays whole on every device of the mesh a function is traced under (a no-op outside one).

    For what the host reads of a split computation: in a run of several processes each holds all of it.
    """
    if context_data_size() == 1:
        return tree
    return jax.lax.with_sharding_constraint(tree, P())


def context_data_size() -> int:
    """The `data` axis's size of the mesh a function is traced under (`jax.set_mesh`); 1 outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[DATA_AXIS])


def padded_size(n: int, shards: int) -> int:
    """The smallest multiple of `shards` not below n: a batch of n padded to split over them."""
    return -(-n // shards) * shards


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def to_global(local_batch: Any, sharding: NamedSharding) -> Any:
    """Turns this process's numpy batch into one global `jax.Array` per leaf.

    Each process passes only its own rows; the global batch is their concatenation in process order.
    """
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes files and logs for all."""
    return jax.process_index() == 0


def process_mean(values: Mapping[str, float]) -> dict[str, float]:
    """Each value averaged over processes (the same keys on all; a collective: every process calls it).

    For statistics of each process's own rows of a batch (equal shares), whose mean is the global one.
    """
    if jax.process_count() == 1:
        return {k: float(v) for k, v in values.items()}
    from jax.experimental import multihost_utils

    keys = sorted(values)
    local = np.asarray([values[k] for k in keys], np.float32)
    gathered_values = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(keys))
    return dict(zip(keys, (float(v) for v in gathered_values.mean(axis=0)), strict=True))


def agree(flag: bool) -> bool:
    """Process 0's value of `flag` on every process.

    For decisions read from files (is a stage complete, is a dataset built) that gate collective work:
    if processes decided apart, some would wait forever in a collective the others skip.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))
