"""A named reference for `benchmarks.conv_algorithms`: the same 3×3 layers in TensorFlow's oneDNN kernels.

Usage (in an environment with TensorFlow, which synth does not depend on; e.g. `python -m venv tf &&
tf/bin/pip install tensorflow-cpu numpy`): python benchmarks/tf_reference.py [--layers 184x144x64,...]
[--batches 1,8] [--steps 5]

Issue 19 compares our stage-B step with the authors' TF1 graph, whose convolutions run in oneDNN. Their
graph is not ours to ship; this script times what decides the difference, TF's convolution forward pass,
input gradient and filter gradient (`tf.function(jit_compile=False)`, TF's default oneDNN path), on the
layers and batches `python -m benchmarks.conv_algorithms` times under XLA, so both run on one machine in
one session. Also prints a 4096² sgemm in TF, the machine's matmul rate. Output: a Markdown table in the
same units (ms per call; the direct convolution's GFLOP over that time).
"""

import argparse
import os
import time

import numpy as np
import tensorflow as tf


def _timed(fn, *args, steps: int) -> float:
    fn(*args)  # Warm-up: trace and pick kernels.
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    np.asarray(out)  # Wait for the last result.
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="184x144x64,92x72x128,46x36x256,64x64x32")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset: on by default on x86")
    print(f"TensorFlow {tf.__version__}; TF_ENABLE_ONEDNN_OPTS {onednn}")
    n = 4096
    a = tf.random.normal((n, n))
    matmul = tf.function(lambda x: tf.linalg.matmul(x, x))
    print(f"sgemm {n}²: {2 * n**3 / _timed(matmul, a, steps=args.steps) / 1e9:.0f} GFLOP/s\n")
    print("| layer H×W×C | batch | part | tf (oneDNN) |\n| --- | --- | --- | --- |")
    for layer in args.layers.split(","):
        height, width, channels = (int(v) for v in layer.split("x"))
        for batch in (int(b) for b in args.batches.split(",")):
            x = tf.random.normal((batch, height, width, channels))
            kernel = 0.05 * tf.random.normal((3, 3, channels, channels))
            grad = tf.random.normal(x.shape)
            flops = 2 * batch * height * width * 9 * channels * channels
            forward = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"))
            input_grad = tf.function(
                lambda x, k, g: tf.compat.v1.nn.conv2d_backprop_input(tf.shape(x), k, g, [1, 1, 1, 1], "SAME")
            )
            filter_grad = tf.function(
                lambda x, k, g: tf.compat.v1.nn.conv2d_backprop_filter(
                    x, tf.shape(k), g, [1, 1, 1, 1], "SAME"
                )
            )
            for part, fn, inputs in (
                ("forward", forward, (x, kernel)),
                ("input grad", input_grad, (x, kernel, grad)),
                ("filter grad", filter_grad, (x, kernel, grad)),
            ):
                seconds = _timed(fn, *inputs, steps=args.steps)
                print(
                    f"| {layer} | {batch} | {part} | {seconds * 1e3:.1f} ({flops / seconds / 1e9:.0f}) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
