"""Fuzzing what reads a store: random small sweeps, fabricated straight into one temporary MLflow store (one
experiment per case; no training, no data), with what real stores hold after crashes, kills and upgrades:
FAILED, KILLED and RUNNING trials and `best` runs, missing and NaN metrics, runs of older versions (no
config.yaml, fewer params and tags), missing or garbled artifacts, half-written exports, no finished trial.

`report` must write every section or refuse in one line (UserError); `best` must rank its candidates,
resume a cut-off run or refuse in one line, up to the point where it would train or test. Each case is
seeded: a failure names its seed and what was fabricated; rerun it with `-k seed-N`.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import pytest
import yaml
from matplotlib.figure import Figure
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import REPO, SECTIONS, compose_config
from lenet_sweep import best, export
from lenet_sweep.errors import UserError
from lenet_sweep.report import document, make_report
from lenet_sweep.tracking import store
from lenet_sweep.tracking.runs import TRAIN_GROUPS, flatten, history_csv, loggable_config

CASES = 30
SPACE = yaml.safe_load((REPO / "conf" / "search" / "default.yaml").read_text())["space"]
HISTORY = ("loss", "accuracy", "val_loss", "val_accuracy")
NAME = "fuzz"  # every case's sweep; each case has its own experiment


def pick(rng: random.Random, weights: dict[Any, float]) -> Any:
    return rng.choices(list(weights), list(weights.values()))[0]


def draw(rng: random.Random, spec: dict) -> Any:
    """A value of one search dimension, as KerasTuner would draw it."""
    kind = spec["type"]
    if kind == "choice":
        return rng.choice(spec["values"])
    if kind == "int":
        return rng.randint(spec["min"], spec["max"])
    if kind == "boolean":
        return rng.random() < 0.5
    lo, hi = spec["min"], spec["max"]
    return math.exp(rng.uniform(math.log(lo), math.log(hi))) if spec.get("sampling") == "log" else rng.uniform(lo, hi)


def put(tree: dict, key: str, value: Any) -> None:
    """Set a dotted config key (model.filters.2 indexes a list, growing it) in a plain config tree."""
    *parents, last = key.split(".")
    node: Any = tree
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[int(part)]
    if isinstance(node, list):
        node.extend([node[-1] if node else 0] * (int(last) + 1 - len(node)))
        node[int(last)] = value
    else:
        node[last] = value


@dataclass
class Truth:
    """What a case was fabricated with: what the readers may legitimately refuse, and its description."""

    scored: list[str] = field(default_factory=list)  # trial ids FINISHED with a finite score (metric or history)
    ranked: dict[str, float] = field(default_factory=dict)  # trial id -> finite best_val_accuracy of a FINISHED one
    unreadable: set[str] = field(default_factory=set)  # trial ids whose recorded config may not fit the schema
    resumable: str | None = None  # a cut-off `best` run that `best` must resume
    latest_best: tuple[str, str] | None = None  # the latest `best` run and its status
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "; ".join(self.notes)


class Fabricator:
    """Writes one random sweep (and `best` runs, single runs) into an experiment of `client`'s store."""

    def __init__(self, client: MlflowClient, bases: dict[str, dict], models: Path, seed: int, tmp: Path):
        self.client, self.bases, self.models, self.rng, self.tmp = client, bases, models, random.Random(seed), tmp
        self.exp = client.create_experiment(f"fuzz-{seed}", artifact_location=(tmp / "artifacts").as_uri())
        self.clock = 1_700_000_000_000 + seed * 10_000_000  # start times in creation order (ties reorder runs)
        self.truth = Truth()

    def note(self, text: str) -> None:
        self.truth.notes.append(text)

    def run(self, tags: dict[str, Any], name: str | None = None) -> str:
        self.clock += 1000
        return self.client.create_run(
            self.exp, start_time=self.clock, tags={k: str(v) for k, v in tags.items()}, run_name=name
        ).info.run_id

    def end(self, run_id: str, status: str) -> None:
        if status != "RUNNING":  # a process that died (SIGKILL, power cut) leaves its run RUNNING
            self.clock += 500
            self.client.set_terminated(run_id, status, end_time=self.clock)

    def log(self, run_id: str, params: dict | None = None, metrics: dict | None = None, tags: dict | None = None):
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), self.clock, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    # ---- pieces of a run ----------------------------------------------------------------------------

    def history(self, run_id: str, epochs: int, best: float) -> list[dict]:
        """Per-epoch rows as metrics (steps are epochs) or history.csv, with gaps, NaN and missing keys."""
        rng = self.rng
        rows = []
        for epoch in range(1, epochs + 1):
            v = best * epoch / epochs if math.isfinite(best) else rng.random()
            row = {"loss": 2.3 / epoch, "accuracy": v, "val_loss": 2.3 / epoch + rng.random() * 0.3, "val_accuracy": v}
            if rng.random() < 0.1:
                row[rng.choice(HISTORY)] = math.nan
            if rng.random() < 0.05:
                del row[rng.choice(list(row))]
            rows.append(row)
        how = pick(rng, {"metrics": 5, "csv": 3, "both": 1})
        if how in ("csv", "both"):
            self.client.log_text(run_id, history_csv(rows), "history.csv")
        if how in ("metrics", "both"):
            self.client.log_batch(
                run_id,
                metrics=[
                    Metric(k, v, self.clock, epoch)
                    for epoch, row in enumerate(rows, start=1)
                    if rng.random() > 0.05  # an epoch the metrics lost
                    for k, v in row.items()
                ],
            )
        return rows

    def config(self) -> tuple[dict, dict]:
        """(a trial's config tree, its dimension values): the search's defaults with random dimensions set."""
        rng = self.rng
        values = {}
        for dim in sorted(self.dims, key=lambda d: bool(SPACE[d].get("when"))):
            when = SPACE[dim].get("when") or {}
            if all(values.get(other) in allowed for other, allowed in when.items()):  # else KerasTuner leaves it out
                values[dim] = draw(rng, SPACE[dim])
        tree = copy.deepcopy(self.bases[values.get("optimizer", rng.choice(["adam", "sgd"]))])
        for dim, value in sorted(values.items(), key=lambda item: SPACE[item[0]]["key"] != "optimizer"):
            if SPACE[dim]["key"] != "optimizer":
                put(tree, SPACE[dim]["key"], value)
        return tree, values

    def record_config(self, run_id: str, trial_id: str, tree: dict, extra: dict) -> None:
        """Params and config.yaml as this version logs them, or as an older (or newer) one did."""
        rng = self.rng
        params = flatten({k: v for k, v in tree.items() if k != "mlflow"}) | extra
        era = pick(rng, {"now": 6, "no config.yaml": 2, "fewer params": 1, "garbled config.yaml": 1, "newer": 1})
        if era == "fewer params":
            params = {k: v for k, v in params.items() if rng.random() < 0.6}
            self.truth.unreadable.add(trial_id)
        if era == "newer":  # a key this version's schema does not know
            tree = copy.deepcopy(tree) | {"model": tree["model"] | {"attention": True}}
            params["model.attention"] = True
            self.truth.unreadable.add(trial_id)
        self.log(run_id, params=params)
        if era in ("now", "newer"):
            self.client.log_text(run_id, yaml.safe_dump(tree), "config.yaml")
        elif era == "garbled config.yaml":
            self.client.log_text(run_id, rng.choice(["- a list\n- not a config\n", "{unclosed: [", ""]), "config.yaml")
        if era != "now":
            self.note(f"trial {trial_id}: {era}")

    def score(self) -> float | None:
        return pick(
            self.rng,
            {self.rng.uniform(0.2, 0.9): 6, self.rng.uniform(0.0, 0.14): 2, math.nan: 1, None: 1},
        )

    # ---- the sweep ------------------------------------------------------------------------------------

    def sweep(self) -> tuple[str, Any]:
        rng, truth = self.rng, self.truth
        self.dims = rng.sample(sorted(SPACE), rng.randint(0, 6))
        tuner = pick(rng, {"random": 3, "hyperband": 2, "bayesian": 1})
        parent = self.run(
            {"lenet_sweep.kind": "sweep", "lenet_sweep.sweep": NAME, "search": "fuzz"}, name=f"sweep-{NAME}"
        )
        n = pick(rng, {0: 1, 1: 2, 2: 2, 3: 2, 5: 2, 7: 1})
        self.note(f"{n} trial(s) over {self.dims} ({tuner})")
        trial_ids = []
        for i in range(n):
            trial_id = f"{i:04d}"
            earlier = rng.random() < 0.1  # an attempt cut off before this one (a resumed sweep)
            if earlier:
                self.trial(parent, trial_id, tuner, attempt=1, status=pick(rng, {"KILLED": 1, "RUNNING": 1}))
            self.trial(parent, trial_id, tuner, attempt=1 + earlier, trial_ids=trial_ids)
            trial_ids.append(trial_id)
        data = flatten({"data": self.bases["adam"]["data"]})
        params = data | {"tuner.kind": tuner, "seed": rng.randint(1, 9)}
        if rng.random() < 0.85:
            params["search.dimensions"] = ",".join(self.dims)
        else:
            self.note("parent: no search.dimensions")
        if rng.random() < 0.7:
            params["tuner.executions_per_trial"] = rng.choice([1, 2])
        if rng.random() < 0.7:
            params["sweep.early_stopping_patience"] = rng.choice([None, 3])
        self.log(parent, params=params, metrics={"sweep_seconds": rng.choice([12.5, math.nan])})
        space = {"name": "fuzz", "space": {d: SPACE[d] for d in self.dims}}
        where = pick(rng, {"search_space.yaml": 5, "config.yaml": 2, "garbled": 1, "none": 1})
        if where == "search_space.yaml":
            self.client.log_text(parent, yaml.safe_dump(space), "search_space.yaml")
        elif where == "config.yaml":
            self.client.log_text(parent, yaml.safe_dump({"search": space}), "config.yaml")
        elif where == "garbled":
            self.client.log_text(parent, "space: [unclosed", "search_space.yaml")
        self.data_summary(parent)
        packages = pick(rng, {None: 2, '{"python": "3.11.2", "tensorflow-cpu": "2.21.0"}': 2, "[1, 2]": 1})
        if packages:
            self.client.log_text(parent, packages, "table_i_packages.json")
        self.end(parent, pick(rng, {"FINISHED": 6, "RUNNING": 2, "KILLED": 1, "FAILED": 1}))
        if not truth.scored:
            self.note("no trial finished with a score")
        return parent, self.client.get_run(parent)

    def trial(
        self, parent: str, trial_id: str, tuner: str, attempt: int, status: str | None = None, trial_ids=()
    ) -> None:
        rng = self.rng
        status = status or pick(rng, {"FINISHED": 6, "FAILED": 1.5, "KILLED": 1, "RUNNING": 0.7})
        tags = {"mlflow.parentRunId": parent, "lenet_sweep.kind": "trial", "lenet_sweep.sweep": NAME}
        if rng.random() < 0.92:  # older trials were not tagged with their id and attempt
            tags |= {"lenet_sweep.trial_id": trial_id, "lenet_sweep.attempt": attempt}
        else:
            self.note(f"trial {trial_id}: untagged")
        run_id = self.run(tags, name=f"trial-{trial_id}")
        key = tags.get("lenet_sweep.trial_id", run_id)
        tree, values = self.config()
        tree["seed"] = rng.randint(1, 50)
        extra = dict(values)
        epochs = pick(rng, {0: 1, 1: 1, 3: 2, 5: 2, 12: 1})
        if tuner == "hyperband":
            extra["tuner/epochs"] = rng.choice([2, 4, 12])
            if trial_ids and rng.random() < 0.4:
                extra |= {"tuner/trial_id": rng.choice(list(trial_ids)), "tuner/initial_epoch": rng.choice([0, 2, 4])}
        if SPACE.get(next(iter(values), ""), {}).get("type") == "float" and rng.random() < 0.1:
            extra[next(iter(values))] = rng.choice(["n/a", "None"])  # a value KerasTuner never drew
        self.record_config(run_id, key, tree, extra)
        score = self.score() if status != "RUNNING" or rng.random() < 0.3 else None
        metrics = {} if score is None else {"best_val_accuracy": score}
        if rng.random() < 0.8:
            metrics["best_epoch"] = rng.randint(0, max(epochs, 1))
        self.log(run_id, metrics=metrics)
        rows = self.history(run_id, epochs, score if score is not None else math.nan)
        self.end(run_id, status)
        if status == "FINISHED":
            self.truth.ranked.pop(key, None)  # a later attempt replaces an earlier one
            if score is not None and math.isfinite(score):
                self.truth.ranked[key] = score
            history = [r["val_accuracy"] for r in rows if math.isfinite(r.get("val_accuracy", math.nan))]
            if (score is not None and math.isfinite(score)) or history:
                self.truth.scored.append(key)

    def data_summary(self, run_id: str) -> None:
        """data/summary.json as this version logs it, as older ones did, or garbled."""
        classes = ["n01440764", "n02102040", "n03000684"]
        summary = {"classes": classes, "names": ["tench", "springer", "chain saw"], "skipped": 1}
        kind = pick(self.rng, {"none": 3, "now": 3, "old": 2, "ragged": 1, "garbled": 1})
        if kind == "now":
            summary |= {"counts": {"train": [5, 6, 7]}, "listed": {"train": [5, 6, 8], "val": [2, 2, 2]}}
        elif kind == "old":  # no listed counts: the split manifest lists the files
            manifest = "split,class,path\n" + "".join(f"train,{c},{c}/a.JPEG\nval,{c},{c}/b.JPEG\n" for c in classes)
            self.client.log_text(run_id, manifest, "data/split_manifest.csv")
            self.client.log_text(run_id, "split,path,reason\ntrain,x.jpg,truncated\n", "data/skipped_files.csv")
        elif kind == "ragged":
            summary |= {"counts": {"train": [5], "val": "many"}, "names": ["tench"]}
        if kind == "garbled":
            self.client.log_text(run_id, "[1, 2", "data/summary.json")
        elif kind != "none":
            self.client.log_dict(run_id, summary, "data/summary.json")
        if kind != "none":
            self.note(f"data summary: {kind}")

    # ---- `best` runs and single runs ------------------------------------------------------------------

    def best_runs(self, parent: str, settings: dict[str, str] | None, trial_ids: list[str]) -> None:
        """0-2 `best` runs of the sweep: finished, or cut off (RUNNING, KILLED, FAILED) with some of their
        retrainings finished; the latest one cut off with `settings` is one `best` must resume."""
        rng = self.rng
        for i in range(pick(rng, {0: 2, 1: 2, 2: 1})):
            status = pick(rng, {"FINISHED": 3, "RUNNING": 2, "KILLED": 2, "FAILED": 1})
            matching = settings is not None and rng.random() < 0.7
            params = (
                settings
                if matching
                else {"sweep.run_id": parent, "best.top_k": 9, "best.seeds": 1, "best.candidates": "0000"}
            )
            run_id = self.run(
                {"lenet_sweep.kind": "best", "lenet_sweep.sweep": NAME, "lenet_sweep.sweep_run_id": parent}
            )
            self.log(run_id, params=params | {"best.early_stopping_patience": None})
            # A run to resume retrained its own candidates, most of them (then `best` chooses from the store
            # alone); another run retrained whatever it chose then.
            candidates = params["best.candidates"].split(",") if matching else trial_ids[:3] or ["0000"]
            seeds = [1000 + s for s in range(int(params["best.seeds"]))]
            retrains = [
                self.retrain(run_id, trial_id, seed)
                for trial_id in candidates
                for seed in seeds
                if rng.random() < (0.85 if matching else 0.6)
            ]
            self.best_outputs(run_id, status, retrains)
            self.end(run_id, status)
            self.note(
                f"best run {i}: {status}, {'resumable' if matching else 'other settings'}, {len(retrains)} retrained"
            )
            self.truth.resumable = run_id if matching and status != "FINISHED" else None
            self.truth.latest_best = (run_id, status)

    def retrain(self, best_id: str, trial_id: str, seed: int) -> str:
        rng = self.rng
        tags = {"mlflow.parentRunId": best_id, "lenet_sweep.kind": "retrain", "lenet_sweep.candidate": 1}
        if rng.random() < 0.9:
            tags |= {"lenet_sweep.trial_id": trial_id}
        if rng.random() < 0.9:
            tags |= {"lenet_sweep.seed": seed}
        run_id = self.run(tags, name=f"trial-{trial_id}-seed{seed}")
        score = self.score()
        metrics = {} if score is None else {"best_val_accuracy": score}
        if rng.random() < 0.8:
            metrics["best_epoch"] = rng.randint(1, 5)
        self.log(run_id, metrics=metrics)
        self.history(run_id, pick(rng, {0: 1, 5: 2, 10: 1}), score if score is not None else math.nan)
        if rng.random() < 0.5:
            tree, _ = self.config()
            self.client.log_text(run_id, yaml.safe_dump(tree | {"seed": seed}), "config.yaml")
        model = pick(rng, {"loadable": 5, "damaged": 2, None: 2})
        if model:  # its model files, as train logs them
            self.client.log_artifacts(run_id, str(self.models / model), "model")
        self.end(run_id, pick(rng, {"FINISHED": 5, "KILLED": 1, "RUNNING": 1, "FAILED": 1}))
        return run_id

    def best_outputs(self, run_id: str, status: str, retrains: list[str]) -> None:
        """What a `best` run logs once it chose: candidates, the winner, its test evaluation (some of it)."""
        rng, log = self.rng, self.client.log_text
        if status != "FINISHED" and rng.random() < 0.5:
            return  # cut off before it chose
        if rng.random() < 0.8:
            log(
                run_id,
                rng.choice(
                    [
                        "sweep_rank,trial,sweep_val_accuracy,val_accuracy_mean,val_accuracy_std,seeds,failed,"
                        "val_accuracy_per_seed,hyperparameters,winner\n1,0000,0.6,0.55,0.01,3,0,0.55 0.54 0.56,"
                        "dense_1=64,yes\n2,0001,nan,,,x,,,,\n",
                        "rank,trial\n1,0000\n",  # an older layout
                        "",
                    ]
                ),
                "best/candidates.csv",
            )
        if rng.random() < 0.8:
            self.log(
                run_id,
                metrics={k: rng.choice([0.5, math.nan]) for k in ("test_accuracy", "test_loss", "val_accuracy_mean")},
            )
        if retrains and rng.random() < 0.8:
            winner = rng.choice([*retrains, "no-such-run"])
            self.log(run_id, tags={"lenet_sweep.winner_trial": "0000", "lenet_sweep.winner_run_id": winner})
        matrix = pick(
            rng,
            {
                json.dumps({"classes": ["a", "b"], "names": ["ant", "bee"], "matrix": [[3, 1], [0, 4]]}): 3,
                json.dumps({"classes": ["a", "b", "c"], "matrix": [[3, 1], [0, 4]]}): 1,  # fewer rows than classes
                json.dumps({"classes": ["a", "b"], "names": ["ant"], "matrix": [[3, 1, 2], [0, 4]]}): 1,  # ragged
                json.dumps({"classes": ["a"], "matrix": "none"}): 1,
                "{": 1,
                "": 2,
            },
        )
        if matrix:
            log(run_id, matrix, "evaluation/confusion_matrix.json")
        if rng.random() < 0.6:
            rows = rng.choice(
                [
                    "path,label,predicted,score,correct\nval/a/1.JPEG,a,b,0.9,0\nval/b/2.JPEG,b,b,0.8,1\n",
                    f"path,label,predicted,score,correct\n{self.tmp / 'gone.jpg'},a,b,x,0\n,,,,0\n",
                    "path,label\nval/a/1.JPEG,a\n",
                ]
            )
            log(run_id, rows, "evaluation/test_predictions.csv")

    def singles(self) -> None:
        """0-2 single runs (`train`) on the sweep's data, of this version or older ones."""
        rng = self.rng
        for _ in range(pick(rng, {0: 3, 1: 2, 2: 1})):
            run_id = self.run({"lenet_sweep.kind": "train", "model": "lenet5"})
            tree, _ = self.config()
            tree["model"]["name"] = rng.choice(["lenet5", "modified_lenet"])
            self.record_config(run_id, f"single {run_id[:6]}", tree, {})
            score = self.score()
            metrics = {"test_accuracy": rng.choice([0.4, math.nan])} | (
                {} if score is None else {"best_val_accuracy": score}
            )
            self.log(run_id, metrics=metrics)
            self.history(run_id, pick(rng, {0: 1, 3: 1, 10: 1}), score if score is not None else math.nan)
            self.end(run_id, pick(rng, {"FINISHED": 4, "KILLED": 1}))


