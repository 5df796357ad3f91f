"""Batch RUL inference from a checkpoint, with no training data:

    python scripts/predict.py --checkpoint=URI|--exported=DIR --input=PATH [--input=PATH ...]
        --output=PATH
        [--step=best|latest|N] [--all_steps] [--batch_size=1024] [--dtype=float32|bfloat16]
        [--chunk_rows=500000] [--intervals=calibrated|raw]

URI is a checkpoint store (local path, file://, gs://) or a run directory holding checkpoints/.
Inputs are C-MAPSS text files (test_FD001.txt) or CSV/Parquet tables in the training run's
column layout. The output (CSV or Parquet by extension) has `unit`, `time`, `rul_pred`, one
`rul_pNN` per other model quantile, and `rul_p10`/`rul_p90` as the p10-p90 band calibrated on
the run's validation units (for point models too) when the checkpoint holds one. Inputs are
read and predictions written a chunk of whole units at a time, so memory stays flat on inputs of
any size. Progress on stderr; a bad input or checkpoint is one `error: ...` line and exit code 2,
and leaves no output file behind.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pdm_jax.errors import OneLineParser, PdmError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint store URI or run directory")
    source.add_argument(
        "--exported",
        help="a directory written by scripts/export.py, in place of --checkpoint (same columns; "
        "--step, --dtype, --infer_microbatch and --intervals were fixed at export)",
    )
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        help="C-MAPSS text, CSV or Parquet file; repeat for several",
    )
    parser.add_argument("--output", required=True, help="predictions: .csv, .csv.gz or .parquet")
    parser.add_argument(
        "--step",
        default="best",
        help="best (best-by-validation parameters, default), latest, or a checkpoint step",
    )
    parser.add_argument(
        "--all_steps",
        action="store_true",
        help="one prediction per time step of every unit, not only its last",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=1024,
        help="windows per batch over all local devices (rounded up to a multiple of their count)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="compute dtype (default: the one the training run used)",
    )
    parser.add_argument(
        "--chunk_rows",
        type=int,
        default=500_000,
        help="input rows read at a time (plus the rest of the unit that straddles the cut); "
        "bounds memory on large inputs",
    )
    parser.add_argument(
        "--infer_microbatch",
        default="auto",
        help="windows per chunk of a batch per device; auto: decided for this machine "
        "(chunks of 32 for the TFT on CPU), 0: the whole batch at once",
    )
    parser.add_argument(
        "--intervals",
        choices=["calibrated", "raw"],
        default="calibrated",
        help="calibrated: the p10-p90 band fitted on the run's validation units (default; point "
        "models too); raw: the model's own quantiles only",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Orbax and jax report every restore and backend probe at INFO; ours say what matters.
    for name in ("absl", "jax", "orbax", "pdm_jax.hostmem"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from pdm_jax import hostmem, inference  # after flag parsing: a bad flag should not wait on jax

    hostmem.tune()
    try:
        if args.exported:
            inference.predict_exported(
                args.exported,
                args.input,
                args.output,
                all_steps=args.all_steps,
                batch_size=args.batch_size,
                chunk_rows=args.chunk_rows,
                show_progress=not args.quiet,
            )
            return 0
        inference.predict_to_file(
            args.checkpoint,
            args.input,
            args.output,
            step=args.step,
            all_steps=args.all_steps,
            batch_size=args.batch_size,
            dtype=args.dtype,
            show_progress=not args.quiet,
            chunk_rows=args.chunk_rows,
            microbatch=args.infer_microbatch,
            intervals=args.intervals,
        )
    except PdmError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
