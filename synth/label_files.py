"""Label maps a user brings to synthesise from (stage C's `labels_dir`, the synthesize notebook).

`load_user_labels` reads a folder of PNG, NIfTI, MHA/MHD or NRRD files, one such file, or numpy arrays, and
checks every map against the trained model (size, integer values in range) before anything is returned;
each error names the offending file. Whether the lesions lie inside the organ is a warning, not an
error: `synth.label_pool.check_user_placement`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

# File endings `load_user_labels` reads from a folder (matched case-insensitively). `.raw` and other
# companion files of `.mhd` headers are not label files themselves, so they are skipped.
LABEL_FILE_EXTENSIONS = (".png", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")


def _has_label_extension(path: str) -> bool:
    return path.lower().endswith(LABEL_FILE_EXTENSIONS)


def _read_png(path: str) -> np.ndarray:
    pixels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError(f"{path}: cannot be read as a PNG image (corrupt or not a PNG file)")
    if pixels.ndim == 3:
        colour = pixels[..., :3]
        opaque = pixels.shape[-1] != 4 or np.all(pixels[..., 3] == np.iinfo(pixels.dtype).max)
        if pixels.shape[-1] not in (3, 4) or not opaque or np.any(colour != colour[..., :1]):
            raise ValueError(
                f"{path}: a colour PNG with {pixels.shape[-1]} channels; a label map must be one channel "
                "of class values (grey, or RGB with equal channels), not a colour rendering"
            )
        pixels = colour[..., 0]
    return pixels


def _read_medical(path: str) -> np.ndarray:
    import SimpleITK as sitk  # Imported here: only user label files need it.

    try:
        image = sitk.ReadImage(path)
    except RuntimeError as error:
        # SimpleITK's message opens with the C++ source location; its last line is the reason.
        lines = str(error).strip().splitlines()
        reason = lines[-1].removeprefix("sitk::ERROR: ") if lines else "unknown error"
        raise ValueError(
            f"{path}: cannot be read with SimpleITK (corrupt or unsupported file): {reason}"
        ) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per pixel; a label map "
            "must be scalar class values"
        )
    array = sitk.GetArrayFromImage(image)  # (z, y, x) for 3D, (y, x) for 2D
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        size = " x ".join(str(s) for s in image.GetSize())
        raise ValueError(
            f"{path}: is a {image.GetDimension()}D image of size {size} (x, y, ...); 2D label maps are "
            "expected (one slice per file)"
        )
    return array


def _read_label_file(path: str) -> np.ndarray:
    if path.lower().endswith(".png"):
        return _read_png(path)
    return _read_medical(path)


def _value_names(values: Sequence[int], label_names: Sequence[str] | None) -> str:
    if label_names is None:
        return ", ".join(str(v) for v in values)
    return ", ".join(f"{v} ({label_names[v]})" for v in values)


def _validated(
    array: np.ndarray,
    where: str,
    image_hw: tuple[int, int],
    num_classes: int,
    label_names: Sequence[str] | None,
) -> np.ndarray:
    """One label map as (H, W) uint8, or ValueError naming `where` (a file or ``array[i]``)."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"{where}: has shape {array.shape}; a 2D (H, W) label map is expected")
    if array.shape != tuple(image_hw):
        raise ValueError(
            f"{where}: has shape ({array.shape[0]}, {array.shape[1]}); the trained model works at "
            f"({image_hw[0]}, {image_hw[1]}). Resize it with nearest-neighbour interpolation first."
        )
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{where}: has values of type {array.dtype}; integer class values are expected")
        bad = array[~np.isfinite(array) | (array != np.round(array))]
        if bad.size:
            examples = ", ".join(f"{v:g}" for v in np.unique(bad)[:5])
            raise ValueError(
                f"{where}: has non-integer values (e.g. {examples}); a label map holds integer class values"
            )
    values = np.unique(array)
    offending = [int(v) if float(v).is_integer() else v for v in values if not 0 <= v < num_classes]
    if offending:
        valid = _value_names(range(num_classes), label_names)
        raise ValueError(
            f"{where}: has label values {', '.join(map(str, offending))} outside 0..{num_classes - 1}; "
            f"valid values: {valid}"
        )
    return array.astype(np.uint8)


