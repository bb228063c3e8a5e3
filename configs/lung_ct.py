"""Config for Kaggle lung CT (finding-lungs-in-ct-data): unconditional structure-to-CT synthesis (§6.5).

Usage:
  python -m data_builders build lung_ct/slices --manual_dir=<download> --data_dir=data   # once
  python launch.py --config configs/lung_ct.py --workdir runs/lung_ct
  python launch.py --config configs/lung_ct.py:runlocal --workdir /tmp/lung   # dummy data, CPU, minutes

Options: stage=..., runlocal (the builder's dummy data at 32², tiny models, a few steps), and each stage's
generator family: generator=gan|flow (stage B), structure_generator=gan|flow (stage A).

The generator has no lesion input and no lesion processor; the authors report image quality only (T3).
We add a downstream task: lung segmentation with the builder's lung masks. The segmentor stage trains a
lung segmentor on real slices; stage C labels each synthetic slice with what that real-trained segmentor
finds in it (a pseudo-label, `dataset.synthetic_label = "segmentor"`), and stage D compares lung Dice on
the real test split when training on real, synthetic and mixed data.

Full size follows the paper's protocol (`family.paper_protocol`): every stage, and the lung segmentor of
stage D, Adam 1e-5, β1 0.5, batch 4, 200 epochs (§1, §5.3, §6.1.5) of the training split, about 187 of the
267 slices.

Deviations from the paper (full size):
- Shared by every family (configs/family.py): `norm_output=False`, no E_s input dropout, `g_code_adv` 1,
  `paired_fraction` / `paired_l1`, G on real structure maps, 20 pre-training epochs, eval every 2 %.
- The paper's split is unspecified (§2.1): ours is by subject, 70 / 10 / 20 % (data_builders/lung_ct), so
  the step counts assume 187 training slices.
- The lung segmentor, its pseudo-labels and stage D are ours (the paper reports image quality only); they
  take §1's optimiser and 200 epochs of the largest mix (real + as many synthetic), the same steps for
  every mix (§8.1's rule), i.e. 400 epochs of the real set.
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
        config.synthesis.flow.size = "base"
        config.structure.flow.size = "base"
        config.dataset.num_examples = 500
        config.verify.mixes = ("real=1", "syn=1", "real=1 syn=1 mode=M")
        # 267 slices, split 70 / 10 / 20 % by subject: about 187 to train on.
        family.paper_protocol(config, train_examples=187)
    else:
        family.runlocal_on_dummy_data(config, "lung_ct")
        config.verify.mixes = ("real=1 syn=0.5 mode=M",)
    return config
