"""One training of one config: the single path a hand-run `train`, a sweep trial, a `best` retraining and the
benchmark's lenet_sweep side all take.

Reading order: optimizer and model -> the run's callbacks (MLflow per-epoch logging with history.csv and
curves, progress, early stopping, best-epoch weights, the per-epoch backup a killed training resumes from)
-> `fit` -> the one test evaluation.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
    inherited: list[dict[str, float]] = field(default_factory=list)  # epochs before initial_epoch (another run's)
    resumed: list[dict[str, float]] = field(default_factory=list)  # this run's epochs trained before its backup
    logged: int = 0  # epochs 1..logged are in the run already (a resumed training logs none of them again)
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
    def own(self) -> list[dict[str, float]]:
        """The run's own epochs: those trained before a resume, then this process's."""
        return [*self.tracking.resumed, *self.history]

    @property
    def rows(self) -> list[dict[str, float]]:
        """Every epoch of the run: inherited ones, then its own."""
        return [*self.tracking.inherited, *self.own]

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        row = {k: float(v) for k, v in (logs or {}).items()}
        row["epoch_seconds"] = time.perf_counter() - self._started
        self.history.append(row)
        started = time.perf_counter()
        t, now = self.tracking, int(time.time() * 1000)
        if epoch + 1 <= t.logged:
            # Logged before the process died, after its last backup: retrained to the same values, kept once.
            return
        metrics = [Metric(t.prefix + k, v, now, epoch + 1) for k, v in row.items()]
        t.client.log_batch(t.run_id, metrics=metrics, synchronous=True)
        self.seconds += time.perf_counter() - started

    def on_train_end(self, logs=None):
        started = time.perf_counter()
        t = self.tracking
        if t.artifacts:
            t.client.log_text(t.run_id, history_csv(self.rows), "history.csv")
            log_figure(plots.trial_curves(self.rows, t.title, t.restarts), "plots/curves.png", t.client, t.run_id)
        own = self.own
        epoch, score = best_epoch(own)
        if t.score and np.isfinite(score):
            best = {
                "best_val_accuracy": score,
                "best_epoch": len(t.inherited) + epoch,
                "best_val_loss": own[epoch - 1].get("val_loss", float("nan")),
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


class EpochCounter(keras.callbacks.Callback):
    """Sets the variable the training set's order is drawn from (data/pipeline.py) as each epoch begins,
    before Keras starts that epoch's iterator; first in the callback list."""

    def __init__(self, variable):
        super().__init__()
        self.variable = variable

    def on_epoch_begin(self, epoch, logs=None):
        self.variable.assign(epoch)


def scheduled_rate(base: float, epoch: int, epochs: int, warmup: int) -> float:
    """train.lr_schedule=cosine's learning rate in 0-based `epoch` of `epochs`: a linear rise over `warmup`
    epochs, then half a cosine from `base` down towards 0 (reached after the last epoch, not in it)."""
    if epoch < warmup:
        return base * (epoch + 1) / (warmup + 1)
    span = max(epochs - warmup, 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / span))


class CosineSchedule(keras.callbacks.Callback):
    """Sets the optimizer's learning rate as each epoch begins (`scheduled_rate`). Per epoch, not per step:
    with steps_per_execution, Keras calls batch callbacks only every Nth step; and a resumed training or a
    Hyperband round that goes on from epoch k gets epoch k's rate from the epoch number alone."""

    def __init__(self, base: float, epochs: int, warmup: int):
        super().__init__()
        self.base, self.epochs, self.warmup = base, epochs, warmup

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate = scheduled_rate(self.base, epoch, self.epochs, self.warmup)


@dataclass(frozen=True)
class PruneRule:
    """When a sweep trial stops at once (conf/sweep.yaml `sweep.prune`)."""

    after_epochs: int  # epochs trained before the chance rule applies
    chance_margin: float  # at chance: val_accuracy <= 1/classes + this
    diverged_loss: float  # training loss above this multiple of ln(classes) (the uniform guess's loss)


