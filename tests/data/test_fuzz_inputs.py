"""Property-based fuzzing (Hypothesis) of the tables users bring, through the functions `main`
and scripts/predict.py call: training tables (`dataset.prepare`), prediction inputs
(`open_source`, `read_chunks`) and `predict_to_file` with a real checkpoint.

Why: "one error, one line" (docs/DESIGN.md) holds only if no malformed file slips past the checks
into a raw pandas, numpy or jax exception, or into silently non-finite numbers. Every case ends in
one of two ways: success (some generated tables are valid data), or the `PdmError` that the
commands print as one `error:` line naming the file before exiting 2. Cases are derandomized (CI
runs the same ones) and counted: each test asserts its count, the number docs/data.md reports.
Nothing here trains; the prediction test reads the `runs` checkpoints the inference tests share.
"""

import atexit
import collections
import gzip
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given
from hypothesis import strategies as st

from pdm_jax import configuration, inference
from pdm_jax.data import cmapss, dataset
from pdm_jax.errors import PdmError
from tests.conftest import REPO, assert_one_line_naming, fuzz_settings, load_config

# Cases per test.
EXAMPLES = {"training": 300, "inputs": 300, "predict": 12, "command": 3}
RAN: collections.Counter = collections.Counter()

# --- Malformed tables: a valid base table, then mutations of its cells, rows, columns and bytes.

