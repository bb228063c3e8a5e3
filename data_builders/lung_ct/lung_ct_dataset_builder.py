"""`lung_ct`: Kaggle's "Finding and Measuring Lungs in CT Data" (kmader), CT with manual lung masks.

Two configs:

- `slices` (default): the 2D transverse slices `2d_images/ID_0000_Z_0142.tif`, each with the mask of
  the same file name in `2d_masks/`. `image` (S, S, 1) float32 scaled to [0, 1] (per-image min-max,
  METHOD.md §2.1), `mask` (S, S) uint8 with 1 = lung, 0 = background, `id` (`ID_0000_Z_0142`),
  `subject_id` (`ID_0000`) and `slice_index` (142, from `Z_0142`).
- `volumes`: the 3D volumes `3d_images/IMG_0002.nii.gz` with `MASK_0002.nii.gz`, at their own size
  and in their own units (no resizing, `normalization="none"`): `image` (Z, Y, X) float32, `mask`
  (Z, Y, X) uint8, `id` (`IMG_0002`), `subject_id` (`0002`) and SimpleITK's geometry `spacing`,
  `origin` (x, y, z) and `direction` (row-major 3x3), as in `data_builders.schema`.

Masks are stored as 1 wherever the source mask is non-zero. The download has no official split:
whole subjects (`ID_NNNN` for slices, the volume number for volumes) go to train / validation / test
by `medical.split_subjects` with the config's fractions and `split_seed`; the subjects of each split
and the seed are in `info.metadata`. A split that gets no subject is left out.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_builders import base, imaging, medical, schema

log = logging.getLogger(__name__)

KINDS = ("slices", "volumes")
SLICE_SUFFIXES = (".tif", ".tiff")
_SLICE_NAME = re.compile(r"^(?P<subject>ID_\d+)_Z_(?P<z>\d+)$", re.IGNORECASE)
_VOLUME_NAME = re.compile(r"^(?P<kind>IMG|MASK)_(?P<number>\d+)\.nii(?:\.gz)?$", re.IGNORECASE)

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the archive of https://www.kaggle.com/datasets/kmader/finding-lungs-in-ct-data (a Kaggle
account is needed) and unpack it, and the zips inside it if only those are there, into manual_dir.
The builder uses the shallowest directory, at most three levels down, that holds 2d_images/ and
2d_masks/ (config slices) or 3d_images/ (config volumes):

    manual_dir/
      2d_images/
        ID_0000_Z_0142.tif
        ...
      2d_masks/
        ID_0000_Z_0142.tif        (same file name as its image)
        ...
      3d_images/
        IMG_0002.nii.gz
        MASK_0002.nii.gz
        ...
      lung_stats.csv              (not used)
"""


