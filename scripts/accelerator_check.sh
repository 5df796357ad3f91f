#!/usr/bin/env bash
# The prepared accelerator check (see scripts/accelerator_check.py for the steps): platform
# detection, the benchmark for both models in fp32 and bf16, a short FD001 training that is
# SIGKILLed after its first checkpoint and resumed, and a summary table, within ~9 minutes.
#
#   bash scripts/accelerator_check.sh [OUT_DIR] [extra accelerator_check.py flags, e.g. --quick]
#
# Run from anywhere on a GPU machine or TPU VM with jax (and flax, optax, orbax-checkpoint,
# tensorstore, pandas, pyarrow, matplotlib) already installed: it never reaches a package
# registry and never touches that jax. Packages the machine lacks (typically grain,
# ml-collections, tensorboardX) travel as wheels in .whl/ at the repository root, made
# beforehand on a machine with pip access:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl grain ml-collections tensorboardX
# and are installed here with --no-index into a private directory.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/accelerator_check_out}}"
shift || true
PY="${PYTHON:-python3}"
cd "$ROOT"
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE="${PDM_WHEEL_SITE:-/tmp/pdm_site}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
missing="$("$PY" - <<'PY'
import importlib.util
need = ["jax", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections", "pandas",
        "pyarrow", "tensorboardX", "absl"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)"
if [ -n "$missing" ]; then
  echo "accelerator_check: missing Python packages: $missing (carry them as wheels in .whl/)" >&2
  exit 2
fi
exec "$PY" scripts/accelerator_check.py --out="$OUT_DIR" "$@"
