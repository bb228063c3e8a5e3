"""Stage `compare`: the baselines and ablations of METHOD §9.1-9.2 beside the method (Tables T1 and T4).

`launch.py --config configs/phantom.py:stage=compare --workdir W` (only by name; `stage=all` leaves it out)
runs every variant of `config.compare.variants` through the one stage-B trainer and scores them on the
same samples. The variants are the config's table `config.compare.variant_overrides` (which the config
file fills from configs/variants.py: `basegan` = A, `skrgan` = SkrGAN*, `B` … `E`, `full` = F; the aliases
A/F train once):

1. **Checks first**, before any training: the base config must be the method (`config.variant` "full"),
   since each variant is a change of it; every name in `config.compare.variants` must be a variant; the
   sample counts must be positive. Each error names its key.
2. **Frozen networks, once**, in `W` as the method's run (`synth.frozen.needs(config, "compare")`): stage
   `segmentor` (the real-trained lesion segmentors), stage `translator` (G_t) where the method's config
   uses it, stage `structure` where stage B draws its maps from stage A (`structure_source="stage_a"`).
   Each is skipped when already complete.
3. **One stage B per variant** in `W/compare/<name>/` (`configlib.apply_variant` on a copy of the config).
   That folder links `W`'s frozen stages (`segmentor -> ../../segmentor`, …), so the variant's trainer
   loads them as the method's does and every variant is trained against the same G_t and segmentors; it
   is a run folder of its own (`config.json` included) that resumes, and is skipped when complete.
4. **The same samples for every variant**: `config.compare.num_samples` real slices of the test split,
   evenly spread over it, in batches of `config.compare.batch_size` (the last one padded and cut back),
   with the same key per batch. Each variant's trained G gets its inputs from
   `conditioning.make_inputs` (outside pre-training), so all see the same structure maps, organ masks,
   noise draws and drawn lesion labels; the noise baselines ignore the maps, the variants without a label
   ignore the label, and E draws its label without the placement check, as it was trained.
5. **Scores** per variant (`synth.scoring`), and for the real slices as the reference row:
   - MS-SSIM real vs synthetic per modality, mean ± std over `config.compare.num_pairs` seeded random
     pairs (small images upsampled to 161 px); the real row gives MS-SSIM between distinct real slices;
   - FID and KID per modality when `config.verify.quality.inception_weights` names the FID Inception-v3
     weights (else a note, as stage `verify`);
   - lesion Dice: what the frozen real-trained segmentors of `W` find in each variant's images against the
     label that variant was given, whole-lesion Dice per modality over the samples whose label has a
     lesion, with the chance level (against another sample's label); the real row scores the real slices
     against their own labels;
   - registration consistency: the mean pairwise Dice of the structure maps extracted from the K
     modalities (higher = more registered), and, where `W` has a G_t, the translation MSE: the mean
     squared difference between each modality and G_t's translations of the others into it (lower = more
     registered);
   - the number of G's parameters (K models for the baselines with separate models).
6. **Outputs** (process 0 only; `synth.stages.compare_report`): `W/compare/results.json` and `results.csv`
   (every number, per method and modality), `W/compare/summary.md` (the report's section: what each
   variant is, the table in T1's layout with the means over modalities, per-modality numbers in T4's, the
   grid), and `W/compare/samples/side_by_side.png`: one row per test slice (`config.compare.grid_samples`)
   with its structure map, the method's label, the real modalities, then each variant's K modalities in
   the table's order. `W/compare/done.json` is written last. The scores are recomputed on every run (they
   are cheap next to training).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import (
    conditioning,
    configlib,
    flow_synthesis,
    frozen,
    input_pipeline,
    lesion,
    metrics,
    registration,
    scoring,
    sharding,
    structure_nets,
    synthesis_nets,
    translator_nets,
)
from synth import workdir as workdir_lib
from synth.lesion import base as lesion_base
from synth.metrics import inception
from synth.stages import compare_report, segmentor, structure, synthesis, translator

NAME = "compare"
REAL = compare_report.REAL  # The reference row: the real test slices themselves.
# Aliases of configs/variants.py that name the same variant: a list with both trains it once.
ALIASES = {"A": "basegan", "F": "full"}
SAMPLE_SALT = 29  # Folded into the seed: the key of the comparison's samples.
# The stages whose networks the comparison freezes, by name (`frozen.needs(config, "compare")`).
FROZEN_STAGES = {"structure": structure, "segmentor": segmentor, "translator": translator}
log = logging.getLogger("synth")


# --------------------------------------------------------------------------------------------------
# The config.


def variant_names(config: ml_collections.ConfigDict) -> list[str]:
    """`config.compare.variants` with aliases resolved (A -> basegan, F -> full), each once, in order.

    Raises:
      ValueError: the list is empty or names an unknown variant (naming `config.compare.variants`).
    """
    names = list(config.compare.variants)
    known = list(config.compare.variant_overrides)
    if not names:
        raise ValueError(f"config.compare.variants is empty; name at least one of {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"config.compare.variants: unknown variant(s) {unknown}; choose from {', '.join(known)}"
        )
    return list(dict.fromkeys(ALIASES.get(n, n) for n in names))


def check_config(config: ml_collections.ConfigDict) -> list[str]:
    """Validates the stage's config before anything trains; returns the variants to run.

    Raises:
      ValueError: naming the offending key: a base config that is not the method (`variant`), an unknown
        variant (`config.compare.variants`), a non-positive count (`config.compare.<key>`), or a batch
        size the mesh's data axis does not divide (`config.compare.batch_size`).
    """
    base = config.get("variant", "full")
    if ALIASES.get(base, base) != "full":
        raise ValueError(
            f"stage=compare needs the method as its base config (variant=full), got variant={base!r}: "
            "each variant of config.compare.variants is applied to the method's config"
        )
    names = variant_names(config)
    c = config.compare
    for key, least in (("num_samples", 2), ("batch_size", 1), ("num_pairs", 1), ("grid_samples", 0)):
        value = c[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"config.compare.{key} must be an integer >= {least}, got {value!r}")
    devices = sharding.data_parallel_size(sharding.make_mesh(config.mesh.shape, config.mesh.axes))
    if c.batch_size % devices:
        raise ValueError(
            f"config.compare.batch_size={c.batch_size} must split over the {devices} devices of the mesh's "
            "data axis"
        )
    return names


def variant_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """A copy of the method's config changed into variant `name` (the original is left as it is)."""
    overrides = config.compare.variant_overrides
    return configlib.apply_variant(config.copy_and_resolve_references(), name, overrides)


