"""Every notebook in notebooks/ runs top to bottom, so none can rot.

A notebook that needs a real model sets `"rh_lens": {"needs_model": true}` in its metadata
and is marked slow; the others read small saved results and run in seconds.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def needs_model(path: Path) -> bool:
    return bool(nbformat.read(path, as_version=4).metadata.get("rh_lens", {}).get("needs_model", False))


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if needs_model(p) else []) for p in NOTEBOOKS]
)
def test_notebook_runs(path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_executed_with_figures(path):
    """A reader sees the analysis on the repository page without running it."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "run the notebook and commit it with its outputs"
    outputs = [o for cell in code for o in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure in the committed outputs"
