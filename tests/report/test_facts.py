"""The report's facts as pure functions: statistics, rank correlation, score per value of a dimension
(continuous, single-valued or unset ones included) and the grouping of trials into configurations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lenet_sweep.report.evidence import Configuration, Evidence, Run, budget_of, confusion_matrix, data_summary
from lenet_sweep.report.facts import by_value, configurations, family, spearman, stats
from lenet_sweep.report.sections import dimension_sentences


def trial(
    trial_id: str, score: float | None, status: str = "FINISHED", config: dict | None = None, **params: object
) -> Run:
    """A trial run with `params` (as text, as MLflow holds them) and best val accuracy `score`."""
    metrics = {} if score is None else {"best_val_accuracy": score}
    return Run(
        f"run{trial_id}",
        status,
        {k: str(v) for k, v in params.items()},
        metrics,
        {"lenet_sweep.trial_id": trial_id},
        config=config or {},
    )


def evidence(trials: list[Run], space: dict[str, str]) -> Evidence:
    return Evidence(
        parent=None,
        space=space,
        types={},
        trials=trials,
        best=None,
        retrains=[],
        singles=[],
        data=None,
        skipped=[],
        packages={},
        candidates=[],
        confusion=None,
        predictions=[],
        sample_images=None,
        data_root=None,
    )


def config(values: dict, *scores: float) -> Configuration:
    """A configuration of one trial per score."""
    return Configuration(values, [trial(str(i), s) for i, s in enumerate(scores)])


def test_stats_of_finite_values_only():
    s = stats([0.5, None, 0.7, math.nan, math.inf])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.6) and s["median"] == pytest.approx(0.6)
    assert s["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1)) and (s["min"], s["max"]) == (0.5, 0.7)
    assert stats([0.3]) == {"n": 1, "mean": 0.3, "std": None, "min": 0.3, "max": 0.3, "median": 0.3}
    assert stats([]) == {"n": 0, "mean": None, "std": None, "min": None, "max": None, "median": None}


def test_spearman_ranks_ties_and_refuses_too_few_or_constant_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1])
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([0.001, 0.001, 0.001], [0.2, 0.3, 0.4]) is None  # one value: no ranks to correlate


def test_by_value_of_a_choice_counts_configurations_trials_and_failures():
    configs = [config({"dense_1": 8}, 0.5, 0.6), config({"dense_1": 16}, 0.4), config({"dense_1": 8}, 0.7)]
    failed = [trial("9", None, "FAILED", dense_1=16), trial("8", None, "FAILED", filters_1=6)]
    facts = by_value("dense_1", configs, failed, continuous=False)
    assert [r["value"] for r in facts["rows"]] == [8, 16]
    eight, sixteen = facts["rows"]
    assert (eight["configurations"], eight["trials"], eight["failed"]) == (2, 3, 0)
    assert eight["score"]["mean"] == pytest.approx(np.mean([0.6, 0.7]))
    assert (sixteen["configurations"], sixteen["trials"], sixteen["failed"]) == (1, 1, 1)


def test_by_value_of_a_continuous_dimension_correlates_value_and_score():
    configs = [config({"lr": x}, s) for x, s in ((0.001, 0.5), (0.01, 0.6), (0.0001, 0.4), (0.1, 0.3))]
    facts = by_value("lr", configs, [trial("9", None, "FAILED", lr=0.5)], continuous=True)
    assert facts["rows"] == [] and facts["failed"] == 1
    c = facts["continuous"]
    assert (c["n"], c["min"], c["max"]) == (4, 0.0001, 0.1)
    assert c["spearman"] == pytest.approx(spearman([0.001, 0.01, 0.0001, 0.1], [0.5, 0.6, 0.4, 0.3]))


def test_by_value_of_a_continuous_dimension_that_no_configuration_sets_is_empty():
    facts = by_value("adam_learning_rate", [config({"sgd_learning_rate": 0.01}, 0.5)], [], continuous=True)
    assert facts["continuous"] == {"n": 0, "spearman": None, "min": None, "max": None}
    assert by_value("lr", [], [], continuous=True)["continuous"]["n"] == 0
    assert by_value("lr", [], [], continuous=False) == {"dimension": "lr", "rows": []}
    assert dimension_sentences([facts]) == [
        "no finished configuration outside the collapsed ones sets adam_learning_rate"
    ]


def test_by_value_of_a_continuous_dimension_with_one_value():
    facts = by_value("lr", [config({"lr": 0.001}, 0.5), config({"lr": 0.001, "d": 8}, 0.6)], [], continuous=True)
    assert facts["continuous"] == {"n": 2, "spearman": None, "min": 0.001, "max": 0.001}
    assert dimension_sentences([facts]) == [
        "lr (0.001 to 0.001, continuous): rank correlation with best val accuracy – (n=2)"
    ]


def test_by_value_orders_numbers_before_text():
    configs = [config({"act": v}, 0.5) for v in ("relu", 16, 8, "None")]
    assert [r["value"] for r in by_value("act", configs, [], continuous=False)["rows"]] == [8, 16, "None", "relu"]


def test_configurations_group_trials_by_their_values_best_first():
    trials = [
        trial("0", 0.4, dense_1=8, output_activation="relu"),
        trial("1", 0.7, dense_1=16, output_activation="softmax"),
        trial("2", 0.6, dense_1=8, output_activation="relu", **{"tuner/trial_id": "0", "tuner/initial_epoch": 3}),
        trial("3", None, "FAILED", dense_1=32, output_activation="softmax"),
        trial("4", 0.9, "KILLED", dense_1=64, output_activation="softmax"),
        trial("5", 0.2, dense_1=8),  # a conditional dimension unset: another configuration
    ]
    configs = configurations(evidence(trials, {"dense_1": "model.dense.0", "output_activation": "x"}))
    assert [c.ids for c in configs] == ["1", "0+2", "5"]
    assert [c.score for c in configs] == [0.7, 0.6, 0.2]
    assert configs[1].values == {"dense_1": 8, "output_activation": "relu"}
    assert configs[1].fresh.run_id == "run0" and configs[1].restarts == [3]
    assert configs[2].values == {"dense_1": 8}


def test_config_keys_come_from_the_config_and_fall_back_to_params():
    logged = trial(
        "0",
        0.5,
        config={"model": {"name": "lenet5", "filters": [6, 16], "conv_layers": None}, "train": {"epochs": 25}},
        **{"train.epochs": 3, "tuner/epochs": "None"},
    )
    rebuilt = trial(
        "1",
        0.5,
        config={"model": {}},  # rebuilt from an older run's params: unrecorded keys are absent
        **{"model.name": "lenet_search", "model.conv_layers": 3, "train.epochs": 4, "tuner/epochs": 2},
    )
    assert logged.value("train.epochs") == 25 and logged.param("train.epochs") == 3
    assert budget_of(logged) == 25 and budget_of(rebuilt) == 2
    assert family(logged) == "lenet5, 2 conv blocks" and family(rebuilt) == "lenet_search, 3 conv blocks"
    assert rebuilt.value("seed") is None and logged.value("model.filters.0") is None


def test_files_and_metrics_of_another_shape_read_as_absent():
    """What an older version, a damaged store or a cut-off run left is not misread as numbers."""
    classes = ["a", "b"]
    assert data_summary({"classes": classes, "counts": {"train": [3, 4], "val": [1], "test": "many"}}) == {
        "classes": classes,
        "names": classes,  # no names: the class ids
        "counts": {"train": [3, 4]},  # splits of another shape left out
        "listed": {},
        "skipped": 0,
    }
    assert data_summary([1, 2]) is None and data_summary({"classes": []}) is None
    square = {"classes": classes, "names": ["ant", "bee"], "matrix": [[3, 1], [0, 4]]}
    assert confusion_matrix(square) == square
    assert confusion_matrix(square | {"names": ["ant"]})["names"] == classes
    for matrix in ([[3, 1], [0]], [[3, 1]], [[3, -1], [0, 4]], [[3, 0.5], [0, 4]], "none", [[3, True], [0, 4]]):
        assert confusion_matrix(square | {"matrix": matrix}) is None, matrix
    nan_scored = trial("0", math.nan)  # a best_val_accuracy of NaN: no epoch was scored
    assert nan_scored.score is None
    nan_scored.history = [{"val_accuracy": 0.4}, {"val_accuracy": math.nan}]
    assert nan_scored.score == 0.4  # the history's best epoch, as for runs that logged no score
