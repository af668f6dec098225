"""One training run, tracked in MLflow: `python -m lenet_sweep.train model=lenet5 optimizer=sgd data.root=DIR`.

`train_and_log` is the library function (config in, result out); `main` is the Hydra entry point.
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import hydra
import keras
import mlflow
import numpy as np
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from lenet_sweep import cache, export, plots
from lenet_sweep import data as D
from lenet_sweep.cli import guarded
from lenet_sweep.config import check, register_configs
from lenet_sweep.errors import UserError
from lenet_sweep.models import create_model
from lenet_sweep.store import open_store  # noqa: F401  (train.open_store: where runs go)
from lenet_sweep.tracking import MlflowEpochLogger, flatten, loggable_config, package_versions, tracked_run

Progress = Callable[[str], None]


@dataclass
class PreparedData:
    """Everything a run trains and evaluates on: the split lists and the decoded images."""

    splits: D.Splits
    decoded: dict[str, D.DecodedSplit]
    names: list[str]                   # readable class names, by label

    @property
    def skipped(self) -> list[tuple[str, str, str]]:
        """(split, relative path, reason) of every file that was left out."""
        rows = [("-", path, "not an image file (suffix)") for path in self.splits.ignored]
        for split, dec in self.decoded.items():
            rows += [(split, path, why) for path, why in dec.skipped]
        return rows


@dataclass
class RunResult:
    run_id: str
    history: list[dict[str, float]]
    test_loss: Optional[float]         # None: the run did not touch the test split
    test_accuracy: Optional[float]
    turning_point_epoch: int
    confusion: Optional[np.ndarray]
    seconds: float
    diverged: bool = False
    model: Optional[keras.Model] = None


def prepare_data(data_cfg: DictConfig, image_size: int, seed: int,
                 progress: Optional[Progress] = None, splits: Sequence[str] = D.SPLITS) -> PreparedData:
    """List, split and decode the data named by `data_cfg` at `image_size` pixels (only `splits`).

    `seed` splits val/ into validation and test unless `data_cfg.split_seed` is set.
    """
    root = data_cfg.root
    if not root:
        if progress:
            progress(f"data.root is not set: fetching {data_cfg.url}")
        root = D.download_imagenette(data_cfg.url, data_cfg.checksum, data_cfg.cache_dir)
    split_seed = seed if data_cfg.split_seed is None else data_cfg.split_seed
    listed = D.find_splits(root, split_seed, data_cfg.test_fraction, data_cfg.limit_per_class)
    decoded = {}
    for split in splits:
        files = listed.files[split]
        started = time.perf_counter()
        if data_cfg.decode_cache:
            decoded[split], how = cache.load_or_decode(
                data_cfg.decode_cache, listed.root, split, files, image_size, data_cfg.interpolation,
                data_cfg.antialias, data_cfg.decode_threads, progress)
        else:
            decoded[split], how = D.decode_split(listed.root, files, image_size, data_cfg.interpolation,
                                                 data_cfg.antialias, data_cfg.decode_threads), "decoded"
        if progress:
            dec = decoded[split]
            source = "loaded from the decode cache" if how == "cache" else "decoded"
            progress(f"{split}: {len(dec.labels)} images at {image_size}x{image_size} {source} in "
                     f"{time.perf_counter() - started:.1f}s ({len(dec.skipped)} skipped)")
        if not len(decoded[split].labels):
            raise D.DataError(f"no file of the {split} split could be decoded "
                              f"({len(files.paths)} tried): see the reasons in the skipped-files report")
    return PreparedData(listed, decoded, D.readable_names(listed.classes, data_cfg.class_names))


def make_optimizer(opt_cfg: DictConfig) -> keras.optimizers.Optimizer:
    """A Keras optimizer from `{name: Adam, learning_rate: ..., ...}`."""
    settings = OmegaConf.to_container(opt_cfg, resolve=True)
    name = settings.pop("name", None)
    try:
        return keras.optimizers.get({"class_name": name, "config": settings})
    except (TypeError, ValueError) as err:
        raise UserError(f"optimizer {name!r} with {settings} cannot be built: {err}. "
                         "Check optimizer.name (a Keras optimizer class) and its fields") from None


class ProgressPrinter(keras.callbacks.Callback):
    """One line per epoch: the row `logger` just recorded (metrics, epoch seconds), elapsed time, ETA.

    Goes after `logger` in the callback list, which Keras calls in order.
    """

    def __init__(self, print_fn: Progress, epochs: int, logger: MlflowEpochLogger):
        super().__init__()
        self.print_fn, self.epochs, self.logger = print_fn, epochs, logger

    def on_epoch_end(self, epoch, logs=None):
        row = dict(self.logger.history[-1])
        seconds = row.pop("epoch_seconds")
        elapsed = sum(r["epoch_seconds"] for r in self.logger.history)
        eta = elapsed / (epoch + 1) * (self.epochs - epoch - 1)
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in row.items())
        self.print_fn(f"epoch {epoch + 1}/{self.epochs}  {metrics}  {seconds:.1f}s  "
                      f"elapsed {_clock(elapsed)}  ETA {_clock(eta)}")


def _keras_verbose(setting: str) -> int:
    """Keras' `verbose` from train.keras_verbose: the progress bar only on a terminal when "auto"."""
    if setting == "auto":
        return 1 if sys.stdout.isatty() else 0
    return int(setting)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _csv(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def _log_figure(fig, path: str) -> None:
    mlflow.log_figure(fig, path)
    fig.clear()


def compile_model(cfg: DictConfig, num_classes: int) -> keras.Model:
    """`cfg.model` built and compiled with `cfg.optimizer` as every run trains it."""
    model = create_model(cfg.model, num_classes)
    # from_logits=False on every output: the study's setting, ReLU output included (see models/lenet.py).
    model.compile(optimizer=make_optimizer(cfg.optimizer),
                  loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"],
                  steps_per_execution=cfg.train.steps_per_execution)
    return model


def train_and_log(cfg: DictConfig, prepared: PreparedData, experiment: str,
                  parent_run_id: Optional[str] = None, run_name: Optional[str] = None,
                  print_fn: Optional[Progress] = None, test: bool = True,
                  callbacks: Sequence[keras.callbacks.Callback] = (),
                  tags: Optional[dict[str, Any]] = None) -> RunResult:
    """Train `cfg.model` on `prepared`, evaluate it on test once, and record it all as one MLflow run
    in `experiment` of the store `mlflow.set_tracking_uri` names (see `open_store`).

    `test=False` leaves the test split alone (model selection: `prepared` then needs no test split);
    `callbacks` join the run's own after its MLflow logger; `tags` join the run's tags.
    """
    import tensorflow as tf

    check(cfg)

    keras.utils.set_random_seed(cfg.seed)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    dec = prepared.decoded
    num_classes = len(prepared.splits.classes)
    train_ds = D.make_dataset(dec["train"], cfg.train.batch_size, shuffle=True, seed=cfg.seed)
    val_ds = D.make_dataset(dec["val"], cfg.train.batch_size, shuffle=False)

    model = compile_model(cfg, num_classes)

    resolved = loggable_config(cfg)
    config_yaml = OmegaConf.to_yaml(resolved)
    params = flatten(resolved)
    params.update({"data.resolved_root": str(prepared.splits.root), "data.num_classes": num_classes,
                   "model.parameters": model.count_params(),
                   # Set before TensorFlow loads (lenet_sweep/__init__.py); it changes float round-off.
                   "env.TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "")})
    with tracked_run(experiment_id=experiment, run_name=run_name, parent_run_id=parent_run_id,
                     nested=parent_run_id is not None,
                     tags={"lenet_sweep.kind": "train", "model": cfg.model.name, **(tags or {})}) as run:
        run_id = run.info.run_id
        mlflow.log_params(params)
        mlflow.log_metrics({f"n_{split}": len(d.labels) for split, d in dec.items()}
                           | {"skipped_files": len(prepared.skipped)})
        _log_inputs(cfg, config_yaml, prepared)

        logger = MlflowEpochLogger(MlflowClient(mlflow.get_tracking_uri()), run_id)
        run_callbacks = [logger, keras.callbacks.TerminateOnNaN(), *callbacks]
        if print_fn:
            run_callbacks.append(ProgressPrinter(print_fn, cfg.train.epochs, logger))
        verbose = _keras_verbose(cfg.train.keras_verbose)
        started = time.perf_counter()
        # shuffle=False: train_ds already reshuffles every epoch with the run's seed.
        model.fit(train_ds, validation_data=val_ds, epochs=cfg.train.epochs, callbacks=run_callbacks,
                  verbose=verbose, shuffle=False)
        seconds = time.perf_counter() - started
        history = logger.history

        test_loss = test_accuracy = confusion = None
        if test:
            tested = evaluate_on_test(model, dec["test"], cfg.train.batch_size, num_classes)
            test_loss, test_accuracy, confusion = tested.loss, tested.accuracy, tested.confusion
            mlflow.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy})
        tp = plots.turning_point(history)
        diverged = any(not math.isfinite(row.get("loss", 0.0)) for row in history)
        mlflow.log_metrics({"turning_point_epoch": tp, "train_seconds": seconds, "epochs_run": len(history)})
        _log_outputs(cfg, config_yaml, prepared, model, history, confusion)
        if diverged:
            mlflow.set_tag("failure_reason", f"loss became NaN/inf in epoch {len(history)}; "
                                             "training was stopped (lower optimizer.learning_rate)")
            mlflow.end_run("FAILED")  # the `with` then leaves the ended run as it is
    return RunResult(run_id, history, test_loss, test_accuracy, tp, confusion, seconds, diverged, model)


@dataclass
class TestEvaluation:
    loss: float              # exactly as Keras computes val_loss
    accuracy: float          # exactly as Keras computes val_accuracy
    scores: np.ndarray       # the model's outputs, one row per image of the split
    confusion: np.ndarray


def evaluate_on_test(model: keras.Model, split: D.DecodedSplit, batch_size: int,
                     num_classes: int) -> TestEvaluation:
    """The model on the test split: Keras' loss and accuracy, and every image's scores."""
    ds = D.make_dataset(split, batch_size, shuffle=False)
    result = model.evaluate(ds, verbose=0, return_dict=True)
    scores = model.predict(ds, verbose=0)
    return TestEvaluation(float(result["loss"]), float(result["accuracy"]), scores,
                          plots.confusion_matrix(split.labels, np.argmax(scores, axis=1), num_classes))


def _log_inputs(cfg: DictConfig, config_yaml: str, prepared: PreparedData) -> None:
    """The run's inputs: resolved config, split manifest, skipped files, package versions, samples."""
    mlflow.log_text(config_yaml, "config.yaml")
    log_data_check(prepared, cfg.train.sample_grid, cfg.seed)


def log_data_check(prepared: PreparedData, grid: int, seed: int) -> None:
    """What the data was and what ran it: split manifest, skipped files, class counts per split (listed,
    and decoded where decoded), package versions (the study's Table I), a grid x grid sample of images."""
    skipped = {(split, path) for split, path, _ in prepared.skipped}
    mlflow.log_text(_csv([(split, cls, path, "no" if (split, path) in skipped else "yes")
                          for split, cls, path in prepared.splits.manifest_rows()],
                         ("split", "class", "path", "decoded")), "data/split_manifest.csv")
    mlflow.log_text(_csv(prepared.skipped, ("split", "path", "reason")), "data/skipped_files.csv")
    counts = {split: np.bincount(d.labels, minlength=len(prepared.names)).tolist()
              for split, d in prepared.decoded.items()}
    listed = {split: np.bincount(f.labels, minlength=len(prepared.names)).tolist()
              for split, f in prepared.splits.files.items()}
    mlflow.log_dict({"classes": prepared.splits.classes, "names": prepared.names, "counts": counts,
                     "listed": listed, "skipped": len(prepared.skipped)}, "data/summary.json")
    versions = package_versions()
    mlflow.log_dict(versions, "table_i_packages.json")
    mlflow.log_text("| package | version |\n|---|---|\n"
                    + "".join(f"| {k} | {v} |\n" for k, v in versions.items()), "table_i_packages.md")
    train = prepared.decoded["train"]
    n = min(grid ** 2, len(train.labels))
    pick = np.random.default_rng(seed).choice(len(train.labels), n, replace=False)
    _log_figure(plots.image_grid(train.images[pick], [prepared.names[train.labels[i]] for i in pick],
                                 grid, "training images"), "plots/sample_images.png")


def _log_outputs(cfg: DictConfig, config_yaml: str, prepared: PreparedData, model: keras.Model,
                 history: list[dict[str, float]], confusion: Optional[np.ndarray]) -> None:
    """The run's outputs: per-epoch table, the study's curves, the test confusion matrix (if evaluated)
    and the model."""
    title = f"{cfg.model.name} ({cfg.optimizer.name})"
    keys = sorted({k for row in history for k in row})
    mlflow.log_text(_csv([[i + 1] + [row.get(k) for k in keys] for i, row in enumerate(history)],
                         ["epoch", *keys]), "history.csv")
    _log_figure(plots.curves(history, "loss", f"loss: {title}"), "plots/loss.png")
    _log_figure(plots.curves(history, "loss", f"loss, magnified: {title}", magnify=True),
                "plots/loss_magnified.png")
    _log_figure(plots.curves(history, "accuracy", f"accuracy: {title}"), "plots/accuracy.png")
    _log_figure(plots.val_loss_vs_val_accuracy(history, f"validation: {title}"),
                "plots/val_loss_vs_val_accuracy.png")
    if confusion is not None:
        log_confusion(confusion, prepared.splits.classes, prepared.names, f"test confusion: {title}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        mlflow.log_artifact(str(path), "model")
    # The same files as an export (lenet_sweep/export.py), so a run's model folder predicts too.
    mlflow.log_dict(export.labels(prepared.splits.classes, prepared.names), f"model/{export.LABELS}")
    mlflow.log_text(config_yaml, f"model/{export.CONFIG}")
    mlflow.log_dict(export.preprocessing(cfg.model.input_size, cfg.data.interpolation, cfg.data.antialias),
                    f"model/{export.PREPROCESSING}")


def log_confusion(confusion: np.ndarray, classes: Sequence[str], names: Sequence[str], title: str) -> None:
    _log_figure(plots.confusion_figure(confusion, names, title), "plots/confusion_matrix.png")
    mlflow.log_dict({"classes": list(classes), "names": list(names), "matrix": confusion.tolist()},
                    "evaluation/confusion_matrix.json")


def default_run_name(cfg: DictConfig) -> str:
    return cfg.mlflow.run_name or f"{cfg.model.name}-{cfg.optimizer.name.lower()}-seed{cfg.seed}"


def run_one(cfg: DictConfig, parent_run_id: Optional[str] = None) -> RunResult:
    """Prepare data, open the store and train: what the `train` command does, minus the exit code."""
    check(cfg)
    prepared = prepare_data(cfg.data, cfg.model.input_size, cfg.seed, progress=print)
    exp = open_store(cfg.mlflow)
    result = train_and_log(cfg, prepared, exp, parent_run_id, default_run_name(cfg), print)
    print(f"{cfg.model.name}: test accuracy {result.test_accuracy:.4f}, test loss {result.test_loss:.4f}, "
          f"val loss lowest at epoch {result.turning_point_epoch}, {result.seconds:.0f}s; "
          f"MLflow run {result.run_id} in {mlflow.get_tracking_uri()}")
    return result


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    result = guarded(lambda: run_one(cfg))
    if result.diverged:
        sys.exit(f"error: training diverged (loss NaN/inf in epoch {len(result.history)}); the run "
                 f"{result.run_id} is marked FAILED. Lower optimizer.learning_rate and try again")


if __name__ == "__main__":
    main()
