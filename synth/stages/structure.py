"""Stage `structure` (stage A, METHOD.md §5): a generator of structure maps and organ masks from noise.

Real structure maps and organ masks are extracted on the fly, on device, from the configured dataset's images
(Algorithms 1-2, `synth.extraction`), with the lesion removed using its label (§3.4), so any BRATS-like
dataset, the phantom included, trains as it is. Networks (§4.3-4.6, `synth.structure_nets`): encoder E_s,
decoder G_s, mask generator G_m (the G side, one optimiser) and the structure and code discriminators D_s,
D_z (the D side). Updates are simultaneous (the authors': both sides' gradients from one forward pass) or
alternating. The evaluator reports reconstruction errors, and the acceptance and diversity of maps drawn
from noise through the quality filter of §5.4 (`structure_nets.sample_structures`).

With `config.structure.generator = "flow"` the stage trains the flow family instead (`synth.structure_flow`):
one velocity network draws map and mask together; its evaluation draws through the same filter.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import ndimage

from synth import (
    configlib,
    flow_train,
    input_pipeline,
    optim,
    sharding,
    state,
    structure_filter,
    structure_flow,
    structure_nets,
    train,
)
from synth import structure_losses as losses_a
from synth import writer as writer_lib
from synth.metrics import edges as edge_form
from synth.models import vae

NAME = "structure"
UPDATE_MODES = ("simultaneous", "alternating")
# An organ's core: its pixels at least this fraction of its greatest depth (distance to its border) inside.
CORE_DEPTH = 0.4
log = logging.getLogger("synth")


def _forward(g_params, d_params, s, organ, rng, *, models: structure_nets.Models, weights, parity: bool):
    """One forward pass of §5.1 and every loss term of §5.2."""
    keys = jax.random.split(rng, 8)
    s1h, m1h = losses_a.paired_one_hot(s), losses_a.paired_one_hot(organ)
    mean, logvar = models.encoder.apply(
        g_params["encoder"], vae.encoder_input(s), train=True, rngs={"dropout": keys[0]}
    )
    code = vae.reparameterize(keys[1], mean, logvar)
    prior = sharding.split_like_batch(jax.random.normal(keys[2], mean.shape))  # Per device, its share.
    recon = models.decoder.apply(g_params["decoder"], code)
    generated = models.decoder.apply(g_params["decoder"], prior)
    mask_recon = models.mask.apply(g_params["mask"], s1h, train=True, rngs={"dropout": keys[3]})
    mask_generated = models.mask.apply(g_params["mask"], generated, train=True, rngs={"dropout": keys[4]})
    d_real = models.map_disc.apply(d_params["map"], s1h, train=True, rngs={"dropout": keys[5]})
    d_fake = models.map_disc.apply(d_params["map"], generated, train=True, rngs={"dropout": keys[6]})
    terms = losses_a.structure_losses(
        structure_onehot=s1h,
        mask_onehot=m1h,
        recon=recon,
        generated=generated,
        mask_recon=mask_recon,
        mask_generated=mask_generated,
        code_mean=mean,
        code_logvar=logvar,
        d_code_prior=models.code_disc.apply(d_params["code"], prior),
        d_code_posterior=models.code_disc.apply(d_params["code"], code),
        d_map_real=d_real,
        d_map_fake=d_fake,
        weights=weights,
        parity=parity,
    )
    return (terms["g_loss"], terms["d_loss"]), terms


def init_state(rng, batch, *, models: structure_nets.Models, extract_fn, g_tx, d_tx) -> state.GanState:
    s, _ = extract_fn(batch)
    g_params, d_params = structure_nets.init_params(rng, s, models=models)
    return state.init_gan(g_params, d_params, g_tx=g_tx, d_tx=d_tx)


def train_step(
    gan_state: state.GanState, batch, rng, *, models, extract_fn, g_tx, d_tx, weights, parity, update
):
    """One G-side and one D-side update on a batch of real images."""
    s, organ = extract_fn(batch)
    forward = functools.partial(
        _forward, s=s, organ=organ, rng=rng, models=models, weights=weights, parity=parity
    )
    if update == "simultaneous":
        # Both sides' gradients from one forward pass, as the authors' single sess.run([G_op, D_op]).
        (g_loss, d_loss), vjp, terms = jax.vjp(forward, gan_state.g_params, gan_state.d_params, has_aux=True)
        g_grads, _ = vjp((jnp.ones_like(g_loss), jnp.zeros_like(d_loss)))
        _, d_grads = vjp((jnp.zeros_like(g_loss), jnp.ones_like(d_loss)))
        new, norms = state.gan_update(gan_state, g_grads, d_grads, g_tx=g_tx, d_tx=d_tx)
    elif update == "alternating":
        # D first, then G against the updated D (two forward passes).
        d_grads = jax.grad(lambda dp: forward(gan_state.g_params, dp)[0][1])(gan_state.d_params)
        d_params, d_opt, d_norms = state.apply_gradients(
            d_tx, d_grads, gan_state.d_opt, gan_state.d_params, prefix="d_"
        )

        def g_objective(gp):
            (g_loss, _), terms = forward(gp, d_params)
            return g_loss, terms

        g_grads, terms = jax.grad(g_objective, has_aux=True)(gan_state.g_params)
        g_params, g_opt, g_norms = state.apply_gradients(
            g_tx, g_grads, gan_state.g_opt, gan_state.g_params, prefix="g_"
        )
        new = gan_state.replace(
            step=gan_state.step + 1, g_params=g_params, d_params=d_params, g_opt=g_opt, d_opt=d_opt
        )
        norms = {**g_norms, **d_norms}
    else:
        raise ValueError(f"Unknown config.structure.update_mode {update!r}; choose one of {UPDATE_MODES}")
    return new, {**terms, **norms}


# Decoded BRATS-like example -> the arrays this stage consumes.
preprocess = input_pipeline.image_and_label


def map_diversity(maps: np.ndarray) -> float:
    """Mean fraction of differing pixels over pairs of distinct maps (N, H, W): near 0 is mode collapse."""
    flat = maps.reshape(len(maps), -1).astype(np.float32)
    pairs = len(flat) * (len(flat) - 1)
    return float(np.abs(flat[:, None] - flat[None]).mean(-1).sum() / max(pairs, 1))


def core_edge_fraction(maps: np.ndarray, organs: np.ndarray, depth: float = CORE_DEPTH) -> float:
    """Mean fraction of edge pixels in each organ's core (N, H, W maps and organ masks, 1 = organ).

    The core is the organ's pixels at least `depth` of its greatest depth from its border: in a brain,
    the ventricles and the midline, away from the skull's ring. The whole map's edge fraction cannot
    tell a thick ring with nothing inside from a ring with the anatomy inside it (the demo's stage A:
    0.21 against the real 0.19, while its cores hold a third of the real maps' edges; BENCHMARKS.md,
    "Stage A's anatomy"). Organs with no pixel are left out; no organ at all gives 0.
    """
    fractions = []
    for edges, organ in zip(maps, organs):
        inside = ndimage.distance_transform_edt(organ > 0)
        if inside.max() > 0:
            fractions.append(float(np.mean(edges[inside >= depth * inside.max()])))
    return float(np.mean(fractions)) if fractions else 0.0


def _sampling_report(
    real_maps: np.ndarray,
    real_organs: np.ndarray,
    sampled: dict[str, np.ndarray],
    num_samples: int,
    train_maps: np.ndarray,
):
    """Scalars and a grid of maps drawn through the §5.4 filter (`structure_filter.sample_filtered`).

    `real_maps`, `real_organs` are the eval split's; `train_maps` as many real training maps as draws, the
    yardstick of the edge-pattern distance (how far real maps are from the eval ones at that count).
    """
    scalars = {
        "edge_fraction_real": float(real_maps.mean()),
        "edge_fraction_sampled": float(sampled["maps"].mean()),
        "core_edge_fraction_real": core_edge_fraction(real_maps, real_organs),
        "core_edge_fraction_sampled": core_edge_fraction(sampled["maps"], sampled["masks"]),
        "acceptance_first_draw": float(np.mean(sampled["draws"] == 1) * 1.0),
        "acceptance": float(sampled["accepted"].mean()),
        "diversity": map_diversity(sampled["maps"]),
        "diversity_real": map_diversity(real_maps),  # The value a sampler that matches the data reaches.
        # The local form of the drawn edges (synth.metrics.edges), against the eval maps; the training
        # maps' distance is what a sampler that draws like the data reaches with as many maps.
        "edge_pattern_distance_sampled": edge_form.edge_pattern_distance(sampled["maps"], real_maps),
        "edge_pattern_distance_real": edge_form.edge_pattern_distance(train_maps, real_maps),
    }
    rows = [
        [sampled["maps"][i + j] if k == 0 else sampled["masks"][i + j] for j in range(2) for k in range(2)]
        for i in range(0, min(8, num_samples) - 1, 2)
    ]
    grid = writer_lib.image_grid([[x.astype(np.float32) for x in r] for r in rows])
    return scalars, grid


def _first_images(config, split: str, count: int):
    """The first `count` images of `split` (fewer if it is smaller), preprocessed and stacked."""
    source = input_pipeline.open_source(config.data, split)
    return jax.tree.map(
        lambda *x: np.stack(x), *[preprocess(source[i]) for i in range(min(count, len(source)))]
    )


def _eval_images(config):
    """The first `config.structure.eval.num_examples` eval images, stacked, and the fixed sampling key."""
    real = _first_images(config, config.data.eval_split, config.structure.eval.num_examples)
    key = jax.random.fold_in(jax.random.key(config.seed), 7)  # Fixed draws: comparable across steps.
    return real, key


def _training_maps(config, extract_fn) -> np.ndarray:
    """Structure maps of the first `eval.num_samples` training images: the edge-pattern yardstick."""
    train_images = _first_images(config, config.data.train_split, config.structure.eval.num_samples)
    return np.asarray(jax.device_get(jax.jit(extract_fn)(train_images)[0]))[..., 0]


def make_evaluator(config, *, models: structure_nets.Models, extract_fn, mesh):
    """Reconstruction error on eval images, sample acceptance rate and diversity, and a grid."""
    ev = config.structure.eval
    real, key = _eval_images(config)
    train_maps = _training_maps(config, extract_fn)
    filter_params = structure_filter.FilterParams(**config.structure.filter)

    @jax.jit
    def reconstruct(g_params, batch):
        s, organ = extract_fn(batch)
        mean, _ = models.encoder.apply(g_params["encoder"], vae.encoder_input(s))
        recon = jnp.argmax(models.decoder.apply(g_params["decoder"], mean), axis=-1)
        mask = jnp.argmax(models.mask.apply(g_params["mask"], losses_a.paired_one_hot(s)), axis=-1)
        return s[..., 0], organ[..., 0], recon, mask

    def evaluate(gan_state: state.GanState, step: int):
        s, organ, recon, mask = (np.asarray(x) for x in jax.device_get(reconstruct(gan_state.g_params, real)))
        code_shape = vae.code_shape(s.shape[1:3], models.encoder.code_channels)
        sampled = structure_nets.sample_structures(
            gan_state.g_params,
            gan_state.d_params,
            key,
            ev.num_samples,
            models=models,
            code_shape=code_shape,
            filter_params=filter_params,
        )
        scalars, sample_grid = _sampling_report(s, organ, sampled, ev.num_samples, train_maps)
        scalars.update(
            recon_error=float(np.mean(recon != s)),
            core_edge_fraction_recon=core_edge_fraction(recon, organ),
            edge_pattern_distance_recon=edge_form.edge_pattern_distance(recon, s),
            mask_error=float(np.mean(mask != organ)),
            d_score_sampled=float(sampled["scores"].mean()),
        )
        rows = [[s[i], organ[i], recon[i], mask[i]] for i in range(min(4, len(s)))]
        images = {
            "real_map_mask_recon_mask": writer_lib.image_grid(
                [[x.astype(np.float32) for x in r] for r in rows]
            ),
            "samples_map_mask": sample_grid,
        }
        return scalars, images

    return evaluate


def make_flow_evaluator(config, *, models: structure_flow.Models, extract_fn, image_hw):
    """The flow family's evaluation: maps and masks drawn by the EMA net through the filter, and a grid."""
    ev = config.structure.eval
    real, key = _eval_images(config)
    filter_params = structure_filter.FilterParams(**config.structure.filter)
    s, organ = (np.asarray(x)[..., 0] for x in jax.device_get(jax.jit(extract_fn)(real)))
    train_maps = _training_maps(config, extract_fn)
    generate_fn = structure_flow.make_generate_fn(models, config, image_hw)

    def evaluate(flow_state, step: int):
        sampled = structure_flow.sample_structures(
            flow_state.ema_params, key, ev.num_samples, generate_fn=generate_fn, filter_params=filter_params
        )
        scalars, sample_grid = _sampling_report(s, organ, sampled, ev.num_samples, train_maps)
        scalars["contour_mae_sampled"] = float(-sampled["scores"].mean())
        rows = [[s[i], organ[i]] for i in range(min(4, len(s)))]
        images = {
            "real_map_mask": writer_lib.image_grid([[x.astype(np.float32) for x in r] for r in rows]),
            "samples_map_mask": sample_grid,
        }
        return scalars, images

    return evaluate


