"""`drive`: the DRIVE retinal vessel dataset: colour fundus images, vessel manuals, field-of-view masks.

Each example is one image with the files of the same number (`21_training.tif`, `21_manual1.gif`,
`21_training_mask.gif`):

- `image` (S, S, 3) float32 RGB scaled to [0, 1] (per-image min-max, METHOD.md §2.1);
- `label` (S, S) uint8: the first observer's vessels (`1st_manual/`), 1 = vessel; `has_label` says
  whether the file exists (always in training; test manuals are left out of some copies, and then
  `label` is all zeros and `has_label` False);
- `label_second_observer`, `has_label_second_observer`: the same for `2nd_manual/` (test only);
- `mask` (S, S) uint8: the field of view, 1 inside;
- `id` (`21_training`) and `number` (21).

Splits: `train` (the `training/` folder, 20 images) and `test` (the `test/` folder, 20 images).
The GIFs are read with Pillow (OpenCV reads no GIF). Masks are resized with nearest neighbour.

Configs: `default` (512 x 512, nearest neighbour, as the authors) and `native` (each image's own
584 x 565, height x width, so the features have shape (None, None, ...)).
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

# Split name -> folder of the download.
SPLIT_FOLDERS = {"train": "training", "test": "test"}
IMAGE_SUFFIXES = (".tif", ".tiff")
MASK_SUFFIXES = (".gif", ".png", ".tif", ".tiff")
_NUMBER = re.compile(r"^(?P<number>\d+)_")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download DRIVE (https://drive.grand-challenge.org/, registration needed) and unpack it into
manual_dir. The builder uses the shallowest directory, at most three levels down, that holds
training/images/ and test/images/:

    manual_dir/
      DRIVE/
        training/
          images/21_training.tif ... 40_training.tif
          1st_manual/21_manual1.gif ... 40_manual1.gif
          mask/21_training_mask.gif ... 40_training_mask.gif
        test/
          images/01_test.tif ... 20_test.tif
          mask/01_test_mask.gif ... 20_test_mask.gif
          1st_manual/01_manual1.gif ...   (optional: not in every copy)
          2nd_manual/01_manual2.gif ...   (optional)

Files pair on their number. Training images need their manual and mask; test images need their mask.
"""


@dataclasses.dataclass(frozen=True)
class DriveFiles:
    """The files of one DRIVE number; the manuals are None where the copy has none."""

    image: pathlib.Path
    fov: pathlib.Path
    manual: pathlib.Path | None
    second_manual: pathlib.Path | None
    number: int


def find_files(root: pathlib.Path, folder: str) -> list[DriveFiles]:
    """Pair the files of `training/` or `test/` by number.

    Raises:
      FileNotFoundError: an image without its field-of-view mask (or, in training, its manual), a
        mask or manual without an image, or no images; the message names the paths.
    """
    directory = root / folder
    images = imaging.list_files(directory / "images", IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"drive: {directory / 'images'} holds no .tif images.")
    numbers = {}
    for image in images:
        match = _NUMBER.match(image.name)
        if match is None:
            raise ValueError(
                f"drive: {image} does not start with its number (expected e.g. 21_training.tif)."
            )
        numbers[match["number"]] = image
    partners = {"mask": "{n}_" + folder + "_mask", "1st_manual": "{n}_manual1", "2nd_manual": "{n}_manual2"}
    for sub in partners:
        if (directory / sub).is_dir():
            for path in imaging.list_files(directory / sub, MASK_SUFFIXES):
                match = _NUMBER.match(path.name)
                if match is None or match["number"] not in numbers:
                    raise FileNotFoundError(
                        f"drive: {path} has no image with its number in {directory / 'images'}."
                    )
    found = []
    for number, image in sorted(numbers.items()):
        paths = {
            sub: imaging.find_partner(directory / sub, stem.format(n=number), MASK_SUFFIXES)
            for sub, stem in partners.items()
        }
        required = ("mask", "1st_manual") if folder == "training" else ("mask",)
        for sub in required:
            if paths[sub] is None:
                expected = directory / sub / (partners[sub].format(n=number) + ".gif")
                raise FileNotFoundError(f"drive: image {image} has no {sub} file: expected {expected}.")
        for sub in ("1st_manual", "2nd_manual"):
            if paths[sub] is None and (directory / sub).is_dir():
                log.warning("drive: %s has no %s file; its has_label flag is False", image, sub)
        found.append(DriveFiles(image, paths["mask"], paths["1st_manual"], paths["2nd_manual"], int(number)))
    return found


