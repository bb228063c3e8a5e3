"""Feature schema shared by every BRATS-like builder: registered modalities, BRATS labels, geometry.

Every builder that produces co-registered multimodal 2D slices with a BRATS-style lesion map (the
phantom, BRATS 2015, MSD Task01, BraTS 2021/2023) uses `brats_like_features`, so the input pipeline
and the trainer never need to know which dataset they read.

An example read back with `builder.as_data_source(split)` (or `tfds.data_source`) without
TensorFlow (checked with tensorflow-datasets 4.9.10 and array_record files):

=============  =============================  ================================================
feature        stored as                      comes back as
=============  =============================  ================================================
`image`        Tensor (H, W, K) float32 raw   `np.ndarray` float32 (H, W, K), **read-only**
               bytes (`IMAGE_ENCODING`)       (a view of the stored buffer: copy it before
                                              writing in place)
`label`        Tensor (H, W) uint8 zlib       `np.ndarray` uint8 (H, W), read-only
`id`           Text                           `bytes`, e.g. `b"train_subj0007/slice003"`
`subject_id`   Text                           `bytes`
`slice_index`  Scalar int32                   a Python `int` (not a numpy scalar)
`spacing`      Tensor (3,) float32            `np.ndarray` float32 (3,), writable
`origin`       Tensor (3,) float32            `np.ndarray` float32 (3,)
`direction`    Tensor (9,) float32            `np.ndarray` float32 (9,), row-major 3x3
=============  =============================  ================================================

Encodings (`IMAGE_ENCODING`, `LABEL_ENCODING`, used by every builder here from its version 1.1.0):
image arrays (float32 images, int16 volumes) are stored as their raw bytes, so values come back bit
for bit. array_record, the format the builders write, already
compresses every record with zstd level 3: on raw float32 BRATS-like slices its files are ~20 % larger
than with TFDS's zlib encoding (about the same size on images scaled from 8-bit files and on int16
CT), and it runs 6-10x faster than the zlib pass it replaces (`zlib.compress` at level 6, 8-15 MB/s on
one core here), which was ~85 % of a BRATS 2015 build in dataset version 1.0.0. uint8 label maps and
masks keep zlib: ~0.15 ms per 184x144 map, and it keeps them small in tfrecord files too (tfrecord has
no compression of its own). An encoding changes the stored bytes, not the values read back, but a
build of the old version cannot be read through the new features, so every change is a new dataset
version.

Text comes back as UTF-8 `bytes` (decode with `.decode()`); batching stacks it into numpy object
arrays, so drop or decode it in the preprocessing map. Geometry has SimpleITK's meaning and
(x, y, z) order: pixel `image[i, j]` of a slice lies at `origin + direction @ (j*sx, i*sy, 0)` mm,
and `spacing[2]` is the distance between neighbouring slices of the source volume.

Dataset-level facts (modality order, label names, split subjects, seeds) go into
`DatasetInfo.metadata` through `dataset_metadata`. A `tfds.core.MetadataDict` is written to
`metadata.json` beside `dataset_info.json` and is read back by
`tfds.builder_from_directory(path).info.metadata` and by `tfds.data_source` without TensorFlow, so
nothing else is needed to persist it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

BRATS_MODALITIES = ("t1", "t2", "t1c", "flair")
BRATS_LABEL_NAMES = ("background", "necrosis", "oedema", "non_enhancing", "enhancing")
# Image arrays (float32 images, int16 volumes): raw bytes; array_record's zstd compresses them.
IMAGE_ENCODING = tfds.features.Encoding.BYTES
# uint8 label maps and masks: zlib, cheap on them.
LABEL_ENCODING = tfds.features.Encoding.ZLIB


def brats_like_features(
    height: int,
    width: int,
    num_modalities: int,
    *,
    image_encoding: tfds.features.Encoding = IMAGE_ENCODING,
) -> tfds.features.FeaturesDict:
    """Features of one registered multimodal slice with its BRATS label map.

    Args:
      height: slice height in pixels.
      width: slice width in pixels.
      num_modalities: number of registered modalities K, stacked on the last axis of `image`.
      image_encoding: how `image` is stored; only a builder that keeps an older dataset version
        would pass anything but `IMAGE_ENCODING`. Readers never see it.

    Returns:
      A `FeaturesDict` with keys `image` (H, W, K) float32 in [0, 1], `label` (H, W) uint8 with
      BRATS classes (0 background, 1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing), `id`
      (unique, deterministic example key), `subject_id`, `slice_index` (int32), and the
      SimpleITK-style geometry `spacing` (3,), `origin` (3,) and `direction` (9,), all float32.
    """
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(
                shape=(height, width, num_modalities),
                dtype=np.float32,
                encoding=image_encoding,
                doc="Registered modalities, each scaled to [0, 1] per subject.",
            ),
            "label": tfds.features.Tensor(
                shape=(height, width),
                dtype=np.uint8,
                encoding=LABEL_ENCODING,
                doc="BRATS classes: " + ", ".join(f"{i} {n}" for i, n in enumerate(BRATS_LABEL_NAMES)),
            ),
            "id": tfds.features.Text(doc="Unique example key, e.g. 'train_subj0007/slice003'."),
            "subject_id": tfds.features.Text(doc="Subject the slice comes from."),
            "slice_index": tfds.features.Scalar(
                dtype=np.int32, doc="Index of the slice in its subject's volume."
            ),
            "spacing": tfds.features.Tensor(
                shape=(3,), dtype=np.float32, doc="Voxel spacing (x, y, z) in mm."
            ),
            "origin": tfds.features.Tensor(
                shape=(3,), dtype=np.float32, doc="Physical position (mm) of pixel (0, 0)."
            ),
            "direction": tfds.features.Tensor(
                shape=(9,), dtype=np.float32, doc="Direction cosines, row-major 3x3."
            ),
        }
    )


def dataset_metadata(
    modalities: Sequence[str], label_names: Sequence[str], **extra: Any
) -> tfds.core.MetadataDict:
    """Dataset-level metadata that every BRATS-like builder records in its `DatasetInfo`.

    Args:
      modalities: names of the channels of `image`, in order (e.g. `BRATS_MODALITIES`).
      label_names: name of each label value, indexed by value (e.g. `BRATS_LABEL_NAMES`).
      **extra: further JSON-serialisable entries (split subjects, seeds, generation parameters).

    Returns:
      A `tfds.core.MetadataDict`; it is saved as `metadata.json` next to `dataset_info.json` and
      comes back from `builder.info.metadata` (also through `tfds.builder_from_directory`).
    """
    return tfds.core.MetadataDict(modalities=list(modalities), label_names=list(label_names), **extra)
