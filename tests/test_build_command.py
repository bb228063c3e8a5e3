"""Tests of the dataset API (`get_builder`, `build`, `is_built`, `data_source`) and its CLI."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import data_builders
from data_builders.__main__ import raised_on_purpose
from data_builders.phantom import anatomy

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: pathlib.Path = REPO, traceback: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SYNTH_TRACEBACK")}
    if traceback:
        env["SYNTH_TRACEBACK"] = "1"
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


# --- Names, configs and overrides -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "needles"),
    [
        ("brats1999", {}, ["'brats1999'", "phantom"]),
        ("phantom/huge", {}, ["'huge'", "phantom/tiny", "phantom/demo"]),
        ("phantom", {"config": "huge"}, ["'huge'", "phantom/default"]),
        ("phantom/tiny", {"config": "demo"}, ["'tiny'", "'demo'"]),
        ("phantom/tiny", {"imag_size": 48}, ["'imag_size'", "image_size", "seed"]),
        ("phantom/tiny", {"image_size": "big"}, ["image_size", "'big'", "integer"]),
        ("phantom/tiny", {"image_size": 4.5}, ["image_size", "4.5"]),
        ("phantom/tiny", {"image_size": 4}, ["image_size", ">= 8"]),
    ],
)
def test_bad_names_raise_value_errors_naming_them(tmp_path, name, kwargs, needles):
    with pytest.raises(ValueError) as error:
        data_builders.get_builder(name, data_dir=tmp_path, **kwargs)
    for needle in needles:
        assert needle in str(error.value)


def test_overrides_make_deterministic_configs(tmp_path):
    builder = data_builders.get_builder("phantom/tiny", data_dir=tmp_path, image_size=48, seed="3")
    config = builder.builder_config
    assert config.name == "tiny_image_size48_seed3"
    assert (config.image_size, config.seed, config.num_train_subjects) == (48, 3, 6)
    assert builder.info.features["image"].shape == (48, 48, 4)
    assert builder.data_path == tmp_path / "phantom" / "tiny_image_size48_seed3" / "1.1.0"
    # Overrides equal to the config's values change nothing.
    same = data_builders.get_builder("phantom", config="tiny", data_dir=tmp_path, image_size=32)
    assert same.builder_config.name == "tiny"
    default = data_builders.get_builder("phantom", data_dir=tmp_path)
    assert default.builder_config.name == "default"
    assert default.info.file_format.value == "array_record"


# --- Building, reading, interrupted builds --------------------------------------------------------


def test_data_source_on_unbuilt_dataset_says_how_to_build(tmp_path):
    assert not data_builders.is_built("phantom/tiny", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        data_builders.data_source("phantom/tiny", "train", data_dir=tmp_path, image_size=40)
    message = str(error.value)
    for needle in ("phantom/tiny_image_size40", str(tmp_path), "python -m data_builders build"):
        assert needle in message
    assert "--set image_size=40" in message


def test_build_once_then_reuse(tmp_path, monkeypatch):
    builder = data_builders.build("phantom/tiny", data_dir=tmp_path)
    assert data_builders.is_built("phantom/tiny", data_dir=tmp_path)
    assert len(builder.as_data_source("validation")) == 8

    def must_not_run(*args, **kwargs):
        raise AssertionError("rebuilt an already built dataset")

    monkeypatch.setattr(anatomy, "make_subject", must_not_run)
    again = data_builders.build("phantom/tiny", data_dir=tmp_path)
    assert len(again.as_data_source("train")) == 24
    # overwrite=True does rebuild.
    with pytest.raises(AssertionError, match="rebuilt"):
        data_builders.build("phantom/tiny", data_dir=tmp_path, overwrite=True)
    assert not data_builders.is_built("phantom/tiny", data_dir=tmp_path)


def _entries(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_interrupted_build_leaves_nothing_that_looks_built(tmp_path, monkeypatch):
    real = anatomy.make_subject
    calls = []

    def crash_after_three(*args, **kwargs):
        calls.append(args)
        if len(calls) > 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(anatomy, "make_subject", crash_after_three)
    with pytest.raises(RuntimeError, match="simulated crash"):
        data_builders.build("phantom/tiny", data_dir=tmp_path)
    assert not data_builders.is_built("phantom/tiny", data_dir=tmp_path)
    config_dir = tmp_path / "phantom" / "tiny"
    # TFDS writes into incomplete.XXXXXX_1.1.0 and removes it when generation raises.
    assert not (config_dir / "1.1.0").exists()
    assert not [p for p in _entries(tmp_path) if "incomplete" in p]
    with pytest.raises(FileNotFoundError):
        data_builders.data_source("phantom/tiny", "train", data_dir=tmp_path)

    monkeypatch.setattr(anatomy, "make_subject", real)
    builder = data_builders.build("phantom/tiny", data_dir=tmp_path)
    assert len(builder.as_data_source("train")) == 24


def test_killed_build_leftovers_do_not_count(tmp_path):
    # A killed process cannot clean up: it leaves its temporary directory, never a version dir.
    leftover = tmp_path / "phantom" / "tiny" / "incomplete.ABC123_1.1.0"
    leftover.mkdir(parents=True)
    (leftover / "phantom-train.array_record-00000-of-00001").write_bytes(b"partial")
    assert not data_builders.is_built("phantom/tiny", data_dir=tmp_path)
    builder = data_builders.build("phantom/tiny", data_dir=tmp_path)
    assert data_builders.is_built("phantom/tiny", data_dir=tmp_path)
    assert len(builder.as_data_source("test")) == 8


# --- The command line -----------------------------------------------------------------------------


def test_cli_build_prints_summary_and_is_readable_without_this_package(tmp_path):
    result = _run("-m", "data_builders", "build", "phantom/tiny", f"--data_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "phantom/tiny 1.1.0: built in" in out
    assert str(tmp_path / "phantom" / "tiny" / "1.1.0") in out
    for split, count in (("train", 24), ("validation", 8), ("test", 8)):
        assert f"{split}" in out and f" {count} examples" in out
    assert "Building phantom/tiny" in result.stderr  # The progress bar.

    # A second run finds it built; a project without this package reads it with TFDS alone.
    again = _run("-m", "data_builders", "build", "phantom/tiny", f"--data_dir={tmp_path}")
    assert again.returncode == 0 and "already built" in again.stdout
    reader = (
        "import sys, tensorflow_datasets as tfds\n"
        f"source = tfds.data_source('phantom/tiny', split='train', data_dir={str(tmp_path)!r})\n"
        "assert 'data_builders' not in sys.modules\n"
        "print(len(source), source[0]['image'].shape)\n"
    )
    external = _run("-c", reader, cwd=tmp_path)
    assert external.returncode == 0, external.stderr
    assert external.stdout.split("\n")[0] == "24 (32, 32, 4)"


def test_cli_build_with_overrides(tmp_path):
    result = _run(
        "-m",
        "data_builders",
        "build",
        "phantom/tiny",
        f"--data_dir={tmp_path}",
        "--set",
        "image_size=16",
        "--set",
        "num_train_subjects=1",
        "--no_progress",
    )
    assert result.returncode == 0, result.stderr
    assert "phantom/tiny_image_size16_num_train_subjects1" in result.stdout
    source = data_builders.data_source(
        "phantom/tiny", "train", data_dir=tmp_path, image_size=16, num_train_subjects=1
    )
    assert len(source) == 4 and source[0]["image"].shape == (16, 16, 4)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["build", "brats1999"], "'brats1999'"),
        (["build", "phantom/huge"], "'huge'"),
        (["build", "phantom/tiny", "--set", "colour=red"], "'colour'"),
        (["build", "phantom/tiny", "--set", "image_size"], "KEY=VALUE"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_cli_bad_input_exits_nonzero_naming_it(tmp_path, args, needle):
    if args[0] == "build":
        args = [*args, f"--data_dir={tmp_path}"]
    result = _run("-m", "data_builders", *args)
    assert result.returncode != 0
    assert needle in result.stderr
    assert not (tmp_path / "phantom").exists()


def test_cli_list():
    result = _run("-m", "data_builders", "list")
    assert result.returncode == 0, result.stderr
    for needle in ("phantom/default [default]", "phantom/demo", "phantom/tiny", "image_size=128"):
        assert needle in result.stdout


def _broken_chest_xray(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A copy of the chest X-ray dummy data with one image that is not an image."""
    manual = tmp_path / "manual"
    shutil.copytree(REPO / "data_builders" / "chest_xray" / "dummy_data" / "chest_xray", manual)
    broken = manual / "chest_xray" / "train" / "NORMAL" / "IM-0117-0001.jpeg"
    broken.write_bytes(b"not a jpeg")
    return manual, broken


