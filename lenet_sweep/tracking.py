"""MLflow: what a run's params are, the per-epoch logging callback, runs that end cleanly (store.py: where
runs go)."""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import time
from typing import Any, Mapping

import keras
import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from lenet_sweep.store import redact

# The packages of the study's Table I, plus the ones our runs add.
TABLE_I_PACKAGES = ("tensorflow", "tensorflow-cpu", "keras", "keras-tuner", "mlflow", "hydra-core",
                    "numpy", "matplotlib", "pillow")


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
