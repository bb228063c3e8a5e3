"""Helpers shared by the builders of 3D medical sources (`.mha`/`.mhd`/`.nii.gz` read with SimpleITK).

- `read_volume` reads a scalar 3D image as a `Volume`: the voxel array in SimpleITK's (z, y, x) order
  and the geometry (spacing, origin, direction) in its (x, y, z) order, with errors that name the file.
- `world_to_index` / `world_extent_to_index` turn world millimetres into continuous voxel indices,
  exactly as `sitk.Image.TransformPhysicalPointToContinuousIndex` does (index 0 is the centre of the
  first voxel).
- `resampled_geometry` gives the spacing and origin of a crop / resize of a volume, and `resize_yx`
  resizes slices with the same (half-pixel-centre) convention, so written geometry stays exact.
- `split_subjects` is the subject-level, seeded train/validation/test split of every real dataset.
- `open_manual_dir` turns TFDS's missing-manual-dir assertion into an error that names the directory.

Geometry convention (as in `data_builders.schema`): voxel `array[k, i, j]` lies at
`origin + direction @ (j * sx, i * sy, k * sz)` mm.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PathLike = str | os.PathLike
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Volume:
    """A scalar 3D image and its geometry.

    Attributes:
      array: voxels, shape (z, y, x), in the file's dtype.
      spacing: voxel size (x, y, z) in mm, float64.
      origin: world position (x, y, z) in mm of voxel `array[0, 0, 0]`, float64.
      direction: 3x3 direction cosines (columns: the x, y, z index axes in world space), float64.
      path: the file it was read from.
    """

    array: np.ndarray
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray
    path: pathlib.Path

    def geometry(self, *, origin: np.ndarray | None = None, spacing: np.ndarray | None = None) -> dict:
        """Return the `spacing`, `origin` and `direction` (row-major 9) features as float32 arrays.

        Args:
          origin: replaces the volume's origin (e.g. the origin of one slice or of a crop).
          spacing: replaces the volume's spacing (e.g. after resizing).
        """
        return {
            "spacing": np.asarray(self.spacing if spacing is None else spacing, np.float32),
            "origin": np.asarray(self.origin if origin is None else origin, np.float32),
            "direction": np.asarray(self.direction, np.float32).reshape(9),
        }


def _sitk_reason(error: Exception) -> str:
    """The informative part of a SimpleITK exception (its first line is only the C++ location)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = " ".join(lines[1:] or lines)
    return reason[:400]


def _missing_data_file(path: pathlib.Path) -> pathlib.Path | None:
    """For a `.mhd` header, the separate data file it names if that file does not exist."""
    if path.suffix.lower() != ".mhd":
        return None
    try:
        header = path.read_text(errors="replace")
    except OSError:
        return None
    for line in header.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile" and value.strip() not in ("LOCAL", "LIST"):
            data_file = path.parent / value.strip()
            return None if data_file.exists() else data_file
    return None


def read_volume(path: PathLike) -> Volume:
    """Read a scalar 3D image file with SimpleITK.

    Args:
      path: a `.mha`, `.mhd` (with its data file), `.nii.gz` or any file SimpleITK reads.

    Returns:
      The `Volume` (array in (z, y, x) order, geometry in (x, y, z) order).

    Raises:
      FileNotFoundError: the file (or the data file a `.mhd` header names) does not exist.
      ValueError: the file cannot be read (corrupt, truncated, unknown format), is not a scalar 3D
        image, or holds NaN or infinite values; the message names the file.
    """
    import SimpleITK as sitk  # Imported here: only the builders of 3D sources need it.

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file {path} does not exist.")
    missing = _missing_data_file(path)
    if missing is not None:
        raise FileNotFoundError(f"Image header {path} names the data file {missing}, which does not exist.")
    try:
        image = sitk.ReadImage(os.fspath(path))
    except RuntimeError as e:
        raise ValueError(f"Cannot read image file {path} (corrupt or truncated?): {_sitk_reason(e)}") from e
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"Image file {path} is not a scalar 3D image: {image.GetDimension()} dimensions, "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel."
        )
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise ValueError(f"Image file {path} holds {bad} NaN or infinite voxel values.")
    return Volume(
        array=array,
        spacing=np.array(image.GetSpacing(), np.float64),
        origin=np.array(image.GetOrigin(), np.float64),
        direction=np.array(image.GetDirection(), np.float64).reshape(3, 3),
        path=path,
    )


