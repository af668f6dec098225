"""The sweep report: built from a tiny sweep (with its `best` run and single runs), every section present,
every number checked against what the store holds, computed here independently of lenet_sweep.report."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import (
    REPO,
    SECTIONS,
    compose_config,
    compose_sweep,
    make_image_folder,
    run_cli,
    runs_of,
    sweep_overrides,
)
from lenet_sweep import best, report, sweep, train
from lenet_sweep.errors import UserError
from lenet_sweep.report import document as report_doc
from lenet_sweep.report import facts as report_facts
from lenet_sweep.tracking import store
from lenet_sweep.tracking.artifacts import Artifacts

# Output activation (the study's question; ReLU collapses) and a dense width: four configurations.
SPACE = {
    "output_activation": {"key": "model.output_activation", "type": "choice", "values": ["softmax", "relu"]},
    "dense_1": {"key": "model.dense.0", "type": "choice", "values": [8, 16]},
}


def compose_report(more: list[str]):
    return compose_config("report", more)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A finished 4-trial sweep, its `best` run (2 configurations x 2 seeds) and two single LeNet-5 runs
    (seeds 0 and 1) in one store: (store URI, data folder, tmp folder)."""
    tmp = tmp_path_factory.mktemp("report")
    data = make_image_folder(tmp / "data", n_train=16, n_val=10, size=36)  # messy: 2 files skipped
    uri = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    cfg, optimizers = compose_sweep(
        sweep_overrides(data, tmp, uri, "tuner=random", "tuner.max_trials=4", "train.epochs=4", name="r")
    )
    cfg.search.space = SPACE
    result = sweep.run_sweep(cfg, optimizers)
    assert len(result.rows) == 4
    best_cfg = compose_config(
        "best",
        [
            "sweep.name=r",
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=sweep",
            "best.top_k=2",
            "best.seeds=2",
            f"export.dir={tmp / 'export'}",
            "export.registered_model=null",
        ],
    )
    best.run_best(best_cfg)
    for seed in (0, 1):
        train.run_one(
            compose_config(
                "train",
                [
                    f"data.root={data}",
                    f"mlflow.tracking_uri={uri}",
                    "mlflow.experiment=sweep",
                    "model=lenet5",
                    "optimizer=sgd",
                    f"seed={seed}",
                    "train.epochs=3",
                    "train.batch_size=8",
                ],
            )
        )
    return uri, data, tmp


def spread(values: list[float]) -> str:
    """mean ± sample std (n=N), or the one value (n=1): how the report writes a spread."""
    if len(values) == 1:
        return f"{values[0]:.4f} (n=1)"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} (n={len(values)})"


