"""Stage A training (`stage=structure`): learning, sampling with the quality filter, sharding equivalence.

The trained fixture's checks (150 steps, ~100 s of the 2 cores), the sharded run against one device, and
issue 17's acceptance and edge-fraction targets at the demo's budget, are in the slow suite (`make
test-slow`). The trained checks share one worker there (`xdist_group`), so the fixture runs once.
"""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
from compile_mode import optimised
from equivalence import assert_same_training
from host_init import random_like

from synth import frozen, sharding, structure_filter, structure_nets, train
from synth.metrics import edges as edge_form
from synth.models import vae
from synth.stages import structure


@pytest.fixture(scope="module")
def trained(phantom_data_dir, tmp_path_factory):
    """150 steps of the real stage-A step on the tiny phantom, simultaneous updates (the default)."""
    from configs import phantom

    config = phantom.get_config("runlocal")
    config.data.data_dir = phantom_data_dir
    config.structure.train.num_steps = 150
    config.structure.train.log_every = 5
    config.structure.train.eval_every = 150
    config.structure.train.checkpoint_every = 150
    # The evaluation draws 32 maps through the §5.4 filter (runlocal's 4 are too few for a threshold).
    config.structure.eval.num_samples = 32
    config.structure.eval.num_examples = 8
    config.mesh.shape = (1,)  # Faster than four simulated devices on 2 cores; sharding: slow test below.
    workdir = tmp_path_factory.mktemp("structure")
    spec = structure.build(config)
    with optimised():  # 150 steps: run time dominates.
        state = train.run_stage(spec, config, workdir)
    return config, spec, state, workdir


@pytest.mark.slow
@pytest.mark.xdist_group("structure_trained")
def test_reconstruction_loss_falls(trained):
    _, _, _, workdir = trained
    rows = [json.loads(x) for x in (workdir / "structure" / "metrics.jsonl").read_text().splitlines()]
    recon = [r["train/recon_l2"] for r in rows if "train/recon_l2" in r]
    assert len(recon) == 30
    # From step 5 to the mean of the last three logs (GAN terms make single values noisy).
    assert np.mean(recon[-3:]) < 0.75 * recon[0], recon
    evals = [r for r in rows if "eval/recon_error" in r]
    assert evals and 0.0 <= evals[-1]["eval/acceptance"] <= 1.0 and evals[-1]["eval/diversity"] > 0.0
    for name in ("sampled", "real", "recon"):
        assert 0.0 <= evals[-1][f"eval/edge_pattern_distance_{name}"] <= 1.0, evals[-1]
    assert list((workdir / "structure" / "samples").glob("samples_map_mask_*.png"))


@pytest.mark.slow
@pytest.mark.xdist_group("structure_trained")
def test_sampled_maps_vary_and_fill_like_real_ones(trained):
    """32 maps drawn through the filter after 150 steps: as varied as real maps, about as many edges.

    Seen (2026-12-05): diversity 0.223 against 0.237 real, edge fraction 0.308 against 0.273 real (+13 %);
    compiled with optimisations (LLVM level 2, as runs): 0.284 against 0.237, 0.299 against 0.273 (+9 %).
    A collapsed sampler draws one map (diversity near 0); the blobs issue 17 found had 1.5x the real edge
    fraction (0.28 against 0.18), which the 30 % bound rejects. Acceptance is not
    asserted: this tiny 32² run passes the §5.4 filter on 0 of 32 first draws (3 % within two), against
    0.69 for the demo's 400 steps at 64² (BENCHMARKS.md, image quality), which the slow test below checks.
    """
    _, _, _, workdir = trained
    ev = json.loads((workdir / "structure" / "last_eval.json").read_text())
    assert ev["eval/diversity"] >= 0.6 * ev["eval/diversity_real"], ev
    assert abs(ev["eval/edge_fraction_sampled"] / ev["eval/edge_fraction_real"] - 1) <= 0.3, ev
    assert 0.0 <= ev["eval/acceptance_first_draw"] <= ev["eval/acceptance"] <= 1.0, ev


