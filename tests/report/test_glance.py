"""The report at a glance: answers in words, the evidence, how sure, from the facts alone."""

from __future__ import annotations

from lenet_sweep.report import glance
from lenet_sweep.report.facts import stats


def facts(relu: list[float], softmax: list[float], gains: list[float], importance: dict | None = None) -> dict:
    """Report facts with only what the table reads: two output activations, one filter dimension, one
    budget step, one family's turning epochs, no `best` run."""
    chance = 0.1
    return {
        "output_activation": {
            "sweep": [
                {
                    "value": "relu",
                    "configurations": len(relu),
                    "collapsed": sum(s < chance + 0.05 for s in relu),
                    "score": stats(relu),
                },
                {
                    "value": "softmax",
                    "configurations": len(softmax),
                    "collapsed": sum(s < chance + 0.05 for s in softmax),
                    "score": stats(softmax),
                },
            ],
            "single_runs": [],
        },
        "filters_and_layers": [
            {
                "dimension": "filters_1",
                "rows": [
                    {"value": 16, "configurations": 3, "score": stats([0.60, 0.62, 0.61])},
                    {"value": 64, "configurations": 3, "score": stats([0.70, 0.71, 0.72])},
                ],
            }
        ],
        "dense_widths": [],
        "epochs": {
            "budgets": [{"epochs": 5, "score": stats([0.6, 0.62])}, {"epochs": 10, "score": stats([0.65, 0.7])}],
            "gains": [{"from": 5, "to": 10, "gain": stats(gains)}],
        },
        "turning_points": [
            {
                "family": "lenet_search",
                "runs": 3,
                "turned": 3,
                "epochs": [7, 8, 9],
                "turning_epoch": stats([7, 8, 9]),
                "min_epochs": 9,
            }
        ],
        "importance": importance or {},
        "multi_seed": {},
        "table_ii": [{"study": 0.6321}, {"study": 0.5136}],
    }


def test_each_question_is_answered_in_words_with_its_evidence_and_how_sure():
    rows = glance.rows(facts([0.1, 0.1, 0.1], [0.5, 0.55, 0.6, 0.52], [0.05, 0.04, 0.06]), 0.9)
    by = {r["question"]: r for r in rows}
    act = by["Softmax instead of ReLU output?"]
    assert act["answer"].startswith("softmax: +0.44") and "every ReLU configuration collapsed" in act["answer"]
    assert act["evidence"] == "4 softmax and 3 ReLU configurations" and act["how_sure"].startswith("90% interval [+")
    filters = by["Other filter counts or more conv layers?"]
    assert filters["answer"] == "filters_1=64 best (0.710), +0.100 over 16"
    assert "overlaps 0" not in filters["how_sure"]
    assert by["5, 10 or 25 epochs?"]["answer"].startswith("longer pays up to 10 epochs (5→10: +0.050)")
    assert by["Where does overfitting start?"]["answer"] == "lenet_search: epoch 8"
    # what has no evidence says which command adds it, never a row of dashes alone
    assert by["Other dense widths?"]["how_sure"].startswith("not enough runs: `make sweep")
    assert by["Which hyperparameters matter most?"]["how_sure"].startswith("no importance was computed")
    assert by["What does the winner reach on test?"]["how_sure"] == f"not enough runs: {glance.MORE_BEST}"


def test_one_configuration_per_value_is_not_enough_for_an_interval():
    rows = glance.rows(facts([0.1], [0.6], [0.05]), 0.9)
    assert rows[0]["how_sure"] == f"not enough runs: {glance.MORE_SWEEP}"
    assert rows[3]["how_sure"].startswith("not enough runs: `make sweep")
    assert rows[3]["answer"] == "too few to tell (5→10: +0.050)"


def test_importance_gives_its_top_dimensions_with_their_intervals():
    importance = {
        "evaluator": "fanova",
        "confidence": 0.9,
        "counts": {"scored": 40, "pruned": 5, "failed": 2},
        "all": {
            "rows": [
                {"dimension": "lr", "share": 0.8, "low": 0.7, "high": 0.9},
                {"dimension": "dense_1", "share": 0.1, "low": 0.0, "high": 0.2},
            ]
        },
    }
    row = glance.importance_row({"importance": importance})
    assert row["answer"] == "lr (80% of the variance); dense_1 (10% of the variance)"
    assert row["how_sure"].startswith("lr [70%, 90%]") and "5 pruned" in row["evidence"]
    # with report.importance.bootstrap=0 there is no interval: said, not a crash (the figure too)
    importance["all"]["rows"][0] |= {"low": None, "high": None}
    assert glance.importance_row({"importance": importance})["how_sure"].startswith("lr (no interval")
    unbounded = facts([0.1], [0.6], [0.05], importance)
    assert len(glance.figure(unbounded).axes) == 6
    too_few = glance.importance_row({"importance": {"all": {"too_few": "8 scored configurations, 12 needed"}}})
    assert too_few["how_sure"].startswith("8 scored configurations, 12 needed: `make sweep")


def test_the_key_figure_has_a_panel_per_question_even_without_evidence():
    empty = facts([], [], [])
    empty["output_activation"]["sweep"] = []
    empty["turning_points"] = []
    fig = glance.figure(empty)
    assert len(fig.axes) == 6
