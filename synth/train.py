"""The one training loop every stage runs through.

A stage supplies a `StageSpec`: its state pytree (initialiser), its pure `train_step(state, batch, rng)`,
its preprocessing and its evaluator. This module supplies everything else: the mesh, a single `jax.jit`
of the step with `NamedSharding`s and donation, global batches from per-process data, per-step randomness
as `fold_in(rng, step)`, logging every `log_every` steps, periodic evaluation and sample grids, orbax
checkpoints with the grain iterator state, automatic resume, and a guard that stops on NaN/Inf without
ever saving a poisoned state.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import checkpoint as checkpoint_lib
from synth import input_pipeline, sharding
from synth import workdir as workdir_lib
from synth import writer as writer_lib

log = logging.getLogger("synth")

State = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# (state, step) -> (scalars, images); runs on every process, writes nothing itself.
Evaluator = Callable[[State, int], tuple[Mapping[str, float], Mapping[str, np.ndarray]]]


class NonFiniteError(FloatingPointError):
    """A loss, metric or parameter became NaN or Inf; the run stopped without saving it."""


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """What a stage hands to the loop.

    Attributes:
      name: stage name; its files go to `<workdir>/<name>/`.
      train: the stage's loop settings (`configlib.loop_config`).
      source: random-access training source.
      preprocess: numpy function from one decoded example to the arrays the step consumes.
      init_state: `(rng, batch) -> state`; `state.step` must be an int32 scalar.
      train_step: pure `(state, batch, rng) -> (state, metrics)`; metrics are scalars.
      evaluate: optional evaluator, called every `eval_every` steps and at the end.
      frozen: optional pytree of arrays from earlier stages (e.g. a frozen segmentor's parameters). The
        loop passes it to `train_step` as a fourth argument, replicated, never donated and never
        checkpointed with this stage: it is reloaded from the earlier stages on resume.
      provenance: what `frozen` was loaded from (e.g. checkpoint steps); part of the stage's
        fingerprint, so a resume after an earlier stage was retrained is refused.
      batch_metrics: optional host-side `batch -> (batch, scalars)`, applied to each process's numpy
        batch before it goes to the devices: it takes out entries the step does not read (stage D's
        source tags) and returns scalars about the batch, logged (averaged over processes) with the
        step's metrics. Kept out of the step, so a stage that only adds such statistics runs the very
        program of the stage it extends and is served from the compilation cache.
    """

    name: str
    train: ml_collections.ConfigDict
    source: Any
    preprocess: input_pipeline.Preprocess
    init_state: Callable[[jax.Array, Batch], State]
    train_step: Callable[[State, Batch, jax.Array], tuple[State, Metrics]]
    evaluate: Evaluator | None = None
    frozen: Any = None
    provenance: Mapping[str, Any] | None = None
    batch_metrics: Callable[[Batch], tuple[Batch, Mapping[str, float]]] | None = None


def stage_rngs(seed: int, name: str) -> tuple[jax.Array, jax.Array]:
    """The init and loop keys of stage `name`: one root key per seed and stage."""
    return tuple(jax.random.split(jax.random.fold_in(jax.random.key(seed), _stable_hash(name))))


def _loop_rngs(*, seed: int, name: str):
    """The stage's keys and a zeroed NaN counter, made under jit so they can be replicated on any mesh."""
    init_rng, loop_rng = stage_rngs(seed, name)
    return init_rng, loop_rng, jnp.zeros((), jnp.int32)


def _loop_step(state, batch, loop_rng, nonfinite, frozen, *, train_step):
    """The jitted body: per-step rng, the stage's step, and a sticky on-device NaN/Inf counter."""
    rng = jax.random.fold_in(loop_rng, state.step)
    if frozen is None:
        new_state, metrics = train_step(state, batch, rng)
    else:
        new_state, metrics = train_step(state, batch, rng, frozen)
    # One scalar that is finite iff every float in the metrics and the new state is finite, so the guard
    # never needs a host sync between log steps.
    total = sum(
        jnp.sum(x.astype(jnp.float32))
        for x in jax.tree.leaves((metrics, new_state))
        if jnp.issubdtype(x.dtype, jnp.floating)
    )
    nonfinite = nonfinite + jnp.logical_not(jnp.isfinite(total)).astype(jnp.int32)
    return new_state, metrics, nonfinite


def run_stage(
    spec: StageSpec,
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    stop_at: int | None = None,
    initial_state: State | None = None,
) -> State:
    """Trains one stage to `spec.train.num_steps`, resuming from `<workdir>/<stage>/checkpoints`.

    Args:
      spec: the stage.
      config: the whole config (reads `seed`, `mesh`, `data.num_workers`).
      workdir: the run's directory.
      stop_at: stop (with a checkpoint) once this step is reached, before `num_steps`: used to run a few
        steps from a notebook, or to cut a long job into pieces.
      initial_state: start from this state instead of `spec.init_state` when there is no checkpoint yet
        (a later phase of a curriculum continues the earlier phase's state, optimiser included).

    Returns:
      The trained state (replicated global arrays).

    Raises:
      NonFiniteError: a NaN/Inf appeared; no checkpoint was written after the last good one.
    """
    train = spec.train
    _check_loop_config(spec.name, train)
    num_steps = int(train.num_steps)
    out_dir = workdir_lib.stage_dir(workdir, spec.name)
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    example = _example(spec)
    data_iter = input_pipeline.train_iterator(
        spec.source,
        preprocess=spec.preprocess,
        batch_size=train.batch_size,
        seed=config.seed,
        num_workers=config.data.num_workers,
        data_parallel=sharding.data_parallel_size(mesh),
    )

    with jax.set_mesh(mesh):
        # Made under jit with a replicated output sharding: this works on a mesh that spans processes,
        # where device_put of a host value would not.
        init_rng, loop_rng, nonfinite = jax.jit(
            functools.partial(_loop_rngs, seed=config.seed, name=spec.name),
            out_shardings=repl,
        )()
        init = jax.jit(spec.init_state, out_shardings=repl)
        abstract = jax.eval_shape(init, init_rng, example)
        abstract = checkpoint_lib.abstract_like(abstract, repl)
        ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir, "checkpoints"), keep=train.keep_checkpoints)
        resumed = ckpt.latest_step() is not None
        fingerprint = workdir_lib.fingerprint(spec.name, config, spec.provenance)
        # What frozen consumers need to rebuild the stage's networks without opening its data.
        workdir_lib.record_model(out_dir, example["image"].shape[1:])
        if resumed:
            workdir_lib.check_same_config(spec.name, out_dir, fingerprint)
            state, data_state = ckpt.restore(abstract)
            if data_state is not None:
                _restore_iterator(data_iter, data_state, config.data.num_workers)
            log.info("[%s] resumed from step %d in %s", spec.name, ckpt.latest_step(), ckpt.directory)
        elif initial_state is not None:
            state = jax.device_put(initial_state, repl)
        else:
            state = init(init_rng, example)
            workdir_lib.write_fingerprint(out_dir, fingerprint)
        step = int(jax.device_get(state.step))

        step_fn = _jitted_step(spec.train_step, repl, batch_sh)
        # On resume, rows logged after the restored checkpoint are dropped, so nothing is logged twice.
        writer = writer_lib.MetricWriter(out_dir, resume_step=step if resumed else None)
        progress = writer_lib.Progress(spec.name, step, num_steps)
        last_good = step
        end = num_steps if stop_at is None else min(num_steps, stop_at)
        try:
            while step < end:
                batch = next(data_iter)
                if spec.batch_metrics is not None:
                    batch, batch_scalars = spec.batch_metrics(batch)
                batch = sharding.to_global(batch, batch_sh)
                state, metrics, nonfinite = step_fn(state, batch, loop_rng, nonfinite, spec.frozen)
                step += 1
                final = step == end
                if step % train.log_every == 0 or final:
                    fetched, bad = jax.device_get((metrics, nonfinite))
                    _check_finite(spec.name, bad, fetched, last_good, ckpt)
                    if spec.batch_metrics is not None:
                        fetched = {**fetched, **sharding.process_mean(batch_scalars)}
                    scalars = {f"train/{k}": float(v) for k, v in fetched.items()}
                    scalars["train/steps_per_s"] = progress.rate(step)
                    writer.write_scalars(step, scalars)
                    log.info(progress.line(step, scalars["train/steps_per_s"], fetched))
                if step % train.checkpoint_every == 0 or final:
                    _check_finite(spec.name, jax.device_get(nonfinite), {}, last_good, ckpt)
                    ckpt.save(
                        step,
                        state,
                        {"num_workers": config.data.num_workers, "iterator": data_iter.get_state()},
                    )
                    last_good = step
                if spec.evaluate is not None and (step % train.eval_every == 0 or step == num_steps):
                    # Never evaluate (and draw samples from) a state the guard has not seen.
                    _check_finite(spec.name, jax.device_get(nonfinite), {}, last_good, ckpt)
                    _evaluate(spec, state, step, writer)
            resumed_at_end = progress.start_step == num_steps
            if (
                resumed_at_end
                and spec.evaluate is not None
                and not sharding.agree(_evaluated_at(out_dir, step))
            ):
                # The last run stopped after its final checkpoint but before its final evaluation.
                # Process 0's answer is broadcast, so all processes evaluate together or none does.
                _evaluate(spec, state, step, writer)
        finally:
            ckpt.close()
            writer.close()
    if step >= num_steps:
        workdir_lib.done(out_dir, {"step": step, "finished": time.time()})
    return state


