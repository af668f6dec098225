"""The sweep report: the study's questions answered from what MLflow holds.
`python -m lenet_sweep.report sweep.name=NAME mlflow.tracking_uri=URI mlflow.experiment=NAME report.dir=DIR`

Reading order: what the store holds (the sweep's trials, its `best` run and retrainings, the experiment's
single runs) -> the facts (every number of the report, computed here, kept in report.json) -> the blocks
of the report (headings, sentences, tables, figures) -> report.md, report.html (figures embedded) and
report.json in `report.dir`, also logged to the sweep's parent run under report/.

Nothing is trained or evaluated here: the test numbers are the ones `best` (and `train`/`reproduce`)
recorded, each evaluated once.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import hydra
import mlflow
import numpy as np
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from lenet_sweep import cli, plots, store
from lenet_sweep import data as D
from lenet_sweep.config import register_configs
from lenet_sweep.errors import UserError

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")  # per-epoch metrics a history is rebuilt from
# Single runs count beside the sweep only when they trained on its data: the same folder, the same
# share held out for test, the same subset.
SAME_DATA = ("data.root", "data.test_fraction", "data.limit_per_class")
OBJECTIVE = "best_val_accuracy"  # a run's score: its best epoch's validation accuracy (never test)


# ---- what the store holds ----------------------------------------------------------------------


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

    @property
    def score(self) -> Optional[float]:
        """Best validation accuracy: the run's own metric, else the best epoch of its history."""
        if OBJECTIVE in self.metrics:
            return self.metrics[OBJECTIVE]
        values = [
            row["val_accuracy"] for row in self.history if math.isfinite(row.get("val_accuracy", math.nan))
        ]
        return max(values) if values else None

    def param(self, key: str) -> Any:
        """A param as the value it was logged from (None for a missing or None param)."""
        text = self.params.get(key)
        return None if text in (None, "None") else store.number(text)


def budget_of(run: Run) -> int:
    """The epochs a run was allowed (Hyperband's tuner/epochs, else train.epochs)."""
    return int(run.param("tuner/epochs") or run.param("train.epochs") or 0)


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
        return sorted({int(t.param("tuner/initial_epoch") or 0) for t in self.trials
                       if t.param("tuner/trial_id") is not None})

    @property
    def ids(self) -> str:
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
    data: Optional[dict]  # data/summary.json (classes, names, counts, listed, skipped)
    skipped: list[dict]  # data/skipped_files.csv rows
    packages: dict[str, str]  # our Table I (table_i_packages.json)
    candidates: list[dict]  # best/candidates.csv rows
    confusion: Optional[dict]  # evaluation/confusion_matrix.json of the winner
    predictions: list[dict]  # evaluation/test_predictions.csv rows of the winner
    sample_images: Optional[bytes]  # plots/sample_images.png
    data_root: Optional[str]  # where the winner's data was (for the misclassified images)

    @property
    def finished(self) -> list[Run]:
        return [t for t in self.trials if t.status == "FINISHED" and t.score is not None]


class Artifacts:
    """Reads a run's artifacts into memory (downloads to a temporary folder); absent ones read as None."""

    def __init__(self, client: MlflowClient, folder: Path):
        self.client, self.folder, self._n = client, folder, 0

    def raw(self, run_id: str, path: str) -> Optional[bytes]:
        self._n += 1
        try:
            local = self.client.download_artifacts(run_id, path, str(self.folder / str(self._n)))
        except Exception:  # noqa: BLE001  absent, or a store that cannot serve it (S3, a server): both unread
            return None
        return Path(local).read_bytes() if Path(local).is_file() else None

    def text(self, run_id: str, path: str) -> Optional[str]:
        raw = self.raw(run_id, path)
        return raw.decode("utf-8", errors="replace") if raw is not None else None

    def json(self, run_id: str, path: str) -> Optional[Any]:
        text = self.text(run_id, path)
        try:
            return json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            return None

    def csv(self, run_id: str, path: str) -> list[dict]:
        text = self.text(run_id, path)
        return list(csv.DictReader(io.StringIO(text))) if text else []

    def history(self, run_id: str) -> list[dict[str, float]]:
        """Per-epoch rows from history.csv, else from the run's per-epoch metrics (steps are epochs)."""
        rows = [{k: _float(v) for k, v in row.items() if k != "epoch"} for row in self.csv(run_id, "history.csv")]
        if rows:
            return rows
        by_epoch: dict[int, dict[str, float]] = {}
        for key in HISTORY_KEYS:
            try:
                points = self.client.get_metric_history(run_id, key)
            except Exception:  # noqa: BLE001  a store that cannot answer: the run has no history here
                points = []
            for m in points:
                by_epoch.setdefault(int(m.step), {})[key] = float(m.value)
        last = max(by_epoch, default=0)
        return [by_epoch.get(epoch, {}) for epoch in range(1, last + 1)]


def _float(text: Optional[str]) -> float:
    try:
        return float(text) if text not in (None, "", "None") else math.nan
    except ValueError:
        return math.nan


def _int(text: Optional[str]) -> int:
    value = _float(text)
    return int(value) if math.isfinite(value) else 0


def _run(r, history: list[dict[str, float]]) -> Run:
    return Run(r.info.run_id, r.info.status, dict(r.data.params), dict(r.data.metrics),
               dict(r.data.tags), history, r.info.start_time or 0, r.info.end_time or 0)


def _space(artifacts: Artifacts, parent) -> dict[str, dict]:
    """The sweep's dimensions: {name: {"key": config key it sets, "type": choice | int | float | boolean}},
    from search_space.yaml, else from the search section of the parent's config.yaml."""
    dimensions = [d for d in parent.data.params.get("search.dimensions", "").split(",") if d]
    space: dict = {}
    for path, pick in (("search_space.yaml", lambda c: c), ("config.yaml", lambda c: c.get("search", {}))):
        try:
            recorded = OmegaConf.to_container(OmegaConf.create(artifacts.text(parent.info.run_id, path) or "{}"))
        except Exception:  # noqa: BLE001  an unreadable file: try the next
            continue
        space = pick(recorded).get("space", {}) if isinstance(recorded, dict) else {}
        if space:
            break
    return {d: {"key": str((space.get(d) or {}).get("key", "?")), "type": str((space.get(d) or {}).get("type", "?"))}
            for d in dimensions}


