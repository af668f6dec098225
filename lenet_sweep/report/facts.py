"""Every number of the report, as pure functions of the evidence (no MLflow, no files): the facts that
report.json keeps and the sections write out. Each question's facts say how many runs they rest on, so a
sweep too small or too odd to answer one yields empty rows and n=0, never an error.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig

from lenet_sweep import data as D
from lenet_sweep import plots
from lenet_sweep.report import fronts, glance
from lenet_sweep.report.evidence import Configuration, Evidence, Run, budget_of
from lenet_sweep.report.importance import Point, importance
from lenet_sweep.tracking import store
from lenet_sweep.tracking.artifacts import to_float
from lenet_sweep.warm_start import INHERITED_FROM

# The dimensions each question reads, by the config key they set; the rest are "other dimensions".
QUESTIONS: dict[str, Callable[[str], bool]] = {
    "filters_and_layers": lambda key: key.startswith("model.filters") or key == "model.conv_layers",
    "dense_widths": lambda key: key.startswith("model.dense"),
    "epochs_dimension": lambda key: key == "train.epochs",
}
ACTIVATION_KEY = "model.output_activation"
# Single runs are grouped by what makes them one row of Table II.
SINGLE_RUN_KEYS = ("model.name", "optimizer.name", "model.output_activation", "train.epochs")


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
    """Classes of the sweep's data: its data summary, else its class-name params, else Imagenette's 10."""
    if ev.data and ev.data.get("classes"):
        return len(ev.data["classes"])
    names = [k for k in ev.parent.data.params if k.startswith("data.class_names.")]
    return len(names) or 10


def family(run: Run) -> str:
    """Model family for the turning points: the model's name and its number of conv blocks."""
    filters = run.value("model.filters")
    blocks = run.value("model.conv_layers") or (len(filters) if isinstance(filters, list) else 0)
    return f"{run.value('model.name') or '?'}, {blocks} conv blocks"


def collapsed(score: Optional[float], chance: Mapping[str, Any]) -> bool:
    """Whether a best validation accuracy stayed below chance + report.chance_margin."""
    return score is not None and score < chance["threshold"]


def dead_at_first_epoch(history: Sequence[dict], chance: Mapping[str, Any]) -> bool:
    """Whether validation loss was ln(classes) after epoch 1: an output predicting every class alike."""
    return bool(history) and abs(history[0].get("val_loss", math.nan) - chance["ln_classes"]) < 0.01


def compute(ev: Evidence, cfg: DictConfig) -> dict[str, Any]:
    """Every number of the report, from `ev` alone."""
    settings = cfg.report
    chance = _chance_facts(num_classes(ev), settings.chance_margin)
    configs = configurations(ev)
    working = [c for c in configs if not collapsed(c.score, chance)]
    failed = [t for t in ev.trials if t.status == "FAILED"]  # diverged or crashed: counted beside the scores
    singles = _single_run_facts(ev.singles, chance)
    facts: dict[str, Any] = {
        "sweep": _sweep_facts(ev),
        "chance": chance,
        "configurations": [
            {
                "trials": c.ids,
                "values": c.values,
                "score": c.score,
                "epochs": len(c.history),
                "restarts": c.restarts,
                "collapsed": collapsed(c.score, chance),
            }
            for c in configs
        ],
        "output_activation": {"sweep": _activation_rows(ev, configs, failed, chance), "single_runs": singles},
        **_dimension_facts(ev, working, failed),
        "importance": _importance_facts(ev, configs, settings.importance),
        "epochs": _epochs_facts(working, ev.retrains, list(settings.epochs)),
        "turning_points": _turning_facts(
            working,
            [r for r in ev.retrains if not collapsed(r.score, chance)],
            [r for r in ev.singles if not collapsed(r.score, chance)],
            cfg,
        ),
        "continued": sum(bool(c.restarts) for c in configs),
        "collapsed_left_out": len(configs) - len(working),
        "multi_seed": _multi_seed_facts(ev),
        "best_cut_off": _cut_off_facts(ev),
        "table_ii": _table_ii(cfg, singles),
        "table_i": _table_i(ev, cfg),
        "confusion": _confusion_facts(ev, settings.confused_pairs),
        "data": _data_facts(ev),
        # (measured: parameter counts of unrecorded models and latencies, see fronts.py)
        "fronts": fronts.front_facts(
            working,
            chance["classes"],
            settings.fronts,
            len(configs) - len(working),
            ev.best.data.metrics if ev.best is not None else {},
        ),
    }
    facts["glance"] = glance.rows(facts, settings.confidence)  # the at-a-glance table, from the facts above
    return facts


