"""One training run, tracked in MLflow: `python -m lenet_sweep.train model=lenet5 optimizer=sgd data.root=DIR`.

`train_and_log` is the library function (config in, result out): it trains through `trial.fit`, the one path
every training takes; `main` is the Hydra entry point.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
import keras
import mlflow
import numpy as np
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from lenet_sweep import export, plots, trial
from lenet_sweep.cli import guarded
from lenet_sweep.config import check, register_configs
from lenet_sweep.data import PreparedData, prepare_data
from lenet_sweep.errors import UserError
from lenet_sweep.tracking.runs import (
    CONFIG,
    config_yaml,
    flatten,
    log_confusion,
    log_data_check,
    log_figure,
    loggable_config,
    recorded_epochs,
    tracked_run,
)
from lenet_sweep.tracking.store import exclusively, open_store

Progress = Callable[[str], None]


@dataclass
class RunResult:
    run_id: str
    history: list[dict[str, float]]
    test_loss: Optional[float]  # None: the run did not touch the test split
    test_accuracy: Optional[float]
    turning_point_epoch: int
    confusion: Optional[np.ndarray]
    seconds: float
    diverged: bool = False
    model: Optional[keras.Model] = None


def train_and_log(
    cfg: DictConfig,
    prepared: PreparedData,
    experiment: str,
    parent_run_id: Optional[str] = None,
    run_name: Optional[str] = None,
    print_fn: Optional[Progress] = None,
    test: bool = True,
    patience: Optional[int] = None,
    keep_best: bool = False,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    tags: Optional[dict[str, Any]] = None,
    backups: Optional[Path] = None,
    resume_run_id: Optional[str] = None,
    prune: Optional[trial.PruneRule] = None,
    initial_epoch: int = 0,
) -> RunResult:
    """Train `cfg.model` on `prepared`, evaluate it on test once, and record it all as one MLflow run
    in `experiment` of the store `mlflow.set_tracking_uri` names (see `open_store`).

    `test=False` leaves the test split alone (model selection: `prepared` then needs no test split);
    `patience`, `keep_best` and `callbacks` as in `trial.fit`; `tags` join the run's tags. With `backups`
    the training is backed up after every epoch to `backups/<run id>/` (removed once the run has ended);
    `resume_run_id` (one of those runs, cut off) goes on with that run from the epoch after its backup.
    `prune` and `initial_epoch` as in `trial.fit` (a sweep trial's, trained again by `replay`).
    """
    import tensorflow as tf

    check(cfg)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    num_classes = len(prepared.splits.classes)
    model = trial.compile_model(cfg, num_classes)

    params = flatten(loggable_config(cfg))
    params.update(
        {
            "data.resolved_root": str(prepared.splits.root),
            "data.num_classes": num_classes,
            "model.parameters": model.count_params(),
            # Set before TensorFlow loads (lenet_sweep/__init__.py); it changes float round-off.
            "env.TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", ""),
        }
    )
    start = (
        {"run_id": resume_run_id}
        if resume_run_id
        else {
            "experiment_id": experiment,
            "run_name": run_name,
            "parent_run_id": parent_run_id,
            "nested": parent_run_id is not None,
            "tags": {
                "lenet_sweep.kind": "train",
                "model": cfg.model.name,
                "lenet_sweep.config_hash": config_hash(cfg),
                **(tags or {}),
            },
        }
    )
    backup = None
    with contextlib.ExitStack() as hold:
        if resume_run_id and backups is not None:
            # Before the run is touched: the cut-off run may still be training in another process.
            where = MlflowClient(mlflow.get_tracking_uri()).get_run(resume_run_id).data.tags["lenet_sweep.backup"]
            backup = hold.enter_context(trial.holding(Path(where)))
        with tracked_run(**start) as run:
            run_id = run.info.run_id
            client = MlflowClient(mlflow.get_tracking_uri())
            title = f"{cfg.model.name} ({cfg.optimizer.name})"
            tracking = trial.Tracking(client, run_id, title=title)
            if resume_run_id:
                _carry_on(tracking, run, backup, cfg.train.epochs, print_fn)
            else:
                if backups is not None:  # a new run: its backup folder is named after it
                    backup = hold.enter_context(trial.holding(Path(backups).expanduser().resolve() / run_id))
                    mlflow.set_tag("lenet_sweep.backup", str(backup))
                mlflow.log_params(params)
                mlflow.log_metrics(
                    {f"n_{split}": len(d.labels) for split, d in prepared.decoded.items()}
                    | {"skipped_files": len(prepared.skipped)}
                )
                mlflow.log_text(config_yaml(cfg), CONFIG)
                log_data_check(prepared, cfg.train.sample_grid, cfg.seed)

            started = time.perf_counter()
            fitted = trial.fit(
                cfg,
                model,
                prepared,
                seed=cfg.seed,
                tracking=tracking,
                print_fn=print_fn,
                patience=patience,
                keep_best=keep_best,
                callbacks=callbacks,
                verbose=trial.keras_verbose(cfg.train.keras_verbose),
                backup=backup,
                prune=prune,
                initial_epoch=initial_epoch,
            )
            seconds = time.perf_counter() - started
            history = fitted.rows

            test_loss = test_accuracy = confusion = None
            if test:
                tested = trial.evaluate_on_test(model, prepared.decoded["test"], cfg.train.batch_size, num_classes)
                test_loss, test_accuracy, confusion = tested.loss, tested.accuracy, tested.confusion
                mlflow.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy})
            tp = plots.turning_point(history)
            diverged = any(not math.isfinite(row.get("loss", 0.0)) for row in history)
            mlflow.log_metrics({"turning_point_epoch": tp, "train_seconds": seconds, "epochs_run": len(history)})
            _log_outputs(cfg, prepared, model, history, confusion, title)
            if diverged:
                mlflow.set_tag(
                    "failure_reason",
                    f"loss became NaN/inf in epoch {len(history)}; training was stopped "
                    "(lower optimizer.learning_rate)",
                )
                mlflow.end_run("FAILED")  # the `with` then leaves the ended run as it is
        if backup is not None:  # the run has ended: nothing is left to resume
            shutil.rmtree(backup, ignore_errors=True)
        return RunResult(run_id, history, test_loss, test_accuracy, tp, confusion, seconds, diverged, model)


def _carry_on(tracking: trial.Tracking, run, backup: Optional[Path], epochs: int, print_fn: Optional[Progress]) -> None:
    """Set a resumed run's tracking to go on after its backup's epoch, from the epochs the run logged."""
    first = trial.resume_point(backup)
    logged = recorded_epochs(tracking.client, tracking.run_id)
    if len(logged) < first:
        raise UserError(
            f"run {tracking.run_id}'s backup {backup} is at epoch {first} but the run holds {len(logged)} "
            "epochs: rerun without train.resume=true to start a new run"
        )
    tracking.resumed, tracking.logged = logged[:first], len(logged)
    mlflow.set_tag("lenet_sweep.resumed_at_epoch", first)
    if "failure_reason" in run.data.tags:  # the cut-off's reason; it goes on now
        mlflow.delete_tag("failure_reason")
    if print_fn:
        print_fn(f"resuming MLflow run {tracking.run_id} after epoch {first} of {epochs} (backup {backup})")


def config_hash(cfg: DictConfig) -> str:
    """What makes two runs the same training (not where they log, print or back up): a resumed run's key."""
    config = loggable_config(cfg, ("data", "model", "optimizer", "train", "seed"))
    for key in ("decode_cache", "decode_threads"):
        config["data"].pop(key, None)
    for key in ("resume", "backup_dir", "keras_verbose"):
        config["train"].pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cut_off_run(client: MlflowClient, experiment_id: str, cfg: DictConfig):
    """The latest `train` run of this config (`config_hash`) that backed up, if the process that ran it died
    before it ended (RUNNING, KILLED, or FAILED with its backup still there); None if that run finished or
    there is none. (`best`'s retrainings share the config hash but keep no backup: never theirs.)"""
    query = f"tags.`lenet_sweep.kind` = 'train' and tags.`lenet_sweep.config_hash` = '{config_hash(cfg)}'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run, backup = runs[0], runs[0].data.tags.get("lenet_sweep.backup")
    if backup is None or run.info.status == "FINISHED":  # not a backed-up `train` run, or it ended well
        return None
    if run.info.status in ("RUNNING", "KILLED") or Path(backup).exists():
        return run
    return None


def _log_outputs(
    cfg: DictConfig,
    prepared: PreparedData,
    model: keras.Model,
    history: list[dict[str, float]],
    confusion: Optional[np.ndarray],
    title: str,
) -> None:
    """The run's outputs beside the trial path's history.csv and curves: the study's four figures, the
    test confusion matrix (if evaluated) and the model."""
    log_figure(plots.curves(history, "loss", f"loss: {title}"), "plots/loss.png")
    log_figure(plots.curves(history, "loss", f"loss, magnified: {title}", magnify=True), "plots/loss_magnified.png")
    log_figure(plots.curves(history, "accuracy", f"accuracy: {title}"), "plots/accuracy.png")
    log_figure(plots.val_loss_vs_val_accuracy(history, f"validation: {title}"), "plots/val_loss_vs_val_accuracy.png")
    if confusion is not None:
        log_confusion(confusion, prepared.splits.classes, prepared.names, f"test confusion: {title}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        mlflow.log_artifact(str(path), "model")
    # The same files as an export (lenet_sweep/export.py), so a run's model folder predicts too.
    mlflow.log_dict(export.labels(prepared.splits.classes, prepared.names), f"model/{export.LABELS}")
    mlflow.log_text(config_yaml(cfg), f"model/{export.CONFIG}")
    mlflow.log_dict(
        export.preprocessing(cfg.model.input_size, cfg.data.interpolation, cfg.data.antialias),
        f"model/{export.PREPROCESSING}",
    )


def default_run_name(cfg: DictConfig) -> str:
    return cfg.mlflow.run_name or f"{cfg.model.name}-{cfg.optimizer.name.lower()}-seed{cfg.seed}"


def run_one(cfg: DictConfig, parent_run_id: Optional[str] = None) -> RunResult:
    """Prepare data, open the store and train: what the `train` command does, minus the exit code."""
    check(cfg)
    prepared = prepare_data(cfg.data, cfg.model.input_size, cfg.seed, progress=print)
    exp = open_store(cfg.mlflow)
    backups = Path(cfg.train.backup_dir).expanduser().resolve()
    if backups.is_relative_to(prepared.splits.root.resolve()):
        raise UserError(f"train.backup_dir={backups} lies inside data.root: choose a folder outside the data")
    cut_off = None
    if cfg.train.resume:
        cut_off = cut_off_run(MlflowClient(mlflow.get_tracking_uri()), exp, cfg)
        if cut_off is None:
            print(
                f"train.resume=true: no cut-off run of this config in experiment {cfg.mlflow.experiment!r}; a new run"
            )
    result = train_and_log(
        cfg,
        prepared,
        exp,
        parent_run_id,
        default_run_name(cfg),
        print,
        backups=backups,
        resume_run_id=cut_off.info.run_id if cut_off else None,
    )
    print(
        f"{cfg.model.name}: test accuracy {result.test_accuracy:.4f}, test loss {result.test_loss:.4f}, "
        f"val loss lowest at epoch {result.turning_point_epoch}, {result.seconds:.0f}s; "
        f"MLflow run {result.run_id} in {mlflow.get_tracking_uri()}"
    )
    return result


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    result = guarded(lambda: exclusively(cfg.mlflow, lambda: run_one(cfg)))
    if result.diverged:
        sys.exit(
            f"error: training diverged (loss NaN/inf in epoch {len(result.history)}); the run "
            f"{result.run_id} is marked FAILED. Lower optimizer.learning_rate and try again"
        )


if __name__ == "__main__":
    main()
