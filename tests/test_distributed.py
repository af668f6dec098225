"""Distributed sweeps: KerasTuner's chief/worker mode as distributed.py hardens it, on an MLflow server
backed by a real PostgreSQL.

The first tests pin, in-process and in seconds, the KerasTuner behaviour distributed.py works around
(../shared/PITFALLS.md, Distributed); the rest start real processes (a tracking server, a chief, workers),
each in its own process group, every wait bounded, everything killed at the end also on failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import keras_tuner as kt
import pytest
from keras_tuner.src.engine import oracle as oracle_module
from mlflow.tracking import MlflowClient

from conftest import REPO, make_image_folder
from lenet_sweep import distributed
from lenet_sweep.demo import Cluster, checks, free_port
from lenet_sweep.errors import UserError

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
MINUTES = 60
# make ARGS for the demo: seconds-long trials (the tiny search space, widened to the demo's 4 trials)
TINY_TRIALS = (
    """demo.sweep_overrides='["search=tiny","search.space.dense_1.values=[8,16,32,64]","""
    """"train.epochs=2","train.batch_size=8"]'"""
)


# ---- KerasTuner's behaviour, pinned ------------------------------------------------------------


def _oracle(tmp_path: Path, max_trials: int = 3) -> kt.oracles.RandomSearchOracle:
    oracle = kt.oracles.RandomSearchOracle(objective=kt.Objective("score", "max"), max_trials=max_trials, seed=1)
    oracle._set_project_dir(str(tmp_path), "p")
    hp = kt.HyperParameters()
    hp.Int("x", 0, 1000)
    oracle.update_space(hp)
    return oracle


class _Context:
    """The part of a gRPC servicer context the servicer reads: the caller's metadata."""

    def __init__(self, worker: str = "", heartbeat: bool = False):
        self.metadata = [(distributed.WORKER_KEY, worker)] + ([(distributed.HEARTBEAT_KEY, "1")] if heartbeat else [])

    def invocation_metadata(self):
        return self.metadata


def test_kerastuner_reload_queues_running_trials_again_and_restore_gives_them_back(tmp_path):
    oracle = _oracle(tmp_path)
    a, b = oracle.create_trial("w0"), oracle.create_trial("w1")
    oracle.save()
    again = _oracle(tmp_path)
    again.reload()
    # KerasTuner: both running trials wait in the retry queue, for whichever worker asks next.
    assert sorted(again._retry_queue) == sorted([a.trial_id, b.trial_id]) and again.ongoing_trials == {}
    leases = distributed.Leases(60)
    back = distributed.restore_ongoing(again, Path(again._get_oracle_fname()), leases)
    assert back == {"w0": a.trial_id, "w1": b.trial_id} and again._retry_queue == []
    assert again.create_trial("w0").trial_id == a.trial_id  # w0 keeps its own trial
    assert again.create_trial("w2").trial_id not in (a.trial_id, b.trial_id)  # a newcomer gets a new one


def test_kerastuner_leaves_its_lock_held_after_an_error_and_oracle_lock_does_not(tmp_path):
    oracle = _oracle(tmp_path)
    with pytest.raises(KeyError):
        oracle.update_trial("no-such-trial", {"score": 1.0})  # @synchronized, no try/finally
    assert oracle_module.LOCKS[oracle].locked()  # held for ever by a thread that moved on
    oracle_module.THREADS[oracle] = None
    oracle_module.LOCKS[oracle].release()
    with pytest.raises(KeyError), distributed.oracle_lock(oracle):
        oracle.update_trial("no-such-trial", {"score": 1.0})
    assert not oracle_module.LOCKS[oracle].locked()


