"""The sweep: KerasTuner searches `conf/search/<name>.yaml`; every trial is an MLflow run nested under
one parent run per sweep. `python -m lenet_sweep.sweep data.root=DIR` (`make sweep`).

Reading order: search space -> trial config -> state folder -> the sweep -> summary. The KerasTuner hooks
(the hypermodel, the tracked tuners) are in tuner.py; each trial trains through trial.fit.
Trials are chosen and ranked on the validation split only; the test split is never decoded here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import keras_tuner as kt
import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lenet_sweep import budget as time_budget
from lenet_sweep import distributed, plots, warm_start
from lenet_sweep.budget import Budget
from lenet_sweep.cli import clock, guarded
from lenet_sweep.config import HyperParameterSpec, check, register_configs
from lenet_sweep.config import one_line as config_error
from lenet_sweep.data import DataBySize
from lenet_sweep.errors import UserError
from lenet_sweep.tracking.artifacts import Artifacts
from lenet_sweep.tracking.runs import (
    csv_text,
    end_killed,
    flatten,
    log_data_check,
    log_figure,
    loggable_config,
    tracked_run,
)
from lenet_sweep.tracking.store import (
    exclusively,
    find_sweep_run,
    latest_attempts,
    number,
    open_store,
    redact,
    trial_runs,
)
from lenet_sweep.trial import PruneRule
from lenet_sweep.tuner import (
    StopPolicy,
    SweepContext,
    TrialModel,
    describe,
    make_tuner,
    mark_cut_off_trials,
    one_line,
    progress_line,
    stop_search,
    trial_attempts,
)

Progress = Callable[[str], None]
OPTIMIZER_GROUP = "optimizer"  # a search key that picks a conf/optimizer/*.yaml file
_UNSET = object()


# ---- search space ------------------------------------------------------------------------------


def typed_space(cfg: DictConfig) -> dict[str, Any]:
    """`cfg.search.space` with every entry checked against `HyperParameterSpec` and its defaults filled."""
    space = {}
    for name, entry in (cfg.search.space or {}).items():
        if not isinstance(entry, DictConfig):
            raise UserError(
                f"search.space.{name}={entry!r}: give a mapping such as "
                "{key: model.dropout, type: choice, values: [0.0, 0.5]}"
            )
        try:
            space[name] = OmegaConf.merge(OmegaConf.structured(HyperParameterSpec), entry)
        except OmegaConfBaseException as err:
            raise UserError(config_error(err, f"search.space.{name}")) from None
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
        if spec.type == "choice" and not spec["values"]:
            raise UserError(f"{where}: a choice needs `values`")
        if spec.type in ("int", "float") and (spec.min is None or spec.max is None or spec.min > spec.max):
            raise UserError(f"{where}: an {spec.type} needs `min` <= `max`")
        if spec.key == OPTIMIZER_GROUP:
            unknown = [v for v in spec["values"] or [] if v not in optimizers]
            if unknown:
                raise UserError(
                    f"{where}: optimizer(s) {unknown} have no conf/optimizer/<name>.yaml "
                    f"(known here: {', '.join(optimizers)})"
                )
        else:
            for target, label in _configs_for(cfg, space, spec, optimizers):
                if OmegaConf.select(target, spec.key, default=_UNSET) is _UNSET:
                    raise UserError(
                        f"{where}.key={spec.key!r} is not a config key{label} (e.g. "
                        "model.dropout, model.filters.0, optimizer.learning_rate)"
                    )
        if len(spec.when or {}) > 1:
            raise UserError(f"{where}.when: one parent per dimension (KerasTuner's conditional_scope)")
        for parent in spec.when or {}:
            if parent not in seen:
                raise UserError(f"{where}.when names {parent!r}: it must be a dimension listed above it")
        seen.add(name)
    return space


def _configs_for(
    cfg: DictConfig, space: Mapping[str, Any], spec: Any, optimizers: Mapping[str, DictConfig]
) -> list[tuple[DictConfig, str]]:
    """The configs `spec.key` must exist in: `cfg`, or for `optimizer.*` keys each optimizer the
    search can pick while `spec` is active."""
    group = [name for name, other in space.items() if other.key == OPTIMIZER_GROUP]
    if not spec.key.startswith(f"{OPTIMIZER_GROUP}.") or not group:
        return [(cfg, "")]
    allowed = (spec.when or {}).get(group[0], space[group[0]]["values"])
    return [
        (OmegaConf.create({OPTIMIZER_GROUP: optimizers[name]}), f" of optimizer={name}")
        for name in allowed
        if name in optimizers
    ]


def _define(hp: kt.HyperParameters, name: str, spec: Any) -> Any:
    """Register (or read) the hyperparameter `name` as `spec` describes; None while inactive."""
    if spec.type == "choice":
        values = list(spec["values"])
        return hp.Choice(name, values, default=spec.default if spec.default is not None else values[0])
    if spec.type == "boolean":
        return hp.Boolean(name, default=bool(spec.default))
    if spec.type == "int":
        return hp.Int(
            name,
            int(spec.min),
            int(spec.max),
            step=int(spec.step) if spec.step else 1,
            sampling=str(spec.sampling),
            default=None if spec.default is None else int(spec.default),
        )
    return hp.Float(
        name, float(spec.min), float(spec.max), step=spec.step, sampling=str(spec.sampling), default=spec.default
    )


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


def trial_config(
    cfg: DictConfig, space: Mapping[str, Any], optimizers: Mapping[str, DictConfig], hp: kt.HyperParameters
) -> DictConfig:
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


def trial_model(
    cfg: DictConfig, space: Mapping[str, Any], optimizers: Mapping[str, DictConfig], data: DataBySize, num_classes: int
) -> TrialModel:
    """The KerasTuner hypermodel of the sweep `cfg`: each trial's config is `trial_config`."""
    return TrialModel(
        cfg,
        lambda hp: trial_config(cfg, space, optimizers, hp),
        lambda hp: hyperparameter_values(hp, space),
        data,
        num_classes,
        cfg.sweep.early_stopping_patience,
        prune_rule(cfg.sweep.prune),
    )


