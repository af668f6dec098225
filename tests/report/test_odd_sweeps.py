"""The report on odd sweeps, fabricated straight into a temporary MLflow store (no training, no TensorFlow):
tiny sweeps, collapsed or failed trials, a single or an unset dimension, no `best` run, no histories.
Whatever the sweep, the report is written with every section, strict JSON, and a sentence where a
section has no evidence."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from conftest import REPO, SECTIONS, compose_config
from lenet_sweep.errors import UserError
from lenet_sweep.report import make_report

DATA_ROOT = "/data/odd"  # never read: the report reads the store only
# dimension -> (config key it sets, type); a sweep picks some. No class names: 10 classes, collapsed < 0.15.
DIMENSIONS = {
    "filters_1": ("model.filters.0", "choice"),
    "dense_1": ("model.dense.0", "choice"),
    "output_activation": ("model.output_activation", "choice"),
    "optimizer": ("optimizer", "choice"),
    "adam_learning_rate": ("optimizer.learning_rate", "float"),
}
NO_HISTORY_TO_COMPARE = (
    "no finished configuration outside the collapsed ones has a per-epoch history to compare budgets with"
)
NO_TURNING_POINT = "no run outside the collapsed ones has a per-epoch history to find a turning point in"


def unset(dimension: str) -> str:
    return f"no finished configuration outside the collapsed ones sets {dimension}"


@dataclass
class Trial:
    """A fabricated trial: its dimension values, best val accuracy, status and epochs of history."""

    values: dict[str, Any]
    score: float | None = 0.5
    status: str = "FINISHED"
    epochs: int = 4  # 0: no per-epoch metrics at all
    logs_config: bool = True  # a config.yaml artifact (older trials have only their params)
    tuner: dict[str, Any] = field(default_factory=dict)  # Hyperband's tuner/* values


def trial_config(t: Trial, seed: int) -> dict[str, Any]:
    """The training config the trial would have logged, with its dimensions applied."""
    v = t.values
    return {
        "data": {"root": DATA_ROOT, "test_fraction": 0.1, "limit_per_class": None},
        "model": {
            "name": "lenet_search",
            "filters": [v.get("filters_1", 6), 16],
            "conv_layers": None,
            "dense": [v.get("dense_1", 120), 84],
            "output_activation": v.get("output_activation", "softmax"),
        },
        "optimizer": {"name": v.get("optimizer", "Adam"), "learning_rate": v.get("adam_learning_rate", 0.001)},
        "train": {"epochs": 4},
        "seed": seed,
    }


def log_history(client: MlflowClient, run_id: str, epochs: int, best: float) -> None:
    """Per-epoch loss, accuracy, val_loss, val_accuracy (steps 1..epochs); val loss turns up at the end."""
    now = int(time.time() * 1000)
    metrics = []
    for step in range(1, epochs + 1):
        val_accuracy = best * step / epochs
        rows = {
            "loss": 2.3 / step,
            "accuracy": val_accuracy,
            "val_loss": 2.3 / step + (0.5 if step == epochs else 0),
            "val_accuracy": val_accuracy,
        }
        metrics += [Metric(key, value, now, step) for key, value in rows.items()]
    client.log_batch(run_id, metrics=metrics)


def log_run(client: MlflowClient, run_id: str, params: dict, config: dict | None, status: str) -> None:
    """A run's params (as text, as mlflow.log_params writes them), its config.yaml if any, its end."""
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])
    if config is not None:
        client.log_text(run_id, yaml.safe_dump(config), "config.yaml")
    client.set_terminated(run_id, status)


