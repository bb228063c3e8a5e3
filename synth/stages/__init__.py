"""The pipeline's stages, by name, in the order `stage=all` runs them.

Each built stage is a module with `run(config, workdir, *, stop_at=None)`. The mapping is explicit (no
registration by import side effects); a stage that is named but not built yet raises a clear error.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from synth.configlib import EXTRA_STAGES, PIPELINE_STAGES

# Stage name -> module. Stages of the method that are not listed here are not built yet.
BUILT_STAGES = {
    "structure": "synth.stages.structure",
    "segmentor": "synth.stages.segmentor",
    "translator": "synth.stages.translator",
    "synthesis": "synth.stages.synthesis",
    "dataset": "synth.stages.dataset",
    "verify": "synth.stages.verify",
    "compare": "synth.stages.compare",
}

# Where each unbuilt stage is tracked, for the error message.
_PLANNED = {}


class StageNotBuiltError(RuntimeError):
    """A stage of the method that this version of synth does not implement yet."""


def is_built(name: str) -> bool:
    return name in BUILT_STAGES


def get(name: str) -> ModuleType:
    """Imports the module of stage `name`.

    Raises:
      ValueError: `name` is not a stage of the pipeline.
      StageNotBuiltError: `name` is a stage of the method that is not built yet.
    """
    if name not in PIPELINE_STAGES + EXTRA_STAGES:
        raise ValueError(
            f"Unknown stage {name!r}; the stages are: {', '.join(PIPELINE_STAGES + EXTRA_STAGES)}"
        )
    if name not in BUILT_STAGES:
        raise StageNotBuiltError(
            f"Stage {name!r} ({_PLANNED.get(name, name)}) is not built yet. "
            f"Built stages: {', '.join(BUILT_STAGES)}; stage=all runs those."
        )
    return importlib.import_module(BUILT_STAGES[name])