def prune_rule(settings: Optional[DictConfig]) -> Optional[PruneRule]:
    """`sweep.prune` as the rule trial.fit applies (None: off)."""
    if settings is None or not settings.enabled:
        return None
    return PruneRule(int(settings.after_epochs), float(settings.chance_margin), float(settings.diverged_loss))


# ---- state folder ------------------------------------------------------------------------------

STATE_FILE = "lenet_sweep.json"


def state_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What a resumed sweep must share with the one it continues (not where it logs or how it prints)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in resolved["data"].items() if k not in ("decode_cache", "decode_threads")}
    train = {k: v for k, v in resolved["train"].items() if k not in ("keras_verbose", "resume", "backup_dir")}
    tuner = {k: v for k, v in resolved["tuner"].items() if k != "max_trials"}
    return flatten(
        {
            "data": data,
            "model": resolved["model"],
            "optimizer": resolved["optimizer"],
            "train": train,
            "seed": resolved["seed"],
            "search": resolved["search"],
            "tuner": tuner,
            "sweep": {
                "early_stopping_patience": cfg.sweep.early_stopping_patience,
                "prune": resolved["sweep"].get("prune"),
                # A resumed sweep holds what it inherited: changing where from is another sweep.
                "warm_start": resolved["sweep"].get("warm_start"),
            },
        }
    )


def state_dir(cfg: DictConfig) -> Path:
    """KerasTuner's project folder of the sweep: `<sweep.dir>/<sweep.name>`, absolute."""
    return (Path(cfg.sweep.dir).expanduser() / cfg.sweep.name).resolve()


def check_state(cfg: DictConfig) -> tuple[Path, bool]:
    """(project folder, whether a saved sweep is resumed); refuses to resume a different sweep."""
    project = state_dir(cfg)
    state = project / STATE_FILE
    if cfg.sweep.overwrite or not (project / "oracle.json").exists():
        return project, False
    role = "chief" if str(cfg.sweep.role) == "chief" else "local"
    other = "local" if role == "chief" else "chief"
    mine, theirs = (project / f"{'chief' if r == 'chief' else 'tuner0'}.json" for r in (role, other))
    if theirs.exists() and not mine.exists():
        # KerasTuner reloads the oracle only through this role's own tuner file: without it, it would
        # start an empty oracle and save it over the sweep's.
        raise UserError(
            f"sweep {cfg.sweep.name!r} in {project} was run with sweep.role={other}: resume it with "
            f"sweep.role={other}, or choose a new sweep.name"
        )
    if state.exists():
        saved = json.loads(state.read_text())
        now = json.loads(json.dumps(state_fingerprint(cfg)))
        changed = [
            f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)
        ]
        if changed:
            raise UserError(
                f"sweep {cfg.sweep.name!r} in {project} was started with another "
                f"configuration ({'; '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}): "
                "rerun it unchanged to resume, or give sweep.overwrite=true to start afresh, "
                "or choose a new sweep.name"
            )
    return project, True


