"""The input pipeline: deterministic order, per-process rows forming the global batch, workers, eval."""

import jax
import numpy as np
import pytest

from synth import input_pipeline
from synth.lesion import segment

SOURCE = [{"x": np.full((2,), i, np.float32)} for i in range(37)]


def _ids(batch):
    return batch["x"][:, 0].astype(int).tolist()


def _take(it, n):
    return [_ids(next(it)) for _ in range(n)]


def test_same_seed_same_order_other_seed_other_order():
    a = _take(input_pipeline.train_iterator(SOURCE, preprocess=dict, batch_size=8, seed=3), 6)
    b = _take(input_pipeline.train_iterator(SOURCE, preprocess=dict, batch_size=8, seed=3), 6)
    c = _take(input_pipeline.train_iterator(SOURCE, preprocess=dict, batch_size=8, seed=4), 6)
    assert a == b and a != c
    # Every example appears once per epoch.
    flat = sum(a, [])
    assert sorted(flat[:37]) == list(range(37))


def test_process_rows_concatenate_to_the_global_batch(monkeypatch):
    global_batches = _take(input_pipeline.train_iterator(SOURCE, preprocess=dict, batch_size=8, seed=0), 5)
    per_process = []
    for pid in range(2):
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        it = input_pipeline.train_iterator(SOURCE, preprocess=dict, batch_size=8, seed=0)
        per_process.append(_take(it, 5))
    for step in range(5):
        assert per_process[0][step] + per_process[1][step] == global_batches[step]


def test_iterator_state_resumes_exactly():
    it = input_pipeline.train_iterator(SOURCE, preprocess=dict, batch_size=4, seed=1)
    _take(it, 7)
    state = it.get_state()
    expected = _take(it, 5)
    fresh = input_pipeline.train_iterator(SOURCE, preprocess=dict, batch_size=4, seed=1)
    fresh.set_state(state)
    assert _take(fresh, 5) == expected


def test_worker_processes_give_the_same_batches(phantom_data_dir):
    import data_builders

    source = data_builders.data_source("phantom", "train", data_dir=phantom_data_dir, config="tiny")
    kwargs = dict(preprocess=segment.preprocess, batch_size=4, seed=0)
    local = input_pipeline.train_iterator(source, **kwargs)
    workers = input_pipeline.train_iterator(source, num_workers=1, **kwargs)
    for _ in range(3):
        a, b = next(local), next(workers)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_eval_batches_pad_and_mark_valid():
    batches = list(input_pipeline.eval_batches(SOURCE, preprocess=dict, batch_size=8))
    assert len(batches) == 5
    valid = np.concatenate([b["valid"] for b in batches])
    ids = np.concatenate([b["x"][:, 0] for b in batches]).astype(int)
    assert valid.sum() == 37 and ids[valid].tolist() == list(range(37))
    assert list(input_pipeline.eval_batches(SOURCE, preprocess=dict, batch_size=8, max_examples=8))[0][
        "valid"
    ].all()


def test_batch_size_must_split_over_devices():
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 devices"):
        input_pipeline.train_iterator(SOURCE, preprocess=dict, batch_size=6, seed=0)
    with pytest.raises(ValueError, match="training split is empty"):
        input_pipeline.train_iterator([], preprocess=dict, batch_size=4, seed=0)
