"""Launches a synth run: `python launch.py --config configs/<dataset>.py[:options] --workdir <dir>`.

Options after the colon are named (`stage=segmentor,runlocal`); every other knob is an override such as
`--config.segmentor.train.num_steps=2000`, and a mistyped key is an error that names it. Rerunning with
the same workdir resumes. On a cluster, `--distributed` (or the usual cluster environment) starts
`jax.distributed` so that all hosts form one mesh.
"""

import logging
import os

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    distributed = _DISTRIBUTED.value
    if distributed is None:
        distributed = (
            any(k in os.environ for k in _CLUSTER_ENV)
            and int(os.environ.get("SLURM_NTASKS", os.environ.get("OMPI_COMM_WORLD_SIZE", "2"))) > 1
        )
    import jax

    if distributed:
        jax.distributed.initialize()
    # Our progress at INFO; the libraries' (orbax logs every checkpoint at length) at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    # Progress from process 0 only; the others report warnings and errors.
    logging.getLogger("synth").setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    from synth import pipeline

    pipeline.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