# ---- the budget --------------------------------------------------------------------------------


def sweep_budget(
    cfg: DictConfig, space: Mapping[str, Any], print_fn: Optional[Progress], started: float
) -> Optional[Budget]:
    """`sweep.budget_minutes` of this invocation, counted from `started` (None: no budget). A resumed sweep
    gets a whole new budget: it is not part of the fingerprint, so a rerun with more time goes on."""
    if cfg.sweep.budget_minutes is None:
        return None
    searched = [name for name, spec in space.items() if spec.key == "train.epochs"]
    default = int(cfg.train.epochs)

    def epochs_of(values: Mapping[str, Any]) -> int:
        return int(values.get(searched[0], default)) if searched else default

    return Budget(
        float(cfg.sweep.budget_minutes),
        float(cfg.sweep.budget_margin),
        int(cfg.tuner.executions_per_trial),
        epochs_of,
        print_fn,
        started=started,
    )


def budget_lines(report: Mapping[str, Any]) -> list[str]:
    """How the budget went (`Budget.report`), in words; [] without a budget."""
    if not report:
        return []
    r, minutes = report, report["budget_minutes"]
    rate = ""
    if math.isfinite(r["seconds_per_epoch"]):
        rate = (
            f"; {r['epochs_trained']:g} epochs at {r['seconds_per_epoch']:.1f} s each + "
            f"{r['trial_setup_seconds']:.1f} s set-up per trial"
        )
    lines = [
        f"budget {clock(60 * minutes)} (sweep.budget_minutes={minutes:g}): used {clock(r['budget_used_seconds'])} = "
        f"set-up {clock(r['setup_seconds'])} + {r['trials_timed']} trials {clock(r['trials_seconds'])} + "
        f"between and after them {clock(r['other_seconds'])}{rate}"
    ]
    if r["brackets_run"] or r["brackets_skipped"]:
        lines.append(
            f"Hyperband brackets: {r['brackets_run']} run ({r['brackets_shortened']} shortened to fit), "
            f"{r['brackets_skipped']} skipped (did not fit the time left)"
        )
    if r["stopped_because"]:
        lines.append(f"the budget ended the search: {r['stopped_because']}")
    return lines


def _log_budget(budget: Optional[Budget]) -> dict[str, Any]:
    """How the budget went, on the parent run: its numbers as metrics, its words as the tag
    lenet_sweep.budget. Returns `Budget.report` ({} without a budget)."""
    if budget is None:
        return {}
    budget.ended = time_budget.budget_clock()
    report = budget.report()
    mlflow.log_metrics({k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and math.isfinite(v)})
    mlflow.set_tag("lenet_sweep.budget", " ".join(budget_lines(report)))
    return report


# ---- the sweep ---------------------------------------------------------------------------------


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list[dict[str, Any]]  # one per trial (latest attempt), best first
    seconds: float
    resumed: bool
    stopped_because: str = ""  # why the sweep stopped before its tuner was done ("" if it was)
    budget: dict[str, Any] = field(default_factory=dict)  # how sweep.budget_minutes went (Budget.report; {}: none)


