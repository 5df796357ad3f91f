"""MLflow tracking: a run's params, metrics, tags and files in the team's tracking server.

Why a background thread: the tracking server is someone else's machine. Every call to it runs on
one worker thread fed by a queue, so a slow or dead server never stops or slows a training
step; each call is retried a bounded number of times, the first failure that outlasts them is one
warning, and from then on the tracker drops what it is given (metrics.jsonl and TensorBoard
still have everything).

Why a key of our own: a run's MLflow id exists only once the server has answered, which may be
after the first checkpoint. Each run draws a random key at its fresh start, tags its MLflow run
with it and keeps it (with the MLflow id, once known) in every checkpoint's meta; a resumed run,
here or on another machine from `s3://`, finds its MLflow run by id, else by key, and continues
it. mlflow is imported on the worker thread, only when a URI is set (extra `[tracking]`).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import queue
import threading
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Any

from pdm_jax import jsonio
from pdm_jax.errors import first_line

log = logging.getLogger(__name__)
KEY_TAG = "pdm_jax.run_key"
ATTEMPTS = 3
# mlflow's own HTTP retries (7, with up to two minutes of backoff) and timeout (120 s) suit a
# notebook; a training run would rather drop a metric than queue minutes of them. The user's
# own settings win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
PARAM_CHARS = 6000  # MLflow's limit on one param value
ROOT_FILES = ("config.json", "run_info.json", "report.json")


def credentials_in(uri: str | None) -> bool:
    """Whether a URI carries a password or token (user:secret@host): config.json and every
    checkpoint hold the URI, so secrets belong in MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN."""
    if not uri or "://" not in uri:
        return False
    return urllib.parse.urlsplit(uri).password is not None


class Tracker:
    """One MLflow run fed from one worker thread; `None` stands for "not tracking" elsewhere."""

    def __init__(
        self, config: Any, workdir: str, saved: Mapping[str, Any] | None, attempts: int = ATTEMPTS
    ):
        saved = saved or {}
        self.uri = str(config.tracking.mlflow_uri)
        self.key = saved.get("key") or uuid.uuid4().hex
        self.run_id: str | None = saved.get("mlflow_run_id")
        self.workdir = workdir
        self.attempts = attempts
        self.warnings = 0
        self._config = config
        self._client: Any = None
        self._done: dict[str, int] = {}  # metric key -> last step the MLflow run holds
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._dead = False
        self._pending: tuple[str, Any] | None = None
        self._thread = threading.Thread(target=self._work, name="mlflow-tracking", daemon=True)
        self._thread.start()
        self._queue.put(("connect", None))

    def identity(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run continues this MLflow run."""
        return {"key": self.key, "mlflow_run_id": self.run_id}

    def metrics(self, step: int, record: Mapping[str, Any]) -> None:
        values = {
            k: float(v)
            for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if values and not self._dead:
            self._queue.put(("metrics", (int(step), values)))

    def finish(self, status: str) -> None:
        """Uploads the run directory's files and plots/, then marks the run `status`
        ('FINISHED', 'KILLED' for a stop signal, 'FAILED')."""
        if not self._dead:
            self._queue.put(("finish", status))

    def close(self, timeout_s: float = 30.0) -> None:
        """Waits up to `timeout_s` for the queue to drain: the run's end may wait that long for a
        slow server, never longer."""
        self._queue.put(("stop", None))
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._warn(f"gave up waiting after {timeout_s:.0f} s; the rest is not logged")

    # --- the worker thread ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            kind, payload = self._pending or self._queue.get()
            self._pending = None
            if kind == "stop":
                return
            if self._dead:
                continue
            if kind == "metrics":
                payload = self._more_metrics(payload)
            actions = {"connect": self._connect, "metrics": self._log_metrics}
            action = actions.get(kind, self._finish)
            try:
                self._retrying(action, payload)
            except Exception as err:  # any failure of someone else's server
                self._dead = True
                self._warn(f"{type(err).__name__}: {first_line(err)[:200]}")

    def _retrying(self, action: Any, payload: Any) -> None:
        for attempt in range(self.attempts):
            try:
                action(payload)
                return
            except Exception:
                if attempt + 1 == self.attempts:
                    raise
                time.sleep(2**attempt)

    def _warn(self, reason: str) -> None:
        self.warnings += 1
        log.warning(
            "MLflow tracking at %s stopped (%s): metrics stay in metrics.jsonl and TensorBoard",
            _safe(self.uri),
            reason,
        )

    def _more_metrics(self, first: tuple[int, dict[str, float]]) -> list[tuple[int, dict]]:
        """This record and every metrics record queued behind it: one request for all."""
        batch = [first]
        while True:
            try:
                kind, payload = self._queue.get_nowait()
            except queue.Empty:
                return batch
            if kind != "metrics":
                self._pending = (kind, payload)  # the worker's next item, in its place in line
                return batch
            batch.append(payload)

    def _connect(self, _: Any) -> None:
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        self._client = client = MlflowClient(tracking_uri=self.uri)
        run = self._find_or_create(client)
        if run.info.status != "RUNNING":  # a run this one resumes
            client.update_run(run.info.run_id, status="RUNNING")
        for key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            self._done[key] = max((m.step for m in history), default=-1)
        self.run_id = run.info.run_id
        self._log_params(run)
        self._record_id()
        log.info("MLflow run %s at %s", self.run_id, _safe(self.uri))

    def _find_or_create(self, client: Any) -> Any:
        """The MLflow run by its id, else by this run's key tag, else a new one (in the
        experiment, created when missing)."""
        if self.run_id:
            return client.get_run(self.run_id)
        name = self._config.tracking.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            found = client.search_runs(
                [experiment.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{self.key}'"
            )
            if found:
                return found[0]
            experiment_id = experiment.experiment_id
        else:
            experiment_id = client.create_experiment(
                name, artifact_location=_local_artifacts(self.uri)
            )
        run_name = self._config.tracking.run_name or os.path.basename(os.path.abspath(self.workdir))
        return client.create_run(experiment_id, run_name=run_name, tags=self._tags())

    def _tags(self) -> dict[str, str]:
        config = self._config
        info = _read_json(os.path.join(self.workdir, "run_info.json"))
        platform, layout = info.get("platform", {}), info.get("layout", {})
        subset = config.data.subset if config.data.source == "cmapss" else config.data.source
        tags = {
            KEY_TAG: self.key,
            "model": config.model.name,
            "subset": subset,
            "platform": f"{platform.get('device_kind')} x{platform.get('num_devices')} "
            f"({platform.get('environment')})",
            "layout": f"mesh {layout.get('mesh_shape')}, {layout.get('dtype')}, "
            f"grad_accum {layout.get('grad_accum')}",
        }
        if info.get("git_commit"):
            tags["git_commit"] = tags["mlflow.source.git.commit"] = info["git_commit"]
        return tags

    def _log_params(self, run: Any) -> None:
        """The resolved config as flat params. MLflow keeps a param's first value for good, so a
        resumed run adds only keys the run lacks (its resumable changes live in config.json)."""
        from mlflow.entities import Param

        flat = jsonio.flatten(self._config.to_dict())
        new = [Param(k, str(v)[:PARAM_CHARS]) for k, v in flat.items() if k not in run.data.params]
        for start in range(0, len(new), 100):
            self._client.log_batch(self.run_id, params=new[start : start + 100])

    def _record_id(self) -> None:
        path = os.path.join(self.workdir, "run_info.json")
        info = _read_json(path)
        if info:
            info["tracking"] = {
                "mlflow_uri": _safe(self.uri),
                "experiment": self._config.tracking.experiment,
                "mlflow_run_id": self.run_id,
            }
            jsonio.write_json(path, info)

    def _log_metrics(self, batch: list[tuple[int, dict[str, float]]]) -> None:
        """Steps the MLflow run already holds (logged before a crash the checkpoint predates)
        are not logged twice."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now, step)
            for step, values in batch
            for key, value in values.items()
            if step > self._done.get(key, -1)
        ]
        for start in range(0, len(metrics), 1000):
            self._client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def _finish(self, status: str) -> None:
        for name in ROOT_FILES:
            path = os.path.join(self.workdir, name)
            if os.path.isfile(path):
                self._client.log_artifact(self.run_id, path)
        plots = os.path.join(self.workdir, "plots")
        if os.path.isdir(plots) and os.listdir(plots):
            self._client.log_artifacts(self.run_id, plots, "plots")
        self._client.set_terminated(self.run_id, status)


def start(config: Any, workdir: str, saved: Mapping[str, Any] | None) -> Tracker | None:
    """The run's tracker, or None when `tracking.mlflow_uri` is unset."""
    if not config.get("tracking") or not config.tracking.mlflow_uri:
        return None
    return Tracker(config, workdir, saved)


def _safe(uri: str) -> str:
    """The URI without any user name (a password never gets this far: configuration refuses)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None:
        return uri
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()


def _local_artifacts(uri: str) -> str | None:
    """Beside a `sqlite:///` database, where MLflow would otherwise put a new experiment's files
    in ./mlruns under whatever directory the run started from; servers choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    database = uri.removeprefix("sqlite:///")
    path = os.path.join(os.path.dirname(os.path.abspath(database)), "mlartifacts")
    return pathlib.Path(path).as_uri()


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}