def training_images(config: ml_collections.ConfigDict, source):
    """The real training images stage A learns from: all, or those of `config.structure.train_classes`.

    For diffuse lesions the lesion images are left out instead of removing the lesion (§3.4): the X-ray
    config trains stage A on normal images only (class 0).
    """
    classes = tuple(config.structure.get("train_classes", ()) or ())
    if not classes:
        return source
    keep = [i for i in range(len(source)) if int(np.asarray(source[i]["label"]).flat[0]) in classes]
    if not keep:
        raise ValueError(f"config.structure.train_classes={classes}: no training image has those classes")
    return input_pipeline.Subset(source, keep)


def step_parts(config: ml_collections.ConfigDict, image_hw: tuple[int, int]):
    """`(models, init_state, train_step)` of stage A's configured family for `image_hw`, options bound.

    What `build` hands the loop, without data: `benchmarks.memory` compiles the step from these.
    """
    return _flow_parts(config, image_hw) if structure_flow.is_flow(config) else _gan_parts(config, image_hw)


def _gan_parts(config: ml_collections.ConfigDict, image_hw: tuple[int, int]):
    """The paper's VAE-GAN: networks, `init_state` and `train_step` with their options bound."""
    st = config.structure
    models = structure_nets.make_models(config, image_hw)
    extract_fn = functools.partial(structure_nets.real_structures, **structure_nets.extract_kwargs(config))
    g_tx, d_tx = optim.make_optimizer(st.optim.g), optim.make_optimizer(st.optim.d)
    configlib.check_choice("structure.update_mode", st.update_mode, UPDATE_MODES)
    init = functools.partial(init_state, models=models, extract_fn=extract_fn, g_tx=g_tx, d_tx=d_tx)
    step = functools.partial(
        train_step,
        models=models,
        extract_fn=extract_fn,
        g_tx=g_tx,
        d_tx=d_tx,
        weights=dict(st.loss.weights),
        parity=st.loss.parity,
        update=st.update_mode,
    )
    return models, init, step


