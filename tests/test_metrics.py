"""Image, distribution, vessel, classification and detection metrics against hand-computed values.

Where no value is easy by hand, against an independent numpy/scipy reimplementation (TF's SSIM and
MS-SSIM, pair counting for AUC, brute-force MMD). Segmentation metrics: test_losses_metrics.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

from synth import metrics
from synth.metrics import classification, detection, distribution, image, inception, vessel

# --------------------------------------------------------------------------------------------------
# Image quality


def test_mse_psnr_known_values():
    a = jnp.zeros((2, 4, 5, 3))
    b = jnp.stack([jnp.full((4, 5, 3), 0.1), jnp.full((4, 5, 3), 0.2)])
    np.testing.assert_allclose(image.mse(a, b), [0.01, 0.04], rtol=1e-6)
    np.testing.assert_allclose(image.psnr(a, b), [20.0, 10 * math.log10(25)], rtol=1e-6)
    want = [10 * math.log10(400), 10 * math.log10(100)]
    np.testing.assert_allclose(image.psnr(a, b, data_range=2.0), want, rtol=1e-6)
    assert np.isinf(image.psnr(a, a)).all()


def _tf_window(size=11, sigma=1.5):
    # TF's _fspecial_gauss: softmax over -(x² + y²) / (2σ²), built in 2-D.
    coords = np.arange(size) - (size - 1) / 2
    logits = -(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma**2)
    return np.exp(logits) / np.exp(logits).sum()


def _ssim_reference(x, y, max_val=1.0):
    """Per-channel (ssim, cs) of one (H, W, C) pair, straight from the formulas with 2-D correlation."""
    window, c1, c2 = _tf_window(), (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    ssims, css = [], []

    def local_mean(img):
        return scipy.signal.correlate2d(img, window, mode="valid")

    for ch in range(x.shape[-1]):
        mx, my = local_mean(x[..., ch]), local_mean(y[..., ch])
        vx, vy = local_mean(x[..., ch] ** 2) - mx**2, local_mean(y[..., ch] ** 2) - my**2
        cov = local_mean(x[..., ch] * y[..., ch]) - mx * my
        lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
        cs = (2 * cov + c2) / (vx + vy + c2)
        ssims.append(np.mean(lum * cs))
        css.append(np.mean(cs))
    return np.array(ssims), np.array(css)


def _ms_ssim_reference(x, y):
    """TF's ssim_multiscale on one (H, W, C) pair, written independently in numpy."""
    weights = np.array(image.MS_SSIM_POWER_FACTORS)
    terms = []
    for scale in range(5):
        if scale:
            pad = ((0, x.shape[0] % 2), (0, x.shape[1] % 2), (0, 0))
            x, y = np.pad(x, pad, mode="symmetric"), np.pad(y, pad, mode="symmetric")
            x = (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]) / 4
            y = (y[0::2, 0::2] + y[1::2, 0::2] + y[0::2, 1::2] + y[1::2, 1::2]) / 4
        full, cs = _ssim_reference(x, y)
        terms.append(np.maximum(full if scale == 4 else cs, 0))
    return np.mean(np.prod(np.stack(terms, -1) ** weights, axis=-1))


def test_ssim_matches_reference_and_closed_forms():
    rng = np.random.default_rng(0)
    x = rng.random((2, 16, 19, 2)).astype(np.float32)
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    got = image.ssim(x, y)
    want = [np.mean(_ssim_reference(x[i].astype(np.float64), y[i].astype(np.float64))[0]) for i in range(2)]
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(image.ssim(x, x), [1.0, 1.0], atol=1e-5)
    # Constant images: zero variance, so cs = 1 and SSIM is the luminance term (2ab + C1) / (a² + b² + C1).
    # (Variances come from E[x²] − E[x]² in float32, as in TF: their rounding, ~1e-8, shows against
    # C2 = 9e-4 at the 1e-5 level.)
    a, b, c1 = 0.3, 0.6, 0.01**2
    const = image.ssim(jnp.full((1, 12, 12, 1), a), jnp.full((1, 12, 12, 1), b))
    np.testing.assert_allclose(const, [(2 * a * b + c1) / (a * a + b * b + c1)], rtol=1e-4)
    with pytest.raises(ValueError, match="filter_size 11"):
        image.ssim(jnp.zeros((1, 10, 20, 1)), jnp.zeros((1, 10, 20, 1)))