class Builder(base.ArrayRecordBuilder):
    """DRIVE retinal images with vessel and field-of-view masks (see the module docstring)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: RGB images, vessels (optional in test), FoV masks.",
        "1.1.0": "Float32 images stored as raw bytes instead of zlib (`schema.IMAGE_ENCODING`): the same "
        "values, written several times faster.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        imaging.ImageConfig(
            name="default",
            description="512x512 RGB, nearest-neighbour resizing, per-image min-max (the authors').",
        ),
        imaging.ImageConfig(
            name="native",
            description="The images at their own size (584x565, height x width), per-image min-max.",
            image_size=0,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        config: imaging.ImageConfig = self.builder_config
        size = config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": imaging.image_feature(size, 3, "RGB fundus image, scaled as the config says."),
                    "label": imaging.mask_feature(size, "First observer's vessels, 1 = vessel."),
                    "has_label": tfds.features.Scalar(dtype=np.bool_, doc="Whether `label` was given."),
                    "label_second_observer": imaging.mask_feature(size, "Second observer's vessels."),
                    "has_label_second_observer": tfds.features.Scalar(
                        dtype=np.bool_, doc="Whether `label_second_observer` was given."
                    ),
                    "mask": imaging.mask_feature(size, "Field of view, 1 inside."),
                    "id": tfds.features.Text(doc="Image file stem, e.g. '21_training'."),
                    "number": tfds.features.Scalar(dtype=np.int32, doc="DRIVE image number."),
                }
            ),
            metadata=schema.dataset_metadata(
                ["red", "green", "blue"], ("background", "vessel"), **config.fields()
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        manual_dir = medical.open_manual_dir(dl_manager, "drive")
        root = imaging.find_root(manual_dir, [f"{f}/images" for f in SPLIT_FOLDERS.values()], "drive")
        files = {split: find_files(root, folder) for split, folder in SPLIT_FOLDERS.items()}
        self.info.metadata["source_root"] = root.relative_to(manual_dir).as_posix()
        return {split: self._generate_examples(split_files) for split, split_files in files.items()}

    def _generate_examples(self, files: list[DriveFiles]) -> Iterator[tuple[str, dict[str, Any]]]:
        config: imaging.ImageConfig = self.builder_config
        for item in files:
            pixels = imaging.read_image(item.image, channels=3)
            example = {
                "image": imaging.prepare_image(pixels, config, item.image),
                "mask": self._mask(item.fov, pixels, item.image),
                "id": item.image.stem,
                "number": item.number,
            }
            for name, path in (("label", item.manual), ("label_second_observer", item.second_manual)):
                example[f"has_{name}"] = path is not None
                example[name] = (
                    self._mask(path, pixels, item.image)
                    if path is not None
                    else np.zeros(example["mask"].shape, np.uint8)
                )
            yield item.image.stem, example

    def _mask(self, path: pathlib.Path, pixels: np.ndarray, image_path: pathlib.Path) -> np.ndarray:
        """A GIF (or PNG) mask checked against its image's size, binary and resized."""
        mask = imaging.read_image(path, channels=1)
        imaging.check_same_shape(pixels, mask, image_path, path)
        return imaging.prepare_mask(mask, self.builder_config.image_size)
