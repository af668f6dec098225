"""Where runs go: the MLflow store and experiment a config names. Light (no TensorFlow), for `ui` too."""
from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Optional

from mlflow.tracking import MlflowClient

from lenet_sweep.errors import UserError


def resolve_store(tracking_uri: Optional[str], store_dir: str) -> tuple[str, Optional[str]]:
    """(tracking URI, artifact location for new experiments) for a run.

    No URI: the embedded store, `<store_dir>/mlflow.db` (SQLite) with artifacts in
    `<store_dir>/artifacts`. A SQLite URI keeps its artifacts beside its database file. A plain path
    or `file:` URI is MLflow's file store. Servers (http, https, databricks) choose their own artifact
    location.
    """
    if not tracking_uri:
        store = Path(store_dir).expanduser().resolve()
        store.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
    scheme = urllib.parse.urlsplit(tracking_uri).scheme
    if scheme == "sqlite":
        db = Path(tracking_uri.split("sqlite:///", 1)[-1])
        db.parent.mkdir(parents=True, exist_ok=True)
        return tracking_uri, (db.resolve().parent / "artifacts").as_uri()
    return tracking_uri, None


def experiment_id(client: MlflowClient, name: str, artifact_location: Optional[str]) -> str:
    """The id of experiment `name`, created (with `artifact_location`) if it does not exist yet."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment {name!r} is deleted: restore it "
                             f"(mlflow experiments restore) or choose another mlflow.experiment")
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def redact(uri: Optional[str]) -> Optional[str]:
    """`uri` with any password replaced by ***, fit to be logged."""
    if not uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
