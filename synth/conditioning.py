"""What stage B's generator is conditioned on (METHOD §3.5-3.7, §6.1): structure map, organ, lesion label.

Shared by stage B's training and evaluation, the comparison of variants and generation (stage C and the
notebooks), so every consumer feeds G the same way:

  1. a structure map s and organ mask come from the real images (the authors' code) or, after
     pre-training, from the frozen stage-A generator (`structure_source="stage_a"`, the paper);
  2. a lesion label l is drawn from the training pool (the other slices of the shuffled batch) subject to
     the placement check of §3.7 (`draw_labels`); during pre-training the slice's own label is used,
     since the target is the real image. After pre-training, `paired_fraction` of each batch's rows
     (`paired_rows`) stay paired: their own real structure map and label, so the real slice is their
     target and a reconstruction term keeps anchoring G to the data (pix2pix's L1 beside the GAN loss);
  3. G's input (`generator_input`): s' = s + U(0.5, 0.6) inside the organ off the edges (§3.5), fused
     with l (§3.6); or the baselines' noise or inverted map (§9.1).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from synth import fusion, structure_nets
from synth.models import vae

# config.synthesis.g_input: what G is fed (§9.1-9.2). "structure": the noise-fused structure map with the
# lesion label (the method); "noise": N(0, 1) of the image's size (BaseGAN, ablation A); "inverse_structure":
# the binary inverted map 1 − s without noise (SkrGAN*).
G_INPUTS = ("structure", "noise", "inverse_structure")
# At most this many pool labels are tried per sample and step (the batch's other slices and their mirrors).
MAX_LABEL_CANDIDATES = 16


class Inputs(NamedTuple):
    """One step's generator inputs and targets."""

    structure: jax.Array  # (B, H, W, 1) the structure map s (before noise).
    organ: jax.Array  # (B, H, W, 1), 1 = organ.
    label: jax.Array  # (B, H, W) the lesion label G is asked for.
    g_input: jax.Array  # (B, H, W, C_in)
    # The drawn label's boxes (B, M, 4) normalised corners and classes (B, M), 0 = padding, for a
    # detector lesion processor; None when the batch has no boxes.
    boxes: jax.Array | None = None
    box_classes: jax.Array | None = None
    # (B,) rows conditioned on their own real structure map and label: the real slice is their target.
    paired: jax.Array | None = None
    # (B,) whether the drawn label fitted the organ (paired rows: their own label, always True).
    fitted: jax.Array | None = None


def check_paired_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"config.synthesis.paired_fraction must be in [0, 1], got {fraction}.")


def paired_rows(batch_size: int, fraction: float, pretraining) -> jax.Array:
    """(B,) bool: every row while pre-training, else ⌊B·fraction⌋ rows spread evenly over the batch.

    Spread, not the first rows, so that every data-parallel shard of the batch holds some of each kind.
    """
    check_paired_fraction(fraction)
    rows = jnp.arange(batch_size)
    spread = jnp.floor((rows + 1) * fraction) > jnp.floor(rows * fraction)
    return jnp.logical_or(spread, pretraining)


