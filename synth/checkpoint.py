"""Checkpoints: one small wrapper around orbax's `CheckpointManager`.

A checkpoint holds the stage's state pytree and, beside it, the input pipeline's iterator state as JSON,
so a resumed run sees exactly the batches an uninterrupted run would have seen. Orbax writes each step to
a temporary directory and renames it when complete, so a crash mid-save never leaves a checkpoint that
looks whole; the previous ones are kept by the preservation policy.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation_lib


class Checkpointer:
    """Saves and restores `(state, data_state)` pairs under one directory."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation_lib.LatestN(max(1, keep)),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = os.path.abspath(os.fspath(directory))  # orbax requires absolute paths
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None = None) -> None:
        """Saves `state` (and the iterator state) as checkpoint `step`; asynchronous unless disabled."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict | None]:
        """Restores checkpoint `step` (default: the latest) onto the shardings of `abstract_state`.

        Args:
          abstract_state: a pytree of `jax.ShapeDtypeStruct` with `sharding` set (from `jax.eval_shape`).
          step: which checkpoint; None for the latest.

        Returns:
          `(state, data_state)`; `data_state` is None if the checkpoint has no iterator state.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        # Asked of the directory rather than orbax's item metadata, which warns about unknown handlers.
        has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if has_data:
            args["data"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        data_state = restored["data"] if has_data else None
        return restored["state"], data_state

    def restore_part(self, abstract_part: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """Restores only the fields of the saved state named in `abstract_part` (orbax partial restore).

        A frozen consumer reads a trained stage's parameters without building its optimiser state: the
        other fields of the checkpoint (optimiser moments, the iterator state) are never read.

        Args:
          abstract_part: field name of the saved state pytree (e.g. `"g_params"`, `"step"`) -> its
            abstract subtree of `jax.ShapeDtypeStruct`s with `sharding` set.
          step: which checkpoint; None for the latest.

        Returns:
          The restored fields, as a dict like `abstract_part`.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract_part)
        args = ocp.args.PyTreeRestore(item=abstract_part, restore_args=restore_args, partial_restore=True)
        return self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]

    def wait(self) -> None:
        """Blocks until every asynchronous save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def abstract_like(state: Any, sharding: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `state` with `sharding` on every leaf, for restoring."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
