"""Stage `segmentor`: lesion processors trained on real images (METHOD.md §6.3).

They are frozen later and score lesions in synthetic images (stage B's lesion loss, stage C's Dice filter).
Variants, by `config.segmentor.variant` (all built from the one U-Net design of `synth.models.unet`):
  n_seg           one U-Net per modality (the paper's recommendation); their parameters are stacked on a
                  leading modality axis and applied by `synth.models.stacked.map_stacked` (one `vmap`ped
                  call on GPU);
  one_seg         one shared U-Net applied to every modality;
  shared_encoder  one shared encoder (skips included) and one U-Net decoder per modality ("1 E_l + N D_l",
                  `synth.models.shared_encoder`): the encoder runs once over all modalities' images and
                  the stacked decoders are applied like n_seg's U-Nets.
Whatever the variant, `predict_logits` returns (K, B, H, W, classes): modality k's image scored by its
segmentor. The evaluator reports the standard BRATS region Dice and, for comparison with the paper's
tables, the authors' Dice and MSE on class indices (§9.4, §11.27).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from synth import input_pipeline, losses, metrics, optim, registration, sharding, train
from synth import writer as writer_lib
from synth.models import shared_encoder, sizes, stacked
from synth.models.unet import UNet

NAME = "segmentor"
VARIANTS = ("n_seg", "one_seg", "shared_encoder")
REGIONS = ("whole", "core", "enhancing")


@flax.struct.dataclass
class SegmentorState:
    """All mutable state of the stage: one pytree."""

    step: jax.Array
    # n_seg: every leaf has a leading modality axis of size K; shared_encoder: {"encoder": ..., "decoders":
    # ...} with that axis on the decoders only; one_seg: one U-Net's variables.
    params: Any
    opt_state: Any


def make_model(config: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> UNet:
    """The U-Net of one modality's segmentor, sized from the table (`synth.models.sizes`)."""
    seg = config.segmentor
    return UNet(
        **sizes.unet_kwargs(seg.model.size, image_hw),
        out_channels=config.data.num_classes,
        activation=seg.model.activation,
        kernel_init=seg.model.kernel_init,
        dropout_rate=seg.model.dropout_rate,
        out_activation="none",  # Logits: the losses apply softmax (or sigmoid for parity) themselves.
        norm_output=False,
    )


def _by_modality(images: jax.Array, channels: int) -> jax.Array:
    """(B, H, W, K·C) -> (K, B, H, W, C): the modality axis first, for vmap."""
    return registration.by_modality(images, channels)


def check_channels(config: ml_collections.ConfigDict, image: np.ndarray) -> int:
    """C, the channels per modality, after checking the dataset's images against `config.data`."""
    data = config.data
    channels = int(data.get("channels", 1))
    expected = len(data.modalities) * channels
    if image.shape[-1] != expected:
        raise ValueError(
            f"The dataset's images have {image.shape[-1]} channels but config.data.modalities lists "
            f"{len(data.modalities)} modalities of config.data.channels={channels}: {data.modalities}"
        )
    return channels


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"Unknown config.segmentor.variant {variant!r}; choose one of {VARIANTS}")
    return variant


def init_params(rng: jax.Array, images: jax.Array, *, model: UNet, variant: str, channels: int = 1) -> Any:
    """Parameters for all modalities: stacked, shared, or a shared encoder with stacked decoders.

    Args:
      rng: init key.
      images: (B, H, W, K) example batch; only its shape matters.
      model: the U-Net of one modality (`make_model`).
      variant: one of `VARIANTS`.
      channels: C, channels per modality (3 for RGB).

    Returns:
      n_seg: one U-Net's variables stacked K times; one_seg: one U-Net's variables; shared_encoder:
      `{"encoder": ..., "decoders": ...}` with the decoders stacked K times.
    """
    x = _by_modality(images, channels)
    variant = _check_variant(variant)
    if variant == "one_seg":
        return model.init(rng, x[0])
    if variant == "shared_encoder":
        return shared_encoder.init(rng, x[0], unet=model, num_members=x.shape[0])
    keys = jax.random.split(rng, x.shape[0])
    return jax.vmap(lambda k, xi: model.init(k, xi))(keys, x)


