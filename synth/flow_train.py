"""Training of the flow-matching generators: each stage's targets, the parameter EMA, the train step.

The pieces of :mod:`synth.flow` put together as a stage needs them: a :class:`FlowState` pytree
(step, params, EMA params, optimiser state) and a pure ``train_step(state, batch, rng[, frozen])`` for
the shared loop, with the stage's difference (what is generated, what conditions it) in one small
``prepare`` function: :func:`structure_targets` for stage A (structure map and organ mask, two
channels, unconditional) or :func:`image_targets` for stage B (all K·C image channels, conditioned,
with label dropout for classifier-free guidance).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from synth import configlib, flow, optim
from synth.models import grouped, sizes

Batch = Mapping[str, jax.Array]
# (batch, rng) -> (x1 in model space, conditioning maps or None): how a stage turns its batch into targets.
Prepare = Callable[[Batch, jax.Array], tuple[jax.Array, jax.Array | None]]
# (loss aux, batch, frozen) -> (extra loss, metrics): optional terms through frozen networks.
ExtraLoss = Callable[[dict[str, jax.Array], Batch, Any], tuple[jax.Array, dict[str, jax.Array]]]


# --- Targets of the two stages --------------------------------------------------------------------------


def structure_targets(
    batch: Batch, rng: jax.Array, *, structure_key: str = "structure", organ_key: str = "organ"
) -> tuple[jax.Array, None]:
    """Stage A's :data:`Prepare`: the structure map and organ mask as one 2-channel sample, unconditional.

    Args:
        batch: holds ``structure_key`` and ``organ_key``, each (B, H, W, 1) in {0, 1}.
        rng: unused (stage A has no label to drop).
        structure_key: batch key of the structure maps.
        organ_key: batch key of the organ masks.

    Returns:
        ``(x1, None)``: x1 (B, H, W, 2) in model space.
    """
    del rng
    x = jnp.concatenate([batch[structure_key], batch[organ_key]], axis=-1).astype(jnp.float32)
    return flow.to_model_space(x), None


def image_targets(
    batch: Batch,
    rng: jax.Array,
    *,
    num_classes: int,
    label_dropout: float = 0.0,
    image_key: str = "image",
    structure_key: str = "structure",
    label_key: str = "label",
    organ_key: str = "organ",
) -> tuple[jax.Array, jax.Array]:
    """Stage B's :data:`Prepare`: all modalities as one K·C-channel sample, conditioned, labels dropped.

    Args:
        batch: ``image`` (B, H, W, K·C) in [0, 1], ``structure`` and ``organ`` (B, H, W, 1),
            ``label`` (B, H, W) int.
        rng: key of the label dropout.
        num_classes: lesion classes including the background.
        label_dropout: probability that an example is trained with the null label (classifier-free
            guidance needs > 0; 0.1–0.2 is usual).
        image_key: batch key of the images.
        structure_key: batch key of the structure maps.
        label_key: batch key of the lesion labels.
        organ_key: batch key of the organ masks.

    Returns:
        ``(x1, cond)``: x1 (B, H, W, K·C) in model space, cond from :func:`synth.flow.conditioning_maps`.
    """
    images = batch[image_key]
    null = flow.label_dropout_mask(rng, images.shape[0], rate=label_dropout)
    cond = flow.conditioning_maps(
        batch[structure_key], batch[label_key], batch[organ_key], num_classes=num_classes, null=null
    )
    return flow.to_model_space(images.astype(jnp.float32)), cond


# --- Parameter averaging ---------------------------------------------------------------------------------


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
    """Exponential moving average of parameters: ``decay·ema + (1 − decay)·params``, leaf by leaf."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def ema_decay_at(step: jax.Array, decay: float, *, warmup: bool = True) -> jax.Array:
    """The EMA decay to use after update ``step`` (0-based).

    With ``warmup`` it is ``min(decay, (1 + step) / (10 + step))``: the average starts short and
    lengthens, so a run of a few hundred steps does not sample from an average still dominated by
    the random initialisation (at decay 0.999 it would be ~37 % initial weights after 1 000 steps).
    """
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


# --- Training -------------------------------------------------------------------------------------------