def world_to_index(points_xyz: Any, volume: Volume) -> np.ndarray:
    """Continuous voxel indices (x, y, z) of world points in mm (SimpleITK's convention).

    Args:
      points_xyz: (..., 3) world coordinates (x, y, z) in mm.
      volume: the volume whose index space is wanted.

    Returns:
      (..., 3) float64 continuous indices in (x, y, z) order: reverse them (`[..., ::-1]`) to index
      `volume.array`, whose axes are (z, y, x).
    """
    offset = np.asarray(points_xyz, np.float64) - volume.origin
    # index = D^-1 (p - origin) / spacing; solving handles any invertible direction matrix.
    local = np.linalg.solve(volume.direction, offset.reshape(-1, 3).T).T
    return (local / volume.spacing).reshape(offset.shape)


def world_extent_to_index(extent_xyz: Any, volume: Volume) -> np.ndarray:
    """Extent in voxels, along the index axes (x, y, z), of a world-axis-aligned box of size `extent_xyz` mm.

    With an identity direction this is `extent / spacing`; a rotated volume sees the box's projection.

    Args:
      extent_xyz: (..., 3) box sizes (x, y, z) in mm along the world axes.
      volume: the volume whose index space is wanted.

    Returns:
      (..., 3) float64 sizes in voxels, (x, y, z) order.
    """
    extent = np.abs(np.asarray(extent_xyz, np.float64))
    inverse = np.abs(np.linalg.inv(volume.direction))
    return (extent.reshape(-1, 3) @ inverse.T).reshape(extent.shape) / volume.spacing


