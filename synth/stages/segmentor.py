"""Stage `segmentor`: the lesion processors, trained on real images (METHOD §6.3, §6.4, §6.6).

They are frozen later and score lesions in synthetic images (stage B's lesion loss, stage C's filter) and
are stage D's downstream model. `config.segmentor.task` chooses the kind (`synth.lesion`): segmentors
("segment", the default: one U-Net per modality, a shared one, or a shared encoder with per-modality
decoders), the X-ray classifier ("classify") or the Tianchi SSD detector ("detect"). The kind supplies
its networks, train step and evaluation hooks; this module wires them into the shared loop.
"""

from __future__ import annotations

import os

import ml_collections

from synth import evaluation, input_pipeline, lesion, sharding, train
from synth.lesion import base

NAME = "segmentor"


def build(config: ml_collections.ConfigDict, mesh=None) -> train.StageSpec:
    """The stage's spec for the shared loop, with the networks of `config.segmentor.task`'s kind."""
    kind = lesion.kind(config)
    seg, data = config.segmentor, config.data
    source = input_pipeline.open_source(data, data.train_split)
    first = kind.preprocess(source[0])
    channels = base.check_channels(config, first["image"])
    parts = kind.stage_parts(config, first["image"].shape[:2], channels)
    mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    return train.StageSpec(
        name=NAME,
        train=seg.train,
        source=source,
        preprocess=kind.preprocess,
        init_state=parts.init_state,
        train_step=parts.train_step,
        evaluate=evaluation.make_evaluator(
            input_pipeline.open_source(data, data.eval_split),
            preprocess=kind.preprocess,
            batch_size=seg.train.batch_size,
            max_examples=data.eval_max_examples,
            mesh=mesh,
            hooks=parts.hooks,
        ),
    )


def scores(config: ml_collections.ConfigDict) -> tuple[tuple[str, str], ...]:
    """The (evaluator key, report heading) of the downstream scores stage D tabulates, main one first."""
    return lesion.kind(config).scores(config)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at=None):
    """Trains the lesion processors in `workdir/segmentor` unless already complete."""
    return train.run_unless_complete(NAME, build, config, workdir, stop_at=stop_at)
