"""Structural maps, organ masks and lesion removal (METHOD §3.1–3.4): Algorithms 1 and 2.

Everything here except the host-side helper at the end is a pure ``jax.numpy`` function on batches:
images are NHWC float32 ``(B, H, W, C)``, every reduction names its axes and runs per image. (The
authors' ``tf_norm`` and mean subtraction reduce over axes [1, 2, 3] to shape [B] and then broadcast
that against the channel axis, which is only right for batch 1, METHOD §11.7; here reductions keep
their dims, so a batch gives exactly what each image gives alone.) The filters are `synth.image_ops`;
noise, label fusion and label placement (§3.5–3.7) are `synth.fusion`.

Mask convention. Ours (DATASETS.md) is **1 = organ/foreground, 0 = background**. The authors'
extraction mask ``M`` is the opposite (1 = background, METHOD §1); `to_authors_mask` converts at the
edges, e.g. when writing files the authors' scripts read or when comparing with their outputs.

Static arguments. Blur widths (``sigma``), median sizes, ``expand``, ``kind`` strings and
`ExtractionParams` are Python values that shape the computation: under ``jax.jit`` bind them with
``functools.partial`` or mark them static. Thresholds (``alpha``, ``beta``, ``gamma``) may be traced.
The per-dataset parameters (§3.3) are rows of the configs (`configs/tables.py`), handed in as
``config.structure.extraction``.

Readings of METHOD where it leaves a choice (parity first, the alternative behind a flag):

* A constant map normalises to 0, not 0/0 = NaN (TF would give NaN; every threshold on NaN is
  false, so the maps agree).
* The authors' blur keeps channel 0 of its input; we slice channel 0 first and blur that.
* Zero padding of the authors' background=1 mask makes the outside count as organ in the mask's
  median: image corners (and any organ close to the border) grow mask there. Kept by default
  (``mask_border="authors"``); ``"background"`` treats the outside as background.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from synth import image_ops

MASK_BORDERS = ("authors", "background")


def organ_mask(
    x: jax.Array,
    *,
    gamma: float,
    expand: int,
    median_size: int,
    border: str = "authors",
) -> jax.Array:
    """Algorithm 2 (METHOD §3.2): the expanded organ region, in OUR convention (1 = organ).

    Per image: foreground = [minmax(x) > γ] (min–max over all pixels and channels, channel 0
    kept, as for DRIVE); nearest-resize (TF floor indexing) to (H+p, W+p) and centre-crop back to
    (H, W), which scales the region up about the centre by ≈ p/2 px per side; then a k_m×k_m median.

    Args:
        x: (B, H, W, C) images.
        gamma: intensity threshold on the normalised image (may be traced).
        expand: p, the enlargement in pixels (static).
        median_size: k_m, odd (static).
        border: what the median assumes outside the image. ``"authors"`` (default, parity): the
            authors filter their background=1 mask with zero padding, so outside counts as ORGAN and
            image corners can turn into organ when k_m is large; ``"background"``: outside counts as
            background.

    Returns:
        (B, H, W, 1) float32 in {0, 1}, 1 = organ. `to_authors_mask` gives the authors' M.
    """
    image_ops.check_nhwc(x)
    if border not in MASK_BORDERS:
        raise ValueError(f"Unknown mask border {border!r}. Valid borders: {', '.join(MASK_BORDERS)}.")
    _, h, w, _ = x.shape
    organ = (image_ops.minmax_normalise(x)[..., :1] > gamma).astype(jnp.float32)
    if expand:
        organ = image_ops.crop_center(image_ops.resize_nearest_tf(organ, (h + expand, w + expand)), (h, w))
    # medfilt2d(1 − organ) with zero padding == 1 − median(organ) with one-padding: complementing a
    # binary window complements its median, so the authors' result is reproduced exactly.
    pad_value = 1.0 if border == "authors" else 0.0
    return image_ops.binary_median_filter(organ, median_size, pad_value=pad_value)


def to_authors_mask(m: jax.Array) -> jax.Array:
    """Convert an organ mask (ours, 1 = organ) to the authors' M (1 = background), or back."""
    return 1.0 - m


