"""Which validation windows predict the test score: each run's best parameters scored on
three sets of its own validation windows, beside its test RMSE.

- `all`: every window of the held-out units (what `train.select_on=all`, the default, selects
  on). Each unit brings its whole healthy early life, truth at the RUL cap.
- `degrading`: the windows whose truth is below the cap (`train.select_on=degrading`).
- `from_30`: the windows ending after at least 30 observed cycles, the set the default
  window (30, full windows only) gives: the same windows whatever `data.window` and
  `data.min_history` a run used, so runs of different window settings compare on it.
- `test_cut`: each held-out unit cut the way the test units are: one window ending after l
  observed cycles for every test unit's observed length l that the unit outlives. It uses the
  test units' lengths, which are inputs (what a user has before any truth is known), never their
  truth, so it is a set a run may select on.

    python experiments/validation_windows.py --data_dir=$PDM_DATA_DIR RUN_DIR [RUN_DIR ...]

prints one JSON line per run and a Markdown table (`--markdown=FILE` writes it). Every run is
scored on its own validation units (the seed's split) with the parameters its checkpoint keeps
as best.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import numpy as np

from pdm_jax import metrics
from pdm_jax.data import dataset
from pdm_jax.inference import predictor
from pdm_jax.training import evaluation


def test_cut(val: dataset.Windows, test_lengths: np.ndarray) -> np.ndarray:
    """Indices of the validation windows that end where a test-like cut would: after l observed
    cycles of a unit, for every test length l shorter than that unit's life (repeats kept)."""
    observed = val.ends - val.row_start[val.ends] + 1  # cycles seen at each window's end
    starts = val.row_start[val.ends]
    picks = []
    for start in np.unique(starts):
        ids = np.flatnonzero(starts == start)
        life = int(np.sum(val.row_start == start))
        by_length = {int(observed[i]): i for i in ids}
        picks += [by_length[int(n)] for n in test_lengths if n < life and int(n) in by_length]
    return np.asarray(picks, np.int64)


def score_run(workdir: str, data_dir: str | None) -> dict[str, Any]:
    run = predictor.load(predictor.store_uri(workdir), "best", intervals="raw")
    config = run.config
    prepared = dataset.prepare(config.data, int(config.seed), data_dir)
    val = evaluation.evaluate(run.predict, run.params, prepared.val, run.mesh, run.microbatch)
    cap = float(config.data.rul_cap) if config.data.rul_cap else None
    starts, stops = prepared.raw.test.unit_bounds()
    cut = test_cut(prepared.val, stops - starts)
    below = metrics.below_cap(val["true"], cap)
    ends = prepared.val.ends
    from_30 = np.flatnonzero(ends - prepared.val.row_start[ends] + 1 >= 30)
    test = evaluation.evaluate(run.predict, run.params, prepared.test, run.mesh, run.microbatch)

    def rmse(ids: np.ndarray) -> float:
        return metrics.rul_metrics(val["pred"][ids], val["true"][ids])["rmse"]

    return {
        "run": workdir,
        "subset": config.data.subset,
        "seed": int(config.seed),
        "best_step": run.params_step,
        "val_all": float(val["rmse"]),
        "val_degrading": rmse(np.flatnonzero(below)),
        "val_from_30": rmse(from_30),
        "val_test_cut": rmse(cut),
        "test": float(test["rmse"]),
        "val_windows": len(prepared.val),
        "at_cap_all": float(np.mean(~below)),
        "at_cap_test_cut": float(np.mean(~below[cut])),
        "at_cap_test": float(np.mean(prepared.test.targets[prepared.test.ends] >= cap))
        if cap
        else 0.0,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = "| run | val all | val degrading | val from 30 | val test-cut | test |"
    lines = [head + " at cap: all / test-cut / test |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        caps = f"{r['at_cap_all']:.0%} / {r['at_cap_test_cut']:.0%} / {r['at_cap_test']:.0%}"
        lines.append(
            f"| {r['run']} | {r['val_all']:.2f} | {r['val_degrading']:.2f} | "
            f"{r['val_from_30']:.2f} | "
            f"{r['val_test_cut']:.2f} | {r['test']:.2f} | {caps} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    rows = []
    for workdir in args.runs:
        rows.append(score_run(workdir, args.data_dir))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.markdown:
        pathlib.Path(args.markdown).write_text(table(rows) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
