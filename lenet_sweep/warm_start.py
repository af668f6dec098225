"""Warm start: `python -m lenet_sweep.sweep sweep.name=wide sweep.warm_start=narrow ...` seeds the new sweep
with the recorded trials of an earlier sweep of the same MLflow experiment, so its tuner does not pay for them
again (a wider space, another tuner).

Which trials: only those this sweep would have trained exactly so (`select`).
- The trial's latest attempt FINISHED with a validation score. Pruned trials count, at the score they stood at
  (their run is FINISHED); failed, cut-off and running ones do not: the tuner may draw them again.
- It trained from scratch: a Hyperband round that went on from another trial's weights is not one training run.
- Every active dimension of the new space has a value inside the new space, read from the trial's recorded
  config at the dimension's key: a dimension the earlier sweep searched has its trial's value there, one it
  held fixed has the value it was fixed at (the optimizer dimension: the conf/optimizer file of that name).
- Its recorded config equals the config this sweep builds from those values (`sweep.trial_config`), key by
  key, but for where and how verbosely it ran (NOT_COMPARED): the same data, model, optimizer, epochs,
  schedule and seed. Under Hyperband, epochs are the tuner's budget: only trials of `tuner.max_epochs`
  epochs match.
- The two sweeps share what shapes a score outside a trial's config (SWEEP_SETTINGS: executions per trial,
  early stopping, pruning, from the parent runs' params) and their data check (data/summary.json: classes,
  names, files per split and class).

How they enter: as COMPLETED trials of KerasTuner's oracle, with their recorded scores
(`tuner.InheritingOracle`): random search and Hyperband never draw their values again, Bayesian optimisation
fits them, they rank among the best. `tuner.max_trials` counts trials trained here. Hyperband compares
trials within a bracket at equal epochs and promotes only trials of its own rounds, so an inherited trial
takes no place in its brackets (a printed line says so). In MLflow each becomes a child run of the new sweep
(`record`): tag lenet_sweep.kind=trial as a trained trial, lenet_sweep.inherited_from=<the run that trained
it>, the original's params (with the new space's dimensions), metric histories, config.yaml and history.csv,
status FINISHED; so `best` retrains it from its config and `report` marks it. Only a fresh sweep inherits:
`sweep.warm_start` belongs to the sweep's fingerprint, and a resumed sweep keeps what its oracle holds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from lenet_sweep.errors import UserError
from lenet_sweep.tracking.artifacts import Artifacts
from lenet_sweep.tracking.runs import CONFIG, TRAIN_GROUPS, flatten, loggable_config
from lenet_sweep.tracking.store import find_sweep_run, latest_attempts, open_store

if TYPE_CHECKING:  # KerasTuner imports TensorFlow: the report reads this module's tags without it
    import keras_tuner as kt

INHERITED_FROM = "lenet_sweep.inherited_from"  # tag of an inherited trial's run: the run that trained it
INHERITED_SWEEP = "lenet_sweep.inherited_sweep"  # ... and the sweep it was inherited from
# Config keys that say where a run logged, where its data was cached, or how verbosely it trained: not what
# it learned. Every other key of a trial's config must match.
NOT_COMPARED = (
    "mlflow.",
    "data.cache_dir",
    "data.decode_cache",
    "data.decode_threads",
    "train.keras_verbose",
    "train.resume",
    "train.backup_dir",
)
# What shapes a trial's score but lives in the sweep's config, not the trial's: compared on the parent runs.
SWEEP_SETTINGS = ("tuner.executions_per_trial", "sweep.early_stopping_patience", "sweep.prune.enabled")
PRUNE_SETTINGS = ("sweep.prune.after_epochs", "sweep.prune.chance_margin", "sweep.prune.diverged_loss")
DATA_SUMMARY = "data/summary.json"  # the data check every sweep logs on its parent run
_OUT = object()


@dataclass
class Inherited:
    """An earlier sweep's trial this sweep takes over: its run, its value of every active dimension of the
    new space, its score."""

    run: Any
    values: dict[str, Any]
    score: float
    config: dict[str, Any]  # its recorded training config (written when the run has no config.yaml)

    @property
    def original(self) -> str:
        """The run that trained it (an inherited trial passed on again still points at the training)."""
        return self.run.data.tags.get(INHERITED_FROM, self.run.info.run_id)


@dataclass
class WarmStart:
    """What `select` found in the earlier sweep."""

    sweep: str
    parent_run_id: str
    considered: int  # the earlier sweep's trials (latest attempts)
    trials: list[Inherited] = field(default_factory=list)
    left_out: dict[str, list[str]] = field(default_factory=dict)  # why -> one line per trial left out

    def leave_out(self, why: str, detail: str) -> None:
        self.left_out.setdefault(why, []).append(detail)


def earlier_sweep(mlflow_cfg: Any, name: str, this_sweep: str):
    """The parent run of sweep `name` in the configured experiment, or a UserError listing its sweeps."""
    if name == this_sweep:
        raise UserError(
            f"sweep.warm_start={name!r} names this sweep: give an earlier sweep's sweep.name (a resumed sweep "
            "keeps its own trials without it)"
        )
    experiment_id = open_store(mlflow_cfg, create=False)
    client = MlflowClient()
    parent = find_sweep_run(client, experiment_id, name)
    if parent is None:
        runs = client.search_runs([experiment_id], "tags.`lenet_sweep.kind` = 'sweep'", max_results=500)
        known = sorted({r.data.tags.get("lenet_sweep.sweep", "?") for r in runs})
        raise UserError(
            f"sweep.warm_start={name!r}: no sweep of that name in MLflow experiment {mlflow_cfg.experiment!r} "
            f"(sweeps there: {', '.join(known) or 'none'}); give one of them, or sweep.warm_start=null"
        )
    return parent


def select(
    client: MlflowClient,
    experiment_id: str,
    earlier,
    cfg: DictConfig,
    space: Mapping[str, Any],
    hps: kt.HyperParameters,
    config_of: Callable[[kt.HyperParameters], DictConfig],
    optimizers: Mapping[str, DictConfig],
    data_now: Optional[dict],
) -> WarmStart:
    """The trials of sweep `earlier` (its parent run) that the sweep `cfg` would train exactly as they were
    trained (see the module's docstring), and why each other one is left out.

    `hps` is the new oracle's search space, `config_of` the new sweep's trial config of a set of values,
    `data_now` the new sweep's data/summary.json.
    """
    art = Artifacts(client)
    latest = latest_attempts(client, experiment_id, earlier.info.run_id)
    found = WarmStart(earlier.data.tags.get("lenet_sweep.sweep", "?"), earlier.info.run_id, len(latest))
    differ = sweep_differences(earlier.data.params, cfg)
    data_then = art.json(earlier.info.run_id, DATA_SUMMARY)
    if data_then is None or data_then != data_now:
        differ.append(f"its data check ({DATA_SUMMARY}: classes, files per split) differs or is not recorded")
    if differ:
        for trial_id in latest:
            found.leave_out("the sweeps differ in " + "; ".join(differ), trial_id)
        return found
    hyperband_epochs = int(cfg.tuner.max_epochs) if cfg.tuner.kind == "hyperband" else None
    seen: set[str] = set()
    for trial_id, run in latest.items():
        score = run.data.metrics.get("best_val_accuracy", float("nan"))
        if run.info.status != "FINISHED":
            found.leave_out("did not finish (trained again if drawn)", f"trial {trial_id}: {run.info.status}")
            continue
        if not score == score:  # NaN: no epoch had a validation score
            found.leave_out("no validation score", f"trial {trial_id}")
            continue
        if run.data.params.get("tuner/trial_id") not in (None, "None"):
            found.leave_out(
                "went on from another trial's weights (a Hyperband round)",
                f"trial {trial_id} from trial {run.data.params['tuner/trial_id']}",
            )
            continue
        try:
            recorded = OmegaConf.to_container(art.train_config(run), resolve=True, enum_to_str=True)
        except UserError as err:
            found.leave_out("its config cannot be read back", f"trial {trial_id}: {err}")
            continue
        values, outside = space_values(hps, space, recorded, run.data.params, optimizers)
        if outside:
            found.leave_out("a value outside this search space", f"trial {trial_id}: {outside}")
            continue
        hp = hps.copy()
        hp.values = dict(values) | ({"tuner/epochs": hyperband_epochs} if hyperband_epochs else {})
        changed = config_differences(recorded, loggable_config(config_of(hp), TRAIN_GROUPS))
        if changed:
            found.leave_out(
                "trained with other settings than this sweep's",
                f"trial {trial_id}: {'; '.join(changed[:2])}{' ...' if len(changed) > 2 else ''}",
            )
            continue
        key = repr(sorted(values.items()))
        if key in seen:
            found.leave_out("the same configuration as a trial already inherited", f"trial {trial_id}")
            continue
        seen.add(key)
        found.trials.append(Inherited(run, values, float(score), recorded))
    return found


def sweep_differences(params: Mapping[str, str], cfg: DictConfig) -> list[str]:
    """The settings in SWEEP_SETTINGS (and pruning's, where either sweep prunes) that an earlier sweep's parent
    run (`params`) recorded otherwise than `cfg` has them, as 'key: then -> now'."""
    keys = list(SWEEP_SETTINGS)
    if cfg.sweep.prune.enabled or params.get("sweep.prune.enabled") != "False":
        keys += PRUNE_SETTINGS
    # MLflow holds params as str(value): compared as such.
    now = {k: str(OmegaConf.select(cfg, k)) for k in keys}
    return [f"{k}: {params.get(k, 'unrecorded')} -> {now[k]}" for k in keys if params.get(k) != now[k]]


def space_values(
    hps: kt.HyperParameters,
    space: Mapping[str, Any],
    recorded: Mapping[str, Any],
    params: Mapping[str, str],
    optimizers: Mapping[str, DictConfig],
) -> tuple[dict[str, Any], str]:
    """(the value of every dimension of `hps` that is active, read from the recorded config, '') or ({}, the
    first 'name=value' outside the space). KerasTuner's own conditions say which dimensions are active."""
    hp = hps.copy()
    hp.values = {}
    for dimension in hp.space:
        if not hp.is_active(dimension):
            continue
        name = dimension.name
        value = lookup(recorded, space[name].key)
        if isinstance(value, Mapping):  # a dimension that picks a config file (optimizer=adam)
            value = _group_file(value, params.get(name), optimizers)
        inside = in_space(dimension, value)
        if inside is _OUT:
            return {}, f"{name}={value!r}"
        hp.values[name] = inside
    return dict(hp.values), ""


def lookup(tree: Any, key: str) -> Any:
    """The value at dotted `key` of a plain config tree (`model.filters.0` indexes a list); None if absent."""
    for part in key.split("."):
        if isinstance(tree, Mapping) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return None
    return tree


def _group_file(group: Mapping[str, Any], param: Optional[str], files: Mapping[str, DictConfig]) -> Optional[str]:
    """Which conf/optimizer file a recorded optimizer config came from: the trial's own param if it names one,
    else the file of the same optimizer class (its other values are compared with the whole config)."""
    if param in files:
        return param
    return next((name for name, c in files.items() if c.get("name") == group.get("name")), None)


def in_space(dimension: Any, value: Any) -> Any:
    """`value` as KerasTuner holds it for `dimension` (the same type, so trial hashes match) if the dimension
    can take it, else _OUT."""
    from keras_tuner.src.engine.hyperparameters import hp_types

    if value is None:
        return _OUT
    if isinstance(dimension, hp_types.Boolean):
        return value if isinstance(value, bool) else _OUT
    if isinstance(dimension, hp_types.Choice):
        same = [v for v in dimension.values if v == value and isinstance(v, bool) == isinstance(value, bool)]
        return same[0] if same else _OUT
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _OUT
    low, high, step = dimension.min_value, dimension.max_value, dimension.step
    if not low <= value <= high:
        return _OUT
    if isinstance(dimension, hp_types.Int) and not float(value).is_integer():
        return _OUT
    if step:  # on the dimension's grid (to rounding), as KerasTuner's _get_value_by_index lays it out
        if dimension.sampling == "log":
            steps = math.log(value / low, step)
        elif dimension.sampling == "reverse_log":
            steps = math.log((high + low - value) / low, step)
        else:
            steps = (value - low) / step
        if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
            return _OUT
    return int(value) if isinstance(dimension, hp_types.Int) else float(value)


def config_differences(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Keys (but NOT_COMPARED ones) where a recorded trial config and the config this sweep builds differ, as
    'key: then -> now'."""
    then, here = (
        {k: v for k, v in flatten(json.loads(json.dumps(c))).items() if not k.startswith(NOT_COMPARED)}
        for c in (recorded, now)
    )
    missing = "unrecorded"
    return [
        f"{k}: {then.get(k, missing)!r} -> {here.get(k, missing)!r}"
        for k in sorted(set(then) | set(here))
        if then.get(k, missing) != here.get(k, missing)
    ]


def record(
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    sweep_name: str,
    found: WarmStart,
    trial_ids: list[str],
) -> list[str]:
    """Each inherited trial as a FINISHED child run of the new sweep's parent, its trial id from `trial_ids`;
    return the new run ids. Nothing is trained: params, metric histories, config.yaml and history.csv are the
    original's, the new space's values among the params."""
    art = Artifacts(client)
    run_ids = []
    for trial_id, trial in zip(trial_ids, found.trials):
        old = trial.run
        kept = {k: v for k, v in old.data.tags.items() if k == "model" or k.startswith("lenet_sweep.pruned")}
        tags = kept | {
            "mlflow.parentRunId": parent_run_id,
            "lenet_sweep.kind": "trial",
            "lenet_sweep.sweep": sweep_name,
            "lenet_sweep.trial_id": trial_id,
            "lenet_sweep.attempt": "1",
            INHERITED_FROM: trial.original,
            INHERITED_SWEEP: found.sweep,
        }
        run_id = client.create_run(experiment_id, tags=tags, run_name=f"trial-{trial_id}").info.run_id
        try:  # a run left half-filled would be read as a trial: it ends FAILED instead
            params = dict(old.data.params) | {name: str(value) for name, value in trial.values.items()}
            items = [Param(k, v) for k, v in params.items()]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run_id, params=items[start : start + 100])
            metrics = [m for key in old.data.metrics for m in client.get_metric_history(old.info.run_id, key)]
            for start in range(0, len(metrics), 1000):  # ... and 1000 metrics
                client.log_batch(run_id, metrics=metrics[start : start + 1000])
            config = art.text(old.info.run_id, CONFIG) or OmegaConf.to_yaml(trial.config)
            client.log_text(run_id, config, CONFIG)
            history = art.text(old.info.run_id, "history.csv")
            if history:
                client.log_text(run_id, history, "history.csv")
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        run_ids.append(run_id)
    return run_ids


def summary_lines(found: WarmStart, tuner_kind: str, max_epochs: Optional[int]) -> list[str]:
    """What the warm start took and left, in words."""
    n = len(found.trials)
    lines = [
        f"warm start from sweep {found.sweep!r} (MLflow run {found.parent_run_id}): {n} of its {found.considered} "
        + ("trials inherited, not trained again" if n else "trials fit this sweep: it starts cold")
    ]
    for why, details in found.left_out.items():
        lines.append(
            f"  left out, {why}: {len(details)} ({', '.join(details[:3])}{' ...' if len(details) > 3 else ''})"
        )
    if n and tuner_kind == "hyperband":
        lines.append(
            f"tuner=hyperband: the {n} inherited trials (each trained tuner.max_epochs={max_epochs} epochs from "
            "scratch) are never drawn again and rank among the best, but take no place in Hyperband's brackets "
            "(it promotes only trials of its own rounds, compared at equal epochs)"
        )
    return lines
