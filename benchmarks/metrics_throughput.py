"""Stage-D metric throughput: MS-SSIM and Dice pairs per second at a given size, with XLA's FLOP count.

Usage: python -m benchmarks.metrics_throughput [--size 512] [--batch 8] [--steps 5]

MS-SSIM is TF's five-scale algorithm on one-channel image pairs (`synth.metrics.image.ms_ssim`); Dice is the
per-class Dice of 5-class label maps plus the three BRATS regions (`synth.metrics`), per image.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from synth import metrics
from synth.metrics import image


def _dice(pred, target):
    per_class, _ = metrics.dice_per_class(pred, target, num_classes=5)
    return per_class, metrics.brats_region_dice(pred, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size)
    a = jnp.asarray(rng.random(shape + (1,), np.float32))
    b = jnp.asarray(np.clip(np.asarray(a) + 0.1 * rng.standard_normal(shape + (1,)), 0, 1).astype(np.float32))
    pred = jnp.asarray(rng.integers(0, 5, shape), jnp.int32)
    target = jnp.asarray(rng.integers(0, 5, shape), jnp.int32)
    rows = []
    for name, fn, inputs in (
        ("MS-SSIM (1 channel)", jax.jit(lambda x, y: image.ms_ssim(x, y)), (a, b)),
        ("Dice (5 classes + 3 BRATS regions)", jax.jit(_dice), (pred, target)),
    ):
        compiled, flops, nbytes = common.compile_once(fn, *inputs)
        seconds = common.timed(compiled, *inputs, steps=args.steps)
        rows.append((name, args.batch / seconds, flops / args.batch, nbytes / args.batch))
    common.header(f"Stage D metrics at {args.size}², batch {args.batch}")
    print("| metric | image pairs/s | MFLOP/pair | MB/pair |")
    print("| --- | --- | --- | --- |")
    for name, rate, flops, nbytes in rows:
        print(f"| {name} | {rate:.1f} | {flops / 1e6:.1f} | {nbytes / 1e6:.1f} |")


if __name__ == "__main__":
    main()
