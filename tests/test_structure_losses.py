"""Stage A losses (METHOD §5.2) against hand-computed values on tiny arrays, incl. the §11.10 fix."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tables
from synth import losses as generic_losses
from synth import structure_losses as losses

ALL_TERMS = (*losses.STAGE_A_G_TERMS, *losses.STAGE_A_D_TERMS)


def test_paired_one_hot_layout():
    s = jnp.array([[[[0], [1]]]])  # (1, 1, 2, 1)
    np.testing.assert_array_equal(losses.paired_one_hot(s)[0, 0], [[1, 0], [0, 1]])
    # Three slices (TC): pairs [value 0, value 1] per slice, slice-major.
    s3 = jnp.array([[[[0, 1, 1]]]])
    np.testing.assert_array_equal(losses.paired_one_hot(s3)[0, 0, 0], [1, 0, 0, 1, 0, 1])


def test_gaussian_kl():
    zeros = jnp.zeros((2, 2, 2, 1))
    assert float(losses.gaussian_kl(zeros, zeros)) == 0.0  # KL(N(0, 1) ‖ N(0, 1))
    # Image 0: μ = 1, σ = 1 on 4 elements -> ½·4·1 = 2; image 1: N(0, 1) -> 0; batch mean 1.
    mean = jnp.stack([jnp.ones((2, 2, 1)), jnp.zeros((2, 2, 1))])
    assert float(losses.gaussian_kl(mean, zeros)) == pytest.approx(1.0)
    # μ = 0, σ² = 2: ½(2 − 1 − ln 2) per element, summed over the 4 elements of each image.
    logvar = jnp.full((2, 2, 2, 1), math.log(2.0))
    assert float(losses.gaussian_kl(zeros, logvar)) == pytest.approx(
        4 * 0.5 * (1.0 - math.log(2.0)), rel=1e-6
    )


def test_code_moment_losses_are_per_image():
    # Image 0 has mean μ 1, image 1 mean 0 (±1): per image (1² + 0²)/2 = 0.5, not the global (0.5)².
    mean = jnp.array([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0]])
    logvar = jnp.stack([jnp.zeros(4), jnp.full(4, 2 * math.log(2.0))])  # σ = 1 and σ = 2
    mean_term, std_term = losses.code_moment_losses(mean, logvar)
    assert float(mean_term) == pytest.approx(0.5)
    assert float(std_term) == pytest.approx((0.0 + 1.0) / 2, rel=1e-6)


def test_edge_density_bias():
    probs = jnp.array([[[[0.9, 0.1], [0.5, 0.5]], [[0.2, 0.7], [1.0, 0.0]]]])  # (1, 2, 2, 2)
    expected = np.mean([0.9, 0.5, 0.2, 1.0]) - np.mean([0.1, 0.5, 0.7, 0.0])
    assert float(losses.edge_density_bias(probs)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="paired"):
        losses.edge_density_bias(jnp.zeros((1, 2, 2, 3)))


def _code_mask_exclusion(structure_probs, organ_mask):
    """The authors' term: mean((one_hot(M) ⊙ ŝ)²) with their M = 1 - organ (1 = background)."""
    m_code = 1 - organ_mask
    m1h = jax.nn.one_hot(m_code, 2).reshape(*m_code.shape[:-1], -1)
    return jnp.mean(jnp.square(m1h * structure_probs))


@pytest.mark.parametrize("slices", [1, 3])
def test_mask_exclusion_fix_vs_parity(slices):
    key_s, key_m = jax.random.split(jax.random.key(0))
    probs = jax.random.uniform(key_s, (2, 3, 4, 2 * slices))
    organ = (jax.random.uniform(key_m, (2, 3, 4, slices)) > 0.5).astype(jnp.int32)
    mask = losses.paired_one_hot(organ)
    no_edge, edge = probs[..., 0::2], probs[..., 1::2]
    n = probs.size
    fixed = losses.mask_exclusion_loss(probs, mask)
    parity = losses.mask_exclusion_loss(probs, mask, parity=True)
    # Parity reproduces the code's value exactly.
    np.testing.assert_allclose(parity, _code_mask_exclusion(probs, organ), rtol=1e-6)
    # Fixed: edge probability on the background only, with the code's normaliser.
    np.testing.assert_allclose(fixed, jnp.sum(jnp.square((1 - organ) * edge)) / n, rtol=1e-6)
    # The difference is exactly the unintended organ × P(no edge) part.
    np.testing.assert_allclose(parity - fixed, jnp.sum(jnp.square(organ * no_edge)) / n, rtol=1e-5)
    # Gradients: the fix touches only P(edge) on background pixels; parity also P(no edge) in the organ.
    grad_fixed = jax.grad(lambda p: losses.mask_exclusion_loss(p, mask))(probs)
    grad_parity = jax.grad(lambda p: losses.mask_exclusion_loss(p, mask, parity=True))(probs)
    background = organ == 0
    np.testing.assert_array_equal(grad_fixed[..., 0::2], 0.0)
    np.testing.assert_array_equal(grad_fixed[..., 1::2] != 0, background)
    np.testing.assert_array_equal(grad_parity[..., 1::2], grad_fixed[..., 1::2])
    np.testing.assert_array_equal(grad_parity[..., 0::2] != 0, ~background)


