"""Input pipeline: a TFDS array_record data source, read through grain, turned into global device arrays.

Training batches come from an infinite, deterministically shuffled stream (seeded from the config, reshuffled
every epoch). Each process reads only its own rows: the global batch `i` is the contiguous run of examples
`[i·B, (i+1)·B)` of the shuffled stream, and process `p` reads the slice `[p·B/P, (p+1)·B/P)` of it, so
one process with four devices and two processes with two devices each see the very same global batch.
The iterator's state is a small dict saved beside every checkpoint.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

import data_builders
from synth import boxes as boxes_lib
from synth import sharding

log = logging.getLogger("synth")

Example = dict[str, Any]
Preprocess = Callable[[Example], Example]


def _identity(example: Example) -> Example:
    return example


def _class_map(example: Example) -> Example:
    """A class-labelled image (chest X-ray): the label becomes a constant map, the authors' form (§2.1)."""
    image = np.asarray(example["image"])
    return {**example, "label": np.full(image.shape[:2], int(example["label"]), np.int32)}


def _mask_label(example: Example) -> Example:
    """An image with an organ mask (Kaggle lung CT): the mask is what is segmented."""
    return {**example, "label": example["mask"]}


def _vessels(example: Example) -> Example:
    """A fundus image (DRIVE): vessels are the label, and metrics count only inside the field of view."""
    return {**example, "fov": example["mask"]}


def _unlabelled_fov(example: Example) -> Example:
    """An unlabelled fundus image (FIRE): no vessel label, its own field of view."""
    image = np.asarray(example["image"])
    return {**example, "label": np.zeros(image.shape[:2], np.uint8), "fov": example["mask"]}


