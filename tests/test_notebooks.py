"""The example notebooks run as a reader runs them: every cell, headless, in a Jupyter kernel.

The cell tagged ``parameters`` is replaced by a small run (one epoch, few images, a small
copy of the real data): what is tested is that every cell of the notebook works with the
API as it is, not what the model learns (tests/test_training.py does that)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts a kernel and trains

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = "EPOCHS = 1\nFAST_EPOCHS = 1\nTRAIN_LIMIT = 1000\n"


def _run_notebook(path: Path, data_dir: Path, workdir: Path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs one cell tagged 'parameters'"
    names = {line.split("=")[0].strip() for line in TINY.splitlines()}
    assert names <= {line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line}
    tagged[0].source = TINY
    environment = {**os.environ, "FMNIST_DATA": str(data_dir),
                   "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": workdir}})
    client.execute(env=environment)  # raises CellExecutionError, naming the cell, on any error
    return notebook


def test_the_quickstart_notebook_runs_from_top_to_bottom(data_subset, tmp_path):
    notebook = _run_notebook(EXAMPLES / "quickstart.ipynb", data_subset(2000, 300), tmp_path)
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if {"image/png", "image/jpeg"} & set(o.get("data", {}))]
    assert len(images) >= 7  # curves, confusion matrix, samples, top losses, reliability, the photo, what it saw
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("fmnist training run" in h for h in html) and any("Fashion-MNIST" in h for h in html)
    assert list(tmp_path.glob("runs/fast-*/model.onnx"))
    for cell in notebook.cells:  # where the time goes (pytest -s shows it)
        timing = cell.metadata.get("execution", {})
        if "iopub.execute_input" in timing:
            import datetime
            t0, t1 = (datetime.datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                      for k in ("iopub.execute_input", "shell.execute_reply"))
            print(f"{(t1 - t0).total_seconds():6.1f} s  {cell.source.splitlines()[0][:70]}")


def test_the_committed_notebook_holds_the_outputs_of_a_full_run():
    """What GitHub shows was made by the committed code on the whole data: every code cell ran,
    in order, with no error, and the figures are there as PNG images."""
    import nbformat

    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    outputs = [output for cell in code for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum(bool({"image/png", "image/jpeg"} & set(o.get("data", {}))) for o in outputs) >= 7
    assert "EPOCHS = 10" in code[0].source
