"""Tests of synth/export.py: NIfTI round trip with geometry, PNG files, atomic folders, the CLI."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from synth import export, writer

MODALITIES = ("t1", "t2", "flair")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rotation(degrees_z, degrees_x):
    """A proper rotation (det +1): about z, then about x."""
    a, b = math.radians(degrees_z), math.radians(degrees_x)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return (rz @ rx).astype(np.float32)


def _examples(n=3, h=12, w=10):
    """BRATS-like dicts as a TFDS data source returns them (bytes ids, float32 geometry)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        label = np.zeros((h, w), np.uint8)
        label[2 + i : 6 + i, 3:7] = rng.integers(1, 5, (4, 4))
        out.append(
            {
                "image": rng.random((h, w, len(MODALITIES)), dtype=np.float32),
                "label": label,
                "id": f"train_subj{i:04d}/slice00{i}".encode(),
                "subject_id": f"train_subj{i:04d}".encode(),
                "slice_index": i,
                "spacing": np.array([0.9375, 1.25, 3.3 + i], np.float32),
                "origin": np.array([-120.5 + i, 33.25, 17.1 * i], np.float32),
                "direction": _rotation(30 + 10 * i, 15).reshape(9),
            }
        )
    return out


def _complete_folders(out_dir):
    """Folders that look like results (not hidden temporaries)."""
    return sorted(e.name for e in os.scandir(out_dir) if e.is_dir() and not e.name.startswith("."))


def test_safe_id():
    assert export.safe_id(b"train_subj0007/slice003") == "train_subj0007_slice003"
    assert export.safe_id("a b:c\\d") == "a_b_c_d"
    assert export.safe_id("..") == "_.."
    assert export.safe_id("") == "_"


def test_nifti_round_trip_keeps_pixels_and_geometry(tmp_path):
    examples = _examples()
    folders = export.export_nifti(examples, tmp_path, modalities=MODALITIES)
    assert [os.path.basename(f) for f in folders] == [f"train_subj{i:04d}_slice00{i}" for i in range(3)]
    for folder, example in zip(folders, examples):
        assert sorted(os.listdir(folder)) == ["flair.nii.gz", "label.nii.gz", "t1.nii.gz", "t2.nii.gz"]
        for k, name in enumerate([*MODALITIES, "label"]):
            image = sitk.ReadImage(os.path.join(folder, f"{name}.nii.gz"))
            assert image.GetSize() == (10, 12, 1)  # one slice: (x, y, z)
            pixels = sitk.GetArrayFromImage(image)[0]
            if name == "label":
                assert pixels.dtype == np.uint8
                np.testing.assert_array_equal(pixels, example["label"])
            else:
                assert pixels.dtype == np.float32
                np.testing.assert_array_equal(pixels, example["image"][..., k])
            np.testing.assert_allclose(image.GetSpacing(), example["spacing"], rtol=0, atol=1e-6)
            np.testing.assert_allclose(image.GetOrigin(), example["origin"], rtol=0, atol=1e-5)
            np.testing.assert_allclose(image.GetDirection(), example["direction"], rtol=0, atol=1e-6)
            # The schema's meaning: pixel [i, j] lies at origin + direction @ (j*sx, i*sy, 0).
            d = example["direction"].reshape(3, 3).astype(np.float64)
            want = example["origin"] + d @ (np.array([4, 7, 0]) * example["spacing"])
            np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((4, 7, 0)), want, atol=1e-4)


def test_png_export_files_and_shapes(tmp_path):
    examples = _examples(n=2)
    folders = export.export_png(examples, tmp_path, modalities=MODALITIES, num_classes=5)
    assert len(folders) == 2
    for folder, example in zip(folders, examples):
        names = sorted(os.listdir(folder))
        assert names == ["flair.png", "label.png", "label_colour.png", "t1.png", "t2.png"]
        t2 = np.asarray(Image.open(os.path.join(folder, "t2.png")))
        assert t2.shape == (12, 10) and t2.dtype == np.uint8
        np.testing.assert_array_equal(t2, writer.to_uint8(example["image"][..., 1])[..., 0])
        label = np.asarray(Image.open(os.path.join(folder, "label.png")))
        np.testing.assert_array_equal(label, example["label"])
        colour = np.asarray(Image.open(os.path.join(folder, "label_colour.png")))
        assert colour.shape == (12, 10, 3)
        np.testing.assert_array_equal(colour, writer.to_uint8(writer.label_colours(example["label"], 5)))


def test_limit_rerun_skip_and_overwrite(tmp_path):
    examples = _examples()
    assert len(export.export_png(examples, tmp_path, modalities=MODALITIES, num_classes=5, limit=2)) == 2
    assert len(_complete_folders(tmp_path)) == 2
    label_png = os.path.join(tmp_path, "train_subj0000_slice000", "label.png")
    os.remove(label_png)  # marks the folder: a skipped folder is left as it is
    export.export_png(examples, tmp_path, modalities=MODALITIES, num_classes=5)
    assert len(_complete_folders(tmp_path)) == 3 and not os.path.exists(label_png)
    export.export_png(examples, tmp_path, modalities=MODALITIES, num_classes=5, overwrite=True)
    assert os.path.exists(label_png)
    assert sorted(os.listdir(tmp_path)) == _complete_folders(tmp_path)  # no temporaries left