def structure_map(
    x: jax.Array,
    organ_mask: jax.Array | None,
    *,
    alpha: float,
    sigma1: float,
    sigma2: float,
    beta: float,
    median_size: int,
    blur_kind: str = "tf_replica",
) -> jax.Array:
    """Algorithm 1 (METHOD §3.1) with the authors' code semantics, per image.

    1. TF Sobel → (dy, dx) per channel; 2. element-wise min and max over the two directions;
    3. each min–max normalised over the whole image (all pixels and channels); 4. blur σ1, keeping
    only channel 0; 5. a = mean(g_min) − g_min, b = g_max − mean(g_max) (per-image means);
    6. s = [a > α] OR [b > α]; 7. s = [blur_σ2(s) > β]; 8. zero-padded k_s×k_s median;
    9. s ← organ ⊙ s (the authors' (1 − M) ⊙ s).

    A flat image has no gradient: its normalised gradients are 0 (not NaN), so its map is empty.
    As in the original, step 3 stretches whatever range a gradient map has to [0, 1]: a map that holds
    only float rounding noise (e.g. g_min of a single rising step between non-dyadic levels) turns
    that noise into "edges". Real images always have gradients of both signs.

    Args:
        x: (B, H, W, C) images in [0, 1] (H, W ≥ 5 for the ``tf_replica`` blur).
        organ_mask: (B, H, W, 1), 1 = organ (see `organ_mask`), or None to skip step 9.
        alpha: edge threshold α (step 6).
        sigma1: blur σ of step 4 (static).
        sigma2: blur σ of step 7 (static).
        beta: threshold β of step 7.
        median_size: k_s, odd (static).
        blur_kind: ``"tf_replica"`` (parity) or ``"gaussian"`` (see `gaussian_blur`).

    Returns:
        (B, H, W, 1) float32 in {0, 1}, 1 = edge.
    """
    image_ops.check_nhwc(x)
    edges = image_ops.sobel(x.astype(jnp.float32))
    g_min = image_ops.minmax_normalise(jnp.min(edges, axis=-1))
    g_max = image_ops.minmax_normalise(jnp.max(edges, axis=-1))
    g_min = image_ops.gaussian_blur(g_min[..., :1], sigma1, kind=blur_kind)
    g_max = image_ops.gaussian_blur(g_max[..., :1], sigma1, kind=blur_kind)
    a = jnp.mean(g_min, axis=image_ops.IMAGE_AXES, keepdims=True) - g_min
    b = g_max - jnp.mean(g_max, axis=image_ops.IMAGE_AXES, keepdims=True)
    s = ((a > alpha) | (b > alpha)).astype(jnp.float32)
    s = (image_ops.gaussian_blur(s, sigma2, kind=blur_kind) > beta).astype(jnp.float32)
    s = image_ops.binary_median_filter(s, median_size)
    if organ_mask is not None:
        s = s * organ_mask
    return s


def remove_lesion(s: jax.Array, label: jax.Array) -> jax.Array:
    """METHOD §3.4: zero the structure map wherever the lesion label is non-zero.

    Equals the paper's ``s ⊙ m_l`` with m_l = Algorithm 2 of the label at p = 0.

    Args:
        s: (B, H, W, C) structure map(s).
        label: (B, H, W) or (B, H, W, 1) integer lesion label, 0 = no lesion.

    Returns:
        (B, H, W, C).
    """
    return s * (image_ops.label_bhw1(label) == 0).astype(s.dtype)


@dataclasses.dataclass(frozen=True)
class ExtractionParams:
    """Extraction parameters of one dataset (METHOD §3.3). Frozen and hashable: a valid jit static.

    Attributes:
        alpha: α, the edge threshold of Algorithm 1 step 6.
        sigma1: σ1, blur before thresholding (step 4).
        sigma2: σ2, blur of the binary map (step 7).
        beta: β, threshold after blur #2 (step 7).
        median_s: k_s, median size on the structure map (step 8).
        gamma: γ, intensity threshold of the mask (Algorithm 2).
        expand: p, mask enlargement in pixels.
        median_m: k_m, median size on the mask.
        blur_kind: ``"tf_replica"`` (parity) or ``"gaussian"``.
        size: working (H, W) at which extraction runs (inputs are nearest-resized to it and the
            results back, as the authors do for X-ray, §11.4), or None for the input's size.
        channel: which input channel(s) to extract from: an int (BRATS: 0 = T1), ``"all"``
            (normalise over all channels, edges and mask of channel 0: DRIVE), or ``"each"`` (every
            channel separately, one map per channel: TC's three slices).
        mask_border: median padding of the mask, see `organ_mask` (``"authors"`` = parity).
    """

    alpha: float
    sigma1: float
    sigma2: float
    beta: float
    median_s: int
    gamma: float
    expand: int
    median_m: int
    blur_kind: str = "tf_replica"
    size: tuple[int, int] | None = None
    channel: int | str = 0
    mask_border: str = "authors"

    def __post_init__(self):
        if self.blur_kind not in image_ops.BLUR_KINDS:
            raise ValueError(
                f"Unknown blur kind {self.blur_kind!r}. Valid kinds: {', '.join(image_ops.BLUR_KINDS)}."
            )
        if self.mask_border not in MASK_BORDERS:
            raise ValueError(
                f"Unknown mask border {self.mask_border!r}. Valid borders: {', '.join(MASK_BORDERS)}."
            )
        if isinstance(self.channel, str) and self.channel not in ("all", "each"):
            raise ValueError(f"channel must be an int, 'all' or 'each', got {self.channel!r}")
        image_ops.check_odd(self.median_s, "median_s")
        image_ops.check_odd(self.median_m, "median_m")
        if self.size is not None:  # ConfigDicts hand back lists; keep the dataclass hashable
            object.__setattr__(self, "size", tuple(int(v) for v in self.size))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ExtractionParams:
        """Build from a ConfigDict or mapping with every field spelled out (`config.structure.extraction`).

        Raises:
            ValueError: the mapping names a dataset row (``dataset``) instead: the config of a workdir
                from before the per-dataset rows moved into the configs.
        """
        values = dict(config.items()) if hasattr(config, "items") else dict(config)
        if "dataset" in values:
            raise ValueError(
                f"config.structure.extraction names the dataset row {values['dataset']!r} instead of "
                "giving its fields: the per-dataset extraction rows (§3.3) now live in the configs "
                "(configs/tables.py) and a config holds every field. Pass the config its config file "
                "builds (e.g. Generator.from_workdir(workdir, config)), or write the row's fields into "
                "the workdir's config.json."
            )
        return cls(**values)


