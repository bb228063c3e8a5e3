"""Shape, parameter-count, init and behaviour tests: shared layers, U-Net, sizes table."""

import contextlib
import functools
import io
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from host_init import random_like
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import PartitionSpec as P

from synth.models import SIZES, UNet, bottleneck_hw, layers, unet_kwargs, variant_sizes


def _init_shapes(model, x, cond=None):
    """Abstract init: parameter shapes without compiling or running anything."""
    return jax.eval_shape(functools.partial(model.init, jax.random.key(0)), x, cond)


def _count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _expected_unet_params(
    features: int, num_levels: int, c_in: int, out_ch: int, cond_ch: int = 0, norm_out: bool = True
) -> int:
    """Parameter count from the METHOD §4.1 layer table, written out independently of unet.py."""
    w = [features * 2**level for level in range(num_levels)]
    convs = []  # (in channels, out channels, followed by instance norm)
    for level in range(num_levels):
        if level > 0:
            convs.append((w[level - 1], w[level - 1], True))  # stride-2 conv keeps the width
        convs.append((c_in if level == 0 else w[level - 1], w[level], True))
        convs.append((w[level], w[level], True))
    convs.append((w[-1], w[-1], False))  # raw stride-2 conv into the bottleneck
    convs.append((w[-1] + cond_ch, w[-1], True))  # bottleneck conv after the condition concat
    prev = w[-1]
    for level in reversed(range(num_levels)):
        convs.append((prev, w[level], True))  # up-sampling conv
        dec = w[max(level - 1, 0)]
        convs += [(2 * w[level], dec, True), (dec, dec, True)]  # after the skip concat
        prev = dec
    convs.append((prev, out_ch, norm_out))
    # 3×3 kernel, plus either scale and offset of the instance norm or (no norm) a bias.
    return sum(9 * ci * co + (2 * co if norm else co) for ci, co, norm in convs)


# --------------------------------------------------------------------------------------------------
# Shapes


def test_bottleneck_hw():
    assert bottleneck_hw((184, 144), 3) == (23, 18)
    assert bottleneck_hw((512, 512), 3) == (64, 64)
    assert bottleneck_hw((23, 17), 3) == (3, 3)


@pytest.mark.parametrize(
    "variant,hw,c_in",
    [("base", (184, 144), 1), ("tiny", (32, 32), 4), ("tiny", (16, 16), 2), ("tiny", (23, 17), 1)],
)
def test_unet_output_and_bottleneck_shapes(variant, hw, c_in):
    kw = unet_kwargs(variant, hw)
    model = UNet(out_channels=5, **kw)
    x = jnp.zeros((2, *hw, c_in))
    cond = jnp.zeros((2, 4))
    params = _init_shapes(model, x, cond)
    out, state = jax.eval_shape(functools.partial(model.apply, mutable=["intermediates"]), params, x, cond)
    assert out.shape == (2, *hw, 5)
    (bottleneck,) = state["intermediates"]["bottleneck"]
    width = kw["features"] * 2 ** (kw["num_levels"] - 1)
    assert bottleneck.shape == (2, *bottleneck_hw(hw, kw["num_levels"]), width)
    if hw == (184, 144):
        assert bottleneck.shape[1:3] == (23, 18)


@pytest.mark.parametrize("variant", sorted(SIZES))
def test_param_count_matches_table(variant):
    kw = variant_sizes(variant, "unet")
    model = UNet(out_channels=5, **unet_kwargs(variant, (32, 32)))
    params = _init_shapes(model, jnp.zeros((1, 32, 32, 4)), jnp.zeros((1, 4)))
    assert _count(params) == _expected_unet_params(
        kw["features"], kw["num_levels"], c_in=4, out_ch=5, cond_ch=4
    )


def test_param_count_without_output_norm():
    model = UNet(features=4, num_levels=2, out_channels=2, norm_output=False)
    params = _init_shapes(model, jnp.zeros((1, 16, 16, 3)))
    assert _count(params) == _expected_unet_params(4, 2, c_in=3, out_ch=2, norm_out=False)