def run_sweep(
    cfg: DictConfig, optimizers: Mapping[str, DictConfig], print_fn: Optional[Progress] = None
) -> SweepResult:
    """Run (or resume) the sweep `cfg` describes and log it to MLflow; return its ranking.

    `sweep.role` local runs it all here; chief serves the oracle to workers and owns the parent run, the
    stop policy and the ranking; worker runs trials for a chief (distributed.py, docs/DISTRIBUTED.md).
    """
    import tensorflow as tf

    invoked = time_budget.budget_clock()  # the budget counts from here: decoding and MLflow's set-up are part of it
    check(cfg)  # the schema's ranges; tuner.seed >= 1 because KerasTuner reads 0 as "unseeded"
    distributed.check_role(cfg.sweep)
    role = str(cfg.sweep.role)
    if cfg.sweep.threads:  # before TensorFlow runs its first op
        tf.config.threading.set_intra_op_parallelism_threads(cfg.sweep.threads)
        tf.config.threading.set_inter_op_parallelism_threads(cfg.sweep.threads)
    space = active_space(cfg, optimizers)
    project, resumed = (state_dir(cfg), False) if role == "worker" else check_state(cfg)
    earlier = None  # the sweep to inherit from: only a fresh sweep inherits; a resumed one holds what it did
    if cfg.sweep.warm_start and role != "worker" and not resumed:  # checked before the data is decoded
        earlier = warm_start.earlier_sweep(cfg.mlflow, cfg.sweep.warm_start, cfg.sweep.name)
    # A chief takes its port first: a second chief is refused before it touches the state or MLflow.
    server = distributed.bind(*distributed.address(cfg.sweep.chief)) if role == "chief" else None
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    data = DataBySize(cfg.data, cfg.seed, print_fn)
    first = data.at(cfg.model.input_size)  # fails on bad data before anything is recorded
    experiment = open_store(cfg.mlflow)
    client = MlflowClient(mlflow.get_tracking_uri())
    started = time.perf_counter()
    context = SweepContext(
        experiment,
        "",
        cfg.sweep.name,
        print_fn,
        started,
        cfg.sweep.time_limit_minutes,
        cfg.tuner.max_consecutive_failed_trials,
        worker_id=cfg.sweep.worker_id if role == "worker" else "",
        lease_seconds=cfg.sweep.lease_seconds,
        budget=None if role == "worker" else sweep_budget(cfg, space, print_fn, invoked),  # the chief's is the sweep's
    )
    hypermodel = trial_model(cfg, space, optimizers, data, len(first.splits.classes))
    with distributed.kerastuner_role(role, cfg.sweep.chief, cfg.sweep.worker_id):
        try:  # KerasTuner checks the space as it builds the first model; with overwrite it clears the state
            tuner = make_tuner(cfg.tuner, hypermodel, context, str(project.parent), cfg.sweep.name, cfg.sweep.overwrite)
        except (ValueError, TypeError) as err:
            raise UserError(f"KerasTuner refuses search={cfg.search.name}: {one_line(str(err))}") from None
        if role == "worker":
            fingerprint = worker_fingerprint(cfg, first)
            return work(cfg, tuner, context, client, fingerprint, space, print_fn)
        return _lead(cfg, tuner, context, client, project, resumed, space, first, server, print_fn, optimizers, earlier)


def _lead(
    cfg, tuner, context, client, project, resumed, space, first, server, print_fn, optimizers=None, earlier=None
) -> SweepResult:
    """The sweep's parent run around the search: here (local), or served to workers (chief)."""
    experiment, role = context.experiment_id, str(cfg.sweep.role)
    latest = find_sweep_run(client, experiment, cfg.sweep.name, project)
    previous = latest if resumed else None
    if latest is not None and previous is None and latest.info.status == "RUNNING":
        # Starting afresh over a sweep whose process died: close what it left open.
        mark_cut_off_trials(client, experiment, latest.info.run_id)
        end_killed(
            client,
            latest.info.run_id,
            "cut off, then started afresh (sweep.overwrite=true or its state folder was gone)",
        )
    with tracked_run(
        experiment_id=experiment,
        run_id=previous.info.run_id if previous else None,
        run_name=None if previous else f"sweep-{cfg.sweep.name}",
        tags={
            "lenet_sweep.kind": "sweep",
            "lenet_sweep.sweep": cfg.sweep.name,
            "lenet_sweep.role": role,
            "tuner": cfg.tuner.kind,
            "search": cfg.search.name,
        },
    ) as parent:
        parent_id = context.parent_run_id = parent.info.run_id
        if previous:
            if role == "local":  # a chief's running trials belong to live workers: leases end the dead ones'
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
        if earlier is not None:  # a fresh sweep (run_sweep looks for it only then)
            _inherit(cfg, tuner, client, parent_id, earlier, space, optimizers or {}, print_fn)
        chief_seconds = 0.0
        if context.budget is not None:
            context.budget.search_started = time_budget.budget_clock()
        if role == "chief":
            mlflow.log_dict(worker_fingerprint(cfg, first), FINGERPRINT)  # what every worker must match
            chief_seconds = serve(cfg, tuner, context, client, project, resumed, server)
        else:
            tuner.search(verbose=0)
        seconds = time.perf_counter() - context.started
        rows = summarise(client, experiment, parent_id, space, cfg.tuner.kind)
        _log_summary(rows, space, seconds)
        if role == "chief":
            mlflow.log_metric("chief_seconds_per_trial", chief_seconds / max(len(rows), 1))
        if context.stopped_because:
            mlflow.set_tag("stopped_because", context.stopped_because)
        spent = _log_budget(context.budget)
    return SweepResult(parent_id, rows, seconds, bool(previous), context.stopped_because, spent)


