"""Conditional flow matching (rectified flow): paths, loss, conditioning and label dropout, samplers.

The flow family's generators (stage A: structure map and organ mask; stage B: all K modalities of a
lesioned image) learn a velocity field ``v(x_t, t, cond)`` (:class:`synth.models.flow_unet.FlowUNet`)
that carries Gaussian noise to data along straight lines (rectified flow, Liu et al. 2022; flow
matching, Lipman et al. 2022). Training (targets of each stage, EMA, the train step) is in
:mod:`synth.flow_train`. Conventions, used by both modules:

* **Time** runs from noise to data: ``t = 0`` is the noise ``x0 ~ N(0, I)``, ``t = 1`` the data ``x1``,
  and ``x_t = (1 − t)·x0 + t·x1``. The target velocity is constant along a path, ``v = x1 − x0``.
  (SD3 and diffusers count the other way, t = 1 = noise.)
* **Model space.** Images live in [0, 1] everywhere else in synth; the flow works on [−1, 1]
  (:func:`to_model_space`, :func:`to_image_space`) so the data have the noise's scale and are centred.
  Samplers return images in [0, 1], clipped.
* **Conditioning maps** (stage B) are channels concatenated to ``x_t``: ``[structure (1), lesion
  one-hot (num_classes), organ (1)]`` (:func:`conditioning_maps`). The *null label* sets the one-hot
  channels to zero: a real one-hot has exactly one channel at 1 in every pixel (background is a
  class), so the null label is distinct from every real label. Label dropout trains the same
  network as the label-unconditional model, and classifier-free guidance combines the two at
  sampling time: ``v = v_uncond + w·(v_cond − v_uncond)``.

Every function is pure and jittable; options after ``*`` are static (bind them with
``functools.partial`` or ``static_argnames``). Randomness comes from the key argument through
``jax.random.fold_in``, never from a global state, and draws whole global arrays, so a jitted call
gives the same numbers on any mesh.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from synth import sharding
from synth.models import grouped

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
# What the network outputs: the velocity x1 − x0 (rectified flow), or the clean sample x1 itself, whose
# velocity at (x_t, t) is (x1 − x_t)/(1 − t) (`velocity_from_data`): it can give an exactly flat background
# at t → 1, where a velocity network must cancel the remaining noise with a 1/(1 − t) gain.
PREDICTIONS = ("velocity", "data")
MIN_REMAINING = 0.02  # (1 − t) floor of `velocity_from_data` (t = 1 itself is only Heun's last corrector).
SAMPLERS = ("euler", "heun")

# (x_t, t, cond) -> velocity, with t of shape (B,) and cond None or (B, H, W, C_cond).
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]

# --- Spaces and paths -------------------------------------------------------------------------------------


def to_model_space(images: jax.Array) -> jax.Array:
    """Map images in [0, 1] to the flow's data space [−1, 1]."""
    return 2.0 * images - 1.0


def to_image_space(x: jax.Array) -> jax.Array:
    """Map the flow's data space [−1, 1] back to [0, 1] (no clipping)."""
    return 0.5 * (x + 1.0)


def sample_time(
    rng: jax.Array, batch_size: int, *, distribution: str = "uniform", mean: float = 0.0, std: float = 1.0
) -> jax.Array:
    """Draw training times t in (0, 1), one per example.

    Args:
        rng: key.
        batch_size: number of times.
        distribution: ``"uniform"`` (U[0, 1)) or ``"logit_normal"`` (``sigmoid(mean + std·n)``,
            n ~ N(0, 1), as SD3; it puts more weight on mid-path times, where the velocity is
            hardest to predict). With our t = 1 = data convention, a negative ``mean`` favours
            noisier times.
        mean: logit-normal location.
        std: logit-normal scale.

    Returns:
        (batch_size,) float32.

    Raises:
        ValueError: unknown distribution.
    """
    if distribution == "uniform":
        return jax.random.uniform(rng, (batch_size,), jnp.float32)
    if distribution == "logit_normal":
        return jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch_size,), jnp.float32))
    raise ValueError(f"Unknown time distribution {distribution!r}; valid: {TIME_DISTRIBUTIONS}.")


