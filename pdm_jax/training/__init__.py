"""Training: the loop (`train_and_evaluate`), `--mode=eval` (`evaluate_checkpoint`), and what they
are built from. Inference never imports this package; both share `prediction` and `optim`."""

from pdm_jax.training.evaluation import REPORT_FILE, evaluate_checkpoint
from pdm_jax.training.loop import run_mode, train_and_evaluate
from pdm_jax.training.state import RUN_INFO_FILE, build

__all__ = [
    "REPORT_FILE",
    "RUN_INFO_FILE",
    "build",
    "evaluate_checkpoint",
    "run_mode",
    "train_and_evaluate",
]