@pytest.mark.slow
@pytest.mark.xdist_group("structure_trained")
def test_sample_structures_shapes_and_filter(trained):
    config, spec, state, _ = trained
    models = structure_nets.make_models(config, (32, 32))
    params = structure_filter.FilterParams(min_j_s=0.55, mae=0.05, max_count=3)
    out = structure_nets.sample_structures(
        state.g_params,
        state.d_params,
        jax.random.key(0),
        5,
        models=models,
        code_shape=vae.code_shape((32, 32), models.encoder.code_channels),
        filter_params=params,
    )
    assert out["maps"].shape == out["masks"].shape == (5, 32, 32)
    assert set(np.unique(out["maps"])) <= {0, 1} and set(np.unique(out["masks"])) <= {0, 1}
    assert out["accepted"].dtype == bool and ((out["draws"] >= 1) & (out["draws"] <= 3)).all()
    # Accepted samples really pass the filter; the others used every draw.
    again = structure_filter.passes_filter_batch(
        out["maps"], out["masks"], d_scores=out["scores"], params=params
    )
    assert (again[out["accepted"]]).all()
    assert (out["draws"][~out["accepted"]] == 3).all()


@pytest.mark.slow
@pytest.mark.xdist_group("structure_trained")
def test_structures_drawn_a_few_at_a_time_equal_one_call(trained, monkeypatch):
    """Stage A's sampler in groups (CPU's form, `synth.models.grouped`) draws what one call draws."""
    from synth.models import winograd

    config, _, state, _ = trained
    models = structure_nets.make_models(config, (32, 32))
    code_shape = vae.code_shape((32, 32), models.encoder.code_channels)
    key = jax.random.key(3)
    draw = lambda mode: jax.jit(  # noqa: E731
        lambda g, d: structure_nets.generate(g, d, key, 4, models=models, code_shape=code_shape, mode=mode)
    )(state.g_params, state.d_params)
    maps, masks, scores = draw("batched")
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 32 * 32 * models.decoder.features * 4 * 2)  # Groups of 2.
    g_maps, g_masks, g_scores = draw("grouped")
    np.testing.assert_allclose(g_scores, scores, rtol=1e-5, atol=1e-6)
    # Argmaxes of the same probabilities summed in another order: a near tie may flip a pixel.
    assert np.mean(g_maps == maps) > 0.999 and np.mean(g_masks == masks) > 0.999
    assert maps.shape == (4, 32, 32) and len(np.unique(np.asarray(scores))) == 4  # Four different draws.


@pytest.mark.slow  # Stage A's whole step compiled twice (four devices and one): ~2 minutes of the 2 cores.
def test_alternating_sharded_equals_single_device(tiny_config, tmp_path):
    results, init = [], None
    for mesh_shape in ((-1,), (1,)):
        config = tiny_config.copy_and_resolve_references()
        config.mesh.shape = mesh_shape
        config.structure.train.num_steps = 3
        config.structure.update_mode = "alternating"
        # E_s's input dropout on (the code's 0.15): without it E_s's input 0.9 + 0.1·s is nearly constant
        # at init, and the code-adversarial term (weight 1) carries round-off from the code discriminator's
        # instance norm into E_s: 4 vs 1 devices then differ by 7 % of the 3 steps' movement (0.7 % at
        # the code's weight 0.001; 1e-7 with the dropout). Sharding is this test's subject, not that.
        config.structure.model.encoder_dropout = 0.15
        # Plain SGD: Adam's first steps turn round-off into ±lr updates (see tests/test_loop.py).
        for side in (config.structure.optim.g, config.structure.optim.d):
            side.name, side.learning_rate, side.b1 = "sgd", 1e-3, 0.0
        spec = dataclasses.replace(structure.build(config), evaluate=None)
        if init is None:
            # The initial state as `train.run_stage` computes it (jitted, replicated on the mesh), so the run
            # below reuses this compiled init instead of compiling its own.
            mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
            repl = sharding.replicated(mesh)
            example = jax.tree.map(lambda x: np.asarray(x)[None], spec.preprocess(spec.source[0]))
            with jax.set_mesh(mesh):
                init_rng = jax.device_put(train.stage_rngs(config.seed, "structure")[0], repl)
                state0 = jax.jit(spec.init_state, out_shardings=repl)(init_rng, example)
            init = jax.tree.map(np.asarray, jax.device_get((state0.g_params, state0.d_params)))
        state = train.run_stage(spec, config, tmp_path / str(mesh_shape[0]))
        results.append(jax.tree.map(np.asarray, jax.device_get((state.g_params, state.d_params))))
    assert_same_training(results[0], results[1], init)


