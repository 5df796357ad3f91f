"""`--mode=data`: run the whole data path once and leave its summary in the run directory.

It is what the main job does until training lands, and afterwards a quick way to check a new
data set (validation errors, window counts, operating conditions, input speed) before a long run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from pdm_jax import configuration, jsonio
from pdm_jax.data import dataset
from pdm_jax.progress import Progress

log = logging.getLogger(__name__)


def run(config: Any, workdir: str, data_dir: str | None = None) -> dict[str, Any]:
    """Prepares the data, streams one epoch of training batches, writes data_summary.json."""
    os.makedirs(workdir, exist_ok=True)
    configuration.save(config, workdir)
    t0 = time.perf_counter()
    prepared = dataset.prepare(config.data, config.seed, data_dir)
    summary = prepared.summary()
    summary["prepare_s"] = round(time.perf_counter() - t0, 3)
    log.info("data: %s", json.dumps(summary))
    batches = dataset.train_batches(prepared, config)
    epoch_batches = batches.order.batches_per_epoch
    progress = Progress(epoch_batches * config.train.batch_size, "windows", "one training epoch")
    start = time.perf_counter()
    for _ in range(epoch_batches):
        batch = next(batches)
        progress.update(len(batch["y"]))
    progress.close()
    elapsed = time.perf_counter() - start
    summary["epoch_batches"] = epoch_batches
    summary["data_windows_per_s"] = round(epoch_batches * config.train.batch_size / elapsed, 1)
    summary["iterator_state"] = batches.get_state()
    jsonio.write_json(os.path.join(workdir, "scaler.json"), prepared.scaler.to_dict())
    jsonio.write_json(os.path.join(workdir, "data_summary.json"), summary)
    log.info("wrote %s", os.path.join(workdir, "data_summary.json"))
    return summary
