"""Stage-B throughput of a one-modality family: training examples/s and generated images/s, with FLOPs.

Usage: python -m benchmarks.family_step [--family retina] [--size 512] [--model base] [--batch 2]
                                        [--steps 3] [--gen_batch 4]

One training example is one structure map made into the family's image (RGB for the retina, 3 slices for
Tianchi): extraction of the real map, noise fusion, one G call, D on real and synthetic images, the frozen
lesion processor where the family has one (the X-ray classifier, Tianchi's SSD detector with its multibox
loss against the drawn label's boxes), and both updates. One generated image is G alone on a
noise-fused map (`synthesis_nets.generate`; on CPU a few images per call, counted on one call's batch).
Inputs are random images of the family's shape: speed does not depend on the pixels, and frozen networks
are randomly initialised.
"""

import argparse
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from synth import conditioning, input_pipeline, optim, synthesis_nets
from synth.lesion import classify, detect
from synth.stages import synthesis


def _batch(config, size: int, n: int, seed: int = 0) -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(seed)
    channels = config.data.channels * len(config.data.modalities)
    label = rng.integers(0, config.data.num_classes, n)[:, None, None] * np.ones((1, size, size), np.int32)
    batch = {
        "image": jnp.asarray(rng.random((n, size, size, channels), np.float32)),
        "label": jnp.asarray(label if config.data.adapter == "class_map" else np.zeros_like(label)),
    }
    if config.data.adapter == "boxes":  # Tianchi: one nodule box per slice, its filled box as the label.
        m = config.data.adapter_options.max_boxes
        corner = rng.uniform(0.2, 0.6, (n, 2))
        boxes = np.zeros((n, m, 4), np.float32)
        boxes[:, 0] = np.concatenate([corner, corner + rng.uniform(0.02, 0.1, (n, 2))], axis=1)
        classes = np.zeros((n, m), np.int32)
        classes[:, 0] = 1
        painted = [input_pipeline.paint_boxes(b, c, (size, size)) for b, c in zip(boxes, classes)]
        batch.update(
            label=jnp.asarray(np.stack(painted)), boxes=jnp.asarray(boxes), box_classes=jnp.asarray(classes)
        )
    return batch


def _frozen(config, size, batch):
    if config.synthesis.lesion_processor == "classifier":
        model = classify.make_model(config, (size, size))
        tx = optim.make_optimizer(config.segmentor.optim)
        state = classify.init_state(
            jax.random.key(2), batch, model=model, tx=tx, channels=config.data.channels
        )
        return {"lesion": state.params}
    if config.synthesis.lesion_processor == "detector":
        model = detect.make_model(config, (size, size))
        tx = optim.make_optimizer(config.segmentor.optim)
        init = functools.partial(detect.init_state, model=model, tx=tx, channels=config.data.channels)
        return {"lesion": jax.jit(init)(jax.random.key(2), batch).params}
    return {}


def _generate(g_params, batch, key, *, models, config, dtype):
    inputs = conditioning.make_inputs(
        batch, key, {}, models=models, config=config, pretraining=jnp.asarray(False)
    )
    return synthesis_nets.generate(
        models, g_params, inputs.g_input.astype(dtype), len(config.data.modalities)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--family", default="retina", choices=("retina", "lung_ct", "chest_xray", "tianchi_lung_ct")
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", default="base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gen_batch", type=int, default=4)
    parser.add_argument("--dtypes", default="float32", help="generation dtypes, comma-separated")
    parser.add_argument("--train_dtypes", default="float32", help="training compute dtypes (bf16: mixed)")
    args = parser.parse_args()
    config = importlib.import_module(f"configs.{args.family}").get_config()
    config.synthesis.model.size = config.segmentor.model.size = args.model
    config.synthesis.pretrain_steps = 0
    config.structure.extraction.size = None  # Extract at the benchmarked size.
    shape = (args.size, args.size)
    batch = _batch(config, args.size, args.batch)
    models = synthesis_nets.make_models(config, shape)
    g_tx, d_tx = (
        optim.make_optimizer(config.synthesis.optim.g),
        optim.make_optimizer(config.synthesis.optim.d),
    )
    state = jax.jit(
        functools.partial(synthesis.init_state, models=models, config=config, g_tx=g_tx, d_tx=d_tx)
    )(jax.random.key(0), batch)
    frozen = _frozen(config, args.size, batch)
    common.progress(f"{args.family} {args.size}² {args.model}: networks initialised")
    channels = config.data.channels
    # Each row is printed as soon as it is measured: a run cut off on a lent GPU keeps what it finished.
    common.header(f"Stage B, {args.family} ({args.size}² × {channels}), training batch {args.batch}")
    print("| model | compute dtype | parameters (G+D) | s/step | examples/s ", end="")
    print(
        "| GFLOP/example | GB/example | GFLOP/s |\n| --- | --- | --- | --- | --- | --- | --- | --- |",
        flush=True,
    )
    for dtype in (name for name in args.train_dtypes.split(",") if name):
        config.synthesis.compute_dtype = dtype
        seconds, flops, nbytes, n_params, _ = common.time_synthesis_step(
            state, batch, frozen, models=models, config=config, g_tx=g_tx, d_tx=d_tx, steps=args.steps
        )
        per = args.batch * 1e9
        print(f"| {args.model} | {dtype} | {n_params / 1e6:.1f} M | {seconds:.2f} | ", end="")
        rate = flops / seconds / 1e9
        print(
            f"{args.batch / seconds:.3f} | {flops / per:.1f} | {nbytes / per:.2f} | {rate:.1f} |", flush=True
        )
    print("\n| generation, model | dtype | batch | images/s | GFLOP/image | GB/image | GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    key = jax.random.key(1)
    n = args.gen_batch
    make_batch = functools.partial(_batch, config, args.size, seed=1)
    for dtype in (jnp.dtype(name) for name in args.dtypes.split(",")):
        g_params = jax.tree.map(lambda x, dtype=dtype: x.astype(dtype), state.g_params)
        gen = jax.jit(functools.partial(_generate, models=models, config=config, dtype=dtype))
        compiled_gen, g_flops, g_bytes = common.compile_once(gen, g_params, make_batch(n), key)
        g_seconds = common.timed(compiled_gen, g_params, make_batch(n), key, steps=args.steps)
        group = synthesis_nets.generation_group(models, (n,) + shape + (1,), itemsize=dtype.itemsize)
        known = {n: (g_flops / n, g_bytes / n)} if group == n else {}
        flops, nbytes = common.per_example_cost(gen, g_params, make_batch, key, group, known)
        rate = n / g_seconds
        print(f"| {args.model} | {dtype.name} | {n} | {rate:.2f} | {flops / 1e9:.2f} | ", end="")
        print(f"{nbytes / 1e9:.3f} | {rate * flops / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
