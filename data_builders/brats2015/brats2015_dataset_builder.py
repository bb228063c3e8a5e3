"""`brats2015`: BRATS 2015 registered T1/T2/T1c/FLAIR brain MR with tumour labels, from the manual download.

Reads `BRATS2015_Training/{HGG,LGG}/<patient>/<series>/<series>.mha` (and, when present, the label-less
`BRATS2015_Testing/HGG_LGG/...`). The series of a patient are matched by the modality token, a whole
dot-separated part of the series name (`MR_Flair`, `MR_T1`, `MR_T1c`, `MR_T2`, `OT`), never by the
numeric id, and never by prefix: `MR_T1` is a prefix of `MR_T1c`.

Configs (`brats2015/<name>`; every field can be overridden, e.g. `--set slice_start=55`):

- `slices` (default): the 2D axial slices of the authors' protocol (METHOD.md §2.1): slices 50:105 of
  the 155, rows 38:222 and columns 48:192, i.e. 55 slices of 184 x 144 per subject, with the features
  of `data_builders.schema.brats_like_features` (the phantom's), so the trainer reads them unchanged.
- `volumes`: whole subjects, (z, y, x, 4) float32 and (z, y, x) uint8 label, for 3D work.

Intensities: each modality of each subject is min-max scaled to [0, 1] over its whole 3D volume (all
slices, before cropping), as the authors did; labels are the raw 0-4 classes. Splits are by subject,
train/validation/test from a fixed, recorded seed (`medical.split_subjects`), which fixes the authors'
leakage of training subjects into their test set (METHOD.md §11.1); the Testing tree becomes the split
`unlabelled`, whose `label` is all zeros.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_builders import base, medical, schema

log = logging.getLogger(__name__)

TRAINING_DIR = "BRATS2015_Training"
TESTING_DIR = "BRATS2015_Testing"
UNLABELLED_SPLIT = "unlabelled"
_TOKENS = {"t1": "MR_T1", "t2": "MR_T2", "t1c": "MR_T1c", "flair": "MR_Flair"}
# Series token of each modality, in the project's channel order (`schema.BRATS_MODALITIES`).
MODALITY_TOKENS = {modality: _TOKENS[modality] for modality in schema.BRATS_MODALITIES}
LABEL_TOKEN = "OT"

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Register at the SMIR BRATS 2015 page (https://www.smir.ch/BRATS/Start2015), download
BRATS2015_Training (and optionally BRATS2015_Testing), unpack them, and pass the directory that holds
them as manual_dir. Expected tree (the series ids vary; the modality token is what counts):

  <manual_dir>/
    BRATS2015_Training/
      HGG/
        brats_2013_pat0001_1/
          VSD.Brain.XX.O.MR_Flair.54512/VSD.Brain.XX.O.MR_Flair.54512.mha
          VSD.Brain.XX.O.MR_T1.54513/VSD.Brain.XX.O.MR_T1.54513.mha
          VSD.Brain.XX.O.MR_T1c.54514/VSD.Brain.XX.O.MR_T1c.54514.mha
          VSD.Brain.XX.O.MR_T2.54515/VSD.Brain.XX.O.MR_T2.54515.mha
          VSD.Brain_3more.XX.O.OT.54517/VSD.Brain_3more.XX.O.OT.54517.mha
        ...
      LGG/
        brats_2013_pat0001_1/ ...
    BRATS2015_Testing/            (optional: becomes the label-less split 'unlabelled')
      HGG_LGG/
        <patient>/  (the four MR_* series, no OT)

BRATS2015_Training may also be manual_dir itself or lie up to two levels below it.
"""


def series_token(name: str) -> str | None:
    """The modality token of a series or file name, matched as a whole dot-separated part.

    `"VSD.Brain.XX.O.MR_T1c.54514.mha"` gives `"MR_T1c"`, `"VSD.Brain.XX.O.MR_T1.54513.mha"` gives
    `"MR_T1"`: whole-part matching is what keeps `MR_T1` from matching `MR_T1c` files. Case is ignored.

    Returns:
      The token, or None if the name holds none (or more than one).
    """
    parts = {part.lower() for part in name.split(".")}
    found = [token for token in (*MODALITY_TOKENS.values(), LABEL_TOKEN) if token.lower() in parts]
    return found[0] if len(found) == 1 else None


@dataclasses.dataclass(frozen=True)
class Patient:
    """One patient folder: its subject id, group (`HGG`, `LGG`, `HGG_LGG`) and series files by token."""

    subject_id: str
    group: str
    folder: pathlib.Path
    series: dict[str, pathlib.Path]


