"""Hyperparameter importance as a pure function: synthetic sweeps whose score depends on one dimension only,
too few configurations, edge warnings, failed, pruned, fixed and conditional dimensions, determinism."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from lenet_sweep.config import ImportanceSettings
from lenet_sweep.report.importance import Point, edge_warnings, importance

SPACE = {
    "learning_rate": {"key": "optimizer.learning_rate", "type": "float", "min": 1e-4, "max": 1e-1, "sampling": "log"},
    "units": {"key": "model.dense.0", "type": "choice", "values": [16, 32, 64]},
    "flip": {"key": "model.augment_flip", "type": "boolean"},
    "layers": {"key": "model.conv_layers", "type": "int", "min": 1, "max": 4},
}
SETTINGS = ImportanceSettings(
    evaluator="fanova",
    trees=8,  # fewer than conf/report.yaml's, to keep the tests fast
    bootstrap=20,
    confidence=0.9,
    top_fraction=0.25,
    min_trials=12,
    edge_fraction=0.1,
    seed=0,
)


def sweep(n: int, seed: int = 1) -> list[Point]:
    """`n` configurations whose score rises with log10(learning_rate) alone, plus noise of 0.01."""
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(n):
        values = {
            "learning_rate": float(10 ** rng.uniform(-4, -1)),
            "units": int(rng.choice([16, 32, 64])),
            "flip": bool(rng.random() < 0.5),
            "layers": int(rng.integers(1, 5)),
        }
        score = 0.3 + 0.4 * (math.log10(values["learning_rate"]) + 4) / 3 + rng.normal(0, 0.01)
        points.append(Point(values, float(score)))
    return points


@pytest.fixture(scope="module")
def forty() -> dict:
    return importance(sweep(40), SPACE, SETTINGS)


def test_the_one_dimension_that_matters_ranks_first_with_an_interval_apart(forty):
    rows = forty["all"]["rows"]
    assert forty["all"]["too_few"] is None and forty["all"]["resamples"] == 20
    assert [r["dimension"] for r in rows][0] == "learning_rate"
    assert sorted(r["dimension"] for r in rows) == sorted(SPACE)
    first, rest = rows[0], rows[1:]
    assert first["share"] > 0.8 and sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert all(r["low"] <= r["high"] for r in rows)  # a percentile interval: it need not hold the estimate
    assert first["low"] > max(r["high"] for r in rest)  # the intervals do not overlap
    # 10 configurations in the top quarter: fewer than min_trials, said with both numbers
    assert forty["top"]["rows"] == [] and "10 configurations in the top 25%" in forty["top"]["too_few"]
    assert "12 needed" in forty["top"]["too_few"]


def test_the_same_input_gives_the_same_output(forty):
    assert importance(sweep(40), SPACE, SETTINGS) == forty


def test_too_few_configurations_say_so_instead_of_numbers():
    result = importance(sweep(5), SPACE, SETTINGS)
    for part in (result["all"], result["top"]):
        assert part["rows"] == [] and part["resamples"] == 0
    assert result["all"]["too_few"].startswith("5 scored configurations, fewer than the 12 needed")
    assert "report.importance.min_trials" in result["all"]["too_few"]


def test_failed_configurations_are_counted_and_left_out_pruned_ones_counted_and_kept():
    settings = dataclasses.replace(SETTINGS, bootstrap=5, min_trials=8)
    points = [dataclasses.replace(p, pruned=i < 3) for i, p in enumerate(sweep(14))]
    failed = [Point({"learning_rate": 1e-2, "units": 16}, math.nan), Point({"units": 64}, None)]
    clean = importance(points, SPACE, settings)
    with_failed = importance([*points[:7], *failed, *points[7:]], SPACE, settings)
    assert with_failed["counts"] == {"configurations": 16, "scored": 14, "pruned": 3, "failed": 2, "top": 4}
    assert with_failed["all"] == clean["all"]


def test_edge_warnings_fire_at_an_end_of_the_range_and_not_in_the_middle():
    def warned(**values) -> dict:
        return {e["dimension"]: e for e in edge_warnings(Point(values, 0.9), SPACE, 0.1)}

    # 0.06 is in the middle of [1e-4, 0.1] on a linear scale, but within 10% of its top on the log scale
    top = warned(learning_rate=0.06, units=64, layers=1, flip=True)
    assert top["learning_rate"]["side"] == "top" and top["units"]["side"] == "top"
    assert top["layers"]["side"] == "bottom" and "flip" not in top
    assert top["learning_rate"]["message"] == (
        "learning_rate: the best value 0.06 sits at the top of its range [0.0001, 0.1]: widen the range"
    )
    assert warned(learning_rate=math.sqrt(1e-4 * 1e-1), units=32, layers=2) == {}
    assert edge_warnings(None, SPACE, 0.1) == []
    # a best weight decay of 0 is at the bottom of [0, 0.1], but nothing lies below it to widen to; 0.1 does
    decay = {"decay": {"key": "optimizer.weight_decay", "type": "choice", "values": [0.0, 0.05, 0.1]}}
    assert edge_warnings(Point({"decay": 0.0}, 0.9), decay, 0.1) == []
    assert edge_warnings(Point({"decay": 0.1}, 0.9), decay, 0.1)[0]["side"] == "top"


def test_fixed_dimensions_are_left_out_and_conditional_ranges_on_one_key_are_one_column():
    space = {
        "size": {"key": "model.input_size", "type": "choice", "values": [32]},
        "optimizer": {"key": "optimizer", "type": "choice", "values": ["adam", "sgd"]},
        "adam_lr": {"key": "optimizer.learning_rate", "type": "float", "min": 1e-4, "max": 1e-2, "sampling": "log"},
        "sgd_lr": {"key": "optimizer.learning_rate", "type": "float", "min": 1e-2, "max": 1.0, "sampling": "log"},
        "momentum": {"key": "optimizer.momentum", "type": "choice", "values": [0.0, 0.9]},
        "decay": {"key": "optimizer.decay", "type": "float", "min": 0.0, "max": 0.1},
    }
    rng = np.random.default_rng(3)
    points = []
    for i in range(12):
        opt = "adam" if i % 2 else "sgd"
        values = {"size": 32, "optimizer": opt, f"{opt}_lr": float(10 ** rng.uniform(-3, -1))}
        if opt == "sgd":  # set only for sgd: "not set" counts as one value more
            values |= {"momentum": float(rng.choice([0.0, 0.9])), "decay": float(rng.uniform(0, 0.1))}
        points.append(Point(values, float(rng.uniform(0.2, 0.8))))
    result = importance(points, space, dataclasses.replace(SETTINGS, bootstrap=0))
    columns = {c["name"]: c["dimensions"] for c in result["columns"]}
    assert columns == {
        "optimizer": ["optimizer"],
        "momentum": ["momentum"],
        "optimizer.learning_rate (adam_lr or sgd_lr)": ["adam_lr", "sgd_lr"],
    }
    why = {d["dimension"]: d["why"] for d in result["left_out"]}
    assert why["size"] == "fixed to 32 in every scored configuration"
    assert why["decay"].startswith("set in 6 of 12 scored configurations")
    assert len(result["all"]["rows"]) == 3 and all(r["low"] is None for r in result["all"]["rows"])