def test_a_dead_workers_trial_goes_to_the_next_worker_and_its_late_report_is_ignored(tmp_path):
    oracle = _oracle(tmp_path)
    leases = distributed.Leases(0.2)
    ended = []
    servicer = distributed.ChiefServicer(oracle, leases, lambda trial, worker: ended.append((trial.trial_id, worker)))

    def create(worker):
        request = distributed.protos.get_service().CreateTrialRequest(tuner_id=worker)
        return kt.engine.trial.Trial.from_proto(servicer.CreateTrial(request, _Context(worker)).trial)

    first = create("w0")
    # KerasTuner alone: the same worker id gets its trial back, any other id never does.
    assert oracle.create_trial("w0").trial_id == first.trial_id
    time.sleep(0.3)
    assert distributed.take_back_lapsed(oracle, leases) == [("w0", first.trial_id)]
    heartbeat = distributed.protos.get_service().GetTrialRequest(trial_id=first.trial_id)
    lost = servicer.GetTrial(heartbeat, _Context("w0", heartbeat=True)).trial
    assert kt.engine.trial.Trial.from_proto(lost).status == "STOPPED"  # w0 is told to stop training it
    second = create("w1")
    assert second.trial_id == first.trial_id and second.status == "RUNNING"
    report = first
    report.status = "COMPLETED"
    oracle.update_trial(report.trial_id, {"score": 0.5})
    servicer.EndTrial(
        distributed.protos.get_service().EndTrialRequest(trial=report.to_proto()),
        _Context("w0"),
    )
    assert ended == [] and oracle.ongoing_trials["w1"].trial_id == first.trial_id  # w0 no longer owns it
    servicer.EndTrial(distributed.protos.get_service().EndTrialRequest(trial=report.to_proto()), _Context("w1"))
    assert ended == [(first.trial_id, "w1")] and oracle.trials[first.trial_id].status == "COMPLETED"


def test_the_end_waits_while_a_trial_is_out_and_idle_workers_sleep(tmp_path):
    oracle = _oracle(tmp_path, max_trials=1)
    servicer = distributed.ChiefServicer(oracle, distributed.Leases(60), lambda *_: None)
    request = distributed.protos.get_service().CreateTrialRequest
    assert servicer.CreateTrial(request(tuner_id="w0"), _Context("w0")).trial.status == (
        kt.engine.trial.TrialStatus.to_proto("RUNNING")
    )
    # KerasTuner would say STOPPED to w1 now, and w1 would exit though w0's trial may still come back.
    reply = kt.engine.trial.Trial.from_proto(servicer.CreateTrial(request(tuner_id="w1"), _Context("w1")).trial)
    assert reply.status == "IDLE" and "w1" in oracle.tuner_ids and not servicer.stop_triggered
    # An idle worker waits before asking again (KerasTuner's loop asks at once): its next call is later.
    client = distributed.WorkerOracle.__new__(distributed.WorkerOracle)
    client._idle, client.idle_max = 0, distributed.IDLE_SLEEP[1]
    idle = kt.engine.trial.Trial(oracle.get_space(), status="IDLE")
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed.OracleClient, "create_trial", lambda self, tuner_id: idle)
        client.create_trial("w1")
        client.create_trial("w1")
    assert time.monotonic() - started >= distributed.IDLE_SLEEP[0] * 3 - 0.05


def test_grpc_shares_a_port_by_default_and_a_second_chief_is_refused():
    port = free_port()
    first = grpc.server(distributed.futures.ThreadPoolExecutor(max_workers=1))
    second = grpc.server(distributed.futures.ThreadPoolExecutor(max_workers=1))
    try:  # gRPC's default SO_REUSEPORT: two servers on one port, workers split between them
        assert first.add_insecure_port(f"127.0.0.1:{port}") == port
        assert second.add_insecure_port(f"127.0.0.1:{port}") == port
    finally:
        first.stop(None).wait()
        second.stop(None).wait()
    port = free_port()
    held = distributed.bind("127.0.0.1", port)
    try:
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}.*another chief"):
            distributed.bind("127.0.0.1", port)
    finally:
        held.stop(None)


def test_role_settings_are_checked_and_set_kerastuners_variables():
    from keras_tuner.src.distribute import utils

    class S:
        role, chief, worker_id, overwrite = "worker", "127.0.0.1:8000", None, False

    with pytest.raises(UserError, match="needs sweep.worker_id"):
        distributed.check_role(S)
    S.worker_id = "mychief1"
    with pytest.raises(UserError, match="containing 'chief'"):
        distributed.check_role(S)
    S.worker_id, S.overwrite = "w0", True
    with pytest.raises(UserError, match="overwrite"):
        distributed.check_role(S)
    S.overwrite, S.chief = False, "nohost"
    with pytest.raises(UserError, match="HOST:PORT"):
        distributed.check_role(S)
    with distributed.kerastuner_role("chief", "10.0.0.5:8123", None):
        assert utils.is_chief_oracle() and os.environ["KERASTUNER_ORACLE_PORT"] == "8123"
    with distributed.kerastuner_role("worker", "10.0.0.5:8123", "w3"):
        assert utils.has_chief_oracle() and not utils.is_chief_oracle()
        assert os.environ["KERASTUNER_TUNER_ID"] == "w3"
    assert not utils.has_chief_oracle()  # restored


