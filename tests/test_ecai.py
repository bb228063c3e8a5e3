"""The earlier encoder/decoder design (METHOD §6.7): its networks' shapes and the regrouping its losses use.

A training step of `variant=ecai` through stage B's trainer is in tests/test_variants.py (slow marker).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from host_init import random_like

from synth import ecai_losses, registration
from synth.models import ecai as ecai_models

K = 4


@pytest.fixture(scope="module")
def networks():
    """A tiny generator and discriminator, initialised once on small maps (convs: any size then works)."""
    g = ecai_models.EcaiGenerator(features=2, out_channels=1)
    d = ecai_models.EcaiDiscriminator(
        features=2, code_features=2, code_channels=16, heads=2, category_channels=1
    )
    x = jnp.ones((2, 24, 20, 5))
    cond = registration.modality_conditions(np.array([1]), 2, K)
    # Drawn on the host in the initialisers' shapes (compiled, the two inits took ~10 s).
    g_params = random_like(g.init, jax.random.key(0), x, cond)
    d_params = random_like(d.init, jax.random.key(1), jnp.ones((2, 24, 20, 1)), seed=1)
    return g, d, g_params, d_params, x, cond


def test_codes_are_at_a_quarter_and_decode_to_images_of_every_modality(networks):
    g, _, g_params, _, x, cond = networks
    assert set(g_params["params"]) == {"fusion_encoder", "image_encoder", "decoder"}  # init made all three.
    brats = jax.ShapeDtypeStruct((2, 184, 144, 5), jnp.float32)  # Shapes only, at the BRATS slice size.
    code = jax.eval_shape(lambda p, f: g.apply(p, f, method="encode_fusion"), g_params, brats)
    assert code.shape == (2, 46, 36, 16)  # §6.7: 46×36 (×512 at ngf 64) for BRATS.
    assert jax.eval_shape(g.apply, g_params, brats, cond).shape == (2, 184, 144, 1)
    images = jax.jit(g.apply)(g_params, x, cond)
    assert images.shape == (2, 24, 20, 1) and float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    other = g.apply(g_params, x, registration.modality_conditions(np.array([2]), 2, K))
    assert float(jnp.max(jnp.abs(other - images))) > 0  # The condition at H/4 changes the output.
    translated = g.apply(g_params, images, cond, method="translate")
    assert translated.shape == images.shape
    with pytest.raises(ValueError, match="does not decode to images of size"):
        g.apply(g_params, jnp.ones((2, 46, 36, 16)), cond, (180, 144), method="decode")
    assert ecai_models.code_hw((183, 145)) == (46, 37)  # Odd sizes: ceil twice, then cropped back.
    odd = jax.ShapeDtypeStruct((1, 183, 145, 5), jnp.float32)
    assert jax.eval_shape(g.apply, g_params, odd, cond[:1]).shape == (1, 183, 145, 1)


def test_discriminator_holds_the_patch_d_and_the_code_d(networks):
    _, d, _, d_params, _, _ = networks
    assert set(d_params["params"]) == {"image", "code"}
    images = jax.ShapeDtypeStruct((3, 184, 144, 1), jnp.float32)
    real_fake, category = jax.eval_shape(d.apply, d_params, images)
    assert real_fake.shape == category.shape == (3, 12, 9, 1)  # The two-head D of §4.2.
    codes = jax.ShapeDtypeStruct((3, 46, 36, 16), jnp.float32)
    judged = jax.eval_shape(lambda p, z: d.apply(p, z, method="judge_code"), d_params, codes)
    assert judged.shape == (3, 23, 18, 1)
    assert d.apply(d_params, jnp.ones((1, 8, 8, 16)), method="judge_code").shape == (1, 4, 4, 1)


def test_by_source_and_unpaired_regroup_as_the_losses_assume():
    k = 4
    pairs = np.array(registration.ordered_pairs(k))  # (i, j) grouped by target j.
    translations = jnp.asarray(pairs.reshape(k, k - 1, 2))  # Each entry holds its own (source, target).
    grouped = np.asarray(ecai_losses.by_source(translations))
    for i in range(k):
        assert set(grouped[i, :, 0]) == {i} and set(grouped[i, :, 1]) == set(range(k)) - {i}
    x = jnp.broadcast_to(jnp.arange(5.0)[None, :], (k, 5))  # Row b of every modality holds b.
    rolled = np.asarray(ecai_losses.unpaired(x))
    assert [rolled[i, 0] for i in range(k)] == [0, 4, 3, 2]  # No row is a registered set any more.
