"""Which hyperparameters matter: each dimension's share of the variance of validation accuracy, from Optuna's
importance evaluators (fANOVA by default) fed the sweep's configurations as an in-memory study, with a
bootstrap interval over configurations; over all scored configurations and over the best quarter of them.
And a warning where the best configuration's value of a numeric dimension sits at the edge of its range.

Pure: no MLflow, no files; the same input gives the same output (fixed seeds for the resamples and forests).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

# Optuna (and the scikit-learn it fits forests with) is imported where it is used: every command that imports
# lenet_sweep.report (best does) would otherwise pay seconds for it.
EVALUATORS = {
    "fanova": "FanovaImportanceEvaluator",
    "mean_decrease_impurity": "MeanDecreaseImpurityImportanceEvaluator",
}
RANGES = ("int", "float")  # dimension types sampled from a range (min, max); the rest are sets of values


@dataclass(frozen=True)
class Point:
    """One configuration as importance reads it: its dimensions' values (absent: not set, a dimension that
    is conditional on another), its score (NaN or None: failed) and whether it was pruned."""

    values: Mapping[str, Any]
    score: Optional[float]
    pruned: bool = False

    @property
    def scored(self) -> bool:
        """Whether it has a finite score."""
        return self.score is not None and math.isfinite(self.score)


@dataclass(frozen=True)
class Column:
    """One column of the in-memory study: a dimension (or dimensions that set the same config key and are
    never set together, such as adam_ and sgd_learning_rate), its Optuna distribution and how a value enters it."""

    name: str
    dims: tuple[str, ...]
    distribution: Any  # an optuna.distributions.BaseDistribution
    encode: Callable[[Any], Any]

    def param(self, values: Mapping[str, Any]) -> Any:
        """This column's value in a configuration (None: none of its dimensions is set)."""
        return self.encode(next((_value(values, d) for d in self.dims if _value(values, d) is not None), None))


def importance(points: Sequence[Point], space: Mapping[str, Mapping[str, Any]], settings: Any) -> dict[str, Any]:
    """Each dimension's share of the variance of the score with a bootstrap interval, over all scored
    configurations and over the top `settings.top_fraction`; counts; edge warnings. `space`: dimension ->
    its recorded spec (key, type, values, min, max, sampling); `settings`: report.importance."""
    scored = [p for p in points if p.scored]
    # Stable: configurations with equal scores keep the order they came in, so the top quarter is fixed.
    ranked = sorted(scored, key=lambda p: -float(p.score))
    top = ranked[: math.ceil(settings.top_fraction * len(ranked))] if ranked else []
    columns, left_out = _columns(scored, space)
    return {
        "evaluator": str(settings.evaluator),
        "bootstrap": settings.bootstrap,
        "confidence": settings.confidence,
        "top_fraction": settings.top_fraction,
        "min_trials": settings.min_trials,
        "counts": {
            "configurations": len(points),
            "scored": len(scored),
            "pruned": sum(p.pruned for p in scored),
            "failed": len(points) - len(scored),
            "top": len(top),
        },
        "columns": [{"name": c.name, "dimensions": list(c.dims)} for c in columns],
        "left_out": left_out,
        "all": _subset(scored, columns, settings, "scored configurations"),
        "top": _subset(top, columns, settings, f"configurations in the top {settings.top_fraction:.0%}"),
        "edges": edge_warnings(ranked[0] if ranked else None, space, settings.edge_fraction),
    }


