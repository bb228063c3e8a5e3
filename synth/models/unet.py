"""Conditional U-Net of METHOD §4.1, used for G, G_t, G_m and the lesion segmentors.

Layers for ``num_levels=3`` (the paper/code design). w = ``features`` = ngf; every conv is 3×3
and followed by instance norm + activation unless noted; "++" is a channel concat; the code's
layer names are in brackets::

    level 0 (H)    enc0_conv0 w (C_nominal 1), enc0_conv1 w -> skip 0    [conv1, conv2]
    level 1 (H/2)  down1 s2 w, enc1_conv0 2w, enc1_conv1 2w -> skip 1    [conv3, conv4, conv5]
    level 2 (H/4)  down2 s2 2w, enc2_conv0 4w, enc2_conv1 4w -> skip 2   [conv6, conv7, conv8]
    bottleneck     down3 s2 4w (raw: no IN/act), ++cond, bottleneck_conv 4w   [conv9, conv10]
    level 2        up2 4w, ++skip 2 (8w), dec2_conv0 2w, dec2_conv1 2w   [row 11, add1_conv1/2]
    level 1        up1 2w, ++skip 1 (4w), dec1_conv0 w, dec1_conv1 w     [row 13, add2_conv1/2]
    level 0        up0 w, ++skip 0 (2w), dec0_conv0 w, dec0_conv1 w      [row 15, add3_conv1/2]
    output         out_conv out_channels, IN if norm_output, sigmoid if out_activation [lastconv]

In general level l has width ``features·2**l``; the stride-2 conv into a level keeps the width of
the level above, and the decoder convs at level l output the width of level max(l−1, 0).

Paper vs code choices (METHOD §1, §4.1, §11):

* Activation: the paper says Leaky ReLU (0.2); the code uses a ReLU capped at 100 everywhere
  except conv5, a plain ReLU. Default ``"leaky_relu"`` everywhere; ``activation="capped_relu"``
  reproduces the code, including the plain ReLU on the last conv of level 1 (conv5).
* Init: default N(0, 0.02); ``kernel_init="mean_filter"`` reproduces the code (conv1 uses
  C_nominal = 1 and the bottleneck conv ignores the condition channels, as in the §4.1 table).
* Up-sampling: nearest ×2 + 3×3 conv, as in the code (the thesis mentions deconvolutions; the
  code has none).
* Odd sizes: the code only runs sizes divisible by 8. Here stride-2 ``SAME`` convs give ceil(H/2)
  and the up-sampled map is cropped (top-left) to the skip size, so any H, W works.
* Output: instance norm before the output sigmoid is the code's (§11.18); kept as the default of
  ``norm_output``, which the paper does not discuss.
* Input dropout is active only with ``train=True`` (the TF-1 code keeps it on at inference,
  §11.26).
* Condition: ``condition="concat"`` is the paper's and code's form (tiled one-hot concatenated
  before ``bottleneck_conv``). Its instance norm subtracts a constant map's contribution again, so
  only the zero-padded border carries the condition: G and G_t cannot give the modalities different
  contrasts (docs/DIAGNOSIS-STAGE-B.md). ``condition="film"`` scales and shifts every decoder conv
  after its norm instead (`ConvBlock`), and gives each condition its own output conv (the condition's
  one-hot picks it); the encoder then does not see the condition at all, so one encoding serves
  every target, and the decoder's condition-free parts (the first up-sampling conv, the skips' share
  of the first conv at each level) serve every target too (`apply_per_condition`).
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth.models import stacked
from synth.models.layers import ConvBlock, UpConvBlock

OUT_ACTIVATIONS = ("sigmoid", "none")
CONDITIONS = ("concat", "film")


def configured_condition(model_config) -> str:
    """A generator config's ``condition`` (a config's ``model`` dict); workdirs from before it: "concat"."""
    return model_config.get("condition", "concat")


def configured_remat(network_config) -> bool:
    """A network section's ``remat`` (``model.remat``, ``<stage>.flow.remat``); older workdirs: off."""
    return bool(network_config.get("remat", False))