def _inherit(cfg, tuner, client, parent_id, earlier, space, optimizers, print_fn) -> None:
    """Seed the new sweep's oracle, and its parent run (active), with the trials of sweep `earlier` it would
    train exactly so (warm_start.py); the MLflow runs first, then the oracle's saved state."""
    oracle, experiment = tuner.oracle, tuner.context.experiment_id
    data_now = Artifacts(client).json(parent_id, warm_start.DATA_SUMMARY)
    found = warm_start.select(
        client, experiment, earlier, cfg, space, oracle.get_space(), tuner.hypermodel.config, optimizers, data_now
    )
    ids = oracle.inherit_trials([(t.values, t.score, t.original) for t in found.trials])
    warm_start.record(client, experiment, parent_id, cfg.sweep.name, found, ids)
    oracle.save()
    mlflow.set_tag("lenet_sweep.warm_start", found.sweep)
    if print_fn:
        max_epochs = cfg.tuner.max_epochs if cfg.tuner.kind == "hyperband" else None
        for line in warm_start.summary_lines(found, cfg.tuner.kind, max_epochs):
            print_fn(line)


# ---- distributed: chief and worker -------------------------------------------------------------

FINGERPRINT = "sweep/fingerprint.json"  # on the parent run: the config every worker must share


def worker_fingerprint(cfg: DictConfig, first: Any) -> dict[str, Any]:
    """What a worker must share with its chief: the sweep's config (`state_fingerprint`) but for where
    the data lies on each machine, plus the classes and file counts that data gives."""
    local = ("data.root", "data.cache_dir", "sweep.warm_start")  # the chief alone inherits trials
    shared = {k: v for k, v in state_fingerprint(cfg).items() if k not in local}
    shared["data.classes"] = list(first.splits.classes)
    shared["data.files"] = {split: len(files.paths) for split, files in first.splits.files.items()}
    return json.loads(json.dumps(shared))


def serve(
    cfg: DictConfig,
    tuner: kt.Tuner,
    context: SweepContext,
    client: MlflowClient,
    project: Path,
    resumed: bool,
    server: Any,
) -> float:
    """The chief: serve the oracle on `server` (bound) until every trial is in; return the seconds spent
    answering workers."""
    oracle = tuner.oracle
    leases = distributed.Leases(cfg.sweep.lease_seconds)
    policy = StopPolicy(context.started, context.time_limit_minutes, context.max_consecutive_failures)
    say = context.print_fn or (lambda _text: None)
    if resumed:  # before anything saves over oracle.json, which still holds who was running what
        back = distributed.restore_ongoing(oracle, project / "oracle.json", leases)
        if back:
            say("trials still out with their workers: " + ", ".join(f"{t} on {w}" for w, t in back.items()))
    oracle.verbose = 0  # KerasTuner's own trial display: ours is one line per trial
    tuner.save()  # as KerasTuner's own chief does before it serves

    def ended(trial, worker: str) -> None:
        reason = ""
        if trial.status != "COMPLETED":  # the Trial proto carries no message: the reason is in MLflow
            runs = [r for r in trial_attempts(context, trial.trial_id) if r.info.status == "FAILED"]
            reason = runs[-1].data.tags.get("failure_reason", "") if runs else f"see worker {worker}'s output"
        say(progress_line(oracle, trial, reason, context.started, worker))
        stop = policy.after(trial.status, reason)
        if stop and stop_search(oracle, stop):
            context.stopped_because = stop
            say(stop)

    def lapsed(worker: str, trial_id: str) -> None:
        why = (
            f"cut off: worker {worker} sent no heartbeat for {cfg.sweep.lease_seconds:g} s "
            f"(sweep.lease_seconds); trial {trial_id} went back to the queue for another worker"
        )
        for run in trial_attempts(context, trial_id):
            if run.info.status == "RUNNING" and run.data.tags.get("lenet_sweep.worker") == worker:
                end_killed(client, run.info.run_id, why)
        say(f"trial {trial_id}: {why}")

    servicer = distributed.ChiefServicer(oracle, leases, ended, say)
    if resumed:
        servicer.not_before = time.monotonic() + cfg.sweep.lease_seconds
    if oracle.max_trials and len(oracle.trials) >= oracle.max_trials and not oracle.ongoing_trials:
        servicer.stop_triggered = not oracle._retry_queue  # restarted after the last trial: nothing to wait for
    say(f"chief of sweep {cfg.sweep.name!r} serving KerasTuner's oracle on {cfg.sweep.chief} (plaintext, no login)")
    distributed.serve(server, servicer, lapsed)
    return servicer.busy_seconds


