"""Tests of the phantom dataset: the numpy generator and the built `phantom/tiny` dataset."""

from __future__ import annotations

import dataclasses
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import ndimage

import data_builders
from data_builders import schema
from data_builders.phantom import anatomy
from data_builders.phantom import phantom_dataset_builder as pdb

TINY = pdb.Builder.builder_configs["tiny"]
SHIFTS = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tfds"))
    data_builders.build("phantom/tiny", data_dir=path)
    return path


@pytest.fixture(scope="module")
def splits(data_dir) -> dict[str, list[dict]]:
    return {
        split: list(data_builders.data_source("phantom/tiny", split, data_dir=data_dir))
        for split in pdb.SPLITS
    }


# --- The numpy generator ----------------------------------------------------------------------


def test_make_subject_shapes_and_ranges():
    subject = anatomy.make_subject(seed=3, image_size=16, num_slices=3)
    assert subject["image"].shape == (3, 16, 16, 4) and subject["image"].dtype == np.float32
    assert subject["label"].shape == (3, 16, 16) and subject["label"].dtype == np.uint8
    assert subject["image"].min() >= 0.0 and subject["image"].max() <= 1.0
    # Min-max scaling is per subject and modality: each modality spans [0, 1] over the volume.
    np.testing.assert_allclose(subject["image"].min(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(subject["image"].max(axis=(0, 1, 2)), 1.0, atol=1e-6)
    assert set(np.unique(subject["label"])) <= {0, 1, 2, 3, 4}
    assert subject["spacing"].shape == subject["origin"].shape == (3,)
    np.testing.assert_array_equal(subject["direction"], np.eye(3).reshape(9))


def test_make_subject_is_deterministic_and_seeds_differ():
    a, b = anatomy.make_subject(5, 32, 2), anatomy.make_subject(5, 32, 2)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    c = anatomy.make_subject(6, 32, 2)
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["tissue"], c["tissue"])


def test_tumour_only_in_grey_or_white_matter():
    seen_tumour = False
    for seed in range(8):
        subject = anatomy.make_subject(seed, 48, 4, has_tumour=True)
        tumour = subject["label"] > 0
        seen_tumour |= tumour.any()
        tissue = subject["tissue"][tumour]
        assert np.isin(tissue, [anatomy.GREY_MATTER, anatomy.WHITE_MATTER]).all(), seed
    assert seen_tumour


def test_tumour_free_subjects_exist_and_can_be_forced():
    free = [s for s in range(40) if not anatomy.make_subject(s, 8, 1)["has_tumour"]]
    assert 2 <= len(free) <= 16  # About 20% of 40.
    assert not anatomy.make_subject(0, 16, 2, has_tumour=False)["label"].any()


def test_anatomy_changes_smoothly_with_slice_index():
    tissue = anatomy.make_subject(2, 64, 12)["tissue"]
    agreement = [(tissue[0] == tissue[k]).mean() for k in range(12)]
    neighbours = [(tissue[k] == tissue[k + 1]).mean() for k in range(11)]
    assert min(neighbours) > 0.8
    assert agreement[-1] < min(neighbours)  # Far slices differ more than neighbours.


def test_contrast_follows_the_tissue_table():
    subject = anatomy.make_subject(1, 64, 6, has_tumour=False)
    image, tissue = subject["image"], subject["tissue"]

    def mean(modality: str, tissue_class: int) -> float:
        return float(image[..., anatomy.MODALITIES.index(modality)][tissue == tissue_class].mean())

    csf, gm, wm, fat = anatomy.CSF, anatomy.GREY_MATTER, anatomy.WHITE_MATTER, anatomy.FAT
    assert mean("t1", csf) < mean("t1", gm) < mean("t1", wm) < mean("t1", fat)
    assert mean("t2", csf) > mean("t2", gm) > mean("t2", wm)
    assert mean("flair", csf) < mean("flair", wm)
    subject = anatomy.make_subject(4, 64, 6, has_tumour=True)
    image, label = subject["image"], subject["label"]
    t1c = image[..., anatomy.MODALITIES.index("t1c")]
    flair = image[..., anatomy.MODALITIES.index("flair")]
    brain = np.isin(subject["tissue"], [gm, wm]) & (label == 0)
    assert t1c[label == anatomy.ENHANCING].mean() > t1c[brain].mean()
    assert flair[label == anatomy.OEDEMA].mean() > flair[brain].mean()


# --- The built dataset ------------------------------------------------------------------------


def test_features_shapes_and_dtypes(splits):
    size = TINY.image_size
    for examples in splits.values():
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
            assert ex["image"].shape == (size, size, 4) and ex["image"].dtype == np.float32
            assert ex["label"].shape == (size, size) and ex["label"].dtype == np.uint8
            assert isinstance(ex["id"], bytes) and isinstance(ex["subject_id"], bytes)
            assert isinstance(ex["slice_index"], int)
            for key, shape in (("spacing", (3,)), ("origin", (3,)), ("direction", (9,))):
                assert ex[key].shape == shape and ex[key].dtype == np.float32
            assert 0.0 <= ex["image"].min() and ex["image"].max() <= 1.0
            assert set(np.unique(ex["label"])) <= {0, 1, 2, 3, 4}
            np.testing.assert_allclose(ex["spacing"][:2], 240.0 / size)


def test_every_tumour_class_appears_in_train(splits):
    labels = np.stack([ex["label"] for ex in splits["train"]])
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
    assert (labels.reshape(len(labels), -1).max(axis=1) == 0).any()  # Some slices are tumour-free.


def test_split_sizes_keys_and_disjoint_subjects(splits, data_dir):
    subjects = {}
    for split, examples in splits.items():
        assert len(examples) == TINY.num_examples(split)
        ids = sorted(ex["id"].decode() for ex in examples)
        expected = sorted(
            f"{split}_subj{i:04d}/slice{k:03d}"
            for i in range(TINY.num_subjects(split))
            for k in range(TINY.slices_per_subject)
        )
        assert ids == expected
        for ex in examples:
            subject, slice_part = ex["id"].decode().split("/")
            assert ex["subject_id"].decode() == subject
            assert slice_part == f"slice{ex['slice_index']:03d}"
        subjects[split] = {ex["subject_id"].decode() for ex in examples}
    assert not subjects["train"] & subjects["validation"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["validation"] & subjects["test"]
    # The seeds, which define the subjects, are disjoint too, and recorded in the metadata.
    metadata = tfds.builder_from_directory(
        str(data_builders.get_builder("phantom/tiny", data_dir=data_dir).data_path)
    ).info.metadata
    seeds = {split: set(metadata["subject_seeds"][split]) for split in pdb.SPLITS}
    assert sum(map(len, seeds.values())) == len(set().union(*seeds.values()))
    assert {s: set(v) for s, v in metadata["subjects"].items()} == subjects


def test_metadata_round_trips_through_the_directory(data_dir):
    path = data_builders.get_builder("phantom/tiny", data_dir=data_dir).data_path
    info = tfds.builder_from_directory(str(path)).info
    assert info.metadata["modalities"] == list(schema.BRATS_MODALITIES)
    assert info.metadata["label_names"] == list(schema.BRATS_LABEL_NAMES)
    assert info.metadata["seed"] == TINY.seed
    assert info.file_format.value == "array_record"


def test_builders_leave_no_temporary_folders(tmp_path, monkeypatch):
    """TFDS's info for an unprepared data_dir made a /tmp folder per builder and kept it (base.py)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for config in ("tiny", "demo"):
        builder = data_builders.get_builder(f"phantom/{config}", data_dir=str(tmp_path / "empty"))
        assert builder.info.description and builder.info.metadata["seed"] == builder.builder_config.seed
    assert not list(scratch.iterdir())


def test_geometry_is_consistent_within_a_subject(splits):
    by_subject: dict[bytes, list[dict]] = {}
    for ex in splits["train"]:
        by_subject.setdefault(ex["subject_id"], []).append(ex)
    for examples in by_subject.values():
        examples.sort(key=lambda ex: ex["slice_index"])
        origins = np.stack([ex["origin"] for ex in examples])
        np.testing.assert_allclose(np.diff(origins[:, 2]), examples[0]["spacing"][2], rtol=1e-5)
        np.testing.assert_allclose(origins[:, :2], np.broadcast_to(origins[:1, :2], (len(origins), 2)))


def _sobel_magnitude(images: np.ndarray) -> np.ndarray:
    return np.hypot(ndimage.sobel(images, axis=-1), ndimage.sobel(images, axis=-2))


def _best_shift(reference: np.ndarray, moving: np.ndarray) -> tuple[int, int]:
    """Find the (dy, dx) roll of `moving` whose edge map best matches `reference`'s (N, H, W)."""
    ref = _sobel_magnitude(reference)[:, 3:-3, 3:-3]
    ref = ref - ref.mean()
    scores = {}
    for shift in SHIFTS:
        mov = np.roll(_sobel_magnitude(moving), shift, axis=(1, 2))[:, 3:-3, 3:-3]
        mov = mov - mov.mean()
        scores[shift] = (ref * mov).sum() / np.sqrt((ref * ref).sum() * (mov * mov).sum())
    return max(scores, key=scores.get)


def test_modalities_are_registered(splits):
    images = np.stack([ex["image"] for ex in splits["train"]])
    for m in range(1, 4):
        assert _best_shift(images[..., 0], images[..., m]) == (0, 0), schema.BRATS_MODALITIES[m]
    # The check itself catches a modality moved by two pixels.
    moved = np.roll(images[..., 2], (2, -2), axis=(1, 2))
    assert _best_shift(images[..., 0], moved) == (-2, 2)


def _correlation_ratio(image: np.ndarray, label: np.ndarray) -> float:
    """Share of the image's variance, around the tumour, that the label classes explain (eta^2)."""
    around = ndimage.binary_dilation(label > 0, structure=np.ones((1, 3, 3)), iterations=3)
    x, c = image[around], label[around]
    between = sum(((x[c == k].mean() - x.mean()) ** 2) * (c == k).sum() for k in np.unique(c))
    return between / ((x - x.mean()) ** 2).sum()


def test_label_is_registered_with_every_modality(splits):
    images = np.stack([ex["image"] for ex in splits["train"]])
    labels = np.stack([ex["label"] for ex in splits["train"]])
    for m, name in enumerate(schema.BRATS_MODALITIES):
        scores = {
            shift: _correlation_ratio(images[..., m], np.roll(labels, shift, axis=(1, 2))) for shift in SHIFTS
        }
        assert max(scores, key=scores.get) == (0, 0), name


def test_build_is_deterministic_and_seed_dependent(splits, tmp_path):
    again = {
        ex["id"]: ex for ex in data_builders.build("phantom/tiny", data_dir=tmp_path).as_data_source("train")
    }
    for ex in splits["train"]:
        np.testing.assert_array_equal(ex["image"], again[ex["id"]]["image"])
        np.testing.assert_array_equal(ex["label"], again[ex["id"]]["label"])
    other = data_builders.build("phantom/tiny", data_dir=tmp_path, seed=1)
    assert other.builder_config.name == "tiny_seed1"
    other_train = {ex["id"]: ex for ex in other.as_data_source("train")}
    assert set(other_train) == set(again)
    assert all(not np.array_equal(other_train[k]["image"], again[k]["image"]) for k in again)


def test_custom_config_instance(tmp_path):
    config = dataclasses.replace(
        TINY, name="custom", image_size=24, slices_per_subject=2, num_train_subjects=2
    )
    builder = pdb.Builder(config=config, data_dir=str(tmp_path))
    builder.download_and_prepare()
    assert builder.data_path.name == "1.1.0" and builder.data_path.parent.name == "custom"
    source = builder.as_data_source("train")
    assert len(source) == 4
    assert source[0]["image"].shape == (24, 24, 4)
    assert builder.info.splits["test"].num_examples == 2 * 2


def test_config_validation():
    with pytest.raises(ValueError, match="image_size"):
        dataclasses.replace(TINY, name="bad", image_size=4)
    with pytest.raises(ValueError, match="num_test_subjects"):
        dataclasses.replace(TINY, name="bad", num_test_subjects=0)
