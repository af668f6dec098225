"""Nothing lost when a process dies: a killed `train` resumes from its last epoch in the same MLflow run, a
killed sweep goes on with its cut-off trial from that trial's last epoch, both to the numbers an
uninterrupted run gets; and two commands on one SQLite store never meet in the middle of a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, compose_config, compose_sweep, make_image_folder, run_cli, sweep_overrides
from lenet_sweep import trial
from lenet_sweep.errors import UserError
from lenet_sweep.tracking.store import exclusively
from lenet_sweep.trial import BACKUP_STATE, resume_point

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def kill_when(command: list[str], backup_glob: str, root: Path, epochs: int, limit: float = 300) -> tuple[int, Path]:
    """Start `python -m COMMAND`, kill -9 it once a backup under `root` matching `backup_glob` has `epochs`
    epochs; return (the epochs backed up when it died, that backup's folder). The process group dies in
    any case."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", *command],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            for metadata in root.glob(backup_glob):
                try:
                    done = json.loads(metadata.read_text())["epoch"]
                except (OSError, ValueError):  # being swapped in right now
                    continue
                if done >= epochs:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(30)
                    folder = metadata.parent.parent
                    return resume_point(folder), folder  # (another epoch may have ended before the kill)
            time.sleep(0.01)
        output = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
        pytest.fail(f"no backup of {epochs} epochs appeared (exit {proc.poll()}): {output[-2000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        proc.stdout.close()


def epoch_history(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Each per-epoch metric's (step, value) pairs, in logging order."""
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in EPOCH_METRICS}


def assert_same_epochs(resumed: dict, reference: dict, epochs: int) -> None:
    for key in EPOCH_METRICS:
        steps = [step for step, _ in resumed[key]]
        assert sorted(steps) == list(range(1, epochs + 1)), f"{key}: each epoch exactly once, got steps {steps}"
        np.testing.assert_allclose(
            [v for _, v in sorted(resumed[key])], [v for _, v in sorted(reference[key])], rtol=1e-6, err_msg=key
        )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("resume") / "data", n_train=30, n_val=10, size=32, messy=False)


