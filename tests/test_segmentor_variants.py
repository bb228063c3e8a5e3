"""Segmentor variants (METHOD §6.3) and the evaluator's code-parity Dice/MSE (§9.4).

The shared-encoder variant ("1 E_l + N D_l") is the U-Net cut at the bottleneck: one encoder for every
modality, one stacked decoder per modality. Compiles dominate the run time, so the networks are tiny and
each compiled function is shared through module-scoped fixtures.
"""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from host_init import random_like

from synth import evaluation, input_pipeline, metrics
from synth.lesion import segment
from synth.models import shared_encoder
from synth.models.unet import UNet, UNetDecoder, UNetEncoder, split_unet
from synth.stages import segmentor

K, B, HW = 4, 2, 32


def _config(data_dir, variant):
    from configs import phantom

    config = phantom.get_config("runlocal")
    config.data.data_dir = data_dir
    config.segmentor.variant = variant
    # One vmapped U-Net compiles 2-3x faster than four unrolled ones (what `auto` picks on CPU); the two
    # modes agree (tests/test_stacked.py, and for shared_encoder below).
    config.segmentor.stacking = "vmap"
    return config


def test_split_unet_halves_make_up_the_unet():
    unet = UNet(features=4, num_levels=2, out_channels=3, activation="capped_relu", out_activation="none")
    encoder, decoder = split_unet(unet)
    assert isinstance(encoder, UNetEncoder) and isinstance(decoder, UNetDecoder)
    assert encoder.features == decoder.features == 4 and decoder.activation == "capped_relu"
    x = jax.random.uniform(jax.random.key(0), (1, 13, 10, 1))  # Odd sizes exercise the skip crops.

    @jax.jit  # One compile instead of op-by-op dispatch.
    def run(key):
        k_full, k_enc, k_dec = jax.random.split(key, 3)
        full = unet.init(k_full, x)["params"]
        enc = encoder.init(k_enc, x)["params"]
        dec = decoder.init(k_dec, *encoder.apply({"params": enc}, x))["params"]
        halves = decoder.apply({"params": dec}, *encoder.apply({"params": enc}, x))
        return full, enc, dec, halves, unet.apply({"params": {**enc, **dec}}, x)

    full, enc, dec, halves, whole = run(jax.random.key(1))
    # Disjoint halves whose union is the U-Net's tree, same names and shapes.
    assert not set(enc) & set(dec)
    merged = {**enc, **dec}
    assert jax.tree.structure(merged) == jax.tree.structure(full)
    assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, full)
    np.testing.assert_allclose(halves, whole, rtol=1e-6, atol=1e-6)


def _train_batch(spec, n=1):
    # One image: the step's cost is its compile; vmapped (grouped) convolutions run slowly on CPU.
    return jax.tree.map(lambda *xs: np.stack(xs), *(spec.preprocess(spec.source[i]) for i in range(n)))


def _step(spec, batch):
    """A random initial state, and the state and metrics after one jitted train step."""
    state = random_like(spec.init_state, jax.random.key(0), batch)  # On the host: no init to compile.
    new_state, out = jax.jit(spec.train_step)(state, batch, jax.random.key(1))
    return state, new_state, out


def _assert_stepped(state, new_state, out):
    assert int(new_state.step) == 1 and np.isfinite(float(out["loss"]))
    assert {f"loss_modality{k}" for k in range(K)} <= set(out)
    before, after = jax.tree.leaves(state.params), jax.tree.leaves(new_state.params)
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


@pytest.fixture(scope="module")
def shared(phantom_data_dir):
    """The shared-encoder stage: config, spec, a state before and after one train step, a jitted forward.

    Every shared-encoder test reuses these compiled functions; `forward` is compiled for B images.
    """
    config = _config(phantom_data_dir, "shared_encoder")
    # With eval batch 4, the second eval batch is then half padding, which the metrics must leave out.
    config.data.eval_max_examples = 6
    spec = segmentor.build(config)
    model = segment.make_model(config, (HW, HW))
    batch = _train_batch(spec)
    state, stepped, out = _step(spec, batch)
    forward = jax.jit(
        functools.partial(segment.predict_logits, model=model, variant="shared_encoder", stacking="vmap")
    )
    return SimpleNamespace(
        config=config,
        spec=spec,
        model=model,
        images=jnp.asarray(_train_batch(spec, B)["image"]),
        params=state.params,
        state=state,
        stepped=stepped,
        out=out,
        forward=forward,
    )