def bottleneck_hw(image_hw: tuple[int, int], num_levels: int) -> tuple[int, int]:
    """Compute the size after ``num_levels`` stride-2 ``SAME`` convs (ceil-halve each time).

    Args:
        image_hw: input (H, W).
        num_levels: number of stride-2 steps.

    Returns:
        The bottleneck (H, W), e.g. (23, 18) for (184, 144) and 3 levels.
    """
    h, w = image_hw
    for _ in range(num_levels):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


class _UNetLayers(nn.Module):
    """The U-Net's attributes and layers, shared by :class:`UNet` and its two halves.

    ``_encode`` and ``_decode`` create their layers inline, so they must run inside a subclass's
    ``@nn.compact`` ``__call__``; the layers then sit directly under the calling module with the
    names of the module docstring. This is what keeps :class:`UNet`'s parameter tree flat (other
    stages' checkpoints depend on it) while :class:`UNetEncoder` and :class:`UNetDecoder` hold
    exactly the encoder's and the decoder's part of that tree.
    """

    features: int = 64  # Base width ngf: 64 for G, G_t, G_l in the paper/code; 32 for G_m.
    out_channels: int = 1  # 1 for image generators, 5 for BRATS segmentors, 2 (TC: 6) for G_m.
    num_levels: int = 3  # Stride-2 steps; 3 gives the paper's H/8 bottleneck (184×144 -> 23×18).
    activation: str = "leaky_relu"  # Paper; "capped_relu" = code parity (see module docstring).
    kernel_init: str = "normal"  # N(0, 0.02); "mean_filter" = code parity.
    dropout_rate: float = 0.0  # Input dropout, train only; the code's keep_prob is 1 (G_m: 0.9).
    out_activation: str = "sigmoid"  # "sigmoid" for images; "none" returns logits (segmentors).
    norm_output: bool = True  # The code instance-normalises the output conv before the sigmoid.
    condition: str = "concat"  # How `cond` enters: "concat" (paper, code) or "film" (module docstring).
    # Rematerialisation: each conv block (conv, norm, FiLM, activation; the up-sampling blocks too) keeps
    # only its input for the backward pass and recomputes the rest there, so a differentiated U-Net holds
    # one activation per block instead of several, for one more forward pass of compute. Parameters and
    # results are the same either way; a config's `model.remat` sets it. XLA:CPU merges the recomputation
    # back into the forward pass, so the memory saved is a GPU's (BENCHMARKS.md, "Rematerialised U-Net").
    remat: bool = False

    def _check(self, x: jax.Array) -> None:
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}.")
        if self.condition not in CONDITIONS:
            raise ValueError(f"Unknown condition {self.condition!r}; valid: {CONDITIONS}.")
        if self.out_activation not in OUT_ACTIVATIONS:
            raise ValueError(f"Unknown out_activation {self.out_activation!r}; valid: {OUT_ACTIVATIONS}.")
        if x.ndim != 4:
            raise ValueError(f"Expected NHWC input, got shape {x.shape}.")

    def _widths(self) -> list[int]:
        return [self.features * 2**level for level in range(self.num_levels)]

    def _conv(self) -> functools.partial:
        # Every conv shares the activation and init; the few exceptions override them per call.
        block = nn.remat(ConvBlock) if self.remat else ConvBlock
        return functools.partial(block, activation=self.activation, kernel_init=self.kernel_init)

    def _encode(
        self, x: jax.Array, cond: jax.Array | None, train: bool
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Input dropout, the encoder levels and the bottleneck: returns (bottleneck, skips)."""
        widths = self._widths()
        conv = self._conv()

        if self.dropout_rate > 0.0:
            dropout = nn.Dropout(self.dropout_rate, deterministic=not train, name="input_dropout")
            x = dropout(x)

        h = x
        skips = []
        for level in range(self.num_levels):
            if level > 0:
                h = conv(widths[level - 1], strides=2, name=f"down{level}")(h)
            # The code's conv1 uses C_nominal = 1 whatever the input channels (§4.1).
            c_nominal = 1 if level == 0 else None
            h = conv(widths[level], c_nominal=c_nominal, name=f"enc{level}_conv0")(h)
            # Code parity: conv5 (last conv of level 1) is a plain ReLU in the code; the paper's
            # Leaky ReLU design has no such exception.
            act = "relu" if (level == 1 and self.activation == "capped_relu") else self.activation
            h = conv(widths[level], activation=act, name=f"enc{level}_conv1")(h)
            skips.append(h)

        # The last stride-2 conv has no norm and no activation in the code (conv9, "raw").
        h = conv(widths[-1], strides=2, norm=False, activation=None, name=f"down{self.num_levels}")(h)
        if cond is not None and self.condition == "concat":
            h = jnp.concatenate([h, self._tile_cond(cond, h)], axis=-1)
        # C_nominal excludes the condition channels, as in the code (conv10 uses 4ngf).
        h = conv(widths[-1], c_nominal=widths[-1], name="bottleneck_conv")(h)
        self.sow("intermediates", "bottleneck", h)
        return h, tuple(skips)

    def _decode(self, h: jax.Array, skips: tuple[jax.Array, ...], cond):
        """The decoder levels and the output conv (plus the output sigmoid, if any).

        With ``condition="film"``, ``cond`` may be a list of (B, K) conditions: the decoder then runs once
        per condition on the one encoding and returns a list. The paths share what does not depend on
        the condition: the first up-sampling conv and its norm (FiLM enters after the norm), and at every
        level the skip's share of the first decoder conv (`layers.ConvBlock`'s paths), computed once for
        all conditions, forward and backward.
        """
        widths = self._widths()
        conv = self._conv()
        if len(skips) != self.num_levels:
            raise ValueError(f"Expected {self.num_levels} skips, got {len(skips)}.")
        several = isinstance(cond, (list, tuple))
        if several and self.condition != "film":
            raise ValueError(f"A list of conditions needs condition='film', not {self.condition!r}.")
        film = None
        if cond is not None and self.condition == "film":
            for one in cond if several else [cond]:
                if one.ndim != 2:
                    raise ValueError(f"condition='film' takes a (B, K) cond, got shape {one.shape}.")
            film = [one.astype(h.dtype) for one in cond] if several else cond.astype(h.dtype)
        # `target_hw` (a tuple of ints, argument 2 counting the module) is static under remat.
        up_block = nn.remat(UpConvBlock, static_argnums=(2,)) if self.remat else UpConvBlock
        for level in reversed(range(self.num_levels)):
            skip = skips[level]
            h = up_block(
                widths[level],
                activation=self.activation,
                kernel_init=self.kernel_init,
                name=f"up{level}",
            )(h, skip.shape[1:3], film)
            dec_width = widths[max(level - 1, 0)]
            # The input is [skip, up-sampled], the code's order.
            h = conv(dec_width, name=f"dec{level}_conv0")(h, film, skip=skip)
            h = conv(dec_width, name=f"dec{level}_conv1")(h, film)

        if film is None:
            out = conv(self.out_channels, norm=self.norm_output, activation=None, name="out_conv")(h)
        else:
            # One output map per condition, the condition's one picked: each modality gets its own last
            # layer, learnt at a conv's pace (FiLM's zero-initialised layers start slowly).
            k = (film[0] if several else film).shape[-1]
            heads = conv(self.out_channels * k, norm=self.norm_output, activation=None, name="out_conv")(h)

            def pick(heads: jax.Array, film: jax.Array) -> jax.Array:
                heads = heads.reshape(heads.shape[:3] + (k, self.out_channels))
                return jnp.einsum("bhwkc,bk->bhwc", heads, film)

            out = [pick(*pair) for pair in zip(heads, film, strict=True)] if several else pick(heads, film)
        if self.out_activation == "sigmoid":
            out = [jax.nn.sigmoid(one) for one in out] if several else jax.nn.sigmoid(out)
        return out

    @staticmethod
    def _tile_cond(cond: jax.Array, h: jax.Array) -> jax.Array:
        """Tile a (B, K) condition over h's spatial size, or check a (B, h, w, K) map."""
        batch, hb, wb = h.shape[:3]
        if cond.ndim == 2:
            cond = jnp.broadcast_to(cond[:, None, None, :], (cond.shape[0], hb, wb, cond.shape[1]))
        elif cond.ndim != 4:
            raise ValueError(f"cond must be (B, K) or (B, h, w, K), got shape {cond.shape}.")
        if cond.shape[:3] != (batch, hb, wb):
            raise ValueError(
                f"cond shape {cond.shape} does not match the bottleneck (B, h, w) = {(batch, hb, wb)}."
            )
        return cond.astype(h.dtype)


