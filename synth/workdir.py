"""What a run keeps in its workdir, read and written in one place.

    <workdir>/config.json                  the resolved config (`write_config`, `load_config`)
    <workdir>/<stage>/stage_config.json    what the stage's results depend on (`fingerprint`), checked on
                                           resume (`check_same_config`)
    <workdir>/<stage>/model.json           the input shape its networks were built for (`record_model`),
                                           so frozen consumers rebuild them without opening the data
    <workdir>/<stage>/done.json            written last: the stage is complete (`is_complete`, `done`)

Every JSON file is written atomically (`write_json`): a reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from synth import configlib, sharding

log = logging.getLogger("synth")

CONFIG_FILE = "config.json"
FINGERPRINT_FILE = "stage_config.json"
MODEL_FILE = "model.json"
DONE_FILE = "done.json"
# Loop settings that may change between a run and its resume; everything else in the stage's config must not.
RESUMABLE_KEYS = ("num_steps", "log_every", "checkpoint_every", "eval_every", "keep_checkpoints")


def stage_dir(workdir: str | os.PathLike, name: str) -> str:
    """`<workdir>/<name>`: where stage `name` keeps its files."""
    return os.path.join(os.fspath(workdir), name)


def write_json(path: str, payload: Any) -> None:
    """Writes `payload` as JSON atomically: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def read_json(path: str, default: Any = None) -> Any:
    """The JSON in `path`, or `default` when there is no such file."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------
# The config.


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the resolved config as `config.json`; keeps the previous one if it differs."""
    path = os.path.join(workdir, CONFIG_FILE)
    text = json.dumps(configlib.to_dict(config), indent=2, sort_keys=True, default=str)
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != text:
            backup = os.path.join(workdir, f"config.{int(os.path.getmtime(path))}.json")
            os.replace(path, backup)
            log.warning("Config differs from the previous run's; the old one is kept as %s", backup)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to `<workdir>/config.json`.

    Raises:
      FileNotFoundError: the workdir has no `config.json` (it was never run with `launch.py`).
    """
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: pass the run's config, or a workdir that launch.py (or "
            "synth.pipeline.train_and_evaluate) has run in"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


# --------------------------------------------------------------------------------------------------
# Fingerprints: what a stage's results depend on.


def fingerprint(
    name: str,
    config: ml_collections.ConfigDict,
    provenance: dict | None = None,
    *,
    resumable: Sequence[str] = (),
) -> dict:
    """What the results of stage `name` depend on: its config section, the data, the seed, what it froze.

    Args:
      name: the stage (its config section `config.<name>`).
      config: the whole config.
      provenance: what the stage's frozen networks came from (checkpoint steps), if any.
      resumable: keys of the section (besides the loop's `RESUMABLE_KEYS`) that may change on resume.
    """
    section = config[name].to_dict() if name in config else {}
    for key in RESUMABLE_KEYS:
        section.get("train", {}).pop(key, None)
    for key in resumable:
        section.pop(key, None)
    data = {k: config.data[k] for k in ("name", "builder_config", "train_split")}
    out = {"seed": config.seed, "data": data, name: section}
    if provenance:
        out["frozen"] = dict(provenance)
    return json.loads(json.dumps(out, default=str))


def check_same_config(name: str, out_dir: str, expected: dict) -> None:
    """Raises if `out_dir`'s `stage_config.json` differs from `expected`, naming every differing key."""
    saved = read_json(os.path.join(out_dir, FINGERPRINT_FILE))
    if saved is None:
        return
    diffs = sorted(diff(saved, expected))
    if diffs:
        raise ValueError(
            f"[{name}] the config differs from the one its checkpoints in {out_dir} were trained with: "
            + "; ".join(diffs)
            + ". Resume with the same settings, or use a new --workdir."
        )


def diff(old: Any, new: Any, prefix: str = "config") -> list[str]:
    """`"<key>: <old> -> <new>"` for every leaf where two nested dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += diff(old.get(key), new.get(key), f"{prefix}.{key}")
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def write_fingerprint(out_dir: str, value: dict) -> None:
    """Writes `stage_config.json` (process 0 only), creating the stage folder."""
    if sharding.is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, FINGERPRINT_FILE), value)


# --------------------------------------------------------------------------------------------------
# Done markers.


def done(out_dir: str, payload: dict) -> None:
    """Marks the stage in `out_dir` complete (process 0 only): `done.json` with `payload`."""
    if sharding.is_main_process():
        write_json(os.path.join(out_dir, DONE_FILE), payload)


def done_with(out_dir: str, key: str, at_least: int) -> bool:
    """True when `done.json` says `key` reached `at_least` (process 0 decides for all processes)."""
    record = read_json(os.path.join(out_dir, DONE_FILE), {})
    return sharding.agree(record.get(key, -1) >= at_least)


def is_complete(workdir: str | os.PathLike, name: str, num_steps: int) -> bool:
    """True when stage `name` has a `done.json` for at least `num_steps` steps."""
    return done_with(stage_dir(workdir, name), "step", num_steps)


# --------------------------------------------------------------------------------------------------
# Model records: the input shape a stage's networks were built for.


def record_model(out_dir: str, image_shape: Sequence[int]) -> None:
    """Writes `model.json`: the (H, W, channels) of the images the stage's networks were built for."""
    if sharding.is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, MODEL_FILE), {"image_shape": [int(v) for v in image_shape]})


def recorded_image_shape(workdir: str | os.PathLike, name: str) -> tuple[int, ...] | None:
    """The (H, W, channels) recorded for stage `name`, or None for a workdir from before the record."""
    record = read_json(os.path.join(stage_dir(workdir, name), MODEL_FILE))
    return None if record is None else tuple(int(v) for v in record["image_shape"])
