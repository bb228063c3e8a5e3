"""Data-parallel work per device: every stage's training step on N devices against one.

Usage: python -m benchmarks.sharding [--devices 4] [--size 32] [--forms cpu,gpu] [--steps stage_b,...]

Each step is compiled (never run) for one device at batch 1 and for N devices at batch N, the batch split
over the devices as `synth.train` splits it, and XLA's FLOP count of the N-device program (per device) is
held against the one-device program's: a step that splits its batch well does the same work per device
(ratio 1.00). A ratio near N means every device computes the whole batch: XLA gathered it, as it did where
images of K modalities were merged modality-major (`synth.registration`) and where per-modality networks
ran as grouped convolutions (`synth.models.stacked`). The table also counts the N-device program's
all-gathers.

The steps (`--steps`, default all): stage A's VAE-GAN and flow (`stage_a`, `stage_a_flow`), the
segmentor stage's K U-Nets (`segmentor`), the translator (`translator`), stage B's GAN and flow
(`stage_b`, `stage_b_flow`, with their frozen networks), Tianchi's detector (`detector`) and the chest
X-ray classifier (`classifier`), all with the `runlocal` networks; and stage C's draws of structure maps
from stage A (`sample_a`, `sample_a_flow`: n maps at once, as `generate.Generator` draws them under the
mesh, the flow with its configured sampler steps). States, batches and frozen networks are
shapes (`jax.eval_shape`): nothing is initialised. The programs compile with `jax_disable_most_optimizations`
(LLVM level 0): XLA's HLO passes, its SPMD partitioner and so the FLOP counts are those of an optimised
compile, which takes several times longer.

`--forms gpu` compiles the forms a GPU run takes (batched decoders per condition, one call of G_t, `vmap`
over per-modality networks where that splits) on this machine's CPU devices, which cannot run a GPU. Only
the choice of form is overridden, for these compiles; nothing is timed. Simulated CPU devices come from
`jax_num_cpu_devices`, so this needs no accelerator.
"""

import argparse
import contextlib
import functools
import importlib
import re

import jax

from benchmarks import common, memory
from synth import lesion, optim, sharding, structure_flow, structure_nets, translator_nets
from synth.models import grouped, stacked, vae
from synth.stages import structure, synthesis, translator

# Name -> (table label, dataset config, config options besides `runlocal`, stage).
STEPS = {
    "stage_a": ("stage A (VAE-GAN)", "phantom", "", "structure"),
    "stage_a_flow": ("stage A (flow)", "phantom", "structure_generator=flow", "structure"),
    "segmentor": ("segmentor (K U-Nets)", "phantom", "", "segmentor"),
    "translator": ("translator", "phantom", "", "translator"),
    "stage_b": ("stage B (GAN)", "phantom", "", "synthesis"),
    "stage_b_flow": ("stage B (flow)", "phantom", "generator=flow", "synthesis"),
    "detector": ("detector (Tianchi)", "tianchi_lung_ct", "", "segmentor"),
    "classifier": ("classifier (chest X-ray)", "chest_xray", "", "segmentor"),
    "sample_a": ("stage C: stage A's draws (VAE-GAN)", "phantom", "", "sample"),
    "sample_a_flow": ("stage C: stage A's draws (flow)", "phantom", "structure_generator=flow", "sample"),
}


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


def step_config(name: str):
    """The `runlocal` config of step `name` (stage B in its adversarial phase: every term computed)."""
    _, dataset, options, _ = STEPS[name]
    arg = ",".join(filter(None, ["runlocal", options]))
    config = importlib.import_module(f"configs.{dataset}").get_config(arg)
    config.synthesis.pretrain_steps = 0
    return config


def step_parts(name: str, config, hw: tuple[int, int]):
    """`(init_state, train_step, frozen shapes or None)` of step `name`, as its stage builds them."""
    stage = STEPS[name][3]
    if stage == "structure":
        return *structure.step_parts(config, hw)[1:], None
    if stage == "synthesis":
        return *synthesis.step_parts(config, hw)[1:], memory.abstract_frozen(config, hw)
    if stage == "segmentor":
        channels = config.data.channels * len(config.data.modalities)
        parts = lesion.kind(config).stage_parts(config, hw, channels)
        return parts.init_state, parts.train_step, None
    tr = config.translator
    models = translator_nets.make_models(config, hw)
    g_tx, d_tx = optim.make_optimizer(tr.optim.g), optim.make_optimizer(tr.optim.d)
    init = functools.partial(translator.init_state, models=models, g_tx=g_tx, d_tx=d_tx)
    step = functools.partial(translator.train_step, models=models, g_tx=g_tx, d_tx=d_tx, loss_config=tr.loss)
    return init, step, None


