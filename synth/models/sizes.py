"""The one table of model sizes: a ``variant`` name maps to the widths of every network.

Configs name a variant (e.g. ``config.model.variant``) and build modules from the ``*_kwargs``
helpers, so sizes are never scattered across files (big_vision's ``decode_variant``). ``"base"``
is the paper's ngf = 64 (G_m: 32) and depth; ``"small"`` halves the widths and, for the VAE, uses 4
levels so 128² images keep the paper's 8×8 bottleneck; ``"tiny"`` is for tests and ``runlocal``
smoke runs (32² images). Networks: ``unet`` (G, G_t, segmentors, §4.1), ``discriminator`` (D, D_s,
§4.2), ``vae`` (E_s and G_s, §4.3–4.4), ``code_discriminator`` (D_z, §4.5), ``mask_generator``
(G_m, a U-Net, §4.6), ``detector`` (the SSD lesion detector, §6.6), ``ecai`` (the AAAI/ECAI drafts'
encoders and decoder, §6.7).
"""

from typing import Any

# variant -> network -> constructor kwargs. Plain ints only, so it reads like the paper's tables.
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "tiny": {
        "unet": {"features": 8, "num_levels": 3},
        "discriminator": {"features": 8},
        "vae": {"features": 8, "num_levels": 3, "code_channels": 1},
        "code_discriminator": {"features": 8},
        "mask_generator": {"features": 4, "num_levels": 3},
        "detector": {"features": 8},
        "ecai": {"features": 4},
        "flow_unet": {"features": 8, "num_levels": 3, "groups": 4},  # Flow velocity net (synth.flow).
    },
    "small": {
        "unet": {"features": 32, "num_levels": 3},  # ngf 32 = the paper's G_m width.
        "discriminator": {"features": 32},
        "vae": {"features": 32, "num_levels": 4, "code_channels": 1},
        "code_discriminator": {"features": 32},
        "mask_generator": {"features": 16, "num_levels": 3},
        "detector": {"features": 32},
        "ecai": {"features": 32},
        "flow_unet": {"features": 32, "num_levels": 3, "groups": 16},
    },
    "base": {
        "unet": {"features": 64, "num_levels": 3},  # The paper/code's ngf 64 (G, G_t, G_l).
        "discriminator": {"features": 64},  # D, D_s, D_t: ngf 64, 4 stride-2 convs (§4.2).
        # E_s/G_s: ngf 64, 512 -> 8 in 6 levels, code 64×64×1 = 4096 units at 512² (§4.3-4.4).
        "vae": {"features": 64, "num_levels": 6, "code_channels": 1},
        "code_discriminator": {"features": 64},  # D_z: widths 128, 256 (§4.5).
        "mask_generator": {"features": 32, "num_levels": 3},  # G_m: the U-Net at ngf 32 (§4.6).
        "detector": {"features": 64},  # SSD lesion detector G_l: ngf 64 (§6.6).
        "ecai": {"features": 64},  # The old design's EC_R, EC_M, DC_M: ngf 64, codes 8·64 = 512 ch (§6.7).
        # G's convs at G's widths (ngf 64), plus FiLM and residual 1×1s: 1.05× G's FLOPs per call.
        "flow_unet": {"features": 64, "num_levels": 3, "groups": 32},
    },
}

# Stride-2 steps of the fixed-depth networks (the others read ``num_levels`` from the table).
DISCRIMINATOR_LEVELS = 4  # §4.2: the output map is H/16.
CODE_DISCRIMINATOR_LEVELS = 4  # Code map at H/8, then one stride-2 conv (§4.5): H/16 in image terms.


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
    _check_depth(variant, image_hw, kwargs["num_levels"])
    return kwargs


def _check_depth(variant: str, image_hw: tuple[int, int], levels: int) -> None:
    """Raise if a network with ``levels`` stride-2 steps would shrink ``image_hw`` to 1×1 early."""
    if min(image_hw) < 2**levels:
        raise ValueError(
            f"Image size {tuple(image_hw)} is too small for {levels} down-sampling levels "
            f"(variant {variant!r}); need H, W >= {2**levels}."
        )


def discriminator_kwargs(variant: str, image_hw: tuple[int, int]) -> dict[str, Any]:
    """Return the size kwargs of :class:`~synth.models.discriminator.PatchDiscriminator` (``features``).

    Args:
        variant: a key of :data:`SIZES`.
        image_hw: the (H, W) it will score; checked against its 4 stride-2 convs (H, W >= 16).

    Returns:
        Kwargs to splat into ``PatchDiscriminator(...)``; heads, channels, dropout etc. come from the
        config.

    Raises:
        ValueError: unknown variant, or an image too small.
    """
    kwargs = variant_sizes(variant, "discriminator")
    _check_depth(variant, image_hw, DISCRIMINATOR_LEVELS)
    return kwargs


