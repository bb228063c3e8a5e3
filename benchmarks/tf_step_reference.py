"""A reference for `benchmarks.synthesis_step`: the same stage-B training step and generation in TensorFlow.

Usage (in an environment with TensorFlow, which synth does not depend on; e.g. `python -m venv tf &&
tf/bin/pip install tensorflow-cpu numpy`): python benchmarks/tf_step_reference.py [--shape 184x144]
[--features 64] [--batch 1] [--steps 10] [--gen_batches 1,8] [--decoders unrolled|batched]

Issue 19 compares our stage-B step with the authors' TF1 graph, which is not ours to ship and not in this
repository. This script builds the work of our step, network for network, in TensorFlow 2
(`tf.function`, TF's default graph optimisations and oneDNN kernels, no XLA), so that the two frameworks
can be timed on one machine in one session:

* G: the U-Net of `synth.models.unet` (3 levels, width `--features`: 64 is the size table's `base`) with
  FiLM conditioning, its input the structure map and the one-hot lesion label (1 + 5 channels); the
  encoder runs once and the decoder once per modality (`unet.apply_per_condition`; `--decoders`: as T
  calls, or as one call on the tiled encoding). Each decoder convolves its concatenated skip, as the
  authors' graph does; ours on CPU also computes the skips' share once for all modalities, and stage B
  runs G_t one source per call: algorithmic savings of ours, not mirrored here;
* G_t, frozen: the same U-Net on one modality, each of the K fakes encoded once and decoded into the
  K − 1 other modalities (`registration.translate_pairs`: 4 encoder and 12 decoder passes for K = 4);
* four frozen segmentors, one U-Net per modality with 5 output classes (`segmentor.variant=n_seg`);
* D, the two-head patch discriminator (`synth.models.discriminator.PatchDiscriminator`), on the K real
  and the K synthetic images;
* least-squares adversarial and category terms, L1 registration and agreement, cross-entropy lesion
  term; one backward pass for G's loss and one for D's, and an Adam update of each.

Every convolution, instance norm (learnt scale and offset), FiLM dense layer and activation of ours is
here with the same shapes, and the script prints every network's parameter count to check that against
ours (G + D is `benchmarks.synthesis_step`'s "parameters" column). Left out, as too small to matter
(under 1 % of the FLOPs): the on-device structure-map extraction and label draw (the inputs are random
tensors of the right shapes). TF's
FLOP count is the profiler's (`tf.compat.v1.profiler`, float operations of the step's graph), printed
beside the times; XLA's for ours is in `benchmarks.synthesis_step`'s table.
"""

import argparse
import time

import numpy as np
import tensorflow as tf

K = 4  # Modalities (BRATS: T1, T2, T1c, FLAIR).
CLASSES = 5  # BRATS lesion labels.
LEVELS = 3  # The paper's U-Net depth: 184×144 -> 23×18.
TRUNK = ((5, 2, 1), (5, 2, 1), (3, 2, 2), (3, 2, 2))  # D's (kernel, stride, width multiplier).
EPS = 1e-5
SLOPE = 0.2


