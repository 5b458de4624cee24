"""The Colab notebooks run top to bottom on the CPU, offline, and are committed without outputs."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))


def test_there_are_three_notebooks() -> None:
    assert NOTEBOOKS == ["1_inference.ipynb", "2_finetuning.ipynb", "3_export.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_is_committed_clean(name: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit it without outputs"
    # The kernel inherits these: no hub retries offline, TFDS data, the notebooks' temporary
    # directories (checkpoints, exports) and the accelerator choice kept in this test's directory.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # Jupyter starts a notebook's kernel in the notebook's own folder, and so do these runs.
    folder = os.path.join(ROOT, "notebooks")
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": folder}}).execute()
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors
