"""Does a distributed sweep scale? The same trials with 1 and with 2 single-thread workers, one run after
the other against one MLflow tracking server, on this machine.

    .venv/bin/python benchmarks/distributed_scaling.py [DATA] [TRIALS]   # default: ../shared/datasets/imagenette, 8

Random search with one seed hands out the same trials in the same order whatever the number of workers, so
both runs train the same models. Prints, for each: wall seconds from the chief's start to the last exit,
seconds from the first trial's start to the last trial's end (MLflow's run times), trials per minute on
both, the chief's seconds per trial inside its gRPC calls (metric chief_seconds_per_trial), and the ratio
of 2 workers to 1. docs/RESULTS.md records what it printed.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from lenet_sweep.demo import Cluster, checks
from lenet_sweep.tracking.store import trial_runs

REPO = Path(__file__).resolve().parent.parent


def one_run(server: str, work: Path, data: str, workers: int, trials: int) -> dict:
    name = f"scale{workers}"
    args = [
        f"data.root={data}",
        "data.limit_per_class=20",
        "tuner=random",
        "tuner.seed=1",
        f"tuner.max_trials={trials}",
        f"mlflow.experiment={name}",
        f"sweep.name={name}",
        f"sweep.dir={work / 'state'}",
        "sweep.threads=1",
        "data.decode_threads=1",
    ]
    with Cluster(work, args) as cluster:
        cluster.tracking_uri = server
        started = time.perf_counter()
        cluster.start_chief()
        names = [f"w{i}" for i in range(workers)]
        for worker in names:
            cluster.start_worker(worker)
        exits = cluster.wait(["chief", *names], 3 * 3600)
        wall = time.perf_counter() - started
        failed = [line for ok, line in checks(server, name, name, work / "state" / name, trials, exits) if not ok]
    if failed:
        raise SystemExit(f"{workers} worker(s): " + "; ".join(failed))
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name(name).experiment_id
    (parent,) = client.search_runs([experiment], "tags.`lenet_sweep.kind` = 'sweep'")
    runs = [r for r in trial_runs(client, experiment, parent.info.run_id) if r.info.status == "FINISHED"]
    span = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    keys = ("model.conv_layers", "model.filters", "model.dense", "optimizer.name", "train.epochs")
    values = sorted(" ".join(str(r.data.params.get(k)) for k in keys) for r in runs)
    return {
        "workers": workers,
        "trials": len(runs),
        "wall_seconds": round(wall, 1),
        "trial_span_seconds": round(span, 1),
        "trials_per_minute_wall": round(60 * len(runs) / wall, 3),
        "trials_per_minute_span": round(60 * len(runs) / span, 3),
        "chief_seconds_per_trial": round(parent.data.metrics.get("chief_seconds_per_trial", float("nan")), 4),
        "trials_run": values,
    }


def main() -> None:
    data = sys.argv[1] if len(sys.argv) > 1 else str(REPO.parent / "shared" / "datasets" / "imagenette")
    trials = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    work = Path(tempfile.mkdtemp(prefix="lenet-sweep-scaling-"))
    with Cluster(work / "server", []) as holder:
        server = holder.start_server(None)
        one = one_run(server, work / "one", data, 1, trials)
        print(json.dumps(one))
        two = one_run(server, work / "two", data, 2, trials)
        print(json.dumps(two))
    same = one["trials_run"] == two["trials_run"]
    print(
        f"{trials} trials: 1 worker {one['wall_seconds']:.0f} s wall ({one['trial_span_seconds']:.0f} s of trials), "
        f"2 workers {two['wall_seconds']:.0f} s wall ({two['trial_span_seconds']:.0f} s of trials); "
        f"speed-up {one['wall_seconds'] / two['wall_seconds']:.2f}x wall, "
        f"{one['trial_span_seconds'] / two['trial_span_seconds']:.2f}x trials; chief overhead "
        f"{one['chief_seconds_per_trial'] * 1000:.1f} / {two['chief_seconds_per_trial'] * 1000:.1f} ms per trial; "
        f"same trials in both runs: {same}"
    )


if __name__ == "__main__":
    main()