def gather(client: MlflowClient, experiment_id: str, parent, folder: Path) -> Evidence:
    """Fetch what the report needs of sweep `parent` and of the experiment it lives in."""
    art = Artifacts(client, folder)
    parent_id = parent.info.run_id
    dims = _space(art, parent)
    trials = [
        _run(r, art.history(r.info.run_id) if r.info.status == "FINISHED" else [])
        for r in store.latest_attempts(client, experiment_id, parent_id).values()
    ]
    best = store.latest_best(client, experiment_id, parent_id, finished=True)
    retrains = (
        []
        if best is None
        else [
            _run(r, art.history(r.info.run_id))
            for r in store.trial_runs(client, experiment_id, best.info.run_id)
            if r.info.status == "FINISHED"
        ]
    )
    singles = []
    for r in store.all_runs(client, experiment_id, "attributes.status = 'FINISHED'"):
        same_data = all(r.data.params.get(k) == parent.data.params.get(k) for k in SAME_DATA)
        if r.data.tags.get("lenet_sweep.kind", "train") == "train" and same_data:
            singles.append(_run(r, art.history(r.info.run_id)))
    winner_id = best.data.tags.get("lenet_sweep.winner_run_id") if best else None
    # The data check and Table I: the sweep's own (logged by sweeps since the report), else the winner's.
    sources = [parent_id, *([winner_id] if winner_id else []), *(r.run_id for r in retrains[:1])]
    source, data = next(((s, d) for s in sources if (d := art.json(s, "data/summary.json"))), (None, None))
    if data and not data.get("listed"):  # older runs: count the split manifest, which lists every split
        data["listed"] = listed_counts(art.csv(source, "data/split_manifest.csv"), data.get("classes", []))
    packages = next((p for p in (art.json(s, "table_i_packages.json")
                                 for s in [*sources, *(r.run_id for r in singles[:1])]) if p), {})
    winner = next((r for r in retrains if r.run_id == winner_id), None)
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
        candidates=art.csv(best.info.run_id, "best/candidates.csv") if best else [],
        confusion=art.json(best.info.run_id, "evaluation/confusion_matrix.json") if best else None,
        predictions=art.csv(best.info.run_id, "evaluation/test_predictions.csv") if best else [],
        sample_images=next((b for b in (art.raw(s, "plots/sample_images.png") for s in sources) if b), None),
        data_root=(winner.params.get("data.resolved_root") or winner.params.get("data.root")) if winner else None,
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


# ---- the facts ---------------------------------------------------------------------------------


def stats(values: Iterable[Optional[float]]) -> dict[str, Any]:
    """n, mean, sample std (None for one value: no spread to speak of), min, max, median of the finite
    values."""
    xs = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not len(xs):
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "median": None}
    return {
        "n": int(len(xs)),
        "mean": float(xs.mean()),
        "std": float(xs.std(ddof=1)) if len(xs) > 1 else None,
        "min": float(xs.min()),
        "max": float(xs.max()),
        "median": float(np.median(xs)),
    }


def configurations(ev: Evidence) -> list[Configuration]:
    """The sweep's finished configurations, best score first."""
    groups: dict[str, Configuration] = {}
    for t in ev.finished:
        values = {d: t.param(d) for d in ev.space if d in t.params}
        key = repr(sorted((k, str(v)) for k, v in values.items()))
        groups.setdefault(key, Configuration(values, [])).trials.append(t)
    return sorted(groups.values(), key=lambda c: -c.score)


def turning(history: Sequence[dict]) -> tuple[int, bool]:
    """(epoch of minimum validation loss, whether validation loss rose after it within the run)."""
    epoch = plots.turning_point(history)
    return epoch, 0 < epoch < len(history)


def num_classes(ev: Evidence) -> int:
    if ev.data and ev.data.get("classes"):
        return len(ev.data["classes"])
    names = [k for k in ev.parent.data.params if k.startswith("data.class_names.")]
    return len(names) or 10


def family(run: Run) -> str:
    """Model family for the turning points: the model's name and its number of conv blocks."""
    blocks = run.param("model.conv_layers") or len(_list(run.params.get("model.filters")))
    return f"{run.params.get('model.name', '?')}, {blocks} conv blocks"


def _list(text: Optional[str]) -> list:
    try:
        value = json.loads(text) if text else []
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []


def compute(ev: Evidence, cfg: DictConfig) -> dict[str, Any]:
    """Every number of the report, from `ev` alone."""
    settings = cfg.report
    classes = num_classes(ev)
    chance = 1.0 / classes
    threshold = chance + settings.chance_margin
    configs = configurations(ev)

    def collapsed(score: Optional[float]) -> bool:
        return score is not None and score < threshold

    def dead_at_first_epoch(history: Sequence[dict]) -> bool:
        return bool(history) and abs(history[0].get("val_loss", math.nan) - math.log(classes)) < 0.01

    working = [c for c in configs if not collapsed(c.score)]
    facts: dict[str, Any] = {
        "sweep": _sweep_facts(ev),
        "chance": {
            "classes": classes,
            "chance_accuracy": chance,
            "threshold": threshold,
            "ln_classes": math.log(classes),
        },
        "configurations": [
            {"trials": c.ids, "values": c.values, "score": c.score, "epochs": len(c.history),
             "restarts": c.restarts, "collapsed": collapsed(c.score)}
            for c in configs
        ],
    }
    failed = [t for t in ev.trials if t.status == "FAILED"]  # diverged or crashed: counted beside the scores

    # Output activation: how often each value collapses, and what the rest reach.
    activation_dims = [d for d, k in ev.space.items() if k == "model.output_activation"]
    rows = []
    for dim in activation_dims:
        for value in sorted({str(c.values.get(dim)) for c in configs}):
            group = [c for c in configs if str(c.values.get(dim)) == value]
            rows.append(
                {
                    "dimension": dim,
                    "value": value,
                    "configurations": len(group),
                    "trials": sum(len(c.trials) for c in group),
                    "collapsed": sum(collapsed(c.score) for c in group),
                    "dead_at_epoch_1": sum(dead_at_first_epoch(c.history) for c in group),
                    "failed": sum(str(t.param(dim)) == value for t in failed),
                    "score": stats(c.score for c in group),
                }
            )
    singles = []
    keys = ("model.name", "optimizer.name", "model.output_activation", "train.epochs")
    for key, group in _group(ev.singles, keys).items():
        # One run per seed (the latest): a rerun of the same seed is the same draw, not another.
        by_seed = {r.param("seed"): r for r in sorted(group, key=lambda r: r.started)}
        runs = [by_seed[seed] for seed in sorted(by_seed, key=str)]
        singles.append(
            {
                "model": key[0],
                "optimizer": key[1],
                "output_activation": key[2],
                "budget": key[3],
                "seeds": [r.param("seed") for r in runs],
                "runs": len(runs),
                "collapsed": sum(collapsed(r.score) for r in runs),
                "dead_at_epoch_1": sum(dead_at_first_epoch(r.history) for r in runs),
                "score": stats(r.score for r in runs),
                "test_accuracy": stats(r.metrics.get("test_accuracy") for r in runs),
                "epochs": stats(len(r.history) for r in runs),
            }
        )
    facts["output_activation"] = {"sweep": rows, "single_runs": singles}

    # Filters, conv layers, dense widths, epochs as a dimension: score per value, collapsed runs left out.
    questions = {
        "filters_and_layers": lambda k: k.startswith("model.filters") or k == "model.conv_layers",
        "dense_widths": lambda k: k.startswith("model.dense"),
        "epochs_dimension": lambda k: k == "train.epochs",
    }
    for name, wanted in questions.items():
        facts[name] = [_by_value(dim, working, failed, ev.types.get(dim) == "float")
                       for dim, k in ev.space.items() if wanted(k)]
    facts["other_dimensions"] = [
        _by_value(dim, working, failed, ev.types.get(dim) == "float")
        for dim, k in ev.space.items()
        if not any(w(k) for w in questions.values()) and dim not in activation_dims
    ]

    facts["epochs"] = _epochs_facts(working, ev.retrains, list(settings.epochs))
    facts["turning_points"] = _turning_facts(
        working,
        [r for r in ev.retrains if not collapsed(r.score)],
        [r for r in ev.singles if not collapsed(r.score)],
        cfg,
    )
    facts["continued"] = sum(bool(c.restarts) for c in configs)
    facts["collapsed_left_out"] = len(configs) - len(working)
    facts["multi_seed"] = _multi_seed_facts(ev)
    facts["table_ii"] = _table_ii(ev, cfg, singles)
    facts["table_i"] = _table_i(ev, cfg)
    facts["confusion"] = _confusion_facts(ev, settings.confused_pairs)
    facts["data"] = _data_facts(ev)
    return facts


