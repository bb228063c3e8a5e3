"""Stage-C throughput: accepted registered K-modality sets per second, and where the time goes.

Usage: python -m benchmarks.dataset_generation [--shapes 128x128,512x512] [--models small,base]
                                               [--batch 8,2] [--batches 3]

One batch is what `synth.stages.dataset` does per batch: stage-A structure maps through the §5.4 filter
(host), label draws with the placement check (host), one G call for all K modalities, the K segmentors'
reading and the lesion Dice (the filter), and the atomic chunk write. Networks are randomly initialised
(speed does not depend on the weights), so every filter is set to accept and the acceptance rate here is the
placement check's alone; the acceptance of trained networks is in the demo's report. The first batch
(compilation) is not timed. FLOPs are XLA's count for the synthesis and the segmentation calls (on CPU
both run a few examples per call, `synth.models.grouped`, and are counted on one call's batch).
"""

import argparse
import functools
import tempfile
import time

import jax
import numpy as np

from benchmarks import common
from configs import phantom
from data_builders.phantom import anatomy
from data_builders.synthetic import synthetic_dataset_builder as chunks
from synth import generate, label_pool, optim, structure_nets, synthesis_nets
from synth.lesion import segment
from synth.models import grouped, sizes
from synth.stages import dataset, structure, synthesis


class _RealOrganGenerator(generate.Generator):
    """A Generator whose organ masks are real phantom ones.

    Random stage-A networks draw no organ, so no label would fit: after the (timed) draw, the masks are
    replaced, so that the placement check has something to accept.
    """

    organs: np.ndarray

    def sample_structures(self, key, n):
        out = super().sample_structures(key, n)
        out["masks"] = self.organs[:n]
        return out


def _generator(config, size: int, batch: int) -> generate.Generator:
    """A Generator over randomly initialised networks at size² (no trained workdir needed)."""
    subject = anatomy.make_subject(seed=0, image_size=size, num_slices=batch)
    example = {"image": subject["image"], "label": subject["label"].astype(np.int32)}
    keys = jax.random.split(jax.random.key(0), 3)
    tx = optim.make_optimizer(config.synthesis.optim.g)
    g_state = jax.jit(
        functools.partial(
            synthesis.init_state,
            models=synthesis_nets.make_models(config, (size, size)),
            config=config,
            g_tx=tx,
            d_tx=tx,
        )
    )(keys[0], example)
    lesion_params = jax.jit(
        functools.partial(
            segment.init_params,
            model=segment.make_model(config, (size, size)),
            variant=config.segmentor.variant,
        )
    )(keys[1], example["image"])
    extract = functools.partial(
        structure_nets.real_structures, params=structure_nets.extraction_params(config), remove_lesions=True
    )
    s_models = structure_nets.make_models(config, (size, size))
    s_state = jax.jit(
        functools.partial(structure.init_state, models=s_models, extract_fn=extract, g_tx=tx, d_tx=tx)
    )(keys[2], example)
    gen = _RealOrganGenerator(
        config,
        image_hw=(size, size),
        g_params=g_state.g_params,
        lesion_params=lesion_params,
        structure_params={"g_params": s_state.g_params, "d_params": s_state.d_params},
        provenance={},
    )
    gen.organs = np.asarray(
        structure_nets.real_structures(
            example, params=structure_nets.extraction_params(config), remove_lesions=True
        )[1][..., 0]
    ).astype(np.uint8)
    return gen, subject["label"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="128x128,512x512")
    parser.add_argument("--models", default="small,base")
    parser.add_argument("--batch", default="8,2", help="generation batch per shape")
    parser.add_argument("--batches", type=int, default=3, help="timed batches per shape")
    args = parser.parse_args()
    rows = []
    for shape, size_name, batch in zip(
        args.shapes.split(","), args.models.split(","), (int(b) for b in args.batch.split(",")), strict=True
    ):
        size = int(shape.split("x")[0])
        config = phantom.get_config()
        config.mesh.shape = (1,)
        for section in (config.structure, config.segmentor, config.translator, config.synthesis):
            section.model.size = size_name
        config.structure.filter.max_count = 1
        config.dataset.batch_size, config.dataset.structure_filter = batch, False
        config.dataset.dice.threshold = 0.0
        gen, labels = _generator(config, size, batch)
        labels = labels[(labels > 0).any(axis=(1, 2))]
        pool = label_pool.make_pool(labels, 64, seed=0, params=label_pool.AugmentParams())
        # XLA's count for one batch's synthesis and segmentation. On CPU both run a few examples per call
        # in a loop (synth.models.grouped), whose body XLA counts once: count a batch of one group.
        g_group = synthesis_nets.generation_group(gen.models, (batch, size, size, 1))
        s_group = grouped.group_size(
            batch, (size, size), sizes.unet_kwargs(size_name, (size, size))["features"]
        )
        zeros = np.zeros((g_group, size, size), np.float32)
        _, g_flops, _ = common.compile_once(
            gen._synthesize, gen.g_params, zeros, zeros, zeros.astype(np.int32), jax.random.key(0)
        )
        images = np.zeros((s_group, size, size, len(config.data.modalities)), np.float32)
        _, s_flops, _ = common.compile_once(gen._predict, gen.lesion_params, images)
        g_flops, s_flops = g_flops * batch / g_group, s_flops * batch / s_group
        out = tempfile.mkdtemp(prefix="bench_chunks_")
        split = np.zeros(3)
        accepted = generated = 0
        for index in range(args.batches + 1):
            result = dataset.generate_batch(gen, pool, index, config)
            arrays = dataset._chunk_arrays(result, index)  # noqa: SLF001
            t0 = time.perf_counter()
            chunks.write_chunk(out, index, arrays)
            if index == 0:
                continue  # Compilation.
            split += np.append(result["seconds"], time.perf_counter() - t0)
            accepted += len(arrays["id"])
            generated += batch
        total = split.sum()
        rows.append(
            (
                f"{shape}, {size_name}",
                batch,
                accepted / total,
                accepted / generated,
                split / total,
                total / generated,
                (g_flops + s_flops) / batch,
            )
        )
    common.header("Stage C (dataset generation), random networks, every filter but placement open")
    print(
        "| image, model | batch | accepted sets/s | placement acceptance | time: generation / filter / "
        "write | s per generated set | GFLOP/set (G + segmentors) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, batch, rate, share, parts, per_set, flops in rows:
        print(
            f"| {name} | {batch} | {rate:.2f} | {100 * share:.0f}% | "
            f"{100 * parts[0]:.0f}% / {100 * parts[1]:.0f}% / {100 * parts[2]:.0f}% | {per_set:.3f} | "
            f"{flops / 1e9:.1f} |"
        )


if __name__ == "__main__":
    main()
