"""Config for BRATS2015: registered T1/T2/T1c/FLAIR with tumour labels, the paper's main dataset (§6.1, §8.1).

Usage:
  python -m data_builders build brats2015/slices --manual_dir=<download> --data_dir=data   # once
  python launch.py --config configs/brats2015.py --workdir runs/brats
  python launch.py --config configs/brats2015.py:runlocal --workdir /tmp/brats   # dummy data, CPU

Options: stage=..., runlocal (the builder's dummy volumes, slices resized to 32², tiny models), and the
phantom's `paper_weights`, `variant=` (baselines, ablations A-F, the old ecai design: configs/variants.py) and
`generator=gan|flow` (stage B's family), `structure_generator=gan|flow` (stage A's).

Everything but the data is the phantom's config, which was designed as a stand-in for BRATS: the same
modalities, classes, networks, losses and stage settings. The slices are the authors' 184×144 crop of axial
slices 50:105 (§2.1) and the extraction row is BRATS's (§3.3, T1 slice). Full-size training is for GPUs:
the networks are the paper's ngf 64, and the budgets and optimisers are the paper's (`family.paper_protocol`):
stages A, B, G_t and the lesion segmentors Adam 1e-5, β1 0.5, batch 4, 200 epochs of 13 420 slices (§1,
§5.3, §6.1.5, §6.3); stage D's segmentor Adam 1e-4, β1 0.5, batch 4, 100 epochs of the real set (§8.1).

Deviations from the paper (full size):
- Shared by every family (configs/family.py): `norm_output=False`, no E_s input dropout, `g_code_adv` 1,
  `paired_fraction` / `paired_l1`, G on real structure maps, 20 pre-training epochs, eval every 2 %.
- G and G_t are conditioned on the modality by FiLM (`condition="film"`, configs/phantom.py): the code's
  concatenated one-hot map is erased by the next instance norm, so the modalities came out alike.
- The lesion segmentors (and stage D's) train with softmax cross-entropy + Dice, class weights (1, 4, 1, 4,
  4), not the code's weighted MSE on sigmoids (§6.3, §11.19); stage D uses no input dropout (§8.1's 0.1 is
  the paper's text; the authors' runs kept 1.0).
- Splits are by subject with a seed (220 / 27 / 27 subjects, fixing §11.1's leak), so the training split
  holds about 12 100 slices, not 13 420. Stages A-B count their steps from the paper's 13 420 (the paper's
  iteration count, ≈ 222 of our epochs); stage D counts 100 epochs of the real split it reads.
"""

import ml_collections

from configs import family, phantom, tables
from synth import configlib

# The dummy volumes are 8×12×10 voxels: a crop that fits them, resized to the runlocal working size.
DUMMY_CROP = dict(slice_start=2, slice_stop=6, row_start=2, row_stop=11, col_start=1, col_stop=7)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the BRATS2015 config; see the module docstring for the options in `arg`."""
    options = configlib.parse_arg(
        arg,
        stage="all",
        runlocal=False,
        paper_weights=False,
        variant="full",
        generator="gan",
        structure_generator="gan",
    )
    configlib.check_stage(options.stage)
    flags = [f"stage={options.stage}"] + [name for name in ("runlocal", "paper_weights") if options[name]]
    flags += [f"variant={options.variant}", f"generator={options.generator}"]
    flags += [f"structure_generator={options.structure_generator}"]
    config = phantom.get_config(",".join(flags))
    config.data.name, config.data.builder_config = "brats2015", "slices"
    config.data.build_if_missing = False  # Needs the manual download: see data_builders/brats2015/README.md.
    config.structure.extraction = tables.extraction("brats2015")
    if not options.runlocal:
        for stage in (config.structure, config.segmentor, config.translator, config.synthesis):
            stage.model.size = "base"
        config.synthesis.flow.size = "base"
        config.structure.flow.size = "base"
        config.dataset.num_examples = 13420  # T5's "syn=1": as many as the real training slices.
        config.verify.mixes = (
            "real=1",
            "syn=1",
            "real=1 syn=0.2 mode=M",
            "real=1 syn=0.2 mode=S",
            "real=1 syn=0.2 mode=R",
            "real=1 aug=0.2 mode=M",
        )
        # §8.1: the downstream segmentor's own lr, budgeted in epochs of the real training set.
        family.paper_protocol(
            config,
            train_examples=13420,
            downstream_learning_rate=1e-4,
            downstream_epochs=100,
            downstream_budget="real",
        )
    else:
        family.runlocal_on_dummy_data(config, "brats2015")
        config.data.builder_overrides = ml_collections.ConfigDict(
            dict(DUMMY_CROP, image_height=32, image_width=32)
        )
        config.structure.extraction.size = None  # Extract at 32², not the authors' 184×144.
        config.verify.mixes = ("real=1 syn=0.5 mode=M",)
        # Untrained stage-A masks at 32² almost never hold a whole dummy tumour, so the code's placement
        # rule would reject every sample; the smoke run checks the path, not the placement.
        config.synthesis.label_rule = "none"
    return config
