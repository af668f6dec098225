"""The KerasTuner adapter: every hook lenet_sweep overrides, in one place (tests/test_tuner.py pins the
KerasTuner behaviour each one relies on).

- `TrialModel(kt.HyperModel)`: `build` seeds and compiles the trial's config; `fit` trains it through
  `trial.fit`, the one path every training takes.
- `TrialTracking`, mixed into KerasTuner's tuners: `run_trial` makes each trial an MLflow run (FINISHED, or
  FAILED with its reason: `FailedTrialError`, which KerasTuner records without retrying) and reports the
  epochs it trained with its score; `_build_and_fit_model` (called once per execution) sets that execution's
  seed and MLflow logging; `on_trial_end` prints progress and stops the sweep (time limit, failures in a row)
  by lowering the oracle's `max_trials`, KerasTuner's own stop.
- `Budgeted*Oracle`: KerasTuner's oracles on `sweep.budget_minutes` (budget.py): every trial timed where the
  oracle lives (here, or on a distributed chief), Hyperband brackets planned to fit the time left, no random
  or Bayesian trial started that would overrun it. `make_tuner` runs KerasTuner's tuners on them.
- `InheritingOracle`, mixed into those oracles: an earlier sweep's trials enter as COMPLETED trials with their
  scores (`sweep.warm_start`, warm_start.py), so no tuner pays for them again.
"""

from __future__ import annotations

import math
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import keras
import keras_tuner as kt
import mlflow
import numpy as np
from keras_tuner.src.engine.trial import Trial, TrialStatus
from keras_tuner.src.engine.tuner_utils import SaveBestEpoch
from keras_tuner.src.tuners.bayesian import BayesianOptimizationOracle
from keras_tuner.src.tuners.hyperband import HyperbandOracle
from keras_tuner.src.tuners.randomsearch import RandomSearchOracle
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from lenet_sweep import distributed
from lenet_sweep import trial as T
from lenet_sweep.budget import (
    EPOCHS_TRAINED,
    RECORDS_KEPT,
    Budget,
    bracket_cycle,
    choose_bracket,
    hyperband_plans,
)
from lenet_sweep.cli import clock
from lenet_sweep.data import DataBySize
from lenet_sweep.tracking.artifacts import Artifacts
from lenet_sweep.tracking.runs import (
    CONFIG,
    config_yaml,
    end_killed,
    flatten,
    loggable_config,
    recorded_epochs,
    tracked_run,
)
from lenet_sweep.tracking.store import trial_runs

Progress = Callable[[str], None]
OBJECTIVE = T.OBJECTIVE


class TrialModel(kt.HyperModel):
    """Builds and fits one trial from the config `config_of(hp)` gives; the tuner sets `seed` and
    `tracking` for each execution."""

    def __init__(
        self,
        cfg: DictConfig,
        config_of: Callable[[kt.HyperParameters], DictConfig],
        values_of: Callable[[kt.HyperParameters], dict[str, Any]],
        data: DataBySize,
        num_classes: int,
        patience: Optional[int] = None,
        prune: Optional[T.PruneRule] = None,
    ):
        super().__init__(name="lenet_sweep")
        self.cfg, self.config, self.values = cfg, config_of, values_of
        self.data, self.num_classes, self.patience, self.prune = data, num_classes, patience, prune
        self.seed = cfg.seed
        self.tracking: Optional[T.Tracking] = None
        self.backup: Optional[Path] = None  # the execution's backup folder (trial.Backup)
        self.fitted: Optional[T.Fitted] = None  # the last execution's

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        cfg = self.config(hp)
        # KerasTuner clears the Keras session before each build, which drops the global seed.
        keras.utils.set_random_seed(self.seed)
        return T.compile_model(cfg, self.num_classes)

    def fit(
        self,
        hp: kt.HyperParameters,
        model: keras.Model,
        *args,
        callbacks=(),
        epochs=None,
        initial_epoch: int = 0,
        **kwargs,
    ):
        cfg = self.config(hp)
        resumed = self.tracking.resumed if self.tracking else []
        for callback in callbacks:
            if isinstance(callback, SaveBestEpoch) and resumed:
                # KerasTuner's best-epoch checkpoint of the epochs before the resume is on disk: carry its
                # bar (one callback serves all of a trial's executions: never lower what an earlier one set).
                callback.best_value = max(callback.best_value, *(row.get(OBJECTIVE, -math.inf) for row in resumed))
        fitted = T.fit(
            cfg,
            model,
            self.data.at(cfg.model.input_size),
            seed=self.seed,
            tracking=self.tracking,
            patience=self.patience,
            callbacks=callbacks,
            epochs=epochs,
            initial_epoch=initial_epoch,
            backup=self.backup,
            prune=self.prune,
        )
        self.fitted = fitted
        return own_history(fitted) if resumed else fitted.history


@dataclass
class SweepContext:
    """Where the tuners record: the MLflow experiment and parent run, and who prints progress; on a
    distributed worker, its id and lease (distributed.py)."""

    experiment_id: str
    parent_run_id: str
    sweep_name: str
    print_fn: Optional[Progress]
    started: float
    time_limit_minutes: Optional[float] = None
    max_consecutive_failures: int = 3
    stopped_because: str = ""
    worker_id: str = ""  # "" unless this process is a distributed worker
    lease_seconds: float = 120.0
    budget: Optional[Budget] = None  # sweep.budget_minutes, on the oracle's side (not a worker's)


