"""How the networks' convolutions are computed: XLA's own, per-example filter gradients, or Winograd.

Every `ConvBlock` (and the flow nets' convs) calls :func:`conv_general_dilated`, a drop-in for
``lax.conv_general_dilated`` that picks the algorithm when the step is traced. The function is the same
whichever is picked (tests/test_conv.py compares outputs and gradients); only speed and float32 rounding
differ. The choice is ``SYNTH_CONV`` in the environment, read at trace time:

* ``auto`` (default): on the CPU backend, in float32, on maps of at least ``MIN_PIXELS``, the filter
  gradient of 3×3 stride-1 convolutions by Winograd F(4×4, 3×3) and that of the others (stride 2, 5×5)
  summed over examples; also Winograd's filter gradient for 3×3 stride-1 convolutions on smaller maps
  with as much work (``MIN_WINOGRAD_MACS``: the deeper levels of the same networks); where such a 3×3
  convolution's input fits one Winograd chunk (``winograd.CHUNK_BYTES``), its forward pass and input
  gradient by Winograd too; where its input is over a chunk, XLA's forward pass and input gradient, and
  Winograd's forward pass (in chunks) only where it is not differentiated (generation, stage C) and has
  at least ``INFERENCE_MIN_CHANNELS`` channels; narrow 3×3 convolutions (a U-Net's input and output
  convs: ``FILTER_GRAD_MIN_*_CHANNELS``, ``FORWARD_MIN_HARMONIC_CHANNELS``) keep XLA's parts where
  Winograd's lose; a U-Net's up-sampling convolutions (`upsampled_conv_general_dilated`, on the same
  sizes) in sub-pixel form, 2.25× fewer multiplies; elsewhere (GPUs, bf16, small networks) XLA's;
* ``xla``: XLA's convolution everywhere (the reference, and what GPUs use: cuDNN picks its own algorithms);
* ``winograd_filter_grad`` / ``per_example``: those two filter gradients wherever the shapes allow;
* ``winograd2`` / ``winograd4``: 3×3 stride-1 ``SAME`` convolutions by Winograd F(2×2, 3×3) / F(4×4, 3×3)
  (`synth.models.winograd`) in all three parts, the rest by XLA.

Why (BENCHMARKS.md, "Convolutions on XLA:CPU", `benchmarks/conv_algorithms.py`). XLA:CPU computes a
convolution's filter gradient as one convolution whose "kernel" is the whole output-gradient map: at
3×3, 64 → 64 on 184×144 maps it takes 3× the forward pass at batch 1, and its cost grows faster than the
batch (63 ms at batch 1, 2 180 ms at batch 8). The same gradient by Winograd F(4×4, 3×3) takes 33 and
292 ms; summed over examples (the unrolled sum; ``lax.scan`` or ``vmap`` over examples are slower than
XLA's form) 56 and 490 ms. Winograd's forward pass and input gradient are up to 1.7× faster than XLA's
at batch 1 on their own ("Winograd on XLA:CPU"). In the training step they pay only within one chunk:
stage B's step at 184×144 ran 6-13 % faster with them there (BENCHMARKS.md, "Winograd in the training
step"), and slower again with them on inputs over one chunk too (in chunks, whose transforms stream
through the cache beside the other thread's work). So over one chunk training keeps XLA's forward and
input gradient, and generation takes Winograd's forward (a
``jax.custom_vjp`` whose body is Winograd's and whose differentiated form is XLA's) on wide maps, where
it gains in chunks too (generation at batch 8 14 % more sets/s), and XLA's on 64-channel maps, where
Winograd's chunked form is slower. The project's meshes have automatic axes
(`synth.sharding`), under which slicing one example of a batch split over devices is allowed. At 64²
the tiny networks' steps gain nothing, so test and demo networks keep XLA's form and its shorter
compile.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from synth.models import winograd

ALGORITHMS = ("auto", "xla", "per_example", "winograd_filter_grad", "winograd2", "winograd4")
ENV_VAR = "SYNTH_CONV"
# Under "auto", maps smaller than this (H·W of the convolution's input) keep XLA's filter gradient: at 64²
# the tiny networks' steps are no faster (their few channels leave little to save) and compile longer.
MIN_PIXELS = 96 * 96
# ... unless the 3×3 convolution's multiply-adds per example reach this: a U-Net's deeper levels halve the
# map and double the channels, so every level of a large network has its first level's work, and XLA's
# filter gradient is as slow there (BENCHMARKS.md: 92×72×128 and 46×36×256 at batch 8, 985 and 504 ms
# against Winograd's 185 and 118). The bound is the smallest first level the pixel rule covers at the
# "small" widths (96², 32 → 32 channels); the demo's 64² networks stay below it.
MIN_WINOGRAD_MACS = 9 * 96 * 96 * 32 * 32
# Under "auto", an undifferentiated 3×3 convolution whose input exceeds one Winograd chunk still takes
# Winograd's forward pass, chunk by chunk, from this many input channels (one example within two chunks):
# the tile products' work per transformed byte grows with the channels. At 64 channels (the first U-Net
# level at batch 4-8, or 512² at batch 1) Winograd's forward was 1.2-1.7× slower than XLA's; at 128-512
# channels 1.3-1.6× faster (BENCHMARKS.md, "Winograd's forward pass over one chunk").
INFERENCE_MIN_CHANNELS = 128
# Winograd's tile products are (tiles × C_in) by (C_in × C_out) matmuls, and its transforms move C_in and
# C_out channels per pixel: with few channels on either side the transforms dominate and the products turn
# into matrix-vector ones. Under "auto" the forward pass takes Winograd's only where the harmonic mean of
# the two channel counts is at least this (32 → 32, 64 → 24 and wider); a U-Net's input conv (2 → 64) ran
# 3.3-3.5× slower by Winograd than by XLA at 184×144 and 512², its output conv (64 → 4) 1.6× slower,
# 16 → 64 and 64 → 16 1.2-1.3× slower, 32 → 32 1.5× faster (BENCHMARKS.md, "Narrow convolutions").
FORWARD_MIN_HARMONIC_CHANNELS = 32
# ... and the filter gradient only with at least this many input and output channels: its products
# contract over the tiles, C_in × tiles by tiles × C_out, so a side of 1-2 channels leaves a few long dot
# products (2 → 64 at 512²: 105 ms against XLA's 41; 64 → 1: 1 410 against 199), while 4 → 64 and 64 → 2
# already gain (1.1× and 1.6-5×).
FILTER_GRAD_MIN_IN_CHANNELS = 4
FILTER_GRAD_MIN_OUT_CHANNELS = 2
# A U-Net's up-sampling convolution (nearest ×2, then 3×3) runs in sub-pixel form under "auto" on the sizes
# above, except where its up-sampled input fits one Winograd chunk with more than this many channels: there
# Winograd's three parts on the up-sampled map are faster (46×36×128 up-sampled, batch 1: 22.7 against
# 26.3 ms, 23×18×256: 26.3 against 38.5), while at 64 channels (92×72×64: 24.8 against 36.0 ms) and over
# a chunk (at batch 4 every level) the sub-pixel form is (BENCHMARKS.md, "Winograd in the training step,
# and up-sampling convolutions in sub-pixel form").
SUBPIXEL_MAX_CHUNK_CHANNELS = 127
_NHWC = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))


def algorithm() -> str:
    """The configured algorithm (``SYNTH_CONV``, default ``auto``); an unknown name is an error."""
    name = os.environ.get(ENV_VAR, "auto")
    if name not in ALGORITHMS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a convolution algorithm; valid: {ALGORITHMS}.")
    return name


def _direct(x, kernel, strides, padding, precision):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_per_example_filter_grad(x, kernel, strides, padding, precision=None):
    """An NHWC/HWIO convolution whose filter gradient is summed over examples (module docstring)."""
    return _direct(x, kernel, strides, padding, precision)


def _forward(x, kernel, strides, padding, precision):
    return _direct(x, kernel, strides, padding, precision), (x, kernel)


def _backward(strides, padding, precision, residuals, grad):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x_: _direct(x_, kernel, strides, padding, precision), x)
    (grad_x,) = input_vjp(grad)
    grad_kernel = None
    for i in range(x.shape[0]):
        example = x[i : i + 1]
        _, kernel_vjp = jax.vjp(lambda k, e=example: _direct(e, k, strides, padding, precision), kernel)
        (part,) = kernel_vjp(grad[i : i + 1])
        grad_kernel = part if grad_kernel is None else grad_kernel + part
    return grad_x, grad_kernel


conv_per_example_filter_grad.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_winograd_filter_grad(x, kernel, precision=None):
    """A 3×3 stride-1 SAME convolution by XLA whose filter gradient is Winograd F(4×4, 3×3)'s."""
    return _direct(x, kernel, (1, 1), "SAME", precision)


