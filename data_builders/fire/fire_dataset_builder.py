"""`fire`: FIRE, the Fundus Image Registration dataset: 134 pairs of colour fundus photographs.

The project uses FIRE's 268 images for unconditional retina synthesis (METHOD.md §2.1), so the
default config gives single images; the registration data (pairs and their control points) are
optional features, present when the download has them.

- `images` (default): one example per photograph `Images/A01_1.jpg`: `image` (S, S, 3) float32 RGB
  in [0, 1] (per-image min-max), `mask` (S, S) uint8, the field of view of `Masks/mask.png` (all
  zeros and `has_mask` False without it), `id` (`A01_1`), `pair_id` (`A01`), `category` (A, P or
  S), `view` (1 = the fixed image of the pair, 2 = the moving one), and `control_points` (N, 2)
  float32: this image's side of the pair's correspondences, as (x, y) pixel coordinates of the
  stored image; N varies from pair to pair, and is 0 with `has_control_points` False when
  `Ground Truth/control_points_A01_1_2.txt` is missing.
- `pairs`: one example per pair: `fixed_image` and `moving_image` (S, S, 3), `control_points`
  (N, 4) as `x_fixed, y_fixed, x_moving, y_moving`, `has_control_points`, `mask`, `has_mask`,
  `id` (`A01`) and `category`.

Control points are moved with the images when they are resized (OpenCV's pixel-centre convention:
`x' = (x + 1/2) * S / width - 1/2`); `source_shape` keeps each file's (height, width) to map back.
Everything goes to one `train` split, as the authors use all of FIRE for training.
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

KINDS = ("images", "pairs")
# FIRE's categories: S, large overlap and no anatomical change; P, small overlap; A, anatomical
# changes between the two visits.
CATEGORIES = ("A", "P", "S")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
GROUND_TRUTH = "Ground Truth"
_IMAGE_NAME = re.compile(r"^(?P<pair>(?P<category>[APS])\d+)_(?P<view>[12])$", re.IGNORECASE)

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download FIRE (https://projects.ics.forth.gr/cvrl/fire/) and unpack it into manual_dir.
The builder uses the shallowest directory, at most three levels down, that holds Images/:

    manual_dir/
      FIRE/
        Images/
          A01_1.jpg, A01_2.jpg, ..., P01_1.jpg, ..., S01_1.jpg, ...
        Ground Truth/
          control_points_A01_1_2.txt, ...   (optional; lines "x_fixed y_fixed x_moving y_moving")
        Masks/
          mask.png, feature_mask.png         (optional; mask.png is the field of view)

Both images of every pair are needed (A01_1 is the fixed image, A01_2 the moving one).
"""


@dataclasses.dataclass
class FireConfig(imaging.ImageConfig):
    """Image preparation (see `imaging.ImageConfig`) and the kind of example.

    Attributes:
      kind: `"images"` (one example per photograph) or `"pairs"` (one per registration pair).
    """

    kind: str = "images"

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in KINDS:
            raise ValueError(f"Config {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class FirePair:
    """The two photographs of one pair and its control-point file (None if the download has none)."""

    pair_id: str
    category: str
    fixed: pathlib.Path
    moving: pathlib.Path
    control_points: pathlib.Path | None


def read_control_points(path: pathlib.Path) -> np.ndarray:
    """Read a FIRE control-point file: one `x_fixed y_fixed x_moving y_moving` line per correspondence.

    Blank lines are skipped.

    Returns:
      (N, 4) float32, in the source images' pixel coordinates.

    Raises:
      ValueError: a line that is not four finite numbers; the message names the file and line.
    """
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(f) for f in fields]
        except ValueError:
            values = []
        if len(values) != 4 or not np.isfinite(values).all():
            raise ValueError(
                f"{path}:{number}: expected 4 numbers 'x_fixed y_fixed x_moving y_moving', got {line!r}."
            )
        rows.append(values)
    return np.array(rows, np.float32).reshape(-1, 4)


def find_pairs(root: pathlib.Path) -> list[FirePair]:
    """Pair `Images/X_1` with `Images/X_2` and `Ground Truth/control_points_X_1_2.txt`.

    Raises:
      FileNotFoundError: an image without its partner view, or no images; the message names the paths.
    """
    views: dict[str, dict[str, pathlib.Path]] = {}
    for path in imaging.list_files(root / "Images", IMAGE_SUFFIXES):
        match = _IMAGE_NAME.match(path.stem)
        if match is None:
            log.warning("fire: %s is not named like A01_1.jpg; left out", path)
            continue
        views.setdefault(match["pair"].upper(), {})[match["view"]] = path
    if not views:
        raise FileNotFoundError(f"fire: {root / 'Images'} holds no images named like A01_1.jpg.")
    ground_truth = root / GROUND_TRUTH
    pairs = []
    for pair_id, found in sorted(views.items()):
        for view, other in (("1", "2"), ("2", "1")):
            if view not in found:
                present = found[other]
                expected = present.with_name(f"{present.stem[:-1]}{view}{present.suffix}")
                raise FileNotFoundError(f"fire: image {present} has no partner view: expected {expected}.")
        points = ground_truth / f"control_points_{pair_id}_1_2.txt"
        if not points.is_file():
            if ground_truth.is_dir():
                log.warning("fire: pair %s has no %s; has_control_points is False", pair_id, points)
            points = None
        pairs.append(FirePair(pair_id, pair_id[0], found["1"], found["2"], points))
    return pairs