@dataclass
class StopPolicy:
    """When a sweep stops before its tuner is done: the time limit, or failures in a row. Applied where the
    oracle lives: by the local tuner, or by the chief for every worker."""

    started: float
    time_limit_minutes: Optional[float]
    max_consecutive_failures: int
    failures_in_a_row: int = 0

    def after(self, status: str, reason: str) -> str:
        """Why no new trial should start after a trial that ended `status` ('' to go on)."""
        self.failures_in_a_row = self.failures_in_a_row + 1 if status == "FAILED" else 0
        limit = self.time_limit_minutes
        if self.failures_in_a_row >= self.max_consecutive_failures:
            return (
                f"{self.failures_in_a_row} trials in a row failed (tuner.max_consecutive_failed_trials), "
                f"the last: {reason}. Fix the search space and rerun the same command to go on"
            )
        if limit is not None and time.perf_counter() - self.started > 60 * limit:
            return f"sweep.time_limit_minutes={limit} reached: no new trial starts; rerun the same command to go on"
        return ""


def stop_search(oracle, why: str) -> bool:
    """Lower the oracle's `max_trials` to the trials it has: KerasTuner's own stop (no new trial is
    created; running ones finish). False if it was stopping already."""
    done = len(oracle.trials)
    if oracle.max_trials is not None and oracle.max_trials <= done:
        return False
    oracle.max_trials = done
    return True


def own_history(fitted: T.Fitted) -> keras.callbacks.History:
    """A resumed training's whole own history (the epochs before the resume, then this process's) as the
    Keras History KerasTuner scores a trial by."""
    history = keras.callbacks.History()
    keys = sorted({k for row in fitted.own for k in row} - {"epoch_seconds"})
    history.epoch = list(range(fitted.start, fitted.start + len(fitted.own)))
    history.history = {k: [row.get(k, math.nan) for row in fitted.own] for k in keys}
    return history


