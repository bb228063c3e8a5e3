"""The benchmark scripts' own logic on tiny configs (their numbers go to BENCHMARKS.md, never to tests)."""

import numpy as np

from benchmarks import memory, metrics_throughput


def test_memory_rows_add_up():
    rows = memory.measure("phantom", "flow", 2, arg="runlocal", hw=(32, 32))
    assert [r["step"] for r in rows] == ["stage_b_train", "generate"]
    for row in rows:
        parts = row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
        assert row["total_bytes"] == parts > 0 and (row["config"], row["batch"]) == ("phantom", 2)
    train, generate = rows
    # The training state is donated (aliased); training holds parameters, optimiser state and gradients.
    assert train["alias_bytes"] > 0 and train["argument_bytes"] > 2 * generate["argument_bytes"]
    assert not train["remat"]  # `--remat` sets every stage-B U-Net's `model.remat`:
    config = memory._config("phantom", "gan", "runlocal", remat=True)
    assert all(s.model.remat for s in (config.synthesis, config.translator, config.segmentor))


def test_largest_batch_fits_its_card_and_none_fits_below_batch_one(monkeypatch):
    """The search over batches, on figures given here (the compiled ones are checked above)."""
    compiled = []

    def fake_step_memory(per_example, beyond_8):  # XLA-like: fixed bytes, then per example.
        def step_memory(config, step_name, hw, batch):
            assert (config.data.name, step_name, hw) == ("phantom", "generate", (32, 32))
            compiled.append(batch)
            extra = max(batch - 8, 0) * (beyond_8 - per_example)  # Buffer reuse past batch 8.
            return {"total_bytes": 10**9 + per_example * batch + extra}

        return step_memory

    def search(cards):
        return memory.largest_batches("phantom", "flow", "generate", cards, arg="runlocal", hw=(32, 32))

    monkeypatch.setattr(memory, "step_memory", fake_step_memory(3 * 10**6, 3 * 10**6))
    # Half of batch 1's figure, batch 300's exactly, a byte less than batch 301's, and beyond the cap.
    cards = (0.5, 1.9, (10**9 + 3 * 10**6 * 301 - 1) / memory.GB, 1e6)
    largest = search(cards)
    assert [largest[c] for c in cards] == [0, 300, 300, memory.MAX_BATCH]
    assert len(compiled) <= 8  # The line's prediction is compiled, not every batch on the way.
    # Where the figures bend past batch 8 the line from batches 1 and 8 misses: the search still finds
    # the largest batch that fits, 183 (10⁹ + 5·10⁶·183 − 16·10⁶ bytes ≤ 1.9 GB < the figure at 184).
    monkeypatch.setattr(memory, "step_memory", fake_step_memory(3 * 10**6, 5 * 10**6))
    compiled.clear()
    assert search((1.9,)) == {1.9: 183} and len(compiled) <= 6, compiled


def test_the_gaussian_window_forms_compared_agree():
    x = np.random.default_rng(0).random((2, 20, 23, 4), np.float32)
    band = np.asarray(metrics_throughput.FILTERS["band"](x))
    assert band.shape == (2, 10, 13, 4)
    for name in ("depthwise", "slices"):
        np.testing.assert_allclose(metrics_throughput.FILTERS[name](x), band, atol=1e-6, err_msg=name)
