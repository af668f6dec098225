"""`make distributed-demo DATA=DIR` (`python -m lenet_sweep.demo data.root=DIR`): a distributed sweep on
127.0.0.1, checked. An MLflow tracking server, a chief and `demo.workers` workers (each its own process
group, one thread each) run `demo.trials` trials; then one line per check, and a non-zero exit if any fails.
Every process it started is stopped at the end, also on failure or Ctrl-C.

`Cluster` starts and stops the processes; `checks` reads what MLflow and KerasTuner recorded. The tests
(tests/test_distributed.py) and the scaling benchmark (benchmarks/distributed_scaling.py) drive the same two.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig

from lenet_sweep import cli
from lenet_sweep.config import register_configs
from lenet_sweep.errors import UserError
from lenet_sweep.tracking.store import redact

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Processes of one distributed sweep on this machine, each in its own process group with its output
    in `<work>/logs/<name>.log`; `stop` (also on leaving a `with`) ends every one still running."""

    def __init__(self, work: Path, sweep_args: list[str], chief_port: Optional[int] = None):
        self.work = work.resolve()
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.chief = f"127.0.0.1:{chief_port or free_port()}"
        self.sweep_args = sweep_args
        self.procs: dict[str, subprocess.Popen] = {}
        self.tracking_uri = ""

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self, name: str) -> str:
        path = self.work / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, name: str, args: list[str], env: Optional[dict] = None) -> subprocess.Popen:
        env = {k: v for k, v in (env or os.environ).items() if k != "MLFLOW_TRACKING_URI"}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.work / "logs" / f"{name}.log", "a") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self.procs[name]

    def start_server(self, backend_store_uri: Optional[str], timeout: float = 120) -> str:
        """An MLflow tracking server (lenet_sweep.server) on a free loopback port; its URI once it answers."""
        port = free_port()
        store = backend_store_uri or f"sqlite:///{self.work / 'server' / 'mlflow.db'}"
        self.start(
            "server",
            [
                "-m",
                "lenet_sweep.server",
                f"server.port={port}",
                f"server.backend_store_uri={store}",
                f"server.artifacts_destination={self.work / 'server' / 'artifacts'}",
            ],
        )
        self.tracking_uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["server"].poll() is not None:
                raise RuntimeError(f"the MLflow server exited: {self.log('server')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=5):
                    return self.tracking_uri
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"the MLflow server did not answer within {timeout:.0f} s: {self.log('server')[-2000:]}")

    def start_chief(self, name: str = "chief", *more: str) -> subprocess.Popen:
        """A chief; `more` overrides go last, so they win over the cluster's own."""
        return self.start(name, self._sweep(["sweep.role=chief"], more))

    def start_worker(self, worker_id: str, *more: str, name: str = "") -> subprocess.Popen:
        return self.start(name or worker_id, self._sweep(["sweep.role=worker", f"sweep.worker_id={worker_id}"], more))

    def _sweep(self, role: list[str], more: tuple[str, ...]) -> list[str]:
        return [
            "-m",
            "lenet_sweep.sweep",
            *role,
            f"sweep.chief={self.chief}",
            f"mlflow.tracking_uri={self.tracking_uri}",
            *self.sweep_args,
            *more,
        ]

    def wait(self, names: list[str], timeout: float) -> dict[str, Optional[int]]:
        """Each process's exit code once all have exited, or None for those still running at `timeout`."""
        deadline = time.monotonic() + timeout
        for name in names:
            try:
                self.procs[name].wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        return {name: self.procs[name].poll() for name in names}

    def wait_for(self, name: str, text: str, timeout: float) -> bool:
        """Whether `text` appears in process `name`'s output within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(name):
                return True
            if self.procs[name].poll() is not None:
                return text in self.log(name)
            time.sleep(0.5)
        return False

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.procs[name].pid, sig)
        except ProcessLookupError:
            pass
        self.procs[name].wait(timeout=60)

    def stop(self) -> None:
        """SIGTERM to every process group still running, SIGKILL to those alive 15 s later."""
        running = [p for p in self.procs.values() if p.poll() is None]
        for p in running:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        for p in running:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)


def checks(
    tracking_uri: str, experiment: str, sweep_name: str, state: Path, trials: int, exits: dict[str, Optional[int]]
) -> list[tuple[bool, str]]:
    """(passed, line) for each check of a finished distributed sweep."""
    from mlflow.tracking import MlflowClient

    from lenet_sweep.tracking.artifacts import Artifacts
    from lenet_sweep.tracking.store import quote, trial_runs

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    query = f"tags.`lenet_sweep.kind` = 'sweep' and tags.`lenet_sweep.sweep` = '{quote(sweep_name)}'"
    parents = client.search_runs([found.experiment_id], query) if found else []
    results = []
    shown = ", ".join(f"{n}={'running' if rc is None else rc}" for n, rc in exits.items())
    results.append((all(rc == 0 for rc in exits.values()), f"every process exited 0 ({shown})"))
    oracle = state / "oracle.json"
    run_times = json.loads(oracle.read_text()).get("run_times", {}) if oracle.exists() else {}
    statuses = {
        path.parent.name[len("trial_") :]: json.loads(path.read_text()).get("status")
        for path in state.glob("trial_*/trial.json")
    }
    once = len(statuses) == trials and all(run_times.get(t) == 1 for t in statuses)
    results.append(
        (once, f"every trial ran exactly once: {len(statuses)}/{trials} trials, KerasTuner's run counts {run_times}")
    )
    if len(parents) != 1:
        results.append((False, f"one MLflow parent run for sweep {sweep_name!r}: found {len(parents)}"))
        return results
    parent = parents[0]
    children = trial_runs(client, found.experiment_id, parent.info.run_id)
    finished = Counter(r.data.tags.get("lenet_sweep.trial_id") for r in children if r.info.status == "FINISHED")
    ended = Counter(
        r.data.tags.get("lenet_sweep.trial_id") for r in children if r.info.status in ("FINISHED", "FAILED")
    )
    running = [r.info.run_id for r in children if r.info.status == "RUNNING"]
    # Exactly once: one FINISHED run per trial and no FAILED one beside it; cut-off attempts end KILLED.
    ok = set(finished) == set(statuses) and all(n == 1 for n in ended.values()) and ended == finished and not running
    killed = sum(r.info.status == "KILLED" for r in children)
    results.append(
        (
            ok and parent.info.status == "FINISHED",
            f"each trial has exactly one FINISHED MLflow run under the one parent {parent.info.run_id} "
            f"({parent.info.status}): {dict(sorted(finished.items()))}, {killed} cut-off attempt(s) KILLED, "
            f"{len(running)} left RUNNING",
        )
    )
    ranking = Artifacts(client).text(parent.info.run_id, "sweep/ranking.csv") or ""
    ranked = {row["trial"] for row in csv.DictReader(io.StringIO(ranking))}
    results.append(
        (ranked == set(statuses) and bool(ranked), f"the chief's ranking covers every trial: {sorted(ranked)}")
    )
    return results


def run_demo(cfg: DictConfig) -> int:
    d = cfg.demo
    if not cfg.data.root:
        raise UserError("give the data folder: make distributed-demo DATA=DIR (or data.root=DIR)")
    work = Path(d.dir).expanduser().resolve() / time.strftime("%Y%m%d-%H%M%S")
    name = "demo"
    sweep_args = [
        f"data.root={cfg.data.root}",
        f"tuner={d.tuner}",
        f"tuner.max_trials={d.trials}",
        f"data.limit_per_class={d.limit_per_class}",
        f"mlflow.experiment={d.experiment}",
        f"sweep.name={name}",
        f"sweep.dir={work / 'state'}",
        f"sweep.threads={d.threads}",
        f"data.decode_threads={d.threads}",
        *d.sweep_overrides,
    ]
    with Cluster(work, sweep_args) as cluster:
        uri = cluster.start_server(d.backend_store_uri)
        print(f"MLflow server {uri} (runs in {redact(d.backend_store_uri) or 'SQLite'}); logs in {work / 'logs'}")
        cluster.start_chief()
        workers = [f"w{i}" for i in range(d.workers)]
        for worker in workers:
            cluster.start_worker(worker)
        print(f"chief on {cluster.chief}, workers {', '.join(workers)}: {d.trials} trials ({d.tuner})")
        exits = cluster.wait(["chief", *workers], 60 * d.timeout_minutes)
        results = checks(uri, d.experiment, name, work / "state" / name, d.trials, exits)
    for ok, line in results:
        print(f"{'ok  ' if ok else 'FAIL'}  {line}")
    if not all(ok for ok, _ in results):
        print(f"see the logs in {work / 'logs'}")
        return 1
    return 0


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    sys.exit(cli.guarded(lambda: run_demo(cfg)))


if __name__ == "__main__":
    cli.quote_path_overrides(("data.root", "demo.dir"))
    main()