def test_ms_ssim_matches_tf_algorithm_and_falls_with_noise():
    rng = np.random.default_rng(1)
    # Odd sides exercise TF's symmetric padding before each 2×2 pooling: 165 -> 83 -> 42 -> 21 -> 11.
    yy, xx = np.mgrid[:165, :170] / 40.0
    clean = (0.5 + 0.25 * np.sin(yy * 3) * np.cos(xx * 2))[None, ..., None] * np.ones((1, 1, 1, 2))
    noisy = [np.clip(clean + s * rng.standard_normal(clean.shape), 0, 1) for s in (0.02, 0.1, 0.3)]
    batch_a = jnp.asarray(np.concatenate([clean] * 4), jnp.float32)
    batch_b = jnp.asarray(np.concatenate([clean, *noisy]), jnp.float32)
    got = np.asarray(jax.jit(image.ms_ssim)(batch_a, batch_b))
    assert got[0] == pytest.approx(1.0, abs=1e-5)
    assert got[0] > got[1] > got[2] > got[3]
    np.testing.assert_allclose(got[2], _ms_ssim_reference(clean[0], noisy[1][0]), rtol=1e-4)


def test_ms_ssim_small_images_protocol():
    small = jnp.zeros((1, 144, 184, 1))
    with pytest.raises(ValueError, match=r"≥ 161 px.*144×184.*min_size=161"):
        image.ms_ssim(small, small)
    assert image.MS_SSIM_MIN_SIZE == 161 == image.ms_ssim_min_size(11, 5)
    assert image.upsample_for_ms_ssim(small).shape == (1, 161, 206, 1)  # 184·161/144 = 205.7
    assert image.upsample_for_ms_ssim(jnp.zeros((1, 200, 170, 1))).shape == (1, 200, 170, 1)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.random((1, 144, 184, 1)), jnp.float32)
    value = jax.jit(image.ms_ssim, static_argnames="min_size")(x, x, min_size=image.MS_SSIM_MIN_SIZE)
    np.testing.assert_allclose(value, [1.0], atol=1e-5)


def test_unordered_pair_is_a_bijection():
    for n in (2, 5, 6, 7):
        first, second = image.unordered_pair(np.arange(math.comb(n, 2)), n)
        pairs = {frozenset(p) for p in zip(first.tolist(), second.tolist())}
        assert len(pairs) == math.comb(n, 2) and all(len(p) == 2 for p in pairs)


def test_ms_ssim_pairing_protocols():
    rng = np.random.default_rng(3)
    base = rng.random((1, 161, 161, 1)).astype(np.float32)
    copies = np.repeat(base, 6, axis=0)
    noisy = np.clip(copies + 0.2 * rng.standard_normal(copies.shape), 0, 1).astype(np.float32)
    key = jax.random.key(0)
    same = image.ms_ssim_real_vs_synthetic(copies, copies, key, 5, batch_size=4)
    assert same[0] == pytest.approx(1.0, abs=1e-5) and same[1] == pytest.approx(0.0, abs=1e-5)
    first = image.ms_ssim_real_vs_synthetic(copies, noisy, key, 5, batch_size=4)
    assert first == image.ms_ssim_real_vs_synthetic(copies, noisy, key, 5, batch_size=4)  # Seeded.
    assert 0.0 < first[0] < 0.99 and first[1] > 0
    assert image.ms_ssim_diversity(copies, key, 5, batch_size=4)[0] == pytest.approx(1.0, abs=1e-5)
    assert image.ms_ssim_diversity(noisy, key, 5, batch_size=4)[0] < 0.99
    with pytest.raises(ValueError, match="only 15 distinct pairs"):
        image.ms_ssim_diversity(copies, key, 16)


def test_minmax_per_image():
    x = jnp.stack([jnp.linspace(2.0, 4.0, 12).reshape(2, 3, 2), jnp.full((2, 3, 2), 7.0)])
    out = image.minmax_per_image(x)
    np.testing.assert_allclose(out[0].ravel(), np.linspace(0, 1, 12), atol=1e-6)
    assert float(jnp.max(jnp.abs(out[1]))) == 0.0