def edge_warnings(best: Optional[Point], space: Mapping[str, Mapping[str, Any]], fraction: float) -> list[dict]:
    """Numeric dimensions whose best value sits at an end of the recorded range: within `fraction` of a
    range's width (on a log scale for a log-sampled one), or the lowest or highest of a set of numbers; not
    at a bottom of 0 or less (there is nothing below a rate, dropout or decay of 0 to widen to)."""
    out = []
    for dim, spec in space.items():
        value = _value(best.values, dim) if best else None
        if not _is_number(value):
            continue
        kind = str(spec.get("type"))
        if kind in RANGES:
            lo, hi = _number(spec.get("min")), _number(spec.get("max"))
            if lo is None or hi is None or not lo < hi:
                continue
            log = str(spec.get("sampling")) == "log" and lo > 0 and value > 0
            scale = math.log if log else float
            where = (scale(value) - scale(lo)) / (scale(hi) - scale(lo))
            side = "bottom" if where <= fraction else "top" if where >= 1 - fraction else ""
        elif kind == "choice" and isinstance(spec.get("values"), list):
            numbers = [v for v in spec["values"] if _is_number(v)]
            if len(numbers) != len(spec["values"]) or len(set(numbers)) < 2:
                continue
            lo, hi = min(numbers), max(numbers)
            side = "bottom" if value <= lo else "top" if value >= hi else ""
        else:
            continue
        if side == "bottom" and lo <= 0:  # a rate, dropout or decay of 0 is already the bottom: nothing below
            side = ""
        if side:
            out.append(
                {
                    "dimension": dim,
                    "value": value,
                    "side": side,
                    "low": lo,
                    "high": hi,
                    "message": f"{dim}: the best value {value:.3g} sits at the {side} of its range "
                    f"[{lo:g}, {hi:g}]: widen the range",
                }
            )
    return out


# ---- the study's columns ---------------------------------------------------------------------------------


def _columns(scored: Sequence[Point], space: Mapping[str, Mapping[str, Any]]) -> tuple[list[Column], list[dict]]:
    """The columns importance is computed over, and the dimensions left out with why."""
    from optuna.distributions import CategoricalDistribution

    columns, left_out, partial = [], [], []
    for dim, spec in space.items():
        values = [_value(p.values, dim) for p in scored]
        given = [v for v in values if v is not None]
        distinct = _distinct(values)
        if not given:
            left_out.append({"dimension": dim, "why": "no scored configuration sets it"})
        elif len(distinct) == 1:
            left_out.append({"dimension": dim, "why": f"fixed to {given[0]} in every scored configuration"})
        elif str(spec.get("type")) in RANGES and all(map(_is_number, given)):
            if len(given) == len(values):
                columns.append(_range_column(dim, (dim,), [spec], given))
            else:
                partial.append(dim)
        else:
            # A set of values; where a dimension is conditional on another, "not set" is one value more.
            columns.append(Column(dim, (dim,), CategoricalDistribution(distinct), _same))
    # A range set only in some configurations has no value to give the others, unless other dimensions
    # set the same config key in exactly those (the learning rate of each optimizer): then they are one column.
    by_key: dict[str, list[str]] = {}
    for dim in partial:
        by_key.setdefault(str(space[dim].get("key", "?")), []).append(dim)
    for key, dims in by_key.items():
        set_by = [sum(_value(p.values, d) is not None for d in dims) for p in scored]
        if key != "?" and len(dims) > 1 and all(n == 1 for n in set_by):
            given = [_value(p.values, d) for p in scored for d in dims if _value(p.values, d) is not None]
            columns.append(_range_column(f"{key} ({' or '.join(dims)})", tuple(dims), [space[d] for d in dims], given))
            continue
        for dim in dims:
            n = sum(_value(p.values, dim) is not None for p in scored)
            left_out.append(
                {
                    "dimension": dim,
                    "why": f"set in {n} of {len(scored)} scored configurations (conditional on another "
                    "dimension), and a range has no value for the others",
                }
            )
    return columns, left_out


def _range_column(name: str, dims: tuple[str, ...], specs: Sequence[Mapping], given: Sequence[float]) -> Column:
    """A numeric column over the recorded range (widened to the values seen); a log-sampled range enters as
    log10, so the evaluator weighs its range as the sweep sampled it."""
    from optuna.distributions import FloatDistribution, IntDistribution

    lows = [_number(s.get("min")) for s in specs] + [min(given)]
    highs = [_number(s.get("max")) for s in specs] + [max(given)]
    lo, hi = min(v for v in lows if v is not None), max(v for v in highs if v is not None)
    if all(str(s.get("sampling")) == "log" for s in specs) and lo > 0:
        return Column(name, dims, FloatDistribution(math.log10(lo), math.log10(hi)), _log10)
    if all(str(s.get("type")) == "int" for s in specs) and all(float(v).is_integer() for v in (lo, hi, *given)):
        return Column(name, dims, IntDistribution(int(lo), int(hi)), int)
    return Column(name, dims, FloatDistribution(float(lo), float(hi)), float)


