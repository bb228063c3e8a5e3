"""The single-modality families (lung CT, retina, chest X-ray, Tianchi) through the phantom's stages.

Each family's `runlocal` config runs `stage=all` on its builder's dummy data; the cheap tests pin the
small pluggable parts those families add: dataset adapters (boxes too), RGB modalities, the "no placement
check" rule, coarse vessel labels, FOV-only vessel metrics, the classifier and boxes in stage D's mixes.
"""

import functools
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synth import (
    conditioning,
    extraction,
    flow_synthesis,
    frozen,
    fusion,
    gan,
    input_pipeline,
    label_pool,
    lesion,
    mixes,
    pipeline,
    registration,
    structure_flow,
    structure_losses,
)
from synth.lesion import classify, segment
from synth.metrics import vessel as vessel_lib
from synth.stages import segmentor


@pytest.fixture(scope="module")
def family_data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("family_tfds"))


def _family_config(family: str, data_dir: str, arg: str = "runlocal"):
    config = importlib.import_module(f"configs.{family}").get_config(arg)
    config.data.data_dir = data_dir
    return config


# Each pipeline costs 1.5-2 minutes of CPU, mostly compiles: they run in `make test-slow`, to keep the fast
# suite under 10 minutes. Their parts are covered by the fast tests below; the X-ray pipeline also checks
# what the classifier's stage gives stages B, C and D (`_check_classifier_stage`).
# The retina (one RGB modality) runs both stages by flow matching (issue 18: K = 1 and C = 3 work too);
# the other families run the paper's GANs.
@pytest.mark.slow
@pytest.mark.parametrize(
    "family, arg",
    [
        ("chest_xray", "runlocal"),
        ("retina", "runlocal,generator=flow,structure_generator=flow"),
        ("lung_ct", "runlocal"),
        ("tianchi_lung_ct", "runlocal"),
    ],
)
def test_runlocal_pipeline_runs_every_stage(family, arg, family_data_dir, tmp_path):
    config = _family_config(family, family_data_dir, arg)
    workdir = str(tmp_path / family)
    pipeline.train_and_evaluate(config, workdir)

    for stage in ("structure", "segmentor", "synthesis", "dataset", "verify"):
        assert os.path.exists(os.path.join(workdir, stage, "done.json")), stage
    assert not os.path.exists(os.path.join(workdir, "translator")), "one modality: nothing to translate"
    report = open(os.path.join(workdir, "report.md")).read()
    summary = open(os.path.join(workdir, "verify", "summary.md")).read()
    assert "## verify" in report and "score_vs_synthetic.png" in summary

    from data_builders.synthetic import synthetic_dataset_builder as chunks

    sample = next(chunks.iterate_samples(os.path.join(workdir, "dataset", "chunks"), 1))
    channels = config.data.channels * len(config.data.modalities)
    assert sample["image"].shape == (32, 32, channels)
    label = np.asarray(sample["label"])
    if family == "retina":
        assert structure_flow.is_flow(config) and flow_synthesis.is_flow(config)
        assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0
        # Coarse vessels: edges of the sample's own structure map, inside its shrunk field of view.
        assert set(np.unique(label)) <= {0, 1}
        assert np.all(label <= np.asarray(sample["structure"]))
        assert "| sensitivity | accuracy | AUC |" in summary
        # The generators also learned from FIRE's unlabelled photos; the vessel segmentor did not.
        drive = input_pipeline.open_source(config.data, config.data.train_split)
        assert len(input_pipeline.gan_training_source(config.data)) > len(drive)
    elif family == "chest_xray":
        assert label.min() == label.max() and 0 <= label.min() < 3  # A class map.
        assert "| accuracy |" in summary
        _check_classifier_stage(config, workdir)
        with open(os.path.join(workdir, "dataset", "done.json")) as f:
            assert json.load(f)["num_examples"] == config.dataset.num_examples
    elif family == "tianchi_lung_ct":
        # Box labels with their boxes (stage C reads them back from the label), scored by mAP.
        assert set(np.unique(label)) <= {0, 1} and sample["boxes"].shape == (4, 4)
        painted = input_pipeline.paint_boxes(sample["boxes"], sample["box_classes"], (32, 32))
        np.testing.assert_array_equal(painted, label)
        assert "| mAP@0.5 |" in summary
    else:
        assert set(np.unique(label)) <= {0, 1}  # The real-trained lung segmentor's reading.
        assert "| Dice whole |" in summary


