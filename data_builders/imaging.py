"""Helpers shared by the builders of 2D image sources (`chest_xray`, `lung_ct`, `drive`, `fire`).

- `read_image` decodes a JPEG, PNG, TIFF or GIF file with Pillow to an (H, W, C) array with one
  (grey) or three (RGB) channels, keeping the file's depth (uint8, uint16, int32 or float32). Pillow,
  not OpenCV: OpenCV reads no GIF and returns a truncated JPEG as if it were whole.
- `prepare_image` turns that array into the stored float32 image: resized with the config's
  interpolation (OpenCV's, so `nearest` is the authors' `cv2.INTER_NEAREST`), then scaled to [0, 1].
- `binary_mask` / `prepare_mask` turn a mask file into uint8 {0, 1} at the working size, always with
  nearest-neighbour resizing so no new values appear.
- `find_root` finds the dataset's top directory inside a manual-download directory, at any nesting
  depth that archives add (`chest_xray/chest_xray/`), skipping macOS junk (`__MACOSX/`, `._*`).
- `ImageConfig` holds the BuilderConfig fields the four builders share; `image_feature` and
  `mask_feature` declare the matching TFDS features (`tfds.features.Tensor`, no TensorFlow needed).

Subject splits, the manual directory check and 3D volumes are in `data_builders.medical`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_builders import medical, schema

PathLike = str | os.PathLike

# Config value -> OpenCV flag. `nearest` is what the authors' readers use (METHOD.md §2.1); `area`
# averages the source pixels and is the better choice for large downsampling factors.
INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}
# minmax: per-image (x - min) / (max - min), all zeros for a constant image (the authors' `mynorm`);
# dtype: x / 255 or x / 65535, which keeps intensities comparable across images (8/16-bit files only);
# none: the decoded values as float32.
NORMALIZATIONS = ("minmax", "dtype", "none")
# Pillow modes whose array is already one grey channel (the "I;16*" modes are 16-bit files).
_GREY_MODES = frozenset({"L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
# Decoded dtypes that OpenCV's nearest-neighbour resize takes as they are (see `prepare_image`).
_NEAREST_DTYPES = frozenset(np.dtype(t) for t in (np.uint8, np.uint16, np.int16, np.int32, np.float32))
# Archives made on macOS carry these; they are never data.
_JUNK_DIRS = frozenset({"__MACOSX"})


class ImageReadError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, not an image); the message names it."""


def is_junk(path: pathlib.Path) -> bool:
    """Whether `path` names macOS archive junk or a hidden file (`__MACOSX/`, `._x.jpeg`, `.DS_Store`)."""
    return path.name.startswith(".") or path.name in _JUNK_DIRS


def list_files(directory: PathLike, suffixes: Iterable[str]) -> list[pathlib.Path]:
    """The files of `directory` (not recursive) whose suffix is one of `suffixes`, sorted by name.

    Suffixes compare case-insensitively (`.JPEG` is `.jpeg`); hidden and macOS junk files are left out.
    """
    wanted = {s.lower() for s in suffixes}
    return sorted(
        p
        for p in pathlib.Path(directory).iterdir()
        if p.is_file() and p.suffix.lower() in wanted and not is_junk(p)
    )


def find_partner(directory: PathLike, stem: str, suffixes: Iterable[str]) -> pathlib.Path | None:
    """The file `directory/stem<suffix>` for the first suffix of `suffixes` that exists, else None."""
    for suffix in suffixes:
        for candidate in (suffix, suffix.upper()):
            path = pathlib.Path(directory) / f"{stem}{candidate}"
            if path.is_file():
                return path
    return None


def find_root(
    manual_dir: PathLike, required: Sequence[str], dataset: str, max_depth: int = 3
) -> pathlib.Path:
    """The shallowest directory at or below `manual_dir` that holds every path of `required`.

    Archives are unpacked with or without their top folder, and some nest it twice
    (`chest_xray/chest_xray/train`), so the dataset is looked for down to `max_depth` levels; among
    equally deep candidates the first in sorted order wins. `__MACOSX/` and hidden folders are skipped.

    Args:
      manual_dir: the manual-download directory.
      required: sub-directories the dataset root must contain, e.g. `["train/NORMAL", "test"]`.
      dataset: dataset name, for the message.
      max_depth: how many levels below `manual_dir` to look.

    Returns:
      The dataset root.

    Raises:
      FileNotFoundError: no directory qualifies; the message names `manual_dir` and what was expected.
    """
    level = [pathlib.Path(manual_dir)]
    for _ in range(max_depth + 1):
        for directory in level:
            if all((directory / r).is_dir() for r in required):
                return directory
        level = sorted(
            child
            for directory in level
            for child in directory.iterdir()
            if child.is_dir() and not is_junk(child)
        )
    raise FileNotFoundError(
        f"{dataset}: no directory at most {max_depth} levels below manual_dir={manual_dir} holds "
        f"{', '.join(r + '/' for r in required)}. Unpack the download as the dataset's README shows."
    )


