"""The project's TFDS builders and the API that builds and opens them (array_record, no TensorFlow).

Datasets are named like TFDS ones: `"phantom"`, or `"phantom/tiny"` for a config. Builders are
listed in `BUILDERS` (name -> module path) and imported only when asked for, so importing this
package registers nothing with TFDS.

    import data_builders

    data_builders.build("phantom/demo", data_dir="/data/tfds")            # no-op if already built
    source = data_builders.data_source("phantom/demo", "train", data_dir="/data/tfds")
    example = source[0]                                                    # dict of numpy arrays

    # A variant of a config: overrides make a new, deterministically named config
    # ("tiny_image_size48"), built into its own directory.
    data_builders.build("phantom/tiny", data_dir="/tmp/tfds", image_size=48)

The same from the shell (see `data_builders/__main__.py`):

    python -m data_builders build phantom/demo --data_dir=/data/tfds
    python -m data_builders list
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import numbers
import os
from collections.abc import Iterable, Iterator
from typing import Any

import tensorflow_datasets as tfds

# Dataset name -> module defining `Builder`, TFDS package-style:
# data_builders/<name>/<name>_dataset_builder.py.
BUILDERS: dict[str, str] = {
    "phantom": "data_builders.phantom.phantom_dataset_builder",
    "brats2015": "data_builders.brats2015.brats2015_dataset_builder",
    "chest_xray": "data_builders.chest_xray.chest_xray_dataset_builder",
    "lung_ct": "data_builders.lung_ct.lung_ct_dataset_builder",
    "drive": "data_builders.drive.drive_dataset_builder",
    "fire": "data_builders.fire.fire_dataset_builder",
    "tianchi_lung_ct": "data_builders.tianchi_lung_ct.tianchi_lung_ct_dataset_builder",
    "synthetic": "data_builders.synthetic.synthetic_dataset_builder",
}
FILE_FORMAT = "array_record"

PathLike = str | os.PathLike
log = logging.getLogger(__name__)

# Fields every BuilderConfig has; they are not generation parameters and cannot be overridden.
_BASE_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(tfds.core.BuilderConfig))

__all__ = [
    "BUILDERS",
    "FILE_FORMAT",
    "build",
    "builder_class",
    "data_source",
    "get_builder",
    "is_built",
]


def builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
    """Import and return the `Builder` class of dataset `name` (without a config part).

    Args:
      name: a key of `BUILDERS`, e.g. `"phantom"`.

    Returns:
      The builder class.

    Raises:
      ValueError: `name` is not a known dataset.
    """
    if name not in BUILDERS:
        raise ValueError(f"Unknown dataset {name!r}. Valid datasets: {', '.join(sorted(BUILDERS))}.")
    return importlib.import_module(BUILDERS[name]).Builder


def _split_name(name: str, config: str | None) -> tuple[str, str | None]:
    """Split `"phantom/tiny"` into `("phantom", "tiny")`; check that `config` agrees with it."""
    dataset, _, from_name = name.partition("/")
    if ":" in name or "/" in from_name:
        raise ValueError(
            f"Bad dataset name {name!r}: expected 'dataset' or 'dataset/config' "
            "(versions are not selectable)."
        )
    if from_name and config and from_name != config:
        raise ValueError(f"Dataset name {name!r} names config {from_name!r} but config={config!r}.")
    return dataset, from_name or config or None


def _coerce(field: str, value: Any, default: Any) -> Any:
    """Return `value` as the type of the field's default, parsing command-line strings.

    Raises:
      ValueError: the value is not of (or cannot be parsed as) the default's type.
    """
    kind = type(default)
    try:
        if isinstance(value, str) and kind is not str:
            if kind is bool and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if kind in (int, float):
                return kind(value)
        elif kind is bool and isinstance(value, bool):
            return value
        elif kind in (int, float) and isinstance(value, numbers.Real) and not isinstance(value, bool):
            if kind is float or float(value).is_integer():
                return kind(value)
        elif isinstance(value, kind):
            return value
    except ValueError:
        pass
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    expected = kinds.get(kind, f"a {kind.__name__}")
    raise ValueError(f"Override {field}={value!r}: expected {expected}.")


def _resolve_config(
    cls: type[tfds.core.DatasetBuilder], dataset: str, config: str | None, overrides: dict[str, Any]
) -> tfds.core.BuilderConfig | None:
    """Return the named (or default) config, or a new config derived from it by `overrides`."""
    configs = {c.name: c for c in cls.BUILDER_CONFIGS}
    if config is None:
        base = cls.BUILDER_CONFIGS[0] if cls.BUILDER_CONFIGS else None
    elif config in configs:
        base = configs[config]
    else:
        valid = ", ".join(f"{dataset}/{c}" for c in configs) or f"(none: {dataset} has no configs)"
        raise ValueError(f"Unknown config {config!r} of dataset {dataset!r}. Valid configs: {valid}.")
    if not overrides:
        return base
    fields = (
        [f.name for f in dataclasses.fields(base) if f.name not in _BASE_CONFIG_FIELDS]
        if base is not None
        else []
    )
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"Unknown override {', '.join(map(repr, unknown))} for "
            f"{dataset}/{base.name if base else ''}. Valid fields: {', '.join(fields) or '(none)'}."
        )
    changed = {}
    for field, value in sorted(overrides.items()):
        value = _coerce(field, value, getattr(base, field))
        if value != getattr(base, field):
            changed[field] = value
    if not changed:
        return base
    # The name is a pure function of the base config and the changes, so the same overrides find the
    # same directory again.
    name = "_".join([base.name] + [f"{k}{v}" for k, v in changed.items()])
    described = ", ".join(f"{k}={v}" for k, v in changed.items())
    return dataclasses.replace(
        base, name=name, description=f"{base.description} Overrides: {described}.", **changed
    )


def get_builder(
    name: str,
    *,
    data_dir: PathLike | None,
    config: str | None = None,
    **config_overrides: Any,
) -> tfds.core.DatasetBuilder:
    """Return the builder of a dataset config, reading its info from `data_dir` if already built.

    Args:
      name: dataset name, optionally with a config: `"phantom"` or `"phantom/tiny"`.
      data_dir: TFDS data directory (the dataset goes to `data_dir/name/config/version`); None uses
        TFDS's default (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
      config: config name, if not given in `name`; default: the builder's first config.
      **config_overrides: config fields to change, e.g. `image_size=48`; they make a new config
        named after the base config and the changes (`tiny_image_size48`). Strings are converted to
        the field's type, so command-line values can be passed as they are.

    Returns:
      A `tfds.core.DatasetBuilder` that writes and reads array_record files.

    Raises:
      ValueError: unknown dataset, config or override field, or a value of the wrong type.
    """
    dataset, config = _split_name(name, config)
    cls = builder_class(dataset)
    builder_config = _resolve_config(cls, dataset, config, config_overrides)
    kwargs: dict[str, Any] = {"data_dir": os.fspath(data_dir) if data_dir is not None else None}
    if builder_config is not None:
        # A registered config goes by name: a builder (or data source) pickled into grain's worker
        # processes is rebuilt from these kwargs, and TFDS refuses a config object named like a
        # registered one.
        registered = any(builder_config is c for c in cls.BUILDER_CONFIGS)
        kwargs["config"] = builder_config.name if registered else builder_config
    return cls(file_format=FILE_FORMAT, **kwargs)


def is_built(
    name: str, *, data_dir: PathLike | None, config: str | None = None, **config_overrides: Any
) -> bool:
    """Whether the dataset config is fully built in `data_dir` (same arguments as `get_builder`).

    An interrupted build leaves at most an `incomplete.*` directory, which does not count.
    """
    return _is_prepared(get_builder(name, data_dir=data_dir, config=config, **config_overrides))


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    # Checking existence first spares TFDS's warning about a folder without dataset_info.json.
    return builder.data_path.exists() and builder.is_prepared()


def _stale_incomplete_dirs(builder: tfds.core.DatasetBuilder) -> list[str]:
    """`incomplete.*` siblings of the version directory, left by builds killed without clean-up."""
    parent = builder.data_path.parent
    if not parent.exists():
        return []
    suffix = f"_{builder.version}"
    return sorted(
        os.fspath(p) for p in parent.iterdir() if p.name.startswith("incomplete.") and p.name.endswith(suffix)
    )


def _with_progress(builder: tfds.core.DatasetBuilder, description: str) -> None:
    """Make `builder` show one tqdm bar over all the examples it generates."""
    from tqdm import auto as tqdm  # Only the command line wants a bar.

    config = builder.builder_config
    original = builder._split_generators  # noqa: SLF001 - TFDS has no progress hook.

    def split_generators(dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        generators = original(dl_manager)
        if not isinstance(generators, dict):  # Legacy list of SplitGenerator: leave it alone.
            return generators
        total = None
        if config is not None and hasattr(config, "num_examples"):
            total = sum(config.num_examples(split) for split in generators)
        bar = tqdm.tqdm(total=total, desc=description, unit=" examples", dynamic_ncols=True)
        pending = set(generators)  # TFDS consumes the splits one after the other.

        def counted(split: str, examples: Iterable[Any]) -> Iterator[Any]:
            bar.set_postfix_str(split)
            for example in examples:
                yield example
                bar.update()
            pending.discard(split)
            if not pending:
                bar.close()

        return {split: counted(split, gen) for split, gen in generators.items()}

    # An instance attribute shadows the method for this builder only.
    builder._split_generators = split_generators  # noqa: SLF001


def build(
    name: str,
    *,
    data_dir: PathLike | None,
    config: str | None = None,
    manual_dir: PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    **config_overrides: Any,
) -> tfds.core.DatasetBuilder:
    """Build a dataset config as array_record files, unless it is already built.

    The files are written to a temporary `incomplete.XXXXXX_<version>` directory that TFDS renames
    to `<version>` only once every split is written; if generation raises (or is interrupted with
    Ctrl-C), TFDS deletes it, and a killed process leaves only that `incomplete.*` directory, which
    never counts as built (it is reported here and can be deleted). With `overwrite=True`, TFDS
    deletes the existing build before generating the new one.

    Args:
      name: dataset name, optionally with a config, e.g. `"phantom/tiny"`.
      data_dir: TFDS data directory to build into (None: TFDS's default).
      config: config name, if not given in `name`.
      manual_dir: directory holding manually downloaded source files (for builders that need them).
      overwrite: delete an existing build of this config and build it again.
      progress: show a tqdm bar over the generated examples (TFDS's own per-split bars stay as they
        are; `tfds.disable_progress_bar()` turns those off).
      **config_overrides: config fields to change (see `get_builder`).

    Returns:
      The prepared builder: `builder.as_data_source(split)` opens a split.

    Raises:
      ValueError: unknown dataset, config or override.
    """
    builder = get_builder(name, data_dir=data_dir, config=config, **config_overrides)
    if _is_prepared(builder) and not overwrite:
        log.info("%s is already built in %s", builder.info.full_name, builder.data_dir)
        return builder
    stale = _stale_incomplete_dirs(builder)
    if stale:
        log.warning(
            "Directories of interrupted builds (safe to delete unless a build is running): %s",
            ", ".join(stale),
        )
    if progress:
        _with_progress(builder, f"Building {builder.info.full_name}")
    mode = (
        tfds.download.GenerateMode.FORCE_REDOWNLOAD
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir is not None else None,
        download_mode=mode,
    )
    builder.download_and_prepare(download_config=download_config)
    return builder


def data_source(
    name: str,
    split: str,
    *,
    data_dir: PathLike | None,
    config: str | None = None,
    **config_overrides: Any,
) -> Any:
    """Open one split of a built dataset as a random-access source (`len`, `[i]`, `__getitems__`).

    Args:
      name: dataset name, optionally with a config, e.g. `"phantom/tiny"`.
      split: split name or TFDS slice, e.g. `"train"` or `"train[:80%]"`.
      data_dir: TFDS data directory the dataset was built into.
      config: config name, if not given in `name`.
      **config_overrides: config fields that were changed at build time (see `get_builder`).

    Returns:
      A TFDS `ArrayRecordDataSource`; each item is a dict of numpy arrays and bytes (see
      `data_builders.schema`).

    Raises:
      FileNotFoundError: the dataset config is not built in `data_dir`; the message gives the
        command that builds it.
      ValueError: unknown dataset, config or override.
    """
    builder = get_builder(name, data_dir=data_dir, config=config, **config_overrides)
    if not _is_prepared(builder):
        dataset, base = _split_name(name, config)
        full = f"{dataset}/{builder.builder_config.name}" if builder.builder_config else dataset
        if base is None and builder.BUILDER_CONFIGS:
            base = builder.BUILDER_CONFIGS[0].name
        target = f"{dataset}/{base}" if base else dataset
        sets = "".join(f" --set {k}={v}" for k, v in sorted(config_overrides.items()))
        shown_dir = os.fspath(data_dir) if data_dir is not None else "<TFDS default data_dir>"
        raise FileNotFoundError(
            f"Dataset {full} (version {builder.version}) is not built in data_dir={shown_dir} "
            f"(looked for {builder.data_path}). Build it with:\n"
            f"  python -m data_builders build {target} --data_dir={shown_dir}{sets}"
        )
    return builder.as_data_source(split)
