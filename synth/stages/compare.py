"""Stage `compare`: the baselines and ablations of METHOD §9.1-9.2 beside the method (Tables T1 and T4).

`launch.py --config configs/phantom.py:stage=compare --workdir W` (only by name; `stage=all` leaves it out)
runs every variant of `config.compare.variants` (configs/variants.py: `basegan` = A, `skrgan` = SkrGAN*,
`B` … `E`, `full` = F; the aliases A/F train once) through the one stage-B trainer and scores them on the
same samples:

1. **Checks first**, before any training: the base config must be the method (`config.variant` "full"),
   since each variant is a change of it; every name in `config.compare.variants` must be a variant; the
   sample counts must be positive. Each error names its key.
2. **Frozen networks, once**, in `W` as the method's run: stage `segmentor` (the real-trained lesion
   segmentors), stage `translator` (G_t) where the method's config uses it, stage `structure` where stage
   B draws its maps from stage A (`structure_source="stage_a"`). Each is skipped when already complete.
3. **One stage B per variant** in `W/compare/<name>/` (`variants.apply` on a copy of the config). That
   folder links `W`'s frozen stages (`segmentor -> ../../segmentor`, …), so the variant's trainer loads
   them as the method's does and every variant is trained against the same G_t and segmentors; it is a
   run folder of its own (`config.json` included) that resumes, and is skipped when complete.
4. **The same samples for every variant**: `config.compare.num_samples` real slices of the test split,
   evenly spread over it, in batches of `config.compare.batch_size` (the last one padded and cut back),
   with the same key per batch. Each variant's trained G gets its inputs from `synthesis.make_inputs`
   (outside pre-training), so all see the same structure maps, organ masks, noise draws and drawn lesion
   labels; the noise baselines ignore the maps, the variants without a label ignore the label, and E
   draws its label without the placement check, as it was trained.
5. **Scores** per variant, and for the real slices as the reference row:
   - MS-SSIM real vs synthetic per modality, mean ± std over `config.compare.num_pairs` seeded random
     pairs (`synth.metrics.image.ms_ssim_real_vs_synthetic`, small images upsampled to 161 px); the real
     row gives MS-SSIM between distinct real slices;
   - FID and KID per modality when `config.verify.quality.inception_weights` names the FID Inception-v3
     weights (else a note, as stage `verify`);
   - lesion Dice: what the frozen real-trained segmentors of `W` find in each variant's images against the
     label that variant was given, whole-lesion Dice per modality over the samples whose label has a
     lesion, with the chance level (against another sample's label); the real row scores the real slices
     against their own labels;
   - registration consistency: `synthesis.structure_agreement`, the mean pairwise Dice of the structure
     maps extracted from the K modalities (higher = more registered), and, where `W` has a G_t, the
     translation MSE: the mean squared difference between each modality and G_t's translations of the
     others into it (lower = more registered);
   - the number of G's parameters (K models for the baselines with separate models).
6. **Outputs** (process 0 only): `W/compare/results.json` and `results.csv` (every number, per method and
   modality), `W/compare/summary.md` (the report's section: what each variant is, the table in T1's
   layout with the means over modalities, per-modality numbers in T4's, the grid), and
   `W/compare/samples/side_by_side.png`: one row per test slice (`config.compare.grid_samples`) with its
   structure map, the method's label, the real modalities, then each variant's K modalities in the
   table's order. `W/compare/done.json` is written last. The scores are recomputed on every run (they are
   cheap next to training).
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import variants as variants_lib
from synth import extraction, input_pipeline, metrics, registration, sharding, train
from synth import writer as writer_lib
from synth.stages import segmentor, synthesis

NAME = "compare"
REAL = "real"  # The reference row: the real test slices themselves.
# Aliases of configs/variants.py that name the same variant: a list with both trains it once.
ALIASES = {"A": "basegan", "F": "full"}
TITLES = {
    "basegan": "A (BaseGAN)",
    "skrgan": "SkrGAN*",
    "full": "F (method)",
    "ecai": "ECAI (old design)",
    REAL: "real slices",
}
SAMPLE_SALT = 29  # Folded into the seed: the key of the comparison's samples.
log = logging.getLogger("synth")


# --------------------------------------------------------------------------------------------------
# The config.


def variant_names(config: ml_collections.ConfigDict) -> list[str]:
    """`config.compare.variants` with aliases resolved (A -> basegan, F -> full), each once, in order.

    Raises:
      ValueError: the list is empty or names an unknown variant (naming `config.compare.variants`).
    """
    names = list(config.compare.variants)
    if not names:
        raise ValueError("config.compare.variants is empty; name at least one of configs/variants.py's")
    unknown = [n for n in names if n not in variants_lib.VARIANTS]
    if unknown:
        raise ValueError(
            f"config.compare.variants: unknown variant(s) {unknown}; "
            f"choose from {', '.join(variants_lib.VARIANTS)}"
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
    return variants_lib.apply(config.copy_and_resolve_references(), name)


def description(name: str) -> str:
    """The first line of the variant's function docstring in configs/variants.py."""
    if name == REAL:
        return "The real test slices (reference)."
    doc = variants_lib.VARIANTS[name].__doc__ or name
    return doc.strip().splitlines()[0]