def test_killed_train_resumes_from_its_last_epoch_in_the_same_run(folder, tmp_path):
    from lenet_sweep.train import run_one

    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    args = [
        f"data.root={folder}",
        "train.epochs=30",
        "train.batch_size=8",
        f"train.backup_dir={tmp_path / 'backups'}",
        f"mlflow.tracking_uri={store}",
    ]
    reference = run_one(compose_config("train", [*args, "mlflow.experiment=reference"]))

    killed_after, _ = kill_when(
        ["lenet_sweep.train", *args, "mlflow.experiment=e"], "backups/*/state/*.json", tmp_path, 4
    )
    client = MlflowClient(store)
    (cut,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert cut.info.status == "RUNNING"  # what kill -9 leaves; the resumed command takes it over
    assert 4 <= killed_after < 30

    result = run_cli(["lenet_sweep.train", *args, "mlflow.experiment=e", "train.resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming MLflow run {cut.info.run_id} after epoch {killed_after}" in result.stdout
    assert f"epoch {killed_after}/30" not in result.stdout and f"epoch {killed_after + 1}/30" in result.stdout

    (run,) = client.search_runs([cut.info.experiment_id])  # one run per training
    assert run.info.run_id == cut.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["lenet_sweep.resumed_at_epoch"] == str(killed_after)
    assert_same_epochs(epoch_history(client, run.info.run_id), epoch_history(client, reference.run_id), 30)
    for key in ("test_accuracy", "test_loss", "best_val_accuracy", "turning_point_epoch"):
        assert run.data.metrics[key] == pytest.approx(client.get_run(reference.run_id).data.metrics[key], rel=1e-6)
    assert not (tmp_path / "backups" / run.info.run_id).exists()  # removed once the run ended


class DiesAfterLogging(keras.callbacks.Callback):
    """Raises at the end of epoch `at` (1-based) after the MLflow logger logged it, before the backup."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.at:
            raise RuntimeError("died between logging an epoch and backing it up")


def test_an_epoch_logged_but_not_backed_up_is_trained_again_and_kept_once(folder, tmp_path):
    from lenet_sweep.data import prepare_data
    from lenet_sweep.tracking.store import open_store
    from lenet_sweep.train import cut_off_run, train_and_log

    cfg = compose_config(
        "train",
        [
            f"data.root={folder}",
            "train.epochs=5",
            "train.batch_size=8",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
        ],
    )
    prepared = prepare_data(cfg.data, cfg.model.input_size, cfg.seed)
    experiment = open_store(cfg.mlflow)
    backups = tmp_path / "backups"
    reference = train_and_log(cfg, prepared, experiment, backups=backups)
    with pytest.raises(RuntimeError, match="between logging"):
        train_and_log(cfg, prepared, experiment, backups=backups, callbacks=[DiesAfterLogging(3)])
    client = MlflowClient(cfg.mlflow.tracking_uri)
    cut = cut_off_run(client, experiment, cfg)  # FAILED, its backup (2 epochs) kept; 3 epochs logged
    assert cut.info.status == "FAILED" and resume_point(Path(cut.data.tags["lenet_sweep.backup"])) == 2

    with trial.holding(Path(cut.data.tags["lenet_sweep.backup"])):  # as if it still trained elsewhere
        with pytest.raises(UserError, match="still running in another process"):
            train_and_log(cfg, prepared, experiment, backups=backups, resume_run_id=cut.info.run_id)
    assert client.get_run(cut.info.run_id).info.status == "FAILED"  # refused before the run was touched

    resumed = train_and_log(cfg, prepared, experiment, backups=backups, resume_run_id=cut.info.run_id)
    assert resumed.run_id == cut.info.run_id and client.get_run(cut.info.run_id).info.status == "FINISHED"
    assert_same_epochs(epoch_history(client, cut.info.run_id), epoch_history(client, reference.run_id), 5)
    assert cut_off_run(client, experiment, cfg) is None  # it finished: nothing left to resume


def test_a_backup_cut_off_between_its_renames_is_still_found(tmp_path):
    old = tmp_path / f"{BACKUP_STATE}.old"
    old.mkdir()
    (old / "training_metadata.json").write_text('{"epoch": 7, "batch": 0}')
    assert resume_point(tmp_path) == 7 and (tmp_path / BACKUP_STATE).is_dir()
    assert resume_point(tmp_path / "none") == 0 and resume_point(None) == 0


def test_killed_sweep_goes_on_with_its_trial_from_the_last_epoch(folder, tmp_path):
    from lenet_sweep import sweep

    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    more = ("search=tiny", "tuner=random", "tuner.max_trials=2", "train.epochs=12", "sweep.early_stopping_patience=4")
    reference = sweep.run_sweep(*compose_sweep(sweep_overrides(folder, tmp_path / "ref", store, *more, name="ref")))

    args = sweep_overrides(folder, tmp_path, store, *more, name="cut")
    killed_after, folder = kill_when(
        ["lenet_sweep.sweep", *args], "state/cut/trial_*/backup/*/state/*.json", tmp_path, 3
    )
    killed_trial = folder.parent.parent.name.removeprefix("trial_")
    started = time.monotonic()
    result = run_cli(["lenet_sweep.sweep", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_seconds = time.monotonic() - started

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("sweep").experiment_id
    for row in reference.rows:
        query = f"tags.`lenet_sweep.sweep` = 'cut' and tags.`lenet_sweep.trial_id` = '{row['trial']}'"
        (run,) = client.search_runs([experiment], query)  # continued, not a second attempt
        assert run.info.status == "FINISHED" and run.data.tags["lenet_sweep.attempt"] == "1"
        epochs = int(run.data.metrics["epochs_run"])
        assert epochs == client.get_run(row["run_id"]).data.metrics["epochs_run"]
        assert_same_epochs(epoch_history(client, run.info.run_id), epoch_history(client, row["run_id"]), epochs)
        assert run.data.metrics["best_val_accuracy"] == pytest.approx(row["val_accuracy"], rel=1e-6)
    query = f"tags.`lenet_sweep.sweep` = 'cut' and tags.`lenet_sweep.trial_id` = '{killed_trial}'"
    assert client.search_runs([experiment], query)[0].data.tags["lenet_sweep.resumed_at_epoch"] == str(killed_after)
    assert not list((tmp_path / "state" / "cut").glob("trial_*/backup"))  # ended trials keep no backup
    print(f"resumed sweep: {resumed_seconds:.1f}s after a kill at epoch {killed_after}")


# ---- one writer per SQLite store ---------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    import fcntl

    cfg = compose_config("train", [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]).mlflow
    lock = os.open(tmp_path / "mlflow.db.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.write(lock, b"pid 4242 (sweep.py sweep.name=a, since 10:00:00)")
        with pytest.raises(UserError, match=r"in use by pid 4242 \(sweep.py sweep.name=a.*make mlflow-server"):
            exclusively(cfg, lambda: pytest.fail("ran beside another writer"))
    finally:
        os.close(lock)
    # Free again (the holder ended); a command inside a command takes it once; a server takes no lock.
    assert exclusively(cfg, lambda: exclusively(cfg, lambda: "inner")) == "inner"
    server = compose_config("train", ["mlflow.tracking_uri=http://127.0.0.1:1"]).mlflow
    assert exclusively(server, lambda: "served") == "served"


def test_two_sweeps_and_a_train_on_one_store_at_once(folder, tmp_path):
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    sweep_args = ["search=tiny", "tuner=random", "tuner.max_trials=1", "train.epochs=2"]
    commands = [
        ["lenet_sweep.sweep", *sweep_overrides(folder, tmp_path, store, *sweep_args, name="a")],
        ["lenet_sweep.sweep", *sweep_overrides(folder, tmp_path, store, *sweep_args, name="b")],
        ["lenet_sweep.train", f"data.root={folder}", "train.epochs=2", f"mlflow.tracking_uri={store}"],
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", *c], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c in commands
    ]
    try:
        outputs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    finished = 0
    for proc, (out, err) in zip(procs, outputs):
        assert "database is locked" not in out + err and "Traceback" not in err, err[-2000:]
        if proc.returncode == 0:
            finished += 1
        else:
            assert err.strip().splitlines()[-1].startswith("error: the MLflow store"), err[-2000:]
            assert "in use by pid" in err
    assert finished >= 1
    client = MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    kinds = sorted(r.data.tags["lenet_sweep.kind"] for r in runs)
    assert kinds.count("train") + kinds.count("sweep") == finished  # every command that ran recorded its run
