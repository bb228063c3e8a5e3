"""SSD lesion detector for the Tianchi lung CTs (METHOD §6.6, §8.4), a standard, corrected SSD (§11.22).

The trunk follows the authors' ``ssd.py`` table, widths scaled by w = ``features`` (ngf); every conv is
conv → GroupNorm → activation, TF ``SAME`` padding, avg-pool 2×2 down-sampling::

    input dropout (train only)
    block1    3×3 w, 3×3 w               avg-pool   H/2
    block2    3×3 2w, 3×3 2w                        H/2
    block3    3×3 4w ×3                  avg-pool   H/4
    block4    3×3 8w ×3                  avg-pool   H/8    -> head 1
    block5    3×3 8w ×3                  avg-pool   H/16
    block6_7  3×3 16w, 1×1 16w                      H/16   -> head 2
    block8    1×1 4w, 3×3 s2 8w                     H/32   -> head 3
    block9    1×1 2w, 3×3 s2 4w                     H/64   -> head 4
    block10   1×1 2w, 3×3 s2 4w                     H/128  -> head 5
    block11   avg-pool                              H/256  -> head 6

Only the blocks up to the last head in use run, so ``num_maps`` = 3 suits 32²–64² images (maps H/8,
H/16, H/32). Every halving rounds up (ceil, TF ``SAME``), so odd sizes work; the authors' last pool is
``VALID`` (floor), which agrees at 512². Head k is a pair of plain linear convs (3×3; 1×1 on map 6, as
in the code) with A_k·(C + 1) class logits and A_k·4 offsets, A_k = boxes per cell.

Corrections to the authors' SSD (§11.22), each a deliberate departure:

* **Linear heads.** The code ends both heads in BN + ReLU, so logits and offsets cannot be negative; here
  they are bias-only convs.
* **Encoded offsets.** Locations are SSD offsets from the default boxes, variances (0.1, 0.2)
  (:mod:`synth.boxes`), not raw boxes.
* **Standard default boxes.** Scales s_k = linspace(s_min, s_max, num_maps) (the code's 0.05 … 0.9 are
  the defaults), w = s·√r, h = s/√r (the code takes √s), plus an extra box of scale √(s_k·s_{k+1}) for
  ratio 1 (s_{num_maps} extrapolated one step). The default ratios (1, 2, ½) on maps 1, 5, 6 and
  (1, 2, ½, 3, ⅓) on maps 2–4 give the paper's [4, 6, 6, 6, 4, 4] boxes per cell, hence the same
  **24 528** default boxes at 512² (64²·4 + 32²·6 + 16²·6 + 8²·6 + 4²·4 + 2²·4).
* **Classes.** ``num_classes`` foreground classes + background at index 0 (the code's TC script built
  the SSD with 64 classes by a positional-argument slip, §11.21).
* **Normalisation identical in train and eval: GroupNorm, no BatchNorm.** The code's BN always used
  batch statistics, at test time too, so a box's score depended on the rest of the batch. With
  running averages instead, train and eval would still differ, and the detector also serves frozen
  inside stage B's generator loss (§6.6), where mutable ``batch_stats`` would have to be threaded and
  kept frozen. GroupNorm normalises each image on its own, so the model is a pure function of its
  parameters with no mutable collections. It is preferred to the project's InstanceNorm because the
  deep maps are tiny (2×2, 1×1): instance norm over one pixel maps every channel to its bias and the
  head would see no image at all, while a group of >= 4 channels keeps information.
* **Init.** N(0, 0.02) (the project's default, :func:`synth.models.layers.kernel_init`), not the code's
  truncated N(0, 1); biases 0.

The default boxes (:func:`default_boxes`) are ordered exactly as the model's outputs: maps in order,
then cells row-major (y, then x), then the cell's boxes (ratios in order, the extra box last).
"""

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synth.models import conv
from synth.models.layers import NORM_EPSILON, kernel_init
from synth.models.layers import activation as activation_fn

