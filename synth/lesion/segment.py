"""Lesion segmentors (METHOD §6.3): stage `segmentor` with `config.segmentor.task = "segment"`.

Trained on real images, then frozen: they score lesions in synthetic images (stage B's lesion loss, stage
C's Dice filter) and are stage D's downstream model. Variants, by `config.segmentor.variant` (all built
from the one U-Net design of `synth.models.unet`):
  n_seg           one U-Net per modality (the paper's recommendation); their parameters are stacked on a
                  leading modality axis and applied by `synth.models.stacked.map_stacked` (one `vmap`ped
                  call on GPU);
  one_seg         one shared U-Net applied to every modality;
  shared_encoder  one shared encoder (skips included) and one U-Net decoder per modality ("1 E_l + N D_l",
                  `synth.models.shared_encoder`): the encoder runs once over all modalities' images and
                  the stacked decoders are applied like n_seg's U-Nets.
Whatever the variant, `predict_logits` returns (K, B, H, W, classes): modality k's image scored by its
segmentor. The evaluator reports the standard BRATS region Dice and, for comparison with the paper's
tables, the authors' Dice and MSE on class indices (§9.4, §11.27); a vessel segmentor
(`config.segmentor.metrics = "vessel"`, DRIVE) also sensitivity, accuracy and AUC inside the field of view.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import configlib, evaluation, input_pipeline, losses, metrics, optim, registration, state
from synth import writer as writer_lib
from synth.lesion import base
from synth.models import shared_encoder, sizes, stacked
from synth.models.unet import UNet, configured_remat

VARIANTS = ("n_seg", "one_seg", "shared_encoder")
REGIONS = ("whole", "core", "enhancing")
# Probability bins of the vessel AUC's histograms: pooled over a whole split, so any number of images and
# processes merge exactly; pairs within one bin count one half, as ties do in the exact AUC.
VESSEL_AUC_BINS = 1000

# Decoded example -> the arrays this kind consumes.
preprocess = input_pipeline.image_and_label


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
        remat=configured_remat(seg.model),
    )


def check_variant(variant: str) -> str:
    return configlib.check_choice("segmentor.variant", variant, VARIANTS)


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
    x = registration.by_modality(images, channels)
    variant = check_variant(variant)
    if variant == "one_seg":
        return model.init(rng, x[0])
    if variant == "shared_encoder":
        return shared_encoder.init(rng, x[0], unet=model, num_members=x.shape[0])
    return base.stacked_init(model, rng, images, channels)


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
    x = registration.by_modality(images, channels)
    variant = check_variant(variant)
    rng = rng if rng is not None else jax.random.key(0)
    if variant == "shared_encoder":
        return shared_encoder.apply(params, x, unet=model, mode=stacking, rng=rng, train=train_mode)
    keys = jax.random.split(rng, x.shape[0])

    def apply(p, xi, key):
        return model.apply(p, xi, train=train_mode, rngs={"dropout": key} if train_mode else None)

    return stacked.map_stacked(apply, params, x, keys, shared_params=variant == "one_seg", mode=stacking)


def per_modality_loss(logits: jax.Array, label: jax.Array, loss_config, num_classes: int) -> jax.Array:
    """(K,) the configured segmentation loss of every modality's logits (K, B, H, W, classes)."""
    return jax.vmap(
        lambda lg: losses.segmentation_loss(
            lg,
            label,
            kind=loss_config.kind,
            num_classes=num_classes,
            dice_weight=loss_config.dice_weight,
            class_weights=tuple(loss_config.class_weights) or None,
        )
    )(logits)


def init_state(rng, batch, *, model: UNet, variant: str, tx, channels: int = 1) -> state.TrainState:
    params = init_params(rng, batch["image"], model=model, variant=variant, channels=channels)
    return state.init(params, tx)


def train_step(
    train_state: state.TrainState,
    batch,
    rng,
    *,
    model,
    variant,
    stacking,
    tx,
    loss_config,
    num_classes,
    channels=1,
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
        per_modality = per_modality_loss(logits, batch["label"], loss_config, num_classes)
        return jnp.mean(per_modality), per_modality

    (loss, per_modality), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_state.params)
    new, norms = state.update(train_state, grads, tx)
    out = {"loss": loss, **norms}
    out.update({f"loss_modality{k}": per_modality[k] for k in range(per_modality.shape[0])})
    return new, out


def regions_for(num_classes: int) -> tuple[str, ...]:
    """BRATS's three regions for the 5 BRATS classes; otherwise only `whole` (any foreground class)."""
    return REGIONS if num_classes == 5 else ("whole",)


