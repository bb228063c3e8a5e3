"""Config for Kaggle chest X-ray: class-conditional synthesis (normal, bacterial, viral), §6.4 and §8.3.

Usage:
  python -m data_builders build chest_xray --manual_dir=<download> --data_dir=data   # once
  python launch.py --config configs/chest_xray.py --workdir runs/chest_xray
  python launch.py --config configs/chest_xray.py:runlocal --workdir /tmp/xray   # dummy data, CPU, minutes

Options: stage=..., runlocal (the builder's dummy data at 32², tiny models, a few steps).

- Stage A learns structure maps of normal images only: pneumonia is diffuse, so lesion images are left
  out rather than their lesions removed (§3.4).
- The lesion label is the image's class as a constant map (the authors' form), given to G as one-hot
  planes + 0.1 (§3.6, the X-ray code); no placement check (§3.7).
- Stage `segmentor` trains the classifier (`segmentor.task = "classify"`, synth/lesion/classify.py):
  the authors' patch discriminator with 3 output channels, spatially averaged. Frozen, it is stage B's
  lesion processor, stage C's filter (the sample is kept if the classifier sees the asked-for class) and
  stage D's downstream model (accuracy on the real test split, T7).
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
        config.dataset.num_examples = 2000  # T7: Kaggle train + 2000 synthetic images.
        config.verify.mixes = ("real=1", "real=1 syn=0.38 mode=M")  # 5216 real + ~2000 synthetic.
    else:
        family.runlocal_on_dummy_data(config, "chest_xray")
        config.dataset.dice.threshold = 0.0  # An untrained classifier: keep every sample.
        config.verify.mixes = ("real=1 syn=0.5 mode=M",)
    return config
