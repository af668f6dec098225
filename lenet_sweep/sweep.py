"""The sweep: KerasTuner searches `conf/search/<name>.yaml`; every trial is an MLflow run nested under
one parent run per sweep. `python -m lenet_sweep.sweep data.root=DIR` (`make sweep`).

Reading order: search space -> trial config -> hypermodel -> tracked tuners -> the sweep -> summary.
Trials are chosen and ranked on the validation split only; the test split is never decoded here.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import hydra
import keras
import keras_tuner as kt
import mlflow
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lenet_sweep import data as D
from lenet_sweep import plots
from lenet_sweep.cli import guarded
from lenet_sweep.config import HyperParameterSpec, check, register_configs
from lenet_sweep.errors import UserError
from lenet_sweep.store import find_sweep_run, latest_attempts, number, trial_runs
from lenet_sweep.tracking import MlflowEpochLogger, end_killed, flatten, loggable_config, tracked_run
from lenet_sweep.train import (
    PreparedData,
    _clock,
    _csv,
    _log_figure,
    compile_model,
    log_data_check,
    open_store,
    prepare_data,
)

Progress = Callable[[str], None]
OBJECTIVE = "val_accuracy"  # what trials are ranked by: validation, never test
OPTIMIZER_GROUP = "optimizer"  # a search key that picks a conf/optimizer/*.yaml file
TYPES = ("choice", "int", "float", "boolean")
_UNSET = object()


# ---- search space ------------------------------------------------------------------------------

def typed_space(cfg: DictConfig) -> dict[str, Any]:
    """`cfg.search.space` with every entry checked against `HyperParameterSpec` and its defaults filled."""
    space = {}
    for name, entry in (cfg.search.space or {}).items():
        if not isinstance(entry, DictConfig):
            raise UserError(f"search.space.{name}={entry!r}: give a mapping such as "
                            "{key: model.dropout, type: choice, values: [0.0, 0.5]}")
        try:
            space[name] = OmegaConf.merge(OmegaConf.structured(HyperParameterSpec), entry)
        except OmegaConfBaseException as err:
            raise UserError(f"search.space.{name}: {str(err).splitlines()[0]}") from None
        if not space[name].key:
            raise UserError(f"search.space.{name}: `key` (the config key it sets) is missing")
    return space


def active_space(cfg: DictConfig, optimizers: Mapping[str, DictConfig]) -> dict[str, Any]:
    """`cfg.search.space` checked against `cfg`, minus what the tuner sets itself.

    Hyperband's budget is epochs, so a `train.epochs` dimension is dropped under it.
    """
    space = typed_space(cfg)
    if cfg.tuner.kind == "hyperband":
        space = {name: spec for name, spec in space.items() if spec.key != "train.epochs"}
    if not space:
        raise UserError(f"search.space of search={cfg.search.name} is empty: give at least one dimension")
    seen: set[str] = set()
    for name, spec in space.items():
        where = f"search.space.{name}"
        if "/" in name or "." in name:
            raise UserError(f"{where}: use a name without '.' or '/' (they are MLflow param names)")
        if spec.type not in TYPES:
            raise UserError(f"{where}.type={spec.type!r}: choose one of {', '.join(TYPES)}")
        if spec.type == "choice" and not spec["values"]:
            raise UserError(f"{where}: a choice needs `values`")
        if spec.type in ("int", "float") and (spec.min is None or spec.max is None or spec.min > spec.max):
            raise UserError(f"{where}: an {spec.type} needs `min` <= `max`")
        if spec.key == OPTIMIZER_GROUP:
            unknown = [v for v in spec["values"] or [] if v not in optimizers]
            if unknown:
                raise UserError(f"{where}: optimizer(s) {unknown} have no conf/optimizer/<name>.yaml "
                                f"(known here: {', '.join(optimizers)})")
        else:
            for target, label in _configs_for(cfg, space, spec, optimizers):
                if OmegaConf.select(target, spec.key, default=_UNSET) is _UNSET:
                    raise UserError(f"{where}.key={spec.key!r} is not a config key{label} (e.g. "
                                    "model.dropout, model.filters.0, optimizer.learning_rate)")
        if len(spec.when or {}) > 1:
            raise UserError(f"{where}.when: one parent per dimension (KerasTuner's conditional_scope)")
        for parent in (spec.when or {}):
            if parent not in seen:
                raise UserError(f"{where}.when names {parent!r}: it must be a dimension listed above it")
        seen.add(name)
    return space


def _configs_for(cfg: DictConfig, space: Mapping[str, Any], spec: Any,
                 optimizers: Mapping[str, DictConfig]) -> list[tuple[DictConfig, str]]:
    """The configs `spec.key` must exist in: `cfg`, or for `optimizer.*` keys each optimizer the
    search can pick while `spec` is active."""
    group = [name for name, other in space.items() if other.key == OPTIMIZER_GROUP]
    if not spec.key.startswith(f"{OPTIMIZER_GROUP}.") or not group:
        return [(cfg, "")]
    allowed = (spec.when or {}).get(group[0], space[group[0]]["values"])
    return [(OmegaConf.create({OPTIMIZER_GROUP: optimizers[name]}), f" of optimizer={name}")
            for name in allowed if name in optimizers]


def _define(hp: kt.HyperParameters, name: str, spec: Any) -> Any:
    """Register (or read) the hyperparameter `name` as `spec` describes; None while inactive."""
    if spec.type == "choice":
        values = list(spec["values"])
        return hp.Choice(name, values, default=spec.default if spec.default is not None else values[0])
    if spec.type == "boolean":
        return hp.Boolean(name, default=bool(spec.default))
    if spec.type == "int":
        return hp.Int(name, int(spec.min), int(spec.max), step=int(spec.step) if spec.step else 1,
                      sampling=spec.sampling, default=None if spec.default is None else int(spec.default))
    return hp.Float(name, float(spec.min), float(spec.max), step=spec.step, sampling=spec.sampling,
                    default=spec.default)


def hyperparameter_values(hp: kt.HyperParameters, space: Mapping[str, Any]) -> dict[str, Any]:
    """The active value of every dimension of `space` (registering them in `hp` on first use)."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        if spec.when:
            ((parent, allowed),) = spec.when.items()  # one parent: checked by active_space
            with hp.conditional_scope(parent, list(allowed)):
                value = _define(hp, name, spec)
        else:
            value = _define(hp, name, spec)
        if value is not None:
            values[name] = value
    return values


