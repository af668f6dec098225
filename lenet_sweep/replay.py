"""A recorded training trained again and compared with what it recorded, epoch by epoch:
`python -m lenet_sweep.replay sweep.name=NAME trial=ID mlflow.tracking_uri=URI mlflow.experiment=NAME` (a sweep
trial) or `python -m lenet_sweep.replay run=RUN_ID mlflow.tracking_uri=URI mlflow.experiment=NAME` (a `best`
retraining or refit, or a trial by its run id).

Reading order: what was recorded and how it trained (`Recorded`: `trial_chain`, `retraining`) -> the
environment it trained in against this one (`differences`) -> training again through `train.train_and_log`,
the one path -> every per-epoch metric compared (`compare`) -> the entry point.

A trial trains again as its sweep trained it (tuner.py): its recorded config, seed `seed + trial number` (the
first execution's), the sweep's early-stopping patience and pruning, the cosine schedule over its own epochs,
the Keras session cleared first. A Hyperband trial that went on from an earlier round's trial
(`tuner/trial_id`) started from that trial's best-epoch weights (KerasTuner's checkpoint) with a fresh
optimizer at epoch `tuner/initial_epoch`: its chain is replayed, first round first, each link from its
replayed predecessor's best-epoch weights. A warm-started sweep's inherited trial is replayed as the run that
trained it. A `best` retraining trains again as `best` trained it: its recorded config and seed, the patience
its `best` run recorded (none for a refit), its best validation-accuracy epoch kept.

The replay is a new top-level MLflow run linked by tags (lenet_sweep.kind=replay, lenet_sweep.replay_of=<run
id>): not a child of the sweep or `best` run, whose children the sweep, `best` and the report read as trials
and retrainings.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import hydra
import keras
import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from lenet_sweep import cli
from lenet_sweep.config import check, register_configs
from lenet_sweep.data import PreparedData, prepare_data
from lenet_sweep.errors import UserError
from lenet_sweep.sweep import prune_rule
from lenet_sweep.tracking import store
from lenet_sweep.tracking.artifacts import HISTORY_KEYS, Artifacts
from lenet_sweep.tracking.runs import MANIFEST_COLUMNS, flatten, package_versions, split_manifest
from lenet_sweep.train import train_and_log
from lenet_sweep.trial import PruneRule
from lenet_sweep.warm_start import INHERITED_FROM

Progress = Callable[[str], None]
PACKAGES = "table_i_packages.json"  # package versions and device, as every run's data check logs them
MANIFEST = "data/split_manifest.csv"  # every listed file, its split and class, and whether it was decoded
ONEDNN = "env.TF_ENABLE_ONEDNN_OPTS"  # the param a `train_and_log` run records: it changes float round-off
SHOWN = 3  # examples shown of a difference in a long list (trial ids, files)


# ---- what was recorded ---------------------------------------------------------------------------


@dataclass
class Recorded:
    """One recorded training and how it was trained: what training it again needs."""

    run: Any  # its MLflow run
    kind: str  # trial | retrain | refit
    what: str  # in words, e.g. "trial 03 of sweep 'ui'"
    config: DictConfig  # its training config, typed by the schema
    seed: int  # the seed it trained with (weights, shuffling, dropout)
    split_seed: int  # the seed its train/val/test split was drawn with
    environment_run: str  # the run holding the package versions and split manifest it trained with
    patience: Optional[int] = None  # early stopping on validation loss (None: none)
    prune: Optional[PruneRule] = None  # the sweep's pruning (None: none)
    keep_best: bool = False  # its best validation-accuracy epoch's weights restored at the end
    initial_epoch: int = 0  # a Hyperband continuation's first epoch (0-based)
    threads: Optional[int] = None  # the sweep's sweep.threads (None: TensorFlow's default)
    notes: list[str] = field(default_factory=list)  # what the replay leaves out, in words

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


def _value(text: Any) -> Any:
    """A recorded setting (a param's text or a YAML value) with "None" read as None."""
    return None if text in (None, "None", "null") else store.number(text) if isinstance(text, str) else text


def _get_run(client: MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(
            f"no MLflow run {run_id!r} in {store.redact(mlflow.get_tracking_uri())}: give run=RUN_ID of a `best` "
            "retraining or refit (the child runs of a `best` run in the MLflow UI), or trial=ID with sweep.name=NAME"
        ) from None


def find_recorded(client: MlflowClient, experiment_id: str, cfg: DictConfig, say: Progress) -> list[Recorded]:
    """The training `cfg.trial` (of sweep `cfg.sweep.name`) or `cfg.run` names, as the trainings to replay in
    order: itself, after the earlier Hyperband rounds it went on from."""
    if (cfg.trial is None) == (cfg.run is None):
        raise UserError(
            "give trial=ID (a trial of sweep.name=NAME) or run=RUN_ID (a `best` retraining or refit), one of them"
        )
    if cfg.trial is not None:
        parent = store.find_sweep(client, experiment_id, cfg.sweep.name, cfg.mlflow.experiment)
        run = trial_run(client, experiment_id, parent, str(cfg.trial))
    else:
        run = _get_run(client, str(cfg.run))
        if run.info.experiment_id != experiment_id:
            where = client.get_experiment(run.info.experiment_id).name
            raise UserError(
                f"run {cfg.run} is in MLflow experiment {where!r}, not mlflow.experiment={cfg.mlflow.experiment!r}: "
                f"give mlflow.experiment={where}"
            )
        parent = None
    original = run.data.tags.get(INHERITED_FROM)
    if original:  # a warm-started sweep's copy of another sweep's trial: that training is the one to replay
        trial_id = run.data.tags.get("lenet_sweep.trial_id", "?")
        run = _get_run(client, original)
        parent = None
        say(f"trial {trial_id} was inherited (sweep.warm_start) from MLflow run {original}: replaying that training")
    kind = run.data.tags.get("lenet_sweep.kind")
    if kind == "trial":
        if parent is None:
            parent = _get_run(client, run.data.tags.get("mlflow.parentRunId", ""))
        return trial_chain(client, parent, run)
    if kind in ("retrain", "refit"):
        return [retraining(client, run)]
    raise UserError(
        f"run {run.info.run_id} is {f'a {kind!r} run' if kind else 'not a lenet_sweep training'}: replay trains "
        "again a sweep's trials (trial=ID with sweep.name=NAME) and `best`'s retrainings and refits (run=RUN_ID)"
    )


def trial_run(client: MlflowClient, experiment_id: str, parent, trial_id: str):
    """Trial `trial_id`'s latest attempt in sweep `parent` ("12" finds "0012" too), or a UserError saying
    which trials there are and where their ids are shown."""
    latest = store.latest_attempts(client, experiment_id, parent.info.run_id)
    trials = {k: r for k, r in latest.items() if r.data.tags.get("lenet_sweep.kind") == "trial"}
    found = trials.get(trial_id)
    if found is None and trial_id.isdigit():
        found = next((r for k, r in trials.items() if k.isdigit() and int(k) == int(trial_id)), None)
    if found is None:
        ids = sorted(trials)
        known = ", ".join(ids[:20]) + (f" ... ({len(ids)} in all)" if len(ids) > 20 else "") if ids else "none"
        raise UserError(
            f"sweep {parent.data.tags.get('lenet_sweep.sweep')!r} (MLflow run {parent.info.run_id}) has no trial "
            f"{trial_id!r} (its trials: {known}): a trial id is KerasTuner's, as the sweep's progress lines "
            "('trial 3/30 [02] ...'), its ranking (sweep/ranking.csv of the sweep's run) and its trial runs' names "
            "(trial-ID in the MLflow UI) show it"
        )
    return found


def _sweep_settings(art: Artifacts, parent) -> dict[str, Any]:
    """The sweep's own settings (sweep.*, tuner.*) flattened: from its config.yaml, else its params."""
    logged = art.yaml(parent.info.run_id, "config.yaml") or {}
    flat = flatten({k: logged[k] for k in ("sweep", "tuner") if isinstance(logged.get(k), dict)}) if logged else {}
    if not flat:
        flat = {k: v for k, v in parent.data.params.items() if k.split(".")[0] in ("sweep", "tuner")}
    return {k: _value(v) for k, v in flat.items()}


def _continues(run) -> Optional[str]:
    """The trial id whose weights Hyperband trial `run` went on from (None: a first-round or other trial)."""
    previous = run.data.params.get("tuner/trial_id")
    return None if previous in (None, "", "None") else previous


def trial_chain(client: MlflowClient, parent, run) -> list[Recorded]:
    """Trial `run` of sweep `parent` and, first, the earlier Hyperband rounds' trials it went on from."""
    art = Artifacts(client)
    settings = _sweep_settings(art, parent)
    executions = int(settings.get("tuner.executions_per_trial") or 1)
    latest = store.latest_attempts(client, run.info.experiment_id, parent.info.run_id)
    name = run.data.tags.get("lenet_sweep.trial_id")
    chain = [run]
    while (previous := _continues(chain[0])) is not None:
        if previous not in latest or len(chain) > len(latest):
            raise UserError(
                f"trial {name} went on from trial {previous}'s weights, of which sweep "
                f"{parent.data.tags.get('lenet_sweep.sweep')!r} holds no record: its chain cannot be replayed"
            )
        chain.insert(0, latest[previous])
        if executions > 1:
            while (earlier := _continues(chain[0])) is not None and earlier in latest and len(chain) <= len(latest):
                chain.insert(0, latest[earlier])
            first = chain[0].data.tags.get("lenet_sweep.trial_id")
            raise UserError(
                f"trial {name} went on from trial {previous}'s checkpoint, which KerasTuner kept from the best of its "
                f"tuner.executions_per_trial={executions} executions without recording which: its chain cannot be "
                f"replayed; replay its first-round trial instead: trial={first}"
            )
    return [_trial(art, parent, r, settings, executions) for r in chain]


def _trial(art: Artifacts, parent, run, settings: Mapping[str, Any], executions: int) -> Recorded:
    """How the sweep trained trial `run` (tuner.py: TrialModel, TrialTracking._build_and_fit_model)."""
    trial_id = run.data.tags.get("lenet_sweep.trial_id", "")
    if not trial_id.isdigit():
        raise UserError(f"run {run.info.run_id} records no trial number (tag lenet_sweep.trial_id): not a sweep trial")
    config = art.train_config(run)
    prune = {k[len("sweep.prune.") :]: v for k, v in settings.items() if k.startswith("sweep.prune.")}
    notes = []
    if executions > 1:
        notes.append(
            f"the sweep ran tuner.executions_per_trial={executions}: the first execution is replayed and compared "
            "(the others' metrics, execution1.* ..., are not)"
        )
    return Recorded(
        run,
        "trial",
        f"trial {trial_id} of sweep {parent.data.tags.get('lenet_sweep.sweep')!r}",
        config,
        # as TrialTracking._build_and_fit_model seeds the first execution
        seed=int(config.seed) + int(trial_id),
        split_seed=int(config.seed if config.data.split_seed is None else config.data.split_seed),
        environment_run=parent.info.run_id,  # a sweep's data check and packages are on its parent run
        patience=settings.get("sweep.early_stopping_patience"),
        # a sweep recorded before pruning existed has no prune settings, and pruned nothing
        prune=prune_rule(OmegaConf.create(prune)) if prune else None,
        initial_epoch=int(_value(run.data.params.get("tuner/initial_epoch")) or 0),
        threads=settings.get("sweep.threads"),
        notes=notes,
    )


def retraining(client: MlflowClient, run) -> Recorded:
    """How `best` trained retraining or refit `run` (best.py: retrain)."""
    kind = run.data.tags["lenet_sweep.kind"]
    config = Artifacts(client).train_config(run)
    best_id = run.data.tags.get("mlflow.parentRunId")
    patience = None
    if kind == "retrain":  # a refit never stops early
        params = _get_run(client, best_id).data.params if best_id else {}
        if "best.early_stopping_patience" in params:
            patience = _value(params["best.early_stopping_patience"])
        elif _value(params.get("best.race_epochs")) is None and params.get("sweep.run_id"):
            # `best` before it recorded its patience: the sweep's, unless racing trained fixed epochs
            patience = _value(_get_run(client, params["sweep.run_id"]).data.params.get("sweep.early_stopping_patience"))
    trial_id = run.data.tags.get("lenet_sweep.trial_id", "?")
    what = "retraining" if kind == "retrain" else "refit"
    return Recorded(
        run,
        kind,
        f"the {what} of trial {trial_id} with seed {config.seed} (`best` run {best_id})",
        config,
        seed=int(config.seed),
        split_seed=int(config.seed if config.data.split_seed is None else config.data.split_seed),
        environment_run=run.info.run_id,
        patience=patience,
        keep_best=True,
    )


def epoch_metrics(client: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    """A run's per-epoch metrics, {metric: {epoch: value}} (steps are 1-based epochs): those of its first
    execution, timings (…seconds) left out."""
    metrics: dict[str, dict[int, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        if key.startswith("execution") or key.endswith("seconds"):
            continue
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        by_epoch = {int(m.step): float(m.value) for m in points if m.step >= 1}
        if by_epoch:
            metrics[key] = by_epoch
    return metrics


# ---- the environment -----------------------------------------------------------------------------


def differences(
    recorded_packages: Optional[Mapping[str, str]],
    packages: Mapping[str, str],
    recorded_manifest: Sequence[Sequence[str]],
    manifest: Sequence[Sequence[str]],
) -> list[str]:
    """How this environment differs from the recorded one, one line each ([] if it does not): package
    versions and device (Table I), and the data (split manifest rows: split, class, file, decoded)."""
    out = []
    if not recorded_packages:
        out.append(f"packages: the run recorded none ({PACKAGES})")
    else:
        for name in sorted(set(recorded_packages) | set(packages)):
            was, now = recorded_packages.get(name), packages.get(name)
            if was != now:
                out.append(f"{name}: recorded {was or 'none'}, here {now or 'none'}")
    if not recorded_manifest:
        out.append(f"data: the run recorded no split manifest ({MANIFEST})")
        return out
    was, now = {tuple(r) for r in recorded_manifest}, {tuple(r) for r in manifest}
    gone, new = sorted(was - now), sorted(now - was)
    if gone or new:

        def shown(rows: list[tuple]) -> str:
            text = ", ".join(f"{r[0]}: {r[2]}{'' if r[3] == 'yes' else ' (not decoded)'}" for r in rows[:SHOWN])
            return f" ({text}{', ...' if len(rows) > SHOWN else ''})" if rows else ""

        out.append(
            f"data: {len(gone)} of the {len(was)} files the run's split manifest lists are missing or changed "
            f"here{shown(gone)}, {len(new)} here are new or changed{shown(new)}"
        )
    return out


def _threads(threads: Optional[int]) -> str:
    """Set TensorFlow's threads per op as the sweep did (sweep.threads); why not, if this process cannot ('')."""
    if not threads:
        return ""
    import tensorflow as tf

    if tf.config.threading.get_intra_op_parallelism_threads() == threads:
        return ""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow has run ops in this process already (a caller's, not the command's)
        return f"the sweep trained with sweep.threads={threads}, which this process can no longer set"
    return ""


# ---- training again ------------------------------------------------------------------------------


class StartFrom(keras.callbacks.Callback):
    """Sets the model's weights as training begins: a Hyperband continuation starts from its predecessor's
    best-epoch weights with a fresh optimizer, as KerasTuner loads that trial's checkpoint (weights only:
    the optimizer's state it holds is skipped) into the newly built model."""

    def __init__(self, weights: list):
        super().__init__()
        self.weights = weights

    def on_train_begin(self, logs=None):
        self.model.set_weights(self.weights)


def _data_key(config: DictConfig) -> str:
    """What a training's decoded data depends on: its data config and input size."""
    return OmegaConf.to_yaml(config.data) + f"input_size: {config.model.input_size}"


def replay_config(recorded: Recorded, cfg: DictConfig, seed: int) -> DictConfig:
    """The recorded config as the replay trains it: with `seed`, on the recorded split (and `cfg.data.root`
    if given), logged where `cfg` logs."""
    config = copy.deepcopy(recorded.config)
    config.seed = seed
    config.data.split_seed = recorded.split_seed
    if cfg.data.root:
        config.data.root = cfg.data.root
    config.train.resume = False
    for key in ("tracking_uri", "store_dir", "experiment", "run_name"):
        config.mlflow[key] = cfg.mlflow[key]
    return config


@dataclass
class Comparison:
    """A replayed training's per-epoch metrics against the recorded ones."""

    largest: dict[str, float]  # per metric, the largest |recorded - replayed| (inf: an epoch or value one lacks)
    first: Optional[tuple[int, str, Optional[float], Optional[float]]]  # the first (epoch, metric, recorded,
    # replayed) over the tolerance, in epoch order; None: all within it
    recorded_epochs: int
    replayed_epochs: int


def difference(recorded: Optional[float], replayed: Optional[float]) -> float:
    """|recorded - replayed|; 0 for two NaNs (the same divergence), inf when only one is a number."""
    if recorded is None or replayed is None:
        return math.inf
    if math.isnan(recorded) or math.isnan(replayed):
        return 0.0 if math.isnan(recorded) and math.isnan(replayed) else math.inf
    return abs(recorded - replayed)


def compare(
    recorded: Mapping[str, Mapping[int, float]], replayed: Mapping[str, Mapping[int, float]], tolerance: float
) -> Comparison:
    """Every recorded per-epoch metric against the replayed one, epoch by epoch (an epoch only one of them
    trained differs by inf)."""
    metrics = [k for k in HISTORY_KEYS if k in recorded] + sorted(k for k in recorded if k not in HISTORY_KEYS)
    epochs = sorted({e for m in metrics for e in recorded[m]} | {e for m in metrics for e in replayed.get(m, {})})
    largest = dict.fromkeys(metrics, 0.0)
    first = None
    for epoch in epochs:
        for metric in metrics:
            was, now = recorded[metric].get(epoch), replayed.get(metric, {}).get(epoch)
            gap = difference(was, now)
            largest[metric] = max(largest[metric], gap)
            if first is None and gap > tolerance:
                first = (epoch, metric, was, now)

    def count(history: Mapping[str, Mapping[int, float]]) -> int:
        return len({e for m in metrics for e in history.get(m, {})})

    return Comparison(largest, first, count(recorded), count(replayed))


@dataclass
class Replayed:
    recorded: Recorded
    run_id: str  # the replay's MLflow run
    seed: int
    comparison: Comparison


@dataclass
class ReplayResult:
    replays: list[Replayed]  # the chain's, first round first; the last is the one asked for
    environment: list[str]  # how the environment differed (allowed by replay.allow_different_environment)
    tolerance: float

    @property
    def differing(self) -> Optional[Replayed]:
        """The first replay whose metrics differ beyond the tolerance (None: all reproduce)."""
        return next((r for r in self.replays if r.comparison.first is not None), None)


def run_replay(cfg: DictConfig, print_fn: Optional[Progress] = None) -> ReplayResult:
    """Train the recorded training `cfg` names again (its chain, for a Hyperband continuation), each as a new
    MLflow run, and compare every epoch's metrics with the recorded ones. Refuses (UserError) when the
    packages or data differ from the recorded ones, unless `replay.allow_different_environment`."""
    say = print_fn or (lambda _text: None)
    check(cfg)
    experiment_id = store.open_store(cfg.mlflow, create=False)
    client = MlflowClient(mlflow.get_tracking_uri())
    chain = find_recorded(client, experiment_id, cfg, say)
    target = chain[-1]
    if target.run.info.status not in ("FINISHED", "FAILED"):
        raise UserError(
            f"{target.what} (MLflow run {target.run_id}) is {target.run.info.status}: it was cut off and recorded "
            "only part of its training; resume it first (rerun the command that started it)"
        )
    recorded = {r.run_id: epoch_metrics(client, r.run_id) for r in chain}
    for r in chain:
        if not recorded[r.run_id]:
            raise UserError(f"{r.what} (MLflow run {r.run_id}) recorded no per-epoch metrics: nothing to compare")
    if len(chain) > 1:
        say(
            f"{target.what} went on from earlier Hyperband rounds' weights: replaying its chain, "
            + " -> ".join(f"trial {r.run.data.tags.get('lenet_sweep.trial_id')}" for r in chain)
        )
    notes = [n for n in [_threads(target.threads), *target.notes] if n]

    # The environment, for every training of the chain, before any trains.
    art = Artifacts(client)
    packages = package_versions()
    # seed=N: the training asked for trains with another seed (a chain's earlier rounds keep theirs)
    configs = {
        r.run_id: replay_config(r, cfg, r.seed if r is not target or cfg.seed is None else cfg.seed) for r in chain
    }
    data: dict[str, PreparedData] = {}
    found: list[str] = []
    for r in chain:
        config, key = configs[r.run_id], _data_key(configs[r.run_id])
        if key not in data:
            data[key] = prepare_data(config.data, config.model.input_size, r.split_seed, say, splits=("train", "val"))
        was = art.json(r.environment_run, PACKAGES)
        now = dict(packages)
        if ONEDNN in r.run.data.params:  # set when lenet_sweep is imported; it changes float round-off
            was = {**(was or {}), "TF_ENABLE_ONEDNN_OPTS": r.run.data.params[ONEDNN]}
            now["TF_ENABLE_ONEDNN_OPTS"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "")
        manifest = [tuple(row.get(c) or "" for c in MANIFEST_COLUMNS) for row in art.csv(r.environment_run, MANIFEST)]
        found += [d for d in differences(was, now, manifest, split_manifest(data[key])) if d not in found]
        if not config.train.deterministic:
            notes.append(f"{r.what} trained with train.deterministic=false: its metrics need not reproduce")
    if found and not cfg.replay.allow_different_environment:
        raise UserError(
            f"{target.what} (MLflow run {target.run_id}) was recorded in another environment: "
            f"{'; '.join(found)}. Replay it where it trained (those packages and data), or give "
            "replay.allow_different_environment=true to replay it anyway (its metrics may then differ)"
        )
    if found:
        say(
            "the environment differs from the recorded one (replay.allow_different_environment=true): "
            + "; ".join(found)
        )
    for note in notes:
        say(f"note: {note}")

    replays: list[Replayed] = []
    weights = None
    tolerance = float(cfg.replay.tolerance)
    for r in chain:
        last = r is target
        config = configs[r.run_id]
        seed = int(config.seed)
        start = (
            f", from epoch {r.initial_epoch + 1} on its predecessor's best-epoch weights" if weights is not None else ""
        )
        recorded_seed = f" (recorded: {r.seed})" if seed != r.seed else ""
        say(f"replaying {r.what} (MLflow run {r.run_id}) with seed {seed}{recorded_seed}{start}")
        tags = {
            "lenet_sweep.kind": "replay",
            "lenet_sweep.replay_of": r.run_id,
            "lenet_sweep.replay_of_kind": r.kind,
            "lenet_sweep.seed": seed,
            **{k: r.run.data.tags[k] for k in ("lenet_sweep.sweep", "lenet_sweep.trial_id") if k in r.run.data.tags},
            **({} if last else {"lenet_sweep.replay_chain_of": target.run_id}),
            **({"lenet_sweep.environment_differs": "; ".join(found)[:4000]} if found else {}),
        }
        keras.backend.clear_session()  # as KerasTuner does before it builds each trial's model
        result = train_and_log(
            config,
            data[_data_key(config)],
            experiment_id,
            run_name=(cfg.mlflow.run_name if last else None) or f"replay-{r.run.info.run_name or r.run_id}",
            print_fn=print_fn,
            test=False,
            patience=r.patience,
            # the next link starts from this one's best-epoch weights (KerasTuner's checkpoint)
            keep_best=r.keep_best or not last,
            callbacks=[StartFrom(weights)] if weights is not None else [],
            tags=tags,
            prune=r.prune,
            initial_epoch=r.initial_epoch,
        )
        weights = result.model.get_weights()
        comparison = compare(recorded[r.run_id], epoch_metrics(client, result.run_id), tolerance)
        _log_comparison(client, result.run_id, comparison, tolerance)
        replays.append(Replayed(r, result.run_id, seed, comparison))
    return ReplayResult(replays, found, tolerance)


def outcome(comparison: Comparison, tolerance: float) -> str:
    """The comparison in one line: "reproduced ..." or where it first differs."""
    if comparison.first is None:
        return f"reproduced: every per-epoch metric within replay.tolerance={tolerance:g}"
    epoch, metric, was, now = comparison.first
    missing = f"no epoch {epoch} (recorded {comparison.recorded_epochs}, replayed {comparison.replayed_epochs})"
    return (
        f"differs first in epoch {epoch}, {metric}: recorded {missing if was is None else f'{was:.9g}'}, replayed "
        f"{missing if now is None else f'{now:.9g}'} (|difference| {difference(was, now):.3g} > "
        f"replay.tolerance={tolerance:g})"
    )


def _log_comparison(client: MlflowClient, run_id: str, comparison: Comparison, tolerance: float) -> None:
    """The comparison on the replay's run: its outcome as a tag, each metric's largest difference as a metric."""
    client.set_tag(run_id, "lenet_sweep.replay_result", outcome(comparison, tolerance))
    finite = {k: v for k, v in comparison.largest.items() if math.isfinite(v)}
    client.log_batch(run_id, metrics=[Metric(f"replay_max_abs_diff_{k}", v, 0, 0) for k, v in finite.items()])


def format_result(result: ReplayResult) -> str:
    """Each replay: what it replayed, the largest difference per metric, the outcome."""
    blocks = []
    for r in result.replays:
        c = r.comparison
        lines = [
            f"{r.recorded.what}: MLflow run {r.recorded.run_id} ({c.recorded_epochs} epochs recorded) replayed as "
            f"run {r.run_id} ({c.replayed_epochs} epochs), seed {r.seed}",
            f"  {'metric':<16} largest |recorded - replayed|",
            *(f"  {metric:<16} {gap:.3g}" for metric, gap in c.largest.items()),
            f"  {outcome(c, result.tolerance)}",
        ]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


# ---- entry point ---------------------------------------------------------------------------------


def failure(result: ReplayResult) -> Optional[str]:
    """The command's error line when a replay differs beyond the tolerance (None: all reproduce)."""
    differing = result.differing
    if differing is None:
        return None
    return (
        f"error: the replay of {differing.recorded.what} (MLflow run {differing.recorded.run_id}, replayed as "
        f"{differing.run_id}) {outcome(differing.comparison, result.tolerance)}"
    )


def run(cfg: DictConfig) -> ReplayResult:
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    result = run_replay(cfg, print)
    print(format_result(result))
    return result


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="replay")
def main(cfg: DictConfig) -> None:
    result = cli.guarded(lambda: store.exclusively(cfg.mlflow, lambda: run(cfg)))
    message = failure(result)
    if message:
        sys.exit(message)


if __name__ == "__main__":
    cli.quote_path_overrides(("data.root", "mlflow.store_dir"))
    main()
