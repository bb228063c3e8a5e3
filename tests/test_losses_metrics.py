"""Losses and segmentation metrics against hand-computed values on tiny arrays."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synth import losses, metrics

# --------------------------------------------------------------------------------------------------
# Losses


def test_mse_mae_broadcast():
    a = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    assert float(losses.mse(a, 1.0)) == pytest.approx((0 + 1 + 4 + 9) / 4)
    assert float(losses.mae(a, 1.0)) == pytest.approx((0 + 1 + 2 + 3) / 4)
    assert float(losses.mse(a, a)) == 0.0


def test_lsgan():
    ones, zeros = jnp.ones((2, 3, 3, 1)), jnp.zeros((2, 3, 3, 1))
    assert float(losses.lsgan_d_loss(ones, zeros)) == 0.0
    assert float(losses.lsgan_d_loss(zeros, ones)) == pytest.approx(2.0)
    assert float(losses.lsgan_d_loss(zeros, ones, real_weight=5.0, fake_weight=3.0)) == pytest.approx(8.0)
    assert float(losses.lsgan_g_loss(ones)) == 0.0
    assert float(losses.lsgan_g_loss(jnp.full((4,), 0.5))) == pytest.approx(0.25)


def test_cross_entropy_values():
    # Uniform logits: CE = log(C) everywhere.
    labels = jnp.array([[[0, 1], [2, 1]]])
    ce = losses.softmax_cross_entropy(jnp.zeros((1, 2, 2, 3)), labels, num_classes=3)
    assert float(ce) == pytest.approx(math.log(3.0), rel=1e-6)
    # Confident correct logits: CE ≈ 0.
    confident = 50.0 * jax.nn.one_hot(labels, 3)
    assert float(losses.softmax_cross_entropy(confident, labels, num_classes=3)) < 1e-6
    # Two pixels, hand-computed NLLs, class weights and a mask.
    logits = jnp.array([[[[2.0, 0.0], [0.0, 1.0]]]])  # (1, 1, 2, 2)
    lab = jnp.array([[[0, 0]]])
    nll0 = math.log(1 + math.exp(-2.0))
    nll1 = math.log(1 + math.exp(1.0))
    plain = losses.softmax_cross_entropy(logits, lab, num_classes=2)
    assert float(plain) == pytest.approx((nll0 + nll1) / 2, rel=1e-6)
    masked = losses.softmax_cross_entropy(logits, lab, num_classes=2, mask=jnp.array([[[1.0, 0.0]]]))
    assert float(masked) == pytest.approx(nll0, rel=1e-6)
    lab2 = jnp.array([[[0, 1]]])  # pixel 1 now has label 1: nll = log(1 + e^-1)
    nll1b = math.log(1 + math.exp(-1.0))
    weighted = losses.softmax_cross_entropy(logits, lab2, num_classes=2, class_weights=(1.0, 3.0))
    assert float(weighted) == pytest.approx((nll0 + 3 * nll1b) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="class weights"):
        losses.softmax_cross_entropy(logits, lab2, num_classes=2, class_weights=(1.0,))


def test_soft_dice_loss_values():
    y = jax.nn.one_hot(jnp.array([[[0, 1], [1, 1]]]), 2)  # class 1 on 3 pixels
    assert float(losses.soft_dice_loss(y, y, eps=0.0)) == pytest.approx(0.0, abs=1e-7)
    p = jax.nn.one_hot(jnp.array([[[0, 0], [0, 1]]]), 2)  # class 1 predicted on 1 pixel, correctly
    # Class 1: 2·1 / (1 + 3) = 0.5 → loss 0.5 (background excluded).
    assert float(losses.soft_dice_loss(p, y, eps=0.0)) == pytest.approx(0.5)
    # Background included: class 0 Dice = 2·1 / (3 + 1) = 0.5, mean 0.5.
    assert float(losses.soft_dice_loss(p, y, eps=0.0, exclude_background=False)) == pytest.approx(0.5)
    # Smoothing: (2 + 1) / (4 + 1) = 0.6.
    assert float(losses.soft_dice_loss(p, y, eps=1.0)) == pytest.approx(0.4)


def test_class_weighted_mse_and_parity_kind():
    labels = jnp.array([[[0, 1], [2, 2]]])
    logits = jnp.array([[[[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]], [[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]]])
    weights = (2.5, 25.0, 125.0)
    probs = jax.nn.sigmoid(logits)
    onehot = np.eye(3)[np.asarray(labels)]
    expected = sum(
        w * np.mean((onehot[..., k] - np.asarray(probs)[..., k]) ** 2) for k, w in enumerate(weights)
    )
    got = losses.segmentation_loss(
        logits, labels, kind="weighted_mse_parity", num_classes=3, class_weights=weights
    )
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert losses.PARITY_SEG_CLASS_WEIGHTS == (2.5, 25.0, 125.0, 125.0, 125.0)


def test_segmentation_loss_kinds_and_jit():
    labels = jnp.array([[[0, 1], [2, 0]], [[1, 1], [0, 2]]])
    logits = jax.random.normal(jax.random.key(0), (2, 2, 2, 3))
    ce = losses.softmax_cross_entropy(logits, labels, num_classes=3)
    dice = losses.soft_dice_loss(jax.nn.softmax(logits), jax.nn.one_hot(labels, 3))
    f = jax.jit(
        functools.partial(losses.segmentation_loss, num_classes=3, dice_weight=0.5),
        static_argnames="kind",
    )
    np.testing.assert_allclose(f(logits, labels, kind="cross_entropy"), ce, rtol=1e-6)
    np.testing.assert_allclose(f(logits, labels, kind="cross_entropy_dice"), ce + 0.5 * dice, rtol=1e-6)
    with pytest.raises(ValueError, match="'focal'.*cross_entropy"):
        losses.segmentation_loss(logits, labels, kind="focal", num_classes=3)
    with pytest.raises(ValueError, match="channels"):
        losses.segmentation_loss(logits, labels, kind="cross_entropy", num_classes=4)
    # Perfect confident prediction: CE ≈ 0 and Dice loss ≈ 0.
    perfect = 50.0 * jax.nn.one_hot(labels, 3)
    assert float(f(perfect, labels, kind="cross_entropy_dice")) < 1e-5


# --------------------------------------------------------------------------------------------------
# Metrics


def test_dice_per_class_known_overlap():
    # Image 0: class 1 target on 4 pixels, predicted on 2 of them + 1 extra → 2·2/(3+4).
    target = jnp.array([[[1, 1, 0], [1, 1, 0]], [[0, 0, 0], [0, 0, 2]]])
    pred = jnp.array([[[1, 1, 1], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]])
    dice, count = metrics.dice_per_class(pred, target, num_classes=4, eps=0.0)
    np.testing.assert_array_equal(count, [2, 1, 1, 0])
    # Class 0: image 0 → 2·1/(3+2) = 0.4; image 1 → 2·5/(6+5) = 10/11.
    np.testing.assert_allclose(dice, [(0.4 + 10 / 11) / 2, 4 / 7, 0.0, 0.0], rtol=1e-6)
    # Perfect prediction: 1 for every present class, count says which are absent.
    dice, count = metrics.dice_per_class(target, target, num_classes=4)
    np.testing.assert_allclose(dice, [1.0, 1.0, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(count, [2, 1, 1, 0])


def test_brats_regions():
    target = jnp.array([[[0, 2, 2, 1], [0, 4, 3, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]])
    pred = jnp.array([[[0, 2, 1, 1], [0, 4, 4, 4]], [[0, 0, 0, 0], [0, 0, 0, 0]]])
    out = metrics.brats_region_dice(pred, target, eps=0.0)
    # Pixels as row-column: whole T = {01,02,03,11,12}, P = {01,02,03,11,12,13}: 2·5/11.
    # Core T = {03,11,12}, P = {02,03,11,12,13}: 2·3/8. Enhancing T = {11}, P = {11,12,13}: 2/4.
    # Image 1 is empty in both, so it is left out.
    assert float(out["whole"]) == pytest.approx(10 / 11, rel=1e-6)
    assert float(out["core"]) == pytest.approx(6 / 8, rel=1e-6)
    assert float(out["enhancing"]) == pytest.approx(0.5, rel=1e-6)
    assert {int(out[f"{r}_count"]) for r in ("whole", "core", "enhancing")} == {1}
    np.testing.assert_array_equal(
        metrics.region_mask(target[0], "core"),
        [[False, False, False, True], [False, True, True, False]],
    )
    with pytest.raises(ValueError, match="'tumour'.*whole"):
        metrics.region_mask(target, "tumour")


def test_parity_metrics():
    target = jnp.array([[[0, 4], [1, 0]], [[0, 0], [0, 0]]])
    pred = jnp.array([[[0, 3], [1, 2]], [[0, 0], [0, 0]]])
    # Image 0: (2·(12 + 1) + 1e-5) / ((16 + 1) + (9 + 1 + 4) + 1e-5); image 1 (empty) scores 1.
    img0 = (26 + 1e-5) / (31 + 1e-5)
    assert float(metrics.parity_dice(pred, target)) == pytest.approx((img0 + 1.0) / 2, rel=1e-6)
    assert float(metrics.parity_dice(target, target)) == pytest.approx(1.0)
    # MSE on indices: (1 + 4) / 8 pixels.
    assert float(metrics.parity_mse(pred, target)) == pytest.approx(5 / 8)


def test_metrics_jit():
    key1, key2 = jax.random.split(jax.random.key(0))
    pred = jax.random.randint(key1, (3, 8, 8), 0, 5)
    target = jax.random.randint(key2, (3, 8, 8), 0, 5)
    fns = {
        "dice_per_class": functools.partial(metrics.dice_per_class, num_classes=5, eps=1e-6),
        "brats": metrics.brats_region_dice,
        "parity_dice": metrics.parity_dice,
        "parity_mse": metrics.parity_mse,
    }
    for name, fn in fns.items():
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=1e-6, err_msg=name),
            jax.jit(fn)(pred, target),
            fn(pred, target),
        )