def with_epochs_trained(histories: list, epochs: int) -> list:
    """Copies of a trial's `histories` whose every epoch also carries `EPOCHS_TRAINED` (`epochs`, all its
    executions, in this process). KerasTuner reports a trial's best-epoch row to the oracle, which is all a
    distributed chief hears of a trial; its budget needs the epochs, which early stopping and pruning cut."""
    copies = []
    for history in histories:
        copy = keras.callbacks.History()
        copy.epoch = list(history.epoch)
        copy.history = {**history.history, EPOCHS_TRAINED: [float(epochs)] * len(history.epoch)}
        copies.append(copy)
    return copies


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
        self.last_score = float("nan")  # the objective of the trial that ended last
        self.policy = StopPolicy(context.started, context.time_limit_minutes, context.max_consecutive_failures)
        self.trials_ended = 0  # by this process
        self._fits: list[T.Fitted] = []  # the trial's executions so far
        self._continuing = False  # the trial goes on from its backups, in its cut-off MLflow run
        self._beat: Optional[distributed.Heartbeat] = None  # a worker's, while its trial runs
        self._promotion: Optional[tuple[str, str, Optional[int]]] = None  # (trial, the trial it continues, epoch)
        super().__init__(*args, **kwargs)

    def _build_and_fit_model(self, trial, *args, **kwargs):
        # Called once per execution with KerasTuner's own (copied) callbacks; ours are trial.fit's.
        execution = len(self._fits)
        model: TrialModel = self.hypermodel
        model.seed = model.cfg.seed + int(trial.trial_id) + 100_000 * execution
        hp = trial.hyperparameters
        previous = hp.values.get("tuner/trial_id")
        initial = int(hp.values.get("tuner/initial_epoch", 0))
        inherited: list[dict] = []
        if previous:  # Hyperband: this trial goes on from `previous`'s weights at epoch `initial`
            if previous not in self.histories:  # trained before a resume: read back what was logged
                self.histories[previous] = recorded_history(self.context, previous)
            inherited = (self.histories[previous] + [{}] * initial)[:initial]
        # Said once per trial as KerasTuner loads `previous`'s checkpoint (TrackedHyperband._build_hypermodel).
        self._promotion = (
            (trial.trial_id, previous, self._checkpoint_epoch(previous)) if previous and not execution else None
        )
        shown = f" (execution 1 of {self.executions_per_trial})" if self.executions_per_trial > 1 else ""
        cfg = model.config(hp)
        client, run_id = MlflowClient(mlflow.get_tracking_uri()), mlflow.active_run().info.run_id
        prefix = f"execution{execution}." if execution else ""
        model.backup = self.backups(trial.trial_id) / f"execution{execution}"
        resumed, logged = [], 0
        if self._continuing:
            rows = recorded_epochs(client, run_id, prefix, first=initial + 1)
            resumed, logged = rows[: max(T.resume_point(model.backup) - initial, 0)], initial + len(rows)
        model.tracking = T.Tracking(
            client,
            run_id,
            prefix=prefix,
            title=f"trial {trial.trial_id}{shown}: {cfg.model.name}, {describe(model.values(hp))}",
            inherited=inherited,
            resumed=resumed,
            logged=logged,
            restarts=[initial] if previous else [],
            artifacts=execution == 0,
            score=False,
        )
        if self._beat is not None:
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), self._beat]
        try:
            results = super()._build_and_fit_model(trial, *args, **kwargs)
        finally:
            self._promotion = None
        self._fits.append(model.fitted)
        return results

    def _checkpoint_epoch(self, trial_id: str) -> Optional[int]:
        """The epoch of trial `trial_id`'s KerasTuner checkpoint: its own best (of its first execution's), after
        the epochs it inherited itself; None if unknown."""
        try:
            inherited = int(self.oracle.get_trial(trial_id).hyperparameters.values.get("tuner/initial_epoch", 0))
        except Exception:  # a worker whose chief is away: the line says less
            return None
        own = self.histories.get(trial_id, [])[inherited:]
        epoch, score = T.best_epoch(own) if own else (0, math.nan)
        return inherited + epoch if math.isfinite(score) else None

    def backups(self, trial_id: str) -> Path:
        """The trial's backup folders (one per execution), in its KerasTuner folder; a worker's own."""
        worker = f"-{self.context.worker_id}" if self.context.worker_id else ""
        return Path(self.get_trial_dir(trial_id)) / f"backup{worker}"

    def _drop_backups(self, trial_id: str) -> None:
        """Remove the trial's backups, every worker's (an ended trial is resumed by no one)."""
        for folder in Path(self.get_trial_dir(trial_id)).glob("backup*"):
            shutil.rmtree(folder, ignore_errors=True)

    def _resumable(self, trial, latest) -> Optional[Any]:
        """The trial's cut-off MLflow run if this process can go on with it from its backup: the run was
        this worker's (a worker resumes only its own backups), and it holds every epoch the backup has."""
        if latest is None or latest.info.status not in ("KILLED", "RUNNING"):
            return None
        if latest.data.tags.get("lenet_sweep.worker", "") != self.context.worker_id:
            return None
        done = T.resume_point(self.backups(trial.trial_id) / "execution0")
        initial = int(trial.hyperparameters.values.get("tuner/initial_epoch", 0))
        if done <= initial:
            return None
        client = MlflowClient(mlflow.get_tracking_uri())
        return latest if len(recorded_epochs(client, latest.info.run_id, first=initial + 1)) >= done - initial else None

    def run_trial(self, trial, *args, **kwargs):
        if not isinstance(self.oracle, distributed.WorkerOracle):
            return self._run_tracked(trial, *args, **kwargs)
        # A worker beats from the trial's start (setup included) until it ends, however it ends.
        self._beat = distributed.Heartbeat(self.oracle, trial.trial_id, self.context.lease_seconds).start()
        try:
            return self._run_tracked(trial, *args, **kwargs)
        finally:
            self._beat.stop()
            self._beat = None

    def _run_tracked(self, trial, *args, **kwargs):
        started = time.perf_counter()
        hp = trial.hyperparameters
        attempts = trial_attempts(self.context, trial.trial_id)
        recorded = next((run for run in attempts if run.info.status == "FINISHED"), None)
        if recorded is not None:
            # Finished and logged, but the process ended before KerasTuner saved it: reuse, don't retrain.
            self._drop_backups(trial.trial_id)
            m = recorded.data.metrics
            self.last_score = m.get(f"best_{OBJECTIVE}", float("nan"))
            return {k[len("best_") :]: v for k, v in m.items() if k.startswith("best_") and k != "best_epoch"}
        self._fits = []
        reason = ""
        backups = self.backups(trial.trial_id)
        cut = self._resumable(trial, attempts[-1] if attempts else None)
        self._continuing = cut is not None
        if not self._continuing:  # a new attempt starts from the trial's first epoch
            shutil.rmtree(backups, ignore_errors=True)
        if self.context.worker_id and self.context.print_fn:
            self.context.print_fn(
                f"worker {self.context.worker_id}: trial [{trial.trial_id}] started  {trial_values(trial)}"
            )
        tags = {
            "lenet_sweep.kind": "trial",
            "lenet_sweep.sweep": self.context.sweep_name,
            "lenet_sweep.trial_id": trial.trial_id,
            "lenet_sweep.attempt": len(attempts) + 1,
        } | ({"lenet_sweep.worker": self.context.worker_id} if self.context.worker_id else {})
        lost = ""
        start = (
            {"run_id": cut.info.run_id, "nested": True}  # inside the sweep's active parent run
            if self._continuing
            else dict(
                experiment_id=self.context.experiment_id,
                run_name=f"trial-{trial.trial_id}",
                parent_run_id=self.context.parent_run_id,
                nested=True,
                tags=tags,
            )
        )
        try:
            with tracked_run(**start):
                cfg = self.hypermodel.config(hp)
                if self._continuing:
                    mlflow.set_tag("lenet_sweep.resumed_at_epoch", T.resume_point(backups / "execution0"))
                    client = MlflowClient(mlflow.get_tracking_uri())
                    if "failure_reason" in cut.data.tags:  # the cut-off's reason; it goes on now
                        client.delete_tag(cut.info.run_id, "failure_reason")
                else:
                    mlflow.set_tag("model", cfg.model.name)
                    if hp.values.get("tuner/trial_id"):
                        mlflow.set_tag("lenet_sweep.continues_trial", hp.values["tuner/trial_id"])
                    mlflow.log_params(trial_params(cfg, hp, self.hypermodel.values(hp)))
                    mlflow.log_text(config_yaml(cfg), CONFIG)  # the trial's config, as a hand-run `train` takes it
                fit_started = time.perf_counter()
                try:
                    histories = super().run_trial(trial, *args, **kwargs)
                    if isinstance(self.oracle, distributed.WorkerOracle) and not self.oracle.holds(
                        trial.trial_id, timeout=self.context.lease_seconds / 4, definite=True
                    ):  # the lease ran out during the last epoch: the trial is another worker's now
                        raise distributed.LeaseLost(f"trial {trial.trial_id}: the chief gave it to another worker")
                except distributed.LeaseLost as err:
                    lost = str(err)
                    mlflow.set_tag("failure_reason", f"cut off: {lost}; its result is the other worker's")
                    mlflow.end_run("KILLED")
                else:
                    fit_seconds = time.perf_counter() - fit_started
                    reason = diverged(histories)
                    self._log_results(trial, histories, started, fit_seconds)
                    if reason:
                        mlflow.set_tag("failure_reason", reason)
                        mlflow.end_run("FAILED")  # the `with` then leaves the ended run as it is
        except (kt.errors.FailedTrialError, kt.errors.FatalError):
            self._drop_backups(trial.trial_id)
            raise
        except Exception as err:  # recorded FAILED by tracked_run; KerasTuner must not retry it
            self._drop_backups(trial.trial_id)
            self.last_reason = one_line(f"{type(err).__name__}: {err}")
            raise kt.errors.FailedTrialError(self.last_reason) from err
        self._drop_backups(trial.trial_id)  # the trial's run has ended: nothing is left to resume
        if reason or lost:
            self.last_reason = reason or lost  # a lost trial's end report is ignored by the chief
            raise kt.errors.FailedTrialError(self.last_reason)
        return with_epochs_trained(histories, sum(len(f.history.epoch) for f in self._fits if f is not None))

    def _log_results(self, trial, histories, started: float, fit_seconds: float) -> None:
        # The first execution's rows (inherited epochs first), as its logger wrote them to history.csv.
        self.histories[trial.trial_id] = self._fits[0].rows if self._fits else []
        best = best_epoch_metrics(histories)
        self.last_score = best.get(OBJECTIVE, float("nan"))
        pruned = next((f.pruned for f in self._fits if f.pruned), "")
        self.last_reason = f"pruned, {pruned}" if pruned else ""  # shown on its progress line
        initial = int(trial.hyperparameters.values.get("tuner/initial_epoch", 0))
        tracking = time.perf_counter() - started - fit_seconds + sum(f.logging_seconds for f in self._fits)
        mlflow.log_metrics(
            {f"best_{k}": v for k, v in best.items() if k != "best_epoch"}
            | {
                "best_epoch": best["best_epoch"],
                "epochs_run": max(len(h.epoch) for h in histories),
                "last_epoch": max(h.epoch[-1] + 1 if h.epoch else initial for h in histories),
                "trial_seconds": time.perf_counter() - started,
                "tracking_seconds": tracking,
            }
        )

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.trials_ended += 1
        reason = self.last_reason or one_line((trial.message or "").strip())
        self.last_reason = ""
        if self.context.worker_id:  # the chief keeps the count, the best score and the stop policy
            if self.context.print_fn:
                # The chief's EndTrial returns nothing, so this side's trial.score stays None: ours is kept.
                done = trial.status == "COMPLETED"
                outcome = f"{OBJECTIVE} {self.last_score:.4f}" if done else f"{trial.status}: {reason}"
                self.context.print_fn(
                    f"worker {self.context.worker_id}: trial [{trial.trial_id}] {outcome}  "
                    f"{trial_values(trial)}  elapsed {clock(time.perf_counter() - self.context.started)}"
                )
            return
        if self.context.print_fn:
            self.context.print_fn(progress_line(self.oracle, trial, reason, self.context.started))
        stop = self.policy.after(trial.status, reason)
        if stop and stop_search(self.oracle, stop):
            self.context.stopped_because = stop
            if self.context.print_fn:
                self.context.print_fn(stop)


