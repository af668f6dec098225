"""What accuracy costs: the Pareto front of hand-made points, a configuration's seconds, latency and an
export's size and speed on tiny models, and the report's section on the session's tiny sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import compose_config
from lenet_sweep import export
from lenet_sweep.models import create_model
from lenet_sweep.report import fronts, make_report
from lenet_sweep.report.evidence import Configuration, Run


def test_the_pareto_front_of_hand_made_points_is_the_known_front():
    points = [
        ("a", 0.50, 10.0),  # the cheapest
        ("k", 0.40, 10.0),  # as cheap as a, less accurate: dominated
        ("g", 0.50, 10.0),  # equal to a: neither dominates the other, both kept
        ("b", 0.70, 20.0),
        ("d", 0.70, 20.0),  # equal to b
        ("c", 0.60, 25.0),  # less accurate than b and dearer: dominated
        ("e", 0.70, 30.0),  # as accurate as b and dearer: dominated
        ("f", 0.90, 50.0),  # the most accurate
        ("h", math.nan, 1.0),  # no score: left out (it would be the cheapest)
        ("j", None, 2.0),
        ("i", 0.95, math.nan),  # no cost: left out (it would be the most accurate)
        ("l", 0.99, math.inf),
    ]
    assert fronts.pareto_front(points) == [
        ("a", 0.5, 10.0),
        ("g", 0.5, 10.0),
        ("b", 0.7, 20.0),
        ("d", 0.7, 20.0),
        ("f", 0.9, 50.0),
    ]
    assert fronts.pareto_front(reversed(points)) == fronts.pareto_front(points)  # order does not matter
    assert fronts.pareto_front([]) == [] and fronts.pareto_front([("x", 0.3, 4)]) == [("x", 0.3, 4.0)]


def trial(seconds: float | None, started: int = 0, ended: int = 0) -> Run:
    metrics = {"best_val_accuracy": 0.5} | ({"trial_seconds": seconds} if seconds is not None else {})
    return Run("r", "FINISHED", {}, metrics, {}, started=started, ended=ended)


def test_a_configuration_costs_the_seconds_of_all_its_rounds():
    assert fronts.seconds(Configuration({}, [trial(12.5), trial(30.0)])) == 42.5
    # a trial without trial_seconds counts its run's start to end (ms)
    assert fronts.seconds(Configuration({}, [trial(10.0), trial(None, 1_000, 4_500)])) == 13.5
    assert fronts.seconds(Configuration({}, [trial(10.0), trial(None)])) is None


@pytest.fixture(scope="module")
def tiny_model():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def test_latency_is_seconds_per_image_at_each_batch_size(tiny_model):
    times = fronts.latency(tiny_model, repeats=3, warmup=1)
    assert set(times) == {1, 32} and all(math.isfinite(t) and t > 0 for t in times.values())


def test_an_exports_size_and_speed_go_on_its_model_card(tiny_model, tmp_path):
    target = export.check_target(tmp_path / "exp", overwrite=False)
    card = "# Model card\n\n## Results\nx\n\n## Provenance\ny\n"
    export.write(
        target, tiny_model, "seed: 1\n", export.labels("abc", "abc"), export.preprocessing(12, "area", True), card
    )
    cost = fronts.export_cost(target, repeats=3, warmup=1)
    assert cost.parameters == tiny_model.count_params() == 4 * 27 + 4 + 4 * 3 + 3
    assert cost.file_bytes == (target / export.MODEL).stat().st_size > 0
    written = fronts.add_to_card(target, cost)
    assert written == (target / export.CARD).read_text()
    assert written.index("## Results") < written.index("## Size and speed") < written.index("## Provenance")
    assert f"{cost.parameters:,} parameters; `model.keras` is {cost.file_bytes:,} bytes" in written
    assert set(cost.metrics()) == {
        "export_parameters",
        "export_model_bytes",
        "export_seconds_per_image_batch_1",
        "export_seconds_per_image_batch_32",
    }
    assert not [p for p in tmp_path.iterdir() if p.name != "exp"]  # nothing left beside it


def test_the_report_weighs_accuracy_against_its_costs(tiny_sweep, tmp_path):
    cfg = compose_config(
        "report",
        [
            "sweep.name=ui",
            f"mlflow.tracking_uri={tiny_sweep['store']}",
            "mlflow.experiment=sweep",
            f"report.dir={tmp_path}",
            "report.top_trials=0",
            "report.chance_margin=0",  # the tiny sweep's 2 epochs may stay near chance: keep them in
            "report.fronts.latency_repeats=2",
        ],
    )
    result = make_report(cfg)
    md = (tmp_path / "report.md").read_text()
    assert "## What does accuracy cost?" in md
    assert md.index("## What does accuracy cost?") < md.index("## The winner over seeds")
    fr = json.loads((tmp_path / "report.json").read_text())["fronts"]
    assert fr == json.loads(json.dumps(result.facts["fronts"]))
    client = MlflowClient(tiny_sweep["store"])
    runs = {client.get_run(i).data.params["dense_1"]: client.get_run(i) for i in tiny_sweep["trials"].values()}
    points = {p["values"]["dense_1"]: p for p in fr["points"]}
    assert fr["configurations"] + fr["collapsed_left_out"] == 2 and len(points) == fr["configurations"] > 0
    for width, p in points.items():
        run = runs[str(width)]
        assert p["seconds"] == pytest.approx(run.data.metrics["trial_seconds"])
        recorded = yaml.safe_load(
            Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "c"))).read_text()
        )
        assert recorded["model"]["dense"][0] == width
        assert p["parameters"] == create_model(recorded["model"], 3).count_params()
    if len(points) == 2:  # (one of them may have collapsed)
        assert points[32]["parameters"] > points[16]["parameters"]
    # every front is exactly the front of the points; latency measured for the best and the fronts' members
    for name, members in fr["members"].items():
        expected = fronts.pareto_front((p["id"], p["val_accuracy"], p[name]) for p in fr["points"])
        assert [(m["id"], m["val_accuracy"], m["cost"]) for m in members] == expected
    timed = {p["id"] for p in fr["points"] if p["latency_batch_1"] is not None}
    best = max(fr["points"], key=lambda p: p["val_accuracy"])["id"]
    assert timed == set(fr["measured"]) and best in timed
    assert timed == {best} | {m["id"] for name in ("seconds", "parameters") for m in fr["members"][name]}
    assert all(p["latency_batch_1"] > 0 and p["latency_batch_32"] > 0 for p in fr["points"] if p["id"] in timed)
    assert "figures/cost_fronts.png" in md and (tmp_path / "figures" / "cost_fronts.png").is_file()
    for m in fr["members"]["seconds"]:
        assert f"| trial seconds | {m['id']} | {m['val_accuracy']:.4f} |" in md
