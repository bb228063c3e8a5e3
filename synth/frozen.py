"""Trained networks of earlier stages, loaded frozen from a workdir; and which ones each consumer needs.

Loading a stage's parameters never rebuilds its training: the abstract parameter tree comes from
`jax.eval_shape` of the networks' init (`ABSTRACT_PARAMS`), for the image shape the stage recorded beside
its checkpoints when it started (`<workdir>/<stage>/model.json`), and orbax restores only those fields of
the checkpoint (`Checkpointer.restore_part`): no data is opened and no optimiser or evaluator is built;
the parameters are replicated on the consumer's mesh. A workdir from before the record falls back to
reading the image shape from the dataset (logged).

Which trained stages a consumer needs is declared once, here (`needs`): stage B's training, generation
(stage C and the notebooks) and the comparison of variants all ask it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import checkpoint as checkpoint_lib
from synth import (
    configlib,
    input_pipeline,
    lesion,
    sharding,
    structure_flow,
    structure_nets,
    synthesis_nets,
    translator_nets,
    workdir,
)

log = logging.getLogger("synth")

# Stage -> (config, image shape (H, W, C)) -> {field of its state: abstract subtree}.
ABSTRACT_PARAMS: dict[str, Callable[[ml_collections.ConfigDict, tuple], dict]] = {
    "structure": lambda config, shape: (
        structure_flow if structure_flow.is_flow(config) else structure_nets
    ).abstract_params(config, shape),
    "segmentor": lambda config, shape: {"params": lesion.kind(config).abstract_params(config, shape)},
    "translator": translator_nets.abstract_params,
    "synthesis": synthesis_nets.abstract_params,
}
# Consumers that need trained stages besides those stage B trains against (`stage_b_frozen`).
CONSUMERS = {
    "synthesis": (),  # Stage B's step: exactly its frozen networks.
    "generate": ("structure", "segmentor", "synthesis"),  # Stage A's sampler, the filter, G.
    "compare": ("segmentor",),  # The variants are scored by the real-trained segmentors.
}


def stage_b_frozen(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The earlier stages whose networks stage B trains against, in pipeline order."""
    names = []
    if synthesis_nets.uses_stage_a(config):
        names.append("structure")
    if synthesis_nets.uses_lesion_processor(config):
        names.append("segmentor")
    if synthesis_nets.uses_translator(config):
        names.append("translator")
    return tuple(names)


def needs(config: ml_collections.ConfigDict, consumer: str) -> tuple[str, ...]:
    """The trained stages `consumer` ("synthesis", "generate" or "compare") loads, in pipeline order.

    Every consumer needs what stage B was trained against (its provenance names them), plus its own.
    """
    if consumer not in CONSUMERS:
        raise ValueError(f"Unknown consumer {consumer!r}; choose one of {sorted(CONSUMERS)}")
    wanted = set(stage_b_frozen(config)) | set(CONSUMERS[consumer])
    return tuple(name for name in configlib.PIPELINE_STAGES if name in wanted)


def image_shape(config: ml_collections.ConfigDict, workdir_path: str | os.PathLike, stage: str) -> tuple:
    """(H, W, C) of the images stage `stage`'s networks were built for.

    Read from the stage's `model.json`; a workdir from before that record gives the dataset's own shape,
    which is what the stage was trained on (the GAN stages read the same size from `gan_extra`).
    """
    recorded = workdir.recorded_image_shape(workdir_path, stage)
    if recorded is not None:
        return recorded
    log.info(
        "[%s] %s has no %s (written by runs since the frozen-loading redesign): reading the image "
        "size from the dataset %s",
        stage,
        workdir.stage_dir(workdir_path, stage),
        workdir.MODEL_FILE,
        config.data.name,
    )
    source = input_pipeline.open_source(config.data, config.data.train_split)
    return tuple(np.asarray(source[0]["image"]).shape)


def checkpoint_dir(workdir_path: str | os.PathLike, stage: str) -> str:
    return os.path.join(workdir.stage_dir(workdir_path, stage), "checkpoints")


def load(
    config: ml_collections.ConfigDict,
    workdir_path: str | os.PathLike,
    stage: str,
    *,
    fields: Sequence[str] | None = None,
    mesh=None,
) -> tuple[dict[str, Any], int]:
    """The trained parameters of stage `stage` in `workdir_path`, replicated on the config's mesh.

    Args:
      config: the config the stage was trained with (its networks' definitions).
      workdir_path: the run's directory.
      stage: "structure", "segmentor", "translator" or "synthesis".
      fields: which parameter fields of the stage's state to restore (default: all of them, e.g.
        `g_params` and `d_params`).
      mesh: the mesh to replicate them on (default: the config's).

    Returns:
      `(params, step)`: {field: parameters} and the checkpoint's step.

    Raises:
      FileNotFoundError: the stage has no checkpoint in `workdir_path`, naming the stage to run first.
    """
    directory = checkpoint_dir(workdir_path, stage)
    with checkpoint_lib.Checkpointer(directory) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"No trained {stage} stage in {workdir_path}: run stage={stage} with this workdir first"
            )
        abstract = ABSTRACT_PARAMS[stage](config, image_shape(config, workdir_path, stage))
        if fields is not None:
            abstract = {name: abstract[name] for name in fields}
        abstract["step"] = jax.ShapeDtypeStruct((), jnp.int32)
        mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
        restored = ckpt.restore_part(checkpoint_lib.abstract_like(abstract, sharding.replicated(mesh)))
    step = int(jax.device_get(restored.pop("step")))
    return restored, step


def latest_step(workdir_path: str | os.PathLike, stage: str) -> int:
    """The step of stage `stage`'s latest checkpoint (its provenance), without restoring anything."""
    with checkpoint_lib.Checkpointer(checkpoint_dir(workdir_path, stage)) as ckpt:
        step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"No trained {stage} stage in {workdir_path}: run stage={stage} first")
    return int(step)


# What stage B's step and the generation read of each frozen stage, and under which name.
STAGE_B_FIELDS = {
    "structure": ("structure", "g_params"),
    "segmentor": ("lesion", "params"),
    "translator": ("translator", "g_params"),
}


def load_stage_b_frozen(
    config: ml_collections.ConfigDict, workdir_path: str | os.PathLike, *, mesh=None
) -> tuple[dict[str, Any], dict[str, int]]:
    """Stage B's frozen networks' parameters (`structure`, `lesion`, `translator`) and their provenance.

    The provenance (`<stage>_step` of each) is part of stage B's fingerprint: a resume after an earlier
    stage was retrained is refused.
    """
    frozen, provenance = {}, {}
    for stage in stage_b_frozen(config):
        name, field = STAGE_B_FIELDS[stage]
        params, step = load(config, workdir_path, stage, fields=(field,), mesh=mesh)
        frozen[name] = params[field]
        provenance[f"{stage}_step"] = step
    return frozen, provenance