def sampler_parts(config, hw: tuple[int, int]):
    """`(jitted draw of n maps, its arguments before n)` of stage A's sampler, from abstract parameters."""
    key = jax.eval_shape(lambda: jax.random.key(1))
    image_shape = memory.abstract_batch(config, hw, 1)["image"].shape[1:]
    if structure_flow.is_flow(config):
        params = structure_flow.abstract_params(config, image_shape)["ema_params"]
        models = structure_flow.make_models(config, hw)
        return structure_flow.make_generate_fn(models, config, hw), (params, key)
    params = structure_nets.abstract_params(config, image_shape)
    models = structure_nets.make_models(config, hw)
    generate = structure_nets.make_generate_fn(models, vae.code_shape(hw, models.encoder.code_channels))
    return generate, (params["g_params"], params["d_params"], key)


def compiled_cost(name: str, hw: tuple[int, int], batch: int, mesh=None) -> tuple[float, int]:
    """(GFLOP per device, all-gathers) of step `name` at `batch`, the batch split over `mesh` if given."""
    config = step_config(name)
    if STEPS[name][3] == "sample":
        generate, args = sampler_parts(config, hw)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            return _cost(generate.lower(*args, batch).compile())
    init, step, frozen = step_parts(name, config, hw)
    batch_shapes = memory.abstract_batch(config, hw, batch)
    args = (
        jax.eval_shape(init, jax.random.key(0), batch_shapes),
        batch_shapes,
        jax.eval_shape(lambda: jax.random.key(1)),
    ) + ((frozen,) if frozen is not None else ())
    if mesh is None:
        compiled = jax.jit(step).lower(*args).compile()
    else:  # As `synth.train` jits a step: under the mesh, the state replicated and the batch split.
        repl, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        with jax.set_mesh(mesh):
            jitted = jax.jit(step, in_shardings=(repl, split) + (repl,) * (len(args) - 2))
            compiled = jitted.lower(*args).compile()
    return _cost(compiled)


def _cost(compiled) -> tuple[float, int]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost.get("flops", 0.0) / 1e9, len(re.findall(r"all-gather(?:-start)?\(", compiled.as_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="square image side (the runlocal networks)")
    parser.add_argument("--forms", default="cpu,gpu", help="cpu: this backend's own forms; gpu: a GPU's")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    args = parser.parse_args()
    names = args.steps.split(",")
    unknown = sorted(set(names) - set(STEPS))
    if unknown:
        raise ValueError(f"Unknown --steps {unknown}; choose from {', '.join(STEPS)}")
    forms_list = args.forms.split(",")
    if set(forms_list) - {"cpu", "gpu"}:
        raise ValueError(f"--forms takes cpu and gpu, got {args.forms!r}")
    jax.config.update("jax_platforms", "cpu")  # Simulated devices, also on a machine with a GPU.
    jax.config.update("jax_num_cpu_devices", args.devices)
    jax.config.update("jax_disable_most_optimizations", True)  # Same HLO passes and FLOPs, faster compiles.
    mesh = sharding.make_mesh((args.devices,), (sharding.DATA_AXIS,))
    hw = (args.size, args.size)
    common.header(f"Data-parallel work per device, {args.devices} devices, {args.size}² runlocal networks")
    print(
        f"| step | forms | GFLOP, 1 device, batch 1 | GFLOP per device, {args.devices} devices, batch "
        f"{args.devices} | ratio | all-gathers |"
    )
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    for forms in forms_list:
        with _gpu_forms() if forms == "gpu" else contextlib.nullcontext():
            for name in names:
                label = STEPS[name][0]
                common.progress(f"{label}, {forms} forms: compiling")
                single, _ = compiled_cost(name, hw, 1)
                split, gathers = compiled_cost(name, hw, args.devices, mesh)
                print(
                    f"| {label} | {forms} | {single:.3f} | {split:.3f} | {split / single:.2f} | {gathers} |",
                    flush=True,
                )
    print()


if __name__ == "__main__":
    main()
