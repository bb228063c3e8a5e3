"""Write the fake Tianchi round-1 tree of `dummy_data/`: tiny `.mhd`/`.raw` CT series and the annotation CSV.

    python data_builders/tianchi_lung_ct/dummy_data/make_dummy_data.py

Four annotated series (in `train_part1`, `train_part2`) of 10 x 16 x 12 voxels (z, y, x), int16 HU,
with different anisotropic spacings and origins, so that swapped axes or a forgotten origin show in
the tests; one unannotated series in `chestCT_round1_testA`, which the builder must ignore. Every
lesion is a block of bright voxels whose CSV row gives its world centre and per-axis diameters in mm,
computed from its voxel box below. `LESIONS` is what the tests check the boxes against.
"""

from __future__ import annotations

import csv
import pathlib
import shutil

import numpy as np
import SimpleITK as sitk

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE / "chestCT_round1"
SHAPE = (10, 16, 12)  # (z, y, x)
BACKGROUND_HU = -850
LESION_HU = {1: 40, 5: -300, 31: 400, 32: 300}

# seriesuid -> (part folder, spacing (x, y, z) mm, origin (x, y, z) mm)
SERIES = {
    "688588": ("train_part1", (0.7, 0.6, 2.5), (-150.2, -170.5, -300.0)),
    "641414": ("train_part1", (0.65, 0.65, 1.25), (-160.0, -158.0, -250.5)),
    "650031": ("train_part2", (0.8, 0.75, 2.0), (-170.0, -140.0, -200.0)),
    "663157": ("train_part2", (0.6, 0.7, 1.5), (-120.0, -150.0, -180.0)),
}
UNANNOTATED = ("chestCT_round1_testA", "700001")

# (seriesuid, centre voxel (x, y, z), size in voxels (x, y, z), label). Odd sizes keep the box edges
# on voxel edges, so the expected filled pixels are unambiguous.
LESIONS = [
    ("688588", (5, 9, 4), (3, 3, 1), 1),
    ("688588", (8, 4, 6), (5, 1, 3), 5),
    ("641414", (3, 12, 7), (3, 5, 3), 1),
    ("641414", (9, 3, 7), (1, 1, 1), 1),
    ("641414", (6, 6, 2), (1, 3, 1), 31),
    ("650031", (6, 8, 5), (5, 3, 1), 1),
    ("650031", (2, 14, 9), (1, 1, 1), 32),
    ("663157", (10, 2, 0), (1, 3, 1), 1),
]


def write_series(path: pathlib.Path, array: np.ndarray, spacing, origin) -> None:
    """Write `<uid>.mhd` with its `<uid>.raw` (uncompressed MET_SHORT), like the distributed files."""
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=False)


def main() -> None:
    """Regenerate the tree from scratch."""
    shutil.rmtree(ROOT, ignore_errors=True)
    rows = []
    for uid, (part, spacing, origin) in SERIES.items():
        volume = np.full(SHAPE, BACKGROUND_HU, np.int16)
        for lesion_uid, centre, size, label in LESIONS:
            if lesion_uid != uid:
                continue
            lo = [c - s // 2 for c, s in zip(centre, size)]
            hi = [c + s // 2 + 1 for c, s in zip(centre, size)]
            volume[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = LESION_HU[label]
            centre_mm = [o + c * s for o, c, s in zip(origin, centre, spacing)]
            diameter_mm = [n * s for n, s in zip(size, spacing)]
            rows.append([uid, *(f"{v:.4f}" for v in (*centre_mm, *diameter_mm)), label])
        write_series(ROOT / part / f"{uid}.mhd", volume, spacing, origin)
    part, uid = UNANNOTATED
    write_series(
        ROOT / part / f"{uid}.mhd", np.full(SHAPE, BACKGROUND_HU, np.int16), (0.7, 0.7, 2.0), (0, 0, 0)
    )
    rows.sort(key=lambda row: (row[-1], row[0]))  # Not grouped by series, as in the real file.
    with (ROOT / "chestCT_round1_annotation.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["seriesuid", "coordX", "coordY", "coordZ", "diameterX", "diameterY", "diameterZ", "label"]
        )
        writer.writerows(rows)


if __name__ == "__main__":
    main()