def test_sizes_unknown_variant_and_small_image():
    with pytest.raises(ValueError, match=r"'huge'.*base.*small.*tiny"):
        unet_kwargs("huge", (32, 32))
    with pytest.raises(ValueError, match="too small"):
        unet_kwargs("tiny", (4, 32))
    with pytest.raises(ValueError, match="no sizes for network"):
        variant_sizes("tiny", "not_a_network")
    # A returned dict is a copy: editing it must not change the table.
    kw = unet_kwargs("tiny", (32, 32))
    kw["features"] = -1
    assert SIZES["tiny"]["unet"]["features"] != -1


def test_unet_rejects_bad_options_and_cond():
    x = jnp.zeros((1, 16, 16, 1))
    with pytest.raises(ValueError, match="out_activation"):
        _init_shapes(UNet(features=2, out_activation="tanh"), x)
    with pytest.raises(ValueError, match="cond"):
        _init_shapes(UNet(features=2), x, jnp.zeros((1, 3, 3, 4)))


# --------------------------------------------------------------------------------------------------
# Behaviour (real compiled runs on a tiny model; three compiles in all)


@pytest.fixture(scope="module")
def tiny_dropout_unet():
    model = UNet(**unet_kwargs("tiny", (16, 16)), out_channels=2, dropout_rate=0.5)
    x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 1))
    cond = jnp.eye(4)[:2]
    params = jax.jit(model.init)(jax.random.key(0), jnp.repeat(x, 2, axis=0), cond)
    apply = jax.jit(model.apply, static_argnames="train")
    return apply, params, jnp.repeat(x, 2, axis=0), cond


