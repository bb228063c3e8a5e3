"""One shared U-Net encoder with N member-specific decoders: the "1 E_l + N D_l" segmentor (METHOD §6.3).

The network is the U-Net of `synth.models.unet` cut at the bottleneck (`unet.split_unet`): every member
(modality) goes through the same encoder, skips included, and then through its own copy of the U-Net's
decoder. The parameters are one pytree

    {"encoder": <UNetEncoder variables>, "decoders": <UNetDecoder variables, leading member axis N>}

so the decoders are applied like any stacked per-member network, with `synth.models.stacked.map_stacked`
(`vmap` on GPU, unrolled on CPU). The encoder runs once over all N·B images: instance norm normalises each
image on its own, so this equals N separate calls and is one larger convolution instead of N small ones.
(The authors' version of this variant, `mm_to_label_1ecl_4dcl`, used the older encoder/decoder without
skips; the design here keeps the skips so the three segmentor variants differ only in what they share.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from synth.models import stacked
from synth.models.unet import UNet, split_unet

ENCODER = "encoder"
DECODERS = "decoders"


def init(rng: jax.Array, x: jax.Array, *, unet: UNet, num_members: int) -> dict[str, Any]:
    """Initialise the shared encoder and `num_members` decoders.

    Args:
      rng: init key.
      x: an example input of one member, (B, H, W, C_in); only its shape matters.
      unet: the U-Net whose halves are used (its attributes set widths, init, activations).
      num_members: N, the number of decoders.

    Returns:
      `{"encoder": variables, "decoders": variables stacked on a leading axis of size N}`.
    """
    encoder, decoder = split_unet(unet)
    enc_rng, dec_rng = jax.random.split(rng)
    enc_vars = encoder.init(enc_rng, x)
    features = encoder.apply(enc_vars, x)
    # Each decoder gets its own key: the members start from different weights, as N separate U-Nets would.
    dec_vars = jax.vmap(lambda k: decoder.init(k, *features))(jax.random.split(dec_rng, num_members))
    return {ENCODER: enc_vars, DECODERS: dec_vars}


def apply(
    params: dict[str, Any],
    x: jax.Array,
    *,
    unet: UNet,
    mode: str = "auto",
    rng: jax.Array | None = None,
    train: bool = False,
) -> jax.Array:
    """Run every member's input through the shared encoder and its own decoder.

    Args:
      params: from :func:`init`.
      x: inputs (N, B, H, W, C_in), member n's images at index n.
      unet: the U-Net given to :func:`init`.
      mode: how to apply the stacked decoders (`synth.models.stacked.MODES`).
      rng: dropout key, needed when `train` and the U-Net has input dropout.
      train: enables input dropout.

    Returns:
      (N, B, H, W, out_channels): member n's output comes from decoder n.
    """
    encoder, decoder = split_unet(unet)
    n, b = x.shape[:2]
    rngs = {"dropout": rng} if train and rng is not None else None
    # Example-major, (B, N) merged: a batch split over devices stays split (`synth.registration`).
    flat = jnp.swapaxes(x, 0, 1).reshape((b * n,) + x.shape[2:])
    h, skips = encoder.apply(params[ENCODER], flat, train=train, rngs=rngs)
    features = jax.tree.map(lambda a: jnp.swapaxes(a.reshape((b, n) + a.shape[1:]), 0, 1), (h, skips))
    return stacked.map_stacked(lambda p, f: decoder.apply(p, *f), params[DECODERS], features, mode=mode)