def find_patient(folder: pathlib.Path, group: str, *, labelled: bool) -> Patient:
    """Match the `.mha` series under a patient folder to modality tokens.

    Args:
      folder: the patient folder, e.g. `.../HGG/brats_2013_pat0001_1`.
      group: the folder it lies in (`HGG`, `LGG` or `HGG_LGG`).
      labelled: whether the `OT` label series is required.

    Returns:
      The `Patient`, with subject id `"{group}_{folder name}"` (unique across groups).

    Raises:
      ValueError: a needed token has no series, or several; the message names the folder.
    """
    tokens = list(MODALITY_TOKENS.values()) + ([LABEL_TOKEN] if labelled else [])
    found: dict[str, list[pathlib.Path]] = {token: [] for token in tokens}
    for path in sorted(folder.rglob("*.mha")):
        token = series_token(path.name[: -len(".mha")])
        if token in found:
            found[token].append(path)
    missing = [token for token in tokens if not found[token]]
    if missing:
        raise ValueError(
            f"BRATS patient folder {folder} has no series for {', '.join(missing)} (expected a series "
            f"folder like VSD.Brain.XX.O.{missing[0]}.<id>/ holding one .mha file)."
        )
    repeated = {token: paths for token, paths in found.items() if len(paths) > 1}
    if repeated:
        token, paths = next(iter(repeated.items()))
        raise ValueError(
            f"BRATS patient folder {folder} has {len(paths)} series for {token}: "
            + ", ".join(str(p.relative_to(folder)) for p in paths)
        )
    return Patient(
        subject_id=f"{group}_{folder.name}",
        group=group,
        folder=folder,
        series={token: paths[0] for token, paths in found.items()},
    )


def _find_tree(root: pathlib.Path, name: str) -> pathlib.Path | None:
    """`root` itself or the first directory named `name` at most two levels below it."""
    candidates = [root, *sorted(root.glob("*")), *sorted(root.glob("*/*"))]
    for path in candidates:
        if path.is_dir() and path.name.lower() == name.lower():
            return path
    return None


def _patients(tree: pathlib.Path, *, labelled: bool) -> list[Patient]:
    """Every patient folder of a `BRATS2015_Training` or `BRATS2015_Testing` tree."""
    patients = []
    for group in sorted(p for p in tree.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))):
        for folder in sorted(p for p in group.iterdir() if p.is_dir() and not p.name.startswith(".")):
            patients.append(find_patient(folder, group.name, labelled=labelled))
    return patients


def _resolve_range(start: int, stop: int, length: int, what: str, path: pathlib.Path) -> tuple[int, int]:
    """`[start, stop)` of an axis of `length` voxels; `stop <= 0` counts from the end (0: to the end)."""
    end = stop if stop > 0 else length + stop
    if not 0 <= start < end <= length:
        raise ValueError(
            f"{path}: the configured {what} {start}:{stop} does not fit an axis of {length} voxels "
            f"(override the config's {what} fields for volumes of this size)."
        )
    return start, end


@dataclasses.dataclass
class Brats2015Config(tfds.core.BuilderConfig):
    """What to cut out of each subject; `data_builders.build(..., field=value)` overrides any field.

    Ranges are `[start, stop)` array indices (z for slices, y for rows, x for columns, in SimpleITK's
    (z, y, x) array order); a `stop` of 0 or below counts from the end (0: up to the end).

    Attributes:
      volumes: emit whole (cropped) subjects instead of 2D slices.
      slice_start: first axial slice (authors' code: 50; their paper says 55).
      slice_stop: axial slice after the last one (authors: 105).
      row_start: first row of the crop (authors: 38).
      row_stop: row after the crop (authors: 222).
      col_start: first column of the crop (authors: 48).
      col_stop: column after the crop (authors: 192).
      image_height: working height the crop is resized to (slices: > 0; volumes: 0 keeps the crop).
      image_width: working width (same rules).
      interpolation: `linear` or `nearest` resizing of the images (labels are always nearest).
      validation_fraction: share of the labelled subjects in `validation`.
      test_fraction: share of the labelled subjects in `test`.
      split_seed: seed of the subject split (recorded in `info.metadata`).
      include_testing: turn `BRATS2015_Testing`, when present, into the split `unlabelled`.
    """

    volumes: bool = False
    slice_start: int = 50
    slice_stop: int = 105
    row_start: int = 38
    row_stop: int = 222
    col_start: int = 48
    col_stop: int = 192
    image_height: int = 184
    image_width: int = 144
    interpolation: str = "linear"
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    include_testing: bool = True

    def __post_init__(self):
        for field in ("slice_start", "row_start", "col_start", "image_height", "image_width", "split_seed"):
            if getattr(self, field) < 0:
                raise ValueError(f"Brats2015Config {self.name!r}: {field} must be >= 0.")
        if not self.volumes and (self.image_height < 1 or self.image_width < 1):
            raise ValueError(f"Brats2015Config {self.name!r}: 2D slices need image_height, image_width > 0.")
        if self.interpolation not in ("linear", "nearest"):
            raise ValueError(
                f"Brats2015Config {self.name!r}: interpolation must be 'linear' or 'nearest', "
                f"got {self.interpolation!r}."
            )
        for field in ("validation_fraction", "test_fraction"):
            if not 0 <= getattr(self, field) < 1:
                raise ValueError(f"Brats2015Config {self.name!r}: {field} must be in [0, 1).")


