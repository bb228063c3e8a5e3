"""The launcher and configs: options, overrides, clear errors, and a whole run through `launch.py`."""

import json
import os
import subprocess
import sys

import pytest

from configs import phantom
from synth import configlib, pipeline, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, data_dir=None):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # As in-process tests: compile fast, semantics unchanged.
    if data_dir:
        env["SYNTH_DATA_DIR"] = data_dir
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


def test_parse_arg_types_and_flags():
    opts = configlib.parse_arg("stage=segmentor,runlocal,n=3", stage="all", runlocal=False, n=1)
    assert (opts.stage, opts.runlocal, opts.n) == ("segmentor", True, 3)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("stage=bogus", "Unknown stage='bogus'"),
        ("runlokal", "Unknown config option 'runlokal'"),
        ("demo=maybe", "'demo' expects a boolean"),
        ("stage", "'stage' needs a value"),
    ],
)
def test_bad_options_name_the_problem(arg, message):
    with pytest.raises(ValueError, match=message):
        phantom.get_config(arg)


def test_unbuilt_stage_says_so(tmp_path, monkeypatch):
    monkeypatch.delitem(stages.BUILT_STAGES, "verify")  # Every stage is built: pretend one is not.
    config = phantom.get_config("stage=verify")
    with pytest.raises(stages.StageNotBuiltError, match="'verify'.*not built yet"):
        pipeline.train_and_evaluate(config, tmp_path)


def test_dataset_stage_names_the_untrained_stages(tmp_path):
    config = phantom.get_config("stage=dataset")
    with pytest.raises(FileNotFoundError, match="structure, segmentor, translator, synthesis.*stage=all"):
        pipeline.train_and_evaluate(config, tmp_path)


def test_mistyped_override_key_is_named(tmp_path):
    result = _launch(
        "--config",
        "configs/phantom.py:runlocal",
        "--workdir",
        str(tmp_path),
        "--config.segmentor.trian.num_steps=3",
    )
    assert result.returncode != 0
    assert "trian" in result.stderr + result.stdout
    assert not (tmp_path / "config.json").exists()


def test_unknown_stage_on_command_line(tmp_path):
    result = _launch("--config", "configs/phantom.py:stage=segmentr", "--workdir", str(tmp_path))
    assert result.returncode != 0
    assert "segmentr" in result.stderr + result.stdout


def test_launch_runs_and_resumes(phantom_data_dir, tmp_path):
    workdir = tmp_path / "run"
    # One stage keeps the test short; test_stage_c runs stage=all (in the quickstart notebook).
    args = [
        "--config",
        "configs/phantom.py:runlocal,stage=segmentor",
        "--workdir",
        str(workdir),
        "--config.segmentor.train.num_steps=2",
        "--config.segmentor.train.eval_every=2",
    ]
    first = _launch(*args, data_dir=phantom_data_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    assert config["segmentor"]["train"]["num_steps"] == 2
    assert config["data"]["data_dir"] == phantom_data_dir
    assert "step 2/2" in first.stdout + first.stderr  # Progress line with step and ETA.
    report = (workdir / "report.md").read_text()
    assert "## segmentor" in report and "segmentation" in report
    second = _launch(*args, data_dir=phantom_data_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "complete: nothing to do" in second.stdout + second.stderr