def predict_logits(
    params: Any,
    images: jax.Array,
    *,
    model: UNet,
    variant: str,
    stacking: str = "auto",
    rng=None,
    train_mode=False,
    channels: int = 1,
) -> jax.Array:
    """Logits (K, B, H, W, classes) of every modality's segmentor on that modality's images.

    Args:
      params: from `init_params` with the same `variant`.
      images: (B, H, W, K) co-registered slices, modalities in `config.data.modalities` order.
      model: the U-Net of one modality (`make_model`).
      variant: one of `VARIANTS`.
      stacking: how stacked parameters are applied (`synth.models.stacked.MODES`).
      rng: dropout key when `train_mode`.
      train_mode: enables input dropout.
      channels: C, channels per modality (3 for RGB).
    """
    x = _by_modality(images, channels)
    variant = _check_variant(variant)
    rng = rng if rng is not None else jax.random.key(0)
    if variant == "shared_encoder":
        return shared_encoder.apply(params, x, unet=model, mode=stacking, rng=rng, train=train_mode)
    keys = jax.random.split(rng, x.shape[0])

    def apply(p, xi, key):
        return model.apply(p, xi, train=train_mode, rngs={"dropout": key} if train_mode else None)

    return stacked.map_stacked(apply, params, x, keys, shared_params=variant == "one_seg", mode=stacking)


def init_state(rng, batch, *, model: UNet, variant: str, tx: optax.GradientTransformation, channels: int = 1):
    params = init_params(rng, batch["image"], model=model, variant=variant, channels=channels)
    return SegmentorState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def train_step(
    state: SegmentorState, batch, rng, *, model, variant, stacking, tx, loss_config, num_classes, channels=1
):
    """One optimisation step of every modality's segmentor on a batch of real slices."""

    def loss_fn(params):
        logits = predict_logits(
            params,
            batch["image"],
            model=model,
            variant=variant,
            stacking=stacking,
            rng=rng,
            train_mode=True,
            channels=channels,
        )
        per_modality = jax.vmap(
            lambda lg: losses.segmentation_loss(
                lg,
                batch["label"],
                kind=loss_config.kind,
                num_classes=num_classes,
                dice_weight=loss_config.dice_weight,
                class_weights=tuple(loss_config.class_weights) or None,
            )
        )(logits)
        return jnp.mean(per_modality), per_modality

    (loss, per_modality), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
        "update_norm": optax.global_norm(updates),
    }
    out.update({f"loss_modality{k}": per_modality[k] for k in range(per_modality.shape[0])})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out


# Decoded BRATS-like example -> the arrays this stage consumes.
preprocess = input_pipeline.image_and_label


def regions_for(num_classes: int) -> tuple[str, ...]:
    """BRATS's three regions for the 5 BRATS classes; otherwise only `whole` (any foreground class)."""
    return REGIONS if num_classes == 5 else ("whole",)


def _region_scores(pred, label, valid, regions=REGIONS):
    """Per-modality region Dice sums for one batch.

    Args:
      pred: (K, B, H, W) predicted labels; label: (B, H, W); valid: (B,) False on padding rows.

    Returns:
      `(dice_sum, count, inter, total)`, each (regions, K): per-image Dice summed over the images where a
      region is present in either map, their number, and the pixel intersections and size sums for a
      dataset-level Dice.
    """
    # Padding rows become empty in both maps, so the per-image Dice leaves them out.
    pred = jnp.where(valid[None, :, None, None], pred, 0)
    label = jnp.where(valid[:, None, None], label, 0)
    per_modality = jax.vmap(lambda p: metrics.brats_region_dice(p, label))(pred)
    dice_sum = jnp.stack([per_modality[r] * per_modality[f"{r}_count"] for r in regions])
    count = jnp.stack([per_modality[f"{r}_count"] for r in regions])
    inter, total = [], []
    for region in regions:
        p, t = metrics.region_mask(pred, region), metrics.region_mask(label, region)[None]
        inter.append(jnp.sum(p & t, axis=(1, 2, 3)))
        total.append(jnp.sum(p, axis=(1, 2, 3)) + jnp.sum(t, axis=(1, 2, 3)))
    return dice_sum, count, jnp.stack(inter), jnp.stack(total)


def _parity_scores(pred, label, valid):
    """Per-modality sums of the authors' per-image Dice and MSE (§9.4) over the valid images.

    Args:
      pred: (K, B, H, W) predicted labels; label: (B, H, W); valid: (B,) False on padding rows.

    Returns:
      `(dice_sum, mse_sum, count)`: (K,), (K,) and the number of valid images. Both metrics are means
      over images of per-image values, so sums and a count merge exactly across batches.
    """

    def per_image(p, t):
        # `metrics.parity_*` average over a batch axis; a batch of one gives the per-image value.
        return metrics.parity_dice(p[None], t[None]), metrics.parity_mse(p[None], t[None])

    dice, mse = jax.vmap(jax.vmap(per_image), in_axes=(0, None))(pred, label)
    weight = valid.astype(jnp.float32)
    return jnp.sum(dice * weight, axis=1), jnp.sum(mse * weight, axis=1), jnp.sum(weight)


def _batch_scores(pred, label, valid, regions=REGIONS):
    return _region_scores(pred, label, valid, regions) + _parity_scores(pred, label, valid)