# --------------------------------------------------------------------------------------------------
# Distribution distances


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((40, 6))
    mu, sigma = distribution.feature_statistics(a)
    np.testing.assert_allclose(mu, a.mean(0))
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False))
    for method in ("eigh", "sqrtm"):
        same = distribution.frechet_distance(mu, sigma, mu, sigma, method=method)
        assert same == pytest.approx(0.0, abs=1e-8)
        # 1-D: (μ1 − μ2)² + (s1 − s2)² for standard deviations s.
        got = distribution.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]], method=method)
        assert got == pytest.approx(4.0 + 1.0)
    # Diagonal covariances commute: Σ (√a − √b)² plus the mean term.
    d1, d2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    got = distribution.frechet_distance(np.zeros(3), np.diag(d1), np.ones(3), np.diag(d2))
    assert got == pytest.approx(3.0 + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2))
    # General covariances: the eigh route agrees with scipy's sqrtm.
    b = rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6))
    stats = (*distribution.feature_statistics(a), *distribution.feature_statistics(b))
    assert distribution.frechet_distance(*stats) == pytest.approx(
        distribution.frechet_distance(*stats, method="sqrtm"), rel=1e-8
    )
    assert distribution.fid_from_features(a, b) == pytest.approx(distribution.frechet_distance(*stats))
    # Fewer samples than dimensions: singular covariances, where the eigh route stays real and exact.
    few = distribution.feature_statistics(rng.standard_normal((5, 10)))
    assert distribution.frechet_distance(*few, *few) == pytest.approx(0.0, abs=1e-6)


def test_mmd2_unbiased_matches_brute_force():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((6, 3)) + 0.5

    def k(u, v):
        return (u @ v / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(6)) / 30
    got = distribution.mmd2_unbiased(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    assert float(got) == pytest.approx(xx + yy - 2 * xy, rel=1e-4)


def test_kid_near_zero_for_one_distribution_positive_for_shifted():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((200, 8)), rng.standard_normal((200, 8))
    key = jax.random.key(1)
    same_mean, same_std = distribution.kid(a, b, 50, 20, key)
    shifted_mean, _ = distribution.kid(a, b + 1.0, 50, 20, key)
    assert abs(float(same_mean)) < 0.05 < float(shifted_mean)
    assert float(same_std) > 0
    assert float(distribution.kid(a, b, 50, 20, key)[0]) == float(same_mean)  # Seeded.
    with pytest.raises(ValueError, match="subset_size 300"):
        distribution.kid(a, b, 300, 2, key)


def _random_inception_variables(rng):
    """Cheap stand-in weights of the right shapes (a real init of 22 M parameters is slow on a CPU)."""

    def fill(path, shape):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(shape.shape[:3])
            return (rng.standard_normal(shape.shape) * np.sqrt(2 / fan_in)).astype(np.float32)
        if name in ("scale", "var"):
            return np.ones(shape.shape, np.float32)
        return 0.01 * rng.standard_normal(shape.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, inception._variable_shapes())


def test_inception_architecture_weights_round_trip_and_features(tmp_path):
    shapes = inception._variable_shapes()
    # torchvision's Inception-v3 has 27 161 264 parameters; without AuxLogits (3 326 696) and the
    # 1000-way fc (2 049 000) that leaves the pool3 trunk's 21 785 568.
    assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == 21_785_568
    variables = _random_inception_variables(np.random.default_rng(7))
    arrays = inception.to_torch_layout(variables)
    assert arrays["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)  # PyTorch (out, in, kh, kw).
    assert arrays["Mixed_7c.branch_pool.bn.running_var"].shape == (192,)
    arrays["fc.weight"] = np.zeros((1008, 2048), np.float32)  # Present in pytorch-fid's file; ignored.
    path = tmp_path / "inception.npz"
    np.savez(path, **arrays)
    extract = distribution.inception_v3_extractor(path, batch_size=2)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), variables, extract.variables))
    grey = np.random.default_rng(8).random((2, 40, 40, 1)).astype(np.float32)
    features = extract(grey)
    assert features.shape == (2, inception.FEATURE_DIM) and bool(jnp.all(jnp.isfinite(features)))
    np.testing.assert_array_equal(features, extract(np.repeat(grey, 3, axis=-1)))  # Grey is tiled.
    dropped = "Mixed_5b.branch1x1.conv.weight"
    with pytest.raises(ValueError, match=f"lack '{dropped}'"):
        inception.from_torch_layout({k: v for k, v in arrays.items() if k != dropped})


def test_inception_missing_weights_fail_loudly(tmp_path):
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.npz.*convert_inception"):
        distribution.inception_v3_extractor(missing)


# --------------------------------------------------------------------------------------------------
# Vessels, classification, detection