def paint_boxes(boxes: np.ndarray, classes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) int32 map of normalised corner boxes (M, 4) filled with their classes (M,), 0 elsewhere.

    A pixel belongs to a box when its centre does (`synth.boxes.filled_box_maps`' convention, on the
    host); where boxes overlap the higher class wins. Class 0 rows (padding) paint nothing.
    """
    height, width = image_hw
    ys, xs = (np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width
    out = np.zeros((height, width), np.int32)
    for (y0, x0, y1, x1), cls in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(classes).reshape(-1)):
        if cls > 0:
            inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
            out = np.where(inside, np.maximum(out, int(cls)), out)
    return out


def _boxes(example: Example, *, max_boxes: int, classes: tuple[int, ...]) -> Example:
    """A slice with lesion boxes (Tianchi, or its synthetic counterpart): padded normalised boxes.

    The builder's pixel-edge `boxes` and Tianchi `box_labels` become `boxes` (max_boxes, 4) normalised
    corners and `box_classes` (max_boxes,) in 1..len(classes) (0 = padding; other Tianchi classes are
    dropped), and the label is the box-label image of §6.6 repainted from them, each box with its class,
    so label and boxes agree whatever classes are kept.
    """
    image = np.asarray(example["image"])
    gt_boxes, gt_classes = boxes_lib.tianchi_ground_truth(
        example["boxes"],
        example["box_labels"],
        image.shape[:2],
        max_boxes=max_boxes,
        selected_classes=classes,
    )
    label = paint_boxes(gt_boxes, gt_classes, image.shape[:2])
    return {**example, "label": label, "boxes": gt_boxes, "box_classes": gt_classes}


# config.data.adapter -> raw example -> the example with "image" (H, W, K·C), "label" (H, W) and optionally
# "fov" (H, W) or "boxes" (M, 4) with "box_classes" (M,): every stage consumes that one form, whatever the
# dataset's own features are. `config.data.adapter_options` are the adapter's keyword arguments.
ADAPTERS: dict[str, Callable[..., Example]] = {
    "none": _identity,
    "class_map": _class_map,
    "mask_label": _mask_label,
    "vessels": _vessels,
    "unlabelled_fov": _unlabelled_fov,
    "boxes": _boxes,
}


class AdaptedSource:
    """A random-access source whose examples pass through a dataset adapter (picklable for grain)."""

    def __init__(self, source: Any, adapter: str, options: dict[str, Any] | None = None):
        if adapter not in ADAPTERS:
            raise ValueError(f"Unknown config.data.adapter {adapter!r}; choose one of {sorted(ADAPTERS)}")
        self.source, self.adapter, self.options = source, adapter, dict(options or {})
        try:  # A mistyped or missing option fails here, naming it, not in a loader worker.
            inspect.signature(ADAPTERS[adapter]).bind({}, **self.options)
        except TypeError as e:
            raise ValueError(
                f"config.data.adapter_options {self.options} for adapter {adapter!r}: {e}"
            ) from None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Example:
        return ADAPTERS[self.adapter](self.source[index], **self.options)


class Subset:
    """The examples `indices` of a random-access source."""

    def __init__(self, source: Any, indices: Any):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Example:
        return self.source[int(self.indices[index])]


class ConcatSource:
    """Several random-access sources one after the other."""

    def __init__(self, sources: list[Any]):
        self.sources = list(sources)
        self.ends = np.cumsum([len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int) -> Example:
        which = int(np.searchsorted(self.ends, index, side="right"))
        start = int(self.ends[which - 1]) if which else 0
        return self.sources[which][int(index) - start]


def gan_training_source(data: ml_collections.ConfigDict):
    """The real images the GAN stages (A and B) learn from: the training split, plus `data.gan_extra`.

    `gan_extra` names an unlabelled dataset whose images join the training split for the generators only
    (the retina family adds FIRE's fundus photos to DRIVE's, §2.1); it is built like `config.data`, with
    the same data dir and builder overrides, from its own `manual_dir`. The lesion processors and stage D
    never see it.
    """
    source = open_source(data, data.train_split)
    extra = data.get("gan_extra", None)
    if not extra or not extra.get("name", ""):
        return source
    extra_data = ml_collections.ConfigDict(data.to_dict())
    for key in ("name", "builder_config", "manual_dir", "adapter"):
        extra_data[key] = extra[key]
    extra_data.adapter_options = dict(extra.get("adapter_options", {}) or {})
    return ConcatSource([source, open_source(extra_data, extra.get("split", "train"))])


def builder_kwargs(data: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `data_builders` arguments of `config.data`: data dir, builder config and its overrides."""
    kwargs = dict(data_dir=data.data_dir, config=data.builder_config or None)
    kwargs.update(dict(data.get("builder_overrides", {}) or {}))
    return kwargs


def open_source(data: ml_collections.ConfigDict, split: str):
    """Opens `split` of `config.data`'s dataset as a random-access source, building it first if allowed.

    The phantom builds without a download, and a dataset whose `config.data.manual_dir` is set builds from
    there (the families' `runlocal` configs point it at the builder's dummy data); any other missing
    dataset raises an error that says which dataset, where it was looked for and the command that builds
    it. Examples come out in the one form every stage consumes (see `ADAPTERS`).
    """
    kwargs = builder_kwargs(data)
    if not sharding.agree(data_builders.is_built(data.name, **kwargs)):
        if not data.build_if_missing:
            # data_source raises the explanatory FileNotFoundError.
            return data_builders.data_source(data.name, split, **kwargs)
        if jax.process_index() == 0:
            log.info("Building dataset %s/%s into %s", data.name, data.builder_config, data.data_dir)
            data_builders.build(data.name, manual_dir=data.get("manual_dir") or None, **kwargs)
        if jax.process_count() > 1:
            # Every process took this branch (the decision above is process 0's), so all reach it.
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("synth_dataset_built")
    source = data_builders.data_source(data.name, split, **kwargs)
    return adapt(source, data)