def draw_labels(
    labels: jax.Array, organ: jax.Array, *, rule: str, mirror: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Algorithm 4 (§3.7) on device: for each sample, the first label of the other slices that fits.

    The batch is a uniform shuffle of the training set, so its other slices' labels are uniform draws from
    the training pool. Candidates are tried in a fixed order: the next slice, its mirror image (with
    `mirror`; left–right flips are in stage C's label pool too), the slice after, …, at most
    `MAX_LABEL_CANDIDATES` in all, so a small organ still gets a lesion that fits more often than not.

    Args:
      labels: (B, H, W) the batch's own labels.
      organ: (B, H, W, 1) the organ masks the labels must fit.
      rule: "code" or "paper" (see `fusion.label_fits`).
      mirror: also try each slice's label mirrored (off when something else follows the label: boxes).

    Returns:
      `(label, fitted, source)`: (B, H, W) drawn labels, (B,) whether one fitted (training reports the
      rows that did not as `label_fallback`), and (B,) the batch row each label came from (-1 for the
      empty fallback), so what belongs to a label (its boxes) can follow it. When none fits, the code rule
      falls back to the empty label (no lesion, which always fits); the paper rule keeps the last draw,
      as the authors' generation script does.
    """
    b = labels.shape[0]
    versions = 2 if mirror else 1
    shifts = range(1, min(b, MAX_LABEL_CANDIDATES // versions + 1)) if b > 1 else range(1)
    rolled = [jnp.roll(labels, -r, axis=0) for r in shifts]
    candidates = jnp.stack(
        [v for c in rolled for v in ((c, jnp.flip(c, axis=2)) if mirror else (c,))]
    )  # (R·versions, B, H, W)
    fits = jax.vmap(lambda c: fusion.label_fits(c, organ, rule=rule))(candidates)  # (R·versions, B)
    first = jnp.argmax(fits, axis=0)
    fitted = jnp.any(fits, axis=0)
    chosen = candidates[first, jnp.arange(b)]
    fallback = jnp.zeros_like(labels) if rule == "code" else candidates[-1]
    rows = jnp.arange(b)
    shift = jnp.repeat(jnp.asarray(list(shifts)), versions)
    source = jnp.where(fitted, (rows + shift[first]) % b, -1 if rule == "code" else (rows + shift[-1]) % b)
    return jnp.where(fitted[:, None, None], chosen, fallback), fitted, source


def generator_input(key, s, organ, label, *, config) -> jax.Array:
    """G's input (`config.synthesis.g_input`, `G_INPUTS`).

    The method's is the noise-fused structure map s', fused with the lesion label as configured (§3.5,
    §3.6): (B, H, W, C_in). BaseGAN's is N(0, 1) noise of the image's size, one draw per modality when the
    modalities have separate models: (K, B, H, W, 1). SkrGAN*'s is the inverted binary map 1 − s.
    """
    sy = config.synthesis
    if sy.g_input == "noise":
        k = len(config.data.modalities) if sy.separate_models else 1
        noise = jax.random.normal(key, (k,) + s.shape, s.dtype)
        return noise if sy.separate_models else noise[0]
    if sy.g_input == "inverse_structure":
        return 1.0 - (s > 0.5).astype(s.dtype)
    noisy = fusion.fuse_noise(key, s, organ, low=sy.noise[0], high=sy.noise[1])
    return fusion.fuse_label(noisy, label, mode=sy.label_fusion, num_classes=config.data.num_classes)


def make_inputs(
    batch, rng, frozen: dict[str, Any], *, models, config, pretraining, paired_fraction: float = 0.0
) -> Inputs:
    """Structure maps, masks and lesion labels for a step (see the module docstring, steps 1-3).

    Args:
      batch: real slices: `image`, `label` (and a detection family's `boxes`, `box_classes`).
      rng: the step's key for the label-independent draws (noise, stage A's codes).
      frozen: the frozen networks' parameters (`structure`: stage A's G side, when `models.structure`).
      models: stage B's networks (`synth.synthesis_nets.Models`); only `models.structure` is read.
      config: the config (`config.synthesis`, `config.structure`).
      pretraining: a traced bool: the slice's own structure and label (§6.1.4).
      paired_fraction: rows that keep their own structure and label after pre-training (`paired_rows`);
        training passes `config.synthesis.paired_fraction`, evaluation and generation 0.
    """
    sy = config.synthesis
    own = batch["label"]
    s, organ = structure_nets.real_structures(batch, **structure_nets.extract_kwargs(config))
    noise_key, structure_key = jax.random.split(rng)
    paired = paired_rows(own.shape[0], paired_fraction, pretraining)
    if models.structure is not None:
        code = vae.code_shape(s.shape[1:3], models.structure.encoder.code_channels)
        maps, masks, _ = structure_nets.generate_maps(
            frozen["structure"], structure_key, s.shape[0], models=models.structure, code_shape=code
        )
        use_real = paired[:, None, None, None]  # Paired rows need the real (structure, image); else s_g.
        s = jnp.where(use_real, s, maps[..., None].astype(s.dtype))
        organ = jnp.where(use_real, organ, masks[..., None].astype(organ.dtype))
    drawn, fitted, source = draw_labels(own, organ, rule=sy.label_rule, mirror="boxes" not in batch)
    label = jnp.where(paired[:, None, None], own, drawn)
    boxes = box_classes = None
    if "boxes" in batch:  # The boxes follow the label (none for the empty fallback).
        rows = jnp.where(paired, jnp.arange(own.shape[0]), source)
        keep = (rows >= 0)[:, None]
        boxes = jnp.where(keep[..., None], batch["boxes"][jnp.maximum(rows, 0)], 0.0)
        box_classes = jnp.where(keep, batch["box_classes"][jnp.maximum(rows, 0)], 0)
    g_input = generator_input(noise_key, s, organ, label, config=config)
    return Inputs(s, organ, label, g_input, boxes, box_classes, paired, fitted | paired)
