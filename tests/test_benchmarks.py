"""The benchmark scripts' own logic on tiny configs (their numbers go to BENCHMARKS.md, never to tests)."""

from benchmarks import memory


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


def test_largest_batch_fits_its_card_and_none_fits_below_batch_one():
    config = memory._config("phantom", "flow", "runlocal")
    total = {b: memory.step_memory(config, "generate", (32, 32), b)["total_bytes"] for b in (1, 4)}
    cards = (total[1] * 0.5 / memory.GB, total[4] / memory.GB, 1e6)
    largest = memory.largest_batches("phantom", "flow", "generate", cards, arg="runlocal", hw=(32, 32))
    assert largest[cards[0]] == 0  # Not even one example fits half of batch 1's figure.
    assert largest[cards[1]] >= 4
    assert largest[cards[2]] == memory.MAX_BATCH  # The search stops at its cap.
    fitted = memory.step_memory(config, "generate", (32, 32), largest[cards[1]])["total_bytes"]
    assert fitted <= cards[1] * memory.GB