def read_image(path: PathLike, channels: int) -> np.ndarray:
    """Decode an image file (JPEG, PNG, TIFF, GIF, ...) to an (H, W, channels) array.

    Grey files keep their depth (uint8, uint16, int32 for signed 16/32-bit, float32). With
    `channels=1`, colour files become their luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B, uint8),
    palette files (GIF) their palette colours' luminance; with `channels=3`, grey files are repeated
    into three equal channels and alpha is dropped. Multi-frame files give their first frame.

    Args:
      path: the image file.
      channels: 1 (grey) or 3 (RGB).

    Returns:
      A C-contiguous array in native byte order.

    Raises:
      FileNotFoundError: the file does not exist.
      ImageReadError: the file cannot be decoded (truncated, corrupt, not an image) or a float image
        holds NaN or infinite values; the message names the file.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file {path} does not exist.")
    try:
        with Image.open(path) as image:
            image.load()  # Decode now: a truncated file fails here rather than giving a partial image.
            array = _pixels(image, channels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"Cannot decode image file {path}: {type(e).__name__}: {e}") from e
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageReadError(f"Image file {path} holds NaN or infinite pixel values.")
    return array


def _pixels(image: Image.Image, channels: int) -> np.ndarray:
    """The decoded Pillow image as an (H, W, channels) array (see `read_image`)."""
    if image.mode in _GREY_MODES:
        grey = np.asarray(image)
        grey = grey.astype(grey.dtype.newbyteorder("="), copy=False)  # "I;16B" decodes big-endian.
        array = grey[..., None] if channels == 1 else np.repeat(grey[..., None], 3, axis=-1)
    else:
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        if channels == 1:
            array = array[..., None]
    return np.ascontiguousarray(array)


def resize(array: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) array to (size, size[, C]); `size=0` returns it unchanged.

    Args:
      array: uint8, uint16, int16 or float32 data (OpenCV's types).
      size: output height and width, or 0 for no resizing.
      interpolation: a key of `INTERPOLATIONS`.

    Returns:
      The resized array, same dtype and number of dimensions.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"Unknown interpolation {interpolation!r}: expected one of {sorted(INTERPOLATIONS)}."
        )
    if size == 0 or array.shape[:2] == (size, size):
        return array
    resized = cv2.resize(array, (size, size), interpolation=INTERPOLATIONS[interpolation])
    # OpenCV drops a trailing axis of length 1.
    return resized.reshape(size, size, *array.shape[2:])


def dtype_range(dtype: np.dtype, path: PathLike) -> float:
    """The largest value of an 8- or 16-bit unsigned dtype, for `normalization='dtype'`."""
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    raise ValueError(
        f"{path}: normalization='dtype' needs an 8- or 16-bit unsigned image, this one decodes as "
        f"{np.dtype(dtype).name}; use normalization='minmax' or 'none'."
    )


def normalize(array: np.ndarray, normalization: str, source_dtype: np.dtype, path: PathLike) -> np.ndarray:
    """Scale float data as `normalization` says (see `NORMALIZATIONS`); returns float32.

    Args:
      array: the (possibly resized) data, any float or int dtype.
      normalization: a value of `NORMALIZATIONS`.
      source_dtype: the dtype the file decoded to (for `dtype`).
      path: the source file, for messages.
    """
    if normalization == "minmax":
        return medical.minmax_scale(array, float(array.min()), float(array.max()))
    if normalization == "dtype":
        return np.clip(array.astype(np.float32) / np.float32(dtype_range(source_dtype, path)), 0.0, 1.0)
    if normalization == "none":
        return array.astype(np.float32, copy=False)
    raise ValueError(f"Unknown normalization {normalization!r}: expected one of {NORMALIZATIONS}.")


def prepare_image(array: np.ndarray, config: ImageConfig, path: PathLike) -> np.ndarray:
    """A decoded image as stored: float32, resized to `config.image_size`, then normalised.

    Resizing comes first, as in the authors' readers, so `minmax` spans exactly [0, 1] whatever the
    interpolation (cubic and Lanczos overshoot; `dtype` clips them back).

    Args:
      array: (H, W, C) from `read_image`.
      config: gives `image_size`, `interpolation` and `normalization`.
      path: the source file, for messages.
    """
    if config.interpolation == "nearest" and array.dtype in _NEAREST_DTYPES:
        # Nearest only picks pixels: resizing the decoded dtype gives the same values as resizing the
        # float32 copy, without converting the whole (often much larger) source image first.
        resized = resize(array, config.image_size, "nearest").astype(np.float32)
    else:
        resized = resize(array.astype(np.float32), config.image_size, config.interpolation)
    return normalize(resized, config.normalization, array.dtype, path)


def binary_mask(array: np.ndarray) -> np.ndarray:
    """A mask array as uint8 {0, 1}: 1 where it is non-zero (any channel), 0 elsewhere.

    The project's convention is 1 = organ / foreground / vessel. Non-zero rather than a threshold so
    that 0/1, 0/255 and multi-label masks (e.g. left/right lung) all work; the sources are lossless
    (GIF, PNG, TIFF, NIfTI), so there is no compression noise to threshold away.
    """
    if array.ndim == 3:
        array = array.any(axis=-1)
    return (array != 0).astype(np.uint8)


def prepare_mask(array: np.ndarray, size: int) -> np.ndarray:
    """A decoded mask (H, W[, C]) as stored: binary uint8 (size, size), nearest-neighbour resized."""
    return resize(binary_mask(array), size, "nearest")


def scale_points(points_xy: np.ndarray, source_hw: Sequence[int], size: int) -> np.ndarray:
    """Pixel coordinates (x, y) in a source image moved to the same place in its resized copy.

    Uses OpenCV's pixel-centre convention (pixel `i` covers [i - 1/2, i + 1/2]):
    `x' = (x + 1/2) * size / width - 1/2`. `size=0` (no resizing) returns the points unchanged.

    Args:
      points_xy: (N, 2) coordinates, x (column) first.
      source_hw: (height, width) of the source image.
      size: the resized image's height and width, or 0.
    """
    points = np.asarray(points_xy, np.float32).reshape(-1, 2)
    if size == 0:
        return points
    scale = np.array([size / source_hw[1], size / source_hw[0]], np.float32)
    return (points + 0.5) * scale - 0.5


@dataclasses.dataclass
class ImageConfig(tfds.core.BuilderConfig):
    """Image preparation fields shared by the 2D image builders; `data_builders.build` can override each.

    Attributes:
      image_size: stored height and width in pixels (images are resized to a square, as the authors
        do); 0 keeps every image at its own size (the features then have shape (None, None, ...)).
      interpolation: resizing of images, a key of `INTERPOLATIONS` (masks are always resized with
        `nearest`).
      normalization: a value of `NORMALIZATIONS`.
    """

    image_size: int = 512
    interpolation: str = "nearest"
    normalization: str = "minmax"

    def __post_init__(self):
        if (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or not (self.image_size == 0 or self.image_size >= 8)
        ):
            raise ValueError(
                f"Config {self.name!r}: image_size must be 0 or an int >= 8, got {self.image_size!r}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"Config {self.name!r}: interpolation must be one of {sorted(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"Config {self.name!r}: normalization must be one of {NORMALIZATIONS}, "
                f"got {self.normalization!r}"
            )

    def fields(self) -> dict[str, object]:
        """The config's own fields (not TFDS's name, version, ...), for `info.metadata`."""
        base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in base}


def image_feature(size: int, channels: int, doc: str) -> tfds.features.Tensor:
    """A float32 (size, size, channels) image feature, (None, None, channels) when `size` is 0.

    Stored as raw bytes (`schema.IMAGE_ENCODING`); array_record's own zstd compresses them.
    """
    side = size or None
    return tfds.features.Tensor(
        shape=(side, side, channels), dtype=np.float32, encoding=schema.IMAGE_ENCODING, doc=doc
    )


def mask_feature(size: int, doc: str) -> tfds.features.Tensor:
    """A uint8 (size, size) mask feature with values {0, 1}, (None, None) when `size` is 0."""
    side = size or None
    return tfds.features.Tensor(shape=(side, side), dtype=np.uint8, encoding=schema.LABEL_ENCODING, doc=doc)


def check_same_shape(image: np.ndarray, mask: np.ndarray, image_path: PathLike, mask_path: PathLike) -> None:
    """Raise ValueError, naming both files, if an image and its mask differ in height and width."""
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(
            f"Image {image_path} is {image.shape[0]}x{image.shape[1]} but its mask {mask_path} is "
            f"{mask.shape[0]}x{mask.shape[1]} (height x width)."
        )
