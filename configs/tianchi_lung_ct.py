"""Config for Tianchi 2019 lung CT (TC): box-conditioned 3-slice CT synthesis with an SSD detector (§6.6).

Usage:
  python -m data_builders build tianchi_lung_ct/slices --manual_dir=<download> --data_dir=data   # once
  python launch.py --config configs/tianchi_lung_ct.py --workdir runs/tianchi
  python launch.py --config configs/tianchi_lung_ct.py:runlocal --workdir /tmp/tianchi   # dummy data, CPU

Options: stage=..., runlocal (the builder's dummy data at 32², tiny models, a few steps), and each stage's
generator family: generator=gan|flow (stage B), structure_generator=gan|flow (stage A).

Each example is an annotated slice with its two neighbours as 3 channels (§2.1) and the boxes of its
lesions. The `boxes` adapter turns the builder's pixel boxes into padded, normalised ones and repaints the
label as the box-label image L_image of §6.6 (each box filled with its class). G takes the noise-fused
structure map with `one_hot(L_image) + 0.1` (the code's fusion) and makes the three slices; no placement
check (§3.7). The real-trained SSD detector (`segmentor.task = "detect"`, `synth.lesion.detect`, with
the §11.22 defects fixed) is frozen as G's lesion processor: its multibox loss against the boxes of the
drawn label guides G (weight 1, §6.6). Stage C keeps a synthetic slice when the detector's confident boxes
cover the asked-for ones (whole Dice of the painted boxes, `dataset.dice`) and writes each sample's boxes,
read back from its label, into the TFDS dataset as the real builder does (`boxes`, `box_labels`). Stage D
trains the detector on real, synthetic and mixed data and reports VOC mAP@0.5 on the real test split (T8).

Nodules only (Tianchi class 1), as the paper. Other classes: build the dataset with them
(`--set classes=1,5`) and run with `--config.data.adapter_options.classes='(1, 5)'
--config.data.num_classes=3` (background + one class per kept id).

Full size follows the paper's protocol (`family.paper_protocol`): stages A and B, the SSD and stage D's SSD
Adam 1e-5, β1 0.5, batch 4, 200 epochs (§1, §5.3, §6.1.5, §6.6's DETECTION script).

Deviations from the paper (full size):
- §3.3 extracts a structure map from each of the three slices; here the map is the centre slice's
  (`structure.extraction.channel = 1`) and G makes all three slices from it (1–2.5 mm apart, they share
  their anatomy). Stage A and G's input then stay one-channel like every other family.
- Shared by every family (configs/family.py): `norm_output=False`, no E_s input dropout, `g_code_adv` 1,
  `paired_fraction` / `paired_l1`, G on real structure maps, 20 pre-training epochs, eval every 2 %.
- The SSD uses the standard box pipeline (matching, hard-negative mining, NMS), fixing §11.22.
- METHOD.md gives 1 470 training CTs but not how many annotated nodule slices they make: the step counts
  assume 1 470 training examples (one per CT); set `train.num_steps` from the built split's size.
- §8.4 gives stage D no budget: 200 epochs of the largest mix (real + 20 000 synthetic), the same steps for
  every mix (§8.1's rule).
"""

import ml_collections

from configs import family

# §6.6: L_D = 2·mse(d(x), 1) + 2·mse(d(x_g), 0); L_G = 2·mse(d(x_g), 1) + L_det(x_g), plus L_pre (§6.1.4).
TIANCHI_WEIGHTS = dict(family.SINGLE_MODALITY_WEIGHTS, g_adversarial=2.0, d_real=2.0, d_fake=2.0, lesion=1.0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the Tianchi lung CT config; see the module docstring for the options in `arg`."""
    config, options = family.base_config(arg)
    family.set_data(
        config,
        name="tianchi_lung_ct",
        builder_config="slices",
        adapter="boxes",
        modality="ct",
        num_classes=2,  # Background and nodule.
        channels=3,  # Slices k-1, k, k+1.
    )
    config.data.adapter_options = ml_collections.ConfigDict(dict(max_boxes=16, classes=(1,)))
    # The centre slice's structure map (see the module docstring).
    family.single_modality(config, extraction="tianchi", runlocal=options.runlocal, channel=1)
    config.structure.remove_lesions = True  # Nodules are localised lesions (§3.4).
    # §5.2: the TC code has no edge-density terms.
    config.structure.loss.weights.edge_density_recon = 0.0
    config.structure.loss.weights.edge_density_gen = 0.0
    config.segmentor.task = "detect"
    config.segmentor.model.size = "base" if not options.runlocal else "tiny"
    config.segmentor.model.activation = "relu"  # The SSD's (§6.6), as VGG.
    # SSD settings (synth.lesion.detect): the code's six maps and scales at 512², standard matching.
    config.segmentor.detector = ml_collections.ConfigDict(
        dict(
            num_maps=6,
            min_scale=0.05,
            max_scale=0.9,
            neg_pos_ratio=3,
            score_threshold=0.5,
            iou_threshold=0.45,
            max_detections=20,
            eval_score_threshold=0.01,
        )
    )
    config.synthesis.label_fusion = "concat_onehot_plus_0.1"
    config.synthesis.lesion_processor = "detector"
    config.synthesis.loss.weights = ml_collections.ConfigDict(dict(TIANCHI_WEIGHTS))
    # Box labels stay boxes: no rotation (it would turn them into rotated rectangles).
    config.dataset.pool.augment.max_rotation = 0.0
    config.verify.augment.max_rotation = 0.0
    config.dataset.dice = ml_collections.ConfigDict(dict(kind="whole", threshold=0.5))
    if not options.runlocal:
        for stage in (config.structure, config.synthesis):
            stage.model.size = "base"
        config.synthesis.flow.size = "base"
        config.structure.flow.size = "base"
        config.dataset.num_examples = 20000  # T8: TC train + 20 000 synthetic CTs.
        config.verify.mixes = ("real=1", "real=1 syn=13.6 mode=M")  # ~1 470 real slices + 20 000.
        family.paper_protocol(config, train_examples=1470)  # An estimate: see the module docstring.
    else:
        family.runlocal_on_dummy_data(config, "tianchi_lung_ct", eval_max_examples=2)
        # The dummy series are 16×12 and hold few lesions: resize, and one example per crossed slice.
        config.data.builder_overrides.all_box_slices = True
        config.data.adapter_options.max_boxes = 4
        # The dummy boxes are 2-13 px at 32²; a briefly trained detector is under-confident.
        config.segmentor.detector.update(
            dict(num_maps=3, min_scale=0.1, max_scale=0.5, score_threshold=0.3, max_detections=10)
        )
        config.dataset.dice.threshold = 0.0  # An untrained detector: keep every sample.
        config.verify.mixes = ("real=1 syn=1 mode=M",)
    return config
