"""The shared training loop: sharding equivalence, deterministic resume, NaN guard, logging artefacts."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from distributed_worker import equivalence_config
from equivalence import assert_same_training

from synth import checkpoint as checkpoint_lib
from synth import mixes, sharding, train
from synth.stages import segmentor, verify

NUM_STEPS = 4


def _params(state):
    return jax.tree.map(np.asarray, jax.device_get(state.params))


def _initial_state(spec, config):
    """The state `train.run_stage` starts `spec` from, computed as it does, so its compiled init is reused."""
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    repl = sharding.replicated(mesh)
    example = jax.tree.map(lambda x: np.asarray(x)[None], spec.preprocess(spec.source[0]))
    with jax.set_mesh(mesh):
        init_rng = jax.device_put(train.stage_rngs(config.seed, spec.name)[0], repl)
        return jax.jit(spec.init_state, out_shardings=repl)(init_rng, example)


@pytest.fixture(scope="module")
def runs(phantom_data_dir, tmp_path_factory):
    """Four runs of the real segmentor step, shared by the tests below (compiles are the cost).

    The 4-device runs share one spec, so one traced and compiled step (the loop caches it per `train_step`)
    serves them and the later tests that reuse `spec`; the step counts its traces.
    """
    root = tmp_path_factory.mktemp("runs")
    config = equivalence_config(phantom_data_dir, NUM_STEPS)
    spec = segmentor.build(config)
    real_step, traces = spec.train_step, []

    def counted_step(state, batch, rng):
        traces.append(1)  # Runs once per trace, not per step.
        return real_step(state, batch, rng)

    spec = dataclasses.replace(spec, train_step=counted_step)
    single_config = equivalence_config(phantom_data_dir, NUM_STEPS)
    single_config.mesh.shape = (1,)
    init = _params(_initial_state(spec, config))
    sharded = train.run_stage(spec, config, root / "sharded")
    # Its evaluation is compared with nothing: one compile fewer.
    single_spec = dataclasses.replace(segmentor.build(single_config), evaluate=None)
    single = train.run_stage(single_spec, single_config, root / "single")
    stopped = train.run_stage(spec, config, root / "resumed", stop_at=2)
    resumed = train.run_stage(spec, config, root / "resumed")
    return dict(
        root=root,
        spec=spec,
        init=init,
        sharded=_params(sharded),
        single=_params(single),
        stopped_step=int(stopped.step),
        resumed=_params(resumed),
        resumed_step=int(resumed.step),
        traces=len(traces),
        trace_log=traces,
    )


def test_step_is_compiled_once(runs):
    assert runs["traces"] == 1


def test_host_batch_statistics_are_logged_and_the_step_is_not_recompiled(runs, phantom_data_dir, tmp_path):
    """Stage D's source tags leave each batch on the host: its step stays the segmentor stage's program."""
    config = equivalence_config(phantom_data_dir, 2)
    config.segmentor.train.log_every = 1
    spec = runs["spec"]
    tagged = dataclasses.replace(
        spec,
        train=config.segmentor.train,
        preprocess=lambda example: {**spec.preprocess(example), "source": np.int32(mixes.SYNTHETIC)},
        evaluate=None,
        batch_metrics=verify.source_fractions,
    )
    traces = len(runs["trace_log"])
    train.run_stage(tagged, config, tmp_path)
    assert len(runs["trace_log"]) == traces  # A "source" entry on the devices would have traced anew.
    logged = [
        (r["step"], r["train/frac_synthetic"], r["train/frac_augmented"])
        for r in _rows(tmp_path / "segmentor")
        if "train/loss" in r
    ]
    assert logged == [(1, 1.0, 0.0), (2, 1.0, 0.0)]


def test_four_devices_match_one_device(runs):
    assert jax.device_count() == 4
    assert_same_training(runs["sharded"], runs["single"], runs["init"])


def test_resume_matches_uninterrupted_run(runs):
    assert runs["stopped_step"] == 2 and runs["resumed_step"] == NUM_STEPS
    for a, b in zip(jax.tree.leaves(runs["sharded"]), jax.tree.leaves(runs["resumed"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_crash_between_checkpoints_resumes_exactly(runs, phantom_data_dir, tmp_path, monkeypatch):
    """A run killed after step 3 (log at 3, last checkpoint at 2) replays step 3 and logs it once."""
    config = equivalence_config(phantom_data_dir, NUM_STEPS)
    config.segmentor.train.log_every, config.segmentor.train.checkpoint_every = 3, 2
    real_to_global, calls = sharding.to_global, []

    def dies_before_step_4(batch, shard):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated kill")
        return real_to_global(batch, shard)

    monkeypatch.setattr(sharding, "to_global", dies_before_step_4)
    # The runs' spec with these loop settings: its compiled step is reused. Evaluation is not at stake.
    spec = dataclasses.replace(runs["spec"], train=config.segmentor.train, evaluate=None)
    with pytest.raises(KeyboardInterrupt):
        train.run_stage(spec, config, tmp_path)
    monkeypatch.setattr(sharding, "to_global", real_to_global)
    out = tmp_path / "segmentor"
    assert [r["step"] for r in _rows(out) if "train/loss" in r] == [3]
    state = train.run_stage(spec, config, tmp_path)
    assert [r["step"] for r in _rows(out) if "train/loss" in r] == [3, 4]
    for a, b in zip(jax.tree.leaves(runs["sharded"]), jax.tree.leaves(_params(state))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_resume_with_a_changed_model_is_refused(runs, phantom_data_dir):
    config = equivalence_config(phantom_data_dir, NUM_STEPS + 2)
    config.segmentor.model.size = "small"
    with pytest.raises(ValueError, match=r"config.segmentor.model.size: 'tiny' -> 'small'"):
        train.run_stage(segmentor.build(config), config, runs["root"] / "resumed")


@pytest.mark.parametrize("key, value", [("log_every", 0), ("num_steps", 0), ("batch_size", -4)])
def test_bad_loop_settings_are_named(tiny_config, tmp_path, key, value):
    tiny_config.segmentor.train[key] = value
    with pytest.raises(ValueError, match=f"config.segmentor.train.{key} must be a positive integer"):
        train.run_stage(segmentor.build(tiny_config), tiny_config, tmp_path)
    assert not (tmp_path / "segmentor" / "done.json").exists()


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_leaves_logs_checkpoints_and_samples(runs):
    out = runs["root"] / "sharded" / "segmentor"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    assert all(np.isfinite(r["train/loss"]) for r in train_rows)
    assert any("eval/dice_whole/mean" in r for r in rows)
    assert list((out / "samples").glob("segmentation_*.png"))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((out / "done.json").read_text())["step"] == NUM_STEPS
    assert checkpoint_lib.Checkpointer(out / "checkpoints").latest_step() == NUM_STEPS


def test_complete_stage_is_not_rerun(runs, tiny_config):
    tiny_config.segmentor.train.num_steps = NUM_STEPS
    workdir = runs["root"] / "sharded"
    before = (workdir / "segmentor" / "metrics.jsonl").read_text()
    assert segmentor.run(tiny_config, workdir) is None
    assert (workdir / "segmentor" / "metrics.jsonl").read_text() == before


def test_nan_stops_run_and_keeps_last_checkpoint(runs, phantom_data_dir, tmp_path, monkeypatch):
    config = equivalence_config(phantom_data_dir, 6)
    # From the third step on the images are NaN, so the loss and then the parameters are, as after a
    # blow-up. Poisoning the input, not the step, reuses the runs' compiled step (a wrapped step compiles
    # anew: ~20 s).
    real_to_global, calls = sharding.to_global, []

    def nan_from_step_3(batch, shard):
        calls.append(1)
        if len(calls) >= 3:
            batch = {k: np.full_like(v, np.nan) if k == "image" else v for k, v in batch.items()}
        return real_to_global(batch, shard)

    monkeypatch.setattr(sharding, "to_global", nan_from_step_3)
    spec = dataclasses.replace(runs["spec"], train=config.segmentor.train, evaluate=None)
    with pytest.raises(train.NonFiniteError, match=r"NaN or Inf.*last good checkpoint \(step 2\)"):
        train.run_stage(spec, config, tmp_path)
    monkeypatch.setattr(sharding, "to_global", real_to_global)
    ckpt_dir = tmp_path / "segmentor" / "checkpoints"
    with checkpoint_lib.Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.all_steps() == [2]
    assert not (tmp_path / "segmentor" / "done.json").exists()
    # The kept checkpoint is whole and finite: the run resumes from it.
    state = train.run_stage(spec, config, tmp_path, stop_at=3)
    assert int(state.step) == 3
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_batch_must_split_over_devices(tiny_config, tmp_path):
    tiny_config.segmentor.train.batch_size = 6
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 devices"):
        train.run_stage(segmentor.build(tiny_config), tiny_config, tmp_path)
    assert not os.path.exists(tmp_path / "segmentor" / "done.json")


@pytest.mark.slow  # Two processes compiling at once (~45 s of the 2 cores) and the runs above (~60 s).
def test_two_processes_match_one_process(runs, phantom_data_dir, tmp_path):
    """jax.distributed on localhost: 2 processes × 2 CPU devices reach the 1-process parameters."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
    out = tmp_path / "params.npz"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # As in-process tests: compile fast, semantics unchanged.
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                worker,
                str(pid),
                str(port),
                phantom_data_dir,
                str(tmp_path / "run"),
                str(out),
                str(NUM_STEPS),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for pid in (0, 1)
    ]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:  # A hung worker must not outlive the test.
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    # Only process 0 writes: one row per log step and one TensorBoard event file.
    stage_out = tmp_path / "run" / "segmentor"
    assert [r["step"] for r in _rows(stage_out) if "train/loss" in r] == [2, 4]
    assert len(list((stage_out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    saved = np.load(out)
    two_process = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    assert_same_training(jax.tree.leaves(runs["sharded"]), two_process, jax.tree.leaves(runs["init"]))


def test_noise_drawn_in_the_step_is_split_like_the_batch():
    """A batch-sized draw from a replicated key is split over the devices, with what is computed from it.

    Unconstrained, XLA draws it whole on every device and runs the networks applied to it on the whole
    batch (stage A's generated branch: 2.3x one device's work per device, `python -m benchmarks.sharding`).
    """
    mesh = sharding.make_mesh((4,), (sharding.DATA_AXIS,))
    kernel = jnp.ones((64, 64))

    def branch(key, constrain):
        prior = jax.random.normal(key, (8, 64))
        prior = sharding.split_like_batch(prior) if constrain else prior
        return jnp.sum(jnp.tanh(prior @ kernel) @ kernel)

    def flops(constrain):
        with jax.set_mesh(mesh):
            jitted = jax.jit(
                functools.partial(branch, constrain=constrain), in_shardings=sharding.replicated(mesh)
            )
            compiled = jitted.lower(jax.random.key(0)).compile()
        cost = compiled.cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"], compiled

    whole, _ = flops(False)
    split, compiled = flops(True)
    assert split < 0.3 * whole, (split, whole)  # A quarter of the matmuls per device.
    # The same numbers as one device draws (partitionable threefry), and a no-op outside a mesh.
    np.testing.assert_allclose(compiled(jax.random.key(0)), branch(jax.random.key(0), False), rtol=1e-5)
    assert sharding.split_like_batch(kernel) is kernel
