"""What the single-modality families (chest X-ray, lung CT, retina) share, on top of the phantom's config.

Each family's config file starts from `configs/phantom.py` (the same stages, loop, losses and evaluators)
and changes only what differs: the dataset and its adapter, the extraction row of §3.3, the label type, the
lesion processor and the downstream task. These helpers hold the parts that are the same for all three.
"""

import os

import ml_collections

import data_builders
from configs import phantom, tables
from synth import configlib

# §6.4-6.5: single-modality generators have a single-head D and no registration or translation terms.
# L_D = 5·mse(d(x), 1) + 3·mse(d(x_g), 0); L_G = 3·mse(d(x_g), 1) + the lesion term, plus L_pre (§6.1.4).
SINGLE_MODALITY_WEIGHTS = dict(
    g_adversarial=3.0,
    g_category=0.0,
    registration=0.0,
    agreement=0.0,
    lesion=0.0,
    pretrain=5.0,
    pretrain_background=0.1,  # §6.1.4: 5·mse(x_g, x) + 0.1·mse(x_g ⊙ m, x ⊙ m) for these families.
    reconstruction=0.0,
    paired_l1=100.0,  # The method's anchor on paired rows after pre-training (configs/phantom.py).
    d_real=5.0,
    d_fake=3.0,
    d_category=0.0,
)


def dummy_data_dir(builder: str) -> str:
    """The committed, script-made fixtures of a builder (`data_builders/<builder>/dummy_data`)."""
    return os.path.join(os.path.dirname(data_builders.__file__), builder, "dummy_data")


def base_config(
    arg: str | None, **family_options
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The phantom's config at full size (or its `runlocal` variant) and the parsed family options."""
    options = configlib.parse_arg(arg, stage="all", runlocal=False, **family_options)
    configlib.check_stage(options.stage)
    config = phantom.get_config(f"stage={options.stage}" + (",runlocal" if options.runlocal else ""))
    return config, options


def set_data(
    config: ml_collections.ConfigDict,
    *,
    name: str,
    builder_config: str,
    adapter: str,
    modality: str,
    num_classes: int,
    channels: int = 1,
    eval_split: str = "validation",
) -> None:
    """Points `config.data` at a family's dataset; one modality of `channels` channels."""
    data = config.data
    data.name, data.builder_config, data.adapter = name, builder_config, adapter
    data.modalities = (modality,)
    data.channels = channels
    data.num_classes = num_classes
    data.eval_split = eval_split
    data.build_if_missing = False  # Real data needs its manual download: see the builder's README.


def single_modality(
    config: ml_collections.ConfigDict, *, extraction: str, runlocal: bool, **extraction_overrides
) -> None:
    """Stage A without lesion removal, and a single-modality, label-free stage B (§6.5).

    `extraction` names the dataset's row of configs/tables.py; `extraction_overrides` change its fields.
    """
    config.structure.extraction = tables.extraction(extraction, **extraction_overrides)
    if runlocal:
        # Extract at the image's own 32² instead of the authors' working size (512², 1500² for X-ray).
        config.structure.extraction.size = None
    config.structure.remove_lesions = False  # No localised lesion in the label (§3.4).
    config.segmentor.variant = "one_seg"  # One modality: the variants coincide.
    config.segmentor.loss.class_weights = ()
    config.synthesis.label_fusion = "none"
    config.synthesis.lesion_processor = "none"
    config.synthesis.label_rule = "none"
    config.synthesis.loss.weights = ml_collections.ConfigDict(dict(SINGLE_MODALITY_WEIGHTS))
    config.synthesis.loss.lesion.class_weights = ()
    config.dataset.dice = ml_collections.ConfigDict(dict(kind="none", threshold=0.0))
    config.dataset.audit.metric = "ssim"


def runlocal_on_dummy_data(
    config: ml_collections.ConfigDict, builder: str, *, eval_max_examples: int = 4
) -> None:
    """The `runlocal` variant: the builder's dummy data at 32², built on first use."""
    config.data.manual_dir = dummy_data_dir(builder)
    config.data.builder_overrides = ml_collections.ConfigDict(dict(image_size=32))
    config.data.build_if_missing = True  # From the dummy data: no download.
    config.data.eval_max_examples = eval_max_examples
    config.verify.eval_max_examples = eval_max_examples
    config.dataset.audit.max_real = 8
    # Two steps per stage (the pre-training phase and the adversarial one in stage B): every code path
    # runs and compiles once; the phantom's runlocal keeps four steps to test resuming between checkpoints.
    for stage in (config.structure, config.segmentor, config.translator, config.synthesis):
        stage.train = configlib.loop_config(
            num_steps=2, batch_size=4, log_every=1, checkpoint_every=2, eval_every=2
        )
    config.synthesis.pretrain_steps = 1
