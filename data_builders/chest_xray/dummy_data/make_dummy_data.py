"""Write the fake chest X-ray download next to this script (run once; the output is committed).

It mimics the Kaggle archive: the nested `chest_xray/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/`
tree, the real naming patterns, a mix of grey and RGB JPEGs of different sizes, and `__MACOSX`
junk. Every image is made of two flat halves whose grey levels depend on its index, so examples can
be told apart; RGB images have unequal channels, so luminance differs from any single channel.
No real pixels are used.

    python data_builders/chest_xray/dummy_data/make_dummy_data.py
"""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
TOP = HERE / "chest_xray"
ROOT = TOP / "chest_xray"  # The archive's nested copy.

# (split folder, class folder, file name, height, width, RGB?)
FILES = [
    ("train", "NORMAL", "IM-0115-0001.jpeg", 16, 20, False),
    ("train", "NORMAL", "IM-0117-0001.jpeg", 20, 16, False),
    ("train", "NORMAL", "NORMAL2-IM-0427-0001.jpeg", 18, 22, True),
    ("train", "PNEUMONIA", "person1_bacteria_1.jpeg", 16, 20, False),
    ("train", "PNEUMONIA", "person1_bacteria_2.jpeg", 16, 16, False),
    ("train", "PNEUMONIA", "person3_virus_15.jpeg", 20, 24, True),
    ("train", "PNEUMONIA", "person10_virus_35.jpeg", 16, 20, False),
    ("train", "PNEUMONIA", "person22_bacteria_77.jpeg", 24, 16, False),
    ("val", "NORMAL", "NORMAL2-IM-1427-0001.jpeg", 16, 20, False),
    ("val", "PNEUMONIA", "person1946_bacteria_4874.jpeg", 16, 20, False),
    ("test", "NORMAL", "IM-0001-0001.jpeg", 16, 20, False),
    ("test", "NORMAL", "NORMAL2-IM-0007-0001.jpeg", 20, 20, True),
    ("test", "PNEUMONIA", "person100_bacteria_475.jpeg", 16, 20, False),
    ("test", "PNEUMONIA", "person1_virus_6.jpeg", 18, 16, False),
]


def halves(index: int, height: int, width: int, rgb: bool) -> np.ndarray:
    """Two flat halves (left, right) with levels that depend on `index`; RGB halves have unequal channels."""
    left, right = 30 + 12 * index, 220 - 9 * index
    if not rgb:
        image = np.full((height, width), left, np.uint8)
        image[:, width // 2 :] = right
        return image
    image = np.empty((height, width, 3), np.uint8)
    image[:, : width // 2] = (left + 40, left, left - 20)
    image[:, width // 2 :] = (right - 30, right, right + 20)
    return image


def main() -> None:
    shutil.rmtree(TOP, ignore_errors=True)
    for index, (split, label, name, height, width, rgb) in enumerate(FILES):
        path = ROOT / split / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(halves(index, height, width, rgb)).save(path, quality=95)
        # macOS archive junk: an AppleDouble file per image, which is not a JPEG.
        junk = TOP / "__MACOSX" / "chest_xray" / split / label / f"._{name}"
        junk.parent.mkdir(parents=True, exist_ok=True)
        junk.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")


if __name__ == "__main__":
    main()