def work(cfg, tuner, context, client, fingerprint, space, print_fn) -> SweepResult:
    """A worker: find the chief and its parent run, check this config against the chief's, run trials
    until the chief says the search is over. Trials attach to the chief's parent run."""
    import grpc

    worker, chief = cfg.sweep.worker_id, cfg.sweep.chief
    say = print_fn or (lambda _text: None)
    oracle = distributed.WorkerOracle(
        tuner.oracle._oracle, chief, worker, 60 * cfg.sweep.chief_wait_minutes, cfg.sweep.lease_seconds
    )
    tuner.oracle = oracle
    say(f"worker {worker}: waiting for the chief at {chief} (up to {cfg.sweep.chief_wait_minutes:g} min)")
    try:
        oracle.get_space()
    except grpc.RpcError as err:
        raise UserError(
            f"no chief answered at {chief} within sweep.chief_wait_minutes={cfg.sweep.chief_wait_minutes:g} "
            f"({err.code().name}): start it (make sweep-chief) or give its sweep.chief=HOST:PORT"
        ) from None
    parent = find_sweep_run(client, context.experiment_id, cfg.sweep.name)
    if parent is None or parent.info.status != "RUNNING" or parent.data.tags.get("lenet_sweep.role") != "chief":
        raise UserError(
            f"the chief at {chief} answers, but MLflow ({redact(mlflow.get_tracking_uri())}, experiment "
            f"{cfg.mlflow.experiment!r}) has no running chief's sweep {cfg.sweep.name!r}: give the chief's "
            "mlflow.tracking_uri, mlflow.experiment and sweep.name"
        )
    theirs = Artifacts(client).json(parent.info.run_id, FINGERPRINT) or {}
    changed = [k for k in sorted(set(theirs) | set(fingerprint)) if theirs.get(k) != fingerprint.get(k)]
    if changed:
        shown = "; ".join(f"{k}: chief {theirs.get(k)!r}, this worker {fingerprint.get(k)!r}" for k in changed[:3])
        raise UserError(
            f"worker {worker} is refused: its config differs from the chief's ({shown}"
            f"{' ...' if len(changed) > 3 else ''}); start it with the chief's settings"
        )
    project = state_dir(cfg)
    if cfg.tuner.kind == "hyperband" and not (project / STATE_FILE).exists():
        raise UserError(
            f"tuner=hyperband: a worker continues trials from checkpoints other workers wrote, so it needs "
            f"the chief's sweep.dir, and {project} has none of the chief's state ({STATE_FILE}): mount the "
            "shared folder (NFS, gs://) and give its path as sweep.dir"
        )
    context.parent_run_id = parent.info.run_id
    for run in trial_runs(client, context.experiment_id, parent.info.run_id):
        if run.info.status == "RUNNING" and run.data.tags.get("lenet_sweep.worker") == worker:
            end_killed(client, run.info.run_id, f"cut off: worker {worker} restarted; the trial runs again")
    say(f"worker {worker}: joined sweep {cfg.sweep.name!r} (MLflow parent run {parent.info.run_id})")
    while True:
        try:
            tuner.search(verbose=0)
            break
        except grpc.RpcError as err:  # the chief went away mid-call (restarting): ask again
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                why = f"{err.code().name}: {err.details()}"
                raise UserError(f"the chief at {chief} stopped answering ({why})") from None
            say(f"worker {worker}: lost the chief at {chief} ({err.details()}); reconnecting")
            time.sleep(2)
    seconds = time.perf_counter() - context.started
    say(f"worker {worker}: the chief says the search is over ({tuner.trials_ended} trials ended here)")
    rows = summarise(client, context.experiment_id, parent.info.run_id, space, cfg.tuner.kind)
    return SweepResult(parent.info.run_id, rows, seconds, False)


def _log_sweep_inputs(cfg: DictConfig, space: Mapping[str, Any], project: Path) -> None:
    resolved = loggable_config(cfg)
    params = flatten({k: v for k, v in resolved.items() if k != "search"})
    params["sweep.state_dir"] = str(project.resolve())
    params["search.dimensions"] = ",".join(space)
    mlflow.log_params(params)
    mlflow.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
    mlflow.log_text(OmegaConf.to_yaml(resolved["search"]), "search_space.yaml")


