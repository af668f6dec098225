"""benchmarks/: the scripts behind docs/RESULTS.md's numbers run as written."""

from __future__ import annotations

import re

from mlflow.tracking import MlflowClient

from conftest import REPO, run_cli


def test_sweep_best_on_test_evaluates_the_sweeps_best_trial_once_and_logs_it(tiny_sweep):
    result = run_cli([str(REPO / "benchmarks" / "sweep_best_on_test.py"), *tiny_sweep["overrides"]])
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"best trial (\d+): val_accuracy ([\d.]+) \(best epoch\), test_accuracy ([\d.]+)", result.stdout)
    assert found, result.stdout
    best = tiny_sweep["result"].rows[0]  # the sweep's ranking on validation
    assert found.group(1) == best["trial"] and float(found.group(2)) == round(best["val_accuracy"], 4)
    parent = MlflowClient(tiny_sweep["store"]).get_run(tiny_sweep["result"].parent_run_id)
    assert parent.data.tags["best_trial_on_test"] == best["trial"]
    assert round(parent.data.metrics["best_trial_test_accuracy"], 4) == float(found.group(3))
    # the test images it evaluated are the split's: 6 val images per class of 3, 20 % held out as test
    assert "on 3 test images" in result.stdout