def trial_config(cfg: DictConfig, space: Mapping[str, Any], optimizers: Mapping[str, DictConfig],
                 hp: kt.HyperParameters) -> DictConfig:
    """`cfg` with the trial's values in place: the config a hand-run `train` would take.

    The model builder reads this config, so a trial's model and a configured model are built by the
    same code. The optimizer group goes in first, so `optimizer.*` dimensions land on it.
    """
    values = hyperparameter_values(hp, space)
    trial = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_struct(trial, True)  # a misspelt key fails instead of adding a new one
    for name, value in values.items():
        if space[name].key == OPTIMIZER_GROUP:
            trial.optimizer = OmegaConf.create(OmegaConf.to_container(optimizers[value], resolve=True))
    for name, value in values.items():
        key = space[name].key
        if key != OPTIMIZER_GROUP:
            OmegaConf.update(trial, key, value, force_add=False)
    if "tuner/epochs" in hp.values:  # Hyperband's budget for this trial
        trial.train.epochs = hp.values["tuner/epochs"]
    return trial


# ---- data and the hypermodel -------------------------------------------------------------------

class TrialData:
    """The train and val splits decoded at each input size a trial asks for, kept for later trials."""

    def __init__(self, data_cfg: DictConfig, seed: int, progress: Optional[Progress] = None):
        self.data_cfg, self.seed, self.progress = data_cfg, seed, progress
        self._by_size: dict[int, PreparedData] = {}

    def at(self, size: int) -> PreparedData:
        if size not in self._by_size:
            self._by_size[size] = prepare_data(self.data_cfg, size, self.seed, self.progress,
                                               splits=("train", "val"))
        return self._by_size[size]


class LeNetHyperModel(kt.HyperModel):
    """Builds and fits one trial from `trial_config`; the tuner sets `seed` and `callbacks` per run."""

    def __init__(self, cfg: DictConfig, space: Mapping[str, Any], optimizers: Mapping[str, DictConfig],
                 data: TrialData, num_classes: int):
        super().__init__(name="lenet_sweep")
        self.cfg, self.space, self.optimizers = cfg, space, optimizers
        self.data, self.num_classes = data, num_classes
        self.seed = cfg.seed
        self.callbacks: Callable[[], list[keras.callbacks.Callback]] = list

    def config(self, hp: kt.HyperParameters) -> DictConfig:
        return trial_config(self.cfg, self.space, self.optimizers, hp)

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        cfg = self.config(hp)
        # KerasTuner clears the Keras session before each build, which drops the global seed.
        keras.utils.set_random_seed(self.seed)
        return compile_model(cfg, self.num_classes)

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *args, callbacks=(), epochs=None,
            initial_epoch: int = 0, **kwargs):
        cfg = self.config(hp)
        decoded = self.data.at(cfg.model.input_size).decoded
        train_ds = D.make_dataset(decoded["train"], cfg.train.batch_size, shuffle=True, seed=self.seed)
        val_ds = D.make_dataset(decoded["val"], cfg.train.batch_size, shuffle=False)
        # shuffle=False: train_ds already reshuffles every epoch with the trial's seed.
        return model.fit(train_ds, validation_data=val_ds, epochs=epochs or cfg.train.epochs,
                         initial_epoch=initial_epoch, callbacks=[*self.callbacks(), *callbacks],
                         verbose=0, shuffle=False)


