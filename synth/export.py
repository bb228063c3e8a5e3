"""Export BRATS-like examples (real or synthetic) as files: NIfTI with geometry, or PNG.

For people who want files rather than a TFDS dataset. Each example becomes one folder named after
its id (characters other than letters, digits, ``.``, ``-`` and ``_`` become ``_``, so
``train_subj0007/slice003`` gives ``train_subj0007_slice003``):

* NIfTI (`export_nifti`): ``<modality>.nii.gz`` per modality (float32) and ``label.nii.gz``
  (uint8), each a 3D image of one slice so that the full 3D spacing, origin and direction of the
  example are kept (a 2D image would drop z).
* PNG (`export_png`): ``<modality>.png`` (8-bit grey of [0, 1]), ``label.png`` (the raw class
  values, 8-bit grey: looks black, but reads back as the label) and ``label_colour.png`` (a colour
  rendering to look at). PNG has no geometry.

A folder is written under a temporary name (``.incomplete-*`` in the output folder) and renamed
into place only once every file is in it, so a folder named after an example is always complete. A
rerun skips folders that exist (``overwrite=True`` replaces them) and deletes temporary folders left
by an interrupted run; do not run two exports into the same folder at once.

From the shell, reading a built TFDS dataset without importing its builder code:

    python -m synth.export --data_dir ~/tensorflow_datasets --dataset phantom/tiny --format nifti --out out
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from synth import writer

FORMATS = ("nifti", "png")
_TMP_PREFIX = ".incomplete-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_VERSION_DIR = re.compile(r"^\d+\.\d+\.\d+$")


def safe_id(example_id: str | bytes) -> str:
    """A folder name for an example id: unsafe characters become ``_``.

    Args:
        example_id: the example's ``id`` (bytes as read from TFDS, or str).

    Returns:
        The id with every character other than ``A-Z a-z 0-9 . - _`` replaced by ``_``; a name
        that would be hidden or special (leading ``.``, empty) gets a leading ``_``.
    """
    text = example_id.decode("utf-8", "replace") if isinstance(example_id, bytes) else str(example_id)
    name = _UNSAFE.sub("_", text)
    # ".", ".." and hidden names would escape or hide; temporary folders start with "." too.
    return "_" + name if not name or name.startswith(".") else name


# --------------------------------------------------------------------------------------------------
# Writing one example.


def _checked(example: Mapping[str, Any], modalities: Sequence[str]) -> tuple[str, np.ndarray, np.ndarray]:
    """(id, image (H, W, K) float32, label (H, W) uint8) of an example, or ValueError naming it."""
    example_id = example["id"]
    example_id = example_id.decode("utf-8", "replace") if isinstance(example_id, bytes) else str(example_id)
    image = np.asarray(example["image"], np.float32)
    label = np.asarray(example["label"])
    if image.ndim == 2 and len(modalities) == 1:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] != len(modalities):
        raise ValueError(
            f"Example {example_id!r}: image of shape {image.shape} does not hold the {len(modalities)} "
            f"modalities {list(modalities)} as (H, W, K)"
        )
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"Example {example_id!r}: label of shape {label.shape} for an image of {image.shape}"
        )
    return example_id, image, label.astype(np.uint8)


def _write_nifti(folder: str, example: Mapping[str, Any], modalities: Sequence[str], **_: Any) -> None:
    import SimpleITK as sitk  # Only this format needs it.

    _, image, label = _checked(example, modalities)
    spacing = [float(v) for v in np.asarray(example["spacing"], np.float64).reshape(3)]
    origin = [float(v) for v in np.asarray(example["origin"], np.float64).reshape(3)]
    direction = [float(v) for v in np.asarray(example["direction"], np.float64).reshape(9)]

    def write(pixels: np.ndarray, name: str) -> None:
        # (1, H, W) -> a 3D image of size (W, H, 1): z keeps its spacing, origin and direction.
        volume = sitk.GetImageFromArray(np.ascontiguousarray(pixels[None]))
        volume.SetSpacing(spacing)
        volume.SetOrigin(origin)
        volume.SetDirection(direction)
        sitk.WriteImage(volume, os.path.join(folder, f"{name}.nii.gz"), useCompression=True)

    for k, modality in enumerate(modalities):
        write(image[..., k], modality)
    write(label, "label")


def _write_png(
    folder: str, example: Mapping[str, Any], modalities: Sequence[str], *, num_classes: int, **_: Any
) -> None:
    from PIL import Image

    _, image, label = _checked(example, modalities)
    for k, modality in enumerate(modalities):
        Image.fromarray(writer.to_uint8(image[..., k])[..., 0]).save(os.path.join(folder, f"{modality}.png"))
    Image.fromarray(label).save(os.path.join(folder, "label.png"))
    colours = writer.to_uint8(writer.label_colours(label, num_classes))
    Image.fromarray(colours).save(os.path.join(folder, "label_colour.png"))


# --------------------------------------------------------------------------------------------------
# The export loop.


def _clean_leftovers(out_dir: str) -> int:
    """Delete temporary folders of an earlier, interrupted export; returns how many."""
    stale = [e.path for e in os.scandir(out_dir) if e.is_dir() and e.name.startswith(_TMP_PREFIX)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def _make_tmp_dir(out_dir: str, name: str) -> str:
    """A new temporary folder in `out_dir`; unlike `tempfile.mkdtemp` (0700) it honours the umask."""
    while True:
        path = os.path.join(out_dir, f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _check_modalities(modalities: Sequence[str]) -> list[str]:
    modalities = [str(m) for m in modalities]
    if not modalities:
        raise ValueError("modalities must name at least one modality")
    bad = [m for m in modalities if safe_id(m) != m or m == "label" or m == "label_colour"]
    if bad or len(set(modalities)) != len(modalities):
        raise ValueError(
            f"modalities {modalities} must be distinct file-name-safe names (letters, digits, '.', '-', "
            "'_'), none of them 'label' or 'label_colour'"
        )
    return modalities


def _export(
    examples: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    write: Callable[..., None],
    *,
    modalities: Sequence[str],
    limit: int | None,
    overwrite: bool,
    **write_kwargs: Any,
) -> tuple[list[str], int]:
    """Writes each example's folder atomically; returns (folders of all examples, number skipped)."""
    modalities = _check_modalities(modalities)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _clean_leftovers(out_dir)
    folders: list[str] = []
    seen: dict[str, str] = {}
    skipped = 0
    for index, example in enumerate(examples):
        if limit is not None and index >= limit:
            break
        raw_id = example["id"]
        name = safe_id(raw_id)
        if name in seen:
            raise ValueError(f"Examples {seen[name]!r} and {raw_id!r} would both be written to {name}/")
        seen[name] = raw_id
        final = os.path.join(out_dir, name)
        folders.append(final)
        if os.path.isdir(final) and not overwrite:
            skipped += 1
            continue
        tmp = _make_tmp_dir(out_dir, name)
        try:
            write(tmp, example, modalities, **write_kwargs)
            if os.path.isdir(final):
                # Move the old folder aside first: `final` never holds a mix of old and new files.
                old = _make_tmp_dir(out_dir, f"old-{name}")
                os.replace(final, os.path.join(old, name))
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            # Also on Ctrl-C: no half-written folder stays behind (a killed process leaves only a
            # temporary folder, which the next run deletes).
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folders, skipped


