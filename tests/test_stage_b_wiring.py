"""Stage B wiring with random networks: pairs, losses, label draws, shapes, frozen-network gradients.

The slow suite adds the bf16 loss against float32, the step's one pass of D on the fakes against two, and
the whole stage sharded over four devices.
"""

import dataclasses
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from equivalence import assert_same_training
from host_init import random_like

from synth import checkpoint as checkpoint_lib
from synth import (
    conditioning,
    configlib,
    gan,
    input_pipeline,
    optim,
    registration,
    structure_nets,
    synthesis_nets,
    train,
    translator_nets,
)
from synth import writer as writer_lib
from synth.lesion import segment
from synth.models import sizes
from synth.stages import segmentor, synthesis, translator


def test_pairs_are_grouped_by_target_and_translated_in_one_call():
    pairs = registration.ordered_pairs(4)
    assert len(pairs) == 12 and len(set(pairs)) == 12 and all(i != j for i, j in pairs)
    x = jnp.arange(4.0)[:, None, None, None, None] * jnp.ones((4, 2, 3, 3, 1))  # x_i == i everywhere
    calls = []

    def translate_many(images, targets):  # "Translate" = 10·source + target, under each of T targets.
        calls.append((images.shape, targets.shape))
        return 10 * images[None] + jnp.argmax(targets, -1)[..., None, None, None]

    out = registration.translate_pairs(translate_many, x)
    # One call: each of the 4·2 source images once, under its 3 targets.
    assert out.shape == (4, 3, 2, 3, 3, 1) and calls == [((8, 3, 3, 1), (3, 8, 4))]
    sources = registration.pair_sources(4)
    for j in range(4):
        for n in range(3):
            np.testing.assert_allclose(out[j, n], 10 * sources[j, n] + j)

    def set_to_target(images, targets):
        return jnp.broadcast_to(
            jnp.argmax(targets, -1)[:, None, None, None].astype(images.dtype), images.shape
        )

    def set_to_targets(images, targets):
        return jax.vmap(set_to_target, in_axes=(None, 0))(images, targets)

    # A one-condition-per-image translator (ECAI's decoder) through `tiled` gives the same pairs.
    def translate_one(images, conds):  # (N, …), (N, K)
        return 10 * images + jnp.argmax(conds, -1)[:, None, None, None]

    np.testing.assert_allclose(registration.translate_pairs(registration.tiled(translate_one), x), out)

    # Every cycle i -> j -> i comes back to i, each counted once (§11.16's mis-wiring would not).
    translations = registration.translate_pairs(set_to_targets, x)
    cycled = registration.translate_back(set_to_target, translations)
    assert float(registration.cycle_loss(x, cycled)) == 0.0
    assert float(registration.registration_loss(x, translations)) == 0.0


def test_registration_and_agreement_losses_match_loops():
    rng = np.random.default_rng(0)
    x = rng.random((4, 2, 5, 5, 1)).astype(np.float32)
    t = rng.random((4, 3, 2, 5, 5, 1)).astype(np.float32)
    reg = sum(np.mean((t[j, n] - x[j]) ** 2) for j in range(4) for n in range(3))
    agree = sum(
        np.mean((t[j, a] - t[j, b]) ** 2) for j in range(4) for a in range(3) for b in range(a + 1, 3)
    )
    np.testing.assert_allclose(registration.registration_loss(x, t), reg, rtol=1e-5)
    np.testing.assert_allclose(registration.agreement_loss(t), agree, rtol=1e-5)


def test_category_loss_kinds():
    maps = jnp.full((2, 3, 3, 1), 2.0)
    assert float(gan.category_loss(maps, 2, kind="index_mse", num_modalities=4)) == 0.0
    assert float(gan.category_loss(maps, 0, kind="index_mse", num_modalities=4)) == 4.0
    logits = jnp.zeros((2, 3, 3, 4)).at[..., 1].set(20.0)
    assert float(gan.category_loss(logits, 1, kind="cross_entropy", num_modalities=4)) < 1e-6
    assert gan.predicted_category(logits, kind="cross_entropy").tolist() == [1, 1]
    with pytest.raises(ValueError, match="category loss kind 'hinge'"):
        gan.category_loss(maps, 0, kind="hinge", num_modalities=4)