def title(name: str) -> str:
    return TITLES.get(name, name)


def settings(vconfig: ml_collections.ConfigDict) -> dict[str, bool]:
    """What a variant's stage B uses, as T1's columns, read from its config."""
    sy = vconfig.synthesis
    structure = sy.g_input != "noise"
    lesion = sy.label_fusion != "none" and sy.lesion_processor != "none" and sy.loss.weights.lesion > 0
    return {
        "structure_map": structure,
        "noise": sy.g_input == "noise" or (sy.g_input == "structure" and float(sy.noise[1]) > 0),
        # The method's through the frozen G_t; the old design's through its own EC_M and DC_M (§6.7).
        "registration_loss": synthesis.registers(vconfig),
        "lesion_label_loss": lesion,
        "placement_check": lesion and sy.label_rule != "none",
        "separate_models": bool(sy.separate_models),
    }


# --------------------------------------------------------------------------------------------------
# Training: the frozen networks once, then one stage B per variant.


def frozen_stages(config: ml_collections.ConfigDict) -> list[str]:
    """The earlier stages the method's stage B (and the scores) need, in pipeline order."""
    names = ["structure"] if config.synthesis.structure_source == "stage_a" else []
    names.append("segmentor")
    if synthesis._uses_translator(config):  # noqa: SLF001
        names.append("translator")
    return names


