"""Stage C's filters and stage D's mixes and statistics, on inputs made to test them (no training).

The whole pipeline, the notebooks and the synthetic dataset read back elsewhere are in
tests/test_pipeline.py (`make test-slow`).
"""

import numpy as np
import pytest

from synth import mixes, structure_filter
from synth.stages import dataset, verify


def test_stage_d_reports_mean_and_std_over_seeds():
    base = dict(real=1.0, syn=0.5, aug=0.0, mode="M", examples=30, steps=10)
    rows = [dict(base, mix="a", seed=s, dice=d) for s, d in ((0, 0.6), (1, 0.7), (2, 0.8))]
    rows.append(dict(base, mix="b", seed=0, dice=0.5))
    table = verify.aggregate(rows, (("dice", "Dice"),))
    assert [(r["mix"], r["seeds"]) for r in table] == [("a", 3), ("b", 1)]
    assert table[0]["dice"] == pytest.approx(0.7) and table[0]["dice_std"] == pytest.approx(
        np.std([0.6, 0.7, 0.8])
    )
    assert table[1]["dice_std"] == 0.0


def test_real_subsets_are_drawn_by_subject_and_augment_only_themselves():
    subjects = np.repeat(np.arange(10), 5)  # 10 patients of 5 slices.
    for seed in range(3):
        parts = mixes.mix_parts(mixes.parse_mix("real=0.2 aug=1"), 50, 0, seed, subjects)
        real = parts["real"][parts["real"][:, 0] == mixes.REAL, 1]
        aug = parts["real"][parts["real"][:, 0] == mixes.AUGMENTED, 1]
        assert len(real) == 10 and len(set(real)) == 10 and len(aug) == 50
        assert len(np.unique(subjects[real])) == 2  # Two whole patients, not slices of all ten.
        assert set(aug) <= set(real)  # Augmented copies of the mix's real subset only.
    with pytest.raises(ValueError, match="aug= makes augmented copies"):
        mixes.mix_parts(mixes.parse_mix("syn=1 aug=1"), 50, 50, 0)
    source = [{"subject_id": f"s{i // 2}"} for i in range(6)] + [{}]
    groups = mixes.subjects_of(source).tolist()
    assert groups[0:6:2] == groups[1:6:2] and len(set(groups)) == 4  # Pairs share; no id: its own.


def test_mixes_parse_split_and_fail_clearly():
    mix = mixes.parse_mix("real=0.8 syn=2 aug=0.2 mode=S")
    assert (mix.real, mix.syn, mix.aug, mix.mode, mix.name) == (0.8, 2.0, 0.2, "S", "real80_syn200_aug20_S")
    parts = mixes.mix_parts(mix, num_real=10, num_synthetic=20, seed=0)
    assert len(parts["real"]) == 8 + 2 and len(parts["synthetic"]) == 20
    assert (parts["real"][:8, 0] == mixes.REAL).all() and (parts["real"][8:, 0] == mixes.AUGMENTED).all()
    # S: the synthetic part first, the steps split by the parts' sizes (20 : 10 of 30 steps).
    assert [(p, end) for p, end, _ in mixes.phases(mix, parts, 30)] == [("synthetic", 20), ("real", 30)]
    with pytest.raises(ValueError, match="needs 20 synthetic samples.*has 5"):
        mixes.mix_parts(mix, num_real=10, num_synthetic=5, seed=0)
    for bad, message in (
        ("real=1 sny=1", "'sny=1' is not one of"),
        ("real=2", "real at most 1"),
        ("real=1 mode=X", "mode must be one of"),
        ("real=0", "no training data"),
        ("real=abc", "is not a number"),
    ):
        with pytest.raises(ValueError, match=message):
            mixes.parse_mix(bad)


# --------------------------------------------------------------------------------------------------
# The filters, each on inputs it must reject (no trained networks needed).


class _FixedGenerator:
    """Stands in for `generate.Generator`: fixed structures, blank images, given lesion Dice."""

    def __init__(self, maps, masks, dice):
        self.maps, self.masks, self.dice = maps, masks, dice

    def sample_structures(self, key, n):
        params = structure_filter.FilterParams(min_j_s=0.55, mae=0.05, max_count=1)
        scores = np.zeros(n)  # D_s never vouches: only the contour test can accept.
        accepted = structure_filter.passes_filter_batch(self.maps, self.masks, d_scores=scores, params=params)
        return dict(maps=self.maps, masks=self.masks, accepted=accepted, scores=scores, draws=np.ones(n))

    def synthesize(self, maps, masks, labels, key):
        return np.zeros(maps.shape + (4,), np.float32)

    def lesion_dice(self, images, labels, *, kind):
        return self.dice


def _ring(size=32, radius=11, gap_degrees=0):
    """A circular contour map (torn open by `gap_degrees`) and its organ mask, a little wider."""
    import cv2

    contour = np.zeros((size, size), np.uint8)
    cv2.ellipse(
        contour, (size // 2, size // 2), (radius, radius), 0, gap_degrees / 2, 360 - gap_degrees / 2, 1, 1
    )
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, (size // 2, size // 2), radius + 2, 1, -1)
    return contour, mask


def test_each_filter_rejects_what_it_should(tiny_config):
    closed, mask = _ring()
    opened, _ = _ring(gap_degrees=90)
    maps = np.stack([closed, opened, closed, closed])
    masks = np.stack([mask] * 4)
    inside = np.zeros((32, 32), np.uint8)
    inside[14:18, 14:18] = 4
    outside = np.zeros((32, 32), np.uint8)
    outside[0:3, 0:3] = 2
    config = tiny_config
    config.dataset.batch_size, config.dataset.label_tries = 4, 1
    config.dataset.structure_filter = True  # runlocal turns it off: untrained maps never pass.
    config.dataset.dice.threshold = 0.8
    fake = _FixedGenerator(maps, masks, dice=np.array([0.9, 0.9, 0.9, 0.1], np.float32))
    # Reasons: -1 accepted, 0 structure, 1 placement, 2 Dice; a pool of one label decides every draw.
    for index in range(3):  # Several batches: the random draws differ, the verdicts must not.
        batch = dataset.generate_batch(fake, np.stack([inside]), index, config)
        assert batch["reason"].tolist() == [-1, 0, -1, 2]  # The open contour; the low Dice.
        batch = dataset.generate_batch(fake, np.stack([outside]), index, config)
        assert batch["reason"].tolist() == [1, 0, 1, 1]  # The structure filter is checked first.
    config.dataset.structure_filter = False
    batch = dataset.generate_batch(fake, np.stack([inside]), 0, config)
    assert batch["reason"].tolist() == [-1, -1, -1, 2]
