"""tracking/runs.py: what a run records and how it ends."""

from __future__ import annotations

import csv
import io

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lenet_sweep.tracking import runs


@pytest.fixture
def experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri), MlflowClient(uri).create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    mlflow.set_tracking_uri(None)


def test_a_run_ends_killed_on_an_interrupt_and_failed_with_its_reason_on_an_error(experiment):
    client, exp = experiment
    with pytest.raises(KeyboardInterrupt), runs.tracked_run(experiment_id=exp) as run:
        raise KeyboardInterrupt
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED" and "interrupted" in killed.data.tags["failure_reason"]
    with pytest.raises(ValueError), runs.tracked_run(experiment_id=exp) as run:
        raise ValueError("bad value")
    failed = client.get_run(run.info.run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["failure_reason"] == "ValueError: bad value"
    runs.end_killed(client, client.create_run(exp).info.run_id, "its process died")
    (dead,) = [r for r in client.search_runs([exp]) if r.data.tags.get("failure_reason") == "its process died"]
    assert dead.info.status == "KILLED"


def test_the_logged_config_is_the_train_groups_with_the_password_redacted():
    cfg = OmegaConf.create(
        {
            "data": {"root": "/d"},
            "model": {"filters": [6, 16]},
            "optimizer": {"name": "SGD"},
            "train": {"epochs": 2},
            "seed": 3,
            "search": {"space": {}},
            "mlflow": {"tracking_uri": "postgresql://me:s3cret@db/m", "experiment": "e"},
        }
    )
    logged = OmegaConf.create(runs.config_yaml(cfg))
    assert set(logged) == {"data", "model", "optimizer", "train", "mlflow", "seed"}  # no search, tuner, sweep
    assert logged.mlflow.tracking_uri == "postgresql://me:***@db/m" and list(logged.model.filters) == [6, 16]
    assert runs.flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": None}) == {"a.b": 1, "a.c.d": [2], "e": None}


def test_history_csv_has_one_row_per_epoch_and_a_column_per_metric():
    rows = list(csv.DictReader(io.StringIO(runs.history_csv([{"loss": 2.0, "val_loss": 2.5}, {"loss": 1.0}]))))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0] == {"epoch": "1", "loss": "2.0", "val_loss": "2.5"} and rows[1]["val_loss"] == ""