def _winograd_forward(x, kernel, precision):
    return _direct(x, kernel, (1, 1), "SAME", precision), (x, kernel)


def _winograd_backward(precision, residuals, grad):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x_: _direct(x_, kernel, (1, 1), "SAME", precision), x)
    return input_vjp(grad)[0], winograd.filter_grad(x, grad, 4, precision)


conv3x3_winograd_filter_grad.defvjp(_winograd_forward, _winograd_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_winograd_inference(x, kernel, precision=None):
    """A 3×3 stride-1 SAME convolution by Winograd F(4×4, 3×3) where it is not differentiated.

    Under differentiation (`jax.custom_vjp` then calls the forward rule, not this body) it is
    `conv3x3_winograd_filter_grad`: XLA's forward pass and input gradient, Winograd's filter gradient.
    `auto` takes it for inputs over one Winograd chunk, where Winograd's chunked forward passes made the
    training step slower (module docstring) and generation faster.
    """
    return winograd.conv3x3_same(x, kernel, tile=4, precision=precision)


conv3x3_winograd_inference.defvjp(_winograd_forward, _winograd_backward)


def _is_plain(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_groups, batch_groups) -> bool:
    """Whether the call is a plain NHWC/HWIO convolution (no dilation, groups) the other algorithms handle."""
    ones = (None, (1, 1))
    return (
        lhs.ndim == 4
        and rhs.ndim == 4
        and tuple(lhs_dilation or (1, 1)) in ones
        and tuple(rhs_dilation or (1, 1)) in ones
        and feature_groups == 1
        and batch_groups == 1
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
    )


def _is_winograd_shape(rhs, window_strides, padding) -> bool:
    same = padding == "SAME" or tuple(map(tuple, padding)) == ((1, 1), (1, 1))
    return rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1) and same


