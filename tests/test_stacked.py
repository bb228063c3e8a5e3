"""Stacked per-modality networks: `vmap` and `unrolled` application agree, shared parameters work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synth.models import stacked
from synth.models.unet import UNet


@pytest.fixture(scope="module")
def tiny_stack():
    model = UNet(features=4, out_channels=3, num_levels=2, out_activation="none")
    x = jax.random.uniform(jax.random.key(1), (3, 2, 16, 16, 1))
    keys = jax.random.split(jax.random.key(0), 3)
    params = jax.vmap(lambda k, xi: model.init(k, xi))(keys, x)
    return model, params, x


@pytest.mark.parametrize("shared", [False, True])
def test_vmap_and_unrolled_agree(tiny_stack, shared):
    model, params, x = tiny_stack
    if shared:
        params = jax.tree.map(lambda a: a[0], params)
    outs = {
        mode: stacked.map_stacked(model.apply, params, x, shared_params=shared, mode=mode)
        for mode in ("vmap", "unrolled")
    }
    assert outs["vmap"].shape == (3, 2, 16, 16, 3)
    np.testing.assert_allclose(outs["vmap"], outs["unrolled"], rtol=1e-5, atol=1e-5)
    # Member 1 is computed with parameter set 1 (or the shared set), not with set 0.
    with_set0 = model.apply(params if shared else jax.tree.map(lambda a: a[0], params), x[1])
    if shared:
        np.testing.assert_allclose(outs["unrolled"][1], with_set0, rtol=1e-5, atol=1e-5)
    else:
        assert not jnp.allclose(outs["unrolled"][1], with_set0)


def test_mode_resolution():
    assert stacked.resolve_mode("auto") == ("unrolled" if jax.default_backend() == "cpu" else "vmap")
    with pytest.raises(ValueError, match="Unknown stacking mode 'pmap'"):
        stacked.resolve_mode("pmap")
