"""The FID Inception-v3 (TF release 2015-12-05) in Flax Linen, and the feature extractor built on it.

FID compares pool3 features (2048-d) of one particular network: the Inception-v3 graph
``classify_image_graph_def.pb`` that TensorFlow released on 2015-12-05 and that the authors' TTUR-based
script loads (METHOD §9.3). Other Inception-v3 weights give other numbers. :class:`InceptionV3FID` is
that network as ported by pytorch-fid (``pytorch_fid/inception.py``: torchvision's Inception-v3 with the
FID blocks' quirks: average pools that do not count padding, and a max pool in the last block), with
the same layer names, so its weights load one-to-one.

**Weights (not downloaded, never substituted).** :func:`inception_v3_extractor` reads a local ``.npz``
that holds pytorch-fid's state dict under its own names (``Conv2d_1a_3x3.conv.weight``, ...,
``Mixed_7c.branch_pool.bn.running_var``). To make it:

1. download pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the release asset
   ``https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth``,
   about 95 MB; pytorch-fid converted it from the TF graph above);
2. on a machine with PyTorch, run ``python -m synth.metrics.convert_inception
   pt_inception-2015-12-05-6726825d.pth pt_inception-2015-12-05.npz`` (:mod:`synth.metrics.convert_inception`:
   ``torch.load`` then ``np.savez``, and a check that every layer is present).

A missing file raises FileNotFoundError naming the path and these steps.

**Preprocessing**, as pytorch-fid: images (B, H, W, C) in [0, 1]; grey (C = 1) tiled to 3 channels;
resized to 299×299 bilinearly with half-pixel centres and no antialiasing (``F.interpolate(...,
mode="bilinear", align_corners=False)``); scaled to [−1, 1]. pytorch-fid reports FIDs within about 1e-2
of the TF graph's; the TF graph's own resize differs slightly, so bit parity with the authors' numbers
is not to be expected.
"""

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299  # The network's native resolution; every image is resized to it.
FEATURE_DIM = 2048  # pool3 width.
_DOCS = (
    "see the synth.metrics.inception module docstring (python -m synth.metrics.convert_inception <pth> <npz>)"
)


class BasicConv(nn.Module):
    """Conv without bias, batch norm (ε 1e-3, inference statistics), ReLU: torchvision's BasicConv2d."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)  # Symmetric zero padding per spatial axis, as PyTorch's.

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=[(p, p) for p in self.padding],
            use_bias=False,
            # GPUs may otherwise use TF32 for float32 convolutions; FID needs full float32.
            precision=jax.lax.Precision.HIGHEST,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    # TF's average pool (and pytorch-fid's patch) leaves the zero padding out of the average.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b–5d: 1×1, 5×5, double 3×3 and pooled branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        branch5x5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        branch5x5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
        branch3x3dbl = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction to half resolution."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        branch3x3dbl = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b–6e: factorised 7×7 branches."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        branch1x1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        branch7x7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        branch7x7 = BasicConv(c7, **row, name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv(192, **col, name="branch7x7_3")(branch7x7)
        dbl = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        dbl = BasicConv(c7, **col, name="branch7x7dbl_2")(dbl)
        dbl = BasicConv(c7, **row, name="branch7x7dbl_3")(dbl)
        dbl = BasicConv(c7, **col, name="branch7x7dbl_4")(dbl)
        dbl = BasicConv(192, **row, name="branch7x7dbl_5")(dbl)
        branch_pool = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: second grid reduction."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        branch3x3 = BasicConv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(branch3x3)
        branch7x7x3 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = BasicConv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(branch7x7x3)
        branch_pool = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b, 7c: expanded 3×3 branches; the FID graph max-pools in 7c where the paper average-pools."""

    max_pool: bool = False  # True for Mixed_7c, as the 2015 graph (pytorch-fid's FIDInceptionE_2).

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        branch1x1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        branch3x3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate(
            [
                BasicConv(384, **row, name="branch3x3_2a")(branch3x3),
                BasicConv(384, **col, name="branch3x3_2b")(branch3x3),
            ],
            axis=-1,
        )
        dbl = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        dbl = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(dbl)
        dbl = jnp.concatenate(
            [
                BasicConv(384, **row, name="branch3x3dbl_3a")(dbl),
                BasicConv(384, **col, name="branch3x3dbl_3b")(dbl),
            ],
            axis=-1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_same(x)
        branch_pool = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class InceptionV3FID(nn.Module):
    """The FID Inception-v3 trunk up to pool3: (B, H, W, 3) in [−1, 1] -> (B, 2048).

    Any H, W ≥ 75 runs (the extractor always feeds 299×299); the classifier head is left out.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = BasicConv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# --------------------------------------------------------------------------------------------------
# Weights: the PyTorch state-dict layout <-> Flax variables.

# Flax leaf name -> PyTorch parameter name within a BasicConv2d's ``conv`` / ``bn``.
_TORCH_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
# State-dict entries that the pool3 trunk does not use.
_UNUSED_SUFFIXES = ("num_batches_tracked",)
_UNUSED_PREFIXES = ("fc.",)


@functools.cache
def _variable_shapes() -> dict:
    """The trunk's variable tree as shapes, traced once without running the network."""
    return jax.eval_shape(InceptionV3FID().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))


