"""`synthetic`: the registered multimodal samples that stage C generated and accepted, as a TFDS dataset.

Stage C (`synth.stages.dataset`) writes its accepted samples batch by batch into a chunk folder (one
`batch_NNNNNN.npz` per generated batch, written atomically, plus `dataset.json`, the manifest), so that an
interrupted run resumes without losing or repeating a sample. This builder turns that folder into an
array_record TFDS dataset, readable without TensorFlow and without this project:

    import tensorflow_datasets as tfds
    source = tfds.data_source("synthetic/phantom_demo", split="train", data_dir="<workdir>/dataset/tfds")

Features: exactly those of the real dataset the generator was trained on (`data_builders.schema`:
`image` (H, W, K·c) float32 in [0, 1], `label` (H, W) uint8, `id`, `subject_id`, `slice_index`,
`spacing`, `origin`, `direction`), so downstream code reads real and synthetic data alike, plus
`structure` (the stage-A structure map), `organ` (its organ mask, 1 = organ) and `lesion_dice` (how well
the real-trained segmentors found the lesion: the acceptance score). A synthetic slice has no place in a
body: `spacing` is the real dataset's, `origin` is 0 and `direction` the identity; `subject_id` is
`"synthetic"`. Provenance (source workdir, checkpoint steps, thresholds, seed, counts) is in
`info.metadata`. The dataset has one split, `train`, holding exactly the requested number of samples in
generation order.

The config (`SyntheticConfig`) is made by stage C for the generator's shape and modalities and named
after the real dataset, e.g. `synthetic/phantom_demo`; `dummy_data/` holds a two-sample chunk folder.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_builders import base, schema

MANIFEST = "dataset.json"
CHUNK_PATTERN = "batch_{:06d}.npz"
# Per-sample arrays of a chunk (accepted samples only), in the builder's feature names.
SAMPLE_KEYS = ("id", "image", "label", "structure", "organ", "lesion_dice")
# Per-sample arrays of a detection family's chunks: padded normalised corners (M, 4) and classes (M,),
# 1..C in the order of `SyntheticConfig.box_label_ids`, 0 = padding.
BOX_KEYS = ("boxes", "box_classes")


def chunk_path(chunks_dir: str, index: int) -> str:
    return os.path.join(chunks_dir, CHUNK_PATTERN.format(index))


def write_chunk(chunks_dir: str, index: int, arrays: Mapping[str, np.ndarray]) -> str:
    """Writes batch `index`'s arrays atomically: a reader sees the whole chunk or none of it."""
    path = chunk_path(chunks_dir, index)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def chunk_count(chunks_dir: str) -> int:
    """The number of complete chunks, which must be batches 0..n-1 (a gap means a damaged folder).

    Raises:
      ValueError: the chunk files are not numbered 0..n-1.
    """
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(chunks_dir, "batch_*.npz")))
    names = [n for n in names if not n.endswith(".tmp.npz")]
    expected = [CHUNK_PATTERN.format(i) for i in range(len(names))]
    if names != expected:
        missing = sorted(set(expected) - set(names))
        raise ValueError(
            f"The chunk folder {chunks_dir} is damaged: chunks are not numbered 0..{len(names) - 1} "
            f"(missing {missing[:3]}). Delete the folder to generate again."
        )
    return len(names)


def read_chunk(chunks_dir: str, index: int) -> dict[str, np.ndarray]:
    path = chunk_path(chunks_dir, index)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read chunk {path}: {e}") from e