# ---- tracked tuners ----------------------------------------------------------------------------

@dataclass
class SweepContext:
    """Where the tuners record: the MLflow experiment and parent run, and who prints progress."""

    experiment_id: str
    parent_run_id: str
    sweep_name: str
    patience: Optional[int]
    print_fn: Optional[Progress]
    started: float
    time_limit_minutes: Optional[float] = None
    max_consecutive_failures: int = 3
    stopped_because: str = ""


def best_epoch_metrics(histories: list) -> dict[str, float]:
    """KerasTuner's score of a trial: each execution's metrics at its best `OBJECTIVE` epoch, averaged."""
    rows = []
    for history in histories:
        h = history.history
        scores = np.array(h.get(OBJECTIVE, [np.nan]), dtype=float)
        best = int(np.nanargmax(scores)) if np.isfinite(scores).any() else len(scores) - 1
        rows.append({k: float(v[best]) for k, v in h.items()} | {"best_epoch": history.epoch[best] + 1})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


class TrialTracking:
    """Mixed into a KerasTuner tuner: each trial is a nested MLflow run, FINISHED or FAILED with its reason.

    A diverged (NaN) or crashed trial raises `FailedTrialError`, which KerasTuner records without
    retrying; the sweep goes on. An interrupt ends the trial's run KILLED and stops the sweep.
    """

    def __init__(self, *args, context: SweepContext, **kwargs):
        self.context = context
        self.histories: dict[str, list[dict]] = {}  # trial id -> rows, for Hyperband's promoted trials
        self.last_reason = ""
        self.failures_in_a_row = 0
        self._loggers: list[MlflowEpochLogger] = []
        super().__init__(*args, **kwargs)

    def _build_and_fit_model(self, trial, *args, **kwargs):
        # Called once per execution with KerasTuner's own (copied) callbacks: ours join them here.
        execution = len(self._loggers)
        self.hypermodel.seed = self.hypermodel.cfg.seed + int(trial.trial_id) + 100_000 * execution
        client = MlflowClient(mlflow.get_tracking_uri())
        logger = MlflowEpochLogger(client, mlflow.active_run().info.run_id,
                                   prefix=f"execution{execution}." if execution else "")
        self._loggers.append(logger)
        patience = self.context.patience

        def callbacks() -> list[keras.callbacks.Callback]:
            stop = [keras.callbacks.EarlyStopping("val_loss", patience=patience)] if patience else []
            return [logger, keras.callbacks.TerminateOnNaN(), *stop]

        self.hypermodel.callbacks = callbacks
        return super()._build_and_fit_model(trial, *args, **kwargs)

    def run_trial(self, trial, *args, **kwargs):
        started = time.perf_counter()
        hp = trial.hyperparameters
        attempts = trial_attempts(self.context, trial.trial_id)
        attempt = len(attempts) + 1
        recorded = next((run for run in attempts if run.info.status == "FINISHED"), None)
        if recorded is not None:
            # Finished and logged, but the process ended before KerasTuner saved it: reuse, don't retrain.
            m = recorded.data.metrics
            return {k[len("best_"):]: v for k, v in m.items() if k.startswith("best_") and k != "best_epoch"}
        self._loggers = []
        reason = ""
        try:
            with tracked_run(experiment_id=self.context.experiment_id, run_name=f"trial-{trial.trial_id}",
                             parent_run_id=self.context.parent_run_id, nested=True,
                             tags={"lenet_sweep.kind": "trial", "lenet_sweep.sweep": self.context.sweep_name,
                                   "lenet_sweep.trial_id": trial.trial_id, "lenet_sweep.attempt": attempt}):
                cfg = self.hypermodel.config(hp)
                mlflow.set_tag("model", cfg.model.name)
                mlflow.log_params(trial_params(cfg, hp, self.hypermodel.space))
                fit_started = time.perf_counter()
                histories = super().run_trial(trial, *args, **kwargs)
                fit_seconds = time.perf_counter() - fit_started
                reason = diverged(histories)
                self._log_results(trial, hp, cfg, histories, started, fit_seconds)
                if reason:
                    mlflow.set_tag("failure_reason", reason)
                    mlflow.end_run("FAILED")  # the `with` then leaves the ended run as it is
        except (kt.errors.FailedTrialError, kt.errors.FatalError):
            raise
        except Exception as err:  # recorded FAILED by tracked_run; KerasTuner must not retry it
            self.last_reason = one_line(f"{type(err).__name__}: {err}")
            raise kt.errors.FailedTrialError(self.last_reason) from err
        if reason:
            self.last_reason = reason
            raise kt.errors.FailedTrialError(reason)
        return histories

    def _log_results(self, trial, hp, cfg, histories, started, fit_seconds) -> None:
        rows = self._loggers[0].history if self._loggers else []
        previous = hp.values.get("tuner/trial_id")
        initial = int(hp.values.get("tuner/initial_epoch", 0))
        if previous:  # Hyperband: this trial goes on from `previous`'s weights at epoch `initial`
            mlflow.set_tag("lenet_sweep.continues_trial", previous)
            if previous not in self.histories:  # trained before a resume: read back what was logged
                self.histories[previous] = recorded_history(self.context, previous)
            rows = (self.histories[previous] + [{}] * initial)[:initial] + rows
        self.histories[trial.trial_id] = rows
        best = best_epoch_metrics(histories)
        shown = f" (execution 1 of {len(histories)})" if len(histories) > 1 else ""
        _log_figure(plots.trial_curves(rows, f"trial {trial.trial_id}{shown}: {cfg.model.name}, "
                                             f"{describe(hyperparameter_values(hp, self.hypermodel.space))}"),
                    "plots/curves.png")
        keys = sorted({k for row in rows for k in row})
        mlflow.log_text(_csv([[i + 1] + [row.get(k) for k in keys] for i, row in enumerate(rows)],
                             ["epoch", *keys]), "history.csv")
        logging = sum(lg.seconds for lg in self._loggers)
        seconds = time.perf_counter() - started
        tracking = seconds - fit_seconds + logging
        mlflow.log_metrics({f"best_{k}": v for k, v in best.items() if k != "best_epoch"}
                           | {"best_epoch": best["best_epoch"],
                              "epochs_run": max(len(h.epoch) for h in histories),
                              "last_epoch": max(h.epoch[-1] + 1 if h.epoch else initial for h in histories),
                              "trial_seconds": seconds, "tracking_seconds": tracking})

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        done = len(self.oracle.trials)
        reason = self.last_reason or one_line((trial.message or "").strip())
        self.last_reason = ""
        self.failures_in_a_row = self.failures_in_a_row + 1 if trial.status == "FAILED" else 0
        if self.context.print_fn:
            total = f"/{self.oracle.max_trials}" if self.oracle.max_trials else ""
            values = describe({k: v for k, v in trial.hyperparameters.values.items()
                               if trial.hyperparameters.is_active(k) and not k.startswith("tuner/")
                               or k == "tuner/epochs"})
            best = self.oracle.get_best_trials(1)
            best_score = f"{best[0].score:.4f}" if best and best[0].score is not None else "-"
            outcome = f"{OBJECTIVE} {trial.score:.4f}" if trial.status == "COMPLETED" else \
                f"{trial.status}: {reason}"
            elapsed = time.perf_counter() - self.context.started
            self.context.print_fn(f"trial {done}{total} [{trial.trial_id}] {outcome}  (best {best_score})  "
                                  f"{values}  elapsed {_clock(elapsed)}")
        limit = self.context.time_limit_minutes
        stop = ""
        if limit is not None and time.perf_counter() - self.context.started > 60 * limit:
            stop = (f"sweep.time_limit_minutes={limit} reached: no new trial starts; rerun the same "
                    "command to go on")
        if self.failures_in_a_row >= self.context.max_consecutive_failures:
            stop = (f"{self.failures_in_a_row} trials in a row failed (tuner.max_consecutive_failed_trials), "
                    f"the last: {reason}. Fix the search space and rerun the same command to go on")
        if stop and (self.oracle.max_trials is None or self.oracle.max_trials > done):
            self.oracle.max_trials = done  # KerasTuner's own stop: the oracle creates no further trial
            self.context.stopped_because = stop
            if self.context.print_fn:
                self.context.print_fn(stop)


