"""Tests of the 3D medical builders `brats2015` and `tianchi_lung_ct` on their dummy data, and of `medical`.

Expected values are recomputed here from the dummy files (read with SimpleITK) and from the dummy
generators' own tables, not from the builders' code paths.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import pathlib
import re
import shutil

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow_datasets as tfds

import data_builders
from data_builders import medical, schema
from data_builders.brats2015 import brats2015_dataset_builder as brats
from data_builders.tianchi_lung_ct import tianchi_lung_ct_dataset_builder as tianchi

BRATS_DUMMY = pathlib.Path(brats.__file__).parent / "dummy_data"
TIANCHI_DUMMY = pathlib.Path(tianchi.__file__).parent / "dummy_data"
# A crop that fits the 8 x 12 x 10 dummy volumes, at its own size (no resizing).
BRATS_SMALL = dict(
    slice_start=2,
    slice_stop=6,
    row_start=2,
    row_stop=11,
    col_start=1,
    col_stop=7,
    image_height=9,
    image_width=6,
)
# The same crop resized to twice the height and 4/3 of the width.
BRATS_RESIZED = dict(BRATS_SMALL, image_height=18, image_width=8)
LABELLED_SPLITS = ("train", "validation", "test")


def _load_generator(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"dummy_{path.parent.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TIANCHI_FIXTURE = _load_generator(TIANCHI_DUMMY / "make_dummy_data.py")


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def _read_all(name: str, data_dir: str, **overrides) -> dict[str, list[dict]]:
    builder = data_builders.build(name, data_dir=data_dir, manual_dir=_dummy_for(name), **overrides)
    return {split: list(builder.as_data_source(split)) for split in builder.info.splits}


def _dummy_for(name: str) -> pathlib.Path:
    return BRATS_DUMMY if name.startswith("brats2015") else TIANCHI_DUMMY


def _metadata(name: str, data_dir: str, **overrides) -> dict:
    """The built dataset's metadata as read back from its folder (built first if no test has yet)."""
    path = data_builders.build(name, data_dir=data_dir, manual_dir=_dummy_for(name), **overrides).data_path
    return dict(tfds.builder_from_directory(str(path)).info.metadata)


def _brats_series(subject_id: str) -> dict[str, sitk.Image]:
    """The dummy images of a subject by token, found here independently of the builder."""
    group, _, patient = subject_id.partition("_brats")
    folders = list(BRATS_DUMMY.glob(f"*/{group}/brats{patient}"))
    assert len(folders) == 1, subject_id
    images = {}
    for path in folders[0].glob("*/*.mha"):
        token = path.parent.name.split(".")[-2]
        images[token] = sitk.ReadImage(str(path))
    return images


# --- medical.py ------------------------------------------------------------------------------------


def test_world_to_index_matches_simpleitk():
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    image = sitk.Image(7, 5, 3, sitk.sitkInt16)
    image.SetSpacing((0.7, 1.3, 2.5))
    image.SetOrigin((-10.0, 4.0, 30.0))
    image.SetDirection(tuple(rotation.reshape(9)))
    volume = medical.Volume(
        array=sitk.GetArrayFromImage(image),
        spacing=np.array(image.GetSpacing()),
        origin=np.array(image.GetOrigin()),
        direction=rotation,
        path=pathlib.Path("memory"),
    )
    points = rng.normal(scale=20, size=(6, 3))
    expected = [image.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points]
    np.testing.assert_allclose(medical.world_to_index(points, volume), expected, atol=1e-9)
    # Geometry round trip: resampled_geometry's origin is the world position of the shifted index.
    offset = (1.5, 2.0, 0.25)
    spacing, origin = medical.resampled_geometry(volume, offset, (2.0, 0.5, 1.0))
    np.testing.assert_allclose(origin, image.TransformContinuousIndexToPhysicalPoint(offset), atol=1e-9)
    np.testing.assert_allclose(spacing, [1.4, 0.65, 2.5])
    # A world box seen by an axis-swapping direction: its x extent becomes the index y extent.
    swapped = medical.Volume(
        volume.array, np.ones(3), np.zeros(3), np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]), volume.path
    )
    np.testing.assert_allclose(medical.world_extent_to_index([4.0, 2.0, 3.0], swapped), [2.0, 4.0, 3.0])


