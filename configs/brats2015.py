"""Config for BRATS2015: registered T1/T2/T1c/FLAIR with tumour labels, the paper's main dataset (§6.1, §8.1).

Usage:
  python -m data_builders build brats2015/slices --manual_dir=<download> --data_dir=data   # once
  python launch.py --config configs/brats2015.py --workdir runs/brats
  python launch.py --config configs/brats2015.py:runlocal --workdir /tmp/brats   # dummy data, CPU

Options: stage=..., runlocal (the builder's dummy volumes, slices resized to 32², tiny models), and the
phantom's `paper_weights` and `variant=` (baselines, ablations A-F, the old ecai design: configs/variants.py).

Everything but the data is the phantom's config, which was designed as a stand-in for BRATS: the same
modalities, classes, networks, losses and stage settings. The slices are the authors' 184×144 crop of axial
slices 50:105 (§2.1) and the extraction row is BRATS's (§3.3, T1 slice). Full-size training is for GPUs:
the networks are the paper's ngf 64.
"""

import ml_collections

from configs import family, phantom, tables
from synth import configlib

# The dummy volumes are 8×12×10 voxels: a crop that fits them, resized to the runlocal working size.
DUMMY_CROP = dict(slice_start=2, slice_stop=6, row_start=2, row_stop=11, col_start=1, col_stop=7)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the BRATS2015 config; see the module docstring for the options in `arg`."""
    options = configlib.parse_arg(arg, stage="all", runlocal=False, paper_weights=False, variant="full")
    configlib.check_stage(options.stage)
    flags = [f"stage={options.stage}"] + [name for name in ("runlocal", "paper_weights") if options[name]]
    flags.append(f"variant={options.variant}")
    config = phantom.get_config(",".join(flags))
    config.data.name, config.data.builder_config = "brats2015", "slices"
    config.data.build_if_missing = False  # Needs the manual download: see data_builders/brats2015/README.md.
    config.structure.extraction = tables.extraction("brats2015")
    if not options.runlocal:
        for stage in (config.structure, config.segmentor, config.translator, config.synthesis):
            stage.model.size = "base"
        config.dataset.num_examples = 13420  # T5's "syn=1": as many as the real training slices.
        config.verify.mixes = (
            "real=1",
            "syn=1",
            "real=1 syn=0.2 mode=M",
            "real=1 syn=0.2 mode=S",
            "real=1 syn=0.2 mode=R",
            "real=1 aug=0.2 mode=M",
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