def _importance_facts(ev: Evidence, configs: Sequence[Configuration], settings: Any) -> dict[str, Any]:
    """Which hyperparameters matter (importance.py), over every scored configuration (collapsed ones too:
    collapsing is part of what a hyperparameter does; pruned ones with the score they had when stopped)
    and, counted but left out, every trial that ended without a score."""
    points = [
        Point(c.values, c.score, any(k.startswith("lenet_sweep.pruned") for t in c.trials for k in t.tags))
        for c in configs
    ]
    points += [
        Point({d: t.param(d) for d in ev.space if d in t.params}, None)
        for t in ev.trials
        if t.status == "FAILED" or (t.status == "FINISHED" and t.score is None)
    ]
    space = ev.specs or {d: {"key": k, "type": ev.types.get(d, "?")} for d, k in ev.space.items()}
    return importance(points, space, settings)


def _chance_facts(classes: int, margin: float) -> dict[str, Any]:
    """Chance accuracy and loss for `classes` classes, and the score below which a run collapsed."""
    chance = 1.0 / classes
    return {
        "classes": classes,
        "chance_accuracy": chance,
        "threshold": chance + margin,
        "ln_classes": math.log(classes),
    }


def _activation_dims(ev: Evidence) -> list[str]:
    return [d for d, k in ev.space.items() if k == ACTIVATION_KEY]


def _activation_rows(
    ev: Evidence, configs: Sequence[Configuration], failed: Sequence[Run], chance: Mapping[str, Any]
) -> list[dict]:
    """Output activation: how often each value collapses, and what the rest reach."""
    rows = []
    for dim in _activation_dims(ev):
        for value in sorted({str(c.values.get(dim)) for c in configs}):
            group = [c for c in configs if str(c.values.get(dim)) == value]
            rows.append(
                {
                    "dimension": dim,
                    "value": value,
                    "configurations": len(group),
                    "trials": sum(len(c.trials) for c in group),
                    "collapsed": sum(collapsed(c.score, chance) for c in group),
                    "dead_at_epoch_1": sum(dead_at_first_epoch(c.history, chance) for c in group),
                    "failed": sum(str(t.param(dim)) == value for t in failed),
                    "score": stats(c.score for c in group),
                }
            )
    return rows


def _single_run_facts(runs: Sequence[Run], chance: Mapping[str, Any]) -> list[dict]:
    """Single runs per model, optimizer, output activation and budget, over their seeds."""
    out = []
    for key, group in _group(runs, SINGLE_RUN_KEYS).items():
        # One run per seed (the latest): a rerun of the same seed is the same draw, not another.
        by_seed = {r.value("seed"): r for r in sorted(group, key=lambda r: r.started)}
        latest = [by_seed[seed] for seed in sorted(by_seed, key=str)]
        out.append(
            {
                "model": key[0],
                "optimizer": key[1],
                "output_activation": key[2],
                "budget": key[3],
                "seeds": [r.value("seed") for r in latest],
                "runs": len(latest),
                "collapsed": sum(collapsed(r.score, chance) for r in latest),
                "dead_at_epoch_1": sum(dead_at_first_epoch(r.history, chance) for r in latest),
                "score": stats(r.score for r in latest),
                "test_accuracy": stats(r.metrics.get("test_accuracy") for r in latest),
                "epochs": stats(len(r.history) for r in latest),
            }
        )
    return out