def trial_values(trial) -> str:
    """A trial's active hyperparameter values (and Hyperband's epochs) as one short line."""
    hp = trial.hyperparameters
    return describe(
        {k: v for k, v in hp.values.items() if hp.is_active(k) and not k.startswith("tuner/") or k == "tuner/epochs"}
    )


def progress_line(oracle, trial, reason: str, started: float, worker: str = "") -> str:
    """`trial 3/30 [02] val_accuracy 0.4100  (best 0.4400)  dense_1=64 ...  elapsed 1m02s` (on the oracle's side)."""
    total = f"/{oracle.max_trials}" if oracle.max_trials else ""
    best = oracle.get_best_trials(1)
    best_score = f"{best[0].score:.4f}" if best and best[0].score is not None else "-"
    outcome = f"{OBJECTIVE} {trial.score:.4f}" if trial.status == "COMPLETED" else f"{trial.status}: {reason}"
    if trial.status == "COMPLETED" and reason:  # a pruned trial: why it stopped
        outcome += f" ({reason})"
    by = f" on {worker}" if worker else ""
    return (
        f"trial {len(oracle.end_order)}{total} [{trial.trial_id}]{by} {outcome}  (best {best_score})  "
        f"{trial_values(trial)}  elapsed {clock(time.perf_counter() - started)}"
    )


