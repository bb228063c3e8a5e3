"""Tests of the SSD lesion detector (synth.models.detector) and its box pipeline (synth.boxes).

Compiles are the cost on CPU, so one module-scoped fixture trains a small SSD on crafted blob images
and shares its compiled forward/detect function with the tests that need a model output; the other
tests run on hand-made arrays or abstract shapes (``jax.eval_shape``, no compile).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synth import boxes
from synth.metrics.detection import mean_average_precision
from synth.models import sizes
from synth.models.detector import SSD, default_boxes, feature_map_sizes

IMAGE_SIZE = 32
MAX_BOXES = 2  # Blobs per crafted image: 1 or 2.
# features=4 (half the "tiny" variant): the training run's cost is the convs, and 4 suffices for blobs.
TRAIN_MODEL = SSD(features=4, num_classes=1, num_maps=3, min_scale=0.2, max_scale=0.6)
TRAIN_STEPS = 150
BATCH = 8
EVAL_IMAGES = 64
MIN_MAP = 0.5  # Seen 0.91 with these seeds, 0.76-0.93 over other seeds; chance is ~0.


def _blob_images(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dark noisy images with 1-2 bright, non-touching squares; the squares are the boxes (class 1)."""
    images = rng.normal(0.1, 0.03, (count, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    gt_boxes = np.zeros((count, MAX_BOXES, 4), np.float32)
    gt_classes = np.zeros((count, MAX_BOXES), np.int32)
    for i in range(count):
        placed: list[tuple[int, int, int, int]] = []
        wanted = rng.integers(1, MAX_BOXES + 1)
        while len(placed) < wanted:
            side = int(rng.integers(6, 13))  # 0.19-0.38 of the image: the sizes the priors cover.
            y0, x0 = (int(v) for v in rng.integers(0, IMAGE_SIZE - side + 1, 2))
            box = (y0, x0, y0 + side, x0 + side)
            # A 1-pixel gap keeps two blobs from merging into one bright rectangle.
            if any(box[0] <= p[2] and p[0] <= box[2] and box[1] <= p[3] and p[1] <= box[3] for p in placed):
                continue
            placed.append(box)
        for j, (y0, x0, y1, x1) in enumerate(placed):
            images[i, y0:y1, x0:x1] += rng.uniform(0.6, 1.0)
            gt_boxes[i, j] = np.array([y0, x0, y1, x1], np.float32) / IMAGE_SIZE
            gt_classes[i, j] = 1
    return images, gt_boxes, gt_classes


def _host_init(model: SSD, input_shape: tuple[int, ...], rng: np.random.Generator) -> dict:
    """Draw the SSD's initial parameters on the host, from the same distributions as ``model.init``.

    Kernels N(0, 0.02), biases and norm offsets 0, norm scales 1. ``model.init`` itself compiles a
    random draw per parameter (about 3 s on CPU, 6 s eagerly) — more than the whole training run.
    """
    abstract = jax.eval_shape(
        functools.partial(model.init, jax.random.key(0)), jax.ShapeDtypeStruct(input_shape, jnp.float32)
    )

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0.0, 0.02, leaf.shape).astype(np.float32)
        return np.full(leaf.shape, 1.0 if name == "scale" else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def trained():
    """Train the small SSD on blob images once; share params, losses and the compiled forward + detect."""
    priors = jnp.asarray(TRAIN_MODEL.priors((IMAGE_SIZE, IMAGE_SIZE)))
    params = _host_init(TRAIN_MODEL, (1, IMAGE_SIZE, IMAGE_SIZE, 1), np.random.default_rng(0))
    optimiser = optax.adam(1e-3)
    opt_state = jax.jit(optimiser.init)(params)  # One compile instead of an eager op per leaf.
    match = jax.vmap(functools.partial(boxes.match, priors=priors))

    @jax.jit
    def train_step(params, opt_state, images, gt_boxes, gt_classes):
        def loss_fn(p):
            class_logits, offsets = TRAIN_MODEL.apply(p, images, train=True)
            class_targets, loc_targets = match(gt_boxes, gt_classes)
            return boxes.multibox_loss(class_logits, offsets, class_targets, loc_targets)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, terms

    @jax.jit
    def infer(params, images):
        class_logits, offsets = TRAIN_MODEL.apply(params, images)
        detections = boxes.detect(class_logits, offsets, priors, score_threshold=0.05, max_detections=10)
        return detections, class_logits, offsets

    rng = np.random.default_rng(0)
    losses, terms = [], []
    for _ in range(TRAIN_STEPS):
        params, opt_state, loss, step_terms = train_step(params, opt_state, *_blob_images(rng, BATCH))
        losses.append(loss)
        terms.append(step_terms)
    return {
        "params": params,
        "infer": infer,
        "priors": priors,
        "losses": np.asarray(jax.device_get(losses)),
        "terms": jax.device_get(terms),
        "eval_data": _blob_images(np.random.default_rng(1), EVAL_IMAGES),
    }


# ----------------------------------------------------------------------------------- box arithmetic


def test_corner_centre_round_trip():
    corners = jnp.array([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.35, 0.4]])
    centre = boxes.corners_to_centre(corners)
    np.testing.assert_allclose(centre[0], [0.3, 0.55, 0.4, 0.7], atol=1e-6)
    np.testing.assert_allclose(boxes.centre_to_corners(centre), corners, atol=1e-6)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    priors = jnp.asarray(default_boxes((64, 64), 3))
    gt = jnp.asarray(
        np.concatenate(
            [rng.uniform(0, 1, (len(priors), 2)), rng.uniform(0.02, 0.8, (len(priors), 2))], axis=1
        )
    )
    offsets = boxes.encode(gt, priors)
    np.testing.assert_allclose(boxes.decode(offsets, priors), gt, rtol=1e-5, atol=1e-6)
    # A box equal to its prior encodes to zero; the variances scale the offsets as in SSD.
    np.testing.assert_allclose(boxes.encode(priors, priors), 0.0, atol=1e-6)
    shifted = priors.at[:, 0].add(0.1 * priors[:, 2])
    np.testing.assert_allclose(boxes.encode(shifted, priors)[:, 0], 1.0, rtol=1e-4)


# ----------------------------------------------------------------------------------- default boxes


@pytest.mark.parametrize(
    ("image_hw", "num_maps", "expected"),
    [
        ((512, 512), 6, 24_528),
        ((32, 32), 3, 94),
        ((48, 48), 3, 222),
        ((64, 48), 3, 288),
        ((256, 256), 6, 6_132),
    ],
)
def test_default_box_count_matches_model(image_hw, num_maps, expected):
    model = SSD(features=4, num_classes=2, num_maps=num_maps)
    x = jax.ShapeDtypeStruct((2, *image_hw, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, jax.random.key(0)), x)
    class_logits, offsets = jax.eval_shape(model.apply, variables, x)
    priors = default_boxes(image_hw, num_maps)
    assert priors.shape == (expected, 4) == model.priors(image_hw).shape
    assert class_logits.shape == (2, expected, 3)  # 2 foreground classes + background.
    assert offsets.shape == (2, expected, 4)
    assert not jax.tree.leaves(variables.get("batch_stats", {}))  # Nothing mutable: train == eval.


def test_default_box_layout():
    assert feature_map_sizes((512, 512), 6) == ((64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2))
    assert feature_map_sizes((48, 40), 3) == ((6, 5), (3, 3), (2, 2))
    priors = default_boxes((32, 32), 3, min_scale=0.2, max_scale=0.6)
    # Map 1 is 4×4 with 4 boxes per cell: cell (0, 0) first, then (0, 1), ...: row-major, boxes innermost.
    np.testing.assert_allclose(priors[:4, :2], [[0.125, 0.125]] * 4)
    np.testing.assert_allclose(priors[4, :2], [0.125, 0.375])
    # Ratios (1, 2, 1/2): w = s·√r, h = s/√r; then the extra √(s_k·s_{k+1}) square box.
    s, r2 = 0.2, np.sqrt(2.0)
    np.testing.assert_allclose(
        priors[:4, 2:], [[s, s], [s / r2, s * r2], [s * r2, s / r2], [0.4**0.5 * s**0.5] * 2]
    )
    with pytest.raises(ValueError, match="num_maps"):
        default_boxes((32, 32), 7)


def test_detector_sizes():
    assert sizes.detector_kwargs("tiny", (32, 32), num_maps=3) == {"features": 8}
    assert sizes.detector_kwargs("base", (512, 512)) == {"features": 64}
    with pytest.raises(ValueError, match="too small"):
        sizes.detector_kwargs("small", (128, 128), num_maps=6)


# ----------------------------------------------------------------------------------- matching, loss


def test_match_positives_padding_and_targets():
    priors = jnp.asarray(default_boxes((32, 32), 3, min_scale=0.2, max_scale=0.6))
    pad = [0.0, 0.0, 0.0, 0.0]
    gt_boxes = jnp.array(
        [
            [[0.1, 0.1, 0.3, 0.3], [0.5, 0.55, 0.95, 0.9], pad],  # Two boxes + padding.
            [pad, pad, pad],  # Padding only.
            [[0.40, 0.40, 0.43, 0.43], pad, pad],  # Too small for any prior to reach IoU 0.5.
        ]
    )
    gt_classes = jnp.array([[1, 2, 0], [0, 0, 0], [1, 0, 0]])
    # One compile for all three images: matching under jit and vmap, as in a train step.
    class_targets, loc_targets = jax.jit(jax.vmap(functools.partial(boxes.match, priors=priors)))(
        gt_boxes, gt_classes
    )
    assert class_targets.shape == (3, len(priors)) and class_targets.dtype == jnp.int32
    # Each real box has at least one positive of its class; nothing else is positive.
    assert int(jnp.sum(class_targets[0] == 1)) >= 1 and int(jnp.sum(class_targets[0] == 2)) >= 1
    assert set(np.unique(class_targets[0]).tolist()) == {0, 1, 2}
    # Padding rows never produce positives; an image with none is all background with zero targets.
    assert not jnp.any(class_targets[1]) and not jnp.any(loc_targets[1])
    # The targets of every positive decode back to its ground-truth box.
    decoded = boxes.centre_to_corners(boxes.decode(loc_targets, priors))
    for image, cls, box in ((0, 1, gt_boxes[0, 0]), (0, 2, gt_boxes[0, 1]), (2, 1, gt_boxes[2, 0])):
        matched = decoded[image][class_targets[image] == cls]
        np.testing.assert_allclose(matched, np.broadcast_to(box, matched.shape), atol=1e-5)
    # The small box still gets exactly its best prior (forced match).
    assert int(jnp.sum(class_targets[2])) == 1


def test_multibox_loss_mining_and_normalisation():
    num_priors = 10
    class_targets = jnp.zeros((2, num_priors), jnp.int32).at[0, 0].set(1)
    # Image 0: one positive; negatives 1..9 get increasing foreground logits (harder negatives).
    logits = jnp.zeros((2, num_priors, 2)).at[0, :, 1].set(jnp.arange(num_priors, dtype=jnp.float32))
    offsets = jnp.zeros((2, num_priors, 4)).at[0, 0].set(jnp.array([0.5, -0.5, 2.0, 0.0]))
    loc_targets = jnp.zeros((2, num_priors, 4))
    loss_fn = jax.jit(functools.partial(boxes.multibox_loss, min_negatives=2))  # One compile, two calls.
    loss, terms = loss_fn(logits, offsets, class_targets, loc_targets)
    labels = class_targets[..., None]
    cross_entropy = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels, -1)[..., 0]
    # Image 0: the positive + its 3 hardest negatives (priors 7, 8, 9); image 1 (no positives): 2 negatives.
    expected = cross_entropy[0, 0] + jnp.sum(cross_entropy[0, 7:]) + 2 * cross_entropy[1, 0]
    np.testing.assert_allclose(terms["classification"], expected, rtol=1e-5)  # One positive: divide by 1.
    np.testing.assert_allclose(terms["localisation"], 0.125 + 0.125 + 1.5, rtol=1e-5)  # Smooth L1.
    np.testing.assert_allclose(loss, terms["classification"] + terms["localisation"], rtol=1e-6)
    assert int(terms["num_positives"]) == 1
    # No positives anywhere: finite (normaliser guarded at 1), only 2 mined negatives per image count.
    loss_empty, terms_empty = loss_fn(logits, offsets, jnp.zeros_like(class_targets), loc_targets)
    np.testing.assert_allclose(loss_empty, jnp.sum(cross_entropy[0, 8:]) + 2 * cross_entropy[1, 0], rtol=1e-5)
    assert float(terms_empty["localisation"]) == 0.0