def test_judged_once_routes_g_and_d_gradients_as_two_passes():
    """One forward pass of a (random, dropout-like) judge; each copy's gradient reaches only its own side."""

    def judge(params, images, rng):
        keep = jax.random.bernoulli(rng, 0.7, images.shape)
        hidden = jnp.tanh(jnp.where(keep, images, 0.0) @ params["w"])
        return hidden.sum(-1), hidden.mean(-1)

    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)}
    images, rng = jnp.linspace(0.0, 2.0, 8).reshape(2, 4), jax.random.key(3)
    g_loss = lambda out: jnp.sum(jnp.square(out[0] - 1.0)) + jnp.sum(out[1])  # noqa: E731
    d_loss = lambda out: jnp.sum(jnp.sin(out[0])) + jnp.sum(jnp.square(out[1]))  # noqa: E731

    def joint(params, images):
        for_g, for_d = gan.judged_once(judge)(params, images, rng)
        return g_loss(for_g) + d_loss(for_d)

    params_grad, images_grad = jax.jit(jax.grad(joint, argnums=(0, 1)))(params, images)
    stop = jax.lax.stop_gradient
    want_params = jax.grad(lambda p: d_loss(judge(p, stop(images), rng)))(params)
    want_images = jax.grad(lambda x: g_loss(judge(stop(params), x, rng)))(images)
    np.testing.assert_allclose(params_grad["w"], want_params["w"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(images_grad, want_images, rtol=1e-5, atol=1e-7)
    for_g, for_d = gan.judged_once(judge)(params, images, rng)
    np.testing.assert_array_equal(for_g[0], judge(params, images, rng)[0])
    np.testing.assert_array_equal(for_d[1], for_g[1])


def test_labels_are_drawn_to_fit_the_organ():
    organ = np.zeros((3, 4, 4, 1), np.float32)
    organ[0] = 1.0  # all organ
    organ[1, :, :2] = 1.0  # left half
    labels = np.zeros((3, 4, 4), np.int32)
    labels[0, :, 3] = 2  # right edge
    labels[1, :, 0] = 1  # left edge
    label, fitted, source = conditioning.draw_labels(jnp.asarray(labels), jnp.asarray(organ), rule="code")
    np.testing.assert_array_equal(label[0], labels[1])  # The next slice's label fits anywhere.
    np.testing.assert_array_equal(label[1], labels[2])  # The empty label fits (code rule)…
    np.testing.assert_array_equal(label[2], 0)  # …and is the fallback when nothing fits.
    assert fitted.tolist() == [True, True, False]
    assert source.tolist() == [1, 2, -1]  # The rows the labels came from: boxes follow them.
    draw = functools.partial(conditioning.draw_labels, jnp.asarray(labels), jnp.asarray(organ), rule="paper")
    label, fitted, source = draw(mirror=False)
    assert fitted.tolist() == [True, False, False]  # Paper rule: an empty label does not fit.
    np.testing.assert_array_equal(label[1], labels[0])  # The last draw is kept.
    assert source.tolist() == [1, 0, 1]
    # Mirrored candidates: slice 0's right-edge lesion, flipped, lies on row 1's left-half organ.
    label, fitted, source = draw()
    assert fitted.tolist() == [True, True, False]
    np.testing.assert_array_equal(label[1], labels[0][:, ::-1])
    assert source.tolist() == [1, 0, 1]


def test_paired_rows_keep_their_own_structure_and_label(tiny_config):
    rows = lambda b, f, pre=False: np.asarray(conditioning.paired_rows(b, f, jnp.asarray(pre))).tolist()  # noqa: E731
    assert rows(8, 0.5) == [False, True] * 4  # Spread: every 2-row shard of a 4-device mesh holds one.
    assert sum(rows(8, 0.25)) == 2 and rows(4, 0.0) == [False] * 4 and rows(4, 1.0) == [True] * 4
    assert rows(4, 0.0, pre=True) == [True] * 4  # Pre-training pairs every row.
    with pytest.raises(ValueError, match="paired_fraction"):
        conditioning.paired_rows(4, 1.5, jnp.asarray(False))

    source = input_pipeline.open_source(tiny_config.data, "train")
    examples = [synthesis.preprocess(source[i]) for i in range(len(source))]
    with_lesion = [e for e in examples if e["label"].any()][:4]
    batch = jax.tree.map(lambda *x: jnp.asarray(np.stack(x)), *with_lesion)
    inputs = conditioning.make_inputs(
        batch,
        jax.random.key(0),
        {},
        models=SimpleNamespace(structure=None),
        config=tiny_config,
        pretraining=jnp.asarray(False),
        paired_fraction=0.5,
    )
    assert np.asarray(inputs.paired).tolist() == [False, True, False, True]
    own = np.asarray(batch["label"])
    for row in (1, 3):  # The paired rows' target is their own real slice: they keep its label.
        np.testing.assert_array_equal(np.asarray(inputs.label[row]), own[row])
    for row in (0, 2):  # The others get another slice's label (or none), never their own.
        assert not np.array_equal(np.asarray(inputs.label[row]), own[row])


@pytest.mark.parametrize(
    "image_hw, bottleneck, patches", [((184, 144), (23, 18), (12, 9)), ((512, 512), (64, 64), (32, 32))]
)
def test_generator_and_discriminator_shapes(tiny_config, image_hw, bottleneck, patches):
    tiny_config.synthesis.model.size = "base"
    models = synthesis_nets.make_models(tiny_config, image_hw)
    g_input = jax.ShapeDtypeStruct((2, *image_hw, 6), jnp.float32)  # s' + five one-hot label channels.
    cond = jax.ShapeDtypeStruct((2, 4), jnp.float32)
    params = jax.eval_shape(models.generator.init, jax.random.key(0), g_input, cond)
    out, inter = jax.eval_shape(
        lambda p, x, c: models.generator.apply(p, x, c, mutable=["intermediates"]), params, g_input, cond
    )
    assert out.shape == (2, *image_hw, 1)
    assert inter["intermediates"]["bottleneck"][0].shape[1:3] == bottleneck
    image = jax.ShapeDtypeStruct((2, *image_hw, 1), jnp.float32)
    d_params = jax.eval_shape(models.discriminator.init, jax.random.key(0), image)
    d, c = jax.eval_shape(models.discriminator.apply, d_params, image)
    assert d.shape[1:3] == c.shape[1:3] == patches
    assert sizes.unet_kwargs("base", image_hw)["features"] == 64


@pytest.fixture(scope="module")
def random_stage_b(phantom_data_dir):
    """Synthesis with all four modalities' frozen networks at random init: enough for wiring checks.

    Also returns the translator's whole random state (its G is the frozen translator). The states have
    the three initialisers' shapes with values drawn on the host (`host_init`): compiled, the initialisers
    took ~24 s.
    """
    from configs import phantom

    config = phantom.get_config("runlocal")
    config.data.data_dir = phantom_data_dir
    models = synthesis_nets.make_models(config, (32, 32))
    source = input_pipeline.open_source(config.data, "train")
    batch = jax.tree.map(lambda *x: np.stack(x), *[synthesis.preprocess(source[i]) for i in range(2)])
    keys = jax.random.split(jax.random.key(1), 4)

    def init_all(keys, batch):
        tr_state = translator.init_state(
            keys[0],
            batch,
            models=translator_nets.make_models(config, (32, 32)),
            g_tx=optim.make_optimizer(config.translator.optim.g),
            d_tx=optim.make_optimizer(config.translator.optim.d),
        )
        seg_params = segment.init_params(
            keys[1], batch["image"], model=segment.make_model(config, (32, 32)), variant="n_seg"
        )
        tx = optim.make_optimizer(config.synthesis.optim.g)
        state = synthesis.init_state(keys[2], batch, models=models, config=config, g_tx=tx, d_tx=tx)
        return tr_state, seg_params, state

    tr_state, seg_params, state = random_like(init_all, keys, batch)
    frozen = {"translator": tr_state.g_params, "lesion": seg_params}
    return SimpleNamespace(
        config=config, models=models, batch=batch, state=state, frozen=frozen, key=keys[3], tr_state=tr_state
    )


@pytest.mark.slow  # ~44 s on 2 cores: in `make test-slow`, to keep `make test` near 10 minutes.
def test_frozen_networks_take_no_gradient_but_pass_it_on(random_stage_b):
    b = random_stage_b
    terms = ("registration", "agreement", "lesion")

    def term_values(g_params, frozen):
        _, (values, *_) = synthesis.generator_loss(
            g_params,
            b.state.d_params,
            frozen,
            b.batch,
            b.key,
            jnp.asarray(10**6),
            models=b.models,
            config=b.config,
        )
        return jnp.stack([values[t] for t in terms])

    # Row k of the Jacobian, one term at a time: the gradient of e_k · terms. One backward pass compiled
    # once and called per term costs less to compile than `jax.jacrev`'s vmapped one; the rows are the same.
    @jax.jit
    def jacobian_row(g_params, frozen, e_k):
        return jax.grad(lambda g, f: jnp.dot(e_k, term_values(g, f)), argnums=(0, 1))(g_params, frozen)

    for k, name in enumerate(terms):
        g_grad, frozen_grad = jacobian_row(b.state.g_params, b.frozen, jnp.eye(len(terms))[k])
        g_norm = max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(g_grad))
        frozen_norm = max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(frozen_grad))
        assert g_norm > 0.0, f"{name} gives G no gradient"
        assert frozen_norm == 0.0, f"{name} gives a frozen network gradient"


