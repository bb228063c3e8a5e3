"""Write the fake FIRE download next to this script (run once; the output is committed).

It mimics FIRE's layout and formats: `Images/{A,P,S}NN_{1,2}.jpg` (square RGB JPEGs, here 20 x 20
instead of 2912 x 2912), `Ground Truth/control_points_XNN_1_2.txt` with one
`x_fixed y_fixed x_moving y_moving` line per correspondence (a different number of lines per
pair), and `Masks/mask.png` / `feature_mask.png`. Each image is a disc of flat colour on black:
red encodes the pair, green the view (100 fixed, 200 moving), so images paired or ordered wrongly
are caught. No real pixels are used.

    python data_builders/fire/dummy_data/make_dummy_data.py
"""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE / "FIRE"
SIZE = 20
PAIRS = ("A01", "P01", "S01", "S02")
POINTS_PER_PAIR = {"A01": 3, "P01": 5, "S01": 4, "S02": 2}


def disc(radius: float) -> np.ndarray:
    rows, cols = np.mgrid[:SIZE, :SIZE]
    return (rows - (SIZE - 1) / 2) ** 2 + (cols - (SIZE - 1) / 2) ** 2 <= radius**2


def photo(pair_index: int, view: int) -> np.ndarray:
    """Flat colour inside the field of view: red from the pair, green from the view."""
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    pixels[disc(9.0)] = (60 + 40 * pair_index, 100 * view, 50)
    return pixels


def control_points(pair_index: int, count: int) -> str:
    """`count` lines of `x_fixed y_fixed x_moving y_moving`, the moving points shifted from the fixed."""
    lines = []
    for k in range(count):
        x, y = 3.5 + 2 * k + pair_index, 4.25 + 1.5 * k
        lines.append(f"{x:g} {y:g} {x + 1.5:g} {y - 0.75:g}")
    return "\n".join(lines) + "\n"


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    for sub in ("Images", "Ground Truth", "Masks"):
        (ROOT / sub).mkdir(parents=True)
    for index, pair in enumerate(PAIRS):
        for view in (1, 2):
            Image.fromarray(photo(index, view)).save(ROOT / "Images" / f"{pair}_{view}.jpg", quality=95)
        text = control_points(index, POINTS_PER_PAIR[pair])
        (ROOT / "Ground Truth" / f"control_points_{pair}_1_2.txt").write_text(text)
    Image.fromarray(disc(9.0).astype(np.uint8) * 255).save(ROOT / "Masks" / "mask.png")
    Image.fromarray(disc(7.0).astype(np.uint8) * 255).save(ROOT / "Masks" / "feature_mask.png")


if __name__ == "__main__":
    main()
