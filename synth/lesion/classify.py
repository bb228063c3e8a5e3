"""The lesion classifier (chest X-ray, METHOD §6.4, §8.3): stage `segmentor` when the lesion label is a class.

It plays the segmentors' roles for a class-labelled family: trained on real images in stage `segmentor`
(`config.segmentor.task = "classify"`), frozen as stage B's lesion processor, stage C's filter (is the
asked-for class what it sees?) and stage D's downstream model (accuracy on the real test split, T7).

The network is the authors' (§6.4): the patch discriminator of §4.2 with one head of `num_classes`
channels, whose spatial mean are the class scores. One network per modality (K = 1 for X-ray), stacked on
a leading axis and applied with `vmap`. Loss: softmax cross-entropy on the scores (the default: it trains
in far fewer steps), or the authors' `0.5·mse(one_hot, scores)` (`loss.kind = "mse_parity"`).

Labels arrive as the constant class maps of the one batch form (`synth.input_pipeline`), so the class is
read at pixel (0, 0).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from synth import evaluation, input_pipeline, optim, state
from synth import writer as writer_lib
from synth.lesion import base
from synth.models import sizes
from synth.models.discriminator import PatchDiscriminator

LOSS_KINDS = ("cross_entropy", "mse_parity")
GRID_ROWS = 4  # Images drawn in the evaluator's grid.

# Decoded example -> the arrays this kind consumes.
preprocess = input_pipeline.image_and_label


def make_model(config: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> PatchDiscriminator:
    """One modality's classifier, sized from the table (`synth.models.sizes`)."""
    seg = config.segmentor
    return PatchDiscriminator(
        **sizes.discriminator_kwargs(seg.model.size, image_hw),
        out_channels=config.data.num_classes,
        heads=1,
        activation=seg.model.activation,
        kernel_init=seg.model.kernel_init,
        dropout_rate=seg.model.dropout_rate,
    )


def class_of(label: jax.Array) -> jax.Array:
    """(B, H, W) constant class maps -> (B,) classes."""
    return label[:, 0, 0].astype(jnp.int32)


def class_scores(params, images, *, model, channels: int = 1, rng=None, train_mode=False) -> jax.Array:
    """(K, B, classes) scores of every modality's classifier: the spatial mean of its output map."""
    out = base.stacked_apply(model, params, images, channels, rng=rng, train_mode=train_mode)
    return jnp.mean(out, axis=(2, 3))


def predict_maps(params, images, *, model, channels: int = 1) -> jax.Array:
    """(K, B, H, W) the predicted class of each modality's image, as a constant map like the labels."""
    predicted = jnp.argmax(class_scores(params, images, model=model, channels=channels), axis=-1)
    return jnp.broadcast_to(predicted[:, :, None, None], predicted.shape + images.shape[1:3])


def classification_loss(scores: jax.Array, classes: jax.Array, *, kind: str, num_classes: int) -> jax.Array:
    """Loss of (B, classes) scores against (B,) classes (see the module docstring for the kinds)."""
    one_hot = jax.nn.one_hot(classes, num_classes)
    if kind == "cross_entropy":
        return jnp.mean(optax.softmax_cross_entropy(scores, one_hot))
    if kind == "mse_parity":
        return 0.5 * jnp.mean(jnp.square(scores - one_hot))
    raise ValueError(f"Unknown classifier loss kind {kind!r}; choose one of {LOSS_KINDS}")


def per_modality_loss(scores: jax.Array, classes: jax.Array, *, kind: str, num_classes: int) -> jax.Array:
    """(K,) `classification_loss` of every modality's scores (K, B, classes)."""
    return jax.vmap(lambda s: classification_loss(s, classes, kind=kind, num_classes=num_classes))(scores)


def init_params(rng, images, *, model, channels: int = 1):
    """K classifiers' parameters stacked on a leading axis."""
    return base.stacked_init(model, rng, images, channels)


def init_state(rng, batch, *, model, tx, channels: int = 1) -> state.TrainState:
    return state.init(init_params(rng, batch["image"], model=model, channels=channels), tx)


def train_step(train_state, batch, rng, *, model, tx, loss_kind, num_classes, channels=1):
    """One optimisation step of every modality's classifier on a batch of real images."""
    classes = class_of(batch["label"])

    def loss_fn(params):
        scores = class_scores(
            params, batch["image"], model=model, channels=channels, rng=rng, train_mode=True
        )
        per_modality = per_modality_loss(scores, classes, kind=loss_kind, num_classes=num_classes)
        return jnp.mean(per_modality), (per_modality, scores)

    (loss, (per_modality, scores)), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_state.params)
    new, norms = state.update(train_state, grads, tx)
    out = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(scores, -1) == classes[None]), **norms}
    out.update({f"loss_modality{k}": per_modality[k] for k in range(per_modality.shape[0])})
    return new, out


