"""Registered multimodal samples from a trained workdir: the library behind stage C and the notebooks.

    gen = generate.Generator.from_workdir("runs/demo")
    structures = gen.sample_structures(jax.random.key(0), 4)         # stage A, with the §5.4 filter
    images = gen.synthesize(structures["maps"], structures["masks"], labels, jax.random.key(1))
    dice = gen.lesion_dice(images, labels)                            # the real-trained segmentors' reading

A `Generator` holds the frozen networks of a trained run (stage A's G_s and G_m with D_s, stage B's G, the
lesion processor of stage `segmentor`), loaded by `synth.frozen` (which also says which stages generation
needs), and compiles each of its functions once. Batches are split over the config's device mesh; a
batch whose size the mesh does not divide is padded and cut back.

The lesion filter of stage C (§7.1 step 8) scores a sample by how well the real-trained lesion processor
finds the lesion it was asked for: `synth.scoring.filter_dice`, whose kinds (`scoring.DICE_KINDS`) are the
standard whole-lesion Dice (the default), the mean Dice over lesion classes, the authors' parity Dice, a
classifier's agreement (`class`) or no filter (`none`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synth import (
    conditioning,
    flow_synthesis,
    frozen,
    lesion,
    registration,
    scoring,
    sharding,
    structure_filter,
    structure_flow,
    structure_nets,
    synthesis_nets,
    workdir,
)
from synth.models import grouped, sizes, vae


def synthesize_images(g_params, structure, organ, label, key, *, models, config, shards=1) -> jax.Array:
    """G's K registered modalities (B, H, W, K·c) for structure maps, organ masks and labels (B, H, W).

    `shards`: the batch's data-parallel split (`synthesis_nets.generate`).
    """
    s = structure[..., None].astype(jnp.float32)
    m = organ[..., None].astype(jnp.float32)
    g_input = conditioning.generator_input(key, s, m, label.astype(jnp.int32), config=config)
    fakes = synthesis_nets.generate(models, g_params, g_input, len(config.data.modalities), shards=shards)
    return registration.channels_last(fakes)


def predict_lesions(lesion_params, images, *, predict, features: int, shards: int = 1) -> jax.Array:
    """The lesion processor's labels (K, B, H, W) for images (B, H, W, K·c), in groups on CPU.

    A few examples at a time (`synth.models.grouped`); `features`: the processor's first-level width,
    `shards`: the batch's data-parallel split.
    """
    b, h, w = images.shape[:3]
    group = grouped.group_size(b, (h, w), features, itemsize=images.dtype.itemsize, shards=shards)
    return grouped.apply(lambda x: predict(lesion_params, x), images, group, shards=shards, out_axis=1)


def flow_images(ema_params, structure, organ, label, key, *, velocity, config, shards=1) -> jax.Array:
    """The flow family's `synthesize_images`: the configured sampler from the EMA parameters."""
    return flow_synthesis.sample_images(
        ema_params,
        structure[..., None],
        organ[..., None],
        label,
        key,
        velocity=velocity,
        config=config,
        shards=shards,
    )


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
        structure_params: dict,
        provenance: dict | None = None,
        workdir: str | os.PathLike | None = None,
        mesh=None,
    ):
        """Networks from parameters (`structure_params`: stage A's `g_params`, `d_params` or `ema_params`)."""
        self.config = config
        self.workdir = os.path.abspath(os.fspath(workdir)) if workdir is not None else None
        self.mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
        self.image_hw = tuple(int(v) for v in image_hw)
        self.modalities = tuple(config.data.modalities)
        self.num_classes = int(config.data.num_classes)
        self.provenance = dict(provenance or {})
        self.is_flow = flow_synthesis.is_flow(config)
        # The flow family's `g_params` are its EMA parameters; it has no D or stage-A networks of its own.
        self.models = None if self.is_flow else synthesis_nets.make_models(config, self.image_hw)
        self.g_params, self.lesion_params, self.structure_params = g_params, lesion_params, structure_params
        # The lesion filter always uses the real-trained lesion processor, even if G trained without it.
        own_lesion = None if self.is_flow else self.models.lesion
        self._lesion = own_lesion or lesion.processor(config, self.image_hw)

        # Stage A's sampler: its VAE-GAN (the same definitions as G's own when stage B draws maps from
        # stage A) or its flow (`structure_params`: `ema_params`).
        if structure_flow.is_flow(config):
            models_a = structure_flow.make_models(config, self.image_hw)
            self._generate_structures = structure_flow.make_generate_fn(models_a, config, self.image_hw)
        else:
            own_structure = None if self.is_flow else self.models.structure
            self._structure_models = own_structure or structure_nets.make_models(config, self.image_hw)
            self._code_shape = vae.code_shape(self.image_hw, self._structure_models.encoder.code_channels)
            self._generate_structures = structure_nets.make_generate_fn(
                self._structure_models, self._code_shape
            )
        f = config.structure.filter
        self.filter_params = structure_filter.FilterParams(
            min_j_s=f.min_j_s, mae=f.mae, max_count=f.max_count
        )

        batch = sharding.batch_sharding(self.mesh)
        repl = sharding.replicated(self.mesh)
        shards = sharding.data_parallel_size(self.mesh)  # On CPU each call of G takes a few from every shard.
        if self.is_flow:
            velocity = flow_synthesis.make_velocity(config, self.image_hw)
            synthesize_fn = functools.partial(flow_images, velocity=velocity, config=config, shards=shards)
        else:
            synthesize_fn = functools.partial(
                synthesize_images, models=self.models, config=config, shards=shards
            )
        self._synthesize = jax.jit(
            synthesize_fn,
            in_shardings=(repl, batch, batch, batch, repl),
            out_shardings=repl,
        )
        predict = functools.partial(
            predict_lesions,
            predict=self._lesion.predict,
            features=sizes.unet_kwargs(config.segmentor.model.size, self.image_hw)["features"],
            shards=shards,
        )
        self._predict = jax.jit(predict, in_shardings=(repl, batch), out_shardings=repl)
        self._dice = {}

    @classmethod
    def from_workdir(
        cls, workdir_path: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *, mesh=None
    ) -> Generator:
        """The generator of a trained workdir, with the config it was trained with unless one is given.

        Only the networks' parameters are read (`synth.frozen`): no dataset is opened when the workdir
        records its stages' image shapes.

        Raises:
          FileNotFoundError: a stage it needs (`frozen.needs(config, "generate")`) has no checkpoint there.
        """
        config = config if config is not None else workdir.load_config(workdir_path)
        workdir_path = os.path.abspath(os.fspath(workdir_path))
        needed = frozen.needs(config, "generate")
        missing = [name for name in needed if not workdir.is_complete(workdir_path, name, 1)]
        if missing:
            raise FileNotFoundError(
                f"Generation needs trained stages that {workdir_path} does not have: {', '.join(missing)}. "
                "Run them first (stage=all runs every stage in order)."
            )
        mesh = mesh or sharding.make_mesh(config.mesh.shape, config.mesh.axes)
        load = functools.partial(frozen.load, config, workdir_path, mesh=mesh)
        g_field = "ema_params" if flow_synthesis.is_flow(config) else "g_params"
        g, synthesis_step = load("synthesis", fields=(g_field,))
        lesion_params, segmentor_step = load("segmentor")
        structure_params, structure_step = load("structure")
        steps = {"synthesis": synthesis_step, "segmentor": segmentor_step, "structure": structure_step}
        # The other stages G was trained against (the translator) count for the provenance only.
        provenance = {
            f"{name}_step": steps[name] if name in steps else frozen.latest_step(workdir_path, name)
            for name in needed
        }
        return cls(
            config,
            image_hw=frozen.image_shape(config, workdir_path, "synthesis")[:2],
            g_params=g[g_field],
            lesion_params=lesion_params["params"],
            structure_params=structure_params,
            provenance=provenance,
            workdir=workdir_path,
            mesh=mesh,
        )

    # ------------------------------------------------------------------------------------------
    # Batched, sharded calls.

    def _padded(self, *arrays: np.ndarray) -> tuple[int, list[np.ndarray]]:
        """Pads the leading axis to a multiple of the mesh's data-parallel size."""
        n = arrays[0].shape[0]
        step = sharding.data_parallel_size(self.mesh)
        size = sharding.padded_size(n, step)
        return n, [_pad_to(np.asarray(a), size) for a in arrays]

    def sample_structures(self, key: jax.Array, n: int) -> dict[str, np.ndarray]:
        """N structure maps and organ masks from stage A, through its quality filter (§5.4).

        Returns:
          `maps`, `masks` (n, H, W) uint8 (masks: 1 = organ), `accepted` (n,) whether each passed the
          filter within `config.structure.filter.max_count` draws, `scores` and `draws` (n,).
        """
        with jax.set_mesh(self.mesh):  # Each device draws its share (`structure_nets.generate`).
            return self._sample_structures(key, n)

    def _sample_structures(self, key: jax.Array, n: int) -> dict[str, np.ndarray]:
        if structure_flow.is_flow(self.config):
            return structure_flow.sample_structures(
                self.structure_params["ema_params"],
                key,
                n,
                generate_fn=self._generate_structures,
                filter_params=self.filter_params,
            )
        return structure_nets.sample_structures(
            self.structure_params["g_params"],
            self.structure_params["d_params"],
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
        """The real-trained lesion processor's labels (K, B, H, W), one map per modality."""
        n, (x,) = self._padded(np.asarray(images, np.float32))
        return np.asarray(jax.device_get(self._predict(self.lesion_params, x)))[:, :n]

    def lesion_dice(self, images, labels, *, kind: str = "whole") -> np.ndarray:
        """(B,) how well the lesion processor finds each sample's lesion (`scoring.filter_dice`)."""
        if kind not in self._dice:
            self._dice[kind] = jax.jit(
                functools.partial(scoring.filter_dice, kind=kind, num_classes=self.num_classes)
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