def vae_kwargs(variant: str, image_hw: tuple[int, int]) -> dict[str, Any]:
    """Return the size kwargs shared by ``VAEEncoder`` and ``VAEDecoder`` (:mod:`synth.models.vae`).

    The keys are ``features``, ``num_levels`` and ``code_channels``; the decoder also needs
    ``image_hw=image_hw``.

    G_s's dense layers have (h0·w0·ngf)² weights, h0×w0 = the image after ``num_levels`` halvings, so
    pick a variant whose depth suits the image: tiny up to 64², small up to 128², base for 184×144 and
    512² (8×8 at 512², as in the paper). Tiny at 512² would give G_s 1.2 G parameters.

    Args:
        variant: a key of :data:`SIZES`.
        image_hw: the (H, W) of the structure maps; checked so that every level halves a real extent.

    Returns:
        Kwargs to splat into both constructors.

    Raises:
        ValueError: unknown variant, or an image too small for the variant's depth.
    """
    kwargs = variant_sizes(variant, "vae")
    _check_depth(variant, image_hw, kwargs["num_levels"])
    return kwargs


def code_discriminator_kwargs(variant: str, image_hw: tuple[int, int]) -> dict[str, Any]:
    """Return the size kwargs of :class:`~synth.models.discriminator.CodeDiscriminator` (``features``).

    Args:
        variant: a key of :data:`SIZES`.
        image_hw: the (H, W) of the *images* whose codes it judges (codes are H/8 × W/8); checked so
            that its stride-2 conv halves a code of at least 2×2 (H, W >= 16).

    Returns:
        Kwargs to splat into ``CodeDiscriminator(...)``.

    Raises:
        ValueError: unknown variant, or an image too small.
    """
    kwargs = variant_sizes(variant, "code_discriminator")
    _check_depth(variant, image_hw, CODE_DISCRIMINATOR_LEVELS)
    return kwargs


def mask_generator_kwargs(variant: str, image_hw: tuple[int, int]) -> dict[str, Any]:
    """Return the size kwargs of the mask generator G_m, a :class:`~synth.models.unet.UNet` (§4.6).

    Build it as ``UNet(**mask_generator_kwargs(v, hw), out_channels=2 * slices, dropout_rate=0.1)``
    (the code's input keep_prob 0.9); the other options come from the config.

    Args:
        variant: a key of :data:`SIZES`.
        image_hw: the (H, W) of the maps; checked against the U-Net's depth.

    Returns:
        ``features`` and ``num_levels`` for ``UNet(...)``.

    Raises:
        ValueError: unknown variant, or an image too small for the variant's depth.
    """
    kwargs = variant_sizes(variant, "mask_generator")
    _check_depth(variant, image_hw, kwargs["num_levels"])
    return kwargs


def detector_kwargs(variant: str, image_hw: tuple[int, int], num_maps: int = 6) -> dict[str, Any]:
    """Return the size kwargs of the SSD lesion detector :class:`~synth.models.detector.SSD` (``features``).

    Args:
        variant: a key of :data:`SIZES`.
        image_hw: the (H, W) it will run on. Head k reads an H/2**(k+2) map, so the check asks for
            H, W >= 2**(num_maps + 2): every head then sees a distinct, real map (256² for 6 maps,
            32² for 3).
        num_maps: heads the detector will use (``SSD(num_maps=...)``), 1..6.

    Returns:
        Kwargs to splat into ``SSD(...)``; classes, maps, box ratios, activation and dropout come from
        the config.

    Raises:
        ValueError: unknown variant, or an image too small for ``num_maps``.
    """
    kwargs = variant_sizes(variant, "detector")
    _check_depth(variant, image_hw, num_maps + 2)
    return kwargs


ECAI_LEVELS = 2  # The old design's encoders halve twice: codes at H/4 (§6.7).


def ecai_kwargs(variant: str, image_hw: tuple[int, int]) -> dict[str, Any]:
    """Return the size kwargs of :class:`~synth.models.ecai.EcaiGenerator` (``features``).

    Args:
        variant: a key of :data:`SIZES`.
        image_hw: the (H, W) it will run on; checked against the encoders' two stride-2 convs.

    Returns:
        Kwargs to splat into ``EcaiGenerator(...)``.

    Raises:
        ValueError: unknown variant, or an image too small.
    """
    kwargs = variant_sizes(variant, "ecai")
    _check_depth(variant, image_hw, ECAI_LEVELS)
    return kwargs


def flow_unet_kwargs(variant: str, image_hw: tuple[int, int]) -> dict[str, Any]:
    """Return the size kwargs of :class:`~synth.models.flow_unet.FlowUNet` (features, levels, groups).

    Build it as ``FlowUNet(out_channels=K * C, **flow_unet_kwargs(v, hw))``; the flow family's velocity
    network for stages A and B (``synth.flow``).

    Args:
        variant: a key of :data:`SIZES`.
        image_hw: the (H, W) it will run on; checked against its depth.

    Returns:
        Kwargs to splat into ``FlowUNet(...)``.

    Raises:
        ValueError: unknown variant, or an image too small for the variant's depth.
    """
    kwargs = variant_sizes(variant, "flow_unet")
    _check_depth(variant, image_hw, kwargs["num_levels"])
    return kwargs
