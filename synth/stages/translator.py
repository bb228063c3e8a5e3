"""Stage `translator`: the modality translator G_t and its discriminator D_t, trained on real data (§6.2).

G_t is the conditional U-Net of §4.1: it takes one modality's image and a target modality's one-hot code
(injected at the bottleneck) and returns the image in the target modality. It is frozen later and supplies
stage B's registration loss: a synthetic T1 translated into T2 should equal the synthetic T2.

It trains as a CycleGAN with the ACGAN losses of §6.1, with the defects of the authors' code (§11.16) fixed:
  * D_t's fake term scores the translated images (the code scored real images as "fake");
  * G_t gets adversarial gradient through D_t's score of its translations (the code's term had none);
  * every cycle i → j → i is counted once (the code counted W→X→W twice and dropped W→Z→W);
  * an optional supervised term mse(x_{i→j}, x_j) uses the registration the data already has
    (`loss.weights.supervised`; 0 by default, as the paper's unpaired setup).
All K·(K−1) translations (12 for four modalities) and all cycles are each one batched call of G_t
(`synth.registration`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import input_pipeline, optim, registration, sharding, train
from synth import writer as writer_lib
from synth.models import sizes
from synth.models.discriminator import PatchDiscriminator
from synth.models.unet import UNet

NAME = "translator"

# Loss terms, in logging order. Generator side first, then the discriminator's.
G_TERMS = ("g_adversarial", "g_category", "cycle", "agreement", "supervised")
D_TERMS = ("d_real", "d_fake", "d_category")


@flax.struct.dataclass
class TranslatorState:
    """All mutable state of the stage: one pytree."""

    step: jax.Array
    g_params: Any
    d_params: Any
    g_opt: Any
    d_opt: Any


class Models(NamedTuple):
    """The stage's two networks (module definitions, no parameters)."""

    generator: UNet
    discriminator: PatchDiscriminator