class TrackedRandomSearch(TrialTracking, kt.RandomSearch):
    """KerasTuner's random search, every trial an MLflow run."""


class TrackedBayesianOptimization(TrialTracking, kt.BayesianOptimization):
    """KerasTuner's Gaussian-process search, every trial an MLflow run."""


class TrackedHyperband(TrialTracking, kt.Hyperband):
    """KerasTuner's Hyperband (epochs are the budget), every trial an MLflow run."""


def make_tuner(cfg: DictConfig, hypermodel: LeNetHyperModel, context: SweepContext) -> kt.Tuner:
    """The tuner `cfg.tuner.kind` names, with its state in `<sweep.dir>/<sweep.name>/`."""
    t = cfg.tuner
    # KerasTuner's own failure limit raises out of the search with the trial half-saved; ours stops
    # cleanly (TrialTracking.on_trial_end), so KerasTuner's is set out of reach.
    common = dict(hypermodel=hypermodel, objective=kt.Objective(OBJECTIVE, "max"), seed=t.seed,
                  executions_per_trial=t.executions_per_trial, directory=str(state_dir(cfg).parent),
                  project_name=cfg.sweep.name, overwrite=cfg.sweep.overwrite,
                  max_consecutive_failed_trials=2**31, context=context)
    if t.kind == "random":
        return TrackedRandomSearch(max_trials=t.max_trials, **common)
    if t.kind == "bayesian":
        return TrackedBayesianOptimization(max_trials=t.max_trials, num_initial_points=t.num_initial_points,
                                           alpha=t.alpha, beta=t.beta, **common)
    if t.kind == "hyperband":
        tuner = TrackedHyperband(max_epochs=t.max_epochs, factor=t.factor,
                                 hyperband_iterations=t.hyperband_iterations, **common)
        tuner.oracle.max_trials = t.max_trials  # Hyperband takes no max_trials; its oracle honours one
        return tuner
    raise UserError(f"tuner.kind={t.kind!r}: choose random, bayesian or hyperband (tuner=NAME)")