def test_vessel_counts_inside_fov():
    probs = jnp.array([[[0.9, 0.2, 0.7], [0.4, 0.6, 0.1]]])
    manual = jnp.array([[[255, 255, 0], [0, 255, 0]]], jnp.uint8)
    fov = jnp.array([[[1, 1, 1], [1, 1, 0]]], bool)
    counts = {k: int(v) for k, v in vessel.confusion_counts(probs, manual, fov).items()}
    assert counts == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    all_metrics = jax.jit(vessel.vessel_metrics)(probs, manual, fov)
    assert float(all_metrics["sensitivity"]) == pytest.approx(2 / 3)
    assert float(all_metrics["specificity"]) == pytest.approx(1 / 2)
    assert float(all_metrics["accuracy"]) == pytest.approx(3 / 5)
    # Vessel scores {0.9, 0.2, 0.6} vs background {0.7, 0.4}: 3 of the 6 pairs are ordered correctly.
    assert float(all_metrics["auc"]) == pytest.approx(3 / 6)
    assert float(vessel.accuracy(probs, manual)) == pytest.approx(4 / 6)  # Without FOV: all 6 pixels.
    assert np.isnan(float(vessel.sensitivity(probs, jnp.zeros_like(manual), fov)))


def test_vessel_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(9)
    probs = np.round(rng.random((2, 9, 11)), 1)  # Coarse values, so many ties.
    manual = rng.random((2, 9, 11)) < 0.3
    fov = rng.random((2, 9, 11)) < 0.8
    pos, neg = probs[manual & fov], probs[~manual & fov]
    diff = pos[:, None] - neg[None, :]
    want = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
    assert float(jax.jit(vessel.auc)(probs, manual, fov)) == pytest.approx(want, rel=1e-6)
    assert float(vessel.auc(manual.astype(np.float32), manual)) == pytest.approx(1.0, abs=1e-6)


def test_classification_accuracy_and_confusion():
    pred = jnp.array([0, 1, 2, 2, 1, 0])
    labels = jnp.array([0, 1, 1, 2, 2, 2])
    assert float(classification.accuracy(pred, labels)) == pytest.approx(3 / 6)
    confusion = jax.jit(classification.confusion_matrix, static_argnames="num_classes")
    matrix = confusion(pred, labels, num_classes=3)
    np.testing.assert_array_equal(matrix, [[1, 0, 0], [0, 1, 1], [1, 1, 1]])


def test_voc_ap_hand_computed_example():
    # Class 0: 3 ground-truth boxes over two images; ranked detections TP, FP (duplicate), TP, FP (miss):
    # recall 1/3, 1/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2; envelope 1, 2/3, 2/3, 1/2;
    # AP = 1/3·1 + 1/3·2/3 = 5/9. Class 1: one box found exactly, AP 1.
    gt_boxes = [np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), np.array([[20, 20, 30, 30], [0, 0, 5, 5]])]
    gt_labels = [np.array([0, 1]), np.array([0, 0])]
    pred_boxes = [
        np.array([[0, 0, 10, 10], [1, 0, 10, 10], [80, 80, 90, 90], [50, 50, 60, 60]]),
        np.array([[20, 20, 30, 31]]),
    ]
    pred_scores = [np.array([0.9, 0.8, 0.6, 0.95]), np.array([0.7])]
    pred_labels = [np.array([0, 0, 0, 1]), np.array([0])]
    lists = (pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels)
    mean_ap, per_class = detection.mean_average_precision(*lists)
    assert per_class[0] == pytest.approx(5 / 9) and per_class[1] == pytest.approx(1.0)
    assert mean_ap == pytest.approx(7 / 9)
    assert detection.voc_ap([0.5, 1.0], [1.0, 0.5]) == pytest.approx(0.75)
    # A class without ground truth has no AP and stays out of the mean.
    mean_ap, per_class = detection.mean_average_precision(*lists, classes=[0, 1, 2])
    assert np.isnan(per_class[2]) and mean_ap == pytest.approx(7 / 9)


def test_voc_iou_conventions():
    gt = [np.array([[0, 0, 10, 10]])]
    det = [np.array([[0, 0, 10, 5]])]  # IoU 50/100 = 0.5 exactly; with +1 pixels 66/121 ≈ 0.545.
    assert detection.box_iou(det[0], gt[0])[0, 0] == pytest.approx(0.5)
    assert detection.box_iou(det[0], gt[0], pixel_plus_one=True)[0, 0] == pytest.approx(66 / 121)

    def ap(**options):
        return detection.average_precision(det, [np.array([1.0])], gt, **options)

    assert ap() == 1.0  # IoU ≥ 0.5 by default.
    assert ap(strict_iou=True) == 0.0  # The authors' IoU > 0.5 ...
    assert ap(**detection.VOC_PARITY) == 1.0  # ... but with their +1-pixel areas the IoU is 0.545.
    assert np.isnan(detection.average_precision(det, [np.array([1.0])], [np.zeros((0, 4))]))


