"""`phantom`: procedural, registered T1/T2/T1c/FLAIR brain slices with BRATS-labelled tumours.

A built-in dataset that needs no download: every subject is generated from a seed by `anatomy.py`
(pure numpy). It has the same features as the BRATS builders (`data_builders.schema`), so every
stage, config and test of the project runs end to end on any machine.

Each example is one axial slice of one subject:

- `image` (S, S, 4) float32 in [0, 1]: modalities `t1, t2, t1c, flair` (see `info.metadata`), which
  share one tissue/label map (registered by construction) and differ by contrast, bias and noise;
- `label` (S, S) uint8: 0 background, 1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing;
- `id` (`"train_subj0007/slice003"`), `subject_id`, `slice_index`, `spacing`, `origin`, `direction`.

About 20% of the subjects have no tumour, and a tumour only reaches some of a subject's slices.
Splits are by subject: subject `i` of split `s` has seed `subject_seed(config.seed, s, i)`, so no
subject is in two splits; the subject ids and seeds of each split are in `info.metadata`
(`"subjects"`, `"subject_seeds"`).

Configs (`phantom/<name>`):

=========  ==========  =================  ==========================  ==============
name       image size  slices / subject   subjects train/val/test     examples
=========  ==========  =================  ==========================  ==============
default    128 x 128   16                 60 / 10 / 10                960/160/160
demo       64 x 64     10                 40 / 6 / 6                  400/60/60
tiny       32 x 32     4                  6 / 2 / 2                   24/8/8
=========  ==========  =================  ==========================  ==============

Build (array_record, readable without TensorFlow), from the repository root:

    python -m data_builders build phantom/demo --data_dir=~/tensorflow_datasets
    python -m data_builders build phantom/tiny --data_dir=/tmp/tfds --set image_size=48 --set seed=1

or from Python: `data_builders.build("phantom/demo", data_dir=...)`. `tfds build` is not needed (it
requires TensorFlow); if it is used, pass `--file_format=array_record`. This builder writes
array_record by default (`data_builders.base.ArrayRecordBuilder`), whichever way it is called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_builders import base, schema
from data_builders.phantom import anatomy

SPLITS = ("train", "validation", "test")
# Fixed codes that enter each subject's seed; never reorder (it would change every subject).
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


def subject_seed(config_seed: int, split: str, index: int) -> int:
    """Seed of subject `index` of `split`: distinct streams per (config seed, split, index).

    Args:
      config_seed: the config's `seed`.
      split: one of `SPLITS`.
      index: subject index within the split.

    Returns:
      A non-negative int below 2**32, stable across numpy versions (`SeedSequence` is specified).
    """
    sequence = np.random.SeedSequence([config_seed, _SPLIT_CODES[split], index])
    return int(sequence.generate_state(1)[0])


def subject_id(split: str, index: int) -> str:
    """Return the identifier of subject `index` of `split`, e.g. `"train_subj0007"`."""
    return f"{split}_subj{index:04d}"


@dataclasses.dataclass
class PhantomConfig(tfds.core.BuilderConfig):
    """Sizes and seed of a phantom variant; `data_builders.get_builder` can override every field.

    Attributes:
      image_size: height and width of the slices in pixels (>= 8).
      slices_per_subject: axial slices per subject, evenly spread through the brain (>= 1).
      num_train_subjects: subjects in the `train` split (>= 1).
      num_validation_subjects: subjects in the `validation` split (>= 1).
      num_test_subjects: subjects in the `test` split (>= 1).
      seed: root seed; subjects' seeds derive from it, the split and the subject index.
    """

    image_size: int = 128
    slices_per_subject: int = 16
    num_train_subjects: int = 60
    num_validation_subjects: int = 10
    num_test_subjects: int = 10
    seed: int = 0

    def __post_init__(self):
        minimum = {
            "image_size": 8,
            "slices_per_subject": 1,
            "num_train_subjects": 1,
            "num_validation_subjects": 1,
            "num_test_subjects": 1,
            "seed": 0,
        }
        for field, low in minimum.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ValueError(
                    f"PhantomConfig {self.name!r}: {field} must be an int >= {low}, got {value!r}"
                )

    def num_subjects(self, split: str) -> int:
        """Return the number of subjects in `split`."""
        return int(getattr(self, f"num_{split}_subjects"))

    def num_examples(self, split: str) -> int:
        """Return the number of examples (slices) in `split`."""
        return self.num_subjects(split) * self.slices_per_subject


class Builder(base.ArrayRecordBuilder):
    """The procedural brain phantom (see the module docstring)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: BRATS-like features, subject-level splits, default/demo/tiny.",
        "1.1.0": "Images stored as raw bytes (array_record's zstd compresses them), not zlib; same values.",
    }
    BUILDER_CONFIGS = [
        PhantomConfig(
            name="default",
            description="128x128 slices, 16 per subject, 60/10/10 subjects.",
        ),
        PhantomConfig(
            name="demo",
            description="64x64 slices, 10 per subject, 40/6/6 subjects: builds in seconds.",
            image_size=64,
            slices_per_subject=10,
            num_train_subjects=40,
            num_validation_subjects=6,
            num_test_subjects=6,
        ),
        PhantomConfig(
            name="tiny",
            description="32x32 slices, 4 per subject, 6/2/2 subjects: for tests.",
            image_size=32,
            slices_per_subject=4,
            num_train_subjects=6,
            num_validation_subjects=2,
            num_test_subjects=2,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        config: PhantomConfig = self.builder_config
        subjects = {
            split: [subject_id(split, i) for i in range(config.num_subjects(split))] for split in SPLITS
        }
        seeds = {
            split: [subject_seed(config.seed, split, i) for i in range(config.num_subjects(split))]
            for split in SPLITS
        }
        return self.dataset_info_from_configs(
            features=schema.brats_like_features(config.image_size, config.image_size, 4),
            metadata=schema.dataset_metadata(
                schema.BRATS_MODALITIES,
                schema.BRATS_LABEL_NAMES,
                seed=config.seed,
                image_size=config.image_size,
                slices_per_subject=config.slices_per_subject,
                subjects=subjects,
                subject_seeds=seeds,
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # Everything is generated; nothing to download.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        config: PhantomConfig = self.builder_config
        for index in range(config.num_subjects(split)):
            subject = subject_id(split, index)
            volume = anatomy.make_subject(
                subject_seed(config.seed, split, index),
                config.image_size,
                config.slices_per_subject,
            )
            direction = volume["direction"].reshape(3, 3)
            for k in range(config.slices_per_subject):
                key = f"{subject}/slice{k:03d}"
                # Slice k's first pixel: the volume origin moved k slices along the volume's z axis.
                offset = direction @ np.array([0.0, 0.0, k * volume["spacing"][2]], np.float32)
                yield (
                    key,
                    {
                        "image": volume["image"][k],
                        "label": volume["label"][k],
                        "id": key,
                        "subject_id": subject,
                        "slice_index": k,
                        "spacing": volume["spacing"],
                        "origin": (volume["origin"] + offset).astype(np.float32),
                        "direction": volume["direction"],
                    },
                )