# ---- the checks ----------------------------------------------------------------------------------------


class WouldTrain(Exception):
    """`best` got as far as training a candidate: everything before it read the store."""


class WouldTest(Exception):
    """`best` got as far as decoding the test split: it chose a winner from the store alone."""


class NoData:
    """Stands in for the train and val splits `best` would decode: there is no data here."""

    def __init__(self, *args: Any):
        pass

    def at(self, size: int) -> None:
        return None


def stop(exception: type[Exception]) -> Callable[..., None]:
    def stopped(*args: Any, **kwargs: Any) -> None:
        raise exception

    return stopped


@dataclass
class Fuzz:
    uri: str
    client: MlflowClient
    bases: dict[str, dict]  # optimizer -> a trial config of the search's model (plain tree)
    models: Path  # model files as a retraining logs them: loadable/ (a tiny model), damaged/
    report: Any  # conf/report.yaml as composed
    best: Any  # conf/best.yaml as composed


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory) -> Iterator[Fuzz]:
    """One SQLite store for every case (creating one costs seconds), and the configs composed once. The
    database lives in memory where the system offers it (/dev/shm): each of its thousands of commits
    waits for the disk otherwise, which makes up a third of this test's time."""
    memory = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=memory if memory.is_dir() else tmp_path_factory.getbasetemp()) as db:
        uri = f"sqlite:///{Path(db) / 'mlflow.db'}"
        bases = {}
        for optimizer in ("adam", "sgd"):
            cfg = compose_config("train", ["model=lenet_search", f"optimizer={optimizer}", "data.root=/data/fuzz"])
            bases[optimizer] = loggable_config(cfg, TRAIN_GROUPS)
        models = tmp_path_factory.mktemp("models")
        for kind in ("loadable", "damaged"):
            (models / kind).mkdir()
            (models / kind / export.LABELS).write_text(json.dumps(export.labels(["a", "b"], ["ant", "bee"])))
            (models / kind / export.PREPROCESSING).write_text(json.dumps(export.preprocessing(8, "bilinear", False)))
        keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2, "softmax")]).save(
            models / "loadable" / export.MODEL
        )
        (models / "damaged" / export.MODEL).write_bytes(b"cut off while writing")
        yield Fuzz(uri, MlflowClient(uri), bases, models, compose_config("report"), compose_config("best"))


