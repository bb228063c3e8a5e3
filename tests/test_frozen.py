"""Frozen networks from a workdir (synth.frozen): parameters only, no data opened, needs declared once."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synth import checkpoint as checkpoint_lib
from synth import frozen, input_pipeline, optim
from synth import workdir as workdir_lib
from synth.lesion import segment

IMAGE_SHAPE = (32, 32, 4)


def _trained_segmentor(config, workdir, *, record: bool):
    """A segmentor stage's checkpoint at step 3 (random parameters), as the loop leaves it."""
    model = segment.make_model(config, IMAGE_SHAPE[:2])
    tx = optim.make_optimizer(config.segmentor.optim)
    images = jnp.zeros((1, *IMAGE_SHAPE))
    # Jitted: one compile, where op-by-op initialisation of the K U-Nets dispatched hundreds (~20 s).
    init = jax.jit(functools.partial(segment.init_state, model=model, variant="n_seg", tx=tx))
    state = init(jax.random.key(3), {"image": images})
    state = state.replace(step=jnp.asarray(3, jnp.int32))
    out_dir = workdir_lib.stage_dir(workdir, "segmentor")
    with checkpoint_lib.Checkpointer(frozen.checkpoint_dir(workdir, "segmentor")) as ckpt:
        ckpt.save(3, state, {"num_workers": 0, "iterator": {}})
    if record:
        workdir_lib.record_model(out_dir, IMAGE_SHAPE)
    return state


def test_load_restores_the_parameters_without_opening_the_data(tiny_config, tmp_path, monkeypatch):
    state = _trained_segmentor(tiny_config, tmp_path, record=True)

    def no_data(*args, **kwargs):
        raise AssertionError("frozen loading opened the dataset")

    monkeypatch.setattr(input_pipeline, "open_source", no_data)
    params, step = frozen.load(tiny_config, tmp_path, "segmentor")
    assert step == 3 and set(params) == {"params"}  # The optimiser state is never read.
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_workdir_without_its_model_record_falls_back_to_the_dataset(tiny_config, tmp_path, caplog):
    state = _trained_segmentor(tiny_config, tmp_path, record=False)
    with caplog.at_level(logging.INFO, logger="synth"):
        params, step = frozen.load(tiny_config, tmp_path, "segmentor")
    assert step == 3 and "reading the image size from the dataset" in caplog.text
    assert jax.tree.structure(params["params"]) == jax.tree.structure(state.params)
    with pytest.raises(FileNotFoundError, match="run stage=translator"):
        frozen.load(tiny_config, tmp_path, "translator")


def test_what_each_consumer_needs_is_declared_once(tiny_config):
    config = tiny_config
    assert frozen.needs(config, "synthesis") == ("segmentor", "translator")
    assert frozen.needs(config, "generate") == ("structure", "segmentor", "translator", "synthesis")
    assert frozen.needs(config, "compare") == ("segmentor", "translator")
    config.synthesis.structure_source = "stage_a"
    config.synthesis.lesion_processor = "none"
    config.synthesis.loss.weights.registration = config.synthesis.loss.weights.agreement = 0.0
    assert frozen.needs(config, "synthesis") == ("structure",)
    assert frozen.needs(config, "compare") == ("structure", "segmentor")
    with pytest.raises(ValueError, match="consumer"):
        frozen.needs(config, "verify")
