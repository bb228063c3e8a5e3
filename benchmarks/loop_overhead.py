"""Loop overhead: steps/s of a trivial step through the shared loop, against a bare jitted loop.

Usage: python -m benchmarks.loop_overhead [--steps 2000]

The step does almost no work (a 4-float state, a batch of 8 scalars), so what is measured is the loop
itself: batch assembly (grain + `make_array_from_process_local_data`), dispatch, the NaN counter and
periodic metric fetches. Checkpoints and evaluation are disabled for the measurement.
"""

import argparse
import logging
import tempfile
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import phantom
from synth import train


@flax.struct.dataclass
class _State:
    step: jax.Array
    w: jax.Array


def _init(rng, batch):
    return _State(step=jnp.zeros((), jnp.int32), w=jnp.zeros((4,)))


def _step(state, batch, rng):
    w = state.w + 1e-3 * jnp.mean(batch["x"])
    return state.replace(step=state.step + 1, w=w), {"loss": jnp.sum(w)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    logging.getLogger("synth").setLevel(logging.WARNING)
    config = phantom.get_config()
    loop = config.segmentor.train
    loop.num_steps, loop.batch_size = args.steps, 8
    loop.log_every, loop.checkpoint_every, loop.eval_every = 100, 10**9, 10**9
    source = [{"x": np.float32(i)} for i in range(64)]
    spec = train.StageSpec("overhead", loop, source, lambda e: e, _init, _step)
    with tempfile.TemporaryDirectory() as workdir:
        train.run_stage(spec, config, workdir, stop_at=50)  # Compile and warm up.
        t0 = time.perf_counter()
        train.run_stage(spec, config, workdir)
        loop_rate = (args.steps - 50) / (time.perf_counter() - t0)

    step = jax.jit(_step, donate_argnums=0)
    state, batch = _init(None, None), {"x": jnp.ones((8,))}
    state, _ = step(state, batch, None)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch, None)
    jax.block_until_ready(state)
    bare_rate = args.steps / (time.perf_counter() - t0)
    common.header(f"Loop overhead, trivial step, {args.steps} steps, global batch 8")
    print("| loop | steps/s | µs/step |")
    print("| --- | --- | --- |")
    print(
        f"| synth.train.run_stage (data, sharding, NaN guard, logging) | {loop_rate:.0f} | "
        f"{1e6 / loop_rate:.0f} |"
    )
    print(f"| bare jitted step, same batch every step | {bare_rate:.0f} | {1e6 / bare_rate:.0f} |")


if __name__ == "__main__":
    main()