def _history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_the_report_command_answers_each_question_with_numbers_from_the_store(swept, tmp_path):
    uri, data, _ = swept
    out = tmp_path / "my report"  # a space in the path, as typed
    done = run_cli(
        [
            "lenet_sweep.report",
            "sweep.name=r",
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=sweep",
            f"report.dir={out}",
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    facts = json.loads((out / "report.json").read_text())
    for section in SECTIONS:
        assert f"## {section}" in md or f"# {section}" in md, section
        assert f">{section.replace('&', '&amp;')}</h" in page, section
    # self-contained: every figure of the Markdown is embedded in the HTML, nothing is fetched
    figures = re.findall(r"\]\(figures/([^)]+)\)", md)
    assert {
        "output_activation.png",
        "curves_1.png",
        "val_accuracy_vs_hyperparameters.png",
        "confusion_matrix.png",
        "sample_images.png",
    } <= set(figures)
    assert all((out / "figures" / f).is_file() for f in figures)
    assert page.count('src="data:image/png;base64,') == len(figures)
    assert not re.search(r'(src|href)="(?!data:)', page)
    for encoded, name in zip(re.findall(r'src="data:image/png;base64,([^"]+)"', page), figures):
        png = base64.b64decode(encoded)
        assert png == (out / "figures" / name).read_bytes()
        assert Image.open(io.BytesIO(png)).size[0] > 100
    # logged to the sweep's parent run, as written
    client = MlflowClient(uri)
    parent = store.find_sweep_run(client, client.get_experiment_by_name("sweep").experiment_id, "r")
    for name in ("report.md", "report.html", "report.json"):
        logged = client.download_artifacts(parent.info.run_id, f"report/{name}", str(tmp_path / "dl"))
        assert Path(logged).read_bytes() == (out / name).read_bytes()

    # ---- the numbers, recomputed from the store ----
    trials = [r for r in runs_of(uri, "trial")]
    classes = 3
    threshold = 1 / classes + 0.05
    by_config: dict[tuple, float] = {}
    for t in trials:
        key = (t.data.params["output_activation"], t.data.params["dense_1"])
        by_config[key] = max(by_config.get(key, -1.0), t.data.metrics["best_val_accuracy"])
    assert f"{len(trials)} trials ({len(trials)} finished" in md
    for activation in ("relu", "softmax"):
        scores = [v for (a, _), v in by_config.items() if a == activation]
        if not scores:
            continue
        collapsed = sum(v < threshold for v in scores)
        assert (
            f"output_activation={activation}: {collapsed} of {len(scores)} "
            f"({100 * collapsed / len(scores):.0f}%) sweep configurations collapsed"
        ) in md
        assert f"best val accuracy {spread(scores)}" in md
    working = {k: v for k, v in by_config.items() if v >= threshold}
    for width in ("8", "16"):
        scores = [v for (_, w), v in working.items() if w == width]
        if scores:  # value | configurations | trials | failed trials | best val accuracy
            assert f"| {width} | {len(scores)} | {len(scores)} | 0 | {spread(scores)} |" in md

    # Table II: the two single LeNet-5 runs over their seeds, beside the study's 0.5136
    singles = [r for r in runs_of(uri, "train") if r.data.params["model.name"] == "lenet5"]
    tests = [r.data.metrics["test_accuracy"] for r in singles]
    assert len(tests) == 2
    # model | optimizer | study epochs | study | our output | our epochs | ours | seeds
    assert f"| lenet5 | sgd | 25 | 0.5136 | softmax | 3 | {spread(tests)} | 0 1 |" in md
    # the winner: its seeds' mean and its one test evaluation, from the best run
    (best_run,) = runs_of(uri, "best")
    m = best_run.data.metrics
    assert (
        f"winner: trial {best_run.data.tags['lenet_sweep.winner_trial']}, val accuracy "
        f"{m['val_accuracy_mean']:.4f} ± {m['val_accuracy_std']:.4f} over 2 seeds; test accuracy "
        f"{m['test_accuracy']:.4f} (evaluated once)"
    ) in md
    # confusion: the most confused pair and the per-class counts, from the best run's matrix
    matrix_file = client.download_artifacts(
        best_run.info.run_id, "evaluation/confusion_matrix.json", str(tmp_path / "cm")
    )
    recorded = json.loads(Path(matrix_file).read_text())
    matrix, names = np.array(recorded["matrix"]), recorded["names"]
    both = matrix + matrix.T
    np.fill_diagonal(both, 0)
    if both.max():
        top = int(both.max())
        assert any(
            p["total"] == top and matrix[names.index(p["a"]), names.index(p["b"])] == p["a_as_b"]
            for p in facts["confusion"]["pairs"][:1]
        )
        assert f"| {top} |" in md
        assert "figures/misclassified.png" in md
    for i, name in enumerate(names):
        assert f"| {recorded['classes'][i]} | {name} | {int(matrix[i].sum())} | {int(matrix[i, i])} |" in md
    # the data check: class counts per split as listed, and the two unreadable files left out
    summary = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "data/summary.json", str(tmp_path / "ds"))).read_text()
    )
    for i, cls in enumerate(summary["classes"]):
        counts = " | ".join(str(summary["listed"][s][i]) for s in ("train", "val", "test"))
        assert f"| {cls} | {summary['names'][i]} | {counts} |" in md
    assert summary["skipped"] >= 2 and f"Files left out: {summary['skipped']}" in md


def test_the_epochs_question_counts_best_accuracy_within_each_budget(swept, tmp_path):
    uri, _, _ = swept
    cfg = compose_report(
        [
            "sweep.name=r",
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=sweep",
            f"report.dir={tmp_path}",
            "report.epochs=[1,2,4]",
            "report.turning_min_epochs=3",
        ]
    )
    facts = report.make_report(cfg).facts
    client = MlflowClient(uri)
    threshold = 1 / 3 + 0.05
    reached: dict[int, list[float]] = {1: [], 2: [], 4: []}
    for t in runs_of(uri, "trial"):
        if t.data.metrics["best_val_accuracy"] < threshold:
            continue
        history = _history(client, t.info.run_id, "val_accuracy")
        for k in reached:  # trained 4 epochs, or stopped early before k
            if len(history) >= k or len(history) < 4:
                reached[k].append(max(history[:k]))
    for row in facts["epochs"]["budgets"]:
        scores = reached[row["epochs"]]
        assert row["score"]["n"] == len(scores)
        assert row["score"]["mean"] == (pytest.approx(np.mean(scores)) if scores else None)  # None: no run
    seeds = facts["epochs"]["retrainings"]
    assert len(seeds) == 2 and all(r["seeds"] == 2 for r in seeds)

    # turning points: every run's epoch of minimum validation loss, recomputed from the metric histories,
    # over the runs that trained at least report.turning_min_epochs (3) epochs and did not collapse
    trials = runs_of(uri, "trial")
    singles = [r for r in runs_of(uri, "train")]
    runs = [
        r
        for r in [*trials, *runs_of(uri, "retrain"), *singles]
        if max(_history(client, r.info.run_id, "val_accuracy")) >= threshold
    ]
    turned, counted = [], 0
    for r in runs:
        losses = _history(client, r.info.run_id, "val_loss")
        if len(losses) < 3:
            continue
        counted += 1
        at = int(np.argmin(losses)) + 1
        if at < len(losses):
            turned.append(at)
    assert sorted(e for f in facts["turning_points"] for e in f["epochs"]) == sorted(turned)
    assert sum(f["runs"] for f in facts["turning_points"]) == counted


