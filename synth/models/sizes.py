"""The one table of model sizes: a ``variant`` name maps to the widths of every network.

Configs name a variant (e.g. ``config.model.variant``) and build modules from the ``*_kwargs``
helpers, so sizes are never scattered across files (big_vision's ``decode_variant``). ``"base"``
is the paper's ngf = 64; ``"tiny"`` is for tests and ``runlocal`` smoke runs. Later stages add a
key per network (discriminator, VAE, ...) to every variant.
"""

from typing import Any

# variant -> network -> constructor kwargs. Plain ints only, so it reads like the paper's tables.
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "tiny": {"unet": {"features": 8, "num_levels": 3}},
    "small": {"unet": {"features": 32, "num_levels": 3}},  # ngf 32 = the paper's G_m width.
    "base": {"unet": {"features": 64, "num_levels": 3}},  # The paper/code's ngf 64 (G, G_t, G_l).
}


def variant_sizes(variant: str, network: str) -> dict[str, int]:
    """Return a copy of the table entry for ``network`` in ``variant``.

    Args:
        variant: a key of :data:`SIZES`, e.g. ``"tiny"``, ``"small"``, ``"base"``.
        network: a network key inside the variant, e.g. ``"unet"``.

    Returns:
        A fresh dict (callers may update it without touching the table).

    Raises:
        ValueError: unknown variant or network, naming the valid ones.
    """
    if variant not in SIZES:
        raise ValueError(f"Unknown model size variant {variant!r}; valid variants: {sorted(SIZES)}.")
    entry = SIZES[variant]
    if network not in entry:
        raise ValueError(f"Variant {variant!r} has no sizes for network {network!r}; valid: {sorted(entry)}.")
    return dict(entry[network])


def unet_kwargs(variant: str, image_hw: tuple[int, int]) -> dict[str, Any]:
    """Return the size kwargs of :class:`synth.models.unet.UNet` (``features``, ``num_levels``).

    Args:
        variant: a key of :data:`SIZES`.
        image_hw: the (H, W) the U-Net will run on. Checked so that every down-sampling step
            halves a real spatial extent (H, W >= 2**num_levels) instead of silently degenerating
            to 1×1 maps.

    Returns:
        Kwargs to splat into ``UNet(...)``; the non-size options (activation, init, ...) come
        from the config.

    Raises:
        ValueError: unknown variant, or an image too small for the variant's depth.
    """
    kwargs = variant_sizes(variant, "unet")
    levels = kwargs["num_levels"]
    if min(image_hw) < 2**levels:
        raise ValueError(
            f"Image size {tuple(image_hw)} is too small for {levels} down-sampling levels "
            f"(variant {variant!r}); need H, W >= {2**levels}."
        )
    return kwargs
