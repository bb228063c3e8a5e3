"""Tests of synth/label_pool.py: label-safe augmentation, the pool, the placement check, user labels."""

import os

import cv2
import ml_collections
import numpy as np
import pytest
import SimpleITK as sitk

from synth import fusion, label_files, label_pool
from synth.label_pool import AugmentParams

NAMES = ("background", "necrosis", "oedema", "non_enhancing", "enhancing")
IDENTITY = AugmentParams(max_rotation=0, max_shift=0, scale=(1, 1), flip=False)


def _lesion(h=20, w=16, top=6, left=3):
    """A non-square label map with a three-class lesion away from the border, off the vertical midline."""
    label = np.zeros((h, w), np.uint8)
    label[top : top + 7, left : left + 6] = 2
    label[top + 1 : top + 5, left + 1 : left + 5] = 1
    label[top + 2 : top + 4, left + 2 : left + 4] = 4
    return label


# --------------------------------------------------------------------------------------------------
# AugmentParams.


def test_params_from_config_and_validation():
    config = ml_collections.ConfigDict({"max_rotation": 30, "scale": [0.8, 1.25], "flip": False})
    params = AugmentParams.from_config(config)
    assert params == AugmentParams(max_rotation=30, scale=(0.8, 1.25), flip=False)
    assert params.scale == (0.8, 1.25) and hash(params)  # lists become a hashable tuple
    assert AugmentParams.from_config({}) == AugmentParams()
    with pytest.raises(ValueError, match="'rotation'.*Valid keys: max_rotation"):
        AugmentParams.from_config({"rotation": 10})
    with pytest.raises(ValueError, match="scale"):
        AugmentParams(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="max_tries"):
        AugmentParams(max_tries=0)


# --------------------------------------------------------------------------------------------------
# augment_label.


def test_augment_keeps_values_and_classes():
    label = _lesion()
    rng = np.random.default_rng(0)
    for _ in range(50):
        out = label_pool.augment_label(label, rng)
        assert out.shape == label.shape and out.dtype == label.dtype
        # Nearest resampling: every value is one of the input's, and this central lesion (far
        # from the border at ±15°, ±10 %, 0.9–1.1) keeps all its classes.
        assert set(np.unique(out)) == {0, 1, 2, 4}