def _check_classifier_stage(config, workdir):
    """Stage `segmentor` with `task="classify"` trained, evaluated, and gives stages B and C their processor.

    The classifier learns normal, bacterial and viral X-rays and reports accuracy and per-class recall.
    """
    evaluated = json.loads(open(os.path.join(workdir, "segmentor", "last_eval.json")).read())
    assert 0.0 <= evaluated["eval/accuracy/mean"] <= 1.0
    assert {f"eval/recall_class{c}/xray" for c in range(3)} <= evaluated.keys()
    assert segmentor.scores(config) == (("accuracy/mean", "accuracy"),)
    processor = lesion.processor(config, (32, 32))
    loaded, step = frozen.load(config, workdir, "segmentor")
    params = loaded["params"]
    assert processor.kind == "classify" and step == config.segmentor.train.num_steps
    images = jnp.zeros((4, 32, 32, 1))
    label = jnp.broadcast_to(jnp.arange(4)[:, None, None] % 3, (4, 32, 32))
    predicted = processor.predict(params, images)
    assert predicted.shape == (1, 4, 32, 32) and bool(jnp.all(predicted == predicted[:, :, :1, :1]))
    inputs = conditioning.Inputs(None, None, label, None)
    assert np.isfinite(np.asarray(processor.loss(params, images, inputs))).all()


@pytest.mark.slow
def test_brats2015_config_trains_on_its_dummy_data(family_data_dir, tmp_path):
    """BRATS2015's config runs every stage on its builder's dummy volumes (cropped, resized to 32²), K = 4."""
    config = _family_config("brats2015", family_data_dir)
    source = input_pipeline.open_source(config.data, "train")
    assert source[0]["image"].shape == (32, 32, 4)
    pipeline.train_and_evaluate(config, tmp_path)
    for stage in ("structure", "segmentor", "translator", "synthesis", "dataset", "verify"):
        assert os.path.exists(tmp_path / stage / "done.json"), stage
    assert "| Dice whole |" in open(tmp_path / "verify" / "summary.md").read()


CONFIGS = (
    ("phantom", "demo"),
    ("phantom", ""),
    ("brats2015", ""),
    ("chest_xray", ""),
    ("lung_ct", ""),
    ("retina", ""),
    ("tianchi_lung_ct", ""),
)


@pytest.mark.parametrize("module, arg", CONFIGS)
def test_every_dataset_config_builds_and_validates(module, arg):
    """The demo and every full-size config pass the checks their stages run before opening any data."""
    from synth.stages import compare, synthesis, translator

    config = importlib.import_module(f"configs.{module}").get_config(arg or None)
    synthesis.check_config(config)  # Stage B's choices and its complete loss-weight table.
    gan.check_loss_weights(
        "translator", config.translator.loss.weights, translator.G_TERMS + translator.D_TERMS
    )
    stage_a_terms = (*structure_losses.STAGE_A_G_TERMS, *structure_losses.STAGE_A_D_TERMS)
    gan.check_loss_weights("structure", config.structure.loss.weights, stage_a_terms)
    if len(config.data.modalities) > 1:
        assert compare.check_config(config)
    frozen.needs(config, "generate")  # Which trained stages generation would load.
    # The flow family on the same config: valid, and its velocity net fits the family's image size.
    flow_arg = ",".join(filter(None, [arg, "generator=flow", "structure_generator=flow"]))
    flow_config = importlib.import_module(f"configs.{module}").get_config(flow_arg)
    synthesis.check_config(flow_config)
    structure_flow.check_config(flow_config)
    assert structure_flow.is_flow(flow_config) and not structure_flow.is_flow(config)
    hw = (64, 64) if arg == "demo" else (128, 128)
    shapes = flow_synthesis.abstract_params(flow_config, hw + (len(flow_config.data.modalities),))
    assert shapes["params"] and frozen.needs(flow_config, "generate")[-1] == "synthesis"
    stage_a = structure_flow.abstract_params(flow_config, hw + (len(flow_config.data.modalities),))
    assert set(stage_a) == {"params", "ema_params"}


def test_family_configs_follow_the_method_where_the_review_found_them_off():
    """One-modality families, TC and X-ray follow §6.1.4, §5.2 and the real class balance.

    Background weight 0.1 in pre-training, no edge-density terms for TC, and the X-ray pool keeps the
    class "normal" (all-0 class maps).
    """
    configs = {m: importlib.import_module(f"configs.{m}").get_config(None) for m, _ in CONFIGS[2:]}
    for name in ("chest_xray", "lung_ct", "retina", "tianchi_lung_ct"):
        weights = configs[name].synthesis.loss.weights
        assert (weights.pretrain, weights.pretrain_background) == (5.0, 0.1), name
    assert configs["brats2015"].synthesis.loss.weights.pretrain_background == 5.0
    tc = configs["tianchi_lung_ct"].structure.loss.weights
    assert tc.edge_density_recon == tc.edge_density_gen == 0.0
    assert configs["lung_ct"].structure.loss.weights.edge_density_gen == 1e-4
    assert configs["chest_xray"].dataset.pool.keep_empty
    assert not configs["brats2015"].dataset.pool.keep_empty


