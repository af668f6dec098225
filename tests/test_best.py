"""`best`: the winner chosen on validation over seeds, tested once, exported, registered; `predict`."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image
from scipy import stats

from conftest import (
    compose_config,
    compose_sweep,
    make_image_folder,
    pattern,
    run_cli,
    runs_of,
    sweep_overrides,
)
from lenet_sweep import best, cli, export, sweep
from lenet_sweep import data as D
from lenet_sweep.errors import UserError

CLASSES = ("n01440764", "n02102040")
# Two configurations that differ only in learning rate: one learns, one barely moves.
SPACE = {"lr": {"key": "optimizer.learning_rate", "type": "choice", "values": [1e-7, 3e-3]}}
EPOCHS = 4


def compose_best(more: list[str]):
    return compose_config("best", more)


@pytest.fixture(scope="module")
def swapped(tmp_path_factory) -> Path:
    """Two classes whose test images look like the other class: on test, every model scores about
    1 - its validation accuracy, so ranking on test would reverse ranking on validation."""
    root = make_image_folder(
        tmp_path_factory.mktemp("best") / "data", classes=CLASSES, n_train=24, n_val=10, size=36, messy=False
    )
    splits = D.find_splits(root, seed=0)  # the sweep's split: train.yaml's seed 0, test_fraction 0.2
    for i, (path, label) in enumerate(zip(splits.files["test"].paths, splits.files["test"].labels)):
        Image.fromarray(pattern(1 - label, 700 + i, 36)).save(root / path, quality=90)
    return root


@pytest.fixture(scope="module")
def swept(swapped, tmp_path_factory):
    """A finished two-trial sweep over `swapped`: (store URI, tmp folder)."""
    tmp = tmp_path_factory.mktemp("swept")
    store = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    cfg, optimizers = compose_sweep(
        sweep_overrides(swapped, tmp, store, "tuner=random", "tuner.max_trials=2", f"train.epochs={EPOCHS}", name="s")
    )
    cfg.search.space = SPACE
    result = sweep.run_sweep(cfg, optimizers)
    assert [r["status"] for r in result.rows] == ["FINISHED", "FINISHED"]
    return store, tmp


def test_best_command_chooses_on_validation_tests_once_exports_and_registers(swept, swapped, tmp_path):
    store, _ = swept
    out = tmp_path / "export dir"  # a space in the path, as typed
    result = run_cli(
        [
            "lenet_sweep.best",
            "sweep.name=s",
            f"mlflow.tracking_uri={store}",
            "mlflow.experiment=sweep",
            f"export.dir={out}",
            "best.max_seeds=3",  # (the default 5 doubles this test's retrainings when the race stays close)
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "winner: trial" in result.stdout and "evaluated once" in result.stdout
    assert re.search(r"budget: racing \d+s, refit \d+s, test\+export \d+s; total \d+s of 1200s", result.stdout)

    client = MlflowClient(store)
    (best_run,) = runs_of(store, "best")
    retrains = runs_of(store, "retrain")
    assert best_run.info.status == "FINISHED"
    # both configurations raced (top_k 4 > 2 in the sweep): each at least min_seeds 2, at most max_seeds 3,
    # on the same seeds from 1000 up; every retraining nested under the best run, none tested
    seeds: dict[str, list[int]] = {}
    for r in retrains:
        seeds.setdefault(r.data.tags["lenet_sweep.trial_id"], []).append(int(r.data.tags["lenet_sweep.seed"]))
    assert len(seeds) == 2 and all(
        sorted(s) == list(range(1000, 1000 + len(s))) and 2 <= len(s) <= 3 for s in seeds.values()
    )
    assert {r.data.tags["mlflow.parentRunId"] for r in retrains} == {best_run.info.run_id}
    assert not any("test_accuracy" in r.data.metrics for r in retrains)
    assert all(r.data.params["data.split_seed"] == "0" for r in retrains)  # the sweep's split

    # the winner has the highest lower bound among the candidates racing left in; the table says why each stopped
    table = client.download_artifacts(best_run.info.run_id, "best/candidates.csv", str(tmp_path))
    rows = {r["trial"]: r for r in csv.DictReader(open(table))}
    winner = best_run.data.tags["lenet_sweep.winner_trial"]
    assert rows[winner]["winner"] == "yes" and rows[winner]["stopped"].startswith("winner (")
    inside = [t for t, r in rows.items() if not r["stopped"].startswith("clearly behind")]
    assert float(rows[winner]["val_accuracy_lcb"]) == max(float(rows[t]["val_accuracy_lcb"]) for t in inside)
    for trial, row in rows.items():
        scores = [r.data.metrics["best_val_accuracy"] for r in retrains if r.data.tags["lenet_sweep.trial_id"] == trial]
        assert float(row["val_accuracy_mean"]) == pytest.approx(np.mean(scores))
        assert row["seed_list"] == " ".join(map(str, sorted(seeds[trial])))
        if row["stopped"].startswith("clearly behind"):
            assert float(row["val_accuracy_hi"]) < float(rows[winner]["val_accuracy_lcb"])
    # ... while the test split would have picked the other configuration
    test_split = D.decode_split(swapped, D.find_splits(swapped, 0).files["test"], 32)
    on_test = {}
    for r in retrains:
        model = best.load_run_model(client, r.info.run_id)
        predicted = np.argmax(model.predict(test_split.images / np.float32(255), verbose=0), axis=1)
        trial = r.data.tags["lenet_sweep.trial_id"]
        on_test.setdefault(trial, []).append(np.mean(predicted == test_split.labels))
    assert max(on_test, key=lambda t: np.mean(on_test[t])) != winner

    # the refit: the winner's config at 64 px (best.final.input_size), nested, tagged, never tested; exported
    # unless its validation accuracy fell below the winner's racing lower bound
    (refit,) = runs_of(store, "refit")
    assert refit.data.tags["mlflow.parentRunId"] == best_run.info.run_id
    assert refit.data.tags["lenet_sweep.trial_id"] == winner and refit.data.tags["lenet_sweep.seed"] == "1000"
    assert refit.data.params["model.input_size"] == "64" and "test_accuracy" not in refit.data.metrics
    m, tags = best_run.data.metrics, best_run.data.tags
    assert m["refit_val_accuracy"] == refit.data.metrics["best_val_accuracy"] and m["refit_input_size"] == 64
    from_refit = tags["lenet_sweep.exported"] == "refit"
    assert from_refit == (m["refit_val_accuracy"] >= float(rows[winner]["val_accuracy_lcb"]))
    assert tags["lenet_sweep.exported_run_id"] == (
        refit.info.run_id if from_refit else tags["lenet_sweep.winner_run_id"]
    )
    size = 64 if from_refit else 32
    # the test split was evaluated once, on the best run, for the exported model, at its input size
    trained = best.load_run_model(client, tags["lenet_sweep.exported_run_id"])
    at_size = D.decode_split(swapped, D.find_splits(swapped, 0).files["test"], size)
    predicted = np.argmax(trained.predict(at_size.images / np.float32(255), verbose=0), axis=1)
    assert m["test_accuracy"] == pytest.approx(np.mean(predicted == at_size.labels))

    # the export: every file, and it predicts exactly what the trained model predicts
    assert {p.name for p in out.iterdir()} == {
        "model.keras",
        "saved_model",
        "labels.json",
        "preprocessing.json",
        "config.yaml",
        "MODEL_CARD.md",
    }
    labels = json.loads((out / "labels.json").read_text())["labels"]
    assert [(e["class"], e["name"]) for e in labels] == [("n01440764", "tench"), ("n02102040", "English springer")]
    assert json.loads((out / "preprocessing.json").read_text())["input_size"] == size
    card = (out / "MODEL_CARD.md").read_text()
    assert f"{m['test_accuracy']:.4f}" in card and "0.5136" in card and "0.6321" in card
    assert f"{m['val_accuracy_mean']:.4f} ± {m['val_accuracy_std']:.4f}" in card
    assert "## Refit at the final fidelity" in card and f"validation accuracy **{m['refit_val_accuracy']:.4f}**" in card
    assert all(r["stopped"] in card for r in rows.values())
    # its size and speed, as exported: on the card and as metrics of the best run
    size_bytes = (out / "model.keras").stat().st_size
    assert f"{trained.count_params():,} parameters; `model.keras` is {size_bytes:,} bytes" in card
    assert re.search(r"batch 1: [\d.]+ ms per image .*; batch 32: [\d.]+ ms per image", card)
    assert m["export_parameters"] == trained.count_params() and m["export_model_bytes"] == size_bytes
    assert m["export_seconds_per_image_batch_1"] > 0 and m["export_seconds_per_image_batch_32"] > 0
    loaded = export.load(out)
    files = [swapped / "val" / CLASSES[0] / "img_000.JPEG", swapped / "val" / CLASSES[1] / "img_001.JPEG"]
    pixels, kept, failed = export.images_for(files, loaded.preprocessing)
    assert len(kept) == 2 and not failed and pixels.shape[1:] == (size, size, 3)
    expected = trained.predict(pixels, verbose=0)
    np.testing.assert_array_equal(loaded.model.predict(pixels, verbose=0), expected)
    import tensorflow as tf

    saved_model = tf.saved_model.load(str(out / "saved_model" / "1"))  # kept: serve needs its variables
    served = saved_model.serve(pixels).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-6)

    # the registry: a new version of lenet_sweep-best, aliased, that pyfunc loads and that classifies pixels
    version = client.get_model_version_by_alias("lenet_sweep-best", "champion")
    assert str(version.version) == "1" and version.tags["trial"] == winner
    mlflow.set_tracking_uri(store)
    pyfunc = mlflow.pyfunc.load_model("models:/lenet_sweep-best@champion")
    np.testing.assert_allclose(pyfunc.predict(pixels), expected, atol=1e-6)
    assert list(np.argmax(pyfunc.predict(pixels), axis=1)) == list(np.argmax(expected, axis=1))

    # a second run of the command refuses to overwrite the export unless asked
    again = run_cli(
        [
            "lenet_sweep.best",
            "sweep.name=s",
            f"mlflow.tracking_uri={store}",
            "mlflow.experiment=sweep",
            f"export.dir={out}",
        ]
    )
    assert again.returncode != 0 and "export.overwrite=true" in again.stderr
    assert len(runs_of(store, "best")) == 1  # refused before anything was recorded


def test_predict_classifies_files_and_folders_and_skips_what_it_cannot_read(swept, swapped, tmp_path):
    store, _ = swept
    cfg = compose_best(
        [
            "sweep.name=s",
            f"mlflow.tracking_uri={store}",
            "mlflow.experiment=sweep",
            f"export.dir={tmp_path / 'exp'}",
            "best.top_k=1",
            "best.seeds=1",
            "best.final.epochs=2",
            "best.final.min_epochs=1",
            "export.registered_model=null",
        ]
    )
    best.run_best(cfg)
    photos = tmp_path / "my photos"
    photos.mkdir()
    Image.fromarray(pattern(0, 5, 50)).convert("RGBA").save(photos / "fish (1).png")
    Image.fromarray(pattern(1, 6, 20)).convert("L").save(photos / "dog.bmp")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.txt").write_text("not an image; not a Pillow suffix either")
    single = swapped / "val" / CLASSES[1] / "img_002.JPEG"
    csv_out = tmp_path / "out" / "predictions.csv"
    result = run_cli(
        [
            "lenet_sweep.predict",
            f"export.dir={tmp_path / 'exp'}",
            f"images={photos},{single}",
            f"predict.output={csv_out}",
            "predict.top_k=2",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "broken.jpg" in result.stderr and "notes.txt" not in result.stdout + result.stderr
    assert "3 image(s) classified, 1 skipped" in result.stdout
    rows = list(csv.DictReader(csv_out.open()))
    assert [Path(r["path"]).name for r in rows] == ["broken.jpg", "dog.bmp", "fish (1).png", "img_002.JPEG"]
    assert rows[0]["error"] and not rows[0]["class_1"]
    for r in rows[1:]:
        assert r["name_1"] in ("tench", "English springer") and r["class_2"] and not r["error"]
        assert float(r["score_1"]) >= float(r["score_2"])
    # the same label as the model on the same pixels
    loaded = export.load(tmp_path / "exp")
    pixels, _, _ = export.images_for([single], loaded.preprocessing)
    assert rows[3]["class_1"] == loaded.classes[int(np.argmax(loaded.model.predict(pixels, verbose=0)))]

    nothing = run_cli(["lenet_sweep.predict", f"export.dir={tmp_path / 'exp'}", f"images={photos / 'broken.jpg'}"])
    assert nothing.returncode != 0 and "no image could be classified" in nothing.stderr
    missing = run_cli(["lenet_sweep.predict", f"export.dir={tmp_path / 'nowhere'}", f"images={single}"])
    assert missing.returncode != 0 and "lacks model.keras" in missing.stderr


def test_loading_an_export_never_runs_code_from_it(tmp_path):
    ran = tmp_path / "ran"
    marker = str(ran)
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Lambda(lambda x: (open(marker, "w").close(), x)[1])(inputs)  # side effect if run
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(outputs)))
    ran.unlink(missing_ok=True)
    folder = tmp_path / "evil"
    folder.mkdir()
    model.save(folder / "model.keras")
    (folder / "labels.json").write_text(json.dumps(export.labels(["a", "b"], ["a", "b"])))
    (folder / "preprocessing.json").write_text(json.dumps(export.preprocessing(8, "bilinear", False)))
    with pytest.raises(UserError, match="safe_mode"):
        export.load(folder)
    assert not ran.exists()
    keras.saving.load_model(folder / "model.keras", safe_mode=False)  # what safe_mode prevents
    assert ran.exists()


def test_a_cut_off_best_resumes_keeping_finished_retrainings_and_its_refit(swept, tmp_path, monkeypatch):
    store, _ = swept
    cfg = compose_best(
        [
            "sweep.name=s",
            f"mlflow.tracking_uri={store}",
            "mlflow.experiment=sweep",
            f"export.dir={tmp_path / 'exp'}",
            "best.top_k=2",
            "best.seeds=1",
            "best.final.input_size=48",
            "best.final.epochs=2",
            "best.final.min_epochs=1",
            "export.registered_model=other",
        ]
    )
    real = best.train_and_log
    calls = []

    class CtrlC(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    def interrupted(*args, callbacks=(), **kwargs):  # Ctrl-C in the first epoch of the second retraining
        calls.append(1)
        return real(*args, callbacks=[*callbacks, *([CtrlC()] if len(calls) == 2 else [])], **kwargs)

    monkeypatch.setattr(best, "train_and_log", interrupted)
    with pytest.raises(KeyboardInterrupt):
        best.run_best(cfg)
    monkeypatch.setattr(best, "train_and_log", real)
    client = MlflowClient(store)
    (cut,) = [r for r in runs_of(store, "best") if r.info.status == "KILLED"]
    assert not (tmp_path / "exp").exists()
    # ... and a retraining a SIGKILL left RUNNING (no Python to end it)
    orphan = client.create_run(
        cut.info.experiment_id,
        run_name="orphan",
        tags={
            "mlflow.parentRunId": cut.info.run_id,
            "lenet_sweep.kind": "retrain",
            "lenet_sweep.trial_id": "x",
            "lenet_sweep.seed": "1000",
        },
    ).info.run_id

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    # The second session trains what is left and the refit, then is cut off before the test split
    real_test = best.evaluate_on_test
    monkeypatch.setattr(best, "evaluate_on_test", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        best.run_best(cfg)
    monkeypatch.setattr(best, "evaluate_on_test", real_test)
    (refit,) = [r for r in runs_of(store, "refit") if r.data.tags["mlflow.parentRunId"] == cut.info.run_id]
    assert refit.info.status == "FINISHED" and not (tmp_path / "exp").exists()

    # The third trains nothing; the refit falling short on validation (forced here), the best racing model
    # is exported instead, at the sweep's input size, and the card and a warning say so
    trained = []
    monkeypatch.setattr(best, "train_and_log", lambda *args, **kwargs: trained.append(1) or real(*args, **kwargs))
    monkeypatch.setattr(best, "refit_holds", lambda *args: False)
    lines: list[str] = []
    result = best.run_best(cfg, print_fn=lines.append)
    assert result.resumed and result.run_id == cut.info.run_id
    assert not trained and result.refit.kept and result.refit.run.run_id == refit.info.run_id
    assert not result.refit_exported and result.exported.candidate is result.winner.candidate
    assert any(line.startswith("warning: refit of trial") and "best racing model" in line for line in lines)
    assert json.loads((tmp_path / "exp" / "preprocessing.json").read_text())["input_size"] == 32
    assert "**The refit is not exported**" in (tmp_path / "exp" / "MODEL_CARD.md").read_text()
    tags = client.get_run(result.run_id).data.tags
    assert tags["lenet_sweep.exported"] == "racing" and tags["lenet_sweep.exported_run_id"] == result.exported.run_id
    children = {
        r.info.run_id: r for r in runs_of(store, "retrain") if r.data.tags["mlflow.parentRunId"] == result.run_id
    }
    statuses = sorted(r.info.status for r in children.values())
    assert statuses == ["FINISHED", "FINISHED", "KILLED", "KILLED"]  # kept, retrained; Ctrl-C'd, orphan
    assert "cut off" in client.get_run(orphan).data.tags["failure_reason"]
    finished = [r for r in children.values() if r.info.status == "FINISHED"]
    first = min(finished, key=lambda r: r.info.start_time)
    assert first.info.start_time < cut.info.end_time  # trained in the first session, kept, not retrained
    assert all("best_val_accuracy" in r.data.metrics for r in finished)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert (tmp_path / "exp" / "model.keras").is_file()
    assert str(MlflowClient(store).get_model_version_by_alias("other", "champion").version) == "1"


@pytest.mark.parametrize(
    "more, message",
    [
        (["sweep.name=nope"], "no sweep named 'nope'"),
        (["mlflow.experiment=nope"], "no MLflow experiment 'nope'"),
        (["best.seeds=0"], "best.seeds=0: must be at least 1"),
        (["best.min_seeds=3", "best.max_seeds=2"], "best.min_seeds=3 is more than best.max_seeds=2"),
        (["best.final.share=1"], "best.final.share=1.0: must be more than 0 and less than 1"),
        (["best.final.min_epochs=9", "best.final.epochs=3"], "best.final.min_epochs=9 is more than"),
        (["data.test_fraction=0.5"], "only where the data lives may change"),  # another split: test leaks
        (["model.dropout=0"], "best retrains the sweep's configurations as their trials recorded them"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_recorded(more, message, swept, tmp_path):
    store, _ = swept
    before = len(runs_of(store, "best"))
    # In process (the command line's one-line errors are checked by the export refusal above).
    given = [
        "sweep.name=s",
        f"mlflow.tracking_uri={store}",
        "mlflow.experiment=sweep",
        f"export.dir={tmp_path / 'x'}",
        *more,
    ]
    with pytest.raises(UserError, match=re.escape(message)):
        best.run(compose_best(given), given)
    assert len(runs_of(store, "best")) == before and not (tmp_path / "x").exists()


def test_an_export_folder_with_other_files_is_never_replaced(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not a lenet_sweep export"):
        export.check_target(mine, overwrite=True)
    for name in ("model.keras", "labels.json"):  # an export, plus the user's predictions beside it
        (mine / name).write_text("{}")
    (mine / "thesis.tex").rename(mine / "predictions.csv")
    with pytest.raises(UserError, match="predictions.csv"):
        export.check_target(mine, overwrite=True)
    (mine / "predictions.csv").unlink()
    assert export.check_target(mine, overwrite=True) == mine.resolve()  # an export alone may be replaced
    with pytest.raises(UserError, match="export.overwrite=true"):
        export.check_target(mine, overwrite=False)


def test_paths_as_typed_get_through_hydra(monkeypatch):
    argv = [
        "prog",
        "images=a b.jpg,c (1).png",
        "export.dir=/my exports/x",
        "predict.output=null",
        "export.dir=${oc.env:HOME}",
        "images=['q.jpg']",
        "other=a,b",
    ]
    monkeypatch.setattr(sys, "argv", list(argv))
    cli.quote_path_overrides(("export.dir", "predict.output"), ("images",))
    assert sys.argv == [
        "prog",
        "images=['a b.jpg','c (1).png']",
        "export.dir='/my exports/x'",
        "predict.output=null",
        "export.dir=${oc.env:HOME}",
        "images=['q.jpg']",
        "other=a,b",
    ]


def test_the_sweeps_early_stopping_is_the_retrainings():
    assert best.sweep_patience({"sweep.early_stopping_patience": "3"}) == 3
    assert best.sweep_patience({"sweep.early_stopping_patience": "None"}) is None  # null: never stop early
    assert best.sweep_patience({}) is None


# ---- racing, the choice and the budget: pure functions of the scores ----------------------------------


def candidate(rank: int, size: int = 32) -> best.Candidate:
    config = OmegaConf.create({"model": {"input_size": size}})
    return best.Candidate(rank, f"{rank:04d}", f"trial-run-{rank}", 0.9, {"dense_1": 8 * rank}, config)


def summary(rank: int, scores: list[float], seconds: float = 10.0, size: int = 32) -> best.Summary:
    """A candidate with one retraining per score (nan: that seed diverged), seeds 1000, 1001, ..."""
    c = candidate(rank, size)
    runs = [
        best.Retraining(c, 1000 + i, f"r{rank}-{i}", "FINISHED" if np.isfinite(v) else "FAILED", v, 3, seconds)
        for i, v in enumerate(scores)
    ]
    return best.Summary(c, runs)


def test_racing_stops_a_candidate_clearly_behind_and_gives_overlapping_contenders_another_seed():
    ahead, behind, overlapping = summary(2, [0.80, 0.82]), summary(1, [0.60, 0.61]), summary(3, [0.79, 0.70])
    step = best.race_round([behind, ahead, overlapping], confidence=0.9, max_seeds=5)
    assert step.leader is ahead  # the highest lower bound, though sweep rank 2
    lo, _ = ahead.interval(0.9)
    assert set(step.stopped) == {1} and step.stopped[1].startswith("clearly behind: upper bound 0.6")
    assert f"< leader's lower bound {lo:.4f}" in step.stopped[1]
    assert step.contenders == [ahead, overlapping] and step.more == [ahead, overlapping]  # the leader too
    # with one seed an interval is unbounded: nobody can be clearly behind yet
    one = [summary(1, [0.9]), summary(2, [0.1])]
    assert best.race_round(one, 0.9, 5).stopped == {} and best.t_interval([0.9], 0.9) == (-np.inf, np.inf)
    # a diverged seed loses to any candidate without one
    step = best.race_round([summary(1, [0.9, np.nan]), summary(2, [0.5, 0.52])], 0.9, 5)
    assert "diverged" in step.stopped[1] and [s.candidate.rank for s in step.contenders] == [2]


def scripted(scores: dict[int, list[float]], trained: list[tuple[int, int]]):
    """A trainer for `race`: the next seed of candidate r scores scores[r][its seed index]."""

    def train_next(s: best.Summary) -> str:
        rank, i = s.candidate.rank, len(s.runs)
        trained.append((rank, 1000 + i))
        s.runs.append(best.Retraining(s.candidate, 1000 + i, f"r{rank}-{i}", "FINISHED", scores[rank][i], 3, 10.0))
        return ""

    return train_next


def test_a_race_adds_seeds_until_one_contender_is_left_or_max_seeds():
    scores = {
        1: [0.80, 0.70, 0.78, 0.74, 0.76],  # close to 3 throughout: both go on to max_seeds
        2: [0.50, 0.52, 0.51, 0.50, 0.52],  # clearly behind after the first round
        3: [0.75, 0.77, 0.76, 0.75, 0.77],
    }
    summaries = [summary(r, []) for r in (1, 2, 3)]
    trained: list[tuple[int, int]] = []
    best.race(summaries, scripted(scores, trained), confidence=0.9, min_seeds=2, max_seeds=4)
    # seed by seed across the candidates first, then one more seed per round for the contenders left
    assert trained[:6] == [(1, 1000), (2, 1000), (3, 1000), (1, 1001), (2, 1001), (3, 1001)]
    assert [s.seeds for s in summaries] == [[1000, 1001, 1002, 1003], [1000, 1001], [1000, 1001, 1002, 1003]]
    assert summaries[1].out and summaries[1].stopped.startswith("clearly behind")
    assert [s.stopped for s in (summaries[0], summaries[2])] == ["max seeds", "max seeds"]
    winner, run = best.choose(summaries, 0.9)
    assert winner is summaries[2] and run.val_accuracy == 0.77 and run.seed == 1001  # first of the tied best
    # a race replays: the same scores give the same decisions
    again = [summary(r, []) for r in (1, 2, 3)]
    best.race(again, scripted(scores, []), confidence=0.9, min_seeds=2, max_seeds=4)
    assert [(s.seeds, s.stopped) for s in again] == [(s.seeds, s.stopped) for s in summaries]

    # a clear leader ends the race early: the only contender left
    lead = [summary(r, []) for r in (1, 2)]
    best.race(lead, scripted({1: [0.9, 0.91, 0.9], 2: [0.5, 0.51, 0.5]}, []), 0.9, 2, 5)
    assert [s.stopped for s in lead][0] == "only contender left" and len(lead[0].runs) == 2


def test_the_choice_ranks_by_the_lower_bound_not_the_mean():
    lucky, steady = summary(1, [0.95, 0.55]), summary(2, [0.72, 0.73])
    assert lucky.mean > steady.mean and lucky.lcb(0.9) < steady.lcb(0.9)
    winner, _ = best.choose([lucky, steady], 0.9)
    assert winner is steady
    # ties on the lower bound: the higher mean, then the sweep's rank; a diverged seed loses to any without
    a, b = summary(1, [0.7, 0.7]), summary(2, [0.7, 0.7])
    assert best.choose([b, a], 0.9)[0] is a
    assert best.choose([summary(1, [0.99, np.nan, 0.99]), summary(2, [0.4, 0.41])], 0.9)[0].candidate.rank == 2
    # a candidate racing stopped as clearly behind is not chosen, whatever its bound
    out = summary(1, [0.8, 0.8])
    out.out = True
    assert best.choose([out, summary(2, [0.7, 0.72])], 0.9)[0].candidate.rank == 2
    with pytest.raises(UserError, match="no candidate has a finished retraining"):
        best.choose([summary(1, [np.nan])], 0.9)
    table = best.format_summaries([lucky, steady], steady, 0.9)
    assert "90% interval" in table and "1000,1001" in table and f"{steady.lcb(0.9):.4f}" in table


def test_the_budget_refuses_a_retraining_that_would_overrun_racings_share():
    first, other = summary(1, []), summary(2, [0.7], seconds=30.0)
    assert best.retraining_estimate(first, [first]) is None  # the very first: started, nothing to go by
    assert best.retraining_estimate(first, [first, other]) == 30.0  # any candidate's
    mine = summary(1, [0.7, 0.7], seconds=100.0)
    assert best.retraining_estimate(mine, [mine, other]) == 100.0  # its own first
    assert best.over_budget(None, 500.0, 400.0) == ""
    assert best.over_budget(30.0, 360.0, 400.0) == ""
    refused = best.over_budget(50.0, 360.0, 400.0)
    assert refused.startswith("budget:") and "~50s" in refused and "40s of racing's 400s left" in refused

    # in a race, a candidate the budget holds keeps its seeds and its place in the choice
    summaries = [summary(r, []) for r in (1, 2)]

    def broke(s: best.Summary) -> str:
        if s.candidate.rank == 1 and len(s.runs) == 1:
            return "budget: no time"
        return scripted({1: [0.8], 2: [0.5, 0.52, 0.51]}, [])(s)

    best.race(summaries, broke, 0.9, 2, 3)
    assert summaries[0].seeds == [1000] and summaries[0].stopped == "budget: no time"
    assert summaries[1].seeds == [1000, 1001, 1002] and summaries[1].stopped == "max seeds"
    # unbounded with one seed, held by the budget: the steady one wins on its lower bound
    assert best.choose(summaries, 0.9)[0] is summaries[1]


def test_the_refit_trains_the_epochs_the_budget_affords():
    racing = summary(1, [0.7, 0.7], seconds=14.0, size=32)
    for r in racing.runs:
        r.epoch_seconds = [2.0, 1.0, 1.0, 1.0]  # the first epoch traces the graph: the median ignores it
    per_epoch, besides = best.epoch_estimate(racing.runs, 2.5, 1.0)
    assert per_epoch == pytest.approx(2.5) and besides == pytest.approx(9.0)  # the step ratio times the median
    assert best.epoch_estimate(racing.runs, 2.5, 1.5)[0] == pytest.approx(3.75)
    assert np.isnan(best.epoch_estimate([summary(1, [0.7]).runs[0]], 2.5, 1.0)[0])  # no epoch timed
    assert best.refit_epochs(20, 5, 100.0, 4.0, 10.0)[0] == 20
    epochs, why = best.refit_epochs(20, 5, 50.0, 4.0, 10.0)
    assert epochs == 10 and "10 of best.final.epochs=20" in why
    epochs, why = best.refit_epochs(20, 5, 20.0, 4.0, 10.0)
    assert epochs == 5 and "the budget will be exceeded by ~10s" in why
    epochs, why = best.refit_epochs(20, 5, 20.0, float("nan"), 0.0)
    assert epochs == 20 and "no racing epoch was timed" in why
    # exported only if its validation accuracy clears the winner's racing mean minus its half-width
    winner = summary(1, [0.70, 0.74])
    lo = winner.lcb(0.9)
    assert lo == pytest.approx(winner.mean - (winner.interval(0.9)[1] - winner.mean))
    assert best.refit_holds(lo, winner, 0.9) and not best.refit_holds(lo - 0.01, winner, 0.9)
    assert not best.refit_holds(float("nan"), winner, 0.9)
    assert best.refit_holds(0.1, summary(1, [0.9]), 0.9)  # one seed: nothing to fall short of
    spent = {"racing": 300.0, "refit": 800.0, "test_export": 200.0, "total": 1300.0, "budget": 1200.0}
    assert best.format_budget(spent) == (
        "budget: racing 300s, refit 800s, test+export 200s; total 1300s of 1200s (108%); over budget by 100s"
    )


def test_a_refit_at_another_input_size_is_exported_at_that_size_and_tested_once(swept, swapped, tmp_path, monkeypatch):
    store, _ = swept
    cfg = compose_best(
        [
            "sweep.name=s",
            f"mlflow.tracking_uri={store}",
            "mlflow.experiment=sweep",
            f"export.dir={tmp_path / 'exp'}",
            "best.top_k=1",
            "best.seeds=1",  # one seed: an unbounded interval, so the refit is exported whatever it scores
            "best.final.input_size=40",
            "best.final.epochs=3",
            "best.final.min_epochs=1",
            "export.registered_model=null",
        ]
    )
    tests, decoded = [], []
    real_test, real_prepare = best.evaluate_on_test, best.prepare_data
    monkeypatch.setattr(best, "evaluate_on_test", lambda *a, **k: tests.append(a[0].input_shape) or real_test(*a, **k))
    monkeypatch.setattr(
        best, "prepare_data", lambda *a, **k: decoded.append((a[1], k.get("splits"))) or real_prepare(*a, **k)
    )
    lines: list[str] = []
    result = best.run_best(cfg, print_fn=lines.append)
    assert result.refit_exported and result.exported is result.refit.run and result.refit.input_size == 40
    assert tests == [(None, 40, 40, 3)]  # the test split evaluated once, on the exported refit
    assert decoded == [(40, ("train", "val")), (40, ("test",))]  # test decoded once, at the export's size
    run = MlflowClient(store).get_run(result.refit.run.run_id)
    assert run.data.tags["lenet_sweep.kind"] == "refit" and run.data.params["model.input_size"] == "40"
    assert run.data.params["train.epochs"] == "3" and "test_accuracy" not in run.data.metrics
    assert run.data.tags["mlflow.parentRunId"] == result.run_id
    assert json.loads((tmp_path / "exp" / "preprocessing.json").read_text())["input_size"] == 40
    assert "input_size: 40" in (tmp_path / "exp" / "config.yaml").read_text()
    loaded = export.load(tmp_path / "exp")
    assert loaded.model.input_shape == (None, 40, 40, 3)
    test_split = D.decode_split(swapped, D.find_splits(swapped, 0).files["test"], 40)
    predicted = np.argmax(loaded.model.predict(test_split.images / np.float32(255), verbose=0), axis=1)
    assert result.test_accuracy == pytest.approx(np.mean(predicted == test_split.labels))
    card = (tmp_path / "exp" / "MODEL_CARD.md").read_text()
    assert "at 40x40 px (the sweep's: 32x32 px) for 3 epochs" in card and "The refit is the exported model." in card
    assert any("3 epochs (best.final.epochs)" in line for line in lines)
    spent = result.spent
    assert spent["total"] == pytest.approx(spent["racing"] + spent["refit"] + spent["test_export"])


def test_two_equal_scores_are_no_certainty_with_a_spread_floor():
    assert best.t_interval([0.7, 0.7], 0.9) == (0.7, 0.7)  # no floor: a zero-width interval
    lo, hi = best.t_interval([0.7, 0.7], 0.9, min_std=0.01)
    half = stats.t.ppf(0.95, 1) * 0.01 / np.sqrt(2)
    assert lo == pytest.approx(0.7 - half) and hi == pytest.approx(0.7 + half)
    # a real spread above the floor is used as it is
    assert best.t_interval([0.6, 0.8], 0.9, min_std=0.01) == best.t_interval([0.6, 0.8], 0.9)