def test_cond_changes_output(tiny_dropout_unet):
    apply, params, x, cond = tiny_dropout_unet
    # Same image, two conditions in one batch: instance norm keeps samples independent.
    out = apply(params, x, cond)
    assert out.shape == (2, 16, 16, 2)
    assert bool(jnp.all((out > 0) & (out < 1)))  # sigmoid output
    assert float(jnp.max(jnp.abs(out[0] - out[1]))) > 1e-4
    # A pre-tiled condition map is equivalent to the vector.
    cond_map = jnp.broadcast_to(cond[:, None, None, :], (2, 2, 2, 4))
    np.testing.assert_allclose(apply(params, x, cond_map), out, rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training(tiny_dropout_unet):
    apply, params, x, cond = tiny_dropout_unet
    # Eval needs no dropout rng and is deterministic.
    eval_a = apply(params, x, cond)
    eval_b = apply(params, x, cond, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = apply(params, x, cond, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = apply(params, x, cond, train=True, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.max(jnp.abs(train_a - eval_a))) > 1e-4
    assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-4


@pytest.fixture(scope="module")
def film_unet():
    """A tiny FiLM U-Net, one image twice, two conditions; parameters with FiLM kernels zero and "trained".

    One jitted init and one jitted apply serve every FiLM test (compiles are the suite's cost).
    """
    model = UNet(**unet_kwargs("tiny", (16, 16)), out_channels=1, condition="film", norm_output=False)
    x = jnp.repeat(jax.random.uniform(jax.random.key(1), (1, 16, 16, 1)), 2, axis=0)
    cond = jnp.eye(4)[:2]
    initial = jax.jit(model.init)(jax.random.key(0), x, cond)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(initial)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    # As if trained: the zero-initialised FiLM kernels get values (everything else stays as initialised).
    trained = [
        0.5 * jax.random.normal(key, leaf.shape) if "film" in jax.tree_util.keystr(path) else leaf
        for (path, leaf), key in zip(leaves, keys, strict=True)
    ]
    return SimpleNamespace(
        model=model,
        x=x,
        cond=cond,
        initial=initial,
        trained=jax.tree.unflatten(treedef, trained),
        apply=jax.jit(model.apply),
    )


def test_film_condition_reaches_every_pixel_and_skips_the_encoder(film_unet):
    from synth.models.unet import split_unet

    model, params, x, cond = film_unet.model, film_unet.trained, film_unet.x, film_unet.cond
    out = film_unet.apply(params, x, cond)
    interior = jnp.abs(out[0] - out[1])[2:-2, 2:-2]
    # A concatenated constant map reaches only the zero-padded border (the norm erases it inside);
    # FiLM changes the whole image.
    assert bool(jnp.all(interior > 0.0)) and float(jnp.mean(interior)) > 0.02
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params["params"])[0]]
    film_layers = {path[0].key for path in paths if "film" in jax.tree_util.keystr(path)}
    assert film_layers and all(name.startswith(("up", "dec")) for name in film_layers), film_layers
    # The encoder never sees the condition: one encoding serves every target modality.
    encoder, decoder = split_unet(model)
    h0, skips0 = encoder.apply(params, x, cond)
    h1, _ = encoder.apply(params, x, cond[::-1])
    np.testing.assert_array_equal(h0, h1)
    np.testing.assert_allclose(decoder.apply(params, h0, skips0, cond), out, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="film"):
        model.apply(params, x, jnp.zeros((2, 2, 2, 4)))
    with pytest.raises(ValueError, match="condition"):
        _init_shapes(UNet(features=2, condition="add"), x, cond)


@pytest.mark.parametrize("mode", ["vmap", "unrolled"])
def test_film_encodes_once_for_every_condition_with_the_same_outputs_and_gradients(film_unet, mode):
    """Both forms of the T decoder passes (one tiled call, or T calls) equal the tiled whole U-Net."""
    from synth.models.unet import apply_per_condition

    model, params, x = film_unet.model, film_unet.trained, film_unet.x
    conds = jnp.broadcast_to(jnp.eye(4)[:, None, :], (4, 2, 4))  # Four targets for the batch of two.
    weights = jax.random.uniform(jax.random.key(3), (4, 2, 16, 16, 1))

    def tiled(p):  # The plain form: every input repeated once per condition.
        out = model.apply(p, jnp.tile(x, (4, 1, 1, 1)), conds.reshape(8, 4))
        return out.reshape(4, 2, *out.shape[1:])

    @jax.jit
    def both(p):
        once = lambda q: apply_per_condition(model, q, x, conds, mode=mode)  # noqa: E731
        grads = [jax.grad(lambda q, f=f: jnp.sum(f(q) * weights))(p) for f in (once, tiled)]
        return once(p), tiled(p), grads

    out_once, out_tiled, (grad_once, grad_tiled) = both(params)
    np.testing.assert_allclose(out_once, out_tiled, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grad_once), jax.tree.leaves(grad_tiled), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)  # Sums in another order.
    with pytest.raises(ValueError, match="stacking mode"):
        apply_per_condition(model, params, x, conds, mode="scan")
    if mode == "unrolled":
        # Each further condition adds only its own convs: per level the up-sampling conv (but the first,
        # whose input is the one bottleneck), its share of the first decoder conv and the second; then
        # the output conv. The skips' shares and the first up-sampling conv are computed once.
        per_condition = jax.make_jaxpr(functools.partial(apply_per_condition, model, mode=mode))
        counts = [len(_conv_inputs(per_condition(params, x, c))) for c in (conds[:2], conds)]
        assert counts[1] - counts[0] == 2 * 3 * model.num_levels, counts