# ---- the oracles: KerasTuner's, on a time budget ----------------------------------------------


class BudgetedOracle:
    """Mixed into a KerasTuner oracle: with a `Budget`, every trial is timed where the oracle lives (the local
    tuner, or the chief for all its workers), from `create_trial` to `end_trial`, with the epochs it reports
    (`EPOCHS_TRAINED`); those costs are kept in the oracle's saved state (oracle.json) for the next
    invocation's first plans; and no trial starts after the budget's end. Without one: KerasTuner's own."""

    def __init__(self, *args, budget: Optional[Budget] = None, **kwargs):
        self.budget = budget
        self._saved_costs: list[dict[str, Any]] = []  # earlier invocations' trials
        super().__init__(*args, **kwargs)

    @property
    def workers(self) -> int:
        """Tuners asking for trials now: 1 here, the live workers on a chief."""
        return max(len(self.tuner_ids), 1)

    @kt.synchronized
    def create_trial(self, tuner_id):
        trial = super().create_trial(tuner_id)
        if self.budget is not None and trial.status == TrialStatus.RUNNING:
            self.budget.begin(trial.trial_id, trial.hyperparameters.values, tuner_id)
        return trial

    @kt.synchronized
    def end_trial(self, trial):
        super().end_trial(trial)
        if self.budget is not None:
            metrics = self.trials[trial.trial_id].metrics
            epochs = metrics.get_last_value(EPOCHS_TRAINED) if metrics.exists(EPOCHS_TRAINED) else None
            self.budget.end(trial.trial_id, epochs)

    def _budget_over(self) -> Optional[dict[str, Any]]:
        """The hard end: KerasTuner's answer that no trial starts (None before it)."""
        if self.budget is None or not self.budget.over():
            return None
        self.budget.stop(
            f"sweep.budget_minutes={self.budget.minutes:g} reached: no new trial starts; rerun the same command "
            "to go on with a new budget"
        )
        return self._no_trial()

    def _no_trial(self) -> dict[str, Any]:
        # IDLE while trials run elsewhere (a chief's workers), as KerasTuner's Hyperband waits for a round.
        return {"status": TrialStatus.IDLE if self.ongoing_trials else TrialStatus.STOPPED, "values": None}

    def get_state(self):
        state = super().get_state()
        now = self.budget.records if self.budget is not None else []
        state["lenet_sweep_costs"] = [*self._saved_costs, *now][-RECORDS_KEPT:]
        return state

    def set_state(self, state):
        super().set_state(state)
        self._saved_costs = list(state.get("lenet_sweep_costs", []))
        if self.budget is not None:
            self.budget.earlier = self._saved_costs


class InheritingOracle:
    """Mixed into our oracles: an earlier sweep's trials enter as COMPLETED trials with their recorded scores
    (`sweep.warm_start`, warm_start.py), before the search starts. KerasTuner's own bookkeeping then treats
    them as trials it ran: their values are in `_tried_so_far` (random search and Hyperband's draws never
    repeat them), Bayesian optimisation fits them (and counts them among its initial points), they rank among
    the best trials. They are not in any Hyperband bracket: it promotes only trials of its own rounds.
    `max_trials` counts trials trained here, so it grows by the number inherited, now and on every reload
    (KerasTuner does not save it); the inherited ids are kept in the oracle's saved state."""

    def __init__(self, *args, **kwargs):
        self.inherited: dict[str, str] = {}  # trial id -> the MLflow run whose result it holds
        super().__init__(*args, **kwargs)

    def inherit_trials(self, found: list[tuple[dict[str, Any], float, str]]) -> list[str]:
        """Add one COMPLETED trial per (hyperparameter values, score, MLflow run id) of `found`; return their
        trial ids. Called before the search starts (nothing else holds the oracle), then `save()`."""
        if self.max_trials is not None:
            self.max_trials += len(found)
        ids = []
        for values, score, run_id in found:
            # KerasTuner's own numbering (create_trial): the trial count, padded to max_trials' digits.
            trial_id = f"{{:0{len(str(self.max_trials))}d}}".format(len(self.trials))
            hp = self.get_space()
            hp.values = dict(values)
            trial = Trial(hp, trial_id=trial_id, status=TrialStatus.COMPLETED)
            trial.message = f"inherited from MLflow run {run_id} (sweep.warm_start): not trained in this sweep"
            trial.metrics.register(OBJECTIVE, direction="max")
            trial.metrics.update(OBJECTIVE, score)
            self.score_trial(trial)
            self._record_values(trial)  # into _tried_so_far: no draw repeats it
            self.trials[trial_id] = trial
            self.start_order.append(trial_id)
            self.end_order.append(trial_id)
            self._run_times[trial_id] += 1
            self._save_trial(trial)
            self.inherited[trial_id] = run_id
            ids.append(trial_id)
        return ids

    def get_state(self):
        state = super().get_state()
        state["lenet_sweep_inherited"] = dict(self.inherited)
        return state

    def set_state(self, state):
        super().set_state(state)
        before, self.inherited = len(self.inherited), dict(state.get("lenet_sweep_inherited", {}))
        if self.max_trials is not None:  # the constructor's max_trials, plus those inherited (once, however called)
            self.max_trials += len(self.inherited) - before


