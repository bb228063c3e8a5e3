"""Stage A's structure-map VAE: encoder E_s (METHOD §4.3), decoder G_s (§4.4); mask generator G_m (§4.6).

The code is a spatial map of ceil(H/8)×ceil(W/8)×``code_channels`` (64×64×1 = the code's 4096 units at
512²), so a smaller image gets a proportionally smaller code (4×4 at 32², 8×8 at 64², 16×16 at 128²).
w = ``features`` = ngf. With the paper's ``num_levels = 6`` and the code's names in brackets::

    E_s  input dropout (train only; keep 0.85 -> rate 0.15)
         level 1  down1 5×5 s2 w                          [conv0]   H/2
         level 2  down2 5×5 s2 w,  enc2_conv 3×3 2w       [conv1, conv2]   H/4
         level 3  down3 3×3 s2 4w, enc3_conv 3×3 4w       [conv3, conv4]   H/8
         level 4  down4 3×3 s2 4w, enc4_conv 3×3 4w       [conv5, conv6]   H/16
         level 5  down5 3×3 s2 8w, enc5_conv 3×3 8w       [conv7, conv8]   H/32
         level 6  down6 3×3 s2 8w                         [conv9]   H/64
         final_conv 3×3 2w                                [conv10]  (all convs IN+act)
         flatten (8·8·2w = 8192 at 512²) -> Dense mean, Dense logvar (linear) -> code map each

    G_s  flatten code -> dense0 (units) -> dense1 (units), both linear; units = h0·w0·w (8·8·64 = 4096 at
         512², h0×w0 = E_s's last map) -> reshape h0×w0×w -> in_conv 3×3 8w
         then per level, coarse to fine, up-sample ×2 + conv (up_l) and one conv (dec_l), widths
         4w, 4w, 2w, 2w, w, w -> out_conv out_channels -> IN (``norm_output``) -> sigmoid

A smaller ``num_levels`` (from the size table: the small variants run on 32²–128² images) keeps the first
levels of E_s and the last (finest) levels of G_s, so the bottleneck stays a real map instead of 1×1.
Every up-sampled map is cropped to the matching encoder size, so any H, W works (ceil semantics).

G_m is the U-Net of §4.1 (:class:`synth.models.unet.UNet`) with ngf 32, input dropout keep 0.9 and
``out_channels = 2·slices``; it needs no class of its own::

    UNet(**sizes.mask_generator_kwargs(variant, image_hw), out_channels=2 * slices, dropout_rate=0.1)

Its input is the paired one-hot of the structure map (``synth.losses.paired_one_hot``) or G_s's soft
output; its output pairs are [background, organ] per slice (mask convention 1 = organ, DATASETS.md).

Paper vs code choices (METHOD §1, §4.3, §4.4, §11): activation defaults to the paper's Leaky ReLU
(``"capped_relu"`` = code parity); conv init N(0, 0.02) and dense init Glorot-uniform (TF's default), as
in the code; input dropout only with ``train=True`` (§11.26). The decoder's two dense layers are linear
in the code (§11.11), the default here; ``dense_activation`` can name an activation for them. G_s's
output is instance-normalised before the sigmoid (the code, §11.18), switchable with ``norm_output``.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth.models.layers import ConvBlock, UpConvBlock, activation
from synth.models.unet import OUT_ACTIVATIONS, bottleneck_hw

MAX_LEVELS = 6  # The paper's depth: 512 -> 8.
CODE_LEVELS = 3  # The code map is H/8 × W/8 (64×64 at 512²) whatever the encoder depth.
# E_s levels: per level, (kernel, width multiplier) of its convs; the first conv of a level has stride 2.
ENCODER_LEVELS = (
    ((5, 1),),
    ((5, 1), (3, 2)),
    ((3, 4), (3, 4)),
    ((3, 4), (3, 4)),
    ((3, 8), (3, 8)),
    ((3, 8),),
)
ENCODER_FINAL_MULT = 2  # conv10: 128 channels at ngf 64, so 8·8·128 = 8192 inputs to the dense heads.
DECODER_IN_MULT = 8  # G_s's first conv: 512 at ngf 64.
DECODER_LEVEL_MULTS = (4, 4, 2, 2, 1, 1)  # G_s's widths per level, coarse (H/32) to fine (H).
ENCODER_INPUT_LOW = 0.9  # E_s sees 0.9 + 0.1·s, not the one-hot (§5.1).


def code_shape(image_hw: tuple[int, int], code_channels: int) -> tuple[int, int, int]:
    """Return the (h, w, c) shape of one image's code: (ceil(H/8), ceil(W/8), code_channels).

    Args:
        image_hw: the (H, W) of the structure maps.
        code_channels: channels of the code map (1 in the paper: 64×64×1 = 4096 units at 512²).

    Returns:
        The code map shape without the batch axis; the prior z has shape (B, *code_shape(...)).
    """
    return (*bottleneck_hw(image_hw, CODE_LEVELS), code_channels)


def encoder_input(structure: jax.Array, *, low: float = ENCODER_INPUT_LOW) -> jax.Array:
    """Squash a binary structure map to {low, 1}: E_s's input ``0.9 + 0.1·s`` (METHOD §5.1).

    Args:
        structure: (B, H, W, S) binary structure map (1 = edge), S slices.
        low: the value edges-free pixels get.

    Returns:
        ``low + (1 − low)·structure``, same shape.
    """
    return low + (1.0 - low) * structure.astype(jnp.float32)


def reparameterize(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Draw ``f = μ + σ ⊙ ε`` with ``σ = exp(logvar / 2)`` and ε ~ N(0, I) (METHOD §5.1).

    Args:
        key: PRNG key for ε.
        mean: μ, any shape.
        logvar: log σ², same shape as ``mean``.

    Returns:
        A sample of the same shape and dtype as ``mean``, differentiable in ``mean`` and ``logvar``.
    """
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def bounded_logvar(logvar: jax.Array, max_logvar: float) -> jax.Array:
    """``max_logvar − softplus(max_logvar − logvar)``: ≈ logvar well below the bound, never above it.

    At 0 the posterior's σ stays under the prior's 1. A larger σ carries no information about the map,
    only noise over the code; with the code's unbounded head, σ rose to 2-42 in seven of nine demo runs
    and, in three, every code then decoded to the same ring (BENCHMARKS.md, "Stage A's anatomy").
    The gradient stays non-zero everywhere, unlike a clip.
    """
    return max_logvar - jax.nn.softplus(max_logvar - logvar)