def _winograd_filter_grad_pays(rhs) -> bool:
    """Whether Winograd's filter gradient beats XLA's for this HWIO kernel's channels."""
    return rhs.shape[2] >= FILTER_GRAD_MIN_IN_CHANNELS and rhs.shape[3] >= FILTER_GRAD_MIN_OUT_CHANNELS


def _winograd_inference_pays(lhs, rhs) -> bool:
    """Whether Winograd's forward pass beats XLA's on this NHWC input and HWIO kernel.

    ``FORWARD_MIN_HARMONIC_CHANNELS`` for the channels, then ``INFERENCE_MIN_CHANNELS`` for inputs over
    a chunk.
    """
    c_in, c_out = rhs.shape[2], rhs.shape[3]
    if 2 * c_in * c_out < FORWARD_MIN_HARMONIC_CHANNELS * (c_in + c_out):
        return False
    if lhs.size * lhs.dtype.itemsize <= winograd.CHUNK_BYTES:
        return True
    example_bytes = lhs.size // lhs.shape[0] * lhs.dtype.itemsize
    return lhs.shape[3] >= INFERENCE_MIN_CHANNELS and example_bytes <= 2 * winograd.CHUNK_BYTES


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """``lax.conv_general_dilated`` by the configured algorithm (module docstring); same arguments."""
    name = algorithm()
    plain = preferred_element_type is None and _is_plain(
        lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, batch_group_count
    )
    if plain and not isinstance(padding, str):
        padding = tuple(map(tuple, padding))
    pixels = lhs.shape[1] * lhs.shape[2] if plain else 0
    # Float32 only: Winograd F(4×4, 3×3)'s transform coefficients (up to 8 and 1/24) cost bf16 its precision.
    auto_cpu = name == "auto" and jax.default_backend() == "cpu" and lhs.dtype == jnp.float32
    if plain and _is_winograd_shape(rhs, window_strides, padding):
        if name in ("winograd2", "winograd4"):
            return winograd.conv3x3_same(lhs, rhs, tile=int(name[-1]), precision=precision)
        macs = 9 * pixels * rhs.shape[2] * rhs.shape[3]
        large = pixels >= MIN_PIXELS or macs >= MIN_WINOGRAD_MACS
        if auto_cpu and large and not _winograd_filter_grad_pays(rhs):
            # XLA's own: the per-example sum below was 3-7× slower still at 64 → 1 (batches 2-8).
            return _direct(lhs, rhs, tuple(window_strides), padding, precision)
        if auto_cpu and large and _winograd_inference_pays(lhs, rhs):
            if lhs.size * lhs.dtype.itemsize <= winograd.CHUNK_BYTES:
                # Within one chunk Winograd's forward pass and input gradient pay under differentiation too.
                return winograd.conv3x3_same(lhs, rhs, tile=4, precision=precision)
            return conv3x3_winograd_inference(lhs, rhs, precision)
        if name == "winograd_filter_grad" or (auto_cpu and large):
            return conv3x3_winograd_filter_grad(lhs, rhs, precision)
    if plain and lhs.shape[0] > 1:
        if name == "per_example" or (auto_cpu and pixels >= MIN_PIXELS):
            return conv_per_example_filter_grad(lhs, rhs, tuple(window_strides), padding, precision)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


