"""Stage-B throughput: synthesis training examples/s and generation sets/s, with XLA's FLOP and byte counts.

Usage: python -m benchmarks.synthesis_step [--shapes 128x128,184x144,512x512] [--models small,base,base]
                                           [--batch 4] [--steps 3] [--gen_batches 1,32] [--dtypes float32]

One training example is one structure map made into all K = 4 modalities: extraction of the real map, label
draw, one G call for the K modalities, the 12 translations of the frozen G_t, the K frozen segmentors, D on
real and synthetic images, and both updates. One generated set is the K registered modalities of one
structure map (inference: G only, `synthesis_nets.generate` as stage C runs it; on CPU a few examples per
call, whose FLOPs are counted on a batch of one call). Frozen networks are randomly initialised: speed does
not depend on their weights. `--dtypes float32,bfloat16` times generation with parameters and inputs cast
to each, and `--train_dtypes float32,bfloat16` the training step with `synthesis.compute_dtype` set to each
(GPU checks).
`--profile` adds a table of one training step's op time by kind (`common.op_time_by_kind`).
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import phantom
from data_builders.phantom import anatomy
from synth import conditioning, optim, synthesis_nets, translator_nets
from synth.lesion import segment
from synth.stages import synthesis, translator


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
    """Networks and states, every init jitted: eager inits dispatch thousands of small ops (slow on a GPU)."""
    models = synthesis_nets.make_models(config, shape)
    keys = jax.random.split(jax.random.key(0), 3)
    tx = optim.make_optimizer(config.translator.optim.g)
    translator_models = translator_nets.make_models(config, shape)
    tr = jax.jit(functools.partial(translator.init_state, models=translator_models, g_tx=tx, d_tx=tx))(
        keys[0], batch
    )
    seg = jax.jit(
        functools.partial(
            segment.init_params, model=segment.make_model(config, shape), variant=config.segmentor.variant
        )
    )(keys[1], batch["image"])
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
    inputs = conditioning.make_inputs(
        batch, key, {}, models=models, config=config, pretraining=jnp.asarray(False)
    )
    return synthesis_nets.generate(
        models, g_params, inputs.g_input.astype(dtype), len(config.data.modalities)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="128x128,184x144,512x512")
    parser.add_argument("--models", default="small,base,base", help="one size variant per shape")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gen_batches", default="1,32")
    parser.add_argument("--dtypes", default="float32", help="generation dtypes, comma-separated")
    parser.add_argument("--train_dtypes", default="float32", help="training compute dtypes (bf16: mixed)")
    parser.add_argument(
        "--profile", action="store_true", help="also print where one training step's time goes"
    )
    args = parser.parse_args()
    config = phantom.get_config()
    config.synthesis.pretrain_steps = 0  # The adversarial phase: every term is computed either way.
    # Rows are printed as each is measured (generation first: its compile is the cheap one), so a run cut
    # off by a time limit on a lent GPU still reports what it finished.
    common.header(f"Stage B (synthesis), training batch {args.batch}")
    for shape_text, size in zip(args.shapes.split(","), args.models.split(","), strict=True):
        shape = tuple(int(v) for v in shape_text.split("x"))
        for section in (config.synthesis, config.translator, config.segmentor):
            section.model.size = size
        batch = _batch(shape, args.batch)
        common.progress(f"{shape_text} {size}: phantom batch made")
        models, state, frozen, g_tx, d_tx = _setup(config, shape, batch)
        common.progress(f"{shape_text} {size}: networks initialised")
        key = jax.random.key(1)
        print("| generation, image, model | dtype | batch | sets/s | GFLOP/set | GB/set | GFLOP/s |")
        print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
        for dtype in (jnp.dtype(name) for name in args.dtypes.split(",") if name):
            g_params = jax.tree.map(lambda x, dtype=dtype: x.astype(dtype), state.g_params)
            gen = jax.jit(functools.partial(_generate, models=models, config=config, dtype=dtype))
            known = {}  # Group size -> per-set counts (common.per_example_cost).
            for n in (int(v) for v in args.gen_batches.split(",")):
                gen_batch = _batch(shape, n)
                compiled_gen, g_flops, g_bytes = common.compile_once(gen, g_params, gen_batch, key)
                g_seconds = common.timed(compiled_gen, g_params, gen_batch, key, steps=args.steps)
                group = synthesis_nets.generation_group(models, (n,) + shape + (1,), itemsize=dtype.itemsize)
                if group == n:
                    known[n] = (g_flops / n, g_bytes / n)
                flops, nbytes = common.per_example_cost(
                    gen, g_params, functools.partial(_batch, shape), key, group, known
                )
                rate = n / g_seconds
                print(
                    f"| {shape_text}, {size} | {dtype.name} | {n} | {rate:.2f} | {flops / 1e9:.2f} | "
                    f"{nbytes / 1e9:.3f} | {rate * flops / 1e9:.1f} |",
                    flush=True,
                )
        print("\n| training, image, model | compute dtype | parameters (G+D) | s/step | examples/s ", end="")
        print("| GFLOP/example | GB/example | GFLOP/s |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
        profiles = []
        for dtype in (name for name in args.train_dtypes.split(",") if name):
            config.synthesis.compute_dtype = dtype
            seconds, flops, nbytes, n_params, kinds = common.time_synthesis_step(
                state,
                batch,
                frozen,
                models=models,
                config=config,
                g_tx=g_tx,
                d_tx=d_tx,
                steps=args.steps,
                profile=args.profile,
            )
            print(f"| {shape_text}, {size} | {dtype} | {n_params / 1e6:.1f} M | {seconds:.2f} | ", end="")
            print(f"{args.batch / seconds:.3f} | {flops / args.batch / 1e9:.1f} | ", end="")
            print(f"{nbytes / args.batch / 1e9:.2f} | {flops / seconds / 1e9:.1f} |", flush=True)
            if kinds:
                profiles.append((f"Training step, {shape_text}, {size}, {dtype}", kinds))
        for title, kinds in profiles:  # After the table, which they would otherwise split.
            common.print_op_times(title, kinds)
        print()
        del state


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
