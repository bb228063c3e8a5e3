"""Registered multimodal samples from a trained workdir: the library behind stage C and the notebooks.

    gen = generate.Generator.from_workdir("runs/demo")
    structures = gen.sample_structures(jax.random.key(0), 4)         # stage A, with the §5.4 filter
    images = gen.synthesize(structures["maps"], structures["masks"], labels, jax.random.key(1))
    dice = gen.lesion_dice(images, labels)                            # the real-trained segmentors' reading

A `Generator` holds the frozen networks of a trained run (stage A's G_s and G_m with D_s, stage B's G, the
segmentors of stage `segmentor`) and compiles each of its functions once. Batches are split over the
config's device mesh; a batch whose size the mesh does not divide is padded and cut back.

The lesion filter of stage C (§7.1 step 8) scores a sample by how well the real-trained segmentors find
the lesion it was asked for (`DICE_KINDS`):
  - `whole`: Dice of lesion against background (labels > 0), the standard whole-tumour Dice; the default;
  - `classes`: the mean Dice over the lesion classes present in the label or the prediction;
  - `parity`: the authors' soft Dice on class indices (§9.4), as their selection script scores;
each per modality, then averaged over the K modalities. A sample without a lesion in either map scores 1.
Families whose lesion processor is not a segmentor use `class` (the fraction of the K modalities whose
real-trained classifier sees the asked-for class, X-ray) or `none` (no lesion filter: every sample scores
1, for lung CT and retina, which have no lesion input).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import input_pipeline, metrics, registration, sharding, structure_filter, train
from synth.models import vae

DICE_KINDS = ("whole", "classes", "parity", "class", "none")


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to `<workdir>/config.json`.

    Raises:
      FileNotFoundError: the workdir has no `config.json` (it was never run with `launch.py`).
    """
    path = os.path.join(os.fspath(workdir), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: pass the run's config, or a workdir that launch.py (or "
            "synth.pipeline.train_and_evaluate) has run in"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def lesion_dice(predicted: jax.Array, label: jax.Array, *, kind: str, num_classes: int) -> jax.Array:
    """How well each sample's K predicted label maps match the label it was made from.

    Args:
      predicted: (K, B, H, W) integer labels, one map per modality's segmentor.
      label: (B, H, W) the labels the samples were synthesised from.
      kind: one of `DICE_KINDS` (see the module docstring).
      num_classes: C, background included.

    Returns:
      (B,) the Dice averaged over the K modalities.
    """
    if kind not in DICE_KINDS:
        raise ValueError(f"Unknown config.dataset.dice.kind {kind!r}; choose one of {DICE_KINDS}")
    if kind == "none":
        return jnp.ones(label.shape[:1], jnp.float32)
    if kind == "class":
        return jnp.mean(predicted[:, :, 0, 0] == label[None, :, 0, 0], axis=0, dtype=jnp.float32)

    def one_modality(pred):
        if kind == "whole":
            return metrics.binary_dice_per_image(pred > 0, label > 0)[0]
        if kind == "parity":
            return jax.vmap(lambda p, t: metrics.parity_dice(p[None], t[None]))(pred, label)
        classes = jnp.arange(1, num_classes)
        p = pred[..., None] == classes
        t = label[..., None] == classes
        inter = jnp.sum(p & t, axis=(1, 2)).astype(jnp.float32)
        size = (jnp.sum(p, axis=(1, 2)) + jnp.sum(t, axis=(1, 2))).astype(jnp.float32)
        present = size > 0
        dice = jnp.where(present, 2.0 * inter / jnp.maximum(size, 1.0), 0.0)
        count = jnp.sum(present, axis=-1)
        return jnp.where(count > 0, jnp.sum(dice, axis=-1) / jnp.maximum(count, 1), 1.0)

    return jnp.mean(jax.vmap(one_modality)(predicted), axis=0)


def synthesize_images(g_params, structure, organ, label, key, *, models, config) -> jax.Array:
    """G's K registered modalities (B, H, W, K·c) for structure maps, organ masks and labels (B, H, W)."""
    s = structure[..., None].astype(jnp.float32)
    m = organ[..., None].astype(jnp.float32)
    from synth.stages import synthesis

    g_input = synthesis.generator_input(key, s, m, label.astype(jnp.int32), config=config)
    fakes = synthesis.synthesize(models, g_params, g_input, len(config.data.modalities))
    return registration.channels_last(fakes)


def _lesion_processor_name(config: ml_collections.ConfigDict) -> str:
    """Stage `segmentor`'s real-trained network as a lesion processor: segmentors, classifier, detector."""
    task = config.segmentor.get("task", "segment")
    return {"classify": "classifier", "detect": "detector"}.get(task, "segmentor")


def _needed_stages(config: ml_collections.ConfigDict) -> list[str]:
    """The trained stages a Generator loads, in pipeline order."""
    from synth.stages import synthesis

    names = ["structure", "segmentor"]
    if synthesis._uses_translator(config):  # noqa: SLF001
        names.append("translator")
    return names + ["synthesis"]


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
    pad = n - x.shape[0]
    return x if pad == 0 else np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])


