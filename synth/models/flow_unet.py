"""Velocity network of the flow-matching generators: the §4.1 U-Net layout with a time embedding.

``FlowUNet(x_t, t, cond)`` predicts the velocity dx/dt of a rectified flow (``synth.flow``) at the
noisy sample ``x_t`` and time ``t`` in [0, 1]. It keeps the layout of the paper's U-Net G
(:mod:`synth.models.unet`): the same convs at the same widths, NHWC, TF ``SAME`` padding, stride-2
convs that ceil-halve any H, W, nearest ×2 up-sampling cropped to the skip size and a 3×3 conv
(:mod:`synth.models.layers`). Holding the layout fixed makes the GAN and the flow family cost about
the same FLOPs per network call, so comparisons measure the objective, not the architecture. What
differs, and why:

* **Time.** ``t`` goes through sinusoidal features and a two-layer MLP; every conv block then maps
  that embedding to a per-channel scale and shift (FiLM): ``h = norm(h) · (1 + scale) + shift``,
  then the activation. The projections start at zero, so at initialisation every block is a plain
  conv-norm-activation block and time enters as training finds it useful (as adaLN-Zero in DiT).
* **Norm.** GroupNorm, not the GAN's instance norm. Instance norm removes the mean and scale of
  every feature map of every image separately, and with them the per-image intensity statistics a
  velocity depends on (how much noise ``x_t`` still holds, the overall level of ``x1 − x0``).
  GroupNorm normalises groups of channels together, so the relative means and scales of the
  channels in a group survive. The norm has no affine parameters of its own: the FiLM projection's
  bias is the time-independent scale and shift.
* **Residual pairs.** The two convs of every encoder and decoder level form a residual unit (a 1×1
  projection where the width changes, ~+7 % FLOPs). A velocity is close to a per-pixel affine
  function of ``x_t`` with a time-dependent gain (for a single target image A it is exactly
  ``(A − x_t)/(1 − t)``); the identity paths let the network express that directly. On the test
  suite's two-image toy they cut the sample error after 300 steps from 0.07 to 0.03.
* **Input.** ``x_t`` (K·C channels: all modalities jointly, so they are registered by construction)
  concatenated with the conditioning maps (stage B: structure map, lesion one-hot, organ mask;
  stage A: none).
* **Output.** K·C linear channels (no norm, no sigmoid: velocities are unbounded), from a conv
  initialised to zero, so the untrained network predicts v = 0 and the first updates are not
  dominated by a random output layer.
* **Activation.** SiLU by default, the usual choice for score and velocity networks; any
  :func:`synth.models.layers.activation` name also works.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth.models import conv, layers

NORM_EPSILON = 1e-5
TIME_SCALE = 1000.0  # t in [0, 1] is stretched to DDPM's step range so the sinusoids resolve small dt.
MAX_PERIOD = 10_000.0  # Longest sinusoid period, in units of the stretched time (Transformer/DDPM value).


def activation(name: str):
    """Return the activation ``name``: ``"silu"`` or any :func:`synth.models.layers.activation` name."""
    if name == "silu":
        return jax.nn.silu
    return layers.activation(name)


def time_features(t: jax.Array, num_frequencies: int) -> jax.Array:
    """Sinusoidal features of times ``t`` (B,) in [0, 1]: (B, 2·num_frequencies), sines then cosines.

    Frequencies are geometric between 1 and 1/``MAX_PERIOD`` (per unit of ``TIME_SCALE · t``), so the
    features separate times from ~1e-3 apart up to the whole interval.
    """
    if num_frequencies < 1:
        raise ValueError(f"num_frequencies must be >= 1, got {num_frequencies}.")
    exponents = jnp.arange(num_frequencies, dtype=jnp.float32) / num_frequencies
    freqs = jnp.exp(-math.log(MAX_PERIOD) * exponents)
    args = (TIME_SCALE * t.astype(jnp.float32))[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def num_groups(width: int, groups: int) -> int:
    """GroupNorm groups for ``width`` channels: ``groups`` if it divides the width, else their gcd."""
    return math.gcd(width, groups)


class FiLMConvBlock(nn.Module):
    """3×3 conv → GroupNorm → FiLM from the time embedding → activation.

    The conv has no bias: the norm would subtract most of it, and the FiLM shift that follows is the
    learnable offset (as the norm-followed convs of :class:`synth.models.layers.ConvBlock`).
    """

    features: int  # Output channels.
    strides: int = 1  # 2 for down-sampling blocks (ceil-halves H and W, TF SAME).
    groups: int = 32  # GroupNorm groups (reduced to gcd(groups, features)).
    activation: str = "silu"  # See `activation()`.
    dtype: Any = None  # Computation dtype (e.g. bfloat16); parameters stay float32.
    # Convolve ``x`` up-sampled ×2 by nearest neighbours (`conv.upsampled_conv_general_dilated`).
    upsample: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        """Apply the block to NHWC ``x`` with the (B, E) time embedding ``emb``."""
        h = (conv.UpsampledConv if self.upsample else conv.Conv)(
            self.features,
            (3, 3),
            strides=(self.strides, self.strides),
            padding="SAME",
            use_bias=False,
            dtype=self.dtype,
            name="conv",
        )(x)
        h = nn.GroupNorm(
            num_groups=num_groups(self.features, self.groups),
            epsilon=NORM_EPSILON,
            use_scale=False,
            use_bias=False,
            dtype=self.dtype,
            name="norm",
        )(h)
        # Zero init: identity modulation at the start; the bias carries the time-independent affine.
        film = nn.Dense(
            2 * self.features,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="film",
        )(emb)
        scale, shift = jnp.split(film[:, None, None, :].astype(h.dtype), 2, axis=-1)
        return activation(self.activation)(h * (1.0 + scale) + shift)


class FlowUNet(nn.Module):
    """Time-conditioned U-Net predicting a velocity field (module docstring for the design).

    Layers for ``num_levels = 3`` (w = ``features``; every block is a :class:`FiLMConvBlock`; names
    as in :class:`synth.models.unet.UNet`)::

        level 0 (H)    [enc0_conv0 w, enc0_conv1 w] -> skip 0
        level 1 (H/2)  down1 s2 w, [enc1_conv0 2w, enc1_conv1 2w] -> skip 1
        level 2 (H/4)  down2 s2 2w, [enc2_conv0 4w, enc2_conv1 4w] -> skip 2
        bottleneck     down3 s2 4w, bottleneck_conv 4w
        level 2        up2 4w, ++skip 2, [dec2_conv0 2w, dec2_conv1 2w]
        level 1        up1 2w, ++skip 1, [dec1_conv0 w, dec1_conv1 w]
        level 0        up0 w, ++skip 0, [dec0_conv0 w, dec0_conv1 w]
        output         out_conv out_channels (linear, zero init)

    ``[a, b]`` is a residual pair: ``b(a(h)) + h``, with ``h`` through a 1×1 conv (``*_skip``) when
    its width differs.

    Sizes come from ``synth.models.sizes.flow_unet_kwargs``.
    """

    out_channels: int  # K·C: every modality's channels, generated jointly.
    features: int = 64  # Base width, as the U-Net's ngf.
    num_levels: int = 3  # Stride-2 steps; 3 gives the paper's H/8 bottleneck.
    groups: int = 32  # GroupNorm groups per block (gcd with the block's width).
    time_frequencies: int = 32  # Sinusoids of t; the embedding MLP then has width 4·features.
    activation: str = "silu"  # See `activation()`.
    dtype: Any = None  # Computation dtype (e.g. bfloat16 for mixed precision); parameters stay float32.
    # Each block keeps only its input for the backward pass and is recomputed there (as `UNet.remat`;
    # same parameters and results; on XLA:CPU the recomputation is merged back): `<stage>.flow.remat`.
    remat: bool = False

    @nn.compact
    def __call__(self, x_t: jax.Array, t: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        """Predict the velocity at ``(x_t, t)``.

        Args:
            x_t: noisy samples (B, H, W, out_channels), any H, W >= 1.
            t: times in [0, 1], shape (B,) or a scalar (the same time for every example).
            cond: optional conditioning maps (B, H, W, C_cond), concatenated to ``x_t``.

        Returns:
            The velocity (B, H, W, out_channels), linear, in ``dtype`` (float32 by default).
        """
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}.")
        if x_t.ndim != 4 or x_t.shape[-1] != self.out_channels:
            raise ValueError(f"x_t must be (B, H, W, {self.out_channels}), got shape {x_t.shape}.")
        batch = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))

        emb_width = 4 * self.features
        emb = time_features(t, self.time_frequencies)
        emb = nn.Dense(emb_width, dtype=self.dtype, name="time_dense0")(emb)
        emb = nn.Dense(emb_width, dtype=self.dtype, name="time_dense1")(jax.nn.silu(emb))
        emb = jax.nn.silu(emb)  # Every block's FiLM projection reads this.

        h = x_t
        if cond is not None:
            if cond.shape[:3] != x_t.shape[:3]:
                raise ValueError(f"cond shape {cond.shape} does not match x_t's (B, H, W) {x_t.shape[:3]}.")
            h = jnp.concatenate([x_t, cond.astype(x_t.dtype)], axis=-1)

        widths = [self.features * 2**level for level in range(self.num_levels)]

        block_class = nn.remat(FiLMConvBlock) if self.remat else FiLMConvBlock

        def block(width: int, name: str, strides: int = 1, upsample: bool = False) -> FiLMConvBlock:
            return block_class(
                width,
                strides=strides,
                upsample=upsample,
                groups=self.groups,
                activation=self.activation,
                dtype=self.dtype,
                name=name,
            )

        def residual_pair(h: jax.Array, width: int, name: str) -> jax.Array:
            out = block(width, f"{name}_conv1")(block(width, f"{name}_conv0")(h, emb), emb)
            if h.shape[-1] != width:
                h = conv.Conv(width, (1, 1), dtype=self.dtype, name=f"{name}_skip")(h)
            return out + h

        skips = []
        for level in range(self.num_levels):
            if level > 0:
                h = block(widths[level - 1], f"down{level}", strides=2)(h, emb)
            h = residual_pair(h, widths[level], f"enc{level}")
            skips.append(h)

        h = block(widths[-1], f"down{self.num_levels}", strides=2)(h, emb)
        h = block(widths[-1], "bottleneck_conv")(h, emb)

        for level in reversed(range(self.num_levels)):
            skip = skips[level]
            # Nearest ×2, cropped to the skip (odd sizes), then a 3×3 conv: the U-Net's up-sampling (for
            # even sizes in the conv, in sub-pixel form where that pays: `layers.UpConvBlock`).
            if skip.shape[1:3] == (2 * h.shape[1], 2 * h.shape[2]):
                h = block(widths[level], f"up{level}", upsample=True)(h, emb)
            else:
                h = block(widths[level], f"up{level}")(
                    layers.crop_to(layers.upsample_nearest(h, 2), skip.shape[1:3]), emb
                )
            h = jnp.concatenate([skip, h], axis=-1)
            h = residual_pair(h, widths[max(level - 1, 0)], f"dec{level}")

        return conv.Conv(
            self.out_channels,
            (3, 3),
            padding="SAME",
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="out_conv",
        )(h)
