"""Launches a synth run: `python launch.py --config configs/<dataset>.py[:options] --workdir <dir>`.

Options after the colon are named (`stage=segmentor,runlocal`); every other knob is an override such as
`--config.segmentor.train.num_steps=2000`, and a mistyped key is an error that names it. Rerunning with
the same workdir resumes. On a cluster, `--distributed` (or the usual cluster environment) starts
`jax.distributed` so that all hosts form one mesh.

Errors print as one message: exit status 2 for a wrong command line (a flag, the config file, an option
after the colon, an override), 1 for a run that stopped on a check of ours (a missing input, an untrained
stage). Any other exception is a bug and keeps its traceback; `SYNTH_TRACEBACK=1` prints the traceback of
every error.
"""

import logging
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with options: configs/x.py:stage=...", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    None,
    "Call jax.distributed.initialize(). Default: when a cluster environment (SLURM, "
    "JAX_COORDINATOR_ADDRESS, ...) is detected.",
)
flags.mark_flags_as_required(["config", "workdir"])

_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_ID")
_USAGE_STATUS = 2
_USAGE_HINT = "python launch.py --helpshort lists the flags"
# How ml_collections.config_flags starts the text of an error raised in a config file's get_config.
_CONFIG_ERROR_PREFIX = "Error whilst parsing config file"


def _usage_error(message, error=None):
    """Report a wrong command line and exit with status 2."""
    from data_builders.__main__ import report_error

    report_error(message, error, hint=_USAGE_HINT)
    sys.exit(_USAGE_STATUS)


def _chain(error):
    """`error` and the exceptions it was raised from or while handling, outermost first."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _config_arg(argv):
    """The value of `--config` in `argv` (the file and its options), or None."""
    for i, arg in enumerate(argv):
        if re.match(r"--?config=", arg):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _override_failure(error):
    """The override (`synthesis.trian.num_steps`) whose key ml_collections failed to find, or None.

    An override's path is walked by `ml_collections.config_flags.config_path`; the outermost of its frames
    holds the whole path. An exception that never passed through that module did not come from an override.
    """
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_filename.endswith(os.path.join("config_flags", "config_path.py")):
            path = frame.f_locals.get("override", frame.f_locals.get("config_path"))
            return path if isinstance(path, str) else "?"
        tb = tb.tb_next
    return None


def _override_message(path, error):
    """`--config.a.b: the config has no key 'b' (did you mean "c"?)` or the error for the override."""
    for e in _chain(error):
        if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str):
            key, _, rest = e.args[0].partition("\n")
            guess = re.search(r'Did you mean "(.+?)"', rest)
            hint = f' (did you mean "{guess.group(1)}"?)' if guess else ""
            return f"--config.{path}: the config has no key {key}{hint}; overrides set existing keys only"
    return f"--config.{path}: cannot apply this override: {type(error).__name__}: {error}"


def _config_load_message(argv, error):
    """The message for a config file that failed to load (ml_collections defers that error), or None."""
    value = _config_arg(argv) or ""
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
        return f"--config={value}: no config file {path!r} (relative to {os.getcwd()})"
    from data_builders.__main__ import raised_on_purpose

    cause = next((e for e in _chain(error) if raised_on_purpose(e)), None)
    return None if cause is None else f"--config={value}: {cause}"


def _parse_flags(argv):
    """Parse the flags as absl does, with each way a command line can be wrong reported as one message.

    ml_collections reports an error raised in `get_config` (an unknown option or stage) as a flag error
    with the whole traceback in its text, an override of a missing key as a bare KeyError/AttributeError,
    and a config file that does not load as an OSError on first use. Exceptions that are none of these
    and were not raised on purpose (a bug in a config file) propagate with their traceback.
    """
    from data_builders.__main__ import raised_on_purpose

    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.get("stage")  # A config file that failed to load raises its error on first use.
    except flags.Error as e:
        # A ValueError/TypeError from get_config: ml_collections re-raises it with its traceback in the
        # text, absl wraps that in a flag error; the original is what the re-raise was handling.
        wrapper = next((x for x in _chain(e) if str(x).startswith(_CONFIG_ERROR_PREFIX)), None)
        if wrapper is None:
            _usage_error(str(e), e)
        original = wrapper.__context__
        if original is None or not raised_on_purpose(original):
            raise
        _usage_error(f"--config={_config_arg(argv)}: {original}", e)
    except OSError as e:
        message = _config_load_message(argv, e)
        if message is None:
            raise
        _usage_error(message, e)
    except Exception as e:
        path = _override_failure(e)
        if path is not None:
            _usage_error(_override_message(path, e), e)
        if not raised_on_purpose(e):
            raise
        _usage_error(f"--config={_config_arg(argv)}: {e}", e)
    if len(rest) > 1:
        _usage_error(f"unexpected arguments: {' '.join(rest[1:])}")
    return rest


def main(argv):
    del argv  # _parse_flags refuses positional arguments.
    distributed = _DISTRIBUTED.value
    if distributed is None:
        distributed = (
            any(k in os.environ for k in _CLUSTER_ENV)
            and int(os.environ.get("SLURM_NTASKS", os.environ.get("OMPI_COMM_WORLD_SIZE", "2"))) > 1
        )
    from synth import xla_defaults

    xla_defaults.apply()  # Before the backend starts.
    import jax

    xla_defaults.use_compilation_cache()  # Before the first compile.

    if distributed:
        jax.distributed.initialize()
    # Our progress at INFO; the libraries' (orbax logs every checkpoint at length) at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    # Progress from process 0 only; the others report warnings and errors.
    logging.getLogger("synth").setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    from data_builders.__main__ import raised_on_purpose, report_error
    from synth import pipeline

    try:
        pipeline.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except Exception as e:
        if not raised_on_purpose(e):
            raise
        report_error(str(e), e)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
