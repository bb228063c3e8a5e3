"""Tests of the 2D image builders (`chest_xray`, `lung_ct`, `drive`, `fire`) and `data_builders.imaging`.

Each builder is built from its package's `dummy_data/` (a fake download in the real layout) into a
temporary directory and read back with `data_builders.data_source`, without TensorFlow. Bad inputs
are made on copies of the dummy data.
"""

from __future__ import annotations

import logging
import pathlib
import re
import shutil
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow_datasets as tfds
from PIL import Image

import data_builders
from data_builders import imaging, medical
from data_builders.chest_xray import chest_xray_dataset_builder as chest
from data_builders.drive import drive_dataset_builder as drive
from data_builders.fire import fire_dataset_builder as fire
from data_builders.lung_ct import lung_ct_dataset_builder as lung

PACKAGES = pathlib.Path(data_builders.__file__).parent
MODULES = {"chest_xray": chest, "lung_ct": lung, "drive": drive, "fire": fire}


def dummy(name: str) -> pathlib.Path:
    return PACKAGES / name / "dummy_data"


def copy_dummy(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
    """A writable copy of a package's dummy data (without its generator script)."""
    target = tmp_path / f"{name}_raw"
    shutil.copytree(dummy(name), target, ignore=shutil.ignore_patterns("*.py"))
    return target


def read_all(name: str, data_dir, **overrides) -> dict[str, dict[str, dict]]:
    """Every split of a built dataset as {split: {id: example}}."""
    builder = data_builders.get_builder(name, data_dir=data_dir, **overrides)
    return {
        split: {
            ex["id"].decode(): ex
            for ex in data_builders.data_source(name, split, data_dir=data_dir, **overrides)
        }
        for split in builder.info.splits
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`built("drive/native", **overrides)`: the dataset built once from its dummy data, then read."""
    cache = {}

    def get(name: str, **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in cache:
            data_dir = tmp_path_factory.mktemp("tfds")
            builder = data_builders.build(
                name, data_dir=data_dir, manual_dir=dummy(name.split("/")[0]), **overrides
            )
            cache[key] = (builder, read_all(name, data_dir, **overrides))
        return cache[key]

    return get


def raises_naming(error: type[Exception], *paths) -> pytest.RaisesContext:
    """`pytest.raises(error)` whose message must name every path."""
    return pytest.raises(error, match="".join(f"(?=[\\s\\S]*{re.escape(str(p))})" for p in paths))


def assert_nothing_built(name: str, data_dir) -> None:
    """After a failed build: no version directory that looks complete."""
    assert not data_builders.is_built(name, data_dir=data_dir)


# --- data_builders.imaging --------------------------------------------------------------------


def test_read_image_decodes_grey_rgb_palette_and_16_bit(tmp_path):
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    grey = imaging.read_image(tmp_path / "rgb.png", channels=1)
    assert grey.shape == (6, 8, 1) and grey.dtype == np.uint8
    np.testing.assert_allclose(grey, 0.299 * 200 + 0.587 * 100 + 0.114 * 50, atol=1)  # Luminance, not red.
    np.testing.assert_array_equal(imaging.read_image(tmp_path / "rgb.png", channels=3), rgb)

    deep = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    decoded = imaging.read_image(tmp_path / "deep.tif", channels=1)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded[..., 0], deep)
    as_rgb = imaging.read_image(tmp_path / "deep.tif", channels=3)
    assert as_rgb.dtype == np.uint16 and (as_rgb == deep[..., None]).all()

    gif = (np.arange(48).reshape(6, 8) % 2 * 255).astype(np.uint8)
    Image.fromarray(gif).save(tmp_path / "mask.gif")
    assert Image.open(tmp_path / "mask.gif").mode == "P"
    np.testing.assert_array_equal(imaging.read_image(tmp_path / "mask.gif", channels=1)[..., 0], gif)
    np.testing.assert_array_equal(
        imaging.binary_mask(imaging.read_image(tmp_path / "mask.gif", 1)), gif // 255
    )


def test_read_image_errors_name_the_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(tmp_path / "a.jpeg")
    data = (tmp_path / "a.jpeg").read_bytes()
    (tmp_path / "truncated.jpeg").write_bytes(data[: len(data) // 2])
    with raises_naming(imaging.ImageReadError, tmp_path / "truncated.jpeg"):
        imaging.read_image(tmp_path / "truncated.jpeg", channels=1)
    (tmp_path / "junk.gif").write_bytes(b"GIF89a but not really")
    with raises_naming(imaging.ImageReadError, tmp_path / "junk.gif"):
        imaging.read_image(tmp_path / "junk.gif", channels=1)
    with raises_naming(FileNotFoundError, tmp_path / "missing.png"):
        imaging.read_image(tmp_path / "missing.png", channels=1)
    Image.fromarray(np.array([[0.0, np.nan]], np.float32)).save(tmp_path / "nan.tif")
    with raises_naming(imaging.ImageReadError, tmp_path / "nan.tif"):
        imaging.read_image(tmp_path / "nan.tif", channels=1)


def test_resize_normalize_and_points():
    image = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
    assert imaging.resize(image, 8, "area").shape == (8, 8, 1)
    assert imaging.resize(image, 0, "cubic") is image
    mask = np.array([[0, 1], [1, 0]], np.uint8)
    assert set(np.unique(imaging.prepare_mask(mask * 255, 9))) == {0, 1}
    unit = imaging.normalize(image, "minmax", np.uint8, "x")
    assert unit.dtype == np.float32 and unit.min() == 0.0 and unit.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(imaging.normalize(np.full((2, 2), 7.0), "minmax", np.uint8, "x"), 0.0)
    np.testing.assert_allclose(imaging.normalize(np.array([51.0]), "dtype", np.uint8, "x"), [0.2])
    with pytest.raises(ValueError, match="scan.tif"):
        imaging.normalize(image, "dtype", np.float32, "scan.tif")
    # Pixel-centre convention: the outer edges map to the outer edges, pixel centres to pixel centres.
    points = imaging.scale_points([[-0.5, -0.5], [19.5, 9.5], [0.0, 0.0]], (10, 20), 40)
    np.testing.assert_allclose(points, [[-0.5, -0.5], [39.5, 39.5], [0.5, 1.5]])
    np.testing.assert_array_equal(imaging.scale_points([[3.0, 4.0]], (10, 20), 0), [[3.0, 4.0]])


def test_find_root_skips_macos_junk_and_prefers_the_shallowest(tmp_path):
    for top in ("__MACOSX/data", "data", "data/data"):
        for sub in ("train/A", "test/A"):
            (tmp_path / top / sub).mkdir(parents=True)
    assert imaging.find_root(tmp_path, ["train/A", "test/A"], "x") == tmp_path / "data"
    with raises_naming(FileNotFoundError, tmp_path):
        imaging.find_root(tmp_path, ["val"], "x")
    (tmp_path / "data" / "train" / "A" / "._x.jpeg").write_bytes(b"junk")
    (tmp_path / "data" / "train" / "A" / "x.JPEG").write_bytes(b"")
    assert [p.name for p in imaging.list_files(tmp_path / "data" / "train" / "A", [".jpeg"])] == ["x.JPEG"]


def test_config_validation():
    base = chest.Builder.builder_configs["default"]
    with pytest.raises(ValueError, match="interpolation"):
        data_builders.get_builder("chest_xray", data_dir=None, interpolation="bicubic")
    with pytest.raises(ValueError, match="image_size"):
        data_builders.get_builder("drive", data_dir=None, image_size=4)
    with pytest.raises(ValueError, match="validation_fraction"):
        data_builders.get_builder("chest_xray", data_dir=None, validation_fraction=1.0)
    with pytest.raises(ValueError, match="image_size must be 0"):
        data_builders.get_builder("lung_ct/volumes", data_dir=None, image_size=64)
    with pytest.raises(ValueError, match="kind"):
        data_builders.get_builder("fire", data_dir=None, kind="triplets")
    assert base.fields()["image_size"] == 512 and "name" not in base.fields()


# --- chest_xray -------------------------------------------------------------------------------

CHEST_EXPECTED = {  # id -> (label, patient_id)
    "train/NORMAL/IM-0115-0001.jpeg": (0, "IM-0115"),
    "train/NORMAL/IM-0117-0001.jpeg": (0, "IM-0117"),
    "train/NORMAL/NORMAL2-IM-0427-0001.jpeg": (0, "NORMAL2-IM-0427"),
    "train/PNEUMONIA/person1_bacteria_1.jpeg": (1, "person1"),
    "train/PNEUMONIA/person1_bacteria_2.jpeg": (1, "person1"),
    "train/PNEUMONIA/person3_virus_15.jpeg": (2, "person3"),
    "train/PNEUMONIA/person10_virus_35.jpeg": (2, "person10"),
    "train/PNEUMONIA/person22_bacteria_77.jpeg": (1, "person22"),
    "val/NORMAL/NORMAL2-IM-1427-0001.jpeg": (0, "NORMAL2-IM-1427"),
    "val/PNEUMONIA/person1946_bacteria_4874.jpeg": (1, "person1946"),
    "test/NORMAL/IM-0001-0001.jpeg": (0, "IM-0001"),
    "test/NORMAL/NORMAL2-IM-0007-0001.jpeg": (0, "NORMAL2-IM-0007"),
    "test/PNEUMONIA/person100_bacteria_475.jpeg": (1, "person100"),
    "test/PNEUMONIA/person1_virus_6.jpeg": (2, "person1"),
}
CHEST_ROOT = dummy("chest_xray") / "chest_xray" / "chest_xray"


def test_chest_xray_classes_patients_and_splits(built):
    builder, splits = built("chest_xray")
    folders = {"train": "train/", "validation": "val/", "test": "test/"}
    assert set(splits) == set(folders)
    for split, examples in splits.items():
        assert sorted(examples) == sorted(k for k in CHEST_EXPECTED if k.startswith(folders[split]))
        for key, ex in examples.items():
            assert ex["image"].shape == (512, 512, 1) and ex["image"].dtype == np.float32
            assert ex["image"].min() == 0.0 and ex["image"].max() == pytest.approx(1.0)
            assert (ex["label"], ex["patient_id"].decode()) == CHEST_EXPECTED[key], key
            width, height = Image.open(CHEST_ROOT / key).size
            np.testing.assert_array_equal(ex["source_shape"], [height, width])
    assert builder.info.features["label"].names == ["normal", "bacteria", "virus"]
    metadata = builder.info.metadata
    assert metadata["source_root"] == "chest_xray/chest_xray"  # The archive's nested copy.
    assert metadata["interpolation"] == "nearest" and metadata["skipped_files"] == []
    assert builder.info.file_format.value == "array_record"
    assert "tensorflow" not in sys.modules


def test_chest_xray_decodes_grey_and_rgb_to_one_channel(built):
    _, splits = built("chest_xray", image_size=0, normalization="dtype")
    rgb_seen = 0
    for examples in splits.values():
        for key, ex in examples.items():
            source = Image.open(CHEST_ROOT / key)
            image = ex["image"][..., 0] * 255.0
            assert image.shape == source.size[::-1]
            if source.mode == "L":
                np.testing.assert_allclose(image, np.asarray(source), atol=1e-3)
                continue
            rgb_seen += 1
            rgb = np.asarray(source.convert("RGB"), np.float32)
            np.testing.assert_allclose(image, rgb @ np.array([0.299, 0.587, 0.114]), atol=1.0)
            assert np.abs(image - rgb[..., 0]).max() > 10  # Not the first channel.
    assert rgb_seen == 3


def test_chest_xray_moves_whole_training_patients_to_validation(built):
    builder, splits = built("chest_xray", validation_fraction=0.4, split_seed=3)
    assert builder.builder_config.name == "default_split_seed3_validation_fraction0.4"
    train_patients = sorted({CHEST_EXPECTED[k][1] for k in CHEST_EXPECTED if k.startswith("train/")})
    expected = medical.split_subjects(train_patients, validation_fraction=0.4, test_fraction=0.0, seed=3)
    moved = builder.info.metadata["validation_patients_from_train"]
    assert moved == expected["validation"] and moved
    assert {ex["patient_id"].decode() for ex in splits["train"].values()}.isdisjoint(moved)
    from_train = {k for k in splits["validation"] if k.startswith("train/")}
    assert from_train == {
        k for k in CHEST_EXPECTED if k.startswith("train/") and CHEST_EXPECTED[k][1] in moved
    }
    assert {k for k in splits["validation"] if k.startswith("val/")} == {
        k for k in CHEST_EXPECTED if k.startswith("val/")
    }
    assert len(splits["train"]) + len(from_train) == 8


def test_chest_xray_flat_layout_gives_the_same_dataset_in_the_same_order(built, tmp_path):
    _, nested = built("chest_xray")
    flat = tmp_path / "flat"
    shutil.copytree(CHEST_ROOT, flat)
    data_builders.build("chest_xray", data_dir=tmp_path / "tfds", manual_dir=flat)
    for split, examples in nested.items():
        again = list(data_builders.data_source("chest_xray", split, data_dir=tmp_path / "tfds"))
        assert [ex["id"].decode() for ex in again] == list(examples)  # Same keys, same order.
        for ex in again:
            np.testing.assert_array_equal(ex["image"], examples[ex["id"].decode()]["image"])


def test_chest_xray_bad_inputs(tmp_path, caplog):
    data_dir = tmp_path / "tfds"
    raw = copy_dummy("chest_xray", tmp_path)
    corrupt = raw / "chest_xray" / "chest_xray" / "test" / "NORMAL" / "IM-0001-0001.jpeg"
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    with raises_naming(imaging.ImageReadError, corrupt):
        data_builders.build("chest_xray", data_dir=data_dir, manual_dir=raw)
    assert_nothing_built("chest_xray", data_dir)

    with caplog.at_level(logging.WARNING):
        builder = data_builders.build(
            "chest_xray", data_dir=data_dir, manual_dir=raw, skip_corrupt_images=True
        )
    assert str(corrupt) in caplog.text
    assert builder.info.metadata["skipped_files"] == ["test/NORMAL/IM-0001-0001.jpeg"]
    assert builder.info.splits["test"].num_examples == 3

    unnamed = raw / "chest_xray" / "chest_xray" / "train" / "PNEUMONIA" / "person5.jpeg"
    shutil.copy(raw / "chest_xray" / "chest_xray" / "train" / "PNEUMONIA" / "person3_virus_15.jpeg", unnamed)
    with raises_naming(ValueError, unnamed):
        data_builders.build("chest_xray", data_dir=tmp_path / "tfds2", manual_dir=raw)


# --- lung_ct ----------------------------------------------------------------------------------

LUNG_LEVEL = 0.2  # Lungs are 200 of the 1000 levels above air in the dummy slices (per-image min-max).


def test_lung_ct_slices_pair_by_name_and_split_by_subject(built):
    builder, splits = built("lung_ct/slices")
    names = sorted(p.stem for p in (dummy("lung_ct") / "2d_images").glob("*.tif"))
    assert sorted(k for examples in splits.values() for k in examples) == names
    subjects = builder.info.metadata["subjects"]
    expected = medical.split_subjects(
        sorted(n[:7] for n in names), validation_fraction=0.1, test_fraction=0.2, seed=0
    )
    assert subjects == expected and set(splits) == set(expected)
    for split, examples in splits.items():
        assert sorted({ex["subject_id"].decode() for ex in examples.values()}) == subjects[split]
        for key, ex in examples.items():
            assert ex["image"].shape == (512, 512, 1) and ex["image"].dtype == np.float32
            assert ex["mask"].shape == (512, 512) and ex["mask"].dtype == np.uint8
            assert ex["slice_index"] == int(key.split("_Z_")[1])
            # Each slice's lungs sit elsewhere, so a mask paired with another slice fails this.
            lungs = np.isclose(ex["image"][..., 0], LUNG_LEVEL, atol=1e-3)
            np.testing.assert_array_equal(ex["mask"], lungs.astype(np.uint8), err_msg=key)
            assert ex["mask"].any()


def test_lung_ct_volumes_keep_values_and_geometry(built):
    builder, splits = built("lung_ct/volumes")
    assert builder.info.metadata["subjects"] == medical.split_subjects(
        ["0002", "0005", "0019", "0023"], validation_fraction=0.1, test_fraction=0.2, seed=0
    )
    seen = 0
    for examples in splits.values():
        for key, ex in examples.items():
            number = key.split("_")[1]
            image = sitk.ReadImage(str(dummy("lung_ct") / "3d_images" / f"IMG_{number}.nii.gz"))
            mask = sitk.ReadImage(str(dummy("lung_ct") / "3d_images" / f"MASK_{number}.nii.gz"))
            assert ex["image"].dtype == np.float32 and ex["mask"].dtype == np.uint8
            np.testing.assert_array_equal(ex["image"], sitk.GetArrayFromImage(image).astype(np.float32))
            np.testing.assert_array_equal(ex["mask"], sitk.GetArrayFromImage(mask) != 0)
            np.testing.assert_allclose(ex["spacing"], image.GetSpacing(), rtol=1e-6)
            np.testing.assert_allclose(ex["origin"], image.GetOrigin(), rtol=1e-6)
            np.testing.assert_allclose(ex["direction"], image.GetDirection(), atol=1e-6)
            assert ex["subject_id"].decode() == number
            seen += 1
    assert seen == 4
    # The geometry reaches an exported volume intact.
    ex = splits["test"][next(iter(splits["test"]))]
    restored = sitk.GetImageFromArray(ex["image"])
    restored.SetSpacing(ex["spacing"].astype(float).tolist())
    restored.SetOrigin(ex["origin"].astype(float).tolist())
    restored.SetDirection(ex["direction"].astype(float).tolist())
    original = sitk.ReadImage(str(dummy("lung_ct") / "3d_images" / f"IMG_{ex['subject_id'].decode()}.nii.gz"))
    corner = [s - 1 for s in original.GetSize()]
    np.testing.assert_allclose(
        restored.TransformIndexToPhysicalPoint(corner),
        original.TransformIndexToPhysicalPoint(corner),
        atol=1e-3,
    )


def test_lung_ct_split_seed_is_recorded(built):
    builder, splits = built("lung_ct/slices", split_seed=5)
    subjects = builder.info.metadata["subjects"]
    assert builder.info.metadata["split_seed"] == 5
    assert subjects == medical.split_subjects(
        [f"ID_{i:04d}" for i in range(6)], validation_fraction=0.1, test_fraction=0.2, seed=5
    )
    assert {
        s: sorted({ex["subject_id"].decode() for ex in e.values()}) for s, e in splits.items()
    } == subjects


def test_lung_ct_bad_inputs(tmp_path):
    raw = copy_dummy("lung_ct", tmp_path)
    data_dir = tmp_path / "tfds"
    mask = raw / "2d_masks" / "ID_0003_Z_0051.tif"
    moved = tmp_path / "moved.tif"
    shutil.move(mask, moved)
    with raises_naming(FileNotFoundError, raw / "2d_images" / "ID_0003_Z_0051.tif", mask):
        data_builders.build("lung_ct/slices", data_dir=data_dir, manual_dir=raw)
    assert_nothing_built("lung_ct/slices", data_dir)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mask)  # Back, but the wrong size.
    with raises_naming(ValueError, raw / "2d_images" / "ID_0003_Z_0051.tif", mask):
        data_builders.build("lung_ct/slices", data_dir=data_dir, manual_dir=raw)
    assert_nothing_built("lung_ct/slices", data_dir)

    orphan = raw / "3d_images" / "MASK_0099.nii.gz"
    shutil.copy(raw / "3d_images" / "MASK_0002.nii.gz", orphan)
    with raises_naming(FileNotFoundError, orphan):
        data_builders.build("lung_ct/volumes", data_dir=data_dir, manual_dir=raw)
    orphan.unlink()
    broken = raw / "3d_images" / "IMG_0005.nii.gz"
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(broken))).astype(np.float32)
    volume[0, 0, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(broken))
    with raises_naming(ValueError, broken):
        data_builders.build("lung_ct/volumes", data_dir=data_dir, manual_dir=raw)
    assert_nothing_built("lung_ct/volumes", data_dir)


# --- drive ------------------------------------------------------------------------------------


def check_drive_example(ex: dict) -> None:
    """The dummy images are black outside their FoV and dark on their vessels (per number)."""
    fov = ex["image"].max(axis=-1) > 0
    np.testing.assert_array_equal(ex["mask"], fov, err_msg=ex["id"])
    vessels = fov & (ex["image"][..., 1] < 0.3)
    np.testing.assert_array_equal(ex["label"], vessels, err_msg=ex["id"])
    assert ex["label"].any() and not (ex["label"] & ~ex["mask"].astype(bool)).any()


def test_drive_pairs_by_number(built):
    _, splits = built("drive")
    assert {s: sorted(e) for s, e in splits.items()} == {
        "train": ["21_training", "22_training", "23_training"],
        "test": ["01_test", "02_test"],
    }
    for split, examples in splits.items():
        for key, ex in examples.items():
            assert ex["image"].shape == (512, 512, 3) and ex["image"].dtype == np.float32
            for name in ("label", "label_second_observer", "mask"):
                assert ex[name].shape == (512, 512) and ex[name].dtype == np.uint8
            assert ex["number"] == int(key[:2])
            assert ex["has_label"] is True
            check_drive_example(ex)
            assert ex["has_label_second_observer"] is (split == "test")
            # The second observer drew only the vertical vessel.
            second = ex["label_second_observer"]
            assert (second <= ex["label"]).all() and (
                split == "train" or 0 < second.sum() < ex["label"].sum()
            )


def test_drive_native_reads_the_gifs(built):
    _, splits = built("drive/native")
    for split, examples in splits.items():
        folder = drive.SPLIT_FOLDERS[split]
        source = dummy("drive") / "DRIVE" / folder
        for key, ex in examples.items():
            assert ex["image"].shape == (18, 16, 3)
            n = key[:2]
            manual = np.asarray(Image.open(source / "1st_manual" / f"{n}_manual1.gif"))
            fov = np.asarray(Image.open(source / "mask" / f"{n}_{folder}_mask.gif"))
            np.testing.assert_array_equal(ex["label"], manual > 0)
            np.testing.assert_array_equal(ex["mask"], fov > 0)
            check_drive_example(ex)


def test_drive_test_manuals_are_optional(built, tmp_path):
    raw = copy_dummy("drive", tmp_path)
    shutil.rmtree(raw / "DRIVE" / "test" / "1st_manual")
    shutil.rmtree(raw / "DRIVE" / "test" / "2nd_manual")
    data_builders.build("drive", data_dir=tmp_path / "tfds", manual_dir=raw)
    splits = read_all("drive", tmp_path / "tfds")
    for ex in splits["test"].values():
        assert ex["has_label"] is False and ex["has_label_second_observer"] is False
        assert not ex["label"].any() and not ex["label_second_observer"].any()
        assert ex["mask"].any()
    _, original = built("drive")
    for key, ex in splits["train"].items():
        np.testing.assert_array_equal(ex["label"], original["train"][key]["label"])


def test_drive_bad_inputs(tmp_path):
    raw = copy_dummy("drive", tmp_path)
    data_dir = tmp_path / "tfds"
    manual = raw / "DRIVE" / "training" / "1st_manual" / "22_manual1.gif"
    manual.unlink()
    with raises_naming(FileNotFoundError, raw / "DRIVE" / "training" / "images" / "22_training.tif", manual):
        data_builders.build("drive", data_dir=data_dir, manual_dir=raw)
    assert_nothing_built("drive", data_dir)
    manual.write_bytes(b"GIF89a\x10\x00\x12\x00")  # A GIF header and nothing else.
    with raises_naming(imaging.ImageReadError, manual):
        data_builders.build("drive", data_dir=data_dir, manual_dir=raw)
    assert_nothing_built("drive", data_dir)
    shutil.copy(dummy("drive") / "DRIVE" / "training" / "1st_manual" / "22_manual1.gif", manual)
    stray = raw / "DRIVE" / "test" / "mask" / "07_test_mask.gif"
    shutil.copy(raw / "DRIVE" / "test" / "mask" / "01_test_mask.gif", stray)
    with raises_naming(FileNotFoundError, stray):
        data_builders.build("drive", data_dir=data_dir, manual_dir=raw)


# --- fire -------------------------------------------------------------------------------------

FIRE_PAIRS = ("A01", "P01", "S01", "S02")
FIRE_POINTS = {"A01": 3, "P01": 5, "S01": 4, "S02": 2}


def fire_points(pair: str) -> np.ndarray:
    return np.loadtxt(dummy("fire") / "FIRE" / "Ground Truth" / f"control_points_{pair}_1_2.txt", ndmin=2)


def check_fire_colour(image: np.ndarray, pair: str, view: int, key: str) -> None:
    """Red encodes the pair and green the view in the dummy photos: their ratio tells every image apart.

    (Per-image min-max divides by the brightest pixel, which JPEG ringing moves, so only the ratio of
    the channels is exact enough: the ratios of the eight images differ by at least 15%.)
    """
    red, green = 60 + 40 * FIRE_PAIRS.index(pair), 100 * view
    centre = image[image.shape[0] // 2, image.shape[1] // 2]
    np.testing.assert_allclose(centre[0] / centre[1], red / green, rtol=0.05, err_msg=key)


def test_fire_images_with_variable_length_control_points(built):
    builder, splits = built("fire")
    examples = splits["train"]
    assert sorted(examples) == sorted(f"{p}_{v}" for p in FIRE_PAIRS for v in (1, 2))
    disc = np.asarray(Image.open(dummy("fire") / "FIRE" / "Masks" / "mask.png")) > 0
    for key, ex in examples.items():
        pair, view = key.split("_")
        assert ex["image"].shape == (512, 512, 3) and ex["image"].dtype == np.float32
        assert ex["pair_id"].decode() == pair and ex["view"] == int(view)
        assert builder.info.features["category"].int2str(ex["category"]) == pair[0]
        check_fire_colour(ex["image"], pair, int(view), key)
        np.testing.assert_array_equal(ex["source_shape"], [20, 20])
        points = ex["control_points"]
        assert points.dtype == np.float32 and points.shape == (FIRE_POINTS[pair], 2)
        own = fire_points(pair)[:, :2] if view == "1" else fire_points(pair)[:, 2:]
        np.testing.assert_allclose(points, (own + 0.5) * 512 / 20 - 0.5, rtol=1e-6)
        assert ex["has_control_points"] is True and ex["has_mask"] is True
        np.testing.assert_array_equal(ex["mask"], imaging.resize(disc.astype(np.uint8), 512, "nearest"))
    assert "tensorflow" not in sys.modules  # Variable-length features decode without TensorFlow.


def test_fire_pairs_at_native_size(built):
    _, splits = built("fire/pairs", image_size=0)
    assert sorted(splits["train"]) == list(FIRE_PAIRS)
    for pair, ex in splits["train"].items():
        assert ex["fixed_image"].shape == ex["moving_image"].shape == (20, 20, 3)
        check_fire_colour(ex["fixed_image"], pair, 1, pair)
        check_fire_colour(ex["moving_image"], pair, 2, pair)
        np.testing.assert_allclose(ex["control_points"], fire_points(pair), rtol=1e-6)  # No resizing.


def test_fire_optional_files_and_bad_inputs(built, tmp_path):
    raw = copy_dummy("fire", tmp_path)
    (raw / "FIRE" / "Ground Truth" / "control_points_S02_1_2.txt").unlink()
    shutil.rmtree(raw / "FIRE" / "Masks")
    data_builders.build("fire/pairs", data_dir=tmp_path / "tfds", manual_dir=raw)
    examples = read_all("fire/pairs", tmp_path / "tfds")["train"]
    assert examples["S02"]["has_control_points"] is False
    assert examples["S02"]["control_points"].shape == (0, 4)
    assert examples["A01"]["control_points"].shape == (3, 4)
    assert all(ex["has_mask"] is False and not ex["mask"].any() for ex in examples.values())

    points = raw / "FIRE" / "Ground Truth" / "control_points_P01_1_2.txt"
    points.write_text("1 2 3 4\n5 6 seven 8\n")
    with raises_naming(ValueError, f"{points}:2"):
        data_builders.build("fire", data_dir=tmp_path / "tfds", manual_dir=raw)
    assert_nothing_built("fire", tmp_path / "tfds")
    points.unlink()
    lonely = raw / "FIRE" / "Images" / "A01_2.jpg"
    lonely.unlink()
    with raises_naming(FileNotFoundError, raw / "FIRE" / "Images" / "A01_1.jpg", lonely):
        data_builders.build("fire", data_dir=tmp_path / "tfds", manual_dir=raw)


# --- every builder ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chest_xray", "lung_ct/slices", "lung_ct/volumes", "drive", "fire/pairs"])
def test_missing_empty_or_wrong_manual_dir(name, tmp_path):
    data_dir = tmp_path / "tfds"
    with raises_naming(FileNotFoundError, tmp_path / "nowhere"):
        data_builders.build(name, data_dir=data_dir, manual_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with raises_naming(FileNotFoundError, tmp_path / "empty"):
        data_builders.build(name, data_dir=data_dir, manual_dir=tmp_path / "empty")
    (tmp_path / "wrong" / "train").mkdir(parents=True)
    (tmp_path / "wrong" / "notes.txt").write_text("not the dataset")
    with raises_naming(FileNotFoundError, tmp_path / "wrong"):
        data_builders.build(name, data_dir=data_dir, manual_dir=tmp_path / "wrong")
    assert_nothing_built(name, data_dir)


@pytest.mark.parametrize(
    "name", ["chest_xray", "lung_ct/slices", "lung_ct/volumes", "drive", "drive/native", "fire", "fire/pairs"]
)
def test_images_are_stored_as_raw_bytes_and_masks_as_zlib(name, tmp_path):
    builder = data_builders.get_builder(name, data_dir=tmp_path)
    assert str(builder.version) == "1.1.0" and set(builder.RELEASE_NOTES) == {"1.0.0", "1.1.0"}
    images = 0
    for key, feature in builder.info.features.items():
        if not isinstance(feature, tfds.features.Tensor) or len(feature.shape) < 2:
            continue
        encoding = feature.to_json_content().encoding
        if key.endswith("image"):
            assert (feature.np_dtype, encoding) == (np.float32, "bytes"), key
            images += 1
        elif feature.np_dtype == np.uint8:
            assert encoding == "zlib", key
    assert images >= 1


def test_prepare_image_nearest_resizes_the_decoded_dtype_with_the_same_values():
    rng = np.random.default_rng(0)
    for dtype, channels in ((np.uint8, 1), (np.uint8, 3), (np.uint16, 1), (np.int32, 1), (np.float32, 3)):
        array = rng.integers(0, 4000 if dtype != np.uint8 else 255, (23, 31, channels)).astype(dtype)
        for size in (0, 8, 23, 40):
            for normalization in ("minmax", "none") + (("dtype",) if dtype in (np.uint8, np.uint16) else ()):
                config = imaging.ImageConfig(
                    name="x", image_size=size, interpolation="nearest", normalization=normalization
                )
                got = imaging.prepare_image(array, config, "x.png")
                as_float = imaging.resize(array.astype(np.float32), size, "nearest")
                expected = imaging.normalize(as_float, normalization, array.dtype, "x.png")
                assert got.dtype == np.float32 and got.shape == expected.shape
                np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


# --- package files ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODULES))
def test_package_files(name):
    package = PACKAGES / name
    readme = (package / "README.md").read_text()
    for line in MODULES[name].MANUAL_DOWNLOAD_INSTRUCTIONS.splitlines():
        assert line in readme, line
    assert (package / "CITATIONS.bib").read_text().lstrip().startswith("@")
    valid = {
        line.split("#")[0].strip()
        for line in (pathlib.Path(tfds.__file__).parent / "core" / "valid_tags.txt").read_text().splitlines()
    }
    tags = [line.split("#")[0].strip() for line in (package / "TAGS.txt").read_text().splitlines()]
    assert tags and set(tags) <= valid
    assert (package / "checksums.tsv").is_file()
    assert (package / "dummy_data" / "make_dummy_data.py").is_file()
    size = sum(p.stat().st_size for p in (package / "dummy_data").rglob("*") if p.is_file())
    assert size < 200_000
