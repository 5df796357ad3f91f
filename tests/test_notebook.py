"""notebooks/colab_quickstart.ipynb runs top to bottom on CPU.

The notebook is executed as a user would run it (nbclient, one kernel, cell by cell), with small
parameters injected after its `parameters` cell the way papermill does: a tiny model, 20 steps,
the run directory under tmp_path. Outside Colab its install cell installs nothing, so the kernel
must import this checkout's pdm_jax with this interpreter.
"""

import json
import os
import sys

import nbformat
import pandas as pd
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "colab_quickstart.ipynb"
NUM_STEPS = 20


def _inject(nb: nbformat.NotebookNode, source: str) -> None:
    """Inserts `source` as a cell right after the cell tagged `parameters` (papermill-style)."""
    index = next(
        i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])
    )
    cell = nbformat.v4.new_code_cell(source, id="injected-parameters")
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path / "run"
    _inject(
        nb,
        "\n".join(
            [
                "SMALL = True",
                f"NUM_STEPS = {NUM_STEPS}",
                f"WORKDIR = {str(workdir)!r}",
                'CHECKPOINT_URI = ""',
                'MODEL = "cnn_bilstm"',
                # The kernel must be this interpreter (its venv), not whatever `python` is first
                # on PATH: jupyter_client swaps a kernelspec's `python` for sys.executable.
                "import sys",
                f"assert sys.prefix == {sys.prefix!r}, sys.prefix",
            ]
        ),
    )
    env = dict(os.environ)  # conftest's XLA_FLAGS (cheap CPU compiles) included
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO)}},  # the kernel's cwd
    )
    client.execute(env=env)  # raises CellExecutionError naming the cell on any error

    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    report = json.loads((workdir / "report.json").read_text())
    assert report["resumed_from_step"] == NUM_STEPS // 2
    assert report["steps"] == NUM_STEPS
    predictions = pd.read_csv(workdir / "predictions_FD001.csv")
    assert len(predictions) == 100  # one row per FD001 test engine
    assert predictions["rul_pred"].notna().all()
