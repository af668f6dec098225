"""tracking/artifacts.py: reading back what runs recorded (configs, histories, files)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lenet_sweep.config import Pooling
from lenet_sweep.errors import UserError
from lenet_sweep.tracking.artifacts import Artifacts, config_from_params


def test_a_trials_recorded_params_rebuild_its_config():
    params = {
        "data.root": "/data/1e5",
        "data.class_names.a.b": "x",
        "model.filters": "[32, 64]",
        "model.dropout": "0.25",
        "model.conv_layers": "None",
        "train.keras_verbose": "0",
        "optimizer.name": "Adam",
        "optimizer.beta_1": "0.8",
        "seed": "3",
        "lr": "0.001",
        "optimizer": "adam",
        "tuner/epochs": "9",
    }
    cfg = config_from_params(params)
    assert cfg.data.root == "/data/1e5" and cfg.data.class_names == {"a.b": "x"}
    assert list(cfg.model.filters) == [32, 64] and cfg.model.dropout == 0.25 and cfg.model.conv_layers is None
    assert cfg.train.keras_verbose == "0" and cfg.optimizer.beta_1 == 0.8 and cfg.seed == 3


def test_every_trial_logs_the_config_a_hand_run_train_takes(tiny_sweep):
    client = MlflowClient(tiny_sweep["store"])
    artifacts = Artifacts(client)
    for run_id in tiny_sweep["trials"].values():
        run = client.get_run(run_id)
        logged = artifacts.config(run)
        assert set(logged) == {"data", "model", "optimizer", "train", "mlflow", "seed"}
        assert logged["model"]["dense"][0] == int(run.data.params["dense_1"])  # the trial's value is in it
        assert logged["train"]["epochs"] == 2 and logged["seed"] == 0
        typed = artifacts.train_config(run)  # typed by the schema: closed sets are Enums
        assert typed.model.pooling is Pooling.max and typed.model.pooling == "max"
        # the params path reads the same config back (runs recorded before config.yaml)
        legacy = OmegaConf.to_container(config_from_params(run.data.params), enum_to_str=True)
        assert {k: legacy[k] for k in ("data", "model", "optimizer", "train", "seed")} == {
            k: logged[k] for k in ("data", "model", "optimizer", "train", "seed")
        }


def test_a_recorded_config_that_the_schema_refuses_is_a_clear_error(tiny_sweep, tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(exp)
    client.log_text(run.info.run_id, "model: {pooling: mean}\n", "config.yaml")
    with pytest.raises(UserError, match=f"run {run.info.run_id}'s recorded config does not fit"):
        Artifacts(client).train_config(client.get_run(run.info.run_id))


def test_a_config_rebuilt_from_params_leaves_out_what_the_run_did_not_record(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(exp)
    client.log_param(run.info.run_id, "model.name", "lenet5")
    rebuilt = Artifacts(client).config(client.get_run(run.info.run_id))
    assert rebuilt["model"]["name"] == "lenet5" and "filters" not in rebuilt["model"] and rebuilt["mlflow"] == {}


def test_a_history_reads_from_history_csv_else_from_per_epoch_metrics(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    with_csv, without = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    client.log_text(with_csv, "epoch,loss,val_accuracy\n1,2.0,0.5\n2,1.5,\n", "history.csv")
    for step, value in ((1, 0.25), (2, 0.5)):
        client.log_metric(without, "val_accuracy", value, step=step)
    artifacts = Artifacts(client)
    history = artifacts.history(with_csv)
    assert history[0] == {"loss": 2.0, "val_accuracy": 0.5} and history[1]["loss"] == 1.5
    assert artifacts.history(without) == [{"val_accuracy": 0.25}, {"val_accuracy": 0.5}]
    assert artifacts.raw(without, "absent.txt") is None and artifacts.csv(without, "absent.csv") == []
