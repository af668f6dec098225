"""replay: a recorded trial trained again from its config and seed, compared epoch by epoch; refused elsewhere."""

from __future__ import annotations

import math
import shutil
import sqlite3
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import compose_config, run_cli
from lenet_sweep import best, replay, sweep
from lenet_sweep.errors import UserError
from lenet_sweep.report import evidence
from lenet_sweep.tracking.runs import package_versions


@pytest.fixture(scope="module")
def copied(tiny_sweep, tmp_path_factory) -> dict:
    """The session's tiny sweep in a store of this module's (replays add runs to it): {"store", "experiment",
    "parent", "trials" (run id by trial id), "folder"}."""
    source = Path(tiny_sweep["tmp"]) / "store"
    target = tmp_path_factory.mktemp("replay") / "store"
    shutil.copytree(source, target)
    with sqlite3.connect(target / "mlflow.db") as db:  # the copy's artifacts are its own
        db.execute(
            "update experiments set artifact_location = replace(artifact_location, ?, ?)", (str(source), str(target))
        )
        db.execute("update runs set artifact_uri = replace(artifact_uri, ?, ?)", (str(source), str(target)))
    store = f"sqlite:///{target / 'mlflow.db'}"
    client = MlflowClient(store)
    trials = {client.get_run(r).data.tags["lenet_sweep.trial_id"]: r for r in tiny_sweep["trials"].values()}
    return {
        "store": store,
        "experiment": tiny_sweep["experiment"],
        "parent": tiny_sweep["result"].parent_run_id,
        "trials": trials,
        "folder": tiny_sweep["folder"],
    }


def overrides(copied: dict, *more: str) -> list[str]:
    return ["sweep.name=ui", f"mlflow.tracking_uri={copied['store']}", "mlflow.experiment=sweep", *more]


def replay_runs(copied: dict) -> dict:
    """The store's replay runs by run id."""
    runs = MlflowClient(copied["store"]).search_runs([copied["experiment"]], "tags.`lenet_sweep.kind` = 'replay'")
    return {r.info.run_id: r for r in runs}