class Builder(base.ArrayRecordBuilder):
    """FIRE fundus images, singly or as registration pairs (see the module docstring)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: images or pairs, optional control points and FoV mask.",
        "1.1.0": "Float32 images stored as raw bytes instead of zlib (`schema.IMAGE_ENCODING`): the same "
        "values, written several times faster.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        FireConfig(
            name="images",
            description="Single 512x512 RGB images for unconditional synthesis, per-image min-max.",
        ),
        FireConfig(
            name="pairs",
            description="512x512 RGB registration pairs with their control points.",
            kind="pairs",
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        config: FireConfig = self.builder_config
        size = config.image_size
        shape = tfds.features.Tensor(shape=(2,), dtype=np.int32, doc="(height, width) of the source file.")
        if config.kind == "images":
            features = {
                "image": imaging.image_feature(size, 3, "RGB fundus image, scaled as the config says."),
                "source_shape": shape,
                "pair_id": tfds.features.Text(doc="The pair, e.g. 'A01'."),
                "view": tfds.features.Scalar(dtype=np.int32, doc="1 = fixed image, 2 = moving image."),
                "control_points": tfds.features.Tensor(
                    shape=(None, 2), dtype=np.float32, doc="(x, y) of this image's control points."
                ),
            }
        else:
            features = {
                "fixed_image": imaging.image_feature(size, 3, "The pair's first (fixed) image."),
                "moving_image": imaging.image_feature(size, 3, "The pair's second (moving) image."),
                "fixed_source_shape": shape,
                "moving_source_shape": shape,
                "control_points": tfds.features.Tensor(
                    shape=(None, 4), dtype=np.float32, doc="x_fixed, y_fixed, x_moving, y_moving per row."
                ),
            }
        features.update(
            {
                "has_control_points": tfds.features.Scalar(dtype=np.bool_, doc="Whether the pair has any."),
                "mask": imaging.mask_feature(size, "Field of view (Masks/mask.png), 1 inside."),
                "has_mask": tfds.features.Scalar(dtype=np.bool_, doc="Whether Masks/mask.png was there."),
                "id": tfds.features.Text(doc="'A01_1' (images) or 'A01' (pairs)."),
                "category": tfds.features.ClassLabel(names=CATEGORIES, doc="A, P or S (FIRE's categories)."),
            }
        )
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            metadata=schema.dataset_metadata(["red", "green", "blue"], (), **config.fields()),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        manual_dir = medical.open_manual_dir(dl_manager, "fire")
        root = imaging.find_root(manual_dir, ["Images"], "fire")
        pairs = find_pairs(root)
        mask_path = imaging.find_partner(root / "Masks", "mask", (".png",))
        fov = imaging.read_image(mask_path, channels=1) if mask_path is not None else None
        self.info.metadata["source_root"] = root.relative_to(manual_dir).as_posix()
        return {"train": self._generate_examples(pairs, fov, mask_path)}

    def _generate_examples(
        self, pairs: list[FirePair], fov: np.ndarray | None, mask_path: pathlib.Path | None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        config: FireConfig = self.builder_config
        # One field of view serves every image; resize it once.
        stored_fov = imaging.prepare_mask(fov, config.image_size) if fov is not None else None
        for pair in pairs:
            points = read_control_points(pair.control_points) if pair.control_points is not None else None
            images = {}
            for view, path in (("fixed", pair.fixed), ("moving", pair.moving)):
                pixels = imaging.read_image(path, channels=3)
                if fov is not None:
                    imaging.check_same_shape(pixels, fov, path, mask_path)
                images[view] = (path, pixels)
            common = {
                "has_control_points": points is not None,
                "mask": _no_mask(images["fixed"][1], config.image_size) if stored_fov is None else stored_fov,
                "has_mask": fov is not None,
                "category": pair.category,
            }
            if config.kind == "pairs":
                scaled = np.zeros((0, 4), np.float32)
                if points is not None:
                    scaled = np.concatenate(
                        [
                            imaging.scale_points(points[:, :2], images["fixed"][1].shape, config.image_size),
                            imaging.scale_points(points[:, 2:], images["moving"][1].shape, config.image_size),
                        ],
                        axis=1,
                    )
                yield (
                    pair.pair_id,
                    {
                        **common,
                        "fixed_image": imaging.prepare_image(images["fixed"][1], config, pair.fixed),
                        "moving_image": imaging.prepare_image(images["moving"][1], config, pair.moving),
                        "fixed_source_shape": np.array(images["fixed"][1].shape[:2], np.int32),
                        "moving_source_shape": np.array(images["moving"][1].shape[:2], np.int32),
                        "control_points": scaled,
                        "id": pair.pair_id,
                    },
                )
                continue
            for view_number, view in ((1, "fixed"), (2, "moving")):
                path, pixels = images[view]
                # A control-point row is (x, y) in the fixed image, then (x, y) in the moving one.
                own = np.zeros((0, 2)) if points is None else points[:, 2 * view_number - 2 : 2 * view_number]
                key = f"{pair.pair_id}_{view_number}"
                yield (
                    key,
                    {
                        **common,
                        "image": imaging.prepare_image(pixels, config, path),
                        "source_shape": np.array(pixels.shape[:2], np.int32),
                        "pair_id": pair.pair_id,
                        "view": view_number,
                        "control_points": imaging.scale_points(own, pixels.shape, config.image_size),
                        "id": key,
                    },
                )


def _no_mask(pixels: np.ndarray, size: int) -> np.ndarray:
    """The stored `mask` when the download has no Masks/mask.png: zeros (and `has_mask` False)."""
    return np.zeros((size, size) if size else pixels.shape[:2], np.uint8)
