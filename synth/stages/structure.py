"""Stage `structure` (stage A, METHOD.md §5): a VAE-GAN that draws structure maps and organ masks from noise.

Real structure maps and organ masks are extracted on the fly, on device, from the configured dataset's images
(Algorithms 1-2, `synth.extraction`), with the lesion removed using its label (§3.4), so any BRATS-like
dataset, the phantom included, trains as it is. Networks (§4.3-4.6): encoder E_s, decoder G_s, mask
generator G_m (the G side, one optimiser) and the structure and code discriminators D_s, D_z (the D side).
Updates are simultaneous (the authors': both sides' gradients from one forward pass) or alternating.

`sample_structures` draws binary maps and masks from noise and applies the quality filter of §5.4.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from synth import extraction, input_pipeline, losses, optim, sharding, structure_filter, train
from synth import writer as writer_lib
from synth.models import sizes, vae
from synth.models.discriminator import CodeDiscriminator, PatchDiscriminator
from synth.models.unet import UNet

NAME = "structure"
UPDATE_MODES = ("simultaneous", "alternating")
log = logging.getLogger("synth")


@flax.struct.dataclass
class StructureState:
    """All mutable state of stage A: one pytree."""

    step: jax.Array
    g_params: Any  # {"encoder", "decoder", "mask"}: E_s, G_s, G_m.
    d_params: Any  # {"map", "code"}: D_s, D_z.
    g_opt: Any
    d_opt: Any


class Models(NamedTuple):
    """Stage A's five networks (static: module definitions, no parameters)."""

    encoder: vae.VAEEncoder
    decoder: vae.VAEDecoder
    mask: UNet
    map_disc: PatchDiscriminator
    code_disc: CodeDiscriminator


