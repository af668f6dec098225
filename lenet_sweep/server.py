"""The MLflow tracking server that distributed sweeps log to: `make mlflow-server` (`python -m lenet_sweep.server`).

MLflow's own `mlflow server`, bound to 127.0.0.1 unless server.host says otherwise, with served artifacts
(workers upload through it and need no shared disk). SQLite under mlruns/server/ by default, one writer at a
time; PostgreSQL when MLFLOW_BACKEND_STORE_URI=postgresql+psycopg://... is given. It has no login: keep it on
loopback or a private network, or put MLflow's basic-auth in front (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lenet_sweep import cli
from lenet_sweep.config import register_configs
from lenet_sweep.errors import UserError
from lenet_sweep.tracking.store import redact

DATABASES = ("sqlite", "postgresql", "postgresql+psycopg", "mysql", "mssql")


def server_command(settings) -> tuple[list[str], dict[str, str]]:
    """(the `mlflow server` command line, its environment) for `settings` (the config's `server`)."""
    store = settings.backend_store_uri or f"sqlite:///{Path('mlruns/server/mlflow.db').resolve()}"
    scheme = urllib.parse.urlsplit(store).scheme
    if scheme not in DATABASES:
        raise UserError(
            f"server.backend_store_uri={redact(store)!r}: give a database URI (sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/DB); MLflow's file store cannot take several writers"
        )
    if scheme == "postgresql":  # SQLAlchemy's bare scheme means psycopg2, which is not installed: psycopg 3 is
        store = "postgresql+psycopg" + store[len("postgresql") :]
    if scheme == "sqlite":
        Path(store[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    artifacts = settings.artifacts_destination
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = str(Path(artifacts).resolve())
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        store,
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--workers",
        str(settings.workers),
    ]
    if settings.app_name:
        command += ["--app-name", settings.app_name]
    # MLflow 3's server also runs background jobs (GenAI evaluation) unless told not to.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return command, env


def serve(cfg: DictConfig) -> None:
    s = cfg.server
    command, env = server_command(s)
    store = command[command.index("--backend-store-uri") + 1]
    login = f"login: {s.app_name}" if s.app_name else "no login: keep it on loopback or a private network"
    cli.exec_server(
        command,
        env,
        s.host,
        s.port,
        holder="another server",
        advice=f"give another, e.g. PORT={s.port + 1}",
        banner=(
            f"MLflow tracking server at http://{s.host}:{s.port} (runs in {redact(store)}, artifacts in "
            f"{command[command.index('--artifacts-destination') + 1]}); {login}. Runs log to it with "
            "mlflow.tracking_uri=http://HOST:PORT. Ctrl-C stops it."
        ),
    )


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="server")
def main(cfg: DictConfig) -> None:
    cli.guarded(lambda: serve(cfg))


if __name__ == "__main__":
    cli.quote_path_overrides(("server.backend_store_uri", "server.artifacts_destination"))
    main()