# The sub-pixel form of nearest ×2 up-sampling then a 3×3 SAME convolution. Output row 2i (even phase)
# sees up-sampled rows 2i-1, 2i, 2i+1, i.e. low-resolution rows i-1, i, i: the kernel's row 0 on row
# i-1 and rows 1 + 2 on row i; row 2i+1 (odd) sees low-resolution rows i, i, i+1: rows 0 + 1 on row i,
# row 2 on row i+1. So each output phase is a 2×2 convolution of the low-resolution map whose taps sum
# kernel rows (and columns, alike): _SUBPIXEL_ROWS[phase, tap, kernel row] is 1 where the row joins.
_SUBPIXEL_ROWS = np.zeros((2, 2, 3), np.float32)
_SUBPIXEL_ROWS[0, 0, 0] = _SUBPIXEL_ROWS[0, 1, 1] = _SUBPIXEL_ROWS[0, 1, 2] = 1
_SUBPIXEL_ROWS[1, 0, 0] = _SUBPIXEL_ROWS[1, 0, 1] = _SUBPIXEL_ROWS[1, 1, 2] = 1


def _subpixel_conv3x3(x, kernel, precision):
    """``conv3x3_same(upsample_nearest(x, 2), kernel)`` as one 2×2 convolution of `x` into 4 phases.

    The four phases' 2×2 kernels side by side (C_in → 4·C_out) convolve the low-resolution map padded by
    one pixel (VALID): phase (p, q) is that output shifted by (p, q), and the phases interleave into the
    2H×2W map. 16 multiply-adds per low-resolution pixel and channel pair against the 36 of the
    up-sampled map's 3×3 convolution (2.25× fewer), and no up-sampled map in memory. Equal up to float
    rounding, gradients too (they flow through the tap sums to the 3×3 kernel).
    """
    n, height, width, _ = x.shape
    c_in, c_out = kernel.shape[2], kernel.shape[3]
    rows = _SUBPIXEL_ROWS.astype(kernel.dtype)
    taps = jnp.einsum("pya,qxb,abio->yxipqo", rows, rows, kernel).reshape(2, 2, c_in, 4 * c_out)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = conv_general_dilated(padded, taps, (1, 1), "VALID", dimension_numbers=_NHWC, precision=precision)
    out = out.reshape(n, height + 1, width + 1, 2, 2, c_out)
    phases = [
        jnp.stack([out[:, p : p + height, q : q + width, p, q] for q in range(2)], axis=3) for p in range(2)
    ]
    return jnp.stack(phases, axis=2).reshape(n, 2 * height, 2 * width, c_out)


