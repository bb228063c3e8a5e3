"""Golden tests for synth/extraction.py on hand-computed tiny arrays, plus scipy cross-checks.

JAX compiles dominate the cost, so shapes are tiny and each jitted function sees few shapes.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.signal

from configs import tables
from synth import extraction as E
from synth import fusion, image_ops

# Every dataset's extraction row (configs/tables.py) as the parameters the library builds from it.
DATASET_PARAMS = {name: E.ExtractionParams.from_config(tables.extraction(name)) for name in tables.EXTRACTION}

# Jitted once per function: a jit compiles far faster than the op-by-op compiles of eager calls
# (every differently offset slice is its own eager compile).
sobel = jax.jit(image_ops.sobel)
gaussian_blur = jax.jit(image_ops.gaussian_blur, static_argnames=("sigma", "kind"))
median_filter = jax.jit(image_ops.median_filter, static_argnames="k")
binary_median_filter = jax.jit(image_ops.binary_median_filter, static_argnames=("k", "pad_value"))
organ_mask = jax.jit(E.organ_mask, static_argnames=("expand", "median_size", "border"))
structure_map = jax.jit(E.structure_map, static_argnames=("sigma1", "sigma2", "median_size", "blur_kind"))
extract = jax.jit(E.extract, static_argnames=("params", "remove_lesions"))

BRATS_LIKE = dict(alpha=0.035, sigma1=0.01, sigma2=0.01, beta=0.0, median_size=3, blur_kind="tf_replica")


def _nhwc(a):
    """(H, W) numpy -> (1, H, W, 1) float32."""
    return jnp.asarray(np.asarray(a, np.float32)[None, :, :, None])


def _step_image(h=12, w=12, col=6, lo=0.25, hi=0.75):
    # Dyadic levels keep flat regions exactly gradient-free (0.2/0.8 leave float32 rounding noise,
    # which the min–max normalisation of step 3 would blow up to full range).

    x = np.full((h, w), lo, np.float32)
    x[:, col:] = hi
    return x


def _blur_reference(a, taps):
    """Separable cross-correlation with REFLECT (scipy "mirror") padding: along W, then along H."""
    a = scipy.ndimage.correlate1d(a, taps, axis=1, mode="mirror")
    return scipy.ndimage.correlate1d(a, taps, axis=0, mode="mirror")


def _disc(h, w, radius, value=0.8, centre=None):
    cy, cx = centre if centre is not None else ((h - 1) / 2, (w - 1) / 2)
    yy, xx = np.mgrid[:h, :w]
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2, value, 0.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Sobel and blur.


def test_sobel_step_edge_and_tf_semantics():
    x = _step_image(6, 6, col=3, lo=0.0, hi=1.0)
    e = np.asarray(sobel(_nhwc(x)))
    assert e.shape == (1, 6, 6, 1, 2)
    dy, dx = e[0, :, :, 0, 0], e[0, :, :, 0, 1]
    np.testing.assert_array_equal(dy, 0.0)
    expected_dx = np.zeros((6, 6), np.float32)
    expected_dx[:, 2:4] = 4.0  # (1 + 2 + 1) · (1 − 0) on both columns next to the step
    np.testing.assert_array_equal(dx, expected_dx)

    # Random image: cross-correlation with REFLECT (scipy "mirror") padding, ky then kx.
    r = np.random.default_rng(0).random((7, 9)).astype(np.float32)
    e = np.asarray(sobel(_nhwc(r)))[0, :, :, 0]
    ky = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float32)
    np.testing.assert_allclose(e[..., 0], scipy.ndimage.correlate(r, ky, mode="mirror"), atol=1e-6)
    np.testing.assert_allclose(e[..., 1], scipy.ndimage.correlate(r, ky.T, mode="mirror"), atol=1e-6)


def test_blur_taps_match_method_doc():
    np.testing.assert_allclose(
        image_ops.blur_taps(0.4),
        [0.0016, 0.037, 0.0016, 0.037, 0.845, 0.037, 0.0016, 0.037, 0.0016],
        atol=6e-4,
    )
    # METHOD rounds the σ = 0.5 centre (0.6193) up to .620.
    np.testing.assert_allclose(
        image_ops.blur_taps(0.5), [0.011, 0.084, 0.011, 0.084, 0.620, 0.084, 0.011, 0.084, 0.011], atol=1e-3
    )
    edge, corner = np.exp(-1 / (2 * 0.25)), np.exp(-2 / (2 * 0.25))
    total = 1 + 4 * edge + 4 * corner
    np.testing.assert_allclose(
        image_ops.blur_taps(0.5)[[0, 1, 4]], np.array([corner, edge, 1]) / total, rtol=1e-6
    )
    for sigma in (0.01, 0.3):
        taps = image_ops.blur_taps(sigma)
        assert taps[4] >= 0.97 and len(taps) == 9
    gauss = image_ops.blur_taps(1.0, kind="gaussian")
    assert len(gauss) == 7 and np.isclose(gauss.sum(), 1.0) and np.allclose(gauss, gauss[::-1])
    with pytest.raises(ValueError, match="tf_replica"):
        image_ops.blur_taps(0.4, kind="box")


def test_gaussian_blur_tf_replica_and_gaussian():
    # An impulse far from the border spreads into the outer product of the taps (the gappy 9×9).
    impulse = np.zeros((11, 11), np.float32)
    impulse[5, 5] = 1.0
    v = image_ops.blur_taps(0.5)
    out = np.asarray(gaussian_blur(_nhwc(impulse), 0.5, kind="tf_replica"))[0, :, :, 0]
    np.testing.assert_allclose(out[1:10, 1:10], np.outer(v, v), atol=1e-7)

    # Random image: REFLECT pad 4, 1×9 along W, then 9×1 along H.
    r = np.random.default_rng(1).random((8, 10)).astype(np.float32)
    out = np.asarray(gaussian_blur(_nhwc(r), 0.4, kind="tf_replica"))[0, :, :, 0]
    np.testing.assert_allclose(out, _blur_reference(r, image_ops.blur_taps(0.4)), atol=1e-6)

    out = np.asarray(gaussian_blur(_nhwc(r), 0.8, kind="gaussian"))[0, :, :, 0]
    np.testing.assert_allclose(out, _blur_reference(r, image_ops.blur_taps(0.8, kind="gaussian")), atol=1e-6)

    # Tiny σ: both kinds are the identity.
    for kind in image_ops.BLUR_KINDS:
        np.testing.assert_allclose(np.asarray(gaussian_blur(_nhwc(r), 0.01, kind=kind))[0, ..., 0], r)


# ------------------------------------------------------------------------------------------------
# Median filters.


@pytest.mark.parametrize("k", [3, 5, 17])
def test_median_filters_equal_scipy(k):
    rng = np.random.default_rng(k)
    binary = (rng.random((2, 19, 22, 1)) > 0.5).astype(np.float32)
    floats = rng.random((2, 19, 22, 1)).astype(np.float32)
    ref = lambda a: np.stack([scipy.signal.medfilt2d(img[..., 0], k) for img in a])[..., None]  # noqa: E731

    np.testing.assert_array_equal(np.asarray(median_filter(jnp.asarray(floats), k)), ref(floats))
    np.testing.assert_array_equal(np.asarray(median_filter(jnp.asarray(binary), k)), ref(binary))
    np.testing.assert_array_equal(np.asarray(binary_median_filter(jnp.asarray(binary), k)), ref(binary))
    np.testing.assert_array_equal(image_ops.median_filter_host(floats, k), ref(floats))
    # One-padding is the complement trick organ_mask relies on.
    np.testing.assert_array_equal(
        np.asarray(binary_median_filter(jnp.asarray(binary), k, pad_value=1.0)), 1.0 - ref(1.0 - binary)
    )


def test_median_rejects_even_size():
    with pytest.raises(ValueError, match="odd"):
        median_filter(jnp.zeros((1, 4, 4, 1)), 4)


# ------------------------------------------------------------------------------------------------
# Algorithm 2: organ mask.


def test_resize_nearest_and_crop_follow_tf_indexing():
    x = jnp.arange(5.0)[None, None, :, None] * jnp.ones((1, 1, 1, 1))
    up = np.asarray(image_ops.resize_nearest_tf(x, (1, 7)))[0, 0, :, 0]
    np.testing.assert_array_equal(up, [0, 0, 1, 2, 2, 3, 4])  # floor(i · 5/7)
    np.testing.assert_array_equal(
        np.asarray(image_ops.crop_center(x, (1, 2)))[0, 0, :, 0], [1, 2]
    )  # 5//2 − 2//2


def test_organ_mask_of_disc_with_known_expansion():
    h = w = 32
    p, k = 8, 3
    img = _disc(h, w, radius=8)
    m = np.asarray(organ_mask(_nhwc(img), gamma=0.3, expand=p, median_size=k))[0, :, :, 0]

    # Reference in the authors' own terms: M = medfilt2d(crop(resize(1 − [x > γ]))), ours = 1 − M.
    authors = 1.0 - (img > 0.3).astype(np.float32)
    rows = np.minimum(np.floor(np.arange(h + p) * np.float32(h / (h + p))).astype(int), h - 1)
    big = authors[rows][:, rows]
    top = (h + p) // 2 - h // 2
    ref = 1.0 - scipy.signal.medfilt2d(big[top : top + h, top : top + w], k)
    np.testing.assert_array_equal(m, ref)
    np.testing.assert_array_equal(np.asarray(E.to_authors_mask(m)), 1.0 - ref)
    # The disc grew about the centre by ≈ p/2 per side: diameter 17 → ≈ 17·40/32 ≈ 21.
    assert abs(m[h // 2].sum() - 17 * (h + p) / h) <= 1.5
    assert m[h // 2, w // 2] == 1 and m[0, w // 2] == 0
    # The authors' quirk, kept for parity: their zero padding counts as organ, so even a 3×3 median
    # turns the corner pixels (5 of 9 window pixels outside the image) into organ.
    assert m[0, 0] == 1 and m[1, 1] == 0


def test_organ_mask_border_modes():
    empty = jnp.zeros((1, 12, 12, 1))
    # Authors' zero padding of their background=1 mask: corners turn into "organ" for a big median.
    authors = np.asarray(organ_mask(empty, gamma=0.3, expand=0, median_size=9))[0, ..., 0]
    assert authors[0, 0] == 1 and authors[6, 6] == 0
    background = organ_mask(empty, gamma=0.3, expand=0, median_size=9, border="background")
    assert float(jnp.sum(background)) == 0
    with pytest.raises(ValueError, match="background"):
        organ_mask(empty, gamma=0.3, expand=0, median_size=3, border="zero")


# ------------------------------------------------------------------------------------------------
# Algorithm 1: structure map.


def test_structure_map_lands_on_edge_and_is_empty_when_flat():
    h = w = 12
    x = np.stack([_step_image(h, w, col=6), np.full((h, w), 0.5, np.float32)])[..., None]
    organ = jnp.ones((2, h, w, 1))
    s = np.asarray(structure_map(jnp.asarray(x), organ, **BRATS_LIKE))
    assert s.shape == (2, h, w, 1)
    expected = np.zeros((h, w), np.float32)
    # b = 1 − mean on the two columns next to the step; the zero-padded 3×3 median then keeps the
    # 2-wide line except its end rows (4 of 9 window pixels set there).
    expected[1:-1, 5:7] = 1.0
    np.testing.assert_array_equal(s[0, ..., 0], expected)
    np.testing.assert_array_equal(s[1], 0.0)  # flat: no NaNs, no edges

    # Step 9: edges only inside the organ.
    left = jnp.asarray(np.broadcast_to((np.arange(w) < 6).astype(np.float32)[None, :, None], (h, w, 1)))
    s = np.asarray(structure_map(jnp.asarray(x[:1]), left[None], **BRATS_LIKE))
    np.testing.assert_array_equal(s[0, ..., 0], expected * (np.arange(w) < 6))


def test_structure_map_with_blurs_stays_near_edge():
    # Step between columns 7 and 8; g_max = 1 on both, g_min constant. Blur #1 (σ 0.4) leaves only
    # columns 7, 8 above α; blur #2 (σ 0.5, 9 taps with gaps) lifts columns 4..11 above β = 0.05
    # (METHOD's "dilates edges and creates faint copies 3 px away"), which the 5×5 median keeps
    # except where its zero padding thins the first and last two rows.
    x = jnp.asarray(_step_image(16, 16, col=8)[None, ..., None])
    kwargs = dict(alpha=0.014, sigma1=0.4, sigma2=0.5, beta=0.05, median_size=5, blur_kind="tf_replica")
    s = np.asarray(structure_map(x, None, **kwargs))[0, ..., 0]
    expected = np.zeros((16, 16), np.float32)
    expected[2:-2, 4:12] = 1
    expected[[0, -1], 6:10] = 1
    expected[[1, -2], 5:11] = 1
    np.testing.assert_array_equal(s, expected)


def _structure_map_reference(x, organ, *, alpha, sigma1, sigma2, beta, median_size):
    """Algorithm 1 for one (H, W) image, written independently with scipy (float64)."""
    x = x.astype(np.float64)
    ky = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float64)
    d = np.stack([scipy.ndimage.correlate(x, k, mode="mirror") for k in (ky, ky.T)])

    def norm(a):
        return (a - a.min()) / (a.max() - a.min())

    def blur(a, sigma):
        return _blur_reference(a, image_ops.blur_taps(sigma).astype(np.float64))

    g_min, g_max = blur(norm(d.min(0)), sigma1), blur(norm(d.max(0)), sigma1)
    s = ((g_min.mean() - g_min > alpha) | (g_max - g_max.mean() > alpha)).astype(np.float64)
    s = (blur(s, sigma2) > beta).astype(np.float64)
    return scipy.signal.medfilt2d(s, median_size) * organ


def test_structure_map_matches_scipy_reference():
    rng = np.random.default_rng(5)
    x = scipy.ndimage.gaussian_filter(rng.random((2, 24, 24)), (0, 1.5, 1.5)).astype(np.float32)
    organ = np.stack([_disc(24, 24, 10, 1.0), np.ones((24, 24), np.float32)])
    kwargs = dict(alpha=0.15, sigma1=0.4, sigma2=0.3, beta=0.05, median_size=5)
    s = np.asarray(structure_map(jnp.asarray(x[..., None]), jnp.asarray(organ[..., None]), **kwargs))
    for b in range(2):
        ref = _structure_map_reference(x[b], organ[b], **kwargs)
        assert 0.05 < ref.mean() < 0.6
        # Float32 vs float64 may flip a pixel sitting exactly at a threshold; allow a couple.
        assert np.sum(s[b, ..., 0] != ref) <= 2


# ------------------------------------------------------------------------------------------------
# Lesion removal, noise fusion, label fusion.


def test_remove_lesion():
    s = jnp.ones((1, 4, 4, 1))
    label = np.zeros((1, 4, 4), np.uint8)
    label[0, 1:3, 1:3] = [[1, 4], [2, 0]]
    out = np.asarray(E.remove_lesion(s, jnp.asarray(label)))[0, ..., 0]
    np.testing.assert_array_equal(out, (label[0] == 0).astype(np.float32))
    with_channel = E.remove_lesion(s, jnp.asarray(label[..., None]))
    np.testing.assert_array_equal(np.asarray(with_channel), out[None, ..., None])


def test_fuse_noise_ranges():
    rng = np.random.default_rng(0)
    s = (rng.random((2, 16, 16, 1)) > 0.7).astype(np.float32)
    organ = np.broadcast_to(_disc(16, 16, 6, value=1.0)[None, ..., None], s.shape)
    key = jax.random.key(0)
    out = np.asarray(fusion.fuse_noise(key, jnp.asarray(s), jnp.asarray(organ)))
    np.testing.assert_array_equal(out[s == 1], 1.0)
    np.testing.assert_array_equal(out[(s == 0) & (organ == 0)], 0.0)
    interior = out[(s == 0) & (organ == 1)]
    assert interior.size > 20 and interior.min() >= 0.5 and interior.max() < 0.6
    assert len(np.unique(interior)) > interior.size // 2  # independent per pixel
    np.testing.assert_array_equal(np.asarray(fusion.fuse_noise(key, jnp.asarray(s), jnp.asarray(organ))), out)
    other = np.asarray(fusion.fuse_noise(jax.random.key(1), jnp.asarray(s), jnp.asarray(organ)))
    assert not np.array_equal(other, out)


def test_fuse_label_modes():
    k = 3
    s = jnp.full((2, 4, 4, 1), 0.5)
    label = jnp.asarray(np.tile(np.array([0, 1, 2, 1], np.int32), (2, 4, 1)))
    one_hot = np.eye(k, dtype=np.float32)[np.asarray(label)]
    expect = {
        "concat_onehot": np.concatenate([np.asarray(s), one_hot], -1),
        "concat_onehot_plus_0.1": np.concatenate([np.asarray(s), one_hot + 0.1], -1),
        "concat_raw": np.concatenate([np.asarray(s), np.asarray(label)[..., None] / 2.0], -1),
        "none": np.asarray(s),
        "weighted_sum": 0.8 * np.asarray(s) + 0.2 * one_hot,
    }
    assert set(expect) == set(fusion.LABEL_FUSION_MODES)
    for mode, want in expect.items():
        got = np.asarray(fusion.fuse_label(s, label, mode=mode, num_classes=k))
        assert got.shape[-1] == fusion.fused_channels(mode, k, 1), mode
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=mode)
    np.testing.assert_allclose(
        np.asarray(fusion.fuse_label(s, label[..., None], mode="old_weighted_0.8_0.2", num_classes=k)),
        expect["weighted_sum"],
        atol=1e-6,
    )
    assert fusion.fused_channels("concat_onehot", 5, 3) == 8
    with pytest.raises(ValueError, match=r"'concat'.*concat_onehot_plus_0\.1"):
        fusion.fuse_label(s, label, mode="concat", num_classes=k)
    with pytest.raises(ValueError, match="1-channel"):
        fusion.fuse_label(jnp.ones((2, 4, 4, 2)), label, mode="weighted_sum", num_classes=k)


# ------------------------------------------------------------------------------------------------
# Label placement (§3.7).


def _placement_cases():
    organ = np.zeros((8, 8), np.float32)
    organ[2:6, 2:6] = 1
    inside, partly, outside, empty = (np.zeros((8, 8), np.int32) for _ in range(4))
    inside[3:5, 3:5] = 2
    partly[1:4, 3] = 1
    outside[0, 0] = 4
    return organ, [inside, partly, outside, empty]


def test_label_fits_rules():
    organ, labels = _placement_cases()
    organs = jnp.asarray(np.broadcast_to(organ[None, ..., None], (4, 8, 8, 1)))
    labels = jnp.asarray(np.stack(labels))
    np.testing.assert_array_equal(np.asarray(fusion.label_fits(labels, organs)), [True, False, False, True])
    np.testing.assert_array_equal(
        np.asarray(fusion.label_fits(labels, organs, rule="paper")), [True, True, False, False]
    )
    with pytest.raises(ValueError, match="paper"):
        fusion.label_fits(labels, organs, rule="loose")


class _CountingPool(list):
    draws = 0

    def __getitem__(self, i):
        self.draws += 1
        return super().__getitem__(i)


def test_sample_fitting_label():
    organ, (inside, partly, outside, _) = _placement_cases()
    pool = _CountingPool([outside, partly, inside, outside])
    label, index, fitted = fusion.sample_fitting_label(np.random.default_rng(0), pool, organ)
    assert fitted and index == 2 and np.array_equal(label, inside)
    again = fusion.sample_fitting_label(np.random.default_rng(0), pool, organ)
    assert again[1] == index  # reproducible from the Generator
    _, index, fitted = fusion.sample_fitting_label(np.random.default_rng(0), pool, organ, rule="paper")
    assert fitted and index in (1, 2)

    hopeless = _CountingPool([outside, partly])
    label, index, fitted = fusion.sample_fitting_label(
        np.random.default_rng(3), hopeless, organ, max_tries=100
    )
    assert not fitted and hopeless.draws == 100 and np.array_equal(label, hopeless[index])


# ------------------------------------------------------------------------------------------------
# The convenience entry point: jit, batch independence, parameters.


def test_extract_jit_batch_equals_single_images():
    rng = np.random.default_rng(0)
    base = _disc(20, 20, 7, value=0.6) + 0.3 * _disc(20, 20, 3, value=1.0, centre=(8, 11))
    base += 0.02 * rng.random((20, 20), dtype=np.float32)
    # Different intensity ranges and contents per image: a reduction across the batch (§11.7) would
    # change the min–max normalisation and the means, hence the maps.
    images = np.stack([base, 0.3 * base + 0.5, np.roll(base, 4, axis=1) ** 2])
    x = jnp.asarray(np.stack([images, 1.0 - images], axis=-1))  # 2 channels; channel 0 is used
    label = np.zeros((3, 20, 20), np.int32)
    label[:, 8:11, 9:12] = 1
    params = E.ExtractionParams(
        alpha=0.02, sigma1=0.4, sigma2=0.5, beta=0.05, median_s=3, gamma=0.2, expand=4, median_m=5
    )
    f = functools.partial(extract, params=params, remove_lesions=True)
    s, m = f(x, jnp.asarray(label))
    assert s.shape == m.shape == (3, 20, 20, 1)
    assert float(jnp.sum(s)) > 0 and float(jnp.sum(s * (1 - m))) == 0
    assert float(jnp.sum(s * (jnp.asarray(label)[..., None] > 0))) == 0
    for b in range(3):
        s1, m1 = f(x[b : b + 1], jnp.asarray(label[b : b + 1]))
        np.testing.assert_array_equal(np.asarray(s1), np.asarray(s[b : b + 1]))
        np.testing.assert_array_equal(np.asarray(m1), np.asarray(m[b : b + 1]))


def test_extract_channel_modes_and_working_size():
    x = np.stack([_disc(16, 16, 5, 0.9), _disc(16, 16, 3, 0.7)], axis=-1)[None]
    x = jnp.asarray(x)
    params = E.ExtractionParams(
        alpha=0.035, sigma1=0.01, sigma2=0.01, beta=0.0, median_s=3, gamma=0.3, expand=2, median_m=3
    )
    each_s, each_m = extract(x, None, dataclasses.replace(params, channel="each"), remove_lesions=False)
    assert each_s.shape == each_m.shape == (1, 16, 16, 2)
    for c in range(2):
        s, m = extract(x, None, dataclasses.replace(params, channel=c), remove_lesions=False)
        np.testing.assert_array_equal(np.asarray(each_s[..., c : c + 1]), np.asarray(s))
        np.testing.assert_array_equal(np.asarray(each_m[..., c : c + 1]), np.asarray(m))
    s, m = extract(x, None, dataclasses.replace(params, size=(24, 24)), remove_lesions=False)
    assert s.shape == m.shape == (1, 16, 16, 1) and float(jnp.sum(s)) > 0
    with pytest.raises(ValueError, match="label"):
        extract(x, None, params, remove_lesions=True)


def test_dataset_extraction_table_matches_method():
    # (size, α, σ1, σ2, β, k_s, γ, p, k_m) from METHOD §3.3.
    table = {
        "brats2015": ((184, 144), 0.035, 0.01, 0.01, 0.0, 5, 0.30, 10, 5),
        "drive_fire": ((512, 512), 0.014, 0.4, 0.3, 0.05, 5, 0.30, 10, 17),
        "chest_xray": ((1500, 1500), 0.009, 0.4, 0.5, 0.05, 3, 0.15, 2, 17),
        "lung_ct": ((512, 512), 0.0125, 0.4, 0.3, 0.05, 7, 0.48, 2, 3),
        "tianchi": ((512, 512), 0.0125, 0.4, 0.3, 0.05, 5, 0.48, 2, 3),
    }
    fields = ("size", "alpha", "sigma1", "sigma2", "beta", "median_s", "gamma", "expand", "median_m")
    for name, values in table.items():
        p = DATASET_PARAMS[name]
        assert tuple(getattr(p, f) for f in fields) == values, name
        assert p.blur_kind == "tf_replica" and p.mask_border == "authors"
    assert DATASET_PARAMS["drive_fire"].channel == "all"
    assert DATASET_PARAMS["tianchi"].channel == "each"
    assert "phantom" in DATASET_PARAMS

    cfg = tables.extraction("brats2015", alpha=0.05, size=[92, 72])
    p = E.ExtractionParams.from_config(cfg)
    assert p.alpha == 0.05 and p.size == (92, 72) and p.expand == 10
    hash(p)  # usable as a jit static argument
    with pytest.raises(ValueError, match="gaussian"):
        E.ExtractionParams.from_config(tables.extraction("brats2015", blur_kind="box"))
    with pytest.raises(ValueError, match="brats2015"):
        tables.extraction("brats2021")


def test_phantom_maps_are_sensible(phantom_data_dir):
    import data_builders

    source = data_builders.data_source("phantom/tiny", "train", data_dir=phantom_data_dir)
    examples = [source[i] for i in range(4)]
    x = jnp.asarray(np.stack([e["image"] for e in examples]))
    label = jnp.asarray(np.stack([e["label"] for e in examples]))
    s, m = extract(x, label, DATASET_PARAMS["phantom"], remove_lesions=True)
    s, m = np.asarray(s), np.asarray(m)
    h = x.shape[1]
    for b in range(4):
        assert m[b, h // 2, h // 2, 0] == 1 and m[b, 0, 0, 0] == 0  # head centre in, corner out
        assert 0.02 < s[b].mean() < 0.5 and 0.2 < m[b].mean() < 0.9
    assert np.all(s <= m)
