"""Stage A networks: patch and code discriminators, VAE encoder/decoder, mask generator, size table."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from host_init import random_like

from synth.models import (
    SIZES,
    CodeDiscriminator,
    PatchDiscriminator,
    UNet,
    VAEDecoder,
    VAEEncoder,
    code_discriminator_kwargs,
    code_shape,
    discriminator_kwargs,
    encoder_input,
    mask_generator_kwargs,
    reparameterize,
    vae,
    vae_kwargs,
    variant_sizes,
)

STAGE_A_NETWORKS = ("discriminator", "vae", "code_discriminator", "mask_generator")


def _init_shapes(model, *args, **kwargs):
    """Abstract init: parameter shapes without compiling or running anything."""
    return jax.eval_shape(functools.partial(model.init, jax.random.key(0), **kwargs), *args)


def _count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _conv_params(convs) -> int:
    """(kernel, in, out, followed by instance norm): kernel weights plus IN scale/offset, or a bias."""
    return sum(k * k * ci * co + (2 * co if norm else co) for k, ci, co, norm in convs)


def _ceil_div(n: int, levels: int) -> int:
    for _ in range(levels):
        n = math.ceil(n / 2)
    return n


# --------------------------------------------------------------------------------------------------
# Expected parameter counts, written out from the METHOD §4.2-4.5 tables independently of the modules.


def _expected_patch_d(w: int, c_in: int, out: int, heads: int = 1, cat: int | None = None) -> int:
    convs = [(5, c_in, w, True), (5, w, w, True), (3, w, 2 * w, True), (3, 2 * w, 2 * w, True)]
    for k in range(heads):
        convs += [(3, 2 * w, w, True), (3, w, out if k == 0 or cat is None else cat, False)]
    return _conv_params(convs)


def _expected_code_d(w: int, c_in: int) -> int:
    return _conv_params(
        [
            (7, c_in, 2 * w, True),
            (7, 2 * w, 2 * w, True),
            (5, 2 * w, 2 * w, True),
            (5, 2 * w, 4 * w, True),
            (3, 4 * w, 4 * w, True),
            (3, 4 * w, 1, False),
        ]
    )


# §4.3 rows (kernel, out channels at ngf 64), grouped by stride-2 level; conv10 (128) follows the kept levels.
_ENCODER_TABLE = [[(5, 64)], [(5, 64), (3, 128)], [(3, 256), (3, 256)], [(3, 256), (3, 256)]]
_ENCODER_TABLE += [[(3, 512), (3, 512)], [(3, 512)]]
# §4.4: first conv 512, then per up-sampling level (up-conv, conv) widths at ngf 64, coarse to fine.
_DECODER_TABLE = [256, 256, 128, 128, 64, 64]


def _expected_encoder(w: int, levels: int, c_in: int, hw: tuple[int, int], code_ch: int) -> int:
    scale = w / 64
    convs, prev = [], c_in
    for level in _ENCODER_TABLE[:levels]:
        for k, ch in level:
            convs.append((k, prev, int(ch * scale), True))
            prev = int(ch * scale)
    convs.append((3, prev, int(128 * scale), True))
    flat = _ceil_div(hw[0], levels) * _ceil_div(hw[1], levels) * int(128 * scale)
    units = _ceil_div(hw[0], 3) * _ceil_div(hw[1], 3) * code_ch
    return _conv_params(convs) + 2 * (flat * units + units)


def _expected_decoder(w: int, levels: int, out: int, hw: tuple[int, int], code_ch: int) -> int:
    scale = w / 64
    code_units = _ceil_div(hw[0], 3) * _ceil_div(hw[1], 3) * code_ch
    units = _ceil_div(hw[0], levels) * _ceil_div(hw[1], levels) * w  # reshape to h0×w0×ngf
    convs, prev = [(3, w, int(512 * scale), True)], int(512 * scale)
    for ch in _DECODER_TABLE[6 - levels :]:
        convs += [(3, prev, int(ch * scale), True), (3, int(ch * scale), int(ch * scale), True)]
        prev = int(ch * scale)
    convs.append((3, prev, out, True))
    return _conv_params(convs) + (code_units * units + units) + (units * units + units)


# --------------------------------------------------------------------------------------------------
# Shapes (abstract evaluation, so 512² costs nothing)


@pytest.mark.parametrize(
    "variant,hw",
    [
        ("tiny", (32, 32)),
        ("tiny", (64, 64)),
        ("small", (128, 128)),
        ("base", (184, 144)),
        ("base", (512, 512)),
    ],
)
@pytest.mark.usefixtures("xla_convolutions")
def test_stage_a_shapes(variant, hw):
    batch = 2
    s1h = jax.ShapeDtypeStruct((batch, *hw, 2), jnp.float32)
    kw = vae_kwargs(variant, hw)
    encoder, decoder = VAEEncoder(**kw), VAEDecoder(image_hw=hw, **kw)
    enc_params = _init_shapes(encoder, jax.ShapeDtypeStruct((batch, *hw, 1), jnp.float32))
    mean, logvar = jax.eval_shape(
        encoder.apply, enc_params, jax.ShapeDtypeStruct((batch, *hw, 1), jnp.float32)
    )
    code = (math.ceil(hw[0] / 8), math.ceil(hw[1] / 8), 1)
    assert mean.shape == logvar.shape == (batch, *code) == (batch, *code_shape(hw, 1))
    structure = jax.eval_shape(decoder.apply, _init_shapes(decoder, mean), mean)
    assert structure.shape == (batch, *hw, 2)

    d_s = PatchDiscriminator(**discriminator_kwargs(variant, hw))
    d_map = jax.eval_shape(d_s.apply, _init_shapes(d_s, s1h), s1h)
    d_hw = (math.ceil(hw[0] / 16), math.ceil(hw[1] / 16))
    assert d_map.shape == (batch, *d_hw, 1)
    d_z = CodeDiscriminator(**code_discriminator_kwargs(variant, hw))
    z_map = jax.eval_shape(d_z.apply, _init_shapes(d_z, mean), mean)
    assert z_map.shape == (batch, math.ceil(code[0] / 2), math.ceil(code[1] / 2), 1)

    g_m = UNet(**mask_generator_kwargs(variant, hw), out_channels=2, dropout_rate=0.1)
    assert jax.eval_shape(g_m.apply, _init_shapes(g_m, s1h), s1h).shape == (batch, *hw, 2)

    if hw == (184, 144):  # METHOD §12's reference shapes
        assert d_map.shape[1:3] == (12, 9) and code[:2] == (23, 18)
    if hw == (512, 512):
        assert d_map.shape[1:3] == (32, 32) and z_map.shape[1:3] == (32, 32)
        assert mean.size // batch == 4096  # the code's 64×64×1 units


def test_two_head_discriminator_and_tc_channels():
    x = jax.ShapeDtypeStruct((1, 184, 144, 1), jnp.float32)
    d = PatchDiscriminator(features=4, heads=2)
    real_fake, category = jax.eval_shape(d.apply, _init_shapes(d, x), x)
    assert real_fake.shape == category.shape == (1, 12, 9, 1)
    d_ce = PatchDiscriminator(features=4, heads=2, category_channels=4)  # softmax-head option (§11.15)
    params = _init_shapes(d_ce, x)
    assert jax.eval_shape(d_ce.apply, params, x)[1].shape == (1, 12, 9, 4)
    assert _count(params) == _expected_patch_d(4, 1, 1, heads=2, cat=4)
    # TC lung CT: 3 slices -> 6 paired channels in and out of G_s and G_m (§4.4, §4.6).
    hw = (64, 64)
    code = jax.ShapeDtypeStruct((1, *code_shape(hw, 1)), jnp.float32)
    dec = VAEDecoder(image_hw=hw, **vae_kwargs("tiny", hw), out_channels=6)
    assert jax.eval_shape(dec.apply, _init_shapes(dec, code), code).shape == (1, 64, 64, 6)
    enc = VAEEncoder(**vae_kwargs("tiny", hw))
    x3 = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    mean, _ = jax.eval_shape(enc.apply, _init_shapes(enc, x3), x3)
    assert mean.shape == (1, 8, 8, 1)


def test_rejects_bad_inputs_and_options():
    hw = (32, 32)
    kw = vae_kwargs("tiny", hw)
    with pytest.raises(ValueError, match="Code shape"):
        _init_shapes(VAEDecoder(image_hw=hw, **kw), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="num_levels"):
        _init_shapes(VAEEncoder(num_levels=7), jnp.zeros((1, 256, 256, 1)))
    with pytest.raises(ValueError, match="out_activation"):
        _init_shapes(VAEDecoder(image_hw=hw, **kw, out_activation="tanh"), jnp.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="heads"):
        _init_shapes(PatchDiscriminator(features=2, heads=3), jnp.zeros((1, 32, 32, 1)))


# --------------------------------------------------------------------------------------------------
# Parameter counts against the METHOD tables, for every variant of the size table


@pytest.mark.parametrize("variant", sorted(SIZES))
def test_param_counts_match_table(variant):
    hw = (64, 64)  # big enough for every variant's depth
    x1 = jnp.zeros((1, *hw, 1))
    x2 = jnp.zeros((1, *hw, 2))
    d = variant_sizes(variant, "discriminator")["features"]
    assert _count(
        _init_shapes(PatchDiscriminator(**discriminator_kwargs(variant, hw)), x2)
    ) == _expected_patch_d(d, 2, 1)

    vae = variant_sizes(variant, "vae")
    w, levels, code_ch = vae["features"], vae["num_levels"], vae["code_channels"]
    code = jnp.zeros((1, *code_shape(hw, code_ch)))
    enc = _init_shapes(VAEEncoder(**vae_kwargs(variant, hw)), x1)
    assert _count(enc) == _expected_encoder(w, levels, 1, hw, code_ch)
    dec = _init_shapes(VAEDecoder(image_hw=hw, **vae_kwargs(variant, hw)), code)
    assert _count(dec) == _expected_decoder(w, levels, 2, hw, code_ch)

    dz = variant_sizes(variant, "code_discriminator")["features"]
    assert _count(_init_shapes(CodeDiscriminator(**code_discriminator_kwargs(variant, hw)), code)) == (
        _expected_code_d(dz, code_ch)
    )
    # G_m is the U-Net at the table's width (its own count is tested in test_models.py).
    g_m = _init_shapes(UNet(**mask_generator_kwargs(variant, hw), out_channels=2), x2)
    assert (
        g_m["params"]["enc0_conv0"]["conv"]["kernel"].shape[-1]
        == variant_sizes(variant, "mask_generator")["features"]
    )


def test_base_sizes_are_the_papers():
    # §4.2-4.6 at ngf 64 (G_m 32), 512²: the code's 4096-unit code and 8·8·128 = 8192 encoder features.
    assert variant_sizes("base", "discriminator") == {"features": 64}
    assert variant_sizes("base", "vae") == {"features": 64, "num_levels": 6, "code_channels": 1}
    assert variant_sizes("base", "code_discriminator") == {"features": 64}
    assert variant_sizes("base", "mask_generator") == {"features": 32, "num_levels": 3}
    hw = (512, 512)
    enc = _init_shapes(VAEEncoder(**vae_kwargs("base", hw)), jnp.zeros((1, *hw, 1)))["params"]
    assert enc["mean"]["kernel"].shape == enc["logvar"]["kernel"].shape == (8192, 4096)
    dec = _init_shapes(VAEDecoder(image_hw=hw, **vae_kwargs("base", hw)), jnp.zeros((1, 64, 64, 1)))["params"]
    assert dec["dense0"]["kernel"].shape == dec["dense1"]["kernel"].shape == (4096, 4096)
    assert dec["in_conv"]["conv"]["kernel"].shape == (3, 3, 64, 512)


def test_size_table_errors():
    assert all(set(STAGE_A_NETWORKS) <= set(entry) for entry in SIZES.values())
    helpers = (discriminator_kwargs, vae_kwargs, code_discriminator_kwargs, mask_generator_kwargs)
    for helper in helpers:
        with pytest.raises(ValueError, match=r"'huge'.*base.*small.*tiny"):
            helper("huge", (512, 512))
        with pytest.raises(ValueError, match="too small"):
            helper("base", (4, 512))
    with pytest.raises(ValueError, match="too small"):
        vae_kwargs("base", (32, 32))  # 6 levels need 64
    # A returned dict is a copy.
    kw = vae_kwargs("tiny", (32, 32))
    kw["features"] = -1
    assert SIZES["tiny"]["vae"]["features"] != -1


# --------------------------------------------------------------------------------------------------
# Behaviour (real compiled runs at tiny size)


@pytest.fixture(scope="module")
def tiny_vae():
    hw = (32, 32)
    kw = vae_kwargs("tiny", hw)
    encoder, decoder = VAEEncoder(**kw), VAEDecoder(image_hw=hw, **kw)
    s = (jax.random.uniform(jax.random.key(0), (2, *hw, 1)) > 0.8).astype(jnp.float32)
    x = encoder_input(s)
    enc_params = random_like(encoder.init, jax.random.key(1), x)  # On the host: no init to compile.
    dec_params = random_like(decoder.init, jax.random.key(2), jnp.zeros((2, *code_shape(hw, 1))), seed=1)
    return encoder, decoder, enc_params, dec_params, x


def test_encoder_dropout_only_in_training(tiny_vae):
    encoder, _, params, _, x = tiny_vae
    assert encoder.dropout_rate == pytest.approx(0.15)  # the code's keep_prob 0.85
    apply = jax.jit(encoder.apply, static_argnames="train")
    eval_a, eval_b = apply(params, x), apply(params, x, train=False)
    np.testing.assert_array_equal(eval_a[0], eval_b[0])
    train_a = apply(params, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = apply(params, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.max(jnp.abs(train_a[0] - eval_a[0]))) > 1e-5
    assert float(jnp.max(jnp.abs(train_a[1] - train_b[1]))) > 1e-5


def test_vae_round_trip(tiny_vae):
    encoder, decoder, enc_params, dec_params, x = tiny_vae
    np.testing.assert_allclose(np.unique(np.asarray(x)), [0.9, 1.0])  # E_s input 0.9 + 0.1·s (§5.1)
    mean, logvar = encoder.apply(enc_params, x)
    f = reparameterize(jax.random.key(3), mean, logvar)
    out = jax.jit(decoder.apply)(dec_params, f)
    assert out.shape == (2, 32, 32, 2)
    assert bool(jnp.all((out > 0) & (out < 1)))  # two independent sigmoids
    # Instance norm keeps samples independent: different codes, different maps.
    assert float(jnp.max(jnp.abs(out[0] - out[1]))) > 1e-4


def test_discriminator_dropout_only_in_training():
    x = jax.random.uniform(jax.random.key(0), (1, 32, 32, 2))
    d = PatchDiscriminator(**discriminator_kwargs("tiny", (32, 32)), dropout_rate=0.15)
    params = jax.jit(d.init)(jax.random.key(1), x)
    apply = jax.jit(d.apply, static_argnames="train")
    eval_out = apply(params, x)
    np.testing.assert_array_equal(eval_out, apply(params, x, train=False))
    train_a = apply(params, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = apply(params, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.max(jnp.abs(train_a - eval_out))) > 1e-5
    assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-5


def test_reparameterize_statistics_and_gradient():
    n = 200_000
    mean = jnp.full((n,), 2.0)
    logvar = jnp.full((n,), math.log(0.25))  # σ = 0.5
    f = reparameterize(jax.random.key(0), mean, logvar)
    assert float(jnp.mean(f)) == pytest.approx(2.0, abs=0.01)
    assert float(jnp.std(f)) == pytest.approx(0.5, rel=0.01)
    np.testing.assert_array_equal(f, reparameterize(jax.random.key(0), mean, logvar))  # deterministic
    assert float(jnp.max(jnp.abs(f - reparameterize(jax.random.key(1), mean, logvar)))) > 0.1
    # Pathwise gradients: ∂f/∂μ = 1 and ∂f/∂logvar = ½ σ ε = ½ (f − μ).
    g_mean, g_logvar = jax.grad(lambda m, lv: jnp.sum(reparameterize(jax.random.key(0), m, lv)), (0, 1))(
        mean[:4], logvar[:4]
    )
    np.testing.assert_allclose(g_mean, 1.0)
    np.testing.assert_allclose(g_logvar, 0.5 * (f[:4] - 2.0), rtol=1e-5)


def test_bounded_logvar_keeps_sigma_under_the_priors():
    raw = jnp.array([-40.0, -8.0, -1.0, 0.0, 3.0, 40.0])
    bounded = vae.bounded_logvar(raw, 0.0)
    assert bool(jnp.all(bounded < 0.0)) and float(bounded[-1]) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(bounded[:2], raw[:2], atol=1e-3)  # Small σ passes through.
    assert bool(jnp.all(jnp.diff(bounded) > 0))  # Still ordered: the bound does not flatten the head.
    grads = jax.grad(lambda x: jnp.sum(vae.bounded_logvar(x, 0.0)))(raw)
    assert bool(jnp.all(grads > 0)) and float(grads[0]) == pytest.approx(1.0)  # Unlike a clip.


def test_encoder_bounds_logvar_only_when_asked(tiny_vae):
    encoder, _, params, _, x = tiny_vae
    # A head whose logvar is far above 0: what stage A's collapsed runs reached (σ up to 42).
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 6.0 if "logvar" in jax.tree_util.keystr(path) and "bias" in str(path) else p,
        params,
    )
    _, free = encoder.apply(params, x)
    mean, bounded = encoder.clone(max_logvar=0.0).apply(params, x)
    assert float(jnp.min(free)) > 1.0 and float(jnp.max(bounded)) < 0.0
    np.testing.assert_array_equal(mean, encoder.apply(params, x)[0])  # The mean head is untouched.
