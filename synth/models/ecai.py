"""The earlier encoder/decoder design of the AAAI/ECAI drafts (METHOD §6.7), as Linen modules.

Stage B's `variant=ecai` swaps the conditional U-Net G for three networks that share one code space, and
the two-head D for that D plus a code discriminator:

* `EC_R` (fusion-map encoder) and `EC_M` (image encoder): w = ``features`` = ngf, every conv 3×3 with
  instance norm + activation::

      conv0 w, conv1 w, conv2 s2 2w, conv3 4w, conv4 4w, conv5 s2 8w, conv6 8w   -> code (H/4, W/4, 8w)

* `DC_M` (decoder), conditioned by the modality one-hot tiled into a K-channel map and concatenated to
  the code at H/4; **no skip connections**::

      conv0 8w, up1 4w, conv1 4w, conv2 4w, up2 2w, conv3 2w, conv4 2w, conv5 w, out_conv (IN, sigmoid)

* `FD_R` (code discriminator): the code discriminator D_z of §4.5, on codes.

`EcaiGenerator.__call__(x, cond)` = DC_M([EC_R(x), cond]) has the U-Net's signature, so stage B's
generation, evaluation, stage C and the comparison run the old design unchanged; its other methods give
the image encoder, the decoder and image-to-image translation DC_M([EC_M(x), c]) to the old design's
extra losses (`synth.ecai_losses`). `EcaiDiscriminator.__call__` is the two-head patch D (D_M); its
`judge_code` method is FD_R. Both initialise every sub-network from `init(x, …)`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth.models.discriminator import CodeDiscriminator, PatchDiscriminator
from synth.models.layers import ConvBlock, UpConvBlock
from synth.models.unet import UNet

# (stride, width multiplier of ngf) of the encoders' 3×3 convs (§6.7).
ENCODER_CONVS = ((1, 1), (1, 1), (2, 2), (1, 4), (1, 4), (2, 8), (1, 8))
CODE_MULTIPLIER = ENCODER_CONVS[-1][1]


def _half(hw) -> tuple[int, ...]:
    """A stride-2 SAME conv's output size: ceil(n / 2) per axis."""
    return tuple(-(-n // 2) for n in hw)


def code_hw(image_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the code for (H, W) images: two stride-2 SAME convs (46×36 at 184×144)."""
    return _half(_half(image_hw))


class EcaiEncoder(nn.Module):
    """EC_R / EC_M: images or fusion maps (B, H, W, C) -> codes (B, ceil(H/4), ceil(W/4), 8·ngf)."""

    features: int = 64
    activation: str = "leaky_relu"
    kernel_init: str = "normal"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(ConvBlock, activation=self.activation, kernel_init=self.kernel_init)
        for i, (stride, mult) in enumerate(ENCODER_CONVS):
            x = conv(self.features * mult, strides=stride, name=f"conv{i}")(x)
        return x


class EcaiDecoder(nn.Module):
    """DC_M: a code and a modality condition -> images (B, H, W, out_channels), no skip connections."""

    features: int = 64
    out_channels: int = 1
    activation: str = "leaky_relu"
    kernel_init: str = "normal"

    @nn.compact
    def __call__(self, code: jax.Array, cond: jax.Array | None, image_hw: tuple[int, int]) -> jax.Array:
        """Decodes `code` (B, h, w, c) into (H, W) = `image_hw` images, in modality `cond` (B, K) if given."""
        if code.shape[1:3] != code_hw(image_hw):
            raise ValueError(f"Code shape {code.shape} does not decode to images of size {tuple(image_hw)}.")
        if cond is not None:  # §6.7: the one-hot as a K-channel map concatenated to the code at H/4.
            code = jnp.concatenate([code, UNet._tile_cond(cond, code)], axis=-1)
        w = self.features
        conv = functools.partial(ConvBlock, activation=self.activation, kernel_init=self.kernel_init)
        up = functools.partial(UpConvBlock, activation=self.activation, kernel_init=self.kernel_init)
        h = conv(8 * w, name="conv0")(code)
        h = up(4 * w, name="up1")(h, _half(image_hw))
        h = conv(4 * w, name="conv2")(conv(4 * w, name="conv1")(h))
        h = up(2 * w, name="up2")(h, tuple(image_hw))
        h = conv(2 * w, name="conv4")(conv(2 * w, name="conv3")(h))
        h = conv(w, name="conv5")(h)
        return jax.nn.sigmoid(conv(self.out_channels, activation=None, name="out_conv")(h))


class EcaiGenerator(nn.Module):
    """EC_R, EC_M and DC_M: everything the old design optimises as "G" (§6.7)."""

    features: int = 64
    out_channels: int = 1  # Channels per modality.
    activation: str = "leaky_relu"
    kernel_init: str = "normal"

    def setup(self):
        kw = dict(features=self.features, activation=self.activation, kernel_init=self.kernel_init)
        self.fusion_encoder = EcaiEncoder(**kw)  # EC_R
        self.image_encoder = EcaiEncoder(**kw)  # EC_M
        self.decoder = EcaiDecoder(out_channels=self.out_channels, **kw)  # DC_M

    def __call__(self, x: jax.Array, cond: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """Generation, x_g = DC_M([EC_R(f), c]): the U-Net's signature (`train` changes nothing here)."""
        del train
        if self.is_initializing():  # EC_M is not on this path; create its parameters too.
            self.image_encoder(jnp.zeros(x.shape[:3] + (self.out_channels,), x.dtype))
        return self.decoder(self.fusion_encoder(x), cond, x.shape[1:3])

    def encode_fusion(self, x: jax.Array) -> jax.Array:
        return self.fusion_encoder(x)

    def encode_image(self, x: jax.Array) -> jax.Array:
        return self.image_encoder(x)

    def decode(self, code: jax.Array, cond: jax.Array | None, image_hw: tuple[int, int]) -> jax.Array:
        return self.decoder(code, cond, image_hw)

    def translate(self, x: jax.Array, cond: jax.Array | None) -> jax.Array:
        """DC_M([EC_M(x), c]): reconstruction (c = x's modality) or translation (another one)."""
        return self.decoder(self.image_encoder(x), cond, x.shape[1:3])


class EcaiDiscriminator(nn.Module):
    """D_M (the two-head patch D on images) and FD_R (the code discriminator), optimised together."""

    features: int = 64
    code_features: int = 64  # FD_R's ngf (the code-discriminator row of the sizes table).
    code_channels: int = 512  # Channels of the codes FD_R judges: 8 × the generator's ngf.
    heads: int = 2
    category_channels: int | None = None
    activation: str = "leaky_relu"
    kernel_init: str = "normal"
    dropout_rate: float = 0.0  # D_M's input dropout (train only).

    def setup(self):
        kw = dict(activation=self.activation, kernel_init=self.kernel_init)
        self.image = PatchDiscriminator(
            features=self.features,
            heads=self.heads,
            category_channels=self.category_channels,
            dropout_rate=self.dropout_rate,
            **kw,
        )
        self.code = CodeDiscriminator(features=self.code_features, **kw)

    def __call__(self, x: jax.Array, *, train: bool = False):
        """D_M's (real/fake, category) maps of images, as `PatchDiscriminator`."""
        if self.is_initializing():  # FD_R is not on this path; create its parameters too.
            self.code(jnp.zeros((x.shape[0],) + code_hw(x.shape[1:3]) + (self.code_channels,), x.dtype))
        return self.image(x, train=train)

    def judge_code(self, code: jax.Array) -> jax.Array:
        """FD_R's raw score map of codes (B, h, w, c)."""
        return self.code(code)
