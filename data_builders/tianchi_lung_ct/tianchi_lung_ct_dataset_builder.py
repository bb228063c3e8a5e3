"""`tianchi_lung_ct`: Tianchi 2019 chest-CT lesion detection (round 1), from the manual download.

Reads the `<seriesuid>.mhd` / `.raw` CT series and `chestCT_round1_annotation.csv`, whose rows give a
lesion's centre (`coordX, coordY, coordZ`) and per-axis size (`diameterX, diameterY, diameterZ`) in
world millimetres and its class (`label`: 1 nodule, 5 stripe, 31 arteriosclerosis or calcification,
32 lymph-node calcification). Centres become continuous voxel indices with
`medical.world_to_index` (origin, spacing and direction of the series), then boxes in the (z, y, x)
order of the SimpleITK array.

Box coordinates are in voxel-edge units: voxel `array[k, i, j]` covers `[k, k+1) x [i, i+1) x [j, j+1)`,
so a box is `[z_min, y_min, x_min, z_max, y_max, x_max]` (3D) or `[y_min, x_min, y_max, x_max]` (2D),
not clipped to the image, not normalised; 2D boxes are in pixels of the stored (possibly resized) slice.

Configs (`tianchi_lung_ct/<name>`; fields can be overridden, e.g. `--set classes=1,5,31,32`):

- `slices` (default): as the authors (METHOD.md §2.1), one example per slice holding a selected
  lesion's centre: that slice and its two neighbours as 3 channels (edge slices repeat), HU windowed
  to [0, 1], the boxes of the selected classes that cross the slice, and `label`, those boxes filled
  with 1 on background 0. Nodules only (`classes="1"`) by default. Slices keep the series' in-plane
  size unless `image_size` is set (e.g. `--set image_size=256`): then the 3 channels are resized to
  image_size x image_size with OpenCV's `area` interpolation (`imaging.resize`, before the HU window),
  the boxes are scaled per axis to stay in pixel-edge units of the resized image, `label` is filled
  again from the scaled boxes, and `spacing` / `origin` describe the resized pixel grid.
- `volumes`: whole series as int16 Hounsfield units with their 3D boxes, all four classes (native
  size only: `image_size` is refused).

Splits are by series (`medical.split_subjects`, fixed recorded seed). Series without an annotation
row (e.g. the test sets) are left out, and logged.
"""

from __future__ import annotations

import csv
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

ANNOTATION_FILE = "chestCT_round1_annotation.csv"
ANNOTATION_COLUMNS = (
    "seriesuid",
    "coordX",
    "coordY",
    "coordZ",
    "diameterX",
    "diameterY",
    "diameterZ",
    "label",
)
LABEL_NAMES = {
    1: "nodule",
    5: "stripe",
    31: "arteriosclerosis_or_calcification",
    32: "lymph_node_calcification",
}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Register for the Tianchi competition 231724 (2019 "chest CT multi-disease detection", round 1),
download the train parts and the annotation CSV, unpack them, and pass their directory as
manual_dir. Expected tree (the builder searches it recursively, so the part folders may be
nested differently):

  <manual_dir>/
    chestCT_round1/
      chestCT_round1_annotation.csv   (seriesuid,coordX,coordY,coordZ,diameterX,diameterY,diameterZ,label)
      train_part1/
        688588.mhd
        688588.raw
        ...
      train_part2/ ... train_part5/

