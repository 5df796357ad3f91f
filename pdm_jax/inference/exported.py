"""Predictions from an exported model (`scripts/export.py`) in place of a checkpoint.

Why here too: `scripts/predict.py --exported=DIR` checks an export end to end against the files
users score, with the same input checks, output columns and streamed writing as
`--checkpoint`; what runs between windowing and the output is the exported function alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import pandas as pd

from pdm_jax import tablewriter
from pdm_jax.data.table import TIME, UNIT
from pdm_jax.errors import ConfigError
from pdm_jax.inference.inputs import Input, open_source, read_chunks
from pdm_jax.inference.predictor import Columns
from pdm_jax.progress import Progress

MODEL_FILE, META_FILE = "model.jaxexport", "model.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    path: str
    meta: dict[str, Any]
    function: Any  # jax.export.Exported

    @property
    def window(self) -> int:
        return int(self.meta["window"])

    @property
    def head(self) -> int:
        return int(self.meta["baseline_cycles"])

    def columns(self) -> Columns:
        """The input layout the export reads, as `open_source` checks files against it."""
        meta = self.meta
        time = meta["time_column"]
        features = tuple(c for c in meta["columns"] if c not in meta["settings"] and c != time)
        known = frozenset(meta.get("known_columns", meta["columns"]))
        return Columns(meta["unit_column"], time, tuple(meta["settings"]), features, known)

    def __call__(self, raw: np.ndarray, length: np.ndarray, head: np.ndarray) -> dict:
        args = [raw, length, *([head] if self.head else [])]
        with jax.enable_x64(True):  # the readings enter in float64
            out = self.function.call(*args)
        return {k: np.asarray(v) for k, v in out.items()}


def load_exported(directory: str) -> ExportedModel:
    """The export in `directory`, checked: one `ConfigError` line for anything wrong."""
    paths = [os.path.join(directory, name) for name in (MODEL_FILE, META_FILE)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"--exported: {directory} holds no export ({', '.join(missing)} missing)")
    with open(paths[1]) as handle:
        meta = json.load(handle)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"--exported: {paths[1]} is format {meta.get('format_version')!r}; this version "
            f"reads format {FORMAT_VERSION}"
        )
    with open(paths[0], "rb") as handle:
        function = jax.export.deserialize(bytearray(handle.read()))
    platform = jax.devices()[0].platform
    if platform not in function.platforms:
        raise ConfigError(
            f"--exported: {directory} was exported for {', '.join(function.platforms)}, not "
            f"{platform} (export again with --platforms={platform})"
        )
    return ExportedModel(directory, meta, function)


def raw_windows(
    values: np.ndarray, starts: np.ndarray, ends: np.ndarray, window: int, head: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exported function's inputs for the windows ending at rows `ends` of units beginning at
    rows `starts` of `values` [rows, C]: (raw [N, W, C], length [N], head [N, K, C])."""
    rows = ends[:, None] + np.arange(1 - window, 1)[None, :]
    valid = rows >= starts[:, None]
    raw = np.where(valid[..., None], values[np.where(valid, rows, ends[:, None])], 0.0)
    first = starts[:, None] + np.arange(head)[None, :]
    inside = first <= ends[:, None]
    heads = np.where(inside[..., None], values[np.where(inside, first, starts[:, None])], 0.0)
    return raw, (ends - starts + 1).astype(np.int32), heads


def _frames(
    model: ExportedModel, item: Input, all_steps: bool, batch: int, progress: Progress
) -> pd.DataFrame:
    """One chunk's predictions, in fixed-size batches (one compile for the whole run)."""
    order = [TIME if c == model.meta["time_column"] else c for c in model.meta["columns"]]
    values = item.table.frame[order].to_numpy(np.float64)
    starts, stops = item.table.unit_bounds()
    unit_start = np.repeat(starts, stops - starts)
    ends = np.arange(len(values)) if all_steps else stops - 1
    parts: list[dict[str, np.ndarray]] = []
    for at in range(0, len(ends), batch):
        chosen = ends[at : at + batch]
        pad = batch - len(chosen)
        chosen = np.concatenate([chosen, np.repeat(chosen[-1:], pad)])
        out = model(*raw_windows(values, unit_start[chosen], chosen, model.window, model.head))
        parts.append({k: v[: batch - pad] for k, v in out.items()})
        progress.update(batch - pad)
    frame = pd.DataFrame({"unit": item.table.unit_labels[item.table.frame[UNIT].to_numpy()[ends]]})
    frame["time"] = item.times[ends]
    for name in model.meta["outputs"]:
        frame[name] = np.concatenate([p[name] for p in parts]).astype(np.float32)
    return frame


def iter_exported(
    directory: str,
    inputs: Sequence[str | os.PathLike],
    all_steps: bool = False,
    batch_size: int = 1024,
    chunk_rows: int = 500_000,
    show_progress: bool = True,
) -> Iterator[pd.DataFrame]:
    """Prediction frames with `scripts/predict.py`'s columns, one per chunk of whole units."""
    if not inputs:
        raise ConfigError("--input: give at least one file to predict on")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch_size: expected an integer >= 1, got {batch_size!r}")
    model = load_exported(directory)
    sources = [open_source(path, model.columns()) for path in inputs]
    progress = Progress(
        None, "windows", f"predicting {model.meta['model']} (exported)", enabled=show_progress
    )
    try:
        for source in sources:
            for item in read_chunks(source, model.meta.get("nan_policy", "error"), chunk_rows):
                frame = _frames(model, item, all_steps, batch_size, progress)
                if len(sources) > 1:
                    frame.insert(0, "file", source.path)
                yield frame
    finally:
        progress.close()


def predict_exported(
    directory: str, inputs: Sequence[str | os.PathLike], output: str | os.PathLike, **options: Any
) -> int:
    """`iter_exported` streamed into `output` (complete or absent); returns the rows written."""
    with tablewriter.AtomicTableWriter(output) as out:
        for frame in iter_exported(directory, inputs, **options):
            out.write(frame)
        out.commit()
    return out.rows
