"""Comparing parameters of runs that should be equal up to float summation order."""

import jax
import numpy as np


def assert_same_training(trained_a, trained_b, init, *, fraction=0.05):
    """Asserts two trained parameter trees differ by under `fraction` of how far training moved them.

    Different meshes or process counts sum gradients in different orders, so results differ by round-off,
    which GAN updates amplify. A real difference (a wrong row, a missing gradient average) is of the size
    of the training updates themselves; this criterion separates the two regardless of the scale.
    """
    a, b, i = (jax.tree.leaves(jax.tree.map(np.asarray, t)) for t in (trained_a, trained_b, init))
    assert len(a) == len(b) == len(i) > 0
    moved = max(float(np.abs(x - y).max()) for x, y in zip(a, i))
    differ = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    assert moved > 1e-3, f"training barely moved the parameters ({moved:.3g}): the comparison says nothing"
    assert differ < fraction * moved, f"runs differ by {differ:.3g}, training moved them by {moved:.3g}"
