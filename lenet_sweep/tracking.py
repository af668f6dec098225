"""MLflow: where runs go, what a run's params are, and the per-epoch logging callback."""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import time
import urllib.parse
from pathlib import Path
from typing import Any, Mapping, Optional

import keras
import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from lenet_sweep.errors import UserError

# The packages of the study's Table I, plus the ones our runs add.
TABLE_I_PACKAGES = ("tensorflow", "tensorflow-cpu", "keras", "keras-tuner", "mlflow", "hydra-core",
                    "numpy", "matplotlib", "pillow")


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


def loggable_config(cfg) -> dict[str, Any]:
    """The resolved config as a plain dict, with any password in `mlflow.tracking_uri` redacted."""
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["mlflow"]["tracking_uri"] = redact(resolved["mlflow"]["tracking_uri"])
    return resolved


def end_killed(client: MlflowClient, run_id: str, reason: str) -> None:
    """End a run its process can no longer end (it died) KILLED, saying why."""
    client.set_tag(run_id, "failure_reason", reason)
    client.set_terminated(run_id, "KILLED")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"model.filters": [6, 16], ...}, the form MLflow params take."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def package_versions() -> dict[str, str]:
    """Versions of Python, the packages of Table I and the device TensorFlow trains on."""
    import tensorflow as tf

    versions = {"python": platform.python_version()}
    for name in TABLE_I_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    gpus = tf.config.list_physical_devices("GPU")
    versions["device"] = f"{len(gpus)} GPU(s)" if gpus else f"CPU ({os.cpu_count()} cores)"
    return versions


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs each epoch's metrics and its duration to one MLflow run, in one batched call per epoch.

    Steps are 1-based epochs, as the study counts them. Metric names are Keras' (loss, val_accuracy,
    ...) after `prefix`; `seconds` adds up the time spent logging.
    """

    def __init__(self, client: MlflowClient, run_id: str, prefix: str = ""):
        super().__init__()
        self.client, self.run_id, self.prefix = client, run_id, prefix
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        row = {k: float(v) for k, v in (logs or {}).items()}
        row["epoch_seconds"] = time.perf_counter() - self._started
        self.history.append(row)
        started = time.perf_counter()
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(self.prefix + k, v, now, epoch + 1)
                                                    for k, v in row.items()], synchronous=True)
        self.seconds += time.perf_counter() - started


@contextlib.contextmanager
def tracked_run(**start_run_args):
    """`mlflow.start_run` whose run ends KILLED on an interrupt and FAILED, with the reason, on an error.

    (MLflow's own context manager marks both FAILED and records no reason.)
    """
    with mlflow.start_run(**start_run_args) as run:
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.set_tag("failure_reason", "interrupted (Ctrl-C or SIGTERM)")
            mlflow.end_run("KILLED")
            raise
        except Exception as err:
            mlflow.set_tag("failure_reason", f"{type(err).__name__}: {err}"[:4000])
            mlflow.end_run("FAILED")
            raise
