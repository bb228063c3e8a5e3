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
(`synth.registration`). The networks are `synth.translator_nets`; frozen consumers load them from there.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import (
    configlib,
    evaluation,
    flow_synthesis,
    gan,
    input_pipeline,
    optim,
    registration,
    sharding,
    state,
    synthesis_nets,
    train,
    translator_nets,
)
from synth import writer as writer_lib
from synth.models.unet import CONDITIONS, configured_condition

NAME = "translator"

# Loss terms, in logging order. Generator side first, then the discriminator's.
G_TERMS = ("g_adversarial", "g_category", "cycle", "agreement", "supervised")
D_TERMS = ("d_real", "d_fake", "d_category")


def init_state(rng, batch, *, models: translator_nets.Models, g_tx, d_tx) -> state.GanState:
    g_params, d_params = translator_nets.init_params(rng, batch["image"], models=models)
    return state.init_gan(g_params, d_params, g_tx=g_tx, d_tx=d_tx)


def discriminate(models: translator_nets.Models, d_params, images: jax.Array):
    """D_t's (real/fake, category) maps of images (..., H, W, C), keeping the leading axes."""
    d, c = models.discriminator.apply(d_params, registration.flat(images))
    lead = images.shape[:-3]
    return registration.unflat(d, lead), registration.unflat(c, lead)


def generator_loss(g_params, d_params, images, *, models: translator_nets.Models, loss_config):
    """G_t's loss on a batch of registered real images (B, H, W, K).

    D_t judges the translations once for both updates (`gan.judged_once`): G_t's terms take gradients
    through the images only, and the second copy of its output carries D_t's loss on them to D_t.

    Returns:
      `(loss, (terms, translations, judged))`: the translations (K, K−1, B, H, W, 1), and D_t's
      (real/fake, category) maps of them for `discriminator_loss`.
    """
    w, kind = loss_config.weights, loss_config.category_kind
    x = registration.by_modality(images)  # (K, B, H, W, 1)
    k = x.shape[0]
    apply = functools.partial(translator_nets.translate, models, g_params)
    many = functools.partial(translator_nets.translate_many, models, g_params)
    fakes = registration.translate_pairs(many, x)  # grouped by target
    cycled = registration.translate_back(apply, fakes)
    judge = gan.judged_once(lambda params, images, _: discriminate(models, params, images))
    (d_fake, c_fake), judged = judge(d_params, fakes, None)  # No key: D_t has no dropout.
    terms = {
        "g_adversarial": gan.per_modality_mse(registration.by_target(d_fake), 1.0),
        "g_category": gan.category_sum(registration.by_target(c_fake), kind=kind, num_modalities=k),
        "cycle": registration.cycle_loss(x, cycled),
        "agreement": registration.agreement_loss(fakes),
        "supervised": registration.registration_loss(x, fakes),
    }
    return gan.weighted_sum(w, terms, G_TERMS), (terms, fakes, judged)


def discriminator_loss(d_params, images, judged, *, models: translator_nets.Models, loss_config):
    """D_t's loss: real images against the translations, which are the fakes (§11.16 fixed).

    `judged`: D_t's (real/fake, category) maps of the translations, from `generator_loss`.
    """
    w, kind = loss_config.weights, loss_config.category_kind
    x = registration.by_modality(images)
    k = x.shape[0]
    d_real, c_real = discriminate(models, d_params, x)
    d_fake, c_fake = judged
    category = gan.category_sum(c_real, kind=kind, num_modalities=k)
    if loss_config.category_on_fakes:
        category += gan.category_sum(registration.by_target(c_fake), kind=kind, num_modalities=k)
    terms = gan.discriminator_terms(d_real, registration.by_target(d_fake), category)
    return gan.weighted_sum(w, terms, D_TERMS), terms


def train_step(gan_state: state.GanState, batch, rng, *, models, g_tx, d_tx, loss_config):
    """One simultaneous G_t/D_t update: both gradients from the parameters before the step (the authors').

    One backward pass of L_G + L_D, as in stage B (`synthesis.train_step`): D_t judges the translations
    once, and each loss's gradient reaches only its own network.
    """
    del rng  # Nothing random: no dropout in G_t/D_t (keep_prob 1 in the code).
    images = batch["image"]

    def both_losses(g_params, d_params):
        g_loss, (terms, _, judged) = generator_loss(
            g_params, d_params, images, models=models, loss_config=loss_config
        )
        d_loss, d_terms = discriminator_loss(d_params, images, judged, models=models, loss_config=loss_config)
        return g_loss + d_loss, (g_loss, d_loss, terms, d_terms)

    (_, (g_loss, d_loss, terms, d_terms)), (g_grads, d_grads) = jax.value_and_grad(
        both_losses, argnums=(0, 1), has_aux=True
    )(gan_state.g_params, gan_state.d_params)
    new, norms = state.gan_update(gan_state, g_grads, d_grads, g_tx=g_tx, d_tx=d_tx)
    metrics = dict(terms, **d_terms, **norms, g_loss=g_loss, d_loss=d_loss)
    return new, metrics