class BudgetedSearchOracle(BudgetedOracle):
    """Random or Bayesian search on a budget: a trial whose estimated cost (its epochs at this machine's
    seconds per epoch, plus its setup) would overrun the budget does not start; a shorter draw from the
    space may (when `train.epochs` is searched), else the search ends."""

    def populate_space(self, trial_id):
        budget = self.budget
        if budget is None:
            return super().populate_space(trial_id)
        over = self._budget_over()
        if over:
            return over
        response = super().populate_space(trial_id)
        if response["status"] != TrialStatus.RUNNING:
            return response
        wanted = budget.planned_epochs(response["values"])
        if budget.affords(wanted):
            return response
        for _ in range(self._max_collisions):  # KerasTuner's own bound on draws
            values = self._random_values()
            if values is None:
                break
            if budget.affords(budget.planned_epochs(values)):
                return {"status": TrialStatus.RUNNING, "values": values}
        budget.stop(
            f"the next trial ({wanted:g} epochs, ~{clock(budget.cost().of(wanted))}) does not fit the "
            f"{clock(max(budget.left(), 0))} left of sweep.budget_minutes={budget.minutes:g} less "
            f"sweep.budget_margin, nor did a shorter draw; rerun the same command to go on with a new budget"
        )
        return self._no_trial()


class BudgetedRandomSearchOracle(InheritingOracle, BudgetedSearchOracle, RandomSearchOracle):
    """KerasTuner's random search oracle on a budget."""


class BudgetedBayesianOptimizationOracle(InheritingOracle, BudgetedSearchOracle, BayesianOptimizationOracle):
    """KerasTuner's Gaussian-process oracle on a budget."""


class _NewBracketDue(Exception):
    """KerasTuner's Hyperband is about to start a bracket; on a budget, the budget chooses which."""