MAX_MAPS = 6  # The paper's six heads.
MIN_SCALE = 0.05  # The code's scale = linspace(0.05, 0.9, 6).
MAX_SCALE = 0.9
# Per map, the aspect ratios r = w/h; with the extra ratio-1 box: [4, 6, 6, 6, 4, 4] boxes per cell.
DEFAULT_BOXES_RATIOS: tuple[tuple[float, ...], ...] = (
    (1.0, 2.0, 0.5),
    (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0),
    (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0),
    (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0),
    (1.0, 2.0, 0.5),
    (1.0, 2.0, 0.5),
)
NORM_GROUPS = 32  # GroupNorm's usual group count, for wide layers.
MIN_GROUP_SIZE = 4  # Narrow layers (tiny variant) use fewer groups so none normalises a lone channel.

# (name, convs as (kernel, stride, width multiplier of ngf), avg-pool after, feeds the next head).
TRUNK: tuple[tuple[str, tuple[tuple[int, int, int], ...], bool, bool], ...] = (
    ("block1", ((3, 1, 1), (3, 1, 1)), True, False),
    ("block2", ((3, 1, 2), (3, 1, 2)), False, False),
    ("block3", ((3, 1, 4),) * 3, True, False),
    ("block4", ((3, 1, 8),) * 3, True, True),
    ("block5", ((3, 1, 8),) * 3, True, False),
    ("block6_7", ((3, 1, 16), (1, 1, 16)), False, True),
    ("block8", ((1, 1, 4), (3, 2, 8)), False, True),
    ("block9", ((1, 1, 2), (3, 2, 4)), False, True),
    ("block10", ((1, 1, 2), (3, 2, 4)), False, True),
    ("block11", (), True, True),
)
HEAD_KERNELS = (3, 3, 3, 3, 3, 1)  # The code's last head is 1×1 (its map is 2×2 at 512²).
FIRST_MAP_HALVINGS = 3  # Head 1 reads H/8; each later head halves again.


def resolve_boxes_ratios(
    num_maps: int, boxes_ratios: Sequence[Sequence[float]] | None = None
) -> tuple[tuple[float, ...], ...]:
    """Return the per-map aspect ratios: ``boxes_ratios`` checked, or the first ``num_maps`` defaults.

    Raises:
        ValueError: ``num_maps`` outside 1..6, a wrong number of maps, or a non-positive ratio.
    """
    if not 1 <= num_maps <= MAX_MAPS:
        raise ValueError(f"num_maps must be in 1..{MAX_MAPS}, got {num_maps}.")
    if boxes_ratios is None:
        return DEFAULT_BOXES_RATIOS[:num_maps]
    ratios = tuple(tuple(float(r) for r in per_map) for per_map in boxes_ratios)
    if len(ratios) != num_maps:
        raise ValueError(f"boxes_ratios has {len(ratios)} maps but num_maps = {num_maps}.")
    if any(not per_map or min(per_map) <= 0 for per_map in ratios):
        raise ValueError(f"Every map needs at least one positive aspect ratio, got {ratios}.")
    return ratios


def boxes_per_cell(ratios: Sequence[float]) -> int:
    """Count a map's default boxes per cell: one per ratio, plus the extra box if ratio 1 is present."""
    return len(ratios) + (1 if any(math.isclose(r, 1.0) for r in ratios) else 0)


def feature_map_sizes(image_hw: tuple[int, int], num_maps: int) -> tuple[tuple[int, int], ...]:
    """Return the (h, w) of each head's feature map: H/8, H/16, ... rounded up at every halving.

    Args:
        image_hw: the input (H, W).
        num_maps: heads in use, 1..6.

    Returns:
        ``num_maps`` pairs, e.g. ((64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2)) at 512².
    """
    resolve_boxes_ratios(num_maps)  # Validates num_maps.
    h, w = image_hw
    sizes = []
    for k in range(num_maps):
        for _ in range(FIRST_MAP_HALVINGS if k == 0 else 1):
            h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    return tuple(sizes)