class Pruner(keras.callbacks.Callback):
    """Stops a training that can no longer become good: validation and training accuracy at chance after
    `rule.after_epochs` (e.g. the ReLU output whose units all died: val_loss sits at ln C from epoch 1),
    or a training loss that grows, epoch on epoch, far past the uniform guess's. `reason` says which ('' if none)."""

    def __init__(self, rule: PruneRule, num_classes: int):
        super().__init__()
        self.rule, self.classes = rule, num_classes
        self.reason = ""
        self.epoch = 0  # 1-based epoch it stopped after

    def on_train_begin(self, logs=None):
        self.reason, self.epoch, self.previous_loss = "", 0, math.inf

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        chance, uniform = 1.0 / self.classes, math.log(self.classes)
        accuracy, loss = logs.get(OBJECTIVE, math.nan), logs.get("loss", math.nan)
        # Training accuracy at chance too: a model that learns but whose validation swings (batch norm at a
        # high learning rate can put one epoch's validation at chance) is not dead.
        learning = logs.get("accuracy", math.nan) > chance + self.rule.chance_margin
        previous, self.previous_loss = self.previous_loss, loss
        # Growing, not just high: a first epoch from confident initial outputs can average above the bar.
        if math.isfinite(loss) and loss > previous and loss > self.rule.diverged_loss * uniform:
            self.reason = (
                f"diverging: training loss grew to {loss:.3g} in epoch {epoch + 1}, over "
                f"{self.rule.diverged_loss:g} x ln {self.classes} = {self.rule.diverged_loss * uniform:.3g}"
            )
        elif epoch + 1 >= self.rule.after_epochs and accuracy <= chance + self.rule.chance_margin and not learning:
            self.reason = (
                f"at chance: {OBJECTIVE} {accuracy:.4f} and accuracy {logs.get('accuracy', math.nan):.4f} after "
                f"epoch {epoch + 1} (chance {chance:.3f} + margin "
                f"{self.rule.chance_margin:g}; val_loss {logs.get('val_loss', math.nan):.4f}, ln {self.classes} = "
                f"{uniform:.4f})"
            )
        if self.reason:
            self.epoch = epoch + 1
            self.model.stop_training = True


class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' early stopping on validation loss that, in a resumed training, first replays the epochs
    trained before the backup, so it stops where an uninterrupted training would have."""

    def __init__(self, patience: int, replay: Sequence[tuple[int, dict[str, float]]] = ()):
        super().__init__("val_loss", mode="min", patience=patience)
        self.replay = list(replay)  # (0-based epoch, its logs)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for epoch, row in self.replay:
            super().on_epoch_end(epoch, row)


BACKUP_STATE = "state"  # the folder of the last complete backup inside a run's backup folder


def _recover(folder: Path) -> Path:
    """The complete backup in `folder` (a swap cut off between its two renames leaves it as state.old)."""
    state, old = folder / BACKUP_STATE, folder / f"{BACKUP_STATE}.old"
    if not state.exists() and old.exists():
        os.rename(old, state)
    return state


def resume_point(folder: Optional[Path]) -> int:
    """Epochs a training backed up in `folder` had completed (0: none, or no backup)."""
    if folder is None:
        return 0
    metadata = _recover(Path(folder)) / "training_metadata.json"
    return int(json.loads(metadata.read_text())["epoch"]) if metadata.exists() else 0


@contextlib.contextmanager
def holding(folder: Path):
    """Hold `folder`'s lock file (created, with the folder, if missing) while a training backs up there;
    a second process wanting it (a resume while the run still trains elsewhere) gets a UserError. The
    kernel drops the lock when its process ends, however it ends."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"the training backed up in {folder} is still running in another process: let it finish, "
                "or stop it first"
            ) from None
        yield folder
    finally:
        os.close(fd)


def _durable(*paths: Path) -> None:
    # Written files and renamed entries reach the disk before the backup counts, so a power cut leaves
    # the last complete backup rather than an empty file under its name.
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _seed_states(model: keras.Model) -> list:
    # Dropout, flips and shifts draw from SeedGenerators whose state Keras does not save with the weights.
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


class Backup(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore (weights, optimizer state, epoch) after every epoch, plus the random layers'
    generator states; each backup is written whole into a new folder, then swapped in by renames, so a kill
    at any moment leaves the last complete one. Kept after training: the caller removes it once the run is
    recorded as ended."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        state = _recover(self.folder)
        super().__init__(str(state), delete_checkpoint=False)

    def _save_model(self):
        saving, state = self.folder / "saving", self.folder / BACKUP_STATE
        shutil.rmtree(saving, ignore_errors=True)
        saving.mkdir(parents=True)
        self.model.save_weights(str(saving / Path(self._weights_path).name))
        np.savez(saving / "seeds.npz", *[v.numpy() for v in _seed_states(self.model)])
        metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen}
        (saving / Path(self._training_metadata_path).name).write_text(json.dumps(metadata))
        _durable(*saving.iterdir(), saving)
        old = self.folder / f"{BACKUP_STATE}.old"
        shutil.rmtree(old, ignore_errors=True)
        if state.exists():
            os.rename(state, old)
        os.rename(saving, state)
        _durable(self.folder)
        shutil.rmtree(old, ignore_errors=True)

    def _load_model(self):
        super()._load_model()
        seeds = Path(self.backup_dir) / "seeds.npz"
        if seeds.exists():
            with np.load(seeds) as saved:
                for i, variable in enumerate(_seed_states(self.model)):
                    variable.assign(saved[f"arr_{i}"])