def _example(spec: StageSpec) -> Batch:
    """A batch of one, as the devices see it: what `init_state` builds the state for."""
    example = jax.tree.map(lambda x: np.asarray(x)[None], spec.preprocess(spec.source[0]))
    if spec.batch_metrics is not None:
        example, _ = spec.batch_metrics(example)
    return example


# Jitted loop steps by (train_step, shardings): a stage that runs the same step several times (stage D's
# experiment matrix, curriculum phases) traces and compiles it once.
_STEP_CACHE: dict = {}


def _jitted_step(train_step, repl, batch_sh):
    key = (train_step, repl, batch_sh)
    if key not in _STEP_CACHE:
        _STEP_CACHE[key] = jax.jit(
            functools.partial(_loop_step, train_step=train_step),
            in_shardings=(repl, batch_sh, repl, repl, repl),
            out_shardings=(repl, repl, repl),
            donate_argnums=(0,),
        )
    return _STEP_CACHE[key]


def _check_finite(name, nonfinite, metrics, last_good, ckpt) -> None:
    if int(nonfinite) == 0:
        return
    shown = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(metrics.items()))
    shown = f" (latest metrics: {shown})" if shown else ""
    if ckpt.latest_step() is None:
        kept = "No checkpoint had been written yet."
    else:
        kept = f"The last good checkpoint (step {last_good}) in {ckpt.directory} is intact."
    raise NonFiniteError(
        f"[{name}] NaN or Inf in the loss, metrics or parameters after step {last_good}{shown}. "
        f"Stopped without saving. {kept} "
        "Lower the learning rate, clip gradients (optim.grad_clip_norm) or check the data."
    )


