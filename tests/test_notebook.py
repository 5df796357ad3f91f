"""notebooks/colab_quickstart.ipynb runs top to bottom on CPU, opened from a clone and from a
fresh directory.

The notebook is executed as a user would run it (nbclient, one kernel, cell by cell), with small
parameters injected after its `parameters` cell the way papermill does: a tiny model, 20 steps,
the run directory under tmp_path. Opened from this checkout it finds the clone and installs
nothing; from a fresh directory it clones `REPO_URL` (here a file:// URL of this repository, so
the committed code) and imports pdm_jax from that clone; this environment lacks nothing, so
nothing is installed there either.
"""

import json
import os
import sys

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

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


def _run(nb: nbformat.NotebookNode, cwd, source: str, pythonpath: bool) -> None:
    _inject(nb, source)
    env = dict(os.environ)  # conftest's XLA_FLAGS (cheap CPU compiles) included
    paths = [str(REPO)] if pythonpath else []
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},  # the kernel's cwd
    )
    client.execute(env=env)  # raises CellExecutionError naming the cell on any error


def _parameters(workdir, extra: str = "") -> str:
    return "\n".join(
        [
            "SMALL = True",
            f"NUM_STEPS = {NUM_STEPS}",
            f"WORKDIR = {str(workdir)!r}",
            'CHECKPOINT_URI = ""',
            'MODEL = "cnn_bilstm"',
            extra,
            # The kernel must be this interpreter (its venv), not whatever `python` is first
            # on PATH: jupyter_client swaps a kernelspec's `python` for sys.executable.
            "import sys",
            f"assert sys.prefix == {sys.prefix!r}, sys.prefix",
        ]
    )


def _outputs(nb: nbformat.NotebookNode) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


@pytest.mark.parametrize("opened_from", ["clone", "fresh directory"])
def test_quickstart_notebook_runs(tmp_path, opened_from):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path / "run"
    if opened_from == "clone":
        _run(nb, REPO / "notebooks", _parameters(workdir), pythonpath=True)
        clone = REPO
    else:
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        source = _parameters(workdir, f"REPO_URL = {REPO.as_uri()!r}")
        _run(nb, fresh, source, pythonpath=False)
        clone = fresh / "pdm-jax"
        assert (clone / ".git").is_dir()
    # pdm_jax came from the clone the notebook found or made, not from the environment.
    assert f"pdm_jax from {clone / 'pdm_jax'}," in _outputs(nb)
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


def test_quickstart_notebook_without_a_clone_or_url_stops_with_one_message(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.raises(CellExecutionError) as raised:
        _run(nb, tmp_path, _parameters(tmp_path / "run"), pythonpath=False)
    assert raised.value.ename == "SetRepoUrl"
    assert raised.value.evalue.startswith("not opened from a clone of pdm-jax: set REPO_URL")
    assert not (tmp_path / "pdm-jax").exists() and not (tmp_path / "run").exists()
