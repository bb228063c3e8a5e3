"""Write the fake "finding-lungs-in-ct-data" download next to this script (run once; output committed).

It mimics the Kaggle layout: `2d_images/ID_NNNN_Z_NNNN.tif` with same-named masks in `2d_masks/`,
and `3d_images/IMG_NNNN.nii.gz` with `MASK_NNNN.nii.gz`. The dtype of the real 2D TIFFs is not
known (DATASETS.md: "may be 16-bit, verify"), so the slices cycle through uint16, int16 and float32
files. Each slice shows a body (level 1000 above air) with two "lungs" (level 200 above air) whose
position depends on the slice, so per-image min-max gives air 0, lung 0.2, body 1, and a mask
paired with the wrong image is caught. Volumes are int16 in HU with lungs at -800 and a geometry
(spacing, origin, direction) that differs between volumes. No real pixels are used.

    python data_builders/lung_ct/dummy_data/make_dummy_data.py
"""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import SimpleITK as sitk
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
HEIGHT, WIDTH = 16, 20
SLICES = [
    "ID_0000_Z_0142",
    "ID_0001_Z_0087",
    "ID_0002_Z_0130",
    "ID_0003_Z_0051",
    "ID_0004_Z_0100",
    "ID_0005_Z_0066",
]
DTYPES = [np.uint16, np.int16, np.float32]
# Volume number -> (depth, spacing (x, y, z) mm, origin (x, y, z) mm, direction row-major).
VOLUMES = {
    "0002": (4, (0.7, 0.8, 2.5), (-170.5, -160.25, -310.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    "0005": (5, (0.65, 0.65, 1.25), (180.0, 150.5, -200.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
    "0019": (3, (0.9, 0.9, 5.0), (-150.0, -140.0, 10.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    "0023": (4, (0.75, 0.75, 2.0), (-160.0, -150.0, -90.0), (1, 0, 0, 0, 0, -1, 0, 1, 0)),
}


def lung_map(index: int, height: int, width: int) -> np.ndarray:
    """Two rectangular "lungs" whose size and place depend on `index` (True inside)."""
    lungs = np.zeros((height, width), bool)
    top, bottom = 3 + index % 3, height - 3 - index % 2
    lungs[top:bottom, 3 : 7 + index % 2] = True
    lungs[top:bottom, width - 8 + index % 3 : width - 3] = True
    return lungs


def slice_levels(index: int) -> np.ndarray:
    """Levels above air: 0 outside the body, 1000 in the body, 200 in the lungs."""
    levels = np.zeros((HEIGHT, WIDTH), np.float32)
    levels[1:-1, 1:-1] = 1000.0
    levels[lung_map(index, HEIGHT, WIDTH)] = 200.0
    return levels


def main() -> None:
    for sub in ("2d_images", "2d_masks", "3d_images"):
        shutil.rmtree(HERE / sub, ignore_errors=True)
        (HERE / sub).mkdir()
    for index, name in enumerate(SLICES):
        dtype = DTYPES[index % len(DTYPES)]
        levels = slice_levels(index)
        # Signed files hold Hounsfield units (air -1000); unsigned ones the level above air.
        pixels = levels.astype(dtype) if dtype == np.uint16 else (levels - 1000.0).astype(dtype)
        sitk.WriteImage(sitk.GetImageFromArray(pixels), str(HERE / "2d_images" / f"{name}.tif"))
        mask = lung_map(index, HEIGHT, WIDTH).astype(np.uint8) * 255
        Image.fromarray(mask).save(HERE / "2d_masks" / f"{name}.tif")
    for index, (number, (depth, spacing, origin, direction)) in enumerate(VOLUMES.items()):
        lungs = np.stack([lung_map(index + k, HEIGHT, WIDTH) for k in range(depth)])
        hu = np.full(lungs.shape, -1000, np.int16)
        hu[:, 1:-1, 1:-1] = 40 + 10 * index
        hu[lungs] = -800
        for kind, array in (("IMG", hu), ("MASK", lungs.astype(np.uint8))):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(spacing)
            image.SetOrigin(origin)
            image.SetDirection([float(v) for v in direction])
            sitk.WriteImage(image, str(HERE / "3d_images" / f"{kind}_{number}.nii.gz"), useCompression=True)


if __name__ == "__main__":
    main()