@pytest.mark.slow  # ~54 s on 2 cores: in `make test-slow`, to keep `make test` near 10 minutes.
def test_translator_encodes_each_source_once_with_the_tiled_results(film_unet):
    """G_t's K·(K−1) translations from K encoder passes (one call, or one per source) equal the tiled pairs.

    Outputs and gradients: the one call (the translator's stage trains G_t with it) to the parameters and
    the images, on 4 devices (batch 4); the call per source (stage B's frozen G_t on CPU) to the images, on
    1 device (batch 1). Each form is compiled once (20-25 s a form and mesh on 2 cores): the one call's
    parts run on 1 device in `test_film_encodes_once_for_every_condition_with_the_same_outputs_and_gradients`
    and test_stage_b_wiring.py, and the call per source keeps a split batch split
    (`test_per_condition_and_pair_calls_keep_a_split_batch_split`).
    """
    from synth import registration, sharding
    from synth.models.unet import apply_per_condition

    model, params = film_unet.model, film_unet.trained
    x = jax.random.uniform(jax.random.key(4), (4, 4, 16, 16, 1))  # K = 4 modalities, B = 4.
    weights = jax.random.uniform(jax.random.key(5), (4, 3, 4, 16, 16, 1))
    pairs = registration.ordered_pairs(4)
    sources, targets = (np.array([p[i] for p in pairs]) for i in (0, 1))

    def tiled(p, x):  # Every pair's source image through the whole U-Net.
        b = x.shape[1]
        out = model.apply(p, registration.flat(x[sources]), registration.modality_conditions(targets, b, 4))
        return registration.unflat(out, (12, b)).reshape(4, 3, b, 16, 16, 1)

    def once(p, x, per_source=False):
        many = functools.partial(apply_per_condition, model, p)
        return registration.translate_pairs(many, x, per_source=per_source)

    @functools.partial(jax.jit, static_argnames="per_source")
    def forms(p, x, weights, per_source):
        """(output, gradients) of the one call (or the call per source) and of the tiled pairs."""
        if per_source:  # Frozen in stage B: the gradient to the images only.
            out, pull = jax.vjp(lambda x: once(p, x, per_source=True), x)
            pulled = [(out, pull(weights))]
            out, pull = jax.vjp(lambda x: tiled(p, x), x)
            return pulled + [(out, pull(weights))]
        return [(out, pull(weights)) for out, pull in (jax.vjp(f, p, x) for f in (once, tiled))]

    mesh = sharding.make_mesh((4,), (sharding.DATA_AXIS,))
    by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.DATA_AXIS))
    # Unsharded at batch 1, sharded at batch 4 (1 per device), the one call on K = 4 images per device:
    # at the suite's LLVM level 0, XLA:CPU computes its gradients on 16 images up to 0.5 % off a float64
    # reference on AVX2-only CPUs (Zen 3; within 1e-5 on 4 images, and optimised), beyond float32 rounding.
    cases = ((x[:, :1], weights[:, :, :1], True), (jax.device_put(x, by_batch), weights, False))
    for images, w, per_source in cases:
        (out, grad), (out_tiled, grad_tiled) = forms(params, images, w, per_source)
        np.testing.assert_allclose(out, out_tiled, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_tiled), strict=True):
            # Sums in another order: float32 rounding relative to the leaf's largest gradient.
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.slow  # ~25 s on 2 cores: in `make test-slow`, to keep `make test` near 10 minutes.
def test_per_condition_and_pair_calls_keep_a_split_batch_split(film_unet, monkeypatch):
    """On 4 devices each device runs the networks on its own examples only: no gathered batch.

    The T·B (or K·B) copies merge example-major (`synth.registration`); merged the other way, XLA gathers
    the batch and every device computes all of it (stage B's step did 3.6× one device's work per device).
    """
    from synth import registration, sharding
    from synth.models.unet import apply_per_condition

    model, params = film_unet.model, film_unet.trained
    mesh = sharding.make_mesh((4,), (sharding.DATA_AXIS,))
    x = jax.device_put(
        jnp.zeros((4, 8, 16, 16, 1)), jax.sharding.NamedSharding(mesh, P(None, sharding.DATA_AXIS))
    )
    conds = jnp.broadcast_to(jnp.eye(4)[:, None], (4, 8, 4))

    def per_condition(mode):
        return lambda p, x: jnp.sum(apply_per_condition(model, p, x[0], conds, mode=mode))

    def pairs(per_source):
        many = functools.partial(apply_per_condition, model)
        return lambda p, x: jnp.sum(
            registration.translate_pairs(functools.partial(many, p), x, per_source=per_source)
        )

    calls = {
        "vmap": per_condition("vmap"),
        "unrolled": per_condition("unrolled"),
        "pairs": pairs(False),
        "pairs per source": pairs(True),
        "tiled pairs": lambda p, x: jnp.sum(
            registration.translate_pairs(registration.tiled(functools.partial(model.apply, p)), x)
        ),
        "back": lambda p, x: jnp.sum(
            registration.translate_back(
                functools.partial(model.apply, p), jnp.broadcast_to(x[:, None], (4, 3) + x.shape[1:])
            )
        ),
    }

    # Per-modality networks (`stacked.map_stacked`), where a GPU's `auto` picks `vmap`: grouped convolutions,
    # which XLA would run on the whole batch on every device, so several devices unroll them.
    from synth.models import stacked

    monkeypatch.setattr(stacked, "resolve_mode", lambda mode: "vmap" if mode == "auto" else mode)
    members = jax.tree.map(lambda a: jnp.stack([a] * 4), params)
    calls["members"] = lambda p, x: jnp.sum(
        stacked.map_stacked(lambda q, y: model.apply(q, y, conds[0]), members, x)
    )
    for name, loss in calls.items():
        text = jax.jit(loss).lower(params, x).compile().as_text()  # Forward: the gathers show there.
        batches = {int(b) for b in re.findall(r"f32\[(\d+),16,16,\d+\]\S* convolution\(", text)}
        # A device's share is at most 2 examples' 12 pairs; a gathered batch would be 32 images or more.
        assert "all-gather" not in text and batches and max(batches) <= 24, (name, batches)