# ---- MLflow bookkeeping ------------------------------------------------------------------------

def trial_params(cfg: DictConfig, hp: kt.HyperParameters, space: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's params: each dimension under its own name, KerasTuner's `tuner/*` values, and the
    whole trial config under its config keys (model.filters, optimizer.learning_rate, ...)."""
    resolved = loggable_config(cfg)
    trial = {k: resolved[k] for k in ("data", "model", "optimizer", "train", "seed")}
    return (flatten(trial) | hyperparameter_values(hp, space)
            | {k: v for k, v in hp.values.items() if k.startswith("tuner/")})


def diverged(histories: list) -> str:
    """Why a trial failed numerically ('' if it did not)."""
    for history in histories:
        losses = history.history.get("loss", [])
        if any(not math.isfinite(v) for v in losses):
            return (f"loss became NaN/inf in epoch {history.epoch[len(losses) - 1] + 1}; training was "
                    "stopped (the learning rate is too high for this configuration)")
    return ""


def mark_cut_off_trials(client: MlflowClient, experiment_id: str, parent_run_id: str) -> int:
    """End every child run still RUNNING (its process died) KILLED, with the reason; return how many."""
    cut = [run for run in trial_runs(client, experiment_id, parent_run_id) if run.info.status == "RUNNING"]
    for run in cut:
        end_killed(client, run.info.run_id, "cut off: the sweep stopped before this trial ended; a resumed "
                   "sweep runs the trial again as a new attempt")
    return len(cut)


def trial_attempts(context: SweepContext, trial_id: str) -> list:
    """The child runs of trial `trial_id` so far, oldest first."""
    client = MlflowClient(mlflow.get_tracking_uri())
    return [run for run in trial_runs(client, context.experiment_id, context.parent_run_id)
            if run.data.tags.get("lenet_sweep.trial_id") == trial_id]


def recorded_history(context: SweepContext, trial_id: str) -> list[dict[str, float]]:
    """The per-epoch rows a trial logged (its `history.csv`, inherited epochs included); [] if none."""
    client = MlflowClient(mlflow.get_tracking_uri())
    finished = [run for run in trial_attempts(context, trial_id) if run.info.status == "FINISHED"]
    if not finished:
        return []
    run = finished[-1]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            text = Path(client.download_artifacts(run.info.run_id, "history.csv", tmp)).read_text()
        except (OSError, mlflow.exceptions.MlflowException):
            return []
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        rows.append({k: float(v) for k, v in row.items() if k != "epoch" and v not in ("", None)})
    return rows


def one_line(text: str, limit: int = 300) -> str:
    """`text` (an error message, maybe with colour codes and argument dumps) as one short line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = " ".join(line.strip() for line in text.split("Arguments received")[0].splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in values.items())


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ---- state folder ------------------------------------------------------------------------------

STATE_FILE = "lenet_sweep.json"


def state_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What a resumed sweep must share with the one it continues (not where it logs or how it prints)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in resolved["data"].items() if k not in ("decode_cache", "decode_threads")}
    train = {k: v for k, v in resolved["train"].items() if k != "keras_verbose"}
    tuner = {k: v for k, v in resolved["tuner"].items() if k != "max_trials"}
    return flatten({"data": data, "model": resolved["model"], "optimizer": resolved["optimizer"],
                    "train": train, "seed": resolved["seed"], "search": resolved["search"],
                    "tuner": tuner, "sweep": {"early_stopping_patience": cfg.sweep.early_stopping_patience}})


