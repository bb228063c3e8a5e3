"""Config for the retina family (DRIVE, RGB): synthesis from structure maps, vessel segmentation (§6.5, §8.2).

Usage:
  python -m data_builders build drive --manual_dir=<download> --data_dir=data   # once
  python launch.py --config configs/retina.py --workdir runs/retina
  python launch.py --config configs/retina.py:runlocal --workdir /tmp/retina   # dummy data, CPU, minutes

Options: stage=..., runlocal (the builder's dummy data at 32², tiny models, a few steps).

G maps a noise-fused structure map (extracted from all three channels, §3.3) to an RGB fundus image, with
no lesion input. Synthetic images get coarse vessel labels from their own structure map inside the field
of view shrunk by `dataset.vessel_shrink` (§8.2; the authors described this but never implemented it).
The downstream task (stage D, T6) is vessel segmentation scored by sensitivity, accuracy and AUC inside
the field of view of DRIVE's test images.

Not yet here: FIRE's 268 images as extra unlabelled GAN training data (the authors trained on DRIVE train
+ FIRE); the `fire` builder is ready, but the pipeline reads one dataset.
"""

import ml_collections

from configs import family


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the retina config; see the module docstring for the options in `arg`."""
    config, options = family.base_config(arg)
    family.set_data(
        config,
        name="drive",
        builder_config="default",
        adapter="vessels",
        modality="fundus",
        num_classes=2,
        channels=3,
        eval_split="test",  # DRIVE has train and test only.
    )
    family.single_modality(config, extraction="drive_fire", runlocal=options.runlocal)
    config.segmentor.metrics = "vessel"
    config.segmentor.loss.class_weights = (1.0, 4.0)  # Vessels are ~12 % of the FOV.
    config.dataset.synthetic_label = "vessels"
    if not options.runlocal:
        for stage in (config.structure, config.segmentor, config.synthesis):
            stage.model.size = "base"
        config.dataset.num_examples = 2000  # T6: DRIVE train + 2000 synthetic images.
        config.verify.mixes = ("real=1", "real=1 syn=100 mode=M")  # 20 real + 2000 synthetic.
    else:
        family.runlocal_on_dummy_data(config, "drive", eval_max_examples=2)
        config.verify.mixes = ("real=1 syn=1 mode=M",)
    return config