def _saved_activation_bytes(loss, *args) -> int:
    """Bytes autodiff keeps for the backward pass, parameters aside (`print_saved_residuals`' lines)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(loss, *args)
    total = 0
    for line in printed.getvalue().splitlines():
        match = re.match(r"\s*f32\[([\d,]*)\]", line)
        if match and "from the argument" not in line:
            total += 4 * int(np.prod([int(d) for d in match.group(1).split(",") if d]))
    return total


@pytest.mark.slow  # ~24 s on 2 cores: in `make test-slow`, to keep `make test` near 10 minutes.
def test_remat_keeps_parameters_and_results_and_saves_fewer_activations(film_unet):
    """`remat=True` (a config's `model.remat`): same parameter tree, outputs and gradients, less kept."""
    from synth.models.unet import apply_per_condition, configured_remat

    model, params, x = film_unet.model, film_unet.trained, film_unet.x
    remat = model.clone(remat=True)
    assert jax.tree.map(jnp.shape, _init_shapes(remat, x, film_unet.cond)) == jax.tree.map(jnp.shape, params)
    # Two conditions: the decoder's paths sharing the skips (CPU's form), at half the compile of four.
    conds = jnp.broadcast_to(jnp.eye(4)[:2, None, :], (2, 2, 4))
    weights = jax.random.uniform(jax.random.key(3), (2, 2, 16, 16, 1))

    def loss(m):
        return lambda p, x: jnp.sum(apply_per_condition(m, p, x, conds, mode="unrolled") * weights)

    both = jax.jit(lambda p, x: [jax.value_and_grad(loss(m), (0, 1))(p, x) for m in (model, remat)])
    (plain, plain_grads), (rematted, remat_grads) = both(params, x)
    np.testing.assert_allclose(rematted, plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Each block keeps its input only (XLA:CPU then merges the recomputation back: the saving is a GPU's).
    kept, kept_remat = (_saved_activation_bytes(loss(m), params, x) for m in (model, remat))
    assert 0 < kept_remat < kept / 2, (kept_remat, kept)
    assert configured_remat({}) is False  # Workdirs from before the key.
    # Every stage-B U-Net reads its section's `model.remat`.
    from configs import phantom
    from synth import synthesis_nets, translator_nets
    from synth.lesion import segment

    config = phantom.get_config("runlocal")
    for section in (config.synthesis, config.translator, config.segmentor):
        section.model.remat = True
    assert synthesis_nets.make_models(config, (16, 16)).generator.remat
    assert translator_nets.make_models(config, (16, 16)).generator.remat
    assert segment.make_model(config, (16, 16)).remat


@pytest.mark.slow  # ~21 s on 2 cores: in `make test-slow`, to keep `make test` near 10 minutes.
def test_flow_unet_remat_keeps_results_and_saves_fewer_activations():
    """The flow velocity net's `remat` (`<stage>.flow.remat`): as the U-Net's."""
    from configs import phantom
    from synth import flow_synthesis, structure_flow
    from synth.models.flow_unet import FlowUNet

    plain = FlowUNet(out_channels=2, features=4, num_levels=2, groups=2)
    remat = plain.clone(remat=True)
    x, t = jax.random.normal(jax.random.key(0), (2, 16, 16, 2)), jnp.array([0.3, 0.7])
    # As if trained (the zero-initialised FiLM and output layers get values), drawn on the host.
    params = random_like(plain.init, jax.random.key(1), x, t)
    assert jax.tree.map(jnp.shape, jax.eval_shape(remat.init, jax.random.key(1), x, t)) == jax.tree.map(
        jnp.shape, params
    )

    def loss(m):
        return lambda p, x: jnp.sum(m.apply(p, x, t) ** 2)

    both = jax.jit(lambda p, x: [jax.value_and_grad(loss(m), (0, 1))(p, x) for m in (plain, remat)])
    (value, grads), (remat_value, remat_grads) = both(params, x)
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))  # Other sum orders.
    kept, kept_remat = (_saved_activation_bytes(loss(m), params, x) for m in (plain, remat))
    assert 0 < kept_remat < kept / 2, (kept_remat, kept)
    config = phantom.get_config("runlocal")
    config.synthesis.flow.remat = config.structure.flow.remat = True
    assert flow_synthesis.make_velocity(config, (16, 16)).remat
    assert structure_flow.make_models(config, (16, 16)).velocity.remat


def test_film_gives_each_condition_its_own_output_layer_from_the_start(film_unet):
    # Zero FiLM kernels: the decoder's features are the same for every condition, yet each condition's own
    # output conv (normal init, learnt at a conv's pace) makes the modalities differ from step 0.
    out = film_unet.apply(film_unet.initial, film_unet.x, film_unet.cond)
    assert float(jnp.mean(jnp.abs(out[0] - out[1]))) > 1e-3
    kernel = film_unet.initial["params"]["out_conv"]["conv"]["kernel"]
    assert kernel.shape[-1] == 4  # One output channel per condition.


# --------------------------------------------------------------------------------------------------
# Layers


def test_activations():
    x = jnp.array([-10.0, -1.0, 0.0, 0.5, 50.0, 150.0])
    np.testing.assert_allclose(layers.activation("capped_relu")(x), [0, 0, 0, 0.5, 50, 100])
    np.testing.assert_allclose(layers.activation("relu")(x), [0, 0, 0, 0.5, 50, 150])
    np.testing.assert_allclose(layers.activation("leaky_relu")(x), [-2, -0.2, 0, 0.5, 50, 150], rtol=1e-6)
    with pytest.raises(ValueError, match="'swish'"):
        layers.activation("swish")
    with pytest.raises(ValueError, match="'xavier'"):
        layers.kernel_init("xavier", c_nominal=1)


def test_mean_filter_init_uses_nominal_channels():
    c_in, cond_ch = 4, 4
    model = UNet(features=4, num_levels=2, kernel_init="mean_filter", out_channels=2)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, c_in)), jnp.zeros((1, cond_ch)))
    flat = {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params["params"])
    }
    kernels = {name: k for name, k in flat.items() if name.endswith("kernel")}
    assert len(kernels) == 6 * 2 + 2  # 6 convs per level, plus bottleneck and output convs
    for name, kernel in kernels.items():
        if name.startswith("enc0_conv0"):
            c_nominal = 1  # The code's conv1 ignores the real input channel count.
        elif name.startswith("bottleneck_conv"):
            c_nominal = kernel.shape[2] - cond_ch  # Condition channels are not counted.
        else:
            c_nominal = kernel.shape[2]
        np.testing.assert_allclose(jnp.mean(kernel), 1.0 / (9 * c_nominal), rtol=1e-4, err_msg=name)
        assert float(jnp.std(kernel)) < 1e-5, name
    # Only a conv without a following instance norm (here the raw stride-2 one) keeps a bias.
    assert [n for n in flat if n.endswith("conv/bias")] == ["down2/conv/bias"]
    for name, leaf in flat.items():
        if name.endswith("/bias"):
            np.testing.assert_array_equal(leaf, 0.0, err_msg=name)
    scales = jnp.concatenate([v for n, v in flat.items() if n.endswith("norm/scale")])
    assert abs(float(jnp.mean(scales)) - 1.0) < 0.01
    assert 0.01 < float(jnp.std(scales)) < 0.03