def make_models(config: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> Models:
    """G_t (out 1 channel, sigmoid) and the two-head D_t, sized from the one table."""
    tr = config.translator
    common = dict(activation=tr.model.activation, kernel_init=tr.model.kernel_init)
    k = len(config.data.modalities)
    return Models(
        generator=UNet(
            **sizes.unet_kwargs(tr.model.size, image_hw),
            out_channels=1,
            norm_output=tr.model.norm_output,
            **common,
        ),
        discriminator=PatchDiscriminator(
            **sizes.discriminator_kwargs(tr.model.size, image_hw),
            heads=2,
            category_channels=registration.category_channels(tr.loss.category_kind, k),
            **common,
        ),
    )


def translate(models: Models, g_params, images: jax.Array, targets: jax.Array) -> jax.Array:
    """G_t: images (N, H, W, 1) into the modalities of the one-hot `targets` (N, K)."""
    return models.generator.apply(g_params, images, targets)


def init_state(rng, batch, *, models: Models, g_tx, d_tx):
    x = registration.by_modality(batch["image"])[:, :1]  # One image per modality is enough to init.
    k = x.shape[0]
    g_key, d_key = jax.random.split(rng)
    g_params = models.generator.init(g_key, x[0], registration.modality_conditions(np.zeros(1, int), 1, k))
    d_params = models.discriminator.init(d_key, x[0])
    return TranslatorState(
        step=jnp.zeros((), jnp.int32),
        g_params=g_params,
        d_params=d_params,
        g_opt=g_tx.init(g_params),
        d_opt=d_tx.init(d_params),
    )


def _discriminate(models: Models, d_params, images: jax.Array):
    """D_t's (real/fake, category) maps of images (..., H, W, C), keeping the leading axes."""
    d, c = models.discriminator.apply(d_params, registration.flat(images))
    lead = images.shape[:-3]
    return d.reshape(lead + d.shape[1:]), c.reshape(lead + c.shape[1:])


def _by_target(x: jax.Array) -> jax.Array:
    """(K, K−1, B, …) -> (K, (K−1)·B, …): every translation into modality j in row j."""
    return x.reshape((x.shape[0], -1) + x.shape[3:])


def generator_loss(g_params, d_params, images, *, models: Models, loss_config):
    """G_t's loss on a batch of registered real images (B, H, W, K).

    Returns:
      `(loss, (terms, translations))`; the translations (K, K−1, B, H, W, 1) feed D_t's update.
    """
    w, kind = loss_config.weights, loss_config.category_kind
    x = registration.by_modality(images)  # (K, B, H, W, 1)
    k = x.shape[0]
    apply = functools.partial(translate, models, g_params)
    fakes = registration.translate_pairs(apply, x)  # grouped by target
    cycled = registration.translate_back(apply, fakes)
    d_fake, c_fake = _discriminate(models, d_params, fakes)
    terms = {
        "g_adversarial": registration.per_modality_mse(_by_target(d_fake), 1.0),
        "g_category": registration.category_sum(_by_target(c_fake), kind=kind, num_modalities=k),
        "cycle": registration.cycle_loss(x, cycled),
        "agreement": registration.agreement_loss(fakes),
        "supervised": registration.registration_loss(x, fakes),
    }
    return sum(w[name] * terms[name] for name in G_TERMS), (terms, fakes)


def discriminator_loss(d_params, images, translations, *, models: Models, loss_config):
    """D_t's loss: real images against the translations, which are the fakes (§11.16 fixed)."""
    w, kind = loss_config.weights, loss_config.category_kind
    x = registration.by_modality(images)
    k = x.shape[0]
    d_real, c_real = _discriminate(models, d_params, x)
    d_fake, c_fake = _discriminate(models, d_params, translations)
    category = registration.category_sum(c_real, kind=kind, num_modalities=k)
    if loss_config.category_on_fakes:
        category += registration.category_sum(_by_target(c_fake), kind=kind, num_modalities=k)
    terms = {
        "d_real": registration.per_modality_mse(d_real, 1.0),
        "d_fake": registration.per_modality_mse(_by_target(d_fake), 0.0),
        "d_category": category,
        "d_accuracy": 0.5 * (jnp.mean(d_real > 0.5) + jnp.mean(d_fake < 0.5)),
    }
    return sum(w[name] * terms[name] for name in D_TERMS), terms


def train_step(state: TranslatorState, batch, rng, *, models: Models, g_tx, d_tx, loss_config):
    """One simultaneous G_t/D_t update: both gradients from the parameters before the step (the authors')."""
    del rng  # Nothing random: no dropout in G_t/D_t (keep_prob 1 in the code).
    images = batch["image"]
    (g_loss, (terms, fakes)), g_grads = jax.value_and_grad(generator_loss, has_aux=True)(
        state.g_params, state.d_params, images, models=models, loss_config=loss_config
    )
    (d_loss, d_terms), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
        state.d_params, images, jax.lax.stop_gradient(fakes), models=models, loss_config=loss_config
    )
    new, norms = registration.gan_update(state, g_grads, d_grads, g_tx=g_tx, d_tx=d_tx)
    metrics = dict(terms, **d_terms, **norms, g_loss=g_loss, d_loss=d_loss)
    return new, metrics


# Decoded BRATS-like example -> the arrays this stage consumes.
preprocess = input_pipeline.image_and_label


def translation_errors(g_params, images, valid, *, models: Models):
    """Per-pair sums over valid images of the translation and cycle MSE against the registered truth.

    Returns:
      `(translation, cycle, count)`: (K, K−1) sums of per-image MSE and the number of valid images.
    """
    x = registration.by_modality(images)
    apply = functools.partial(translate, models, g_params)
    fakes = registration.translate_pairs(apply, x)
    cycled = registration.translate_back(apply, fakes)
    k = x.shape[0]
    per_image = jnp.mean(jnp.square(fakes - x[:, None]), axis=(3, 4, 5))  # (K, K-1, B)
    per_cycle = jnp.mean(jnp.square(cycled - x[registration.pair_sources(k)]), axis=(3, 4, 5))
    mask = valid.astype(jnp.float32)
    return jnp.sum(per_image * mask, -1), jnp.sum(per_cycle * mask, -1), jnp.sum(mask), fakes