def velocity_from_data(data_fn: VelocityFn, *, min_remaining: float = MIN_REMAINING) -> VelocityFn:
    """The velocity field of a clean-sample predictor: ``(x1_hat(x_t, t) − x_t) / max(1 − t, floor)``.

    On the uniform grid of `solve` Euler's last step from t = 1 − dt lands exactly on the prediction.
    """

    def velocity(x: jax.Array, t: jax.Array, cond: jax.Array | None) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        remaining = jnp.maximum(1.0 - _per_example(t, x), min_remaining)
        return (data_fn(x, t, cond) - x) / remaining

    return velocity


def _per_example(t: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape times (B,) to broadcast against x (B, ...)."""
    return t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
    """The point ``x_t = (1 − t)·x0 + t·x1`` of the straight path from noise x0 to data x1 (t: (B,))."""
    tb = _per_example(t, x1)
    return (1.0 - tb) * x0 + tb * x1


def flow_matching_loss(
    velocity_fn: VelocityFn,
    x1: jax.Array,
    cond: jax.Array | None,
    rng: jax.Array,
    *,
    time_distribution: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    prediction: str = "velocity",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Rectified-flow loss: MSE between the predicted and the path's velocity ``x1 − x0``.

    With ``prediction="data"`` ``velocity_fn`` outputs the clean sample and the loss is its MSE to x1
    (the velocity loss weighted by (1 − t)², which keeps the loss bounded as t → 1).

    Args:
        velocity_fn: ``(x_t, t, cond) -> v``, e.g. ``functools.partial(model.apply, params)``.
        x1: data in model space (B, H, W, C).
        cond: conditioning maps (B, H, W, C_cond) or None; passed through unchanged (label dropout
            is the caller's, see :func:`synth.flow_train.image_targets`).
        rng: key; the noise and the times are drawn from it.
        time_distribution: see :func:`sample_time`.
        logit_mean: see :func:`sample_time`.
        logit_std: see :func:`sample_time`.

    Returns:
        ``(loss, aux)``: the mean squared error over all elements (float32 scalar), and a dict with
        ``x_t``, ``t`` (B,), ``velocity`` (the prediction), ``target`` (x1 − x0), ``noise`` (x0) and
        ``x1_hat = x_t + (1 − t)·velocity``, the one-step estimate of the clean sample (model space)
        through which auxiliary terms can reach frozen networks.
    """
    noise = jax.random.normal(jax.random.fold_in(rng, 0), x1.shape, x1.dtype)
    t = sample_time(
        jax.random.fold_in(rng, 1),
        x1.shape[0],
        distribution=time_distribution,
        mean=logit_mean,
        std=logit_std,
    )
    x_t = interpolate(noise, x1, t)
    target = x1 - noise
    if prediction == "data":
        x1_hat = velocity_fn(x_t, t, cond)
        loss = jnp.mean(jnp.square(x1_hat.astype(jnp.float32) - x1.astype(jnp.float32)))
        velocity = velocity_from_data(lambda x, tt, c: x1_hat)(x_t, t, cond)
        aux = {"x_t": x_t, "t": t, "velocity": velocity, "target": target, "noise": noise, "x1_hat": x1_hat}
        return loss, aux
    if prediction != "velocity":
        raise ValueError(f"Unknown prediction {prediction!r}; valid: {PREDICTIONS}.")
    velocity = velocity_fn(x_t, t, cond)
    loss = jnp.mean(jnp.square(velocity.astype(jnp.float32) - target.astype(jnp.float32)))
    x1_hat = x_t + (1.0 - _per_example(t, x_t)) * velocity
    aux = {"x_t": x_t, "t": t, "velocity": velocity, "target": target, "noise": noise, "x1_hat": x1_hat}
    return loss, aux


# --- Conditioning and label dropout ---------------------------------------------------------------------


def label_channels(num_classes: int) -> slice:
    """The lesion one-hot's channels inside :func:`conditioning_maps`' output."""
    return slice(1, 1 + num_classes)


def conditioning_channels(num_classes: int) -> int:
    """Channels of :func:`conditioning_maps`' output: structure, ``num_classes`` one-hot, organ."""
    return num_classes + 2


def conditioning_maps(
    structure: jax.Array,
    label: jax.Array,
    organ: jax.Array,
    *,
    num_classes: int,
    null: jax.Array | None = None,
) -> jax.Array:
    """Stage B's conditioning: ``[structure, one_hot(label), organ]`` along channels.

    Args:
        structure: structure maps (B, H, W, 1) in [0, 1].
        label: lesion labels (B, H, W) (or (B, H, W, 1)) int, values in [0, num_classes), 0 = no lesion.
        organ: organ masks (B, H, W, 1) in {0, 1}.
        num_classes: lesion classes including the background.
        null: optional (B,) bool: where True the example gets the null label (zero one-hot
            channels); structure and organ are always kept.

    Returns:
        (B, H, W, num_classes + 2) float32.
    """
    if label.ndim == 4:
        label = label[..., 0]
    one_hot = jax.nn.one_hot(label, num_classes, dtype=jnp.float32)
    cond = jnp.concatenate([structure.astype(jnp.float32), one_hot, organ.astype(jnp.float32)], axis=-1)
    if null is not None:
        cond = drop_labels(cond, null, num_classes=num_classes)
    return cond


def drop_labels(cond: jax.Array, null: jax.Array, *, num_classes: int) -> jax.Array:
    """Replace the lesion one-hot of the examples where ``null`` (B,) is True by the null label (zeros)."""
    cond = jnp.asarray(cond)
    keep = jnp.logical_not(null)[:, None, None, None].astype(cond.dtype)
    labels = label_channels(num_classes)
    return cond.at[..., labels].multiply(keep)


def null_conditioning(cond: jax.Array, *, num_classes: int) -> jax.Array:
    """``cond`` with every example's lesion label replaced by the null label: the unguided branch's input."""
    return drop_labels(cond, jnp.ones(cond.shape[:1], bool), num_classes=num_classes)


def label_dropout_mask(rng: jax.Array, batch_size: int, *, rate: float) -> jax.Array:
    """Which examples lose their label this step: (B,) bool, each True with probability ``rate``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label dropout rate must be in [0, 1], got {rate}.")
    return jax.random.bernoulli(rng, rate, (batch_size,))


# --- Sampling ----------------------------------------------------------------------------------------------


def structure_from_sample(samples: jax.Array, *, threshold: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """Stage A's outputs from a 2-channel sample in [0, 1]: ``(maps, masks)``, (B, H, W) int32 in {0, 1}.

    The form in which stage A's GAN sampler returns its maps and masks (masks: 1 = organ).
    """
    binary = (samples > threshold).astype(jnp.int32)
    return binary[..., 0], binary[..., 1]


def _is_static(value: Any, number: float) -> bool:
    """True when ``value`` is a Python number equal to ``number`` (known when tracing)."""
    return isinstance(value, int | float) and float(value) == number


def guided_velocity(
    velocity_fn: VelocityFn,
    x: jax.Array,
    t: jax.Array,
    cond: jax.Array | None,
    null_cond: jax.Array | None = None,
    *,
    guidance: float | jax.Array = 1.0,
) -> jax.Array:
    """Classifier-free guided velocity ``v_uncond + w·(v_cond − v_uncond)``.

    A Python ``guidance`` of 1 calls the conditional model alone and 0 the null-label model alone
    (one network pass each). Any other value, or a traced one (to sweep w without recompiling),
    evaluates both in one pass over a doubled batch.

    Args:
        velocity_fn: ``(x, t, cond) -> v``.
        x: current samples (B, ...).
        t: times (B,).
        cond: conditioning maps with the requested labels (or None: unconditional model).
        null_cond: the same maps with the null label (:func:`null_conditioning`); needed unless
            ``guidance`` is the Python number 1.
        guidance: w; 1 = conditional model, 0 = label-unconditional model, > 1 extrapolates.

    Returns:
        The velocity (B, ...).
    """
    if _is_static(guidance, 1.0):
        return velocity_fn(x, t, cond)
    if null_cond is None:
        raise ValueError("guidance other than 1 needs null_cond (the conditioning with the null label).")
    if _is_static(guidance, 0.0):
        return velocity_fn(x, t, null_cond)
    both = velocity_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([cond, null_cond]))
    v_cond, v_uncond = jnp.split(both, 2)
    return v_uncond + jnp.asarray(guidance, v_cond.dtype) * (v_cond - v_uncond)


def solve(
    velocity_fn: VelocityFn,
    x0: jax.Array,
    cond: jax.Array | None = None,
    null_cond: jax.Array | None = None,
    *,
    method: str = "euler",
    num_steps: int = 32,
    guidance: float | jax.Array = 1.0,
    euler_last_step: bool = False,
) -> jax.Array:
    """Integrate dx/dt = v(x, t) from t = 0 to 1 on a uniform grid, in one ``lax.scan``.

    Euler takes one network evaluation per step (error O(1/num_steps)); Heun's method (explicit
    trapezoid: an Euler predictor, then the mean of the slopes at both ends) takes two and has error
    O(1/num_steps²), so it reaches Euler's accuracy in far fewer steps. Heun also corrects the last
    step: unlike a diffusion ODE, the rectified-flow velocity is finite at t = 1. A clean-sample
    predictor's velocity is not defined at t = 1 (`velocity_from_data`): with ``euler_last_step`` the
    last step is Euler's, which lands on the prediction (as EDM's sampler skips its last correction).

    Args:
        velocity_fn: ``(x, t, cond) -> v``.
        x0: starting noise (B, ...) in model space.
        cond: conditioning maps or None.
        null_cond: null-label conditioning (see :func:`guided_velocity`).
        method: ``"euler"`` or ``"heun"``.
        num_steps: steps (static; network evaluations: ``num_steps``, Heun ``2·num_steps``).
        guidance: classifier-free guidance scale (see :func:`guided_velocity`).

    Returns:
        x at t = 1 (B, ...), model space, unclipped.

    Raises:
        ValueError: unknown method or num_steps < 1.
    """
    if method not in SAMPLERS:
        raise ValueError(f"Unknown sampler {method!r}; valid: {SAMPLERS}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    dt = 1.0 / num_steps
    batch = x0.shape[0]

    def velocity(x: jax.Array, t: jax.Array) -> jax.Array:
        return guided_velocity(
            velocity_fn, x, jnp.full((batch,), t, jnp.float32), cond, null_cond, guidance=guidance
        ).astype(x.dtype)

    def step(x: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
        t = i.astype(jnp.float32) * dt  # From the index, not accumulated: no drift of t over many steps.
        slope = velocity(x, t)
        if method == "euler":
            return x + dt * slope, None
        predicted = x + dt * slope
        corrected = x + 0.5 * dt * (slope + velocity(predicted, t + dt))
        if euler_last_step:
            corrected = jnp.where(i == num_steps - 1, predicted, corrected)
        return corrected, None

    x1, _ = jax.lax.scan(step, x0, jnp.arange(num_steps))
    return x1


def sample(
    velocity_fn: VelocityFn,
    rng: jax.Array,
    cond: jax.Array | None = None,
    null_cond: jax.Array | None = None,
    *,
    shape: tuple[int, ...],
    method: str = "euler",
    num_steps: int = 32,
    guidance: float | jax.Array = 1.0,
    euler_last_step: bool = False,
    group: int | None = None,
    shards: int = 1,
) -> jax.Array:
    """Draw samples: noise from ``rng``, :func:`solve`, then back to [0, 1] and clipped.

    Deterministic for a key (the key only draws the starting noise). Jit it with ``shape``,
    ``method``, ``num_steps`` (and a Python ``guidance``) static, ``velocity_fn`` bound, e.g.
    ``functools.partial(model.apply, ema_params)`` inside the jitted function.

    Args:
        velocity_fn: ``(x, t, cond) -> v``.
        rng: key of the starting noise.
        cond: conditioning maps (B, H, W, C_cond) or None (stage A).
        null_cond: null-label conditioning, needed for guidance other than 1.
        shape: the sample shape (B, H, W, K·C).
        method: ``"euler"`` or ``"heun"``.
        num_steps: integration steps.
        guidance: classifier-free guidance scale.
        euler_last_step: see :func:`solve` (for a clean-sample predictor).
        group: solve ``group`` examples per shard at a time (`synth.models.grouped`; the noise is drawn
            for the whole batch first, so the samples do not depend on it); None: the whole batch.
        shards: the batch's data-parallel split, for ``group``.

    Returns:
        Samples (B, H, W, K·C) float32 in [0, 1].
    """
    x0 = jax.random.normal(rng, shape, jnp.float32)
    if shards > 1:  # Drawn split like the batch under a mesh, or each device draws and solves all of it.
        x0 = sharding.split_like_batch(x0)
    integrate = functools.partial(
        solve,
        velocity_fn,
        method=method,
        num_steps=num_steps,
        guidance=guidance,
        euler_last_step=euler_last_step,
    )
    x1 = grouped.apply(
        lambda args: integrate(*args), (x0, cond, null_cond), group or shape[0] // shards, shards=shards
    )
    return jnp.clip(to_image_space(x1), 0.0, 1.0)
