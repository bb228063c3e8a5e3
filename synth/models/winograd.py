"""Winograd convolution for 3×3 stride-1 ``SAME`` convolutions (Lavin & Gray, "Fast Algorithms for CNNs").

A 3×3 convolution computed directly costs 9 multiply-adds per output pixel and channel pair. Winograd's
minimal filtering F(m×m, 3×3) computes an m×m output tile from an α×α input tile (α = m + 2) with α²
multiplies instead of 9·m²: F(2×2, 3×3) needs 16 for 4 outputs (2.25× fewer), F(4×4, 3×3) needs 36 for
16 (4× fewer). In a network the multiplies become α² independent matrix products, one per position in
the tile, of the transformed input tiles (tiles × C_in) with the transformed filters (C_in × C_out); the
transforms are small linear maps with constant coefficients. This is what oneDNN does on CPUs; XLA:CPU's
own convolution has no such form.

How it is written for XLA:CPU (BENCHMARKS.md, "Winograd on XLA:CPU"): every transform is weighted sums
of strided slices, each of the α² transformed tiles its own array and each product its own matmul, so
that no fusion holds a concatenation (XLA:CPU evaluates those element by element, unvectorised: the
first form of this module spent 4 of its 10 ms at 184×144×64 in the input transform); the output
transform is row sums then its pixels interleaved by a stack, the one concatenation kept, as XLA:CPU
otherwise repeats the whole transform in each consumer (inside chunks, one fusion of broadcast
products; the two functions say why). Batches over `CHUNK_BYTES` of input run chunk by chunk
(`lax.map` in the forward pass, a sum over chunks in the filter gradient), as the transforms are
memory-bound and one chunk's tiles stay in the CPU's cache; even so the chunked forward pass is slower
than XLA's on 64-channel maps (184×144×64 at batch 4), so `synth.models.conv`'s ``auto`` takes it in
chunks only from 128 channels, where it is faster.

The gradients are written out (`jax.custom_vjp`) rather than derived through the transforms: the input
gradient of a 3×3 stride-1 SAME convolution is the same convolution of the output gradient with the
kernel flipped in space and transposed in channels, so Winograd's forward pass again; the filter
gradient is α² products of the transformed input tiles with the output gradient's transposed output
transform, summed over tiles, then the filter transform's transpose. The results equal the direct
convolution up to float32 rounding: F(2, 3)'s transforms have coefficients 0, ±½, ±1; F(4, 3)'s grow to 8
and 1/24, so its rounding error is a few times larger (tests/test_conv.py bounds both).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# The transforms of F(m×m, 3×3) for correlation (what deep learning calls convolution):
# Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A for a 3×3 filter g and an α×α input tile d.
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
# Input bytes per batch chunk: the transformed tiles (α²/m² times the input: 2.25× for F(4×4, 3×3)) of
# one chunk should stay in a 32 MiB L3 cache beside the input and products; one 184×144×64 float32
# example is 6.8 MB.
CHUNK_BYTES = 8 * 2**20


def _combine(parts, weights):
    """Σ_i weights[i]·parts[i], skipping zero weights and multiplying only by weights other than ±1."""
    total = None
    for weight, part in zip(weights, parts):
        if weight == 0:
            continue
        term = part if weight == 1 else (-part if weight == -1 else part * np.asarray(weight, part.dtype))
        total = term if total is None else total + term
    return total


def _strided(x, axis: int, start: int, step: int, count: int):
    """`count` entries of `x` along `axis` from `start` at stride `step`."""
    return lax.slice_in_dim(x, start, start + step * (count - 1) + 1, step, axis=axis)


def _input_transform(padded, m: int, tiles_h: int, tiles_w: int) -> list:
    """Bᵀ d B for every α×α tile (stride m) of the padded NHWC input: α² arrays (N, th, tw, C), (i, j)."""
    bt = _TRANSFORMS[m]["BT"]
    alpha = m + 2
    rows = [_strided(padded, 1, a, m, tiles_h) for a in range(alpha)]
    out = []
    for i in range(alpha):
        row = _combine(rows, bt[i])  # (N, th, W_padded, C)
        cols = [_strided(row, 2, b, m, tiles_w) for b in range(alpha)]
        out.extend(_combine(cols, bt[j]) for j in range(alpha))
    return out


def _filter_transform(kernel, m: int, flipped: bool = False) -> list:
    """G g Gᵀ for an HWIO 3×3 kernel (flipped in space if `flipped`): α² arrays (C_in, C_out), (i, j)."""
    g = _TRANSFORMS[m]["G"][:, ::-1] if flipped else _TRANSFORMS[m]["G"]
    rows = [_combine([kernel[a] for a in range(3)], g[i]) for i in range(m + 2)]  # each (3, C_in, C_out)
    return [_combine([row[b] for b in range(3)], g[j]) for row in rows for j in range(m + 2)]


def _filter_transform_transpose(grads: list, m: int):
    """The filter transform's transpose: α² (C_in, C_out) gradients -> the (3, 3, C_in, C_out) kernel's."""
    g = _TRANSFORMS[m]["G"]
    alpha = m + 2
    by_row = [
        _combine([grads[i * alpha + j] for i in range(alpha)], g[:, a])
        for a in range(3)
        for j in range(alpha)
    ]
    return jnp.stack(
        [
            jnp.stack([_combine(by_row[a * alpha : (a + 1) * alpha], g[:, b]) for b in range(3)])
            for a in range(3)
        ]
    )


def _output_transform_separable(products: list, m: int):
    """Aᵀ M A separably: m·α row sums of α products each, then the m² output pixels, interleaved.

    The form for a batch in one chunk. XLA:CPU fuses an output transform into each of its consumers
    (instance norm's statistics and its normalisation, the next up-sampling), computing it again in
    each; in this form what it repeats is the last step, m terms per pixel, not the α² of
    `_output_transform` (generation at 184×144 8-10 % more sets/s; BENCHMARKS.md, "Winograd's output
    transform").
    """
    at = _TRANSFORMS[m]["AT"]
    alpha = m + 2
    n, tiles_h, tiles_w, channels = products[0].shape
    rows = [
        [_combine([products[i * alpha + j] for i in range(alpha)], at[r]) for j in range(alpha)]
        for r in range(m)
    ]
    pixels = [jnp.stack([_combine(rows[r], at[q]) for q in range(m)], axis=3) for r in range(m)]
    return jnp.stack(pixels, axis=2).reshape(n, tiles_h * m, tiles_w * m, channels)


def _output_transform(products: list, m: int):
    """Aᵀ M A for every tile: α² arrays (N, th, tw, C) -> (N, th·m, tw·m, C), one fusion of broadcasts.

    The form inside `lax.map`'s chunks, where it fuses into the write of the chunk's result (the
    separable form's interleaving there took twice as long: 1 122 against 474 ms per batch of 8).
    """
    at = _TRANSFORMS[m]["AT"].astype(np.float32)
    alpha = m + 2
    n, tiles_h, tiles_w, channels = products[0].shape
    total = None
    for i in range(alpha):
        for j in range(alpha):
            weights = np.outer(at[:, i], at[:, j])  # (m_h, m_w): this product's share of each tile pixel
            if not weights.any():
                continue
            spread = jnp.broadcast_to(
                products[i * alpha + j][:, :, None, :, None, :], (n, tiles_h, m, tiles_w, m, channels)
            )
            term = spread * weights.astype(spread.dtype)[:, None, :, None]
            total = term if total is None else total + term
    return total.reshape(n, tiles_h * m, tiles_w * m, channels)


def _output_transform_transpose(grad_padded, m: int, tiles_h: int, tiles_w: int) -> list:
    """The output transform's transpose: (N, th·m, tw·m, C) output gradient -> α² arrays (N, th, tw, C)."""
    at = _TRANSFORMS[m]["AT"]
    rows = [_strided(grad_padded, 1, r, m, tiles_h) for r in range(m)]
    out = []
    for i in range(m + 2):
        row = _combine(rows, at[:, i])
        cols = [_strided(row, 2, q, m, tiles_w) for q in range(m)]
        out.extend(_combine(cols, at[:, j]) for j in range(m + 2))
    return out


def _tiling(height: int, width: int, m: int) -> tuple[int, int]:
    return -(-height // m), -(-width // m)


def _pad_input(x, m: int, tiles_h: int, tiles_w: int):
    """SAME pads one pixel on each side; the bottom/right pad further to whole tiles (cropped at the end)."""
    _, height, width, _ = x.shape
    return jnp.pad(x, ((0, 0), (1, tiles_h * m - height + 1), (1, tiles_w * m - width + 1), (0, 0)))


def _chunk_size(n: int, example_bytes: int) -> int:
    """Examples per chunk: at most ~CHUNK_BYTES of input, at least one, and dividing the batch."""
    size = max(1, min(n, CHUNK_BYTES // max(example_bytes, 1)))
    while n % size:
        size -= 1
    return size


def _chunks(n: int, example_bytes: int) -> list[tuple[int, int]]:
    """(start, stop) example ranges of `_chunk_size` examples each: the forward pass's chunks."""
    size = _chunk_size(n, example_bytes)
    return [(start, start + size) for start in range(0, n, size)]


def _forward(x, kernel, m: int, precision, transposed: bool = False):
    """Winograd's convolution of `x` with `kernel`, or with the kernel flipped and channels swapped.

    `transposed` gives the input gradient's convolution, computed without moving the kernel.
    """
    n, height, width, _ = x.shape
    tiles_h, tiles_w = _tiling(height, width, m)
    # Swapping the channels by a transpose that XLA fuses into the filter transform reads the kernel
    # column-wise (the input gradient at 23×18×512 took 138 ms against the forward pass's 11); the dots
    # read their right operand transposed instead, and the spatial flip reverses G's columns.
    filters = _filter_transform(kernel, m, flipped=transposed)
    contract = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))

    def one_chunk(chunk, separable: bool):
        tiles = _input_transform(_pad_input(chunk, m, tiles_h, tiles_w), m, tiles_h, tiles_w)
        rows = tiles[0].shape[:3]
        products = [
            lax.dot_general(v.reshape(-1, v.shape[-1]), u, contract, precision=precision).reshape(
                rows + (-1,)
            )
            for v, u in zip(tiles, filters)
        ]
        transform = _output_transform_separable if separable else _output_transform
        return transform(products, m)[:, :height, :width, :]

    size = _chunk_size(n, x[0].size * x.dtype.itemsize)
    if size == n:
        return one_chunk(x, separable=True)
    out = lax.map(functools.partial(one_chunk, separable=False), x.reshape((n // size, size) + x.shape[1:]))
    return out.reshape((n,) + out.shape[2:])


def filter_grad(x, grad, m: int = 4, precision=None):
    """The kernel gradient (3, 3, C_in, C_out) of a 3×3 stride-1 SAME convolution, by Winograd F(m×m, 3×3).

    `x` is the convolution's input (N, H, W, C_in) and `grad` its output gradient (N, H, W, C_out).
    """
    n, height, width, _ = x.shape
    tiles_h, tiles_w = _tiling(height, width, m)
    sums = None
    for start, stop in _chunks(n, x[0].size * x.dtype.itemsize):
        chunk, grad_chunk = x[start:stop], grad[start:stop]
        if sums is not None:  # One chunk after the other, as in the forward pass.
            chunk, grad_chunk, _ = lax.optimization_barrier((chunk, grad_chunk, sums))
        tiles = _input_transform(_pad_input(chunk, m, tiles_h, tiles_w), m, tiles_h, tiles_w)
        grad_padded = jnp.pad(
            grad_chunk, ((0, 0), (0, tiles_h * m - height), (0, tiles_w * m - width), (0, 0))
        )
        grad_tiles = _output_transform_transpose(grad_padded, m, tiles_h, tiles_w)
        parts = [
            jnp.dot(v.reshape(-1, v.shape[-1]).T, q.reshape(-1, q.shape[-1]), precision=precision)
            for v, q in zip(tiles, grad_tiles)
        ]
        sums = parts if sums is None else [s + p for s, p in zip(sums, parts)]
    return _filter_transform_transpose(sums, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, m, precision):
    return _forward(x, kernel, m, precision)


def _conv_fwd(x, kernel, m, precision):
    return _forward(x, kernel, m, precision), (x, kernel)


def _conv_bwd(m, precision, residuals, grad):
    x, kernel = residuals
    # The input gradient is the convolution of the output gradient with the kernel flipped in space and
    # its channels transposed (SAME, stride 1, 3×3: the padding is symmetric), so Winograd's forward again.
    return _forward(grad, kernel, m, precision, transposed=True), filter_grad(x, grad, m, precision)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv3x3_same(x, kernel, *, tile: int = 4, precision=None):
    """A 3×3, stride-1, ``SAME``-padded NHWC convolution with an HWIO kernel, by Winograd F(tile×tile, 3×3).

    Args:
        x: input (N, H, W, C_in).
        kernel: (3, 3, C_in, C_out).
        tile: output tile size m: 2 or 4.
        precision: passed to the tile products.

    Returns:
        (N, H, W, C_out): ``lax.conv_general_dilated(x, kernel, (1, 1), "SAME", ...)`` up to rounding, with
        both gradients by Winograd too (module docstring).
    """
    if tile not in _TRANSFORMS:
        raise ValueError(f"Winograd tile must be one of {TILE_SIZES}, got {tile}.")
    if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"Expected NHWC input and a 3×3 HWIO kernel; got {x.shape} and {kernel.shape}.")
    return _conv(x, kernel, tile, precision)
