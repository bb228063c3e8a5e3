"""Shared test set-up: four simulated CPU devices (set before the JAX backend starts); longest files first."""

import os

# Must happen before anything touches the backend: sharding tests need a 4-device mesh.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "")
# Under `pytest -n N` the N workers share the cores: one XLA thread each, not a pool per worker sized to all
# of them (the oversubscribed threads mostly wait on one another). Measured with two workers on 2 cores:
# test_structure_stage.py and test_loop.py side by side take 203 s instead of 237 (2026-12-05).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 and "eigen" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

# What `launch.py` sets on a CPU install (LLVM level 2): the fixtures that compile with optimisations on
# (stages A and B trained for the quality checks, stage=compare; tests/compile_mode.py) then compile as a
# run does, a third faster than at level 3. The other tests compile at level 0
# (`jax_disable_most_optimizations` below overrides the flag).
from synth import xla_defaults  # noqa: E402

xla_defaults.apply()

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
def xla_convolutions(monkeypatch):
    """XLA's own convolution (`SYNTH_CONV=xla`), for tests that trace networks for their shapes only.

    At the paper's sizes `auto` traces Winograd's form, dozens of ops per convolution (stage A's networks
    at 512²: ~7 s of tracing); every algorithm gives the same shapes and agrees with XLA's
    (tests/test_conv.py), and the stage-B generator's shape test traces `auto` at the paper's sizes.
    """
    from synth.models import conv

    monkeypatch.setenv(conv.ENV_VAR, "xla")


@pytest.fixture
def tiny_config(phantom_data_dir):
    """The phantom's `runlocal` config, unlocked so a test can adjust it, reading the session's phantom."""
    from configs import phantom

    config = phantom.get_config("runlocal")
    config.data.data_dir = phantom_data_dir
    return config


# The files that take longest (minutes of training or compiling each), longest first. `make test` hands out
# whole files to its two workers in collection order (`--dist loadfile --no-loadscope-reorder`): starting
# these first keeps one long file from running alone at the end of the run. `make test-slow` hands out its
# tests in this order too: stage=compare (~10 minutes) and the quickstart's group first. The first four
# hold slow tests only (or mostly); the rest are the fast suite's longest files (2026-12-07).
LONGEST_FIRST = (
    "test_compare.py",
    "test_pipeline.py",
    "test_stage_b_trained.py",
    "test_structure_stage.py",
    "test_models.py",
    "test_stage_b_wiring.py",
    "test_loop.py",
    "test_segmentor_variants.py",
    "test_conv.py",
    "test_detector_stage.py",
    "test_flow.py",
    "test_families.py",
    "test_stacked.py",
)


def _release(version: str) -> tuple[int, int]:
    return tuple(int(part) for part in version.split(".")[:2])


def pytest_configure(config):
    """Refuses `--dist loadgroup` with a pytest that pytest-xdist 3.8 cannot group (see below).

    Checked here, by version, for a readable message: the workers' check below fails the run too, but
    xdist reports a worker's collection error as an internal error without its text.
    """
    if getattr(config.option, "dist", "no") != "loadgroup":
        return
    import xdist

    if _release(pytest.__version__) >= (9, 2) and _release(xdist.__version__) <= (3, 8):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} keeps node ids where pytest-xdist {xdist.__version__}'s loadgroup "
            "does not write the group, so xdist_group marks would be ignored: install "
            "requirements/constraints.txt's versions (`make setup`)"
        )


@pytest.hookimpl(trylast=True)  # After pytest-xdist's, which appends each test's group to its id.
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: the rest keep their order.
    # Under `--dist loadgroup` a grouped test's id ends in "@<group>", which is what keeps the group on one
    # worker. Where the pytest and pytest-xdist pair drops it (pytest 9.2 with xdist 3.8), every worker
    # would train a grouped module's fixture again: stop rather than run the slow suite at twice its cost.
    if getattr(config.option, "loadgroup", False):  # Set on xdist workers only.
        lost = [
            item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid
        ]
        if lost:
            raise pytest.UsageError(
                f"xdist_group marks ignored by this pytest ({pytest.__version__}) and pytest-xdist pair, "
                f"e.g. {lost[0]}: install the versions in requirements/constraints.txt (`make setup`)"
            )