def _collect_sources(source: Any) -> list[tuple[str, Any]]:
    """(name, path-or-array) for every label in `source`, in order; files are read later."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Label source {path} does not exist")
        if os.path.isdir(path):
            files = sorted(
                name
                for name in os.listdir(path)
                # Dot files are skipped: macOS leaves "._name.png" resource forks on copied drives.
                if _has_label_extension(name)
                and not name.startswith(".")
                and os.path.isfile(os.path.join(path, name))
            )
            if not files:
                raise ValueError(
                    f"No label files in folder {path}: expected files ending in "
                    f"{', '.join(LABEL_FILE_EXTENSIONS)} (matched regardless of case)"
                )
            return [(name, os.path.join(path, name)) for name in files]
        if not _has_label_extension(path):
            raise ValueError(
                f"{path}: not a label file; expected a file ending in {', '.join(LABEL_FILE_EXTENSIONS)}"
            )
        return [(os.path.basename(path), path)]
    if isinstance(source, np.ndarray):
        if source.ndim == 2:
            return [("array", source)]
        if source.ndim == 3:
            return [(f"array[{i}]", a) for i, a in enumerate(source)]
        raise ValueError(f"array: has shape {source.shape}; expected (H, W) or (N, H, W) label maps")
    if isinstance(source, Sequence):
        items = []
        for i, item in enumerate(source):
            if isinstance(item, (str, os.PathLike)):
                items.extend(_collect_sources(item))
            else:
                items.append((f"array[{i}]", np.asarray(item)))
        return items
    raise TypeError(
        f"Label source of type {type(source).__name__}: expected a folder or file path, a numpy array "
        "(H, W) or (N, H, W), or a list of arrays"
    )


def load_user_labels(
    source: str | os.PathLike | np.ndarray | Sequence[np.ndarray],
    *,
    image_hw: tuple[int, int],
    num_classes: int,
    label_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Label maps a user brings to synthesise from, checked against the trained model.

    Every file is read and checked before anything is returned; if some are bad, one ValueError
    lists the problem of each, every line naming its file (or ``array[i]``).

    Args:
        source: a folder (its ``*.png``, ``*.nii``, ``*.nii.gz``, ``*.mha``, ``*.mhd`` and ``*.nrrd``
            files, sorted by name; other files and hidden ``.*`` files are ignored), one such file,
            a numpy array (H, W) or (N, H, W), or a list of arrays (or paths). PNGs are read with
            OpenCV, unchanged (an RGB PNG with three equal channels counts as grey); the others with
            SimpleITK (a 3D image with one slice is taken as 2D).
        image_hw: (H, W) the trained model works at.
        num_classes: number of label values, 0..num_classes-1 (1..256).
        label_names: optional name of each value, used in the error for out-of-range values.

    Returns:
        (labels (N, H, W) uint8, names): names are the file names (``"lesion01.png"``), ``"array"``
        for one (H, W) array, or ``"array[i]"``.

    Raises:
        FileNotFoundError: `source` (or a path in a list) does not exist.
        ValueError: a folder without label files, an unreadable or corrupt file, a colour PNG, a
            volume with more than one slice, a wrong size, non-integer values, values outside
            0..num_classes-1, or no labels at all.
        TypeError: `source` is none of the above.
    """
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in 1..256 for uint8 labels, got {num_classes}")
    if label_names is not None and len(label_names) != num_classes:
        raise ValueError(f"got {len(label_names)} label_names for num_classes={num_classes}")
    image_hw = (int(image_hw[0]), int(image_hw[1]))
    items = _collect_sources(source)
    if not items:
        raise ValueError("No label maps given (an empty list or array)")
    labels, names, problems = [], [], []
    for name, item in items:
        where = item if isinstance(item, str) else name
        try:
            array = _read_label_file(item) if isinstance(item, str) else item
            labels.append(_validated(array, where, image_hw, num_classes, label_names))
            names.append(name)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        header = f"{len(problems)} of {len(items)} label maps cannot be used:\n  " if len(items) > 1 else ""
        raise ValueError(header + "\n  ".join(shown) + more)
    return np.stack(labels), names
