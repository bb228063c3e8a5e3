"""Network states drawn on the host: a jitted init's shapes and dtypes, its values from numpy.

A network's `init` draws every parameter with its own threefry call, and compiling that for a test's
single use costs seconds to tens of seconds on 2 cores (stage B's wiring fixture: ~24 s), more than the
test itself. Tests that need networks at *some* random point, not at their initialisers' distributions,
draw them here instead; nothing is compiled.
"""

import jax
import numpy as np


def _name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return ""


def random_like(init, *args, seed: int = 0):
    """`init(*args)`'s tree, drawn: kernels N(0, 1/fan-in), norm scales 1, other parameters N(0, 0.05²).

    Optimiser states (any path through a field whose name ends in `opt` or `opt_state`) and integers
    (step counters) are 0, which is Adam's and SGD's own initial state; PRNG keys are split from `seed`.
    The leaves are `jax.Array`s on the default device.
    """
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(init, *args)

    def draw(path, leaf):
        names = [_name(entry) for entry in path]
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(seed), leaf.shape)
        if not np.issubdtype(leaf.dtype, np.floating) or any(n.endswith(("opt", "opt_state")) for n in names):
            return np.zeros(leaf.shape, leaf.dtype)
        if names and names[-1] == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if names and names[-1] == "kernel" and len(leaf.shape) >= 2:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
        return (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.device_put(jax.tree_util.tree_map_with_path(draw, abstract))  # Arrays, as `init`'s.