def write_manifest(chunks_dir: str, manifest: Mapping[str, Any]) -> None:
    path = os.path.join(chunks_dir, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump(dict(manifest), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def read_manifest(chunks_dir: str) -> dict[str, Any]:
    path = os.path.join(chunks_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {chunks_dir} is not a stage-C chunk folder")
    with open(path) as f:
        return json.load(f)


def iterate_samples(chunks_dir: str, num_examples: int) -> Iterator[dict[str, np.ndarray]]:
    """The first `num_examples` accepted samples, in generation order, as dicts of `SAMPLE_KEYS`.

    Raises:
      ValueError: the chunks hold fewer samples than asked for.
    """
    seen = 0
    for index in range(chunk_count(chunks_dir)):
        chunk = read_chunk(chunks_dir, index)
        for i in range(len(chunk["id"])):
            if seen == num_examples:
                return
            yield {k: chunk[k][i] for k in SAMPLE_KEYS + BOX_KEYS if k in chunk}
            seen += 1
    if seen < num_examples:
        raise ValueError(f"{chunks_dir} holds {seen} accepted samples; {num_examples} were asked for")


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    """Shape and names of a synthetic dataset; stage C makes one per generator (`config_for`).

    Attributes:
      height: slice height.
      width: slice width.
      channels: channels of `image` (K modalities × channels per modality).
      modalities: the modality names, in channel order.
      label_names: the name of each label value.
      box_label_ids: a detection family's dataset label ids of box classes 1..C (Tianchi's 1 = nodule,
        …); non-empty adds the real dataset's `boxes` and `box_labels` features.
    """

    height: int = 0
    width: int = 0
    channels: int = 0
    modalities: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()
    box_label_ids: tuple[int, ...] = ()


def config_for(
    source_name: str,
    image_hw: Sequence[int],
    channels: int,
    modalities: Sequence[str],
    label_names,
    box_label_ids: Sequence[int] = (),
) -> SyntheticConfig:
    """The config of the synthetic counterpart of real dataset `source_name` (e.g. `phantom_demo`)."""
    return SyntheticConfig(
        box_label_ids=tuple(int(i) for i in box_label_ids),
        name=source_name.replace("/", "_"),
        description=f"Stage-C samples of a generator trained on {source_name}.",
        height=int(image_hw[0]),
        width=int(image_hw[1]),
        channels=int(channels),
        modalities=tuple(modalities),
        label_names=tuple(label_names),
    )


def features(config: SyntheticConfig) -> tfds.features.FeaturesDict:
    """The real dataset's features (`schema.brats_like_features`) plus the stage-C extras."""
    base = schema.brats_like_features(config.height, config.width, config.channels)
    maps = schema.LABEL_ENCODING
    extra = {
        "structure": tfds.features.Tensor(
            shape=(config.height, config.width), dtype=np.uint8, encoding=maps, doc="Stage-A structure map."
        ),
        "organ": tfds.features.Tensor(
            shape=(config.height, config.width), dtype=np.uint8, encoding=maps, doc="Organ mask, 1 = organ."
        ),
        "lesion_dice": tfds.features.Scalar(
            dtype=np.float32, doc="Dice of the real-trained segmentors' reading against `label`."
        ),
    }
    if config.box_label_ids:  # As the real detection dataset (Tianchi's `slices`): pixel-edge boxes.
        extra["boxes"] = tfds.features.Tensor(
            shape=(None, 4), dtype=np.float32, doc="[y_min, x_min, y_max, x_max], pixel-edge units."
        )
        extra["box_labels"] = tfds.features.Tensor(
            shape=(None,), dtype=np.int32, doc="Dataset label id of each box (Tianchi's 1 = nodule)."
        )
    return tfds.features.FeaturesDict({**{k: base[k] for k in base.keys()}, **extra})


class Builder(base.ArrayRecordBuilder):
    """Stage C's accepted samples (see the module docstring); the manual dir is the chunk folder."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: BRATS-like features plus structure, organ, lesion_dice.",
        "1.1.0": "Images stored as raw float32 bytes instead of zlib (`schema.IMAGE_ENCODING`): the same "
        "values, written several times faster.",
    }
    BUILDER_CONFIGS: list[SyntheticConfig] = []  # Made per generator by `config_for`.
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Not downloaded: generated by `launch.py --config configs/<x>.py:stage=dataset`, which builds this "
        "dataset itself from its chunk folder `<workdir>/dataset/chunks`."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        config: SyntheticConfig = self.builder_config
        return self.dataset_info_from_configs(
            features=features(config),
            metadata=schema.dataset_metadata(config.modalities, config.label_names),
            disable_shuffling=True,  # Generation order: index i is the i-th accepted sample.
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        chunks_dir = os.fspath(dl_manager.manual_dir)
        manifest = read_manifest(chunks_dir)
        # Provenance goes into metadata.json with the dataset (written after generation).
        self.info.metadata.update(
            {k: v for k, v in manifest.items() if k not in ("modalities", "label_names")}
        )
        return {"train": self._generate_examples(chunks_dir, int(manifest["num_examples"]), manifest)}

    def _generate_examples(self, chunks_dir: str, num_examples: int, manifest: Mapping[str, Any]):
        config: SyntheticConfig = self.builder_config
        spacing = np.asarray(manifest.get("spacing", (1.0, 1.0, 1.0)), np.float32)
        for index, sample in enumerate(iterate_samples(chunks_dir, num_examples)):
            key = str(sample["id"])
            image = np.asarray(sample["image"], np.float32)
            if image.shape != (config.height, config.width, config.channels):
                raise ValueError(
                    f"Sample {key} in {chunks_dir} has shape {image.shape}; the dataset config "
                    f"{config.name} expects {(config.height, config.width, config.channels)}"
                )
            boxes = {}
            if config.box_label_ids:  # Padding rows (class 0) dropped, classes back to the dataset's ids.
                keep = np.asarray(sample["box_classes"]) > 0
                scale = np.array([config.height, config.width] * 2, np.float32)
                ids = np.asarray(config.box_label_ids, np.int32)
                boxes = {
                    "boxes": np.asarray(sample["boxes"], np.float32)[keep].reshape(-1, 4) * scale,
                    "box_labels": ids[np.asarray(sample["box_classes"])[keep] - 1],
                }
            yield (
                key,
                {
                    **boxes,
                    "image": image,
                    "label": np.asarray(sample["label"], np.uint8),
                    "structure": np.asarray(sample["structure"], np.uint8),
                    "organ": np.asarray(sample["organ"], np.uint8),
                    "lesion_dice": np.float32(sample["lesion_dice"]),
                    "id": key,
                    "subject_id": "synthetic",
                    "slice_index": index,
                    "spacing": spacing,
                    "origin": np.zeros(3, np.float32),
                    "direction": np.eye(3, dtype=np.float32).ravel(),
                },
            )


def build(chunks_dir: str, data_dir: str, config: SyntheticConfig) -> tfds.core.DatasetBuilder:
    """Builds the dataset of a chunk folder into `data_dir` (replacing an earlier build); returns the builder.

    TFDS writes into an `incomplete.*` folder and renames it only when every example is written, so an
    interrupted build never looks complete.
    """
    builder = Builder(config=config, data_dir=data_dir)
    # Always from the chunks: a build left by an earlier, smaller request must not be reused.
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=chunks_dir, download_mode=mode)
    )
    return builder
