"""Stage-D metric throughput: MS-SSIM and Dice pairs per second at a given size, with XLA's FLOP count.

Usage: python -m benchmarks.metrics_throughput [--size 512] [--batch 8] [--steps 5] [--filter band]

MS-SSIM is TF's five-scale algorithm on one-channel image pairs (`synth.metrics.image.ms_ssim`); Dice is the
per-class Dice of 5-class label maps plus the three BRATS regions (`synth.metrics`), per image. SSIM's
separable Gaussian window over a pair's four statistics is timed in three forms: synth's banded matrix
products (`image.gaussian_filter_valid`), the depthwise convolution it replaced (the reference) and sums
of shifted slices. The memorisation audit's all-pairs SSIM (`synth.memorisation.nearest_real`,
four-channel images) is timed in pairs per second (a host loop over tiles: no single program to count).
`--filter` swaps the form the MS-SSIM and audit rows use (`image.gaussian_filter_valid` replaced for this
process), to compare the forms where they are used.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from synth import memorisation, metrics
from synth.metrics import image


def _dice(pred, target):
    per_class, _ = metrics.dice_per_class(pred, target, num_classes=5)
    return per_class, metrics.brats_region_dice(pred, target)


def depthwise_gaussian_filter(x, filter_size: int = 11, filter_sigma: float = 1.5):
    """The reference: the separable window as two depthwise convolutions (synth's form until 2026-12-07)."""
    taps = image.gaussian_window(filter_size, filter_sigma)
    channels = x.shape[-1]

    def depthwise(y, kernel_shape):
        return jax.lax.conv_general_dilated(
            y,
            jnp.tile(taps.reshape(*kernel_shape, 1, 1), (1, 1, 1, channels)),
            window_strides=(1, 1),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels,
            precision=jax.lax.Precision.HIGHEST,
        )

    return depthwise(depthwise(x, (filter_size, 1)), (1, filter_size))


def shifted_slices_gaussian_filter(x, filter_size: int = 11, filter_sigma: float = 1.5):
    """The separable window as sums of shifted slices, one per tap and direction (not adopted)."""
    with jax.ensure_compile_time_eval():
        taps = [float(t) for t in np.asarray(image.gaussian_window(filter_size, filter_sigma))]

    def along(y, axis):
        n = y.shape[axis] - filter_size + 1
        out = taps[0] * jax.lax.slice_in_dim(y, 0, n, axis=axis)
        for shift in range(1, filter_size):
            out = out + taps[shift] * jax.lax.slice_in_dim(y, shift, shift + n, axis=axis)
        return out

    return along(along(x, 1), 2)


FILTERS = {
    "band": image.gaussian_filter_valid,
    "depthwise": depthwise_gaussian_filter,
    "slices": shifted_slices_gaussian_filter,
}


def audit_pairs_per_second(images: np.ndarray) -> float:
    """Pairs per second of the memorisation audit's SSIM search of `images` against themselves."""
    memorisation.nearest_real(images[:2], images[:2])  # Compiles the tile program.
    t0 = time.perf_counter()
    memorisation.nearest_real(images, images)
    return len(images) ** 2 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--audit_images", type=int, default=32, help="images of the audit row (one tile)")
    parser.add_argument("--audit_size", type=int, default=128, help="their side")
    parser.add_argument("--filter", choices=sorted(FILTERS), default="band", help="window of MS-SSIM, audit")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size)
    a = jnp.asarray(rng.random(shape + (1,), np.float32))
    b = jnp.asarray(np.clip(np.asarray(a) + 0.1 * rng.standard_normal(shape + (1,)), 0, 1).astype(np.float32))
    pred = jnp.asarray(rng.integers(0, 5, shape), jnp.int32)
    target = jnp.asarray(rng.integers(0, 5, shape), jnp.int32)
    # A pair's four SSIM statistics (x, y, xy, x² + y²) side by side, as `image.ssim` filters them.
    stats = jnp.concatenate([a, b, a * b, a * a + b * b], axis=-1)
    rows = []
    image.gaussian_filter_valid = FILTERS[args.filter]  # What the MS-SSIM and audit rows use.
    form = "" if args.filter == "band" else f", {args.filter} window"
    for name, fn, inputs in (
        ("Gaussian window, 4 statistics: banded matrices (synth)", FILTERS["band"], (stats,)),
        ("Gaussian window, 4 statistics: depthwise convolution (reference)", FILTERS["depthwise"], (stats,)),
        ("Gaussian window, 4 statistics: shifted slices", FILTERS["slices"], (stats,)),
        (f"MS-SSIM (1 channel{form})", lambda x, y: image.ms_ssim(x, y), (a, b)),
        ("Dice (5 classes + 3 BRATS regions)", _dice, (pred, target)),
    ):
        compiled, flops, nbytes = common.compile_once(jax.jit(fn), *inputs)
        seconds = common.timed(compiled, *inputs, steps=args.steps)
        per_pair = (args.batch / seconds, flops / args.batch / 1e6, nbytes / args.batch / 1e6)
        rows.append((name, *(f"{v:.1f}" for v in per_pair)))
    n, side = args.audit_images, args.audit_size
    rate = audit_pairs_per_second(rng.random((n, side, side, 4), np.float32))
    rows.append(
        (f"SSIM all pairs at {side}², 4 channels (memorisation audit, {n}²{form})", f"{rate:.1f}", "-", "-"),
    )
    common.header(f"Stage D metrics at {args.size}², batch {args.batch}")
    print("| metric | image pairs/s | MFLOP/pair | MB/pair |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