def _per_batch(train_state, frozen, batch, key, *, model, channels: int, num_classes: int):
    """Per image: whether each modality's class is right, and its (true, predicted) confusion entry."""
    del frozen, key
    pred = jnp.argmax(class_scores(train_state.params, batch["image"], model=model, channels=channels), -1)
    classes = class_of(batch["label"])
    values = {
        "correct": (pred == classes[None]).T.astype(jnp.float32),  # (B, K)
        "confusion": jnp.einsum(
            "bt,bp->btp",
            jax.nn.one_hot(classes, num_classes, dtype=jnp.int32),
            jax.nn.one_hot(pred[0], num_classes, dtype=jnp.int32),
        ),
    }
    return values, pred


def _finish(totals, count, *, modalities, num_classes: int) -> dict[str, float]:
    """Accuracy per modality and the first modality's recall per class."""
    scalars = evaluation.per_modality("accuracy", totals["correct"] / max(count, 1), modalities)
    confusion = totals["confusion"]
    for t in range(num_classes):
        row = confusion[t]
        scalars[f"recall_class{t}/{modalities[0]}"] = float(row[t] / max(row.sum(), 1))
    return scalars


def _shade(cls, hw, num_classes: int) -> np.ndarray:
    """A class drawn as a grey tile for the grids (0 black, the last class white)."""
    return np.full(hw, float(cls) / max(num_classes - 1, 1), np.float32)


def _grid(local, pred, *, num_classes: int):
    """One row per image: the image, then its true and predicted class as grey tiles."""
    hw = local["image"].shape[1:3]
    rows = [
        [local["image"][b, ..., 0], _shade(local["label"][b, 0, 0], hw, num_classes)]
        + [_shade(pred[0, b], hw, num_classes)]
        for b in range(min(GRID_ROWS, local["image"].shape[0]))
    ]
    return {"classified": writer_lib.image_grid(rows)} if rows else {}


def check_loss_kind(config: ml_collections.ConfigDict) -> str:
    kind = config.segmentor.loss.kind
    if kind not in LOSS_KINDS:
        raise ValueError(
            f"config.segmentor.loss.kind={kind!r} is not a classifier loss; choose one of {LOSS_KINDS}"
        )
    return kind


# The (evaluator key, report heading) of the downstream score stage D tabulates.
scores = base.constant_scores(("accuracy/mean", "accuracy"))


def stage_parts(
    config: ml_collections.ConfigDict, image_hw: tuple[int, int], channels: int
) -> base.StageParts:
    """What stage `segmentor` trains and evaluates for this kind."""
    seg, data = config.segmentor, config.data
    loss_kind = check_loss_kind(config)
    model = make_model(config, image_hw)
    tx = optim.make_optimizer(seg.optim)
    return base.StageParts(
        init_state=functools.partial(init_state, model=model, tx=tx, channels=channels),
        train_step=functools.partial(
            train_step,
            model=model,
            tx=tx,
            loss_kind=loss_kind,
            num_classes=data.num_classes,
            channels=channels,
        ),
        hooks=evaluation.Hooks(
            per_batch=functools.partial(
                _per_batch, model=model, channels=channels, num_classes=data.num_classes
            ),
            finish=functools.partial(
                _finish, modalities=tuple(data.modalities), num_classes=data.num_classes
            ),
            grid=functools.partial(_grid, num_classes=data.num_classes),
        ),
    )


def abstract_params(config: ml_collections.ConfigDict, image_shape) -> Any:
    """The shapes of the trained parameters, for loading them frozen (`synth.frozen`)."""
    return base.stacked_abstract_params(make_model(config, image_shape[:2]), config, image_shape)


def processor(config: ml_collections.ConfigDict, image_hw) -> base.LesionProcessor:
    """The frozen real-trained classifier as stage B's lesion processor (§6.4)."""
    model = make_model(config, image_hw)
    channels = base.channels_per_modality(config)
    kind = config.segmentor.loss.kind

    def loss(params, images, inputs):
        scores = class_scores(params, images, model=model, channels=channels)
        classes = class_of(inputs.label)
        return per_modality_loss(scores, classes, kind=kind, num_classes=config.data.num_classes)

    def predict(params, images):
        return predict_maps(params, images, model=model, channels=channels)

    return base.LesionProcessor(loss=loss, predict=predict, kind="classify")


def accuracy_of(predicted: jax.Array, label: jax.Array) -> jax.Array:
    """(B,) fraction of the K modalities whose predicted class is the asked-for one."""
    return jnp.mean(predicted[:, :, 0, 0] == class_of(label)[None], axis=0)