def _head(size: int = 64, ring: int = 3, inner: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A structure map (a ring `ring` pixels thick, a midline and a ventricle if `inner`) and its organ."""
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot((yy - size / 2) / 0.8, xx - size / 2)
    organ = radius <= 0.4 * size
    edges = organ & (radius > 0.4 * size - ring)
    if inner:
        edges |= organ & ((np.abs(xx - size / 2) < 1) | (np.abs(radius - 0.1 * size) < 0.7))
    return edges.astype(np.uint8), organ.astype(np.uint8)


def test_core_edge_fraction_sees_the_anatomy_the_edge_fraction_misses():
    (real, organ), (hollow, _) = _head(ring=3), _head(ring=4, inner=False)
    assert abs(hollow.mean() / real.mean() - 1) < 0.2  # The whole-map score cannot tell them apart.
    core = structure.core_edge_fraction(real[None], organ[None])
    assert core > 0.1 and structure.core_edge_fraction(hollow[None], organ[None]) == 0.0
    # Thicker or thinner rings leave the core alone; maps without an organ are left out.
    assert structure.core_edge_fraction(_head(ring=6)[0][None], organ[None]) == pytest.approx(core)
    empty = np.zeros_like(organ)
    assert structure.core_edge_fraction(np.stack([real, real]), np.stack([organ, empty])) == core
    assert structure.core_edge_fraction(real[None], empty[None]) == 0.0


def test_edge_pattern_distance_sees_how_the_edges_are_drawn():
    (thin, organ), (thick, _) = _head(ring=2), _head(ring=4)
    shifted = np.roll(thin, (3, -2), axis=(0, 1))  # The same drawing elsewhere: the same patterns.
    assert edge_form.edge_pattern_distance(thin[None], shifted[None]) == 0.0
    speckle = np.random.default_rng(0).random(thin.shape) < 0.05
    ragged = thin | (speckle & (organ > 0))
    d_thick = edge_form.edge_pattern_distance(thick[None], thin[None])
    d_ragged = edge_form.edge_pattern_distance(ragged[None], thin[None])
    # Thick bands and speckle inside are drawn differently from thin lines: far from them.
    assert d_thick > 0.3 and d_ragged > 0.2
    # Symmetric, in [0, 1]; the histogram holds one pattern per edge pixel.
    assert edge_form.edge_pattern_distance(thin[None], thick[None]) == pytest.approx(d_thick)
    assert edge_form.edge_patterns(np.stack([thin, thick])).sum() == thin.sum() + thick.sum()
    empty = np.zeros_like(thin)
    assert edge_form.edge_pattern_distance(empty[None], thin[None]) == 1.0
    assert edge_form.edge_pattern_distance(empty[None], empty[None]) == 0.0


def test_unknown_update_mode_is_named(tiny_config):
    tiny_config.structure.update_mode = "sequential"
    with pytest.raises(ValueError, match="update_mode 'sequential'"):
        structure.build(tiny_config)


@pytest.mark.slow
@pytest.mark.xdist_group("structure_trained")
def test_load_state_restores_the_trained_state(trained, tmp_path):
    config, _, state, workdir = trained
    loaded, _ = frozen.load(config, workdir, "structure")
    for a, b in zip(jax.tree.leaves(state.g_params), jax.tree.leaves(loaded["g_params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="run stage=structure"):
        frozen.load(config, tmp_path, "structure")


@pytest.mark.slow
def test_demo_budget_samples_pass_the_filter_on_the_first_draw(tmp_path_factory):
    """Issue 17's stage-A targets, at the demo's budget (400 steps at 64²).

    The tiny run above cannot reach them. At least half of the sampled maps pass the §5.4 filter on their
    first draw, and their edge fraction is within 20 % of the real maps'; benchmarks.quality saw 0.69 and
    +12 % (2026-12-03).
    """
    import data_builders
    from configs import phantom

    data_dir = tmp_path_factory.mktemp("tfds_demo")
    data_builders.build("phantom", data_dir=str(data_dir), config="demo")
    config = phantom.get_config("demo")
    config.data.data_dir = str(data_dir)
    config.structure.train.eval_every = config.structure.train.num_steps  # One evaluation, at the end.
    config.structure.eval.num_samples = 32
    config.mesh.shape = (1,)  # As a one-device run; four simulated devices only split the 2 cores.
    workdir = tmp_path_factory.mktemp("structure_demo")
    with optimised():  # 400 steps: run time dominates.
        structure.run(config, workdir)
    ev = json.loads((workdir / "structure" / "last_eval.json").read_text())
    print(f"\nstage A at the demo budget: {ev}")
    assert ev["eval/acceptance_first_draw"] >= 0.5, ev
    assert abs(ev["eval/edge_fraction_sampled"] / ev["eval/edge_fraction_real"] - 1) <= 0.2, ev


def _drawn_on_four_devices_and_one(generate, *args):
    """(per-device FLOPs of 6 draws on 4 devices ÷ one device's of 8, the 6 draws, one device's 8)."""
    one = generate.lower(*args, 8).compile()
    with jax.set_mesh(sharding.make_mesh((4,), (sharding.DATA_AXIS,))):
        four = generate.lower(*args, 6).compile()  # Padded to 8 draws, cut back to 6.
        four_drawn = jax.device_get(four(*args))
    flops = lambda compiled: compiled.cost_analysis()["flops"]  # noqa: E731
    return flops(four) / flops(one), four_drawn, jax.device_get(one(*args))


def test_structures_drawn_on_four_devices_split_the_draws():
    """Stage C's and the evaluator's sampler under a mesh: each device decodes its share, the same maps.

    Without the split every device drew and decoded all n (the result replicated, the work too); n that
    the mesh does not divide is padded and cut back. Partitionable threefry: the first 6 of 8 draws are
    the 6 draws.
    """
    from configs import phantom

    config = phantom.get_config("runlocal")
    models = structure_nets.make_models(config, (32, 32))
    code_shape = vae.code_shape((32, 32), models.encoder.code_channels)
    init = functools.partial(structure_nets.init_params, models=models)
    g, d = random_like(init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 1), np.float32))
    generate = structure_nets.make_generate_fn(models, code_shape)
    work, four, one = _drawn_on_four_devices_and_one(generate, g, d, jax.random.key(5))
    # A quarter of the decoding per device (was 1.0, then 0.58 with G_m's input gathered).
    assert work < 0.3, work
    assert [x.shape[0] for x in four] == [6, 6, 6]
    np.testing.assert_allclose(four[2], one[2][:6], rtol=1e-5, atol=1e-6)  # D_s's scores: the same draws.
    assert np.mean(four[0] == one[0][:6]) > 0.999 and np.mean(four[1] == one[1][:6]) > 0.999


def test_flow_structures_drawn_on_four_devices_split_the_draws():
    """The flow family's stage-A sampler under a mesh, as the VAE-GAN's above."""
    import jax.numpy as jnp

    from configs import phantom
    from synth import structure_flow

    config = phantom.get_config("runlocal")
    config.structure.flow.sampler.num_steps = 2
    models = structure_flow.make_models(config, (32, 32))
    params = random_like(models.velocity.init, jax.random.key(0), jnp.zeros((1, 32, 32, 2)), jnp.zeros((1,)))
    generate = structure_flow.make_generate_fn(models, config, (32, 32))
    work, four, one = _drawn_on_four_devices_and_one(generate, params, jax.random.key(5))
    assert work < 0.3, work
    assert four[0].shape == (6, 32, 32)
    assert np.mean(four[0] == one[0][:6]) > 0.999 and np.mean(four[1] == one[1][:6]) > 0.999