def test_augment_other_integer_dtypes_and_bad_input():
    label = _lesion().astype(np.int64) * 100  # values above 255 take the 16-bit path
    out = label_pool.augment_label(label, np.random.default_rng(3))
    assert out.dtype == np.int64 and set(np.unique(out)) <= {0, 100, 200, 400}
    with pytest.raises(ValueError, match="integer"):
        label_pool.augment_label(label.astype(np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        label_pool.augment_label(label[None], np.random.default_rng(0))


def test_augment_is_deterministic_and_varies():
    label = _lesion()
    a = [label_pool.augment_label(label, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    rng = np.random.default_rng(7)
    outs = [label_pool.augment_label(label, rng) for _ in range(10)]
    assert sum(not np.array_equal(o, label) for o in outs) >= 9
    assert len({o.tobytes() for o in outs}) >= 9


def test_each_transform_changes_the_map():
    label = _lesion()
    assert not np.array_equal(label, label[:, ::-1])
    rng = np.random.default_rng(1)

    def changed(**kw):
        params = AugmentParams(**{**dict(max_rotation=0, max_shift=0, scale=(1, 1), flip=False), **kw})
        return [not np.array_equal(label_pool.augment_label(label, rng, params), label) for _ in range(20)]

    assert not any(changed())  # the identity is exact
    assert sum(changed(max_rotation=30)) >= 15
    assert sum(changed(max_shift=0.2)) >= 15
    assert sum(changed(scale=(0.6, 0.8))) == 20
    # A flip is exactly np.fliplr (pixel centres mirror onto pixel centres), about half the time.
    params = AugmentParams(max_rotation=0, max_shift=0, scale=(1, 1), flip=True)
    flips = []
    for _ in range(200):
        out = label_pool.augment_label(label, rng, params)
        flipped = np.array_equal(out, label[:, ::-1])
        assert flipped or np.array_equal(out, label)
        flips.append(flipped)
    assert 70 < sum(flips) < 130


def test_non_square_map_is_not_transposed():
    # METHOD §2.2: the authors' PIL calls swap width and height on non-square slices.
    label = _lesion(h=20, w=12, top=2, left=1)
    shift = AugmentParams(max_rotation=0, max_shift=0.1, scale=(1, 1), flip=False)
    out = label_pool.augment_label(label, np.random.default_rng(0), shift)
    assert out.shape == (20, 12)
    # A pure translation: the lesion's bounding box keeps its (height, width) = (7, 6).
    rows, cols = np.nonzero(out)
    assert (np.ptp(rows) + 1, np.ptp(cols) + 1) == (7, 6)


# --------------------------------------------------------------------------------------------------
# make_pool.


def test_pool_shape_determinism_and_sources():
    empty = np.zeros((20, 16), np.uint8)
    a, b = _lesion(), _lesion(top=3, left=2)
    pool = label_pool.make_pool([empty, a, empty, b], 40, seed=0)
    assert pool.shape == (40, 20, 16) and pool.dtype == np.uint8
    assert pool.reshape(40, -1).any(axis=1).all()  # empty sources were dropped
    np.testing.assert_array_equal(pool, label_pool.make_pool(np.stack([empty, a, empty, b]), 40, seed=0))
    assert not np.array_equal(pool, label_pool.make_pool([a, b], 40, seed=1))
    # With the identity transform, entries are exactly the two sources, both drawn.
    same = label_pool.make_pool([a, empty, b], 30, seed=0, params=IDENTITY)
    kinds = {0 if np.array_equal(p, a) else 1 if np.array_equal(p, b) else -1 for p in same}
    assert kinds == {0, 1}
    assert label_pool.make_pool([a], 0, seed=0).shape == (0, 20, 16)


def test_pool_of_class_maps_keeps_the_class_balance():
    """X-ray class maps: all-0 is the class "normal" and stays in the pool at its share (kept empty)."""
    sources = np.concatenate([np.full((n, 8, 8), c, np.uint8) for c, n in ((0, 50), (1, 30), (2, 20))])
    pool = label_pool.make_pool(sources, 4000, seed=0, params=IDENTITY, keep_empty=True)
    shares = np.bincount(pool[:, 0, 0], minlength=3) / len(pool)
    np.testing.assert_allclose(shares, [0.5, 0.3, 0.2], atol=0.03)
    assert (pool == pool[:, :1, :1]).all()  # Still constant maps.
    # Without keep_empty every entry has a lesion: every synthetic X-ray would be pneumonia.
    assert label_pool.make_pool(sources, 100, seed=0, params=IDENTITY)[:, 0, 0].min() == 1


def test_pool_without_lesions_raises():
    with pytest.raises(ValueError, match="None of the 3 source labels"):
        label_pool.make_pool(np.zeros((3, 8, 8), np.uint8), 5, seed=0)


def test_pool_redraws_when_the_lesion_leaves(monkeypatch):
    corner = np.zeros((16, 16), np.uint8)
    corner[:2, :2] = 3  # a lesion in the corner: large shifts often push it out
    params = AugmentParams(max_rotation=0, max_shift=0.5, scale=(1, 1), flip=True, max_tries=50)
    calls = []
    augment = label_pool.augment_label

    def counting(label, rng, p):
        out = augment(label, rng, p)
        calls.append(out.any())
        return out

    monkeypatch.setattr(label_pool, "augment_label", counting)
    pool = label_pool.make_pool([corner], 20, seed=0, params=params)
    assert len(calls) > 20 and not all(calls)  # some draws lost the lesion and were redrawn
    assert pool.reshape(20, -1).any(axis=1).all()
    assert sum(calls) == 20  # exactly one kept draw per entry


def test_pool_falls_back_to_the_source():
    corner = np.zeros((16, 16), np.uint8)
    corner[:2, :2] = 1
    # Scale 0.01 about the centre maps every output pixel onto the (empty) middle of the source,
    # so every transform loses the lesion: after max_tries the entry is the source itself.
    params = AugmentParams(max_rotation=0, max_shift=0, scale=(0.01, 0.01), flip=False, max_tries=3)
    pool = label_pool.make_pool([corner], 4, seed=0, params=params)
    np.testing.assert_array_equal(pool, np.broadcast_to(corner, pool.shape))


# --------------------------------------------------------------------------------------------------
# fits and check_user_placement.


def _labels_and_organs():
    rng = np.random.default_rng(0)
    organs = np.zeros((6, 16, 16, 1), np.float32)
    organs[:, 3:13, 3:13] = 1.0
    labels = np.zeros((6, 16, 16), np.uint8)
    labels[0, 5:8, 5:8] = 1  # inside
    labels[1, 1:5, 5:8] = 2  # partly outside
    labels[2, 0:2, 0:2] = 4  # wholly outside
    # labels[3] empty: fits under "code", not under "paper"
    labels[4] = rng.integers(0, 5, (16, 16)) * (rng.random((16, 16)) < 0.05)
    labels[5, 10:14, 10:14] = 1
    organs[5] = 1.0  # whole image is organ
    return labels, organs


@pytest.mark.parametrize("rule", ["code", "paper"])
def test_fits_matches_extraction(rule):
    labels, organs = _labels_and_organs()
    ours = label_pool.fits(labels, organs, rule=rule)
    theirs = np.asarray(fusion.label_fits(labels, organs, rule=rule))
    np.testing.assert_array_equal(ours, theirs)
    assert ours.shape == (6,) and ours.dtype == bool
    expected = (
        [True, False, False, True, False, True] if rule == "code" else [True, True, False, False, True, True]
    )
    np.testing.assert_array_equal(ours, expected)
    # (N, H, W, 1) labels and one shared (H, W) organ give the same.
    shared = label_pool.fits(labels[:5, ..., None], organs[0, ..., 0], rule=rule)
    np.testing.assert_array_equal(shared, ours[:5])
    np.testing.assert_array_equal(label_pool.fits(labels.astype(np.float32), organs, rule=rule), ours)


def test_fits_rejects_bad_arguments():
    labels, organs = _labels_and_organs()
    with pytest.raises(ValueError, match="Unknown label-fit rule 'strict'"):
        label_pool.fits(labels, organs, rule="strict")
    with pytest.raises(ValueError, match="do not match"):
        label_pool.fits(labels, organs[:2])


def test_check_user_placement_warns_per_misplaced_label():
    labels, organs = _labels_and_organs()
    names = [f"lesion{i}.png" for i in range(6)]
    with pytest.warns(label_pool.PlacementWarning) as record:
        ok = label_pool.check_user_placement(labels, names, organs)
    np.testing.assert_array_equal(ok, label_pool.fits(labels, organs))
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    assert "'lesion1.png'" in messages[0] and "6 of its 12 lesion pixels fall outside" in messages[0]
    assert "'lesion2.png'" in messages[1] and "4 of its 4" in messages[1]
    assert "'lesion4.png'" in messages[2]
    with pytest.warns(label_pool.PlacementWarning) as record:
        label_pool.check_user_placement(labels, names, organs, rule="paper")
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "'lesion2.png'" in messages[0] and "all 4 of its lesion pixels fall outside" in messages[0]
    assert "'lesion3.png'" in messages[1] and "no lesion pixels" in messages[1]
    with pytest.raises(ValueError, match="2 names for 6 labels"):
        label_pool.check_user_placement(labels, names[:2], organs)


# --------------------------------------------------------------------------------------------------
# load_user_labels.


def _write_sitk(path, array, size3d=False):
    image = sitk.GetImageFromArray(array[None] if size3d else array)
    sitk.WriteImage(image, os.fspath(path))


def test_load_folder_of_png_nifti_and_mha(tmp_path):
    a, b, c = _lesion(), _lesion(top=2), _lesion(left=1)
    cv2.imwrite(str(tmp_path / "a.png"), a)
    cv2.imwrite(str(tmp_path / "b_rgb.png"), np.repeat(b[..., None], 3, axis=-1))  # grey stored as RGB
    _write_sitk(tmp_path / "c.nii.gz", c.astype(np.int16), size3d=True)  # 3D with one slice
    _write_sitk(tmp_path / "d.mha", a.astype(np.uint8))
    (tmp_path / "notes.txt").write_text("not a label")
    (tmp_path / "._a.png").write_bytes(b"macOS resource fork")
    (tmp_path / "sub.png").mkdir()  # a folder, even with a label-like name, is not a label file
    labels, names = label_files.load_user_labels(tmp_path, image_hw=(20, 16), num_classes=5)
    assert names == ["a.png", "b_rgb.png", "c.nii.gz", "d.mha"]
    assert labels.dtype == np.uint8 and labels.shape == (4, 20, 16)
    for got, want in zip(labels, [a, b, c, a]):
        np.testing.assert_array_equal(got, want)
    one, one_name = label_files.load_user_labels(tmp_path / "c.nii.gz", image_hw=(20, 16), num_classes=5)
    assert one_name == ["c.nii.gz"]
    np.testing.assert_array_equal(one[0], c)


def test_load_arrays():
    a, b = _lesion(), _lesion(top=1)
    labels, names = label_files.load_user_labels(np.stack([a, b]), image_hw=(20, 16), num_classes=5)
    assert names == ["array[0]", "array[1]"] and labels.shape == (2, 20, 16)
    labels, names = label_files.load_user_labels(a.astype(np.float32), image_hw=(20, 16), num_classes=5)
    assert names == ["array"] and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels[0], a)
    labels, names = label_files.load_user_labels([a, b.astype(np.int32)], image_hw=(20, 16), num_classes=5)
    assert names == ["array[0]", "array[1]"]


def test_load_errors_name_the_file(tmp_path):
    hw = (20, 16)

    def load(source, **kw):
        return label_files.load_user_labels(source, image_hw=hw, num_classes=5, **kw)

    with pytest.raises(FileNotFoundError, match="missing.png"):
        load(tmp_path / "missing.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"No label files in folder .*empty.*\.png, \.nii, \.nii\.gz, \.mha"):
        load(empty)

    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="corrupt.png.*cannot be read"):
        load(tmp_path / "corrupt.png")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="corrupt.nii.gz.*cannot be read with SimpleITK"):
        load(tmp_path / "corrupt.nii.gz")

    colour = np.zeros((20, 16, 3), np.uint8)
    colour[..., 2] = 255
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    with pytest.raises(ValueError, match="colour.png.*colour PNG"):
        load(tmp_path / "colour.png")

    _write_sitk(tmp_path / "volume.mha", np.zeros((3, 20, 16), np.uint8))
    with pytest.raises(ValueError, match="volume.mha.*2D label maps are expected"):
        load(tmp_path / "volume.mha")

    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((10, 12), np.uint8))
    with pytest.raises(
        ValueError, match=r"small.png: has shape \(10, 12\); the trained model works at \(20, 16\)"
    ):
        load(tmp_path / "small.png")

    half = np.full((20, 16), 0.5, np.float32)
    _write_sitk(tmp_path / "float.nii.gz", half)
    with pytest.raises(ValueError, match="float.nii.gz.*non-integer values"):
        load(tmp_path / "float.nii.gz")

    big = _lesion()
    big[0, 0], big[0, 1] = 7, 9
    cv2.imwrite(str(tmp_path / "big.png"), big)
    with pytest.raises(ValueError, match=r"big.png: has label values 7, 9 outside 0..4; valid values: 0, 1"):
        load(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"big.png.*0 \(background\), 1 \(necrosis\).*4 \(enhancing\)"):
        load(tmp_path / "big.png", label_names=NAMES)
    with pytest.raises(ValueError, match=r"array\[1\]: has shape \(20, 15\)"):
        load([big, big[:, :15]])

    # A folder with several bad files: one error, a line for each.
    folder = tmp_path / "mixed"
    folder.mkdir()
    cv2.imwrite(str(folder / "good.png"), _lesion())
    cv2.imwrite(str(folder / "small.png"), np.zeros((10, 12), np.uint8))
    cv2.imwrite(str(folder / "big.png"), big)
    with pytest.raises(ValueError, match=r"2 of 3 label maps cannot be used") as info:
        load(folder)
    assert "big.png" in str(info.value) and "small.png" in str(info.value)


def test_augmented_image_and_label_stay_registered():
    label = np.zeros((24, 20), np.uint8)
    label[6:14, 5:12] = 2
    label[9:12, 7:10] = 4
    image = np.stack([label.astype(np.float32), 2.0 * label.astype(np.float32)], axis=-1)
    params = label_pool.AugmentParams(max_rotation=30.0, max_shift=0.2, scale=(0.8, 1.2))
    for seed in range(5):
        out_image, out_label = label_pool.augment_image_and_label(
            image, label, np.random.default_rng(seed), params
        )
        assert out_image.shape == image.shape and out_label.dtype == label.dtype
        assert set(np.unique(out_label)) <= {0, 2, 4}
        # Linear resampling blurs edges only: away from them the image is the label, in both channels.
        agree = np.round(out_image[..., 0]) == out_label
        assert agree.mean() > 0.9, agree.mean()
        np.testing.assert_allclose(out_image[..., 1], 2.0 * out_image[..., 0], atol=1e-5)
