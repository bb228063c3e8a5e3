"""Flax Linen networks of the method; sizes live in one table (sizes.py)."""

from synth.models.sizes import SIZES, unet_kwargs, variant_sizes
from synth.models.unet import UNet, bottleneck_hw

__all__ = ["SIZES", "UNet", "bottleneck_hw", "unet_kwargs", "variant_sizes"]
