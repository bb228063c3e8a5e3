"""The baselines and ablations of §9.1-9.2 (configs/variants.py) through the one stage-B trainer.

Each variant is a config of the same trainer: the cheap tests check what each one switches and that
BaseGAN's modalities are independent models. A training step's compile costs 20-40 s here, so the steps of
every variant (K images of the right shape, G updated, the variant's own loss terms) run under the slow
marker (`make test-slow`), as does the comparison run of tests/test_compare.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import phantom, variants
from synth import conditioning, input_pipeline, optim, registration, synthesis_nets, translator_nets
from synth.lesion import segment
from synth.stages import synthesis, translator

K = 4
HW = (32, 32)


def _config(name, data_dir):
    config = phantom.get_config(f"runlocal,variant={name}")
    config.data.data_dir = data_dir
    return config


def test_each_variant_switches_what_section_9_says():
    c = {name: phantom.get_config(f"runlocal,variant={name}").synthesis for name in variants.VARIANTS}
    full = c["full"]
    assert full.g_input == "structure" and not full.separate_models and full.lesion_processor == "segmentor"
    for name in ("basegan", "A"):  # K unconditional models on noise, no structure, label, G_t or lesion.
        s = c[name]
        assert s.g_input == "noise" and s.separate_models and s.lesion_processor == "none"
        assert dict(s.loss.weights) == dict.fromkeys(s.loss.weights, 0.0) | variants.BASEGAN_WEIGHTS
    s = c["skrgan"]
    assert s.g_input == "inverse_structure" and s.separate_models and s.pretrain_steps == 0
    assert s.noise == (0.0, 0.0) and s.loss.weights.reconstruction == 5.0 and s.loss.weights.registration == 0
    assert c["B"].noise == (0.0, 0.0) and c["C"].noise == full.noise  # B: no noise fusion; C: with it.
    for name in ("B", "C"):
        assert c[name].loss.weights.registration == c[name].loss.weights.agreement == 0.0
    assert (c["D"].loss.weights.registration, c["D"].loss.weights.agreement) == (20.0, 5.0)
    for name in ("B", "C", "D"):
        assert c[name].lesion_processor == "none" and c[name].label_fusion == "none"
    assert c["E"].lesion_processor == "segmentor" and c["E"].label_rule == "none"  # No placement check.
    assert c["F"] == full and c["A"] == c["basegan"]
    s = c["ecai"]  # §6.7: its own encoders/decoder translate (no frozen G_t); 0.8·s + 0.2·one_hot(l).
    assert s.design == "ecai" and full.design == "unet" and s.label_fusion == "weighted_sum"
    assert s.noise == (0.0, 0.0) and s.pretrain_steps == 0 and s.lesion_processor == "segmentor"
    assert (s.loss.weights.g_adversarial, s.loss.weights.d_real, s.ecai.weights.cycle) == (35.0, 50.0, 10.0)
    ecai_config = phantom.get_config("runlocal,variant=ecai")
    assert not synthesis_nets.uses_translator(ecai_config)
    synthesis.check_config(ecai_config)
    del ecai_config.synthesis.ecai.weights["cycle"]
    with pytest.raises(
        ValueError, match=r"config.synthesis.ecai.weights: unknown terms \[\], missing terms \['cycle'\]"
    ):
        synthesis.check_config(ecai_config)
    ecai_config = phantom.get_config("runlocal,variant=ecai")
    ecai_config.synthesis.separate_models = True
    with pytest.raises(ValueError, match="design='ecai' is the multimodal design"):
        synthesis.check_config(ecai_config)
    assert phantom.get_config("runlocal,variant=B").variant == "B"
    with pytest.raises(ValueError, match="Unknown variant='G'"):
        phantom.get_config("variant=G")
    from configs import brats2015

    assert brats2015.get_config("runlocal,variant=skrgan").synthesis.g_input == "inverse_structure"


@pytest.fixture(scope="module")
def phantom_batch(phantom_data_dir):
    """Four tiny-phantom training slices."""
    source = input_pipeline.open_source(_config("full", phantom_data_dir).data, "train")
    examples = [input_pipeline.image_and_label(source[i]) for i in range(4)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


@pytest.fixture(scope="module")
def frozen_networks(phantom_data_dir, phantom_batch):
    """A phantom batch and random frozen networks (G_t, segmentors): wiring and shapes only."""
    config = _config("full", phantom_data_dir)
    batch = phantom_batch

    @jax.jit
    def init(keys, batch):
        tr = translator.init_state(
            keys[0],
            batch,
            models=translator_nets.make_models(config, HW),
            g_tx=optim.make_optimizer(config.translator.optim.g),
            d_tx=optim.make_optimizer(config.translator.optim.d),
        )
        seg = segment.init_params(
            keys[1], batch["image"], model=segment.make_model(config, HW), variant="n_seg"
        )
        return {"translator": tr.g_params, "lesion": seg}

    return batch, init(jax.random.split(jax.random.key(0), 2), batch)


def _step(name, data_dir, batch, frozen):
    """One training step of variant `name` (from a fresh init), and its generated images."""
    config = _config(name, data_dir)
    config.synthesis.pretrain_steps = 0  # The adversarial step: every term the variant uses.
    models = synthesis_nets.make_models(config, HW)
    tx = optim.make_optimizer(config.synthesis.optim.g)
    needed = {}  # Only the frozen networks the variant uses, as a run loads them.
    if models.translator is not None:
        needed["translator"] = frozen["translator"]
    if models.lesion is not None:
        needed["lesion"] = frozen["lesion"]

    @jax.jit
    def run(batch, frozen):
        state = synthesis.init_state(jax.random.key(1), batch, models=models, config=config, g_tx=tx, d_tx=tx)
        new, metrics = synthesis.train_step(
            state, batch, jax.random.key(2), frozen, models=models, config=config, g_tx=tx, d_tx=tx
        )
        inputs = conditioning.make_inputs(
            batch, jax.random.key(3), frozen, models=models, config=config, pretraining=jnp.asarray(False)
        )
        return state, new, metrics, synthesis_nets.synthesize(models, new.g_params, inputs.g_input, K)

    return models, *run(batch, needed)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["basegan", "skrgan", "B", "C", "D", "E", "ecai"])
def test_each_variant_takes_a_training_step(name, phantom_data_dir, frozen_networks):
    batch, frozen = frozen_networks
    models, state, new, metrics, images = _step(name, phantom_data_dir, batch, frozen)
    assert images.shape == (K, 4, *HW, 1) and bool(jnp.all(jnp.isfinite(images)))
    assert np.isfinite(float(metrics["g_loss"])) and np.isfinite(float(metrics["d_loss"]))
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.g_params, new.g_params)
    assert max(jax.tree.leaves(moved)) > 0.0  # G was updated.
    leading = {leaf.shape[0] for leaf in jax.tree.leaves(state.g_params)}
    if models.separate:  # K stacked, independent G/D pairs; single-head Ds (no category term).
        assert leading == {K} and float(metrics["g_category"]) == 0.0
        assert {leaf.shape[0] for leaf in jax.tree.leaves(state.d_params)} == {K}
    else:
        assert leading != {K}
    if name == "D":
        assert float(metrics["registration"]) > 0 and float(metrics["lesion"]) == 0.0
    if name == "skrgan":
        assert float(metrics["reconstruction"]) > 0 and float(metrics["pretrain"]) == 0.0
    if name == "ecai":  # Its own translations register; real-data and code terms train G and D.
        assert models.translator is None and set(state.g_params["params"]) == {
            "fusion_encoder",
            "image_encoder",
            "decoder",
        }
        for term in ("registration", "agreement", "real_reconstruction", "cycle", "semantic_translation"):
            assert float(metrics[term]) > 0, term
        for term in ("translation_adversarial", "code_adversarial", "d_translation", "d_code_real"):
            assert np.isfinite(float(metrics[term])), term
        moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.d_params, new.d_params)
        assert max(jax.tree.leaves(moved["params"]["code"])) > 0.0  # FD_R was trained too.


def test_basegan_modalities_are_independent_models(phantom_data_dir, phantom_batch):
    """Changing modality 1's generator changes modality 1's images only: the models are not registered."""
    batch = phantom_batch
    config = _config("basegan", phantom_data_dir)
    models = synthesis_nets.make_models(config, HW)
    tx = optim.make_optimizer(config.synthesis.optim.g)
    init = functools.partial(synthesis.init_state, models=models, config=config, g_tx=tx, d_tx=tx)
    state = jax.jit(init)(jax.random.key(0), batch)
    assert {leaf.shape[0] for leaf in jax.tree.leaves(state.g_params)} == {K}  # K stacked models.
    s = jnp.zeros((4, *HW, 1))
    noise = conditioning.generator_input(
        jax.random.key(5), s, s, jnp.zeros((4, *HW), jnp.int32), config=config
    )
    assert noise.shape == (K, 4, *HW, 1)  # One independent noise draw per modality's model.
    generate = jax.jit(functools.partial(synthesis_nets.synthesize, models, num_modalities=K))
    before = generate(state.g_params, noise)
    bumped = jax.tree.map(lambda p: p.at[1].multiply(1.5), state.g_params)
    after = generate(bumped, noise)
    changed = np.asarray(jnp.max(jnp.abs(after - before), axis=(1, 2, 3, 4)))
    assert changed[1] > 1e-4 and np.all(changed[[0, 2, 3]] == 0.0), changed
    assert registration.by_modality(registration.channels_last(before), 1).shape == before.shape
