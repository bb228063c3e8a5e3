"""Lesion-label pools for stage C: label-safe augmentation, the placement check, user-chosen labels.

Stage C draws the lesion label of each synthetic sample from a pool of real training labels,
augmented by "randomly scale, rotate, translate, flip" (METHOD §2.3), and keeps a draw only if the
lesion lies inside the organ of the generated structure map (Algorithm 4, METHOD §3.7). This module
is the host-side (numpy + OpenCV) half of that:

* `AugmentParams`, `augment_label`, `make_pool`: the augmented pool. One random affine per entry,
  resampled with nearest neighbour, so a pool entry holds only class values of its source.
* `fits`: the §3.7 check for a batch on host, with `fusion.label_fits`'s semantics.
* `check_user_placement`: a placement warning (not an error) for lesions of label maps a user brings
  (`synth.label_files.load_user_labels` reads and checks them) that lie outside the organ.

Defects of the authors' augmentation fixed here (METHOD §2.2, §2.3):

* Their PIL calls swap width and height in rotate/crop/shrink, which transposes non-square slices
  (184 × 144 for BRATS). Here every size is passed explicitly in OpenCV's (width, height) order;
  non-square maps keep their orientation (tested).
* Their crop-zoom and shrink resample the *label* with PIL's default bicubic filter, creating
  non-integer, in-between class values. Here there is one resampling, always nearest neighbour
  (``cv2.INTER_NEAREST``, zero border), so the output holds only values of the input.
* Their rotation with a random ``expand`` followed by a resize back to the slice size rescales the
  label by an angle-dependent (and, for non-square slices, anisotropic) factor. Here rotation,
  flip, scale and shift are composed into one affine about the image centre, with the scale drawn
  explicitly from `AugmentParams.scale`.
* Their translate/shrink can push a lesion off the slice, leaving an empty "lesion" label in the
  pool; here such a draw is redrawn (`make_pool`).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from synth.fusion import LABEL_FIT_RULES

log = logging.getLogger("synth")


class PlacementWarning(UserWarning):
    """A user-chosen lesion label does not lie inside the organ (METHOD §3.7)."""


# --------------------------------------------------------------------------------------------------
# Augmentation.


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random affine applied to each pool entry.

    Attributes:
        max_rotation: rotation about the image centre, uniform in ±max_rotation degrees.
        max_shift: translation, uniform in ±max_shift times the image side (x by the width, y by
            the height).
        scale: (low, high): isotropic scale about the centre, uniform in [low, high].
        flip: left-right flip with probability 0.5 (no flip when False).
        max_tries: transforms tried for one entry before `make_pool` gives up on a source whose
            lesion every draw pushed out of the image, and uses the source un-augmented (≥ 1).
    """

    max_rotation: float = 15.0
    max_shift: float = 0.1
    scale: tuple[float, float] = (0.9, 1.1)
    flip: bool = True
    max_tries: int = 10

    def __post_init__(self):
        # ConfigDicts hand sequences back as lists; a tuple keeps the dataclass hashable.
        try:
            low, high = (float(v) for v in self.scale)
        except (TypeError, ValueError):
            raise ValueError(f"scale must be a pair (low, high), got {self.scale!r}") from None
        object.__setattr__(self, "scale", (low, high))
        if not 0 < low <= high:
            raise ValueError(f"scale must satisfy 0 < low <= high, got {self.scale}")
        if not self.max_rotation >= 0:
            raise ValueError(f"max_rotation must be >= 0 degrees, got {self.max_rotation}")
        if not self.max_shift >= 0:
            raise ValueError(f"max_shift must be >= 0 (a fraction of the side), got {self.max_shift}")
        if int(self.max_tries) != self.max_tries or self.max_tries < 1:
            raise ValueError(f"max_tries must be an integer >= 1, got {self.max_tries}")
        object.__setattr__(self, "max_tries", int(self.max_tries))
        object.__setattr__(self, "flip", bool(self.flip))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AugmentParams:
        """Build from an ml_collections ConfigDict or a mapping holding some of the fields.

        Args:
            config: a mapping of field names to values; missing fields keep their defaults.

        Returns:
            AugmentParams.

        Raises:
            ValueError: a key is not a field (the message names it and lists the fields), or a
                value is out of range.
        """
        values = dict(config.items())
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(
                f"Unknown label augmentation key {', '.join(map(repr, unknown))}. "
                f"Valid keys: {', '.join(fields)}."
            )
        return cls(**values)


