"""Shared test set-up: four simulated CPU devices, set before the JAX backend starts."""

import os

# Must happen before anything touches the backend: sharding tests need a 4-device mesh.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
# Tests care about semantics, not speed of the compiled code: compile faster.
jax.config.update("jax_disable_most_optimizations", True)