def _torch_name(path: tuple) -> str:
    *modules, leaf = (entry.key for entry in path)
    return ".".join([*modules, _TORCH_LEAF[leaf]])


def to_torch_layout(variables: Mapping) -> dict[str, np.ndarray]:
    """Flatten Flax variables of :class:`InceptionV3FID` into pytorch-fid's state-dict names and layouts.

    Convolution kernels go from Flax (kh, kw, in, out) to PyTorch (out, in, kh, kw); batch-norm scale,
    bias, mean and var become ``weight``, ``bias``, ``running_mean``, ``running_var``.

    Args:
        variables: ``{"params": ..., "batch_stats": ...}`` of the trunk.

    Returns:
        Name -> numpy array, the inverse of :func:`from_torch_layout`.
    """
    arrays = {}
    for path, value in jax.tree_util.tree_flatten_with_path(dict(variables))[0]:
        value = np.asarray(value)
        arrays[_torch_name(path[1:])] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
    return arrays


def from_torch_layout(arrays: Mapping[str, np.ndarray]) -> dict:
    """Build :class:`InceptionV3FID` variables from pytorch-fid's state dict (names and layouts).

    Args:
        arrays: name -> array, e.g. ``np.load`` of the converted ``.npz``.

    Returns:
        ``{"params": ..., "batch_stats": ...}`` as float32 jax arrays.

    Raises:
        ValueError: a layer is missing, has the wrong shape, or an unexpected entry is present (a
            different network's weights); ``fc.*`` and ``*.num_batches_tracked`` are ignored.
    """
    used = set()

    def load(path: tuple, shape: jax.ShapeDtypeStruct) -> jax.Array:
        name = _torch_name(path[1:])
        if name not in arrays:
            raise ValueError(f"Inception weights lack {name!r}; {_DOCS}.")
        value = np.asarray(arrays[name], dtype=np.float32)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        if value.shape != shape.shape:
            raise ValueError(f"Inception weight {name!r} has shape {value.shape}, expected {shape.shape}.")
        used.add(name)
        return jnp.asarray(value)

    variables = jax.tree_util.tree_map_with_path(load, _variable_shapes())
    unexpected = sorted(
        name
        for name in set(arrays) - used
        if not name.endswith(_UNUSED_SUFFIXES) and not name.startswith(_UNUSED_PREFIXES)
    )
    if unexpected:
        raise ValueError(
            f"Unexpected entries in the Inception weights (not the FID network?): {unexpected[:5]}."
        )
    return variables


def preprocess(images: jax.Array) -> jax.Array:
    """Turn images (B, H, W, 1 or 3) in [0, 1] into the network's input (B, 299, 299, 3) in [−1, 1]."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"Expected images (B, H, W, 1 or 3), got shape {images.shape}.")
    images = jnp.broadcast_to(images, (*images.shape[:3], 3)).astype(jnp.float32)
    # antialias=False: pytorch-fid's F.interpolate does not filter when shrinking.
    resized = jax.image.resize(
        images, (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3), method="bilinear", antialias=False
    )
    return 2.0 * resized - 1.0


class InceptionFeatureExtractor:
    """A :class:`~synth.metrics.distribution.FeatureExtractor`: images in [0, 1] -> pool3 features."""

    def __init__(self, variables: Mapping, *, batch_size: int = 50):
        """Wrap loaded trunk variables; images are processed ``batch_size`` at a time (one compile)."""
        self.variables = variables
        self.batch_size = batch_size
        model = InceptionV3FID()
        self._apply = jax.jit(lambda v, x: model.apply(v, preprocess(x)))

    def __call__(self, images: Any) -> jax.Array:
        """Return (B, 2048) float32 features of (B, H, W, C) images, C 1 (tiled to 3) or 3."""
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"Expected images (B, H, W, 1 or 3), got shape {images.shape}.")
        # Tile grey images here so that grey and colour inputs of one size share one compiled network.
        images = jnp.broadcast_to(images, (*images.shape[:3], 3))
        # Pad the last batch to the full size so that every call has one shape (but never grow a set
        # smaller than one batch: a 299² forward pass is costly on a CPU).
        size = min(self.batch_size, images.shape[0])
        features = []
        for start in range(0, images.shape[0], size):
            batch = images[start : start + size]
            count = batch.shape[0]
            batch = jnp.pad(batch, ((0, size - count), (0, 0), (0, 0), (0, 0)))
            features.append(self._apply(self.variables, batch)[:count])
        return jnp.concatenate(features, axis=0)


def inception_v3_extractor(
    weights_path: str | os.PathLike, *, batch_size: int = 50
) -> InceptionFeatureExtractor:
    """Load the FID Inception-v3 from a local ``.npz`` and return its pool3 feature extractor.

    Args:
        weights_path: the converted pytorch-fid weights (module docstring says which file and how).
        batch_size: images per jitted forward pass.

    Returns:
        A callable images (B, H, W, C in [0, 1]) -> (B, 2048) features.

    Raises:
        FileNotFoundError: ``weights_path`` does not exist (there is no download and no fallback).
        ValueError: the file is not the FID network's weights.
    """
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"FID Inception-v3 weights not found at {os.fspath(weights_path)!r}; {_DOCS}."
        )
    with np.load(weights_path) as data:
        arrays = {name: data[name] for name in data.files}
    return InceptionFeatureExtractor(from_torch_layout(arrays), batch_size=batch_size)
