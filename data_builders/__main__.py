"""Command line: build the project's datasets as array_record files, or list them (no TensorFlow).

    python -m data_builders build phantom/demo --data_dir=/data/tfds
    python -m data_builders build phantom/tiny --data_dir=/tmp/tfds --set image_size=48 --set seed=3
    python -m data_builders build brats2015 --data_dir=/data/tfds --manual_dir=/data/raw/brats2015
    python -m data_builders build phantom/tiny --data_dir=/tmp/tfds --overwrite
    python -m data_builders list

`build` is a no-op (apart from the summary) if the config is already built, unless `--overwrite`.
It prints a progress bar over the generated examples and then a summary: split sizes and the path.
Exit status: 0 on success, 2 on bad input (unknown dataset, config or override, bad flag), 1 if the
build itself fails.

Errors print as one message (`error: ...`) when this project's code raised them on purpose (a check that
names the file or the value: a missing manual directory, an undecodable image); any other exception keeps
its traceback, as a bug should. `SYNTH_TRACEBACK=1` prints the traceback for every error. `launch.py`
reports its errors the same way, with `report_error` below.
"""

from __future__ import annotations

import argparse
import dataclasses
import linecache
import os
import pathlib
import sys
import time
import traceback
from collections.abc import Sequence

import data_builders

TRACEBACK_ENV = "SYNTH_TRACEBACK"
# The project's packages: an exception raised by a `raise` statement in one of them is a check with a
# message written for the user. Found from this file, so it holds for an editable and an installed copy.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
_OWN_PACKAGES = frozenset({"synth", "configs", "data_builders"})


def raised_on_purpose(error: BaseException) -> bool:
    """Whether `error` was raised by a `raise` statement of this project's own code.

    Such errors (`ValueError("Unknown stage 'x'")`, `FileNotFoundError("... the manual-download directory
    ...")`) are checks whose message says what to fix, so the message alone is enough. Anything else, an
    exception from a library or from the interpreter (a `TypeError` in our code, an `AssertionError`), is
    taken for a bug and keeps its traceback.
    """
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = pathlib.Path(tb.tb_frame.f_code.co_filename).resolve()
    if not path.is_relative_to(_ROOT) or path.relative_to(_ROOT).parts[0] not in _OWN_PACKAGES:
        return False
    return linecache.getline(str(path), tb.tb_lineno).lstrip().startswith("raise ")


def show_traceback() -> bool:
    """Whether `SYNTH_TRACEBACK` asks for full tracebacks (set and not "0")."""
    return os.environ.get(TRACEBACK_ENV, "0") not in ("", "0")


def report_error(message: str, error: BaseException | None = None, hint: str = "") -> None:
    """Print `error: <message>` to stderr; before it, `error`'s traceback if `SYNTH_TRACEBACK` is set."""
    if error is not None and show_traceback():
        traceback.print_exception(error)
    print(f"error: {message}", file=sys.stderr)
    notes = [hint] if hint else []
    if error is not None and not show_traceback():
        notes.append(f"{TRACEBACK_ENV}=1 prints the traceback")
    if notes:
        print(f"({'; '.join(notes)})", file=sys.stderr)


def _parse_sets(items: Sequence[str]) -> dict[str, str]:
    """Parse `["image_size=48"]` into `{"image_size": "48"}` (the API converts the types)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Bad --set {item!r}: expected KEY=VALUE, e.g. --set image_size=48.")
        overrides[key.strip()] = value.strip()
    return overrides


def _summary(builder, seconds: float | None) -> str:
    """Split sizes, where the files are, and how to open them."""
    info = builder.info
    name = info.name + (f"/{builder.builder_config.name}" if builder.builder_config else "")
    when = f"built in {seconds:.1f} s" if seconds is not None else "already built (use --overwrite)"
    lines = [f"{name} {info.version}: {when}", f"  path: {builder.data_path}"]
    total = 0
    for split, split_info in info.splits.items():
        lines.append(f"  {split:<12} {split_info.num_examples:>8} examples")
        total += split_info.num_examples
    lines.append(f"  {'total':<12} {total:>8} examples, {info.dataset_size}")
    lines.append(
        f'  open with: data_builders.data_source("{name}", "train", data_dir="{builder.data_dir_root}")'
    )
    return "\n".join(lines)


def _list() -> str:
    """Every dataset, its configs and the fields that `--set` can change."""
    lines = []
    for dataset in sorted(data_builders.BUILDERS):
        cls = data_builders.builder_class(dataset)
        lines.append(f"{dataset} (version {cls.VERSION})")
        for i, config in enumerate(cls.BUILDER_CONFIGS):
            default = " [default]" if i == 0 else ""
            lines.append(f"  {dataset}/{config.name}{default}: {config.description or ''}")
        if cls.BUILDER_CONFIGS and dataclasses.is_dataclass(cls.BUILDER_CONFIGS[0]):
            base = cls.BUILDER_CONFIGS[0]
            fields = [
                f"{f.name}={getattr(base, f.name)!r}"
                for f in dataclasses.fields(base)
                if f.name not in data_builders._BASE_CONFIG_FIELDS  # noqa: SLF001
            ]
            if fields:
                lines.append(f"  --set fields (defaults of {base.name}): {', '.join(fields)}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_builders", description="Build or list the project's TFDS datasets."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a dataset config as array_record files")
    build.add_argument("name", help="dataset or dataset/config, e.g. phantom/demo")
    build.add_argument("--data_dir", required=True, help="TFDS data directory to build into")
    build.add_argument("--manual_dir", default=None, help="manually downloaded source files")
    build.add_argument("--overwrite", action="store_true", help="delete and rebuild if built")
    build.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable), e.g. --set image_size=48",
    )
    build.add_argument("--no_progress", action="store_true", help="no progress bar")
    commands.add_parser("list", help="list datasets, configs and overridable fields")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "list":
        print(_list())
        return 0
    import tensorflow_datasets as tfds

    try:
        overrides = _parse_sets(args.sets)
        builder = data_builders.get_builder(args.name, data_dir=args.data_dir, **overrides)
    except ValueError as e:
        if not raised_on_purpose(e):
            raise
        report_error(str(e), e)
        return 2
    if builder.data_path.exists() and builder.is_prepared() and not args.overwrite:
        print(_summary(builder, None))
        return 0
    # One bar over all examples replaces TFDS's per-split bars, which have no total.
    tfds.disable_progress_bar()
    start = time.perf_counter()
    try:
        builder = data_builders.build(
            args.name,
            data_dir=args.data_dir,
            manual_dir=args.manual_dir,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            **overrides,
        )
    except Exception as e:  # noqa: BLE001 - any build failure becomes a message and a status.
        if raised_on_purpose(e):
            report_error(f"building {args.name} failed: {e}", e)
        else:  # A bug or a library's failure: its traceback, whatever SYNTH_TRACEBACK says.
            traceback.print_exc()
            print(f"error: building {args.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(_summary(builder, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
