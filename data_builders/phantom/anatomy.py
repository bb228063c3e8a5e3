"""Procedural brain phantom: registered T1/T2/T1c/FLAIR axial slices with a BRATS-labelled tumour.

Pure numpy (plus `scipy.ndimage` for partial-volume blur), deterministic from an integer seed, and
independent of TFDS, so it can be used on its own:

    subject = make_subject(seed=7, image_size=128, num_slices=16)
    subject["image"].shape  # (16, 128, 128, 4): t1, t2, t1c, flair, each in [0, 1]
    subject["label"].shape  # (16, 128, 128): 0 background, 1 necrosis, 2 oedema, 3 non-enh., 4 enh.

How a subject is made:

1. Anatomy lives in a normalised head frame (x left-right, y anterior-posterior, z
   inferior-superior, z in units of the head's half-height). The `num_slices` axial slices sample
   heights evenly spread through the supratentorial brain, so anatomy changes smoothly from one
   slice to the next.
2. Nested, randomly sized ellipsoids give scalp (skin), subcutaneous fat, skull, CSF, grey
   matter and white matter, plus lateral ventricles and deep grey nuclei. A smooth random 3D
   displacement field warps the head; a higher-frequency random field folds the cortex (gyri)
   and another cuts sulci, so no two subjects look alike.
3. Most subjects (80%) carry one tumour: a deformed 3D blob placed in the white matter, with a
   necrotic core (1), an enhancing rim with gaps (4), a non-enhancing shell (3) and an oedema
   halo (2) that spreads further in white matter than in grey matter. Its mass effect pushes the
   surrounding brain outwards. Tumour labels are only ever set on grey- or white-matter voxels.
4. One class map (tissue or tumour class) is shared by all four modalities, so they are
   registered by construction. Each modality has its own contrast table (`CONTRAST`), a
   per-subject jitter of that table, a smooth multiplicative bias field, Rician noise, and
   per-subject min-max scaling to [0, 1].

Everything is defined in continuous normalised coordinates, so one seed gives the same anatomy at
every `image_size` (only the sampling and the pixel noise change).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

MODALITIES = ("t1", "t2", "t1c", "flair")

# Tissue classes of the anatomy (before the tumour is painted in).
BACKGROUND, SKIN, FAT, SKULL, CSF, GREY_MATTER, WHITE_MATTER = range(7)
TISSUE_NAMES = ("background", "skin", "fat", "skull", "csf", "grey_matter", "white_matter")
# BRATS labels.
NECROSIS, OEDEMA, NON_ENHANCING, ENHANCING = 1, 2, 3, 4
# Index into CONTRAST of tumour label `l` (1..4) is `len(TISSUE_NAMES) + l - 1`.
_TUMOUR_OFFSET = len(TISSUE_NAMES) - 1

# Mean signal of each class, one row per modality (before jitter, bias, noise and scaling).
# Columns: background, skin, fat, skull, csf, gm, wm, necrosis, oedema, non-enhancing, enhancing.
# T1: fat bright, WM > GM > CSF; T2: CSF bright, GM > WM; T1c: T1 plus a bright enhancing rim;
# FLAIR: T2-like but CSF suppressed, so oedema is the brightest thing in the brain.
CONTRAST = np.array(
    [
        # bg   skin  fat   skull csf   gm    wm    necr  oed   nonen enh
        [0.00, 0.45, 0.95, 0.08, 0.15, 0.52, 0.72, 0.18, 0.42, 0.40, 0.48],  # t1
        [0.00, 0.40, 0.62, 0.06, 1.00, 0.62, 0.45, 0.92, 0.82, 0.70, 0.66],  # t2
        [0.00, 0.50, 0.95, 0.08, 0.18, 0.55, 0.72, 0.16, 0.44, 0.42, 1.00],  # t1c
        [0.00, 0.42, 0.60, 0.05, 0.08, 0.60, 0.46, 0.30, 0.98, 0.86, 0.74],  # flair
    ],
    dtype=np.float32,
)

# Slices sample z in this range (units of the head's half-height): roughly from the basal ganglia
# to the upper centrum semiovale, where BRATS tumours and slices mostly are.
_Z_RANGE = (-0.25, 0.55)
# Physical size of the frame: a 240 mm field of view (as in BRATS), an 85 mm head half-height.
FIELD_OF_VIEW_MM = 240.0
HEAD_HALF_HEIGHT_MM = 85.0


class _Frame:
    """A regular sampling grid seen from a rotated and shifted frame, for fast smooth fields.

    Points are `(x[j], y[i], z[k])` for 1D `x` (W,), `y` (H,), `z` (S,), and the frame's coordinates
    are `(xr, yr) = rotation @ ((x, y) - shift)`, `zr = z`. Because the map is affine, a cosine in
    the frame is a cosine on the grid, so fields are separable and cost one small matrix product.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        z: np.ndarray,
        angle: float = 0.0,
        shift: tuple[float, float] = (0.0, 0.0),
    ):
        self.x, self.y, self.z = x.ravel(), y.ravel(), z.ravel()
        c, s = np.cos(angle), np.sin(angle)
        self.rotation = np.array([[c, s], [-s, c]])
        self.shift = np.asarray(shift, np.float64)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.size, self.y.size, self.x.size)

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the frame's coordinates xr, yr, zr as broadcastable float32 arrays."""
        x, y = self.x[None, None, :], self.y[None, :, None]
        (a, b), (c, d) = self.rotation.astype(np.float32)
        sx, sy = self.shift.astype(np.float32)
        xr = a * (x - sx) + b * (y - sy)
        yr = c * (x - sx) + d * (y - sy)
        return xr, yr, np.broadcast_to(self.z[:, None, None], (self.z.size, 1, 1))