def adapt(source: Any, data: ml_collections.ConfigDict) -> Any:
    """`source` through `config.data`'s adapter and its options (unchanged for adapter "none")."""
    adapter = data.get("adapter", "none")
    options = adapter_options(data)
    return source if adapter == "none" else AdaptedSource(source, adapter, options)


def adapter_options(data: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config.data.adapter_options` as keyword arguments (tuples for sequences, so they pickle plainly)."""
    options = dict(data.get("adapter_options", {}) or {})
    return {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in options.items()}


def image_and_label(example: Example) -> Example:
    """The preprocessing of stages that train on real slices: float32 image, int32 label (FOV, boxes)."""
    out = {
        "image": np.asarray(example["image"], np.float32),
        "label": np.asarray(example["label"], np.int32),
    }
    if "fov" in example:
        out["fov"] = np.asarray(example["fov"], bool)
    if "box_classes" in example:  # The detection families' padded, normalised boxes (the `boxes` adapter).
        out["boxes"] = np.asarray(example["boxes"], np.float32)
        out["box_classes"] = np.asarray(example["box_classes"], np.int32)
    return out


def local_batch_size(global_batch_size: int, data_parallel: int | None = None) -> int:
    """This process's share of a global batch, which must split evenly over the mesh's `data` axis.

    Args:
      global_batch_size: the configured batch size.
      data_parallel: size of the mesh's `data` axis (default: all devices).
    """
    devices = jax.device_count() if data_parallel is None else data_parallel
    if global_batch_size % devices or global_batch_size % jax.process_count():
        raise ValueError(
            f"batch_size={global_batch_size} is not divisible by the {devices} devices of the mesh's "
            "data axis"
        )
    return global_batch_size // jax.process_count()


def train_iterator(
    source: Any,
    *,
    preprocess: Preprocess,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    data_parallel: int | None = None,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's rows of each global training batch.

    Args:
      source: random-access source (`len` and `__getitem__`), e.g. a TFDS array_record data source.
      preprocess: numpy function from one decoded example to the dict of arrays a stage trains on.
      batch_size: the global batch size.
      seed: shuffling seed; the same seed gives the same order on every run and every process count.
      num_workers: grain worker processes (0: read in this process).
      data_parallel: size of the mesh's `data` axis, which the batch must split over (default: all devices).

    Returns:
      A grain iterator with `get_state()`/`set_state()`.
    """
    if len(source) == 0:
        raise ValueError("The training split is empty")
    local = local_batch_size(batch_size, data_parallel)
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat().map(preprocess)
    # Batches of the local size, then every P-th one: process p gets rows [p·local, (p+1)·local) of
    # each global batch (see the module docstring).
    ds = ds.batch(local, drop_remainder=True)
    ds = ds[jax.process_index() :: jax.process_count()]
    iter_ds = ds.to_iter_dataset()
    if num_workers > 0:
        # Grain's workers read absl flags; outside `absl.app.run` (notebooks, scripts) nothing parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(iter_ds)


def eval_batches(
    source: Any,
    *,
    preprocess: Preprocess,
    batch_size: int,
    max_examples: int = 0,
) -> Iterator[Example]:
    """One ordered pass over `source` in global batches, padded at the end.

    Every batch carries a boolean `valid` row mask; padding rows repeat the last example and have
    `valid=False`, so evaluators must weight by it. Each process yields its own rows, as in training.
    """
    n = len(source) if max_examples <= 0 else min(len(source), max_examples)
    if n == 0:
        raise ValueError("The evaluation split is empty")
    local = local_batch_size(batch_size)
    padded = math.ceil(n / batch_size) * batch_size

    def read(index: int) -> Example:
        example = dict(preprocess(source[min(index, n - 1)]))
        example["valid"] = np.asarray(index < n)
        return example

    ds = grain.MapDataset.range(padded).map(read).batch(local, drop_remainder=True)
    ds = ds[jax.process_index() :: jax.process_count()]
    return iter(ds)
