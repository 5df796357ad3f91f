"""Exported models (`scripts/export.py`): the checkpoints of the inference tests' two runs (a
CNN-BiLSTM trained on 8 devices with baseline inputs and the unit's age, a TFT ensemble with
quantile heads), exported once, must predict what `scripts/predict.py --checkpoint` predicts on
the FD001 test units, at any batch size, and run from the documented snippet with jax alone.
"""

import json
import re
import subprocess
import sys
import uuid

import fsspec
import jax
import numpy as np
import pandas as pd
import pytest

from pdm_jax import inference
from pdm_jax.data import cmapss
from pdm_jax.errors import ConfigError
from pdm_jax.inference import export
from pdm_jax.inference.exported import raw_windows
from tests.conftest import REPO
from tests.test_parallel import _env

pytest_plugins = ["tests.servers"]

OUTPUTS = ("rul_pred", "rul_p10", "rul_p90")


@pytest.fixture(scope="module")
def test_file():
    directory, suffix = cmapss.locate("FD001")
    return str(directory / f"test_FD001.txt{suffix}")


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """{'cnn': DIR, 'tft': DIR}: each run's best step exported for the CPU."""
    root = tmp_path_factory.mktemp("exports")
    for name, workdir in runs.items():
        export.export(str(workdir), str(root / name))
    return {name: root / name for name in runs}


@pytest.fixture(scope="module")
def references(runs, test_file):
    """scripts/predict.py --checkpoint's frame for each run (the library call it makes)."""
    return {
        name: inference.predict_files(str(workdir), [test_file], show_progress=False)
        for name, workdir in runs.items()
    }


def _exported(directory, test_file, **options) -> pd.DataFrame:
    frames = inference.iter_exported(str(directory), [test_file], show_progress=False, **options)
    return pd.concat(list(frames), ignore_index=True)


@pytest.mark.parametrize("name", ["cnn", "tft"])
def test_the_export_predicts_what_the_checkpoint_predicts(exports, references, test_file, name):
    meta = json.loads((exports[name] / "model.json").read_text())
    ref = references[name]
    got = _exported(exports[name], test_file)
    assert list(got.columns) == list(ref.columns) == ["unit", "time", *meta["outputs"]]
    assert got["unit"].tolist() == ref["unit"].tolist() and len(got) == 100
    np.testing.assert_array_equal(got["time"], ref["time"])
    for column in meta["outputs"]:
        np.testing.assert_allclose(got[column], ref[column], rtol=1e-5, err_msg=column)
    # Both read baseline inputs (the unit's first rows go in as `head`: 5 for the CNN-BiLSTM, 40
    # for configs/tft.py) and the unit's age, named as the file names its time column.
    assert meta["inputs"] == ["raw", "length", "head"]
    assert meta["baseline_cycles"] == {"cnn": 5, "tft": 40}[name]
    assert meta["columns"][-1] == "cycle" and set(OUTPUTS) <= set(meta["outputs"])
    assert meta["source"]["params_sha256"] and meta["intervals"] == "calibrated"


@pytest.mark.parametrize("name", ["cnn", "tft"])
def test_batch_size_does_not_change_a_window(exports, test_file, name):
    whole = _exported(exports[name], test_file, batch_size=1024)
    for size in (1, 7):
        part = _exported(exports[name], test_file, batch_size=size)
        for column in OUTPUTS:
            np.testing.assert_allclose(part[column], whole[column], rtol=1e-6, atol=1e-4)


