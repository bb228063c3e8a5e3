"""Shared Flax Linen building blocks: instance norm, activations, initialisers, conv blocks.

Everything here follows the global conventions of METHOD.md §1 (NHWC, TF ``SAME`` padding,
nearest ×2 up-sampling followed by a 3×3 conv, instance norm after every conv). Where the authors'
code and the paper disagree, the choice is a string option so that configs can select either
(§12):

* activation: ``"leaky_relu"`` (paper, default) | ``"capped_relu"`` (code parity) | ``"relu"``;
* kernel init: ``"normal"`` (N(0, 0.02), default) | ``"mean_filter"`` (U-Net code parity).
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth.models import conv

Initializer = Callable[..., jax.Array]

ACTIVATIONS = ("leaky_relu", "capped_relu", "relu")
KERNEL_INITS = ("normal", "mean_filter")

LEAKY_SLOPE = 0.2  # The thesis' Leaky ReLU slope; also inside the code's (clipped) ops.relu.
RELU_CAP = 100.0  # ops.relu clips to [0, 100].
INIT_STDDEV = 0.02  # N(0, 0.02) for every conv without the mean-filter init (§1).
MEAN_FILTER_STDDEV = 1e-6  # The code's sd for the mean-filter init: filters start ~identical.
NORM_EPSILON = 1e-5  # ε of the code's instance norm (TF CycleGAN-style ``_instance_norm``).


def leaky_relu(x: jax.Array) -> jax.Array:
    """Apply Leaky ReLU with slope 0.2, the paper's activation."""
    return jax.nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)