Exactly one chestCT_round1_annotation.csv must be found. Series with no annotation row (test sets)
are ignored; annotation rows of series that are not there (parts not downloaded) are skipped.
"""


@dataclasses.dataclass(frozen=True)
class Lesion:
    """One annotation row: world centre and size (x, y, z) in mm, class, and row number in the CSV."""

    centre_mm: tuple[float, float, float]
    diameter_mm: tuple[float, float, float]
    label: int
    row: int


def parse_classes(classes: str) -> tuple[int, ...]:
    """Parse a class list such as `"1"`, `"1,5"` or `"1+31+32"` into sorted Tianchi labels.

    Raises:
      ValueError: empty list or a value that is not one of 1, 5, 31, 32.
    """
    values = [v for v in re.split(r"[,+\s]+", classes.strip()) if v]
    try:
        parsed = sorted({int(v) for v in values})
    except ValueError:
        parsed = []
    if not parsed or not set(parsed) <= set(LABEL_NAMES):
        raise ValueError(
            f"Bad classes {classes!r}: expected a comma-separated subset of {sorted(LABEL_NAMES)}."
        )
    return tuple(parsed)


def read_annotations(path: pathlib.Path) -> dict[str, list[Lesion]]:
    """Read `chestCT_round1_annotation.csv` into `{seriesuid: [Lesion, ...]}`.

    Raises:
      ValueError: missing columns, a non-numeric field, a non-positive size or an unknown label; the
        message names the file and the row (1 = the header).
    """
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ANNOTATION_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing columns {', '.join(missing)} (has: {', '.join(columns)}).")
        lesions: dict[str, list[Lesion]] = {}
        for row_number, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            try:
                numbers = [float(row[c]) for c in ANNOTATION_COLUMNS[1:7]]
                label = int(float(row["label"]))
            except ValueError as e:
                raise ValueError(f"{path}, row {row_number}: not a number ({e}).") from e
            if label not in LABEL_NAMES:
                raise ValueError(
                    f"{path}, row {row_number}: label {label} is not one of the known classes "
                    f"{sorted(LABEL_NAMES)}."
                )
            if not all(np.isfinite(numbers)) or min(numbers[3:]) <= 0:
                raise ValueError(
                    f"{path}, row {row_number}: centre and diameters must be finite, diameters > 0."
                )
            lesions.setdefault(row["seriesuid"], []).append(
                Lesion(tuple(numbers[:3]), tuple(numbers[3:]), label, row_number)
            )
    return lesions


def lesion_boxes(lesions: list[Lesion], volume: medical.Volume, annotation_path: pathlib.Path) -> np.ndarray:
    """3D boxes `[z_min, y_min, x_min, z_max, y_max, x_max]` (voxel-edge units) of lesions in a volume.

    Raises:
      ValueError: a lesion centre lies outside the volume (a wrong series or geometry); the message
        names the CSV row and the series file.
    """
    if not lesions:
        return np.zeros((0, 6), np.float32)
    centres = medical.world_to_index([les.centre_mm for les in lesions], volume)[:, ::-1]  # (z, y, x)
    sizes = medical.world_extent_to_index([les.diameter_mm for les in lesions], volume)[:, ::-1]
    # Continuous index 0 is the centre of voxel 0, whose edges are at 0 and 1 in edge units.
    centres = centres + 0.5
    for lesion, centre in zip(lesions, centres):
        if np.any(centre < 0) or np.any(centre > volume.array.shape):
            raise ValueError(
                f"{annotation_path}, row {lesion.row}: lesion centre {lesion.centre_mm} mm falls at voxel "
                f"(z, y, x) {np.round(centre - 0.5, 2).tolist()}, outside {volume.path} of shape "
                f"{volume.array.shape}."
            )
    return np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1).astype(np.float32)


def fill_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """The filled-box label image: 1 on pixels whose centre lies in a 2D box, else 0.

    A box too small to hold a pixel centre fills the pixel holding its own centre.

    Args:
      boxes: (n, 4) `[y_min, x_min, y_max, x_max]` in pixel-edge units.
      height: image height.
      width: image width.

    Returns:
      (height, width) uint8.
    """
    label = np.zeros((height, width), np.uint8)
    for y_min, x_min, y_max, x_max in boxes:
        # Pixel i's centre is at i + 1/2: keep the i with y_min <= i + 1/2 <= y_max.
        rows = _covered(y_min, y_max, height)
        cols = _covered(x_min, x_max, width)
        label[rows, cols] = 1
    return label


def _covered(low: float, high: float, size: int) -> slice:
    first, last = int(np.ceil(low - 0.5)), int(np.floor(high - 0.5))
    if first > last:
        first = last = int(np.floor((low + high) / 2))
    return slice(max(first, 0), max(min(last + 1, size), 0))


def window(array: np.ndarray, config: TianchiConfig) -> np.ndarray:
    """Scale HU to [0, 1]: the config's HU window, or min-max over the given array."""
    if config.intensity == "window":
        return medical.minmax_scale(array, config.hu_min, config.hu_max)
    return medical.minmax_scale(array, float(array.min()), float(array.max()))