def test_bad_examples_and_arguments(tmp_path):
    example = _examples(n=1)[0]
    with pytest.raises(ValueError, match="train_subj0000/slice000.*4 modalities"):
        export.export_nifti([example], tmp_path, modalities=("a", "b", "c", "d"))
    with pytest.raises(ValueError, match="'label'"):
        export.export_nifti([example], tmp_path, modalities=("t1", "label", "t2"))
    twins = [example, dict(example, id=b"train_subj0000_slice000")]
    with pytest.raises(ValueError, match="would both be written to train_subj0000_slice000"):
        export.export_nifti(twins, tmp_path / "twins", modalities=MODALITIES)
    assert _complete_folders(tmp_path) == ["twins"]


def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    examples = _examples()

    def interrupted():
        yield examples[0]
        raise KeyboardInterrupt  # e.g. Ctrl-C while the source reads the next example

    with pytest.raises(KeyboardInterrupt):
        export.export_nifti(interrupted(), tmp_path, modalities=MODALITIES)
    assert _complete_folders(tmp_path) == ["train_subj0000_slice000"]  # the finished one only
    assert len(os.listdir(os.path.join(tmp_path, "train_subj0000_slice000"))) == 4

    # Interrupted while writing the second example's files: its folder never appears.
    write_image = sitk.WriteImage
    calls = []

    def failing(image, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 6:  # the 2nd file of the 2nd example
            raise OSError("disk full")
        write_image(image, path, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", failing)
    out = tmp_path / "second"
    with pytest.raises(OSError, match="disk full"):
        export.export_nifti(examples, out, modalities=MODALITIES)
    assert _complete_folders(out) == ["train_subj0000_slice000"]
    assert os.listdir(out) == ["train_subj0000_slice000"]  # the temporary folder was removed

    # A killed process leaves a temporary folder behind: it is hidden and the next run deletes it.
    leftover = out / ".incomplete-train_subj0001_slice001-deadbeef"
    leftover.mkdir()
    (leftover / "t1.nii.gz").write_bytes(b"partial")
    monkeypatch.setattr(sitk, "WriteImage", write_image)
    export.export_nifti(examples, out, modalities=MODALITIES)
    assert sorted(os.listdir(out)) == [f"train_subj{i:04d}_slice00{i}" for i in range(3)]


# --------------------------------------------------------------------------------------------------
# Command line, on the session's tiny phantom (conftest.phantom_data_dir, built once).


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "synth.export", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_png(phantom_data_dir, tmp_path):
    out = tmp_path / "png"
    run = _cli(
        "--data_dir", phantom_data_dir, "--dataset", "phantom/tiny", "--format", "png", "--out", str(out),
        "--limit", "2",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = [line for line in run.stdout.splitlines() if line.startswith("Exported")]
    assert len(summary) == 1 and "2 written" in summary[0], run.stdout
    folders = _complete_folders(out)
    assert len(folders) == 2 and all(f.startswith("train_subj") and "_slice" in f for f in folders)
    for folder in folders:
        files = sorted(os.listdir(out / folder))
        assert files == ["flair.png", "label.png", "label_colour.png", "t1.png", "t1c.png", "t2.png"]
        assert np.asarray(Image.open(out / folder / "t1.png")).shape == (32, 32)
        assert np.asarray(Image.open(out / folder / "label_colour.png")).shape == (32, 32, 3)


def test_cli_errors(phantom_data_dir, tmp_path):
    out = str(tmp_path / "out")
    run = _cli(
        "--data_dir", phantom_data_dir, "--dataset", "phantom/default", "--format", "png", "--out", out
    )
    assert run.returncode != 0
    assert "not built" in run.stderr and os.path.join(phantom_data_dir, "phantom", "default") in run.stderr
    run = _cli("--data_dir", phantom_data_dir, "--dataset", "phantom/tiny", "--format", "tiff", "--out", out)
    assert run.returncode == 2 and "argument --format" in run.stderr
    run = _cli(
        "--data_dir", phantom_data_dir, "--dataset", "phantom/tiny", "--format", "png", "--out", out,
        "--limit", "0",
    )  # fmt: skip
    assert run.returncode == 2 and "argument --limit" in run.stderr
    run = _cli(
        "--data_dir", phantom_data_dir, "--dataset", "phantom/tiny", "--format", "png", "--out", out,
        "--split", "nope",
    )  # fmt: skip
    assert run.returncode == 2 and "argument --split" in run.stderr and "train" in run.stderr
    assert not os.path.exists(out)