def parity_per_image(pred: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The authors' per-image Dice and MSE (§9.4) of predictions (K, B, H, W) against labels (B, H, W).

    Returns:
      `(dice, mse)`, each (B, K). Both metrics are means over images of these, so sums over the
      evaluated images and their count merge exactly across batches.
    """

    def one(p, t):
        # `metrics.parity_*` average over a batch axis; a batch of one gives the per-image value.
        return metrics.parity_dice(p[None], t[None]), metrics.parity_mse(p[None], t[None])

    dice, mse = jax.vmap(jax.vmap(one), in_axes=(0, None))(pred, label)
    return dice.T, mse.T


def vessel_counts(probability, vessel, inside):
    """Confusion counts at 0.5 and per-bin histograms of vessel / background probabilities in the FOV.

    Sums over every pixel given (one image or a batch), so counts of any set of images add up.
    """
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


def vessel_metrics(c) -> dict[str, np.ndarray]:
    """Sensitivity, accuracy and AUC (T6) per modality from summed `vessel_counts`, inside the FOV only."""
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


def _per_batch(train_state, frozen, batch, key, *, logits_fn, regions, vessels: bool):
    """Per-image scores of one evaluation batch (the masked sums are the loop's)."""
    del frozen, key
    logits = logits_fn(train_state.params, batch["image"])
    pred, label = jnp.argmax(logits, axis=-1), batch["label"]
    values = {}
    for region in regions:
        p, t = metrics.region_mask(pred, region), metrics.region_mask(label, region)[None]
        dice, present = jax.vmap(lambda q, t=t, region=region: metrics.binary_dice_per_image(q, t[0]))(p)
        values[f"dice_{region}"] = (dice * present).T  # (B, K)
        values[f"dice_{region}/weight"] = present.T.astype(jnp.float32)
        values[f"inter_{region}"] = jnp.sum(p & t, axis=(2, 3)).T
        values[f"total_{region}"] = (jnp.sum(p, axis=(2, 3)) + jnp.sum(t, axis=(2, 3))).T
    values["parity_dice"], values["parity_mse"] = parity_per_image(pred, label)
    if vessels:
        probability = jax.nn.softmax(logits)[..., 1]  # (K, B, H, W)
        per_image = jax.vmap(jax.vmap(vessel_counts, in_axes=(0, 0, 0)), in_axes=(0, None, None))
        counts = per_image(probability, label > 0, batch["fov"])
        values.update({f"vessel/{k}": jnp.moveaxis(v, 0, 1) for k, v in counts.items()})
    return values, pred


def _finish(totals, count, *, regions, modalities, vessels: bool) -> dict[str, float]:
    """Standard region Dice (mean over images with the region, and pooled), parity metrics, vessels."""
    scalars = {}
    for region in regions:
        # Standard: mean per-image Dice over images with the region; global: 2·Σ|P∩T| / Σ(|P|+|T|).
        dice = totals[f"dice_{region}"] / np.maximum(totals[f"dice_{region}/weight"], 1)
        pooled = 2.0 * totals[f"inter_{region}"] / np.maximum(totals[f"total_{region}"], 1)
        scalars.update(evaluation.per_modality(f"dice_{region}", dice, modalities))
        scalars[f"global_dice_{region}/mean"] = float(pooled.mean())
    for metric in ("parity_dice", "parity_mse"):
        scalars.update(evaluation.per_modality(metric, totals[metric] / max(count, 1), modalities))
    if vessels:
        counts = {k.split("/", 1)[1]: v for k, v in totals.items() if k.startswith("vessel/")}
        for metric, values in vessel_metrics(counts).items():
            scalars.update(evaluation.per_modality(metric, values, modalities))
    return scalars


def _grid(local, pred, *, num_classes: int, max_rows: int = 4):
    """One row per sample: each modality, the true label, then each modality's prediction."""
    # Only process 0's rows are drawn; on one process these are the first examples of the split.
    rows = []
    for b in range(min(max_rows, local["image"].shape[0])):
        image = local["image"][b]
        row = [image[..., k] for k in range(image.shape[-1])]
        row.append(writer_lib.label_colours(local["label"][b], num_classes))
        row += [writer_lib.label_colours(pred[k, b], num_classes) for k in range(pred.shape[0])]
        rows.append(row)
    return {"segmentation": writer_lib.image_grid(rows)} if rows else {}


def hooks(config: ml_collections.ConfigDict, *, model: UNet) -> evaluation.Hooks:
    """The evaluator's parts (see `_finish`'s scalars), for `synth.evaluation.make_evaluator`."""
    seg, data = config.segmentor, config.data
    vessels = seg.get("metrics", "dice") == "vessel"
    regions = regions_for(data.num_classes)
    logits_fn = functools.partial(
        predict_logits,
        model=model,
        variant=seg.variant,
        stacking=seg.stacking,
        channels=base.channels_per_modality(config),
    )
    return evaluation.Hooks(
        per_batch=functools.partial(_per_batch, logits_fn=logits_fn, regions=regions, vessels=vessels),
        finish=functools.partial(
            _finish, regions=regions, modalities=tuple(data.modalities), vessels=vessels
        ),
        grid=functools.partial(_grid, num_classes=data.num_classes),
    )


def scores(config: ml_collections.ConfigDict) -> tuple[tuple[str, str], ...]:
    """The (evaluator key, report heading) of the downstream scores stage D tabulates, main one first."""
    if config.segmentor.get("metrics", "dice") == "vessel":
        return (
            ("sensitivity/mean", "sensitivity"),
            ("accuracy/mean", "accuracy"),
            ("auc/mean", "AUC"),
            ("dice_whole/mean", "Dice"),
        )
    out = [(f"dice_{r}/mean", f"Dice {r}") for r in regions_for(config.data.num_classes)]
    return tuple(out) + (("parity_dice/mean", "parity Dice"), ("parity_mse/mean", "parity MSE"))


def stage_parts(
    config: ml_collections.ConfigDict, image_hw: tuple[int, int], channels: int
) -> base.StageParts:
    """What stage `segmentor` trains and evaluates for this kind."""
    seg = config.segmentor
    check_variant(seg.variant)  # A mistyped variant fails here, before anything compiles.
    model = make_model(config, image_hw)
    tx = optim.make_optimizer(seg.optim)
    return base.StageParts(
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
        hooks=hooks(config, model=model),
    )


def abstract_params(config: ml_collections.ConfigDict, image_shape) -> Any:
    """The shapes of the trained parameters, for loading them frozen (`synth.frozen`)."""
    model = make_model(config, image_shape[:2])
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    init = functools.partial(
        init_params,
        model=model,
        variant=config.segmentor.variant,
        channels=base.channels_per_modality(config),
    )
    return jax.eval_shape(init, jax.random.key(0), images)


def bottleneck_features(config: ml_collections.ConfigDict, image_hw) -> Any:
    """`features(params, images) -> (B, K·F)`: each modality's segmentor bottleneck, averaged over space.

    The real-trained segmentors are the feature extractor of a Fréchet distance that needs no download
    (`synth.scoring.feature_frechet`): they know what the data's anatomy and lesions look like. The K
    modalities' features sit side by side, so alike modalities or a wrong contrast both move the
    distance. Needs one U-Net per modality or a shared one (`n_seg`, `one_seg`); images (B, H, W, K·C).
    """
    seg = config.segmentor
    variant = check_variant(seg.variant)
    if variant == "shared_encoder":
        raise ValueError(
            "Segmentor features need one U-Net per modality or a shared one (config.segmentor.variant "
            f"n_seg or one_seg), not {variant!r}."
        )
    model = make_model(config, image_hw)
    channels = base.channels_per_modality(config)

    def one(p, xi):
        _, inter = model.apply(p, xi, mutable=["intermediates"])
        return jnp.mean(inter["intermediates"]["bottleneck"][0], axis=(1, 2))

    def features(params, images):
        x = registration.by_modality(images, channels)
        out = stacked.map_stacked(one, params, x, shared_params=variant == "one_seg", mode=seg.stacking)
        return jnp.concatenate(list(out), axis=-1)

    return features


def processor(config: ml_collections.ConfigDict, image_hw) -> base.LesionProcessor:
    """The real-trained segmentors (§6.3) as stage B's lesion processor, with stage B's lesion loss."""
    seg = config.segmentor
    logits_fn = functools.partial(
        predict_logits,
        model=make_model(config, image_hw),
        variant=seg.variant,
        stacking=seg.stacking,
        channels=base.channels_per_modality(config),
    )
    lesion = config.synthesis.loss.lesion
    num_classes = config.data.num_classes

    def loss(params, images, inputs):
        return per_modality_loss(logits_fn(params, images), inputs.label, lesion, num_classes)

    def predict(params, images):
        return jnp.argmax(logits_fn(params, images), axis=-1)

    return base.LesionProcessor(loss=loss, predict=predict, kind="segment")