@dataclasses.dataclass
class TianchiConfig(tfds.core.BuilderConfig):
    """What to emit; `data_builders.build(..., field=value)` overrides any field.

    Attributes:
      volumes: whole series with 3D boxes instead of 3-slice 2D examples.
      classes: Tianchi labels to keep, comma-separated subset of 1, 5, 31, 32 (other boxes are dropped;
        in `slices`, only slices holding a kept lesion make examples).
      all_box_slices: `slices` only: one example per slice crossed by a kept box, instead of only the
        slices holding a box centre.
      intensity: `slices` only: `window` (clip to [hu_min, hu_max], scale to [0, 1]) or `minmax`
        (per example, over its three slices).
      image_size: `slices` only: stored height and width in pixels (>= 8); the slices are resized to a
        square with `area` interpolation, boxes scaled, `label` filled again from the scaled boxes. 0
        (the default) keeps each series' native in-plane size. `volumes` refuses it (must stay 0).
        0 rather than None means "native", as in `imaging.ImageConfig`: `data_builders.build` and
        `--set` convert overrides to the type of the field's default.
      hu_min: lower end of the HU window.
      hu_max: upper end of the HU window.
      validation_fraction: share of the series in `validation`.
      test_fraction: share of the series in `test`.
      split_seed: seed of the series split (recorded in `info.metadata`).
    """

    volumes: bool = False
    classes: str = "1"
    all_box_slices: bool = False
    intensity: str = "window"
    image_size: int = 0
    hu_min: float = -1200.0
    hu_max: float = 600.0
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0

    def __post_init__(self):
        parse_classes(self.classes)
        if self.intensity not in ("window", "minmax"):
            raise ValueError(f"TianchiConfig {self.name!r}: intensity must be 'window' or 'minmax'.")
        if (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or not (self.image_size == 0 or self.image_size >= 8)
        ):
            raise ValueError(
                f"TianchiConfig {self.name!r}: image_size must be 0 (native size) or an int >= 8, "
                f"got {self.image_size!r}."
            )
        if self.volumes and self.image_size != 0:
            raise ValueError(
                f"TianchiConfig {self.name!r}: volumes keep their native size and geometry; image_size "
                f"applies to slices only and must be 0, got {self.image_size}."
            )
        if self.hu_max <= self.hu_min:
            raise ValueError(f"TianchiConfig {self.name!r}: hu_max must be above hu_min.")
        for field in ("validation_fraction", "test_fraction"):
            if not 0 <= getattr(self, field) < 1:
                raise ValueError(f"TianchiConfig {self.name!r}: {field} must be in [0, 1).")
        if self.split_seed < 0:
            raise ValueError(f"TianchiConfig {self.name!r}: split_seed must be >= 0.")