def summarise(
    client: MlflowClient, experiment_id: str, parent_run_id: str, space: Mapping[str, Any], tuner_kind: str
) -> list[dict[str, Any]]:
    """One row per trial (its latest attempt) from what MLflow holds, best validation score first."""
    latest = latest_attempts(client, experiment_id, parent_run_id)
    names = [*space, *(["tuner/epochs"] if tuner_kind == "hyperband" else [])]
    rows = []
    for trial_id, run in latest.items():
        m, p = run.data.metrics, run.data.params
        row = {
            "trial": trial_id,
            "status": run.info.status,
            "val_accuracy": m.get("best_val_accuracy"),
            "val_loss": m.get("best_val_loss"),
            "best_epoch": m.get("best_epoch"),
            "epochs_run": m.get("epochs_run"),
            "last_epoch": m.get("last_epoch"),
            "trial_seconds": m.get("trial_seconds"),
            "tracking_seconds": m.get("tracking_seconds"),
            "output_activation": p.get("model.output_activation"),
            "run_id": run.info.run_id,
            "failure_reason": run.data.tags.get("failure_reason", ""),
            "pruned": next((v for k, v in sorted(run.data.tags.items()) if k.startswith("lenet_sweep.pruned")), ""),
            "pruned_seconds_saved": pruned_seconds_saved(run),
            "inherited_from": run.data.tags.get(warm_start.INHERITED_FROM, ""),  # a warm start's: not trained here
        }
        row |= {name: number(p.get(name)) for name in names}
        rows.append(row)
    ok = [r for r in rows if r["status"] == "FINISHED" and r["val_accuracy"] is not None]
    ok.sort(key=lambda r: -r["val_accuracy"])
    return ok + [r for r in rows if r not in ok]


def _log_summary(rows: list[dict[str, Any]], space: Mapping[str, Any], seconds: float) -> None:
    """The sweep's summary on its parent run: ranking, score per hyperparameter, relu vs softmax."""
    names = [n for n in rows[0] if n in space or n == "tuner/epochs"] if rows else []
    header = [
        "rank",
        "trial",
        "status",
        "val_accuracy",
        "val_loss",
        "best_epoch",
        "epochs_run",
        "last_epoch",
        "trial_seconds",
        *names,
        "run_id",
        "failure_reason",
        "pruned",
        "inherited_from",
    ]
    table = [[i + 1 if r["status"] == "FINISHED" else "", *[r.get(k) for k in header[1:]]] for i, r in enumerate(rows)]
    mlflow.log_text(csv_text(table, header), "sweep/ranking.csv")
    ok = [r for r in rows if r["status"] == "FINISHED"]
    tracking, trials = tracking_seconds(rows)
    if ok:
        log_figure(
            plots.score_by_value(ok, names, "val_accuracy", "validation accuracy per hyperparameter"),
            "sweep/val_accuracy_vs_hyperparameters.png",
        )
        groups: dict[str, list[float]] = {"relu": [], "softmax": []}
        for r in ok:
            groups.setdefault(str(r["output_activation"]), []).append(r["val_accuracy"])
        log_figure(
            plots.groups_side_by_side(groups, "val_accuracy", "output activation: relu vs softmax"),
            "sweep/relu_vs_softmax.png",
        )
    mlflow.log_metrics(
        {
            "trials": len(rows),
            "trials_finished": len(ok),
            "trials_failed": sum(r["status"] == "FAILED" for r in rows),
            "trials_pruned": sum(bool(r["pruned"]) for r in rows),
            "trials_inherited": sum(bool(r["inherited_from"]) for r in rows),
            # What this sweep's own trials saved and spent: an inherited trial's were its first sweep's.
            "pruned_seconds_saved": sum(r["pruned_seconds_saved"] for r in rows if not r["inherited_from"]),
            "best_val_accuracy": ok[0]["val_accuracy"] if ok else float("nan"),
            "sweep_seconds": seconds,
            "tracking_overhead": tracking / trials if trials else 0.0,
        }
    )