def test_a_replayed_trial_reproduces_every_epoch_and_is_not_counted_as_a_trial(copied):
    trial_id, original = sorted(copied["trials"].items())[-1]
    before = replay_runs(copied)
    result = run_cli(["lenet_sweep.replay", *overrides(copied, f"trial={trial_id}")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "largest |recorded - replayed|" in result.stdout
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert f"  {metric:<16} 0\n" in result.stdout  # deterministic on CPU: bit for bit
    assert "reproduced: every per-epoch metric within replay.tolerance=1e-06" in result.stdout

    client = MlflowClient(copied["store"])
    (run,) = [r for k, r in replay_runs(copied).items() if k not in before]
    assert run.data.tags["lenet_sweep.replay_of"] == original and "mlflow.parentRunId" not in run.data.tags
    assert replay.epoch_metrics(client, run.info.run_id) == replay.epoch_metrics(client, original)
    assert run.data.metrics["replay_max_abs_diff_val_loss"] == 0.0

    # neither `best`, the report nor the sweep's ranking counts the replay as a trial or a single run
    parent = client.get_run(copied["parent"])
    ids = set(copied["trials"].values())
    assert {c.run_id for c in best.candidates(client, copied["experiment"], parent, top_k=10)} <= ids
    gathered = evidence.gather(client, copied["experiment"], parent)
    assert {t.run_id for t in gathered.trials} == ids
    assert run.info.run_id not in {r.run_id for r in gathered.singles + gathered.retrains}
    assert {r["run_id"] for r in sweep.summarise(client, copied["experiment"], copied["parent"], {}, "random")} == ids


def test_a_replay_with_another_seed_differs_and_names_the_first_epoch_and_metric(copied):
    trial_id, original = sorted(copied["trials"].items())[0]
    cfg = compose_config("replay", overrides(copied, f"trial={trial_id}", "seed=77"))
    result = replay.run_replay(cfg)
    (replayed,) = result.replays
    assert replayed.seed == 77 and replayed.recorded.seed == int(trial_id)  # the sweep's seed 0 + trial number
    epoch, metric, was, now = replayed.comparison.first
    assert (epoch, metric) == (1, "loss") and was != now
    message = replay.failure(result)
    assert message.startswith(f"error: the replay of trial {trial_id} of sweep 'ui' (MLflow run {original}")
    assert f"differs first in epoch 1, loss: recorded {was:.9g}, replayed {now:.9g}" in message
    tag = MlflowClient(copied["store"]).get_run(replayed.run_id).data.tags["lenet_sweep.replay_result"]
    assert tag.startswith("differs first in epoch 1, loss")


class Started(Exception):
    """Raised where a replay would start training."""


def test_other_packages_or_data_are_refused_unless_allowed(copied, monkeypatch, tmp_path):
    trial_id = sorted(copied["trials"])[0]
    before = replay_runs(copied)
    elsewhere = package_versions() | {"numpy": "0.0.1"}
    monkeypatch.setattr(replay, "package_versions", lambda: elsewhere)
    cfg = compose_config("replay", overrides(copied, f"trial={trial_id}"))
    with pytest.raises(
        UserError, match=r"numpy: recorded [\d.]+, here 0\.0\.1\. .*replay\.allow_different_environment"
    ):
        replay.run_replay(cfg)
    monkeypatch.undo()

    moved = shutil.copytree(copied["folder"], tmp_path / "data")
    gone = sorted((moved / "train").glob("*/img_003.JPEG"))[0]
    gone.unlink()
    cfg = compose_config("replay", overrides(copied, f"trial={trial_id}", f"data.root={moved}"))
    with pytest.raises(
        UserError, match=rf"data: 1 of the \d+ files .*\(train: train/{gone.parent.name}/img_003.JPEG\)"
    ):
        replay.run_replay(cfg)
    assert replay_runs(copied).keys() == before.keys()  # refused before any run was recorded

    said, started = [], {}

    def train_and_log(config, prepared, experiment, **kwargs):  # allowed: past the checks, about to train
        started.update(kwargs["tags"])
        raise Started

    monkeypatch.setattr(replay, "train_and_log", train_and_log)
    cfg = compose_config(
        "replay",
        overrides(copied, f"trial={trial_id}", f"data.root={moved}", "replay.allow_different_environment=true"),
    )
    with pytest.raises(Started):
        replay.run_replay(cfg, said.append)
    assert any(line.startswith("the environment differs") and "img_003.JPEG" in line for line in said)
    assert "data: 1 of the" in started["lenet_sweep.environment_differs"]


@pytest.mark.parametrize(
    "more, message",
    [
        (["trial=99"], r"sweep 'ui' \(MLflow run \w+\) has no trial '99' \(its trials: 0, 1\): .*trial-ID"),
        ([], "give trial=ID .* or run=RUN_ID"),
        (["trial=0", "run=abc"], "give trial=ID .* or run=RUN_ID"),
        (["run=nosuchrun"], "no MLflow run 'nosuchrun'"),
        (["sweep.name=other", "trial=0"], r"no sweep named 'other' .*\(sweeps there: ui\)"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_message(copied, more, message):
    with pytest.raises(UserError, match=message):
        replay.run_replay(compose_config("replay", overrides(copied, *more)))


def test_a_run_id_finds_its_trial_and_a_trial_number_may_drop_its_zeros(copied):
    client = MlflowClient(copied["store"])
    parent = client.get_run(copied["parent"])
    for trial_id, run_id in copied["trials"].items():
        assert replay.trial_run(client, copied["experiment"], parent, f"0{trial_id}").info.run_id == run_id
    cfg = compose_config("replay", overrides(copied, f"run={copied['parent']}"))
    with pytest.raises(UserError, match="is a 'sweep' run: replay trains again a sweep's trials"):
        replay.run_replay(cfg)
    trial_id, run_id = sorted(copied["trials"].items())[0]
    (recorded,) = replay.find_recorded(client, copied["experiment"], compose_config("replay", [f"run={run_id}"]), print)
    # trained as the sweep trained it: its patience, pruning and cosine schedule (from the sweep's config)
    assert recorded.kind == "trial" and recorded.patience == 3 and recorded.prune is not None
    assert recorded.config.train.lr_schedule == "cosine" and recorded.environment_run == copied["parent"]


def test_a_best_retraining_is_replayed_with_the_patience_its_best_run_recorded(copied):
    client = MlflowClient(copied["store"])
    trial = client.get_run(sorted(copied["trials"].values())[0])
    best_run = client.create_run(copied["experiment"], tags={"lenet_sweep.kind": "best"})
    client.log_param(best_run.info.run_id, "best.early_stopping_patience", "4")
    run = client.create_run(
        copied["experiment"],
        tags={"lenet_sweep.kind": "retrain", "lenet_sweep.trial_id": "0", "mlflow.parentRunId": best_run.info.run_id},
    )
    config = replay.Artifacts(client).text(trial.info.run_id, "config.yaml").replace("seed: 0", "seed: 1000")
    client.log_text(run.info.run_id, config, "config.yaml")
    recorded = replay.retraining(client, client.get_run(run.info.run_id))
    assert (recorded.seed, recorded.patience, recorded.keep_best, recorded.prune) == (1000, 4, True, None)
    assert recorded.environment_run == run.info.run_id  # a retraining logs its own packages and data check


def test_comparing_histories_finds_the_first_difference_over_the_tolerance():
    recorded = {"loss": {1: 1.0, 2: 0.5}, "val_loss": {1: 1.1, 2: 0.9}, "lr": {1: 0.1, 2: math.nan}}
    same = replay.compare(recorded, recorded, 1e-6)
    assert same.first is None and set(same.largest.values()) == {0.0}  # NaN = NaN: the same divergence
    assert list(same.largest) == ["loss", "val_loss", "lr"]  # Keras' metrics first, then the rest
    moved = replay.compare(recorded, {**recorded, "val_loss": {1: 1.1, 2: 0.95}}, 1e-6)
    assert moved.first == (2, "val_loss", 0.9, 0.95) and moved.largest["val_loss"] == pytest.approx(0.05)
    assert replay.compare(recorded, {**recorded, "val_loss": {1: 1.1, 2: 0.95}}, 0.1).first is None
    shorter = replay.compare(recorded, {k: {1: v[1]} for k, v in recorded.items()}, 1e-6)
    assert shorter.first == (2, "loss", 0.5, None) and shorter.replayed_epochs == 1
    assert "recorded 0.5, replayed no epoch 2 (recorded 2, replayed 1)" in replay.outcome(shorter, 1e-6)


def test_environment_differences_name_each_package_and_file():
    rows = [("train", "a", "train/a/1.jpg", "yes"), ("val", "a", "val/a/2.jpg", "yes")]
    assert replay.differences({"keras": "3.15"}, {"keras": "3.15"}, rows, rows) == []
    found = replay.differences({"keras": "3.15"}, {"keras": "3.16", "device": "CPU"}, rows, rows[:1])
    assert found == [
        "device: recorded none, here CPU",
        "keras: recorded 3.15, here 3.16",
        "data: 1 of the 2 files the run's split manifest lists are missing or changed here (val: val/a/2.jpg), "
        "0 here are new or changed",
    ]
    assert replay.differences(None, {}, [], rows) == [
        "packages: the run recorded none (table_i_packages.json)",
        "data: the run recorded no split manifest (data/split_manifest.csv)",
    ]