def _check_levels(num_levels: int) -> None:
    if not 1 <= num_levels <= MAX_LEVELS:
        raise ValueError(f"num_levels must be in [1, {MAX_LEVELS}], got {num_levels}.")


class VAEEncoder(nn.Module):
    """E_s of METHOD §4.3 (layers in the module docstring): structure map -> (mean, logvar) code maps."""

    features: int = 64  # ngf; the code's widths are 64..512.
    num_levels: int = MAX_LEVELS  # Stride-2 levels; 6 (512 -> 8) in the paper, fewer for small images.
    code_channels: int = 1  # Code map channels; 64×64×1 = 4096 units at 512² in the code.
    activation: str = "leaky_relu"  # Paper; "capped_relu" = code parity (§11.9).
    kernel_init: str = "normal"  # N(0, 0.02), as the code.
    dropout_rate: float = 0.15  # Input dropout, train only: the code's keep_prob 0.85.
    # None: the code's linear logvar head. A number bounds it smoothly from above (`bounded_logvar`).
    max_logvar: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Encode structure maps.

        Args:
            x: (B, H, W, C) encoder input, i.e. :func:`encoder_input` of the structure map.
            train: enables input dropout (needs a ``"dropout"`` rng).

        Returns:
            ``(mean, logvar)``, each (B, *code_shape((H, W), code_channels)).
        """
        _check_levels(self.num_levels)
        if x.ndim != 4:
            raise ValueError(f"Expected NHWC input, got shape {x.shape}.")
        conv = functools.partial(ConvBlock, activation=self.activation, kernel_init=self.kernel_init)
        if self.dropout_rate > 0.0:
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name="input_dropout")(x)

        h = x
        for level, level_convs in enumerate(ENCODER_LEVELS[: self.num_levels], start=1):
            for j, (kernel, mult) in enumerate(level_convs):
                name = f"down{level}" if j == 0 else f"enc{level}_conv"
                h = conv(self.features * mult, kernel_size=kernel, strides=2 if j == 0 else 1, name=name)(h)
        h = conv(self.features * ENCODER_FINAL_MULT, name="final_conv")(h)

        code = code_shape(x.shape[1:3], self.code_channels)
        flat = h.reshape(h.shape[0], -1)
        # TF's default Dense init (Glorot-uniform, bias 0), as the code's (§1); both heads are linear.
        dense = functools.partial(
            nn.Dense, code[0] * code[1] * code[2], kernel_init=nn.initializers.glorot_uniform()
        )
        mean = dense(name="mean")(flat).reshape(-1, *code)
        logvar = dense(name="logvar")(flat).reshape(-1, *code)
        if self.max_logvar is not None:
            logvar = bounded_logvar(logvar, self.max_logvar)
        return mean, logvar


class VAEDecoder(nn.Module):
    """G_s of METHOD §4.4 (layers in the module docstring): code map -> structure-map probabilities.

    G_s generates the structure map only; the mask comes from G_m (§4.6). The output has two
    independent sigmoid channels per slice, [P(no edge), P(edge)] (not a softmax); the binary map is
    the argmax of each pair.
    """

    image_hw: tuple[int, int]  # (H, W) of the maps to generate; the dense and crop sizes follow from it.
    features: int = 64  # ngf; G_s's widths are 64..512 and the reshape has ngf channels.
    num_levels: int = MAX_LEVELS  # Up-sampling levels; must match the encoder's.
    code_channels: int = 1  # Expected code channels (checked).
    out_channels: int = 2  # 2 per slice: 2 in general, 6 for the TC lung CT's 3 slices.
    activation: str = "leaky_relu"  # Paper; "capped_relu" = code parity (§11.9).
    kernel_init: str = "normal"  # N(0, 0.02), as the code.
    dense_activation: str | None = None  # None: linear dense layers, as the code (§11.11).
    out_activation: str = "sigmoid"  # "sigmoid" probabilities; "none" returns pre-sigmoid values.
    norm_output: bool = True  # The code instance-normalises the output conv before the sigmoid (§11.18).

    @nn.compact
    def __call__(self, code: jax.Array) -> jax.Array:
        """Decode code maps.

        Args:
            code: (B, *code_shape(image_hw, code_channels)) codes (encoder samples or prior draws).

        Returns:
            (B, H, W, out_channels) probabilities (or pre-sigmoid values with ``out_activation="none"``).
        """
        _check_levels(self.num_levels)
        if self.out_activation not in OUT_ACTIVATIONS:
            raise ValueError(f"Unknown out_activation {self.out_activation!r}; valid: {OUT_ACTIVATIONS}.")
        expected = code_shape(self.image_hw, self.code_channels)
        if code.shape[1:] != expected:
            raise ValueError(
                f"Code shape {code.shape[1:]} does not match {expected} for image {self.image_hw}."
            )
        conv = functools.partial(ConvBlock, activation=self.activation, kernel_init=self.kernel_init)

        # Map sizes of the encoder's levels, fine to coarse; the decoder crops back up along them.
        hws = [bottleneck_hw(self.image_hw, level) for level in range(self.num_levels + 1)]
        h0, w0 = hws[-1]
        units = h0 * w0 * self.features
        h = code.reshape(code.shape[0], -1)
        for i in range(2):
            h = nn.Dense(units, kernel_init=nn.initializers.glorot_uniform(), name=f"dense{i}")(h)
            if self.dense_activation is not None:
                h = activation(self.dense_activation)(h)
        h = h.reshape(-1, h0, w0, self.features)
        h = conv(self.features * DECODER_IN_MULT, name="in_conv")(h)

        mults = DECODER_LEVEL_MULTS[MAX_LEVELS - self.num_levels :]
        for level, mult in zip(range(self.num_levels - 1, -1, -1), mults):
            width = self.features * mult
            h = UpConvBlock(
                width, activation=self.activation, kernel_init=self.kernel_init, name=f"up{level}"
            )(h, hws[level])
            h = conv(width, name=f"dec{level}_conv")(h)

        out = conv(self.out_channels, norm=self.norm_output, activation=None, name="out_conv")(h)
        if self.out_activation == "sigmoid":
            out = jax.nn.sigmoid(out)
        return out