def test_resize_yx_conventions():
    labels = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    up = medical.resize_yx(labels, 4, 6, "nearest", axes=(1, 2))
    assert up.dtype == np.uint8
    np.testing.assert_array_equal(up[0], np.repeat(np.repeat(labels[0], 2, axis=0), 2, axis=1))
    ramp = np.arange(4, dtype=np.float32)[None, :]
    np.testing.assert_allclose(
        medical.resize_yx(ramp, 1, 8, "linear")[0], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3]
    )
    with pytest.raises(ValueError, match="cubic"):
        medical.resize_yx(ramp, 1, 8, "cubic")


def test_minmax_scale_matches_the_plain_float32_formula():
    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.int16, np.int32, np.float32, np.float64):
        array = (rng.normal(0, 1, (7, 5, 3)) * (1000 if dtype != np.uint8 else 40) + 100).astype(dtype)
        for low, high in ((float(array.min()), float(array.max())), (float(array.min()) + 0.3, 17.1)):
            expected = (array.astype(np.float32) - np.float32(low)) * np.float32(1.0 / (high - low))
            got = medical.minmax_scale(array, low, high)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got.view(np.uint32), np.clip(expected, 0, 1).view(np.uint32))
    np.testing.assert_array_equal(medical.minmax_scale(np.ones((2, 2), np.int16), 1, 1), np.zeros((2, 2)))


def _check_encodings(builder: tfds.core.DatasetBuilder, image_encoding: str = "bytes") -> None:
    """Image arrays (float32, int16) as raw bytes, uint8 maps as zlib (`schema` encodings)."""
    checked = 0
    for key, feature in builder.info.features.items():
        if not isinstance(feature, tfds.features.Tensor) or len(feature.shape) < 2:
            continue
        encoding = feature.to_json_content().encoding
        if key == "image":
            assert encoding == image_encoding, (builder.name, key, encoding)
            checked += 1
        elif feature.np_dtype == np.uint8:
            assert encoding == "zlib", (builder.name, key, encoding)
    assert checked == 1


@pytest.mark.parametrize(
    "name", ["brats2015/slices", "brats2015/volumes", "tianchi_lung_ct/slices", "tianchi_lung_ct/volumes"]
)
def test_images_are_stored_as_raw_bytes_from_version_1_1_0(name, tmp_path):
    builder = data_builders.get_builder(name, data_dir=tmp_path)
    assert str(builder.version) == "1.1.0" and set(builder.RELEASE_NOTES) == {"1.0.0", "1.1.0"}
    _check_encodings(builder)
    assert schema.IMAGE_ENCODING == tfds.features.Encoding.BYTES
    phantom = data_builders.get_builder("phantom/tiny", data_dir=tmp_path)
    assert str(phantom.version) == "1.1.0"
    _check_encodings(phantom)


def test_split_subjects_is_seeded_disjoint_and_order_free():
    subjects = [f"s{i:03d}" for i in range(274)]
    splits = medical.split_subjects(subjects, validation_fraction=0.1, test_fraction=0.1, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 220, "validation": 27, "test": 27}
    assert sorted(sum(splits.values(), [])) == subjects
    shuffled = list(np.random.default_rng(1).permutation(subjects))
    assert medical.split_subjects(shuffled, validation_fraction=0.1, test_fraction=0.1, seed=0) == splits
    other = medical.split_subjects(subjects, validation_fraction=0.1, test_fraction=0.1, seed=1)
    assert other["test"] != splits["test"]
    tiny = medical.split_subjects(["a", "b", "c"], validation_fraction=0.1, test_fraction=0.1, seed=0)
    assert sorted(len(v) for v in tiny.values()) == [1, 1, 1]
    assert "validation" not in medical.split_subjects(
        subjects, validation_fraction=0, test_fraction=0.1, seed=0
    )
    with pytest.raises(ValueError, match="no subject is left"):
        medical.split_subjects(["a", "b"], validation_fraction=0.4, test_fraction=0.4, seed=0)


