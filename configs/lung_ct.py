"""Config for Kaggle lung CT (finding-lungs-in-ct-data): unconditional structure-to-CT synthesis (§6.5).

Usage:
  python -m data_builders build lung_ct/slices --manual_dir=<download> --data_dir=data   # once
  python launch.py --config configs/lung_ct.py --workdir runs/lung_ct
  python launch.py --config configs/lung_ct.py:runlocal --workdir /tmp/lung   # dummy data, CPU, minutes

Options: stage=..., runlocal (the builder's dummy data at 32², tiny models, a few steps).

The generator has no lesion input and no lesion processor; the authors report image quality only (T3).
We add a downstream task: lung segmentation with the builder's lung masks. The segmentor stage trains a
lung segmentor on real slices; stage C labels each synthetic slice with what that real-trained segmentor
finds in it (a pseudo-label, `dataset.synthetic_label = "segmentor"`), and stage D compares lung Dice on
the real test split when training on real, synthetic and mixed data.
"""

import ml_collections

from configs import family


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the lung CT config; see the module docstring for the options in `arg`."""
    config, options = family.base_config(arg)
    family.set_data(
        config, name="lung_ct", builder_config="slices", adapter="mask_label", modality="ct", num_classes=2
    )
    family.single_modality(config, extraction="lung_ct", runlocal=options.runlocal)
    config.dataset.synthetic_label = "segmentor"
    if not options.runlocal:
        # 512² slices: the paper's ngf 64 networks; only 267 slices, so short schedules.
        for stage in (config.structure, config.segmentor, config.synthesis):
            stage.model.size = "base"
        config.dataset.num_examples = 500
        config.verify.mixes = ("real=1", "syn=1", "real=1 syn=1 mode=M")
    else:
        family.runlocal_on_dummy_data(config, "lung_ct")
        config.verify.mixes = ("real=1 syn=0.5 mode=M",)
    return config
