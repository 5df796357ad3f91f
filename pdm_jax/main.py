"""Command-line entry: `python -m pdm_jax.main --config=configs/tft.py --workdir=DIR`.

Intentionally short (flax/examples style): flags, logging, config checks, then one library call.
A DataError/ConfigError becomes one line on stderr and exit code 2, no traceback.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from pdm_jax import cli, configuration, hostmem, training
from pdm_jax.errors import PdmError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tft.py.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory for logs, config.json and summaries (local).")
flags.DEFINE_enum(
    "mode",
    "train_and_eval",
    ["train_and_eval", "train", "eval", "data"],
    "train_and_eval: train (resuming from the latest checkpoint), early-stop on validation, score "
    "the test units (report.json); train: the same without the test report; eval: score the best "
    "parameters of the latest checkpoint on the validation and test units; data: run the data "
    "path and report on it.",
)
flags.DEFINE_string(
    "data_dir",
    None,
    "Directory with C-MAPSS files (else $PDM_DATA_DIR, the embedded FD001, the user cache).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    hostmem.tune()
    cli.quiet_library_logs()
    config = FLAGS.config
    if FLAGS.data_dir:
        config.data.data_dir = FLAGS.data_dir
    try:
        configuration.validate(config)
        cli.log_config(FLAGS["config"])
        training.run_mode(FLAGS.mode, config, FLAGS.workdir, FLAGS.data_dir)
    except PdmError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)


def run() -> None:
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
