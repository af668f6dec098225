"""The sweep report: the study's questions answered from what MLflow holds.
`python -m lenet_sweep.report sweep.name=NAME mlflow.tracking_uri=URI mlflow.experiment=NAME report.dir=DIR`

Read top-down:
- evidence.py: what the store holds (the sweep's trials, its `best` run and retrainings, the experiment's
  single runs, the files the report shows), fetched once;
- facts.py: every number of the report, pure functions of the evidence, kept in report.json;
- document.py: the blocks of a report (headings, sentences, tables, figures) as Markdown or HTML, and how
  numbers are written;
- sections.py: the report's sections, one function each, from the facts;
- this module: `make_report` writes report.md, report.html (figures embedded), report.json and figures/
  to `report.dir` and logs them to the sweep's parent run under report/; __main__.py: the command.

Nothing is trained or evaluated here: the test numbers are the ones `best` (and `train`/`reproduce`)
recorded, each evaluated once.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from lenet_sweep.config import check
from lenet_sweep.errors import UserError
from lenet_sweep.report.document import Doc
from lenet_sweep.report.evidence import gather
from lenet_sweep.report.facts import compute
from lenet_sweep.report.sections import answers, build
from lenet_sweep.tracking import store
from lenet_sweep.tracking.artifacts import no_scored_trial

REPORT_FILES = ("report.md", "report.html", "report.json")


@dataclass
class ReportResult:
    """A written report: its folder, the sweep's parent run it was logged to, its facts and short answers."""

    dir: Path
    sweep_run_id: str
    facts: dict
    answers: list[str]


def make_report(cfg: DictConfig) -> ReportResult:
    """Read sweep `cfg.sweep.name` from MLflow, write the report to `cfg.report.dir`, log it to the sweep."""
    check(cfg)
    if not cfg.report.epochs:
        raise UserError("report.epochs=[]: give the training budgets to compare, e.g. report.epochs=[5,10,25]")
    experiment_id = store.open_store(cfg.mlflow, create=False)
    uri = mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    parent = store.find_sweep(client, experiment_id, cfg.sweep.name, cfg.mlflow.experiment)
    name = parent.data.tags.get("lenet_sweep.sweep", "sweep")
    out = Path(cfg.report.dir if cfg.report.dir else Path("reports") / name).expanduser()
    stale_figures = check_target(out)
    ev = gather(client, experiment_id, parent)
    if not ev.finished:
        raise UserError(no_scored_trial(parent, [t.status for t in ev.trials]))
    facts = compute(ev, cfg)
    doc = build(ev, facts, cfg, uri)
    facts["figures"] = [f.name for f in doc.figures]
    _write_report(out, name, doc, facts, stale_figures)
    _log_report(client, parent.info.run_id, out, doc)
    return ReportResult(out, parent.info.run_id, facts, answers(facts))


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
        raise UserError(
            f"report.dir={out} holds other files and no earlier report: give a new or empty folder "
            "(a report never writes over files it did not make)"
        )
    return [name for name in earlier["figures"] if isinstance(name, str) and "/" not in name and name]


def _write_report(out: Path, name: str, doc: Doc, facts: dict, stale_figures: list[str]) -> None:
    """The report's files in `out`, replacing an earlier report's (and its figures this one does not make)."""
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


def _log_report(client: MlflowClient, run_id: str, out: Path, doc: Doc) -> None:
    """The written report, logged to the sweep's parent run under report/."""
    try:
        for file in REPORT_FILES:
            client.log_artifact(run_id, str(out / file), "report")
        for f in doc.figures:
            client.log_artifact(run_id, str(out / "figures" / f.name), "report/figures")
    except Exception as err:  # noqa: BLE001  the report is written; say what did not reach MLflow
        raise UserError(
            f"the report is written to {out}, but logging it to MLflow run {run_id} failed: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None


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


def run(cfg: DictConfig) -> ReportResult:
    """The command: write the report and print where it is and its short answers."""
    result = make_report(cfg)
    print(
        f"report of sweep {result.facts['sweep']['name']!r}: {result.dir / 'report.md'}, "
        f"{result.dir / 'report.html'} (also logged to MLflow run {result.sweep_run_id} under report/)"
    )
    for line in result.answers:
        print(f"- {line}")
    return result