def resampled_geometry(
    volume: Volume, index_offset_xyz: Sequence[float], index_scale_xyz: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Spacing and origin of a grid whose voxel `n` lies at the volume's continuous index `offset + scale n`.

    A crop starting at index `c` has offset `c` and scale 1; resizing `L` voxels to `L'` with
    half-pixel centres (`resize_yx`) has scale `L / L'` and offset `c + scale / 2 - 1/2`.

    Args:
      volume: the source volume.
      index_offset_xyz: continuous source index (x, y, z) of the new voxel 0.
      index_scale_xyz: source voxels per new voxel along x, y, z.

    Returns:
      `(spacing, origin)` of the new grid, float64 (x, y, z); its direction is the volume's.
    """
    offset = np.asarray(index_offset_xyz, np.float64)
    scale = np.asarray(index_scale_xyz, np.float64)
    origin = volume.origin + volume.direction @ (offset * volume.spacing)
    return volume.spacing * scale, origin


def _resize_axis(array: np.ndarray, size: int, axis: int, method: str) -> np.ndarray:
    """Resize one axis with half-pixel centres: output `n` samples input position `(n + 1/2) L/L' - 1/2`."""
    length = array.shape[axis]
    if length == size:
        return array
    scale = length / size
    if method == "nearest":
        index = np.minimum(np.floor((np.arange(size) + 0.5) * scale).astype(np.int64), length - 1)
        return np.take(array, index, axis=axis)
    position = np.clip((np.arange(size) + 0.5) * scale - 0.5, 0.0, length - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, length - 1)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = size
    weight = (position - low).astype(np.float32).reshape(weight_shape)
    lower, upper = np.take(array, low, axis=axis), np.take(array, high, axis=axis)
    return lower * (1.0 - weight) + upper * weight


def resize_yx(
    array: np.ndarray, height: int, width: int, method: str, axes: tuple[int, int] = (-2, -1)
) -> np.ndarray:
    """Resize the two in-plane axes of `array` (e.g. (z, y, x) or (z, y, x, channels)).

    Args:
      array: the data; `linear` returns float32, `nearest` keeps the dtype (use it for labels).
      height: new size of `axes[0]`.
      width: new size of `axes[1]`.
      method: `"nearest"` or `"linear"` (separable, edge samples repeated, no anti-aliasing).
      axes: the (row, column) axes.

    Returns:
      The resized array.

    Raises:
      ValueError: unknown method.
    """
    if method not in ("nearest", "linear"):
        raise ValueError(f"Unknown interpolation {method!r}: expected 'nearest' or 'linear'.")
    if method == "linear":
        array = array.astype(np.float32, copy=False)
    array = _resize_axis(array, height, axes[0], method)
    return _resize_axis(array, width, axes[1], method)


def minmax_scale(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """`(array - low) / (high - low)` as float32, clipped to [0, 1]; all zeros when `high <= low`."""
    if high <= low:
        return np.zeros(array.shape, np.float32)
    # One float32 temporary, scaled and clipped in place: the values of `(x.astype(f32) - low) * s`.
    scaled = np.subtract(array, np.float32(low), dtype=np.float32)
    scaled *= np.float32(1.0 / (high - low))
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def split_subjects(
    subject_ids: Iterable[str], *, validation_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Assign whole subjects to train / validation / test, deterministically from `seed`.

    Subjects are ordered by the SHA-256 of `"{seed}/{subject_id}"` (independent of file-system order
    and numpy versions; adding a subject keeps the others' order, and moves at most the subjects at
    the cuts between splits); the first
    `round(n * test_fraction)` go to test, the next `round(n * validation_fraction)` to validation
    and the rest to train. A split with a positive fraction gets at least one subject when there are
    enough subjects; a split with no subjects is left out of the result.

    Args:
      subject_ids: unique subject identifiers.
      validation_fraction: share of subjects in `validation`, in [0, 1).
      test_fraction: share of subjects in `test`, in [0, 1).
      seed: the split seed (record it with the dataset).

    Returns:
      `{split: sorted subject ids}` for the non-empty splits among `SPLITS`.

    Raises:
      ValueError: duplicate ids, bad fractions, or no subject left for train.
    """
    subjects = list(subject_ids)
    if len(set(subjects)) != len(subjects):
        raise ValueError("split_subjects: subject ids are not unique.")
    if not (
        0 <= validation_fraction < 1 and 0 <= test_fraction < 1 and validation_fraction + test_fraction < 1
    ):
        raise ValueError(
            f"Bad split fractions validation={validation_fraction}, test={test_fraction}: each must be in "
            "[0, 1) and their sum below 1."
        )
    n = len(subjects)

    def count(fraction: float) -> int:
        # Round half up (Python's round() rounds half to even); keep a requested split non-empty.
        k = math.floor(n * fraction + 0.5)
        return max(k, 1) if fraction > 0 and n >= 3 else k

    n_test, n_validation = count(test_fraction), count(validation_fraction)
    if n - n_test - n_validation < 1:
        raise ValueError(
            f"Cannot split {n} subjects with validation={validation_fraction}, test={test_fraction}: "
            "no subject is left for train."
        )
    ordered = sorted(subjects, key=lambda s: hashlib.sha256(f"{seed}/{s}".encode()).hexdigest())
    parts = {
        "test": ordered[:n_test],
        "validation": ordered[n_test : n_test + n_validation],
        "train": ordered[n_test + n_validation :],
    }
    return {split: sorted(parts[split]) for split in SPLITS if parts[split]}


def open_manual_dir(dl_manager: Any, dataset: str) -> pathlib.Path:
    """The manual-download directory of a TFDS download manager, checked to exist and be non-empty.

    Args:
      dl_manager: the `tfds.download.DownloadManager` passed to `_split_generators`.
      dataset: dataset name, for the message.

    Returns:
      The directory as a `pathlib.Path`.

    Raises:
      FileNotFoundError: the directory is missing or empty; the message names it.
    """
    try:
        return pathlib.Path(os.fspath(dl_manager.manual_dir))
    except AssertionError as e:
        # TFDS asserts; callers (and tests) want a FileNotFoundError that names the directory.
        where = getattr(dl_manager, "_manual_dir", None)
        raise FileNotFoundError(
            f"{dataset}: the manual-download directory {where} does not exist or is empty. Download the "
            f"data as the dataset's README says and pass its directory as manual_dir (--manual_dir)."
        ) from e