@pytest.mark.slow  # Two compiles of the whole step (~30 s); the routing itself is checked above, fast.
def test_one_pass_of_d_on_the_fakes_updates_as_two_did(random_stage_b, monkeypatch):
    """The step's shared D pass on the fakes (`gan.judged_once`) gives G and D the gradients of two passes.

    The reference routes the same key through two passes, as the step did before: G's loss judges the fakes
    with D frozen, D's loss judges the fakes with their gradient stopped. With SGD at rate 1 the updated
    parameters are the old ones minus the gradients, so they compare the gradients themselves. D has
    dropout here, so both forms must draw the same mask for the same key.
    """
    b = random_stage_b
    config = b.config.copy_and_resolve_references()
    config.synthesis.model.disc_dropout = 0.2
    config.synthesis.pretrain_steps = 0  # The adversarial phase.
    models = synthesis_nets.make_models(config, (32, 32))
    assert models.discriminator.dropout_rate > 0
    sgd = optax.sgd(1.0)
    state = dataclasses.replace(b.state, g_opt=sgd.init(b.state.g_params), d_opt=sgd.init(b.state.d_params))

    def two_passes(judge):
        stop = jax.lax.stop_gradient
        return lambda params, images, rng: (
            judge(stop(params), images, rng),
            judge(params, stop(images), rng),
        )

    def step():
        return jax.jit(
            lambda s, f: synthesis.train_step(
                s, b.batch, b.key, f, models=models, config=config, g_tx=sgd, d_tx=sgd
            )
        )(state, b.frozen)

    one, one_metrics = step()
    monkeypatch.setattr(gan, "judged_once", two_passes)
    two, two_metrics = step()
    for name in ("g_loss", "d_loss", "d_fake", "g_adversarial", "g_category", "d_category"):
        np.testing.assert_allclose(
            float(one_metrics[name]), float(two_metrics[name]), rtol=1e-5, err_msg=name
        )
    for new, reference in ((one.g_params, two.g_params), (one.d_params, two.d_params)):
        for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    moved = max(
        float(jnp.abs(a - c).max()) for a, c in zip(*map(jax.tree.leaves, (one.d_params, state.d_params)))
    )
    assert moved > 0.0  # D learnt from the fakes' copy: its gradient is not lost on the way.