# ----------------------------------------------------------------------------------- decoding, NMS


def test_detect_nms_and_padding():
    priors = jnp.array(
        [[0.5, 0.5, 0.2, 0.2], [0.52, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]
    )
    logits = jnp.log(
        jnp.array([[[0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.3, 0.0, 0.7], [0.99, 0.01, 0.0]]]) + 1e-9
    )
    detect = jax.jit(functools.partial(boxes.detect, score_threshold=0.5, max_detections=5, pre_nms_top_k=3))
    out = detect(logits, jnp.zeros((1, 4, 4)), priors)
    assert out["boxes"].shape == (1, 5, 4) and out["valid"].shape == (1, 5)
    # Prior 1 overlaps prior 0 (IoU 0.82) in the same class: suppressed; prior 3 is background.
    np.testing.assert_array_equal(out["valid"][0], [True, True, False, False, False])
    np.testing.assert_allclose(out["scores"][0, :2], [0.9, 0.7], rtol=1e-5)
    np.testing.assert_array_equal(out["classes"][0], [1, 2, 0, 0, 0])
    np.testing.assert_allclose(out["boxes"][0, 0], [0.4, 0.4, 0.6, 0.6], atol=1e-6)
    np.testing.assert_allclose(out["boxes"][0, 2:], 0.0)


# ----------------------------------------------------------------------------------- Tianchi conversion


def test_tianchi_ground_truth():
    pixel_boxes = np.array([[10, 20, 30, 40], [0, 0, 5, 5], [50, 60, 70, 90]], np.float32)
    labels = np.array([1, 5, 31])
    gt_boxes, gt_classes = boxes.tianchi_ground_truth(pixel_boxes, labels, (100, 200), max_boxes=4)
    np.testing.assert_allclose(gt_boxes[0], [0.1, 0.1, 0.3, 0.2])
    np.testing.assert_array_equal(gt_classes, [1, 0, 0, 0])  # Nodules only by default.
    gt_boxes, gt_classes = boxes.tianchi_ground_truth(
        pixel_boxes, labels, (100, 200), max_boxes=3, selected_classes=(31, 1)
    )
    np.testing.assert_array_equal(gt_classes, [2, 1, 0])  # Order of selected_classes: 31 -> 1, 1 -> 2.
    np.testing.assert_allclose(gt_boxes[1], [0.5, 0.3, 0.7, 0.45])
    with pytest.raises(ValueError, match="max_boxes"):
        boxes.tianchi_ground_truth(pixel_boxes, labels, (100, 200), max_boxes=1, selected_classes=(1, 5))
    with pytest.raises(ValueError, match="selected_classes"):
        boxes.tianchi_ground_truth(pixel_boxes, labels, (100, 200), max_boxes=3, selected_classes=(2,))


# ----------------------------------------------------------------------------------- trained model


def test_training_loss_decreases(trained):
    losses = trained["losses"]
    assert np.all(np.isfinite(losses))
    assert losses[-20:].mean() < 0.7 * losses[:10].mean()
    assert min(int(t["num_positives"]) for t in trained["terms"]) >= BATCH  # Every blob gets a positive.


def test_heads_are_linear(trained):
    images, _, _ = trained["eval_data"]
    _, class_logits, offsets = trained["infer"](trained["params"], images)
    # The authors' heads ended in ReLU (§11.22); a linear head scores and regresses with both signs.
    assert float(jnp.min(class_logits)) < 0 < float(jnp.max(class_logits))
    assert float(jnp.min(offsets)) < 0 < float(jnp.max(offsets))


def test_output_order_follows_default_boxes(trained):
    # Zero the box heads' kernels and give every (map, box slot) its own bias: each output must then
    # carry the bias of the slot that default_boxes lists at the same index (maps, cells, then slots).
    params = jax.tree.map(lambda x: x, trained["params"])
    expected = []
    for k, (map_h, map_w) in enumerate(feature_map_sizes((IMAGE_SIZE, IMAGE_SIZE), TRAIN_MODEL.num_maps)):
        head = params["params"][f"box_head{k + 1}"]
        bias = 100.0 * (k + 1) + jnp.arange(head["bias"].size, dtype=jnp.float32)
        params["params"][f"box_head{k + 1}"] = {"kernel": jnp.zeros_like(head["kernel"]), "bias": bias}
        expected.append(np.tile(np.asarray(bias).reshape(-1, 4), (map_h * map_w, 1)))
    images, _, _ = trained["eval_data"]
    _, _, offsets = trained["infer"](params, images)  # Same shapes as elsewhere: no recompile.
    np.testing.assert_allclose(offsets[3], np.concatenate(expected), rtol=1e-6)
    # Slot sizes follow the priors too: each cell's box count equals default_boxes' per map.
    assert offsets.shape[1] == len(trained["priors"])


def test_training_finds_blobs(trained):
    images, gt_boxes, gt_classes = trained["eval_data"]
    detections = jax.device_get(trained["infer"](trained["params"], images)[0])
    valid = detections["valid"]
    mean_ap, _ = mean_average_precision(
        [b[v] for b, v in zip(detections["boxes"], valid)],
        [s[v] for s, v in zip(detections["scores"], valid)],
        [c[v] for c, v in zip(detections["classes"], valid)],
        [b[c > 0] for b, c in zip(gt_boxes, gt_classes)],
        [c[c > 0] for c in gt_classes],
    )
    assert mean_ap > MIN_MAP, f"mAP@0.5 {mean_ap:.3f} on held-out blob images"
