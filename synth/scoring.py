"""How good synthetic images are, scored one way for every stage that reports it.

  - image quality per modality (`image_quality`): MS-SSIM of seeded random real–synthetic pairs and
    within each set (small images upsampled to MS-SSIM's 161 px, `synth.metrics.image`), the MS-SSIM
    between the modalities of one sample (synthetic against real: alike modalities show as a gap), and
    FID / KID with a feature extractor (`synth.metrics.distribution`), and a Fréchet distance in the
    real-trained segmentors' features that needs no download (`segmentor_frechet`); every image is
    min–max normalised on its own first (§9.3); stage D's report, the comparison and the benchmark;
  - lesion fidelity (`lesion_dice_and_chance`, `class_accuracy_and_chance`): whether the real-trained
    lesion processor finds the asked-for lesion, against the chance level of another sample's label;
    stage B's evaluator and the comparison;
  - stage C's filter score (`filter_dice`, `DICE_KINDS`);
  - registration consistency (`structure_agreement`, `translation_error`): do the K modalities share one
    anatomy.

Per-modality quality draws its random pairs and subsets from one key per modality k, always laid out the
same way: `fold_in(key, k)` real–synthetic pairs, `100 + k` pairs within the synthetic set, `200 + k`
within the real set, `300 + k` KID's subsets; `400` and `401` the pairs between the real and the
synthetic modalities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from synth import extraction, lesion, metrics, registration
from synth.lesion import segment
from synth.metrics import distribution
from synth.metrics import image as image_metrics

# How stage C's lesion filter scores a sample (`filter_dice`):
#   whole    Dice of lesion against background (labels > 0), the standard whole-tumour Dice; the default;
#   classes  the mean Dice over the lesion classes present in the label or the prediction;
#   parity   the authors' soft Dice on class indices (§9.4), as their selection script scores;
#   class    the fraction of the K modalities whose classifier sees the asked-for class (X-ray);
#   none     no lesion filter: every sample scores 1 (lung CT, retina: no lesion input).
DICE_KINDS = ("whole", "classes", "parity", "class", "none")
KID_SUBSET_SIZE, KID_SUBSETS = 100, 20  # At most 100 images per KID subset, 20 subsets.


# --------------------------------------------------------------------------------------------------
# Image quality.


def modality_images(images: np.ndarray, k: int, channels: int) -> np.ndarray:
    """Modality k's C channels of images (N, H, W, K·C)."""
    return images[..., k * channels : (k + 1) * channels]


def by_modality_normalised(images: np.ndarray, num_modalities: int, channels: int) -> np.ndarray:
    """(K, N, H, W, C) of images (N, H, W, K·C), each image of each modality min–max scaled to [0, 1] (§9.3).

    The authors score every image after its own min–max normalisation; without it a synthetic set with a
    grey frame or a dim range compares differently from the same structure at full range.
    """
    by_modality = [modality_images(images, k, channels) for k in range(num_modalities)]
    return np.stack([np.asarray(image_metrics.minmax_per_image(jnp.asarray(x))) for x in by_modality])