def test_heartbeats_beat_per_epoch_and_stop_a_trial_whose_lease_is_lost():
    beats = []

    class Oracle:
        def holds(self, trial_id, timeout):
            beats.append(trial_id)
            return len(beats) < 3

    beat = distributed.Heartbeat(Oracle(), "07", lease_seconds=40).start()
    beat.on_train_begin()
    try:
        for epoch in range(3):
            beat.on_epoch_end(epoch)
            deadline = time.monotonic() + 5
            while len(beats) <= epoch and time.monotonic() < deadline:
                time.sleep(0.01)
        assert beats == ["07", "07", "07"]  # one per epoch, long before lease/4 = 10 s
        with pytest.raises(distributed.LeaseLost, match="trial 07: the chief gave it to another worker"):
            beat.on_train_batch_end(0)
    finally:
        beat.on_train_end()
        beat.stop()
    assert not any(t.name == "lenet-sweep-heartbeat" for t in threading.enumerate())


# ---- real processes: PostgreSQL, a tracking server, a chief, workers ---------------------------


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL cluster on a free loopback port (as the postgres user: it refuses root)."""
    if not PG_BIN:
        pytest.skip("PostgreSQL is not installed here (make postgres installs Debian's)")
    bin_dir = Path(PG_BIN[-1])
    root = Path(tempfile.mkdtemp(prefix="lenet-sweep-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    if as_postgres:
        shutil.chown(root, "postgres")
    port = free_port()
    data = root / "data"
    try:
        _run([*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        _run(
            [
                *as_postgres,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "server.log"),
                "-o",
                f"-p {port} -h 127.0.0.1 -k {root}",
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        _run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"])
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            [*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """One MLflow tracking server on that PostgreSQL for the module's sweeps (each its own experiment)."""
    with Cluster(tmp_path_factory.mktemp("server"), []) as holder:
        yield holder.start_server(postgres, timeout=3 * MINUTES)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("dist") / "data", n_train=20, n_val=10, size=36, messy=False)


def _sweep_args(folder: Path, work: Path, name: str, *more: str) -> list[str]:
    return [
        f"data.root={folder}",
        f"data.decode_cache={work / 'cache'}",
        "data.limit_per_class=20",
        f"mlflow.experiment={name}",
        f"sweep.name={name}",
        f"sweep.dir={work / 'state'}",
        "search=tiny",
        "search.space.dense_1.values=[8,12,16,24,32,48,64]",
        "train.batch_size=8",
        "train.epochs=2",
        "sweep.threads=1",
        "data.decode_threads=1",
        "sweep.lease_seconds=10",
        *more,
    ]


def _check(cluster: Cluster, name: str, work: Path, trials: int, exits) -> list[str]:
    results = checks(cluster.tracking_uri, name, name, work / "state" / name, trials, exits)
    failed = [line for ok, line in results if not ok]
    assert not failed, "\n".join(failed) + "\n" + "\n".join(f"--- {n}\n{cluster.log(n)[-3000:]}" for n in exits)
    return [line for _, line in results]