def _group(runs: Sequence[Run], keys: Sequence[str]) -> dict[tuple, list[Run]]:
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(str(r.params.get(k)) for k in keys), []).append(r)
    return dict(sorted(groups.items()))


def _by_value(dim: str, configs: Sequence[Configuration], failed: Sequence[Run], continuous: bool) -> dict:
    """Score per value of `dim` (and how many trials with that value failed); a continuous dimension (a
    float: a learning rate) gets the rank correlation of its value with the score instead, as per-value
    rows would hold one run each."""
    have = [c for c in configs if c.values.get(dim) is not None]
    values = sorted({c.values[dim] for c in have}, key=_order)
    if continuous:
        return {
            "dimension": dim,
            "rows": [],
            "failed": sum(t.param(dim) is not None for t in failed),
            "continuous": {
                "n": len(have),
                "spearman": _spearman([c.values[dim] for c in have], [c.score for c in have]),
                "min": min(values),
                "max": max(values),
            },
        }
    rows = [
        {
            "value": v,
            "configurations": len(g),
            "trials": sum(len(c.trials) for c in g),
            "failed": sum(str(t.param(dim)) == str(v) for t in failed),
            "score": stats(c.score for c in g),
        }
        for v in values
        for g in [[c for c in have if c.values[dim] == v]]
    ]
    return {"dimension": dim, "rows": rows}


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (ties get their mean rank); None for fewer than 3 pairs."""
    if len(xs) < 3:
        return None

    def ranks(v: Sequence[float]) -> np.ndarray:
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(1, len(v) + 1)
        for value in np.unique(v):
            r[v == value] = r[v == value].mean()
        return r

    rx, ry = ranks(xs), ranks(ys)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _order(value: Any) -> tuple:
    return (
        (0, value, "")
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else (1, 0, str(value))
    )


def _sweep_facts(ev: Evidence) -> dict[str, Any]:
    p = ev.parent
    status = Counter(t.status for t in ev.trials)
    return {
        "name": p.data.tags.get("lenet_sweep.sweep"),
        "run_id": p.info.run_id,
        "status": p.info.status,
        "tuner": p.data.params.get("tuner.kind"),
        "search": p.data.tags.get("search"),
        "dimensions": list(ev.space),
        "trials": len(ev.trials),
        "finished": status.get("FINISHED", 0),
        "failed": status.get("FAILED", 0),
        "killed": status.get("KILLED", 0),
        "running": status.get("RUNNING", 0),
        "executions": store.number(p.data.params.get("tuner.executions_per_trial")),
        "seconds": p.data.metrics.get("sweep_seconds"),
        "commit": p.data.tags.get("mlflow.source.git.commit"),
        "stopped_because": p.data.tags.get("stopped_because", ""),
        "patience": store.number(p.data.params.get("sweep.early_stopping_patience")),
        "seed": store.number(p.data.params.get("seed")),
    }


def _best_within(history: Sequence[dict], k: int) -> float:
    values = [row.get("val_accuracy", math.nan) for row in history[:k]]
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


def _epochs_facts(configs: Sequence[Configuration], retrains: Sequence[Run], budgets: list[int]) -> dict:
    """Best validation accuracy reached within k epochs, for each budget k.

    A run counts for k if it trained k epochs, or stopped early before k (early stopping would have
    stopped it there with any budget); a run whose budget ran out before k does not count for k. Sweep
    configurations count with their fresh trial (uninterrupted), `best`'s retrainings per configuration.
    """

    def reach(history: Sequence[dict], budget: int, k: int) -> Optional[float]:
        stopped_early = len(history) < budget
        return _best_within(history, k) if len(history) >= k or stopped_early else None

    fresh = [c.fresh for c in configs if c.fresh is not None and c.fresh.history]
    per_budget = []
    for k in budgets:
        scores = [reach(t.history, budget_of(t), k) for t in fresh]
        per_budget.append({"epochs": k, "score": stats(scores)})
    gains = []
    for a, b in zip(budgets, budgets[1:]):
        pairs = [(reach(t.history, budget_of(t), a), reach(t.history, budget_of(t), b)) for t in fresh]
        diffs = [y - x for x, y in pairs if x is not None and y is not None]
        gains.append({"from": a, "to": b, "gain": stats(diffs)})
    seeds = []
    by_candidate: dict[str, list[Run]] = {}
    for r in retrains:
        by_candidate.setdefault(r.tags.get("lenet_sweep.trial_id", "?"), []).append(r)
    for trial, runs in sorted(by_candidate.items()):
        budget = budget_of(runs[0])
        seeds.append(
            {
                "trial": trial,
                "seeds": len(runs),
                "by_budget": [
                    {"epochs": k, "score": stats(reach(r.history, budget, k) for r in runs)} for k in budgets
                ],
            }
        )
    return {"budgets": per_budget, "gains": gains, "retrainings": seeds}


def _turning_facts(
    configs: Sequence[Configuration], retrains: Sequence[Run], singles: Sequence[Run], cfg: DictConfig
) -> list[dict]:
    """Epoch of minimum validation loss per model family, over uninterrupted runs of at least
    report.turning_min_epochs epochs (shorter ones are counted apart: too short to tell)."""
    runs = [c.fresh for c in configs if c.fresh is not None] + [*retrains, *singles]
    families: dict[str, list[tuple[int, bool, int]]] = {}
    short: dict[str, int] = {}
    for run in runs:
        if len(run.history) < cfg.report.turning_min_epochs:
            short[family(run)] = short.get(family(run), 0) + 1
        elif run.history:
            epoch, turned = turning(run.history)
            families.setdefault(family(run), []).append((epoch, turned, len(run.history)))
    study = {row.model: row.overfits_after for row in cfg.study}
    out = []
    for name in sorted({*families, *short}):
        points = families.get(name, [])
        turned = [e for e, t, _ in points if t]
        out.append(
            {
                "family": name,
                "runs": len(points),
                "turned": len(turned),
                "epochs": turned,
                "turning_epoch": stats(turned),
                "not_turned_epochs_run": sorted(n for _, t, n in points if not t),
                "too_short": short.get(name, 0),
                "min_epochs": cfg.report.turning_min_epochs,
                "study": study.get(name.split(",")[0]),
            }
        )
    return out


def _multi_seed_facts(ev: Evidence) -> dict[str, Any]:
    if ev.best is None:
        return {}
    m, tags = ev.best.data.metrics, ev.best.data.tags
    rows = []
    for row in ev.candidates:
        rows.append(
            {
                "sweep_rank": row.get("sweep_rank"),
                "trial": row.get("trial"),
                "sweep_val_accuracy": _float(row.get("sweep_val_accuracy")),
                "mean": _float(row.get("val_accuracy_mean")),
                "std": _float(row.get("val_accuracy_std")),
                "seeds": _int(row.get("seeds")),
                "failed": _int(row.get("failed")),
                "per_seed": row.get("val_accuracy_per_seed"),
                "hyperparameters": row.get("hyperparameters"),
                "winner": row.get("winner") == "yes",
            }
        )
    optimism = [r["sweep_val_accuracy"] - r["mean"] for r in rows]
    return {
        "run_id": ev.best.info.run_id,
        "winner_trial": tags.get("lenet_sweep.winner_trial"),
        "winner_seed": tags.get("lenet_sweep.winner_seed"),
        "test_accuracy": m.get("test_accuracy"),
        "test_loss": m.get("test_loss"),
        "val_mean": m.get("val_accuracy_mean"),
        "val_std": m.get("val_accuracy_std"),
        "candidates": rows,
        "optimism": stats(optimism),
        "seeds": ev.best.data.params.get("best.seeds"),
        # trials that ended after `best` started: the sweep went on, and `best` did not see them
        "stale": sum(t.ended > (ev.best.info.start_time or 0) for t in ev.trials),
    }


def _table_ii(ev: Evidence, cfg: DictConfig, singles: list[dict]) -> list[dict]:
    rows = []
    for row in cfg.study:
        ours = [
            s for s in singles if s["model"] == row.model and s["optimizer"].lower() == row.optimizer.lower()
        ]
        for s in ours or [None]:
            rows.append(
                {
                    "model": row.model,
                    "optimizer": row.optimizer,
                    "study": row.test_accuracy,
                    "output_activation": s["output_activation"] if s else None,
                    "ours": s["test_accuracy"] if s else stats([]),
                    "seeds": s["seeds"] if s else [],
                    "collapsed": s["collapsed"] if s else 0,
                    "budget": s["budget"] if s else None,
                    "study_budget": cfg.train.epochs,  # the study trained 25 epochs (train.yaml)
                    "epochs": s["epochs"] if s else stats([]),
                }
            )
    return rows


def _table_i(ev: Evidence, cfg: DictConfig) -> list[dict]:
    study = dict(cfg.report.study_packages)
    ours = dict(ev.packages)
    if "tensorflow-cpu" in ours:  # the CPU build is TensorFlow: one row
        ours["tensorflow"] = f"{ours.pop('tensorflow-cpu')} (tensorflow-cpu)"
    names = [*study, *(k for k in ours if k not in study)]
    return [{"package": n, "study": study.get(n), "ours": ours.get(n)} for n in names]


def _confusion_facts(ev: Evidence, top: int) -> dict[str, Any]:
    if not ev.confusion:
        return {}
    matrix = np.array(ev.confusion["matrix"], dtype=int)
    names = list(ev.confusion.get("names") or ev.confusion["classes"])
    total = matrix.sum(axis=1)
    pairs = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            both = int(matrix[i, j] + matrix[j, i])
            if both:
                pairs.append(
                    {
                        "a": names[i],
                        "b": names[j],
                        "a_as_b": int(matrix[i, j]),
                        "b_as_a": int(matrix[j, i]),
                        "total": both,
                        "share": both / max(1, int(total[i] + total[j])),
                    }
                )
    pairs.sort(key=lambda p: (-p["total"], p["a"], p["b"]))
    recall = [
        {
            "class": c,
            "name": n,
            "images": int(total[i]),
            "correct": int(matrix[i, i]),
            "accuracy": float(matrix[i, i] / total[i]) if total[i] else None,
        }
        for i, (c, n) in enumerate(zip(ev.confusion["classes"], names))
    ]
    return {
        "names": names,
        "matrix": matrix.tolist(),
        "pairs": pairs[:top],
        "per_class": recall,
        "accuracy": float(np.trace(matrix) / max(1, matrix.sum())),
        "images": int(matrix.sum()),
    }


def _data_facts(ev: Evidence) -> dict[str, Any]:
    if not ev.data:
        return {}
    counts = ev.data.get("listed") or ev.data.get("counts") or {}
    splits = [s for s in D.SPLITS if s in counts]
    classes = [
        {"class": c, "name": n, **{s: counts[s][i] for s in splits}}
        for i, (c, n) in enumerate(zip(ev.data["classes"], ev.data["names"]))
    ]
    balance = {
        s: {
            "total": int(sum(counts[s])),
            "min": int(min(counts[s])),
            "max": int(max(counts[s])),
            "ratio": max(counts[s]) / max(1, min(counts[s])),
        }
        for s in splits
    }
    reasons = Counter(row.get("reason", "?") for row in ev.skipped)
    return {
        "splits": splits,
        "classes": classes,
        "balance": balance,
        "skipped": int(ev.data.get("skipped", 0)),
        "skipped_reasons": dict(reasons),
        "skipped_files": ev.skipped[:20],
        "skipped_listed": len(ev.skipped),
        "counts_are": "listed" if ev.data.get("listed") else "decoded",
    }


# ---- the report's blocks -----------------------------------------------------------------------


@dataclass
class FigureFile:
    name: str  # file name under figures/
    png: bytes
    caption: str


class Doc:
    """The report as blocks (headings, sentences, lists, tables, figures), written as Markdown or HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []
        self.figures: list[FigureFile] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, lines: Sequence[str]) -> None:
        if lines:
            self.blocks.append(("ul", list(lines)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.blocks.append(("table", list(header), [[_cell(v) for v in r] for r in rows]))

    def figure(self, name: str, fig: Figure | bytes, caption: str) -> None:
        png = fig if isinstance(fig, bytes) else _png(fig)
        self.figures.append(FigureFile(name, png, caption))
        self.blocks.append(("figure", self.figures[-1]))

    def markdown(self) -> str:
        out = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out.append(f"{'#' * block[1]} {block[2]}")
            elif kind == "p":
                out.append(block[1])
            elif kind == "ul":
                out.append("\n".join(f"- {line}" for line in block[1]))
            elif kind == "table":
                header, rows = block[1], block[2]
                esc = [[c.replace("|", "\\|") for c in row] for row in [header, *rows]]
                out.append(
                    "\n".join(
                        [
                            f"| {' | '.join(esc[0])} |",
                            f"|{'---|' * len(header)}",
                            *(f"| {' | '.join(r)} |" for r in esc[1:]),
                        ]
                    )
                )
            else:
                f = block[1]
                out.append(f"![{f.caption}](figures/{f.name})\n\n*{f.caption}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = _inline
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{e(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{e(block[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in block[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{e(c)}</th>" for c in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            else:
                f = block[1]
                data = base64.b64encode(f.png).decode("ascii")
                body.append(
                    f'<figure><img alt="{html.escape(f.caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{e(f.caption)}</figcaption></figure>"
                )
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:left;font-size:14px}th{background:#f3f3f3}img{max-width:100%}"
            "figcaption{color:#555;font-size:13px}"
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
        )


def _inline(text: str) -> str:
    """`text` escaped for HTML, with Markdown's `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def acc(x: Optional[float]) -> str:
    """An accuracy or loss as the report writes it."""
    return "–" if x is None or not math.isfinite(x) else f"{x:.4f}"


def pm(s: Mapping[str, Any]) -> str:
    """'mean ± std (n=N)' of a stats() dict; one value has no spread: 'value (n=1)'."""
    if not s or not s.get("n"):
        return "– (n=0)"
    if s["std"] is None:
        return f"{s['mean']:.4f} (n=1)"
    return f"{s['mean']:.4f} ± {s['std']:.4f} (n={s['n']})"


def span(s: Mapping[str, Any]) -> str:
    """The range of a stats() dict of counts: '25', or '3-25'."""
    if not s or not s.get("n"):
        return "–"
    return f"{s['min']:g}" if s["min"] == s["max"] else f"{s['min']:g}-{s['max']:g}"


def _share(k: int, n: int) -> str:
    return f"{k} of {n} ({100 * k / n:.0f}%)" if n else "0 of 0"


# ---- the report --------------------------------------------------------------------------------


def activation_sentences(facts: dict) -> list[str]:
    ch = facts["chance"]
    out = []
    rows = facts["output_activation"]["sweep"]
    for r in rows:
        failed = f"; {r['failed']} more trial(s) failed (diverged or crashed)" if r["failed"] else ""
        out.append(
            f"{r['dimension']}={r['value']}: {_share(r['collapsed'], r['configurations'])} sweep "
            f"configurations collapsed to chance (best val accuracy < {ch['threshold']:.3f}); "
            f"best val accuracy {pm(r['score'])}{failed}"
        )
    by_value = {r["value"]: r["score"] for r in rows}
    if {"relu", "softmax"} <= set(by_value) and by_value["relu"]["n"] > 1 and by_value["softmax"]["n"] > 1:
        a, b = by_value["softmax"], by_value["relu"]
        se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
        out.append(
            f"softmax minus relu: {a['mean'] - b['mean']:+.4f} ± {se:.4f} (difference of means ± its "
            "standard error; the other hyperparameters vary between configurations)"
        )
    for s in facts["output_activation"]["single_runs"]:
        out.append(
            f"{s['model']} ({s['optimizer']}, {s['output_activation']} output, {s['budget']} epochs), single "
            f"runs: {_share(s['collapsed'], s['runs'])} seeds collapsed to chance, "
            f"{s['dead_at_epoch_1']} with validation loss at ln {ch['classes']} = {ch['ln_classes']:.4f} "
            f"after epoch 1; test accuracy {pm(s['test_accuracy'])}"
        )
    return out


def dimension_sentences(groups: Sequence[dict]) -> list[str]:
    out = []
    for g in groups:
        if g.get("continuous"):
            c = g["continuous"]
            rho = "–" if c["spearman"] is None else f"{c['spearman']:+.2f}"
            out.append(
                f"{g['dimension']} ({c['min']:.3g} to {c['max']:.3g}, continuous): rank correlation with "
                f"best val accuracy {rho} (n={c['n']})"
            )
            continue
        rows = [r for r in g["rows"] if r["score"]["n"] > 1]  # a single configuration says nothing alone
        if len(rows) < 2:
            continue
        hi = max(rows, key=lambda r: r["score"]["mean"])
        lo = min(rows, key=lambda r: r["score"]["mean"])
        out.append(
            f"{g['dimension']}: highest mean at {hi['value']} ({pm(hi['score'])}), lowest at "
            f"{lo['value']} ({pm(lo['score'])}): {hi['score']['mean'] - lo['score']['mean']:+.4f}"
        )
    return out


def epochs_sentences(facts: dict) -> list[str]:
    e = facts["epochs"]
    out = [
        f"{g['from']} -> {g['to']} epochs: best val accuracy gains {pm(g['gain'])}, paired per sweep "
        "configuration trained that long"
        for g in e["gains"]
    ]
    for r in e["retrainings"]:
        out.append(
            f"trial {r['trial']} over {r['seeds']} seeds: "
            + "; ".join(f"{b['epochs']} epochs {pm(b['score'])}" for b in r["by_budget"])
        )
    return out


def turning_sentences(facts: dict) -> list[str]:
    out = []
    for f in facts["turning_points"]:
        t = f["turning_epoch"]
        where = f" at epoch {t['median']:g} (median; range {t['min']:g}-{t['max']:g})" if t["n"] else ""
        study = f"; the study saw ~{f['study']}" if f["study"] else ""
        short = f"; {f['too_short']} shorter run(s) not counted" if f["too_short"] else ""
        out.append(
            f"{f['family']}: validation loss turned up in {_share(f['turned'], f['runs'])} runs of at "
            f"least {f['min_epochs']} epochs{where}{study}{short}"
        )
    return out


def build(ev: Evidence, facts: dict, cfg: DictConfig, store_uri: str) -> Doc:
    """The report's blocks, from the evidence and the facts computed from it."""
    doc = Doc()
    sw, ch, ms = facts["sweep"], facts["chance"], facts["multi_seed"]
    doc.heading(1, f"Sweep report: {sw['name']}")
    counts = ", ".join(f"{sw[k]} {k}" for k in ("finished", "failed", "killed", "running") if sw[k])
    minutes = f" in {sw['seconds'] / 60:.1f} minutes" if sw["seconds"] else ""
    doc.para(f"Sweep {sw['name']!r} (MLflow run {sw['run_id']}, {sw['status']}) in experiment "
             f"{cfg.mlflow.experiment!r} of {store.redact(store_uri)}: {sw['tuner']} search over "
             f"{len(sw['dimensions'])} dimensions, {sw['trials']} trials ({counts}){minutes}.")
    seeds = ("Each sweep trial trains with its own seed (the sweep's seed plus its trial number), so a spread "
             "over configurations mixes seeds and the other hyperparameters; spreads over seeds alone come "
             "from `best`'s retrainings and from single runs with several seeds.")
    if (sw["executions"] or 1) > 1:
        seeds += (f" This sweep ran {sw['executions']} executions per trial (each its own seed): scores are "
                  "their mean, while per-epoch views (curves, budgets, turning points, the first epoch's loss) "
                  "read the first execution's history.")
    doc.para("Every number here is computed from what MLflow holds; nothing was trained or evaluated to write "
             "it. Scores are best-epoch validation accuracies (chosen on validation); test accuracies are the "
             "ones recorded by `best`, `train` and `reproduce`, each evaluated once. " + seeds)
    if ms.get("stale"):
        doc.para(f"Note: the best run {ms['run_id']} started before {ms['stale']} of the sweep's trials ended "
                 "(the sweep went on afterwards): rerun `best` to choose among all of them.")
    left_out = (f"Left out here: {facts['collapsed_left_out']} configuration(s) that collapsed to chance (see the "
                "output question), so a dead output does not count against a filter count, a width or a budget.")

    doc.heading(2, "Answers in short")
    doc.items(answers(facts))

    doc.heading(2, "Table I: packages")
    doc.para("The study's versions are those in conf/report.yaml (report.study_packages; – where not stated); "
             "ours are the versions the sweep (or the winner's retraining, or a single run) recorded.")
    doc.table(["package", "study", "ours"], [[r["package"], r["study"], r["ours"]] for r in facts["table_i"]])

    doc.heading(2, "Table II: test accuracy")
    rows = [[r["model"], r["optimizer"], r["study_budget"], acc(r["study"]), r["output_activation"], r["budget"],
             pm(r["ours"]), " ".join(str(s) for s in r["seeds"]) or "–", _share(r["collapsed"], len(r["seeds"])),
             span(r["epochs"])] for r in facts["table_ii"]]
    if ms:
        rows.append([f"sweep winner (trial {ms['winner_trial']})", "", "", "", "", "",
                     f"{acc(ms['test_accuracy'])} (once, by best)", ms["winner_seed"], "", ""])
    if "best_trial_test_accuracy" in ev.parent.data.metrics:
        rows.append(["sweep's top trial (one seed)", "", "", "", "", "",
                     f"{acc(ev.parent.data.metrics['best_trial_test_accuracy'])} (once, by "
                     "benchmarks/sweep_best_on_test.py)", "", "", ""])
    doc.table(["model", "optimizer", "study epochs", "study test accuracy", "our output", "our epochs",
               "ours: mean ± std (n seeds)", "seeds", "collapsed", "epochs run"], rows)
    doc.para("Our rows are single runs (`train`, `reproduce`) on the sweep's data, one per seed (the latest run "
             "of a seed), grouped by output activation and epochs: compare with the study only where the "
             "epochs match." if facts["output_activation"]["single_runs"] else
             "No single runs of the study's models on this data yet: `make reproduce` (or `python -m "
             "lenet_sweep.train model=... seed=N`) adds them, one row per model over its seeds.")

    doc.heading(2, "Softmax or ReLU output?")
    doc.items(activation_sentences(facts))
    doc.table(["dimension", "value", "configurations", "trials", "collapsed", "val loss = ln C at epoch 1",
               "failed trials", "best val accuracy"],
              [[r["dimension"], r["value"], r["configurations"], r["trials"], r["collapsed"], r["dead_at_epoch_1"],
                r["failed"], pm(r["score"])] for r in facts["output_activation"]["sweep"]])
    doc.table(["model", "optimizer", "output", "epochs", "seeds", "collapsed", "val loss = ln C at epoch 1",
               "best val accuracy", "test accuracy"],
              [[s["model"], s["optimizer"], s["output_activation"], s["budget"], " ".join(map(str, s["seeds"])),
                s["collapsed"], s["dead_at_epoch_1"], pm(s["score"]), pm(s["test_accuracy"])]
               for s in facts["output_activation"]["single_runs"]])
    doc.para(f"Chance: {ch['classes']} classes, accuracy {ch['chance_accuracy']:.4f}, loss ln {ch['classes']} = "
             f"{ch['ln_classes']:.4f}. Collapsed: best validation accuracy below {ch['threshold']:.4f} (chance + "
             "report.chance_margin). Failed trials (diverged or crashed) have no score and are counted apart.")
    act_dims = [r["dimension"] for r in facts["output_activation"]["sweep"]]
    if act_dims:
        groups: dict[str, list[float]] = {}
        for c in facts["configurations"]:
            groups.setdefault(str(c["values"].get(act_dims[0])), []).append(c["score"])
        doc.figure("output_activation.png", plots.groups_side_by_side(
            groups, "best val accuracy", "output activation (one point per configuration)"),
            "Best validation accuracy per configuration, by output activation.")

    for title, key in (("More filters or more conv layers?", "filters_and_layers"),
                       ("Other dense widths?", "dense_widths")):
        doc.heading(2, title)
        doc.items(dimension_sentences(facts[key]) or ["no dimension of this sweep varies it"
                                                      if not facts[key] else "too few configurations per value"])
        _dimension_tables(doc, facts[key])
        doc.para(left_out + " Values with one configuration are shown but not compared.")

    doc.heading(2, "5, 10 or 25 epochs?")
    doc.items(epochs_sentences(facts))
    doc.table(["epochs", "best val accuracy within them (sweep configurations trained that long)"],
              [[b["epochs"], pm(b["score"])] for b in facts["epochs"]["budgets"]])
    doc.para("A run counts for a budget of k epochs if it trained k epochs or stopped early before k (early "
             "stopping would have stopped it there with any budget); one whose budget ran out before k does "
             "not. The rows above are different subsets of configurations (fewer were given more epochs); the "
             f"paired gains compare the same configurations. Sweep configurations count with their fresh trial: "
             f"{facts['continued']} were continued over Hyperband rounds, each round restarting from an earlier "
             "epoch's weights, which is not one training run. " + left_out)
    _dimension_tables(doc, facts["epochs_dimension"])

    doc.heading(2, "Where does overfitting start?")
    doc.items(turning_sentences(facts))
    doc.table(["family", "runs", "turned", "turning epoch", "median", "epochs run where it did not turn",
               "shorter runs", "study"],
              [[f["family"], f["runs"], f["turned"], pm(f["turning_epoch"]), f["turning_epoch"]["median"],
                " ".join(map(str, f["not_turned_epochs_run"])) or "–", f["too_short"], f["study"]]
               for f in facts["turning_points"]])
    doc.para("Turning point: the epoch of minimum validation loss, counted as a turn when validation loss is "
             "higher at a later epoch of the run. Runs: each sweep configuration's fresh trial, each retraining "
             f"of `best`, each single run, if it trained at least {cfg.report.turning_min_epochs} epochs "
             "(report.turning_min_epochs); collapsed runs left out.")
    if any(f["epochs"] for f in facts["turning_points"]):
        doc.figure("turning_points.png", plots.turning_points(
            {f["family"]: f["epochs"] for f in facts["turning_points"]}, "where validation loss turns up"),
            "Epoch of minimum validation loss, runs whose validation loss then rose.")

    if facts["other_dimensions"]:
        doc.heading(2, "The other hyperparameters")
        doc.items(dimension_sentences(facts["other_dimensions"]))
        _dimension_tables(doc, facts["other_dimensions"])

    doc.heading(2, "Learning curves of the best configurations")
    doc.para("Loss, magnified loss (from epoch 2), accuracy, and validation loss against validation accuracy: "
             "the study's four figures, for the best configurations by validation accuracy. Dotted lines: a "
             "Hyperband round took over there, from an earlier epoch's weights.")
    for i, c in enumerate(configurations(ev)[: cfg.report.top_trials], start=1):
        title = f"#{i} trial {c.ids}: best val accuracy {c.score:.4f}"
        doc.figure(f"curves_{i}.png", plots.trial_curves(c.history, title, c.restarts),
                   f"{title}; {' '.join(f'{k}={_value(v)}' for k, v in c.values.items())}")

    doc.heading(2, "Validation accuracy against each hyperparameter")
    by_trial = [{d: t.param(d) for d in [*ev.space, "tuner/epochs"] if d in t.params} | {"val": t.score}
                for t in ev.finished]
    names = [d for d in [*ev.space, "tuner/epochs"] if any(r.get(d) is not None for r in by_trial)]
    if names:
        doc.figure("val_accuracy_vs_hyperparameters.png",
                   plots.score_by_value(by_trial, names, "val", "best validation accuracy per trial"),
                   "Best validation accuracy of every finished trial against each hyperparameter.")

    _winner_sections(doc, ev, facts, cfg)
    _data_section(doc, ev, facts)

    doc.heading(2, "Provenance")
    doc.items([f"sweep run {sw['run_id']} (commit {sw['commit'] or '–'})",
               *([f"best run {ms['run_id']}"] if ms else []),
               f"{len(ev.singles)} single run(s) on the sweep's data in the experiment",
               "numbers: report.json beside this file; code: lenet_sweep/report.py"])
    return doc


def answers(facts: dict) -> list[str]:
    """The report's short answers, one or more per question."""
    return [*activation_sentences(facts), *dimension_sentences(facts["filters_and_layers"]),
            *dimension_sentences(facts["dense_widths"]), *epochs_sentences(facts), *turning_sentences(facts),
            *_winner_sentences(facts)]


def _dimension_tables(doc: Doc, groups: Sequence[dict]) -> None:
    for g in groups:
        doc.table([g["dimension"], "configurations", "trials", "failed trials", "best val accuracy", "median",
                   "max"],
                  [[_value(r["value"]), r["configurations"], r["trials"], r["failed"], pm(r["score"]),
                    r["score"]["median"], r["score"]["max"]] for r in g["rows"]])


def _value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _winner_sentences(facts: dict) -> list[str]:
    ms = facts["multi_seed"]
    if not ms:
        return ["no `best` run for this sweep yet: `python -m lenet_sweep.best` chooses, confirms over seeds "
                "and tests the winner once"]
    won = next((c for c in ms["candidates"] if c["winner"]), None)
    out = [f"winner: trial {ms['winner_trial']}, val accuracy {acc(ms['val_mean'])} ± {acc(ms['val_std'])} over "
           f"{won['seeds'] if won else ms['seeds']} seeds; test accuracy {acc(ms['test_accuracy'])} "
           "(evaluated once)"]
    if ms["optimism"]["n"]:
        out.append(f"the sweep's one-seed scores of the retrained configurations were "
                   f"{ms['optimism']['mean']:+.4f} above their means over new seeds (n={ms['optimism']['n']})")
    return out


def _winner_sections(doc: Doc, ev: Evidence, facts: dict, cfg: DictConfig) -> None:
    ms, cf = facts["multi_seed"], facts["confusion"]
    doc.heading(2, "The winner over seeds")
    doc.items(_winner_sentences(facts))
    doc.table(["sweep rank", "trial", "sweep val (one seed)", "val mean ± std", "seeds", "failed", "per seed",
               "winner", "hyperparameters"],
              [[c["sweep_rank"], c["trial"], c["sweep_val_accuracy"], f"{acc(c['mean'])} ± {acc(c['std'])}",
                c["seeds"], c["failed"], c["per_seed"], "yes" if c["winner"] else "", c["hyperparameters"]]
               for c in ms.get("candidates", [])])

    doc.heading(2, "Test: confusion matrix and the most confused classes")
    if not cf:
        doc.para(f"The winner's test accuracy, {acc(ms['test_accuracy'])}, was recorded without its confusion "
                 "matrix (evaluation/confusion_matrix.json)." if ms.get("test_accuracy") is not None else
                 "No test evaluation for this sweep yet (`python -m lenet_sweep.best` makes the one).")
    else:
        doc.para(f"The winner on the test split, evaluated once: {cf['images']} images, accuracy "
                 f"{cf['accuracy']:.4f}.")
        doc.table(["classes", "total confusions", "first as second", "second as first",
                   "share of their test images"],
                  [[f"{p['a']} / {p['b']}", p["total"], p["a_as_b"], p["b_as_a"], f"{100 * p['share']:.1f}%"]
                   for p in cf["pairs"]])
        doc.figure("confusion_matrix.png", plots.confusion_figure(np.array(cf["matrix"]), cf["names"],
                                                                  "test confusion of the winner"),
                   "Test confusion matrix of the winner (rows: true class; shares of the row, counts written in).")
        doc.table(["class", "name", "test images", "correct", "accuracy"],
                  [[r["class"], r["name"], r["images"], r["correct"], r["accuracy"]] for r in cf["per_class"]])

    doc.heading(2, "Misclassified test images of the winner")
    wrong = sum(r.get("correct") == "0" for r in ev.predictions)
    grid, missing = misclassified_grid(ev, cfg.report.misclassified, cfg.report.grid_columns)
    if grid is not None:
        doc.figure("misclassified.png", grid, f"The winner's {min(wrong, cfg.report.misclassified)} most "
                   f"confident mistakes of {wrong} on the test split: true class -> predicted (score).")
    if missing:
        doc.para(f"{missing} misclassified image(s) could not be read under {ev.data_root} (moved?): not shown.")
    if not ev.predictions:
        doc.para("No test predictions recorded (evaluation/test_predictions.csv of the best run)." if ms else
                 "No best run yet.")
    elif not wrong:
        doc.para("No misclassified test images.")


def misclassified_grid(ev: Evidence, n: int, columns: int) -> tuple[Optional[Figure], int]:
    """The winner's `n` most confident mistakes as an image grid (None if none), and how many files
    could not be read."""
    from PIL import Image

    wrong = sorted((r for r in ev.predictions if r.get("correct") == "0"), key=lambda r: -_float(r.get("score")))
    names = {}
    if ev.confusion:
        names = dict(zip(ev.confusion["classes"], ev.confusion.get("names") or ev.confusion["classes"]))
    images, titles, missing = [], [], 0
    for row in wrong:
        if len(images) == n:
            break
        path = Path(row.get("path", ""))
        if not path.is_absolute() and ev.data_root:
            path = Path(ev.data_root).expanduser() / path
        try:
            rgb = D.read_rgb(path)
        except D.DECODE_ERRORS:
            missing += 1
            continue
        images.append(np.asarray(Image.fromarray(rgb).resize((96, 96))))
        titles.append(f"{names.get(row['label'], row['label'])}\n-> "
                      f"{names.get(row['predicted'], row['predicted'])} ({_float(row['score']):.2f})")
    if not images:
        return None, missing
    return plots.image_grid(np.stack(images), titles, columns, "misclassified test images"), missing


def _data_section(doc: Doc, ev: Evidence, facts: dict) -> None:
    d = facts["data"]
    doc.heading(2, "Data check (representativeness)")
    if not d:
        doc.para("No data summary recorded for this sweep (sweeps log data/summary.json on their parent run; "
                 "older sweeps have it only on `best`'s retrainings).")
        return
    doc.para(f"Class counts per split ({d['counts_are']} files). Imbalance: largest class / smallest class.")
    splits = d["splits"]
    doc.table(["class", "name", *splits], [[c["class"], c["name"], *(c[s] for s in splits)] for c in d["classes"]]
              + [["all", "", *(d["balance"][s]["total"] for s in splits)]])
    doc.table(["split", "images", "smallest class", "largest class", "imbalance"],
              [[s, b["total"], b["min"], b["max"], f"{b['ratio']:.2f}"] for s, b in d["balance"].items()])
    reasons = "; ".join(f"{k}: {v}" for k, v in d["skipped_reasons"].items())
    shown = f" (the first {len(d['skipped_files'])} below)" if d["skipped_listed"] > len(d["skipped_files"]) else ""
    doc.para(f"Files left out: {d['skipped']}" + (f" ({reasons})" if reasons else "") + shown + ". Sweeps and "
             "`best`'s retrainings decode train and validation only; test files are decoded once, by `best`.")
    doc.table(["split", "path", "reason"], [[r.get("split"), r.get("path"), r.get("reason")]
                                           for r in d["skipped_files"]])
    if ev.sample_images:
        doc.figure("sample_images.png", ev.sample_images, "Training images as the models saw them.")


# ---- writing and logging -----------------------------------------------------------------------

def _write(path: Path, data: bytes) -> None:
    """Write `data` beside `path` and rename it into place, so a killed report leaves no half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as None, so report.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


REPORT_FILES = ("report.md", "report.html", "report.json")


def check_target(out: Path) -> list[str]:
    """Refuse a report.dir that holds anything but an earlier report; return that report's figure names
    (to remove: this report writes its own)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"report.dir={out} is a file: give a folder")
    if not out.exists() or not any(out.iterdir()):
        return []
    try:
        earlier = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or "figures" not in earlier:
        raise UserError(f"report.dir={out} holds other files and no earlier report: give a new or empty folder "
                        "(a report never writes over files it did not make)")
    return [name for name in earlier["figures"] if isinstance(name, str) and "/" not in name and name]


@dataclass
class ReportResult:
    dir: Path
    sweep_run_id: str
    facts: dict
    answers: list[str]


def make_report(cfg: DictConfig) -> ReportResult:
    """Read sweep `cfg.sweep.name` from MLflow, write the report to `cfg.report.dir`, log it to the sweep."""
    s = cfg.report
    for knob, value, least in (("report.top_trials", s.top_trials, 0), ("report.confused_pairs", s.confused_pairs, 0),
                               ("report.misclassified", s.misclassified, 0), ("report.grid_columns", s.grid_columns, 1),
                               ("report.turning_min_epochs", s.turning_min_epochs, 2)):
        if value < least:
            raise UserError(f"{knob}={value}: must be at least {least}")
    if not 0 <= s.chance_margin < 1 or not s.epochs or any(k < 1 for k in s.epochs):
        raise UserError("report.chance_margin must be in [0, 1) and report.epochs a list of positive epoch counts")
    experiment_id = store.open_store(cfg.mlflow, create=False)
    uri = mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    parent = store.find_sweep(client, experiment_id, cfg.sweep.name, cfg.mlflow.experiment)
    name = parent.data.tags.get("lenet_sweep.sweep", "sweep")
    out = Path(s.dir if s.dir else Path("reports") / name).expanduser()
    stale_figures = check_target(out)
    with tempfile.TemporaryDirectory() as tmp:
        ev = gather(client, experiment_id, parent, Path(tmp))
        if not ev.finished:
            raise UserError(f"sweep {name!r} (MLflow run {parent.info.run_id}) has no finished trial yet: "
                            "run or resume the sweep first")
        facts = compute(ev, cfg)
        doc = build(ev, facts, cfg, uri)
    facts["figures"] = [f.name for f in doc.figures]
    try:
        (out / "figures").mkdir(parents=True, exist_ok=True)
        for stale in set(stale_figures) - set(facts["figures"]):
            (out / "figures" / stale).unlink(missing_ok=True)
        for f in doc.figures:
            _write(out / "figures" / f.name, f.png)
        _write(out / "report.md", doc.markdown().encode("utf-8"))
        _write(out / "report.html", doc.html(f"Sweep report: {name}").encode("utf-8"))
        _write(out / "report.json", json.dumps(_finite(facts), indent=1, default=str, allow_nan=False).encode())
    except OSError as err:
        raise UserError(f"cannot write the report to {out}: {err.strerror or err}") from None
    run_id = parent.info.run_id
    try:
        for file in REPORT_FILES:
            client.log_artifact(run_id, str(out / file), "report")
        for f in doc.figures:
            client.log_artifact(run_id, str(out / "figures" / f.name), "report/figures")
    except Exception as err:  # noqa: BLE001  the report is written; say what did not reach MLflow
        raise UserError(f"the report is written to {out}, but logging it to MLflow run {run_id} failed: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return ReportResult(out, run_id, facts, answers(facts))


def run(cfg: DictConfig) -> ReportResult:
    result = make_report(cfg)
    print(f"report of sweep {result.facts['sweep']['name']!r}: {result.dir / 'report.md'}, "
          f"{result.dir / 'report.html'} (also logged to MLflow run {result.sweep_run_id} under report/)")
    for line in result.answers:
        print(f"- {line}")
    return result


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    cli.guarded(lambda: run(cfg))


if __name__ == "__main__":
    cli.quote_path_overrides(("report.dir", "mlflow.store_dir"))
    main()