def train_frozen(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Trains (or finds complete) the frozen stages in `workdir`; returns their names."""
    import importlib

    names = frozen_stages(config)
    for name in names:
        log.info("[%s] frozen stage %s in %s", NAME, name, workdir)
        importlib.import_module(f"synth.stages.{name}").run(config, workdir)
    return names


def variant_workdir(workdir: str, name: str) -> str:
    return os.path.join(train.stage_dir(workdir, NAME), name)


def link_frozen(workdir: str, vworkdir: str, names: Sequence[str]) -> None:
    """Links `workdir`'s frozen stage folders into the variant's run folder (relative links)."""
    if jax.process_index() == 0:
        os.makedirs(vworkdir, exist_ok=True)
        for name in names:
            link = os.path.join(vworkdir, name)
            if not os.path.lexists(link):
                os.symlink(os.path.relpath(train.stage_dir(workdir, name), vworkdir), link)
    _barrier("synth_compare_links")


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def train_variant(config, workdir: str, name: str, frozen: Sequence[str], position: str):
    """Trains variant `name`'s stage B in `W/compare/<name>/` (resumes; skipped when complete)."""
    from synth import pipeline

    vconfig = variant_config(config, name)
    vworkdir = variant_workdir(workdir, name)
    link_frozen(workdir, vworkdir, frozen)
    if jax.process_index() == 0:
        pipeline.write_config(vconfig, vworkdir)
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
    translator: Any  # synth.stages.translator.Models or None
    lesion: synthesis.LesionProcessor | None


def load_scorer(config: ml_collections.ConfigDict, workdir: str, image_hw) -> Scorer:
    """The method's real-trained segmentors and (where it trained one) G_t, from `workdir`."""
    params, translator_models, lesion = {}, None, None
    if synthesis._uses_translator(config):  # noqa: SLF001
        from synth.stages import translator

        translator_models = translator.make_models(config, image_hw)
        params["translator"] = translator.load_state(config, workdir).g_params
    if segmentor.task(config) == "segment":
        lesion = synthesis.LESION_PROCESSORS["segmentor"](config, image_hw)
        params["lesion"], _ = lesion.load(config, workdir)
    return Scorer(params=params, translator=translator_models, lesion=lesion)


def score_images(score_params, images, organ, *, scorer: Scorer, config) -> dict[str, jax.Array]:
    """Per-image registration scores and the segmentors' whole-lesion masks of images (B, H, W, K·C).

    Returns:
      `structure_agreement` (B,); `translation_mse` (B,) with a G_t; `found` (K, B, H, W) with segmentors.
    """
    channels = synthesis.channels_per_modality(config)
    params = extraction.ExtractionParams.from_config(config.structure.extraction)
    out = {"structure_agreement": synthesis.structure_agreement(images, organ, params, channels)}
    if scorer.translator is not None:
        x = registration.by_modality(images, channels)
        translate = functools.partial(scorer.translator.generator.apply, score_params["translator"])
        translations = registration.translate_pairs(translate, x)
        out["translation_mse"] = jnp.mean(jnp.square(translations - x[:, None]), axis=(0, 1, 3, 4, 5))
    if scorer.lesion is not None:
        predicted = scorer.lesion.predict(score_params["lesion"], images)
        out["found"] = metrics.region_mask(predicted, "whole")
    return out


def sample_and_score(g_params, frozen, score_params, batch, key, *, models, vconfig, scorer, config):
    """One batch of a variant: its inputs (outside pre-training), its K modalities, their scores."""
    inputs = synthesis.make_inputs(
        batch, key, frozen, models=models, config=vconfig, pretraining=jnp.asarray(False)
    )
    fakes = synthesis.synthesize(models, g_params, inputs.g_input, len(vconfig.data.modalities))
    images = registration.channels_last(fakes)
    out = score_images(score_params, images, inputs.organ, scorer=scorer, config=config)
    return dict(out, image=images, label=inputs.label, structure=inputs.structure[..., 0])


def real_and_score(score_params, batch, *, scorer, config):
    """The real slices' scores (the reference row), with their own structure maps and organ masks."""
    params = extraction.ExtractionParams.from_config(config.structure.extraction)
    s, organ = extraction.extract(
        batch["image"], batch["label"], params, remove_lesions=config.structure.remove_lesions
    )
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
    spec = synthesis.build(vconfig, mesh, workdir=vworkdir)
    state = train.load_trained_state(spec, vconfig, vworkdir)
    models = synthesis.make_models(vconfig, slices.image.shape[1:3])
    fn = jax.jit(
        functools.partial(sample_and_score, models=models, vconfig=vconfig, scorer=scorer, config=config),
        out_shardings=sharding.replicated(mesh),
    )
    out = run_batches(lambda b, k: fn(state.g_params, spec.frozen, scorer.params, b, k), slices, config, mesh)
    out["g_params"] = int(sum(x.size for x in jax.tree.leaves(state.g_params)))
    out["step"] = int(jax.device_get(state.step))
    return out


def sample_real(slices: Slices, scorer: Scorer, config, mesh) -> dict[str, Any]:
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
      `lesion_dice` (mean over modalities) and `lesion_dice/<modality>` over the samples whose label has
      a lesion; `lesion_dice_chance`: against the next sample's label (cyclically), over the samples
      where either label has one, as stage B's evaluator; `lesion_samples`: how many had a lesion.
    """
    target = np.asarray(metrics.region_mask(label, "whole"))
    other = np.roll(target, 1, axis=0)
    has, either = target.any(axis=(1, 2)), target.any(axis=(1, 2)) | other.any(axis=(1, 2))
    out: dict[str, float] = {"lesion_samples": int(has.sum())}
    dice, chance = [], []
    for k, name in enumerate(modalities):
        d = np.asarray(metrics.binary_dice_per_image(found[k], target)[0])
        c = np.asarray(metrics.binary_dice_per_image(found[k], other)[0])
        dice.append(_masked_mean(d, has))
        chance.append(_masked_mean(c, either))
        out[f"lesion_dice/{name}"] = dice[-1]
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
    from synth.metrics import distribution, image

    c = synthesis.channels_per_modality(config)
    n, pairs = len(real), int(config.compare.num_pairs)
    key = jax.random.fold_in(jax.random.key(config.seed), SAMPLE_SALT + 1)
    kw = dict(min_size=image.MS_SSIM_MIN_SIZE)
    out: dict[str, float] = {}
    for k, name in enumerate(config.data.modalities):
        r = real[..., k * c : (k + 1) * c]
        key_k = jax.random.fold_in(key, k)
        if fake is None:
            mean, std = image.ms_ssim_diversity(r, key_k, min(pairs, math.comb(n, 2)), **kw)
        else:
            f = fake[..., k * c : (k + 1) * c]
            mean, std = image.ms_ssim_real_vs_synthetic(r, f, key_k, pairs, **kw)
            if extractor is not None:
                fr, ff = extractor(r), extractor(f)
                out[f"fid/{name}"] = float(distribution.fid_from_features(fr, ff))
                kid, _ = distribution.kid(fr, ff, min(n, 100), 20, jax.random.fold_in(key, 100 + k))
                out[f"kid/{name}"] = float(kid)
        out[f"ms_ssim/{name}"], out[f"ms_ssim_std/{name}"] = float(mean), float(std)
    for metric in ("ms_ssim", "fid", "kid"):
        values = [out[f"{metric}/{m}"] for m in config.data.modalities if f"{metric}/{m}" in out]
        if values:
            out[metric] = float(np.mean(values))
    return out


def method_entry(name: str, out: dict[str, Any], quality: dict, vconfig, modalities) -> dict[str, Any]:
    """One method's row of results.json / results.csv: flat keys, `<metric>/<modality>` per modality."""
    entry: dict[str, Any] = {"method": name, "title": title(name), "description": description(name)}
    if vconfig is not None:
        entry.update({f"uses_{k}": v for k, v in settings(vconfig).items()})
        entry["g_params"], entry["synthesis_step"] = out["g_params"], out["step"]
    entry.update(quality)
    entry.update(registration_scores(out))
    if "found" in out:
        entry.update(lesion_scores(out["found"], out["label"], modalities))
    return entry


# --------------------------------------------------------------------------------------------------
# The report.

SETTING_COLUMNS = (
    ("uses_structure_map", "structure map"),
    ("uses_noise", "noise"),
    ("uses_registration_loss", "L_reg"),
    ("uses_lesion_label_loss", "lesion label + L_les"),
    ("uses_placement_check", "placement check"),
    ("uses_separate_models", "K separate G/D"),
)


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _pm(entry: dict, key: str, digits: int = 3) -> str:
    if key not in entry:
        return "–"
    std = entry.get(key.replace("/", "_std/") if "/" in key else key + "_std")
    return _num(entry[key], digits) + ("" if std is None else f" ± {_num(std, digits)}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def main_table(entries: Sequence[dict], *, fid: bool) -> list[str]:
    """T1's layout: one row per method, its settings, then the scores averaged over modalities."""
    header = ["method", *(h for _, h in SETTING_COLUMNS), "G params", "MS-SSIM ↑"]
    header += ["FID ↓", "KID ↓"] if fid else []
    header += ["lesion Dice ↑ (chance)", "structure agreement ↑", "translation MSE ↓"]
    rows = []
    for e in entries:
        flags = (
            ["✓" if e[k] else "×" for k, _ in SETTING_COLUMNS]
            if "g_params" in e
            else ["" for _ in SETTING_COLUMNS]
        )
        row = [e["title"], *flags, f"{e['g_params']:,}" if "g_params" in e else "", _num(e.get("ms_ssim"))]
        row += [_num(e.get("fid"), 2), _num(e.get("kid"), 4)] if fid else []
        lesion = (
            "–" if "lesion_dice" not in e else f"{_num(e['lesion_dice'])} ({_num(e['lesion_dice_chance'])})"
        )
        row += [lesion, _pm(e, "structure_agreement"), _pm(e, "translation_mse", 4)]
        rows.append(row)
    return markdown_table(header, rows)


def modality_table(entries: Sequence[dict], modalities: Sequence[str], *, fid: bool) -> list[str]:
    """T4's layout per modality: MS-SSIM (mean ± std over pairs), lesion Dice, FID and KID."""
    header = ["method"] + [f"{m} MS-SSIM ↑" for m in modalities] + [f"{m} lesion Dice ↑" for m in modalities]
    if fid:
        header += [f"{m} FID ↓" for m in modalities] + [f"{m} KID ↓" for m in modalities]
    rows = []
    for e in entries:
        row = [e["title"]] + [_pm(e, f"ms_ssim/{m}") for m in modalities]
        row += [_num(e.get(f"lesion_dice/{m}")) for m in modalities]
        if fid:
            row += [_num(e.get(f"fid/{m}"), 2) for m in modalities] + [
                _num(e.get(f"kid/{m}"), 4) for m in modalities
            ]
        rows.append(row)
    return markdown_table(header, rows)


def summary_lines(
    entries: Sequence[dict], config, *, frozen: Sequence[str], num_samples: int, fid: bool
) -> list[str]:
    """The stage's report section (report.py adds the `## compare` heading above it)."""
    modalities = tuple(config.data.modalities)
    methods = [e for e in entries if e["method"] != REAL]
    steps = sorted({e["synthesis_step"] for e in methods})
    lines = [
        f"Baselines and ablations of METHOD §9.1-9.2 beside the method (Tables T1, T4): each trained its own "
        f"stage B ({', '.join(map(str, steps))} steps) in `compare/<name>/` against this workdir's frozen "
        f"{', '.join(frozen)}, then made one sample for each of the same {num_samples} real test slices "
        "(evenly spread over the test split), from the same structure maps, lesion labels and keys.",
        "",
        *markdown_table(["method", "what it is"], [[e["title"], e["description"]] for e in entries]),
        "",
        "### Scores (T1's layout; means over the modalities)",
        "",
        *main_table(entries, fid=fid),
        "",
        "MS-SSIM: real vs synthetic, mean over seeded random pairs per modality, small images upsampled to "
        "161 px (the real row: between distinct real slices). Lesion Dice: whole-lesion Dice of the frozen "
        "real-trained segmentors on each method's images against the label it was given, over the samples "
        "whose label has a lesion; in brackets the chance level (another sample's label); the real row "
        "scores the real slices against their own labels. Structure agreement: mean pairwise Dice of the "
        "structure maps extracted from the K modalities (higher = more registered). Translation MSE: mean "
        "squared difference between each modality and the frozen G_t's translations of the others into it "
        "(lower = more registered). Mean ± std over the samples.",
        "",
        "### Per modality (T4's layout)",
        "",
        *modality_table(entries, modalities, fid=fid),
        "",
        "Every number per method and modality: `compare/results.json`, `compare/results.csv`.",
        "",
        "![side by side](compare/samples/side_by_side.png)",
        "",
        "Each row is one test slice: its structure map, the method's lesion label, the real "
        + ", ".join(modalities)
        + ", then each method's "
        + ", ".join(modalities)
        + " in the table's order ("
        + ", ".join(e["title"] for e in methods)
        + ").",
    ]
    if not fid:
        lines += [
            "",
            "FID/KID need the FID Inception-v3 weights: set `config.verify.quality.inception_weights` to the "
            "converted file (see `synth/metrics/inception.py` for which file and how to make it).",
        ]
    return lines


def side_by_side(real: dict, outputs: dict[str, dict], config, rows: int) -> np.ndarray:
    """The grid: per slice its structure map, the method's label, the real modalities, each method's."""
    c = synthesis.channels_per_modality(config)
    k = len(config.data.modalities)
    reference = outputs.get("full", next(iter(outputs.values())))

    def modalities(images, b):
        return [images[b, ..., j * c : (j + 1) * c] for j in range(k)]

    grid = []
    for b in range(min(rows, len(real["image"]))):
        row = [
            reference["structure"][b],
            writer_lib.label_colours(reference["label"][b], config.data.num_classes),
        ]
        row += modalities(real["image"], b)
        for out in outputs.values():
            row += modalities(out["image"], b)
        grid.append(row)
    return writer_lib.image_grid(grid)


def _json_ready(entry: dict) -> dict:
    """NaN (no sample with a lesion) as null: results.json stays standard JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()}


def write_outputs(
    workdir: str, entries: list[dict], lines: list[str], grid: np.ndarray | None, meta: dict
) -> None:
    """results.json, results.csv, summary.md and the grid in `W/compare/` (process 0; atomic writes)."""
    from PIL import Image

    out_dir = train.stage_dir(workdir, NAME)
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    results = {**meta, "methods": [_json_ready(e) for e in entries]}
    train._write_json(os.path.join(out_dir, "results.json"), results)  # noqa: SLF001
    # A variant's row has every column (the real row lacks the settings): its order is the header's.
    fields = list(dict.fromkeys(k for e in reversed(entries) for k in e))
    tmp = os.path.join(out_dir, "results.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(entries)
    os.replace(tmp, os.path.join(out_dir, "results.csv"))
    if grid is not None:
        path = os.path.join(out_dir, "samples", "side_by_side.png")
        Image.fromarray(writer_lib.to_uint8(grid)).save(path + ".tmp", format="PNG")
        os.replace(path + ".tmp", path)
    with open(os.path.join(out_dir, "summary.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out_dir, "summary.md.tmp"), os.path.join(out_dir, "summary.md"))


# --------------------------------------------------------------------------------------------------
# The stage.


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at=None):
    """Trains the frozen stages and every variant's stage B, samples and scores them, writes the report."""
    # Each variant trains to its own budget; an interrupted comparison resumes variant by variant.
    del stop_at
    names = check_config(config)
    workdir = os.path.abspath(os.fspath(workdir))
    frozen = train_frozen(config, workdir)
    trained = {}
    for i, name in enumerate(names):
        trained[name] = train_variant(config, workdir, name, frozen, f"{i + 1}/{len(names)}")

    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    slices = real_slices(config, config.compare.num_samples)
    scorer = load_scorer(config, workdir, slices.image.shape[1:3])
    weights = config.get("verify", {}).get("quality", {}).get("inception_weights", "")
    extractor = None
    if weights:
        from synth.metrics import inception

        extractor = inception.inception_v3_extractor(weights)
    modalities = tuple(config.data.modalities)
    log.info("[%s] scoring the %d real test slices", NAME, len(slices.index))
    real = sample_real(slices, scorer, config, mesh)
    entries = [method_entry(REAL, real, quality_scores(slices.image, None, config), None, modalities)]
    outputs = {}
    for name, (vconfig, vworkdir) in trained.items():
        log.info("[%s] variant %s: sampling %d slices and scoring them", NAME, name, len(slices.index))
        outputs[name] = sample_variant(vconfig, vworkdir, slices, scorer, config, mesh)
        quality = quality_scores(slices.image, outputs[name]["image"], config, extractor)
        entries.append(method_entry(name, outputs[name], quality, vconfig, modalities))
        log.info("[%s] %s: %s", NAME, name, _brief(entries[-1]))
    if jax.process_index() == 0:
        lines = summary_lines(
            entries, config, frozen=frozen, num_samples=len(slices.index), fid=extractor is not None
        )
        grid = (
            side_by_side(real, outputs, config, config.compare.grid_samples)
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
        write_outputs(workdir, entries, lines, grid, meta)
        train._write_json(  # noqa: SLF001
            os.path.join(train.stage_dir(workdir, NAME), "done.json"), {"variants": names}
        )
    return entries


def _brief(entry: dict) -> str:
    keys = ("ms_ssim", "lesion_dice", "lesion_dice_chance", "structure_agreement", "translation_mse")
    return " ".join(f"{k}={entry[k]:.4g}" for k in keys if k in entry)


def load_results(workdir: str | os.PathLike) -> dict:
    """`W/compare/results.json` of a finished comparison."""
    with open(os.path.join(train.stage_dir(workdir, NAME), "results.json")) as f:
        return json.load(f)
