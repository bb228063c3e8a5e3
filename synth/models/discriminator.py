"""Discriminators: the "VGG11-like" patch discriminator (METHOD §4.2) and the code discriminator D_z (§4.5).

:class:`PatchDiscriminator` is the code's ``Discriminator``: D_s in stage A (single head, input dropout
keep 0.85), D in stage B (two heads: real/fake and modality category, the ACGAN discriminator), and the
X-ray lesion classifier (single head, 3 channels, §6.4). w = ``features`` = ngf; the code's layer names
are kept::

    input dropout (train only)
    conv0  5×5 s2  w    IN+act      H/2
    conv1  5×5 s2  w    IN+act      H/4
    conv2  3×3 s2  2w   IN+act      H/8
    conv3  3×3 s2  2w   IN+act      H/16   (shared trunk)
    head k (k = 1, 2): conv4_k 3×3 s1 w IN+act -> conv5_k 3×3 s1 out linear (no IN, with bias)

Stride-2 ``SAME`` convs give ceil(H/2), so the output map is ceil(H/16)×ceil(W/16): 12×9 at 184×144,
32×32 at 512².

:class:`CodeDiscriminator` is the code's ``FeatureDiscriminator`` D_z; it judges VAE codes (spatial maps,
64×64×1 at 512², see :mod:`synth.models.vae`)::

    conv0 7×7 s1 2w, conv1 7×7 s1 2w, conv2 5×5 s1 2w, conv3 5×5 s2 4w, conv4 3×3 s1 4w  (all IN+act)
    conv5 3×3 s1 out  linear                                                   -> ceil(h/2)×ceil(w/2)

Paper vs code choices (METHOD §1, §4.2, §11): activation defaults to the paper's Leaky ReLU
(``"capped_relu"`` = code parity); init N(0, 0.02) as in the code; input dropout is active only with
``train=True`` (the TF-1 code keeps it on when scoring samples, §11.12/§11.26). The category head is, as in
the code, a map regressed to the modality index (§11.15); ``category_channels`` lets a config give it K
channels for a softmax/cross-entropy head instead.
"""

import functools

import flax.linen as nn
import jax

from synth.models.layers import ConvBlock

# (kernel, stride, width multiplier of ngf) of the shared trunk, conv0..conv3 (§4.2).
PATCH_TRUNK = ((5, 2, 1), (5, 2, 1), (3, 2, 2), (3, 2, 2))
# (kernel, stride, width multiplier) of D_z's convs before its linear output conv (§4.5).
CODE_TRUNK = ((7, 1, 2), (7, 1, 2), (5, 1, 2), (5, 2, 4), (3, 1, 4))


class PatchDiscriminator(nn.Module):
    """The "VGG11-like" patch discriminator of METHOD §4.2 (layers in the module docstring).

    Outputs are raw (no sigmoid): every adversarial loss is least-squares (§1).
    """

    features: int = 64  # ngf; 64 in every use in the code.
    out_channels: int = 1  # Channels of the real/fake head (3 for the X-ray lesion classifier, §6.4).
    heads: int = 1  # 1: real/fake map only (D_s); 2: adds the category head of stage B's ACGAN D.
    category_channels: int | None = None  # Head 2's channels; None = out_channels (code: 1, §11.15).
    activation: str = "leaky_relu"  # Paper; "capped_relu" = code parity (§11.9).
    kernel_init: str = "normal"  # N(0, 0.02), as the code; "mean_filter" is available too.
    dropout_rate: float = 0.0  # Input dropout, train only; D_s 0.15 (keep 0.85), stage-B D_X 0.

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Score images patch-wise.

        Args:
            x: (B, H, W, C) images or one-hot maps, any H, W >= 1.
            train: enables input dropout (needs a ``"dropout"`` rng).

        Returns:
            With ``heads=1`` the real/fake map (B, ceil(H/16), ceil(W/16), out_channels); with
            ``heads=2`` the pair ``(real/fake map, category map)``, the latter with
            ``category_channels`` channels.
        """
        if self.heads not in (1, 2):
            raise ValueError(f"heads must be 1 or 2, got {self.heads}.")
        if x.ndim != 4:
            raise ValueError(f"Expected NHWC input, got shape {x.shape}.")
        conv = functools.partial(ConvBlock, activation=self.activation, kernel_init=self.kernel_init)

        if self.dropout_rate > 0.0:
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name="input_dropout")(x)
        h = x
        for i, (kernel, stride, mult) in enumerate(PATCH_TRUNK):
            h = conv(self.features * mult, kernel_size=kernel, strides=stride, name=f"conv{i}")(h)

        channels = [
            self.out_channels,
            self.out_channels if self.category_channels is None else self.category_channels,
        ]
        outs = []
        for k in range(1, self.heads + 1):
            y = conv(self.features, name=f"conv4_{k}")(h)
            # Output convs have no instance norm (§1), hence a bias, and are linear for the LSGAN losses.
            outs.append(conv(channels[k - 1], norm=False, activation=None, name=f"conv5_{k}")(y))
        return outs[0] if self.heads == 1 else (outs[0], outs[1])


class CodeDiscriminator(nn.Module):
    """The code discriminator D_z of METHOD §4.5 (layers in the module docstring); no dropout.

    It tells prior samples z ~ N(0, I) from encoder codes f; its raw output map is trained with LSGAN
    targets (z real, f fake, §5.2).
    """

    features: int = 64  # ngf; widths are 2·ngf and 4·ngf (128 and 256 in the code).
    out_channels: int = 1  # The code's single-channel output map.
    activation: str = "leaky_relu"  # Paper; "capped_relu" = code parity (§11.9).
    kernel_init: str = "normal"  # N(0, 0.02), as the code.

    @nn.compact
    def __call__(self, code: jax.Array) -> jax.Array:
        """Score a batch of codes.

        Args:
            code: (B, h, w, c) code maps (64×64×1 at 512², see ``synth.models.vae.code_shape``).

        Returns:
            (B, ceil(h/2), ceil(w/2), out_channels) raw scores.
        """
        if code.ndim != 4:
            raise ValueError(f"Expected a (B, h, w, c) code map, got shape {code.shape}.")
        conv = functools.partial(ConvBlock, activation=self.activation, kernel_init=self.kernel_init)
        h = code
        for i, (kernel, stride, mult) in enumerate(CODE_TRUNK):
            h = conv(self.features * mult, kernel_size=kernel, strides=stride, name=f"conv{i}")(h)
        return conv(self.out_channels, norm=False, activation=None, name=f"conv{len(CODE_TRUNK)}")(h)
