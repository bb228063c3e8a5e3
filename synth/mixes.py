"""Stage D's training mixes (METHOD §8.1): which real, synthetic and augmented examples a run trains on.

A mix is written like `"real=1 syn=0.5 aug=0 mode=S"` (`parse_mix`; see `synth.stages.verify` for the
meaning of each key); `mix_parts` draws its examples (the real fraction by subject), `phases` orders them
for the M, S and R modes, and `MixSource` reads them, augmenting the `aug` copies on the fly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from synth import boxes, label_pool

MODES = ("M", "S", "R")
REAL, SYNTHETIC, AUGMENTED = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Mix:
    """One training mix (see the module docstring); amounts are relative to the real training set."""

    real: float = 0.0
    syn: float = 0.0
    aug: float = 0.0
    mode: str = "M"

    @property
    def name(self) -> str:
        pct = lambda x: f"{x * 100:g}"  # noqa: E731
        return f"real{pct(self.real)}_syn{pct(self.syn)}_aug{pct(self.aug)}_{self.mode}"


def parse_mix(text: str) -> Mix:
    """`"real=1 syn=0.5 mode=S"` -> Mix; unknown keys, bad values and empty mixes are errors naming it."""
    fields = {}
    for item in text.replace(",", " ").split():
        key, sep, value = item.partition("=")
        if not sep or key not in ("real", "syn", "aug", "mode"):
            raise ValueError(
                f"config.verify.mixes: {text!r}: {item!r} is not one of real=, syn=, aug=, mode= "
                "(e.g. 'real=1 syn=0.5')"
            )
        if key == "mode":
            if value not in MODES:
                raise ValueError(f"config.verify.mixes: {text!r}: mode must be one of {MODES}, got {value!r}")
            fields[key] = value
            continue
        try:
            fields[key] = float(value)
        except ValueError:
            raise ValueError(f"config.verify.mixes: {text!r}: {key}={value!r} is not a number") from None
        if fields[key] < 0 or (key == "real" and fields[key] > 1):
            raise ValueError(f"config.verify.mixes: {text!r}: {key} must be >= 0 (real at most 1)")
    mix = Mix(**fields)
    if mix.real == mix.syn == mix.aug == 0:
        raise ValueError(f"config.verify.mixes: {text!r} has no training data")
    return mix


class MixSource:
    """Random access over a mix's examples; each carries `source` (REAL, SYNTHETIC or AUGMENTED)."""

    def __init__(
        self,
        entries: np.ndarray,
        real,
        synthetic,
        *,
        seed: int,
        augment: label_pool.AugmentParams,
        class_labels: bool = False,
        max_boxes: int = 0,
        num_classes: int = 0,
    ):
        self.entries, self.real, self.synthetic = entries, real, synthetic
        self.seed, self.augment, self.class_labels = seed, augment, class_labels
        self.max_boxes, self.num_classes = max_boxes, num_classes

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        kind, index = (int(v) for v in self.entries[i])
        example = self.synthetic[index] if kind == SYNTHETIC else self.real[index]
        image = np.asarray(example["image"], np.float32)
        label = np.asarray(example["label"], np.int32)
        if kind == AUGMENTED:  # A fresh, reproducible transform per entry.
            rng = np.random.default_rng([self.seed, int(i), index])
            moved, label_moved = label_pool.augment_image_and_label(image, label, rng, self.augment)
            # A class map is the image's class, wherever the image moved.
            image, label = moved, (np.full_like(label, label.flat[0]) if self.class_labels else label_moved)
        out = {"image": image, "label": label, "source": np.int32(kind)}
        if self.max_boxes:  # A detection task: a real slice keeps its boxes, others get their label's.
            if kind == REAL:
                out["boxes"], out["box_classes"] = example["boxes"], example["box_classes"]
            else:
                out["boxes"], out["box_classes"] = boxes.boxes_from_label_map(
                    label, max_boxes=self.max_boxes, num_classes=self.num_classes
                )
        return out


def subjects_of(source) -> np.ndarray:
    """(N,) a subject number per example: its `subject_id` (one patient's slices share it), else its own."""
    names = [source[i].get("subject_id", i) for i in range(len(source))]
    return np.unique(np.asarray([str(n) for n in names]), return_inverse=True)[1]


def mix_parts(
    mix: Mix, num_real: int, num_synthetic: int, seed: int, subjects: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The (source, index) entries of each part of a mix: `real` (real and augmented) and `synthetic`.

    A real fraction below 1 is drawn by subject (`subjects`, (num_real,) ids; default: one per
    example): whole subjects in a random order until the fraction is reached, so 10 % of the data is 10 %
    of the patients, not a tenth of every patient's slices. Augmented examples are copies of that real
    subset (§8.1's R: the real data, augmented).

    Raises:
      ValueError: the stage-C dataset is smaller than the mix needs, or augmented copies without real data.
    """
    rng = np.random.default_rng([seed, 7])
    n_real, n_syn, n_aug = (round(x * num_real) for x in (mix.real, mix.syn, mix.aug))
    if n_syn > num_synthetic:
        raise ValueError(
            f"Mix {mix.name} needs {n_syn} synthetic samples ({mix.syn:g} x {num_real} real); the stage-C "
            f"dataset has {num_synthetic}: raise config.dataset.num_examples and rerun stage=dataset"
        )
    if n_aug and not n_real:
        raise ValueError(
            f"Mix {mix.name}: aug= makes augmented copies of the mix's real examples; set real= > 0"
        )
    subjects = np.arange(num_real) if subjects is None else np.asarray(subjects)
    order = rng.permutation(subjects.max() + 1 if num_real else 0)
    rank = (
        np.argsort(order)[subjects] if num_real else subjects
    )  # Each example's subject's place in the draw.
    chosen = np.lexsort((rng.random(num_real), rank))[:n_real]  # Whole subjects first, the last one cut.
    real = np.stack([np.full(n_real, REAL), chosen], axis=1)
    aug = np.stack(
        [np.full(n_aug, AUGMENTED), rng.choice(chosen, size=n_aug) if n_aug else chosen[:0]], axis=1
    )
    syn = np.stack([np.full(n_syn, SYNTHETIC), rng.permutation(num_synthetic)[:n_syn]], axis=1)
    return {"real": np.concatenate([real, aug]).astype(np.int64), "synthetic": syn.astype(np.int64)}


def phases(mix: Mix, parts: dict[str, np.ndarray], total_steps: int) -> list[tuple[str, int, np.ndarray]]:
    """`(phase, last step, entries)` in training order; S and R split the steps by the parts' sizes."""
    if mix.mode == "M":
        return [("all", total_steps, np.concatenate([parts["real"], parts["synthetic"]]))]
    order = ("synthetic", "real") if mix.mode == "S" else ("real", "synthetic")
    present = [p for p in order if len(parts[p])]
    sizes = np.array([len(parts[p]) for p in present], float)
    ends = np.round(np.cumsum(sizes) / sizes.sum() * total_steps).astype(int)
    ends = np.maximum(ends, np.arange(1, len(ends) + 1))  # Every part trains at least one step.
    return [(p, int(end), parts[p]) for p, end in zip(present, ends, strict=True)]
