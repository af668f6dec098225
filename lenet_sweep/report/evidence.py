"""What the store holds of one sweep, fetched once: its trials, its latest finished `best` run and that run's
retrainings, the experiment's single runs on the sweep's data, and the files the report shows (data check,
Table I, the winner's test evaluation). Every file is read through the shared reader,
`lenet_sweep.tracking.artifacts.Artifacts`; what is absent or unreadable reads as empty, never as an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from mlflow.tracking import MlflowClient

from lenet_sweep import data as D
from lenet_sweep.errors import UserError
from lenet_sweep.tracking import store
from lenet_sweep.tracking.artifacts import Artifacts

# Single runs count beside the sweep only when they trained on its data: the same folder, the same
# share held out for test, the same subset.
SAME_DATA = ("data.root", "data.test_fraction", "data.limit_per_class")
OBJECTIVE = "best_val_accuracy"  # a run's score: its best epoch's validation accuracy (never test)


@dataclass
class Run:
    """One training run as the store holds it: a sweep trial, a `best` retraining or a single run."""

    run_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch, 1-based by position
    started: int = 0  # start time, ms since the epoch
    ended: int = 0  # end time, ms since the epoch (0 while running)
    config: dict[str, Any] = field(default_factory=dict)  # its training config (config.yaml, else its params)

    @property
    def score(self) -> Optional[float]:
        """Best validation accuracy: the run's own metric, else the best epoch of its history (a NaN metric
        says only that no epoch was scored: it counts as none)."""
        if math.isfinite(self.metrics.get(OBJECTIVE, math.nan)):
            return self.metrics[OBJECTIVE]
        values = [row["val_accuracy"] for row in self.history if math.isfinite(row.get("val_accuracy", math.nan))]
        return max(values) if values else None

    def param(self, key: str) -> Any:
        """A param as the value it was logged from (None for a missing or None param): search dimensions
        (filters_1, adam_learning_rate) and KerasTuner's tuner/* values live only here."""
        text = self.params.get(key)
        return None if text in (None, "None") else store.number(text)

    def value(self, key: str) -> Any:
        """A dotted config key (model.name, model.filters, train.epochs, seed, data.root) from the run's
        config, else from its param."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return self.param(key)
            node = node[part]
        return node


def budget_of(run: Run) -> int:
    """The epochs a run was allowed (Hyperband's tuner/epochs, else train.epochs)."""
    return int(run.param("tuner/epochs") or run.value("train.epochs") or 0)


@dataclass
class Configuration:
    """One point of the search space, counted once with the best score of its trials.

    Hyperband trains a configuration in rounds: a fresh trial, then trials that continue from the best
    epoch's weights of the round before, with a fresh optimizer. Their joined history is not one training
    run, so per-epoch questions (budgets, turning points) read the fresh trial's history only.
    """

    values: dict[str, Any]
    trials: list[Run]

    @property
    def score(self) -> float:
        """The best score of its trials."""
        return max(t.score for t in self.trials)

    @property
    def history(self) -> list[dict[str, float]]:
        """The longest history of any round (later rounds include the epochs they continue)."""
        return max((t.history for t in self.trials), key=len)

    @property
    def fresh(self) -> Optional[Run]:
        """The trial that trained from scratch, in one uninterrupted run (None if it is not recorded)."""
        return next((t for t in self.trials if t.param("tuner/trial_id") is None), None)

    @property
    def restarts(self) -> list[int]:
        """Epochs after which a later round took over (from an earlier epoch's weights)."""
        return sorted(
            {int(t.param("tuner/initial_epoch") or 0) for t in self.trials if t.param("tuner/trial_id") is not None}
        )

    @property
    def ids(self) -> str:
        """Its trials' ids, joined with +."""
        return "+".join(t.tags.get("lenet_sweep.trial_id", t.run_id[:8]) for t in self.trials)


@dataclass
class Evidence:
    """Everything the report reads, fetched once."""

    parent: Any  # the sweep's parent run (mlflow Run)
    space: dict[str, str]  # dimension -> the config key it sets ("?" when the sweep did not record it)
    types: dict[str, str]  # dimension -> its type (choice, int, float, boolean)
    trials: list[Run]  # latest attempt of every trial, any status
    best: Any  # the sweep's latest finished `best` run, or None
    retrains: list[Run]  # its retrainings
    singles: list[Run]  # the experiment's single runs (train, reproduce), finished
    data: Optional[dict]  # data/summary.json (classes, names, counts, listed, skipped), see `data_summary`
    skipped: list[dict]  # data/skipped_files.csv rows
    packages: dict[str, str]  # our Table I (table_i_packages.json)
    candidates: list[dict]  # best/candidates.csv rows
    confusion: Optional[dict]  # evaluation/confusion_matrix.json of the winner, see `confusion_matrix`
    predictions: list[dict]  # evaluation/test_predictions.csv rows of the winner
    sample_images: Optional[bytes]  # plots/sample_images.png
    data_root: Optional[str]  # where the winner's data was (for the misclassified images)
    cut_off: Any = None  # the sweep's latest `best` run if it did not finish (cut off, failed), else None
    specs: dict[str, dict] = field(default_factory=dict)  # dimension -> its recorded spec (values, min, max, ...)

    @property
    def finished(self) -> list[Run]:
        """The trials that finished with a score."""
        return [t for t in self.trials if t.status == "FINISHED" and t.score is not None]


def gather(client: MlflowClient, experiment_id: str, parent) -> Evidence:
    """Fetch what the report needs of sweep `parent` and of the experiment it lives in."""
    art = Artifacts(client)
    parent_id = parent.info.run_id
    dims = _space(art, parent)
    trials = [
        _run(art, r, with_history=r.info.status == "FINISHED")
        for r in store.latest_attempts(client, experiment_id, parent_id).values()
    ]
    best = store.latest_best(client, experiment_id, parent_id, finished=True)
    latest = store.latest_best(client, experiment_id, parent_id)
    retrains = (
        []
        if best is None
        else [
            _run(art, r)
            for r in store.trial_runs(client, experiment_id, best.info.run_id)
            # the refit trains at another fidelity: not one of the seeds
            if r.info.status == "FINISHED" and r.data.tags.get("lenet_sweep.kind") != "refit"
        ]
    )
    singles = _singles(art, client, experiment_id, parent)
    winner_id = best.data.tags.get("lenet_sweep.winner_run_id") if best else None
    # The data check and Table I: the sweep's own (logged by sweeps since the report), else the winner's.
    sources = [parent_id, *([winner_id] if winner_id else []), *(r.run_id for r in retrains[:1])]
    source, data = next(
        ((s, d) for s in sources if (d := data_summary(art.json(s, "data/summary.json")))), (None, None)
    )
    if data and not data.get("listed"):  # older runs: count the split manifest, which lists every split
        data["listed"] = listed_counts(art.csv(source, "data/split_manifest.csv"), data.get("classes") or [])
    packages = next(
        (
            p
            for p in (art.json(s, "table_i_packages.json") for s in [*sources, *(r.run_id for r in singles[:1])])
            if _mapping(p)
        ),
        {},
    )
    winner = next((r for r in retrains if r.run_id == winner_id), None)
    best_id = best.info.run_id if best else None
    return Evidence(
        parent=parent,
        space={d: spec["key"] for d, spec in dims.items()},
        types={d: spec["type"] for d, spec in dims.items()},
        trials=trials,
        best=best,
        retrains=retrains,
        singles=singles,
        data=data,
        skipped=art.csv(source, "data/skipped_files.csv") if source else [],
        packages=packages,
        candidates=art.csv(best_id, "best/candidates.csv") if best_id else [],
        confusion=confusion_matrix(art.json(best_id, "evaluation/confusion_matrix.json")) if best_id else None,
        predictions=art.csv(best_id, "evaluation/test_predictions.csv") if best_id else [],
        sample_images=next((b for b in (art.raw(s, "plots/sample_images.png") for s in sources) if b), None),
        data_root=(winner.params.get("data.resolved_root") or winner.value("data.root")) if winner else None,
        cut_off=latest if latest is not None and latest.info.status != "FINISHED" else None,
        specs=dims,
    )


# ---- files as the report reads them: what does not have the shape this version writes reads as absent -------


def data_summary(value: Any) -> Optional[dict]:
    """data/summary.json: its classes and their names, and per split one count per class (splits of another
    shape, as an older or damaged file holds them, are left out); None without a list of classes."""
    classes = value.get("classes") if isinstance(value, dict) else None
    if not isinstance(classes, list) or not classes:
        return None
    names = value.get("names")

    def per_split(counts: Any) -> dict[str, list[int]]:
        if not isinstance(counts, dict):
            return {}
        return {
            split: [int(n) for n in row]
            for split, row in counts.items()
            if split in D.SPLITS and isinstance(row, list) and len(row) == len(classes) and all(map(_count, row))
        }

    return {
        "classes": [str(c) for c in classes],
        "names": [str(n) for n in (names if isinstance(names, list) and len(names) == len(classes) else classes)],
        "counts": per_split(value.get("counts")),
        "listed": per_split(value.get("listed")),
        "skipped": int(value["skipped"]) if _count(value.get("skipped")) else 0,
    }


def confusion_matrix(value: Any) -> Optional[dict]:
    """evaluation/confusion_matrix.json: a square matrix of counts, one row and column per class, and the
    classes' names (their ids where the names do not match them); None for a file of any other shape."""
    if not _mapping(value, "matrix", "classes"):
        return None
    classes, matrix, names = value["classes"], value["matrix"], value.get("names")
    square = (
        isinstance(classes, list)
        and classes
        and isinstance(matrix, list)
        and len(matrix) == len(classes)
        and all(isinstance(row, list) and len(row) == len(classes) and all(map(_count, row)) for row in matrix)
    )
    if not square:
        return None
    return {
        "classes": [str(c) for c in classes],
        "names": [str(n) for n in (names if isinstance(names, list) and len(names) == len(classes) else classes)],
        "matrix": [[int(n) for n in row] for row in matrix],
    }


def _count(value: Any) -> bool:
    """Whether a JSON value is a count (a whole, non-negative number)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
        and float(value).is_integer()
    )


def listed_counts(manifest: Sequence[dict], classes: Sequence[str]) -> Optional[dict[str, list[int]]]:
    """Files per split and class from a split manifest (rows: split, class, path); None without one."""
    if not manifest:
        return None
    index = {c: i for i, c in enumerate(classes)}
    counts = {split: [0] * len(classes) for split in D.SPLITS}
    for row in manifest:
        if row.get("split") in counts and row.get("class") in index:
            counts[row["split"]][index[row["class"]]] += 1
    return counts


def _run(art: Artifacts, r, with_history: bool = True) -> Run:
    """An MLflow run as the report reads it, with its config and (if asked) its per-epoch history."""
    return Run(
        r.info.run_id,
        r.info.status,
        dict(r.data.params),
        dict(r.data.metrics),
        dict(r.data.tags),
        art.history(r.info.run_id) if with_history else [],
        r.info.start_time or 0,
        r.info.end_time or 0,
        _config(art, r),
    )


def _config(art: Artifacts, r) -> dict[str, Any]:
    """A run's training config; empty (so its params answer) when what it recorded does not fit the schema."""
    try:
        return art.config(r)
    except UserError:
        return {}


def _singles(art: Artifacts, client: MlflowClient, experiment_id: str, parent) -> list[Run]:
    """The experiment's finished single runs (train, reproduce) that trained on the sweep's data."""
    sweep = _run(art, parent, with_history=False)
    out = []
    for r in store.all_runs(client, experiment_id, "attributes.status = 'FINISHED'"):
        if r.data.tags.get("lenet_sweep.kind", "train") != "train":
            continue
        run = _run(art, r, with_history=False)
        # Compared as text, as the params they were once read from: 50 and "50" are the same subset.
        if all(str(run.value(k)) == str(sweep.value(k)) for k in SAME_DATA):
            run.history = art.history(r.info.run_id)
            out.append(run)
    return out


def _space(art: Artifacts, parent) -> dict[str, dict[str, Any]]:
    """The sweep's dimensions: {name: {"key": config key it sets, "type": choice | int | float | boolean, and
    the rest of its spec as recorded (values, min, max, sampling, ...)}}, from search_space.yaml, else from
    the search section of the parent's config.yaml ("?" where unknown)."""
    parent_id = parent.info.run_id
    dimensions = [d for d in parent.data.params.get("search.dimensions", "").split(",") if d]
    space = (art.yaml(parent_id, "search_space.yaml") or {}).get("space")
    if not space:
        search = (art.yaml(parent_id, "config.yaml") or {}).get("search")
        space = search.get("space") if isinstance(search, dict) else None
    space = space if isinstance(space, dict) else {}
    specs = {d: space.get(d) if isinstance(space.get(d), dict) else {} for d in dimensions}
    return {
        d: {**spec, "key": str(spec.get("key", "?")), "type": str(spec.get("type", "?"))} for d, spec in specs.items()
    }


def _mapping(value: Any, *keys: str) -> Optional[dict]:
    """`value` if it is a non-empty JSON object holding `keys`, else None (a file of another shape)."""
    return value if isinstance(value, dict) and value and all(k in value for k in keys) else None