def test_read_volume_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.mha"):
        medical.read_volume(tmp_path / "nothing.mha")
    garbage = tmp_path / "garbage.mha"
    garbage.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="garbage.mha"):
        medical.read_volume(garbage)
    image = sitk.GetImageFromArray(np.full((2, 3, 4), np.nan, np.float32))
    sitk.WriteImage(image, str(tmp_path / "nan.mha"))
    with pytest.raises(ValueError, match=r"nan.mha holds 24 NaN"):
        medical.read_volume(tmp_path / "nan.mha")


# --- brats2015 -------------------------------------------------------------------------------------


def test_series_token_is_a_whole_part_not_a_prefix():
    assert brats.series_token("VSD.Brain.XX.O.MR_T1.54513") == "MR_T1"
    assert brats.series_token("VSD.Brain.XX.O.MR_T1c.54514") == "MR_T1c"
    assert brats.series_token("VSD.Brain.XX.O.MR_Flair.54512") == "MR_Flair"
    assert brats.series_token("VSD.Brain_3more.XX.O.OT.54517") == "OT"
    assert brats.series_token("VSD.Brain.XX.O.MR_T1cx.54514") is None
    assert tuple(brats.MODALITY_TOKENS) == schema.BRATS_MODALITIES


@pytest.fixture(scope="module")
def brats_slices(data_dir) -> dict[str, list[dict]]:
    return _read_all("brats2015/slices", data_dir, **BRATS_SMALL)


def test_brats_slices_features_and_modality_order(brats_slices):
    for split, examples in brats_slices.items():
        for ex in examples:
            assert set(ex) == {
                "image",
                "label",
                "id",
                "subject_id",
                "slice_index",
                "spacing",
                "origin",
                "direction",
            }
            assert ex["image"].shape == (9, 6, 4) and ex["image"].dtype == np.float32
            assert ex["label"].shape == (9, 6) and ex["label"].dtype == np.uint8
            subject, k = ex["subject_id"].decode(), ex["slice_index"]
            assert ex["id"].decode() == f"{subject}/slice{k:03d}" and 2 <= k < 6
            images = _brats_series(subject)
            for channel, modality in enumerate(schema.BRATS_MODALITIES):
                raw = sitk.GetArrayFromImage(images[brats.MODALITY_TOKENS[modality]]).astype(np.float32)
                expected = (raw[k, 2:11, 1:7] - raw.min()) / (raw.max() - raw.min())
                np.testing.assert_allclose(ex["image"][..., channel], expected, atol=1e-6, err_msg=modality)
            if split == brats.UNLABELLED_SPLIT:
                assert not ex["label"].any()
            else:
                np.testing.assert_array_equal(ex["label"], sitk.GetArrayFromImage(images["OT"])[k, 2:11, 1:7])
            # The dummy patterns tell the modalities apart without the files: T1 ramps up along
            # columns only, T2 along rows only, T1c falls along columns (the MR_T1 / MR_T1c trap).
            t1, t2, t1c = (ex["image"][..., schema.BRATS_MODALITIES.index(m)] for m in ("t1", "t2", "t1c"))
            assert (np.diff(t1, axis=1) > 0).all() and (np.diff(t1, axis=0) == 0).all()
            assert (np.diff(t2, axis=0) > 0).all() and (np.diff(t2, axis=1) == 0).all()
            assert (np.diff(t1c, axis=1) < 0).all()
    labels = np.concatenate([ex["label"].ravel() for s in LABELLED_SPLITS for ex in brats_slices[s]])
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}


