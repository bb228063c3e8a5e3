"""Stage-A throughput: training examples/s and extraction images/s, with XLA's FLOP and byte counts.

Usage: python -m benchmarks.structure_step [--sizes 128,512] [--models small,base] [--batch 4] [--steps 3]

The VAE's dense layers grow with the square of its bottleneck area, so each image size needs its variant
(small at 128², the paper's base at 512²).

Images are phantom slices made at each size directly (no dataset build). One training example is one
image: extraction of its structure map and mask, then the full §5.1 forward pass and both sides' updates.
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import phantom
from data_builders.phantom import anatomy
from synth import optim, structure_nets
from synth.stages import structure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="128,512")
    parser.add_argument("--models", default="small,base", help="one size variant per image size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    config = phantom.get_config()
    params = structure_nets.extraction_params(config)
    train_rows, extract_rows = [], []
    for size, model in zip((int(s) for s in args.sizes.split(",")), args.models.split(","), strict=True):
        config.structure.model.size = model
        subject = anatomy.make_subject(seed=0, image_size=size, num_slices=args.batch)
        batch = {"image": jnp.asarray(subject["image"]), "label": jnp.asarray(subject["label"], jnp.int32)}
        extract = jax.jit(
            functools.partial(structure_nets.real_structures, params=params, remove_lesions=True)
        )
        compiled_extract, ex_flops, ex_bytes = common.compile_once(extract, batch)
        ex_s = common.timed(compiled_extract, batch, steps=args.steps)
        extract_rows.append((size, args.batch / ex_s, ex_flops / args.batch, ex_bytes / args.batch))

        models = structure_nets.make_models(config, (size, size))
        g_tx, d_tx = (
            optim.make_optimizer(config.structure.optim.g),
            optim.make_optimizer(config.structure.optim.d),
        )
        init = jax.jit(
            functools.partial(structure.init_state, models=models, extract_fn=extract, g_tx=g_tx, d_tx=d_tx)
        )
        state = init(jax.random.key(0), batch)
        step = jax.jit(
            functools.partial(
                structure.train_step,
                models=models,
                extract_fn=extract,
                g_tx=g_tx,
                d_tx=d_tx,
                weights=dict(config.structure.loss.weights),
                parity=False,
                update="simultaneous",
            )
        )
        compiled, flops, nbytes = common.compile_once(step, state, batch, jax.random.key(1))
        seconds = common.timed(compiled, state, batch, jax.random.key(1), steps=args.steps)
        params_count = sum(x.size for x in jax.tree.leaves((state.g_params, state.d_params)))
        train_rows.append(
            (
                f"{size}², {model}",
                seconds,
                args.batch / seconds,
                flops / args.batch,
                nbytes / args.batch,
                params_count,
            )
        )
        del state

    common.header(f"Stage A, batch {args.batch}")
    print("| image, model | parameters (G+D) | s/step | examples/s | GFLOP/example | GB/example | GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size, s, rate, flops, nbytes, n in train_rows:
        print(
            f"| {size} | {n / 1e6:.1f} M | {s:.2f} | {rate:.2f} | {flops / 1e9:.2f} | {nbytes / 1e9:.2f} | "
            f"{rate * flops / 1e9:.1f} |"
        )
    print("\n| extraction, image | images/s | MFLOP/image | MB/image |")
    print("| --- | --- | --- | --- |")
    for size, rate, flops, nbytes in extract_rows:
        print(f"| {size}² | {rate:.0f} | {flops / 1e6:.1f} | {nbytes / 1e6:.1f} |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