def _check_label_map(label: np.ndarray, what: str = "label") -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{what} must be one (H, W) label map, got shape {label.shape}")
    if label.dtype == bool:
        label = label.astype(np.uint8)
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"{what} must hold integer class values, got dtype {label.dtype}")
    return label


def _random_affine(rng: np.random.Generator, height: int, width: int, params: AugmentParams) -> np.ndarray:
    """A 2 × 3 source-to-destination matrix: flip, then rotate and scale about the centre, then shift.

    All five numbers (angle, scale, flip, x and y shift) are drawn whatever the params, so each call
    consumes the same amount of the random stream.
    """
    angle = rng.uniform(-params.max_rotation, params.max_rotation)
    scale = rng.uniform(*params.scale)
    flip = rng.random() < 0.5 and params.flip
    shift = rng.uniform(-params.max_shift, params.max_shift, size=2) * (width, height)
    # Pixel centres are integers, so the centre of the grid is ((W-1)/2, (H-1)/2): a flip about it
    # maps pixels exactly onto pixels, and rotation/scale leave the middle of the image in place.
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    mirror = np.array([[-1.0 if flip else 1.0, 0.0, 2 * cx if flip else 0.0], [0, 1, 0], [0, 0, 1]])
    rotate = np.vstack([cv2.getRotationMatrix2D((cx, cy), angle, scale), [0, 0, 1]])
    move = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]], [0, 0, 1]])
    return (move @ rotate @ mirror)[:2]


