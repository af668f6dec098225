"""The sweep: search space -> trial config, tracked trials, resume, failures, and the command lines."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import uuid
import warnings
from pathlib import Path

import keras_tuner as kt
import pytest
from mlflow.tracking import MlflowClient

from conftest import (
    REPO,
    all_artifacts,
    compose_sweep,
    make_image_folder,
    run_cli,
    run_clis,
    runs_of,
    sweep_overrides,
)
from lenet_sweep import budget as budget_module
from lenet_sweep import sweep, tuner
from lenet_sweep.data import cache
from lenet_sweep.errors import UserError
from lenet_sweep.models import create_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("sweep") / "data", n_train=12, n_val=10, size=36, messy=False)


# ---- search space -> trial config --------------------------------------------------------------


def test_each_value_lands_at_its_config_key_and_builds_through_the_model_builder(tmp_path):
    cfg, optimizers = compose_sweep(["tuner=random"])
    space = sweep.active_space(cfg, optimizers)
    hp = kt.HyperParameters()
    sweep.hyperparameter_values(hp, space)  # registers every dimension with its default
    hp.values.update(
        {
            "conv_layers": 4,
            "filters_1": 16,
            "filters_3": 64,
            "filters_4": 128,
            "dense_1": 256,
            "output_activation": "relu",
            "optimizer": "sgd",
            "sgd_learning_rate": 0.02,
            "sgd_momentum": 0.9,
            "dropout": 0.5,
            "epochs": 10,
        }
    )
    trial = sweep.trial_config(cfg, space, optimizers, hp)
    assert trial.model.conv_layers == 4 and list(trial.model.filters) == [16, 32, 64, 128]
    assert list(trial.model.dense) == [256] and trial.model.output_activation == "relu"
    assert trial.optimizer.name == "SGD" and trial.optimizer.learning_rate == 0.02
    assert trial.optimizer.momentum == 0.9 and trial.train.epochs == 10 and trial.model.dropout == 0.5
    values = sweep.hyperparameter_values(hp, space)
    assert "adam_learning_rate" not in values and values["sgd_learning_rate"] == 0.02  # inactive branch
    # the trial's model is what the builder makes from the same config by hand
    model = create_model(trial.model, 10)
    assert [model.get_layer(f"conv{i}").filters for i in range(1, 5)] == [16, 32, 64, 128]
    assert model.get_layer("output").activation.__name__ == "relu"
    assert cfg.model.conv_layers == 3  # the sweep's own config is untouched

    hyperband_cfg, _ = compose_sweep([])
    assert "epochs" not in sweep.active_space(hyperband_cfg, optimizers)  # Hyperband's budget


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            ["tuner.kind=grid"],
            r"tuner.kind=grid.*Invalid value 'grid', expected one of \[random, bayesian, hyperband\]",
        ),
        (["tuner=random", "tuner.factor=9"], r"Could not override 'tuner.factor'"),  # Hyperband's knob, not random's
        (["model.pooling=mean"], r"model.pooling=mean.*expected one of \[avg, max\]"),
    ],
)
def test_a_value_outside_the_schema_is_refused_when_the_config_is_composed(bad, message):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as refused:
        compose_sweep(bad)
    chain = f"{refused.value} {refused.value.__cause__}"
    assert re.search(message, chain, re.S), chain


@pytest.mark.parametrize(
    "bad, message",
    [
        (["+search.space.nope={key: model.nope, type: choice, values: [1]}"], "model.nope.* is not a config key"),
        (["search.space.dropout.type=uniform"], "choose one of choice, int, float, boolean"),
        (
            ["+search.space.early={key: model.dropout, type: choice, values: [0.1], when: {later: [1]}}"],
            "must be a dimension listed above",
        ),
        (
            ["+search.space.beta={key: optimizer.beta_1, type: choice, values: [0.9], when: {optimizer: [sgd]}}"],
            "optimizer.beta_1.* is not a config key of optimizer=sgd",
        ),
        (["+search.space.few={key: model.dropout, type: int, min: 3, max: 1}"], "needs `min` <= `max`"),
        (["tuner.seed=0"], "KerasTuner reads 0 as unseeded"),
        (["tuner.factor=1"], "tuner.factor=1: must be at least 2"),
        (["sweep.budget_margin=1"], "sweep.budget_margin=1.0: must be at least 0 and less than 1"),
        (["search.space.dropout.values=[0,0.25]"], "KerasTuner refuses search=default"),  # int and float
        (
            ["search.space.adam_learning_rate.sampling=cubic"],
            "search.space.adam_learning_rate.sampling='cubic': choose one of linear, log, reverse_log",
        ),
        (["+search.space.dropout.typo=1"], "search.space.dropout: Key 'typo' not in 'HyperParameterSpec'"),
    ],
)
def test_a_bad_search_space_is_refused_before_anything_runs(bad, message, folder, tmp_path, store):
    with pytest.raises(UserError, match=message):
        sweep.run_sweep(*compose_sweep(sweep_overrides(folder, tmp_path, store, *bad)))
    # nothing recorded, nothing to resume
    assert not runs_of(store, "sweep") and not (tmp_path / "state" / "t" / "oracle.json").exists()


# ---- a tracked sweep ---------------------------------------------------------------------------


def test_three_trial_sweep_records_a_parent_and_one_child_per_trial(folder, tmp_path, store, monkeypatch):
    decoded_splits = []
    real = cache.load_or_decode

    def spy(cache_dir, root, split, *args, **kwargs):
        decoded_splits.append(split)
        return real(cache_dir, root, split, *args, **kwargs)

    monkeypatch.setattr(cache, "load_or_decode", spy)
    cfg, optimizers = compose_sweep(sweep_overrides(folder, tmp_path, store, "tuner.max_trials=3"))
    lines: list[str] = []
    result = sweep.run_sweep(cfg, optimizers, lines.append)
    assert "test" not in decoded_splits  # the sweep never touches the test split

    (parent,) = runs_of(store, "sweep")
    children = runs_of(store, "trial")
    assert parent.info.status == "FINISHED" and result.parent_run_id == parent.info.run_id
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sum(line.startswith("trial ") for line in lines) == 3

    client = MlflowClient(store)
    assert parent.data.params["tuner.kind"] == "hyperband" and parent.data.params["sweep.name"] == "t"
    assert "output_activation" in parent.data.params["search.dimensions"].split(",")
    assert Path(parent.data.params["sweep.state_dir"], "oracle.json").exists()
    assert {
        "config.yaml",
        "search_space.yaml",
        "sweep/ranking.csv",
        "sweep/relu_vs_softmax.png",
        "sweep/val_accuracy_vs_hyperparameters.png",
    } <= all_artifacts(client, parent.info.run_id)
    parent = client.get_run(parent.info.run_id)
    assert parent.data.metrics["trials"] == 3 and parent.data.metrics["trials_finished"] == 3
    assert 0 < parent.data.metrics["tracking_overhead"] < 1

    scores = {}  # KerasTuner's own record of each trial
    for trial_file in (tmp_path / "state" / "t").glob("trial_*/trial.json"):
        saved = json.loads(trial_file.read_text())
        scores[saved["trial_id"]] = saved["score"]
    for child in children:
        params, metrics = child.data.params, child.data.metrics
        trial_id = child.data.tags["lenet_sweep.trial_id"]
        for name in (
            "input_size",
            "conv_layers",
            "filters_1",
            "dense_1",
            "output_activation",
            "optimizer",
            "tuner/epochs",
            "model.filters",
            "optimizer.learning_rate",
            "train.epochs",
        ):
            assert name in params, name
        assert params["train.epochs"] == params["tuner/epochs"]
        assert metrics["best_val_accuracy"] == pytest.approx(scores[trial_id])  # KerasTuner's score
        assert metrics["trial_seconds"] > metrics["tracking_seconds"] > 0
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in history] == list(range(1, int(metrics["epochs_run"]) + 1))
        assert {"plots/curves.png", "history.csv"} <= all_artifacts(client, child.info.run_id)

    text = Path(client.download_artifacts(parent.info.run_id, "sweep/ranking.csv", str(tmp_path))).read_text()
    ranking = list(csv.DictReader(io.StringIO(text)))
    accuracies = [float(r["val_accuracy"]) for r in ranking]
    assert accuracies == sorted(accuracies, reverse=True) and [r["rank"] for r in ranking] == ["1", "2", "3"]
    assert [r["trial"] for r in ranking] == [r["trial"] for r in result.rows]


def test_resume_after_an_interruption_repeats_no_finished_trial(folder, tmp_path, store, monkeypatch):
    cfg, optimizers = compose_sweep(sweep_overrides(folder, tmp_path, store, "tuner.max_trials=3"))
    fits = []
    real_fit = tuner.TrialModel.fit

    interrupted = []

    def interrupt_second(self, *args, **kwargs):
        fits.append(self.seed)
        if len(fits) == 2 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt("Ctrl-C in trial 2")
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(tuner.TrialModel, "fit", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(cfg, optimizers)
    (parent,) = runs_of(store, "sweep")
    assert parent.info.status == "KILLED"
    assert [c.info.status for c in runs_of(store, "trial")] == ["FINISHED", "KILLED"]

    # a trial whose process was SIGKILLed stays RUNNING in MLflow: the resume must close it
    client = MlflowClient(store)
    orphan = client.create_run(
        parent.info.experiment_id,
        tags={"mlflow.parentRunId": parent.info.run_id, "lenet_sweep.kind": "trial", "lenet_sweep.trial_id": "9"},
    )

    fits.clear()
    result = sweep.run_sweep(cfg, optimizers)
    assert len(fits) == 2  # the interrupted trial again, then the third; the finished one is not rerun
    assert result.resumed and result.parent_run_id == parent.info.run_id
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert "cut off" in client.get_run(orphan.info.run_id).data.tags["failure_reason"]
    by_trial: dict[str, list] = {}
    for child in runs_of(store, "trial"):
        by_trial.setdefault(child.data.tags["lenet_sweep.trial_id"], []).append(child)
    finished = {t: [c for c in runs if c.info.status == "FINISHED"] for t, runs in by_trial.items()}
    assert sorted(t for t, runs in finished.items() if len(runs) == 1) == ["0", "1", "2"]
    assert [c.data.tags["lenet_sweep.attempt"] for c in by_trial["1"]] == ["1", "2"]
    assert [c.info.status for c in by_trial["1"]] == ["KILLED", "FINISHED"]
    assert not [c for c in runs_of(store, "trial") if c.info.status == "RUNNING"]
    assert len(result.rows) == 4 and [r["status"] for r in result.rows[:3]] == ["FINISHED"] * 3


def test_diverging_and_crashing_trials_are_failed_with_reasons_and_the_sweep_goes_on(folder, tmp_path, store):
    cfg, optimizers = compose_sweep(
        sweep_overrides(
            folder,
            tmp_path,
            store,
            "tuner=random",
            "optimizer=sgd",
            "tuner.max_trials=4",
            "tuner.max_consecutive_failed_trials=10",
        )
    )
    # a learning rate that overflows (infinite: a merely huge one stays finite on some CPUs), and a dense width
    # the builder refuses
    cfg.search.space = {
        "learning_rate": {"key": "optimizer.learning_rate", "type": "choice", "values": [0.01, float("inf")]},
        "dense_1": {"key": "model.dense.0", "type": "choice", "values": [16, 0]},
        "epochs": {"key": "train.epochs", "type": "choice", "values": [2]},
    }
    result = sweep.run_sweep(cfg, {})
    children = runs_of(store, "trial")
    assert len(children) == 4
    failed = [c for c in children if c.info.status == "FAILED"]
    reasons = sorted(c.data.tags["failure_reason"] for c in failed)
    assert len(failed) == 3 and sum("NaN" in r for r in reasons) == 1
    assert sum("model.dense=[0]" in r for r in reasons) == 2
    (ok,) = [c for c in children if c.info.status == "FINISHED"]
    assert ok.data.params["learning_rate"] == "0.01" and ok.data.params["dense_1"] == "16"
    assert [r["status"] for r in result.rows] == ["FINISHED", "FAILED", "FAILED", "FAILED"]
    (parent,) = runs_of(store, "sweep")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_failed"] == 3


def test_a_changed_sweep_is_not_resumed_and_overwrite_starts_afresh(folder, tmp_path, store):
    base = sweep_overrides(folder, tmp_path, store, "tuner.max_trials=1")
    sweep.run_sweep(*compose_sweep(base))
    with pytest.raises(UserError, match=r"model.dropout: 0.25 -> 0.5.*sweep.overwrite=true"):
        sweep.run_sweep(*compose_sweep([*base, "model.dropout=0.5"]))
    result = sweep.run_sweep(*compose_sweep([*base, "model.dropout=0.5", "sweep.overwrite=true"]))
    first, second = runs_of(store, "sweep")
    assert result.parent_run_id == second.info.run_id != first.info.run_id
    assert len(result.rows) == 1 and len(runs_of(store, "trial")) == 2  # nothing recorded was lost
    saved = json.loads((tmp_path / "state" / "t" / sweep.STATE_FILE).read_text())
    assert saved["model.dropout"] == 0.5


# ---- the command lines of the issue ------------------------------------------------------------


def test_the_sweep_command_lines_work_as_written(folder, tmp_path, store):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    args = [
        f"data.root={folder}",
        "tuner.max_trials=3",
        "data.limit_per_class=20",
        f"mlflow.tracking_uri={store}",
        f"mlflow.experiment={name}",
        f"sweep.name={name}",
    ]
    result = run_cli(["lenet_sweep.sweep", *args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top trials by validation accuracy" in result.stdout
    assert sum(line.startswith("trial ") for line in result.stdout.splitlines()) == 3
    assert (tmp_path / "sweeps" / name / "oracle.json").exists()

    # make sweep: the same arguments through ARGS; its state lands in the checkout's sweeps/ folder
    import subprocess

    try:
        made = subprocess.run(
            [
                "make",
                "-s",
                "sweep",
                # one trial: what is checked here is that the arguments get through make
                "ARGS="
                + " ".join(
                    [args[0], "tuner.max_trials=1", *args[2:4], f"mlflow.experiment={name}-make", f"sweep.name={name}"]
                ),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert made.returncode == 0, made.stderr[-3000:]
        assert "top trials by validation accuracy" in made.stdout
    finally:
        shutil.rmtree(REPO / "sweeps" / name, ignore_errors=True)

    bad, unknown = run_clis(
        [
            ["lenet_sweep.sweep", f"data.root={folder}", "tuner.max_trials=many"],
            ["lenet_sweep.sweep", f"data.root={folder}", "tuner=grid"],
        ]
    )
    assert bad.returncode != 0 and "tuner.max_trials" in bad.stderr and "Traceback" not in bad.stderr
    assert unknown.returncode != 0 and "hyperband" in unknown.stderr


def test_the_time_limit_stops_new_trials_and_a_rerun_goes_on(folder, tmp_path, store):
    base = sweep_overrides(folder, tmp_path, store, "tuner.max_trials=2")
    lines: list[str] = []
    first = sweep.run_sweep(*compose_sweep([*base, "sweep.time_limit_minutes=0.0001"]), lines.append)
    assert len(first.rows) == 1 and any("time_limit_minutes=0.0001 reached" in line for line in lines)
    second = sweep.run_sweep(*compose_sweep(base))
    assert second.resumed and len(second.rows) == 2 and len(runs_of(store, "trial")) == 2


def test_too_many_failures_in_a_row_stop_the_sweep_cleanly(folder, tmp_path, store):
    cfg, _ = compose_sweep(
        sweep_overrides(
            folder, tmp_path, store, "tuner=random", "tuner.max_trials=5", "tuner.max_consecutive_failed_trials=2"
        )
    )
    # every trial fails as it starts to train (the model builds, the batches cannot)
    cfg.search.space = {
        "batch_size": {"key": "train.batch_size", "type": "choice", "values": [0, -1, -2]},
        "epochs": {"key": "train.epochs", "type": "choice", "values": [1]},
    }
    result = sweep.run_sweep(cfg, {})
    assert "2 trials in a row failed" in result.stopped_because
    assert [r["status"] for r in result.rows] == ["FAILED", "FAILED"]
    (parent,) = runs_of(store, "sweep")
    assert parent.info.status == "FINISHED" and "in a row" in parent.data.tags["stopped_because"]


def test_bayesian_search_with_two_executions_per_trial(folder, tmp_path, store):
    cfg, _ = compose_sweep(
        sweep_overrides(
            folder,
            tmp_path,
            store,
            "tuner=bayesian",
            "tuner.max_trials=2",
            "tuner.executions_per_trial=2",
            "tuner.num_initial_points=1",
        )
    )
    cfg.search.space = {
        "dense_1": {"key": "model.dense.0", "type": "choice", "values": [8, 16]},
        "epochs": {"key": "train.epochs", "type": "choice", "values": [2]},
    }
    result = sweep.run_sweep(cfg, {})
    assert [r["status"] for r in result.rows] == ["FINISHED", "FINISHED"]
    client = MlflowClient(store)
    for child in runs_of(store, "trial"):
        first = [m.value for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        second = [m.value for m in client.get_metric_history(child.info.run_id, "execution1.val_accuracy")]
        assert len(first) == len(second) == 2
        assert child.data.metrics["best_val_accuracy"] == pytest.approx((max(first) + max(second)) / 2)


def test_a_hyperband_trial_promoted_after_a_resume_keeps_its_earlier_epochs(folder, tmp_path, store):
    base = sweep_overrides(folder, tmp_path, store, "tuner.max_epochs=3", "sweep.early_stopping_patience=null")
    sweep.run_sweep(*compose_sweep([*base, "tuner.max_trials=3"]))  # bracket 1, round 0: 1 epoch each
    result = sweep.run_sweep(*compose_sweep([*base, "tuner.max_trials=4"]))  # round 1: the best, to 3
    client = MlflowClient(store)
    (promoted,) = [c for c in runs_of(store, "trial") if "lenet_sweep.continues_trial" in c.data.tags]
    assert promoted.data.params["tuner/initial_epoch"] == "1" and promoted.data.params["tuner/epochs"] == "3"
    steps = [m.step for m in client.get_metric_history(promoted.info.run_id, "val_accuracy")]
    assert steps == [2, 3]  # its own epochs; epoch 1 was its parent trial's
    text = Path(client.download_artifacts(promoted.info.run_id, "history.csv", str(tmp_path))).read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[0]["val_accuracy"]  # read back from MLflow
    assert len(result.rows) == 4


def test_the_same_seeds_give_the_same_trials_and_scores(folder, tmp_path, store):
    results = []
    for name in ("a", "b"):
        result = sweep.run_sweep(
            *compose_sweep(sweep_overrides(folder, tmp_path, store, "tuner.max_trials=3", name=name))
        )
        results.append(
            [
                (
                    r["trial"],
                    {k: r[k] for k in sweep.typed_space(compose_sweep([])[0]) if k in r},
                    r["val_accuracy"],
                    r["val_loss"],
                )
                for r in result.rows
            ]
        )
    assert results[0] == results[1]


def test_a_trial_finished_but_unsaved_at_a_kill_is_not_trained_or_logged_again(folder, tmp_path, store, monkeypatch):
    cfg, optimizers = compose_sweep(sweep_overrides(folder, tmp_path, store, "tuner.max_trials=2"))
    real_end = tuner.TrialTracking.on_trial_end

    def killed_before_saving(self, trial):
        raise KeyboardInterrupt("killed between MLflow's FINISHED and KerasTuner's save")

    monkeypatch.setattr(tuner.TrialTracking, "on_trial_end", killed_before_saving)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(cfg, optimizers)
    assert [c.info.status for c in runs_of(store, "trial")] == ["FINISHED"]

    monkeypatch.setattr(tuner.TrialTracking, "on_trial_end", real_end)
    fits = []
    real_fit = tuner.TrialModel.fit

    def counted_fit(self, *args, **kwargs):
        fits.append(1)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(tuner.TrialModel, "fit", counted_fit)
    result = sweep.run_sweep(cfg, optimizers)
    assert len(fits) == 1  # only the second trial trains; the first is taken from its MLflow run
    assert sorted(c.data.tags["lenet_sweep.trial_id"] for c in runs_of(store, "trial")) == ["0", "1"]
    assert [r["status"] for r in result.rows] == ["FINISHED", "FINISHED"]


# ---- the budget --------------------------------------------------------------------------------


def test_a_budget_plans_hyperband_brackets_to_fit_and_the_summary_says_how_it_went(
    folder, tmp_path, store, monkeypatch
):
    # The budget's clock moves 60 s per epoch trained, and only then: the same plans on any machine.
    clock = {"now": 0.0}
    monkeypatch.setattr(budget_module, "budget_clock", lambda: clock["now"])
    real_fit = tuner.TrialModel.fit

    def timed_fit(self, *args, **kwargs):
        history = real_fit(self, *args, **kwargs)
        clock["now"] += 60.0 * len(history.epoch)
        return history

    monkeypatch.setattr(tuner.TrialModel, "fit", timed_fit)
    base = sweep_overrides(
        folder,
        tmp_path,
        store,
        "tuner.max_epochs=3",  # bracket 1: 3 trials of 1 epoch, the best on to 3 (300 s); bracket 0: 2 of 3 (360 s)
        "sweep.early_stopping_patience=null",
        "sweep.prune.enabled=false",
        "sweep.budget_margin=0",
    )
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the one filter tuner.py installs at import, re-installed over "always": it must match Keras' message
        warnings.filterwarnings("ignore", message=tuner.PROMOTION_WARNING, category=UserWarning)
        result = sweep.run_sweep(*compose_sweep([*base, "sweep.budget_minutes=9.5"]), lines.append)
    # bracket 1 (300 s), then 270 s left: bracket 0 (360 s) is skipped, bracket 1 again (300 s) does not fit
    # whole, its first round does (180 s); then nothing fits the 90 s left
    epochs = sorted(int(r["tuner/epochs"]) for r in result.rows)
    assert len(result.rows) == 7 and epochs == [1] * 6 + [3]
    assert "budget: skipped bracket 0: 2 trials to epoch 3 (~0:06:00 needed, 0:04:30 left to plan)" in lines
    assert (
        "budget: started bracket 1 (1 of 2 rounds): 3 trials to epoch 1 (~0:03:00 needed, 0:04:30 left to plan)"
        in lines
    )
    assert any(line.startswith("budget: no Hyperband bracket fits the 0:01:30 left") for line in lines), lines
    assert "budget: pass 2 over Hyperband's brackets starts, beyond tuner.hyperband_iterations=1" in " ".join(lines)
    spent = result.budget
    assert (spent["brackets_run"], spent["brackets_shortened"], spent["brackets_skipped"]) == (2, 1, 1)
    assert spent["budget_used_seconds"] == spent["trials_seconds"] == 480 and spent["seconds_per_epoch"] == 60
    assert spent["epochs_trained"] == 8 and "no Hyperband bracket fits" in spent["stopped_because"]
    words = sweep.budget_lines(spent)
    assert words[0].startswith("budget 0:09:30 (sweep.budget_minutes=9.5): used 0:08:00 = set-up 0:00:00 + 7 trials")
    assert words[1] == "Hyperband brackets: 2 run (1 shortened to fit), 1 skipped (did not fit the time left)"
    (parent,) = runs_of(store, "sweep")
    assert parent.data.metrics["brackets_skipped"] == 1 and parent.data.metrics["budget_used_seconds"] == 480
    assert parent.data.metrics["budget_minutes"] == 9.5 and "1 skipped" in parent.data.tags["lenet_sweep.budget"]

    # A promotion says what it loads, once, instead of Keras' warning
    (promoted,) = [r for r in result.rows if r["tuner/epochs"] == 3]
    said = [line for line in lines if " continues trial " in line]
    assert len(said) == 1 and said[0].startswith(f"trial {promoted['trial']} continues trial ")
    assert "'s weights from epoch 1 (its best) with a fresh optimizer (KerasTuner's checkpoint holds" in said[0]
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]

    # The budget is not part of what a resumed sweep must match: a rerun with another one goes on, and
    # plans with the costs the first run measured (nothing fits a minute)
    again = sweep.run_sweep(*compose_sweep([*base, "sweep.budget_minutes=1"]))
    assert again.resumed and len(again.rows) == 7 and again.budget["trials_timed"] == 0
    assert "no Hyperband bracket fits the 0:01:00 left" in again.budget["stopped_because"]
