"""Memorisation audit: planted copies are flagged, blocked search equals brute force, report files and errors.

Every SSIM test uses the same 24×24×2 sets and tile size 4 (10 synthetic and 11 real images, so the last
tile along each axis is padded), so the tiled SSIM and cosine programs compile once for the whole file.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from synth import memorisation, memorisation_report
from synth.metrics import image

N, M, SIZE, K, BLOCK = 10, 11, 24, 2, 4
COPY_AT, COPY_OF = 4, 3  # synthetic[4] is real[3] plus a little noise.
DUP, DUP_OF = 7, 2  # real[7] is real[2] plus a little noise, for the leave-one-out check.


def _smooth_images(rng, count, size=SIZE, channels=K):
    """Independent smooth random fields in [0, 1]: unrelated images with structure at several scales."""
    noise = rng.standard_normal((count, size, size, channels))
    fields = scipy.ndimage.gaussian_filter(noise, sigma=(0, 1.5, 1.5, 0))
    low = fields.min(axis=(1, 2), keepdims=True)
    high = fields.max(axis=(1, 2), keepdims=True)
    return ((fields - low) / (high - low)).astype(np.float32)


def _near_copy(rng, picture):
    return np.clip(picture + 0.01 * rng.standard_normal(picture.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(0)
    real = _smooth_images(rng, M)
    real[DUP] = _near_copy(rng, real[DUP_OF])
    synthetic = _smooth_images(rng, N)
    synthetic[COPY_AT] = _near_copy(rng, real[COPY_OF])
    return synthetic, real


@pytest.fixture(scope="module")
def audits(sets):
    synthetic, real = sets
    return {
        metric: memorisation.audit(synthetic, real, metric=metric, block=BLOCK)
        for metric in memorisation.METRICS
    }


def _direct_similarity(metric, a, b):
    """All-pairs similarity matrix in one go, without tiles or padding."""
    if metric == "ssim":
        pairs = image.ssim(jnp.repeat(a, len(b), axis=0), jnp.tile(b, (len(a), 1, 1, 1)))
        return np.asarray(pairs, np.float64).reshape(len(a), len(b))
    fa = np.asarray(memorisation.thumbnail_features(a), np.float64)
    fb = np.asarray(memorisation.thumbnail_features(b), np.float64)
    fa /= np.linalg.norm(fa, axis=1, keepdims=True)
    fb /= np.linalg.norm(fb, axis=1, keepdims=True)
    return fa @ fb.T


@pytest.mark.parametrize("metric", memorisation.METRICS)
def test_planted_copy_is_flagged_and_unrelated_are_not(audits, metric):
    result = audits[metric]
    assert result.flagged.tolist() == [i == COPY_AT for i in range(N)]
    assert result.nearest_index[COPY_AT] == COPY_OF
    assert result.similarity[COPY_AT] > 0.95
    others = np.delete(result.similarity, COPY_AT)
    assert others.max() < result.threshold - 0.1  # A margin, so the check does not hinge on the seed.
    assert result.flagged_indices.tolist() == [COPY_AT]


@pytest.mark.parametrize("metric", memorisation.METRICS)
def test_blocked_search_equals_all_pairs(sets, audits, metric):
    synthetic, real = sets
    assert N % BLOCK and M % BLOCK  # Both axes end in a padded tile.
    direct = _direct_similarity(metric, synthetic, real)
    result = audits[metric]
    np.testing.assert_array_equal(result.nearest_index, np.argmax(direct, axis=1))
    np.testing.assert_allclose(result.similarity, np.max(direct, axis=1), atol=1e-5)

    within = _direct_similarity(metric, real, real)
    np.fill_diagonal(within, -np.inf)
    np.testing.assert_array_equal(result.reference_index, np.argmax(within, axis=1))
    np.testing.assert_allclose(result.reference_similarity, np.max(within, axis=1), atol=1e-5)


@pytest.mark.parametrize("metric", memorisation.METRICS)
def test_reference_never_matches_an_image_with_itself(audits, metric):
    result = audits[metric]
    assert np.all(result.reference_index != np.arange(M))
    # The planted duplicate pair find each other; everything else stays well below a self-match.
    assert result.reference_index[DUP] == DUP_OF and result.reference_index[DUP_OF] == DUP
    assert np.delete(result.reference_similarity, [DUP, DUP_OF]).max() < 0.9


def test_full_tiles_compile_once(sets, audits):
    synthetic, real = sets
    compiled = memorisation._tile_best._cache_size()
    # Another synthetic count and a reference run: same tile shapes, so nothing new is compiled.
    memorisation.nearest_real(synthetic[:6], real, block=BLOCK)
    memorisation.reference_nearest(real[:9], block=BLOCK)
    assert memorisation._tile_best._cache_size() == compiled


@pytest.mark.parametrize("channels", [1, 3])
def test_feature_metric_any_channel_count(channels):
    rng = np.random.default_rng(1)
    real = _smooth_images(rng, 6, size=9, channels=channels)  # Below SSIM's window: features still work.
    synthetic = _smooth_images(rng, 3, size=9, channels=channels)
    synthetic[1] = _near_copy(rng, real[5])
    result = memorisation.audit(synthetic, real, metric="feature", threshold=0.95)
    assert result.flagged.tolist() == [False, True, False]
    assert result.nearest_index[1] == 5


def test_thumbnail_features_standardise_each_channel():
    rng = np.random.default_rng(2)
    picture = _smooth_images(rng, 1)
    shifted = picture.copy()
    shifted[..., 1] = 0.5 * shifted[..., 1] + 0.2  # Brightness and contrast of one modality only.
    blank = np.zeros_like(picture)
    features = np.asarray(memorisation.thumbnail_features(np.concatenate([picture, shifted, blank])))
    assert features.shape == (3, K * memorisation.THUMBNAIL_SIZE**2)
    np.testing.assert_allclose(features[0], features[1], atol=1e-4)
    np.testing.assert_array_equal(features[2], 0.0)  # Constant channels give zeros, not NaN.


def test_write_audit_files_and_markdown(tmp_path, sets, audits):
    synthetic, real = sets
    result = audits["ssim"]
    out_dir = tmp_path / "dataset"
    markdown = memorisation_report.write_audit(
        out_dir,
        synthetic,
        real,
        result,
        num_pairs=3,
        synthetic_ids=[f"syn-{i:03d}" for i in range(N)],
        real_ids=[f"real-{i:03d}" for i in range(M)],
        modality=1,
        relative_to=tmp_path,
    )
    assert sorted(os.listdir(out_dir)) == [memorisation_report.PAIRS_FILE, memorisation_report.HISTOGRAM_FILE]
    with Image.open(out_dir / memorisation_report.PAIRS_FILE) as pairs:
        # Three rows of three tiles; 24-px images are enlarged 5× to 120 px, with 2-px gaps.
        assert pairs.size == (3 * 122 + 2, 3 * 122 + 2)
    with Image.open(out_dir / memorisation_report.HISTOGRAM_FILE) as histogram:
        assert histogram.format == "PNG"

    assert markdown.startswith("## Memorisation audit")
    assert "| flagged (similarity ≥ threshold) | 1: `syn-004` |" in markdown
    assert "| 1 | `syn-004` | `real-003` |" in markdown  # Most similar pair first.
    assert f"](dataset/{memorisation_report.PAIRS_FILE})" in markdown
    assert f"](dataset/{memorisation_report.HISTOGRAM_FILE})" in markdown
    median = np.median(result.reference_similarity)
    assert f"{median:.4f} / " in markdown


def test_write_audit_without_reference_defaults_ids(tmp_path, sets, audits):
    synthetic, real = sets
    result = audits["feature"]
    bare = memorisation.AuditResult(
        nearest_index=result.nearest_index,
        similarity=result.similarity,
        flagged=result.flagged,
        metric="feature",
        threshold=result.threshold,
    )
    markdown = memorisation_report.write_audit(tmp_path, synthetic, real, bare, num_pairs=50)
    assert "1: `4`" in markdown
    assert "not computed" in markdown
    assert f"]({memorisation_report.PAIRS_FILE})" in markdown
    assert markdown.count("\n| ") == 9 + 2 + N  # Summary rows, pair-table header and one row per sample.


def test_bad_inputs_say_what_is_wrong(sets, audits):
    synthetic, real = sets
    with pytest.raises(ValueError, match=r"synthetic must be images of shape \(count, H, W, K\).*rank 3"):
        memorisation.nearest_real(synthetic[..., 0], real)
    with pytest.raises(ValueError, match=r"real must be .*rank 5"):
        memorisation.audit(synthetic, real[None])
    with pytest.raises(ValueError, match=r"differ in size: H×W 24×24 vs 24×20"):
        memorisation.nearest_real(synthetic, real[:, :, :20])
    with pytest.raises(ValueError, match=r"differ in channels .*K 2 vs 1"):
        memorisation.audit(synthetic, real[..., :1], metric="feature")
    with pytest.raises(ValueError, match="synthetic is empty"):
        memorisation.nearest_real(synthetic[:0], real)
    with pytest.raises(ValueError, match="Unknown metric 'lpips'"):
        memorisation.nearest_real(synthetic, real, metric="lpips")
    with pytest.raises(ValueError, match=r"at least 11×11 px.*got H×W 8×8.*metric='feature'"):
        memorisation.nearest_real(synthetic[:, :8, :8], real[:, :8, :8])
    with pytest.raises(ValueError, match="at least 2 real images"):
        memorisation.reference_nearest(real[:1])
    with pytest.raises(ValueError, match="block must be ≥ 1"):
        memorisation.nearest_real(synthetic, real, block=0)
    with pytest.raises(ValueError, match=r"\(B, D\) features"):
        memorisation.nearest_real(synthetic, real, metric="feature", feature_fn=lambda x: x)
    with pytest.raises(ValueError, match="covers 10 synthetic samples but synthetic has 9"):
        memorisation_report.write_audit("unused", synthetic[:9], real, audits["ssim"])
    with pytest.raises(ValueError, match="modality 2 is out of range for K = 2"):
        memorisation_report.write_audit("unused", synthetic, real, audits["ssim"], modality=2)
    with pytest.raises(ValueError, match="synthetic_ids has 3 entries for 10 images"):
        memorisation_report.write_audit(
            "unused", synthetic, real, audits["ssim"], synthetic_ids=["a", "b", "c"]
        )


def test_tiled_ssim_equals_image_ssim_on_non_square_images():
    # Rectangular images catch a row/column mix-up of the banded filter that square ones would hide.
    rng = np.random.default_rng(3)
    a, b = _smooth_images(rng, 2, size=17)[:, :13], _smooth_images(rng, 3, size=17)[:, :13]
    want = image.ssim(jnp.repeat(a, 3, axis=0), jnp.tile(b, (2, 1, 1, 1))).reshape(2, 3)
    np.testing.assert_allclose(memorisation._ssim_pairs(jnp.asarray(a), jnp.asarray(b)), want, atol=1e-5)
