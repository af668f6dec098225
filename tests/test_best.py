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
from PIL import Image

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
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "winner: trial" in result.stdout and "evaluated once" in result.stdout

    client = MlflowClient(store)
    (best_run,) = runs_of(store, "best")
    retrains = runs_of(store, "retrain")
    assert best_run.info.status == "FINISHED"
    # 2 distinct configurations x 3 seeds (the defaults), each nested under the best run, none tested
    assert len(retrains) == 6
    assert {r.data.tags["mlflow.parentRunId"] for r in retrains} == {best_run.info.run_id}
    assert {int(r.data.tags["lenet_sweep.seed"]) for r in retrains} == {1000, 1001, 1002}
    assert not any("test_accuracy" in r.data.metrics for r in retrains)
    assert all(r.data.params["data.split_seed"] == "0" for r in retrains)  # the sweep's split

    # the winner has the highest mean validation accuracy ...
    table = client.download_artifacts(best_run.info.run_id, "best/candidates.csv", str(tmp_path))
    rows = list(csv.DictReader(open(table)))
    means = {r["trial"]: float(r["val_accuracy_mean"]) for r in rows}
    winner = best_run.data.tags["lenet_sweep.winner_trial"]
    assert means[winner] == max(means.values()) and len(set(means.values())) == 2
    for trial, mean in means.items():
        scores = [r.data.metrics["best_val_accuracy"] for r in retrains if r.data.tags["lenet_sweep.trial_id"] == trial]
        assert mean == pytest.approx(np.mean(scores))
    # ... while the test split would have picked the other configuration
    test_split = D.decode_split(swapped, D.find_splits(swapped, 0).files["test"], 32)
    on_test = {}
    for r in retrains:
        model = best.load_run_model(client, r.info.run_id)
        predicted = np.argmax(model.predict(test_split.images / np.float32(255), verbose=0), axis=1)
        trial = r.data.tags["lenet_sweep.trial_id"]
        on_test.setdefault(trial, []).append(np.mean(predicted == test_split.labels))
    assert max(on_test, key=lambda t: np.mean(on_test[t])) != winner
    # the test split was evaluated once, on the best run, for the exported retraining
    assert best_run.data.metrics["test_accuracy"] == pytest.approx(
        on_test[winner][
            [r.info.run_id for r in retrains if r.data.tags["lenet_sweep.trial_id"] == winner].index(
                best_run.data.tags["lenet_sweep.winner_run_id"]
            )
        ]
    )

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
    assert json.loads((out / "preprocessing.json").read_text())["input_size"] == 32
    card = (out / "MODEL_CARD.md").read_text()
    assert f"{best_run.data.metrics['test_accuracy']:.4f}" in card and "0.5136" in card and "0.6321" in card
    m = best_run.data.metrics
    assert f"{m['val_accuracy_mean']:.4f} ± {m['val_accuracy_std']:.4f}" in card
    trained = best.load_run_model(client, best_run.data.tags["lenet_sweep.winner_run_id"])
    loaded = export.load(out)
    files = [swapped / "val" / CLASSES[0] / "img_000.JPEG", swapped / "val" / CLASSES[1] / "img_001.JPEG"]
    pixels, kept, failed = export.images_for(files, loaded.preprocessing)
    assert len(kept) == 2 and not failed
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


def test_a_cut_off_best_resumes_keeping_finished_retrainings(swept, tmp_path, monkeypatch):
    store, _ = swept
    cfg = compose_best(
        [
            "sweep.name=s",
            f"mlflow.tracking_uri={store}",
            "mlflow.experiment=sweep",
            f"export.dir={tmp_path / 'exp'}",
            "best.top_k=2",
            "best.seeds=1",
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
    result = best.run_best(cfg)
    assert result.resumed and result.run_id == cut.info.run_id
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
