"""One training of one config: the single path a hand-run `train`, a sweep trial, a `best` retraining and the
benchmark's lenet_sweep side all take.

Reading order: optimizer and model -> the run's callbacks (MLflow per-epoch logging with history.csv and
curves, progress, early stopping, best-epoch weights) -> `fit` -> the one test evaluation.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import keras
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from lenet_sweep import plots
from lenet_sweep.cli import clock
from lenet_sweep.data import DecodedSplit, PreparedData, make_dataset
from lenet_sweep.errors import UserError
from lenet_sweep.models import create_model
from lenet_sweep.tracking.runs import history_csv, log_figure

Progress = Callable[[str], None]
OBJECTIVE = "val_accuracy"  # what runs are scored and chosen by: validation, never test


def make_optimizer(opt_cfg: DictConfig) -> keras.optimizers.Optimizer:
    """A Keras optimizer from `{name: Adam, learning_rate: ..., ...}`."""
    settings = OmegaConf.to_container(opt_cfg, resolve=True, enum_to_str=True)
    name = settings.pop("name", None)
    try:
        return keras.optimizers.get({"class_name": name, "config": settings})
    except (TypeError, ValueError) as err:
        raise UserError(
            f"optimizer {name!r} with {settings} cannot be built: {err}. "
            "Check optimizer.name (a Keras optimizer class) and its fields"
        ) from None


def compile_model(cfg: DictConfig, num_classes: int) -> keras.Model:
    """`cfg.model` built and compiled with `cfg.optimizer` as every run trains it."""
    model = create_model(cfg.model, num_classes)
    # from_logits=False on every output: the study's setting, ReLU output included (see models/lenet.py).
    model.compile(
        optimizer=make_optimizer(cfg.optimizer),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
        steps_per_execution=cfg.train.steps_per_execution,
    )
    return model


def best_epoch(history: Sequence[dict[str, float]]) -> tuple[int, float]:
    """(1-based epoch, value) of the highest validation accuracy: the first if tied, as KerasTuner."""
    scores = np.array([row.get(OBJECTIVE, np.nan) for row in history], dtype=float)
    if not np.isfinite(scores).any():
        return len(history), float("nan")
    best = int(np.nanargmax(scores))
    return best + 1, float(scores[best])


# ---- the run's callbacks -----------------------------------------------------------------------


@dataclass
class Tracking:
    """Where a training logs: its MLflow run, and what it writes there when training ends."""

    client: MlflowClient
    run_id: str
    prefix: str = ""  # before each metric name (KerasTuner's later executions: "execution1.")
    title: str = ""  # of plots/curves.png
    inherited: list[dict[str, float]] = field(default_factory=list)  # epochs before initial_epoch
    restarts: list[int] = field(default_factory=list)  # epochs after which an earlier round's weights took over
    artifacts: bool = True  # write history.csv and plots/curves.png when training ends
    score: bool = True  # log best_val_accuracy, best_val_loss and best_epoch when training ends


class RunLogger(keras.callbacks.Callback):
    """Logs each epoch's metrics and its duration to one MLflow run, one batched call per epoch; when
    training ends, the whole history as history.csv, the study's curves and the best epoch's score.

    Steps are 1-based epochs, as the study counts them; `seconds` adds up the time spent logging.
    """

    def __init__(self, tracking: Tracking):
        super().__init__()
        self.tracking = tracking
        self.history: list[dict[str, float]] = []  # this training's epochs
        self.seconds = 0.0
        self._started = 0.0

    @property
    def rows(self) -> list[dict[str, float]]:
        """Every epoch of the run: inherited ones, then this training's."""
        return [*self.tracking.inherited, *self.history]

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        row = {k: float(v) for k, v in (logs or {}).items()}
        row["epoch_seconds"] = time.perf_counter() - self._started
        self.history.append(row)
        started = time.perf_counter()
        t, now = self.tracking, int(time.time() * 1000)
        metrics = [Metric(t.prefix + k, v, now, epoch + 1) for k, v in row.items()]
        t.client.log_batch(t.run_id, metrics=metrics, synchronous=True)
        self.seconds += time.perf_counter() - started

    def on_train_end(self, logs=None):
        started = time.perf_counter()
        t = self.tracking
        if t.artifacts:
            t.client.log_text(t.run_id, history_csv(self.rows), "history.csv")
            log_figure(plots.trial_curves(self.rows, t.title, t.restarts), "plots/curves.png", t.client, t.run_id)
        epoch, score = best_epoch(self.history)
        if t.score and np.isfinite(score):
            best = {
                "best_val_accuracy": score,
                "best_epoch": epoch,
                "best_val_loss": self.history[epoch - 1].get("val_loss", float("nan")),
            }
            now = int(time.time() * 1000)
            t.client.log_batch(t.run_id, [Metric(t.prefix + k, v, now, 0) for k, v in best.items()], synchronous=True)
        self.seconds += time.perf_counter() - started