class UNet(_UNetLayers):
    """Conditional U-Net (METHOD §4.1), generalised to ``num_levels`` down-sampling steps.

    ``__call__`` sows the bottleneck activation (after the condition concat and
    ``bottleneck_conv``) as ``intermediates/bottleneck``; read it with
    ``apply(..., mutable=["intermediates"])``.

    Input dropout: ``dropout_rate`` (= 1 − the code's ``keep_prob``) acts only when
    ``train=True`` and then needs a ``"dropout"`` rng. The TF-1 code applies it at inference too
    (§11.26). To reproduce that, a sampler can pass ``train=True`` plus a dropout rng at
    generation time behind a config flag (e.g. ``sample.dropout_at_inference``); no module
    attribute is needed, since instance norm behaves the same in training and evaluation.

    The same network in two halves, for designs that share one of them: :class:`UNetEncoder`
    and :class:`UNetDecoder` (built with :func:`split_unet`); their parameter trees are disjoint
    and together are exactly this module's.
    """

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """Run the U-Net.

        Args:
            x: input images (B, H, W, C_in), any H, W >= 1.
            cond: optional condition: a vector (B, K) (e.g. a modality one-hot), tiled over the
                bottleneck, or a map (B, h_b, w_b, K) of the bottleneck size. Concatenated to the
                raw output of the last stride-2 conv, before ``bottleneck_conv`` (§4.1); with
                ``condition="film"`` a (B, K) vector that scales and shifts the decoder's convs.
            train: enables input dropout.

        Returns:
            (B, H, W, out_channels): sigmoid outputs, or logits if ``out_activation="none"``.
        """
        self._check(x)
        h, skips = self._encode(x, cond, train)
        return self._decode(h, skips, cond)


