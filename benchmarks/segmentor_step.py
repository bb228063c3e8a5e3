"""Segmentor training-step throughput (examples/s) with the FLOPs and bytes XLA counts for one step.

Usage: python -m benchmarks.segmentor_step [--config demo|default] [--size tiny|small|base] [--steps 10]

One example is one slice with all K modalities (K segmentors trained at once). Prints a Markdown row per
stacking mode, with achieved GFLOP/s to hold against the machine's peak.
"""

import argparse
import os
import tempfile
import time

import jax

from benchmarks import common
from configs import phantom
from synth import input_pipeline
from synth.stages import segmentor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--size", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--modes", default="unrolled,vmap")
    parser.add_argument("--data_dir", default=os.environ.get("SYNTH_DATA_DIR") or tempfile.mkdtemp())
    args = parser.parse_args()
    config = phantom.get_config(args.config if args.config in ("demo", "runlocal") else None)
    config.data.data_dir = args.data_dir
    if args.config not in ("demo", "runlocal"):
        config.data.builder_config = args.config
    if args.size:
        config.segmentor.model.size = args.size
    rows = []
    for mode in args.modes.split(","):
        config.segmentor.stacking = mode
        spec = segmentor.build(config)
        it = input_pipeline.train_iterator(
            spec.source, preprocess=spec.preprocess, batch_size=args.batch, seed=0
        )
        batch = next(it)
        state = jax.jit(spec.init_state)(jax.random.key(0), jax.tree.map(lambda x: x[:1], batch))
        step = jax.jit(spec.train_step, donate_argnums=0)
        compiled = step.lower(state, batch, jax.random.key(1)).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        state, metrics = step(state, batch, jax.random.key(1))
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for i in range(args.steps):
            state, metrics = step(state, batch, jax.random.key(i))
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - t0) / args.steps
        rows.append((mode, seconds, cost.get("flops", 0.0), cost.get("bytes accessed", 0.0)))
    h, w, k = batch["image"].shape[1:]
    common.header(
        f"Segmentor training step, {h}×{w}, K={k}, size={config.segmentor.model.size}, batch {args.batch}"
    )
    print("| stacking | s/step | examples/s | GFLOP/step | GB accessed/step | GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, s, flops, nbytes in rows:
        print(
            f"| {mode} | {s:.3f} | {args.batch / s:.1f} | {flops / 1e9:.2f} | {nbytes / 1e9:.2f} | "
            f"{flops / 1e9 / s:.1f} |"
        )


if __name__ == "__main__":
    main()
