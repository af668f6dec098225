"""The MLflow UI on the project's store: `make ui` (`python -m lenet_sweep.ui`).

The store is the one runs log to (train.yaml's mlflow.*, or env MLFLOW_TRACKING_URI); the UI is MLflow's
own server, bound to 127.0.0.1 unless ui.host says otherwise. Env PORT moves it.
"""

from __future__ import annotations

import os
import sys
import urllib.parse

import hydra
from omegaconf import DictConfig

from lenet_sweep import cli
from lenet_sweep.config import register_configs
from lenet_sweep.errors import UserError
from lenet_sweep.tracking.store import redact, resolve_store


def server_command(cfg: DictConfig) -> tuple[list[str], str]:
    """(the `mlflow server` command line for cfg's store, the URL it will serve)."""
    uri, artifacts = resolve_store(cfg.mlflow.tracking_uri, cfg.mlflow.store_dir)
    if urllib.parse.urlsplit(uri).scheme in ("http", "https", "databricks"):
        raise UserError(f"the store {redact(uri)} is a tracking server: open it in a browser, it is its own UI")
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        cfg.ui.host,
        "--port",
        str(cfg.ui.port),
        "--workers",
        "1",
    ]  # MLflow's default of 4 server processes is for machines beyond 2 cores
    if artifacts:  # where experiments created through the UI keep artifacts: beside the runs' own
        command += ["--default-artifact-root", artifacts, "--no-serve-artifacts"]
    return command, f"http://{cfg.ui.host}:{cfg.ui.port}"


def serve(cfg: DictConfig) -> None:
    command, url = server_command(cfg)
    cli.exec_server(
        command,
        {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"},  # a file store named by the user is meant
        cfg.ui.host,
        cfg.ui.port,
        holder="another MLflow UI",
        advice=f"give another, e.g. PORT={cfg.ui.port + 1} make ui",
        banner=f"MLflow UI for {redact(command[command.index('--backend-store-uri') + 1])} at {url} (Ctrl-C stops it)",
    )


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="ui")
def main(cfg: DictConfig) -> None:
    cli.guarded(lambda: serve(cfg))


if __name__ == "__main__":
    cli.quote_path_overrides(("mlflow.store_dir",))
    main()