def test_make_report_reports_the_latest_sweep(swept, tmp_path):
    uri, _, _ = swept
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {
        "MLFLOW_TRACKING_URI": uri,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    done = subprocess.run(
        ["make", "report", f"ARGS=mlflow.experiment=sweep report.dir={tmp_path / 'out'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report of sweep 'r'" in done.stdout and (tmp_path / "out" / "report.html").is_file()


@pytest.mark.parametrize(
    "more, message",
    [
        (["sweep.name=nope"], "no sweep named 'nope'"),
        (["mlflow.experiment=missing"], "no MLflow experiment 'missing'"),
        (["report.top_trials=-1"], "report.top_trials=-1"),
        (["report.chance_margin=1.5"], "report.chance_margin"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_message(more, message, swept, tmp_path):
    uri, _, _ = swept
    cfg = compose_report([f"mlflow.tracking_uri={uri}", "mlflow.experiment=sweep", f"report.dir={tmp_path}", *more])
    with pytest.raises(UserError, match=re.escape(message)):
        report.make_report(cfg)


def test_a_missing_store_and_a_file_as_report_dir_are_refused(swept, tmp_path):
    uri, _, _ = swept
    missing = compose_report(
        [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'none' / 'mlflow.db'}", f"report.dir={tmp_path / 'out'}"]
    )
    with pytest.raises(UserError, match="no MLflow store"):
        report.make_report(missing)
    assert not (tmp_path / "none").exists() and not (tmp_path / "out").exists()
    file = tmp_path / "taken"
    file.write_text("mine")
    cfg = compose_report(
        ["sweep.name=r", f"mlflow.tracking_uri={uri}", "mlflow.experiment=sweep", f"report.dir={file}"]
    )
    with pytest.raises(UserError, match="is a file"):
        report.make_report(cfg)
    assert file.read_text() == "mine"


def test_statistics_and_rank_correlation():
    s = report_facts.stats([0.5, None, 0.7, math.nan])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert report_facts.stats([0.3])["std"] is None and report_facts.stats([])["mean"] is None
    assert report_doc.pm(report_facts.stats([0.3])) == "0.3000 (n=1)"
    assert report_facts.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert report_facts.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert report_facts.spearman([1, 2], [1, 2]) is None
    assert report_doc.pm(report_facts.stats([0.5, 0.7])) == f"0.6000 ± {np.std([0.5, 0.7], ddof=1):.4f} (n=2)"


def test_report_dir_holds_only_reports_and_a_rerun_replaces_its_own_files(swept, tmp_path):
    uri, _, _ = swept
    common = ["sweep.name=r", f"mlflow.tracking_uri={uri}", "mlflow.experiment=sweep", "report.top_trials=1"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds other files and no earlier report"):
        report.make_report(compose_report([*common, f"report.dir={mine}"]))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    out = tmp_path / "out"
    report.make_report(compose_report([*common, f"report.dir={out}"]))
    earlier = json.loads((out / "report.json").read_text())
    (out / "figures" / "curves_9.png").write_bytes(b"from an earlier report")  # one this report won't make
    (out / "report.json").write_text(json.dumps(earlier | {"figures": [*earlier["figures"], "curves_9.png"]}))
    (out / "notes.txt").write_text("keep me")
    report.make_report(compose_report([*common, f"report.dir={out}"]))
    assert not (out / "figures" / "curves_9.png").exists() and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(earlier["figures"])


def test_a_run_without_history_csv_reads_its_per_epoch_metrics(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("e"))
    for epoch, (loss, val) in enumerate([(2.0, 0.3), (1.5, 0.5), (1.4, 0.45)], start=1):
        client.log_metric(run.info.run_id, "val_loss", loss, step=epoch)
        client.log_metric(run.info.run_id, "val_accuracy", val, step=epoch)
    history = Artifacts(client).history(run.info.run_id)
    assert [row["val_accuracy"] for row in history] == [0.3, 0.5, 0.45]
    assert report_facts.turning(history) == (3, False)