class Builder(base.ArrayRecordBuilder):
    """Tianchi 2019 chest CT from the manual download (see the module docstring and README.md)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: 3-slice 2D examples and whole volumes with boxes.",
        "1.1.0": "Float32 slices and int16 volumes stored as raw bytes instead of zlib "
        "(`schema.IMAGE_ENCODING`): the same values, written several times faster.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        TianchiConfig(
            name="slices",
            description="Annotated slice and its 2 neighbours (3 channels), nodule boxes, filled-box label.",
        ),
        TianchiConfig(
            name="volumes",
            description="Whole CT series (int16 HU) with 3D boxes of all four classes.",
            volumes=True,
            classes="1,5,31,32",
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        config: TianchiConfig = self.builder_config
        generation = {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(config)
            if f.name not in {g.name for g in dataclasses.fields(tfds.core.BuilderConfig)}
        }
        return self.dataset_info_from_configs(
            features=_volume_features() if config.volumes else _slice_features(config.image_size),
            metadata=tfds.core.MetadataDict(
                label_names={str(k): v for k, v in LABEL_NAMES.items()},
                classes=list(parse_classes(config.classes)),
                box_format="voxel-edge units; 2D [y_min, x_min, y_max, x_max], 3D [z_min, y_min, x_min, "
                "z_max, y_max, x_max]; voxel (k, i, j) covers [k, k+1) x [i, i+1) x [j, j+1)"
                + ("; 2D boxes in pixels of the resized image" if config.image_size else ""),
                split_seed=config.split_seed,
                generation=generation,
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        config: TianchiConfig = self.builder_config
        root = medical.open_manual_dir(dl_manager, "tianchi_lung_ct")
        csv_files = sorted(root.rglob(ANNOTATION_FILE))
        if len(csv_files) != 1:
            found = ", ".join(map(str, csv_files)) or "none"
            raise FileNotFoundError(
                f"tianchi_lung_ct: expected exactly one {ANNOTATION_FILE} under manual_dir {root}, found "
                f"{found}. Expected:\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        annotation_path = csv_files[0]
        lesions = read_annotations(annotation_path)
        series: dict[str, pathlib.Path] = {}
        for path in sorted(root.rglob("*.mhd")):
            if path.stem in series:
                raise ValueError(
                    f"tianchi_lung_ct: series {path.stem} found twice: {series[path.stem]} and {path}."
                )
            series[path.stem] = path
        annotated = sorted(uid for uid in series if uid in lesions)
        unannotated = len(series) - len(annotated)
        absent = sorted(set(lesions) - set(series))
        if unannotated:
            log.info("tianchi_lung_ct: %d .mhd series have no annotation row and are left out.", unannotated)
        if absent:
            log.warning(
                "tianchi_lung_ct: %d annotated series are not under %s (e.g. %s); their rows are skipped.",
                len(absent),
                root,
                ", ".join(absent[:3]),
            )
        if not annotated:
            raise FileNotFoundError(
                f"tianchi_lung_ct: none of the {len(series)} .mhd series under {root} is in "
                f"{annotation_path}."
            )
        # The split is made over every annotated series, whatever the kept classes, so that a series
        # stays in the same split in every config (no leakage between class selections).
        splits = medical.split_subjects(
            annotated,
            validation_fraction=config.validation_fraction,
            test_fraction=config.test_fraction,
            seed=config.split_seed,
        )
        if not config.volumes:
            # Only series holding a kept lesion make 2D examples, and TFDS refuses an empty split.
            classes = parse_classes(config.classes)
            kept = {
                split: [u for u in uids if any(les.label in classes for les in lesions[u])]
                for split, uids in splits.items()
            }
            for split in [split for split, uids in kept.items() if not uids]:
                log.warning(
                    "tianchi_lung_ct: no series of split %s holds classes %s; the split is left out.",
                    split,
                    config.classes,
                )
            splits = {split: uids for split, uids in kept.items() if uids}
            if not splits:
                raise ValueError(
                    f"tianchi_lung_ct: no annotation in {annotation_path} has a class in {config.classes!r}."
                )
        self.info.metadata.update(
            subjects=splits,
            annotation_file=str(annotation_path.relative_to(root)),
            source_series={uid: str(series[uid].relative_to(root)) for uid in annotated},
        )
        return {
            split: self._generate_examples(
                [(uid, series[uid], lesions[uid]) for uid in uids], annotation_path
            )
            for split, uids in splits.items()
        }

    def _generate_examples(
        self, items: list[tuple[str, pathlib.Path, list[Lesion]]], annotation_path: pathlib.Path
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        config: TianchiConfig = self.builder_config
        classes = parse_classes(config.classes)
        for uid, path, all_lesions in items:
            volume = medical.read_volume(path)
            lesions = [les for les in all_lesions if les.label in classes]
            boxes = lesion_boxes(lesions, volume, annotation_path)
            labels = np.array([les.label for les in lesions], np.int32)
            if config.volumes:
                yield uid, _volume_example(uid, volume, lesions, boxes, labels)
            else:
                yield from _slice_examples(uid, volume, boxes, labels, config)


def _geometry_features() -> dict[str, tfds.features.Tensor]:
    return {
        "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32, doc="Voxel size (x, y, z), mm."),
        "origin": tfds.features.Tensor(
            shape=(3,), dtype=np.float32, doc="Position (mm) of voxel (0, 0[, 0])."
        ),
        "direction": tfds.features.Tensor(shape=(9,), dtype=np.float32, doc="Direction cosines, row-major."),
    }


def _slice_features(image_size: int) -> tfds.features.FeaturesDict:
    """Features of the `slices` config: (image_size, image_size) images, (None, None) when it is 0."""
    return tfds.features.FeaturesDict(
        {
            "image": imaging.image_feature(
                image_size,
                3,
                "Slices k-1, k, k+1 as channels, scaled to [0, 1] (see info.metadata['generation']).",
            ),
            "label": imaging.mask_feature(image_size, "1 inside a box of slice k, else 0."),
            "boxes": tfds.features.Tensor(
                shape=(None, 4), dtype=np.float32, doc="[y_min, x_min, y_max, x_max], pixel-edge units."
            ),
            "box_labels": tfds.features.Tensor(
                shape=(None,), dtype=np.int32, doc="Tianchi class of each box."
            ),
            "id": tfds.features.Text(doc="Unique example key, '<seriesuid>/slice0123'."),
            "subject_id": tfds.features.Text(doc="The seriesuid."),
            "slice_index": tfds.features.Scalar(dtype=np.int32, doc="Index k of the centre slice."),
            **_geometry_features(),
        }
    )


def _volume_features() -> tfds.features.FeaturesDict:
    """Features of the `volumes` config."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(
                shape=(None, None, None),
                dtype=np.int16,
                encoding=schema.IMAGE_ENCODING,
                doc="(z, y, x) Hounsfield units as stored.",
            ),
            "boxes": tfds.features.Tensor(
                shape=(None, 6),
                dtype=np.float32,
                doc="[z_min, y_min, x_min, z_max, y_max, x_max], voxel-edge units.",
            ),
            "box_labels": tfds.features.Tensor(
                shape=(None,), dtype=np.int32, doc="Tianchi class of each box."
            ),
            "box_centres_mm": tfds.features.Tensor(
                shape=(None, 3), dtype=np.float32, doc="Annotated world centre (x, y, z), mm."
            ),
            "box_diameters_mm": tfds.features.Tensor(
                shape=(None, 3), dtype=np.float32, doc="Annotated size (x, y, z), mm."
            ),
            "id": tfds.features.Text(doc="Unique example key: the seriesuid."),
            "subject_id": tfds.features.Text(doc="The seriesuid."),
            **_geometry_features(),
        }
    )


