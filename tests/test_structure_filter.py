"""Tests for the host-side §5.4 structure-map filter (synth/structure_filter.py)."""

import cv2
import numpy as np
import pytest

from synth import structure_filter as F


def _ring(size=64, radius=24, thickness=1, gap_degrees=0):
    """A circle outline (1 = edge), optionally with an open gap on its right side."""
    img = np.zeros((size, size), np.uint8)
    centre = (size // 2, size // 2)
    cv2.ellipse(img, centre, (radius, radius), 0, gap_degrees / 2, 360 - gap_degrees / 2, 1, thickness)
    return img.astype(np.float32)


def _filled_disc(size=64, radius=26):
    """The organ mask of `_ring`, a little wider than the outline, as extraction masks are.

    The outline lies inside the mask, and the filter's 3×3 blur widens the filled contour by a pixel.
    """
    img = np.zeros((size, size), np.uint8)
    cv2.circle(img, (size // 2, size // 2), radius, 1, -1)
    return img.astype(np.float32)


def _clean_map():
    s = _ring()
    s[24:40, 32] = 1  # interior structure (a fissure) must not matter
    return s


def test_contour_fill_is_organ_convention():
    fill = F.contour_fill(_clean_map())
    assert fill.dtype == np.float32 and fill.shape == (64, 64)
    assert fill[32, 32] == 1 and fill[0, 0] == 0
    # Filled ring ≈ the mask it lies in.
    assert F.contour_mask_mae(_clean_map(), _filled_disc()) < 0.05


def test_filter_accepts_clean_and_rejects_degenerate():
    mask = _filled_disc()
    assert F.passes_filter(_clean_map(), mask)
    assert F.passes_filter(_clean_map()[..., None], mask[..., None])  # (H, W, 1) inputs
    open_ring = _ring(gap_degrees=90)  # outline torn open, e.g. by lesion removal
    assert F.contour_mask_mae(open_ring, mask) > 0.2
    assert not F.passes_filter(open_ring, mask)
    assert not F.passes_filter(np.zeros((64, 64), np.float32), mask)  # empty map
    assert not F.passes_filter(_clean_map(), np.zeros((64, 64), np.float32))  # mask disagrees
    # The discriminator shortcut accepts regardless of the contour.
    assert F.passes_filter(open_ring, mask, d_score=0.55)
    assert not F.passes_filter(open_ring, mask, d_score=0.54)
    assert F.passes_filter(open_ring, mask, params=F.FilterParams(mae=1.0))
    with pytest.raises(ValueError, match="shape"):
        F.contour_mask_mae(_clean_map(), mask[:32])


def test_batched_filter_and_defaults():
    assert F.FilterParams() == F.FilterParams(min_j_s=0.55, mae=0.05, max_count=50, blur_size=3)
    maps = np.stack([_clean_map(), _ring(gap_degrees=90), _ring(gap_degrees=90)])[..., None]
    masks = np.stack([_filled_disc()] * 3)[..., None]
    np.testing.assert_array_equal(F.passes_filter_batch(maps, masks), [True, False, False])
    np.testing.assert_array_equal(
        F.passes_filter_batch(maps, masks, d_scores=np.array([0.0, 0.9, 0.1])), [True, True, False]
    )


def test_sample_until_pass():
    mask = _filled_disc()
    bad = _ring(gap_degrees=90)
    draws = iter([(bad, mask, 0.2), (bad, mask, 0.4), (_clean_map(), mask, 0.1), (bad, mask, 0.9)])
    s, m, passed, count = F.sample_until_pass(lambda: next(draws))
    assert passed and count == 3 and np.array_equal(s, _clean_map())

    scores = iter([0.1, 0.5, 0.3, 0.2])
    marked = []

    def draw():
        j = next(scores)
        marked.append(j)
        return bad * j, mask, j  # the map carries its score, to identify the returned draw

    s, _, passed, count = F.sample_until_pass(draw, params=F.FilterParams(max_count=4))
    assert not passed and count == 4 and len(marked) == 4
    np.testing.assert_array_equal(s, bad * 0.5)  # the best-scoring draw


def test_sample_filtered_redraws_rejected_slots_and_ranks_without_a_discriminator():
    closed, organ = _clean_map(), _filled_disc()
    wrong = np.zeros_like(organ)  # A mask the map's contour does not fill.
    calls = []

    def draw(attempt):
        calls.append(attempt)
        # Slot 0 passes at once; slot 1 only on the third draw; slot 2 never (its masks get closer).
        masks = [organ, organ if attempt == 2 else wrong, np.roll(organ, 6, axis=0) * (attempt > 0)]
        return np.stack([closed] * 3), np.stack(masks), None

    out = F.sample_filtered(draw, 3, params=F.FilterParams(max_count=4))
    assert calls == [0, 1, 2, 3]
    assert out["accepted"].tolist() == [True, True, False]
    assert out["draws"].tolist() == [1, 3, 4]
    np.testing.assert_array_equal(out["masks"][1], organ)
    # Without D_s the score is minus the contour-fill MAE; a slot that never passes keeps its best draw.
    assert out["scores"][0] == pytest.approx(-F.contour_mask_mae(closed, organ))
    assert out["scores"][2] == pytest.approx(-F.contour_mask_mae(closed, np.roll(organ, 6, axis=0)))
    # With D_s's scores a high score accepts at once (the paper's shortcut).
    out = F.sample_filtered(
        lambda a: (np.stack([closed]), np.stack([wrong]), np.array([0.9])), 1, params=F.FilterParams()
    )
    assert out["accepted"].tolist() == [True] and out["draws"].tolist() == [1]