def pruned_seconds_saved(run) -> float:
    """What pruning saved a trial: the epochs it was given but did not train, at its own seconds per epoch
    (0 if it was not pruned)."""
    m, p = run.data.metrics, run.data.params
    if not any(k.startswith("lenet_sweep.pruned") for k in run.data.tags) or not m.get("epochs_run"):
        return 0.0
    planned = number(p.get("train.epochs"))
    left = (planned if isinstance(planned, (int, float)) else 0) - m.get("last_epoch", planned)
    return max(left, 0) * m.get("trial_seconds", 0.0) / m["epochs_run"]


def tracking_seconds(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(seconds spent logging to MLflow, wall seconds) summed over the trials trained here (not inherited)."""
    own = [r for r in rows if not r.get("inherited_from")]
    return (sum(r["tracking_seconds"] or 0 for r in own), sum(r["trial_seconds"] or 0 for r in own))


def format_top(rows: list[dict[str, Any]], space: Mapping[str, Any], n: int) -> str:
    """The top `n` finished trials as a text table."""
    ok = [r for r in rows if r["status"] == "FINISHED"][:n]
    lines = [f"{'rank':>4}  {'trial':>5}  {'val_acc':>7}  {'epochs':>6}  {'seconds':>7}  hyperparameters"]
    for i, r in enumerate(ok, start=1):
        values = {k: r[k] for k in [*space, "tuner/epochs"] if r.get(k) is not None}
        lines.append(
            f"{i:>4}  {r['trial']:>5}  {r['val_accuracy']:>7.4f}  {int(r['last_epoch'] or 0):>6}  "
            f"{r['trial_seconds'] or 0:>7.1f}  {describe(values)}{'  (inherited)' if r.get('inherited_from') else ''}"
        )
    return "\n".join(lines)


# ---- entry point -------------------------------------------------------------------------------


def compose_optimizers(cfg: DictConfig, overrides: list[str]) -> dict[str, DictConfig]:
    """The optimizer config of every conf/optimizer file the search space picks, with the user's
    overrides applied (Hydra composes them, so their schemas check them)."""
    names = {v for spec in typed_space(cfg).values() if spec.key == OPTIMIZER_GROUP for v in spec["values"] or []}
    shared = [o for o in overrides if not o.lstrip("+~").startswith("optimizer=")]
    optimizers = {}
    for name in sorted(names):
        try:
            optimizers[name] = hydra.compose(config_name="sweep", overrides=[*shared, f"optimizer={name}"]).optimizer
        except HydraException as err:
            raise UserError(
                f"optimizer={name} (from the search space) cannot take these overrides: {str(err).splitlines()[0]}"
            ) from None
    return optimizers


def run(cfg: DictConfig, overrides: list[str]) -> SweepResult:
    import tensorflow as tf

    # Each trial builds new models and so new tf.functions: TensorFlow's retracing warning is expected.
    tf.get_logger().setLevel("ERROR")
    result = run_sweep(cfg, compose_optimizers(cfg, overrides), print)
    if str(cfg.sweep.role) == "worker":  # the chief prints the sweep's ranking
        return result
    finished = [r for r in result.rows if r["status"] == "FINISHED"]
    print(
        f"sweep {cfg.sweep.name!r}: {len(result.rows)} trials ({len(finished)} finished) in "
        f"{clock(result.seconds)}; MLflow parent run {result.parent_run_id} "
        f"in {mlflow.get_tracking_uri()}"
    )
    if result.stopped_because:
        print(f"stopped early: {result.stopped_because}")
    for line in budget_lines(result.budget):
        print(line)
    inherited = [r for r in result.rows if r["inherited_from"]]
    if inherited:
        print(f"{len(inherited)} trials inherited from sweep {cfg.sweep.warm_start!r} (not retrained)")
    pruned = [r for r in result.rows if r["pruned"] and not r["inherited_from"]]
    if pruned:
        saved = sum(r["pruned_seconds_saved"] for r in pruned)
        print(
            f"{len(pruned)} trial(s) pruned (at chance or diverging, stopped at once): {clock(saved)} of "
            "training their epochs would have taken, spent on other trials"
        )
    tracking, trial_seconds = tracking_seconds(result.rows)
    if trial_seconds:
        print(
            f"MLflow logging took {tracking:.1f}s of {trial_seconds:.0f}s in trials "
            f"({100 * tracking / trial_seconds:.1f}%)"
        )
    print("top trials by validation accuracy (test split untouched):")
    print(format_top(result.rows, typed_space(cfg), cfg.sweep.top))
    return result


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="sweep")
def main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    guarded(lambda: exclusively(cfg.mlflow, lambda: run(cfg, overrides)))


if __name__ == "__main__":
    main()
