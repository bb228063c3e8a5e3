"""Per-member and per-group application: stacked networks agree `vmap` and `unrolled`, groups batched.

Stacked per-modality networks give the same results under `vmap` and `unrolled`, shared parameters work;
a batch in groups (`synth.models.grouped`) gives the batched call's results.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synth.models import grouped, stacked, winograd
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


@pytest.mark.parametrize("out_axis", [0, 1, 2])
def test_grouped_apply_keeps_every_example_in_place(out_axis):
    """Any group size and shard count: the outputs of `fn` on the whole batch, on whichever axis."""
    x = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)

    def fn(batch):  # (B, 3) -> the batch on `out_axis` of a (2, B, 3)-shaped result moved there.
        out = jnp.stack([batch * 2, batch + 1])  # (2, B, 3)
        return jnp.moveaxis(out, 1, out_axis)

    for shards, group in ((1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1), (1, 8)):
        np.testing.assert_array_equal(grouped.apply(fn, x, group, shards=shards, out_axis=out_axis), fn(x))


def test_group_size_rules():
    """One 184×144×64 float32 map per call on CPU; small maps in one call; batched on request; bad input."""
    assert grouped.group_size(8, (184, 144), 64) == 1  # 6.8 MB: within one chunk, two would not be.
    assert grouped.group_size(8, (64, 64), 64) == 8  # 1 MB each.
    assert grouped.group_size(6, (1, 1), winograd.CHUNK_BYTES // 16) == 3  # At most 4, dividing 6.
    assert grouped.group_size(8, (184, 144), 64, shards=4) == 1
    assert grouped.group_size(8, (184, 144), 64, shards=4, mode="batched") == 2
    with pytest.raises(ValueError, match="4 shards"):
        grouped.group_size(6, (1, 1), 1, shards=4)
    with pytest.raises(ValueError, match="grouping mode"):
        grouped.group_size(8, (1, 1), 1, mode="scan")


def test_lesion_predictions_in_groups_equal_the_batched_ones(tiny_stack, monkeypatch):
    """Stage C's lesion filter (`generate.predict_lesions`) with one or two examples per call."""
    from synth import generate

    model, params, _ = tiny_stack
    images = jax.random.uniform(jax.random.key(2), (4, 16, 16, 3))  # B = 4, K = 3 modalities.

    def predict(p, x):  # (K, B, H, W) labels, one network per modality.
        logits = stacked.map_stacked(model.apply, p, jnp.moveaxis(x, -1, 0)[..., None])
        return jnp.argmax(logits, axis=-1)

    expected = predict(params, images)
    one_map = 16 * 16 * 4 * 4  # An example's first-level map: 16² × 4 features × 4 bytes.
    for chunk_bytes in (one_map, 2 * one_map):
        monkeypatch.setattr(winograd, "CHUNK_BYTES", chunk_bytes)
        out = jax.jit(lambda p, x: generate.predict_lesions(p, x, predict=predict, features=4))(
            params, images
        )
        np.testing.assert_array_equal(out, expected)