def _as_int16(volume: medical.Volume) -> np.ndarray:
    """The volume as int16 HU, refusing values that do not fit."""
    array = volume.array
    if array.dtype == np.int16:
        return array
    if not np.issubdtype(array.dtype, np.integer) or array.min() < -32768 or array.max() > 32767:
        raise ValueError(f"{volume.path}: {array.dtype} values do not fit int16 Hounsfield units.")
    return array.astype(np.int16)


def _volume_example(
    uid: str, volume: medical.Volume, lesions: list[Lesion], boxes: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    return {
        "image": _as_int16(volume),
        "boxes": boxes,
        "box_labels": labels,
        "box_centres_mm": np.array([les.centre_mm for les in lesions], np.float32).reshape(-1, 3),
        "box_diameters_mm": np.array([les.diameter_mm for les in lesions], np.float32).reshape(-1, 3),
        "id": uid,
        "subject_id": uid,
        **volume.geometry(),
    }


def _slice_examples(
    uid: str, volume: medical.Volume, boxes: np.ndarray, labels: np.ndarray, config: TianchiConfig
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The 3-slice examples of one series: slices holding a box centre (or crossed by a box)."""
    depth, height, width = volume.array.shape
    z_min, z_max = boxes[:, 0], boxes[:, 3]
    if config.all_box_slices:
        # Slice k covers [k, k+1): a box crosses it when z_min < k + 1 and z_max > k.
        slices = {k for lo, hi in zip(z_min, z_max) for k in range(int(np.floor(lo)), int(np.ceil(hi)))}
    else:
        slices = {int(np.floor((lo + hi) / 2)) for lo, hi in zip(z_min, z_max)}
    size = config.image_size
    # Source pixels per stored pixel along y and x (1 at native size).
    scale_y, scale_x = (height / size, width / size) if size else (1.0, 1.0)
    # Stored pixel n (edges [n, n+1)) covers source edges [n s, (n+1) s): its centre is at continuous
    # source index (n + 1/2) s - 1/2, the half-pixel convention of OpenCV's resize.
    offset_y, offset_x = scale_y / 2 - 0.5, scale_x / 2 - 0.5
    out_height, out_width = (size, size) if size else (height, width)
    for k in sorted(s for s in slices if 0 <= s < depth):
        crossing = (z_min < k + 1) & (z_max > k)
        slice_boxes = boxes[crossing][:, [1, 2, 4, 5]]
        neighbours = np.clip([k - 1, k, k + 1], 0, depth - 1)
        image = np.moveaxis(volume.array[neighbours], 0, -1)
        if size:
            # Resize the HU values first, then window, as `imaging.prepare_image` normalises after
            # resizing (so `minmax` spans [0, 1] exactly).
            image = imaging.resize(image.astype(np.float32), size, "area")
            # Edge units scale exactly: source edge e is stored edge e / s.
            slice_boxes = (slice_boxes / np.array([scale_y, scale_x, scale_y, scale_x])).astype(np.float32)
        # `label` is filled from the (scaled) boxes rather than resized: a nearest-resized label would
        # disagree with the scaled boxes near their edges and could lose boxes narrower than a stored
        # pixel, whereas filling keeps `label` exactly "1 on the stored pixels whose centre lies in a
        # box of slice k (or the pixel holding a too-small box's centre)", as at native size.
        key = f"{uid}/slice{k:04d}"
        spacing, origin = medical.resampled_geometry(
            volume, (offset_x, offset_y, float(k)), (scale_x, scale_y, 1.0)
        )
        yield (
            key,
            {
                "image": window(image, config),
                "label": fill_boxes(slice_boxes, out_height, out_width),
                "boxes": slice_boxes,
                "box_labels": labels[crossing],
                "id": key,
                "subject_id": uid,
                "slice_index": k,
                **volume.geometry(origin=origin, spacing=spacing),
            },
        )