def state_dir(cfg: DictConfig) -> Path:
    """KerasTuner's project folder of the sweep: `<sweep.dir>/<sweep.name>`, absolute."""
    return (Path(cfg.sweep.dir).expanduser() / cfg.sweep.name).resolve()


def check_state(cfg: DictConfig) -> tuple[Path, bool]:
    """(project folder, whether a saved sweep is resumed); refuses to resume a different sweep."""
    project = state_dir(cfg)
    state = project / STATE_FILE
    if cfg.sweep.overwrite or not (project / "oracle.json").exists():
        return project, False
    if state.exists():
        saved = json.loads(state.read_text())
        now = json.loads(json.dumps(state_fingerprint(cfg)))
        changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                   if saved.get(k) != now.get(k)]
        if changed:
            raise UserError(f"sweep {cfg.sweep.name!r} in {project} was started with another "
                            f"configuration ({'; '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}): "
                            "rerun it unchanged to resume, or give sweep.overwrite=true to start afresh, "
                            "or choose a new sweep.name")
    return project, True


# ---- the sweep ---------------------------------------------------------------------------------

@dataclass
class SweepResult:
    parent_run_id: str
    rows: list[dict[str, Any]]      # one per trial (latest attempt), best first
    seconds: float
    resumed: bool
    stopped_because: str = ""       # why the sweep stopped before its tuner was done ("" if it was)