def _build(name: str, tmp_path: pathlib.Path, manual: pathlib.Path, **kwargs) -> subprocess.CompletedProcess:
    args = ("build", name, f"--data_dir={tmp_path}", f"--manual_dir={manual}", "--no_progress")
    return _run("-m", "data_builders", *args, **kwargs)


def test_cli_input_errors_print_one_message(tmp_path):
    missing = tmp_path / "no_such_dir"
    result = _build("brats2015/slices", tmp_path, missing)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"manual-download directory {missing}" in result.stderr and "SYNTH_TRACEBACK=1" in result.stderr

    manual, broken = _broken_chest_xray(tmp_path)
    result = _build("chest_xray", tmp_path, manual)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"Cannot decode image file {broken}" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr


def test_cli_traceback_variable_prints_the_traceback(tmp_path):
    manual, broken = _broken_chest_xray(tmp_path)
    result = _build("chest_xray", tmp_path, manual, traceback=True)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "imaging.py" in result.stderr
    assert f"error: building chest_xray failed: Cannot decode image file {broken}" in result.stderr


def test_only_errors_raised_on_purpose_are_short(tmp_path):
    with pytest.raises(ValueError) as ours:  # A check of ours, with a message for the user.
        data_builders.get_builder("phantom/tiny", data_dir=tmp_path, image_size="big")
    assert raised_on_purpose(ours.value)
    with pytest.raises(AttributeError) as bug:  # Our code, but no `raise`: a bug keeps its traceback.
        data_builders.get_builder(None, data_dir=tmp_path)
    assert not raised_on_purpose(bug.value)
    with pytest.raises(ValueError) as library:  # Raised inside numpy.
        np.zeros(2).reshape(3)
    assert not raised_on_purpose(library.value)
