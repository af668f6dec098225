"""Pruning dead trials, the cosine learning rate and the global-average-pooling head (issue 17)."""

from __future__ import annotations

import math
import re
import shutil

import keras
import pytest
from mlflow.tracking import MlflowClient

from conftest import compose_sweep, make_image_folder, runs_of, sweep_overrides
from lenet_sweep import sweep
from lenet_sweep.models import create_model
from lenet_sweep.trial import Pruner, PruneRule, scheduled_rate

RULE = PruneRule(after_epochs=2, chance_margin=0.05, diverged_loss=3.0)


class _Model:
    stop_training = False


def _pruned_after(rows: list[dict], classes: int = 10) -> tuple[int, str]:
    pruner = Pruner(RULE, classes)
    pruner.set_model(_Model())
    pruner.on_train_begin()
    for epoch, row in enumerate(rows):
        pruner.on_epoch_end(epoch, dict(row))
        if pruner.model.stop_training:
            return epoch + 1, pruner.reason
    return 0, ""


def test_a_trial_at_chance_stops_after_the_epochs_it_is_given_and_a_learning_one_goes_on():
    dead = {"loss": 2.3026, "accuracy": 0.1, "val_loss": 2.3026, "val_accuracy": 0.0987}
    assert _pruned_after([dead] * 5)[0] == 2
    epoch, reason = _pruned_after([dead] * 5)
    assert reason.startswith("at chance: val_accuracy 0.0987 and accuracy 0.1000 after epoch 2")
    assert "ln 10 = 2.3026" in reason
    swinging = {"loss": 1.3, "accuracy": 0.55, "val_loss": 3.2, "val_accuracy": 0.1}  # learns; val swings
    assert _pruned_after([swinging] * 5) == (0, "")
    learning = [{"loss": 2.0, "val_loss": 1.9, "val_accuracy": a} for a in (0.12, 0.31, 0.42, 0.5)]
    assert _pruned_after(learning) == (0, "")  # near chance in epoch 1 only: not judged before epoch 2
    slow = [{"loss": 2.2, "val_loss": 2.2, "val_accuracy": a} for a in (0.11, 0.16, 0.2)]
    assert _pruned_after(slow) == (0, "")  # above chance + margin (0.15) at epoch 2


def test_a_diverging_loss_stops_at_once_and_the_margin_scales_with_the_classes():
    rows = [{"loss": loss, "accuracy": 0.3, "val_loss": 9.0, "val_accuracy": 0.3} for loss in (8.0, 7.5, 12.0)]
    epoch, reason = _pruned_after(rows)  # high from the start, falling, then growing
    assert epoch == 3 and reason.startswith("diverging: training loss grew to 12 in epoch 3") and "6.91" in reason
    three = [{"loss": 1.0, "accuracy": 0.35, "val_loss": 1.0, "val_accuracy": 0.37}] * 3  # chance 1/3 + 0.05 = 0.383
    assert _pruned_after(three, classes=3)[0] == 2
    assert _pruned_after([{"loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.4}] * 3, classes=3)[0] == 0


def test_the_cosine_rate_warms_up_then_falls_towards_zero():
    assert scheduled_rate(1.0, 0, 10, 0) == 1.0
    assert scheduled_rate(1.0, 5, 10, 0) == pytest.approx(0.5)
    assert scheduled_rate(1.0, 9, 10, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert [scheduled_rate(1.0, e, 10, 1) for e in (0, 1)] == [0.5, 1.0]
    rates = [scheduled_rate(1.0, e, 10, 2) for e in range(10)]
    assert rates[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and rates[3:] == sorted(rates[3:], reverse=True)


def test_the_gap_head_makes_the_model_size_independent_of_the_input_side():
    cfg, _ = compose_sweep([])

    def params(size: int, head: str) -> int:
        spec = dict(cfg.model) | {"input_size": size, "head": head}
        return create_model(spec, 10).count_params()

    assert params(32, "gap") == params(64, "gap")
    assert params(64, "flatten") > params(32, "flatten")
    model = create_model(dict(cfg.model) | {"head": "gap"}, 10)
    assert isinstance(model.get_layer("gap"), keras.layers.GlobalAveragePooling2D)


def test_a_sweep_prunes_a_trial_that_stays_at_chance(tmp_path, store):
    folder = make_image_folder(tmp_path / "data", n_train=8, n_val=10, size=36, messy=False)
    # Every class gets the first class's images: no model can do better than chance (1/3) on them.
    classes = sorted(p.name for p in (folder / "train").iterdir())
    for split in ("train", "val"):
        for name in classes[1:]:
            for image in (folder / split / classes[0]).iterdir():
                shutil.copyfile(image, folder / split / name / image.name)
    cfg, _ = compose_sweep(
        sweep_overrides(
            folder,
            tmp_path,
            store,
            "tuner=random",
            "tuner.max_trials=1",
            "sweep.early_stopping_patience=null",
            "sweep.prune.enabled=true",
            "sweep.prune.after_epochs=2",
            "model.dropout=0",
        )
    )
    cfg.search.space = {"epochs": {"key": "train.epochs", "type": "choice", "values": [6]}}
    lines: list[str] = []
    result = sweep.run_sweep(cfg, {}, lines.append)
    (dead,) = runs_of(store, "trial")
    assert dead.info.status == "FINISHED"
    reason = dead.data.tags["lenet_sweep.pruned"]
    # Training accuracy, averaged while the weights move, can stray above chance + margin for an epoch.
    found = re.fullmatch(
        r"at chance: val_accuracy 0\.3333 and accuracy 0\.\d+ after epoch (\d) \(chance 0\.333 \+ margin 0\.05; "
        r"val_loss 1\.\d+, ln 3 = 1\.0986\)",
        reason,
    )
    assert found and 2 <= int(found[1]) < 6, reason
    assert dead.data.metrics["epochs_run"] == int(found[1])  # of 6
    history = MlflowClient(store).get_metric_history(dead.info.run_id, "val_accuracy")
    assert [h.step for h in history] == list(range(1, int(found[1]) + 1))
    # KerasTuner scored it as it stood, like any trial; the summary counts it and what it saved
    (row,) = result.rows
    assert row["status"] == "FINISHED" and row["val_accuracy"] == pytest.approx(1 / 3)
    stopped = int(found[1])
    assert row["pruned_seconds_saved"] == pytest.approx((6 - stopped) * row["trial_seconds"] / stopped)
    (parent,) = runs_of(store, "sweep")
    assert parent.data.metrics["trials_pruned"] == 1
    assert any(line.startswith("trial 1/1 [0] val_accuracy 0.3333 (pruned, at chance: ") for line in lines), lines
