"""One tracked training run, end to end, through the command lines users type."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, all_artifacts, compose_config, make_image_folder, run_cli, run_clis
from lenet_sweep.data import prepare_data
from lenet_sweep.tracking.store import open_store
from lenet_sweep.train import train_and_log

ARTIFACTS = {
    "config.yaml",
    "data/split_manifest.csv",
    "data/skipped_files.csv",
    "data/summary.json",
    "table_i_packages.json",
    "table_i_packages.md",
    "history.csv",
    "plots/loss.png",
    "plots/loss_magnified.png",
    "plots/accuracy.png",
    "plots/val_loss_vs_val_accuracy.png",
    "plots/sample_images.png",
    "plots/confusion_matrix.png",
    "evaluation/confusion_matrix.json",
    "model/model.keras",
    "model/labels.json",
    "model/preprocessing.json",
}


def test_train_command_records_exactly_one_complete_run(image_folder, store):
    result = run_cli(
        [
            "lenet_sweep.train",
            "model=lenet5",
            "optimizer=sgd",
            f"data.root={image_folder}",
            "data.limit_per_class=20",
            "train.epochs=2",
            "train.batch_size=32",
            "seed=0",
            f"mlflow.tracking_uri={store}",
            "mlflow.experiment=NAME",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 2/2" in result.stdout and "ETA" in result.stdout and "elapsed" in result.stdout

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("NAME")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == "lenet5" and params["optimizer.name"] == "SGD"
    assert params["train.epochs"] == "2" and params["seed"] == "0" and params["data.limit_per_class"] == "20"
    assert params["optimizer.learning_rate"] == "0.01" and params["model.filters"] == "[6, 16]"
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    metrics = run.data.metrics
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and np.isfinite(metrics["test_loss"])
    assert metrics["turning_point_epoch"] in (1, 2)
    assert metrics["skipped_files"] == 5  # truncated.JPEG, notes.jpg, README.txt, .DS_Store, the .cache folder
    assert all_artifacts(client, run.info.run_id) >= ARTIFACTS

    skipped = Path(client.download_artifacts(run.info.run_id, "data/skipped_files.csv")).read_text()
    assert "truncated.JPEG" in skipped and "notes.jpg" in skipped
    manifest = Path(client.download_artifacts(run.info.run_id, "data/split_manifest.csv")).read_text()
    assert manifest.count("\ntest,") == 6
    assert "cmyk.jpg,yes" in manifest and "truncated.JPEG,no" in manifest
    config = Path(client.download_artifacts(run.info.run_id, "model/config.yaml")).read_text()
    assert "filters:\n  - 6\n  - 16" in config or "filters: [6, 16]" in config

    import keras

    model = keras.saving.load_model(client.download_artifacts(run.info.run_id, "model/model.keras"), safe_mode=True)
    assert model.output_shape == (None, 3)


def test_default_store_is_embedded_and_hydra_leaves_no_files(image_folder, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli(
        ["lenet_sweep.train", f"data.root={image_folder}", "train.epochs=1", "data.limit_per_class=2"], cwd=work
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == ["mlruns"]
    assert (work / "mlruns" / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lenet_sweep").experiment_id])
    assert run.info.artifact_uri.startswith((work / "mlruns" / "artifacts").as_uri())


BAD_INPUT = [
    ("train.epochs=fail", "could not be converted to Integer"),
    ("model=resnet", "Could not find 'model/resnet'"),
    ("data.root=/nonexistent/folder", "error: data.root '/nonexistent/folder' is not a folder"),
    ("train.epochs=0", "error: train.epochs=0: must be at least 1"),
    ("model.output_activation=softplusplus", "error: model.output_activation='softplusplus' is not a Keras"),
    ("optimizer.momentum=[1,2]", "optimizer.momentum"),
]


def test_bad_input_fails_with_a_clear_message_and_records_nothing(image_folder, store):
    # The commands run at once, each into its own store (the default experiment's runs would mix otherwise).
    stores = [f"{store.removesuffix('.db')}-{i}.db" for i in range(len(BAD_INPUT))]
    results = run_clis(
        [
            ["lenet_sweep.train", f"data.root={image_folder}", f"mlflow.tracking_uri={uri}", override]
            for uri, (override, _) in zip(stores, BAD_INPUT)
        ]
    )
    for uri, (override, message), result in zip(stores, BAD_INPUT, results):
        assert result.returncode != 0, override
        assert message in result.stderr, (override, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, override
        if Path(uri.removeprefix("sqlite:///")).exists():
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name("lenet_sweep")
            assert experiment is None or not client.search_runs([experiment.experiment_id]), override


def compose_train(overrides: list[str]):
    return compose_config("train", overrides)


def test_same_seed_gives_the_same_metrics(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=6, n_val=5, messy=False)
    cfg = compose_train(
        [
            f"data.root={root}",
            "train.epochs=2",
            "train.batch_size=4",
            "seed=7",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 's' / 'mlflow.db'}",
        ]
    )
    exp = open_store(cfg.mlflow)
    prepared = prepare_data(cfg.data, cfg.model.input_size, cfg.seed)
    first = train_and_log(cfg, prepared, exp)
    second = train_and_log(cfg, prepared, exp)
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    assert [[r[k] for k in keys] for r in first.history] == [[r[k] for k in keys] for r in second.history]
    assert first.test_accuracy == second.test_accuracy


def test_diverging_run_is_marked_failed_with_its_reason(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=6, n_val=5, messy=False)
    cfg = compose_train(
        [
            f"data.root={root}",
            "train.epochs=5",
            "train.batch_size=4",
            "optimizer.learning_rate=1e12",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 's' / 'mlflow.db'}",
        ]
    )
    exp = open_store(cfg.mlflow)
    result = train_and_log(cfg, prepare_data(cfg.data, cfg.model.input_size, cfg.seed), exp)
    assert result.diverged
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FAILED"
    assert "NaN" in run.data.tags["failure_reason"]


def test_reproduce_prints_and_logs_table_ii(image_folder, store):
    result = run_cli(
        [
            "lenet_sweep.reproduce",
            f"data.root={image_folder}",
            "train.epochs=1",
            "data.limit_per_class=3",
            f"mlflow.tracking_uri={store}",
            "mlflow.experiment=repro",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Table II" in result.stdout and "0.5136" in result.stdout and "0.6321" in result.stdout
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("repro").experiment_id])
    parents = [r for r in runs if r.data.tags.get("lenet_sweep.kind") == "reproduce"]
    assert len(parents) == 1 and len(runs) == 3
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.params["model.name"] for r in children) == ["lenet5", "modified_lenet"]
    assert sorted(r.data.params["optimizer.name"] for r in children) == ["Adam", "SGD"]
    table = Path(client.download_artifacts(parents[0].info.run_id, "table_ii.md")).read_text()
    for child in children:
        assert f"{child.data.metrics['test_accuracy']:.4f}" in table


def test_killed_run_is_marked_killed_and_keeps_its_epochs(tmp_path, store):
    import signal
    import time

    root = make_image_folder(tmp_path / "d", n_train=40, n_val=5, size=64, messy=False)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lenet_sweep.train",
            "model=modified_lenet",
            "optimizer=adam",
            f"data.root={root}",
            "train.epochs=500",
            "train.batch_size=8",
            f"mlflow.tracking_uri={store}",
            "mlflow.experiment=killed",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    for line in proc.stdout:
        if line.startswith("epoch 2/500") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "KILLED" in err and "Traceback" not in err
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert run.info.status == "KILLED"
    assert "interrupted" in run.data.tags["failure_reason"]
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) >= 2


def test_reproduce_refuses_a_bad_override_before_training_anything(image_folder, store):
    # momentum is an SGD field: valid for LeNet-5's row, not for the modified LeNet's Adam
    result = run_cli(
        [
            "lenet_sweep.reproduce",
            f"data.root={image_folder}",
            "optimizer.momentum=0.9",
            f"mlflow.tracking_uri={store}",
            "mlflow.experiment=repro",
        ]
    )
    assert result.returncode != 0
    assert "error: the study row modified_lenet/adam cannot take these overrides" in result.stderr
    assert "epoch 1/" not in result.stdout and "Traceback" not in result.stderr


def test_cache_on_or_off_and_steps_per_execution_give_the_same_metrics(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=7, n_val=5, messy=False)
    base = [
        f"data.root={root}",
        "train.epochs=2",
        "train.batch_size=4",
        "seed=3",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 's' / 'mlflow.db'}",
    ]
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    results = []
    for overrides in (
        ["data.decode_cache=null", "train.steps_per_execution=1"],
        [f"data.decode_cache={tmp_path / 'c'}", "train.steps_per_execution=1"],  # builds it
        [f"data.decode_cache={tmp_path / 'c'}", "train.steps_per_execution=1"],  # loads it
        [f"data.decode_cache={tmp_path / 'c'}", "train.steps_per_execution=4"],
    ):  # 6 steps/epoch
        cfg = compose_train(base + overrides)
        prepared = prepare_data(cfg.data, cfg.model.input_size, cfg.seed)
        result = train_and_log(cfg, prepared, open_store(cfg.mlflow))
        results.append(([[r[k] for k in keys] for r in result.history], result.test_accuracy, result.test_loss))
    assert len(list((tmp_path / "c").iterdir())) == 3  # train, val, test at 32 px
    for history, accuracy, loss in results[1:]:
        np.testing.assert_allclose(history, results[0][0], rtol=1e-5, atol=1e-6)
        assert accuracy == results[0][1]
        assert loss == pytest.approx(results[0][2], rel=1e-5)