def test_brats_stores_the_generated_float32_bit_for_bit(brats_slices):
    config = dataclasses.replace(brats.Builder.BUILDER_CONFIGS[0], name="check", **BRATS_SMALL)
    stored = {ex["id"].decode(): ex for examples in brats_slices.values() for ex in examples}
    training = BRATS_DUMMY / brats.TRAINING_DIR
    patients = brats._patients(training, labelled=True)
    generated = {key: ex for p in patients for key, ex in brats._subject_examples(p, config)}
    assert generated and set(generated) <= set(stored)
    for key, ex in generated.items():
        assert ex["image"].dtype == np.float32
        np.testing.assert_array_equal(stored[key]["image"].view(np.uint32), ex["image"].view(np.uint32))
        np.testing.assert_array_equal(stored[key]["label"], ex["label"])


def test_brats_geometry_is_that_of_each_slice(brats_slices, data_dir):
    resized = _read_all("brats2015/slices", data_dir, **BRATS_RESIZED)
    for examples, (rows, cols) in ((brats_slices, (9, 6)), (resized, (18, 8))):
        scale_y, scale_x = 9 / rows, 6 / cols
        for ex in sum(examples.values(), []):
            assert ex["image"].shape == (rows, cols, 4) and set(np.unique(ex["label"])) <= set(range(5))
            t1 = _brats_series(ex["subject_id"].decode())["MR_T1"]
            first_pixel = (1 + scale_x / 2 - 0.5, 2 + scale_y / 2 - 0.5, ex["slice_index"])
            np.testing.assert_allclose(
                ex["origin"], t1.TransformContinuousIndexToPhysicalPoint(first_pixel), atol=1e-5
            )
            spacing = np.array(t1.GetSpacing()) * [scale_x, scale_y, 1]
            np.testing.assert_allclose(ex["spacing"], spacing, rtol=1e-6)
            np.testing.assert_allclose(ex["direction"], t1.GetDirection(), atol=1e-7)
    rotated = [ex for ex in brats_slices["validation"] + brats_slices["train"] if b"pat153" in ex["id"]]
    assert rotated and rotated[0]["direction"][1] == -1.0  # The rotated dummy patient was checked.


def test_brats_split_is_by_subject_recorded_and_deterministic(brats_slices, data_dir, tmp_path):
    subjects = {s: {ex["subject_id"].decode() for ex in examples} for s, examples in brats_slices.items()}
    assert set(subjects) == {*LABELLED_SPLITS, brats.UNLABELLED_SPLIT}
    assert all(subjects.values())
    everything = sum(map(list, subjects.values()), [])
    assert len(everything) == len(set(everything)) == 5
    assert subjects[brats.UNLABELLED_SPLIT] == {"HGG_LGG_brats_2013_pat0103_1"}
    for examples in brats_slices.values():
        assert len(examples) == 4 * len({ex["subject_id"] for ex in examples})
    metadata = _metadata("brats2015/slices", data_dir, **BRATS_SMALL)
    assert {s: set(v) for s, v in metadata["subjects"].items()} == subjects
    assert metadata["split_seed"] == 0 and metadata["unlabelled_splits"] == [brats.UNLABELLED_SPLIT]
    assert metadata["modalities"] == list(schema.BRATS_MODALITIES)
    assert metadata["groups"]["LGG_brats_2013_pat0002_1"] == "LGG"
    assert metadata["source_series"]["HGG_brats_tcia_pat153_0109"]["t1c"].endswith("MR_T1c.60100.mha")
    # A rebuild elsewhere gives the same split and the same examples in the same order.
    again = _read_all("brats2015/slices", str(tmp_path), **BRATS_SMALL)
    for split, examples in brats_slices.items():
        assert [ex["id"] for ex in again[split]] == [ex["id"] for ex in examples]
        for a, b in zip(again[split], examples):
            np.testing.assert_array_equal(a["image"], b["image"])


