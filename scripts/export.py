"""A trained model as one self-contained artifact that runs where pdm-jax is not installed:

    python scripts/export.py --checkpoint=URI|WORKDIR --output=DIR [--step=best|latest|N]
        [--platforms=cpu,cuda,tpu] [--intervals=calibrated|raw] [--format=jax|onnx]

Writes DIR/model.jaxexport (the prediction function, serialised by jax.export for every
platform asked, any batch size) and DIR/model.json (its input columns, window, outputs and
source). The function takes raw readings and returns scripts/predict.py's columns; load it with
jax alone (docs/inference.md), or predict with `scripts/predict.py --exported=DIR`. A bad
request is one `error: ...` line and exit code 2, and leaves DIR as it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pdm_jax.errors import OneLineParser, PdmError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint store URI or run directory")
    parser.add_argument("--output", required=True, help="directory to write (new or empty)")
    parser.add_argument(
        "--step", default="best", help="best (default), latest, or a checkpoint step"
    )
    parser.add_argument(
        "--platforms",
        default="cpu",
        help="comma-separated platforms to lower for: cpu, cuda, tpu, rocm (default: cpu)",
    )
    parser.add_argument(
        "--format",
        choices=["jax", "onnx"],
        default="jax",
        help="jax: model.jaxexport (default); onnx: model.onnx through jax2onnx (extra [onnx]), "
        "float32 inputs with model.json's offsets subtracted",
    )
    parser.add_argument(
        "--intervals",
        choices=["calibrated", "raw"],
        default="calibrated",
        help="calibrated: the run's conformal p10-p90 band (default); raw: the model's own",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pdm_jax.inference import export  # after flag parsing: a bad flag should not wait on jax

    try:
        meta = export.export(
            args.checkpoint,
            args.output,
            step=args.step,
            platforms=args.platforms.split(","),
            intervals=args.intervals,
            fmt=args.format,
        )
    except PdmError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    summary = {k: meta[k] for k in ("model", "window", "inputs", "outputs", "platforms")}
    print(f"exported to {args.output}: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