def fabricate(tmp: Path, dims: list[str], trials: list[Trial], tuner: str = "random", single_run: bool = False) -> str:
    """Sweep "odd" in experiment "odd" of a new SQLite store under `tmp`; returns the store's URI."""
    uri = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    (tmp / "store").mkdir(parents=True)
    client = MlflowClient(uri)
    exp = client.create_experiment("odd", artifact_location=(tmp / "store" / "artifacts").as_uri())
    parent = client.create_run(
        exp, tags={"lenet_sweep.kind": "sweep", "lenet_sweep.sweep": "odd", "tuner": tuner, "search": "odd"}
    ).info.run_id
    space = {"name": "odd", "space": {d: {"key": DIMENSIONS[d][0], "type": DIMENSIONS[d][1]} for d in dims}}
    client.log_text(parent, yaml.safe_dump(space), "search_space.yaml")
    data = {"data.root": DATA_ROOT, "data.test_fraction": 0.1, "data.limit_per_class": None}
    for i, t in enumerate(trials):
        run = client.create_run(
            exp,
            run_name=f"trial-{i}",
            tags={
                "mlflow.parentRunId": parent,
                "lenet_sweep.kind": "trial",
                "lenet_sweep.sweep": "odd",
                "lenet_sweep.trial_id": f"{i:04d}",
                "lenet_sweep.attempt": "1",
            },
        ).info.run_id
        if t.score is not None:
            client.log_metric(run, "best_val_accuracy", t.score)
        log_history(client, run, t.epochs, t.score or 0.0)
        params = {
            **data,
            "model.name": "lenet_search",
            "optimizer.name": t.values.get("optimizer", "Adam"),
            "train.epochs": 4,
            "seed": 1 + i,
            **t.values,
            **t.tuner,
        }
        log_run(client, run, params, trial_config(t, 1 + i) if t.logs_config else None, t.status)
    if single_run:
        run = client.create_run(exp, tags={"lenet_sweep.kind": "train", "model": "lenet5"}).info.run_id
        client.log_metric(run, "best_val_accuracy", 0.45)
        client.log_metric(run, "test_accuracy", 0.4)
        log_history(client, run, 3, 0.45)
        config = {
            "data": {"root": DATA_ROOT, "test_fraction": 0.1, "limit_per_class": None},
            "model": {"name": "lenet5", "filters": [6, 16], "output_activation": "softmax"},
            "optimizer": {"name": "SGD"},
            "train": {"epochs": 3},
            "seed": 0,
        }
        log_run(client, run, {**data, "model.name": "lenet5", "train.epochs": 3, "seed": 0}, config, "FINISHED")
    log_run(
        client,
        parent,
        {**data, "search.dimensions": ",".join(dims), "tuner.kind": tuner, "seed": 1, "tuner.executions_per_trial": 1},
        None,
        "FINISHED",
    )
    return uri


def report_config(uri: str, out: Path):
    return compose_config(
        "report", [f"mlflow.tracking_uri={uri}", "mlflow.experiment=odd", "sweep.name=odd", f"report.dir={out}"]
    )