def _smooth_field(
    rng: np.random.Generator,
    frame: _Frame,
    *,
    num_components: int,
    frequency: tuple[float, float],
) -> np.ndarray:
    """Draw a smooth random 3D field on `frame`'s grid, with zero mean and unit variance.

    It is a sum of cosines with random directions, frequencies and phases (random Fourier features),
    so it is continuous in every direction (neighbouring slices agree) and independent of the
    sampling resolution. Each cosine is split as `cos(a + b) = cos a cos b - sin a sin b`, with `a`
    depending on x only and `b` on (z, y) only, which turns the sum into one small matrix product.

    Args:
      rng: source of the random frequencies, phases and amplitudes.
      frame: the sampling grid and the frame the field is attached to.
      num_components: number of cosines; more gives a less regular field.
      frequency: range of spatial frequencies, in cycles per normalised unit.

    Returns:
      float32 array of shape `frame.shape`.
    """
    directions = rng.normal(size=(num_components, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    omegas = 2 * np.pi * directions * rng.uniform(*frequency, size=(num_components, 1))
    phases = rng.uniform(0, 2 * np.pi, size=num_components)
    # Pull the frequencies back from the frame to the grid: w . (R (p - t)) = (R^T w) . p - w . R t.
    grid_xy = omegas[:, :2] @ frame.rotation
    phases = phases - grid_xy @ frame.shift
    a = np.outer(frame.x, grid_xy[:, 0]).astype(np.float32)  # (W, K)
    b = (
        frame.z[:, None, None] * omegas[None, None, :, 2]
        + frame.y[None, :, None] * grid_xy[None, None, :, 1]
        + phases
    ).reshape(-1, num_components)  # (S*H, K)
    scale = np.sqrt(2.0 / num_components)
    rows = np.concatenate([np.cos(b), -np.sin(b)], axis=1) * scale  # (S*H, 2K)
    cols = np.concatenate([np.cos(a), np.sin(a)], axis=1)  # (W, 2K)
    # einsum's own loop, not BLAS: multithreaded BLAS on these thin products slows down several-fold
    # when the machine is busy (measured on 2 shared cores).
    out = np.einsum("ik,jk->ij", rows.astype(np.float32), cols, optimize=False)
    return out.reshape(frame.shape)


def _ellipsoid_radius(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    centre: tuple[float, float, float],
    semi_axes: tuple[float, float, float],
) -> np.ndarray:
    """Normalised ellipsoidal radius: < 1 inside the ellipsoid, 1 on its surface."""
    cx, cy, cz = centre
    a, b, c = semi_axes
    return np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2)


def _slice_heights(num_slices: int) -> np.ndarray:
    """Normalised heights z of the axial slices, evenly spread over `_Z_RANGE`."""
    if num_slices == 1:
        return np.array([np.mean(_Z_RANGE)], np.float32)
    return np.linspace(*_Z_RANGE, num_slices, dtype=np.float32)


def geometry(image_size: int, num_slices: int) -> dict[str, np.ndarray]:
    """Physical geometry of a subject's volume, with SimpleITK's meaning and (x, y, z) order.

    Voxel `image[k, i, j]` lies at `origin + direction @ (j * sx, i * sy, k * sz)` mm, where
    `(sx, sy, sz) = spacing`. The field of view is 240 mm wide; slices are spread over 68 mm of
    height (a single slice gets `sz = sx`).

    Args:
      image_size: height and width in pixels.
      num_slices: number of axial slices.

    Returns:
      dict with float32 `spacing` (3,), `origin` (3,) and row-major `direction` (9,).
    """
    pixel = FIELD_OF_VIEW_MM / image_size
    heights = _slice_heights(num_slices) * HEAD_HALF_HEIGHT_MM
    slice_gap = heights[1] - heights[0] if num_slices > 1 else pixel
    corner = -FIELD_OF_VIEW_MM / 2 + pixel / 2
    return {
        "spacing": np.array([pixel, pixel, slice_gap], np.float32),
        "origin": np.array([corner, corner, heights[0]], np.float32),
        "direction": np.eye(3, dtype=np.float32).reshape(9),
    }


def _tissues(rng: np.random.Generator, grid: _Frame) -> tuple[np.ndarray, dict[str, Any]]:
    """Draws one head: its tissue map (S, H, W) uint8 and the parameters the tumour needs."""
    # Head pose (a small in-plane rotation and shift) gives the head frame; a smooth random warp of
    # that frame deforms the head's outline, the ventricles and the deep nuclei.
    head = _Frame(grid.x, grid.y, grid.z, rng.uniform(-0.2, 0.2), tuple(rng.uniform(-0.05, 0.05, 2)))
    amplitude = float(rng.uniform(0.02, 0.05))
    xr, yr, zr = head.coords()
    warp = [_smooth_field(rng, head, num_components=6, frequency=(0.3, 0.9)) for _ in range(3)]
    xw, yw, zw = xr + amplitude * warp[0], yr + amplitude * warp[1], zr + amplitude * warp[2]

    # Head and its layers, as shells of one deformed ellipsoid.
    head_axes = (float(rng.uniform(0.64, 0.74)), float(rng.uniform(0.80, 0.88)), 1.0)
    rho = _ellipsoid_radius(xw, yw, zw, (0.0, 0.0, 0.0), head_axes)
    skin_in = 0.975
    fat_in = skin_in - rng.uniform(0.025, 0.045)
    skull_in = fat_in - rng.uniform(0.05, 0.08)
    brain_out = skull_in - rng.uniform(0.02, 0.035)

    # Tumour position in the head frame, drawn now so that its mass effect can push the brain aside.
    params: dict[str, Any] = {"has_tumour": bool(rng.uniform() < 0.8)}
    # Plain Python floats keep the array arithmetic below in float32.
    cx = float(rng.uniform(0.1, 0.28) * rng.choice([-1.0, 1.0]) * head_axes[0] / 0.7)
    cy = float(rng.uniform(-0.4, 0.4) * head_axes[1] / 0.84)
    cz = float(rng.uniform(_Z_RANGE[0] + 0.1, _Z_RANGE[1] - 0.1))
    radii = [float(r) for r in rng.uniform(0.12, 0.22, size=3) * np.array([1.0, 1.0, 1.5])]
    push = float(rng.uniform(0.25, 0.45))
    params.update(centre=(cx, cy, cz), radii=tuple(radii), head=head)
    xb, yb, zb = xw, yw, zw
    if params["has_tumour"]:
        # Inverse warp: the brain seen at distance d from the centre came from a smaller distance.
        dx, dy, dz = xw - cx, yw - cy, zw - cz
        d2 = (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2
        squeeze = 1 - push * np.exp(-d2 / 2.0)
        xb, yb, zb = cx + dx * squeeze, cy + dy * squeeze, cz + dz * squeeze
    rho_brain = _ellipsoid_radius(xb, yb, zb, (0.0, 0.0, 0.0), head_axes)

    # Cortex: the grey/white boundary folds with a random field (gyri); sulci are thin level lines
    # of a second field, cut from the brain surface through the cortex.
    folds = _smooth_field(rng, head, num_components=12, frequency=(3.0, 6.0))
    sulci = _smooth_field(rng, head, num_components=12, frequency=(2.0, 4.0))
    cortex_depth = rng.uniform(0.12, 0.16)
    white_out = brain_out - cortex_depth + 0.045 * folds
    surface = brain_out + 0.01 * folds

    tissue = np.zeros(grid.shape, np.uint8)
    tissue[rho < 1.0] = SKIN
    tissue[rho < skin_in] = FAT
    tissue[rho < fat_in] = SKULL
    tissue[rho < skull_in] = CSF
    brain = (rho_brain < surface) & (rho < skull_in - 0.01)
    tissue[brain] = GREY_MATTER
    tissue[brain & (rho_brain < white_out)] = WHITE_MATTER
    tissue[brain & (np.abs(sulci) < 0.07) & (rho_brain > white_out - 0.01)] = CSF
    # Interhemispheric fissure: a thin CSF sheet on the midline, through the cortex.
    fissure = (np.abs(xb) < 0.012 + 0.006 * folds) & (rho_brain > 0.45 * brain_out)
    tissue[brain & fissure] = CSF

    # Deep grey nuclei (basal ganglia/thalami), then the lateral ventricles (butterfly pair).
    nuclei_axes = tuple(float(v) for v in rng.uniform([0.08, 0.13, 0.16], [0.11, 0.18, 0.22]))
    for side in (-1.0, 1.0):
        r = _ellipsoid_radius(xb, yb, zb, (side * 0.17, 0.02, -0.18), nuclei_axes)
        tissue[brain & (r < 1.0)] = GREY_MATTER
    ventricle_axes = (0.055 * float(rng.uniform(0.8, 1.3)), 0.30, 0.22)
    for side in (-1.0, 1.0):
        # Bend the ventricles: they move laterally towards the front and the back.
        bent_x = xb - side * (0.07 + 0.10 * (yb / 0.3) ** 2)
        r = _ellipsoid_radius(bent_x, yb, zb, (0.0, 0.0, 0.05), ventricle_axes)
        tissue[brain & (r < 1.0)] = CSF
    return tissue, params


def _tumour(rng: np.random.Generator, tissue: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """BRATS label map (S, H, W) uint8 of the subject's tumour; all zeros if it has none."""
    head: _Frame = params["head"]
    # Draw every parameter even without a tumour, so the random stream stays aligned.
    shape_noise = _smooth_field(rng, head, num_components=8, frequency=(1.5, 3.0))
    rim_gaps = _smooth_field(rng, head, num_components=8, frequency=(3.0, 5.0))
    necrosis_r = float(rng.uniform(0.25, 0.5)) if rng.uniform() < 0.85 else 0.0
    rim_r = necrosis_r + float(rng.uniform(0.18, 0.3))
    core_r = rim_r + float(rng.uniform(0.1, 0.25))
    oedema_r = float(rng.uniform(1.4, 2.0))
    label = np.zeros(tissue.shape, np.uint8)
    if not params["has_tumour"]:
        return label
    x, y, z = head.coords()
    t = _ellipsoid_radius(x, y, z, params["centre"], params["radii"]) * (1 + 0.18 * shape_noise)
    in_white = tissue == WHITE_MATTER
    in_brain = in_white | (tissue == GREY_MATTER)
    # Oedema follows white-matter tracts: it spreads further in WM than in GM.
    label[((t < oedema_r) & in_white) | ((t < 0.5 * (1 + oedema_r)) & in_brain)] = OEDEMA
    label[(t < core_r) & in_brain] = NON_ENHANCING
    rim = (t < rim_r) & (t >= necrosis_r) & in_brain
    label[rim & (rim_gaps > -0.6)] = ENHANCING
    label[(t < necrosis_r) & in_brain] = NECROSIS
    return label


def make_subject(
    seed: int, image_size: int, num_slices: int, *, has_tumour: bool | None = None
) -> dict[str, Any]:
    """Generate one phantom subject.

    Args:
      seed: any non-negative integer; the same seed always gives the same subject.
      image_size: height and width of each axial slice in pixels (>= 8).
      num_slices: number of axial slices through the head (>= 1).
      has_tumour: by default 80% of seeds carry a tumour; True or False forces it either way (the
        anatomy and the tumour's shape and position stay those of the seed).

    Returns:
      dict with
        `image`: (num_slices, H, W, 4) float32 in [0, 1], modalities in `MODALITIES` order;
        `label`: (num_slices, H, W) uint8 BRATS labels (0 background, 1 necrosis, 2 oedema,
          3 non-enhancing, 4 enhancing);
        `tissue`: (num_slices, H, W) uint8 tissue map (`TISSUE_NAMES`) before the tumour is painted;
        `has_tumour`: bool;
        `spacing`, `origin`, `direction`: float32 geometry of the volume (see `geometry`).
    """
    if image_size < 8 or num_slices < 1:
        raise ValueError(f"need image_size >= 8 and num_slices >= 1, got {image_size}, {num_slices}")
    rng = np.random.default_rng(seed)
    centres = ((np.arange(image_size) + 0.5) / image_size * 2 - 1).astype(np.float32)
    grid = _Frame(centres, centres, _slice_heights(num_slices))
    tissue, params = _tissues(rng, grid)
    if has_tumour is not None:
        params["has_tumour"] = bool(has_tumour)
    label = _tumour(rng, tissue, params)

    # One class map for all modalities: tissue where there is no tumour, else the tumour class.
    classes = np.where(label > 0, label + _TUMOUR_OFFSET, tissue)
    # Shared anatomical texture (tissue inhomogeneity, tumour heterogeneity), scaled per modality.
    texture = _smooth_field(rng, params["head"], num_components=16, frequency=(4.0, 8.0))
    texture_amp = np.where(label > 0, 0.08, np.where(classes >= CSF, 0.04, 0.02))
    texture = 1 + texture_amp.astype(np.float32) * texture
    # Partial-volume blur, in pixels of a 128-px slice, so that small images stay crisp.
    blur = 0.6 * image_size / 128
    images = []
    for m in range(len(MODALITIES)):
        table = CONTRAST[m] * (1 + 0.05 * rng.normal(size=CONTRAST.shape[1])).astype(np.float32)
        table[BACKGROUND] = 0.0
        signal = ndimage.gaussian_filter(table[classes] * texture, (0, blur, blur), truncate=2.0)
        # Coil sensitivity: a smooth multiplicative bias field, independent per acquisition.
        bias_strength = np.float32(rng.uniform(0.08, 0.2))
        signal *= np.exp(bias_strength * _smooth_field(rng, grid, num_components=4, frequency=(0.2, 0.6)))
        # Rician noise: the magnitude of a complex signal with Gaussian noise in both channels.
        sigma = np.float32(rng.uniform(0.015, 0.035))
        real = signal + sigma * rng.standard_normal(grid.shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(grid.shape, dtype=np.float32)
        magnitude = np.sqrt(real * real + imag * imag)
        lo, hi = magnitude.min(), magnitude.max()
        images.append((magnitude - lo) / max(hi - lo, 1e-6))
    image = np.clip(np.stack(images, axis=-1), 0.0, 1.0).astype(np.float32)
    return {
        "image": image,
        "label": label,
        "tissue": tissue,
        "has_tumour": params["has_tumour"],
        **geometry(image_size, num_slices),
    }
