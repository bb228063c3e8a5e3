"""`train_and_evaluate(config, workdir)`: runs the requested stage, or every built stage in order.

Each stage reads what the ones before it left in the workdir and is skipped when already complete, so
rerunning the same command resumes the pipeline where it stopped.
"""

from __future__ import annotations

import logging
import os

import ml_collections

from synth import configlib, report, sharding, stages
from synth import workdir as workdir_lib

log = logging.getLogger("synth")


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at: int | None = None
) -> list[str]:
    """Runs `config.stage` (or all built stages for `all`) in `workdir`.

    Args:
      config: the resolved config.
      workdir: the run directory; created if missing.
      stop_at: passed to each stage's loop (stop early with a checkpoint; for notebooks and tests).

    Returns:
      The names of the stages that ran (complete ones included).
    """
    workdir = os.path.abspath(os.fspath(workdir))
    stage = configlib.check_stage(config.stage)
    if stage == "all":
        names = []
        for name in configlib.PIPELINE_STAGES:
            if not stages.is_built(name):
                log.info("Stage %r is not built yet: skipped by stage=all", name)
                continue
            names.append(name)
    else:
        stages.get(stage)  # Fails early, naming the stage, if it is not built.
        names = [stage]
    # Written only once the request is known to be valid, so a bad one leaves the workdir untouched.
    if sharding.is_main_process():
        os.makedirs(workdir, exist_ok=True)
        workdir_lib.write_config(config, workdir)
    for name in names:
        module = stages.get(name)
        reason = module.skip_reason(config) if hasattr(module, "skip_reason") else None
        if reason is not None and stage == "all":
            log.info("=== stage %s: skipped (%s) ===", name, reason)
            continue
        log.info("=== stage %s ===", name)
        module.run(config, workdir, stop_at=stop_at)
    if sharding.is_main_process():
        path = report.write_report(workdir)
        log.info("Report: %s", path)
    return names
