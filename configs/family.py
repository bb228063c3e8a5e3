"""What the dataset families share, on top of the phantom's config.

Each family's config file starts from `configs/phantom.py` (the same stages, loop, losses and evaluators)
and changes only what differs: the dataset and its adapter, the extraction row of §3.3, the label type, the
lesion processor and the downstream task. These helpers hold the parts that are the same for the
single-modality families (chest X-ray, lung CT, retina, Tianchi) and, in `paper_protocol`, the training
protocol of METHOD.md that every full-size config (BRATS2015 too) follows instead of the phantom's budgets.

Deviations from the paper that every full-size family config shares (each config lists its own too):
- Defect fixes documented in configs/phantom.py: no instance norm before the generators' output sigmoid
  (`norm_output=False`, §11.18); E_s gets no input dropout (the code's drowns the map); stage A keeps the
  code's loss weights but the code-adversarial one is 1 (`g_code_adv`; the code's 0.001 leaves the codes
  off the prior the sampler draws from).
- Stage B: half of each batch stays paired with its real image under an L1 anchor (`paired_fraction` 0.5,
  `paired_l1` 100; docs/DIAGNOSIS-STAGE-B.md), and G trains on the real images' structure maps
  (`structure_source="real"`, the code's; the paper trains on stage A's maps, §6.0).
- Unspecified in the paper, our choice: stage B pre-trains `PRETRAIN_EPOCHS` (20) epochs before the 200
  adversarial ones ("until convergence", §6.1.4); 200 epochs, not the code's 201 passes (§1); evaluation
  and checkpoints every 2 % of a stage (the code saved at the end only).
- Stage D trains every mix for the same number of steps (§8.1's rule). Where the paper gives a family only
  "200 epochs" (or nothing), that budget is 200 epochs of the largest mix, so the mix with synthetic data
  gets the paper's epochs and the real-only row as many steps.
"""

import math
import os
from collections.abc import Mapping

import ml_collections

import data_builders
from configs import phantom, tables
from synth import configlib, mixes

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
    options = configlib.parse_arg(
        arg, stage="all", runlocal=False, generator="gan", structure_generator="gan", **family_options
    )
    configlib.check_stage(options.stage)
    flags = f"stage={options.stage},generator={options.generator}"
    flags += f",structure_generator={options.structure_generator}" + (",runlocal" if options.runlocal else "")
    config = phantom.get_config(flags)
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


# The authors' training protocol (METHOD.md): every code_demo training script runs Adam lr 1e-5, β1 0.5,
# batch 4 (4 GPUs × 1) for 200 epochs of its training set (§1; restated for stage A in §5.3, stage B in
# §6.1.5, the lesion segmentors in §6.3, the SSD in §6.6 and the X-ray classifier in §8.3).
PAPER_EPOCHS = 200
PAPER_BATCH_SIZE = 4
PAPER_LEARNING_RATE = 1e-5
PAPER_B1 = 0.5
# Stage B's self-supervised pre-training runs "until convergence" (§6.0, §6.1.4): its length is not given.
# Ours: this many epochs before the paper's 200 adversarial ones (10 %; the phantom's run spends 20 %).
PRETRAIN_EPOCHS = 20
# The old encoder/decoder design (`variant=ecai`, §6.7): lr 1e-4, β1 0.5, batch 4, 40 epochs.
ECAI_EPOCHS = 40
ECAI_LEARNING_RATE = 1e-4
# Evaluate and checkpoint every this fraction of a stage's steps; log ten times as often (at most every 100).
EVAL_FRACTION = 0.02


def epochs_to_steps(epochs: float, examples: int, batch_size: int = PAPER_BATCH_SIZE) -> int:
    """Optimisation steps of `epochs` passes over `examples` at `batch_size` (a last partial batch counts)."""
    return max(1, math.ceil(epochs * examples / batch_size))


