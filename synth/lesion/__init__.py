"""Lesion processors: the networks of stage `segmentor`, one module per kind, chosen by the config.

`config.segmentor.task` names the kind (`TASKS`): "segment" (`synth.lesion.segment`: segmentors),
"classify" (`synth.lesion.classify`: the X-ray classifier) or "detect" (`synth.lesion.detect`: the
Tianchi SSD). Every kind module offers the same parts, so no stage branches on the kind:

  preprocess                         decoded example -> the arrays its step and evaluator read
  stage_parts(config, hw, channels)  stage `segmentor`'s init, train step and evaluation hooks
  abstract_params(config, shape)     the shapes of its trained parameters (frozen loading)
  processor(config, hw)              its `base.LesionProcessor` for stage B, stage C and compare
  scores(config)                     the downstream scores stage D tabulates

The common interface and shared helpers are `synth.lesion.base`.
"""

from __future__ import annotations

from types import ModuleType

import ml_collections

from synth import configlib
from synth.lesion import base, classify, detect, segment

# config.segmentor.task -> the kind's module. An explicit map: nothing registers itself on import.
KINDS: dict[str, ModuleType] = {"segment": segment, "classify": classify, "detect": detect}
TASKS = tuple(KINDS)
# config.synthesis.lesion_processor's name of each kind ("none": stage B has no lesion loss).
PROCESSOR_NAMES = {"segment": "segmentor", "classify": "classifier", "detect": "detector"}


def task(config: ml_collections.ConfigDict) -> str:
    """`config.segmentor.task`: "segment", "classify" (one class per image, X-ray) or "detect" (Tianchi)."""
    return configlib.check_choice("segmentor.task", config.segmentor.get("task", "segment"), TASKS)


def kind(config: ml_collections.ConfigDict) -> ModuleType:
    """The module of the config's lesion processor kind (see the module docstring)."""
    return KINDS[task(config)]


def processor(config: ml_collections.ConfigDict, image_hw) -> base.LesionProcessor:
    """The config's real-trained lesion processor (its parameters come from `synth.frozen`)."""
    return kind(config).processor(config, image_hw)
