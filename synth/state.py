"""The two training-state pytrees every stage uses, and the one optimiser update that advances them.

`TrainState` holds one network (the lesion processors: segmentors, classifier, detector); `GanState` a
generator side and a discriminator side (stages A, translator and B). Their field names are what the
checkpoints of every existing workdir hold, so they must not change. Optax transforms stay outside the
state and are bound by the stage with `functools.partial`.

`apply_gradients` is the one update: an optax step of one side, with the L2 norms of its gradients,
parameters and update for the log. `update` and `gan_update` apply it to the states.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import optax

from synth import optim


@flax.struct.dataclass
class TrainState:
    """All mutable state of a single-network stage."""

    step: jax.Array
    # The lesion processors stack one network per modality on a leading axis (see `synth.lesion`).
    params: Any
    opt_state: Any


@flax.struct.dataclass
class GanState:
    """All mutable state of a G/D stage; frozen networks of earlier stages are not part of it."""

    step: jax.Array
    g_params: Any
    d_params: Any
    g_opt: Any
    d_opt: Any


def apply_gradients(
    tx: optax.GradientTransformation, grads, opt_state, params, *, prefix: str = ""
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One optimiser step of one network (or one side of a GAN).

    Returns:
      `(params, opt_state, norms)`: norms are `<prefix>grad_norm`, `<prefix>param_norm` (after the step)
      and `<prefix>update_norm`.
    """
    params, opt_state, updates = optim.apply(tx, grads, opt_state, params)
    norms = {
        f"{prefix}grad_norm": optax.global_norm(grads),
        f"{prefix}param_norm": optax.global_norm(params),
        f"{prefix}update_norm": optax.global_norm(updates),
    }
    return params, opt_state, norms


def init(params, tx: optax.GradientTransformation) -> TrainState:
    """A single-network state at step 0."""
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params))


def init_gan(g_params, d_params, *, g_tx, d_tx) -> GanState:
    """A G/D state at step 0."""
    return GanState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        g_params=g_params,
        d_params=d_params,
        g_opt=g_tx.init(g_params),
        d_opt=d_tx.init(d_params),
    )


def update(state: TrainState, grads, tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """`state` one step on: its network updated with `grads`; returns the norms for the log."""
    params, opt_state, norms = apply_gradients(tx, grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), norms


def gan_update(state: GanState, g_grads, d_grads, *, g_tx, d_tx) -> tuple[GanState, dict]:
    """Both sides' optimiser updates of a G/D state, from gradients taken at the same parameters."""
    g_params, g_opt, g_norms = apply_gradients(g_tx, g_grads, state.g_opt, state.g_params, prefix="g_")
    d_params, d_opt, d_norms = apply_gradients(d_tx, d_grads, state.d_opt, state.d_params, prefix="d_")
    new = state.replace(step=state.step + 1, g_params=g_params, d_params=d_params, g_opt=g_opt, d_opt=d_opt)
    return new, {**g_norms, **d_norms}
