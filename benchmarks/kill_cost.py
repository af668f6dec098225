"""What a kill -9 costs now that trainings resume from their last epoch: one `train` and one sweep on the
whole real data, each run whole and then killed halfway through an epoch and resumed, one after the other.

    .venv/bin/python benchmarks/kill_cost.py [DATA]   # default: ../shared/datasets/imagenette

For each, prints the wall seconds of the uninterrupted command, of the killed one (start to kill) and of the
resumed one, the compute lost to the kill (killed + resumed - uninterrupted: start-up, data loading and the part of
an epoch not backed up), the seconds the interrupted training had run before the kill (its MLflow run's
start to the kill), which restarting it from its first epoch redoes on top (what KerasTuner alone does
with a cut-off trial, and `train` without train.resume), and the largest difference between the resumed
and the uninterrupted run's per-epoch metrics. docs/RESULTS.md records what it printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", *args]


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TF_CPP_MIN_LOG_LEVEL": "2"}


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command(args), cwd=REPO, env=env(), check=True, capture_output=True)
    return time.perf_counter() - started


def killed(args: list[str], backups: str, root: Path, after: int) -> tuple[float, int, float]:
    """(seconds until kill -9, epochs backed up, when: time.time()); the kill comes half an epoch after a
    backup of `after` epochs appears."""
    started = time.perf_counter()
    proc = subprocess.Popen(command(args), cwd=REPO, env=env(), stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        seen = None
        while proc.poll() is None:
            for metadata in root.glob(backups):
                try:
                    epoch = json.loads(metadata.read_text())["epoch"]
                except (OSError, ValueError):
                    continue
                if epoch == after - 1 and seen is None:
                    seen = time.perf_counter()
                if epoch >= after and seen is not None:
                    time.sleep((time.perf_counter() - seen) / 2)  # half of the last epoch's time
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return time.perf_counter() - started, epoch, time.time()
            time.sleep(0.05)
        raise SystemExit(f"the command ended (exit {proc.returncode}) before a backup of {after} epochs")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def differences(client: MlflowClient, run_a: str, run_b: str) -> float:
    """The largest difference between two runs' per-epoch metrics."""
    worst = 0.0
    for key in EPOCH_METRICS:
        a = sorted((m.step, m.value) for m in client.get_metric_history(run_a, key))
        b = sorted((m.step, m.value) for m in client.get_metric_history(run_b, key))
        assert [s for s, _ in a] == [s for s, _ in b], f"{key}: steps differ"
        worst = max([worst, *(abs(x - y) for (_, x), (_, y) in zip(a, b))])
    return worst


def report(name: str, whole: float, cut: float, resumed: float, epoch: int, ran: float, diff: float) -> None:
    lost = cut + resumed - whole
    print(
        f"{name}: uninterrupted {whole:.1f}s; killed after {cut:.1f}s (epoch {epoch} backed up, half an epoch "
        f"more done), resumed in {resumed:.1f}s: lost to the kill {lost:.1f}s; the interrupted training had "
        f"run {ran:.1f}s, which a restart from epoch 1 would redo on top ({(lost + ran) / lost:.1f}x the loss); "
        f"largest per-epoch metric difference {diff:.2e}"
    )


def main(data: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="kill-cost-"))
    store = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(store)
    common = [f"data.root={data}", f"mlflow.tracking_uri={store}"]

    train = ["lenet_sweep.train", *common, "train.epochs=8", f"train.backup_dir={work / 'backups'}"]
    timed([*train, "train.epochs=1", "mlflow.experiment=warm-up"])  # every run below loads the decode cache
    whole = timed([*train, "mlflow.experiment=whole"])
    cut, epoch, at = killed([*train, "mlflow.experiment=cut"], "backups/*/state/*.json", work, 4)
    (interrupted,) = client.search_runs([client.get_experiment_by_name("cut").experiment_id])
    resumed = timed([*train, "mlflow.experiment=cut", "train.resume=true"])
    runs = [client.search_runs([client.get_experiment_by_name(e).experiment_id])[0] for e in ("whole", "cut")]
    diff = differences(client, *(r.info.run_id for r in runs))
    report("train (LeNet-5, 8 epochs)", whole, cut, resumed, epoch, at - interrupted.info.start_time / 1000, diff)

    more = ["search=tiny", "tuner=random", "tuner.max_trials=2", "train.epochs=8", "sweep.early_stopping_patience=null"]
    sweep = ["lenet_sweep.sweep", *common, *more, "mlflow.experiment=sweep", f"sweep.dir={work / 'state'}"]
    whole = timed([*sweep, "sweep.name=whole"])
    cut, epoch, at = killed([*sweep, "sweep.name=cut"], "state/cut/trial_1/backup/*/state/*.json", work, 4)
    experiment = client.get_experiment_by_name("sweep").experiment_id
    query = "tags.`lenet_sweep.sweep` = 'cut' and tags.`lenet_sweep.trial_id` = '1'"
    ran = at - client.search_runs([experiment], query)[0].info.start_time / 1000
    resumed = timed([*sweep, "sweep.name=cut"])
    diff = 0.0
    for trial in ("0", "1"):
        pair = [
            client.search_runs(
                [experiment], f"tags.`lenet_sweep.sweep` = '{n}' and tags.`lenet_sweep.trial_id` = '{trial}'"
            )
            for n in ("whole", "cut")
        ]
        assert all(len(p) == 1 for p in pair), "one run per trial"
        diff = max(diff, differences(client, pair[0][0].info.run_id, pair[1][0].info.run_id))
    report("sweep (2 trials of 8 epochs, killed in the second)", whole, cut, resumed, epoch, ran, diff)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(REPO.parent / "shared" / "datasets" / "imagenette"))
