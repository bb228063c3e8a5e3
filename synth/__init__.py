"""synth: synthesis of registered multimodal medical images with lesions, in JAX/Flax."""

__version__ = "0.1.0"
