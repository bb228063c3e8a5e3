"""Compiled memory of the paper's configurations: whether each training step fits a 16 GB GPU at batch 1.

Usage: python -m benchmarks.memory [--configs brats2015,chest_xray,lung_ct,retina,tianchi_lung_ct]
                                   [--batches 1] [--generators gan,flow] [--json FILE] [--largest_batch]
                                   [--remat] [--hw HxW]

For every dataset config at its full size (BRATS 184×144 with K = 4, the others 512²), the stage-A
training step, the stage-B training step of each generator family (with the frozen networks it reads) and
generation are compiled for abstract inputs (`jax.eval_shape` states: nothing is allocated or initialised)
and XLA's `memory_analysis()` is read: arguments, outputs, temporaries and generated code. `total_bytes`
is arguments + outputs + temporaries − aliased (donated) bytes, the peak an executable needs on the
device it was compiled for. The figures are the backend's that runs the script: on a CPU host they are
XLA:CPU's buffer assignment, close to but not the same as a GPU's (fusion and convolution algorithms
differ). Convolutions compile as XLA's own (`SYNTH_CONV=xla` unless the environment sets it), as on a
GPU, not with the CPU's filter-gradient forms. `--json FILE` writes one row per measurement: `config`,
`step`, `batch`, `total_bytes` and the parts. `--largest_batch` also finds, for each step, the largest
batch whose compiled total fits a 16, 40 and 80 GB card (rows with `card_gb` and `largest_batch`).
`--remat` measures with every stage-B U-Net's conv blocks rematerialised (`model.remat` of the synthesis,
translator and segmentor configs, and `synthesis.flow.remat`; every row then says `remat: true`). Only a
GPU's figures show its effect: XLA:CPU drops the barriers that keep the recomputation apart and merges it
back into the forward pass (the same figures with and without; `benchmarks/gpu_suite.sh` runs both with
`MEMORY=1`).
`--hw 512x512` measures every config at that size instead of the paper's (BRATS' K = 4 at 512²: the
step an H200 reported needing ~130 GiB for).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os

import jax
import jax.numpy as jnp

from benchmarks import common
from synth import flow_synthesis, frozen, generate
from synth.models import conv
from synth.stages import structure, synthesis

CONFIGS = ("brats2015", "chest_xray", "lung_ct", "retina", "tianchi_lung_ct")
# The paper's image sizes (METHOD.md §8): BRATS slices are cropped to 184×144, the rest are 512².
IMAGE_HW = {"brats2015": (184, 144)}
DEFAULT_HW = (512, 512)
GB = 1e9
CARDS_GB = (16, 40, 80)
MAX_BATCH = 1024  # The largest-batch search stops here (generation's batches fit in the thousands).


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


def _config(name: str, generator: str, arg: str = "", remat: bool = False):
    options = ",".join(filter(None, [arg, f"generator={generator}"]))
    config = importlib.import_module(f"configs.{name}").get_config(options)
    config.structure.extraction.size = None  # Extract at the measured size.
    for section in (config.synthesis, config.translator, config.segmentor):
        section.model.remat = remat
    config.synthesis.flow.remat = remat
    return config


def steps_of(generator: str) -> tuple[str, ...]:
    """The steps measured for a family: stage A's (the VAE-GAN's) for the GAN only, stage B's, generation."""
    return ("stage_a_train",) * (generator == "gan") + ("stage_b_train", "generate")


def step_memory(config, step_name: str, hw: tuple[int, int], batch: int) -> dict[str, int]:
    """One step's compiled memory at one batch size."""
    batch_shapes = abstract_batch(config, hw, batch)
    if step_name == "stage_a_train":
        _, init_a, step_a = structure.step_parts(config, hw)
        return train_step_memory(init_a, step_a, batch_shapes)
    _, init_b, step_b = synthesis.step_parts(config, hw)
    if step_name == "stage_b_train":
        return train_step_memory(init_b, step_b, batch_shapes, abstract_frozen(config, hw))
    if step_name == "generate":
        return generation_memory(config, hw, batch, init_b)
    raise ValueError(f"Unknown step {step_name!r}; valid: stage_a_train, stage_b_train, generate.")


def measure(
    name: str, generator: str, batch: int, *, arg: str = "", hw=None, remat: bool = False
) -> list[dict]:
    """Rows for one config, family and batch: stage A's step (GAN only), stage B's step, generation.

    `arg` adds config options (e.g. `runlocal`), `hw` replaces the paper's image size, `remat`
    rematerialises the stage-B U-Nets' conv blocks.
    """
    config = _config(name, generator, arg, remat)
    hw = tuple(hw or IMAGE_HW.get(name, DEFAULT_HW))
    rows = []
    for step_name in steps_of(generator):
        figures = step_memory(config, step_name, hw, batch)
        row = dict(config=name, generator=generator, step=step_name, batch=batch, remat=remat)
        rows.append(dict(row, **figures))
        common.progress(f"{name} {generator} {step_name} batch {batch}: {figures['total_bytes'] / GB:.2f} GB")
    return rows