@flax.struct.dataclass
class FlowState:
    """All mutable state of a flow generator's training: one pytree.

    Attributes:
        step: int32 scalar, updates done.
        params: the velocity network's variables (``model.init``'s output).
        ema_params: their exponential moving average, used for sampling.
        opt_state: the optax state of ``params``.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def init_state(
    rng: jax.Array, batch: Batch, *, model: nn.Module, tx: optax.GradientTransformation, prepare: Prepare
) -> FlowState:
    """Initialise a :class:`FlowState` from an example batch (only its shapes matter).

    Args:
        rng: init key.
        batch: an example batch, as ``prepare`` reads it.
        model: the velocity network (e.g. :class:`synth.models.flow_unet.FlowUNet`).
        tx: the optimiser.
        prepare: the stage's targets, e.g. :func:`structure_targets` or a bound :func:`image_targets`.

    Returns:
        The state at step 0, with the EMA equal to the initial parameters.
    """
    x1, cond = prepare(batch, jax.random.fold_in(rng, 1))
    params = model.init(jax.random.fold_in(rng, 0), x1, jnp.zeros(x1.shape[:1], jnp.float32), cond)
    # A copy, not the same buffers: a jitted step that donates the state must not donate one buffer twice.
    ema_params = jax.tree.map(jnp.copy, params)
    return FlowState(
        step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params, opt_state=tx.init(params)
    )


def train_step(
    state: FlowState,
    batch: Batch,
    rng: jax.Array,
    frozen: Any = None,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    prepare: Prepare,
    time_distribution: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    ema_decay: float = 0.999,
    ema_warmup: bool = True,
    extra_loss: ExtraLoss | None = None,
    prediction: str = "velocity",
) -> tuple[FlowState, dict[str, jax.Array]]:
    """One optimisation step of a flow generator; pure ``(state, batch, rng[, frozen]) -> (state, metrics)``.

    Bind the keyword options with ``functools.partial`` and jit; under ``NamedSharding`` (state
    replicated, batch split on ``data``) the means in the loss make the gradient global.

    Args:
        state: current state.
        batch: the stage's batch, read only by ``prepare`` (and ``extra_loss``).
        rng: this step's key (the loop's ``fold_in(rng, step)``).
        frozen: optional pytree of frozen networks' parameters, handed to ``extra_loss``.
        model: the velocity network.
        tx: the optimiser.
        prepare: ``(batch, rng) -> (x1, cond)``: :func:`structure_targets` (stage A) or
            ``functools.partial(image_targets, num_classes=..., label_dropout=...)`` (stage B).
        time_distribution: see :func:`synth.flow.sample_time`.
        logit_mean: see :func:`synth.flow.sample_time`.
        logit_std: see :func:`synth.flow.sample_time`.
        ema_decay: EMA decay of the parameters.
        ema_warmup: see :func:`ema_decay_at`.
        prediction: what ``model`` outputs, the velocity or the clean sample (`synth.flow.PREDICTIONS`).
        extra_loss: optional ``(aux, batch, frozen) -> (loss, metrics)`` added to the flow loss, e.g.
            a lesion or registration term on ``aux["x1_hat"]``; ``aux`` is the aux dict of
            :func:`synth.flow.flow_matching_loss` plus ``x1`` and ``cond``. Its weight is its own.

    Returns:
        ``(new_state, metrics)``: scalars ``loss`` (total), ``flow_loss``, ``grad_norm``,
        ``param_norm``, ``update_norm``, ``ema_decay`` and whatever ``extra_loss`` reports.
    """
    x1, cond = prepare(batch, jax.random.fold_in(rng, 0))

    def loss_fn(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        velocity_fn = functools.partial(model.apply, params)
        flow_loss, aux = flow.flow_matching_loss(
            velocity_fn,
            x1,
            cond,
            jax.random.fold_in(rng, 1),
            time_distribution=time_distribution,
            logit_mean=logit_mean,
            logit_std=logit_std,
            prediction=prediction,
        )
        metrics = {"flow_loss": flow_loss}
        total = flow_loss
        if extra_loss is not None:
            extra, extra_metrics = extra_loss({**aux, "x1": x1, "cond": cond}, batch, frozen)
            total = total + extra
            metrics.update(extra_metrics)
        return total, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, updates = optim.apply(tx, grads, state.opt_state, state.params)
    decay = ema_decay_at(state.step, ema_decay, warmup=ema_warmup)
    ema_params = ema_update(state.ema_params, params, decay)
    metrics = {
        "loss": loss,
        **metrics,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
        "update_norm": optax.global_norm(updates),
        "ema_decay": decay,
    }
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
    return new_state, metrics


# --- One stage's flow settings (`config.<stage>.flow`) ----------------------------------------------------


GENERATORS = ("gan", "flow")  # config.structure.generator and config.synthesis.generator


def is_flow_stage(config: ml_collections.ConfigDict, stage: str) -> bool:
    """Whether `config.<stage>.generator` chooses the flow family (stage "structure" or "synthesis")."""
    # A workdir written before the flow family has no such key: its stage is the paper's GAN.
    generator = config[stage].get("generator", "gan")
    return configlib.check_choice(f"{stage}.generator", generator, GENERATORS) == "flow"


def check_settings(settings: ml_collections.ConfigDict, key: str) -> None:
    """Raises a ValueError naming `config.<key>.<field>` for any unknown or inconsistent flow setting.

    The settings both stages share: time distribution, prediction, EMA decay, network size, sampler.
    """
    configlib.check_choice(f"{key}.time_distribution", settings.time_distribution, flow.TIME_DISTRIBUTIONS)
    configlib.check_choice(f"{key}.sampler.method", settings.sampler.method, flow.SAMPLERS)
    configlib.check_choice(f"{key}.prediction", settings.get("prediction", "velocity"), flow.PREDICTIONS)
    if int(settings.sampler.num_steps) < 1:
        raise ValueError(f"config.{key}.sampler.num_steps must be >= 1, got {settings.sampler.num_steps}")
    if not 0.0 <= settings.ema_decay < 1.0:
        raise ValueError(f"config.{key}.ema_decay must be in [0, 1), got {settings.ema_decay}")
    sizes.variant_sizes(settings.size, "flow_unet")  # Names the variant if unknown.


def step_options(
    settings: ml_collections.ConfigDict,
    *,
    model: nn.Module,
    prepare: Prepare,
    extra_loss: ExtraLoss | None = None,
) -> dict[str, Any]:
    """:func:`train_step`'s keyword options (all but ``tx``) from a stage's flow settings."""
    return dict(
        model=model,
        prepare=prepare,
        time_distribution=settings.time_distribution,
        logit_mean=settings.logit_mean,
        logit_std=settings.logit_std,
        ema_decay=settings.ema_decay,
        # Workdirs from before the clean-sample parameterisation trained velocity nets.
        prediction=settings.get("prediction", "velocity"),
        extra_loss=extra_loss,
    )


def sample_configured(
    network: flow.VelocityFn,
    key: jax.Array,
    cond: jax.Array | None,
    null_cond: jax.Array | None = None,
    *,
    settings: ml_collections.ConfigDict,
    shape: tuple[int, ...],
    features: int | None = None,
    shards: int = 1,
) -> jax.Array:
    """Samples (``shape``, in [0, 1]) of a trained net with a stage's sampler settings; deterministic per key.

    ``network`` is the bound net, ``(x_t, t, cond) -> output``; a clean-sample net (``prediction="data"``)
    is turned into its velocity, and its last step is Euler's, which lands on the prediction. With the
    net's first-level width ``features``, a few examples per shard are integrated at a time on CPU
    (`synth.models.grouped`; ``shards``: the batch's data-parallel split); the samples are the same.
    """
    sampler = settings.sampler
    predicts_data = settings.get("prediction", "velocity") == "data"
    if predicts_data:
        network = flow.velocity_from_data(network)
    return flow.sample(
        network,
        key,
        cond,
        null_cond,
        shape=tuple(shape),
        method=sampler.method,
        num_steps=int(sampler.num_steps),
        guidance=float(sampler.guidance),
        euler_last_step=predicts_data,
        group=grouped.group_size(shape[0], shape[1:3], features, shards=shards) if features else None,
        shards=shards,
    )