def image_quality(
    real: np.ndarray,
    fake: np.ndarray | None,
    *,
    key: jax.Array,
    num_pairs: int,
    modalities: Sequence[str],
    channels: int = 1,
    extractor=None,
    within: bool = False,
) -> dict[str, float]:
    """Per-modality MS-SSIM (and FID/KID with an extractor) of synthetic images against real ones.

    Args:
      real: (N, H, W, K·C) real images in [0, 1].
      fake: (N, H, W, K·C) synthetic images, or None: the real set against itself (its diversity).
      key: the root key (see the module docstring for its layout).
      num_pairs: random real–synthetic pairs per modality; the within-set scores use at most the set's
        number of distinct pairs.
      modalities: the K names.
      channels: C, channels per modality.
      extractor: FID features of (N, H, W, C) images, or None for no FID/KID.
      within: also score the diversity within the synthetic and within the real set.

    Returns:
      `ms_ssim/<m>`, `ms_ssim_std/<m>` (mean ± std over pairs; with `fake` None the real set's
      diversity); with `within`, `ms_ssim_within_synthetic/<m>` and `ms_ssim_within_real/<m>`; with an
      extractor `fid/<m>` and `kid/<m>`; and the mean over modalities of each (`ms_ssim`, `fid`, `kid`).
      With K ≥ 2 also `intermodality/real` (and `intermodality/synthetic` with `fake`).
    """
    n = len(real)
    distinct = min(num_pairs, math.comb(n, 2))
    kw = dict(min_size=image_metrics.MS_SSIM_MIN_SIZE)
    diversity = image_metrics.ms_ssim_diversity
    out: dict[str, float] = {}
    real = by_modality_normalised(real, len(modalities), channels)
    fake = None if fake is None else by_modality_normalised(fake, len(modalities), channels)
    if len(modalities) > 1:
        between = image_metrics.ms_ssim_between_modalities
        out["intermodality/real"] = between(real, jax.random.fold_in(key, 400), num_pairs, **kw)[0]
        if fake is not None:
            out["intermodality/synthetic"] = between(fake, jax.random.fold_in(key, 401), num_pairs, **kw)[0]
    for k, name in enumerate(modalities):
        r = real[k]
        if fake is None:
            mean, std = diversity(r, jax.random.fold_in(key, 200 + k), distinct, **kw)
            out[f"ms_ssim/{name}"], out[f"ms_ssim_std/{name}"] = float(mean), float(std)
            continue
        f = fake[k]
        mean, std = image_metrics.ms_ssim_real_vs_synthetic(r, f, jax.random.fold_in(key, k), num_pairs, **kw)
        out[f"ms_ssim/{name}"], out[f"ms_ssim_std/{name}"] = float(mean), float(std)
        if within:
            synthetic, _ = diversity(f, jax.random.fold_in(key, 100 + k), distinct, **kw)
            real_only, _ = diversity(r, jax.random.fold_in(key, 200 + k), distinct, **kw)
            out[f"ms_ssim_within_synthetic/{name}"] = float(synthetic)
            out[f"ms_ssim_within_real/{name}"] = float(real_only)
        if extractor is not None:
            fr, ff = extractor(r), extractor(f)
            out[f"fid/{name}"] = float(distribution.fid_from_features(fr, ff))
            subset = min(n, KID_SUBSET_SIZE)
            kid, _ = distribution.kid(fr, ff, subset, KID_SUBSETS, jax.random.fold_in(key, 300 + k))
            out[f"kid/{name}"] = float(kid)
    for metric in ("ms_ssim", "fid", "kid"):
        values = [out[f"{metric}/{m}"] for m in modalities if f"{metric}/{m}" in out]
        if values:
            out[metric] = float(np.mean(values))
    return out


def feature_frechet(
    features,
    reference: np.ndarray,
    real: np.ndarray,
    synthetic: np.ndarray,
    *,
    modalities: int,
    channels: int,
) -> dict[str, float]:
    """Fréchet distances in a feature space: real reference↔real (the yardstick) and real↔synthetic.

    Args:
      features: `(N, H, W, K·C) -> (N, F)` on min–max normalised images, e.g. the real-trained
        segmentors' bottlenecks (`synth.lesion.segment.bottleneck_features`).
      reference, real, synthetic: (N, H, W, K·C) images in [0, 1]; typically real training, real test
        and synthetic images. Each image of each modality is min–max normalised first (§9.3).

    Returns:
      `real_real` (reference↔real) and `real_synthetic` (real↔synthetic). With few images against the
      feature width the distances are biased upwards alike; compare them at the same N.
    """

    def stats(images):
        scaled = np.concatenate(list(by_modality_normalised(images, modalities, channels)), axis=-1)
        batches = [np.asarray(features(scaled[i : i + 32])) for i in range(0, len(scaled), 32)]
        return distribution.feature_statistics(np.concatenate(batches))

    real_stats = stats(real)
    return {
        # Rounding can leave a distance of identical sets a hair below 0.
        "real_real": max(0.0, float(distribution.frechet_distance(*stats(reference), *real_stats))),
        "real_synthetic": max(0.0, float(distribution.frechet_distance(*real_stats, *stats(synthetic)))),
    }