def make_models(config: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> Models:
    """Stage A's networks, sized from the one table (`synth.models.sizes`)."""
    m = config.structure.model
    common = dict(activation=m.activation, kernel_init=m.kernel_init)
    vae_sizes = sizes.vae_kwargs(m.size, image_hw)
    return Models(
        encoder=vae.VAEEncoder(**vae_sizes, dropout_rate=m.encoder_dropout, **common),
        decoder=vae.VAEDecoder(image_hw=tuple(image_hw), **vae_sizes, out_channels=2, **common),
        mask=UNet(
            **sizes.mask_generator_kwargs(m.size, image_hw),
            out_channels=2,
            dropout_rate=m.mask_dropout,
            **common,
        ),
        map_disc=PatchDiscriminator(
            **sizes.discriminator_kwargs(m.size, image_hw), dropout_rate=m.disc_dropout, **common
        ),
        code_disc=CodeDiscriminator(**sizes.code_discriminator_kwargs(m.size, image_hw), **common),
    )


def extraction_params(config: ml_collections.ConfigDict) -> extraction.ExtractionParams:
    return extraction.ExtractionParams.from_config(config.structure.extraction)


def real_structures(batch, *, params: extraction.ExtractionParams, remove_lesions: bool):
    """(structure map, organ mask), each (B, H, W, 1) in {0, 1}, of a batch of real images."""
    return extraction.extract(batch["image"], batch["label"], params, remove_lesions=remove_lesions)


def _forward(g_params, d_params, s, organ, rng, *, models: Models, weights, parity: bool):
    """One forward pass of §5.1 and every loss term of §5.2."""
    keys = jax.random.split(rng, 8)
    s1h, m1h = losses.paired_one_hot(s), losses.paired_one_hot(organ)
    mean, logvar = models.encoder.apply(
        g_params["encoder"], vae.encoder_input(s), train=True, rngs={"dropout": keys[0]}
    )
    code = vae.reparameterize(keys[1], mean, logvar)
    prior = jax.random.normal(keys[2], mean.shape)
    recon = models.decoder.apply(g_params["decoder"], code)
    generated = models.decoder.apply(g_params["decoder"], prior)
    mask_recon = models.mask.apply(g_params["mask"], s1h, train=True, rngs={"dropout": keys[3]})
    mask_generated = models.mask.apply(g_params["mask"], generated, train=True, rngs={"dropout": keys[4]})
    d_real = models.map_disc.apply(d_params["map"], s1h, train=True, rngs={"dropout": keys[5]})
    d_fake = models.map_disc.apply(d_params["map"], generated, train=True, rngs={"dropout": keys[6]})
    terms = losses.structure_losses(
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


def init_state(rng, batch, *, models: Models, extract_fn, g_tx, d_tx):
    s, _ = extract_fn(batch)
    s1h = losses.paired_one_hot(s)
    keys = jax.random.split(rng, 5)
    code_shape = vae.code_shape(s.shape[1:3], models.encoder.code_channels)
    code = jnp.zeros((s.shape[0], *code_shape), jnp.float32)
    g_params = {
        "encoder": models.encoder.init(keys[0], vae.encoder_input(s)),
        "decoder": models.decoder.init(keys[1], code),
        "mask": models.mask.init(keys[2], s1h),
    }
    d_params = {"map": models.map_disc.init(keys[3], s1h), "code": models.code_disc.init(keys[4], code)}
    return StructureState(
        step=jnp.zeros((), jnp.int32),
        g_params=g_params,
        d_params=d_params,
        g_opt=g_tx.init(g_params),
        d_opt=d_tx.init(d_params),
    )


def train_step(state: StructureState, batch, rng, *, models, extract_fn, g_tx, d_tx, weights, parity, update):
    """One G-side and one D-side update on a batch of real images."""
    s, organ = extract_fn(batch)
    forward = functools.partial(
        _forward, s=s, organ=organ, rng=rng, models=models, weights=weights, parity=parity
    )
    if update == "simultaneous":
        # Both sides' gradients from one forward pass, as the authors' single sess.run([G_op, D_op]).
        (g_loss, d_loss), vjp, terms = jax.vjp(forward, state.g_params, state.d_params, has_aux=True)
        g_grads, _ = vjp((jnp.ones_like(g_loss), jnp.zeros_like(d_loss)))
        _, d_grads = vjp((jnp.zeros_like(g_loss), jnp.ones_like(d_loss)))
        d_params, d_opt, d_updates = optim.apply(d_tx, d_grads, state.d_opt, state.d_params)
    elif update == "alternating":
        # D first, then G against the updated D (two forward passes).
        d_grads = jax.grad(lambda dp: forward(state.g_params, dp)[0][1])(state.d_params)
        d_params, d_opt, d_updates = optim.apply(d_tx, d_grads, state.d_opt, state.d_params)

        def g_objective(gp):
            (g_loss, _), terms = forward(gp, d_params)
            return g_loss, terms

        g_grads, terms = jax.grad(g_objective, has_aux=True)(state.g_params)
    else:
        raise ValueError(f"Unknown config.structure.update_mode {update!r}; choose one of {UPDATE_MODES}")
    g_params, g_opt, g_updates = optim.apply(g_tx, g_grads, state.g_opt, state.g_params)
    metrics = dict(terms)
    metrics.update(
        g_grad_norm=optax.global_norm(g_grads),
        d_grad_norm=optax.global_norm(d_grads),
        g_param_norm=optax.global_norm(g_params),
        d_param_norm=optax.global_norm(d_params),
        g_update_norm=optax.global_norm(g_updates),
        d_update_norm=optax.global_norm(d_updates),
    )
    new = state.replace(step=state.step + 1, g_params=g_params, d_params=d_params, g_opt=g_opt, d_opt=d_opt)
    return new, metrics


def generate_maps(g_params, key, n: int, *, models: Models, code_shape):
    """Draws n structure maps and their organ masks from noise, unfiltered (G_s, then G_m on the map).

    Returns:
      `(maps, masks, map_probs)`: maps and masks (n, H, W) int32 in {0, 1} (masks: 1 = organ), and the
      map's soft paired one-hot (n, H, W, 2).
    """
    prior = jax.random.normal(key, (n, *code_shape))
    probs = models.decoder.apply(g_params["decoder"], prior)
    maps = jnp.argmax(probs, axis=-1)
    mask_probs = models.mask.apply(
        g_params["mask"], losses.paired_one_hot(maps[..., None].astype(jnp.float32))
    )
    return maps, jnp.argmax(mask_probs, axis=-1), probs


def generate(g_params, d_params, key, n: int, *, models: Models, code_shape):
    """Draws n structure maps and masks from noise, with D_s's score of each (§5.4 step 1).

    Returns:
      `(maps, masks, scores)`: maps and masks (n, H, W) int32 in {0, 1} (masks: 1 = organ), scores (n,).
    """
    maps, masks, probs = generate_maps(g_params, key, n, models=models, code_shape=code_shape)
    # The authors score the soft map (dropout on); ours is deterministic: D_s in inference mode.
    scores = jnp.mean(models.map_disc.apply(d_params["map"], probs), axis=(1, 2, 3))
    return maps, masks, scores


def make_generate_fn(models: Models, code_shape):
    """`generate` jitted for these networks: `(g_params, d_params, key, n) -> (maps, masks, scores)`."""
    return jax.jit(functools.partial(generate, models=models, code_shape=tuple(code_shape)), static_argnums=3)


def sample_structures(
    state: StructureState,
    key: jax.Array,
    n: int,
    *,
    models: Models,
    code_shape,
    filter_params: structure_filter.FilterParams,
    generate_fn=None,
) -> dict[str, np.ndarray]:
    """Draws n filtered structure maps and masks (§5.4, Algorithm 3).

    A sample is accepted if D_s scores it at least `min_j_s`, or if the filled-contour mask of its map agrees
    with G_m's mask within MAE `mae`. Rejected slots are redrawn, up to `max_count` draws each; a slot that
    never passes keeps its best-scored draw. The filter runs on the host (OpenCV), outside jit.

    Args:
      generate_fn: `make_generate_fn(models, code_shape)`, made once by a caller that samples repeatedly
        (a new jit per call would compile again); made here when None.

    Returns:
      `maps`, `masks` (n, H, W) uint8; `scores` (n,); `accepted` (n,) bool; `draws` (n,) draws used.
    """
    gen = generate_fn or make_generate_fn(models, code_shape)
    best = None
    done = np.zeros(n, bool)
    draws = np.zeros(n, np.int32)
    for attempt in range(filter_params.max_count):
        maps, masks, scores = (
            np.asarray(x)
            for x in jax.device_get(gen(state.g_params, state.d_params, jax.random.fold_in(key, attempt), n))
        )
        ok = structure_filter.passes_filter_batch(maps, masks, d_scores=scores, params=filter_params)
        if best is None:
            best = dict(maps=maps.copy(), masks=masks.copy(), scores=scores.copy())
        todo = ~done
        better = todo & ((scores > best["scores"]) | ok)
        for name, value in (("maps", maps), ("masks", masks), ("scores", scores)):
            best[name][better] = value[better]
        draws[todo] += 1
        done |= todo & ok
        if done.all():
            break
    return dict(
        maps=best["maps"].astype(np.uint8),
        masks=best["masks"].astype(np.uint8),
        scores=best["scores"],
        accepted=done,
        draws=draws,
    )


# Decoded BRATS-like example -> the arrays this stage consumes.
preprocess = input_pipeline.image_and_label


def make_evaluator(config, *, models: Models, extract_fn, mesh):
    """Reconstruction error on eval images, sample acceptance rate and diversity, and a grid."""
    ev = config.structure.eval
    source = input_pipeline.open_source(config.data, config.data.eval_split)
    n_real = min(ev.num_examples, len(source))
    real = jax.tree.map(lambda *x: np.stack(x), *[preprocess(source[i]) for i in range(n_real)])
    filter_params = structure_filter.FilterParams(**config.structure.filter)
    key = jax.random.fold_in(jax.random.key(config.seed), 7)  # Fixed codes: comparable across steps.

    @jax.jit
    def reconstruct(g_params, batch):
        s, organ = extract_fn(batch)
        mean, _ = models.encoder.apply(g_params["encoder"], vae.encoder_input(s))
        recon = jnp.argmax(models.decoder.apply(g_params["decoder"], mean), axis=-1)
        mask = jnp.argmax(models.mask.apply(g_params["mask"], losses.paired_one_hot(s)), axis=-1)
        return s[..., 0], organ[..., 0], recon, mask

    def evaluate(state: StructureState, step: int):
        s, organ, recon, mask = (np.asarray(x) for x in jax.device_get(reconstruct(state.g_params, real)))
        code_shape = vae.code_shape(s.shape[1:3], models.encoder.code_channels)
        sampled = sample_structures(
            state, key, ev.num_samples, models=models, code_shape=code_shape, filter_params=filter_params
        )
        maps = sampled["maps"].reshape(len(sampled["maps"]), -1).astype(np.float32)
        # Mean pairwise fraction of differing pixels: near 0 means mode collapse.
        diversity = np.abs(maps[:, None] - maps[None]).mean(-1)
        pairs = len(maps) * (len(maps) - 1)
        scalars = {
            "recon_error": float(np.mean(recon != s)),
            "mask_error": float(np.mean(mask != organ)),
            "edge_fraction_real": float(s.mean()),
            "edge_fraction_sampled": float(sampled["maps"].mean()),
            "acceptance_first_draw": float(np.mean(sampled["draws"] == 1) * 1.0),
            "acceptance": float(sampled["accepted"].mean()),
            "diversity": float(diversity.sum() / max(pairs, 1)),
            "d_score_sampled": float(sampled["scores"].mean()),
        }
        rows = [[s[i], organ[i], recon[i], mask[i]] for i in range(min(4, len(s)))]
        sample_rows = [
            [
                sampled["maps"][i + j] if k == 0 else sampled["masks"][i + j]
                for j in range(2)
                for k in range(2)
            ]
            for i in range(0, min(8, ev.num_samples) - 1, 2)
        ]
        images = {
            "real_map_mask_recon_mask": writer_lib.image_grid(
                [[x.astype(np.float32) for x in r] for r in rows]
            ),
            "samples_map_mask": writer_lib.image_grid(
                [[x.astype(np.float32) for x in r] for r in sample_rows]
            ),
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


def build(config: ml_collections.ConfigDict, mesh=None) -> train.StageSpec:
    st = config.structure
    source = training_images(config, input_pipeline.gan_training_source(config.data))
    image_hw = tuple(preprocess(source[0])["image"].shape[:2])
    models = make_models(config, image_hw)
    extract_fn = functools.partial(
        real_structures, params=extraction_params(config), remove_lesions=st.remove_lesions
    )
    g_tx, d_tx = optim.make_optimizer(st.optim.g), optim.make_optimizer(st.optim.d)
    if st.update_mode not in UPDATE_MODES:
        raise ValueError(
            f"Unknown config.structure.update_mode {st.update_mode!r}; choose from {UPDATE_MODES}"
        )
    weights = dict(st.loss.weights)
    mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    return train.StageSpec(
        name=NAME,
        train=st.train,
        source=source,
        preprocess=preprocess,
        init_state=functools.partial(init_state, models=models, extract_fn=extract_fn, g_tx=g_tx, d_tx=d_tx),
        train_step=functools.partial(
            train_step,
            models=models,
            extract_fn=extract_fn,
            g_tx=g_tx,
            d_tx=d_tx,
            weights=weights,
            parity=st.loss.parity,
            update=st.update_mode,
        ),
        evaluate=make_evaluator(config, models=models, extract_fn=extract_fn, mesh=mesh),
    )


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at=None):
    """Trains stage A in `workdir/structure` unless already complete."""
    return train.run_unless_complete(NAME, build, config, workdir, stop_at=stop_at)


def load_state(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> StructureState:
    """The latest trained stage-A state of a run, for stage C's sampling."""
    return train.load_trained_state(build(config), config, workdir)