def test_capped_relu_unet_uses_plain_relu_on_conv5():
    model = UNet(features=2, num_levels=2, activation="capped_relu")
    x = jax.random.uniform(jax.random.key(0), (1, 8, 8, 1))
    params = jax.jit(model.init)(jax.random.key(1), x)
    # Blow up the instance-norm scales so pre-activations exceed the cap of 100.
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v * 1e4 if path[-1].key == "scale" else v, params
    )
    _, state = jax.jit(functools.partial(model.apply, capture_intermediates=True))(params, x)
    acts = state["intermediates"]
    assert float(jnp.max(acts["enc1_conv0"]["__call__"][0])) == pytest.approx(100.0)
    # The code's conv5 (last conv of level 1) is a plain, uncapped ReLU.
    conv5 = acts["enc1_conv1"]["__call__"][0]
    assert float(jnp.max(conv5)) > 100.0
    assert float(jnp.min(conv5)) >= 0.0


def test_normal_init_stddev():
    kernel = layers.kernel_init("normal", c_nominal=1)(jax.random.key(0), (3, 3, 64, 64))
    assert abs(float(jnp.mean(kernel))) < 2e-3
    np.testing.assert_allclose(jnp.std(kernel), 0.02, rtol=0.05)


def test_instance_norm_is_per_sample_per_channel():
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3)) * jnp.array([1.0, 10.0, 100.0]) + 7.0
    norm = layers.InstanceNorm()
    variables = norm.init(jax.random.key(1), x)
    scale, offset = variables["params"]["scale"], variables["params"]["bias"]
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    expected = (x - mean) / jnp.sqrt(var + 1e-5) * scale + offset
    np.testing.assert_allclose(norm.apply(variables, x), expected, rtol=1e-4, atol=1e-5)