def capped_relu(x: jax.Array) -> jax.Array:
    """Apply the authors' ``ops.relu``: ``clip(max(0.2·x, x), 0, 100)`` (code parity, §11.9).

    The clip at 0 removes the leaky part, so the net effect is a ReLU capped at 100. The
    ``maximum`` is kept (rather than writing ``clip(x, 0, 100)``) so that the op graph, and hence
    the gradients, are the code's.
    """
    return jnp.clip(jnp.maximum(LEAKY_SLOPE * x, x), 0.0, RELU_CAP)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Return the activation function called ``name``.

    Args:
        name: ``"leaky_relu"`` (paper: slope 0.2), ``"capped_relu"`` (code: ReLU clipped at 100)
            or ``"relu"`` (plain ReLU; the code's U-Net conv5).

    Returns:
        An elementwise function ``jax.Array -> jax.Array``.

    Raises:
        ValueError: for an unknown name.
    """
    if name == "leaky_relu":
        return leaky_relu
    if name == "capped_relu":
        return capped_relu
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"Unknown activation {name!r}; valid: {ACTIVATIONS}.")


def mean_filter_init(c_nominal: int, stddev: float = MEAN_FILTER_STDDEV) -> Initializer:
    """Build the code's U-Net conv init, N(mean = 1/(kh·kw·C_nominal), sd = ``stddev``).

    Every filter then starts as an (almost exact) mean filter over its nominal input (METHOD §1,
    §4.1); all filters of a layer are nearly identical, which is unusual (§11.17) and why this
    init is a parity option, not the default.

    Args:
        c_nominal: the nominal input-channel count of the layer. The code uses 1 for the first
            conv whatever the real input channels, and ignores the condition channels at the
            bottleneck (§4.1 table).
        stddev: standard deviation around the mean.

    Returns:
        A Flax initializer for HWIO conv kernels.
    """
    if c_nominal < 1:
        raise ValueError(f"c_nominal must be >= 1, got {c_nominal}.")

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        # kh·kw = 9 for every conv the code initialises this way, matching its literal 1/(9·C).
        mean = 1.0 / (shape[0] * shape[1] * c_nominal)
        return mean + stddev * jax.random.normal(key, shape, dtype)

    return init


def kernel_init(name: str, *, c_nominal: int) -> Initializer:
    """Return the conv kernel initializer called ``name``.

    Args:
        name: ``"normal"`` (N(0, 0.02)) or ``"mean_filter"`` (see :func:`mean_filter_init`).
        c_nominal: nominal input channels; only used by ``"mean_filter"``.

    Returns:
        A Flax initializer.

    Raises:
        ValueError: for an unknown name.
    """
    if name == "normal":
        return nn.initializers.normal(stddev=INIT_STDDEV)
    if name == "mean_filter":
        return mean_filter_init(c_nominal)
    raise ValueError(f"Unknown kernel_init {name!r}; valid: {KERNEL_INITS}.")


def _norm_scale_init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Draw the instance-norm scale from N(1, 0.02), as the code's ``_weights(mean=1.0)``."""
    return 1.0 + INIT_STDDEV * jax.random.normal(key, shape, dtype)


class InstanceNorm(nn.InstanceNorm):
    """Instance norm with the code's settings (METHOD §1).

    Per sample and per channel, mean/variance over the spatial axes, ε = 1e-5, learnable scale
    initialised N(1, 0.02) and offset initialised 0. Flax's ``nn.InstanceNorm`` computes exactly
    this; only the defaults change. ``use_fast_variance=False`` computes E[(x−μ)²] like
    ``tf.nn.moments``: the fast E[x²]−μ² form loses precision when channels are nearly constant,
    which the mean-filter init produces at the start of training.
    """

    epsilon: float = NORM_EPSILON
    scale_init: Initializer = _norm_scale_init
    use_fast_variance: bool = False


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """Up-sample an NHWC tensor by an integer factor with nearest neighbours.

    ``jnp.repeat`` reproduces TF's ``resize_images(method=NEAREST_NEIGHBOR,
    align_corners=False)`` for exact integer factors (METHOD §12).
    """
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def crop_to(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Crop an NHWC tensor to spatial size ``hw`` from the top-left corner.

    Used after ×2 up-sampling when the skip tensor has an odd size: a stride-2 ``SAME`` conv maps
    H to ceil(H/2), so up-sampling gives H or H+1 and the extra bottom row / right column is
    dropped. That keeps ``out[i] = in[i // 2]``, the same rule as for even sizes.
    """
    h, w = hw
    if x.shape[1] < h or x.shape[2] < w:
        raise ValueError(f"Cannot crop {x.shape[1:3]} to the larger size {hw}.")
    return x[:, :h, :w, :]


class ConvBlock(nn.Module):
    """Conv → optional instance norm → optional activation, with TF ``SAME`` padding.

    A stride-2 ``SAME`` conv gives ceil(H/2)×ceil(W/2), the TF semantics the code relies on
    (METHOD §1). With ``norm=False, activation=None`` this is a plain linear conv (e.g. the
    discriminator's output convs).

    The conv has a bias only when no instance norm follows. The code keeps the bias there too, but
    the norm subtracts it again: it never changes the output, its gradient is zero up to rounding,
    and Adam turns that rounding noise into lr-sized random steps (which, for one, makes runs on
    different device counts diverge in those parameters). Dropping it changes no function.
    """

    features: int  # Output channels.
    kernel_size: int = 3  # 3×3 in the U-Net; 5×5 in the discriminator's first two convs.
    strides: int = 1  # 2 for down-sampling convs.
    norm: bool = True  # Instance norm after the conv, as after almost every conv in the code.
    activation: str | None = "leaky_relu"  # See `activation()`; None = linear.
    kernel_init: str = "normal"  # "normal" N(0, 0.02) | "mean_filter" (U-Net code parity).
    c_nominal: int | None = None  # Mean-filter nominal input channels; None = the real count.
    # Convolve the input up-sampled ×2 by nearest neighbours (3×3, stride 1): `UpConvBlock`'s conv,
    # computed in sub-pixel form where that is faster (`conv.upsampled_conv_general_dilated`).
    upsample: bool = False

    @nn.compact
    def __call__(self, x, film=None, *, skip: jax.Array | None = None):
        """Apply the block to an NHWC tensor.

        ``film`` (B, K), e.g. a modality one-hot, scales and shifts each channel after the norm:
        ``x·(1 + γ) + β`` with ``(γ, β) = Dense(film)``, zero-initialised so a new block starts as the
        unconditioned one. A condition must enter after the norm: a constant map concatenated before
        an instance-normalised conv is a per-channel constant the norm subtracts again.

        ``skip``, a map of the input's size, is convolved as if concatenated before the input's
        channels (``[skip, x]``, a U-Net decoder's skip connection).

        Several paths through the same parameters (a decoder run once per condition): ``x`` a list of
        maps and ``film`` a list of conditions of the same length (or None), or one map and a list of
        conditions, whose conv and norm are then computed once and its FiLM once per condition. A list
        comes back. With several maps, ``skip``'s share of the conv is computed once for all
        (`conv.SharedInputConv`).
        """
        several = isinstance(x, (list, tuple)) or isinstance(film, (list, tuple))
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
        films = list(film) if isinstance(film, (list, tuple)) else [film] * len(xs)
        if len(xs) not in (1, len(films)):
            raise ValueError(f"{len(xs)} paths under {len(films)} conditions: give one or as many.")
        c_in = xs[0].shape[-1] + (0 if skip is None else skip.shape[-1])
        c_nominal = c_in if self.c_nominal is None else self.c_nominal
        options = dict(
            features=self.features,
            kernel_size=(self.kernel_size, self.kernel_size),
            strides=(self.strides, self.strides),
            padding="SAME",
            use_bias=not self.norm,
            kernel_init=kernel_init(self.kernel_init, c_nominal=c_nominal),
            bias_init=nn.initializers.zeros,
            name="conv",
        )
        if skip is not None and len(xs) > 1 and not self.upsample:
            ys = conv.SharedInputConv(**options)(skip, xs)
        else:
            layer = (conv.UpsampledConv if self.upsample else conv.Conv)(**options)
            ys = [layer(v if skip is None else jnp.concatenate([skip, v], axis=-1)) for v in xs]
        if self.norm:
            norm = InstanceNorm(name="norm")
            ys = [norm(y) for y in ys]
        ys = ys * len(films) if len(ys) == 1 else ys
        if films[0] is not None:
            dense = nn.Dense(2 * self.features, kernel_init=nn.initializers.zeros, name="film")
            ys = [self._modulate(y, f, dense) for y, f in zip(ys, films, strict=True)]
        if self.activation is not None:
            ys = [activation(self.activation)(y) for y in ys]
        return ys if several else ys[0]

    @staticmethod
    def _modulate(x: jax.Array, film: jax.Array, dense: nn.Dense) -> jax.Array:
        """FiLM: ``x·(1 + γ) + β`` per channel, ``(γ, β) = dense(film)``."""
        if film.ndim != 2:
            raise ValueError(f"A FiLM condition is a (B, K) vector, got shape {film.shape}.")
        gamma, beta = jnp.split(dense(film)[:, None, None, :].astype(x.dtype), 2, axis=-1)
        return x * (1.0 + gamma) + beta


class UpConvBlock(nn.Module):
    """Nearest ×2 up-sampling, crop to the target size, then a 3×3 :class:`ConvBlock` (§1).

    The code up-samples with ``resize_images`` and convolves; there are no transposed convs (the
    thesis' "deconvolution" wording is not what the code does). Cropping before the conv means the
    conv sees the target-sized map, as if the input had been resized straight to the skip size.
    """

    features: int  # Output channels.
    activation: str | None = "leaky_relu"  # See `activation()`.
    kernel_init: str = "normal"  # See `ConvBlock`.
    c_nominal: int | None = None  # See `ConvBlock`.

    @nn.compact
    def __call__(self, x, target_hw: tuple[int, int] | None = None, film=None):
        """Up-sample ``x`` by 2 (cropped to ``target_hw`` if given) and convolve.

        ``film``, and ``x`` or ``film`` as lists of paths: as `ConvBlock` takes them.
        """
        first = x[0] if isinstance(x, (list, tuple)) else x
        doubled = (2 * first.shape[1], 2 * first.shape[2])
        # Even target sizes: the conv up-samples itself (sub-pixel form); odd ones crop the up-sampled map.
        upsample = target_hw is None or tuple(target_hw) == doubled
        if not upsample:
            crop = lambda v: crop_to(upsample_nearest(v, 2), target_hw)  # noqa: E731
            x = [crop(v) for v in x] if isinstance(x, (list, tuple)) else crop(x)
        return ConvBlock(
            self.features,
            activation=self.activation,
            kernel_init=self.kernel_init,
            c_nominal=self.c_nominal,
            upsample=upsample,
            name="block",
        )(x, film)