def _same(value: Any) -> Any:
    return value


def _log10(value: Any) -> float:
    return math.log10(value)


def _distinct(values: Sequence[Any]) -> tuple:
    """The distinct values, in a fixed order (numbers, then text, then None)."""
    unique = []
    for v in values:
        if not any(type(v) is type(u) and v == u for u in unique):
            unique.append(v)
    return tuple(sorted(unique, key=lambda v: (v is None, not _is_number(v), v if _is_number(v) else str(v))))


# ---- shares and their intervals --------------------------------------------------------------------------


def _subset(points: Sequence[Point], columns: Sequence[Column], settings: Any, what: str) -> dict[str, Any]:
    """Shares with their bootstrap intervals over `points`, or why there are none."""
    out: dict[str, Any] = {"configurations": len(points), "too_few": None, "note": None, "resamples": 0, "rows": []}
    if len(points) < settings.min_trials:
        out["too_few"] = (
            f"{len(points)} {what}, fewer than the {settings.min_trials} needed to tell which hyperparameters "
            "matter (report.importance.min_trials): run more trials"
        )
        return out
    if not columns:
        out["note"] = "no dimension takes more than one value"
        return out
    shares = _shares(points, columns, settings)
    if shares is None:
        out["note"] = "every configuration scored the same: no variance to share"
        return out
    rng = np.random.default_rng(settings.seed)
    resampled = []
    for _ in range(settings.bootstrap):
        picked = rng.integers(0, len(points), len(points))
        draw = _shares([points[i] for i in picked], columns, settings)
        if draw is not None:  # a resample of equal scores has nothing to share: it tells nothing
            resampled.append(draw)
    out["resamples"] = len(resampled)
    tail = 100 * (1 - settings.confidence) / 2
    for c in columns:
        draws = [r[c.name] for r in resampled]
        low, high = np.percentile(draws, [tail, 100 - tail]) if draws else (None, None)
        out["rows"].append(
            {
                "dimension": c.name,
                "share": shares[c.name],
                "low": None if low is None else float(low),
                "high": None if high is None else float(high),
            }
        )
    out["rows"].sort(key=lambda r: (-r["share"], r["dimension"]))
    return out


def _shares(points: Sequence[Point], columns: Sequence[Column], settings: Any) -> Optional[dict[str, float]]:
    """Each column's normalized importance from an in-memory study of `points`; None when the scores do
    not vary (nothing to share)."""
    if len({float(p.score) for p in points}) < 2:
        return None
    import optuna

    distributions = {c.name: c.distribution for c in columns}
    with _quiet():
        study = optuna.create_study(direction="maximize")
        study.add_trials(
            [
                optuna.trial.create_trial(
                    params={c.name: c.param(p.values) for c in columns},
                    distributions=distributions,
                    value=float(p.score),
                )
                for p in points
            ]
        )
        evaluator = getattr(optuna.importance, EVALUATORS[str(settings.evaluator)])(
            n_trees=settings.trees, seed=settings.seed
        )
        try:
            shares = optuna.importance.get_param_importances(
                study, evaluator=evaluator, params=list(distributions), normalize=True
            )
        except RuntimeError:  # fANOVA: the forest found no variance to decompose
            return None
    return {name: float(shares[name]) for name in distributions}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna's per-study INFO lines and its experimental-feature warnings off, for this block only."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _value(values: Mapping[str, Any], dim: str) -> Any:
    """A dimension's value in a configuration; None where it is not set (or recorded as NaN: no value)."""
    value = values.get(dim)
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> Optional[float]:
    """A recorded bound as a float (None if absent or not a number)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