def augment_label(
    label: np.ndarray, rng: np.random.Generator, params: AugmentParams | None = None
) -> np.ndarray:
    """One random affine of one label map: rotation about the centre, left-right flip, scale, shift.

    Fixes the defects of the authors' label augmentation (METHOD §2.2/§2.3, see the module
    docstring): width and height are never swapped (non-square maps keep their orientation), the
    label is resampled once and only with nearest neighbour (``cv2.INTER_NEAREST``, pixels from
    outside the image are 0), so the output holds only values of the input, never an in-between
    class; and the scale comes from ``params.scale`` alone, not from an expand-and-resize.

    A lesion may be cut by the border or pushed out of the image entirely; `make_pool` redraws the
    latter.

    Args:
        label: (H, W) integer (or bool) label map, 0 = no lesion.
        rng: numpy Generator; one call draws five numbers from it.
        params: ranges of the transform (default `AugmentParams()`).

    Returns:
        (H, W) array of the input's dtype.

    Raises:
        ValueError: not one 2D integer map, or values outside 0..65535.
    """
    params = AugmentParams() if params is None else params
    dtype = np.asarray(label).dtype
    label = _check_label_map(label)
    height, width = label.shape
    matrix = _random_affine(rng, height, width, params)
    if label.size and (label.min() < 0 or label.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"label values must lie in 0..65535, got {label.min()}..{label.max()}")
    # OpenCV resamples 8- and 16-bit unsigned maps with nearest neighbour; smaller is faster.
    work = label.astype(np.uint8 if label.size == 0 or label.max() <= 255 else np.uint16)
    warped = cv2.warpAffine(
        work,
        matrix,
        (width, height),  # OpenCV's dsize is (width, height): the swap METHOD §2.2 flags.
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return warped.astype(dtype, copy=False)


def augment_image_and_label(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, params: AugmentParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The classic ("enhanced", §2.2) augmentation of a real example: one random affine for both.

    The image (H, W, C) is resampled linearly, channel by channel (any C), the label with nearest neighbour,
    so the two stay registered and the label keeps only its own values; outside the image both are 0.

    Returns:
        `(image, label)` with the inputs' shapes and dtypes.
    """
    params = AugmentParams() if params is None else params
    image = np.asarray(image)
    height, width = image.shape[:2]
    if np.shape(label) != (height, width):
        raise ValueError(f"label shape {np.shape(label)} does not match the image's {(height, width)}")
    matrix = _random_affine(rng, height, width, params)
    warped = np.stack(
        [
            cv2.warpAffine(
                np.ascontiguousarray(image[..., c], np.float32),
                matrix,
                (width, height),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0,
            )
            for c in range(image.shape[-1])
        ],
        axis=-1,
    ).astype(image.dtype, copy=False)
    label = np.asarray(label)
    resampled = cv2.warpAffine(
        label.astype(np.uint8),
        matrix,
        (width, height),
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return warped, resampled.astype(label.dtype, copy=False)


def _as_label_stack(
    labels: np.ndarray | Sequence[np.ndarray], what: str = "labels", *, integer: bool = True
) -> np.ndarray:
    """(N, H, W) array from (N, H, W), (N, H, W, 1) or a sequence of (H, W) maps; integer if asked."""
    stack = np.asarray(labels)
    if stack.ndim == 4 and stack.shape[-1] == 1:
        stack = stack[..., 0]
    if stack.ndim != 3:
        raise ValueError(f"{what} must be (N, H, W) or (N, H, W, 1), got shape {stack.shape}")
    if stack.dtype == bool:
        stack = stack.astype(np.uint8)
    if integer and not np.issubdtype(stack.dtype, np.integer):
        raise ValueError(f"{what} must hold integer class values, got dtype {stack.dtype}")
    return stack


def make_pool(
    labels: np.ndarray | Sequence[np.ndarray],
    size: int,
    *,
    seed: int,
    params: AugmentParams | None = None,
    keep_empty: bool = False,
) -> np.ndarray:
    """An augmented pool of lesion labels (METHOD §2.3, with the §2.2 defects fixed).

    Sources without a lesion (all 0) are dropped, unless ``keep_empty``: then every source stays, so the
    pool's class balance follows the sources' (a class-map family such as the chest X-ray, where the
    all-0 map is the class "normal", not a missing lesion). Every entry is an augmented copy of a source drawn
    uniformly (with replacement); the sources themselves are *not* put in un-augmented, so the pool
    is ``size`` i.i.d. draws whatever ``size`` is (the identity is one possible transform when the
    ranges include it). A transform that leaves no lesion pixel in the image is redrawn, up to
    ``params.max_tries`` transforms in all; if every one fails the entry is the source un-augmented
    (logged; it happens only for lesions at the border with large shifts or small scales).

    Args:
        labels: (N, H, W) or (N, H, W, 1) integer label maps, or a sequence of (H, W) maps, with
            values 0..255.
        size: number of entries (≥ 0).
        seed: seed of ``np.random.default_rng``; the pool is a pure function of (labels, size,
            seed, params).
        params: augmentation ranges (default `AugmentParams()`).
        keep_empty: keep the all-0 sources (they are drawn as often as any other source).

    Returns:
        (size, H, W) uint8.

    Raises:
        ValueError: bad shapes or values, negative size, or no source has a lesion (the message says
            how many labels were given).
    """
    params = AugmentParams() if params is None else params
    stack = _as_label_stack(labels)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if stack.size and (stack.min() < 0 or stack.max() > 255):
        raise ValueError(f"labels must hold values 0..255 for a uint8 pool, got {stack.min()}..{stack.max()}")
    has_lesion = np.any(stack != 0, axis=(1, 2))
    sources = (stack if keep_empty else stack[has_lesion]).astype(np.uint8)
    if len(sources) == 0:
        raise ValueError(
            f"None of the {len(stack)} source labels given has a lesion (all are 0): a lesion pool "
            "needs at least one label with a lesion."
        )
    rng = np.random.default_rng(seed)
    pool = np.empty((size, *sources.shape[1:]), np.uint8)
    fallbacks = 0
    for i in range(size):
        source = sources[rng.integers(len(sources))]
        if not source.any():  # A kept empty source: nothing to move.
            pool[i] = source
            continue
        for _ in range(params.max_tries):
            entry = augment_label(source, rng, params)
            if entry.any():
                break
        else:
            entry = source
            fallbacks += 1
        pool[i] = entry
    if fallbacks:
        log.info(
            "Label pool: %d of %d entries are un-augmented sources (every one of %d transforms pushed the "
            "lesion out of the image).",
            fallbacks,
            size,
            params.max_tries,
        )
    return pool


# --------------------------------------------------------------------------------------------------
# Placement check.


def _check_rule(rule: str) -> None:
    if rule not in LABEL_FIT_RULES:
        raise ValueError(f"Unknown label-fit rule {rule!r}. Valid rules: {', '.join(LABEL_FIT_RULES)}.")


def _lesion_and_organ(labels: np.ndarray, organs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (N, H, W) lesion and organ maps; one (H, W) organ is shared by every label."""
    # Any numeric dtype, as `fusion.label_fits` (labels may come back from a device as floats).
    lesion = _as_label_stack(labels, integer=False) > 0
    organ = np.asarray(organs)
    if organ.ndim == 4 and organ.shape[-1] == 1:
        organ = organ[..., 0]
    if organ.ndim == 2:
        organ = organ[None]
    try:
        inside = np.broadcast_to(organ > 0.5, lesion.shape)
    except ValueError:
        raise ValueError(
            f"organs of shape {np.shape(organs)} do not match labels of shape {np.shape(labels)}: expected "
            "(N, H, W[, 1]) or one (H, W) organ for all"
        ) from None
    return lesion, inside


def fits(labels: np.ndarray, organs: np.ndarray, *, rule: str = "code") -> np.ndarray:
    """METHOD §3.7 for a batch on host: `fusion.label_fits` without a device round trip.

    Args:
        labels: (N, H, W) or (N, H, W, 1) integer lesion labels, 0 = no lesion.
        organs: (N, H, W) or (N, H, W, 1) organ masks (1 = organ, > 0.5 counts as organ), or one
            (H, W) / (1, H, W[, 1]) mask for every label.
        rule: ``"code"`` (default): no lesion pixel outside the organ (an empty label fits).
            ``"paper"``: at least one lesion pixel inside the organ (an empty label does not fit).
            ``"none"``: every label fits.

    Returns:
        (N,) bool.

    Raises:
        ValueError: unknown rule, or shapes that do not match.
    """
    _check_rule(rule)
    lesion, inside = _lesion_and_organ(labels, organs)
    if rule == "none":
        return np.ones(lesion.shape[0], bool)
    if rule == "code":
        return ~np.any(lesion & ~inside, axis=(1, 2))
    return np.any(lesion & inside, axis=(1, 2))


def check_user_placement(
    labels: np.ndarray, names: Sequence[str], organs: np.ndarray, *, rule: str = "code"
) -> np.ndarray:
    """`fits`, warning once per misplaced label so a notebook user sees it and may still go on.

    Each misplaced label gets one `PlacementWarning` naming it and saying how many of its lesion
    pixels fall outside the organ (``"code"`` rule) or that none falls inside (``"paper"`` rule).

    Args:
        labels: (N, H, W) or (N, H, W, 1) lesion labels, e.g. from `load_user_labels`.
        names: one name per label (file names from `load_user_labels`).
        organs: organ masks as in `fits`.
        rule: ``"code"`` or ``"paper"``, see `fits`.

    Returns:
        (N,) bool, True where the label fits.

    Raises:
        ValueError: as `fits`, or ``len(names) != N``.
    """
    _check_rule(rule)
    lesion, inside = _lesion_and_organ(labels, organs)
    names = list(names)
    if len(names) != len(lesion):
        raise ValueError(f"got {len(names)} names for {len(lesion)} labels")
    total = lesion.sum(axis=(1, 2))
    outside = (lesion & ~inside).sum(axis=(1, 2))
    ok = outside == 0 if rule == "code" else outside < total
    for name, good, n_out, n_all in zip(names, ok, outside, total):
        if good:
            continue
        if rule == "code":
            detail = f"{n_out} of its {n_all} lesion pixels fall outside the organ"
        elif n_all == 0:
            detail = "it has no lesion pixels, so it cannot overlap the organ"
        else:
            detail = f"all {n_all} of its lesion pixels fall outside the organ"
        warnings.warn(
            f"Lesion label {name!r} does not lie inside the organ ({rule!r} rule of METHOD §3.7): {detail}. "
            "The sample can still be synthesised, with lesion on background.",
            PlacementWarning,
            stacklevel=2,
        )
    return ok
