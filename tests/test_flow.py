"""The flow-matching generator family: network, rectified-flow training, samplers, guidance, sharded step.

Covered: the velocity U-Net's shapes, rectified-flow training on a toy, Euler and Heun, classifier-free
guidance, label dropout, EMA and the sharded train step.

Compiles dominate on CPU, so one module-scoped toy (a conditional pair of 8×8 two-channel images, a 1-level
velocity net) is trained once and its jitted step, forward pass and samplers are shared by the tests.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synth import flow, flow_train, sharding
from synth.models import sizes
from synth.models.flow_unet import FlowUNet, time_features
from tests.equivalence import assert_same_training

HW = 8
CHANNELS = 2
NUM_CLASSES = 2
BATCH = 32
STEPS = 200
LABEL_DROPOUT = 0.2
# The toy's velocity net: the tiny widths, one level (8×8 needs no depth; 3 levels cost 4x the time).
TOY_MODEL = FlowUNet(out_channels=CHANNELS, features=8, num_levels=1, groups=4)


def _toy_targets() -> np.ndarray:
    """Two registered 2-channel images, A and 1 − A, whose pixels are 0.2 or 0.8: 0.6 apart everywhere."""
    yy, xx = np.mgrid[:HW, :HW]
    a = np.stack([np.where(yy < HW // 2, 0.8, 0.2), np.where(xx < HW // 2, 0.8, 0.2)], axis=-1)
    return np.stack([a, 1.0 - a]).astype(np.float32)


TARGETS = _toy_targets()


def _toy_batch(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Stage B's batch form for the toy: label k (a full-image lesion class) asks for image k."""
    n = labels.shape[0]
    return {
        "image": TARGETS[labels],
        "label": np.broadcast_to(labels[:, None, None], (n, HW, HW)).astype(np.int32),
        "structure": np.zeros((n, HW, HW, 1), np.float32),
        "organ": np.ones((n, HW, HW, 1), np.float32),
    }