def test_upsample_and_crop():
    x = jnp.arange(6.0).reshape(1, 2, 3, 1)
    up = layers.upsample_nearest(x)
    assert up.shape == (1, 4, 6, 1)
    np.testing.assert_array_equal(up[0, :, :, 0], [[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2)
    np.testing.assert_array_equal(layers.crop_to(up, (3, 5))[0, :, :, 0], up[0, :3, :5, 0])
    with pytest.raises(ValueError):
        layers.crop_to(x, (3, 3))


@pytest.mark.parametrize("target_hw", [(8, 6), (7, 5)])
def test_up_conv_block_is_up_sampling_then_its_conv_block(target_hw, monkeypatch):
    """Even targets up-sample inside the conv (sub-pixel form where it pays), odd ones crop: same function."""
    from synth.models import conv

    monkeypatch.setattr(conv, "MIN_PIXELS", 1)  # The sub-pixel form at this small size (CPU, float32).
    x = jax.random.normal(jax.random.key(0), (2, 4, 3, 5))
    up = layers.UpConvBlock(6, name="up")
    variables = up.init(jax.random.key(1), x, target_hw)
    kernel = variables["params"]["block"]["conv"]["kernel"]
    assert kernel.shape == (3, 3, 5, 6)  # The parameters of a 3×3 conv block, whichever form runs.
    plain = layers.ConvBlock(6).apply(
        {"params": variables["params"]["block"]}, layers.crop_to(layers.upsample_nearest(x), target_hw)
    )
    got = up.apply(variables, x, target_hw)
    assert got.shape == (2,) + target_hw + (6,)
    subpixel = "f32[2,2,5,24]" in str(jax.make_jaxpr(up.apply, static_argnums=2)(variables, x, target_hw))
    assert subpixel == (target_hw == (8, 6))  # One 2×2 conv into four phases; odd targets keep the crop.
    np.testing.assert_allclose(got, plain, rtol=0, atol=1e-5)


def _conv_inputs(jaxpr) -> list[tuple[int, ...]]:
    """The input shapes of every convolution in a (closed) jaxpr, nested jaxprs included."""
    shapes = []
    for eqn in jaxpr.jaxpr.eqns if hasattr(jaxpr, "jaxpr") else jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            shapes.append(tuple(eqn.invars[0].aval.shape))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            shapes.extend(_conv_inputs(sub))
    return shapes


def test_conv_block_paths_share_the_skip_and_a_common_input():
    """Several paths through one block (a decoder per condition) are one call per path, sharing what they can.

    The skip's share of the conv is computed once for all paths, and one map under several conditions is
    convolved and normalised once; values, gradients and parameters are the per-path form's.
    """
    keys = jax.random.split(jax.random.key(0), 6)
    skip = jax.random.normal(keys[0], (2, 6, 5, 3))
    xs = [jax.random.normal(k, (2, 6, 5, 4)) for k in keys[1:4]]
    films = [jnp.eye(3)[jnp.array([i, (i + 1) % 3])] for i in range(3)]
    block = layers.ConvBlock(7)
    single = block.init(keys[4], xs[0], films[0], skip=skip)
    several = block.init(keys[4], xs, films, skip=skip)
    assert jax.tree.map(jnp.shape, several) == jax.tree.map(jnp.shape, single)
    assert single["params"]["conv"]["kernel"].shape == (3, 3, 7, 7)  # One conv over [skip, x].
    for a, b in zip(jax.tree.leaves(several), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(a, b)  # The same initialisation too.
    params = {"params": {**single["params"], "film": {"kernel": jax.random.normal(keys[5], (3, 14))}}}
    params["params"]["film"]["bias"] = single["params"]["film"]["bias"]
    weights = jax.random.uniform(keys[5], (3, 2, 6, 5, 7))

    def together(p, skip, xs):
        return jnp.stack(block.apply(p, xs, films, skip=skip))

    def apart(p, skip, xs):
        return jnp.stack([block.apply(p, x, f, skip=skip) for x, f in zip(xs, films, strict=True)])

    losses = [lambda *a, f=f: jnp.sum(f(*a) * weights) for f in (together, apart)]
    (loss_a, grads_a), (loss_b, grads_b) = (
        jax.value_and_grad(f, (0, 1, 2))(params, skip, xs) for f in losses
    )
    np.testing.assert_allclose(together(params, skip, xs), apart(params, skip, xs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # The skip once, each path's own channels once; one map under three conditions: one conv.
    convs = sorted(_conv_inputs(jax.make_jaxpr(together)(params, skip, xs)))
    assert convs == [skip.shape] + [xs[0].shape] * 3
    one_map = jax.make_jaxpr(lambda p, x: block.apply(p, x, films, skip=skip))(params, xs[0])
    assert _conv_inputs(one_map) == [(2, 6, 5, 7)]
    one_map_outs = block.apply(params, xs[0], films, skip=skip)
    for f, out in zip(films, one_map_outs, strict=True):
        np.testing.assert_allclose(out, block.apply(params, xs[0], f, skip=skip), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="2 paths under 3 conditions"):
        block.apply(params, xs[:2], films, skip=skip)
    with pytest.raises(ValueError, match="one shape"):
        block.apply(params, [xs[0], xs[1][:, :5]], films[:2], skip=skip)