class Builder(base.ArrayRecordBuilder):
    """BRATS 2015 from the manual download (see the module docstring and README.md)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: 2D slices and whole volumes, subject-level seeded split.",
        "1.1.0": "Images stored as raw float32 bytes instead of zlib (`schema.IMAGE_ENCODING`): the same "
        "values, a build ~6x faster.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        Brats2015Config(
            name="slices",
            description="Axial slices 50:105, crop rows 38:222 x cols 48:192 (184x144), as the authors.",
        ),
        Brats2015Config(
            name="volumes",
            description="Whole subjects (z, y, x, 4) with their label volume, for 3D work.",
            volumes=True,
            slice_start=0,
            slice_stop=0,
            row_start=0,
            row_stop=0,
            col_start=0,
            col_stop=0,
            image_height=0,
            image_width=0,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        config: Brats2015Config = self.builder_config
        if config.volumes:
            features = _volume_features()
        else:
            features = schema.brats_like_features(
                config.image_height, config.image_width, len(MODALITY_TOKENS)
            )
        generation = {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(config)
            if f.name not in {g.name for g in dataclasses.fields(tfds.core.BuilderConfig)}
        }
        return self.dataset_info_from_configs(
            features=features,
            metadata=schema.dataset_metadata(
                schema.BRATS_MODALITIES,
                schema.BRATS_LABEL_NAMES,
                series_tokens=dict(MODALITY_TOKENS, label=LABEL_TOKEN),
                intensity="per subject and modality: (x - min) / (max - min) over the whole 3D volume",
                split_seed=config.split_seed,
                generation=generation,
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        config: Brats2015Config = self.builder_config
        root = medical.open_manual_dir(dl_manager, "brats2015")
        training = _find_tree(root, TRAINING_DIR)
        if training is None:
            entries = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
            raise FileNotFoundError(
                f"brats2015: no {TRAINING_DIR} directory in manual_dir {root} (found: {entries}). "
                f"Expected:\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        patients = {p.subject_id: p for p in _patients(training, labelled=True)}
        if not patients:
            raise FileNotFoundError(f"brats2015: {training} holds no patient folders (expected HGG/, LGG/).")
        splits = medical.split_subjects(
            patients,
            validation_fraction=config.validation_fraction,
            test_fraction=config.test_fraction,
            seed=config.split_seed,
        )
        testing = _find_tree(root, TESTING_DIR) if config.include_testing else None
        if testing is not None:
            unlabelled = {p.subject_id: p for p in _patients(testing, labelled=False)}
            patients.update(unlabelled)
            if unlabelled:
                splits[UNLABELLED_SPLIT] = sorted(unlabelled)
        self.info.metadata.update(
            subjects=splits,
            groups={s: p.group for s, p in sorted(patients.items())},
            unlabelled_splits=[UNLABELLED_SPLIT] if UNLABELLED_SPLIT in splits else [],
            source_series={
                s: {
                    name: str(p.series[token].relative_to(root))
                    for name, token in dict(MODALITY_TOKENS, label=LABEL_TOKEN).items()
                    if token in p.series
                }
                for s, p in sorted(patients.items())
            },
        )
        return {
            split: self._generate_examples([patients[s] for s in subjects])
            for split, subjects in splits.items()
        }

    def _generate_examples(self, patients: list[Patient]) -> Iterator[tuple[str, dict[str, Any]]]:
        config: Brats2015Config = self.builder_config
        for patient in patients:
            yield from _subject_examples(patient, config)


def _volume_features() -> tfds.features.FeaturesDict:
    """Features of the `volumes` config: one whole subject per example."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(
                shape=(None, None, None, len(MODALITY_TOKENS)),
                dtype=np.float32,
                encoding=schema.IMAGE_ENCODING,
                doc="(z, y, x, modality) in [0, 1]; modalities in info.metadata['modalities'].",
            ),
            "label": tfds.features.Tensor(
                shape=(None, None, None),
                dtype=np.uint8,
                encoding=schema.LABEL_ENCODING,
                doc="(z, y, x) BRATS classes 0-4; all zeros in the 'unlabelled' split.",
            ),
            "id": tfds.features.Text(doc="Unique example key: the subject id."),
            "subject_id": tfds.features.Text(
                doc="'{group}_{patient folder}', e.g. 'HGG_brats_2013_pat0001_1'."
            ),
            "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32, doc="Voxel size (x, y, z), mm."),
            "origin": tfds.features.Tensor(
                shape=(3,), dtype=np.float32, doc="Position (mm) of voxel (0, 0, 0)."
            ),
            "direction": tfds.features.Tensor(
                shape=(9,), dtype=np.float32, doc="Direction cosines, row-major."
            ),
        }
    )