def default_scales(num_maps: int, min_scale: float = MIN_SCALE, max_scale: float = MAX_SCALE) -> np.ndarray:
    """Return s_0..s_{num_maps}: linspace(min_scale, max_scale, num_maps) extrapolated by one step.

    The extra last value is only used for the last map's √(s_k·s_{k+1}) box (SSD300 does the same with
    its 315 px "max size"); with one map it is ``max_scale``.
    """
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"Need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}.")
    if num_maps == 1:
        return np.array([min_scale, max_scale], np.float64)
    step = (max_scale - min_scale) / (num_maps - 1)
    return min_scale + step * np.arange(num_maps + 1, dtype=np.float64)


def default_boxes(
    image_hw: tuple[int, int],
    num_maps: int = MAX_MAPS,
    boxes_ratios: Sequence[Sequence[float]] | None = None,
    *,
    min_scale: float = MIN_SCALE,
    max_scale: float = MAX_SCALE,
) -> np.ndarray:
    """Build SSD's default boxes, in the order of the model's outputs (module docstring).

    Args:
        image_hw: the input (H, W).
        num_maps: heads in use, 1..6.
        boxes_ratios: per map, aspect ratios r = w/h; None = :data:`DEFAULT_BOXES_RATIOS`.
        min_scale: s of the first map, as a fraction of the image side.
        max_scale: s of the last map.

    Returns:
        (N, 4) float32 ``(cy, cx, h, w)`` in image fractions; cell centres ((y + ½)/h_k, (x + ½)/w_k).
        Boxes are not clipped, so an edge box keeps its shape. N = 24 528 at 512² with the defaults.
    """
    ratios = resolve_boxes_ratios(num_maps, boxes_ratios)
    scales = default_scales(num_maps, min_scale, max_scale)
    per_map = []
    for k, (map_h, map_w) in enumerate(feature_map_sizes(image_hw, num_maps)):
        shapes = [(scales[k] / math.sqrt(r), scales[k] * math.sqrt(r)) for r in ratios[k]]  # (h, w)
        if boxes_per_cell(ratios[k]) > len(ratios[k]):
            extra = math.sqrt(scales[k] * scales[k + 1])
            shapes.append((extra, extra))
        cy, cx = np.meshgrid(
            (np.arange(map_h) + 0.5) / map_h, (np.arange(map_w) + 0.5) / map_w, indexing="ij"
        )
        centres = np.stack([cy, cx], axis=-1).reshape(-1, 1, 2)  # Cells row-major.
        sizes = np.broadcast_to(np.asarray(shapes)[None], (centres.shape[0], len(shapes), 2))
        centres = np.broadcast_to(centres, sizes.shape)
        per_map.append(np.concatenate([centres, sizes], axis=-1).reshape(-1, 4))
    return np.concatenate(per_map, axis=0).astype(np.float32)


def norm_groups(channels: int) -> int:
    """Choose GroupNorm's group count: up to 32, groups of at least 4 channels, dividing ``channels``."""
    groups = max(1, min(NORM_GROUPS, channels // MIN_GROUP_SIZE))
    while channels % groups:
        groups -= 1
    return groups


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) per image: statistics over space and the channels of a group.

    Written out rather than ``flax.linen.GroupNorm`` for a smaller graph: a tiny SSD's gradient compiles
    about a third faster on CPU (3.6 s → 2.4 s measured), which is what the tests pay. ε = 1e-5 and the
    variance as E[(x − μ)²], as :class:`synth.models.layers.InstanceNorm`; scale starts at 1, offset at 0.
    """

    num_groups: int  # Must divide the channel count; see `norm_groups`.
    epsilon: float = NORM_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise an NHWC tensor."""
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"{self.num_groups} groups do not divide {channels} channels.")
        scale = self.param("scale", nn.initializers.ones, (channels,))
        offset = self.param("bias", nn.initializers.zeros, (channels,))
        grouped = x.reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)
        axes = (*range(1, x.ndim - 1), x.ndim)  # Spatial axes and the within-group channel axis.
        centred = grouped - jnp.mean(grouped, axis=axes, keepdims=True)
        variance = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
        normalised = (centred * jax.lax.rsqrt(variance + self.epsilon)).reshape(x.shape)
        return normalised * scale + offset