class ProgressPrinter(keras.callbacks.Callback):
    """One line per epoch: the row `logger` just recorded (metrics, epoch seconds), elapsed time, ETA.

    Goes after `logger` in the callback list, which Keras calls in order.
    """

    def __init__(self, print_fn: Progress, epochs: int, logger: RunLogger):
        super().__init__()
        self.print_fn, self.epochs, self.logger = print_fn, epochs, logger

    def on_epoch_end(self, epoch, logs=None):
        row = dict(self.logger.history[-1])
        seconds = row.pop("epoch_seconds")
        elapsed = sum(r["epoch_seconds"] for r in self.logger.history)
        eta = elapsed / len(self.logger.history) * (self.epochs - epoch - 1)
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in row.items())
        self.print_fn(
            f"epoch {epoch + 1}/{self.epochs}  {metrics}  {seconds:.1f}s  elapsed {clock(elapsed)}  ETA {clock(eta)}"
        )


def keras_verbose(setting: str) -> int:
    """Keras' `verbose` from train.keras_verbose: the progress bar only on a terminal when "auto"."""
    if setting == "auto":
        return 1 if sys.stdout.isatty() else 0
    return int(setting)


# ---- fit ---------------------------------------------------------------------------------------


@dataclass
class Fitted:
    history: keras.callbacks.History  # Keras' own record of this fit
    rows: list[dict[str, float]]  # every epoch of the run as logged (inherited ones first; [] if untracked)
    logging_seconds: float  # time spent logging to MLflow inside fit


def fit(
    cfg: DictConfig,
    model: keras.Model,
    data: PreparedData,
    *,
    seed: int,
    tracking: Optional[Tracking] = None,
    print_fn: Optional[Progress] = None,
    patience: Optional[int] = None,
    keep_best: bool = False,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    epochs: Optional[int] = None,
    initial_epoch: int = 0,
    verbose: int = 0,
    steps_per_epoch: Optional[int] = None,
    validation_steps: Optional[int] = None,
) -> Fitted:
    """Train `model` on `data`'s train split, validating on its val split, as every run trains.

    The callbacks, in Keras' calling order: MLflow logging (`tracking`), stop on NaN, early stopping after
    `patience` epochs without a lower validation loss, the best validation-accuracy epoch's weights restored
    at the end (`keep_best`: the model a KerasTuner checkpoint would hold), `callbacks`, progress lines.
    """
    epochs = epochs or cfg.train.epochs
    logger = RunLogger(tracking) if tracking is not None else None
    run_callbacks: list[keras.callbacks.Callback] = [*([logger] if logger else []), keras.callbacks.TerminateOnNaN()]
    if patience:
        run_callbacks.append(keras.callbacks.EarlyStopping("val_loss", patience=patience))
    if keep_best:
        # Keras 3 restores the best epoch's weights when training ends, stopped early or not; patience past
        # the last epoch means this one never stops training itself.
        run_callbacks.append(
            keras.callbacks.EarlyStopping(OBJECTIVE, mode="max", patience=epochs + 1, restore_best_weights=True)
        )
    run_callbacks += list(callbacks)
    if print_fn and logger:
        run_callbacks.append(ProgressPrinter(print_fn, epochs, logger))
    batch = cfg.train.batch_size
    train_ds = make_dataset(data.decoded["train"], batch, shuffle=True, seed=seed)
    val_ds = make_dataset(data.decoded["val"], batch, shuffle=False)
    # shuffle=False: train_ds already reshuffles every epoch with the run's seed.
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=run_callbacks,
        verbose=verbose,
        shuffle=False,
        steps_per_epoch=steps_per_epoch,
        validation_steps=validation_steps,
    )
    return Fitted(history, logger.rows if logger else [], logger.seconds if logger else 0.0)


# ---- the one test evaluation -------------------------------------------------------------------


@dataclass
class TestEvaluation:
    loss: float  # exactly as Keras computes val_loss
    accuracy: float  # exactly as Keras computes val_accuracy
    scores: np.ndarray  # the model's outputs, one row per image of the split
    confusion: np.ndarray


def evaluate_on_test(model: keras.Model, split: DecodedSplit, batch_size: int, num_classes: int) -> TestEvaluation:
    """The model on the test split: Keras' loss and accuracy, and every image's scores."""
    ds = make_dataset(split, batch_size, shuffle=False)
    result = model.evaluate(ds, verbose=0, return_dict=True)
    scores = model.predict(ds, verbose=0)
    return TestEvaluation(
        float(result["loss"]),
        float(result["accuracy"]),
        scores,
        plots.confusion_matrix(split.labels, np.argmax(scores, axis=1), num_classes),
    )