def keras_verbose(setting: str) -> int:
    """Keras' `verbose` from train.keras_verbose: the progress bar only on a terminal when "auto"."""
    if setting == "auto":
        return 1 if sys.stdout.isatty() else 0
    return int(setting)


# ---- fit ---------------------------------------------------------------------------------------


@dataclass
class Fitted:
    history: keras.callbacks.History  # Keras' own record of this process's epochs
    rows: list[dict[str, float]]  # every epoch of the run as logged (inherited ones first; [] if untracked)
    own: list[dict[str, float]]  # the run's own epochs (trained before a resume, then here; [] if untracked)
    start: int  # 0-based epoch of own[0]: Hyperband's initial_epoch
    logging_seconds: float  # time spent logging to MLflow inside fit
    pruned: str = ""  # why `prune` stopped it ('' if it did not)


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
    backup: Optional[Path] = None,
    prune: Optional[PruneRule] = None,
) -> Fitted:
    """Train `model` on `data`'s train split, validating on its val split, as every run trains.

    The callbacks, in Keras' calling order: the epoch counter the training order is drawn from, MLflow
    logging (`tracking`), stop on NaN, early stopping after `patience` epochs without a lower validation
    loss, a trial that cannot become good stopped at once (`prune`: the reason in the run's tag
    `lenet_sweep.pruned`), the cosine learning rate (train.lr_schedule), the best validation-accuracy epoch's
    weights restored at the end (`keep_best`: the model a KerasTuner checkpoint would hold), `callbacks`,
    the backup (`backup`: a folder of its own; a training given a folder holding a backup goes on from the
    epoch after it, its earlier epochs in `tracking.resumed`), progress lines. The backup comes after the
    logger: an epoch logged but not backed up is trained again (to the same values) and not logged twice.
    """
    import tensorflow as tf

    epochs = epochs or cfg.train.epochs
    first = max(initial_epoch, resume_point(backup))
    if backup is not None and (tracking is None or len(tracking.resumed) != first - initial_epoch or keep_best):
        raise ValueError("a resumed training needs its earlier epochs in tracking.resumed, and no keep_best")
    logger = RunLogger(tracking) if tracking is not None else None
    counter = tf.Variable(0, dtype=tf.int64, trainable=False)
    run_callbacks: list[keras.callbacks.Callback] = [EpochCounter(counter), *([logger] if logger else [])]
    run_callbacks.append(keras.callbacks.TerminateOnNaN())
    if patience:
        replay = list(enumerate(tracking.resumed, start=initial_epoch)) if tracking else []
        stopping = ResumedEarlyStopping(patience, replay)
        stopping.set_model(model)
        stopping.on_train_begin()
        if model.stop_training:  # it had stopped before the process died: no epoch is left to train
            epochs, model.stop_training = first, False
        run_callbacks.append(stopping)
    pruner = Pruner(prune, len(data.splits.classes)) if prune else None
    if pruner:
        run_callbacks.append(pruner)
    if cfg.train.lr_schedule == "cosine":
        rate = float(cfg.optimizer.learning_rate)
        run_callbacks.append(CosineSchedule(rate, epochs, int(cfg.train.warmup_epochs)))
    if keep_best:
        # Keras 3 restores the best epoch's weights when training ends, stopped early or not; patience past
        # the last epoch means this one never stops training itself.
        run_callbacks.append(
            keras.callbacks.EarlyStopping(OBJECTIVE, mode="max", patience=epochs + 1, restore_best_weights=True)
        )
    run_callbacks += list(callbacks)
    if backup is not None:
        run_callbacks.append(Backup(backup))
    if print_fn and logger:
        run_callbacks.append(ProgressPrinter(print_fn, epochs, logger))
    batch = cfg.train.batch_size
    train_ds = make_dataset(data.decoded["train"], batch, shuffle=True, seed=seed, epoch=counter)
    val_ds = make_dataset(data.decoded["val"], batch, shuffle=False)
    # shuffle=False: train_ds already draws a new order every epoch from the run's seed.
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        initial_epoch=first,
        callbacks=run_callbacks,
        verbose=verbose,
        shuffle=False,
        steps_per_epoch=steps_per_epoch,
        validation_steps=validation_steps,
    )
    pruned = pruner.reason if pruner else ""
    if logger is None:
        own = [{k: float(v[i]) for k, v in history.history.items()} for i in range(len(history.epoch))]
        return Fitted(history, [], own, initial_epoch, 0.0, pruned)
    if pruned:
        tag = "lenet_sweep.pruned" + (f".{tracking.prefix.rstrip('.')}" if tracking.prefix else "")
        tracking.client.set_tag(tracking.run_id, tag, pruned)
    return Fitted(history, logger.rows, logger.own, initial_epoch, logger.seconds, pruned)


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