class Generator:
    """The frozen networks of a trained run, with their compiled generation functions.

    Attributes:
      config: the run's resolved config.
      image_hw: (H, W) of the trained networks.
      modalities: the modality names, in channel order.
      provenance: checkpoint steps of every network used (for a dataset's metadata).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        *,
        image_hw: tuple[int, int],
        g_params,
        lesion_params,
        structure_state,
        provenance: dict | None = None,
        workdir: str | os.PathLike | None = None,
        mesh=None,
    ):
        """Networks from parameters; `from_workdir` loads them from a trained run."""
        from synth.stages import structure, synthesis

        self.config = config
        self.workdir = os.path.abspath(os.fspath(workdir)) if workdir is not None else None
        self.mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
        self.image_hw = tuple(int(v) for v in image_hw)
        self.modalities = tuple(config.data.modalities)
        self.num_classes = int(config.data.num_classes)
        self.provenance = dict(provenance or {})
        self.models = synthesis.make_models(config, self.image_hw)
        self.g_params, self.lesion_params, self.structure_state = g_params, lesion_params, structure_state
        # The lesion filter always uses the real-trained lesion processor, even if G trained without it.
        self._lesion = self.models.lesion or synthesis.LESION_PROCESSORS[_lesion_processor_name(config)](
            config, self.image_hw
        )

        self._structure_models = structure.make_models(config, self.image_hw)
        self._code_shape = vae.code_shape(self.image_hw, self._structure_models.encoder.code_channels)
        self._generate_structures = structure.make_generate_fn(self._structure_models, self._code_shape)
        f = config.structure.filter
        self.filter_params = structure_filter.FilterParams(
            min_j_s=f.min_j_s, mae=f.mae, max_count=f.max_count
        )

        batch = sharding.batch_sharding(self.mesh)
        repl = sharding.replicated(self.mesh)
        self._synthesize = jax.jit(
            functools.partial(synthesize_images, models=self.models, config=config),
            in_shardings=(repl, batch, batch, batch, repl),
            out_shardings=repl,
        )
        self._predict = jax.jit(self._lesion.predict, in_shardings=(repl, batch), out_shardings=repl)
        self._dice = {}

    @classmethod
    def from_workdir(
        cls, workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *, mesh=None
    ) -> Generator:
        """The generator of a trained workdir, with the config it was trained with unless one is given.

        Raises:
          FileNotFoundError: a stage it needs (structure, segmentor, synthesis) has no checkpoint there.
        """
        from synth.stages import segmentor, structure, synthesis

        config = config if config is not None else load_config(workdir)
        workdir = os.path.abspath(os.fspath(workdir))
        missing = [name for name in _needed_stages(config) if not train.is_complete(workdir, name, 1)]
        if missing:
            raise FileNotFoundError(
                f"Generation needs trained stages that {workdir} does not have: {', '.join(missing)}. "
                "Run them first (stage=all runs every stage in order)."
            )
        mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
        source = input_pipeline.open_source(config.data, config.data.train_split)
        image_hw = tuple(np.asarray(source[0]["image"]).shape[:2])
        # Stage B's G, with the frozen networks its stage was trained against (their provenance too).
        spec = synthesis.build(config, mesh, workdir=workdir)
        state = train.load_trained_state(spec, config, workdir)
        provenance = {"synthesis_step": int(jax.device_get(state.step)), **spec.provenance}
        if "lesion" in spec.frozen:
            lesion_params = spec.frozen["lesion"]
        else:
            seg = segmentor.load_state(config, workdir)
            lesion_params = seg.params
            provenance["segmentor_step"] = int(jax.device_get(seg.step))
        structure_state = structure.load_state(config, workdir)
        provenance["structure_step"] = int(jax.device_get(structure_state.step))
        return cls(
            config,
            image_hw=image_hw,
            g_params=state.g_params,
            lesion_params=lesion_params,
            structure_state=structure_state,
            provenance=provenance,
            workdir=workdir,
            mesh=mesh,
        )

    # ------------------------------------------------------------------------------------------
    # Batched, sharded calls.

    def _padded(self, *arrays: np.ndarray) -> tuple[int, list[np.ndarray]]:
        """Pads the leading axis to a multiple of the mesh's data-parallel size."""
        n = arrays[0].shape[0]
        step = sharding.data_parallel_size(self.mesh)
        size = -(-n // step) * step
        return n, [_pad_to(np.asarray(a), size) for a in arrays]

    def sample_structures(self, key: jax.Array, n: int) -> dict[str, np.ndarray]:
        """N structure maps and organ masks from stage A, through its quality filter (§5.4).

        Returns:
          `maps`, `masks` (n, H, W) uint8 (masks: 1 = organ), `accepted` (n,) whether each passed the
          filter within `config.structure.filter.max_count` draws, `scores` and `draws` (n,).
        """
        from synth.stages import structure

        return structure.sample_structures(
            self.structure_state,
            key,
            n,
            models=self._structure_models,
            code_shape=self._code_shape,
            filter_params=self.filter_params,
            generate_fn=self._generate_structures,
        )

    def synthesize(self, structure_maps, organ_masks, labels, key: jax.Array) -> np.ndarray:
        """All K registered modalities (B, H, W, K·c) in [0, 1] from maps, masks and labels (B, H, W)."""
        self._check_hw(structure_maps, "structure_maps")
        self._check_hw(organ_masks, "organ_masks")
        self._check_hw(labels, "labels")
        n, (s, m, lab) = self._padded(structure_maps, organ_masks, labels)
        out = self._synthesize(
            self.g_params, s.astype(np.float32), m.astype(np.float32), lab.astype(np.int32), key
        )
        return np.asarray(jax.device_get(out))[:n]

    def segment(self, images) -> np.ndarray:
        """The real-trained segmentors' labels (K, B, H, W), one map per modality."""
        n, (x,) = self._padded(np.asarray(images, np.float32))
        return np.asarray(jax.device_get(self._predict(self.lesion_params, x)))[:, :n]

    def lesion_dice(self, images, labels, *, kind: str = "whole") -> np.ndarray:
        """(B,) how well the segmentors find each sample's lesion (see the module docstring)."""
        if kind not in self._dice:
            self._dice[kind] = jax.jit(
                functools.partial(lesion_dice, kind=kind, num_classes=self.num_classes)
            )
        if kind == "none":  # No lesion filter: the lesion processor need not run.
            return np.ones(len(labels), np.float32)
        predicted = self.segment(images)
        return np.asarray(self._dice[kind](predicted, np.asarray(labels, np.int32)))

    def _check_hw(self, x, name: str) -> None:
        shape = np.shape(x)
        if len(shape) != 3 or tuple(shape[1:]) != self.image_hw:
            raise ValueError(
                f"{name} must be (B, H, W) at the trained size {self.image_hw}, got shape {tuple(shape)}"
            )