def test_shared_encoder_tree_has_one_encoder_and_k_decoders(shared):
    params = shared.params
    assert set(params) == {shared_encoder.ENCODER, shared_encoder.DECODERS}
    encoder, decoder = split_unet(shared.model)
    x = shared.images[..., :1]

    def halves(key):
        enc = encoder.init(key, x)
        return enc, decoder.init(key, *encoder.apply(enc, x))

    one_encoder, one_decoder = jax.eval_shape(halves, jax.random.key(0))
    # The encoder is one unstacked set; every decoder leaf has a leading modality axis of size K.
    assert jax.tree.map(jnp.shape, params["encoder"]) == jax.tree.map(lambda a: a.shape, one_encoder)
    assert jax.tree.map(jnp.shape, params["decoders"]) == jax.tree.map(lambda a: (K,) + a.shape, one_decoder)
    enc_names, dec_names = set(params["encoder"]["params"]), set(params["decoders"]["params"])
    assert {"enc0_conv0", "bottleneck_conv"} <= enc_names and {"up0", "out_conv"} <= dec_names
    unet_names = set(jax.eval_shape(shared.model.init, jax.random.key(0), x)["params"])
    assert enc_names | dec_names == unet_names
    # The K decoders start from different weights.
    assert any(not np.allclose(a[0], a[1]) for a in jax.tree.leaves(params["decoders"]))


def test_shared_encoder_output_shape_and_unrolled_agrees(shared):
    logits = shared.forward(shared.params, shared.images)
    assert logits.shape == (K, B, HW, HW, 5)
    # `auto` picks the unrolled form on CPU: it must give the same logits.
    unrolled = jax.jit(
        functools.partial(
            segment.predict_logits, model=shared.model, variant="shared_encoder", stacking="unrolled"
        )
    )(shared.params, shared.images)
    np.testing.assert_allclose(unrolled, logits, rtol=1e-4, atol=1e-4)


def test_changing_one_decoder_changes_only_its_modality(shared):
    params, k = shared.params, 2
    before = np.asarray(shared.forward(params, shared.images))
    decoders = jax.tree.map(lambda a: a.at[k].multiply(1.5).at[k].add(0.01), params["decoders"])
    after = np.asarray(shared.forward({**params, "decoders": decoders}, shared.images))
    for j in range(K):
        if j == k:
            assert not np.allclose(after[j], before[j])
        else:
            np.testing.assert_array_equal(after[j], before[j])


def _norm(tree):
    """Global L2 norm of a pytree, as a Python float."""
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(tree))))


