"""The convolution algorithms (synth.models.conv, synth.models.winograd) compute XLA's convolution.

Per-example filter gradients and Winograd F(2×2, 3×3) / F(4×4, 3×3) are checked against
``lax.conv_general_dilated`` in value and in both gradients, on odd sizes and strides, on one device and
sharded over four; ``auto`` replaces the filter gradient only where XLA:CPU's is slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from synth import sharding
from synth.models import conv, winograd

NHWC = ("NHWC", "HWIO", "NHWC")


def _loss(x, kernel, strides, padding):
    y = conv.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)
    return jnp.sum(jnp.sin(y)), y


def _value_and_grads(algorithm, monkeypatch, x, kernel, strides=(1, 1), padding="SAME"):
    monkeypatch.setenv(conv.ENV_VAR, algorithm)
    fn = jax.jit(jax.grad(_loss, argnums=(0, 1), has_aux=True), static_argnums=(2, 3))
    (grad_x, grad_kernel), y = fn(x, kernel, strides, padding)
    return y, grad_x, grad_kernel


def _inputs(shape, out_channels, seed=0):
    kx, kk = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, shape)
    kernel = 0.3 * jax.random.normal(kk, (3, 3, shape[-1], out_channels))
    return x, kernel


@pytest.mark.parametrize("algorithm", ["per_example", "winograd_filter_grad", "winograd2", "winograd4"])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_algorithms_equal_xla_in_value_and_gradients(algorithm, strides, monkeypatch):
    x, kernel = _inputs((3, 13, 10, 5), 4)  # Odd sizes: Winograd pads to whole tiles and crops.
    reference = _value_and_grads("xla", monkeypatch, x, kernel, strides)
    got = _value_and_grads(algorithm, monkeypatch, x, kernel, strides)
    # F(4, 3)'s transform coefficients (up to 8 and 1/24) cost a few more bits than F(2, 3)'s.
    tolerance = 2e-4 if algorithm in ("winograd4", "winograd_filter_grad") else 2e-5
    for a, b in zip(got, reference):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=tolerance * float(jnp.abs(b).max()), rtol=0)


@pytest.mark.parametrize("batch, examples_per_chunk", [(3, 1), (4, 2)])
def test_winograd_in_batch_chunks_equals_xla(batch, examples_per_chunk, monkeypatch):
    """Batches over `CHUNK_BYTES` run in chunks (a `lax.map` forward, a summed filter gradient)."""
    x, kernel = _inputs((batch, 13, 10, 5), 4, seed=2)
    monkeypatch.setattr(winograd, "CHUNK_BYTES", examples_per_chunk * x[0].size * x.dtype.itemsize)
    assert winograd._chunk_size(batch, x[0].size * x.dtype.itemsize) == examples_per_chunk
    reference = _value_and_grads("xla", monkeypatch, x, kernel)
    got = _value_and_grads("winograd4", monkeypatch, x, kernel)
    for a, b in zip(got, reference):
        np.testing.assert_allclose(a, b, atol=2e-4 * float(jnp.abs(b).max()), rtol=0)


def test_winograd_rejects_what_it_cannot_compute():
    x, kernel = _inputs((1, 8, 8, 2), 3)
    with pytest.raises(ValueError, match="tile"):
        winograd.conv3x3_same(x, kernel, tile=3)
    with pytest.raises(ValueError, match="3×3 HWIO"):
        winograd.conv3x3_same(x, jnp.zeros((5, 5, 2, 3)))


@pytest.mark.parametrize("algorithm", ["per_example", "winograd4"])
def test_algorithms_sharded_over_four_devices_equal_one(algorithm, monkeypatch):
    x, kernel = _inputs((4, 12, 12, 3), 2, seed=1)
    # Winograd in chunks of one example, the form a large batch takes.
    monkeypatch.setattr(winograd, "CHUNK_BYTES", x[0].size * x.dtype.itemsize)
    one = _value_and_grads(algorithm, monkeypatch, x, kernel)
    mesh = sharding.make_mesh((4,), ("data",))  # The project's mesh (automatic axes), as in training.
    sharded_x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    with jax.set_mesh(mesh):
        four = _value_and_grads(algorithm, monkeypatch, sharded_x, kernel)
    if algorithm == "per_example":  # Winograd's chunks run one after the other (`lax.map`).
        assert four[0].sharding.spec[0] == "data"  # The output stays split by example.
    for a, b in zip(four, one):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_auto_replaces_the_filter_gradient_only_on_large_cpu_maps(monkeypatch):
    monkeypatch.setenv(conv.ENV_VAR, "auto")

    def filter_gradient(shape, strides, dtype=jnp.float32, out_channels=2):
        x, kernel = (a.astype(dtype) for a in _inputs(shape, out_channels))
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: _loss(x, k, strides, "SAME")[0]))(kernel))
        # XLA's form is two convolutions (the forward one and its filter gradient) and no matmul;
        # Winograd's is one matmul per tile position; the per-example form adds a filter
        # gradient (and its linearisation) per example.
        if "dot_general" in jaxpr:
            return "winograd"
        return "per_example" if jaxpr.count("conv_general_dilated[") > 2 else "xla"

    side = int(np.ceil(np.sqrt(conv.MIN_PIXELS)))
    assert jax.default_backend() == "cpu"
    c_in, c_out = conv.FILTER_GRAD_MIN_IN_CHANNELS, conv.FILTER_GRAD_MIN_OUT_CHANNELS
    assert filter_gradient((1, side, side, c_in), (1, 1), out_channels=c_out) == "winograd"
    # Narrow 3×3 convolutions (a U-Net's input and output convs) keep XLA's, also over several examples.
    assert filter_gradient((2, side, side, c_in - 1), (1, 1), out_channels=c_out) == "xla"
    assert filter_gradient((2, side, side, c_in), (1, 1), out_channels=c_out - 1) == "xla"
    assert filter_gradient((2, side, side, 1), (2, 2)) == "per_example"
    assert filter_gradient((1, side, side, 1), (2, 2)) == "xla"  # One example: XLA's form is the sum.
    assert filter_gradient((2, 32, 32, 1), (1, 1)) == "xla"  # Small maps: alike in speed, shorter compiles.
    assert filter_gradient((2, 32, 32, 1), (2, 2)) == "xla"
    assert filter_gradient((2, side, side, 1), (1, 1), jnp.bfloat16) == "xla"  # Float32 only.
    # A deep level of a large U-Net: a small map with as much work as a large one (MIN_WINOGRAD_MACS).
    assert 9 * 16 * 16 * 256 * 256 >= conv.MIN_WINOGRAD_MACS > 9 * 16 * 16 * 128 * 128
    assert filter_gradient((1, 16, 16, 256), (1, 1), out_channels=256) == "winograd"
    assert filter_gradient((1, 16, 16, 128), (1, 1), out_channels=128) == "xla"
    assert filter_gradient((2, 16, 16, 256), (2, 2), out_channels=256) == "xla"  # Stride 2: by pixels only.


@pytest.mark.slow  # ~27 s on 2 cores: in `make test-slow`, to keep `make test` near 10 minutes.
def test_auto_runs_winograd_forward_passes_within_a_chunk_and_inference_only_over_one(monkeypatch):
    """A large 3×3 CPU convolution is Winograd's where that pays; over one chunk, under `grad`, XLA's."""
    monkeypatch.setenv(conv.ENV_VAR, "auto")
    side = int(np.ceil(np.sqrt(conv.MIN_PIXELS)))
    channels = conv.FORWARD_MIN_HARMONIC_CHANNELS
    x, kernel = _inputs((1, side, side, channels), channels)
    inference = str(jax.make_jaxpr(lambda x: _loss(x, kernel, (1, 1), "SAME")[1])(x))
    assert "dot_general" in inference and "conv_general_dilated[" not in inference
    # Fewer channels on either side (harmonic mean below the bound: an input or output conv): XLA's.
    for c_in, c_out in [(2, 64), (64, 4), (channels // 2, 2 * channels)]:
        narrow = jax.make_jaxpr(lambda x, k: _loss(x, k, (1, 1), "SAME")[1])(
            *_inputs((1, side, side, c_in), c_out)
        )
        assert "conv_general_dilated[" in str(narrow) and "dot_general" not in str(narrow)
    y = jax.jit(lambda x: _loss(x, kernel, (1, 1), "SAME")[1])(x)
    reference = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)
    np.testing.assert_allclose(y, reference, atol=2e-4 * float(jnp.abs(reference).max()), rtol=0)
    # Under differentiation, within one chunk: Winograd's in all three parts (no convolution left).
    grad = jax.grad(lambda x, k: _loss(x, k, (1, 1), "SAME")[0], (0, 1))
    training = str(jax.make_jaxpr(grad)(x, kernel))
    assert "conv_general_dilated[" not in training and "dot_general" in training
    winograd_grads = grad(x, kernel)
    monkeypatch.setenv(conv.ENV_VAR, "xla")  # A new function: jit's cache would keep Winograd's trace.
    xla_grads = jax.grad(lambda x, k: _loss(x, k, (1, 1), "SAME")[0], (0, 1))(x, kernel)
    for a, b in zip(winograd_grads, xla_grads):
        np.testing.assert_allclose(a, b, atol=2e-4 * float(jnp.abs(b).max()), rtol=0)
    monkeypatch.setenv(conv.ENV_VAR, "auto")
    # Over one chunk: wide inputs (at least INFERENCE_MIN_CHANNELS, examples within two chunks) run
    # Winograd's forward in chunks where not differentiated; narrow ones keep XLA's (Winograd's chunked
    # form was slower there), and so does a differentiated call: XLA's forward pass and input gradient
    # (two convolutions), Winograd's filter gradient (the matmuls).
    wide = conv.INFERENCE_MIN_CHANNELS
    monkeypatch.setattr(winograd, "CHUNK_BYTES", side * side * wide * 4)
    x, kernel = _inputs((3, side, side, wide), channels, seed=4)
    chunked = str(jax.make_jaxpr(lambda x: _loss(x, kernel, (1, 1), "SAME")[1])(x))
    assert "dot_general" in chunked and "conv_general_dilated[" not in chunked
    y = jax.jit(lambda x: _loss(x, kernel, (1, 1), "SAME")[1])(x)
    reference = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)
    np.testing.assert_allclose(y, reference, atol=2e-4 * float(jnp.abs(reference).max()), rtol=0)
    training = str(jax.make_jaxpr(grad)(x, kernel))
    # (The backward rule's `jax.vjp` also traces a forward convolution that XLA drops: three in the jaxpr.)
    assert training.count("conv_general_dilated[") == 3 and "dot_general" in training
    for shape in [(3, side, side, wide // 2), (1, 2 * side, side, wide + 1)]:  # Narrow; over two chunks.
        jaxpr = jax.make_jaxpr(lambda x, k: _loss(x, k, (1, 1), "SAME")[1])(*_inputs(shape, channels))
        assert "conv_general_dilated[" in str(jaxpr)


def test_an_unknown_algorithm_names_the_variable(monkeypatch):
    monkeypatch.setenv(conv.ENV_VAR, "fft")
    x, kernel = _inputs((1, 4, 4, 1), 1)
    with pytest.raises(ValueError, match="SYNTH_CONV='fft'"):
        conv.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)


def test_other_convolutions_fall_through_to_xla(monkeypatch):
    """Dilated or grouped convolutions are XLA's, whatever the setting."""
    monkeypatch.setenv(conv.ENV_VAR, "winograd4")
    x, _ = _inputs((2, 9, 9, 4), 4)
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 2, 4))
    args = dict(dimension_numbers=NHWC, rhs_dilation=(2, 2), feature_group_count=2)
    got = conv.conv_general_dilated(x, kernel, (1, 1), "SAME", **args)
    np.testing.assert_array_equal(got, lax.conv_general_dilated(x, kernel, (1, 1), "SAME", **args))


