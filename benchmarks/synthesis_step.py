"""Stage-B throughput: synthesis training examples/s and generation sets/s, with XLA's FLOP and byte counts.

Usage: python -m benchmarks.synthesis_step [--shapes 128x128,184x144,512x512] [--models small,base,base]
                                           [--batch 4] [--steps 3] [--gen_batches 1,32] [--dtypes float32]

One training example is one structure map made into all K = 4 modalities: extraction of the real map, label
draw, one G call for the K modalities, the 12 translations of the frozen G_t, the K frozen segmentors, D on
real and synthetic images, and both updates. One generated set is the K registered modalities of one
structure map (inference: G only). Frozen networks are randomly initialised: speed does not depend on
their weights. `--dtypes float32,bfloat16` times generation with parameters and inputs cast to each
(a GPU check).
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import phantom
from data_builders.phantom import anatomy
from synth import optim
from synth.stages import segmentor, synthesis, translator


def _batch(shape, n):
    h, w = shape
    subject = anatomy.make_subject(seed=0, image_size=max(h, w), num_slices=n)
    top, left = (max(h, w) - h) // 2, (max(h, w) - w) // 2
    crop = lambda x: x[:, top : top + h, left : left + w]  # noqa: E731
    return {
        "image": jnp.asarray(crop(subject["image"])),
        "label": jnp.asarray(crop(subject["label"]), jnp.int32),
    }


def _setup(config, shape, batch):
    models = synthesis.make_models(config, shape)
    keys = jax.random.split(jax.random.key(0), 3)
    tx = optim.make_optimizer(config.translator.optim.g)
    tr = translator.init_state(keys[0], batch, models=translator.make_models(config, shape), g_tx=tx, d_tx=tx)
    seg = segmentor.init_params(
        keys[1], batch["image"], model=segmentor.make_model(config, shape), variant=config.segmentor.variant
    )
    g_tx, d_tx = (
        optim.make_optimizer(config.synthesis.optim.g),
        optim.make_optimizer(config.synthesis.optim.d),
    )
    state = jax.jit(
        functools.partial(synthesis.init_state, models=models, config=config, g_tx=g_tx, d_tx=d_tx)
    )(keys[2], batch)
    return models, state, {"translator": tr.g_params, "lesion": seg}, g_tx, d_tx


def _generate(g_params, batch, key, *, models, config, dtype):
    """K registered modalities from each real slice's structure map and a drawn label (G only)."""
    inputs = synthesis.make_inputs(
        batch, key, {}, models=models, config=config, pretraining=jnp.asarray(False)
    )
    return synthesis.synthesize(models, g_params, inputs.g_input.astype(dtype), len(config.data.modalities))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="128x128,184x144,512x512")
    parser.add_argument("--models", default="small,base,base", help="one size variant per shape")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gen_batches", default="1,32")
    parser.add_argument("--dtypes", default="float32", help="generation dtypes, comma-separated")
    args = parser.parse_args()
    config = phantom.get_config()
    config.synthesis.pretrain_steps = 0  # The adversarial phase: every term is computed either way.
    train_rows, gen_rows = [], []
    for shape_text, size in zip(args.shapes.split(","), args.models.split(","), strict=True):
        shape = tuple(int(v) for v in shape_text.split("x"))
        for section in (config.synthesis, config.translator, config.segmentor):
            section.model.size = size
        batch = _batch(shape, args.batch)
        models, state, frozen, g_tx, d_tx = _setup(config, shape, batch)
        seconds, flops, nbytes, n_params = common.time_synthesis_step(
            state, batch, frozen, models=models, config=config, g_tx=g_tx, d_tx=d_tx, steps=args.steps
        )
        key = jax.random.key(1)
        train_rows.append((f"{shape_text}, {size}", n_params, seconds, args.batch / seconds, flops, nbytes))

        for dtype in (jnp.dtype(name) for name in args.dtypes.split(",")):
            g_params = jax.tree.map(lambda x, dtype=dtype: x.astype(dtype), state.g_params)
            gen = jax.jit(functools.partial(_generate, models=models, config=config, dtype=dtype))
            for n in (int(v) for v in args.gen_batches.split(",")):
                gen_batch = _batch(shape, n)
                compiled_gen, g_flops, g_bytes = common.compile_once(gen, g_params, gen_batch, key)
                g_seconds = common.timed(compiled_gen, g_params, gen_batch, key, steps=args.steps)
                row = (f"{shape_text}, {size}", dtype.name, n, n / g_seconds, g_flops / n, g_bytes / n)
                gen_rows.append(row)
        del state

    common.header(f"Stage B (synthesis), training batch {args.batch}")
    print("| image, model | parameters (G+D) | s/step | examples/s | GFLOP/example | GB/example | GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, n, s, rate, flops, nbytes in train_rows:
        print(
            f"| {name} | {n / 1e6:.1f} M | {s:.2f} | {rate:.3f} | {flops / args.batch / 1e9:.1f} | "
            f"{nbytes / args.batch / 1e9:.2f} | {flops / s / 1e9:.1f} |"
        )
    print("\n| generation, image, model | dtype | batch | sets/s | GFLOP/set | GB/set | GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, dtype, n, rate, flops, nbytes in gen_rows:
        print(
            f"| {name} | {dtype} | {n} | {rate:.2f} | {flops / 1e9:.2f} | {nbytes / 1e9:.3f} | "
            f"{rate * flops / 1e9:.1f} |"
        )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
