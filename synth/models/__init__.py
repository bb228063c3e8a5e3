"""Flax Linen networks of the method; sizes live in one table (sizes.py)."""

from synth.models.discriminator import CodeDiscriminator, PatchDiscriminator
from synth.models.sizes import (
    SIZES,
    code_discriminator_kwargs,
    discriminator_kwargs,
    mask_generator_kwargs,
    unet_kwargs,
    vae_kwargs,
    variant_sizes,
)
from synth.models.unet import UNet, bottleneck_hw
from synth.models.vae import VAEDecoder, VAEEncoder, code_shape, encoder_input, reparameterize

__all__ = [
    "SIZES",
    "CodeDiscriminator",
    "PatchDiscriminator",
    "UNet",
    "VAEDecoder",
    "VAEEncoder",
    "bottleneck_hw",
    "code_discriminator_kwargs",
    "code_shape",
    "discriminator_kwargs",
    "encoder_input",
    "mask_generator_kwargs",
    "reparameterize",
    "unet_kwargs",
    "vae_kwargs",
    "variant_sizes",
]
