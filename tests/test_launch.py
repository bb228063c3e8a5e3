"""The launcher and configs: options, overrides, clear errors, and a whole run through `launch.py`."""

import json
import os
import subprocess
import sys

import pytest

from configs import phantom
from synth import configlib, pipeline, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, data_dir=None, traceback=False):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop("SYNTH_TRACEBACK", None)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # As in-process tests: compile fast, semantics unchanged.
    if data_dir:
        env["SYNTH_DATA_DIR"] = data_dir
    if traceback:
        env["SYNTH_TRACEBACK"] = "1"
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


def _assert_one_message(result, status, *needles, alone=True):
    """The error ends stderr as `error: ...` and a hint (after the run's log if not `alone`), no traceback."""
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert len(lines) - first <= 3 and (first == 0 or not alone), result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr


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
    _assert_one_message(
        result,
        2,
        "--config.segmentor.trian.num_steps",
        "no key 'trian'",
        'did you mean "train"',
        "SYNTH_TRACEBACK=1",
    )


def test_unknown_stage_on_command_line(tmp_path):
    result = _launch("--config", "configs/phantom.py:stage=segmentr", "--workdir", str(tmp_path))
    assert result.returncode != 0
    assert "segmentr" in result.stderr + result.stdout
    _assert_one_message(result, 2, "Unknown stage='segmentr'", "SYNTH_TRACEBACK=1")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--config", "configs/phantom.py:runlokal"], ["--config=configs/phantom.py:runlokal", "'runlokal'"]),
        (["--config", "configs/phantom.py:variant=Z"], ["variant='Z'"]),
        (["--config", "configs/no_such.py"], ["no config file 'configs/no_such.py'"]),
        (["--config", "configs/no_such.py", "--config.a.b=1"], ["no config file 'configs/no_such.py'"]),
        (["--config", "configs/phantom.py", "--config.stage.x=1"], ["--config.stage.x", "TypeError"]),
        (["--config", "configs/phantom.py", "--config.segmentor.train.num_steps=many"], ["num_steps=many"]),
        (["--config", "configs/phantom.py", "--confg.stage=all"], ["'confg.stage'"]),
        (["--config", "configs/phantom.py", "stray"], ["unexpected arguments: stray"]),
    ],
)
def test_command_line_errors_print_one_message(tmp_path, args, needles):
    result = _launch(*args, "--workdir", str(tmp_path / "run"))
    _assert_one_message(result, 2, *needles, "--helpshort")
    assert not (tmp_path / "run").exists()


def test_traceback_variable_prints_the_traceback(tmp_path):
    args = ["--config", "configs/phantom.py:runlokal", "--workdir", str(tmp_path)]
    result = _launch(*args, traceback=True)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "configlib.py" in result.stderr  # Where get_config raised.
    assert result.stderr.splitlines()[-2].startswith("error: --config=configs/phantom.py:runlokal")
    assert "SYNTH_TRACEBACK=1" not in result.stderr


@pytest.mark.parametrize(
    "body, error",
    [("return {}['stage']", "KeyError: 'stage'"), ("return int('x')", "ValueError: invalid literal")],
)
def test_bug_in_a_config_keeps_its_traceback(tmp_path, body, error):
    config = tmp_path / "buggy.py"
    config.write_text(f"def get_config(arg=None):\n    {body}\n")
    result = _launch("--config", str(config), "--workdir", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and error in result.stderr and "buggy.py" in result.stderr


def test_run_error_prints_one_message(tmp_path):
    # Stage C in an empty workdir: FileNotFoundError naming the stages to train first, raised on purpose.
    result = _launch("--config", "configs/phantom.py:runlocal,stage=dataset", "--workdir", str(tmp_path))
    _assert_one_message(result, 1, "stage=all", "SYNTH_TRACEBACK=1", alone=False)


@pytest.mark.slow  # A stage trained in a subprocess (~50 s of the 2 cores); the errors above stay fast.
def test_launch_runs_and_resumes(phantom_data_dir, tmp_path):
    workdir = tmp_path / "run"
    # One stage keeps the test short; test_pipeline runs stage=all (in the quickstart notebook).
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