def _read_subject(patient: Patient) -> tuple[dict[str, medical.Volume], medical.Volume | None]:
    """Read a patient's modalities (project order) and label, checking shapes and label values."""
    images = {name: medical.read_volume(patient.series[token]) for name, token in MODALITY_TOKENS.items()}
    label = medical.read_volume(patient.series[LABEL_TOKEN]) if LABEL_TOKEN in patient.series else None
    reference = images["t1"]
    for volume in [*images.values(), *([label] if label is not None else [])]:
        if volume.array.shape != reference.array.shape:
            raise ValueError(
                f"BRATS patient {patient.folder}: {volume.path.name} has shape {volume.array.shape} but "
                f"{reference.path.name} has {reference.array.shape} (z, y, x); the series must be registered."
            )
        if not (
            np.allclose(volume.spacing, reference.spacing, atol=1e-3)
            and np.allclose(volume.origin, reference.origin, atol=1e-2)
        ):
            log.warning(
                "BRATS patient %s: %s has another geometry than %s; using the T1 geometry.",
                patient.folder,
                volume.path.name,
                reference.path.name,
            )
    # Two cheap passes (min, max); np.unique (sorting or hashing ~9M voxels) only runs to name bad values.
    classes = len(schema.BRATS_LABEL_NAMES)
    if label is not None and (label.array.min() < 0 or label.array.max() >= classes):
        values = np.unique(label.array)
        unknown = values[(values < 0) | (values >= classes)]
        raise ValueError(
            f"BRATS label file {label.path} holds values {unknown.tolist()} outside the known classes 0-4."
        )
    return images, label


def _subject_examples(patient: Patient, config: Brats2015Config) -> Iterator[tuple[str, dict[str, Any]]]:
    """The examples (slices, or one volume) of one patient."""
    images, label = _read_subject(patient)
    reference = images["t1"]
    depth, height, width = reference.array.shape
    z0, z1 = _resolve_range(
        config.slice_start, config.slice_stop, depth, "slice_start/slice_stop", reference.path
    )
    y0, y1 = _resolve_range(config.row_start, config.row_stop, height, "row_start/row_stop", reference.path)
    x0, x1 = _resolve_range(config.col_start, config.col_stop, width, "col_start/col_stop", reference.path)
    out_height = config.image_height or (y1 - y0)
    out_width = config.image_width or (x1 - x0)
    # Scale over the whole volume (the authors' normalisation), then crop, then resize.
    image = np.stack(
        [
            medical.minmax_scale(v.array[z0:z1, y0:y1, x0:x1], v.array.min(), v.array.max())
            for v in images.values()
        ],
        axis=-1,
    )
    image = medical.resize_yx(image, out_height, out_width, config.interpolation, axes=(1, 2))
    if label is not None:
        labels = label.array[z0:z1, y0:y1, x0:x1].astype(np.uint8)
        labels = medical.resize_yx(labels, out_height, out_width, "nearest", axes=(1, 2))
    else:
        labels = np.zeros(image.shape[:3], np.uint8)
    # New pixel (i, j) samples the source's continuous index (x0 + sx (j + 1/2) - 1/2, y0 + ...).
    scale_x, scale_y = (x1 - x0) / out_width, (y1 - y0) / out_height
    offset = np.array([x0 + scale_x / 2 - 0.5, y0 + scale_y / 2 - 0.5, z0])
    subject = patient.subject_id
    if config.volumes:
        spacing, origin = medical.resampled_geometry(reference, offset, (scale_x, scale_y, 1.0))
        yield (
            subject,
            {
                "image": image,
                "label": labels,
                "id": subject,
                "subject_id": subject,
                **reference.geometry(origin=origin, spacing=spacing),
            },
        )
        return
    for k in range(z1 - z0):
        key = f"{subject}/slice{z0 + k:03d}"
        spacing, origin = medical.resampled_geometry(reference, offset + [0, 0, k], (scale_x, scale_y, 1.0))
        yield (
            key,
            {
                "image": image[k],
                "label": labels[k],
                "id": key,
                "subject_id": subject,
                "slice_index": z0 + k,
                **reference.geometry(origin=origin, spacing=spacing),
            },
        )