def run_sweep(cfg: DictConfig, optimizers: Mapping[str, DictConfig],
              print_fn: Optional[Progress] = None) -> SweepResult:
    """Run (or resume) the sweep `cfg` describes and log it to MLflow; return its ranking."""
    import tensorflow as tf

    check(cfg)
    if cfg.tuner.kind not in ("random", "bayesian", "hyperband"):
        raise UserError(f"tuner.kind={cfg.tuner.kind!r}: choose random, bayesian or hyperband")
    if cfg.tuner.seed < 1:  # KerasTuner's oracles take a seed of 0 as "none" and draw a random one
        raise UserError(f"tuner.seed={cfg.tuner.seed}: use 1 or more (KerasTuner reads 0 as unseeded)")
    limits = {"tuner.executions_per_trial": (cfg.tuner.executions_per_trial, 1),
              "tuner.max_consecutive_failed_trials": (cfg.tuner.max_consecutive_failed_trials, 1),
              "tuner.max_epochs": (cfg.tuner.max_epochs, 1), "tuner.factor": (cfg.tuner.factor, 2),
              "tuner.max_trials": (cfg.tuner.max_trials or 1, 1)}
    for knob, (value, least) in limits.items():
        if value < least:
            raise UserError(f"{knob}={value}: must be at least {least}")
    space = active_space(cfg, optimizers)
    project, resumed = check_state(cfg)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    data = TrialData(cfg.data, cfg.seed, print_fn)
    first = data.at(cfg.model.input_size)  # fails on bad data before anything is recorded
    experiment = open_store(cfg.mlflow)
    client = MlflowClient(mlflow.get_tracking_uri())
    latest = find_sweep_run(client, experiment, cfg.sweep.name, project)
    previous = latest if resumed else None
    if latest is not None and previous is None and latest.info.status == "RUNNING":
        # Starting afresh over a sweep whose process died: close what it left open.
        mark_cut_off_trials(client, experiment, latest.info.run_id)
        end_killed(client, latest.info.run_id, "cut off, then started afresh (sweep.overwrite=true or "
                   "its state folder was gone)")
    started = time.perf_counter()
    context = SweepContext(experiment, "", cfg.sweep.name, cfg.sweep.early_stopping_patience, print_fn,
                           started, cfg.sweep.time_limit_minutes, cfg.tuner.max_consecutive_failed_trials)
    hypermodel = LeNetHyperModel(cfg, space, optimizers, data, len(first.splits.classes))
    try:  # KerasTuner checks the space as it builds the first model; with overwrite it clears the state
        tuner = make_tuner(cfg, hypermodel, context)
    except (ValueError, TypeError) as err:
        raise UserError(f"KerasTuner refuses search={cfg.search.name}: {one_line(str(err))}") from None
    with tracked_run(experiment_id=experiment, run_id=previous.info.run_id if previous else None,
                     run_name=None if previous else f"sweep-{cfg.sweep.name}",
                     tags={"lenet_sweep.kind": "sweep", "lenet_sweep.sweep": cfg.sweep.name,
                           "tuner": cfg.tuner.kind, "search": cfg.search.name}) as parent:
        parent_id = context.parent_run_id = parent.info.run_id
        if previous:
            mark_cut_off_trials(client, experiment, parent_id)
            for tag in ("failure_reason", "stopped_because"):  # from the session this one continues
                if tag in previous.data.tags:
                    client.delete_tag(parent_id, tag)
            if print_fn:
                print_fn(f"resuming sweep {cfg.sweep.name!r} from {project} (MLflow run {parent_id})")
        else:
            _log_sweep_inputs(cfg, space, project)
            log_data_check(first, cfg.train.sample_grid, cfg.seed)  # for the report's data check
        project.mkdir(parents=True, exist_ok=True)  # KerasTuner creates it at its first save
        (project / STATE_FILE).write_text(json.dumps(state_fingerprint(cfg), indent=1))
        tuner.search(verbose=0)
        seconds = time.perf_counter() - started
        rows = summarise(client, experiment, parent_id, space, cfg.tuner.kind)
        _log_summary(rows, space, seconds)
        if context.stopped_because:
            mlflow.set_tag("stopped_because", context.stopped_because)
    return SweepResult(parent_id, rows, seconds, bool(previous), context.stopped_because)


def _log_sweep_inputs(cfg: DictConfig, space: Mapping[str, Any], project: Path) -> None:
    resolved = loggable_config(cfg)
    params = flatten({k: v for k, v in resolved.items() if k != "search"})
    params["sweep.state_dir"] = str(project.resolve())
    params["search.dimensions"] = ",".join(space)
    mlflow.log_params(params)
    mlflow.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
    mlflow.log_text(OmegaConf.to_yaml(resolved["search"]), "search_space.yaml")


def summarise(client: MlflowClient, experiment_id: str, parent_run_id: str, space: Mapping[str, Any],
              tuner_kind: str) -> list[dict[str, Any]]:
    """One row per trial (its latest attempt) from what MLflow holds, best validation score first."""
    latest = latest_attempts(client, experiment_id, parent_run_id)
    names = [*space, *(["tuner/epochs"] if tuner_kind == "hyperband" else [])]
    rows = []
    for trial_id, run in latest.items():
        m, p = run.data.metrics, run.data.params
        row = {"trial": trial_id, "status": run.info.status, "val_accuracy": m.get("best_val_accuracy"),
               "val_loss": m.get("best_val_loss"), "best_epoch": m.get("best_epoch"),
               "epochs_run": m.get("epochs_run"), "last_epoch": m.get("last_epoch"),
               "trial_seconds": m.get("trial_seconds"), "tracking_seconds": m.get("tracking_seconds"),
               "output_activation": p.get("model.output_activation"), "run_id": run.info.run_id,
               "failure_reason": run.data.tags.get("failure_reason", "")}
        row |= {name: number(p.get(name)) for name in names}
        rows.append(row)
    ok = [r for r in rows if r["status"] == "FINISHED" and r["val_accuracy"] is not None]
    ok.sort(key=lambda r: -r["val_accuracy"])
    return ok + [r for r in rows if r not in ok]