_LOOP_KEYS = ("num_steps", "batch_size", "log_every", "checkpoint_every", "eval_every", "keep_checkpoints")


def _check_loop_config(name: str, loop: ml_collections.ConfigDict) -> None:
    for key in _LOOP_KEYS:
        value = loop.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.{name}.train.{key} must be a positive integer, got {value!r}")


def _restore_iterator(data_iter, data_state: dict, num_workers: int) -> None:
    saved_workers = data_state.get("num_workers", num_workers)
    if saved_workers != num_workers:
        raise ValueError(
            f"config.data.num_workers={num_workers}, but the checkpoint's input-pipeline state was saved "
            f"with num_workers={saved_workers}; resume with --config.data.num_workers={saved_workers}"
        )
    data_iter.set_state(data_state.get("iterator", data_state))


def _evaluate(spec: StageSpec, state: State, step: int, writer: writer_lib.MetricWriter) -> None:
    t0 = time.perf_counter()
    scalars, images = spec.evaluate(state, step)
    scalars = {f"eval/{k}": float(v) for k, v in scalars.items()}
    scalars["eval/seconds"] = time.perf_counter() - t0
    writer.write_scalars(step, scalars)
    writer.write_images(step, images)
    if sharding.is_main_process():
        workdir_lib.write_json(os.path.join(writer.logdir, "last_eval.json"), {"step": step, **scalars})
    log.info("[%s] eval at step %d: %s", spec.name, step, _fmt(scalars))


def _evaluated_at(out_dir: str, step: int) -> bool:
    return workdir_lib.read_json(os.path.join(out_dir, "last_eval.json"), {}).get("step") == step


def _fmt(scalars: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()))


def _stable_hash(name: str) -> int:
    """A deterministic integer per stage name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def run_unless_complete(
    name: str,
    build: Callable[[ml_collections.ConfigDict], StageSpec],
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    stop_at: int | None = None,
) -> State | None:
    """Builds and trains stage `name` unless its `done.json` says it is complete (then returns None)."""
    if workdir_lib.is_complete(workdir, name, config[name].train.num_steps):
        log.info("[%s] complete: nothing to do", name)
        return None
    return run_stage(build(config), config, workdir, stop_at=stop_at)


def load_trained_state(
    spec: StageSpec, config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> State:
    """The latest checkpointed state of `spec`'s stage in `workdir`, replicated on the config's mesh.

    Raises:
      FileNotFoundError: the stage has no checkpoint in `workdir`, naming the stage to run first.
    """
    repl = sharding.replicated(sharding.make_mesh(config.mesh.shape, config.mesh.axes))
    example = _example(spec)
    abstract = jax.eval_shape(spec.init_state, jax.random.key(0), example)
    directory = os.path.join(workdir_lib.stage_dir(workdir, spec.name), "checkpoints")
    with checkpoint_lib.Checkpointer(directory) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"No trained {spec.name} stage in {workdir}: run stage={spec.name} with this workdir first"
            )
        state, _ = ckpt.restore(checkpoint_lib.abstract_like(abstract, repl))
    return state
