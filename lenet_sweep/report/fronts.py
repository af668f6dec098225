"""What accuracy costs: Pareto fronts of the sweep's configurations, best validation accuracy against trial
seconds, parameter count and inference latency per image, and the size and speed of an exported model.

The one part of the report that measures rather than reads: a configuration that did not record its parameter
count has its model built from its recorded config (cheap, nothing trained), and the members of the seconds
and parameter fronts and the best configuration are timed on this machine's CPU with random weights (the
latency of a fixed architecture does not depend on its weights). TensorFlow is imported only when a model is
built, so the report's modules load without it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lenet_sweep.report.evidence import Configuration, Run

BATCHES = (1, 32)  # batch sizes timed: one image at a time (a request), and a batch as predict reads files


def pareto_front(points: Iterable[tuple[Any, Optional[float], Optional[float]]]) -> list[tuple[Any, float, float]]:
    """The (id, score to maximise, cost to minimise) points that no other point dominates (as high a score or
    higher at no more cost, better in one of them), cheapest first (equal costs: highest score, then id).
    Equal points dominate neither the other: both are kept. Points whose score or cost is missing or not
    finite are left out."""
    valid = [(i, float(s), float(c)) for i, s, c in points if _finite(s) and _finite(c)]
    front = [p for p in valid if not any(_dominates(q, p) for q in valid)]
    return sorted(front, key=lambda p: (p[2], -p[1], str(p[0])))


def _dominates(a: tuple[Any, float, float], b: tuple[Any, float, float]) -> bool:
    return a[1] >= b[1] and a[2] <= b[2] and (a[1] > b[1] or a[2] < b[2])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- measuring a model -----------------------------------------------------------------------------


def latency(model, repeats: int, warmup: int, batches: Sequence[int] = BATCHES) -> dict[int, float]:
    """Seconds per image of `model`'s inference on this machine, per batch size: the median of `repeats` timed
    calls, divided by the batch size. The call is `model(x, training=False)` compiled once as a tf.function
    (what the export's serve endpoint runs), on random inputs of the model's input shape; `warmup` untimed
    calls per batch size go first (the first traces the function)."""
    import tensorflow as tf

    shape = tuple(model.input_shape[1:])
    serve = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec((None, *shape), tf.float32)])
    rng = np.random.default_rng(0)
    out = {}
    for batch in batches:
        x = tf.constant(rng.random((batch, *shape), dtype=np.float32))
        for _ in range(max(warmup, 1)):
            serve(x).numpy()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            serve(x).numpy()  # .numpy(): the result is there, not only scheduled
            times.append(time.perf_counter() - start)
        out[batch] = float(np.median(times)) / batch
    return out


@dataclass
class ExportCost:
    """An exported model's size and speed: parameters, model.keras bytes, seconds per image per batch size."""

    parameters: int
    file_bytes: int
    seconds_per_image: dict[int, float]
    repeats: int

    def metrics(self) -> dict[str, float]:
        """The numbers as MLflow metrics of the `best` run."""
        return {
            "export_parameters": float(self.parameters),
            "export_model_bytes": float(self.file_bytes),
            **{f"export_seconds_per_image_batch_{b}": s for b, s in self.seconds_per_image.items()},
        }

    def card_section(self) -> str:
        """The model card's section on size and speed (Markdown)."""
        speed = "; ".join(
            f"batch {b}: {1000 * s:.3g} ms per image ({1 / s:,.0f} images/s)" for b, s in self.seconds_per_image.items()
        )
        return (
            "## Size and speed\n"
            f"{self.parameters:,} parameters; `model.keras` is {self.file_bytes:,} bytes "
            f"({self.file_bytes / 2**20:.2f} MB). Inference on this machine's CPU ({os.cpu_count()} cores), "
            f"the model as exported (`model.keras` loaded back), median of {self.repeats} calls after warm-up: "
            f"{speed}.\n\n"
        )


def export_cost(folder: Path, repeats: int = 20, warmup: int = 3) -> ExportCost:
    """The size and speed of the export in `folder`, its model.keras loaded back as `predict` loads it."""
    from lenet_sweep import export

    model = export.load(folder).model
    return ExportCost(
        model.count_params(), (folder / export.MODEL).stat().st_size, latency(model, repeats, warmup), repeats
    )


def add_to_card(folder: Path, cost: ExportCost) -> str:
    """The export's MODEL_CARD.md with `cost`'s section before its provenance (at its end if it has none),
    written in place (beside it, then renamed); returns the new card."""
    from lenet_sweep import export

    path = folder / export.CARD
    card = path.read_text(encoding="utf-8")
    at = card.find("## Provenance")
    card = card[:at] + cost.card_section() + card[at:] if at >= 0 else card + "\n" + cost.card_section()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(card, encoding="utf-8")
    os.replace(tmp, path)
    return card


# ---- the report's fronts ---------------------------------------------------------------------------


def seconds(c: Configuration) -> Optional[float]:
    """What training a configuration cost: each finished trial's recorded trial_seconds (its wall clock,
    setup and logging included), summed over Hyperband's rounds; a trial that did not record it counts its
    run's start to end. None if a trial has neither."""
    total = 0.0
    for t in c.trials:
        s = t.metrics.get("trial_seconds", math.nan)
        if not math.isfinite(s) and t.started and t.ended > t.started:
            s = (t.ended - t.started) / 1000
        if not math.isfinite(s):
            return None
        total += s
    return total


def _best_trial(c: Configuration) -> Run:
    return max(c.trials, key=lambda t: t.score)


def _model_spec(run: Run) -> Optional[Mapping[str, Any]]:
    spec = run.config.get("model") if isinstance(run.config, Mapping) else None
    return spec if isinstance(spec, Mapping) else None


class _Models:
    """Builds the models of recorded configs (each architecture once), counting and timing them; a config
    that does not build (an older or partial record) gets the reason instead."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.counts: dict[str, tuple[Optional[int], str]] = {}

    def build(self, run: Run):
        from lenet_sweep.models import create_model

        spec = _model_spec(run)
        if spec is None:
            raise ValueError("no model config recorded")
        return create_model(spec, self.num_classes)

    def parameters(self, run: Run) -> tuple[Optional[int], str]:
        recorded = run.param("model.parameters")
        if _finite(recorded):
            return int(recorded), ""
        key = json.dumps(_model_spec(run), sort_keys=True, default=str)
        if key not in self.counts:
            try:
                self.counts[key] = (self.build(run).count_params(), "")
            except Exception as err:  # noqa: BLE001  any odd record: the report says why, and goes on
                self.counts[key] = (None, _reason(err))
        return self.counts[key]

    def latency(self, run: Run, repeats: int, warmup: int) -> tuple[dict[int, float], str]:
        try:
            return latency(self.build(run), repeats, warmup), ""
        except Exception as err:  # noqa: BLE001
            return {}, _reason(err)


def _reason(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:200]


def front_facts(
    configs: Sequence[Configuration],
    num_classes: int,
    settings: Mapping[str, Any],
    collapsed_left_out: int,
    best_metrics: Mapping[str, float],
) -> dict[str, Any]:
    """The cost fronts of `configs` (the working configurations, best first) for report.json: every
    configuration's costs, each front's members (id, val accuracy, cost), the latencies measured and
    what was not, and the exported winner's size and speed as `best` recorded them (`best_metrics`)."""
    repeats, warmup, cap = int(settings["latency_repeats"]), int(settings["latency_warmup"]), settings["max_measured"]
    models = _Models(num_classes)
    points, runs, unbuilt = [], {}, {}
    for c in configs:
        run = _best_trial(c)
        parameters, why = models.parameters(run)
        if why:
            unbuilt[c.ids] = why
        runs[c.ids] = run
        points.append(
            {
                "id": c.ids,
                "values": c.values,
                "val_accuracy": c.score,
                "seconds": seconds(c),
                "parameters": parameters,
                "latency_batch_1": None,
                "latency_batch_32": None,
            }
        )
    fronts = {name: _members(points, name) for name in ("seconds", "parameters")}
    # Timed: the best configuration and the members of the two fronts, best score first, up to the cap.
    # (A configuration whose model does not build cannot be timed either.)
    wanted = [p["id"] for p in points if p["id"] not in unbuilt]  # best first, as `configs`
    on_a_front = {m["id"] for f in fronts.values() for m in f}
    wanted = [i for n, i in enumerate(wanted) if n == 0 or i in on_a_front]
    measured, failed = [], {}
    for p in points:
        if p["id"] not in wanted[:cap]:
            continue
        times, why = models.latency(runs[p["id"]], repeats, warmup)
        if why:
            failed[p["id"]] = why
            continue
        p["latency_batch_1"], p["latency_batch_32"] = times.get(1), times.get(32)
        measured.append(p["id"])
    for name in ("latency_batch_1", "latency_batch_32"):
        fronts[name] = _members(points, name)
    return {
        "configurations": len(points),
        "collapsed_left_out": collapsed_left_out,
        "members": fronts,
        "points": points,
        "measured": measured,
        "wanted": len(wanted),
        "cap_left_out": max(len(wanted) - cap, 0),
        "unbuilt": unbuilt,
        "latency_failed": failed,
        "repeats": repeats,
        "warmup": warmup,
        "classes": num_classes,
        "cores": os.cpu_count(),
        "export": {
            "parameters": best_metrics.get("export_parameters"),
            "model_bytes": best_metrics.get("export_model_bytes"),
            **{f"latency_batch_{b}": best_metrics.get(f"export_seconds_per_image_batch_{b}") for b in BATCHES},
        },
    }


def _members(points: Sequence[Mapping[str, Any]], cost: str) -> list[dict[str, Any]]:
    """The Pareto front of `points` on `cost`: id, val accuracy and cost of each member, cheapest first."""
    front = pareto_front((p["id"], p["val_accuracy"], p[cost]) for p in points)
    return [{"id": i, "val_accuracy": s, "cost": c} for i, s, c in front]
