"""`chest_xray`: Kaggle's paediatric chest X-rays (paultimothymooney/chest-xray-pneumonia), 3 classes.

Each example is one X-ray, decoded to one channel (the download mixes grey and RGB JPEGs; RGB ones
become their luminance), resized to a square working size and scaled to [0, 1]:

- `image` (S, S, 1) float32; `label`: 0 normal, 1 bacterial pneumonia, 2 viral pneumonia, from the
  folder (`NORMAL/`, `PNEUMONIA/`) and, for pneumonia, the file name (`person1_bacteria_1.jpeg`);
- `id`: the path below the dataset root (`train/PNEUMONIA/person1_bacteria_1.jpeg`), unique and
  independent of where the data lies; `patient_id`: `person1`, `IM-0115` or `NORMAL2-IM-1427`;
  `source_shape`: (height, width) of the file, which varies from image to image.

Splits are the download's `train/`, `val/` and `test/` folders (`train`, `validation`, `test`). The
official `val/` holds only 16 images; `validation_fraction` moves that share of the training
*patients* (all their images) into `validation` as well, chosen by `split_seed` and recorded in
`info.metadata["validation_patients_from_train"]`.

Configs: `default` (512 x 512, nearest neighbour, per-image min-max, as the authors, METHOD.md §2.1).
Every field of `ChestXrayConfig` can be overridden, e.g. `interpolation="area"` or `image_size=0`.
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

CLASS_NAMES = ("normal", "bacteria", "virus")
# Split name -> folder of the download.
SPLIT_FOLDERS = {"train": "train", "validation": "val", "test": "test"}
CLASS_FOLDERS = ("NORMAL", "PNEUMONIA")
SUFFIXES = (".jpeg", ".jpg", ".png")
_PNEUMONIA_NAME = re.compile(r"^(?P<patient>person\d+)_(?P<kind>bacteria|virus)_\d+$", re.IGNORECASE)
_NORMAL_NAME = re.compile(r"^(?P<patient>(?:NORMAL2-)?IM-\d+)-\d+$", re.IGNORECASE)

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the archive of https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia (a
Kaggle account is needed) and unpack it into manual_dir. The builder uses the shallowest directory,
at most three levels down, that holds train/, val/ and test/, each with NORMAL/ and PNEUMONIA/:

    manual_dir/
      chest_xray/
        train/
          NORMAL/IM-0115-0001.jpeg, NORMAL2-IM-0427-0001.jpeg, ...
          PNEUMONIA/person1_bacteria_1.jpeg, person1_virus_6.jpeg, ...
        val/
          NORMAL/NORMAL2-IM-1427-0001.jpeg, ...
          PNEUMONIA/person1946_bacteria_4874.jpeg, ...
        test/
          NORMAL/IM-0001-0001.jpeg, ...
          PNEUMONIA/person100_bacteria_475.jpeg, ...

The archive's nested copy (manual_dir/chest_xray/chest_xray/train/...) works as well, and its
__MACOSX/ folders and ._* files are ignored.
"""


@dataclasses.dataclass
class ChestXrayConfig(imaging.ImageConfig):
    """Image preparation (see `imaging.ImageConfig`) and the choices specific to the chest X-rays.

    Attributes:
      validation_fraction: share of the training patients moved to `validation`, in [0, 1).
      split_seed: seed of that choice (`medical.split_subjects`).
      skip_corrupt_images: skip (and log) files that cannot be decoded instead of failing.
    """

    validation_fraction: float = 0.0
    split_seed: int = 0
    skip_corrupt_images: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"Config {self.name!r}: validation_fraction must be in [0, 1), "
                f"got {self.validation_fraction!r}"
            )


@dataclasses.dataclass(frozen=True)
class XrayFile:
    """One image file of the download and what its place and name say."""

    path: pathlib.Path
    key: str
    label: int
    patient_id: str


