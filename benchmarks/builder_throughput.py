"""BRATS builder throughput against the plain read-and-decode bound, on BRATS-sized fixture volumes.

Usage: python -m benchmarks.builder_throughput [--subjects 4]

Writes `--subjects` fake training patients in the BRATS 2015 layout (five 155×240×240 int16 `.mha` series
each: smooth random volumes and a blob label, no real pixels), then times
  1. reading and decoding every series with SimpleITK (the bound: a builder must at least do this), and
  2. `data_builders.build("brats2015/slices")`: reading, min-max scaling, the authors' slice range and
     crop, and writing array_record (raw float32 image bytes, which array_record compresses with zstd),
and reports both as output slices per second (the config keeps slices 50:105 of each subject) and as
source MB read per second, then the size of the written dataset.
"""

import argparse
import os
import pathlib
import tempfile
import time

import numpy as np
import SimpleITK as sitk

import data_builders
from benchmarks import common

SHAPE = (155, 240, 240)  # (z, y, x), as SimpleITK reads BRATS 2015.
TOKENS = ("MR_Flair", "MR_T1", "MR_T1c", "MR_T2", "OT")


def _write_subject(root: pathlib.Path, index: int, rng: np.random.Generator) -> list[pathlib.Path]:
    """One HGG patient with four smooth int16 modalities and a blob label; returns the series files."""
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    brain = ((z - 77) / 70.0) ** 2 + ((y - 120) / 100.0) ** 2 + ((x - 120) / 85.0) ** 2 < 1
    tumour = ((z - 80) / 15.0) ** 2 + ((y - 110) / 20.0) ** 2 + ((x - 140) / 18.0) ** 2 < 1
    paths = []
    for k, token in enumerate(TOKENS):
        if token == "OT":
            volume = np.where(tumour, 1 + (x + y) % 4, 0).astype(np.int16)
        else:
            noise = rng.normal(0, 20, SHAPE).astype(np.float32)
            volume = (brain * (300 + 100 * k) + tumour * 200 + noise).clip(0).astype(np.int16)
        series = f"VSD.Brain.XX.O.{token}.{50000 + 10 * index + k}"
        path = (
            root / "BRATS2015_Training" / "HGG" / f"brats_bench_pat{index:04d}_1" / series / f"{series}.mha"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(path))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench_brats_") as tmp:
        manual = pathlib.Path(tmp) / "raw"
        files = [p for i in range(args.subjects) for p in _write_subject(manual, i, rng)]
        megabytes = sum(os.path.getsize(p) for p in files) / 1e6
        t0 = time.perf_counter()
        for path in files:
            sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        builder = data_builders.build(
            "brats2015/slices", data_dir=os.path.join(tmp, "tfds"), manual_dir=manual
        )
        build_s = time.perf_counter() - t0
        slices = sum(s.num_examples for s in builder.info.splits.values())
        written = sum(p.stat().st_size for p in pathlib.Path(builder.data_path).glob("*.array_record*")) / 1e6
    common.header(f"BRATS 2015 builder, {args.subjects} subjects of 5 × {SHAPE} int16 ({megabytes:.0f} MB)")
    print("| step | seconds | output slices/s | MB/s read |")
    print("| --- | --- | --- | --- |")
    for step, seconds in (
        ("read and decode every series (SimpleITK)", read_s),
        (f"`brats2015/slices` build ({slices} slices)", build_s),
    ):
        print(f"| {step} | {seconds:.2f} | {slices / seconds:.0f} | {megabytes / seconds:.0f} |")
    print(
        f"\nbuild / read: {build_s / read_s:.1f}x; written: {written:.1f} MB of array_record "
        f"({written * 1e3 / slices:.0f} kB per slice, version {builder.version})"
    )


if __name__ == "__main__":
    main()