class BudgetedHyperbandOracle(InheritingOracle, BudgetedOracle, HyperbandOracle):
    """KerasTuner's Hyperband with its brackets planned to fit the budget.

    Within the brackets started, KerasTuner chooses every trial (the first round's random ones, the best
    of a round promoted). When it would start the next bracket of its cycle, the budget chooses: the next
    one whose whole plan (every round's trials, promoted ones counting only their new epochs) fits the time
    left at the current estimate, else one with its last rounds dropped (`budget.choose_bracket`); those
    passed over are skipped. The passes over the brackets go on while the budget lasts, beyond
    `hyperband_iterations`: a fast machine uses its spare time. A bracket started is run to its planned end,
    unless the budget's hard end comes first. The first bracket starts before any trial is timed (its first
    round is the measurement the plans need, and none is wasted): it is marked provisional, and its rounds are
    fitted to the time left until its first promotion.
    """

    def __init__(self, *args, **kwargs):
        self._deciding = False  # inside KerasTuner's populate_space: a new bracket is the budget's to choose
        super().__init__(*args, **kwargs)

    def _start_new_bracket(self):
        super()._start_new_bracket()
        self._brackets[-1]["provisional"] = self.budget is not None and self.budget.cost() is None

    def _increment_bracket_num(self):
        if self._deciding:
            raise _NewBracketDue()
        super()._increment_bracket_num()

    def populate_space(self, trial_id):
        if self.budget is None:
            # A budgeted invocation may have gone on past hyperband_iterations; KerasTuner stops only when
            # the pass it is in is the last one (an equality), so it must count this pass as that.
            self.hyperband_iterations = max(self.hyperband_iterations, self._current_iteration + 1)
            return super().populate_space(trial_id)
        over = self._budget_over()
        if over:
            return over
        self._remove_completed_brackets()
        for bracket in self._brackets:
            if bracket.get("provisional"):
                self._fit_provisional(bracket)
        iterations, self.hyperband_iterations = self.hyperband_iterations, math.inf
        self._deciding = True
        try:
            return self._affordable(super().populate_space(trial_id), trial_id)
        except _NewBracketDue:
            pass
        finally:
            self._deciding = False
            self.hyperband_iterations = iterations
        return self._start_planned_bracket(trial_id)

    def _affordable(self, result: dict[str, Any], trial_id: str) -> dict[str, Any]:
        """`result` if its trial, of a bracket already started, ends before the plans' end at the current
        estimate; else none starts and the search ends. A bracket's plan was checked when it started, but
        the estimate moves (a promotion near the end of the budget would overrun it by its whole length)."""
        values = result.get("values")
        if result.get("status") != TrialStatus.RUNNING or not values:
            return result
        epochs, cost = self.budget.planned_epochs(values), self.budget.cost()
        if cost is None or cost.of(epochs) <= self.budget.left() - self.budget.committed(self.workers):
            return result
        for bracket in self._brackets:  # KerasTuner recorded the trial in its round: it will not exist
            for round_info in bracket["rounds"]:
                round_info[:] = [info for info in round_info if info["id"] != trial_id]
        self.budget.stop(
            f"the next trial ({epochs:g} epochs) would not end within sweep.budget_minutes="
            f"{self.budget.minutes:g} less sweep.budget_margin: no new trial starts; rerun the same command "
            "to go on with a new budget"
        )
        return self._no_trial()

    def _plan_of(self, bracket: Mapping[str, Any]):
        return hyperband_plans(self)[bracket["bracket_num"]].shortened(len(bracket["rounds"]))

    def _committed(self) -> float:
        """Wall seconds the brackets started still need, shared by the workers: the running trials' rest,
        then the trials not yet created. 0 when nothing runs: the brackets left then wait for nothing
        (here, KerasTuner starts a bracket only when the last one is done)."""
        cost = self.budget.cost()
        if cost is None or not self.ongoing_trials:
            return 0.0
        waiting = sum(
            self._plan_of(b).seconds(cost, self.workers, self.budget.executions, [len(r) for r in b["rounds"]])
            for b in self._brackets
        )
        return self.budget.committed(self.workers) + waiting

    def _fit_provisional(self, bracket: dict[str, Any]) -> None:
        """The first bracket's rounds, fitted to the time left now that trials are timed (until its first
        promotion, after which its plan stands)."""
        rounds = bracket["rounds"]
        if not rounds[0] and not any(r["provisional"] for r in self.budget.runs):
            self.budget.started_bracket(self._plan_of(bracket), None, provisional=True)
        if any(rounds[1:]) or (len(rounds) == 1 and len(rounds[0]) == self._get_size(bracket["bracket_num"], 0)):
            bracket["provisional"] = False
            return
        cost = self.budget.cost()
        if cost is None:
            return
        whole = hyperband_plans(self)[bracket["bracket_num"]]
        left = self.budget.left() - self._committed()
        done = [len(rounds[0])]

        def seconds(plan):
            return plan.seconds(cost, self.workers, self.budget.executions, done)

        fitting = [n for n in range(len(whole.sizes), 0, -1) if seconds(whole.shortened(n)) <= left]
        keep = fitting[0] if fitting else 1
        if keep != len(rounds):
            rounds[keep:] = []
            rounds.extend([] for _ in range(keep - len(rounds)))
            self.budget.refitted_bracket(whole.shortened(keep), seconds(whole.shortened(keep)))

    def _start_planned_bracket(self, trial_id):
        budget, workers = self.budget, self.workers
        plans = hyperband_plans(self)
        due = (self._current_bracket - 1) % len(plans)  # KerasTuner's next (its _increment_bracket_num)
        cost = budget.cost()
        left = budget.left() - self._committed()
        if cost is None:  # no trial timed yet (all failed): KerasTuner's next, fitted once one is
            plan, passed = plans[due], []
        else:
            plan, passed = choose_bracket(plans, due, lambda p: p.seconds(cost, workers, budget.executions) <= left)
        if plan is None:
            smallest = min((p.shortened(1) for p in plans.values()), key=lambda p: p.seconds(cost, workers, 1))
            budget.stop(
                f"no Hyperband bracket fits the {clock(max(left, 0))} left of sweep.budget_minutes={budget.minutes:g} "
                f"less sweep.budget_margin (the smallest, {smallest.summary()}, needs "
                f"~{clock(smallest.seconds(cost, workers, budget.executions))}); rerun the same command to go on "
                "with a new budget"
            )
            return self._no_trial()
        for skipped in passed:
            budget.skipped_bracket(plans[skipped], plans[skipped].seconds(cost, workers, budget.executions))
        passes = self._current_iteration
        for _ in range(bracket_cycle(due, len(plans)).index(plan.bracket) + 1):
            self._increment_bracket_num()
        if self._current_iteration > passes and self._current_iteration >= self.hyperband_iterations and budget.say:
            budget.say(
                f"budget: pass {self._current_iteration + 1} over Hyperband's brackets starts, beyond "
                f"tuner.hyperband_iterations={self.hyperband_iterations}: there is time left"
            )
        self._start_new_bracket()
        bracket = self._brackets[-1]
        del bracket["rounds"][len(plan.sizes) :]
        budget.stopped_because = ""  # a chief's earlier "nothing fits" no longer holds
        budget.started_bracket(plan, plan.seconds(cost, workers, budget.executions) if cost else None, cost is None)
        return self._random_trial(trial_id, bracket)


class OnOracle:
    """Runs a KerasTuner tuner on the oracle `make_tuner` made (KerasTuner's tuners build their own in their
    `__init__`, and do nothing else there)."""

    def __init__(self, oracle, **kwargs):
        kt.Tuner.__init__(self, oracle=oracle, **kwargs)


# KerasTuner loads the previous round's checkpoint, which holds that trial's optimizer state too, into a
# model whose optimizer is not built yet: Keras skips that state and warns at every promotion, with nothing a
# user can do about it; TrackedHyperband says what happens instead. One narrow filter installed at import,
# not a catch_warnings around each load: that swaps the process's filters and is not thread-safe beside a
# worker's heartbeat thread.
PROMOTION_WARNING = "Skipping variable loading for optimizer"
warnings.filterwarnings("ignore", message=PROMOTION_WARNING, category=UserWarning)


class TrackedRandomSearch(TrialTracking, OnOracle, kt.RandomSearch):
    """KerasTuner's random search, every trial an MLflow run."""


class TrackedBayesianOptimization(TrialTracking, OnOracle, kt.BayesianOptimization):
    """KerasTuner's Gaussian-process search, every trial an MLflow run."""