def test_make_distributed_demo_runs_on_postgresql_and_stops_what_it_started(postgres, folder, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"MLFLOW_BACKEND_STORE_URI": postgres}
    done = subprocess.run(
        ["make", "-s", "distributed-demo", f"DATA={folder}", f"ARGS=demo.dir={tmp_path} {TINY_TRIALS}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=12 * MINUTES,
        start_new_session=True,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    for check in ("every process exited 0", "every trial ran exactly once", "exactly one FINISHED", "ranking covers"):
        assert any(line.startswith("ok") and check in line for line in out.splitlines()), out[-3000:]
    assert "(runs in postgresql+psycopg://" in out
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert not leftover.strip(), f"processes left running: {leftover}"


def test_a_killed_worker_loses_its_trial_to_another_and_a_restarted_chief_hands_out_nothing_twice(
    server, folder, tmp_path
):
    name = "killed"
    args = _sweep_args(
        folder,
        tmp_path,
        name,
        "tuner=bayesian",
        "tuner.max_trials=4",
        "train.epochs=12",
        "train.steps_per_execution=1",
        "train.batch_size=4",
        "sweep.early_stopping_patience=null",
    )
    with Cluster(tmp_path, args) as cluster:
        cluster.tracking_uri = server
        cluster.start_chief()
        cluster.start_worker("w0")
        cluster.start_worker("w1")
        assert cluster.wait_for("w0", "started", 3 * MINUTES), cluster.log("w0")[-3000:]
        time.sleep(2)  # mid-trial
        cluster.kill("w0")  # kill -9: no goodbye, its MLflow run left RUNNING
        assert cluster.wait_for("chief", "cut off: worker w0 sent no heartbeat", 2 * MINUTES), cluster.log("chief")
        cluster.kill("chief")  # and the chief too, while w1 trains
        cluster.start_chief("chief2")
        cluster.start_worker("w0", name="w0-again")  # the same id continues
        exits = cluster.wait(["chief2", "w1", "w0-again"], 6 * MINUTES)
        lines = _check(cluster, name, tmp_path, 4, exits)
    assert "resuming sweep" in cluster.log("chief2")
    assert "1 cut-off attempt(s) KILLED" in lines[2] or "2 cut-off attempt(s) KILLED" in lines[2]
    client = MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], "attributes.status = 'KILLED'")
    reasons = [r.data.tags.get("failure_reason", "") for r in runs]
    assert any("worker w0 sent no heartbeat for 10 s" in r for r in reasons), reasons
    assert all(r.data.tags.get("lenet_sweep.worker") == "w0" for r in runs)  # only the dead worker's runs


def test_hyperband_refuses_a_second_chief_a_mismatched_worker_and_one_without_the_shared_dir(server, folder, tmp_path):
    name = "hyperband"
    args = _sweep_args(folder, tmp_path, name, "tuner=hyperband", "tuner.max_epochs=3", "tuner.factor=3")
    with Cluster(tmp_path, args) as cluster:
        cluster.tracking_uri = server
        cluster.start_chief()
        assert cluster.wait_for("chief", "serving KerasTuner's oracle", 3 * MINUTES), cluster.log("chief")
        cluster.start_chief("chief-twice")
        cluster.start_worker("odd", "train.batch_size=16")
        cluster.start_worker("elsewhere", f"sweep.dir={tmp_path / 'not-shared'}")
        refused = cluster.wait(["chief-twice", "odd", "elsewhere"], 4 * MINUTES)
        assert all(rc not in (0, None) for rc in refused.values()), refused
        assert f"cannot listen on {cluster.chief}" in cluster.log("chief-twice")
        refusal = "error: worker odd is refused: its config differs from the chief's (train.batch_size: chief 8"
        assert f"{refusal}, this worker 16)" in cluster.log("odd")
        assert "tuner=hyperband: a worker continues trials from checkpoints" in cluster.log("elsewhere")
        cluster.start_worker("w0")
        cluster.start_worker("w1")
        exits = cluster.wait(["chief", "w0", "w1"], 6 * MINUTES)
        trials = len(list((tmp_path / "state" / name).glob("trial_*/trial.json")))
        assert trials >= 4
        _check(cluster, name, tmp_path, trials, exits)
    assert "refused" not in cluster.log("w0")


def test_the_tracking_server_command_binds_loopback_serves_artifacts_and_takes_postgresql(tmp_path):
    from omegaconf import OmegaConf

    from lenet_sweep import server as server_module

    settings = OmegaConf.create(
        {
            "host": "127.0.0.1",
            "port": 5001,
            "backend_store_uri": None,
            "artifacts_destination": str(tmp_path / "a"),
            "app_name": None,
            "workers": 1,
        }
    )
    command, env = server_module.server_command(settings)
    assert command[command.index("--host") + 1] == "127.0.0.1" and "--serve-artifacts" in command
    assert command[command.index("--backend-store-uri") + 1].startswith("sqlite:///")
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false" and "--app-name" not in command
    settings.backend_store_uri, settings.app_name = "postgresql://u:secret@db:5432/mlflow", "basic-auth"
    command, _ = server_module.server_command(settings)
    assert command[command.index("--backend-store-uri") + 1] == "postgresql+psycopg://u:secret@db:5432/mlflow"
    assert command[command.index("--app-name") + 1] == "basic-auth"
    settings.backend_store_uri = str(tmp_path / "runs")
    with pytest.raises(UserError, match="give a database URI"):
        server_module.server_command(settings)