def test_brats_volumes(data_dir):
    volumes = _read_all("brats2015/volumes", data_dir)
    assert sum(len(v) for v in volumes.values()) == 5
    for split, examples in volumes.items():
        for ex in examples:
            assert ex["image"].shape == (8, 12, 10, 4) and ex["image"].dtype == np.float32
            assert ex["label"].shape == (8, 12, 10) and ex["label"].dtype == np.uint8
            assert ex["id"] == ex["subject_id"]
            images = _brats_series(ex["subject_id"].decode())
            flair = sitk.GetArrayFromImage(images["MR_Flair"]).astype(np.float32)
            expected = (flair - flair.min()) / (flair.max() - flair.min())
            np.testing.assert_allclose(ex["image"][..., 3], expected, atol=1e-6)
            np.testing.assert_allclose(ex["image"].min(axis=(0, 1, 2)), 0.0)
            np.testing.assert_allclose(ex["image"].max(axis=(0, 1, 2)), 1.0)
            if split != brats.UNLABELLED_SPLIT:
                np.testing.assert_array_equal(ex["label"], sitk.GetArrayFromImage(images["OT"]))
            np.testing.assert_allclose(ex["origin"], images["MR_T1"].GetOrigin(), atol=1e-6)
            np.testing.assert_allclose(ex["spacing"], images["MR_T1"].GetSpacing(), atol=1e-6)


def _copy(source: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / "manual"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.py"))
    return target


def _failing_build(
    name: str, data_dir: pathlib.Path, manual_dir: pathlib.Path, error, match: str, **overrides
):
    with pytest.raises(error, match=match):
        data_builders.build(name, data_dir=data_dir, manual_dir=manual_dir, **overrides)
    # Nothing that counts as built is left behind.
    assert not data_builders.is_built(name, data_dir=data_dir, **overrides)


def test_brats_manual_dir_errors(tmp_path):
    missing = tmp_path / "not_there"
    _failing_build(
        "brats2015/slices", tmp_path / "d", missing, FileNotFoundError, re.escape(str(missing)), **BRATS_SMALL
    )
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "something").mkdir(parents=True)
    _failing_build(
        "brats2015",
        tmp_path / "d",
        elsewhere,
        FileNotFoundError,
        f"no BRATS2015_Training.*{re.escape(str(elsewhere))}",
    )
    # The authors' default crop does not fit the 8-slice dummy volumes: the error says what to change.
    _failing_build("brats2015", tmp_path / "d", BRATS_DUMMY, ValueError, "slice_start/slice_stop 50:105")


def test_brats_missing_modality_is_not_filled_by_its_prefix(tmp_path):
    manual = _copy(BRATS_DUMMY, tmp_path)
    patient = manual / "BRATS2015_Training" / "LGG" / "brats_2013_pat0002_1"
    shutil.rmtree(next(patient.glob("*.MR_T1c.*")))  # MR_T1 is still there and must not stand in.
    _failing_build(
        "brats2015/volumes",
        tmp_path / "d",
        manual,
        ValueError,
        f"{re.escape(str(patient))} has no series for MR_T1c",
    )