def test_encoder_gradient_comes_from_every_modality(shared):
    images = shared.images[:1]  # One image keeps the K+1 backward passes cheap.

    @jax.jit
    def grads(params, weights):
        def loss(p):
            logits = segment.predict_logits(
                p, images, model=shared.model, variant="shared_encoder", stacking="vmap"
            )
            return jnp.sum(weights * jnp.mean(jnp.square(logits), axis=(1, 2, 3, 4)))

        return jax.grad(loss)(params)

    total = grads(shared.params, jnp.ones(K))
    per_modality = [grads(shared.params, jnp.eye(K)[k]) for k in range(K)]
    for k, g in enumerate(per_modality):
        assert _norm(g["encoder"]) > 0.0, k
        # Modality k's loss reaches the shared encoder and its own decoder only.
        for j in range(K):
            assert (_norm(jax.tree.map(lambda a, j=j: a[j], g["decoders"])) > 0) == (j == k)
    # The shared encoder's gradient is the sum of every modality's contribution.
    summed = jax.tree.map(lambda *gs: sum(gs), *(g["encoder"] for g in per_modality))
    for a, b in zip(jax.tree.leaves(summed), jax.tree.leaves(total["encoder"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["n_seg", "one_seg"])
def test_variant_parameters_and_train_step(phantom_data_dir, variant):
    """K U-Nets (n_seg), whose train step runs here, or one for every modality (one_seg)."""
    config = _config(phantom_data_dir, variant)
    spec = segmentor.build(config)
    batch = _train_batch(spec)
    if variant == "n_seg":
        state, stepped, out = _step(spec, batch)
        _assert_stepped(state, stepped, out)
    else:  # one_seg's step runs in tests/test_loop.py (its equivalence runs); its initial state here.
        state = random_like(spec.init_state, jax.random.key(0), batch)
    # one_seg is one U-Net for every modality: its parameters are one U-Net's (no modality axis), and the
    # same image in every modality slot gets the same logits; n_seg has K U-Nets that differ.
    model = segment.make_model(config, batch["image"].shape[1:3])
    single = jax.eval_shape(model.init, jax.random.key(0), batch["image"][..., :1])
    shapes = [leaf.shape for leaf in jax.tree.leaves(state.params)]
    one_unet = [leaf.shape for leaf in jax.tree.leaves(single)]
    assert shapes == (one_unet if variant == "one_seg" else [(K, *s) for s in one_unet])
    same = np.repeat(batch["image"][..., :1], K, axis=-1)
    logits = segment.predict_logits(state.params, same, model=model, variant=variant, stacking="vmap")
    spread = float(jnp.max(jnp.abs(logits - logits[:1])))
    assert spread < 1e-5 if variant == "one_seg" else spread > 1e-4


def test_shared_encoder_train_step_runs(shared):
    _assert_stepped(shared.state, shared.stepped, shared.out)
    # One step moves the shared encoder and every modality's decoder.
    before, after = shared.state.params, shared.stepped.params
    assert _norm(jax.tree.map(jnp.subtract, after["encoder"], before["encoder"])) > 0
    delta = jax.tree.map(jnp.subtract, after["decoders"], before["decoders"])
    assert all(_norm(jax.tree.map(lambda a, k=k: a[k], delta)) > 0 for k in range(K))


def test_evaluator_parity_metrics_match_direct_computation(shared):
    config = shared.config
    scalars, _ = shared.spec.evaluate(shared.stepped, 1)
    modalities = config.data.modalities
    for metric in ("parity_dice", "parity_mse", "dice_whole"):
        assert {f"{metric}/{m}" for m in modalities + ("mean",)} <= set(scalars)

    # Direct: the 6 evaluated slices only, scored by the metrics themselves, reusing the compiled forward.
    source = input_pipeline.open_source(config.data, config.data.eval_split)
    examples = [segment.preprocess(source[i]) for i in range(config.data.eval_max_examples)]
    images = np.stack([e["image"] for e in examples])
    labels = jnp.asarray(np.stack([e["label"] for e in examples]))
    params = jax.device_get(shared.stepped.params)
    logits = [shared.forward(params, images[i : i + B]) for i in range(0, len(images), B)]
    pred = jnp.argmax(jnp.concatenate(logits, axis=1), axis=-1)
    dice = [float(metrics.parity_dice(pred[k], labels)) for k in range(K)]
    mse = [float(metrics.parity_mse(pred[k], labels)) for k in range(K)]
    for k, name in enumerate(modalities):
        assert scalars[f"parity_dice/{name}"] == pytest.approx(dice[k], rel=1e-5, abs=1e-6)
        assert scalars[f"parity_mse/{name}"] == pytest.approx(mse[k], rel=1e-5, abs=1e-6)
    assert scalars["parity_dice/mean"] == pytest.approx(np.mean(dice), rel=1e-5, abs=1e-6)
    assert scalars["parity_mse/mean"] == pytest.approx(np.mean(mse), rel=1e-5, abs=1e-6)


def test_parity_scores_leave_out_padding_rows():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, (3, 8, 8))
    pred = rng.integers(0, 5, (2, 3, 8, 8))
    # Row 2 is padding: a perfect, tumour-free prediction that would score Dice 1 and MSE 0 if counted.
    label[2] = 0
    pred[:, 2] = 0
    valid = np.array([True, True, False])
    dice, mse = segment.parity_per_image(pred, label)
    sums = evaluation.masked_sum({"dice": dice, "mse": mse}, valid)
    dice_sum, mse_sum, count = sums["dice"], sums["mse"], valid.sum()
    assert float(count) == 2.0
    for k in range(2):
        assert float(dice_sum[k]) / 2 == pytest.approx(
            float(metrics.parity_dice(pred[k, :2], label[:2])), 1e-6
        )
        assert float(mse_sum[k]) / 2 == pytest.approx(float(metrics.parity_mse(pred[k, :2], label[:2])), 1e-6)
