"""Hyperparameter search on Optuna: each trial a normal training run, scored on validation only.

Why Optuna: its storages already let any number of worker processes or machines share one
study (SQLite on one machine, PostgreSQL/MySQL across many, a journal file on a shared
filesystem), resume it after a crash and fail a dead worker's trial by its heartbeat; its
pruners stop poor trials from the validation scores each trial reports. What is ours: the space
file (a function of a trial returning config overrides), one run directory per trial (a retried
trial reuses its original's, so it resumes from that trial's checkpoint), and the rule that no
trial ever computes a test score: `final` scores the best trial's checkpoint once.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from pdm_jax import configuration, jsonio
from pdm_jax.errors import ConfigError, first_line
from pdm_jax.training import evaluation, loop

log = logging.getLogger(__name__)
FINAL_FILE = "final.json"
PRUNERS = ("median", "none")
SAMPLERS = ("tpe", "random")
MAX_RETRY = 2  # a trial whose worker died is run again at most this many times


class Pruned(loop.Halted):
    """The pruner stopped this trial at a validation step."""


def load_space(path: str) -> Callable[[Any], dict[str, Any]]:
    """`space(trial) -> {dotted key: value}` from a space file (experiments/spaces/*.py)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--space: no such file {path!r}")
    module = configuration.load_module(path)
    if not callable(getattr(module, "space", None)):
        raise ConfigError(f"--space: {path} defines no space(trial) function")
    return module.space


def with_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy of `config` with dotted-key overrides applied and checked. The copy is deep (so
    references such as checkpoint.every_steps keep following train.eval_every) and locked (so a
    key the config lacks is refused, not added)."""
    config = copy.deepcopy(config)
    config.lock()
    for key, value in overrides.items():
        try:
            config.update_from_flattened_dict({key: value})
        except (KeyError, AttributeError, TypeError) as err:
            raise ConfigError(f"space: config.{key}: {first_line(err)}") from None
    configuration.validate(config)
    return config


def open_storage(url: str, heartbeat_s: int) -> Any:
    """An RDB URL (`sqlite:///`, `postgresql://`, `mysql://`) with heartbeats, so a killed
    worker's trial is failed and retried; `journal:PATH` (or a `.log` path) for a journal file on
    a shared filesystem (no heartbeats there: see docs/experiments.md)."""
    import optuna
    from optuna.storages import RDBStorage, RetryFailedTrialCallback
    from optuna.storages.journal import JournalFileBackend

    # Heartbeats have been "experimental" since Optuna 2.9; they are what fails a dead worker's
    # trial, and the tests hold them to it.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    if url.startswith("journal:") or url.endswith(".log"):
        path = url.removeprefix("journal:")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    if url.startswith("sqlite:///"):
        database = url.removeprefix("sqlite:///")
        os.makedirs(os.path.dirname(os.path.abspath(database)), exist_ok=True)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    return RDBStorage(
        url,
        engine_kwargs=engine,
        heartbeat_interval=heartbeat_s,
        grace_period=2 * heartbeat_s,
        heartbeat_stale_trial_callback=RetryFailedTrialCallback(max_retry=MAX_RETRY),
    )


def trial_dir(root: str, study: str, trial: Any) -> str:
    """`<root>/<study>/trial-NNNN`, the original trial's number for a retried one (Optuna's
    RetryFailedTrialCallback keeps the chain in the trial's system attrs)."""
    attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)
    history = attrs.get("retry_history", [])
    return os.path.join(root, study, f"trial-{(history[0] if history else trial.number):04d}")


def objective(
    config: Any,
    space: Callable[[Any], dict[str, Any]],
    root: str,
    study_name: str,
    data_dir: str | None,
) -> Callable[[Any], float]:
    """The trial function: train on the overrides, report each validation score, return the
    best one. Never scores the test units (`test=False`)."""
    import optuna

    def run(trial: optuna.Trial) -> float:
        overrides = space(trial)
        workdir = trial_dir(root, study_name, trial)
        # A retried trial's worker was declared dead by Optuna's heartbeat: its owner record
        # (on another host, perhaps, and younger than owner_timeout_s) must not block the retry.
        retried = os.path.basename(workdir) != f"trial-{trial.number:04d}"
        trial_config = with_overrides(config, {**overrides, "checkpoint.take_over": retried})
        trial.set_user_attr("overrides", {k: _plain(v) for k, v in overrides.items()})
        trial.set_user_attr("workdir", workdir)

        def on_eval(step: int, rmse: float) -> None:
            trial.report(rmse, step)
            if trial.should_prune():
                raise Pruned(f"pruned at step {step}")

        try:
            report = loop.train_and_evaluate(
                trial_config, workdir, data_dir, test=False, on_eval=on_eval
            )
        except Pruned as err:
            raise optuna.TrialPruned(str(err)) from None
        if report.get("preempted"):
            raise KeyboardInterrupt("stop signal: the trial saved its checkpoint")
        trial.set_user_attr("best_step", report["best_step"])
        trial.set_user_attr("steps", report["steps"])
        return float(report["val_rmse"])

    return run


def run_study(
    config: Any,
    space: Callable[[Any], dict[str, Any]],
    options: Mapping[str, Any],
    data_dir: str | None = None,
    progress: Callable[[str], None] = print,
) -> Any:
    """Works on the study until it holds `options['trials']` finished (complete or pruned)
    trials, whoever ran them; returns the study. `options`: study, storage, trials, workdir,
    pruner, sampler, heartbeat_s, seed."""
    from optuna.storages import RetryFailedTrialCallback
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    study = _create_study(options)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    wanted = int(options["trials"])
    if len(study.get_trials(deepcopy=False, states=finished)) >= wanted:
        return study
    trial_fn = objective(config, space, options["workdir"], options["study"], data_dir)
    try:
        study.optimize(
            trial_fn,
            callbacks=[
                MaxTrialsCallback(wanted, states=finished),
                lambda s, t: progress(describe(s, t)),
            ],
        )
    except KeyboardInterrupt:
        # A stopped worker's trial is failed; queue it again so a rerun resumes its checkpoint.
        stopped = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if stopped:
            RetryFailedTrialCallback(max_retry=MAX_RETRY)(study, stopped[-1])
        raise
    return study


def _create_study(options: Mapping[str, Any], attempts: int = 5) -> Any:
    """The study, created by whichever worker comes first. Workers started together on a fresh
    database race to create its tables and the study; the losers' errors are retried."""
    import optuna
    import sqlalchemy.exc

    sampler_kind = (
        optuna.samplers.RandomSampler
        if options["sampler"] == "random"
        else optuna.samplers.TPESampler
    )
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2)
        if options["pruner"] == "median"
        else optuna.pruners.NopPruner()
    )
    for attempt in range(attempts):
        try:
            return optuna.create_study(
                study_name=options["study"],
                storage=open_storage(options["storage"], int(options["heartbeat_s"])),
                sampler=sampler_kind(seed=options.get("seed")),
                pruner=pruner,
                direction="minimize",
                load_if_exists=True,
            )
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.DuplicatedStudyError):
            if attempt + 1 == attempts:
                raise
            time.sleep(0.5 + random.random() * 2**attempt)
    raise AssertionError("unreachable")


def describe(study: Any, trial: Any) -> str:
    """One progress line per finished trial: value, params, best so far."""
    value = "-" if trial.value is None else f"{trial.value:.3f}"
    line = f"trial {trial.number} {trial.state.name.lower()}: val_rmse {value}"
    try:
        best = study.best_trial
        line += f" (best {best.value:.3f}, trial {best.number})"
    except ValueError:
        pass
    return f"{line} {json.dumps(trial.params, sort_keys=True)}"


def final(config: Any, study: Any, data_dir: str | None) -> dict[str, Any]:
    """The best trial's checkpoint scored on the test units, once: a second call returns the
    recorded result instead of looking again."""
    best = study.best_trial
    workdir = best.user_attrs["workdir"]
    path = os.path.join(workdir, FINAL_FILE)
    if os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)
    trial_config = with_overrides(config, best.user_attrs["overrides"])
    report = evaluation.evaluate_checkpoint(trial_config, workdir, data_dir)
    result = {
        "trial": best.number,
        "val_rmse": best.value,
        "params": best.params,
        "workdir": workdir,
        "test": report.get("test"),
    }
    jsonio.write_json(path, result)
    return final(config, study, data_dir)  # as recorded, so every call prints the same


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