def parse_name(path: pathlib.Path, class_folder: str) -> tuple[int, str]:
    """The class and patient id of an X-ray from its class folder and file name.

    Args:
      path: the image file.
      class_folder: `NORMAL` or `PNEUMONIA`.

    Returns:
      `(label, patient_id)`, with the label an index into `CLASS_NAMES`. A normal image whose name
      has no recognisable patient part keeps its whole stem as patient id (and a warning is logged).

    Raises:
      ValueError: a pneumonia image whose name does not say `bacteria` or `virus`, or a normal image
        whose name does; the message names the file.
    """
    stem = path.stem
    pneumonia = _PNEUMONIA_NAME.match(stem)
    if class_folder == "PNEUMONIA":
        if pneumonia is None:
            raise ValueError(
                f"{path}: a PNEUMONIA image must be named personN_bacteria_K or personN_virus_K to "
                "give its class."
            )
        return CLASS_NAMES.index(pneumonia["kind"].lower()), pneumonia["patient"].lower()
    if pneumonia is not None:
        raise ValueError(f"{path}: the file is in NORMAL/ but its name says {pneumonia['kind']}.")
    normal = _NORMAL_NAME.match(stem)
    if normal is None:
        log.warning("%s: no patient id in the name (expected IM-NNNN-NNNN); using %r", path, stem)
        return 0, stem
    return 0, normal["patient"].upper()


class Builder(base.ArrayRecordBuilder):
    """Kaggle chest X-ray pneumonia (see the module docstring)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: 3 classes, one grey channel, official folders as splits.",
        "1.1.0": "Float32 images stored as raw bytes instead of zlib (`schema.IMAGE_ENCODING`): the same "
        "values, written several times faster.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        ChestXrayConfig(
            name="default",
            description="512x512 grey, nearest-neighbour resizing, per-image min-max (the authors').",
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        config: ChestXrayConfig = self.builder_config
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": imaging.image_feature(
                        config.image_size, 1, "The X-ray, one channel, float32 scaled as the config says."
                    ),
                    "label": tfds.features.ClassLabel(
                        names=CLASS_NAMES, doc="0 normal, 1 bacteria, 2 virus."
                    ),
                    "id": tfds.features.Text(doc="Path below the dataset root, e.g. 'train/NORMAL/x.jpeg'."),
                    "patient_id": tfds.features.Text(doc="'person1', 'IM-0115' or 'NORMAL2-IM-1427'."),
                    "source_shape": tfds.features.Tensor(
                        shape=(2,), dtype=np.int32, doc="(height, width) of the source file."
                    ),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=schema.dataset_metadata(["xray"], CLASS_NAMES, **config.fields()),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        config: ChestXrayConfig = self.builder_config
        manual_dir = medical.open_manual_dir(dl_manager, "chest_xray")
        required = [f"{folder}/{c}" for folder in SPLIT_FOLDERS.values() for c in CLASS_FOLDERS]
        root = imaging.find_root(manual_dir, required, "chest_xray")
        files = {split: self._scan(root, folder) for split, folder in SPLIT_FOLDERS.items()}
        moved: list[str] = []
        if config.validation_fraction > 0:
            patients = sorted({f.patient_id for f in files["train"]})
            parts = medical.split_subjects(
                patients,
                validation_fraction=config.validation_fraction,
                test_fraction=0.0,
                seed=config.split_seed,
            )
            moved = parts.get("validation", [])
            chosen = set(moved)
            files["validation"] += [f for f in files["train"] if f.patient_id in chosen]
            files["train"] = [f for f in files["train"] if f.patient_id not in chosen]
        metadata = self.info.metadata
        metadata["source_root"] = root.relative_to(manual_dir).as_posix()
        metadata["validation_patients_from_train"] = moved
        metadata["skipped_files"] = []
        return {split: self._generate_examples(split_files) for split, split_files in files.items()}

    def _scan(self, root: pathlib.Path, folder: str) -> list[XrayFile]:
        """Every image of one split folder, with its class and patient; names are checked up front."""
        found = []
        for class_folder in CLASS_FOLDERS:
            for path in imaging.list_files(root / folder / class_folder, SUFFIXES):
                label, patient = parse_name(path, class_folder)
                found.append(XrayFile(path, path.relative_to(root).as_posix(), label, patient))
        if not found:
            raise FileNotFoundError(f"chest_xray: {root / folder} holds no {'/'.join(SUFFIXES)} images.")
        return found

    def _generate_examples(self, files: list[XrayFile]) -> Iterator[tuple[str, dict[str, Any]]]:
        config: ChestXrayConfig = self.builder_config
        for file in files:
            try:
                pixels = imaging.read_image(file.path, channels=1)
            except imaging.ImageReadError as e:
                if not config.skip_corrupt_images:
                    raise
                log.warning("Skipping an image that cannot be decoded (skip_corrupt_images=True): %s", e)
                self.info.metadata["skipped_files"].append(file.key)
                continue
            yield (
                file.key,
                {
                    "image": imaging.prepare_image(pixels, config, file.path),
                    "label": file.label,
                    "id": file.key,
                    "patient_id": file.patient_id,
                    "source_shape": np.array(pixels.shape[:2], np.int32),
                },
            )