def largest_batches(
    name: str,
    generator: str,
    step_name: str,
    cards_gb=CARDS_GB,
    *,
    arg: str = "",
    hw=None,
    remat: bool = False,
) -> dict[int, int]:
    """The largest batch whose compiled total fits each card (GB), for one step, up to `MAX_BATCH`.

    Memory grows about linearly with the batch beyond the parameters' fixed share: batches 1 and 8 give a
    line, and the search compiles the batch where the line through the nearest measured batches reaches
    the card, keeping the largest batch that fits and the smallest that does not, until they are
    neighbours (a halving step where the line does not halve that bracket). XLA's buffer reuse makes the
    figures only roughly linear; where they rise with the batch the result is the largest batch that
    fits. 0 means not even batch 1 fits; `MAX_BATCH` means that many or more.
    """
    config = _config(name, generator, arg, remat)
    hw = tuple(hw or IMAGE_HW.get(name, DEFAULT_HW))
    measured: dict[int, int] = {}

    def total(batch: int) -> int:
        if batch not in measured:
            measured[batch] = step_memory(config, step_name, hw, batch)["total_bytes"]
        return measured[batch]

    total(1), total(8)
    out = {}
    fitted = 0  # What fits a smaller card fits a larger one.
    for card in sorted(cards_gb):
        out[card] = fitted = max(_largest_fitting(total, measured, int(card * GB)), fitted)
        common.progress(f"{name} {generator} {step_name}: largest batch in {card} GB: {fitted}")
    return out


def _largest_fitting(total, measured: dict[int, int], limit: int) -> int:
    """The largest batch in [0, MAX_BATCH] with `total(batch) <= limit`, for `total` rising with the batch.

    `measured` holds the figures compiled so far (`total` adds to it).
    """
    if total(1) > limit:
        return 0
    lo = max(b for b, t in measured.items() if t <= limit and b <= MAX_BATCH)  # Fits.
    hi = min((b for b, t in measured.items() if t > limit), default=MAX_BATCH + 1)  # Does not.
    while hi - lo > 1:
        below = sorted(b for b in measured if b < lo)[-1:] or [lo]  # The line's other point.
        a, b = (lo, hi) if hi in measured else (below[0], lo)
        slope = (measured[b] - measured[a]) / (b - a) if b != a else 0.0
        guess = lo + int((limit - measured[lo]) // slope) if slope > 0 else hi - 1
        width = hi - lo
        guess = min(max(guess, lo + 1), hi - 1)
        if total(guess) <= limit:
            lo = guess
        else:
            hi = guess
        if hi - lo > width // 2 and hi - lo > 1:  # The line did not halve the bracket: halve it.
            middle = (lo + hi) // 2
            lo, hi = (middle, hi) if total(middle) <= limit else (lo, middle)
    return lo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batches", default="1", help="batch sizes, comma-separated")
    parser.add_argument("--generators", default="gan,flow", help="stage B families, comma-separated")
    parser.add_argument("--json", default="", help="write the rows to this file")
    parser.add_argument(
        "--largest_batch",
        action="store_true",
        help="also find the largest batch of each step that fits each card (16, 40, 80 GB)",
    )
    parser.add_argument(
        "--remat", action="store_true", help="rematerialise the stage-B U-Nets' conv blocks (model.remat)"
    )
    parser.add_argument("--hw", default="", help="image size HxW for every config (default: the paper's)")
    args = parser.parse_args()
    # The question is a GPU's memory: compile the convolutions as a GPU runs them (XLA's own), not with the
    # CPU's filter-gradient forms (synth.models.conv), whose temporaries differ. An explicit choice wins.
    os.environ.setdefault(conv.ENV_VAR, "xla")
    hw = tuple(int(v) for v in args.hw.split("x")) if args.hw else None
    rows = []
    for name in args.configs.split(","):
        for generator in args.generators.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                rows.extend(measure(name, generator, batch, remat=args.remat, hw=hw))
    common.header(f"Compiled memory ({jax.default_backend()}{', remat' * args.remat}), GB")
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
    if args.largest_batch:
        largest = [
            (name, generator, step_name, largest_batches(name, generator, step_name, remat=args.remat, hw=hw))
            for name in args.configs.split(",")
            for generator in args.generators.split(",")
            for step_name in steps_of(generator)
        ]
        common.header("Largest batch that fits each card (XLA's compiled total)")
        print("| config | generator | step | " + " | ".join(f"{card} GB" for card in CARDS_GB) + " |")
        print("| --- | --- | --- | " + " | ".join("---" for _ in CARDS_GB) + " |")
        for name, generator, step_name, batches in largest:
            cells = " | ".join(
                f"≥ {MAX_BATCH}" if batches[card] >= MAX_BATCH else str(batches[card]) for card in CARDS_GB
            )
            print(f"| {name} | {generator} | {step_name} | {cells} |", flush=True)
            common_keys = dict(config=name, generator=generator, step=step_name, remat=args.remat)
            rows.extend(dict(common_keys, card_gb=card, largest_batch=b) for card, b in batches.items())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