def structure_map_with(x: jax.Array, organ: jax.Array | None, params: ExtractionParams) -> jax.Array:
    """`structure_map` of x (B, H, W, C) at its own size, with a dataset's `ExtractionParams`."""
    return structure_map(
        x,
        organ,
        alpha=params.alpha,
        sigma1=params.sigma1,
        sigma2=params.sigma2,
        beta=params.beta,
        median_size=params.median_s,
        blur_kind=params.blur_kind,
    )


def extract(
    x: jax.Array,
    label: jax.Array | None,
    params: ExtractionParams,
    *,
    remove_lesions: bool,
) -> tuple[jax.Array, jax.Array]:
    """Structure map and organ mask of a batch (Algorithms 1 and 2, optional lesion removal).

    Jit with ``params`` and ``remove_lesions`` static (e.g. ``functools.partial``).

    Args:
        x: (B, H, W, C) images in [0, 1]; ``params.channel`` picks what is used.
        label: (B, H, W) or (B, H, W, 1) lesion labels at the input's size, or None (only allowed
            when ``remove_lesions`` is False).
        params: see `ExtractionParams`.
        remove_lesions: zero the map under the lesion (§3.4; the paper does it for BRATS, the demo
            code never does).

    Returns:
        (structure_map, organ_mask), each (B, H, W, 1) float32 in {0, 1} (organ: 1 = organ), or
        (B, H, W, C) for ``channel="each"``.
    """
    image_ops.check_nhwc(x)
    if remove_lesions and label is None:
        raise ValueError("remove_lesions=True needs a label")
    batch, h, w, c = x.shape
    x = x.astype(jnp.float32)
    if params.channel == "each":
        # One independent extraction per channel: fold the channels into the batch axis.
        x = jnp.moveaxis(x, -1, 1).reshape(batch * c, h, w, 1)
    elif isinstance(params.channel, int):
        x = x[..., params.channel : params.channel + 1]
    if params.size is not None:
        x = image_ops.resize_nearest_tf(x, params.size)
    organ = organ_mask(
        x, gamma=params.gamma, expand=params.expand, median_size=params.median_m, border=params.mask_border
    )
    s = structure_map_with(x, organ, params)
    if params.size is not None:
        s = image_ops.resize_nearest_tf(s, (h, w))
        organ = image_ops.resize_nearest_tf(organ, (h, w))
    if params.channel == "each":
        s = jnp.moveaxis(s.reshape(batch, c, h, w), 1, -1)
        organ = jnp.moveaxis(organ.reshape(batch, c, h, w), 1, -1)
    if remove_lesions:
        s = remove_lesion(s, label)
    return s, organ


def coarse_vessel_labels(structure: np.ndarray, organ: np.ndarray, *, shrink: int) -> np.ndarray:
    """Coarse vessel labels of synthetic retinas (METHOD §8.2), host side.

    A retina's structure map holds its vessels and the outer contour of the fundus disc; keeping only the
    edges inside the field of view shrunk by `shrink` pixels drops that contour, and what remains are the
    vessel lines.

    Args:
        structure: (B, H, W) structure maps, nonzero = edge.
        organ: (B, H, W) field-of-view (organ) masks, nonzero = inside.
        shrink: erosion radius in pixels (≥ 1).

    Returns:
        (B, H, W) uint8, 1 = vessel.
    """
    import scipy.ndimage

    if shrink < 1:
        raise ValueError(f"shrink must be at least 1 pixel, got {shrink}")
    structure, organ = np.asarray(structure), np.asarray(organ)
    if structure.shape != organ.shape or structure.ndim != 3:
        raise ValueError(f"structure {structure.shape} and organ {organ.shape} must both be (B, H, W)")
    disc = np.ones((2 * shrink + 1, 2 * shrink + 1), bool)
    yy, xx = np.mgrid[-shrink : shrink + 1, -shrink : shrink + 1]
    disc &= yy**2 + xx**2 <= shrink**2
    # Outside the image counts as outside the FOV, so a disc touching the border shrinks there too.
    inner = np.stack([scipy.ndimage.binary_erosion(m > 0, disc, border_value=0) for m in organ])
    return ((structure > 0) & inner).astype(np.uint8)