def make_evaluator(config, *, models: Models, mesh):
    """Translation and cycle MSE per pair on the (registered) eval split, and a translation grid."""
    source = input_pipeline.open_source(config.data, config.data.eval_split)
    modalities = tuple(config.data.modalities)
    k = len(modalities)
    batch_sh = sharding.batch_sharding(mesh)
    errors = jax.jit(
        functools.partial(translation_errors, models=models), out_shardings=sharding.replicated(mesh)
    )

    def evaluate(state: TranslatorState, step: int):
        totals, grid_rows = None, []
        batches = input_pipeline.eval_batches(
            source,
            preprocess=preprocess,
            batch_size=config.translator.train.batch_size,
            max_examples=config.data.eval_max_examples,
        )
        for local in batches:
            batch = sharding.to_global(local, batch_sh)
            *sums, fakes = errors(state.g_params, batch["image"], batch["valid"])
            sums = [np.asarray(s, np.float64) for s in jax.device_get(sums)]
            totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
            if not grid_rows:
                grid_rows = _grid_rows(local["image"], np.asarray(jax.device_get(fakes)))
        translation, cycle, count = totals
        translation, cycle = translation / max(count, 1), cycle / max(count, 1)
        sources = registration.pair_sources(k)
        scalars = {"translation_mse/mean": translation.mean(), "cycle_mse/mean": cycle.mean()}
        for j in range(k):
            for n in range(k - 1):
                pair = f"{modalities[sources[j, n]]}_to_{modalities[j]}"
                scalars[f"translation_mse/{pair}"] = translation[j, n]
        images = {"real_then_translations": writer_lib.image_grid(grid_rows)} if grid_rows else {}
        return scalars, images

    return evaluate


def _grid_rows(images: np.ndarray, fakes: np.ndarray, max_samples: int = 3):
    """Per sample: the real modalities, then each modality as translated from the next one."""
    rows = []
    k = images.shape[-1]
    for b in range(min(max_samples, images.shape[0])):
        rows.append([images[b, ..., j] for j in range(k)])
        # fakes[j, n] is the n-th source of j in pair order; source (j+1) % K sits at n = j (at 0 for K-1).
        rows.append([fakes[j, j if j < k - 1 else 0, b, ..., 0] for j in range(k)])
    return rows


def build(config: ml_collections.ConfigDict, mesh=None) -> train.StageSpec:
    tr = config.translator
    source = input_pipeline.open_source(config.data, config.data.train_split)
    image = preprocess(source[0])["image"]
    if image.shape[-1] < 2:
        raise ValueError(
            "The translator needs at least two registered modalities; "
            f"{config.data.name} has {image.shape[-1]}"
        )
    if image.shape[-1] != len(config.data.modalities):
        raise ValueError(
            f"The dataset has {image.shape[-1]} modalities but config.data.modalities lists "
            f"{len(config.data.modalities)}: {config.data.modalities}"
        )
    registration.check_loss_weights(NAME, tr.loss.weights, G_TERMS + D_TERMS)
    models = make_models(config, image.shape[:2])
    g_tx, d_tx = optim.make_optimizer(tr.optim.g), optim.make_optimizer(tr.optim.d)
    mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    return train.StageSpec(
        name=NAME,
        train=tr.train,
        source=source,
        preprocess=preprocess,
        init_state=functools.partial(init_state, models=models, g_tx=g_tx, d_tx=d_tx),
        train_step=functools.partial(train_step, models=models, g_tx=g_tx, d_tx=d_tx, loss_config=tr.loss),
        evaluate=make_evaluator(config, models=models, mesh=mesh),
    )


def skip_reason(config: ml_collections.ConfigDict) -> str | None:
    """Why `stage=all` leaves this stage out for `config`, or None: translation needs two modalities."""
    if len(config.data.modalities) < 2:
        return f"{config.data.name} has one modality, so there is nothing to translate or register"
    return None


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at=None):
    """Trains G_t and D_t in `workdir/translator` unless already complete."""
    return train.run_unless_complete(NAME, build, config, workdir, stop_at=stop_at)


def load_state(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> TranslatorState:
    """The latest trained translator state of a run, for stage B's registration loss."""
    return train.load_trained_state(build(config), config, workdir)