@dataclasses.dataclass
class LungCtConfig(imaging.ImageConfig):
    """Image preparation (see `imaging.ImageConfig`), what to read, and the subject split.

    Attributes:
      kind: `"slices"` (the 2D files) or `"volumes"` (the NIfTI volumes; needs `image_size=0`).
      validation_fraction: share of subjects in `validation`, in [0, 1).
      test_fraction: share of subjects in `test`, in [0, 1).
      split_seed: seed of the subject split (`medical.split_subjects`).
    """

    kind: str = "slices"
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in KINDS:
            raise ValueError(f"Config {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "volumes" and self.image_size != 0:
            raise ValueError(
                f"Config {self.name!r}: volumes keep their size and geometry; image_size must be 0, "
                f"got {self.image_size}"
            )


@dataclasses.dataclass(frozen=True)
class LungPair:
    """An image file, its mask file, and the subject (and slice) they belong to."""

    image: pathlib.Path
    mask: pathlib.Path
    key: str
    subject_id: str
    slice_index: int = -1


def find_slices(root: pathlib.Path) -> list[LungPair]:
    """Pair every `2d_images/X.tif` with `2d_masks/X.tif`.

    Raises:
      FileNotFoundError: an image without a mask or a mask without an image (both paths named), or
        no images at all.
    """
    images = imaging.list_files(root / "2d_images", SLICE_SUFFIXES)
    masks = imaging.list_files(root / "2d_masks", SLICE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"lung_ct: {root / '2d_images'} holds no .tif images.")
    image_names = {p.name for p in images}
    for mask in masks:
        if mask.name not in image_names:
            raise FileNotFoundError(f"Mask {mask} has no image: expected {root / '2d_images' / mask.name}.")
    mask_names = {p.name for p in masks}
    pairs = []
    for image in images:
        if image.name not in mask_names:
            raise FileNotFoundError(f"Image {image} has no mask: expected {root / '2d_masks' / image.name}.")
        match = _SLICE_NAME.match(image.stem)
        if match is None:
            log.warning("%s: name is not ID_NNNN_Z_NNNN; the whole name is its subject, slice -1", image)
            pairs.append(LungPair(image, root / "2d_masks" / image.name, image.stem, image.stem))
            continue
        subject = match["subject"].upper()
        pairs.append(LungPair(image, root / "2d_masks" / image.name, image.stem, subject, int(match["z"])))
    return pairs


def find_volumes(root: pathlib.Path) -> list[LungPair]:
    """Pair every `3d_images/IMG_N.nii.gz` with `MASK_N.nii.gz` by the number N.

    Raises:
      FileNotFoundError: a volume without a mask or a mask without a volume (both paths named), or
        no volumes at all.
    """
    directory = root / "3d_images"
    files: dict[str, dict[str, pathlib.Path]] = {"IMG": {}, "MASK": {}}
    for path in sorted(directory.iterdir()):
        match = _VOLUME_NAME.match(path.name)
        if match and path.is_file() and not imaging.is_junk(path):
            files[match["kind"].upper()][match["number"]] = path
    if not files["IMG"]:
        raise FileNotFoundError(f"lung_ct: {directory} holds no IMG_NNNN.nii.gz volumes.")
    for number, mask in files["MASK"].items():
        if number not in files["IMG"]:
            raise FileNotFoundError(
                f"Mask {mask} has no volume: expected {directory / f'IMG_{number}.nii.gz'}."
            )
    pairs = []
    for number, image in sorted(files["IMG"].items()):
        if number not in files["MASK"]:
            raise FileNotFoundError(
                f"Volume {image} has no mask: expected {directory / f'MASK_{number}.nii.gz'}."
            )
        pairs.append(LungPair(image, files["MASK"][number], f"IMG_{number}", number))
    return pairs


class Builder(base.ArrayRecordBuilder):
    """Kaggle lung CT slices or volumes with lung masks (see the module docstring)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: 2D slices and 3D volumes with lung masks, subject split.",
        "1.1.0": "Float32 slices and volumes stored as raw bytes instead of zlib "
        "(`schema.IMAGE_ENCODING`): the same values, written several times faster.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        LungCtConfig(
            name="slices",
            description="2D slices 512x512 with lung masks, per-image min-max (the authors').",
        ),
        LungCtConfig(
            name="volumes",
            description="3D volumes with lung masks, native size and units, with geometry.",
            kind="volumes",
            image_size=0,
            normalization="none",
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        config: LungCtConfig = self.builder_config
        if config.kind == "slices":
            features = {
                "image": imaging.image_feature(
                    config.image_size, 1, "The CT slice, scaled as the config says."
                ),
                "mask": imaging.mask_feature(config.image_size, "1 = lung, 0 = background."),
                "slice_index": tfds.features.Scalar(dtype=np.int32, doc="Z of the file name (-1 if none)."),
            }
        else:
            features = {
                "image": tfds.features.Tensor(
                    shape=(None, None, None),
                    dtype=np.float32,
                    encoding=schema.IMAGE_ENCODING,
                    doc="(z, y, x) CT volume.",
                ),
                "mask": tfds.features.Tensor(
                    shape=(None, None, None),
                    dtype=np.uint8,
                    encoding=schema.LABEL_ENCODING,
                    doc="1 = lung, 0 = background.",
                ),
                "spacing": tfds.features.Tensor(
                    shape=(3,), dtype=np.float32, doc="Voxel size (x, y, z), mm."
                ),
                "origin": tfds.features.Tensor(shape=(3,), dtype=np.float32, doc="Position of voxel 0, mm."),
                "direction": tfds.features.Tensor(shape=(9,), dtype=np.float32, doc="Row-major 3x3 cosines."),
            }
        features["id"] = tfds.features.Text(doc="'ID_0000_Z_0142' (slices) or 'IMG_0002' (volumes).")
        features["subject_id"] = tfds.features.Text(doc="'ID_0000' (slices) or '0002' (volumes).")
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            metadata=schema.dataset_metadata(["ct"], ("background", "lung"), **config.fields()),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        config: LungCtConfig = self.builder_config
        manual_dir = medical.open_manual_dir(dl_manager, "lung_ct")
        if config.kind == "slices":
            root = imaging.find_root(manual_dir, ["2d_images", "2d_masks"], "lung_ct")
            pairs = find_slices(root)
        else:
            root = imaging.find_root(manual_dir, ["3d_images"], "lung_ct")
            pairs = find_volumes(root)
        subjects = medical.split_subjects(
            sorted({p.subject_id for p in pairs}),
            validation_fraction=config.validation_fraction,
            test_fraction=config.test_fraction,
            seed=config.split_seed,
        )
        self.info.metadata["source_root"] = root.relative_to(manual_dir).as_posix()
        self.info.metadata["subjects"] = subjects
        split_of = {subject: split for split, members in subjects.items() for subject in members}
        return {
            split: self._generate_examples([p for p in pairs if split_of[p.subject_id] == split])
            for split in subjects
        }

    def _generate_examples(self, pairs: list[LungPair]) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.builder_config.kind == "slices":
            yield from self._slice_examples(pairs)
        else:
            yield from self._volume_examples(pairs)

    def _slice_examples(self, pairs: list[LungPair]) -> Iterator[tuple[str, dict[str, Any]]]:
        config: LungCtConfig = self.builder_config
        for pair in pairs:
            pixels = imaging.read_image(pair.image, channels=1)
            mask = imaging.read_image(pair.mask, channels=1)
            imaging.check_same_shape(pixels, mask, pair.image, pair.mask)
            yield (
                pair.key,
                {
                    "image": imaging.prepare_image(pixels, config, pair.image),
                    "mask": imaging.prepare_mask(mask, config.image_size),
                    "slice_index": pair.slice_index,
                    "id": pair.key,
                    "subject_id": pair.subject_id,
                },
            )

    def _volume_examples(self, pairs: list[LungPair]) -> Iterator[tuple[str, dict[str, Any]]]:
        config: LungCtConfig = self.builder_config
        for pair in pairs:
            volume = medical.read_volume(pair.image)
            mask = medical.read_volume(pair.mask)
            _check_same_grid(volume, mask)
            yield (
                pair.key,
                {
                    "image": imaging.normalize(
                        volume.array, config.normalization, volume.array.dtype, pair.image
                    ),
                    # Non-zero is lung, as for the slices (`imaging.binary_mask`).
                    "mask": (mask.array != 0).astype(np.uint8),
                    **volume.geometry(),
                    "id": pair.key,
                    "subject_id": pair.subject_id,
                },
            )


def _check_same_grid(volume: medical.Volume, mask: medical.Volume) -> None:
    """Raise ValueError, naming both files, if a mask does not lie on its volume's voxel grid."""
    problems = []
    if volume.array.shape != mask.array.shape:
        problems.append(f"shape {volume.array.shape} vs {mask.array.shape}")
    for name in ("spacing", "origin", "direction"):
        if not np.allclose(getattr(volume, name), getattr(mask, name), atol=1e-3):
            problems.append(f"{name} {getattr(volume, name).ravel()} vs {getattr(mask, name).ravel()}")
    if problems:
        raise ValueError(f"Volume {volume.path} and its mask {mask.path} differ: {'; '.join(problems)}.")