def _upsampled(algorithm, monkeypatch, x, kernel):
    """Value and both gradients of the up-sampling convolution under `algorithm` (a fresh trace)."""
    monkeypatch.setenv(conv.ENV_VAR, algorithm)

    def loss(x, kernel):
        y = conv.upsampled_conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)
        return jnp.sum(jnp.sin(y)), y

    (grad_x, grad_kernel), y = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)
    jaxpr = str(jax.make_jaxpr(loss)(x, kernel))
    return (y, grad_x, grad_kernel), jaxpr


@pytest.mark.parametrize("batch", [1, 2])
def test_upsampling_convolution_in_subpixel_form_equals_upsampling_then_convolving(batch, monkeypatch):
    """Under `auto` on large CPU maps the sub-pixel form; its value and gradients are the plain form's."""
    x, kernel = _inputs((batch, 7, 5, 3), 4, seed=5)  # Odd sizes: the phases' borders.
    plain, plain_jaxpr = _upsampled("xla", monkeypatch, x, kernel)
    assert plain[0].shape == (batch, 14, 10, 4)
    assert "f32[3,3,3,4]" in plain_jaxpr and "f32[2,2,3,16]" not in plain_jaxpr
    reference = lax.conv_general_dilated(
        jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), kernel, (1, 1), "SAME", dimension_numbers=NHWC
    )
    np.testing.assert_allclose(plain[0], reference, rtol=1e-6, atol=1e-6)
    # Small maps keep the plain form under `auto` too; lowering the bound brings the sub-pixel one.
    assert "f32[2,2,3,16]" not in _upsampled("auto", monkeypatch, x, kernel)[1]
    monkeypatch.setattr(conv, "MIN_PIXELS", 14 * 10)
    subpixel, subpixel_jaxpr = _upsampled("auto", monkeypatch, x, kernel)
    assert "f32[2,2,3,16]" in subpixel_jaxpr  # One 2×2 convolution into four phases of 4 channels.
    for a, b in zip(subpixel, plain):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=0)
    if batch == 1:
        # Wide maps within one Winograd chunk keep the up-sampled map (Winograd's is faster there).
        wide = conv.SUBPIXEL_MAX_CHUNK_CHANNELS + 1
        x, kernel = _inputs((1, 4, 3, wide), 2, seed=6)
        monkeypatch.setattr(conv, "MIN_PIXELS", 1)
        assert f"f32[2,2,{wide},8]" not in _upsampled("auto", monkeypatch, x, kernel)[1]
        monkeypatch.setattr(winograd, "CHUNK_BYTES", 4 * x.size * 4 - 1)  # Over one chunk: sub-pixel.
        assert f"f32[2,2,{wide},8]" in _upsampled("auto", monkeypatch, x, kernel)[1]
        return
    mesh = sharding.make_mesh((2,), ("data",))
    with jax.set_mesh(mesh):
        sharded, _ = _upsampled(
            "auto", monkeypatch, jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))), kernel
        )
    assert sharded[0].sharding.spec[0] == "data"
    for a, b in zip(sharded, subpixel):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_upsampling_convolution_rejects_other_shapes():
    x, kernel = _inputs((1, 4, 4, 2), 3)
    with pytest.raises(ValueError, match="3×3, stride-1, SAME"):
        conv.upsampled_conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=NHWC)
    with pytest.raises(ValueError, match="3×3, stride-1, SAME"):
        conv.upsampled_conv_general_dilated(
            x, jnp.zeros((5, 5, 2, 3)), (1, 1), "SAME", dimension_numbers=NHWC
        )
