"""Compiled memory of the paper's configurations: whether each training step fits a 16 GB GPU at batch 1.

Usage: python -m benchmarks.memory [--configs brats2015,chest_xray,lung_ct,retina,tianchi_lung_ct]
                                   [--batches 1] [--generators gan,flow] [--json FILE]

For every dataset config at its full size (BRATS 184×144 with K = 4, the others 512²), the stage-A
training step, the stage-B training step of each generator family (with the frozen networks it reads) and
generation are compiled for abstract inputs (`jax.eval_shape` states: nothing is allocated or initialised)
and XLA's `memory_analysis()` is read: arguments, outputs, temporaries and generated code. `total_bytes`
is arguments + outputs + temporaries − aliased (donated) bytes, the peak an executable needs on the
device it was compiled for. The figures are the backend's that runs the script: on a CPU host they are
XLA:CPU's buffer assignment, close to but not the same as a GPU's (fusion and convolution algorithms
differ). `--json FILE` writes one row per measurement: `config`, `step`, `batch`, `total_bytes` and the
parts.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json

import jax
import jax.numpy as jnp

from benchmarks import common
from synth import flow_synthesis, frozen, generate
from synth.stages import structure, synthesis

CONFIGS = ("brats2015", "chest_xray", "lung_ct", "retina", "tianchi_lung_ct")
# The paper's image sizes (METHOD.md §8): BRATS slices are cropped to 184×144, the rest are 512².
IMAGE_HW = {"brats2015": (184, 144)}
DEFAULT_HW = (512, 512)
GB = 1e9
CARDS_GB = (16, 40, 80)


def abstract_batch(config, hw: tuple[int, int], batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays a training batch holds, as shapes (a detection family's boxes too)."""
    channels = config.data.channels * len(config.data.modalities)
    out = {
        "image": jax.ShapeDtypeStruct((batch, *hw, channels), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch, *hw), jnp.int32),
    }
    if config.data.adapter == "boxes":
        m = config.data.adapter_options.max_boxes
        out["boxes"] = jax.ShapeDtypeStruct((batch, m, 4), jnp.float32)
        out["box_classes"] = jax.ShapeDtypeStruct((batch, m), jnp.int32)
    return out


def abstract_frozen(config, hw: tuple[int, int]) -> dict:
    """Stage B's frozen networks' parameters as shapes (`frozen.load_stage_b_frozen`'s tree)."""
    shape = (*hw, config.data.channels * len(config.data.modalities))
    out = {}
    for stage in frozen.stage_b_frozen(config):
        name, field = frozen.STAGE_B_FIELDS[stage]
        out[name] = frozen.ABSTRACT_PARAMS[stage](config, shape)[field]
    return out


def memory(jitted, *args) -> dict[str, int]:
    """XLA's memory figures of one compiled call."""
    stats = jitted.lower(*args).compile().memory_analysis()
    parts = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "code_bytes": int(stats.generated_code_size_in_bytes),
    }
    parts["total_bytes"] = (
        parts["argument_bytes"] + parts["output_bytes"] + parts["temp_bytes"] - parts["alias_bytes"]
    )
    return parts


def train_step_memory(init, step, batch, frozen_params=None) -> dict[str, int]:
    """A training step's memory, its state donated as the training loop does."""
    state = jax.eval_shape(init, jax.random.key(0), batch)
    key = jax.eval_shape(lambda: jax.random.key(1))
    if frozen_params is None:
        return memory(jax.jit(step, donate_argnums=0), state, batch, key)
    return memory(jax.jit(step, donate_argnums=0), state, batch, key, frozen_params)


def generation_memory(config, hw: tuple[int, int], batch: int, init) -> dict[str, int]:
    """Generation of `batch` registered sets from maps, masks and labels (stage C's call)."""
    state = jax.eval_shape(init, jax.random.key(0), abstract_batch(config, hw, batch))
    maps = jax.ShapeDtypeStruct((batch, *hw), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch, *hw), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(1))
    if flow_synthesis.is_flow(config):
        velocity = flow_synthesis.make_velocity(config, hw)
        fn = functools.partial(generate.flow_images, velocity=velocity, config=config)
        return memory(jax.jit(fn), state.ema_params, maps, maps, labels, key)
    models = synthesis.step_parts(config, hw)[0]
    fn = functools.partial(generate.synthesize_images, models=models, config=config)
    return memory(jax.jit(fn), state.g_params, maps, maps, labels, key)


def measure(name: str, generator: str, batch: int, *, arg: str = "", hw=None) -> list[dict]:
    """Rows for one config, family and batch: stage A's step (GAN only), stage B's step, generation.

    `arg` adds config options (e.g. `runlocal`), `hw` replaces the paper's image size.
    """
    options = ",".join(filter(None, [arg, f"generator={generator}"]))
    config = importlib.import_module(f"configs.{name}").get_config(options)
    hw = tuple(hw or IMAGE_HW.get(name, DEFAULT_HW))
    config.structure.extraction.size = None  # Extract at the measured size.
    batch_shapes = abstract_batch(config, hw, batch)
    rows = []

    def row(step_name: str, figures: dict) -> None:
        rows.append(dict(config=name, generator=generator, step=step_name, batch=batch, **figures))
        gb = figures["total_bytes"] / GB
        common.progress(f"{name} {generator} {step_name} batch {batch}: {gb:.2f} GB")

    if generator == "gan":
        _, init_a, step_a = structure.step_parts(config, hw)
        row("stage_a_train", train_step_memory(init_a, step_a, batch_shapes))
    _, init_b, step_b = synthesis.step_parts(config, hw)
    row("stage_b_train", train_step_memory(init_b, step_b, batch_shapes, abstract_frozen(config, hw)))
    row("generate", generation_memory(config, hw, batch, init_b))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batches", default="1", help="batch sizes, comma-separated")
    parser.add_argument("--generators", default="gan,flow", help="stage B families, comma-separated")
    parser.add_argument("--json", default="", help="write the rows to this file")
    args = parser.parse_args()
    rows = []
    for name in args.configs.split(","):
        for generator in args.generators.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                rows.extend(measure(name, generator, batch))
    common.header(f"Compiled memory ({jax.default_backend()}), GB")
    print("| config | generator | step | batch | arguments | outputs | temporaries | total | fits |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        fits = ", ".join(f"{card}" for card in CARDS_GB if r["total_bytes"] <= card * GB) or "none"
        sizes = " | ".join(
            f"{r[k] / GB:.2f}" for k in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes")
        )
        print(
            f"| {r['config']} | {r['generator']} | {r['step']} | {r['batch']} | {sizes} | {fits} GB |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
