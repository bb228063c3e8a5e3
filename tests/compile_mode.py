"""The tests' two compile modes: fast compiles by default (conftest), optimised ones for long runs."""

import contextlib

import jax


@contextlib.contextmanager
def optimised():
    """Compile as a run does (XLA's optimisations, LLVM level 2 from conftest) inside the block.

    For fixtures that train hundreds of steps, where run time, not compile time, dominates. The suite's
    default (`jax_disable_most_optimizations`) is restored afterwards, also on failure.
    """
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)