def segmentor_frechet(config, params, reference, real, synthetic) -> dict[str, float] | None:
    """`feature_frechet` in the real-trained segmentors' bottleneck features (needs no download).

    `params` are the trained segmentors' (`synth.frozen.load(config, workdir, "segmentor")`). None for a
    family whose lesion processor is not a per-modality segmentor (classifier, detector, shared encoder).
    """
    if lesion.task(config) != "segment" or config.segmentor.variant == "shared_encoder":
        return None
    features = jax.jit(segment.bottleneck_features(config, real.shape[1:3]))
    return feature_frechet(
        lambda x: features(params, x),
        reference,
        real,
        synthetic,
        modalities=len(config.data.modalities),
        channels=int(config.data.get("channels", 1)),
    )


# --------------------------------------------------------------------------------------------------
# Lesion fidelity.


# The chance reference must be another lesion, not the asked-for one again: neighbouring slices of one subject
# share their tumour, and eval batches hold consecutive slices. Batches carry no subject, so a candidate
# counts as another subject's lesion when it overlaps the asked-for one by less than this Dice.
CHANCE_MAX_OVERLAP = 0.5
CHANCE_CANDIDATES = 8  # The next rows of the batch tried, cyclically, as for stage B's label draw.


def lesion_dice_and_chance(found: jax.Array, label: jax.Array) -> dict[str, jax.Array]:
    """Whole-lesion Dice of the lesion processor's masks against the asked-for labels, and its chance level.

    The chance level scores the same masks against another lesion of the batch: the next row whose label
    has a lesion that overlaps the asked-for one by less than `CHANCE_MAX_OVERLAP`. Both are meaningful
    on the same rows, `scored`: the asked-for label has a lesion and such another lesion exists. So
    empty labels earn no credit (Dice's eps makes empty against empty 1) and the two means share one
    denominator.

    Args:
      found: (K, B, H, W) bool, what each modality's lesion processor finds (whole lesion).
      label: (B, H, W) the labels asked for (for real slices: their own).

    Returns:
      `dice` and `chance`, each (B, K) per sample and modality; `scored` (B,) the rows both mean over.
    """
    target = metrics.region_mask(label, "whole")
    b = target.shape[0]
    has = jnp.any(target, axis=(1, 2))
    shifts = range(1, min(b, CHANCE_CANDIDATES + 1))
    if not shifts:  # One row: no other lesion to compare with.
        zeros = jnp.zeros((b, found.shape[0]), jnp.float32)
        return {"dice": zeros, "chance": zeros, "scored": jnp.zeros((b,), bool)}
    candidates = jnp.stack([jnp.roll(target, -r, axis=0) for r in shifts])  # (R, B, H, W)
    overlap = jax.vmap(lambda c: metrics.binary_dice_per_image(c, target)[0])(candidates)
    usable = jnp.any(candidates, axis=(2, 3)) & (overlap < CHANCE_MAX_OVERLAP)  # (R, B)
    other = candidates[jnp.argmax(usable, axis=0), jnp.arange(b)]
    dice = jax.vmap(lambda p: metrics.binary_dice_per_image(p, target)[0])(found)
    chance = jax.vmap(lambda p: metrics.binary_dice_per_image(p, other)[0])(found)
    return {"dice": dice.T, "chance": chance.T, "scored": has & jnp.any(usable, axis=0)}


