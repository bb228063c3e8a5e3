"""Data-parallel work per device: stage B's and the translator's training steps on N devices against one.

Usage: python -m benchmarks.sharding [--devices 4] [--size 32] [--forms cpu,gpu]

Each step is compiled (never run) for one device at batch 1 and for N devices at batch N, the batch split
over the devices as `synth.train` splits it, and XLA's FLOP count of the N-device program (per device) is
held against the one-device program's: a step that splits its batch well does the same work per device
(ratio 1.00). A ratio near N means every device computes the whole batch: XLA gathered it, as it did where
images of K modalities were merged modality-major (`synth.registration`) and where per-modality networks
ran as grouped convolutions (`synth.models.stacked`). The table also counts the N-device program's
all-gathers.

`--forms gpu` compiles the forms a GPU run takes (batched decoders per condition, one call of G_t, `vmap`
over per-modality networks where that splits) on this machine's CPU devices, which cannot run a GPU. Only
the choice of form is overridden, for these compiles; nothing is timed. Simulated CPU devices come from
`jax_num_cpu_devices`, so this needs no accelerator.
"""

import argparse
import contextlib
import functools
import re

import jax
import jax.numpy as jnp

from benchmarks import common
from configs import phantom
from data_builders.phantom import anatomy
from synth import optim, sharding, synthesis_nets, translator_nets
from synth.lesion import segment
from synth.models import grouped, stacked
from synth.stages import synthesis, translator


@contextlib.contextmanager
def _gpu_forms():
    """Trace as on a GPU: `auto` stacking is `vmap` (one device) and every call runs its whole batch."""
    resolve, group_size = stacked.resolve_mode, grouped.group_size
    stacked.resolve_mode = lambda mode: "vmap" if mode == "auto" else resolve(mode)
    grouped.group_size = lambda batch, hw, features, **options: batch // options.get("shards", 1)
    try:
        yield
    finally:
        stacked.resolve_mode, grouped.group_size = resolve, group_size


def _batch(size: int, n: int) -> dict:
    subject = anatomy.make_subject(seed=0, image_size=size, num_slices=n)
    return {"image": jnp.asarray(subject["image"]), "label": jnp.asarray(subject["label"], jnp.int32)}


def _steps(config, size: int):
    """(name, step(batch) -> jitted step and its arguments) for stage B and the translator stage."""
    shape = (size, size)
    models = synthesis_nets.make_models(config, shape)
    translator_models = translator_nets.make_models(config, shape)
    tx = optim.make_optimizer(config.synthesis.optim.g)
    keys = jax.random.split(jax.random.key(0), 3)
    one = _batch(size, 1)
    tr_state = jax.jit(functools.partial(translator.init_state, models=translator_models, g_tx=tx, d_tx=tx))(
        keys[0], one
    )
    seg_model = segment.make_model(config, shape)
    seg = jax.jit(functools.partial(segment.init_params, model=seg_model, variant=config.segmentor.variant))(
        keys[1], one["image"]
    )
    b_state = jax.jit(
        functools.partial(synthesis.init_state, models=models, config=config, g_tx=tx, d_tx=tx)
    )(keys[2], one)
    frozen = {"translator": tr_state.g_params, "lesion": seg}
    key = jax.random.key(1)
    stage_b = functools.partial(synthesis.train_step, models=models, config=config, g_tx=tx, d_tx=tx)
    stage_t = functools.partial(
        translator.train_step,
        models=translator_models,
        g_tx=tx,
        d_tx=tx,
        loss_config=config.translator.loss,
    )
    return {
        "stage B (synthesis)": (stage_b, lambda batch: (b_state, batch, key, frozen)),
        "translator": (stage_t, lambda batch: (tr_state, batch, key)),
    }


def _compiled_cost(step, args, mesh=None) -> tuple[float, int]:
    """(GFLOP per device, all-gathers) of `step(*args)`, the batch (argument 1) split over `mesh`."""
    if mesh is None:
        jitted = jax.jit(step)
    else:
        repl, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        jitted = jax.jit(step, in_shardings=(repl, split) + (repl,) * (len(args) - 2))
    compiled = jitted.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost.get("flops", 0.0) / 1e9, len(re.findall(r"all-gather(?:-start)?\(", compiled.as_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="square image side (the runlocal networks)")
    parser.add_argument("--forms", default="cpu,gpu", help="cpu: this backend's own forms; gpu: a GPU's")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")  # Simulated devices, also on a machine with a GPU.
    jax.config.update("jax_num_cpu_devices", args.devices)
    config = phantom.get_config("runlocal")
    config.synthesis.pretrain_steps = 0  # The adversarial phase: every term is computed.
    mesh = sharding.make_mesh((args.devices,), (sharding.DATA_AXIS,))
    common.header(f"Data-parallel work per device, {args.devices} devices, {args.size}² runlocal networks")
    print(
        f"| step | forms | GFLOP, 1 device, batch 1 | GFLOP per device, {args.devices} devices, batch "
        f"{args.devices} | ratio | all-gathers |"
    )
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    for forms in args.forms.split(","):
        if forms not in ("cpu", "gpu"):
            raise ValueError(f"--forms takes cpu and gpu, got {forms!r}")
        with _gpu_forms() if forms == "gpu" else contextlib.nullcontext():
            for name, (step, arguments) in _steps(config, args.size).items():
                common.progress(f"{name}, {forms} forms: compiling")
                single, _ = _compiled_cost(step, arguments(_batch(args.size, 1)))
                split, gathers = _compiled_cost(step, arguments(_batch(args.size, args.devices)), mesh)
                print(
                    f"| {name} | {forms} | {single:.3f} | {split:.3f} | {split / single:.2f} | {gathers} |",
                    flush=True,
                )
    print()


if __name__ == "__main__":
    main()
