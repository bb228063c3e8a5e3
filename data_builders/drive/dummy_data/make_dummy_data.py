"""Write the fake DRIVE download next to this script (run once; the output is committed).

It mimics the DRIVE layout and formats: RGB `.tif` images, `.gif` vessel manuals and field-of-view
masks with values 0/255, training numbers 21-23 and test numbers 01-02 (with first and second
manuals, as in the original release), at 18 x 16 pixels (height x width; the real images are
584 x 565). Each number has its own field of view (a disc of its own radius) and its own vessels
(a column and a row at number-dependent places), and the image is black outside the field of
view and dark on the vessels, so a manual or mask paired with the wrong image is caught. No real
pixels are used.

    python data_builders/drive/dummy_data/make_dummy_data.py
"""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE / "DRIVE"
HEIGHT, WIDTH = 18, 16
TRAINING, TEST = (21, 22, 23), (1, 2)
VESSEL_RGB = (60, 20, 10)


def field_of_view(number: int) -> np.ndarray:
    """A disc whose radius depends on the number."""
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    radius = 6.0 + number % 3
    return (rows - (HEIGHT - 1) / 2) ** 2 + (cols - (WIDTH - 1) / 2) ** 2 <= radius**2


def vessels(number: int, observer: int) -> np.ndarray:
    """A vertical vessel and (first observer only) a horizontal one, placed by the number, inside the FoV."""
    lines = np.zeros((HEIGHT, WIDTH), bool)
    lines[:, 3 + number % 9] = True
    if observer == 1:
        lines[4 + number % 8, :] = True
    return lines & field_of_view(number)


def image(number: int) -> np.ndarray:
    """Background colour that depends on the number inside the FoV, dark vessels, black outside."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    pixels[field_of_view(number)] = (150 + number, 90 + number, 40)
    pixels[vessels(number, 1)] = VESSEL_RGB
    return pixels


def save_gif(mask: np.ndarray, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    for folder, numbers in (("training", TRAINING), ("test", TEST)):
        for number in numbers:
            n = f"{number:02d}"
            path = ROOT / folder / "images" / f"{n}_{folder}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image(number)).save(path)
            save_gif(field_of_view(number), ROOT / folder / "mask" / f"{n}_{folder}_mask.gif")
            save_gif(vessels(number, 1), ROOT / folder / "1st_manual" / f"{n}_manual1.gif")
            if folder == "test":
                save_gif(vessels(number, 2), ROOT / folder / "2nd_manual" / f"{n}_manual2.gif")


if __name__ == "__main__":
    main()
