"""What a run records and how it ends: its params and config, package versions, figures and tables as
artifacts, and runs that end KILLED or FAILED with their reason (store.py: where runs go)."""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import io
import os
import platform
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lenet_sweep import plots
from lenet_sweep.errors import place_message
from lenet_sweep.tracking.store import redact

if TYPE_CHECKING:
    from lenet_sweep.data import PreparedData

# The packages of the study's Table I, plus the ones our runs add.
TABLE_I_PACKAGES = (
    "tensorflow",
    "tensorflow-cpu",
    "keras",
    "keras-tuner",
    "mlflow",
    "hydra-core",
    "numpy",
    "matplotlib",
    "pillow",
)
CONFIG = "config.yaml"  # every run's resolved config, the one `best` and `report` read back
# What a training run's config.yaml holds: the config a hand-run `train` takes.
TRAIN_GROUPS = ("data", "model", "optimizer", "train", "mlflow", "seed")


def loggable_config(cfg, groups: Sequence[str] | None = None) -> dict[str, Any]:
    """The resolved config as a plain dict (only `groups`, if given), with any password in
    `mlflow.tracking_uri` redacted."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if groups is not None:
        resolved = {k: resolved[k] for k in groups if k in resolved}
    if "mlflow" in resolved:
        resolved["mlflow"]["tracking_uri"] = redact(resolved["mlflow"]["tracking_uri"])
    return resolved


def config_yaml(cfg, groups: Sequence[str] | None = TRAIN_GROUPS) -> str:
    """`cfg` as the config.yaml a run logs (see `loggable_config`)."""
    return OmegaConf.to_yaml(loggable_config(cfg, groups))


def end_killed(client: MlflowClient, run_id: str, reason: str) -> None:
    """End a run its process can no longer end (it died) KILLED, saying why."""
    client.set_tag(run_id, "failure_reason", reason)
    client.set_terminated(run_id, "KILLED")


def recorded_epochs(client: MlflowClient, run_id: str, prefix: str = "", first: int = 1) -> list[dict[str, float]]:
    """The per-epoch rows a run logged so far (steps first, first + 1, ... up to the first missing one),
    from its metric histories: what a resumed training carries on from. Metrics named `prefix`+name only."""
    by_step: dict[int, dict[str, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        if not key.startswith(prefix) or (not prefix and key.startswith("execution")):
            continue
        for metric in client.get_metric_history(run_id, key):
            if metric.step >= 1:
                by_step.setdefault(metric.step, {})[key[len(prefix) :]] = metric.value
    rows = []
    while first + len(rows) in by_step:
        rows.append(by_step[first + len(rows)])
    return rows


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


def csv_text(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A CSV table as text, for `log_text`."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def history_csv(rows: Sequence[Mapping[str, float]]) -> str:
    """Per-epoch rows as history.csv: an `epoch` column (1-based) and one column per metric."""
    keys = sorted({k for row in rows for k in row})
    return csv_text([[i + 1] + [row.get(k) for k in keys] for i, row in enumerate(rows)], ["epoch", *keys])


def log_figure(fig, path: str, client: MlflowClient | None = None, run_id: str | None = None) -> None:
    """Log a Matplotlib figure to the active run (or to `run_id`) and free it."""
    if client is not None and run_id is not None:
        client.log_figure(run_id, fig, path)
    else:
        mlflow.log_figure(fig, path)
    fig.clear()


@contextlib.contextmanager
def tracked_run(**start_run_args):
    """`mlflow.start_run` whose run ends KILLED on an interrupt and FAILED, with the reason, on an error.

    (MLflow's own context manager marks both FAILED and records no reason.)
    """
    if start_run_args.get("tags"):  # a tracking server takes strings only (a local store converts)
        start_run_args["tags"] = {k: str(v) for k, v in start_run_args["tags"].items()}
    with mlflow.start_run(**start_run_args) as run:
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.set_tag("failure_reason", "interrupted (Ctrl-C or SIGTERM)")
            mlflow.end_run("KILLED")
            raise
        except Exception as err:
            mlflow.set_tag("failure_reason", (place_message(err) or f"{type(err).__name__}: {err}")[:4000])
            mlflow.end_run("FAILED")
            raise


MANIFEST_COLUMNS = ("split", "class", "path", "decoded")  # data/split_manifest.csv


def split_manifest(prepared: PreparedData) -> list[tuple[str, str, str, str]]:
    """(split, class folder, relative path, "yes"/"no" decoded) of every listed file: data/split_manifest.csv."""
    skipped = {(split, path) for split, path, _ in prepared.skipped}
    return [
        (split, cls, path, "no" if (split, path) in skipped else "yes")
        for split, cls, path in prepared.splits.manifest_rows()
    ]


def log_data_check(prepared: PreparedData, grid: int, seed: int) -> None:
    """What the data was and what ran it: split manifest, skipped files, class counts per split (listed,
    and decoded where decoded), package versions (the study's Table I), a grid x grid sample of images."""
    mlflow.log_text(csv_text(split_manifest(prepared), MANIFEST_COLUMNS), "data/split_manifest.csv")
    mlflow.log_text(csv_text(prepared.skipped, ("split", "path", "reason")), "data/skipped_files.csv")
    counts = {
        split: np.bincount(d.labels, minlength=len(prepared.names)).tolist() for split, d in prepared.decoded.items()
    }
    listed = {
        split: np.bincount(f.labels, minlength=len(prepared.names)).tolist()
        for split, f in prepared.splits.files.items()
    }
    mlflow.log_dict(
        {
            "classes": prepared.splits.classes,
            "names": prepared.names,
            "counts": counts,
            "listed": listed,
            "skipped": len(prepared.skipped),
        },
        "data/summary.json",
    )
    versions = package_versions()
    mlflow.log_dict(versions, "table_i_packages.json")
    mlflow.log_text(
        "| package | version |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in versions.items()),
        "table_i_packages.md",
    )
    train = prepared.decoded["train"]
    n = min(grid**2, len(train.labels))
    pick = np.random.default_rng(seed).choice(len(train.labels), n, replace=False)
    log_figure(
        plots.image_grid(train.images[pick], [prepared.names[train.labels[i]] for i in pick], grid, "training images"),
        "plots/sample_images.png",
    )


def log_confusion(confusion: np.ndarray, classes: Sequence[str], names: Sequence[str], title: str) -> None:
    log_figure(plots.confusion_figure(confusion, names, title), "plots/confusion_matrix.png")
    mlflow.log_dict(
        {"classes": list(classes), "names": list(names), "matrix": confusion.tolist()},
        "evaluation/confusion_matrix.json",
    )
