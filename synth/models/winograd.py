"""Winograd convolution for 3×3 stride-1 ``SAME`` convolutions (Lavin & Gray, "Fast Algorithms for CNNs").

A 3×3 convolution computed directly costs 9 multiply-adds per output pixel and channel pair. Winograd's
minimal filtering F(m×m, 3×3) computes an m×m output tile from an (m+2)×(m+2) input tile with
(m+2)² multiplies instead of 9·m²: F(2×2, 3×3) needs 16 for 4 outputs (2.25× fewer), F(4×4, 3×3)
needs 36 for 16 (4× fewer). In a network the multiplies become (m+2)² independent matrix products,
one per tile position, of the transformed input tiles (tiles × C_in) with the transformed filters
(C_in × C_out); the transforms are small linear maps with constant coefficients, written here as
reshaped tiles and weighted sums that XLA fuses. This is what oneDNN does on CPUs; XLA:CPU's own
convolution has no such form.

Everything is linear and differentiable, so the backward pass is again products of the same shape
(no custom gradient). The results equal the direct convolution up to float32 rounding: F(2, 3)'s
transforms have coefficients 0, ±½, ±1; F(4, 3)'s grow to 8 and 1/24, so its rounding error is a few
times larger (tests/test_winograd.py bounds both).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# The transforms of F(m×m, 3×3) for correlation (what deep learning calls convolution):
# Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A for a 3×3 filter g and an (m+2)×(m+2) input tile d.
_TRANSFORMS = {
    2: {
        "BT": np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        "G": np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64),
        "AT": np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64),
    },
    4: {
        "BT": np.array(
            [
                [4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1],
            ],
            np.float64,
        ),
        "G": np.array(
            [
                [1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1],
            ],
            np.float64,
        ),
        "AT": np.array(
            [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64
        ),
    },
}
TILE_SIZES = tuple(sorted(_TRANSFORMS))


def _combine(parts: list[jax.Array], weights: np.ndarray) -> jax.Array:
    """Σ_i weights[i]·parts[i], skipping zero weights and multiplying only by weights other than ±1."""
    total = None
    for weight, part in zip(weights, parts):
        if weight == 0:
            continue
        term = part if weight == 1 else (-part if weight == -1 else part * np.asarray(weight, part.dtype))
        total = term if total is None else total + term
    return total


def _tiles(x: jax.Array, axis: int, m: int, n_tiles: int) -> jax.Array:
    """Overlapping (m+2)-long windows at stride m along `axis`: a new axis of length m + 2 after it.

    Built from reshapes, slices and one concatenation (whose gradients are slices and pads) rather than
    strided slices, whose gradient is an interior-padded scatter that XLA:CPU runs slowly.
    """
    length = (n_tiles + 1) * m
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    x = jnp.pad(x, pad)
    blocks = x.reshape(x.shape[:axis] + (n_tiles + 1, m) + x.shape[axis + 1 :])
    head = lax.slice_in_dim(blocks, 0, n_tiles, axis=axis)
    tail = lax.slice_in_dim(lax.slice_in_dim(blocks, 1, n_tiles + 1, axis=axis), 0, 2, axis=axis + 1)
    return jnp.concatenate([head, tail], axis=axis + 1)


def _transform(x: jax.Array, axis: int, matrix: np.ndarray, out_axis: int) -> jax.Array:
    """Multiply by `matrix` along `axis` (as weighted sums); the result's axis goes to `out_axis`."""
    parts = [lax.index_in_dim(x, i, axis, keepdims=False) for i in range(matrix.shape[1])]
    return jnp.stack([_combine(parts, row) for row in matrix], axis=out_axis)


def _input_transform(x: jax.Array, m: int, tiles_h: int, tiles_w: int) -> jax.Array:
    """Bᵀ d B for every (m+2)² tile of the padded NHWC input: (α_w, α_h, N, tiles_h, tiles_w, C)."""
    bt = _TRANSFORMS[m]["BT"]
    rows = _transform(_tiles(x, 1, m, tiles_h), 2, bt, 0)  # (α_h, N, th, W, C)
    return _transform(_tiles(rows, 3, m, tiles_w), 4, bt, 0)  # (α_w, α_h, N, th, tw, C)


def _filter_transform(kernel: jax.Array, m: int) -> jax.Array:
    """G g Gᵀ for an HWIO 3×3 kernel, in the input transform's order: (α_w, α_h, C_in, C_out)."""
    g = jnp.asarray(_TRANSFORMS[m]["G"], kernel.dtype)
    return jnp.einsum("ai,ijco,bj->baco", g, kernel, g)


def _output_transform(products: jax.Array, m: int) -> jax.Array:
    """Aᵀ M A for every tile: (α_w, α_h, N, th, tw, C) -> (N, th·m, tw·m, C)."""
    at = _TRANSFORMS[m]["AT"]
    rows = _transform(products, 1, at, 3)  # (α_w, N, th, m_h, tw, C)
    tiles = _transform(rows, 0, at, 4)  # (N, th, m_h, tw, m_w, C)
    n, th, _, tw, _, channels = tiles.shape
    return tiles.reshape(n, th * m, tw * m, channels)


def conv3x3_same(x: jax.Array, kernel: jax.Array, *, tile: int = 4, precision=None) -> jax.Array:
    """A 3×3, stride-1, ``SAME``-padded NHWC convolution with an HWIO kernel, by Winograd F(tile×tile, 3×3).

    Args:
        x: input (N, H, W, C_in).
        kernel: (3, 3, C_in, C_out).
        tile: output tile size m: 2 or 4.
        precision: passed to the tile products.

    Returns:
        (N, H, W, C_out): ``lax.conv_general_dilated(x, kernel, (1, 1), "SAME", ...)`` up to rounding.
    """
    if tile not in _TRANSFORMS:
        raise ValueError(f"Winograd tile must be one of {TILE_SIZES}, got {tile}.")
    if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"Expected NHWC input and a 3×3 HWIO kernel; got {x.shape} and {kernel.shape}.")
    n, height, width, _ = x.shape
    tiles_h, tiles_w = -(-height // tile), -(-width // tile)
    # SAME pads one pixel on each side; the bottom/right pad further to whole tiles (cropped at the end).
    x = jnp.pad(x, ((0, 0), (1, tiles_h * tile - height + 1), (1, tiles_w * tile - width + 1), (0, 0)))
    alpha = tile + 2
    v = _input_transform(x, tile, tiles_h, tiles_w)  # (α, α, N, th, tw, C_in)
    u = _filter_transform(kernel, tile)  # (α, α, C_in, C_out)
    v = v.reshape(alpha * alpha, n * tiles_h * tiles_w, x.shape[3])
    u = u.reshape(alpha * alpha, kernel.shape[2], kernel.shape[3])
    products = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)
    products = products.reshape(alpha, alpha, n, tiles_h, tiles_w, kernel.shape[3])
    return _output_transform(products, tile)[:, :height, :width, :]