def paper_loop(num_steps: int, batch_size: int = PAPER_BATCH_SIZE) -> ml_collections.ConfigDict:
    """A stage's loop for a run of `num_steps`: eval and checkpoint every ~2 %, logs every ~0.2 % (<= 100)."""
    every = max(1, round(num_steps * EVAL_FRACTION))
    return configlib.loop_config(
        num_steps=num_steps,
        batch_size=batch_size,
        log_every=max(1, min(100, every // 10)),
        checkpoint_every=every,
        eval_every=every,
    )


def largest_mix(texts) -> float:
    """The largest training set among stage D's mixes, in multiples of the real training set."""
    return max(m.real + m.syn + m.aug for m in map(mixes.parse_mix, texts))


def paper_protocol(
    config: ml_collections.ConfigDict,
    *,
    train_examples: int,
    stage_examples: Mapping[str, int] | None = None,
    downstream_learning_rate: float = PAPER_LEARNING_RATE,
    downstream_epochs: float = PAPER_EPOCHS,
    downstream_budget: str = "largest_mix",
) -> None:
    """Sets a full-size config's budgets, batch sizes and optimisers to the paper's protocol (METHOD.md).

    Stages A (structure), the lesion processors (segmentor), G_t (translator, several modalities only) and
    B (synthesis) train with Adam lr 1e-5, β1 0.5 (G and D alike), batch 4, for 200 epochs of their training
    set (§1, §5.3, §6.1.5, §6.3); stage B adds `PRETRAIN_EPOCHS` of pre-training before them where it
    pre-trains at all (`variant=ecai`, the §6.7 design, has none and trains 40 epochs at lr 1e-4). Stage
    D's downstream model uses Adam β1 0.5 at `downstream_learning_rate`, batch 4 (`config.verify.optim`,
    which synth/stages/verify.py reads instead of the lesion segmentors' `config.segmentor.optim`).

    Args:
      config: a full-size family config (not `runlocal`: its tiny budgets are the tests').
      train_examples: the size of the dataset's training set, for every stage not in `stage_examples`.
      stage_examples: per stage (structure, segmentor, translator, synthesis), the size of the set that
        stage trains on when it differs (X-ray's stage A: normal images only; the retina's GAN stages:
        DRIVE + FIRE).
      downstream_learning_rate: stage D's Adam learning rate (§8.1 BRATS: 1e-4).
      downstream_epochs: stage D's budget in epochs.
      downstream_budget: "real": `downstream_epochs` of the real training set (§8.1, every mix trains that
        many steps); "largest_mix": `downstream_epochs` of the largest mix of `config.verify.mixes`, so the
        mix with synthetic data gets the paper's epochs and every other mix as many steps (computed from
        the config's mixes: set `verify.budget_epochs` again when overriding them).
    """
    examples = dict(stage_examples or {})
    unknown = set(examples) - {"structure", "segmentor", "translator", "synthesis"}
    if unknown:
        raise ValueError(f"paper_protocol: unknown stages {sorted(unknown)}")
    stages = ["structure", "segmentor", "synthesis"]
    if len(config.data.modalities) > 1:
        stages.append("translator")  # One modality has nothing to translate.
    for name in stages:
        stage, n = config[name], examples.get(name, train_examples)
        epochs, learning_rate = PAPER_EPOCHS, PAPER_LEARNING_RATE
        if name == "synthesis" and stage.design == "ecai":
            epochs, learning_rate = ECAI_EPOCHS, ECAI_LEARNING_RATE
        steps = epochs_to_steps(epochs, n)
        if name == "synthesis" and stage.pretrain_steps > 0:  # Variants without pre-training keep 0.
            stage.pretrain_steps = epochs_to_steps(PRETRAIN_EPOCHS, n)
            steps += stage.pretrain_steps
        stage.train = paper_loop(steps)
        if name == "segmentor":
            stage.optim = configlib.adam_config(learning_rate, b1=PAPER_B1)
        else:
            stage.optim = ml_collections.ConfigDict(
                {side: configlib.adam_config(learning_rate, b1=PAPER_B1) for side in ("g", "d")}
            )
    verify = config.verify
    verify.optim = configlib.adam_config(downstream_learning_rate, b1=PAPER_B1)
    verify.batch_size = PAPER_BATCH_SIZE
    if downstream_budget == "real":
        verify.budget_epochs = float(downstream_epochs)
    elif downstream_budget == "largest_mix":
        verify.budget_epochs = round(float(downstream_epochs) * largest_mix(verify.mixes), 6)
    else:
        raise ValueError(
            f"paper_protocol: downstream_budget is 'real' or 'largest_mix', not {downstream_budget!r}"
        )