# --------------------------------------------------------------------------------------------------
# Training: the frozen networks once, then one stage B per variant.


def train_frozen(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Trains (or finds complete) the frozen stages in `workdir`; returns their names."""
    names = list(frozen.needs(config, NAME))
    for name in names:
        log.info("[%s] frozen stage %s in %s", NAME, name, workdir)
        FROZEN_STAGES[name].run(config, workdir)
    return names


def variant_workdir(workdir: str, name: str) -> str:
    return os.path.join(workdir_lib.stage_dir(workdir, NAME), name)


def link_frozen(workdir: str, vworkdir: str, names: Sequence[str]) -> None:
    """Links `workdir`'s frozen stage folders into the variant's run folder (relative links)."""
    if sharding.is_main_process():
        os.makedirs(vworkdir, exist_ok=True)
        for name in names:
            link = os.path.join(vworkdir, name)
            if not os.path.lexists(link):
                os.symlink(os.path.relpath(workdir_lib.stage_dir(workdir, name), vworkdir), link)
    _barrier("synth_compare_links")


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def train_variant(config, workdir: str, name: str, frozen_names: Sequence[str], position: str):
    """Trains variant `name`'s stage B in `W/compare/<name>/` (resumes; skipped when complete)."""
    vconfig = variant_config(config, name)
    vworkdir = variant_workdir(workdir, name)
    link_frozen(workdir, vworkdir, frozen_names)
    if sharding.is_main_process():
        workdir_lib.write_config(vconfig, vworkdir)
    log.info("[%s] variant %s (%s): training stage B in %s", NAME, name, position, vworkdir)
    synthesis.run(vconfig, vworkdir)
    return vconfig, vworkdir


# --------------------------------------------------------------------------------------------------
# The samples: the same test slices, structure maps and keys for every variant.


class Slices(NamedTuple):
    """The real test slices every variant is scored on."""

    index: np.ndarray  # (N,) their indices in the test split.
    image: np.ndarray  # (N, H, W, K·C)
    label: np.ndarray  # (N, H, W)


def real_slices(config: ml_collections.ConfigDict, num_samples: int) -> Slices:
    """`num_samples` slices of the test split, evenly spread over it (all of it if it is smaller)."""
    source = input_pipeline.open_source(config.data, config.data.test_split)
    n = min(num_samples, len(source))
    if n < num_samples:
        log.warning("[%s] the test split has %d slices; config.compare.num_samples=%d", NAME, n, num_samples)
    index = np.linspace(0, len(source) - 1, n).astype(int)
    examples = [input_pipeline.image_and_label(source[int(i)]) for i in index]
    return Slices(
        index=index,
        image=np.stack([e["image"] for e in examples]),
        label=np.stack([e["label"] for e in examples]),
    )


def batches(slices: Slices, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Global batches in order; the last is padded with the last slice (cut back by the caller)."""
    n = len(slices.index)
    for start in range(0, n, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)
        yield {"image": slices.image[rows], "label": slices.label[rows]}


def to_device(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """A global batch as sharded arrays: each process hands over its own rows (process order)."""
    size = len(batch["label"])
    local = input_pipeline.local_batch_size(size, sharding.data_parallel_size(mesh))
    p = jax.process_index()
    rows = {k: v[p * local : (p + 1) * local] for k, v in batch.items()}
    return sharding.to_global(rows, sharding.batch_sharding(mesh))


def batch_key(config: ml_collections.ConfigDict, n: int) -> jax.Array:
    """The key of batch `n`: the same for every variant."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), SAMPLE_SALT), n)


class Scorer(NamedTuple):
    """The frozen networks of the method's workdir that score any images (real or a variant's)."""

    params: dict  # "translator" (G_t's parameters) and/or "lesion" (the segmentors').
    translator: translator_nets.Models | None
    lesion: lesion_base.LesionProcessor | None


def load_scorer(config: ml_collections.ConfigDict, workdir: str, image_hw, mesh=None) -> Scorer:
    """The method's real-trained segmentors and (where it trained one) G_t, from `workdir`."""
    params, translator_models, processor = {}, None, None
    if synthesis_nets.uses_translator(config):
        translator_models = translator_nets.make_models(config, image_hw)
        g, _ = frozen.load(config, workdir, "translator", fields=("g_params",), mesh=mesh)
        params["translator"] = g["g_params"]
    if lesion.task(config) == "segment":
        processor = lesion.processor(config, image_hw)
        loaded, _ = frozen.load(config, workdir, "segmentor", mesh=mesh)
        params["lesion"] = loaded["params"]
    return Scorer(params=params, translator=translator_models, lesion=processor)


def score_images(score_params, images, organ, *, scorer: Scorer, config) -> dict[str, jax.Array]:
    """Per-image registration scores and the segmentors' whole-lesion masks of images (B, H, W, K·C).

    Returns:
      `structure_agreement` (B,); `translation_mse` (B,) with a G_t; `found` (K, B, H, W) with segmentors.
    """
    channels = lesion_base.channels_per_modality(config)
    params = structure_nets.extraction_params(config)
    out = {"structure_agreement": scoring.structure_agreement(images, organ, params, channels)}
    if scorer.translator is not None:
        x = registration.by_modality(images, channels)
        translate_many = functools.partial(
            translator_nets.translate_many, scorer.translator, score_params["translator"]
        )
        out["translation_mse"] = scoring.translation_error(translate_many, x)
    if scorer.lesion is not None:
        predicted = scorer.lesion.predict(score_params["lesion"], images)
        out["found"] = metrics.region_mask(predicted, "whole")
    return out


def sample_and_score(
    g_params, frozen_params, score_params, batch, key, *, models, vconfig, scorer, config, shards=1
):
    """One batch of a variant: inputs (outside pre-training), K modalities, scores; `shards`: its split."""
    inputs = conditioning.make_inputs(
        batch, key, frozen_params, models=models, config=vconfig, pretraining=jnp.asarray(False)
    )
    if isinstance(models, flow_synthesis.Models):  # The flow family samples from its EMA parameters.
        images = flow_synthesis.sample_images(
            g_params,
            inputs.structure,
            inputs.organ,
            inputs.label,
            jax.random.fold_in(key, 1),
            velocity=models.velocity,
            config=vconfig,
            shards=shards,
        )
    else:
        k = len(vconfig.data.modalities)
        fakes = synthesis_nets.generate(models, g_params, inputs.g_input, k, shards=shards)
        images = registration.channels_last(fakes)
    out = score_images(score_params, images, inputs.organ, scorer=scorer, config=config)
    return dict(out, image=images, label=inputs.label, structure=inputs.structure[..., 0])


def real_and_score(score_params, batch, *, scorer, config):
    """The real slices' scores (the reference row), with their own structure maps and organ masks."""
    s, organ = structure_nets.real_structures(batch, **structure_nets.extract_kwargs(config))
    out = score_images(score_params, batch["image"], organ, scorer=scorer, config=config)
    return dict(out, image=batch["image"], label=batch["label"], structure=s[..., 0])


def run_batches(fn, slices: Slices, config, mesh) -> dict[str, np.ndarray]:
    """`fn(batch, key)` over every batch, gathered on the host and cut back to the N slices."""
    parts: dict[str, list[np.ndarray]] = {}
    for n, batch in enumerate(batches(slices, config.compare.batch_size)):
        out = jax.device_get(fn(to_device(batch, mesh), batch_key(config, n)))
        for name, value in out.items():
            parts.setdefault(name, []).append(np.asarray(value))
    count = len(slices.index)
    # Per-modality outputs (K, B, …) are batched on axis 1, everything else on axis 0.
    return {
        name: np.concatenate(v, axis=1)[:, :count] if name == "found" else np.concatenate(v)[:count]
        for name, v in parts.items()
    }


def sample_variant(vconfig, vworkdir: str, slices: Slices, scorer: Scorer, config, mesh) -> dict[str, Any]:
    """A variant's trained G on the comparison's slices: images, inputs, scores, parameter count, step."""
    is_flow = flow_synthesis.is_flow(vconfig)
    field = "ema_params" if is_flow else "g_params"
    g, step = frozen.load(vconfig, vworkdir, "synthesis", fields=(field,), mesh=mesh)
    frozen_params, _ = frozen.load_stage_b_frozen(vconfig, vworkdir, mesh=mesh)
    hw = slices.image.shape[1:3]
    models = flow_synthesis.make_models(vconfig, hw) if is_flow else synthesis_nets.make_models(vconfig, hw)
    shards = sharding.data_parallel_size(mesh)  # `synthesis_nets.generate` groups the batch by shard.
    kwargs = dict(models=models, vconfig=vconfig, scorer=scorer, config=config, shards=shards)
    fn = jax.jit(functools.partial(sample_and_score, **kwargs), out_shardings=sharding.replicated(mesh))
    out = run_batches(lambda b, k: fn(g[field], frozen_params, scorer.params, b, k), slices, config, mesh)
    out["g_params"] = int(sum(x.size for x in jax.tree.leaves(g[field])))
    out["step"] = step
    return out


def sample_real(slices: Slices, scorer: Scorer, config, mesh) -> dict[str, Any]:
    """The real slices' own scores (the reference row), in the comparison's batches."""
    fn = jax.jit(
        functools.partial(real_and_score, scorer=scorer, config=config),
        out_shardings=sharding.replicated(mesh),
    )
    return run_batches(lambda b, k: fn(scorer.params, b), slices, config, mesh)


# --------------------------------------------------------------------------------------------------
# Scores: pure functions of the gathered arrays.


def lesion_scores(found: np.ndarray, label: np.ndarray, modalities: Sequence[str]) -> dict[str, float]:
    """Whole-lesion Dice of the segmentors' masks against the labels, and its chance level.

    Args:
      found: (K, N, H, W) bool, what each modality's segmentor finds.
      label: (N, H, W) the labels asked for (for real slices: their own).
      modalities: the K names.

    Returns:
      `lesion_dice` (mean over modalities), `lesion_dice/<modality>` and `lesion_dice_chance` (against
      another sample's lesion) over the same samples, as stage B's evaluator
      (`scoring.lesion_dice_and_chance`); `lesion_samples`: how many were scored.
    """
    fidelity = {k: np.asarray(v) for k, v in scoring.lesion_dice_and_chance(found, label).items()}
    scored = fidelity["scored"]
    out: dict[str, float] = {"lesion_samples": int(scored.sum())}
    dice = [_masked_mean(fidelity["dice"][:, k], scored) for k in range(len(modalities))]
    chance = [_masked_mean(fidelity["chance"][:, k], scored) for k in range(len(modalities))]
    out.update({f"lesion_dice/{name}": dice[k] for k, name in enumerate(modalities)})
    out["lesion_dice"] = float(np.mean(dice))
    out["lesion_dice_chance"] = float(np.mean(chance))
    return out


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sum(values * mask) / mask.sum()) if mask.any() else float("nan")


def registration_scores(out: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean ± std over the samples of the structure agreement and (with a G_t) the translation MSE."""
    scores = {}
    for name in ("structure_agreement", "translation_mse"):
        if name in out:
            scores[name] = float(np.mean(out[name]))
            scores[name + "_std"] = float(np.std(out[name]))
    return scores


def quality_scores(real: np.ndarray, fake: np.ndarray | None, config, extractor=None) -> dict[str, float]:
    """Per modality: MS-SSIM real vs synthetic (mean ± std over pairs), FID and KID with an extractor.

    With `fake` None (the real row): MS-SSIM between distinct real slices, and no FID/KID. The pairs come
    from the same key for every method, so every method is scored on the same real slices.
    """
    return scoring.image_quality(
        real,
        fake,
        key=jax.random.fold_in(jax.random.key(config.seed), SAMPLE_SALT + 1),
        num_pairs=int(config.compare.num_pairs),
        modalities=config.data.modalities,
        channels=lesion_base.channels_per_modality(config),
        extractor=extractor,
    )


def method_entry(name: str, out: dict[str, Any], quality: dict, vconfig, config) -> dict[str, Any]:
    """One method's row of results.json / results.csv: flat keys, `<metric>/<modality>` per modality."""
    entry: dict[str, Any] = {
        "method": name,
        "title": compare_report.title(name),
        "description": compare_report.description(name, config),
    }
    if vconfig is not None:
        entry.update({f"uses_{k}": v for k, v in compare_report.settings(vconfig).items()})
        entry["g_params"], entry["synthesis_step"] = out["g_params"], out["step"]
    entry.update(quality)
    entry.update(registration_scores(out))
    if "found" in out:
        entry.update(lesion_scores(out["found"], out["label"], tuple(config.data.modalities)))
    return entry


# --------------------------------------------------------------------------------------------------
# The stage.


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at=None):
    """Trains the frozen stages and every variant's stage B, samples and scores them, writes the report."""
    # Each variant trains to its own budget; an interrupted comparison resumes variant by variant.
    del stop_at
    names = check_config(config)
    workdir = os.path.abspath(os.fspath(workdir))
    frozen_names = train_frozen(config, workdir)
    trained = {}
    for i, name in enumerate(names):
        trained[name] = train_variant(config, workdir, name, frozen_names, f"{i + 1}/{len(names)}")

    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    slices = real_slices(config, config.compare.num_samples)
    scorer = load_scorer(config, workdir, slices.image.shape[1:3], mesh)
    weights = config.get("verify", {}).get("quality", {}).get("inception_weights", "")
    extractor = inception.inception_v3_extractor(weights) if weights else None
    log.info("[%s] scoring the %d real test slices", NAME, len(slices.index))
    real = sample_real(slices, scorer, config, mesh)
    entries = [method_entry(REAL, real, quality_scores(slices.image, None, config), None, config)]
    outputs = {}
    for name, (vconfig, vworkdir) in trained.items():
        log.info("[%s] variant %s: sampling %d slices and scoring them", NAME, name, len(slices.index))
        outputs[name] = sample_variant(vconfig, vworkdir, slices, scorer, config, mesh)
        quality = quality_scores(slices.image, outputs[name]["image"], config, extractor)
        entries.append(method_entry(name, outputs[name], quality, vconfig, config))
        log.info("[%s] %s: %s", NAME, name, _brief(entries[-1]))
    if sharding.is_main_process():
        lines = compare_report.summary_lines(
            entries, config, frozen=frozen_names, num_samples=len(slices.index), fid=extractor is not None
        )
        grid = (
            compare_report.side_by_side(real, outputs, config, config.compare.grid_samples)
            if config.compare.grid_samples
            else None
        )
        meta = {
            "variants": names,
            "test_split": config.data.test_split,
            "test_indices": slices.index.tolist(),
            "seed": int(config.seed),
            "num_pairs": int(config.compare.num_pairs),
            "fid": extractor is not None,
        }
        compare_report.write_outputs(workdir, entries, lines, grid, meta)
        workdir_lib.done(workdir_lib.stage_dir(workdir, NAME), {"variants": names})
    return entries


def _brief(entry: dict) -> str:
    keys = ("ms_ssim", "lesion_dice", "lesion_dice_chance", "structure_agreement", "translation_mse")
    return " ".join(f"{k}={entry[k]:.4g}" for k in keys if k in entry)


def load_results(workdir: str | os.PathLike) -> dict:
    """`W/compare/results.json` of a finished comparison."""
    return workdir_lib.read_json(os.path.join(workdir_lib.stage_dir(workdir, NAME), "results.json"))