def test_brats_bad_files_are_named(tmp_path):
    manual = _copy(BRATS_DUMMY, tmp_path)
    flair = next(manual.glob("BRATS2015_Training/HGG/brats_2013_pat0001_1/*/*MR_Flair*.mha"))
    data = flair.read_bytes()
    flair.write_bytes(data[: len(data) // 2])
    _failing_build(
        "brats2015/volumes",
        tmp_path / "d",
        manual,
        ValueError,
        f"Cannot read image file {re.escape(str(flair))}",
    )
    flair.write_bytes(data)
    label = next(manual.glob("BRATS2015_Training/LGG/*/*/*.OT.*.mha"))
    image = sitk.ReadImage(str(label))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = 7
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    sitk.WriteImage(bad, str(label))
    _failing_build(
        "brats2015/volumes",
        tmp_path / "d",
        manual,
        ValueError,
        rf"{re.escape(str(label))} holds values \[7\]",
    )
    sitk.WriteImage(sitk.GetImageFromArray(array[:, :-1]), str(label))
    _failing_build("brats2015/volumes", tmp_path / "d", manual, ValueError, "has shape \\(8, 11, 10\\)")


# --- tianchi_lung_ct -------------------------------------------------------------------------------


def _expected_boxes(classes) -> dict[str, list[tuple[list[float], int]]]:
    """3D edge boxes (z, y, x) of the dummy lesions of `classes`, by series, from the generator's table."""
    boxes: dict[str, list[tuple[list[float], int]]] = {}
    for uid, centre, size, label in TIANCHI_FIXTURE.LESIONS:
        if label in classes:
            lo = [c - s // 2 for c, s in zip(centre, size)][::-1]
            hi = [c + s // 2 + 1 for c, s in zip(centre, size)][::-1]
            boxes.setdefault(uid, []).append((lo + hi, label))
    return boxes


def _raw_series(uid: str) -> sitk.Image:
    return sitk.ReadImage(str(next(TIANCHI_DUMMY.rglob(f"{uid}.mhd"))))


def _check_tianchi_slices(splits: dict[str, list[dict]], classes, hu_of_classes) -> None:
    expected = _expected_boxes(classes)
    centre_slices = {
        (uid, centre[2]) for uid, centre, _, label in TIANCHI_FIXTURE.LESIONS if label in classes
    }
    seen = set()
    for examples in splits.values():
        for ex in examples:
            uid, k = ex["subject_id"].decode(), ex["slice_index"]
            seen.add((uid, k))
            assert ex["id"].decode() == f"{uid}/slice{k:04d}"
            assert ex["image"].shape == (16, 12, 3) and ex["image"].dtype == np.float32
            assert ex["label"].shape == (16, 12) and ex["label"].dtype == np.uint8
            crossing = [(b, lab) for b, lab in expected[uid] if b[0] <= k < b[3]]
            order = np.lexsort(ex["boxes"].T[::-1])
            want = sorted(([b[1], b[2], b[4], b[5]], lab) for b, lab in crossing)
            np.testing.assert_allclose(ex["boxes"][order], [w for w, _ in want], atol=1e-4)
            assert ex["box_labels"][order].tolist() == [lab for _, lab in want]
            raw_image = _raw_series(uid)
            raw = sitk.GetArrayFromImage(raw_image)
            # The filled-box image is exactly the dummy's lesion voxels of the kept classes on slice k.
            np.testing.assert_array_equal(ex["label"], np.isin(raw[k], hu_of_classes).astype(np.uint8))
            window = np.clip((raw.astype(np.float32) + 1200) / 1800, 0, 1)
            for channel, neighbour in enumerate((k - 1, k, k + 1)):
                np.testing.assert_allclose(
                    ex["image"][..., channel], window[np.clip(neighbour, 0, 9)], atol=1e-6
                )
            np.testing.assert_allclose(
                ex["origin"], raw_image.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-4
            )
            np.testing.assert_allclose(ex["spacing"], raw_image.GetSpacing(), atol=1e-6)
    assert seen == centre_slices


def test_tianchi_slices_boxes_and_label_image(data_dir):
    splits = _read_all("tianchi_lung_ct/slices", data_dir)
    _check_tianchi_slices(splits, {1}, [TIANCHI_FIXTURE.LESION_HU[1]])
    # The edge slice 0 repeats itself as its missing neighbour.
    first = [ex for examples in splits.values() for ex in examples if ex["slice_index"] == 0]
    assert first and np.array_equal(first[0]["image"][..., 0], first[0]["image"][..., 1])
    # Series split, deterministic and recorded; the unannotated test-set series is left out.
    subjects = {s: {ex["subject_id"].decode() for ex in v} for s, v in splits.items()}
    assert sorted(sum(map(list, subjects.values()), [])) == sorted(TIANCHI_FIXTURE.SERIES)
    metadata = _metadata("tianchi_lung_ct/slices", data_dir)
    assert {s: set(v) for s, v in metadata["subjects"].items()} == subjects
    assert metadata["classes"] == [1] and metadata["split_seed"] == 0


def test_tianchi_class_filtering(data_dir):
    every = (1, 5, 31, 32)
    splits = _read_all("tianchi_lung_ct/slices", data_dir, classes="1,5,31,32")
    _check_tianchi_slices(splits, set(every), [TIANCHI_FIXTURE.LESION_HU[c] for c in every])
    labels = np.concatenate([ex["box_labels"] for v in splits.values() for ex in v])
    assert set(labels.tolist()) == set(every)
    only = _read_all("tianchi_lung_ct/slices", data_dir, classes="31")
    examples = sum(only.values(), [])
    assert [(ex["id"], ex["box_labels"].tolist()) for ex in examples] == [(b"641414/slice0002", [31])]
    # Splits without a kept lesion are left out, but no series changes split with the classes.
    assert _metadata("tianchi_lung_ct/slices", data_dir, classes="31")["subjects"] == {"train": ["641414"]}
    assert "641414" in _metadata("tianchi_lung_ct/slices", data_dir)["subjects"]["train"]
    with pytest.raises(ValueError, match="Bad classes"):
        data_builders.get_builder("tianchi_lung_ct", data_dir=data_dir, classes="1,2")


def test_tianchi_every_box_slice(data_dir):
    splits = _read_all("tianchi_lung_ct/slices", data_dir, all_box_slices=True)
    slices = sorted((ex["subject_id"].decode(), ex["slice_index"]) for v in splits.values() for ex in v)
    # The 3-voxel-deep nodule of 641414 (z 6..8) gives three examples; the other nodules one each.
    assert slices == sorted(
        [("641414", 6), ("641414", 7), ("641414", 8), ("650031", 5), ("663157", 0), ("688588", 4)]
    )


def test_tianchi_slices_resized_to_image_size(data_dir):
    native = {ex["id"]: ex for v in _read_all("tianchi_lung_ct/slices", data_dir).values() for ex in v}
    resized = _read_all("tianchi_lung_ct/slices", data_dir, image_size=32)
    examples = {ex["id"]: ex for v in resized.values() for ex in v}
    assert examples.keys() == native.keys()
    builder = data_builders.get_builder("tianchi_lung_ct/slices", data_dir=data_dir, image_size=32)
    assert builder.info.features["image"].shape == (32, 32, 3)
    assert _metadata("tianchi_lung_ct/slices", data_dir, image_size=32)["generation"]["image_size"] == 32
    scale = np.array([32 / 16, 32 / 12, 32 / 16, 32 / 12])
    for key, ex in examples.items():
        before = native[key]
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.float32
        assert 0 <= ex["image"].min() and ex["image"].max() <= 1
        assert ex["label"].shape == (32, 32) and ex["label"].dtype == np.uint8
        assert len(ex["boxes"]) == len(before["boxes"]) > 0
        np.testing.assert_allclose(ex["boxes"], before["boxes"] * scale, rtol=1e-6)
        assert ex["box_labels"].tolist() == before["box_labels"].tolist()
        # `label` is the scaled boxes filled: 1 exactly on pixels whose centre lies in a box.
        centres_y, centres_x = np.mgrid[:32, :32] + 0.5
        filled = np.zeros((32, 32), bool)
        for y0, x0, y1, x1 in ex["boxes"]:
            filled |= (y0 <= centres_y) & (centres_y <= y1) & (x0 <= centres_x) & (centres_x <= x1)
        np.testing.assert_array_equal(ex["label"], filled.astype(np.uint8))
        # The HU slices resized with OpenCV's area interpolation, then windowed.
        raw_image = _raw_series(ex["subject_id"].decode())
        raw = sitk.GetArrayFromImage(raw_image).astype(np.float32)
        k = ex["slice_index"]
        for channel, neighbour in enumerate((k - 1, k, k + 1)):
            hu = cv2.resize(raw[np.clip(neighbour, 0, 9)], (32, 32), interpolation=cv2.INTER_AREA)
            np.testing.assert_allclose(
                ex["image"][..., channel], np.clip((hu + 1200) / 1800, 0, 1), atol=1e-6
            )
        # The resized pixel grid: pixel n's centre is the source continuous index (n + 1/2) s - 1/2.
        np.testing.assert_allclose(
            ex["spacing"], np.array(raw_image.GetSpacing()) * [12 / 32, 16 / 32, 1], rtol=1e-6
        )
        corner = raw_image.TransformContinuousIndexToPhysicalPoint(
            (12 / 64 - 0.5, 16 / 64 - 0.5, float(ex["slice_index"]))
        )
        np.testing.assert_allclose(ex["origin"], corner, atol=1e-4)
    with pytest.raises(ValueError, match="image_size"):
        data_builders.get_builder("tianchi_lung_ct/volumes", data_dir=data_dir, image_size=32)
    for bad in (4, -1, True):
        with pytest.raises(ValueError, match="image_size must be 0"):
            data_builders.get_builder("tianchi_lung_ct/slices", data_dir=data_dir, image_size=bad)


def test_tianchi_volumes_and_geometry_round_trip(data_dir):
    splits = _read_all("tianchi_lung_ct/volumes", data_dir)
    expected = _expected_boxes({1, 5, 31, 32})
    with (next(TIANCHI_DUMMY.rglob("*.csv"))).open() as f:
        rows = list(csv.DictReader(f))
    for ex in sum(splits.values(), []):
        uid = ex["subject_id"].decode()
        raw_image = _raw_series(uid)
        assert ex["image"].dtype == np.int16
        np.testing.assert_array_equal(ex["image"], sitk.GetArrayFromImage(raw_image))
        order = np.lexsort(ex["boxes"].T[::-1])
        want = sorted(expected[uid])
        np.testing.assert_allclose(ex["boxes"][order], [b for b, _ in want], atol=1e-4)
        assert ex["box_labels"][order].tolist() == [lab for _, lab in want]
        # Round trip: box centres (edge units, z, y, x) back to world mm give the CSV's centres.
        centres = (ex["boxes"][:, :3] + ex["boxes"][:, 3:]) / 2 - 0.5
        world = [
            raw_image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, c[::-1]))) for c in centres
        ]
        np.testing.assert_allclose(world, ex["box_centres_mm"], atol=1e-3)
        annotated = sorted(
            tuple(float(r[c]) for c in ("coordX", "coordY", "coordZ")) for r in rows if r["seriesuid"] == uid
        )
        np.testing.assert_allclose(sorted(map(tuple, ex["box_centres_mm"].tolist())), annotated, atol=1e-3)
        np.testing.assert_allclose(ex["origin"], raw_image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(ex["direction"], np.eye(3).ravel())


def test_tianchi_errors_name_the_file(tmp_path):
    manual = _copy(TIANCHI_DUMMY, tmp_path)
    name = "tianchi_lung_ct/volumes"
    _failing_build(
        name, tmp_path / "d", tmp_path / "absent", FileNotFoundError, re.escape(str(tmp_path / "absent"))
    )
    annotation = next(manual.rglob("*.csv"))
    text = annotation.read_text()
    lines = text.splitlines()
    annotation.write_text("\n".join([lines[0], lines[1].rsplit(",", 1)[0] + ",2", *lines[2:]]) + "\n")
    _failing_build(
        name, tmp_path / "d", manual, ValueError, f"{re.escape(str(annotation))}, row 2: label 2 is not one"
    )
    # A centre far outside its series (a geometry error) names the row and the series file.
    annotation.write_text(
        "\n".join([lines[0], lines[1].replace(lines[1].split(",")[3], "900.0"), *lines[2:]])
    )
    _failing_build(
        name,
        tmp_path / "d",
        manual,
        ValueError,
        f"{re.escape(str(annotation))}, row 2: lesion centre .* outside",
    )
    annotation.write_text(text)
    raw = next(manual.rglob("688588.raw"))
    data = raw.read_bytes()
    raw.write_bytes(data[:100])
    _failing_build(
        name,
        tmp_path / "d",
        manual,
        ValueError,
        f"Cannot read image file {re.escape(str(raw.with_suffix('.mhd')))}",
    )
    raw.unlink()
    _failing_build(
        name, tmp_path / "d", manual, FileNotFoundError, f"names the data file {re.escape(str(raw))}"
    )
    annotation.unlink()
    _failing_build(
        name, tmp_path / "d", manual, FileNotFoundError, "expected exactly one chestCT_round1_annotation"
    )