def upsampled_conv_general_dilated(lhs, rhs, window_strides, padding, precision=None, **options):
    """A 3×3 stride-1 SAME convolution of `lhs` up-sampled ×2 by nearest neighbours (a U-Net's up-sampling).

    The output is (N, 2H, 2W, C_out). Under ``auto`` on the CPU, in float32, on maps of the size or work
    where Winograd's filter gradient applies (``MIN_PIXELS`` of output, ``MIN_WINOGRAD_MACS``), the
    sub-pixel form (`_subpixel_conv3x3`), unless the up-sampled map fits one Winograd chunk with more than
    ``SUBPIXEL_MAX_CHUNK_CHANNELS`` channels, where Winograd's convolution of it is faster; otherwise
    the map is up-sampled and convolved by :func:`conv_general_dilated`. The arguments are ``nn.Conv``'s:
    a plain NHWC/HWIO convolution, no dilation or groups.
    """
    names = ("lhs_dilation", "rhs_dilation", "dimension_numbers")
    plain = _is_plain(
        lhs,
        rhs,
        *(options.pop(name, None) for name in names),
        options.pop("feature_group_count", 1),
        options.pop("batch_group_count", 1),
    )
    if options:
        raise ValueError(f"An up-sampling convolution takes no {sorted(options)}.")
    if not (plain and padding == "SAME" and _is_winograd_shape(rhs, window_strides, padding)):
        raise ValueError(
            f"An up-sampling convolution is a plain 3×3, stride-1, SAME one; got kernel {rhs.shape}, "
            f"strides {window_strides}, padding {padding!r}."
        )
    height, width = 2 * lhs.shape[1], 2 * lhs.shape[2]
    macs = 9 * height * width * rhs.shape[2] * rhs.shape[3]
    within_chunk = 4 * lhs.size * lhs.dtype.itemsize <= winograd.CHUNK_BYTES
    if (
        algorithm() == "auto"
        and jax.default_backend() == "cpu"
        and lhs.dtype == jnp.float32
        and (height * width >= MIN_PIXELS or macs >= MIN_WINOGRAD_MACS)
        and not (within_chunk and rhs.shape[2] > SUBPIXEL_MAX_CHUNK_CHANNELS)
    ):
        return _subpixel_conv3x3(lhs, rhs, precision)
    # `layers.upsample_nearest`, written out: layers imports this module.
    upsampled = jnp.repeat(jnp.repeat(lhs, 2, axis=1), 2, axis=2)
    return conv_general_dilated(upsampled, rhs, (1, 1), "SAME", dimension_numbers=_NHWC, precision=precision)


# `nn.Conv` computing by the configured algorithm: the networks' convolution layer (same parameters).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
# The same layer applied to its input up-sampled ×2 (`upsampled_conv_general_dilated`; same parameters).
UpsampledConv = functools.partial(nn.Conv, conv_general_dilated=upsampled_conv_general_dilated)


class SharedInputConv(nn.Module):
    """`nn.Conv`'s layer on ``[shared, x]`` for each ``x`` of a list, ``shared``'s share computed once.

    A convolution is linear in its input channels: ``conv([s, x], K) = conv(s, K_s) + conv(x, K_x)`` with
    the kernel split along its input channels. A U-Net decoder run once per condition concatenates the
    same encoder skip before every condition's up-sampled map (`synth.models.unet.apply_per_condition`);
    the skip's share of the level's first decoder conv, half of that conv's work, is then computed once
    for all conditions, and under differentiation its gradients once, on the conditions' summed output
    gradients. The parameters are ``nn.Conv``'s for the concatenated input (kernel (kh, kw, C_shared +
    C_x, features), then the bias), created in its order, so a checkpoint or an initialisation is the
    same either way.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str = "SAME"
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, shared: jax.Array, xs: list[jax.Array]) -> list[jax.Array]:
        """``conv([shared, x])`` for each NHWC ``x`` in ``xs`` (all of one shape), as a list."""
        if not xs or any(x.shape != xs[0].shape for x in xs) or shared.shape[:3] != xs[0].shape[:3]:
            raise ValueError(
                f"Expected maps of one shape beside a shared map of their size; got {[x.shape for x in xs]} "
                f"beside {shared.shape}."
            )
        c_shared = shared.shape[-1]
        kernel_shape = (*self.kernel_size, c_shared + xs[0].shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
        dtype = jnp.result_type(shared, *xs, kernel)
        kernel = kernel.astype(dtype)

        def convolve(x, part):
            return conv_general_dilated(
                x.astype(dtype), part, self.strides, self.padding, dimension_numbers=_NHWC
            )

        shared_term = convolve(shared, kernel[:, :, :c_shared])
        outs = [shared_term + convolve(x, kernel[:, :, c_shared:]) for x in xs]
        return outs if bias is None else [out + bias.astype(dtype) for out in outs]
