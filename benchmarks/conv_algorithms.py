"""The convolution algorithms of `synth.models.conv` on 3×3 U-Net layers: forward and both gradients.

Usage: python -m benchmarks.conv_algorithms [--layers 184x144x64,92x72x128,46x36x256,64x64x32]
                                            [--batches 1,4,8] [--steps 3] [--upsampling]

For each layer (H×W×C, a 3×3 C → C convolution, stride 1, SAME) and batch, times the forward pass, the
input gradient and the filter gradient under each `SYNTH_CONV` algorithm (`xla`, `per_example`,
`winograd2`, `winograd4`), each jitted once and timed after a warm-up call. `GFLOP/s` is the direct
convolution's multiply-adds (2·N·H·W·9·C²) over the time, so an algorithm that multiplies less can exceed
the machine's matmul rate.

`--upsampling` times a U-Net's up-sampling convolution instead (`conv.upsampled_conv_general_dilated`:
the H×W×C layer up-sampled ×2 by nearest neighbours, then the 3×3 convolution on the 2H×2W map) under
`xla` and `winograd4` (up-sampled, then convolved) and `auto` (the sub-pixel form on these sizes);
GFLOP/s counts the up-sampled map's direct convolution.
"""

import argparse
import os

import jax

from benchmarks import common
from synth.models import conv

ALGORITHMS = ("xla", "per_example", "winograd2", "winograd4")
UPSAMPLING_ALGORITHMS = ("xla", "winograd4", "auto")
NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel):
    return conv.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)


def _upsampling_conv(x, kernel):
    return conv.upsampled_conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)


def parts(x, kernel, grad, layer=_conv):
    """The three jitted computations of one layer: forward, input gradient, filter gradient."""
    # A new function object each time: jit's trace cache is keyed by the function, so `jax.jit(_conv)` would
    # reuse the first algorithm's trace for every algorithm.
    forward = jax.jit(lambda x, k: layer(x, k))
    input_grad = jax.jit(lambda x, k, g: jax.vjp(lambda x_: layer(x_, k), x)[1](g)[0])
    filter_grad = jax.jit(lambda x, k, g: jax.vjp(lambda k_: layer(x, k_), k)[1](g)[0])
    return {
        "forward": (forward, (x, kernel)),
        "input grad": (input_grad, (x, kernel, grad)),
        "filter grad": (filter_grad, (x, kernel, grad)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="184x144x64,92x72x128,46x36x256,64x64x32")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--upsampling", action="store_true", help="the up-sampling convolution (docstring)")
    args = parser.parse_args()
    algorithms = UPSAMPLING_ALGORITHMS if args.upsampling else ALGORITHMS
    layer_fn, scale = (_upsampling_conv, 2) if args.upsampling else (_conv, 1)
    what = "up-sampling ×2 then 3×3" if args.upsampling else "3×3"
    common.header(f"{what} convolution algorithms (ms per call; direct-equivalent GFLOP/s)")
    print("| layer H×W×C | batch | part | " + " | ".join(algorithms) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in algorithms) + " |")
    for layer in args.layers.split(","):
        height, width, channels = (int(v) for v in layer.split("x"))
        for batch in (int(b) for b in args.batches.split(",")):
            keys = jax.random.split(jax.random.key(0), 3)
            x = jax.random.normal(keys[0], (batch, height, width, channels))
            kernel = 0.05 * jax.random.normal(keys[1], (3, 3, channels, channels))
            grad = jax.random.normal(keys[2], (batch, scale * height, scale * width, channels))
            flops = 2 * batch * scale**2 * height * width * 9 * channels * channels
            cells = {}
            for algorithm in algorithms:
                os.environ[conv.ENV_VAR] = algorithm  # Read when each function is traced, below.
                for part, (fn, fn_args) in parts(x, kernel, grad, layer_fn).items():
                    seconds = common.timed(fn, *fn_args, steps=args.steps)
                    cells.setdefault(part, []).append(f"{seconds * 1e3:.1f} ({flops / seconds / 1e9:.0f})")
            for part, row in cells.items():
                print(f"| {layer} | {batch} | {part} | " + " | ".join(row) + " |", flush=True)
    os.environ.pop(conv.ENV_VAR, None)


if __name__ == "__main__":
    main()