def test_full_size_configs_follow_the_papers_training_protocol():
    """Budgets, batch sizes and optimisers of §1, §5.3, §6.1.5, §6.3, §8.1 and §8.3 at full size.

    The runlocal configs keep their tiny budgets (the tests' own).
    """
    from configs import family

    def adam(optim, learning_rate, b1=0.5):
        assert (optim.name, optim.learning_rate, optim.b1) == ("adam", learning_rate, b1)

    brats = importlib.import_module("configs.brats2015").get_config(None)
    paper_steps = -(-200 * 13420 // 4)  # ceil(200 epochs × 13 420 slices / batch 4) = 671 000.
    for name in ("structure", "translator", "synthesis"):
        stage = brats[name]
        adam(stage.optim.g, 1e-5)
        adam(stage.optim.d, 1e-5)
        assert stage.train.batch_size == 4, name
    assert brats.structure.train.num_steps == brats.translator.train.num_steps == paper_steps
    # Stage B: the paper's 200 adversarial epochs after its pre-training (length unspecified: ours 20).
    assert brats.synthesis.pretrain_steps == -(-20 * 13420 // 4)
    assert brats.synthesis.train.num_steps - brats.synthesis.pretrain_steps == paper_steps
    adam(brats.segmentor.optim, 1e-5)  # §6.3: the lesion segmentors.
    assert (brats.segmentor.train.batch_size, brats.segmentor.train.num_steps) == (4, paper_steps)
    # §8.1: stage D's segmentor has its own optimiser, 100 epochs of the real set, batch 4.
    adam(brats.verify.optim, 1e-4)
    assert (brats.verify.budget_epochs, brats.verify.batch_size) == (100.0, 4)
    for name in ("structure", "segmentor", "translator", "synthesis"):
        loop = brats[name].train
        assert 0.01 <= loop.eval_every / loop.num_steps <= 0.021 and loop.checkpoint_every == loop.eval_every
        assert 1 <= loop.log_every <= 100
    basegan = importlib.import_module("configs.brats2015").get_config("variant=basegan")
    assert basegan.synthesis.pretrain_steps == 0  # Variants without pre-training keep none.

    xray = importlib.import_module("configs.chest_xray").get_config(None)
    adam(xray.segmentor.optim, 1e-5)  # §8.3: the classifier, 200 epochs of the 5 216 training images.
    assert (xray.segmentor.train.batch_size, xray.segmentor.train.num_steps) == (4, 200 * 5216 // 4)
    adam(xray.verify.optim, 1e-5)
    assert xray.verify.batch_size == 4
    # Every mix trains as many steps as 200 epochs of the largest one (real + 38 % synthetic).
    assert xray.verify.budget_epochs == pytest.approx(200 * 1.38)
    assert xray.structure.train.num_steps == 200 * 1341 // 4  # Stage A: the normal images only.
    adam(xray.structure.optim.g, 1e-5)
    assert xray.synthesis.train.num_steps - xray.synthesis.pretrain_steps == 200 * 5216 // 4

    retina = importlib.import_module("configs.retina").get_config(None)
    assert retina.structure.train.num_steps == 200 * 288 // 4  # DRIVE + FIRE.
    assert retina.segmentor.train.num_steps == 200 * 20 // 4
    assert family.largest_mix(retina.verify.mixes) == 101

    for name in ("brats2015", "chest_xray", "lung_ct", "retina", "tianchi_lung_ct"):
        small = importlib.import_module(f"configs.{name}").get_config("runlocal")
        assert small.structure.train.num_steps <= 4 and "optim" not in small.verify, name


def test_adapters_give_the_one_batch_form():
    image = np.zeros((4, 5, 1), np.float32)
    xray = input_pipeline.ADAPTERS["class_map"]({"image": image, "label": 2, "id": b"x"})
    assert xray["label"].shape == (4, 5) and np.all(xray["label"] == 2) and xray["id"] == b"x"
    lung = input_pipeline.ADAPTERS["mask_label"]({"image": image, "mask": np.ones((4, 5), np.uint8)})
    assert np.all(lung["label"] == 1)
    fov = np.eye(4, 5, dtype=np.uint8)
    retina = input_pipeline.image_and_label(
        input_pipeline.ADAPTERS["vessels"]({"image": image, "label": fov * 0, "mask": fov})
    )
    assert retina["fov"].dtype == bool and np.array_equal(retina["fov"], fov > 0)
    with pytest.raises(ValueError, match="config.data.adapter"):
        input_pipeline.AdaptedSource([], "rgb")


def test_boxes_adapter_repaints_the_label_from_the_kept_classes(family_data_dir):
    """Tianchi: padded normalised boxes, and a label image painted from exactly the boxes kept."""
    image = np.zeros((8, 10, 3), np.float32)
    example = {
        "image": image,
        "label": np.zeros((8, 10), np.uint8),
        "boxes": np.array([[2, 1, 4, 4], [0, 5, 8, 10]], np.float32),  # Pixel edges.
        "box_labels": np.array([1, 5], np.int32),
    }
    both = input_pipeline.ADAPTERS["boxes"](example, max_boxes=3, classes=(1, 5))
    np.testing.assert_allclose(both["boxes"][:2], [[0.25, 0.1, 0.5, 0.4], [0.0, 0.5, 1.0, 1.0]])
    assert both["box_classes"].tolist() == [1, 2, 0]
    expected = np.zeros((8, 10), np.int32)
    expected[2:4, 1:4], expected[:, 5:] = 1, 2
    np.testing.assert_array_equal(both["label"], expected)
    nodules = input_pipeline.ADAPTERS["boxes"](example, max_boxes=3, classes=(1,))
    assert nodules["box_classes"].tolist() == [1, 0, 0] and nodules["label"].max() == 1
    with pytest.raises(ValueError, match="adapter_options.*max_box"):
        input_pipeline.AdaptedSource([], "boxes", {"max_box": 3, "classes": (1,)})

    # Through the Tianchi config on the builder's dummy data (resized to 32²): the one batch form.
    config = _family_config("tianchi_lung_ct", family_data_dir)
    batch = input_pipeline.image_and_label(input_pipeline.open_source(config.data, "train")[0])
    assert batch["image"].shape == (32, 32, 3) and batch["boxes"].shape == (4, 4)
    assert batch["box_classes"][0] == 1 and batch["label"].max() == 1
    painted = input_pipeline.paint_boxes(batch["boxes"], batch["box_classes"], (32, 32))
    np.testing.assert_array_equal(batch["label"], painted)


def test_mix_source_gives_every_detection_example_boxes():
    """Stage D: a real slice keeps its own boxes; synthetic and augmented ones get their label's."""
    label = np.zeros((16, 16), np.int32)
    label[2:6, 3:9] = 1
    real_boxes = np.array([[0.125, 0.1875, 0.375, 0.5625], [0, 0, 0, 0]], np.float32)
    real = [
        {
            "image": np.zeros((16, 16, 3), np.float32),
            "label": label,
            "boxes": real_boxes,
            "box_classes": np.array([1, 0], np.int32),
        }
    ]
    synthetic = [{"image": np.zeros((16, 16, 3), np.float32), "label": label.astype(np.uint8)}]
    entries = np.array([[mixes.REAL, 0], [mixes.SYNTHETIC, 0], [mixes.AUGMENTED, 0]])
    augment = label_pool.AugmentParams(max_rotation=0.0, max_shift=0.2, scale=(1.0, 1.0), flip=True)
    mix = mixes.MixSource(entries, real, synthetic, seed=0, augment=augment, max_boxes=2, num_classes=2)
    for i in range(3):
        example = mix[i]
        assert example["boxes"].shape == (2, 4) and example["box_classes"].tolist() == [1, 0]
        painted = input_pipeline.paint_boxes(example["boxes"], example["box_classes"], (16, 16))
        np.testing.assert_array_equal(painted, example["label"])  # Boxes and label agree, moved or not.
    np.testing.assert_allclose(mix[1]["boxes"], real_boxes)


def test_retina_generators_also_learn_from_fire(family_data_dir):
    """DRIVE's training images plus FIRE's photos, in one form (label, FOV), for stages A and B only."""
    config = _family_config("retina", family_data_dir)
    drive = input_pipeline.open_source(config.data, config.data.train_split)
    both = input_pipeline.gan_training_source(config.data)
    assert len(both) > len(drive)
    first, last = (input_pipeline.image_and_label(both[i]) for i in (0, len(both) - 1))
    assert first.keys() == last.keys() == {"image", "label", "fov"}
    assert last["image"].shape == (32, 32, 3) and not last["label"].any()  # FIRE: no vessel label.


def test_rgb_modalities_split_and_join():
    x = jnp.arange(2 * 3 * 4 * 6, dtype=jnp.float32).reshape(2, 3, 4, 6)  # K = 2 modalities of 3 channels.
    by = registration.by_modality(x, 3)
    assert by.shape == (2, 2, 3, 4, 3)
    np.testing.assert_array_equal(by[1, :, :, :, 0], x[..., 3])
    np.testing.assert_array_equal(registration.channels_last(by), x)
    with pytest.raises(ValueError, match="do not split"):
        registration.by_modality(x, 4)


def test_no_placement_rule_accepts_any_label():
    label = np.zeros((2, 4, 4), np.int32)
    label[:, 0, 0] = 1
    organ = np.zeros((2, 4, 4, 1), np.float32)  # Nothing is organ: the code rule rejects both.
    assert not np.any(fusion.label_fits(label, organ, rule="code"))
    assert np.all(fusion.label_fits(label, organ, rule="none"))
    assert np.all(label_pool.fits(label, organ, rule="none"))


def test_coarse_vessel_labels_drop_the_fov_contour():
    yy, xx = np.mgrid[:32, :32]
    fov = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2 <= 14**2).astype(np.uint8)
    contour = fov & ~((yy - 15.5) ** 2 + (xx - 15.5) ** 2 <= 13**2)
    structure = contour.copy()
    structure[8:24, 16] = 1  # A vessel through the middle.
    labels = extraction.coarse_vessel_labels(structure[None], fov[None], shrink=2)[0]
    assert labels[8:24, 16].all()
    assert not np.any(labels & contour)
    with pytest.raises(ValueError, match="shrink"):
        extraction.coarse_vessel_labels(structure[None], fov[None], shrink=0)


def test_vessel_metrics_count_only_the_field_of_view():
    rng = np.random.default_rng(0)
    vessel = rng.random((2, 16, 16)) < 0.2
    probability = np.clip(vessel * 0.6 + rng.random((2, 16, 16)) * 0.5, 0, 1).astype(np.float32)
    fov = np.zeros((2, 16, 16), bool)
    fov[:, 2:14, 2:14] = True

    def scores(p, v):
        counts = segment.vessel_counts(jnp.asarray(p), jnp.asarray(v), jnp.asarray(fov))
        return segment.vessel_metrics(jax.tree.map(lambda c: np.asarray(c)[None], counts))

    base = scores(probability, vessel)
    # Anything outside the field of view changes nothing.
    outside = ~fov
    changed = scores(np.where(outside, 1.0 - probability, probability), np.where(outside, ~vessel, vessel))
    for name in base:
        np.testing.assert_allclose(changed[name], base[name])
    exact = vessel_lib.vessel_metrics(jnp.asarray(probability), jnp.asarray(vessel), jnp.asarray(fov))
    np.testing.assert_allclose(base["sensitivity"][0], exact["sensitivity"], atol=1e-6)
    np.testing.assert_allclose(base["accuracy"][0], exact["accuracy"], atol=1e-6)
    np.testing.assert_allclose(base["auc"][0], exact["auc"], atol=2e-3)  # 1000-bin histograms.


def test_classifier_separates_two_crafted_classes(family_data_dir):
    """Class 1 images have a bright square somewhere, class 0 images do not; a short run tells them apart."""
    config = _family_config("chest_xray", family_data_dir)
    config.data.num_classes = 2
    # 64² keeps 4×4 maps at the trunk's end: instance norm over a 1×1 map (16² images) would erase them.
    model = classify.make_model(config, (64, 64))
    rng = np.random.default_rng(0)

    def batch(n):
        images = rng.random((n, 64, 64, 1)).astype(np.float32) * 0.3
        classes = rng.integers(0, 2, n)
        for i in np.flatnonzero(classes):
            y, x = rng.integers(0, 52, 2)
            images[i, y : y + 12, x : x + 12] = 1.0
        label = np.broadcast_to(classes[:, None, None], (n, 64, 64)).astype(np.int32)
        return {"image": images, "label": label}

    tx = optax.adam(3e-3)
    state = classify.init_state(jax.random.key(0), batch(2), model=model, tx=tx)
    step = jax.jit(
        functools.partial(classify.train_step, model=model, tx=tx, loss_kind="cross_entropy", num_classes=2)
    )
    for i in range(60):
        state, _ = step(state, batch(16), jax.random.key(i))
    test = batch(64)
    predicted = classify.predict_maps(state.params, test["image"], model=model)
    accuracy = float(np.mean(classify.accuracy_of(predicted, test["label"])))
    assert accuracy >= 0.9, accuracy