def _flow_parts(config: ml_collections.ConfigDict, image_hw: tuple[int, int]):
    """The flow family: velocity net, state init and step (`synth.structure_flow`)."""
    structure_flow.check_config(config)
    models = structure_flow.make_models(config, image_hw)
    tx = optim.make_optimizer(config.structure.flow.optim)
    init = functools.partial(structure_flow.init_state, models=models, config=config, tx=tx)
    step = functools.partial(flow_train.train_step, tx=tx, **structure_flow.train_options(config, models))
    return models, init, step


def build(config: ml_collections.ConfigDict, mesh=None) -> train.StageSpec:
    st = config.structure
    source = training_images(config, input_pipeline.gan_training_source(config.data))
    image_hw = tuple(preprocess(source[0])["image"].shape[:2])
    models, init, step = step_parts(config, image_hw)
    extract_fn = functools.partial(structure_nets.real_structures, **structure_nets.extract_kwargs(config))
    mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    if structure_flow.is_flow(config):
        evaluate = make_flow_evaluator(config, models=models, extract_fn=extract_fn, image_hw=image_hw)
    else:
        evaluate = make_evaluator(config, models=models, extract_fn=extract_fn, mesh=mesh)
    return train.StageSpec(
        name=NAME,
        train=st.train,
        source=source,
        preprocess=preprocess,
        init_state=init,
        train_step=step,
        evaluate=evaluate,
    )


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at=None):
    """Trains stage A in `workdir/structure` unless already complete."""
    return train.run_unless_complete(NAME, build, config, workdir, stop_at=stop_at)
