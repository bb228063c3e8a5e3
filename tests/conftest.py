"""Shared test set-up: four simulated CPU devices, set before the JAX backend starts."""

import os

# Must happen before anything touches the backend: sharding tests need a 4-device mesh.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
# Tests care about semantics, not speed of the compiled code: compile faster.
jax.config.update("jax_disable_most_optimizations", True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def phantom_data_dir(tmp_path_factory):
    """The tiny phantom, built once per test session (a couple of seconds)."""
    import data_builders

    data_dir = tmp_path_factory.mktemp("tfds")
    data_builders.build("phantom", data_dir=str(data_dir), config="tiny")
    return str(data_dir)


@pytest.fixture
def tiny_config(phantom_data_dir):
    """The phantom's `runlocal` config, unlocked so a test can adjust it, reading the session's phantom."""
    from configs import phantom

    config = phantom.get_config("runlocal")
    config.data.data_dir = phantom_data_dir
    return config