class TrackedHyperband(TrialTracking, OnOracle, kt.Hyperband):
    """KerasTuner's Hyperband (epochs are the budget), every trial an MLflow run."""

    def _build_hypermodel(self, hp):
        if self._promotion is None:
            return super()._build_hypermodel(hp)
        # Keras' warning is silenced once, at import (PROMOTION_WARNING); said plainly here instead.
        model = super()._build_hypermodel(hp)
        trial_id, previous, epoch = self._promotion
        if self.context.print_fn:
            at = f"from epoch {epoch} (its best)" if epoch else "from its best epoch"
            self.context.print_fn(
                f"trial {trial_id} continues trial {previous}'s weights {at} with a fresh optimizer (KerasTuner's "
                "checkpoint holds the optimizer state too, but loads it before the new model's optimizer is "
                "built, so Keras drops it)"
            )
        return model


def make_tuner(
    t: DictConfig, hypermodel: TrialModel, context: SweepContext, directory: str, project: str, overwrite: bool
) -> kt.Tuner:
    """The tuner `t.kind` names (`t` is the config's `tuner` section), its state in `directory/project`, on
    `context.budget` (None: no budget)."""
    # KerasTuner's own failure limit raises out of the search with the trial half-saved; ours stops
    # cleanly (TrialTracking.on_trial_end), so KerasTuner's is set out of reach.
    oracle_args = dict(
        objective=kt.Objective(OBJECTIVE, "max"),
        seed=t.seed,
        max_consecutive_failed_trials=2**31,
        budget=context.budget,
    )
    if t.kind == "random":
        oracle = BudgetedRandomSearchOracle(max_trials=t.max_trials, **oracle_args)
        kind = TrackedRandomSearch
    elif t.kind == "bayesian":
        oracle = BudgetedBayesianOptimizationOracle(
            max_trials=t.max_trials, num_initial_points=t.num_initial_points, alpha=t.alpha, beta=t.beta, **oracle_args
        )
        kind = TrackedBayesianOptimization
    else:
        oracle = BudgetedHyperbandOracle(
            max_epochs=t.max_epochs, factor=t.factor, hyperband_iterations=t.hyperband_iterations, **oracle_args
        )
        oracle.max_trials = t.max_trials  # Hyperband takes no max_trials; its oracle honours one
        kind = TrackedHyperband
    return kind(
        oracle=oracle,
        hypermodel=hypermodel,
        executions_per_trial=t.executions_per_trial,
        directory=directory,
        project_name=project,
        overwrite=overwrite,
        context=context,
    )


# ---- MLflow bookkeeping ------------------------------------------------------------------------


def trial_params(cfg: DictConfig, hp: kt.HyperParameters, values: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's params: each dimension under its own name, KerasTuner's `tuner/*` values, and the
    whole trial config under its config keys (model.filters, optimizer.learning_rate, ...)."""
    resolved = loggable_config(cfg)
    config = {k: resolved[k] for k in ("data", "model", "optimizer", "train", "seed")}
    return flatten(config) | dict(values) | {k: v for k, v in hp.values.items() if k.startswith("tuner/")}


def diverged(histories: list) -> str:
    """Why a trial failed numerically ('' if it did not)."""
    for history in histories:
        losses = history.history.get("loss", [])
        if any(not math.isfinite(v) for v in losses):
            return (
                f"loss became NaN/inf in epoch {history.epoch[len(losses) - 1] + 1}; training was "
                "stopped (the learning rate is too high for this configuration)"
            )
    return ""


def mark_cut_off_trials(client: MlflowClient, experiment_id: str, parent_run_id: str) -> int:
    """End every child run still RUNNING (its process died) KILLED, with the reason; return how many."""
    cut = [run for run in trial_runs(client, experiment_id, parent_run_id) if run.info.status == "RUNNING"]
    for run in cut:
        end_killed(
            client,
            run.info.run_id,
            "cut off: the sweep stopped before this trial ended; a resumed sweep goes on with it from its last "
            "completed epoch (its backup), or runs it again as a new attempt if it has none",
        )
    return len(cut)


def trial_attempts(context: SweepContext, trial_id: str) -> list:
    """The child runs of trial `trial_id` so far, oldest first."""
    client = MlflowClient(mlflow.get_tracking_uri())
    return [
        run
        for run in trial_runs(client, context.experiment_id, context.parent_run_id)
        if run.data.tags.get("lenet_sweep.trial_id") == trial_id
    ]


def recorded_history(context: SweepContext, trial_id: str) -> list[dict[str, float]]:
    """The per-epoch rows a trial logged (its `history.csv`, inherited epochs included); [] if none."""
    finished = [run for run in trial_attempts(context, trial_id) if run.info.status == "FINISHED"]
    if not finished:
        return []
    artifacts = Artifacts(MlflowClient(mlflow.get_tracking_uri()))
    rows = artifacts.csv(finished[-1].info.run_id, "history.csv")
    return [{k: float(v) for k, v in row.items() if k != "epoch" and v not in ("", None)} for row in rows]


def one_line(text: str, limit: int = 300) -> str:
    """`text` (an error message, maybe with colour codes and argument dumps) as one short line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = " ".join(line.strip() for line in text.split("Arguments received")[0].splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(values: Mapping[str, Any]) -> str:
    """Hyperparameter values as one short line: `dense_1=64 adam_learning_rate=0.000721`."""
    return " ".join(f"{k}={f'{v:.3g}' if isinstance(v, float) else v}" for k, v in values.items())