def configured(base: Any, **values: Any) -> Any:
    cfg = copy.deepcopy(base)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def outcome(where: str, what: str, call: Callable[[], Any], allowed: tuple[type, ...] = ()) -> Any:
    """`call()`'s value, or the UserError (or `allowed` exception) it raised; any other exception fails
    the case with its traceback. A UserError is one line: the commands print it as `error: ...`."""
    try:
        return call()
    except (UserError, *allowed) as err:
        assert isinstance(err, allowed) or "\n" not in str(err), f"{where}: {what}: a message of several lines: {err}"
        return err
    except Exception:  # noqa: BLE001  the point of the test: anything but a UserError is a crash
        pytest.fail(f"{where}: {what} crashed:\n{traceback.format_exc()}", pytrace=False)


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def export_folder(rng: random.Random, tmp: Path) -> tuple[Path, str]:
    """export.dir for `best`: new, or what a cut-off export or an earlier one left there."""
    target = tmp / "export"
    kind = pick(rng, {"new": 3, "half-written": 1, "left partial": 1, "moved aside": 1, "earlier export": 1})
    if kind == "half-written":  # files of an export without its model, as no atomic writer leaves them
        target.mkdir()
        (target / "labels.json").write_text("{}")
    elif kind in ("left partial", "moved aside"):  # export.write's temporary folders, left by a SIGKILL
        aside = tmp / (".export.partial-4242" if kind == "left partial" else ".export.old-4242")
        aside.mkdir()
        (aside / "model.keras").write_bytes(b"not a model")
    elif kind == "earlier export":
        target.mkdir()
        (target / "model.keras").write_bytes(b"not a model")
    return target, kind