class UNetEncoder(_UNetLayers):
    """The encoder half of :class:`UNet`: input dropout, the encoder levels and the bottleneck.

    Its parameters are the U-Net's ``enc*``, ``down*`` and ``bottleneck_conv`` entries, under the
    same names. Like the U-Net it sows ``intermediates/bottleneck``.
    """

    @nn.compact
    def __call__(
        self, x: jax.Array, cond: jax.Array | None = None, *, train: bool = False
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Encode images.

        Args:
            x: input images (B, H, W, C_in).
            cond: optional condition, as for :meth:`UNet.__call__`.
            train: enables input dropout.

        Returns:
            ``(bottleneck, skips)``: the bottleneck activation (B, h_b, w_b, w·2**(L−1)) and the
            ``num_levels`` skip activations, level 0 (full size) first.
        """
        self._check(x)
        return self._encode(x, cond, train)


class UNetDecoder(_UNetLayers):
    """The decoder half of :class:`UNet`: up-sampling levels with skips, and the output conv.

    Its parameters are the U-Net's ``up*``, ``dec*`` and ``out_conv`` entries, under the same names.
    """

    @nn.compact
    def __call__(
        self, h: jax.Array, skips: tuple[jax.Array, ...], cond: jax.Array | None = None
    ) -> jax.Array:
        """Decode an encoder's output.

        Args:
            h: the bottleneck activation from :class:`UNetEncoder`.
            skips: the encoder's skip activations, level 0 first.
            cond: with ``condition="film"``, the (B, K) condition, or a list of them: one decoder pass
                per condition, sharing what no condition changes (`apply_per_condition`); otherwise
                unused (it entered the encoder).

        Returns:
            (B, H, W, out_channels), as :meth:`UNet.__call__` returns; a list of them, one per
            condition, for a list of conditions.
        """
        self._check(h)
        return self._decode(h, tuple(skips), cond)


def split_unet(unet: UNet) -> tuple[UNetEncoder, UNetDecoder]:
    """Build the encoder and decoder halves of ``unet``, with all its attributes.

    ``decoder.apply(dp, *encoder.apply(ep, x))`` equals ``unet.apply(p, x)`` when ``p["params"]``
    is the union of ``ep["params"]`` and ``dp["params"]``.

    Args:
        unet: the full network.

    Returns:
        ``(encoder, decoder)``.
    """
    attrs = {f.name: getattr(unet, f.name) for f in dataclasses.fields(_UNetLayers) if f.init}
    attrs = {k: v for k, v in attrs.items() if k not in ("parent", "name")}
    return UNetEncoder(**attrs), UNetDecoder(**attrs)


def apply_per_condition(
    unet: UNet, params, x: jax.Array, conds: jax.Array, *, mode: str = "auto"
) -> jax.Array:
    """``unet`` on the same inputs under T conditions: (T, B, H, W, out) from x (B, H, W, C), conds (T, B, K).

    With ``condition="film"`` the encoder does not depend on the condition, so it runs once on ``x`` and
    only the decoder runs T times (for G's K modalities the encoder's share of the step falls from K
    passes to one). With ``"concat"`` the inputs are tiled T times, one full pass per condition. Both
    forms compute the same function, gradients included.

    ``mode`` (`synth.models.stacked.resolve_mode`) says how the T decoder passes run: ``"vmap"`` as one
    call on the encoding tiled T times (batch T·B), the GPU's form; ``"unrolled"`` as T paths of batch B
    through one decoder call, which ``"auto"`` picks on CPU. XLA:CPU runs convolutions on T·B = 12
    full-size maps well below its rate at batch 1-4 (BENCHMARKS.md, "Stage B beside TensorFlow": the
    paper-size stage-B step 18 % faster, generation 13-29 %). The paths share what no condition changes,
    computed once forward and backward: the first up-sampling conv and its norm (its input is the one
    bottleneck; FiLM enters after the norm) and each level's skip's share of the first decoder conv, a
    quarter of a decoder's work (BENCHMARKS.md, "Decoder paths sharing the skips").
    """
    mode = stacked.resolve_mode(mode)  # A bad mode fails here, whatever the condition.
    t, b = conds.shape[:2]

    # The T·B copies example-major, (B, T) merged: a batch split over devices stays split, where (T, B)
    # merged would be gathered onto every device (`synth.registration`'s docstring).
    def tile(a: jax.Array) -> jax.Array:
        return jnp.broadcast_to(a[:, None], (b, t) + a.shape[1:]).reshape((b * t,) + a.shape[1:])

    def untile(out: jax.Array) -> jax.Array:
        return jnp.swapaxes(out.reshape((b, t) + out.shape[1:]), 0, 1)

    flat_conds = jnp.swapaxes(conds, 0, 1).reshape((b * t,) + conds.shape[2:])
    if unet.condition != "film":
        return untile(unet.apply(params, tile(x), flat_conds))
    encoder, decoder = split_unet(unet)
    h, skips = encoder.apply(params, x)
    if mode == "unrolled":
        return jnp.stack(decoder.apply(params, h, skips, [conds[i] for i in range(t)]))
    return untile(decoder.apply(params, tile(h), tuple(tile(skip) for skip in skips), flat_conds))