def _toy_cond(labels: np.ndarray) -> jax.Array:
    batch = _toy_batch(labels)
    return flow.conditioning_maps(batch["structure"], batch["label"], batch["organ"], num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def toy():
    """The toy trained for STEPS steps on one device; returns its initial and final states and step fn."""
    # Cosine decay to 0: the last steps refine instead of jittering at the full learning rate.
    tx = optax.adam(optax.cosine_decay_schedule(1e-2, STEPS))
    prepare = functools.partial(
        flow_train.image_targets, num_classes=NUM_CLASSES, label_dropout=LABEL_DROPOUT
    )
    step_fn = functools.partial(
        flow_train.train_step, model=TOY_MODEL, tx=tx, prepare=prepare, ema_decay=0.99
    )
    step = jax.jit(step_fn)
    rng = np.random.default_rng(0)
    batches = [_toy_batch(rng.integers(0, 2, BATCH)) for _ in range(STEPS)]
    init = jax.jit(functools.partial(flow_train.init_state, model=TOY_MODEL, tx=tx, prepare=prepare))
    state0 = init(jax.random.key(0), batches[0])
    state = state0
    for i, batch in enumerate(batches):
        state, metrics = step(state, batch, jax.random.key(i))
    return {
        "state0": state0,
        "state": state,
        "step_fn": step_fn,
        "step": step,
        "batches": batches,
        "metrics": metrics,
    }


@functools.partial(jax.jit, static_argnames=("method", "num_steps", "guidance"))
def _generate(params, rng, cond, null_cond=None, *, method, num_steps, guidance=1.0):
    velocity_fn = functools.partial(TOY_MODEL.apply, params)
    return flow.sample(
        velocity_fn,
        rng,
        cond,
        null_cond,
        shape=(*cond.shape[:3], CHANNELS),
        method=method,
        num_steps=num_steps,
        guidance=guidance,
    )


@jax.jit
def _velocities(params, x, t, cond, null_cond, guidance):
    """v_cond, v_null and the guided velocity through the doubled-batch path (guidance traced)."""
    v_fn = functools.partial(TOY_MODEL.apply, params)
    guided = flow.guided_velocity(v_fn, x, t, cond, null_cond, guidance=guidance)
    return v_fn(x, t, cond), v_fn(x, t, null_cond), guided


EVAL_LABELS = np.array([0] * 8 + [1] * 8)


@pytest.fixture(scope="module")
def euler_samples(toy):
    """Conditional samples from the EMA parameters: Euler, 64 steps, guidance 1, key 1."""
    return np.asarray(
        _generate(
            toy["state"].ema_params, jax.random.key(1), _toy_cond(EVAL_LABELS), method="euler", num_steps=64
        )
    )


# --- The network ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(64, 64), (184, 144), (512, 512)])
@pytest.mark.parametrize("channels", [4, 3, 2])
@pytest.mark.usefixtures("xla_convolutions")
def test_shapes(hw, channels, variant="base"):
    # K·C = 4 (BRATS: 4 modalities) and 3 (one RGB modality) are stage B, conditioned on the structure map,
    # a 5- or 2-class one-hot and the organ mask; 2 is stage A (map and mask), unconditional. Traced only.
    model = FlowUNet(out_channels=channels, **sizes.flow_unet_kwargs(variant, hw))
    x = jax.ShapeDtypeStruct((2, *hw, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    num_classes = {4: 5, 3: 2, 2: None}[channels]
    cond = None if num_classes is None else jax.ShapeDtypeStruct((2, *hw, num_classes + 2), jnp.float32)
    out, params = jax.eval_shape(lambda *args: model.init_with_output(jax.random.key(0), *args), x, t, cond)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert params["params"]["out_conv"]["kernel"].shape == (3, 3, model.features, channels)


def test_odd_sizes():
    # 45×37 ceil-halves to 23×19, 12×10, 6×5: the up-sampled maps are cropped to the odd skips.
    test_shapes((45, 37), 4, variant="tiny")


def test_up_sampling_in_subpixel_form_is_the_same_net(monkeypatch):
    """Where `conv` takes the sub-pixel form of the up-sampling convs, the velocity is unchanged."""
    from synth.models import conv

    model = FlowUNet(out_channels=2, features=8, num_levels=2, groups=4)
    x, t = jax.random.normal(jax.random.key(0), (2, 12, 8, 2)), jnp.asarray([0.2, 0.7])
    params = model.init(jax.random.key(1), x, t)
    plain = model.apply(params, x, t)
    monkeypatch.setattr(conv, "MIN_PIXELS", 1)
    jaxpr = str(jax.make_jaxpr(model.apply)(params, x, t))
    assert "f32[2,2,16,64]" in jaxpr and "f32[2,2,8,32]" in jaxpr  # up1, up0: 2×2 taps into four phases.
    np.testing.assert_allclose(model.apply(params, x, t), plain, rtol=0, atol=1e-5)


def test_mixed_precision_computes_in_bfloat16():
    model = FlowUNet(out_channels=2, features=8, num_levels=1, groups=4, dtype=jnp.bfloat16)
    x, t = jax.ShapeDtypeStruct((2, 8, 8, 2), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32)
    out, params = jax.eval_shape(lambda *args: model.init_with_output(jax.random.key(0), *args), x, t)
    assert out.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_size_table_has_every_variant():
    for variant in ("tiny", "small", "base"):
        kwargs = sizes.flow_unet_kwargs(variant, (64, 64))
        assert set(kwargs) == {"features", "num_levels", "groups"}
    with pytest.raises(ValueError, match="too small"):
        sizes.flow_unet_kwargs("tiny", (4, 4))


def test_untrained_net_predicts_zero_and_rejects_wrong_channels(toy):
    params = toy["state0"].params
    cond = _toy_cond(EVAL_LABELS)
    x = jax.random.normal(jax.random.key(3), (16, HW, HW, CHANNELS))
    null = flow.null_conditioning(cond, num_classes=NUM_CLASSES)
    v, _, _ = _velocities(params, x, jnp.linspace(0.0, 1.0, 16), cond, null, 1.0)
    assert float(jnp.abs(v).max()) == 0.0  # The zero output conv: v = 0 until training moves it.
    with pytest.raises(ValueError, match="x_t must be"):
        jax.eval_shape(TOY_MODEL.apply, params, jnp.ones((2, HW, HW, 3)), jnp.zeros((2,)))


def test_time_features_separate_times():
    f = time_features(jnp.array([0.0, 0.001, 0.5, 1.0]), 16)
    assert f.shape == (4, 32)
    dists = np.linalg.norm(np.asarray(f)[:, None] - np.asarray(f)[None], axis=-1)
    assert (dists + np.eye(4) > 0.01).all()


def test_time_embedding_changes_the_velocity(toy):
    params = toy["state"].ema_params
    cond = _toy_cond(EVAL_LABELS)
    x = jax.random.normal(jax.random.key(3), (16, HW, HW, CHANNELS))
    null = flow.null_conditioning(cond, num_classes=NUM_CLASSES)
    early, _, _ = _velocities(params, x, jnp.full((16,), 0.2), cond, null, 1.0)
    late, _, _ = _velocities(params, x, jnp.full((16,), 0.8), cond, null, 1.0)
    assert float(jnp.abs(early - late).mean()) > 0.05


# --- Paths, loss, conditioning ----------------------------------------------------------------------------


def test_model_space_round_trip_and_path_ends():
    rng = np.random.default_rng(0)
    images = rng.random((2, 4, 4, 3)).astype(np.float32)
    x1 = flow.to_model_space(images)
    assert float(x1.min()) >= -1.0 and float(x1.max()) <= 1.0
    np.testing.assert_allclose(flow.to_image_space(x1), images, atol=1e-6)
    x0 = rng.normal(size=x1.shape).astype(np.float32)
    np.testing.assert_array_equal(flow.interpolate(x0, x1, jnp.zeros(2)), x0)
    np.testing.assert_allclose(flow.interpolate(x0, x1, jnp.ones(2)), x1, atol=1e-6)


@jax.jit
def _oracle_and_zero_losses(x1, rng):
    def oracle(x_t, t, cond):  # Not a network: knows x1, so it returns the true velocity (x1 − x_t)/(1 − t).
        return (x1 - x_t) / (1.0 - t[:, None, None, None])

    def zero(x_t, t, cond):
        return jnp.zeros_like(x_t)

    return flow.flow_matching_loss(oracle, x1, None, rng), flow.flow_matching_loss(zero, x1, None, rng)


def test_loss_aux_is_consistent():
    x1 = flow.to_model_space(np.random.default_rng(0).random((4, 4, 4, 2)).astype(np.float32))
    (loss, aux), (loss0, aux0) = _oracle_and_zero_losses(x1, jax.random.key(1))
    assert float(loss) < 1e-8
    np.testing.assert_allclose(aux["x1_hat"], x1, atol=1e-5)
    np.testing.assert_allclose(aux["target"], x1 - aux["noise"], atol=1e-6)
    np.testing.assert_allclose(aux["x_t"], flow.interpolate(aux["noise"], x1, aux["t"]), atol=1e-6)
    np.testing.assert_allclose(loss0, jnp.mean(aux0["target"] ** 2), rtol=1e-6)


def test_data_prediction_loss_and_its_velocity():
    x1 = flow.to_model_space(np.random.default_rng(1).random((4, 4, 4, 2)).astype(np.float32))
    knows_x1 = lambda x_t, t, cond: jnp.broadcast_to(x1, x_t.shape)  # noqa: E731
    loss, aux = flow.flow_matching_loss(knows_x1, x1, None, jax.random.key(2), prediction="data")
    assert float(loss) == 0.0
    np.testing.assert_allclose(aux["x1_hat"], x1)
    # Its velocity is the path's own (x1 − x0) wherever 1 − t is above the floor.
    far = np.asarray(aux["t"]) < 1.0 - flow.MIN_REMAINING
    np.testing.assert_allclose(aux["velocity"][far], aux["target"][far], rtol=1e-4, atol=1e-4)
    zero = lambda x_t, t, cond: jnp.zeros_like(x_t)  # noqa: E731
    loss0, _ = flow.flow_matching_loss(zero, x1, None, jax.random.key(2), prediction="data")
    np.testing.assert_allclose(loss0, jnp.mean(x1**2), rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown prediction 'noise'"):
        flow.flow_matching_loss(zero, x1, None, jax.random.key(2), prediction="noise")
    # Euler's last step lands on the prediction exactly: no noise is left for the net to cancel.
    x0 = jax.random.normal(jax.random.key(3), x1.shape)
    for method, steps in (("euler", 4), ("euler", 1), ("heun", 4)):
        out = flow.solve(
            flow.velocity_from_data(knows_x1), x0, method=method, num_steps=steps, euler_last_step=True
        )
        np.testing.assert_allclose(out, x1, atol=1e-5)
    # Without it Heun's last corrector, at t = 1, would stop halfway.
    halfway = flow.solve(flow.velocity_from_data(knows_x1), x0, method="heun", num_steps=4)
    assert float(jnp.max(jnp.abs(halfway - x1))) > 0.1


@pytest.mark.parametrize(
    ("distribution", "mean", "median"),
    [("uniform", 0.0, 0.5), ("logit_normal", 0.0, 0.5), ("logit_normal", -1.0, 0.269)],
)
def test_time_distributions(distribution, mean, median):
    t = np.asarray(flow.sample_time(jax.random.key(0), 20_000, distribution=distribution, mean=mean))
    assert 0.0 <= t.min() and t.max() < 1.0
    assert abs(np.median(t) - median) < 0.015  # sigmoid(-1) = 0.269; the median's sd here is ~0.003.
    with pytest.raises(ValueError, match="Unknown time distribution"):
        flow.sample_time(jax.random.key(0), 4, distribution="beta")


def test_conditioning_maps_and_null_label():
    rng = np.random.default_rng(0)
    structure = rng.random((3, 5, 6, 1)).astype(np.float32)
    organ = (rng.random((3, 5, 6, 1)) > 0.5).astype(np.float32)
    label = rng.integers(0, 4, (3, 5, 6))
    cond = np.asarray(flow.conditioning_maps(structure, label, organ, num_classes=4))
    assert cond.shape == (3, 5, 6, flow.conditioning_channels(4))
    labels = flow.label_channels(4)
    # A real label: one channel at 1 in every pixel.
    np.testing.assert_array_equal(cond[..., labels].sum(-1), 1.0)
    np.testing.assert_array_equal(cond[..., labels].argmax(-1), label)
    dropped = np.asarray(
        flow.conditioning_maps(structure, label, organ, num_classes=4, null=jnp.array([False, True, False]))
    )
    np.testing.assert_array_equal(dropped[1, ..., labels], 0.0)  # The null label: distinct from any real one.
    np.testing.assert_array_equal(dropped[[0, 2]], cond[[0, 2]])
    np.testing.assert_array_equal(dropped[1, ..., 0:1], structure[1])  # Structure and organ are kept.
    np.testing.assert_array_equal(dropped[1, ..., -1:], organ[1])
    null = flow.null_conditioning(cond, num_classes=4)
    np.testing.assert_array_equal(null[..., labels], 0.0)


def test_label_dropout_rate():
    n = 20_000  # 1×1 images: only the per-example draw matters.
    batch = {
        "image": np.zeros((n, 1, 1, CHANNELS), np.float32),
        "label": np.ones((n, 1, 1), np.int32),
        "structure": np.zeros((n, 1, 1, 1), np.float32),
        "organ": np.ones((n, 1, 1, 1), np.float32),
    }
    x1, cond = flow_train.image_targets(batch, jax.random.key(0), num_classes=NUM_CLASSES, label_dropout=0.25)
    assert x1.shape == (n, 1, 1, CHANNELS)
    dropped = np.asarray(cond[..., flow.label_channels(NUM_CLASSES)].sum(axis=(1, 2, 3)) == 0)
    # Binomial(20 000, 0.25): sd 0.003, so 0.015 is 5 sd.
    assert abs(dropped.mean() - 0.25) < 0.015
    _, kept = flow_train.image_targets(batch, jax.random.key(0), num_classes=NUM_CLASSES, label_dropout=0.0)
    np.testing.assert_array_equal(kept[..., flow.label_channels(NUM_CLASSES)].sum(-1), 1.0)
    with pytest.raises(ValueError, match="label dropout rate"):
        flow.label_dropout_mask(jax.random.key(0), 4, rate=1.5)


def test_structure_targets_and_thresholded_samples():
    rng = np.random.default_rng(0)
    batch = {
        "structure": (rng.random((2, 4, 4, 1)) > 0.5) * 1.0,
        "organ": (rng.random((2, 4, 4, 1)) > 0.5) * 1.0,
    }
    x1, cond = flow_train.structure_targets(batch, jax.random.key(0))
    assert cond is None and x1.shape == (2, 4, 4, 2)
    # Soft samples, but on the right side of 0.5.
    maps, masks = flow.structure_from_sample(flow.to_image_space(x1) * 0.8 + 0.1)
    np.testing.assert_array_equal(maps, batch["structure"][..., 0])
    np.testing.assert_array_equal(masks, batch["organ"][..., 0])
    assert maps.dtype == jnp.int32


def test_ema():
    ema, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    np.testing.assert_allclose(flow_train.ema_update(ema, params, 0.9)["w"], 0.1, rtol=1e-6)
    # Warm-up: a short average first.
    assert float(flow_train.ema_decay_at(jnp.int32(0), 0.999)) == pytest.approx(0.1)
    assert float(flow_train.ema_decay_at(jnp.int32(10**6), 0.999)) == pytest.approx(0.999)
    assert float(flow_train.ema_decay_at(jnp.int32(0), 0.999, warmup=False)) == pytest.approx(0.999)


# --- Samplers and guidance on known fields -----------------------------------------------------------------


def test_euler_and_heun_on_a_field_linear_in_time():
    # dx/dt = a + b·t from x0: the exact x(1) is x0 + a + b/2. Heun (trapezoid) is exact for this field;
    # Euler's left sums miss b/(2N), which pins the time grid (t_i = i/N, i = 0..N−1).
    x0 = jnp.arange(6.0).reshape(2, 3)
    a, b = 0.7, -1.3
    field = lambda x, t, cond: jnp.broadcast_to(a + b * t[:, None], x.shape)  # noqa: E731
    n = 5
    heun = flow.solve(field, x0, method="heun", num_steps=n)
    euler = flow.solve(field, x0, method="euler", num_steps=n)
    np.testing.assert_allclose(heun, x0 + a + b / 2, atol=1e-5)
    np.testing.assert_allclose(euler, x0 + a + b * (n - 1) / (2 * n), atol=1e-5)
    with pytest.raises(ValueError, match="Unknown sampler"):
        flow.solve(field, x0, method="rk4")


def test_guidance_scale_definition_and_null_branch():
    cond = _toy_cond(np.array([0, 1]))
    null = flow.null_conditioning(cond, num_classes=NUM_CLASSES)
    seen = []

    def field(x, t, c):  # A velocity that depends on the label channels only: v = 1 + 2·(label 1's share).
        seen.append(c)
        return jnp.broadcast_to(1.0 + 2.0 * c[..., 2:3].mean(axis=(1, 2, 3), keepdims=True), x.shape)

    x, t = jnp.zeros((2, HW, HW, CHANNELS)), jnp.full((2,), 0.5)
    v_cond, v_null = field(x, t, cond), field(x, t, null)
    seen.clear()
    np.testing.assert_array_equal(flow.guided_velocity(field, x, t, cond, null, guidance=1.0), v_cond)
    assert len(seen) == 1 and seen[0] is cond  # w = 1: the conditional model alone, one pass.
    seen.clear()
    np.testing.assert_array_equal(flow.guided_velocity(field, x, t, cond, null, guidance=0.0), v_null)
    assert len(seen) == 1 and seen[0] is null  # w = 0: the null-label model alone.
    seen.clear()
    guided = flow.guided_velocity(field, x, t, cond, null, guidance=3.0)
    np.testing.assert_allclose(guided, v_null + 3.0 * (v_cond - v_null), atol=1e-6)
    # The unconditional half of the doubled batch is exactly the null label.
    (both,) = seen
    np.testing.assert_array_equal(both[2:], null)
    np.testing.assert_array_equal(both[2:, ..., flow.label_channels(NUM_CLASSES)], 0.0)
    with pytest.raises(ValueError, match="needs null_cond"):
        flow.guided_velocity(field, x, t, cond, None, guidance=2.0)


# --- The trained toy ---------------------------------------------------------------------------------------


def test_training_reduces_the_loss(toy):
    first = toy["step"](toy["state0"], toy["batches"][0], jax.random.key(0))[1]
    last = toy["metrics"]
    assert int(toy["state"].step) == STEPS
    assert float(last["flow_loss"]) < 0.5 * float(first["flow_loss"])
    for name in ("loss", "grad_norm", "param_norm", "update_norm", "ema_decay"):
        assert np.isfinite(float(last[name]))


def test_samples_reach_the_target(euler_samples):
    # The two targets are 0.6 apart at every pixel, so a blend of both is 0.3 from each, the untrained
    # net's samples (v = 0: clipped noise around 0.5) are ~0.35 from either, and a sign or time-convention
    # error lands on the wrong image (0.6). Each sample must be within 0.08 mean absolute error of the image
    # its label asks for; after 200 steps they are ~0.03 from it (worst 0.04; after 100 steps ~0.05).
    error = np.abs(euler_samples - TARGETS[EVAL_LABELS]).mean(axis=(1, 2, 3))
    assert error.max() < 0.08, error


def test_euler_and_heun_agree(toy, euler_samples):
    # Both integrate the same learned field towards the same solution. Against 512 Euler steps, 64 Euler
    # steps are off by 0.0015 on average (worst pixel 0.007) and 16 Heun steps (32 evaluations) by 0.003
    # (0.017), so they agree within 0.01 on average and 0.05 at any pixel: well below the samples' 0.03
    # distance to their targets, and far below the 0.6 between the two targets. (Heun gains little here:
    # near t = 1 the field of a single target image is (A − x)/(1 − t), stiff, and Euler's steps follow
    # it exactly; at 8 steps Heun is off by 0.013, Euler by 0.011.) The exactness of both schemes is
    # pinned by `test_euler_and_heun_on_a_field_linear_in_time`.
    heun = np.asarray(
        _generate(
            toy["state"].ema_params, jax.random.key(1), _toy_cond(EVAL_LABELS), method="heun", num_steps=16
        )
    )
    diff = np.abs(heun - euler_samples)
    assert diff.mean() < 0.01 and diff.max() < 0.05, (diff.mean(), diff.max())


def test_sampling_is_deterministic_per_key(toy, euler_samples):
    cond = _toy_cond(EVAL_LABELS)
    params = toy["state"].ema_params
    again = np.asarray(_generate(params, jax.random.key(1), cond, method="euler", num_steps=64))
    np.testing.assert_array_equal(again, euler_samples)
    other = np.asarray(_generate(params, jax.random.key(2), cond, method="euler", num_steps=64))
    assert np.abs(other - euler_samples).max() > 1e-3  # Same targets, different noise on the way there.


def test_guidance_with_the_trained_net(toy, euler_samples):
    params = toy["state"].ema_params
    cond = _toy_cond(EVAL_LABELS)
    null = flow.null_conditioning(cond, num_classes=NUM_CLASSES)
    # w = 0 is sampling with the null label; the label-unconditional model draws from both modes.
    unguided = np.asarray(
        _generate(params, jax.random.key(1), cond, null, method="euler", num_steps=64, guidance=0.0)
    )
    with_null = np.asarray(_generate(params, jax.random.key(1), null, method="euler", num_steps=64))
    np.testing.assert_allclose(unguided, with_null, atol=1e-6)
    to_a = np.abs(unguided - TARGETS[0]).mean(axis=(1, 2, 3))
    to_b = np.abs(unguided - TARGETS[1]).mean(axis=(1, 2, 3))
    # The null-label model saw a fifth of the steps and must split the noise between two modes, so a few
    # samples still sit between them; most are on one of the two images, and both images occur.
    near = np.minimum(to_a, to_b) < 0.1
    assert near.sum() >= 12 and 0 < (to_a < to_b)[near].sum() < near.sum(), (to_a, to_b)
    # The guided formula through the doubled batch: at a traced w = 1 it is the conditional velocity (up to
    # summation order), at w = 2.5 it extrapolates.
    x = jax.random.normal(jax.random.key(4), (16, HW, HW, CHANNELS))
    t = jnp.full((16,), 0.4)
    v_cond, v_null, guided = _velocities(params, x, t, cond, null, jnp.float32(1.0))
    np.testing.assert_allclose(guided, v_cond, atol=1e-5)
    _, _, extrapolated = _velocities(params, x, t, cond, null, jnp.float32(2.5))
    np.testing.assert_allclose(extrapolated, v_null + 2.5 * (v_cond - v_null), atol=1e-4)


# --- Sharding and the stage-A form of the step -------------------------------------------------------------


def test_sharded_step_equals_one_device(toy):
    mesh = sharding.make_mesh((4,), (sharding.DATA_AXIS,))
    repl, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    sharded = jax.jit(toy["step_fn"], in_shardings=(repl, rows, repl), out_shardings=(repl, repl))
    batches = toy["batches"][:3]
    single = toy["state0"]
    for i, batch in enumerate(batches):
        single, single_metrics = toy["step"](single, batch, jax.random.key(i))
    with jax.set_mesh(mesh):
        state = jax.device_put(toy["state0"], repl)
        for i, batch in enumerate(batches):
            state, metrics = sharded(
                state, sharding.to_global(batch, rows), jax.device_put(jax.random.key(i), repl)
            )
    assert len(state.params["params"]["out_conv"]["kernel"].sharding.device_set) == 4
    np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-4)
    assert_same_training(state.params, single.params, toy["state0"].params)
    assert_same_training(state.ema_params, single.ema_params, toy["state0"].ema_params)


def test_stage_a_step_and_extra_loss_trace():
    # Stage A: 2 unconditional channels; an extra term sees x1_hat and the frozen tree. Traced, not compiled.
    model = FlowUNet(out_channels=2, features=8, num_levels=1, groups=4)  # One level: tracing time.
    tx = optax.adam(1e-3)
    batch = {"structure": jnp.zeros((2, 16, 16, 1)), "organ": jnp.ones((2, 16, 16, 1))}

    def extra(aux, batch, frozen):
        assert aux["cond"] is None and aux["x1_hat"].shape == (2, 16, 16, 2)
        term = frozen["weight"] * jnp.mean(aux["x1_hat"] ** 2)
        return term, {"extra": term}

    state = jax.eval_shape(
        functools.partial(flow_train.init_state, model=model, tx=tx, prepare=flow_train.structure_targets),
        jax.random.key(0),
        batch,
    )
    step = functools.partial(
        flow_train.train_step,
        model=model,
        tx=tx,
        prepare=flow_train.structure_targets,
        extra_loss=extra,
        time_distribution="logit_normal",
    )
    new_state, metrics = jax.eval_shape(step, state, batch, jax.random.key(1), {"weight": jnp.float32(0.1)})
    assert set(metrics) == {
        "loss",
        "flow_loss",
        "extra",
        "grad_norm",
        "param_norm",
        "update_norm",
        "ema_decay",
    }
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_stage_b_flow_config_is_checked_and_loads_what_it_needs():
    from configs import phantom
    from synth import flow_synthesis, frozen
    from synth.stages import synthesis, translator

    config = phantom.get_config("runlocal,generator=flow")
    synthesis.check_config(config)
    assert flow_synthesis.is_flow(config) and not flow_synthesis.frozen_for_training(config)
    # Evaluation reads the segmentors and G_t; stage A's maps are never its input.
    assert frozen.stage_b_frozen(config) == ("segmentor", "translator")
    assert translator.skip_reason(config) is None
    # Without the registration score and term nothing reads G_t, and stage=all does not train it.
    config.synthesis.flow.score_registration = False
    assert frozen.stage_b_frozen(config) == ("segmentor",)
    assert "score_registration=False" in translator.skip_reason(config)
    config.synthesis.flow.weights.registration = 0.5
    assert frozen.stage_b_frozen(config) == ("segmentor", "translator")
    assert translator.skip_reason(phantom.get_config("demo,generator=flow")) is not None
    config = phantom.get_config("runlocal,generator=flow")
    assert not flow_synthesis.is_flow(phantom.get_config("runlocal"))
    with pytest.raises(ValueError, match="Unknown config option 'generatr'"):
        phantom.get_config("generatr=flow")
    bad = [
        ("generator", "diffusion", "config.synthesis.generator 'diffusion'"),
        ("flow.sampler.method", "rk4", "config.synthesis.flow.sampler.method"),
        ("flow.sampler.num_steps", 0, "num_steps must be >= 1"),
        ("flow.label_dropout", 1.5, "label_dropout must be in"),
        ("flow.size", "huge", "huge"),
        ("structure_source", "stage_a", "needs config.synthesis.structure_source='real'"),
    ]
    _assert_each_rejected("runlocal,generator=flow", "synthesis", bad, synthesis.check_config)
    config = phantom.get_config("runlocal,generator=flow")
    config.synthesis.flow.label_dropout = 0.0
    config.synthesis.flow.sampler.guidance = 2.0
    with pytest.raises(ValueError, match="needs a model trained with label dropout"):
        synthesis.check_config(config)
    config = phantom.get_config("runlocal,generator=flow")
    config.synthesis.flow.weights.lesion = 1.0
    del config.synthesis.flow.weights["registration"]
    with pytest.raises(ValueError, match=r"missing terms \['registration'\]"):
        synthesis.check_config(config)


def _assert_each_rejected(arg: str, stage: str, bad, check) -> None:
    """`check(config)` raises a ValueError matching `message` for each `(key under stage, value, message)`."""
    from configs import phantom

    for key, value, message in bad:
        config = phantom.get_config(arg)
        *path, last = key.split(".")
        section = config[stage]
        for name in path:
            section = section[name]
        section[last] = value
        with pytest.raises(ValueError, match=message):
            check(config)


def test_stage_a_flow_config_is_checked_and_loaded_from_its_ema():
    from configs import phantom
    from synth import frozen, structure_flow
    from synth.stages import structure, synthesis

    config = phantom.get_config("runlocal,structure_generator=flow")
    structure_flow.check_config(config)
    assert structure_flow.is_flow(config) and not structure_flow.is_flow(phantom.get_config("runlocal"))
    models, init, _ = structure.step_parts(config, (32, 32))
    assert models.velocity.out_channels == 2
    # The frozen-loading tree is the trained state's: params and their EMA.
    shapes = frozen.ABSTRACT_PARAMS["structure"](config, (32, 32, 4))
    batch = {"image": jnp.zeros((2, 32, 32, 4)), "label": jnp.zeros((2, 32, 32), jnp.int32)}
    state = jax.eval_shape(init, jax.random.key(0), batch)
    assert jax.tree.structure(shapes["ema_params"]) == jax.tree.structure(state.ema_params)
    bad = [
        ("generator", "vae", "config.structure.generator 'vae'"),
        ("flow.threshold", 1.0, "threshold must be in"),
        ("flow.sampler.method", "rk4", "config.structure.flow.sampler.method"),
        ("flow.ema_decay", 1.0, "config.structure.flow.ema_decay"),
        ("flow.size", "huge", "huge"),
    ]
    check = functools.partial(structure.step_parts, image_hw=(32, 32))
    _assert_each_rejected("runlocal,structure_generator=flow", "structure", bad, check)
    # Stage B's GAN cannot draw its maps from a flow stage A inside its step.
    config = phantom.get_config("runlocal,structure_generator=flow")
    config.synthesis.structure_source = "stage_a"
    with pytest.raises(ValueError, match="structure_source='stage_a' draws maps from stage A's VAE-GAN"):
        synthesis.check_config(config)


def test_stage_b_flow_step_with_the_frozen_terms_traces():
    """The lesion and registration terms on x̂₁ reach the frozen networks (shapes only: no compile)."""
    from configs import phantom
    from synth import flow_synthesis, optim, translator_nets
    from synth.lesion import segment

    config = phantom.get_config("runlocal,generator=flow")
    config.synthesis.flow.weights.update(dict(lesion=1.0, registration=2.0))
    hw = (32, 32)
    lesion_processor = segment.processor(config, hw)
    g_t = translator_nets.make_models(config, hw)
    models = flow_synthesis.make_models(config, hw, lesion=lesion_processor, translator=g_t)
    batch = {
        "image": jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32),
        "label": jax.ShapeDtypeStruct((2, 32, 32), jnp.int32),
    }
    frozen = {
        "lesion": segment.abstract_params(config, (32, 32, 4)),
        "translator": translator_nets.abstract_params(config, (32, 32, 4))["g_params"],
    }
    tx = optim.make_optimizer(config.synthesis.flow.optim)
    init = functools.partial(flow_synthesis.init_state, models=models, config=config, tx=tx)
    state = jax.eval_shape(init, jax.random.key(0), batch)
    step = functools.partial(flow_train.train_step, tx=tx, **flow_synthesis.train_options(config, models))
    _, metrics = jax.eval_shape(step, state, batch, jax.random.key(1), frozen)
    assert {"flow_loss", "lesion", "registration", "loss"} <= set(metrics)


def test_samples_drawn_a_few_at_a_time_equal_one_call(toy, monkeypatch):
    """Flow samples drawn a few at a time (CPU's groups, `synth.models.grouped`) are one call's.

    `sample_configured` given the net's width: the same noise, guided, over 1 and 2 shards.
    """
    import ml_collections

    from synth.models import winograd

    params = toy["state"].ema_params
    cond = _toy_cond(EVAL_LABELS)
    null = flow.null_conditioning(cond, num_classes=NUM_CLASSES)
    settings = ml_collections.ConfigDict(
        {"sampler": {"method": "heun", "num_steps": 4, "guidance": 1.5}, "prediction": "velocity"}
    )

    def draw(features=None, shards=1):
        fn = jax.jit(
            lambda p: flow_train.sample_configured(
                functools.partial(TOY_MODEL.apply, p),
                jax.random.key(5),
                cond,
                null,
                settings=settings,
                shape=(16, HW, HW, CHANNELS),
                features=features,
                shards=shards,
            )
        )
        return np.asarray(fn(params))

    expected = draw()
    monkeypatch.setattr(winograd, "CHUNK_BYTES", HW * HW * 8 * 4 * 4)  # Four examples per call.
    for shards in (1, 2):
        np.testing.assert_allclose(draw(features=8, shards=shards), expected, rtol=1e-5, atol=1e-6)