def class_accuracy_and_chance(predicted: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, K) whether each modality's classifier sees the asked-for class, and another sample's class.

    Args:
      predicted: (K, B, H, W) constant class maps (`synth.lesion.classify.predict_maps`).
      label: (B, H, W) constant class maps asked for.
    """
    said = predicted[:, :, 0, 0]
    accuracy = said == label[None, :, 0, 0]
    chance = said == jnp.roll(label, 1, axis=0)[None, :, 0, 0]
    return accuracy.T, chance.T


def filter_dice(predicted: jax.Array, label: jax.Array, *, kind: str, num_classes: int) -> jax.Array:
    """Stage C's lesion filter score: how well each sample's K predicted maps match its label.

    Args:
      predicted: (K, B, H, W) integer labels, one map per modality's lesion processor.
      label: (B, H, W) the labels the samples were synthesised from.
      kind: one of `DICE_KINDS`.
      num_classes: C, background included.

    Returns:
      (B,) the score averaged over the K modalities; a sample without a lesion in either map scores 1.
    """
    if kind not in DICE_KINDS:
        raise ValueError(f"Unknown config.dataset.dice.kind {kind!r}; choose one of {DICE_KINDS}")
    if kind == "none":
        return jnp.ones(label.shape[:1], jnp.float32)
    if kind == "class":
        return jnp.mean(predicted[:, :, 0, 0] == label[None, :, 0, 0], axis=0, dtype=jnp.float32)

    def one_modality(pred):
        if kind == "whole":
            return metrics.binary_dice_per_image(pred > 0, label > 0)[0]
        if kind == "parity":
            return jax.vmap(lambda p, t: metrics.parity_dice(p[None], t[None]))(pred, label)
        classes = jnp.arange(1, num_classes)
        p = pred[..., None] == classes
        t = label[..., None] == classes
        inter = jnp.sum(p & t, axis=(1, 2)).astype(jnp.float32)
        size = (jnp.sum(p, axis=(1, 2)) + jnp.sum(t, axis=(1, 2))).astype(jnp.float32)
        present = size > 0
        dice = jnp.where(present, 2.0 * inter / jnp.maximum(size, 1.0), 0.0)
        count = jnp.sum(present, axis=-1)
        return jnp.where(count > 0, jnp.sum(dice, axis=-1) / jnp.maximum(count, 1), 1.0)

    return jnp.mean(jax.vmap(one_modality)(predicted), axis=0)


# --------------------------------------------------------------------------------------------------
# Registration consistency.


def _pairwise_dice(maps: jax.Array) -> jax.Array:
    """(B,) mean Dice between every pair of modalities' binary maps (K, B, H, W)."""
    k = maps.shape[0]
    scores = []
    for i in range(k):
        for j in range(i + 1, k):
            inter = jnp.sum(maps[i] * maps[j], axis=(1, 2))
            total = jnp.sum(maps[i], axis=(1, 2)) + jnp.sum(maps[j], axis=(1, 2))
            scores.append(2.0 * inter / jnp.maximum(total, 1.0))
    return jnp.mean(jnp.stack(scores), axis=0) if scores else jnp.ones(maps.shape[1])


def translation_error(translate_many, x: jax.Array) -> jax.Array:
    """(B,) registration consistency through G_t: each modality against the others translated into it.

    The mean squared difference over modalities, translations and pixels, per sample.

    Args:
      translate_many: G_t with its parameters bound, `(images, one-hot targets (T, N, K)) -> (T, N, …)`
        (`synth.translator_nets.translate_many`).
      x: (K, B, H, W, C) images by modality.
    """
    translations = registration.translate_pairs(translate_many, x)
    return jnp.mean(jnp.square(translations - x[:, None]), axis=(0, 1, 3, 4, 5))


def structure_agreement(
    images: jax.Array, organ: jax.Array, params: extraction.ExtractionParams, channels: int = 1
) -> jax.Array:
    """(B,) registration consistency: mean pairwise Dice of the structure maps extracted from each modality.

    Each modality's map uses the same organ mask, so only the edges inside it are compared.
    """
    x = registration.by_modality(images, channels)  # (K, B, H, W, C)
    k, b = x.shape[:2]
    # Example-major (`registration.flat`): each example's K images side by side, its organ mask K times.
    s = extraction.structure_map_with(registration.flat(x), jnp.repeat(organ, k, axis=0), params)
    return _pairwise_dice(registration.unflat(s, (k, b)).reshape((k, b) + s.shape[1:3]))
