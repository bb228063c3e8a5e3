"""The quickstart notebook runs top to bottom, so it never rots."""

import os

import nbformat
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_executes(phantom_data_dir, monkeypatch):
    monkeypatch.setenv("SYNTH_DATA_DIR", phantom_data_dir)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # As in-process tests: faster compiles.
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "strip outputs"
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
    )
    client.execute()
    text = "".join(out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs)
    assert "stages run: ['structure', 'segmentor', 'translator', 'synthesis']" in text
    assert any(
        "image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs
    )
