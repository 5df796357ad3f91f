#!/usr/bin/env python
"""Hyperparameter search on Optuna: start the same command on as many workers as you like.

    python scripts/tune.py --config=configs/cnn_bilstm.py --space=experiments/spaces/cnn_bilstm.py \
        --study=NAME --storage=sqlite:///runs/tune.db --trials=N --workdir=runs/tune \
        [--data_dir=DIR] [--config.KEY=VALUE ...] [--final]

Every worker sharing --storage works on the same study until it holds N finished trials;
rerunning the command continues it. Trials are scored on their best validation RMSE and never
see the test units; --final scores the best trial's checkpoint on them once. Exit codes: 0 done,
2 bad flags, config or space, 130 interrupted (rerun to continue).
"""

import json
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from pdm_jax import cli, configuration, hostmem, tuning
from pdm_jax.errors import PdmError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Base config file, e.g. configs/cnn_bilstm.py.")
flags.DEFINE_string("space", None, "Space file defining space(trial) -> config overrides.")
flags.DEFINE_string("study", None, "Study name (shared by every worker of the search).")
flags.DEFINE_string(
    "storage",
    None,
    "Optuna storage: sqlite:///FILE (one machine), postgresql://... or mysql://... (many), "
    "journal:FILE (a shared filesystem).",
)
flags.DEFINE_integer("trials", 20, "Finished (complete or pruned) trials the study should hold.")
flags.DEFINE_string("workdir", "runs/tune", "Parent of the trials' run directories.")
flags.DEFINE_string("data_dir", None, "Directory with C-MAPSS files (as for pdm_jax.main).")
flags.DEFINE_enum("pruner", "median", list(tuning.PRUNERS), "Stops poor trials early.")
flags.DEFINE_enum("sampler", "tpe", list(tuning.SAMPLERS), "How the next trial is chosen.")
flags.DEFINE_integer("sampler_seed", None, "Seed of the sampler (default: random).")
flags.DEFINE_integer(
    "heartbeat_s",
    60,
    "Seconds between a worker's heartbeats; a trial silent for twice this long "
    "is failed and run again (RDB storages).",
)
flags.DEFINE_bool("final", False, "Score the best trial's checkpoint on the test units, once.")
flags.mark_flags_as_required(["config", "space", "study", "storage"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    hostmem.tune()
    cli.quiet_library_logs()
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("pdm_jax").setLevel(logging.WARNING)  # one line per trial is the progress
    logging.getLogger("optuna").setLevel(logging.WARNING)
    config = FLAGS.config
    if FLAGS.data_dir:
        config.data.data_dir = FLAGS.data_dir
    options = {name: FLAGS[name].value for name in ("study", "storage", "trials", "workdir")}
    options.update(pruner=FLAGS.pruner, sampler=FLAGS.sampler, heartbeat_s=FLAGS.heartbeat_s)
    options["seed"] = FLAGS.sampler_seed
    try:
        configuration.validate(config)
        space = tuning.load_space(FLAGS.space)
        study = tuning.run_study(config, space, options, FLAGS.data_dir)
        if FLAGS.final:
            print(f"final: {json.dumps(tuning.final(config, study, FLAGS.data_dir))}")
    except PdmError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: rerun the same command to continue the study\n")
        sys.exit(130)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