@pytest.mark.parametrize("seed", range(CASES), ids=lambda s: f"seed-{s}")
def test_report_and_best_read_any_odd_store_or_say_in_one_line_what_is_missing(seed, fuzz, tmp_path, monkeypatch):
    fab = Fabricator(fuzz.client, fuzz.bases, fuzz.models, seed, tmp_path)
    parent_id, parent = fab.sweep()
    truth, rng = fab.truth, fab.rng
    where = f"seed {seed} ({truth})"

    # best's ranking: the top_k best distinct configurations, on validation, or a refusal that says why.
    top_k, seeds = rng.randint(1, 3), rng.randint(1, 2)
    chosen = outcome(where, "best.candidates", lambda: best.candidates(fuzz.client, fab.exp, parent, top_k))
    if isinstance(chosen, UserError):
        assert not truth.ranked or truth.unreadable, f"{where}: best refused a sweep it can rank: {chosen}"
    else:
        scores = [c.sweep_val_accuracy for c in chosen]
        assert 1 <= len(chosen) <= top_k and all(math.isfinite(s) for s in scores), f"{where}: {chosen}"
        assert scores == sorted(scores, reverse=True) and {c.trial_id for c in chosen} <= set(truth.ranked), where
        assert max(scores) == max(truth.ranked.values()), f"{where}: the best trial was not ranked first"

    settings = {
        "sweep.run_id": parent_id,
        "best.top_k": top_k,
        "best.seeds": seeds,
        "best.first_seed": 1000,
        "best.candidates": "" if isinstance(chosen, UserError) else ",".join(c.trial_id for c in chosen),
        "best.overrides": "",
    }
    fab.best_runs(parent_id, None if isinstance(chosen, UserError) else settings, list(truth.ranked))
    fab.singles()
    where = f"seed {seed} ({truth})"  # now with the `best` and single runs

    # The report: every section, or one line saying there is nothing to report yet. Every figure is built;
    # one case in eight also lays them out and renders them (a second or more a case otherwise).
    if seed % 8:
        monkeypatch.setattr(Figure, "tight_layout", lambda self, **kwargs: None)
        monkeypatch.setattr(document, "_png", lambda fig: b"not rendered")
    out = tmp_path / "report"
    cfg = configured(
        fuzz.report,
        **{
            "mlflow.tracking_uri": fuzz.uri,
            "mlflow.experiment": f"fuzz-{seed}",
            "sweep.name": NAME,
            "report.dir": str(out),
            "report.top_trials": rng.randint(0, 3),
            "report.epochs": rng.choice([[5, 10, 25], [3], [10, 5]]),
            "report.turning_min_epochs": rng.choice([2, 9]),
        },
    )
    result = outcome(where, "report", lambda: make_report(cfg))
    if isinstance(result, UserError):
        assert not truth.scored, f"{where}: the report refused a sweep with a scored trial: {result}"
    else:
        md = (out / "report.md").read_text()
        missing = [s for s in SECTIONS if f"## {s}" not in md]
        assert not missing, f"{where}: sections missing from the report: {missing}"
        nan = [line for line in md.splitlines() if re.search(r"\bnan\b", line)]
        assert not nan, f"{where}: NaN written where the report should say what is missing: {nan}"
        strict_json((out / "report.json").read_text())
        if truth.latest_best and truth.latest_best[1] != "FINISHED":  # the report says to resume it
            assert f"run, {truth.latest_best[0]}, ended {truth.latest_best[1]} before it finished" in md, where

    # best up to where it would train or test: it resumes a cut-off run, or starts one, or refuses.
    target, export_kind = export_folder(rng, tmp_path)
    where += f"; export.dir {export_kind}"
    monkeypatch.setattr(best, "DataBySize", NoData)
    monkeypatch.setattr(best, "retrain", stop(WouldTrain))
    monkeypatch.setattr(best, "prepare_data", stop(WouldTest))
    cfg = configured(
        fuzz.best,
        **{
            "mlflow.tracking_uri": fuzz.uri,
            "mlflow.experiment": f"fuzz-{seed}",
            "sweep.name": NAME,
            "export.dir": str(target),
            "best.top_k": top_k,
            "best.seeds": seeds,
        },
    )
    runs_before = fuzz.client.search_runs([fab.exp], "tags.`lenet_sweep.kind` = 'best'")
    got = outcome(where, "best", lambda: best.run_best(cfg), allowed=(WouldTrain, WouldTest))
    runs_after = fuzz.client.search_runs([fab.exp], "tags.`lenet_sweep.kind` = 'best'")
    if isinstance(chosen, UserError) or export_kind in ("half-written", "earlier export"):
        assert isinstance(got, UserError), f"{where}: best did not refuse: {got!r}"
        assert len(runs_after) == len(runs_before), f"{where}: a refused best recorded a run"
    elif isinstance(got, (WouldTrain, WouldTest)):
        resumed = truth.resumable is not None
        assert len(runs_after) == len(runs_before) + (not resumed), f"{where}: resumed {resumed}, {got!r}"
        if resumed:
            left = store.trial_runs(fuzz.client, fab.exp, truth.resumable)
            assert all(r.info.status != "RUNNING" for r in left), f"{where}: a cut-off retraining left RUNNING"


