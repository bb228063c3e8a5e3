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