def _group(runs: Sequence[Run], keys: Sequence[str]) -> dict[tuple, list[Run]]:
    """Runs by the text of their config values at `keys` (as params held them: 25 and "25" are one)."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(str(r.value(k)) for k in keys), []).append(r)
    return dict(sorted(groups.items()))


def _dimension_facts(ev: Evidence, working: Sequence[Configuration], failed: Sequence[Run]) -> dict[str, list]:
    """Filters, conv layers, dense widths, epochs as a dimension, and the other dimensions: score per value,
    collapsed configurations left out."""

    def of(dim: str) -> dict:
        return by_value(dim, working, failed, ev.types.get(dim) == "float")

    out = {name: [of(d) for d, k in ev.space.items() if wanted(k)] for name, wanted in QUESTIONS.items()}
    out["other_dimensions"] = [
        of(d)
        for d, k in ev.space.items()
        if not any(w(k) for w in QUESTIONS.values()) and d not in _activation_dims(ev)
    ]
    return out


def by_value(dim: str, configs: Sequence[Configuration], failed: Sequence[Run], continuous: bool) -> dict:
    """Score per value of `dim` (and how many trials with that value failed); a continuous dimension (a
    float: a learning rate) gets the rank correlation of its value with the score instead, as per-value
    rows would hold one run each. No configuration with a value: no rows (continuous: n=0, no range)."""
    have = [c for c in configs if c.values.get(dim) is not None]
    if continuous:
        return {
            "dimension": dim,
            "rows": [],
            "failed": sum(t.param(dim) is not None for t in failed),
            "continuous": _continuous(dim, have),
        }
    rows = [
        {
            "value": v,
            "configurations": len(g),
            "trials": sum(len(c.trials) for c in g),
            "failed": sum(str(t.param(dim)) == str(v) for t in failed),
            "score": stats(c.score for c in g),
        }
        for v in sorted({c.values[dim] for c in have}, key=_order)
        for g in [[c for c in have if c.values[dim] == v]]
    ]
    return {"dimension": dim, "rows": rows}


def _continuous(dim: str, have: Sequence[Configuration]) -> dict[str, Any]:
    """n, rank correlation with the score, and range of a continuous dimension's numeric values."""
    numeric = [c for c in have if _is_number(c.values[dim])]
    xs = [c.values[dim] for c in numeric]
    return {
        "n": len(numeric),
        "spearman": spearman(xs, [c.score for c in numeric]),
        "min": min(xs, default=None),
        "max": max(xs, default=None),
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (ties get their mean rank); None for fewer than 3 pairs or no spread."""
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
    """Sort key: numbers by value first, anything else after them by its text."""
    return (0, value, "") if _is_number(value) else (1, 0, str(value))


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
        # Pruned trials end FINISHED (their score is real): counted apart, with what stopping them saved.
        "pruned": sum(any(k.startswith("lenet_sweep.pruned") for k in t.tags) for t in ev.trials),
        "pruned_seconds_saved": _finite(p.data.metrics.get("pruned_seconds_saved")),
        "executions": store.number(p.data.params.get("tuner.executions_per_trial")),
        "seconds": _finite(p.data.metrics.get("sweep_seconds")),
        "commit": p.data.tags.get("mlflow.source.git.commit"),
        "stopped_because": p.data.tags.get("stopped_because", ""),
        "patience": store.number(p.data.params.get("sweep.early_stopping_patience")),
        "seed": store.number(p.data.params.get("seed")),
        # A warm start's trials: recorded by an earlier sweep, entered here as they scored, not trained again.
        "warm_start": p.data.tags.get("lenet_sweep.warm_start", ""),
        "inherited_trials": [
            t.tags.get("lenet_sweep.trial_id", t.run_id) for t in ev.trials if INHERITED_FROM in t.tags
        ],
    }


def _finite(value: Optional[float]) -> Optional[float]:
    """A recorded metric, None where it is absent or NaN (a run cut off before it had a value)."""
    return value if value is not None and math.isfinite(value) else None


def _best_within(history: Sequence[dict], k: int) -> float:
    values = [row.get("val_accuracy", math.nan) for row in history[:k]]
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


def _reach(history: Sequence[dict], budget: int, k: int) -> Optional[float]:
    """Best validation accuracy within `k` epochs of a run allowed `budget`; None if it could not tell."""
    stopped_early = len(history) < budget
    return _best_within(history, k) if len(history) >= k or stopped_early else None


def _epochs_facts(configs: Sequence[Configuration], retrains: Sequence[Run], budgets: list[int]) -> dict:
    """Best validation accuracy reached within k epochs, for each budget k.

    A run counts for k if it trained k epochs, or stopped early before k (early stopping would have
    stopped it there with any budget); a run whose budget ran out before k does not count for k. Sweep
    configurations count with their fresh trial (uninterrupted), `best`'s retrainings per configuration.
    """
    fresh = [c.fresh for c in configs if c.fresh is not None and c.fresh.history]
    per_budget = [{"epochs": k, "score": stats(_reach(t.history, budget_of(t), k) for t in fresh)} for k in budgets]
    gains = []
    for a, b in zip(budgets, budgets[1:]):
        pairs = [(_reach(t.history, budget_of(t), a), _reach(t.history, budget_of(t), b)) for t in fresh]
        diffs = [y - x for x, y in pairs if x is not None and y is not None]
        gains.append({"from": a, "to": b, "gain": stats(diffs)})
    by_candidate: dict[str, list[Run]] = {}
    for r in retrains:
        by_candidate.setdefault(r.tags.get("lenet_sweep.trial_id", "?"), []).append(r)
    seeds = [
        {
            "trial": trial,
            "seeds": len(runs),
            "by_budget": [
                {"epochs": k, "score": stats(_reach(r.history, budget_of(runs[0]), k) for r in runs)} for k in budgets
            ],
        }
        for trial, runs in sorted(by_candidate.items())
    ]
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


def _int(text: Optional[str]) -> int:
    value = to_float(text)
    return int(value) if math.isfinite(value) else 0


def _candidate_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One row of best/candidates.csv, typed."""
    return {
        "sweep_rank": row.get("sweep_rank"),
        "trial": row.get("trial"),
        "sweep_val_accuracy": to_float(row.get("sweep_val_accuracy")),
        "mean": to_float(row.get("val_accuracy_mean")),
        "std": to_float(row.get("val_accuracy_std")),
        "seeds": _int(row.get("seeds")),
        "failed": _int(row.get("failed")),
        "per_seed": row.get("val_accuracy_per_seed"),
        "hyperparameters": row.get("hyperparameters"),
        "winner": row.get("winner") == "yes",
        # `best`'s race (absent from older runs' files): the interval and why the candidate stopped
        "low": to_float(row.get("val_accuracy_lo")),
        "high": to_float(row.get("val_accuracy_hi")),
        "stopped": row.get("stopped") or "",
    }


def _multi_seed_facts(ev: Evidence) -> dict[str, Any]:
    """The `best` run: its candidates over seeds, the winner and its one test evaluation ({} without one)."""
    if ev.best is None:
        return {}
    m, tags = ev.best.data.metrics, ev.best.data.tags
    rows = [_candidate_row(row) for row in ev.candidates]
    return {
        "run_id": ev.best.info.run_id,
        "winner_trial": tags.get("lenet_sweep.winner_trial"),
        # The exported model's seed: the refit's when it was exported (best.final), else the racing winner's.
        "winner_seed": tags.get("lenet_sweep.exported_seed", tags.get("lenet_sweep.winner_seed")),
        "exported": tags.get("lenet_sweep.exported", ""),
        "refit_input_size": _finite(m.get("refit_input_size")),
        "refit_epochs": _finite(m.get("refit_epochs")),
        "refit_val_accuracy": _finite(m.get("refit_val_accuracy")),
        "test_accuracy": _finite(m.get("test_accuracy")),
        "test_loss": _finite(m.get("test_loss")),
        "val_mean": _finite(m.get("val_accuracy_mean")),
        "val_std": _finite(m.get("val_accuracy_std")),
        "candidates": rows,
        "optimism": stats(r["sweep_val_accuracy"] - r["mean"] for r in rows),
        "seeds": ev.best.data.params.get("best.seeds"),
        # trials that ended after `best` started: the sweep went on, and `best` did not see them
        "stale": sum(t.ended > (ev.best.info.start_time or 0) for t in ev.trials),
    }


def _cut_off_facts(ev: Evidence) -> dict[str, Any]:
    """The latest `best` run if it did not finish: its id, status and why it ended ({} without one)."""
    if ev.cut_off is None:
        return {}
    reason = ev.cut_off.data.tags.get("failure_reason", "")
    return {
        "run_id": ev.cut_off.info.run_id,
        "status": ev.cut_off.info.status,
        "reason": reason.splitlines()[0][:200] if reason else "",
    }


def _table_ii(cfg: DictConfig, singles: list[dict]) -> list[dict]:
    """The study's Table II beside our single runs of the same model and optimizer."""
    rows = []
    for row in cfg.study:
        ours = [s for s in singles if s["model"] == row.model and s["optimizer"].lower() == row.optimizer.lower()]
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
    """Package versions: the study's (conf/report.yaml) beside ours."""
    study = dict(cfg.report.study_packages)
    ours = dict(ev.packages)
    if "tensorflow-cpu" in ours:  # the CPU build is TensorFlow: one row
        ours["tensorflow"] = f"{ours.pop('tensorflow-cpu')} (tensorflow-cpu)"
    names = [*study, *(k for k in ours if k not in study)]
    return [{"package": n, "study": study.get(n), "ours": ours.get(n)} for n in names]


def _confusion_facts(ev: Evidence, top: int) -> dict[str, Any]:
    """The winner's test confusion: its most confused pairs and per-class accuracy ({} without one)."""
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
    """Class counts per split and their balance, and the files left out ({} without a data summary)."""
    if not ev.data:
        return {}
    counts = ev.data.get("listed") or ev.data.get("counts") or {}
    splits = [s for s in D.SPLITS if s in counts]
    classes = [
        {"class": c, "name": n, **{s: counts[s][i] if i < len(counts[s]) else None for s in splits}}
        for i, (c, n) in enumerate(zip(ev.data.get("classes") or [], ev.data.get("names") or []))
    ]
    balance = {
        s: {
            "total": int(sum(counts[s])),
            "min": int(min(counts[s], default=0)),
            "max": int(max(counts[s], default=0)),
            "ratio": max(counts[s], default=0) / max(1, min(counts[s], default=0)),
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
