#!/usr/bin/env python
"""Downloads NASA's C-MAPSS files (FD001-FD004) where `pdm_jax` looks for them.

Run from anywhere once the package is installed:

    python scripts/download_cmapss.py                    # all subsets into the user cache
    python scripts/download_cmapss.py --subsets=FD002 --dest=/data/cmapss

Every file's sha256 is checked before anything is written, so a failed or tampered download
leaves the destination as it was. Errors are one line on stderr and exit code 2, like `pdm-jax`.
"""

from __future__ import annotations

import argparse
import sys

from pdm_jax.data import cmapss, download
from pdm_jax.errors import DataError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download and verify the NASA C-MAPSS turbofan data set."
    )
    parser.add_argument(
        "--dest", default=None, help=f"target directory (default: {cmapss.cache_dir()})"
    )
    parser.add_argument("--url", default=download.DEFAULT_URL, help="zip to download")
    parser.add_argument(
        "--subsets",
        default=",".join(cmapss.SUBSETS),
        help="comma-separated subsets (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="network timeout in seconds (default: 60)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    subsets = tuple(s.strip().upper() for s in args.subsets.split(",") if s.strip())
    try:
        if not subsets:
            raise DataError("--subsets: expected a comma-separated list such as FD001,FD002")
        dest = download.download_cmapss(
            dest=args.dest,
            url=args.url,
            subsets=subsets,
            timeout=args.timeout,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
