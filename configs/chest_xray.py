"""Config for Kaggle chest X-ray: class-conditional synthesis (normal, bacterial, viral), §6.4 and §8.3.

Usage:
  python -m data_builders build chest_xray --manual_dir=<download> --data_dir=data   # once
  python launch.py --config configs/chest_xray.py --workdir runs/chest_xray
  python launch.py --config configs/chest_xray.py:runlocal --workdir /tmp/xray   # dummy data, CPU, minutes

Options: stage=..., runlocal (the builder's dummy data at 32², tiny models, a few steps), and each stage's
generator family: generator=gan|flow (stage B), structure_generator=gan|flow (stage A).

- Stage A learns structure maps of normal images only: pneumonia is diffuse, so lesion images are left
  out rather than their lesions removed (§3.4).
- The lesion label is the image's class as a constant map (the authors' form), given to G as one-hot
  planes + 0.1 (§3.6, the X-ray code); no placement check (§3.7).
- Stage `segmentor` trains the classifier (`segmentor.task = "classify"`, synth/lesion/classify.py):
  the authors' patch discriminator with 3 output channels, spatially averaged. Frozen, it is stage B's
  lesion processor, stage C's filter (the sample is kept if the classifier sees the asked-for class) and
  stage D's downstream model (accuracy on the real test split, T7).

Full size follows the paper's protocol (`family.paper_protocol`): every stage and the downstream classifier
Adam 1e-5, β1 0.5, batch 4, 200 epochs (§1, §5.3, §6.1.5, §8.3) of Kaggle's training folder: 5 216 images
(stage B, the classifier), the 1 341 normal ones for stage A.

Deviations from the paper (full size):
- Shared by every family (configs/family.py): `norm_output=False`, no E_s input dropout, `g_code_adv` 1,
  `paired_fraction` / `paired_l1`, G on real structure maps, 20 pre-training epochs, eval every 2 %.
- The classifier learns with softmax cross-entropy on its averaged scores, not the code's 0.5·MSE to the
  one-hot class (§6.4, §8.3; `segmentor.loss.kind = "mse_parity"` is the code's), and guides G with it at
  weight 1.
- The training-set sizes are Kaggle's folder counts (METHOD.md gives only the 5 863 total).
- Stage D trains every mix for the same number of steps (§8.1's rule; the paper gives X-ray only "200
  epochs"): 200 epochs of the largest mix (real + ~2 000 synthetic), i.e. 276 epochs of the real set.
"""

import ml_collections

from configs import family


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the chest X-ray config; see the module docstring for the options in `arg`."""
    config, options = family.base_config(arg)
    family.set_data(
        config,
        name="chest_xray",
        builder_config="default",
        adapter="class_map",
        modality="xray",
        num_classes=3,
    )
    family.single_modality(config, extraction="chest_xray", runlocal=options.runlocal)
    config.structure.train_classes = (0,)  # Normal images only.
    config.segmentor.task = "classify"
    config.segmentor.loss = ml_collections.ConfigDict(dict(kind="cross_entropy"))
    config.synthesis.label_fusion = "concat_onehot_plus_0.1"
    config.synthesis.lesion_processor = "classifier"
    config.synthesis.loss.weights.lesion = 1.0  # Cross-entropy of the frozen classifier on G's images.
    # Class maps are not moved: a rotated constant map would gain a background border of class 0.
    config.dataset.pool.augment = ml_collections.ConfigDict(
        dict(max_rotation=0.0, max_shift=0.0, scale=(1.0, 1.0), flip=False, max_tries=1)
    )
    # The all-0 class map is "normal": keep it, so the synthetic set's classes follow the real ones.
    config.dataset.pool.keep_empty = True
    config.dataset.dice = ml_collections.ConfigDict(dict(kind="class", threshold=1.0))
    config.verify.augment.max_rotation = 10.0
    if not options.runlocal:
        for stage in (config.structure, config.segmentor, config.synthesis):
            stage.model.size = "base"
        config.synthesis.flow.size = "base"
        config.structure.flow.size = "base"
        config.dataset.num_examples = 2000  # T7: Kaggle train + 2000 synthetic images.
        config.verify.mixes = ("real=1", "real=1 syn=0.38 mode=M")  # 5216 real + ~2000 synthetic.
        # Kaggle's train folder: 5 216 images, 1 341 of them normal (stage A's).
        family.paper_protocol(config, train_examples=5216, stage_examples=dict(structure=1341))
    else:
        family.runlocal_on_dummy_data(config, "chest_xray")
        config.dataset.dice.threshold = 0.0  # An untrained classifier: keep every sample.
        config.verify.mixes = ("real=1 syn=0.5 mode=M",)
    return config