def test_mask_exclusion_agrees_when_organ_has_no_no_edge_mass():
    # All background: both versions are the same term.
    probs = jnp.array([[[[0.3, 0.6], [0.8, 0.2]]]])
    mask = losses.paired_one_hot(jnp.zeros((1, 1, 2, 1), jnp.int32))
    fixed = losses.mask_exclusion_loss(probs, mask)
    assert float(fixed) == pytest.approx((0.6**2 + 0.2**2) / 4)
    assert float(losses.mask_exclusion_loss(probs, mask, parity=True)) == pytest.approx(float(fixed))
    with pytest.raises(ValueError, match="shapes differ"):
        losses.mask_exclusion_loss(probs, mask[..., :1])


def test_presets():
    assert set(tables.STAGE_A_CODE_WEIGHTS) == set(tables.STAGE_A_PAPER_WEIGHTS) == set(ALL_TERMS)
    assert len(ALL_TERMS) == len(set(ALL_TERMS))
    # Snapshot of the code's weights (METHOD §5.2).
    code = tables.STAGE_A_CODE_WEIGHTS
    assert [code[k] for k in ("d_code_real", "d_code_fake", "d_map_real", "d_map_fake")] == [10, 10, 25, 25]
    assert [code[k] for k in ("g_code_adv", "code_mean", "code_std", "g_map_adv")] == [
        0.001,
        0.001,
        0.001,
        0.1,
    ]
    assert [code[k] for k in ("recon_l2", "recon_l1", "mask_recon")] == [25, 10, 15]
    assert code["edge_density_recon"] == code["edge_density_gen"] == 1e-4
    assert code["mask_exclusion_recon"] == code["mask_exclusion_gen"] == 1
    assert code["code_kl"] == 0
    # The paper's losses have unit weights; terms it does not have are off.
    paper = tables.STAGE_A_PAPER_WEIGHTS
    assert {k for k, w in paper.items() if w} == {
        "g_code_adv",
        "g_map_adv",
        "recon_l2",
        "mask_exclusion_recon",
        "mask_exclusion_gen",
        "mask_recon",
        *losses.STAGE_A_D_TERMS,
    }
    assert set(paper.values()) == {0.0, 1.0}


def _forward_outputs(key, batch=2, hw=(4, 4), slices=1):
    """Random stand-ins for one Stage A forward pass (§5.1), in the documented layouts."""
    keys = jax.random.split(key, 12)
    s = (jax.random.uniform(keys[0], (batch, *hw, slices)) > 0.7).astype(jnp.int32)
    m = (jax.random.uniform(keys[1], (batch, *hw, slices)) > 0.4).astype(jnp.int32)
    maps = (batch, *hw, 2 * slices)
    code = (batch, 2, 2, 1)
    d = (batch, 1, 1, 1)
    return dict(
        structure_onehot=losses.paired_one_hot(s),
        mask_onehot=losses.paired_one_hot(m),
        recon=jax.random.uniform(keys[2], maps),
        generated=jax.random.uniform(keys[3], maps),
        mask_recon=jax.random.uniform(keys[4], maps),
        mask_generated=jax.random.uniform(keys[5], maps),
        code_mean=jax.random.normal(keys[6], code),
        code_logvar=0.1 * jax.random.normal(keys[7], code),
        d_code_prior=jax.random.normal(keys[8], d),
        d_code_posterior=jax.random.normal(keys[9], d),
        d_map_real=jax.random.normal(keys[10], d),
        d_map_fake=jax.random.normal(keys[11], d),
    )


