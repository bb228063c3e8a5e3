"""Config for the retina family (DRIVE+FIRE, RGB): structure-to-image synthesis, vessel segmentation.

Usage:
  python -m data_builders build drive --manual_dir=<DRIVE download> --data_dir=data   # once
  python -m data_builders build fire/images --manual_dir=<FIRE download> --data_dir=data   # once
  python launch.py --config configs/retina.py --workdir runs/retina
  python launch.py --config configs/retina.py:runlocal --workdir /tmp/retina   # dummy data, CPU, minutes

Options: stage=..., runlocal (the builder's dummy data at 32², tiny models, a few steps), and each stage's
generator family: generator=gan|flow (stage B), structure_generator=gan|flow (stage A).

G maps a noise-fused structure map (extracted from all three channels, §3.3) to an RGB fundus image, with
no lesion input. Synthetic images get coarse vessel labels from their own structure map inside the field
of view shrunk by `dataset.vessel_shrink` (§8.2; the authors described this but never implemented it).
The downstream task (stage D, T6) is vessel segmentation scored by sensitivity, accuracy and AUC inside
the field of view of DRIVE's test images.
The generators (stages A and B) learn from DRIVE's training images and FIRE's 268 photos, as the authors
did (`data.gan_extra`); the vessel segmentor and stage D use DRIVE only. `--config.data.gan_extra.name=`
leaves FIRE out.

Full size follows the paper's protocol (`family.paper_protocol`): stages A and B Adam 1e-5, β1 0.5, batch
4, 200 epochs (§1, §5.3, §6.1.5) of DRIVE's 20 training images and FIRE's 268 (§2.1); the vessel segmentor
likewise on DRIVE's 20.

Deviations from the paper (full size):
- Shared by every family (configs/family.py): `norm_output=False`, no E_s input dropout, `g_code_adv` 1,
  `paired_fraction` / `paired_l1`, G on real structure maps, 20 pre-training epochs, eval every 2 %.
- The vessel segmentor learns with softmax cross-entropy + Dice, vessel weight 4 (the code's loss indexes
  five channels of two and crashes, §11.23).
- §8.2 gives stage D no optimiser or budget: it takes §1's (the authors' DRIVE segmentation script) and
  200 epochs of the largest mix (20 real + 2 000 synthetic), the same steps for every mix (§8.1's rule):
  the real-only row trains 101 000 steps on its 20 images.
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
    config.data.gan_extra = ml_collections.ConfigDict(
        dict(name="fire", builder_config="images", manual_dir="", adapter="unlabelled_fov", split="train")
    )
    if not options.runlocal:
        for stage in (config.structure, config.segmentor, config.synthesis):
            stage.model.size = "base"
        config.synthesis.flow.size = "base"
        config.structure.flow.size = "base"
        config.dataset.num_examples = 2000  # T6: DRIVE train + 2000 synthetic images.
        config.verify.mixes = ("real=1", "real=1 syn=100 mode=M")  # 20 real + 2000 synthetic.
        # The generators learn from DRIVE's 20 training images and FIRE's 268; the segmentor from DRIVE's.
        family.paper_protocol(config, train_examples=20, stage_examples=dict(structure=288, synthesis=288))
    else:
        family.runlocal_on_dummy_data(config, "drive", eval_max_examples=2)
        config.data.gan_extra.manual_dir = family.dummy_data_dir("fire")
        config.verify.mixes = ("real=1 syn=1 mode=M",)
    return config