def test_a_cut_off_best_resumes_from_the_store_keeping_what_it_can_and_training_the_rest(fuzz, tmp_path, monkeypatch):
    """The resume path the fuzz reaches rarely, step by step: an older trial (params only, no config.yaml)
    is a candidate; a finished retraining without its model ends KILLED and trains again; once every
    retraining is kept, `best` chooses from the store alone, up to the test split."""
    fab, client = Fabricator(fuzz.client, fuzz.bases, fuzz.models, 1000, tmp_path), fuzz.client
    parent = fab.run({"lenet_sweep.kind": "sweep", "lenet_sweep.sweep": NAME})
    fab.log(parent, params={"search.dimensions": "dense_1"})
    for i, (dense, score) in enumerate(((64, 0.6), (128, 0.5))):
        run = fab.run({"mlflow.parentRunId": parent, "lenet_sweep.kind": "trial", "lenet_sweep.trial_id": f"{i:04d}"})
        tree = copy.deepcopy(fuzz.bases["adam"])
        put(tree, "model.dense.0", dense)
        params = flatten({k: v for k, v in tree.items() if k != "mlflow"}) | {"dense_1": dense}
        fab.log(run, params=params, metrics={"best_val_accuracy": score})
        if i == 0:  # trial 0001 is older: its params are all it recorded
            client.log_text(run, yaml.safe_dump(tree), "config.yaml")
        fab.end(run, "FINISHED")
    fab.end(parent, "FINISHED")
    cut = fab.run({"lenet_sweep.kind": "best", "lenet_sweep.sweep": NAME, "lenet_sweep.sweep_run_id": parent})
    settings = {"sweep.run_id": parent, "best.top_k": 2, "best.seeds": 1, "best.first_seed": 1000}
    fab.log(cut, params=settings | {"best.candidates": "0000,0001", "best.overrides": ""})

    def retraining(trial_id: str, score: float, model: bool) -> str:
        tags = {"mlflow.parentRunId": cut, "lenet_sweep.kind": "retrain", "lenet_sweep.trial_id": trial_id}
        run = fab.run(tags | {"lenet_sweep.seed": 1000})
        fab.log(run, metrics={"best_val_accuracy": score, "best_epoch": 3})
        if model:
            client.log_artifacts(run, str(fuzz.models / "loadable"), "model")
        fab.end(run, "FINISHED")
        return run

    kept, modelless = retraining("0000", 0.58, model=True), retraining("0001", 0.52, model=False)
    fab.end(cut, "KILLED")
    monkeypatch.setattr(best, "DataBySize", NoData)
    monkeypatch.setattr(best, "retrain", stop(WouldTrain))
    monkeypatch.setattr(best, "prepare_data", stop(WouldTest))
    cfg = configured(
        fuzz.best,
        **{"mlflow.tracking_uri": fuzz.uri, "mlflow.experiment": "fuzz-1000", "sweep.name": NAME}
        | {"export.dir": str(tmp_path / "export"), "best.top_k": 2, "best.seeds": 1},
    )
    with pytest.raises(WouldTrain):  # 0001's retraining: trained again
        best.run_best(cfg)
    assert len(client.search_runs([fab.exp], "tags.`lenet_sweep.kind` = 'best'")) == 1  # resumed, not restarted
    assert client.get_run(kept).info.status == "FINISHED"
    closed = client.get_run(modelless)
    assert closed.info.status == "KILLED" and "no model/model.keras" in closed.data.tags["failure_reason"]

    retraining("0001", 0.52, model=True)  # as the resumed session would have recorded it
    with pytest.raises(WouldTest):  # chosen from the store alone: nothing trained
        best.run_best(cfg)
    chosen = client.get_run(cut)
    assert (
        chosen.data.tags["lenet_sweep.winner_trial"] == "0000" and chosen.data.tags["lenet_sweep.winner_run_id"] == kept
    )
    assert len(client.search_runs([fab.exp], "tags.`lenet_sweep.kind` = 'best'")) == 1