ALL = ["filters_1", "dense_1", "output_activation", "adam_learning_rate"]
CASES = {
    "one trial": (
        ALL,
        [Trial({"filters_1": 6, "dense_1": 8, "output_activation": "softmax", "adam_learning_rate": 0.001})],
        ["adam_learning_rate (0.001 to 0.001, continuous): rank correlation with best val accuracy – (n=1)"],
    ),
    "two trials, one without config.yaml": (
        ALL,
        [
            Trial({"filters_1": 6, "dense_1": 8, "output_activation": "softmax", "adam_learning_rate": 0.001}),
            Trial(
                {"filters_1": 12, "dense_1": 16, "output_activation": "relu", "adam_learning_rate": 0.01},
                score=0.3,
                logs_config=False,
            ),
        ],
        ["adam_learning_rate (0.001 to 0.01, continuous): rank correlation with best val accuracy – (n=2)"],
    ),
    "three trials and a single run": (
        ALL,
        [
            Trial({"filters_1": f, "dense_1": 8, "output_activation": "softmax", "adam_learning_rate": lr}, score=s)
            for f, lr, s in ((6, 0.001, 0.5), (6, 0.003, 0.6), (12, 0.01, 0.4))
        ],
        [
            "lenet5 (SGD, softmax output, 3 epochs), single runs: 0 of 1 (0%) seeds collapsed to chance",
            "| lenet5 | sgd | 25 | 0.5136 | softmax | 3 | 0.4000 (n=1) | 0 |",
        ],
    ),
    "all trials collapsed": (
        ALL,
        [
            Trial({"filters_1": f, "dense_1": 8, "output_activation": "relu", "adam_learning_rate": lr}, score=0.1)
            for f, lr in ((6, 0.001), (12, 0.01), (6, 0.1))
        ],
        [
            unset("adam_learning_rate"),
            unset("filters_1"),
            unset("dense_1"),
            NO_HISTORY_TO_COMPARE,
            NO_TURNING_POINT,
            "output_activation=relu: 3 of 3 (100%) sweep configurations collapsed to chance",
        ],
    ),
    "a conditional dimension no trial sets": (
        ["optimizer", "adam_learning_rate", "dense_1"],
        [Trial({"optimizer": "SGD", "dense_1": d}, score=s) for d, s in ((8, 0.5), (16, 0.6), (8, 0.4))],
        [unset("adam_learning_rate")],
    ),
    "one dimension only": (
        ["dense_1"],
        [Trial({"dense_1": d}, score=s) for d, s in ((8, 0.5), (16, 0.6), (8, 0.4))],
        [
            "no dimension of this sweep varies it",
            "no dimension of this sweep sets the output activation, and no single run trained on its data",
        ],
    ),
    "a float dimension with one value": (
        ["adam_learning_rate", "dense_1"],
        [Trial({"adam_learning_rate": 0.001, "dense_1": d}, score=s) for d, s in ((8, 0.5), (16, 0.6), (32, 0.4))],
        ["adam_learning_rate (0.001 to 0.001, continuous): rank correlation with best val accuracy – (n=3)"],
    ),
    "runs without history": (
        ALL,
        [
            Trial(
                {"filters_1": f, "dense_1": 8, "output_activation": "softmax", "adam_learning_rate": 0.001},
                score=s,
                epochs=0,
            )
            for f, s in ((6, 0.5), (12, 0.6))
        ],
        [
            "no per-epoch history recorded",
            NO_HISTORY_TO_COMPARE,
            "validation loss turned up in 0 of 0 runs of at least 9 epochs; 2 shorter run(s) not counted",
        ],
    ),
    "failed trials beside finished ones": (
        ALL,
        [
            Trial({"filters_1": 6, "dense_1": 8, "output_activation": "softmax", "adam_learning_rate": 0.001}),
            Trial(
                {"filters_1": 12, "dense_1": 8, "output_activation": "softmax", "adam_learning_rate": 0.5},
                score=None,
                status="FAILED",
                epochs=1,
            ),
        ],
        ["1 more trial(s) failed (diverged or crashed)", "2 trials (1 finished, 1 failed)"],
    ),
    "hyperband rounds": (
        ["dense_1"],
        [
            Trial({"dense_1": 8}, epochs=2, tuner={"tuner/epochs": 2}),
            Trial(
                {"dense_1": 8}, score=0.6, tuner={"tuner/epochs": 4, "tuner/trial_id": "0000", "tuner/initial_epoch": 2}
            ),
            Trial({"dense_1": 16}, score=0.3, epochs=2, tuner={"tuner/epochs": 2}),
        ],
        ["Sweep configurations count with their fresh trial: 1 were continued over Hyperband rounds"],
    ),
}


def strict_json(text: str) -> Any:
    """`text` parsed as JSON, refusing NaN and Infinity (which Python's json would accept)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("case", list(CASES))
def test_an_odd_sweep_gets_every_section_and_says_where_evidence_is_missing(case, tmp_path):
    dims, trials, expected = CASES[case]
    uri = fabricate(
        tmp_path, dims, trials, tuner="hyperband" if "hyperband" in case else "random", single_run="single run" in case
    )
    result = make_report(report_config(uri, tmp_path / "out"))
    md = (result.dir / "report.md").read_text()
    for section in SECTIONS:
        assert f"## {section}" in md, section
    facts = strict_json((result.dir / "report.json").read_text())
    assert facts["sweep"]["trials"] == len(trials) and facts["multi_seed"] == {}
    assert "No best run yet." in md and "No data summary recorded for this sweep" in md
    for sentence in expected:
        assert sentence in md, sentence
    assert all((result.dir / "figures" / name).is_file() for name in facts["figures"])


def test_a_sweep_whose_trials_all_failed_is_refused_with_a_clear_message(tmp_path):
    uri = fabricate(tmp_path, ["dense_1"], [Trial({"dense_1": 8}, score=None, status="FAILED", epochs=1)] * 2)
    with pytest.raises(
        UserError,
        match=r"sweep 'odd' \(MLflow run \w+\) has no finished trial with a validation score \(trials: 2 FAILED\): "
        r"each failed .* run a sweep with other settings",
    ):
        make_report(report_config(uri, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_command_reports_a_sweep_whose_continuous_dimension_has_no_working_configuration(tmp_path):
    dims, trials, _ = CASES["all trials collapsed"]
    uri = fabricate(tmp_path, dims, trials)
    out = tmp_path / "my report"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lenet_sweep.report",
            "sweep.name=odd",
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=odd",
            f"report.dir={out}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"- {unset('adam_learning_rate')}" in (out / "report.md").read_text()


def test_the_report_does_not_import_tensorflow():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, lenet_sweep.report, lenet_sweep.report.__main__; "
            "sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