def _log_summary(rows: list[dict[str, Any]], space: Mapping[str, Any], seconds: float) -> None:
    """The sweep's summary on its parent run: ranking, score per hyperparameter, relu vs softmax."""
    names = [n for n in rows[0] if n in space or n == "tuner/epochs"] if rows else []
    header = ["rank", "trial", "status", "val_accuracy", "val_loss", "best_epoch", "epochs_run",
              "last_epoch", "trial_seconds", *names, "run_id", "failure_reason"]
    table = [[i + 1 if r["status"] == "FINISHED" else "", *[r.get(k) for k in header[1:]]]
             for i, r in enumerate(rows)]
    mlflow.log_text(_csv(table, header), "sweep/ranking.csv")
    ok = [r for r in rows if r["status"] == "FINISHED"]
    tracking, trials = tracking_seconds(rows)
    if ok:
        _log_figure(plots.score_by_value(ok, names, "val_accuracy", "validation accuracy per hyperparameter"),
                    "sweep/val_accuracy_vs_hyperparameters.png")
        groups: dict[str, list[float]] = {"relu": [], "softmax": []}
        for r in ok:
            groups.setdefault(str(r["output_activation"]), []).append(r["val_accuracy"])
        _log_figure(plots.groups_side_by_side(groups, "val_accuracy", "output activation: relu vs softmax"),
                    "sweep/relu_vs_softmax.png")
    mlflow.log_metrics({"trials": len(rows), "trials_finished": len(ok),
                        "trials_failed": sum(r["status"] == "FAILED" for r in rows),
                        "best_val_accuracy": ok[0]["val_accuracy"] if ok else float("nan"),
                        "sweep_seconds": seconds,
                        "tracking_overhead": tracking / trials if trials else 0.0})


def tracking_seconds(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(seconds spent logging to MLflow, wall seconds) summed over the trials."""
    return (sum(r["tracking_seconds"] or 0 for r in rows), sum(r["trial_seconds"] or 0 for r in rows))


def format_top(rows: list[dict[str, Any]], space: Mapping[str, Any], n: int) -> str:
    """The top `n` finished trials as a text table."""
    ok = [r for r in rows if r["status"] == "FINISHED"][:n]
    lines = [f"{'rank':>4}  {'trial':>5}  {'val_acc':>7}  {'epochs':>6}  {'seconds':>7}  hyperparameters"]
    for i, r in enumerate(ok, start=1):
        values = {k: r[k] for k in [*space, "tuner/epochs"] if r.get(k) is not None}
        lines.append(f"{i:>4}  {r['trial']:>5}  {r['val_accuracy']:>7.4f}  {int(r['last_epoch'] or 0):>6}  "
                     f"{r['trial_seconds'] or 0:>7.1f}  {describe(values)}")
    return "\n".join(lines)


# ---- entry point -------------------------------------------------------------------------------

def compose_optimizers(cfg: DictConfig, overrides: list[str]) -> dict[str, DictConfig]:
    """The optimizer config of every conf/optimizer file the search space picks, with the user's
    overrides applied (Hydra composes them, so their schemas check them)."""
    names = {v for spec in typed_space(cfg).values() if spec.key == OPTIMIZER_GROUP
             for v in spec["values"] or []}
    shared = [o for o in overrides if not o.lstrip("+~").startswith("optimizer=")]
    optimizers = {}
    for name in sorted(names):
        try:
            optimizers[name] = hydra.compose(config_name="sweep", overrides=[*shared, f"optimizer={name}"]
                                             ).optimizer
        except HydraException as err:
            raise UserError(f"optimizer={name} (from the search space) cannot take these overrides: "
                            f"{str(err).splitlines()[0]}") from None
    return optimizers


def run(cfg: DictConfig, overrides: list[str]) -> SweepResult:
    import tensorflow as tf

    # Each trial builds new models and so new tf.functions: TensorFlow's retracing warning is expected.
    tf.get_logger().setLevel("ERROR")
    result = run_sweep(cfg, compose_optimizers(cfg, overrides), print)
    finished = [r for r in result.rows if r["status"] == "FINISHED"]
    print(f"sweep {cfg.sweep.name!r}: {len(result.rows)} trials ({len(finished)} finished) in "
          f"{_clock(result.seconds)}; MLflow parent run {result.parent_run_id} "
          f"in {mlflow.get_tracking_uri()}")
    if result.stopped_because:
        print(f"stopped early: {result.stopped_because}")
    tracking, trial_seconds = tracking_seconds(result.rows)
    if trial_seconds:
        print(f"MLflow logging took {tracking:.1f}s of {trial_seconds:.0f}s in trials "
              f"({100 * tracking / trial_seconds:.1f}%)")
    print("top trials by validation accuracy (test split untouched):")
    print(format_top(result.rows, typed_space(cfg), cfg.sweep.top))
    return result


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="sweep")
def main(cfg: DictConfig) -> None:
    guarded(lambda: run(cfg, list(HydraConfig.get().overrides.task)))


if __name__ == "__main__":
    main()