class Params:
    """Creates and holds a network's variables (N(0, 0.02) kernels, as ours)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.variables: list[tf.Variable] = []

    def new(self, shape, *, value=None) -> tf.Variable:
        init = self.rng.normal(0.0, 0.02, shape) if value is None else np.full(shape, value)
        var = tf.Variable(init.astype(np.float32))
        self.variables.append(var)
        return var

    def block(self, k: int, cin: int, cout: int, *, norm: bool = True, film: int = 0) -> dict:
        """Conv (bias only without a norm), instance norm's scale and offset, and FiLM's dense layer."""
        p = {"w": self.new((k, k, cin, cout))}
        if norm:
            p["scale"], p["offset"] = self.new((cout,), value=1.0), self.new((cout,), value=0.0)
        else:
            p["bias"] = self.new((cout,), value=0.0)
        if film:
            p["film_w"], p["film_b"] = self.new((film, 2 * cout)), self.new((2 * cout,), value=0.0)
        return p


def apply_block(p: dict, x, *, stride: int = 1, act: bool = True, film=None):
    x = tf.nn.conv2d(x, p["w"], stride, "SAME")
    if "scale" in p:
        mean, var = tf.nn.moments(x, axes=[1, 2], keepdims=True)
        x = (x - mean) * tf.math.rsqrt(var + EPS) * p["scale"] + p["offset"]
    else:
        x = x + p["bias"]
    if film is not None and "film_w" in p:
        gamma, beta = tf.split(tf.matmul(film, p["film_w"]) + p["film_b"], 2, axis=-1)
        x = x * (1.0 + gamma[:, None, None, :]) + beta[:, None, None, :]
    return tf.nn.leaky_relu(x, SLOPE) if act else x


def unet_params(seed: int, cin: int, features: int, out: int, film: int, sigmoid: bool) -> Params:
    """The U-Net of `synth.models.unet` (its module docstring's layer table); `film`: K of a FiLM U-Net.

    No output norm (`norm_output=False`, as the configs); a sigmoid on images, logits for segmentors.
    """
    p = Params(seed)
    widths = [features * 2**level for level in range(LEVELS)]
    p.enc, c = [], cin
    for level in range(LEVELS):
        down = p.block(3, c, widths[level - 1]) if level > 0 else None
        c = widths[level - 1] if level > 0 else c
        p.enc.append((down, p.block(3, c, widths[level]), p.block(3, widths[level], widths[level])))
        c = widths[level]
    p.down_last = p.block(3, c, widths[-1], norm=False)
    p.bottleneck = p.block(3, widths[-1], widths[-1])
    p.dec, c = [], widths[-1]
    for level in reversed(range(LEVELS)):
        dec_width = widths[max(level - 1, 0)]
        up = p.block(3, c, widths[level], film=film)
        conv0 = p.block(3, 2 * widths[level], dec_width, film=film)
        p.dec.append((up, conv0, p.block(3, dec_width, dec_width, film=film)))
        c = dec_width
    p.out = p.block(3, c, out * max(film, 1), norm=False)
    p.out_channels, p.sigmoid = out, sigmoid
    return p


def encode(p: Params, x):
    h, skips = x, []
    for level, (down, conv0, conv1) in enumerate(p.enc):
        if level > 0:
            h = apply_block(down, h, stride=2)
        h = apply_block(conv1, apply_block(conv0, h))
        skips.append(h)
    h = apply_block(p.down_last, h, stride=2, act=False)
    return apply_block(p.bottleneck, h), skips


def decode(p: Params, h, skips, film=None):
    for level, (up, conv0, conv1) in zip(reversed(range(LEVELS)), p.dec, strict=True):
        skip = skips[level]
        h = tf.repeat(tf.repeat(h, 2, axis=1), 2, axis=2)[:, : skip.shape[1], : skip.shape[2]]
        h = tf.concat([skip, apply_block(up, h, film=film)], axis=-1)
        h = apply_block(conv1, apply_block(conv0, h, film=film), film=film)
    out = apply_block(p.out, h, act=False)
    if film is not None:  # One output map per condition, the condition's one picked.
        heads = tf.reshape(out, [-1, *out.shape[1:3], film.shape[-1], p.out_channels])
        out = tf.einsum("bhwkc,bk->bhwc", heads, film)
    return tf.sigmoid(out) if p.sigmoid else out


def per_condition(p: Params, x, conds, unrolled: bool):
    """`unet.apply_per_condition`: x (N, H, W, C) under T conditions conds (T, N, K) -> (T·N, H, W, out).

    One encoder pass; the T decoder passes as T calls (`unrolled`, ours on CPU) or as one call on the
    encoding tiled T times (ours on GPU).
    """
    t = conds.shape[0]
    h, skips = encode(p, x)
    if unrolled:
        return tf.concat([decode(p, h, skips, conds[i]) for i in range(t)], 0)
    tile = lambda a: tf.reshape(tf.tile(a[None], [t, 1, 1, 1, 1]), [-1, *a.shape[1:]])  # noqa: E731
    return decode(p, tile(h), [tile(s) for s in skips], tf.reshape(conds, [-1, conds.shape[-1]]))


def disc_params(seed: int, features: int) -> Params:
    p = Params(seed)
    p.trunk, c = [], 1
    for kernel, _, mult in TRUNK:
        p.trunk.append(p.block(kernel, c, features * mult))
        c = features * mult
    p.heads = [(p.block(3, c, features), p.block(3, features, 1, norm=False)) for _ in range(2)]
    return p


def discriminate(p: Params, x):
    for block, (_, stride, _) in zip(p.trunk, TRUNK, strict=True):
        x = apply_block(block, x, stride=stride)
    return [apply_block(out, apply_block(hidden, x), act=False) for hidden, out in p.heads]


def adam(variables, grads, slots, step, lr=1e-4, b1=0.5, b2=0.999):
    for var, grad, (m, v) in zip(variables, grads, slots, strict=True):
        m.assign(b1 * m + (1 - b1) * grad)
        v.assign(b2 * v + (1 - b2) * tf.square(grad))
        m_hat = m / (1 - b1**step)
        v_hat = v / (1 - b2**step)
        var.assign_sub(lr * m_hat / (tf.sqrt(v_hat) + 1e-8))


def build(features: int, unrolled: bool):
    g = unet_params(0, 1 + CLASSES, features, 1, film=K, sigmoid=True)
    g_t = unet_params(1, 1, features, 1, film=K, sigmoid=True)
    segmentors = [unet_params(2 + k, 1, features, CLASSES, film=0, sigmoid=False) for k in range(K)]
    d = disc_params(9, features)
    modality_conds = tf.eye(K)  # Condition t = modality t.
    # translate_pairs: source i into its K − 1 other modalities, target-major order of conditions.
    targets = np.array([[j for j in range(K) if j != i] for i in range(K)]).T  # (K − 1, K)

    def generate(g_input):
        b = g_input.shape[0]
        conds = tf.repeat(modality_conds[:, None, :], b, axis=1)  # (K, B, K)
        return per_condition(g, g_input, conds, unrolled)  # (K·B, H, W, 1), modality-major

    def losses(g_input, real, label):
        b = g_input.shape[0]
        fakes = generate(g_input)
        d_fake, c_fake = discriminate(d, fakes)
        d_real, c_real = discriminate(d, real)
        index = tf.reshape(tf.repeat(tf.range(K, dtype=tf.float32), b), [-1, 1, 1, 1])
        target_rows = np.repeat(targets, b, axis=1)  # (K − 1, K·B): each source row's target modality
        translations = per_condition(g_t, fakes, tf.one_hot(target_rows, K), unrolled)  # (K − 1)·K·B images
        goal = tf.gather(fakes, (target_rows * b + np.tile(np.arange(b), K)).reshape(-1))  # the target's fake
        registration = tf.reduce_mean(tf.abs(translations - goal))
        agreement = tf.reduce_mean(tf.abs(translations - tf.reduce_mean(translations, 0, keepdims=True)))
        lesion = 0.0
        for k, seg in enumerate(segmentors):
            logits = decode(seg, *encode(seg, fakes[k * b : (k + 1) * b]))
            lesion += tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(label, logits))
        g_loss = (
            3 * tf.reduce_mean(tf.square(d_fake - 1))
            + 5 * tf.reduce_mean(tf.square(c_fake - index))
            + 20 * registration
            + 5 * agreement
            + 10 * lesion
        )
        d_loss = (
            5 * tf.reduce_mean(tf.square(d_real - 1))
            + 3 * tf.reduce_mean(tf.square(d_fake))
            + 5 * (tf.reduce_mean(tf.square(c_real - index)) + tf.reduce_mean(tf.square(c_fake - index)))
        )
        return g_loss, d_loss

    g_slots = [(tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))) for v in g.variables]
    d_slots = [(tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))) for v in d.variables]
    step = tf.Variable(0.0)

    @tf.function(jit_compile=False)
    def train_step(g_input, real, label):
        with tf.GradientTape(persistent=True) as tape:
            g_loss, d_loss = losses(g_input, real, label)
        g_grads = tape.gradient(g_loss, g.variables)  # Through D, G_t and the segmentors into G only.
        d_grads = tape.gradient(d_loss, d.variables)
        step.assign_add(1.0)
        adam(g.variables, g_grads, g_slots, step)
        adam(d.variables, d_grads, d_slots, step)
        return g_loss + d_loss

    counts = {"G": g, "D": d, "G_t": g_t, "segmentors (4)": segmentors}
    return train_step, tf.function(generate, jit_compile=False), counts


def graph_gflop(fn, *args) -> float:
    """The float operations TF's profiler counts in `fn`'s graph for these inputs, in GFLOP."""
    graph = fn.get_concrete_function(*args).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops / 1e9


def timed(fn, *args, steps: int) -> float:
    np.asarray(fn(*args))  # Warm-up: trace, optimise the graph, pick kernels.
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    np.asarray(out)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="184x144")
    parser.add_argument("--features", type=int, default=64, help="U-Net/D width: 64 = base, 32 = small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gen_batches", default="1,8")
    parser.add_argument(
        "--decoders", default="unrolled", choices=("unrolled", "batched"), help="T calls, or one tiled call"
    )
    args = parser.parse_args()
    h, w = (int(v) for v in args.shape.split("x"))
    print(
        f"TensorFlow {tf.__version__}, {args.shape}, features {args.features}, training batch {args.batch}, "
        f"decoders {args.decoders}"
    )
    train_step, generate, counts = build(args.features, args.decoders == "unrolled")
    for name, nets in counts.items():
        nets = nets if isinstance(nets, list) else [nets]
        total = sum(int(np.prod(v.shape)) for p in nets for v in p.variables)
        print(f"- {name}: {total / 1e6:.3f} M parameters")
    rng = np.random.default_rng(0)
    print("\n| work | batch | s/call | per example or set | GFLOP/example or set (TF's count) | GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    for n in (int(v) for v in args.gen_batches.split(",")):
        g_input = tf.constant(rng.random((n, h, w, 1 + CLASSES), np.float32))
        gflop = graph_gflop(generate, g_input) / n
        seconds = timed(generate, g_input, steps=args.steps)
        rate = gflop * n / seconds
        print(f"| generation | {n} | {seconds:.3f} | {seconds / n:.3f} s/set | {gflop:.1f} | {rate:.0f} |")
    b = args.batch
    g_input = tf.constant(rng.random((b, h, w, 1 + CLASSES), np.float32))
    real = tf.constant(rng.random((K * b, h, w, 1), np.float32))
    label = tf.constant(rng.integers(0, CLASSES, (b, h, w)), tf.int32)
    gflop = graph_gflop(train_step, g_input, real, label) / b
    seconds = timed(train_step, g_input, real, label, steps=args.steps)
    rate = gflop * b / seconds
    print(f"| training step | {b} | {seconds:.2f} | {seconds / b:.2f} s/example | {gflop:.1f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
