"""The `synthetic` TFDS builder on its dummy chunk folder: schema, count, provenance, damaged input."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_builders import schema
from data_builders.synthetic import synthetic_dataset_builder as chunks

DUMMY = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data_builders", "synthetic", "dummy_data")
LABEL_NAMES = list(schema.BRATS_LABEL_NAMES)


def _config():
    return chunks.config_for("dummy", (8, 10), 4, schema.BRATS_MODALITIES, LABEL_NAMES)


def test_builds_exact_count_with_real_schema_and_provenance(tmp_path):
    builder = chunks.build(DUMMY, str(tmp_path), _config())
    real = schema.brats_like_features(8, 10, 4)
    assert set(real.keys()) <= set(builder.info.features.keys())
    assert set(builder.info.features.keys()) - set(real.keys()) == {"structure", "organ", "lesion_dice"}
    # Version 1.1.0: the image as raw float32 bytes (array_record compresses it), the uint8 maps as zlib.
    assert str(builder.version) == "1.1.0"
    encodings = {k: builder.info.features[k].to_json_content().encoding for k in ("image", "label", "organ")}
    assert encodings == {"image": "bytes", "label": "zlib", "organ": "zlib"}
    source = builder.as_data_source("train")
    assert len(source) == 2  # The chunks hold 3 accepted samples; the manifest asks for 2.
    first = chunks.read_chunk(DUMMY, 0)
    for i in range(2):
        np.testing.assert_array_equal(source[i]["label"], first["label"][i])
        np.testing.assert_array_equal(source[i]["image"], first["image"][i])
        assert source[i]["image"].dtype == np.float32
    assert builder.info.metadata["source_workdir"] == "/nowhere/dummy"
    assert builder.info.metadata["modalities"] == list(schema.BRATS_MODALITIES)

    # Another process reads it with TFDS alone, never importing this project.
    reader = (
        "import sys, tensorflow_datasets as tfds\n"
        f"s = tfds.data_source('synthetic/dummy', split='train', data_dir={str(tmp_path)!r})\n"
        "assert 'data_builders' not in sys.modules and 'synth' not in sys.modules\n"
        "print(len(s), s[1]['id'].decode(), s[0]['image'].shape, float(s[0]['lesion_dice']))\n"
    )
    out = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "000000-001", "(8,", "10,", "4)", "0.9599999785423279"]


def test_damaged_or_short_chunk_folders_are_named(tmp_path):
    damaged = tmp_path / "chunks"
    shutil.copytree(DUMMY, damaged)
    os.remove(damaged / "batch_000000.npz")
    with pytest.raises(ValueError, match="damaged.*missing"):
        chunks.chunk_count(str(damaged))
    with pytest.raises(ValueError, match="holds 3 accepted samples; 5 were asked for"):
        list(chunks.iterate_samples(DUMMY, 5))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "batch_000000.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="Cannot read chunk .*batch_000000.npz"):
        chunks.read_chunk(str(tmp_path / "bad"), 0)
    with pytest.raises(FileNotFoundError, match="not a stage-C chunk folder"):
        chunks.read_manifest(str(tmp_path))


def test_detection_chunks_give_the_real_datasets_box_features(tmp_path):
    """A detection family's samples carry boxes like Tianchi's `slices`: pixel edges, dataset label ids."""
    folder = tmp_path / "chunks"
    shutil.copytree(DUMMY, folder)
    chunk = chunks.read_chunk(str(folder), 0)
    n = len(chunk["id"])
    boxes = np.zeros((n, 2, 4), np.float32)
    classes = np.zeros((n, 2), np.int32)
    boxes[0] = [[0.25, 0.1, 0.5, 0.4], [0.0, 0.5, 1.0, 1.0]]
    classes[0] = [1, 2]
    boxes[1, 0], classes[1, 0] = [0.5, 0.5, 0.75, 0.7], 1  # One box and a padding row.
    chunks.write_chunk(str(folder), 0, {**chunk, "boxes": boxes, "box_classes": classes})
    config = chunks.config_for(
        "dummy", (8, 10), 4, schema.BRATS_MODALITIES, LABEL_NAMES, box_label_ids=(1, 5)
    )
    source = chunks.build(str(folder), str(tmp_path / "tfds"), config).as_data_source("train")
    np.testing.assert_allclose(source[0]["boxes"], [[2, 1, 4, 4], [0, 5, 8, 10]], atol=1e-5)
    assert source[0]["box_labels"].tolist() == [1, 5]
    np.testing.assert_allclose(source[1]["boxes"], [[4, 5, 6, 7]], atol=1e-5)
    assert source[1]["box_labels"].tolist() == [1]
