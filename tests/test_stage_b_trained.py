"""Stage B trained on the tiny phantom: lesion fidelity, registration consistency, sharding, provenance.

The trained fixture runs the real segmentor and synthesis stages on the tiny phantom with XLA's
optimisations on (their run time, not compile time, dominates). It leaves the translator out (registration
weights 0): a few CPU steps cannot train a useful G_t, and a random one only disturbs G.
test_stage_b_wiring.py checks the registration path's gradients and, in the slow suite, the whole stage on
four devices against one, with random frozen networks.

In the slow suite (`make test-slow`): the fixture trains two stages for four minutes of the 2 cores, a
third of the fast suite's budget. Its tests share one worker (`xdist_group`), so the fixture runs once.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_mode import optimised

from synth import (
    conditioning,
    configlib,
    extraction,
    frozen,
    input_pipeline,
    lesion,
    scoring,
    synthesis_nets,
)
from synth import workdir as workdir_lib
from synth.stages import segmentor, synthesis

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stage_b_trained")]

# Thresholds of the trained checks, and what 80-150 segmentor and 160-300 synthesis steps at 32² gave when
# they were set (2026-11-25, five runs; the fixture runs 85 and 170 to keep the suite in its budget). With
# FiLM, the paired L1 anchor and no output norm (2026-12-03, one run): lesion Dice 0.29 against a chance of
# 0.015 (another lesion, same rows), structure agreement 0.87 against 0.81 real; with G at 4e-4
# (2026-12-05, two runs) lesion Dice 0.48-0.51, structure agreement 0.85-0.86.
# segmentor whole-tumour Dice 0.42-0.48 on real images; lesion Dice on synthetic images 0.27-0.45 against
# a chance level (another sample's lesion) of 0.05-0.12, a ratio of 2.4-8; structure agreement between the
# synthetic modalities 0.67-0.98, between the real ones 0.81.
MIN_REAL_WHOLE_DICE = 0.3
MIN_SYNTHETIC_LESION_DICE = 0.2
MIN_LESION_OVER_CHANCE = 2.0
MIN_AGREEMENT_VS_REAL = 0.7
MAX_INTERMODALITY_GAP = 0.1  # Issue 17's target on the benchmark.


@pytest.fixture(scope="module")
def trained(phantom_data_dir, tmp_path_factory):
    from configs import phantom

    config = phantom.get_config("runlocal")
    config.data.data_dir = phantom_data_dir
    # One device: four simulated ones only split the same two cores, and run this tiny step ~2× slower.
    # Sharding is the last test's subject.
    config.mesh.shape = (1,)
    config.segmentor.train = configlib.loop_config(
        num_steps=85, batch_size=8, log_every=85, checkpoint_every=85, eval_every=85
    )
    config.synthesis.loss.weights.registration = config.synthesis.loss.weights.agreement = 0.0
    # G learns at 4e-4, not the configs' 1e-4: at 1e-4 its 170 steps left the modalities almost alike
    # (contrast 0.041 against 0.137 real, on the 0.3x threshold below; 0.040 with LLVM level 2), so the
    # test passed or failed on float rounding. At 4e-4: 0.073 (level 3) and 0.084 (level 2), lesion Dice
    # 0.48-0.51 against 0.015-0.017 chance (2026-12-05).
    config.synthesis.optim.g.learning_rate = 4e-4
    config.synthesis.pretrain_steps = 60
    config.synthesis.eval.num_examples = 16
    config.synthesis.train = configlib.loop_config(
        num_steps=170, batch_size=8, log_every=85, checkpoint_every=170, eval_every=170
    )
    workdir = tmp_path_factory.mktemp("stage_b")
    with optimised():
        segmentor.run(config, workdir)
        synthesis.run(config, workdir)
    evals = {
        name: json.loads((workdir / name / "last_eval.json").read_text())
        for name in ("segmentor", "synthesis")
    }
    return config, workdir, evals


def test_segmentor_finds_tumours_in_real_images(trained):
    _, _, evals = trained
    assert evals["segmentor"]["eval/dice_whole/mean"] >= MIN_REAL_WHOLE_DICE, evals["segmentor"]


def test_synthetic_images_show_the_asked_for_lesion(trained):
    _, workdir, evals = trained
    ev = evals["synthesis"]
    assert ev["eval/lesion_dice"] >= MIN_SYNTHETIC_LESION_DICE, ev
    assert ev["eval/lesion_dice"] >= MIN_LESION_OVER_CHANCE * ev["eval/lesion_dice_chance"], ev
    assert list((workdir / "synthesis" / "samples").glob("structure_label_t1_t2_t1c_flair_*.png"))


def test_modality_code_changes_contrast_not_anatomy(trained):
    config, workdir, evals = trained
    trained_g, _ = frozen.load(config, workdir, "synthesis", fields=("g_params",))
    models = synthesis_nets.make_models(config, (32, 32))
    source = input_pipeline.open_source(config.data, config.data.eval_split)
    batch = jax.tree.map(lambda *x: np.stack(x), *[synthesis.preprocess(source[i]) for i in range(8)])
    params = extraction.ExtractionParams.from_config(config.structure.extraction)

    @jax.jit
    def generate(g_params, batch):
        inputs = conditioning.make_inputs(
            batch, jax.random.key(0), {}, models=models, config=config, pretraining=jnp.asarray(False)
        )
        fakes = synthesis_nets.synthesize(models, g_params, inputs.g_input, 4)[..., 0]  # (K, B, H, W)
        # Misregistered reference: modality k shifted by 2k pixels. (Other samples are no reference: the
        # phantom heads are alike, and their maps agree at 0.6.)
        mixed = jnp.stack([jnp.roll(fakes[k], 2 * k, axis=2) for k in range(4)])
        agreement = [
            jnp.mean(scoring.structure_agreement(jnp.moveaxis(x, 0, -1), inputs.organ, params))
            for x in (fakes, mixed)
        ]
        return fakes, inputs.organ[..., 0], agreement

    fakes, organ, (agreement, misregistered) = jax.tree.map(
        np.asarray, generate(trained_g["g_params"], batch)
    )
    # Anatomy: structure maps extracted from each synthetic modality agree about as well as the real
    # modalities' do, and clearly better than misregistered ones (seen: 0.85-0.86 against 0.53-0.55; real
    # 0.81 against 0.53).
    ev = evals["synthesis"]
    assert ev["eval/structure_agreement"] >= MIN_AGREEMENT_VS_REAL * ev["eval/structure_agreement_real"], ev
    assert agreement > misregistered + 0.1, (agreement, misregistered)

    # Contrast: one G, four codes, and the outputs differ like real modalities do, not by a rounding error.
    real = np.moveaxis(batch["image"], -1, 0)

    def contrast(x):  # Mean |x_i - x_j| inside the organ over modality pairs.
        return np.mean([np.abs(x[i] - x[j])[organ > 0].mean() for i in range(4) for j in range(i + 1, 4)])

    # Seen: 0.073-0.084 against 0.137 real (0.53-0.61x).
    assert contrast(fakes) > 0.3 * contrast(real), (contrast(fakes), contrast(real))
    # Alike modalities show as inter-modality MS-SSIM above the real one (seen with FiLM: 0.62 against 0.59
    # real; the code's concatenated condition gave 0.96 against 0.56 on the demo).
    quality = scoring.image_quality(
        batch["image"],
        np.moveaxis(fakes, 0, -1),
        key=jax.random.key(0),
        num_pairs=16,
        modalities=config.data.modalities,
    )
    assert quality["intermodality/synthetic"] <= quality["intermodality/real"] + MAX_INTERMODALITY_GAP, (
        quality
    )


def test_resume_after_retraining_a_frozen_stage_is_refused(trained, tmp_path):
    config, workdir, _ = trained
    spec = synthesis.build(config, workdir=workdir)
    changed = dataclasses.replace(spec, provenance={"segmentor_step": 1})
    stage_dir = tmp_path / "synthesis"
    stage_dir.mkdir()
    (stage_dir / "stage_config.json").write_text(
        json.dumps(workdir_lib.fingerprint("synthesis", config, spec.provenance))
    )
    with pytest.raises(ValueError, match="segmentor_step"):
        workdir_lib.check_same_config(
            "synthesis", str(stage_dir), workdir_lib.fingerprint("synthesis", config, changed.provenance)
        )


def test_dice_filter_rejects_a_sample_whose_lesion_was_removed(trained):
    """Stage C's lesion filter (§7.1 step 8) with real-trained segmentors.

    The same slices with and without their tumour (the phantom draws both from one seed) are scored against
    the tumour's label: the filter keeps the first and rejects every one of the second.
    """
    from data_builders.phantom import anatomy

    config, workdir, _ = trained
    processor = lesion.processor(config, (32, 32))
    params = frozen.load(config, workdir, "segmentor")[0]["params"]
    score = jax.jit(
        lambda images, label: scoring.filter_dice(
            processor.predict(params, images), label, kind="whole", num_classes=5
        )
    )
    with_tumour, without = (anatomy.make_subject(7, 32, 4, has_tumour=flag) for flag in (True, False))
    slices = np.flatnonzero((with_tumour["label"] > 0).sum(axis=(1, 2)) >= 8)  # Clearly visible tumours.
    assert len(slices) >= 2
    label = jnp.asarray(with_tumour["label"][slices], jnp.int32)
    found = np.asarray(score(jnp.asarray(with_tumour["image"][slices]), label))
    removed = np.asarray(score(jnp.asarray(without["image"][slices]), label))
    # These 100-step segmentors also mark some tumour-free tissue where tumours tend to be (0.08-0.22 seen),
    # so the filter's threshold here is the Dice they reach on real tumours.
    threshold = MIN_REAL_WHOLE_DICE
    assert (found > removed).all() and (found >= threshold).any(), (found, removed)
    assert (removed < threshold).all(), (found, removed)