def export_nifti(
    examples: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    modalities: Sequence[str],
    limit: int | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write each example as ``<out_dir>/<safe id>/{<modality>,label}.nii.gz`` with its geometry.

    Each file is a 3D SimpleITK image of one slice (array (1, H, W)) with the example's spacing
    (3,), origin (3,) and direction (3 × 3, row-major) set as they are, so reading it back gives
    them again (to float32 precision, as stored in the dataset).

    Args:
        examples: BRATS-like dicts (`data_builders.schema`) with ``id`` (str or bytes), ``image``
            (H, W, K) in [0, 1], ``label`` (H, W), ``spacing``, ``origin``, ``direction``.
        out_dir: output folder (created if needed).
        modalities: the K channel names of ``image``, in order; they name the files.
        limit: export at most this many examples (the first ones); None: all.
        overwrite: replace folders that exist (default: skip them as complete).

    Returns:
        The folders of the exported examples, in order (including ones skipped as complete).

    Raises:
        ValueError: an image without K channels, a label of another size, two ids with the same safe
            name, or bad modality names.
    """
    folders, _ = _export(
        examples, out_dir, _write_nifti, modalities=modalities, limit=limit, overwrite=overwrite
    )
    return folders


def export_png(
    examples: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    modalities: Sequence[str],
    num_classes: int,
    limit: int | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write each example as PNGs in ``<out_dir>/<safe id>/``.

    Files: ``<modality>.png`` (8-bit grey, `writer.to_uint8`), ``label.png`` (raw class values as
    8-bit grey) and ``label_colour.png`` (RGB, `writer.label_colours`).

    Args:
        examples: BRATS-like dicts, as for `export_nifti` (geometry is not used).
        out_dir: output folder (created if needed).
        modalities: the K channel names of ``image``, in order.
        num_classes: number of label values (for the colour rendering).
        limit: export at most this many examples; None: all.
        overwrite: replace folders that exist (default: skip them as complete).

    Returns:
        The folders of the exported examples, in order (including ones skipped as complete).

    Raises:
        ValueError: as `export_nifti`.
    """
    folders, _ = _export(
        examples,
        out_dir,
        _write_png,
        modalities=modalities,
        limit=limit,
        overwrite=overwrite,
        num_classes=num_classes,
    )
    return folders


# --------------------------------------------------------------------------------------------------
# Command line.


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m synth.export",
        description="Export a built BRATS-like TFDS dataset (real or synthetic) as NIfTI or PNG files.",
    )
    parser.add_argument("--data_dir", required=True, help="TFDS data directory the dataset was built in.")
    parser.add_argument("--dataset", required=True, help="NAME or NAME/CONFIG, e.g. phantom/tiny.")
    parser.add_argument("--split", default="train", help="Split (or TFDS slice, e.g. 'train[:10]').")
    parser.add_argument("--format", required=True, choices=FORMATS, help="Output format.")
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument("--limit", type=_positive_int, help="Export at most this many examples.")
    parser.add_argument(
        "--modalities", type=_names, help="Comma-separated channel names (default: the dataset's metadata)."
    )
    parser.add_argument(
        "--num_classes", type=_positive_int, help="Number of label values (default: the dataset's metadata)."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace example folders that exist.")
    return parser


def _find_built(data_dir: str, name: str) -> str:
    """Path of the newest built version of `name` in `data_dir`, or SystemExit saying where it looked."""
    root = os.path.join(data_dir, *name.split("/"))

    def versions(folder: str) -> list[str]:
        if not os.path.isdir(folder):
            return []
        found = [
            v
            for v in os.listdir(folder)
            if _VERSION_DIR.match(v) and os.path.isfile(os.path.join(folder, v, "dataset_info.json"))
        ]
        return sorted(found, key=lambda v: tuple(int(p) for p in v.split(".")))

    built = versions(root)
    if built:
        return os.path.join(root, built[-1])
    hint = ""
    if "/" not in name and os.path.isdir(root):
        configs = sorted(c for c in os.listdir(root) if versions(os.path.join(root, c)))
        if configs:
            hint = f" It has configs {', '.join(configs)}: pass --dataset {name}/{configs[0]} (for example)."
    raise SystemExit(
        f"error: dataset {name} is not built in --data_dir {data_dir}: looked for "
        f"{os.path.join(root, '<version>', 'dataset_info.json')} and found none.{hint}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    data_dir = os.path.expanduser(args.data_dir)
    if not os.path.isdir(data_dir):
        parser.error(f"argument --data_dir: {data_dir} is not a folder")
    name = args.dataset.strip("/")
    if not name or name.count("/") > 1 or ":" in name:
        parser.error(f"argument --dataset: expected NAME or NAME/CONFIG, got {args.dataset!r}")
    _find_built(data_dir, name)

    import tensorflow_datasets as tfds  # Slow to import: only once the arguments are good.

    builder = tfds.builder(name, data_dir=data_dir)
    metadata = dict(builder.info.metadata or {})
    splits = sorted(builder.info.splits.keys())
    if args.split.split("[")[0] not in splits:
        parser.error(f"argument --split: {name} has no split {args.split!r}; splits: {', '.join(splits)}")
    modalities = args.modalities or metadata.get("modalities")
    if not modalities:
        parser.error(f"argument --modalities: required, as {name} names no modalities in its metadata")
    num_classes = args.num_classes
    if num_classes is None and metadata.get("label_names"):
        num_classes = len(metadata["label_names"])
    if args.format == "png" and num_classes is None:
        parser.error(f"argument --num_classes: required, as {name} has no label_names in its metadata")

    # download=False: a dataset TFDS knows by the same name must never be fetched from the internet.
    source = tfds.data_source(name, split=args.split, data_dir=data_dir, download=False)
    count = len(source) if args.limit is None else min(len(source), args.limit)
    examples = (source[i] for i in range(count))
    try:
        if args.format == "nifti":
            folders, skipped = _export(
                examples, args.out, _write_nifti, modalities=modalities, limit=None, overwrite=args.overwrite
            )
        else:
            folders, skipped = _export(
                examples,
                args.out,
                _write_png,
                modalities=modalities,
                limit=None,
                overwrite=args.overwrite,
                num_classes=num_classes,
            )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(
        f"Exported {len(folders)} of {len(source)} examples of {name} [{args.split}] as {args.format} to "
        f"{args.out} ({len(folders) - skipped} written, {skipped} already complete)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