# Decoded BRATS-like example -> the arrays this stage consumes.
preprocess = input_pipeline.image_and_label


def _per_batch(gan_state, frozen, batch, key, *, models: translator_nets.Models):
    """Per image and pair: the translation and cycle MSE against the registered truth."""
    del frozen, key
    x = registration.by_modality(batch["image"])
    apply = functools.partial(translator_nets.translate, models, gan_state.g_params)
    many = functools.partial(translator_nets.translate_many, models, gan_state.g_params)
    fakes = registration.translate_pairs(many, x)
    cycled = registration.translate_back(apply, fakes)
    sources = registration.pair_sources(x.shape[0])
    values = {
        "translation": jnp.moveaxis(jnp.mean(jnp.square(fakes - x[:, None]), axis=(3, 4, 5)), -1, 0),
        "cycle": jnp.moveaxis(jnp.mean(jnp.square(cycled - x[sources]), axis=(3, 4, 5)), -1, 0),
    }
    return values, fakes  # values: (B, K, K−1)


def _finish(totals, count, *, modalities) -> dict[str, float]:
    """Mean translation and cycle MSE, and the translation MSE of every pair."""
    mean = evaluation.mean_over(totals, count)
    translation, cycle = mean["translation"], mean["cycle"]
    k = len(modalities)
    sources = registration.pair_sources(k)
    scalars = {"translation_mse/mean": float(translation.mean()), "cycle_mse/mean": float(cycle.mean())}
    for j in range(k):
        for n in range(k - 1):
            pair = f"{modalities[sources[j, n]]}_to_{modalities[j]}"
            scalars[f"translation_mse/{pair}"] = float(translation[j, n])
    return scalars


def hooks(config, *, models: translator_nets.Models) -> evaluation.Hooks:
    """Translation and cycle MSE per pair on the (registered) eval split, and a translation grid."""

    def grid(local, fakes):
        rows = _grid_rows(local["image"], np.asarray(fakes))
        return {"real_then_translations": writer_lib.image_grid(rows)} if rows else {}

    return evaluation.Hooks(
        per_batch=functools.partial(_per_batch, models=models),
        finish=functools.partial(_finish, modalities=tuple(config.data.modalities)),
        grid=grid,
    )


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
    gan.check_loss_weights(NAME, tr.loss.weights, G_TERMS + D_TERMS)
    configlib.check_choice("translator.model.condition", configured_condition(tr.model), CONDITIONS)
    models = translator_nets.make_models(config, image.shape[:2])
    g_tx, d_tx = optim.make_optimizer(tr.optim.g), optim.make_optimizer(tr.optim.d)
    mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    return train.StageSpec(
        name=NAME,
        train=tr.train,
        source=source,
        preprocess=preprocess,
        init_state=functools.partial(init_state, models=models, g_tx=g_tx, d_tx=d_tx),
        train_step=functools.partial(train_step, models=models, g_tx=g_tx, d_tx=d_tx, loss_config=tr.loss),
        evaluate=evaluation.make_evaluator(
            input_pipeline.open_source(config.data, config.data.eval_split),
            preprocess=preprocess,
            batch_size=tr.train.batch_size,
            max_examples=config.data.eval_max_examples,
            mesh=mesh,
            hooks=hooks(config, models=models),
        ),
    )


def skip_reason(config: ml_collections.ConfigDict) -> str | None:
    """Why `stage=all` leaves this stage out for `config`, or None.

    Translation needs two modalities, and G_t is trained only for a stage B that reads it: the GAN's
    registration terms, or the flow family's registration term or registration score.
    """
    if len(config.data.modalities) < 2:
        return f"{config.data.name} has one modality, so there is nothing to translate or register"
    if not synthesis_nets.uses_translator(config):
        return (
            "stage B neither trains against G_t nor scores with it (no registration weight"
            + (", config.synthesis.flow.score_registration=False" if flow_synthesis.is_flow(config) else "")
            + "); stage=translator trains it anyway"
        )
    return None


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at=None):
    """Trains G_t and D_t in `workdir/translator` unless already complete."""
    return train.run_unless_complete(NAME, build, config, workdir, stop_at=stop_at)
