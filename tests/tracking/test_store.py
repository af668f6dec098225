"""tracking/store.py: where runs go and how commands that read find them again."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lenet_sweep.errors import UserError
from lenet_sweep.tracking import store


def test_passwords_in_the_tracking_uri_are_not_logged():
    assert store.redact("postgresql://me:s3cret@db:5432/mlflow") == "postgresql://me:***@db:5432/mlflow"
    assert store.redact("https://tracking.example/path") == "https://tracking.example/path"
    assert store.redact(None) is None


def test_the_embedded_store_and_sqlite_keep_artifacts_beside_the_database(tmp_path):
    uri, artifacts = store.resolve_store(None, str(tmp_path / "mlruns"))
    assert uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert artifacts == (tmp_path / "mlruns" / "artifacts").as_uri()
    uri, artifacts = store.resolve_store(f"sqlite:///{tmp_path / 'db' / 'x.db'}", "ignored")
    assert artifacts == (tmp_path / "db" / "artifacts").as_uri() and (tmp_path / "db").is_dir()
    assert store.resolve_store("http://127.0.0.1:5000", "ignored") == ("http://127.0.0.1:5000", None)


def test_commands_that_read_refuse_a_missing_store_or_experiment(tmp_path):
    cfg = OmegaConf.create({"tracking_uri": f"sqlite:///{tmp_path / 'none.db'}", "store_dir": "x", "experiment": "e"})
    with pytest.raises(UserError, match="no MLflow store at"):
        store.open_store(cfg, create=False)
    assert not (tmp_path / "none.db").exists()  # reading never creates a store
    cfg.tracking_uri = f"sqlite:///{tmp_path / 'made.db'}"
    made = store.open_store(cfg)  # a command that writes creates store and experiment
    assert MlflowClient(cfg.tracking_uri).get_experiment(made).name == "e"
    cfg.experiment = "other"
    with pytest.raises(UserError, match=r"no MLflow experiment 'other'.*experiments there: .*e"):
        store.open_store(cfg, create=False)


def test_all_runs_pages_through_every_run_oldest_first(tmp_path, monkeypatch):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    ids = [client.create_run(exp, start_time=1000 + i, tags={"k": "x"}).info.run_id for i in range(5)]
    real = client.search_runs
    monkeypatch.setattr(client, "search_runs", lambda *a, **kw: real(*a, **{**kw, "max_results": 2}))
    assert [r.info.run_id for r in store.all_runs(client, exp, "tags.k = 'x'")] == ids


def test_the_latest_sweep_is_the_one_started_last(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    for name, start in (("old", 1000), ("new", 2000), ("older", 500)):
        client.create_run(exp, start_time=start, tags={"lenet_sweep.kind": "sweep", "lenet_sweep.sweep": name})
    assert store.find_sweep(client, exp, None, "e").data.tags["lenet_sweep.sweep"] == "new"
    assert store.find_sweep(client, exp, "old", "e").data.tags["lenet_sweep.sweep"] == "old"
    with pytest.raises(UserError, match=r"no sweep named 'nope'.*new, old, older"):
        store.find_sweep(client, exp, "nope", "e")


def test_params_read_back_as_the_values_they_were_logged_from():
    assert [store.number(t) for t in ("3", "0.25", "True", "relu", None)] == [3, 0.25, True, "relu", None]
    assert store.quote("it's a\\b") == "it\\'s a\\\\b"


def test_an_experiment_created_by_another_process_meanwhile_is_used_not_an_error():
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException

    from lenet_sweep.tracking.store import experiment_id

    class Client:  # a worker and its chief both saw no experiment, and the chief created it first
        looked = 0

        def get_experiment_by_name(self, name):
            self.looked += 1
            return None if self.looked == 1 else SimpleNamespace(experiment_id="7", lifecycle_stage="active")

        def create_experiment(self, name, artifact_location=None):
            raise MlflowException(f"Experiment(name={name}) already exists.")

    assert experiment_id(Client(), "shared", None) == "7"
