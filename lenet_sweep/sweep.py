"""The sweep: KerasTuner searches `conf/search/<name>.yaml`; every trial is an MLflow run nested under
one parent run per sweep. `python -m lenet_sweep.sweep data.root=DIR` (`make sweep`).

Reading order: search space -> trial config -> state folder -> the sweep -> summary. The KerasTuner hooks
(the hypermodel, the tracked tuners) are in tuner.py; each trial trains through trial.fit.
Trials are chosen and ranked on the validation split only; the test split is never decoded here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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

from lenet_sweep import plots
from lenet_sweep.cli import clock, guarded
from lenet_sweep.config import HyperParameterSpec, check, register_configs
from lenet_sweep.config import one_line as config_error
from lenet_sweep.data import DataBySize
from lenet_sweep.errors import UserError
from lenet_sweep.tracking.runs import (
    csv_text,
    end_killed,
    flatten,
    log_data_check,
    log_figure,
    loggable_config,
    tracked_run,
)
from lenet_sweep.tracking.store import find_sweep_run, latest_attempts, number, open_store
from lenet_sweep.tuner import (
    SweepContext,
    TrialModel,
    describe,
    make_tuner,
    mark_cut_off_trials,
    one_line,
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
    )


# ---- state folder ------------------------------------------------------------------------------

STATE_FILE = "lenet_sweep.json"


def state_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What a resumed sweep must share with the one it continues (not where it logs or how it prints)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in resolved["data"].items() if k not in ("decode_cache", "decode_threads")}
    train = {k: v for k, v in resolved["train"].items() if k != "keras_verbose"}
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
            "sweep": {"early_stopping_patience": cfg.sweep.early_stopping_patience},
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


# ---- the sweep ---------------------------------------------------------------------------------


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list[dict[str, Any]]  # one per trial (latest attempt), best first
    seconds: float
    resumed: bool
    stopped_because: str = ""  # why the sweep stopped before its tuner was done ("" if it was)


def run_sweep(
    cfg: DictConfig, optimizers: Mapping[str, DictConfig], print_fn: Optional[Progress] = None
) -> SweepResult:
    """Run (or resume) the sweep `cfg` describes and log it to MLflow; return its ranking."""
    import tensorflow as tf

    check(cfg)  # the schema's ranges; tuner.seed >= 1 because KerasTuner reads 0 as "unseeded"
    space = active_space(cfg, optimizers)
    project, resumed = check_state(cfg)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    data = DataBySize(cfg.data, cfg.seed, print_fn)
    first = data.at(cfg.model.input_size)  # fails on bad data before anything is recorded
    experiment = open_store(cfg.mlflow)
    client = MlflowClient(mlflow.get_tracking_uri())
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
    started = time.perf_counter()
    context = SweepContext(
        experiment,
        "",
        cfg.sweep.name,
        print_fn,
        started,
        cfg.sweep.time_limit_minutes,
        cfg.tuner.max_consecutive_failed_trials,
    )
    hypermodel = trial_model(cfg, space, optimizers, data, len(first.splits.classes))
    try:  # KerasTuner checks the space as it builds the first model; with overwrite it clears the state
        tuner = make_tuner(cfg.tuner, hypermodel, context, str(project.parent), cfg.sweep.name, cfg.sweep.overwrite)
    except (ValueError, TypeError) as err:
        raise UserError(f"KerasTuner refuses search={cfg.search.name}: {one_line(str(err))}") from None
    with tracked_run(
        experiment_id=experiment,
        run_id=previous.info.run_id if previous else None,
        run_name=None if previous else f"sweep-{cfg.sweep.name}",
        tags={
            "lenet_sweep.kind": "sweep",
            "lenet_sweep.sweep": cfg.sweep.name,
            "tuner": cfg.tuner.kind,
            "search": cfg.search.name,
        },
    ) as parent:
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
            "best_val_accuracy": ok[0]["val_accuracy"] if ok else float("nan"),
            "sweep_seconds": seconds,
            "tracking_overhead": tracking / trials if trials else 0.0,
        }
    )


def tracking_seconds(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(seconds spent logging to MLflow, wall seconds) summed over the trials."""
    return (sum(r["tracking_seconds"] or 0 for r in rows), sum(r["trial_seconds"] or 0 for r in rows))


def format_top(rows: list[dict[str, Any]], space: Mapping[str, Any], n: int) -> str:
    """The top `n` finished trials as a text table."""
    ok = [r for r in rows if r["status"] == "FINISHED"][:n]
    lines = [f"{'rank':>4}  {'trial':>5}  {'val_acc':>7}  {'epochs':>6}  {'seconds':>7}  hyperparameters"]
    for i, r in enumerate(ok, start=1):
        values = {k: r[k] for k in [*space, "tuner/epochs"] if r.get(k) is not None}
        lines.append(
            f"{i:>4}  {r['trial']:>5}  {r['val_accuracy']:>7.4f}  {int(r['last_epoch'] or 0):>6}  "
            f"{r['trial_seconds'] or 0:>7.1f}  {describe(values)}"
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
    finished = [r for r in result.rows if r["status"] == "FINISHED"]
    print(
        f"sweep {cfg.sweep.name!r}: {len(result.rows)} trials ({len(finished)} finished) in "
        f"{clock(result.seconds)}; MLflow parent run {result.parent_run_id} "
        f"in {mlflow.get_tracking_uri()}"
    )
    if result.stopped_because:
        print(f"stopped early: {result.stopped_because}")
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
    guarded(lambda: run(cfg, list(HydraConfig.get().overrides.task)))


if __name__ == "__main__":
    main()
