"""Writes the two-sample chunk folder used by the synthetic builder's tests (run from the repo root).

python data_builders/synthetic/dummy_data/make_dummy_data.py
"""

import os

import numpy as np

from data_builders.synthetic import synthetic_dataset_builder as chunks

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    rng = np.random.default_rng(0)
    h, w, k = 8, 10, 4
    labels = np.zeros((3, h, w), np.uint8)
    labels[0, 2:4, 3:6] = 2
    labels[1, 4:6, 5:8] = 4
    labels[2, 1:3, 1:3] = 1
    # Two batches: the first keeps 2 samples, the second 1 (the dataset asks for 2, so it is cut).
    for index, keep in ((0, [0, 1]), (1, [2])):
        chunks.write_chunk(
            HERE,
            index,
            {
                "id": np.array([f"{index:06d}-{i:03d}" for i in keep]),
                "image": rng.random((len(keep), h, w, k), dtype=np.float32),
                "label": labels[keep],
                "structure": (rng.random((len(keep), h, w)) > 0.7).astype(np.uint8),
                "organ": np.ones((len(keep), h, w), np.uint8),
                "lesion_dice": np.linspace(0.96, 0.99, len(keep)).astype(np.float32),
                "generated": np.int64(3),
                "rejected": np.array([0, 1, 0]),
                "scored_dice": np.linspace(0.9, 0.99, 2).astype(np.float32),
                "seconds": np.zeros(2),
            },
        )
    chunks.write_manifest(
        HERE,
        {
            "num_examples": 2,
            "modalities": ["t1", "t2", "t1c", "flair"],
            "label_names": ["background", "necrosis", "oedema", "non_enhancing", "enhancing"],
            "spacing": [1.5, 1.5, 3.0],
            "source_workdir": "/nowhere/dummy",
            "synthesis_step": 4,
            "seed": 0,
            "dice_threshold": 0.95,
        },
    )


if __name__ == "__main__":
    main()