ODD_CELLS = st.one_of(
    st.sampled_from(["", "abc", "n/a", "1,5", "\x00", "é", "a\nb", "1e400", "-inf", "nan", " 7 "]),
    st.sampled_from([np.nan, np.inf, 1e308, -1e308, 3.5e38, 1e38, 5e-324, 2**63, 10**20, True]),
    st.sampled_from([None, b"\xff\xfe", [1.0, 2.0], {"x": 1}]),
    st.floats(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.text(max_size=4),
)
ODD_NAMES = st.one_of(st.sampled_from(["", "a\nb", "é", "unit", "x,y", '"q"', "1"]), st.text())


@st.composite
def _mutation(draw, columns: list[str]) -> tuple:
    rows = 40  # indices are taken modulo the table's current length
    kind = draw(
        st.sampled_from(["cell", "cell", "swap", "dup", "move", "drop", "add", "rename", "cut"])
    )
    if kind == "cell":
        return kind, draw(st.integers(0, rows)), draw(st.sampled_from(columns)), draw(ODD_CELLS)
    if kind in ("swap", "move", "cut"):
        return kind, draw(st.integers(0, rows)), draw(st.integers(0, rows))
    if kind == "dup":
        return kind, draw(st.integers(0, rows))
    if kind == "drop":
        return kind, draw(st.sampled_from(columns))
    if kind == "add":
        return kind, draw(ODD_NAMES), draw(ODD_CELLS)
    return kind, draw(st.sampled_from(columns)), draw(ODD_NAMES)


def _apply(frame: pd.DataFrame, mutation: tuple) -> pd.DataFrame:
    kind, *args = mutation
    frame = frame.astype(object)
    n = max(len(frame), 1)
    if kind == "cell" and len(frame) and args[1] in frame.columns:
        frame.iat[args[0] % n, list(frame.columns).index(args[1])] = args[2]
    elif kind == "swap" and len(frame):
        order = list(range(len(frame)))
        i, j = args[0] % n, args[1] % n
        order[i], order[j] = order[j], order[i]
        frame = frame.iloc[order]
    elif kind == "move" and len(frame):
        order = list(range(len(frame)))
        order.insert(args[1] % n, order.pop(args[0] % n))
        frame = frame.iloc[order]
    elif kind == "dup" and len(frame):
        i = args[0] % n
        frame = pd.concat([frame.iloc[: i + 1], frame.iloc[i:]])
    elif kind == "cut":
        frame = frame.iloc[min(args) : max(args)]  # possibly no rows at all
    elif kind == "drop" and args[0] in frame.columns:
        frame = frame.drop(columns=[args[0]])
    elif kind == "add":
        frame = frame.assign(**{args[0]: [args[1]] * len(frame)})
    elif kind == "rename":
        frame = frame.rename(columns={args[0]: args[1]})
    return frame.reset_index(drop=True)


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    """Column by column, so duplicate names and nested cells (lists, records) reach the file;
    a column pyarrow cannot type (mixed kinds) is written as text."""
    arrays = []
    for i in range(frame.shape[1]):
        column = frame.iloc[:, i]
        try:
            arrays.append(pa.array(column, from_pandas=True))
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            arrays.append(pa.array(column.astype(str)))
    table = pa.Table.from_arrays(arrays, names=[str(c) for c in frame.columns])
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _text_bytes(frame: pd.DataFrame, fmt: str, encoding: str) -> bytes:
    if fmt == "txt":  # C-MAPSS text: whitespace-separated, no header
        text = frame.to_csv(sep=" ", header=False, index=False)
    else:
        text = frame.to_csv(index=False)
    if encoding == "mixed":  # a header in UTF-8 above rows in Latin-1, as files get concatenated
        head, _, body = text.partition("\n")
        return (head + "\n").encode("utf-8", "replace") + body.encode("latin-1", "replace")
    return text.encode(encoding, "replace")


@st.composite
def _files(draw, base: pd.DataFrame, formats: tuple[str, ...]) -> tuple[str, bytes]:
    """(extension, file bytes) of `base` after 0-3 mutations, in one of `formats`."""
    frame = base
    for mutation in draw(st.lists(_mutation(list(base.columns)), max_size=3)):
        frame = _apply(frame, mutation)
    fmt = draw(st.sampled_from(formats))
    if fmt == "parquet":
        data = _parquet_bytes(frame)
    else:
        encoding = draw(
            st.sampled_from(["utf-8", "utf-8", "latin-1", "utf-16", "utf-8-sig", "mixed"])
        )
        data = _text_bytes(frame, fmt.removesuffix(".gz"), encoding)
    damage = draw(st.sampled_from(["none", "none", "none", "bytes", "truncate", "empty"]))
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    if damage == "bytes":  # non-UTF-8 or binary garbage in the middle of the file
        data = data[:at] + draw(st.binary(min_size=1, max_size=6)) + data[at:]
    elif damage == "truncate":
        data = data[:at]
    elif damage == "empty":
        data = b""
    if fmt.endswith(".gz"):
        data = gzip.compress(data)
    return fmt, data


def _write(directory: Path, stem: str, fmt: str, data: bytes) -> Path:
    path = directory / f"{stem}.{fmt}"
    path.write_bytes(data)
    return path


def _training_base() -> pd.DataFrame:
    rows = [
        (u, t, 1.0 + 0.5 * (u % 2), 640.0 + 0.3 * t + u, 20.0 - 0.1 * t)
        for u in (1, 2, 3)
        for t in range(1, 9)
    ]
    frame = pd.DataFrame(rows, columns=["unit", "time", "load", "a", "b"])
    return frame.assign(failed=(frame["time"] == 8).astype(int))


def _cmapss_base(units: int = 3, rows: int = 8) -> pd.DataFrame:
    directory, suffix = cmapss.locate("FD001")
    history = cmapss.read_history(str(directory / f"test_FD001.txt{suffix}"))
    history = history[history["unit"] <= units]
    return history.groupby("unit").head(rows).reset_index(drop=True)


TRAINING = _training_base()
CMAPSS = _cmapss_base()
WORK = Path(tempfile.mkdtemp(prefix="pdm-fuzz-"))
atexit.register(shutil.rmtree, WORK, True)


def _training_config(path: Path, draw: st.DataObject):
    config = load_config("cnn_bilstm")
    data = config.data
    data.source, data.paths = "csv", (str(path),)
    data.columns.settings = ("load",)
    data.columns.sensors = draw.draw(st.sampled_from(["auto", ("a", "b")]))
    data.columns.failure = draw.draw(st.sampled_from([None, "failed"]))
    data.columns.ignore = () if data.columns.failure else ("failed",)
    data.nan_policy = draw.draw(st.sampled_from(["error", "ffill"]))
    data.window, data.min_history = 5, 0
    data.baseline_cycles = draw.draw(st.sampled_from([0, 3]))
    data.use_settings = draw.draw(st.booleans())
    configuration.validate(config)
    return config


@fuzz_settings(EXAMPLES["training"])
@given(file=_files(TRAINING, ("csv", "csv", "parquet", "csv.gz")), draw=st.data())
def _fuzz_training(file: tuple[str, bytes], draw: st.DataObject) -> None:
    RAN["training"] += 1
    path = _write(WORK, "fleet", *file)
    config = _training_config(path, draw)
    try:
        prepared = dataset.prepare(config.data, config.seed)
    except PdmError as err:
        assert_one_line_naming(err, str(path))
        return
    for windows in (prepared.train, prepared.val):
        if windows is not None:
            assert np.isfinite(windows.features).all() and np.isfinite(windows.targets).all()


def test_malformed_training_tables_are_valid_or_one_line_errors():
    _fuzz_training()
    print(f"training tables: {RAN['training']} cases")
    assert RAN["training"] >= EXAMPLES["training"]


# The layout a C-MAPSS checkpoint reads (what `read_saved` gives for the runs' CNN-BiLSTM).
CMAPSS_COLUMNS = inference.Columns(
    "unit", "cycle", cmapss.SETTINGS, cmapss.INFORMATIVE_SENSORS, frozenset(cmapss.COLUMNS)
)
INPUT_FORMATS = ("txt", "csv", "csv", "parquet", "csv.gz")


@fuzz_settings(EXAMPLES["inputs"])
@given(
    file=_files(CMAPSS, INPUT_FORMATS),
    chunk_rows=st.integers(1, 30),
    nan_policy=st.sampled_from(["error", "ffill"]),
)
def _fuzz_inputs(file: tuple[str, bytes], chunk_rows: int, nan_policy: str) -> None:
    RAN["inputs"] += 1
    path = _write(WORK, "history", *file)
    try:
        source = inference.open_source(path, CMAPSS_COLUMNS)
        for item in inference.read_chunks(source, nan_policy, chunk_rows):
            values = item.table.frame.drop(columns=["rul"]).to_numpy(np.float64)
            assert np.isfinite(values).all()
    except PdmError as err:
        assert_one_line_naming(err, str(path))


def test_malformed_prediction_inputs_are_read_or_one_line_errors():
    _fuzz_inputs()
    print(f"prediction inputs: {RAN['inputs']} cases")
    assert RAN["inputs"] >= EXAMPLES["inputs"]


def test_predict_to_file_leaves_a_whole_output_or_none(runs):
    """Through the real checkpoint, with small chunks so that errors land after earlier chunks
    were written to the temp file: the output is complete, or absent with nothing beside it."""
    base = _cmapss_base(units=4, rows=10)

    @fuzz_settings(EXAMPLES["predict"])
    @given(file=_files(base, ("csv", "parquet")), chunk_rows=st.integers(3, 12))
    def fuzz(file: tuple[str, bytes], chunk_rows: int) -> None:
        RAN["predict"] += 1
        with (
            tempfile.TemporaryDirectory(dir=WORK) as inputs,
            tempfile.TemporaryDirectory(dir=WORK) as outputs,
        ):
            path, out = _write(Path(inputs), "history", *file), Path(outputs) / "pred.csv"
            try:
                rows = inference.predict_to_file(
                    str(runs["cnn"]), [path], out, chunk_rows=chunk_rows, show_progress=False
                )
            except PdmError as err:
                assert_one_line_naming(err, str(path), str(out))
                assert not list(Path(outputs).iterdir())
                return
            assert list(Path(outputs).iterdir()) == [out] and len(pd.read_csv(out)) == rows

    fuzz()
    print(f"predictions to a file: {RAN['predict']} cases")
    assert RAN["predict"] >= EXAMPLES["predict"]


def test_generated_files_through_the_real_command(runs):
    """A few cases through scripts/predict.py itself, for what only the process shows: its exit
    code, and a stderr with one `error:` line and no traceback."""
    base = _cmapss_base(units=4, rows=10)
    codes: collections.Counter = collections.Counter()

    @fuzz_settings(EXAMPLES["command"])
    @given(file=_files(base, ("csv", "parquet")))
    def fuzz(file: tuple[str, bytes]) -> None:
        with (
            tempfile.TemporaryDirectory(dir=WORK) as inputs,
            tempfile.TemporaryDirectory(dir=WORK) as outputs,
        ):
            path, out = _write(Path(inputs), "history", *file), Path(outputs) / "pred.csv"
            args = [f"--checkpoint={runs['cnn']}", f"--input={path}", f"--output={out}"]
            proc = subprocess.run(
                [sys.executable, "scripts/predict.py", *args, "--chunk_rows=7"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
            )
            codes[proc.returncode] += 1
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            assert "Traceback" not in proc.stderr, proc.stderr
            if proc.returncode == 0:
                assert not errors and list(Path(outputs).iterdir()) == [out]
            else:
                assert proc.returncode == 2 and len(errors) == 1, proc.stderr
                assert str(path) in errors[0] and not list(Path(outputs).iterdir())

    fuzz()
    print(f"through scripts/predict.py: {codes.total()} cases, exit codes {dict(codes)}")
    assert codes.total() >= EXAMPLES["command"] and set(codes) <= {0, 2}