def make_evaluator(config, *, model, variant, stacking, mesh, modalities):
    """Metrics of every modality's segmentor on the eval split, plus a sample grid.

    Scalars: `dice_<region>/<modality>` and `/mean` (standard BRATS region Dice, mean over the images
    with the region), `global_dice_<region>/mean` (pooled over the split), and the authors' numbers
    `parity_dice/<modality>`, `parity_mse/<modality>` and their `/mean` (§9.4: on class indices, per image,
    averaged over all images; only comparable with the paper's tables, not with the standard Dice).
    """
    data = config.data
    source = input_pipeline.open_source(data, data.eval_split)
    batch_sh = sharding.batch_sharding(mesh)

    regions = regions_for(data.num_classes)
    scores = jax.jit(functools.partial(_batch_scores, regions=regions))
    vessels = config.segmentor.get("metrics", "dice") == "vessel"

    # One forward pass per batch gives the labels and, for vessels, the FOV counts. Replicated: a few small
    # label maps and sums, and every process can then draw the grid rows.
    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def predict(params, images, label, fov, valid):
        logits = predict_logits(
            params, images, model=model, variant=variant, stacking=stacking, channels=data.get("channels", 1)
        )
        counts = None
        if vessels:
            inside = fov & valid[:, None, None]
            counts = jax.vmap(lambda lg: _vessel_counts(jax.nn.softmax(lg)[..., 1], label > 0, inside))(
                logits
            )
        return jnp.argmax(logits, axis=-1), counts

    def evaluate(state: SegmentorState, step: int):
        sums = None
        vessel_sums = None
        grid_rows = []
        batches = input_pipeline.eval_batches(
            source,
            preprocess=preprocess,
            batch_size=config.segmentor.train.batch_size,
            max_examples=data.eval_max_examples,
        )
        for local in batches:
            batch = sharding.to_global(local, batch_sh)
            fov = batch["fov"] if vessels else None
            pred, counts = predict(state.params, batch["image"], batch["label"], fov, batch["valid"])
            out = jax.device_get(scores(pred, batch["label"], batch["valid"]))
            sums = out if sums is None else [a + b for a, b in zip(sums, out)]
            if vessels:
                counts = jax.device_get(counts)
                vessel_sums = counts if vessel_sums is None else jax.tree.map(np.add, vessel_sums, counts)
            if not grid_rows:
                grid_rows = _grid_rows(local, np.asarray(jax.device_get(pred)), data.num_classes)
        dice_sum, count, inter, total, parity_dice, parity_mse, parity_count = (
            np.asarray(x, np.float64) for x in sums
        )
        # Standard: mean per-image Dice over images with the region; global: 2·Σ|P∩T| / Σ(|P|+|T|).
        dice = dice_sum / np.maximum(count, 1)
        global_dice = 2.0 * inter / np.maximum(total, 1)
        scalars = {}
        for r, region in enumerate(regions):
            for k, name in enumerate(modalities):
                scalars[f"dice_{region}/{name}"] = dice[r, k]
            scalars[f"dice_{region}/mean"] = dice[r].mean()
            scalars[f"global_dice_{region}/mean"] = global_dice[r].mean()
        parity = {
            "parity_dice": parity_dice / max(parity_count, 1),
            "parity_mse": parity_mse / max(parity_count, 1),
        }
        for metric, values in parity.items():
            for k, name in enumerate(modalities):
                scalars[f"{metric}/{name}"] = values[k]
            scalars[f"{metric}/mean"] = values.mean()
        if vessels:
            for metric, values in _vessel_metrics(vessel_sums).items():
                for k, name in enumerate(modalities):
                    scalars[f"{metric}/{name}"] = values[k]
                scalars[f"{metric}/mean"] = float(np.mean(values))
        images = {"segmentation": writer_lib.image_grid(grid_rows)} if grid_rows else {}
        return scalars, images

    return evaluate


# Probability bins of the vessel AUC's histograms: pooled over a whole split on device, so any number of
# images and processes merge exactly; pairs within one bin count one half, as ties do in the exact AUC.
VESSEL_AUC_BINS = 1000


def _vessel_counts(probability, vessel, inside):
    """Confusion counts at 0.5 and per-bin histograms of vessel / background probabilities in the FOV."""
    predicted = probability >= 0.5
    bins = jnp.clip((probability * VESSEL_AUC_BINS).astype(jnp.int32), 0, VESSEL_AUC_BINS - 1).reshape(-1)
    histogram = lambda w: jnp.zeros(VESSEL_AUC_BINS, jnp.float32).at[bins].add(w.reshape(-1))  # noqa: E731
    return {
        "tp": jnp.sum(predicted & vessel & inside),
        "fp": jnp.sum(predicted & ~vessel & inside),
        "fn": jnp.sum(~predicted & vessel & inside),
        "tn": jnp.sum(~predicted & ~vessel & inside),
        "vessel_hist": histogram((vessel & inside).astype(jnp.float32)),
        "background_hist": histogram((~vessel & inside).astype(jnp.float32)),
    }


