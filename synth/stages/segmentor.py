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

from synth import input_pipeline, losses, metrics, optim, sharding, train
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


def _by_modality(images: jax.Array) -> jax.Array:
    """(B, H, W, K) -> (K, B, H, W, 1): the modality axis first, for vmap."""
    return jnp.moveaxis(images, -1, 0)[..., None]


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"Unknown config.segmentor.variant {variant!r}; choose one of {VARIANTS}")
    return variant


def init_params(rng: jax.Array, images: jax.Array, *, model: UNet, variant: str) -> Any:
    """Parameters for all modalities: stacked, shared, or a shared encoder with stacked decoders.

    Args:
      rng: init key.
      images: (B, H, W, K) example batch; only its shape matters.
      model: the U-Net of one modality (`make_model`).
      variant: one of `VARIANTS`.

    Returns:
      n_seg: one U-Net's variables stacked K times; one_seg: one U-Net's variables; shared_encoder:
      `{"encoder": ..., "decoders": ...}` with the decoders stacked K times.
    """
    x = _by_modality(images)
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
    """
    x = _by_modality(images)
    variant = _check_variant(variant)
    rng = rng if rng is not None else jax.random.key(0)
    if variant == "shared_encoder":
        return shared_encoder.apply(params, x, unet=model, mode=stacking, rng=rng, train=train_mode)
    keys = jax.random.split(rng, x.shape[0])

    def apply(p, xi, key):
        return model.apply(p, xi, train=train_mode, rngs={"dropout": key} if train_mode else None)

    return stacked.map_stacked(apply, params, x, keys, shared_params=variant == "one_seg", mode=stacking)


def init_state(rng, batch, *, model: UNet, variant: str, tx: optax.GradientTransformation):
    params = init_params(rng, batch["image"], model=model, variant=variant)
    return SegmentorState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def train_step(state: SegmentorState, batch, rng, *, model, variant, stacking, tx, loss_config, num_classes):
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


def _region_scores(pred, label, valid):
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
    dice_sum = jnp.stack([per_modality[r] * per_modality[f"{r}_count"] for r in REGIONS])
    count = jnp.stack([per_modality[f"{r}_count"] for r in REGIONS])
    inter, total = [], []
    for region in REGIONS:
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


def _batch_scores(pred, label, valid):
    return _region_scores(pred, label, valid) + _parity_scores(pred, label, valid)


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

    # Predictions replicated: a few small label maps, and every process can then draw the grid rows.
    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def predict(params, images):
        logits = predict_logits(params, images, model=model, variant=variant, stacking=stacking)
        return jnp.argmax(logits, axis=-1)

    scores = jax.jit(_batch_scores)

    def evaluate(state: SegmentorState, step: int):
        sums = None
        grid_rows = []
        batches = input_pipeline.eval_batches(
            source,
            preprocess=preprocess,
            batch_size=config.segmentor.train.batch_size,
            max_examples=data.eval_max_examples,
        )
        for local in batches:
            batch = sharding.to_global(local, batch_sh)
            pred = predict(state.params, batch["image"])
            out = jax.device_get(scores(pred, batch["label"], batch["valid"]))
            sums = out if sums is None else [a + b for a, b in zip(sums, out)]
            if not grid_rows:
                grid_rows = _grid_rows(local, np.asarray(jax.device_get(pred)), data.num_classes)
        dice_sum, count, inter, total, parity_dice, parity_mse, parity_count = (
            np.asarray(x, np.float64) for x in sums
        )
        # Standard: mean per-image Dice over images with the region; global: 2·Σ|P∩T| / Σ(|P|+|T|).
        dice = dice_sum / np.maximum(count, 1)
        global_dice = 2.0 * inter / np.maximum(total, 1)
        scalars = {}
        for r, region in enumerate(REGIONS):
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
        images = {"segmentation": writer_lib.image_grid(grid_rows)} if grid_rows else {}
        return scalars, images

    return evaluate


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


def build(config: ml_collections.ConfigDict, mesh=None) -> train.StageSpec:
    """The stage's spec for the shared loop."""
    seg = config.segmentor
    source = input_pipeline.open_source(config.data, config.data.train_split)
    first = preprocess(source[0])
    image_hw = first["image"].shape[:2]
    if first["image"].shape[-1] != len(config.data.modalities):
        raise ValueError(
            f"The dataset has {first['image'].shape[-1]} modalities but config.data.modalities "
            f"lists {len(config.data.modalities)}: {config.data.modalities}"
        )
    model = make_model(config, image_hw)
    tx = optim.make_optimizer(seg.optim)
    _check_variant(seg.variant)  # A mistyped variant fails here, before anything compiles.
    mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    return train.StageSpec(
        name=NAME,
        train=seg.train,
        source=source,
        preprocess=preprocess,
        init_state=functools.partial(init_state, model=model, variant=seg.variant, tx=tx),
        train_step=functools.partial(
            train_step,
            model=model,
            variant=seg.variant,
            stacking=seg.stacking,
            tx=tx,
            loss_config=seg.loss,
            num_classes=config.data.num_classes,
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