def test_segmentation_names_still_at_package_level():
    from synth.metrics import segmentation

    for name in ("dice_per_class", "brats_region_dice", "region_mask", "parity_dice", "parity_mse"):
        assert getattr(metrics, name) is getattr(segmentation, name)
    assert metrics.PARITY_SMOOTH == 1e-5 and "whole" in metrics.BRATS_REGIONS


# --------------------------------------------------------------------------------------------------
# Scores of synthetic sets (synth.scoring): what they must not reward


def _smooth_images(key, n, size=16, k=4):
    """(n, size, size, k) smooth random images in [0, 1], each channel its own pattern."""
    coarse = jax.random.uniform(key, (n, 4, 4, k))
    return np.asarray(jax.image.resize(coarse, (n, size, size, k), "bilinear"))


def test_image_quality_normalises_each_image_and_shows_alike_modalities():
    from synth import scoring

    real = _smooth_images(jax.random.key(0), 6)
    key, names = jax.random.key(1), ("a", "b", "c", "d")
    same = scoring.image_quality(real, real, key=key, num_pairs=8, modalities=names)
    # The same images at half the range on a grey floor: identical after each image's min–max (§9.3).
    dim = scoring.image_quality(real, 0.25 + 0.5 * real, key=key, num_pairs=8, modalities=names)
    assert dim["ms_ssim"] == pytest.approx(same["ms_ssim"], abs=1e-4)
    # Four copies of one modality: the real modalities differ, the synthetic ones are alike.
    alike = np.repeat(real[..., :1], 4, axis=-1)
    scores = scoring.image_quality(real, alike, key=key, num_pairs=8, modalities=names)
    assert scores["intermodality/synthetic"] == pytest.approx(1.0, abs=1e-4)
    assert scores["intermodality/real"] < 0.9 and scores["intermodality/real"] == same["intermodality/real"]


def test_lesion_chance_scores_another_lesion_on_the_same_rows():
    from synth import scoring

    label = np.zeros((4, 8, 8), np.int32)
    label[0, :4, :4] = 2  # The asked-for lesion …
    label[1, :4, 1:4] = 2  # … and the next slice of the same subject: nearly the same one.
    label[3, 4:, 4:] = 1  # Another subject's lesion; row 2 has none.
    found = np.stack([label > 0, np.zeros_like(label, bool)])  # Modality 0 finds each; modality 1 nothing.
    out = {
        k: np.asarray(v)
        for k, v in scoring.lesion_dice_and_chance(jnp.asarray(found), jnp.asarray(label)).items()
    }
    assert out["scored"].tolist() == [True, True, False, True]  # No lesion asked for: not scored at all.
    np.testing.assert_allclose(out["dice"][out["scored"], 0], 1.0)
    # Chance compares with another lesion, never the neighbouring slice's (it overlaps by Dice 0.86) nor
    # an empty label (empty against empty would score 1 through Dice's eps).
    np.testing.assert_allclose(out["chance"][out["scored"]], 0.0, atol=1e-6)


def test_feature_frechet_scores_each_image_after_its_own_normalisation():
    """Real↔real is the yardstick; a dimmed copy scores as the original (§9.3), a changed set does not."""
    from synth import scoring

    rng = np.random.default_rng(0)
    real = rng.random((40, 8, 8, 2)).astype(np.float32)
    reference = rng.random((40, 8, 8, 2)).astype(np.float32)

    def features(x):  # Per-image statistics of each modality: a stand-in for the segmentors' bottleneck.
        return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=-1)

    score = lambda synthetic: scoring.feature_frechet(  # noqa: E731
        features, reference, real, synthetic, modalities=2, channels=1
    )
    dimmed = score(0.2 + 0.5 * real)
    assert dimmed["real_synthetic"] == pytest.approx(0.0, abs=1e-9) and dimmed["real_real"] > 0.0
    smooth = np.repeat(np.repeat(real[:, ::2, ::2], 2, axis=1), 2, axis=2)  # Blurrier, other statistics.
    assert score(smooth)["real_synthetic"] > 2 * dimmed["real_real"]