def test_the_documented_snippet_runs_with_jax_alone(exports, references, test_file, tmp_path):
    text = (REPO / "docs" / "inference.md").read_text()
    snippet = re.search(r"<!-- export-snippet -->\n```python\n(.*?)```", text, re.S).group(1)
    lines = [ln for ln in snippet.splitlines() if ln.strip()]
    assert len(lines) < 30
    frame = pd.read_csv(test_file, sep=r"\s+", header=None, names=list(cmapss.COLUMNS))
    csv = tmp_path / "engines.csv"
    frame.to_csv(csv, index=False)
    script = tmp_path / "score.py"
    script.write_text(
        snippet + "\nassert 'pdm_jax' not in sys.modules and 'flax' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith(('pdm_jax', 'flax')))\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(exports["tft"]), str(csv)],
        cwd=tmp_path,  # not the repository: nothing of it on the path
        env={**_env(1), "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = pd.read_csv(pd.io.common.StringIO(proc.stdout))
    ref = references["tft"]
    assert printed["unit"].tolist() == ref["unit"].tolist()
    for column in OUTPUTS:
        np.testing.assert_allclose(printed[column], ref[column], rtol=1e-5, atol=1e-4)


def test_an_export_for_cuda_and_tpu_deserialises_here(runs, tmp_path, test_file):
    out = tmp_path / "all"
    meta = export.export(str(runs["cnn"]), str(out), platforms=("cpu", "cuda", "tpu"))
    assert meta["platforms"] == ["cpu", "cuda", "tpu"]
    loaded = jax.export.deserialize(bytearray((out / "model.jaxexport").read_bytes()))
    assert loaded.platforms == ("cpu", "cuda", "tpu")
    assert len(_exported(out, test_file)) == 100  # and its CPU lowering runs


def test_bad_requests_are_one_line_and_leave_nothing(runs, tmp_path, test_file):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"--step=99999: no such step"):
        export.export(str(runs["cnn"]), str(out), step=99999)
    with pytest.raises(ConfigError, match=r"--platforms: expected some of"):
        export.export(str(runs["cnn"]), str(out), platforms=("quantum",))
    assert not out.exists() and not list(tmp_path.glob(".export-*"))
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/export.py",
            f"--checkpoint={tmp_path / 'nothing'}",
            f"--output={out}",
        ],
        cwd=REPO,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_an_export_from_s3_writes_no_credential(runs, s3_env, tmp_path, monkeypatch):
    """model.json records where the model came from; the credentials that reached it do not
    travel with the model."""
    secret = f"pdm-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    uri = s3_env.make_bucket() + "/run/checkpoints"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(runs["cnn"] / "checkpoints"), uri.removeprefix("s3://"), recursive=True)
    export.export(uri, str(tmp_path / "model"))
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert uri in json.dumps(meta)
    written = b"".join(p.read_bytes() for p in (tmp_path / "model").rglob("*") if p.is_file())
    assert secret.encode() not in written


def test_predict_script_takes_an_export(exports, references, test_file, tmp_path):
    output = tmp_path / "pred.csv"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/predict.py",
            f"--exported={exports['cnn']}",
            f"--input={test_file}",
            f"--output={output}",
            "--quiet",
        ],
        cwd=REPO,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, ref = pd.read_csv(output), references["cnn"]
    assert list(got.columns) == list(ref.columns)
    for column in OUTPUTS:
        np.testing.assert_allclose(got[column], ref[column], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["cnn", "tft"])
def test_onnx_agrees_with_the_jax_export(runs, exports, test_file, tmp_path, name):
    pytest.importorskip("jax2onnx", reason='ONNX export needs the extra: pip install ".[onnx]"')
    ort = pytest.importorskip("onnxruntime", reason='pip install ".[onnx]"')
    meta = export.export(str(runs[name]), str(tmp_path / "onnx"), fmt="onnx")
    model = inference.load_exported(str(exports[name]))
    source = inference.open_source(test_file, model.columns())
    item = next(iter(inference.read_chunks(source)))
    order = ["time" if c == meta["time_column"] else c for c in meta["columns"]]
    values = item.table.frame[order].to_numpy(np.float64)
    starts, stops = item.table.unit_bounds()
    raw, length, head = raw_windows(values, starts, stops - 1, model.window, model.head)
    expected = model(raw, length, head)
    offset = np.asarray(meta["offsets"])  # float32 inputs, centred as model.json says
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    feeds = {"raw": (raw - offset).astype(np.float32), "length": length}
    if "head" in meta["inputs"]:
        feeds["head"] = (head - offset).astype(np.float32)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, feeds), strict=True))
    assert sorted(got) == sorted(meta["outputs"])
    for column in meta["outputs"]:
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-4, atol=1e-3)