def test_structure_losses_terms_and_totals():
    out = _forward_outputs(jax.random.key(0))
    weights = tables.STAGE_A_CODE_WEIGHTS
    terms = losses.structure_losses(**out, weights=weights)
    assert set(terms) == {*ALL_TERMS, "g_loss", "d_loss"}
    # Spot-check terms against their definitions.
    np.testing.assert_allclose(terms["recon_l2"], jnp.mean((out["structure_onehot"] - out["recon"]) ** 2))
    np.testing.assert_allclose(terms["recon_l1"], jnp.mean(jnp.abs(out["structure_onehot"] - out["recon"])))
    np.testing.assert_allclose(terms["mask_recon"], jnp.mean((out["mask_onehot"] - out["mask_recon"]) ** 2))
    np.testing.assert_allclose(terms["g_code_adv"], jnp.mean((out["d_code_posterior"] - 1) ** 2))
    np.testing.assert_allclose(terms["d_code_fake"], jnp.mean(out["d_code_posterior"] ** 2))
    np.testing.assert_allclose(terms["d_map_real"], jnp.mean((out["d_map_real"] - 1) ** 2))
    np.testing.assert_allclose(
        terms["mask_exclusion_gen"], losses.mask_exclusion_loss(out["generated"], out["mask_generated"])
    )
    # Totals are the weighted sums; the D side equals the existing LSGAN loss with the code's weights.
    g_total = sum(weights[k] * terms[k] for k in losses.STAGE_A_G_TERMS)
    np.testing.assert_allclose(terms["g_loss"], g_total, rtol=1e-6)
    d_lsgan = generic_losses.lsgan_d_loss(
        out["d_code_prior"], out["d_code_posterior"], real_weight=10.0, fake_weight=10.0
    ) + generic_losses.lsgan_d_loss(out["d_map_real"], out["d_map_fake"], real_weight=25.0, fake_weight=25.0)
    np.testing.assert_allclose(terms["d_loss"], d_lsgan, rtol=1e-6)
    # Parity changes the two mask-exclusion terms and nothing else.
    parity = losses.structure_losses(**out, weights=weights, parity=True)
    changed = {k for k in ALL_TERMS if not np.isclose(float(parity[k]), float(terms[k]), rtol=0, atol=0)}
    assert changed == {"mask_exclusion_recon", "mask_exclusion_gen"}
    assert all(float(parity[k]) > float(terms[k]) for k in changed)


def test_structure_losses_tc_slices_and_jit():
    out = _forward_outputs(jax.random.key(1), slices=3)
    weights = dict(tables.STAGE_A_CODE_WEIGHTS, edge_density_recon=0.0, edge_density_gen=0.0)  # TC
    eager = losses.structure_losses(**out, weights=weights)
    jitted = jax.jit(lambda o: losses.structure_losses(**o, weights=weights))(out)
    for name in eager:
        np.testing.assert_allclose(jitted[name], eager[name], rtol=1e-5, err_msg=name)


def test_structure_losses_zero_weights_and_validation():
    out = _forward_outputs(jax.random.key(2))
    out["code_logvar"] = jnp.full_like(out["code_logvar"], 100.0)  # exp overflows: KL and code_std are inf
    terms = losses.structure_losses(**out, weights=tables.STAGE_A_PAPER_WEIGHTS)
    assert not math.isfinite(float(terms["code_kl"]))
    # A term switched off with weight 0 must not turn the total into nan (0·inf), nor its gradient.
    assert math.isfinite(float(terms["g_loss"]))
    paper = tables.STAGE_A_PAPER_WEIGHTS

    def g_loss(logvar):
        return losses.structure_losses(**(out | {"code_logvar": logvar}), weights=paper)["g_loss"]

    grad = jax.grad(g_loss)(out["code_logvar"])
    np.testing.assert_array_equal(grad, 0.0)
    with pytest.raises(ValueError, match=r"missing \['mask_recon'\]"):
        losses.structure_losses(**out, weights={k: 1.0 for k in ALL_TERMS if k != "mask_recon"})
    with pytest.raises(ValueError, match=r"unknown \['kl'\]"):
        losses.structure_losses(**out, weights={**tables.STAGE_A_CODE_WEIGHTS, "kl": 1.0})
    with pytest.raises(ValueError, match="mask_generated shape"):
        losses.structure_losses(
            **(out | {"mask_generated": out["mask_generated"][..., :1]}), weights=tables.STAGE_A_CODE_WEIGHTS
        )