def test_frozen_translator_runs_per_source_once_its_batch_exceeds_a_chunk(random_stage_b, monkeypatch):
    """Stage B's G_t translates each source modality in its own call where K·B maps exceed a chunk."""
    from synth import registration
    from synth.models import winograd

    b = random_stage_b
    forms, batched = [], registration.translate_pairs

    def spy(translate_many, x, *, per_source=False):
        forms.append(per_source)
        return batched(translate_many, x, per_source=per_source)

    monkeypatch.setattr(registration, "translate_pairs", spy)
    loss = functools.partial(synthesis.generator_loss, models=b.models, config=b.config)
    args = (b.state.g_params, b.state.d_params, b.frozen, b.batch, b.key, jnp.asarray(10**6))
    images = len(b.config.data.modalities) * b.batch["image"].shape[0]
    all_maps = images * 32 * 32 * b.models.translator.generator.features * 4  # First-level maps, bytes.
    for chunk_bytes in (all_maps, all_maps - 1):
        monkeypatch.setattr(winograd, "CHUNK_BYTES", chunk_bytes)
        jax.eval_shape(lambda *a: loss(*a), *args)  # A new function each time: traced anew.
    assert forms == [False, True]


@pytest.mark.slow  # ~24 s on 2 cores: in `make test-slow`, to keep `make test` near 10 minutes.
def test_generation_a_few_examples_at_a_time_equals_one_batched_call(random_stage_b, monkeypatch):
    """`generate`'s grouped form (CPU's) gives the batched call's images, on 1 device and over 4 shards."""
    from synth import sharding
    from synth.models import winograd

    b = random_stage_b
    k = len(b.config.data.modalities)
    shape = conditioning.make_inputs(
        b.batch, b.key, b.frozen, models=b.models, config=b.config, pretraining=jnp.asarray(False)
    ).g_input.shape
    g_input = jax.random.uniform(jax.random.key(7), (8,) + shape[1:])  # Every example its own.
    generate = functools.partial(synthesis_nets.generate, b.models, num_modalities=k)
    expected = jax.jit(functools.partial(generate, mode="batched"))(b.state.g_params, g_input)
    assert synthesis_nets.generation_group(b.models, g_input.shape, mode="grouped") == 8  # Small maps.
    one_map = 32 * 32 * b.models.generator.features * 4  # An example's first-level map, bytes.
    mesh = sharding.make_mesh((4,), (sharding.DATA_AXIS,))
    sharded = jax.device_put(g_input, sharding.batch_sharding(mesh))
    for chunk_bytes, shards, x, group in (
        (2 * one_map, 1, g_input, 2),
        (one_map, 1, g_input, 1),
        (one_map, 4, sharded, 1),
    ):
        monkeypatch.setattr(winograd, "CHUNK_BYTES", chunk_bytes)
        assert synthesis_nets.generation_group(b.models, x.shape, shards=shards) == group
        grouped = jax.jit(functools.partial(generate, shards=shards, mode="grouped"))
        assert " while(" in grouped.lower(b.state.g_params, x).compile().as_text()  # In a loop.
        np.testing.assert_allclose(grouped(b.state.g_params, x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="4 shards"):
        synthesis_nets.generation_group(b.models, (6,) + g_input.shape[1:], shards=4)
    with pytest.raises(ValueError, match="grouping mode"):
        generate(b.state.g_params, g_input, mode="scan")


def test_translator_fakes_are_translations_and_g_gets_adversarial_gradient(random_stage_b):
    config, batch = random_stage_b.config, random_stage_b.batch
    models = translator_nets.make_models(config, (32, 32))
    state = random_stage_b.tr_state  # A random translator, initialised once for the module.
    loss_config = config.translator.loss

    @jax.jit
    def check(g_params, d_params):
        adversarial = lambda g: translator.generator_loss(  # noqa: E731
            g, d_params, batch["image"], models=models, loss_config=loss_config
        )[1][0]["g_adversarial"]
        grads = jax.grad(adversarial)(g_params)
        _, (_, fakes, judged) = translator.generator_loss(
            g_params, d_params, batch["image"], models=models, loss_config=loss_config
        )
        d_on = lambda j: translator.discriminator_loss(  # noqa: E731
            d_params, batch["image"], j, models=models, loss_config=loss_config
        )[1]["d_fake"]
        judge = lambda t: translator.discriminate(models, d_params, t)  # noqa: E731
        return optax.global_norm(grads), d_on(judged), d_on(judge(fakes)), d_on(judge(jnp.zeros_like(fakes)))

    grad_norm, d_fake, d_translations, d_zero = check(state.g_params, state.d_params)
    assert float(grad_norm) > 0.0
    # D's fake term scores the translations, judged once for both losses.
    assert float(d_fake) == pytest.approx(float(d_translations), rel=1e-6)
    assert float(d_fake) != float(d_zero)


def test_single_modality_families_use_the_same_trainer(random_stage_b):
    """K = 1 (X-ray, lung CT, retina, TC): no modality code, no registration terms, a one-head D."""
    batch, key = random_stage_b.batch, random_stage_b.key
    config = random_stage_b.config.copy_and_resolve_references()
    config.data.modalities = ("t1",)
    config.synthesis.label_fusion = "concat_onehot_plus_0.1"  # The X-ray/TC form (§3.6).
    one = {"image": batch["image"][..., :1], "label": batch["label"]}
    models = synthesis_nets.make_models(config, (32, 32))
    assert models.translator is None and models.discriminator.heads == 1
    tx = optim.make_optimizer(config.synthesis.optim.g)

    def init(key, one):
        state = synthesis.init_state(key, one, models=models, config=config, g_tx=tx, d_tx=tx)
        seg = segment.init_params(
            key, one["image"], model=segment.make_model(config, (32, 32)), variant="n_seg"
        )
        return state, seg

    state, seg = random_like(init, key, one)  # Drawn on the host: nothing to compile but the step.
    step = jax.jit(
        lambda s, b, r, f: synthesis.train_step(s, b, r, f, models=models, config=config, g_tx=tx, d_tx=tx)
    )
    new, metrics = step(state, one, key, {"lesion": seg})
    assert int(new.step) == 1 and np.isfinite(float(metrics["g_loss"]))
    assert float(metrics["registration"]) == float(metrics["g_category"]) == 0.0
    assert float(metrics["lesion"]) > 0.0
    assert 0.0 <= float(metrics["label_fallback"]) <= 1.0  # Counted, for the training log.


def test_stage_a_structures_replace_the_real_ones_after_pretraining(tiny_config):
    """`structure_source="stage_a"` (the paper): real maps while pre-training, stage A's draws afterwards."""
    from synth.models import vae

    config = tiny_config
    config.synthesis.structure_source = "stage_a"
    models = synthesis_nets.make_models(config, (32, 32))
    assert models.structure is not None
    source = input_pipeline.open_source(config.data, config.data.train_split)
    batch = jax.tree.map(lambda *x: np.stack(x), *[synthesis.preprocess(source[i]) for i in range(4)])
    decoder = models.structure.decoder
    code = vae.code_shape((32, 32), models.structure.encoder.code_channels)

    # Everything in one compile (eager initialisation and extraction dispatch op by op). The pre-training
    # flags are arguments, so `make_inputs` sees them traced, as in the train step.
    @jax.jit
    def run(batch, key, pretraining, adversarial):
        keys = jax.random.split(jax.random.key(0), 2)
        dec_params = decoder.init(keys[0], jnp.zeros((1, *code)))
        mask_params = models.structure.mask.init(keys[1], jnp.zeros((1, 32, 32, 2)))
        frozen = {"structure": {"decoder": dec_params, "mask": mask_params}}
        inputs = functools.partial(conditioning.make_inputs, models=models, config=config)
        pre = inputs(batch, key, frozen, pretraining=pretraining)
        adv = inputs(batch, key, frozen, pretraining=adversarial)
        maps, masks, _ = structure_nets.generate_maps(
            frozen["structure"], jax.random.split(key)[1], 4, models=models.structure, code_shape=code
        )
        real = structure_nets.real_structures(
            batch,
            params=structure_nets.extraction_params(config),
            remove_lesions=config.structure.remove_lesions,
        )
        return pre, adv, maps, masks, real

    pre, adv, maps, masks, (real_s, _) = run(batch, jax.random.key(1), jnp.asarray(True), jnp.asarray(False))
    np.testing.assert_array_equal(pre.structure, real_s)
    np.testing.assert_array_equal(adv.structure[..., 0], maps)
    np.testing.assert_array_equal(adv.organ[..., 0], masks)
    np.testing.assert_array_equal(pre.label, batch["label"])  # Its own label while pre-training.
    assert not np.array_equal(np.asarray(adv.structure), np.asarray(real_s))


def test_mixed_precision_computes_in_bf16_and_keeps_float32_parameters():
    seen = []

    def layer(params, x):
        seen.append((params["w"].dtype, x.dtype))
        return jnp.sum(params["w"] * x)

    params, x = {"w": jnp.linspace(0.5, 1.5, 8)}, jnp.linspace(-1.0, 1.0, 8)
    value, grads = jax.value_and_grad(synthesis_nets.in_dtype("bfloat16", layer))(params, x)
    assert seen[-1] == (jnp.bfloat16, jnp.bfloat16) and value.dtype == jnp.float32
    assert grads["w"].dtype == jnp.float32  # The update stays in float32.
    np.testing.assert_allclose(grads["w"], x.astype(jnp.bfloat16).astype(jnp.float32))
    assert synthesis_nets.in_dtype("float32", layer) is layer


def test_stage_b_config_errors_name_the_key():
    from configs import phantom

    for key, value in (("compute_dtype", "bf16"), ("label_rule", "loose"), ("structure_source", "vae")):
        config = phantom.get_config("runlocal")
        config.synthesis[key] = value
        with pytest.raises(ValueError, match=f"config.synthesis.{key}"):
            synthesis.build(config, workdir="/nonexistent")


@pytest.mark.slow  # Two more compiles of the loss (~12 s); the casts themselves are checked above.
def test_bf16_generator_loss_is_close_to_float32(random_stage_b):
    b = random_stage_b
    values = {}
    for dtype in ("float32", "bfloat16"):
        config = b.config.copy_and_resolve_references()
        config.synthesis.compute_dtype = dtype
        loss, (terms, fakes, *_) = jax.jit(
            functools.partial(synthesis.generator_loss, models=b.models, config=config)
        )(b.state.g_params, b.state.d_params, b.frozen, b.batch, b.key, jnp.asarray(10**6))
        assert fakes.dtype == jnp.float32 and np.isfinite(float(loss))
        values[dtype] = {name: float(v) for name, v in terms.items()}
    for name, exact in values["float32"].items():
        assert values["bfloat16"][name] == pytest.approx(exact, rel=0.05, abs=1e-3), name


@pytest.mark.slow  # The whole stage compiled twice (four devices and one): ~2 minutes of the 2 cores.
def test_sharded_stage_equals_single_device_and_frozen_untouched(phantom_data_dir, tmp_path):
    """Stage B on a 4-device mesh equals 1 device and leaves every frozen network untouched.

    Both phases run, with the registration path on (the config's registration and agreement weights): a
    random translator and random segmentors are saved as their stages' step 0 and loaded as a run would.
    Only wiring and sharding matter here; tests/test_stage_b_trained.py checks what training achieves.
    """
    from configs import phantom

    base = phantom.get_config("runlocal")
    base.data.data_dir = phantom_data_dir
    assert base.synthesis.loss.weights.registration > 0 and base.synthesis.loss.weights.agreement > 0
    workdir, saved = tmp_path / "frozen", {}
    for stage, spec in (("translator", translator.build(base)), ("segmentor", segmentor.build(base))):
        example = jax.tree.map(lambda x: np.asarray(x)[None], spec.preprocess(spec.source[0]))
        saved[stage] = jax.jit(spec.init_state)(jax.random.key(2), example)
        with checkpoint_lib.Checkpointer(workdir / stage / "checkpoints", async_save=False) as ckpt:
            ckpt.save(0, saved[stage])

    results, init = [], None
    for mesh_shape in ((-1,), (1,)):
        config = base.copy_and_resolve_references()
        config.mesh.shape = mesh_shape
        config.synthesis.pretrain_steps = 1  # Both phases run.
        config.synthesis.train = configlib.loop_config(num_steps=2, batch_size=4, log_every=1)
        for side in (config.synthesis.optim.g, config.synthesis.optim.d):
            side.name, side.learning_rate, side.b1 = "sgd", 1e-3, 0.0
        spec = dataclasses.replace(synthesis.build(config, workdir=workdir), evaluate=None)
        assert set(spec.frozen) == {"translator", "lesion"}, spec.frozen.keys()
        assert spec.provenance["translator_step"] == spec.provenance["segmentor_step"] == 0, spec.provenance
        frozen_before = jax.tree.map(np.array, jax.device_get(spec.frozen))
        if init is None:
            example = jax.tree.map(lambda x: np.asarray(x)[None], spec.preprocess(spec.source[0]))
            # Jitted: one compile costs less than initialising op by op.
            state0 = jax.jit(spec.init_state)(train.stage_rngs(config.seed, "synthesis")[0], example)
            init = (state0.g_params, state0.d_params)
        run_dir = tmp_path / str(mesh_shape[0])
        state = train.run_stage(spec, config, run_dir)
        results.append(jax.tree.map(np.asarray, jax.device_get((state.g_params, state.d_params))))
        after = jax.device_get(spec.frozen)
        assert jax.tree.structure(frozen_before) == jax.tree.structure(after)
        for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(after)):
            np.testing.assert_array_equal(a, b)
        rows = writer_lib.read_jsonl(str(run_dir / "synthesis" / "metrics.jsonl"))
        assert [r["step"] for r in rows] == [1, 2], rows
        for row in rows:  # The frozen translator scored G's images in both phases.
            assert row["train/registration"] > 0 and row["train/agreement"] > 0, row
    saved_g_t = saved["translator"].g_params
    for a, b in zip(jax.tree.leaves(frozen_before["translator"]), jax.tree.leaves(saved_g_t)):
        np.testing.assert_array_equal(a, b)  # The frozen G_t is the saved one.
    assert_same_training(results[0], results[1], init)