def _vessel_metrics(c) -> dict[str, np.ndarray]:
    """Sensitivity, accuracy and AUC (T6) per modality from summed `_vessel_counts`, inside the FOV only."""
    tp, fp, fn, tn = (np.asarray(c[k], np.float64) for k in ("tp", "fp", "fn", "tn"))
    pos, neg = np.asarray(c["vessel_hist"], np.float64), np.asarray(c["background_hist"], np.float64)
    above = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1] - pos  # Vessel pixels in higher bins.
    pairs = pos.sum(1) * neg.sum(1)
    auc = np.sum(neg * (above + 0.5 * pos), axis=1) / np.maximum(pairs, 1)
    nan = lambda x, ok: np.where(ok, x, np.nan)  # noqa: E731
    return {
        "sensitivity": nan(tp / np.maximum(tp + fn, 1), tp + fn > 0),
        "accuracy": (tp + tn) / np.maximum(tp + fp + fn + tn, 1),
        "auc": nan(auc, pairs > 0),
    }


def _grid_rows(local, pred, num_classes, max_rows=4):
    """One row per sample: each modality, the true label, then each modality's prediction."""
    # Only process 0's rows are drawn; on one process these are the first examples of the split.
    rows = []
    n = min(max_rows, local["image"].shape[0])
    for b in range(n):
        image = local["image"][b]
        row = [image[..., k] for k in range(image.shape[-1])]
        row.append(writer_lib.label_colours(local["label"][b], num_classes))
        row += [writer_lib.label_colours(pred[k, b], num_classes) for k in range(pred.shape[0])]
        rows.append(row)
    return rows


TASKS = ("segment", "classify", "detect")


def task(config: ml_collections.ConfigDict) -> str:
    """`config.segmentor.task`: "segment", "classify" (one class per image, X-ray) or "detect" (Tianchi)."""
    name = config.segmentor.get("task", "segment")
    if name not in TASKS:
        raise ValueError(f"Unknown config.segmentor.task {name!r}; choose one of {TASKS}")
    return name


def scores(config: ml_collections.ConfigDict) -> tuple[tuple[str, str], ...]:
    """The (evaluator key, report heading) of the downstream scores stage D tabulates, main one first."""
    if task(config) == "classify":
        return (("accuracy/mean", "accuracy"),)
    if task(config) == "detect":
        return (("map/mean", "mAP@0.5"),)
    if config.segmentor.get("metrics", "dice") == "vessel":
        return (
            ("sensitivity/mean", "sensitivity"),
            ("accuracy/mean", "accuracy"),
            ("auc/mean", "AUC"),
            ("dice_whole/mean", "Dice"),
        )
    out = [(f"dice_{r}/mean", f"Dice {r}") for r in regions_for(config.data.num_classes)]
    return tuple(out) + (("parity_dice/mean", "parity Dice"), ("parity_mse/mean", "parity MSE"))


def build(config: ml_collections.ConfigDict, mesh=None) -> train.StageSpec:
    """The stage's spec for the shared loop (the classifier's or the detector's for those tasks)."""
    if task(config) == "classify":
        from synth.stages import classifier

        return classifier.build(config, mesh)
    if task(config) == "detect":
        from synth.stages import detector

        return detector.build(config, mesh)
    seg = config.segmentor
    source = input_pipeline.open_source(config.data, config.data.train_split)
    first = preprocess(source[0])
    image_hw = first["image"].shape[:2]
    channels = check_channels(config, first["image"])
    model = make_model(config, image_hw)
    tx = optim.make_optimizer(seg.optim)
    _check_variant(seg.variant)  # A mistyped variant fails here, before anything compiles.
    mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    return train.StageSpec(
        name=NAME,
        train=seg.train,
        source=source,
        preprocess=preprocess,
        init_state=functools.partial(init_state, model=model, variant=seg.variant, tx=tx, channels=channels),
        train_step=functools.partial(
            train_step,
            model=model,
            variant=seg.variant,
            stacking=seg.stacking,
            tx=tx,
            loss_config=seg.loss,
            num_classes=config.data.num_classes,
            channels=channels,
        ),
        evaluate=make_evaluator(
            config,
            model=model,
            variant=seg.variant,
            stacking=seg.stacking,
            mesh=mesh,
            modalities=config.data.modalities,
        ),
    )


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at=None):
    """Trains the segmentors in `workdir/segmentor` unless already complete."""
    return train.run_unless_complete(NAME, build, config, workdir, stop_at=stop_at)


def load_state(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> SegmentorState:
    """The latest trained segmentor state of a run, for stages that use the frozen segmentors."""
    return train.load_trained_state(build(config), config, workdir)
