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

from synth import input_pipeline, optim, registration, sharding, train
from synth import writer as writer_lib
from synth.models import sizes
from synth.models.discriminator import PatchDiscriminator

LOSS_KINDS = ("cross_entropy", "mse_parity")


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
    x = registration.by_modality(images, channels)
    keys = jax.random.split(rng if rng is not None else jax.random.key(0), x.shape[0])

    def one(p, xi, key):
        out = model.apply(p, xi, train=train_mode, rngs={"dropout": key} if train_mode else None)
        return jnp.mean(out, axis=(1, 2))

    return jax.vmap(one)(params, x, keys)


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


def init_state(rng, batch, *, model, tx, channels: int = 1):
    from synth.stages.segmentor import SegmentorState

    x = registration.by_modality(batch["image"], channels)
    keys = jax.random.split(rng, x.shape[0])
    params = jax.vmap(lambda key, xi: model.init(key, xi))(keys, x)
    return SegmentorState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def train_step(state, batch, rng, *, model, tx, loss_kind, num_classes, channels=1):
    """One optimisation step of every modality's classifier on a batch of real images."""
    classes = class_of(batch["label"])

    def loss_fn(params):
        scores = class_scores(
            params, batch["image"], model=model, channels=channels, rng=rng, train_mode=True
        )
        per_modality = jax.vmap(
            lambda s: classification_loss(s, classes, kind=loss_kind, num_classes=num_classes)
        )(scores)
        return jnp.mean(per_modality), (per_modality, scores)

    (loss, (per_modality, scores)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(scores, -1) == classes[None]),
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
    }
    out.update({f"loss_modality{k}": per_modality[k] for k in range(per_modality.shape[0])})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out


def make_evaluator(config, *, model, mesh, channels: int):
    """Accuracy and confusion matrix of every modality's classifier on the eval split, plus a grid."""
    data = config.data
    modalities = tuple(data.modalities)
    source = input_pipeline.open_source(data, data.eval_split)
    batch_sh = sharding.batch_sharding(mesh)

    num_classes = data.num_classes

    # Counts over the global batch, replicated: every process gets the same totals.
    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def batch_counts(params, images, label, valid):
        pred = jnp.argmax(class_scores(params, images, model=model, channels=channels), axis=-1)  # (K, B)
        classes = class_of(label)
        correct = jnp.sum((pred == classes[None]) & valid[None], axis=1)
        confusion = jnp.einsum(
            "b,bt,bp->tp",
            valid.astype(jnp.int32),
            jax.nn.one_hot(classes, num_classes, dtype=jnp.int32),
            jax.nn.one_hot(pred[0], num_classes, dtype=jnp.int32),
        )
        return pred, correct, confusion, jnp.sum(valid)

    def evaluate(state, step: int):
        correct = np.zeros(len(modalities))
        confusion = np.zeros((num_classes, num_classes), np.int64)
        count, grid_rows = 0, []
        batches = input_pipeline.eval_batches(
            source,
            preprocess=input_pipeline.image_and_label,
            batch_size=config.segmentor.train.batch_size,
            max_examples=data.eval_max_examples,
        )
        for local in batches:
            batch = sharding.to_global(local, batch_sh)
            pred, c, m, n = jax.device_get(
                batch_counts(state.params, batch["image"], batch["label"], batch["valid"])
            )
            correct, confusion, count = correct + c, confusion + m, count + int(n)
            if not grid_rows:  # One row per image: the image, then its true and predicted class as grey.
                hw = local["image"].shape[1:3]
                grid_rows = [
                    [local["image"][b, ..., 0], _shade(local["label"][b, 0, 0], hw, num_classes)]
                    + [_shade(pred[0, b], hw, num_classes)]
                    for b in range(min(4, local["image"].shape[0]))
                ]
        accuracy = correct / max(count, 1)
        scalars = {f"accuracy/{name}": accuracy[k] for k, name in enumerate(modalities)}
        scalars["accuracy/mean"] = float(accuracy.mean())
        for t in range(data.num_classes):
            row = confusion[t]
            scalars[f"recall_class{t}/{modalities[0]}"] = row[t] / max(row.sum(), 1)
        images = {"classified": writer_lib.image_grid(grid_rows)} if grid_rows else {}
        return scalars, images

    return evaluate


def _shade(cls, hw, num_classes: int) -> np.ndarray:
    """A class drawn as a grey tile for the grids (0 black, the last class white)."""
    return np.full(hw, float(cls) / max(num_classes - 1, 1), np.float32)


def build(config: ml_collections.ConfigDict, mesh=None) -> train.StageSpec:
    """The classifier's spec for the shared loop (stage `segmentor` with `task = "classify"`)."""
    from synth.stages import segmentor

    seg = config.segmentor
    if seg.loss.kind not in LOSS_KINDS:
        raise ValueError(
            f"config.segmentor.loss.kind={seg.loss.kind!r} is not a classifier loss; "
            f"choose one of {LOSS_KINDS}"
        )
    source = input_pipeline.open_source(config.data, config.data.train_split)
    first = input_pipeline.image_and_label(source[0])
    channels = segmentor.check_channels(config, first["image"])
    model = make_model(config, first["image"].shape[:2])
    tx = optim.make_optimizer(seg.optim)
    mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    return train.StageSpec(
        name=segmentor.NAME,
        train=seg.train,
        source=source,
        preprocess=input_pipeline.image_and_label,
        init_state=functools.partial(init_state, model=model, tx=tx, channels=channels),
        train_step=functools.partial(
            train_step,
            model=model,
            tx=tx,
            loss_kind=seg.loss.kind,
            num_classes=config.data.num_classes,
            channels=channels,
        ),
        evaluate=make_evaluator(config, model=model, mesh=mesh, channels=channels),
    )


def lesion_processor(config: ml_collections.ConfigDict, image_hw) -> Any:
    """The frozen real-trained classifier as stage B's lesion processor (§6.4)."""
    from synth.stages import segmentor, synthesis

    model = make_model(config, image_hw)
    channels = synthesis.channels_per_modality(config)
    kind = config.segmentor.loss.kind

    def load(cfg, workdir):
        state = segmentor.load_state(cfg, workdir)
        return state.params, {"segmentor_step": int(jax.device_get(state.step))}

    def loss(params, images, inputs):
        scores = class_scores(params, images, model=model, channels=channels)
        classes = class_of(inputs.label)
        return jax.vmap(
            lambda s: classification_loss(s, classes, kind=kind, num_classes=config.data.num_classes)
        )(scores)

    def predict(params, images):
        return predict_maps(params, images, model=model, channels=channels)

    return synthesis.LesionProcessor(load=load, loss=loss, predict=predict, kind="classify")


def accuracy_of(predicted: jax.Array, label: jax.Array) -> jax.Array:
    """(B,) fraction of the K modalities whose predicted class is the asked-for one."""
    return jnp.mean(predicted[:, :, 0, 0] == class_of(label)[None], axis=0)
