"""Input-pipeline throughput: examples/s from the phantom data source through grain to device arrays.

Usage: python -m benchmarks.input_pipeline [--config demo|default|tiny] [--batch 8] [--batches 200]

Measures the real training path (`synth.input_pipeline.train_iterator` with the segmentor's preprocessing,
then `sharding.to_global`), with 0 and 2 grain workers, and prints a Markdown table with bytes moved.
"""

import argparse
import os
import tempfile
import time

import jax

from benchmarks import common
from synth import input_pipeline, sharding
from synth.lesion import segment


def measure(source, *, batch_size: int, batches: int, workers: int, mesh) -> float:
    it = input_pipeline.train_iterator(
        source, preprocess=segment.preprocess, batch_size=batch_size, seed=0, num_workers=workers
    )
    sh = sharding.batch_sharding(mesh)
    jax.block_until_ready(sharding.to_global(next(it), sh))  # Warm-up: worker start, first reads.
    t0 = time.perf_counter()
    for _ in range(batches):
        out = sharding.to_global(next(it), sh)
    jax.block_until_ready(out)
    return batches * batch_size / (time.perf_counter() - t0)


def main() -> None:
    import data_builders

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="default")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--data_dir", default=os.environ.get("SYNTH_DATA_DIR") or tempfile.mkdtemp())
    args = parser.parse_args()
    data_builders.build("phantom", data_dir=args.data_dir, config=args.config)
    source = data_builders.data_source("phantom", "train", data_dir=args.data_dir, config=args.config)
    mesh = sharding.make_mesh((-1,), ("data",))
    example = segment.preprocess(source[0])
    nbytes = sum(v.nbytes for v in example.values())
    h, w, k = example["image"].shape
    common.header(f"Input pipeline, phantom/{args.config} ({h}×{w}×{k}), global batch {args.batch}")
    print("| grain workers | examples/s | MB/s to device |")
    print("| --- | --- | --- |")
    for workers in (0, 2):
        rate = measure(source, batch_size=args.batch, batches=args.batches, workers=workers, mesh=mesh)
        print(f"| {workers} | {rate:.0f} | {rate * nbytes / 1e6:.1f} |")


if __name__ == "__main__":
    main()