class SSD(nn.Module):
    """The SSD lesion detector (module docstring): one output per default box, as :func:`default_boxes`."""

    features: int = 64  # ngf; 64 in the code.
    num_classes: int = 1  # Foreground classes (nodules only by default); background is added at index 0.
    num_maps: int = MAX_MAPS  # Heads in use; 3 for 32²–64² images.
    boxes_ratios: Sequence[Sequence[float]] | None = None  # Per map; None = DEFAULT_BOXES_RATIOS[:num_maps].
    min_scale: float = MIN_SCALE  # Default-box scale of map 1 (fraction of the image side).
    max_scale: float = MAX_SCALE  # Default-box scale of the last map.
    activation: str = "relu"  # The code's (and VGG's) ReLU; see synth.models.layers.activation.
    dropout_rate: float = 0.0  # Input dropout, train only; the code's keep 0.99 is 0.01.

    def priors(self, image_hw: tuple[int, int]) -> np.ndarray:
        """Return this model's default boxes (N, 4) ``(cy, cx, h, w)`` for ``image_hw`` (no parameters)."""
        return default_boxes(
            image_hw,
            self.num_maps,
            self.boxes_ratios,
            min_scale=self.min_scale,
            max_scale=self.max_scale,
        )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Score and regress every default box.

        Args:
            x: (B, H, W, C) images.
            train: enables input dropout (needs a ``"dropout"`` rng); nothing else depends on it.

        Returns:
            ``(class_logits, offsets)``: (B, N, num_classes + 1) raw scores, background at index 0, and
            (B, N, 4) encoded offsets (decode with :func:`synth.boxes.decode` and :meth:`priors`).
        """
        if x.ndim != 4:
            raise ValueError(f"Expected NHWC input, got shape {x.shape}.")
        if self.num_classes < 1:
            raise ValueError(
                f"num_classes counts foreground classes and must be >= 1, got {self.num_classes}."
            )
        ratios = resolve_boxes_ratios(self.num_maps, self.boxes_ratios)
        act = activation_fn(self.activation)
        init = kernel_init("normal", c_nominal=1)

        if self.dropout_rate > 0.0:
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name="input_dropout")(x)
        h = x
        sources = []
        for name, convs, pool, feeds_head in TRUNK:
            for i, (kernel, stride, mult) in enumerate(convs):
                width = self.features * mult
                # No bias: GroupNorm's offset absorbs it.
                h = conv.Conv(
                    width,
                    (kernel, kernel),
                    strides=(stride, stride),
                    padding="SAME",
                    use_bias=False,
                    kernel_init=init,
                    name=f"{name}_conv{i}",
                )(h)
                h = GroupNorm(norm_groups(width), name=f"{name}_norm{i}")(h)
                h = act(h)
            if pool:
                # SAME + excluding padding: ceil(H/2) and an edge cell averages only real pixels.
                h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)
            if feeds_head:
                sources.append(h)
                if len(sources) == self.num_maps:
                    break

        head = functools.partial(conv.Conv, padding="SAME", kernel_init=init, bias_init=nn.initializers.zeros)
        all_logits, all_offsets = [], []
        for k, source in enumerate(sources):
            boxes = boxes_per_cell(ratios[k])
            kernel = (HEAD_KERNELS[k], HEAD_KERNELS[k])
            # Plain linear convs: logits and offsets must be free to take any sign (§11.22).
            logits = head(boxes * (self.num_classes + 1), kernel, name=f"class_head{k + 1}")(source)
            offsets = head(boxes * 4, kernel, name=f"box_head{k + 1}")(source)
            # (B, h, w, A·D) -> (B, h·w·A, D): cells row-major, then the cell's boxes, as default_boxes.
            all_logits.append(logits.reshape(logits.shape[0], -1, self.num_classes + 1))
            all_offsets.append(offsets.reshape(offsets.shape[0], -1, 4))
        return jnp.concatenate(all_logits, axis=1), jnp.concatenate(all_offsets, axis=1)
