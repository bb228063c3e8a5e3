"""Config helpers shared by every `configs/<dataset>.py` file.

A config file's `get_config(arg)` receives everything after the first colon of `--config=path.py:ARG`. The
argument is a comma-separated list of named options (`stage=segmentor,runlocal`), parsed here by
`parse_arg` so that every dataset config accepts them the same way and a mistyped option is an error that
names it. Everything else is an override on the command line (`--config.a.b=v`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

# The stages of the full pipeline, in the order `stage=all` runs them.
PIPELINE_STAGES = ("structure", "segmentor", "translator", "synthesis", "dataset", "verify")
# Stages run only when asked for by name: `compare` trains the baselines and ablations (§9) beside the method.
EXTRA_STAGES = ("compare",)
STAGE_CHOICES = ("all",) + PIPELINE_STAGES + EXTRA_STAGES


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `"a=1,b=x,flag"` into a ConfigDict, typed like `defaults`.

    Args:
      arg: the option string from `--config=file.py:ARG` (may be None or empty).
      **defaults: every accepted option with its default; the default's type sets how a value is parsed
        (a bare `flag` sets a bool option to True).

    Returns:
      A ConfigDict with one entry per option.

    Raises:
      ValueError: an option is not among `defaults`, or its value does not parse as the default's type.
    """
    options = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return options
    for raw in arg.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"Unknown config option {key!r} in {arg!r}; valid options are: {', '.join(sorted(defaults))}"
            )
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"Config option {key!r} needs a value ({key}=...)")
            options[key] = True
            continue
        options[key] = _parse_value(key, value.strip(), default)
    return options


def _parse_value(key: str, value: str, default: Any) -> Any:
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"Config option {key!r} expects a boolean, got {value!r}")
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"Config option {key!r} expects an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"Config option {key!r} expects a number, got {value!r}") from None
    return value


def check_choice(key: str, value: Any, choices) -> Any:
    """Returns `value` if it is one of `choices`, else raises a ValueError naming `config.<key>`."""
    if value not in choices:
        raise ValueError(f"Unknown config.{key} {value!r}; choose one of {tuple(choices)}")
    return value


def check_stage(stage: str) -> str:
    """Returns `stage` if it names a pipeline stage or `all`, else raises a ValueError naming it."""
    if stage not in STAGE_CHOICES:
        raise ValueError(f"Unknown stage={stage!r}; choose one of: {', '.join(STAGE_CHOICES)}")
    return stage


def default_data_dir() -> str:
    """Where built TFDS datasets live unless `config.data.data_dir` says otherwise."""
    return os.environ.get("SYNTH_DATA_DIR", os.path.abspath("data"))


def loop_config(
    *,
    num_steps: int,
    batch_size: int,
    log_every: int = 50,
    checkpoint_every: int = 500,
    eval_every: int = 500,
    keep_checkpoints: int = 3,
) -> ml_collections.ConfigDict:
    """The settings the shared training loop reads from every stage's `train` section.

    Args:
      num_steps: total optimisation steps of the stage.
      batch_size: global batch size (split over all devices of the `data` mesh axis).
      log_every: fetch metrics from the device, print progress and write them every this many steps.
      checkpoint_every: save a checkpoint every this many steps (and always at the end).
      eval_every: run the stage's evaluators and write sample grids every this many steps (and at the end).
      keep_checkpoints: how many of the latest checkpoints to keep.

    Returns:
      A ConfigDict with these fields.
    """
    return ml_collections.ConfigDict(
        dict(
            num_steps=num_steps,
            batch_size=batch_size,
            log_every=log_every,
            checkpoint_every=checkpoint_every,
            eval_every=eval_every,
            keep_checkpoints=keep_checkpoints,
        )
    )


def adam_config(learning_rate: float, *, b1: float = 0.5, b2: float = 0.999, eps: float = 1e-8):
    """An optimiser section: Adam with the method's betas (§1) unless overridden."""
    return ml_collections.ConfigDict(
        dict(name="adam", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, grad_clip_norm=0.0)
    )


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any] | Sequence) -> None:
    """Sets every `dotted.key -> value` of `overrides` (a mapping or `(key, value)` pairs) in `config`.

    Raises:
      KeyError: a key that `config` does not have, naming it (an override never adds a setting).
    """
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for key, value in items:
        *path, leaf = key.split(".")
        section = config
        for part in path:
            section = section[part]
        if leaf not in section:
            raise KeyError(f"Override {key!r}: config.{key} does not exist")
        section[leaf] = tuple(value) if isinstance(value, list) else value


def apply_variant(
    config: ml_collections.ConfigDict, name: str, variants: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """`config` changed into variant `name` of the table `variants` (in place; also returned).

    Args:
      config: the method's config.
      name: a key of `variants`; recorded as `config.variant`.
      variants: variant name -> its overrides (see `apply_overrides`), e.g. the config's own
        `config.compare.variant_overrides`.

    Raises:
      ValueError: an unknown variant, naming the known ones.
    """
    if name not in variants:
        raise ValueError(f"Unknown variant={name!r}; choose one of {', '.join(variants)}")
    apply_overrides(config, variants[name])
    config.variant = name
    return config


def to_dict(config: ml_collections.ConfigDict | Mapping) -> dict:
    """A plain, JSON-ready dict of a (possibly locked) config."""
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_dict()
    return dict(config)
