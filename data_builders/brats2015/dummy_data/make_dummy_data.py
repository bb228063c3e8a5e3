"""Write the fake BRATS 2015 tree of `dummy_data/`: tiny `.mha` volumes in the real layout, no real pixels.

    python data_builders/brats2015/dummy_data/make_dummy_data.py

Four training patients (two HGG, two LGG) and one Testing patient, each volume 8 x 12 x 10 voxels
(z, y, x), int16 like the real files. The modalities are told apart by their patterns, which survive
min-max scaling: T1 ramps along x and z, T2 only along y, T1c falls along x and rises along y, FLAIR
rises along z with a ripple. One patient has its series ids out of the usual order and a rotated
direction, so matching by id or ignoring the direction would show in the tests. The label (`OT`) is
a block holding classes 1-4 on background 0.
"""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import SimpleITK as sitk

HERE = pathlib.Path(__file__).resolve().parent
SHAPE = (8, 12, 10)  # (z, y, x)
SPACING = (0.8, 0.9, 1.5)  # (x, y, z) mm
# Rotation of 90 degrees about z: index x runs along world y, index y along world -x.
ROTATED = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)

# (tree, group, patient, series ids of Flair, T1, T1c, T2, OT or None, rotated direction)
PATIENTS = [
    ("BRATS2015_Training", "HGG", "brats_2013_pat0001_1", (54512, 54513, 54514, 54515, 54517), False),
    ("BRATS2015_Training", "HGG", "brats_tcia_pat153_0109", (60103, 60101, 60100, 60102, 60105), True),
    ("BRATS2015_Training", "LGG", "brats_2013_pat0002_1", (54530, 54531, 54532, 54533, 54535), False),
    ("BRATS2015_Training", "LGG", "brats_tcia_pat101_0001", (70010, 70011, 70012, 70013, 70015), False),
    ("BRATS2015_Testing", "HGG_LGG", "brats_2013_pat0103_1", (80001, 80002, 80003, 80004, None), False),
]


def modality_patterns(patient_index: int) -> dict[str, np.ndarray]:
    """Raw int16 volumes of the four modalities and the label, keyed by series token."""
    z, y, x = np.indices(SHAPE)
    p = patient_index
    label = np.zeros(SHAPE, np.int16)
    block = (z >= 2) & (z < 6) & (y >= 3) & (y < 9) & (x >= 2) & (x < 8)
    label[block] = 1 + (x + y + z)[block] % 4
    return {
        "MR_Flair": 20 + 4 * z + (x * y) % 5 + p,
        "MR_T1": 100 + 3 * x + 7 * z + 2 * p,
        "MR_T1c": 400 - 6 * x + 2 * y + p,
        "MR_T2": 50 + 5 * y + 3 * p,
        "OT": label,
    }


def write_volume(path: pathlib.Path, array: np.ndarray, patient_index: int, rotated: bool) -> None:
    """Write one series as `<series>/<series>.mha` (uncompressed MetaImage, MET_SHORT)."""
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(SPACING)
    image.SetOrigin((-4.0 - patient_index, -5.5, -6.0 + 2 * patient_index))
    if rotated:
        image.SetDirection(ROTATED)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=False)


def main() -> None:
    """Regenerate both trees from scratch."""
    for tree in ("BRATS2015_Training", "BRATS2015_Testing"):
        shutil.rmtree(HERE / tree, ignore_errors=True)
    for index, (tree, group, patient, ids, rotated) in enumerate(PATIENTS):
        patterns = modality_patterns(index)
        for token, series_id in zip(("MR_Flair", "MR_T1", "MR_T1c", "MR_T2", "OT"), ids):
            if series_id is None:
                continue
            prefix = "VSD.Brain_3more.XX.O" if token == "OT" else "VSD.Brain.XX.O"
            series = f"{prefix}.{token}.{series_id}"
            write_volume(
                HERE / tree / group / patient / series / f"{series}.mha", patterns[token], index, rotated
            )


if __name__ == "__main__":
    main()
