"""Where runs go and how commands that read find them again: the MLflow store, the experiment, a sweep's
parent run and its trials. Light (no TensorFlow), for `ui` and `report` too."""

from __future__ import annotations

import fcntl
import os
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import mlflow
from mlflow.exceptions import MlflowException
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


T = TypeVar("T")
_held: dict[str, tuple[int, int]] = {}  # lock file -> (its descriptor, how many `exclusively` calls hold it)


def exclusively(mlflow_cfg: Any, work: Callable[[], T]) -> T:
    """Run `work` as the only command writing to a SQLite store (the embedded one included), or refuse.

    SQLite takes one writer at a time: two commands logging at once fail with "database is locked" in
    the middle of a run. A command takes the store's lock file (`<db>.lock`, an flock the kernel drops when
    the process ends, however it ends) before it writes anything; a second command is refused at once,
    naming the first. Servers (http, PostgreSQL behind them) take any number of writers: no lock.
    """
    uri, _ = resolve_store(mlflow_cfg.tracking_uri, mlflow_cfg.store_dir)
    if urllib.parse.urlsplit(uri).scheme != "sqlite":
        return work()
    path = str(Path(uri.split("sqlite:///", 1)[-1]).resolve()) + ".lock"
    if path in _held:  # this process holds it already (a command inside a command)
        fd, depth = _held[path]
        _held[path] = (fd, depth + 1)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 500, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"the MLflow store {uri} is in use by {holder}, and SQLite takes one writer at a time: wait "
                "for it to end, give this command a store of its own (mlflow.store_dir or mlflow.tracking_uri), "
                "or log both to a tracking server (make mlflow-server)"
            ) from None
        command = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:300]
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({command}, since {time.strftime('%H:%M:%S')})".encode(), 0)
        _held[path] = (fd, 1)
    try:
        return work()
    finally:
        fd, depth = _held.pop(path)
        if depth > 1:
            _held[path] = (fd, depth - 1)
        else:
            os.close(fd)  # closing the descriptor releases the flock


def experiment_id(client: MlflowClient, name: str, artifact_location: Optional[str]) -> str:
    """The id of experiment `name`, created (with `artifact_location`) if it does not exist yet."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise UserError(
                f"MLflow experiment {name!r} is deleted: restore it "
                f"(mlflow experiments restore) or choose another mlflow.experiment"
            )
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # Another process (a distributed sweep's chief or worker) created it between the two calls.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def redact(uri: Optional[str]) -> Optional[str]:
    """`uri` with any password replaced by ***, fit to be logged."""
    if not uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def open_store(mlflow_cfg: Any, create: bool = True) -> str:
    """Point MLflow at the configured store; return the experiment's id (created if new, unless
    `create` is False: then a missing store or experiment is an error, for commands that read)."""
    if not create:
        where = mlflow_cfg.tracking_uri or f"sqlite:///{Path(mlflow_cfg.store_dir).expanduser().resolve()}/mlflow.db"
        if where.startswith("sqlite:///") and not Path(where[len("sqlite:///") :]).is_file():
            raise UserError(
                f"no MLflow store at {where}: give the sweep's mlflow.tracking_uri "
                "(or mlflow.store_dir), or run the sweep first"
            )
    uri, artifact_location = resolve_store(mlflow_cfg.tracking_uri, mlflow_cfg.store_dir)
    if urllib.parse.urlsplit(uri).scheme in ("", "file"):
        # MLflow 3 refuses its file store unless asked; a user who names one has asked.
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    if not create and client.get_experiment_by_name(mlflow_cfg.experiment) is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise UserError(
            f"no MLflow experiment {mlflow_cfg.experiment!r} in {redact(uri)} (experiments "
            f"there: {known}): give the sweep's mlflow.experiment"
        )
    return experiment_id(client, mlflow_cfg.experiment, artifact_location)


def find_sweep_run(client: MlflowClient, experiment_id: str, name: str, state: Optional[Path] = None):
    """The latest parent run of sweep `name` in the experiment (kept in `state`, if given), or None."""
    query = f"tags.`lenet_sweep.kind` = 'sweep' and tags.`lenet_sweep.sweep` = '{quote(name)}'"
    if state is not None:
        query += f" and params.`sweep.state_dir` = '{quote(str(state))}'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def find_sweep(client: MlflowClient, experiment_id: str, name: Optional[str], experiment: str):
    """Sweep `name`'s latest parent run (name None: the latest sweep of any name), or a UserError listing
    the sweeps there are."""
    if name is not None:
        parent = find_sweep_run(client, experiment_id, name)
    else:
        runs = client.search_runs(
            [experiment_id], "tags.`lenet_sweep.kind` = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1
        )
        parent = runs[0] if runs else None
    if parent is None:
        runs = client.search_runs([experiment_id], "tags.`lenet_sweep.kind` = 'sweep'", max_results=200)
        known = sorted({r.data.tags.get("lenet_sweep.sweep", "?") for r in runs})
        wanted = f"no sweep named {name!r}" if name is not None else "no sweep"
        raise UserError(
            f"{wanted} in MLflow experiment {experiment!r} (sweeps there: "
            f"{', '.join(known) or 'none'}): give sweep.name=NAME of a sweep you ran"
        )
    return parent


def all_runs(client: MlflowClient, experiment_id: str, query: str) -> list:
    """Every run of the experiment that `query` (an MLflow search filter) selects, oldest first."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], query, order_by=["attributes.start_time ASC"], max_results=1000, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    """Every child run of a sweep, oldest first."""
    return all_runs(client, experiment_id, f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def latest_best(client: MlflowClient, experiment_id: str, sweep_run_id: str, finished: bool = False):
    """The latest `best` run of a sweep (only a FINISHED one if `finished`), or None."""
    query = f"tags.`lenet_sweep.kind` = 'best' and tags.`lenet_sweep.sweep_run_id` = '{sweep_run_id}'" + (
        " and attributes.status = 'FINISHED'" if finished else ""
    )
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def latest_attempts(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """Each trial's latest attempt (its MLflow run), by trial id."""
    return {
        run.data.tags.get("lenet_sweep.trial_id", run.info.run_id): run
        for run in trial_runs(client, experiment_id, parent_run_id)
    }


def quote(text: str) -> str:
    """`text` as a string literal inside an MLflow search filter."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def number(text: Optional[str]) -> Any:
    """A param as MLflow holds it (text) back as the int, float or bool it was logged from."""
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)
