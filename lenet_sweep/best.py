"""A sweep's winner, chosen honestly:
`python -m lenet_sweep.best sweep.name=NAME mlflow.tracking_uri=URI mlflow.experiment=NAME export.dir=DIR`.

Reading order: candidates (the sweep's trials from MLflow, ranked on validation) -> retraining each over
seeds -> the choice (mean validation accuracy) -> the one test evaluation -> export and registry.

The test split is decoded once, after the choice, for the winner only. Every retraining is an MLflow run
nested under one `best` run; a cut-off `best` run is resumed by the same command (finished retrainings
are kept).
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import keras
import mlflow
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from lenet_sweep import cli, export, serving
from lenet_sweep import data as D
from lenet_sweep.cli import clock
from lenet_sweep.config import check, register_configs
from lenet_sweep.data import DataBySize, PreparedData, prepare_data
from lenet_sweep.errors import UserError
from lenet_sweep.tracking import store
from lenet_sweep.tracking.artifacts import Artifacts, no_scored_trial
from lenet_sweep.tracking.runs import (
    config_yaml,
    csv_text,
    end_killed,
    log_confusion,
    package_versions,
    tracked_run,
)
from lenet_sweep.tracking.store import open_store
from lenet_sweep.train import train_and_log
from lenet_sweep.trial import OBJECTIVE, best_epoch, evaluate_on_test
from lenet_sweep.tuner import describe

Progress = Callable[[str], None]
CONFIG_GROUPS = ("data", "model", "optimizer", "train")  # what a trial trains with, with `seed`
# Knobs of the machine that runs `best`, not of the trial: taken from this command's config.
LOCAL_KNOBS = ("data.decode_cache", "data.decode_threads", "train.keras_verbose")
# Where the data lives may change on the command line (data moved); nothing that changes the split or the
# training may: the candidates are retrained as their trials were, on the validation split the sweep used.
DATA_LOCATION = ("data.root", "data.url", "data.checksum", "data.cache_dir")


# ---- candidates --------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One configuration of the sweep, as its best trial recorded it."""

    rank: int  # place in the sweep's ranking by validation accuracy (1 = best)
    trial_id: str
    run_id: str
    sweep_val_accuracy: float  # the trial's own score (one seed, best epoch)
    values: dict[str, Any]  # its hyperparameters
    config: DictConfig  # its config, ready to train (seed and mlflow set per retraining)


def candidates(client: MlflowClient, experiment_id: str, parent, top_k: int) -> list[Candidate]:
    """The sweep's `top_k` best distinct configurations by validation accuracy (never test).

    Each trial counts with its latest attempt. Under Hyperband one configuration trains as several trials
    (3, 9, 25 epochs...); it counts once, with its best-scoring trial and that trial's epochs.
    """
    dimensions = [d for d in parent.data.params.get("search.dimensions", "").split(",") if d]
    latest = store.latest_attempts(client, experiment_id, parent.info.run_id)
    finished = [
        (trial_id, run)
        for trial_id, run in latest.items()
        # NaN: no epoch had a validation score, so the trial cannot be ranked
        if run.info.status == "FINISHED" and np.isfinite(run.data.metrics.get(f"best_{OBJECTIVE}", np.nan))
    ]
    if not finished:
        raise UserError(no_scored_trial(parent, [run.info.status for run in latest.values()]))
    finished.sort(key=lambda item: (-item[1].data.metrics[f"best_{OBJECTIVE}"], item[0]))
    artifacts = Artifacts(client)
    chosen: list[Candidate] = []
    seen: set[str] = set()
    for rank, (trial_id, run) in enumerate(finished, start=1):
        values = {d: run.data.params[d] for d in dimensions if d in run.data.params}
        key = repr(sorted(values.items()))
        if key in seen:
            continue
        seen.add(key)
        chosen.append(
            Candidate(
                rank,
                trial_id,
                run.info.run_id,
                run.data.metrics[f"best_{OBJECTIVE}"],
                {k: store.number(v) for k, v in values.items()},
                artifacts.train_config(run),
            )
        )
        if len(chosen) == top_k:
            break
    return chosen


def retraining_config(candidate: Candidate, cfg: DictConfig, overridden: Sequence[str], seed: int) -> DictConfig:
    """The candidate's config trained with `seed` on the sweep's split, logged where `cfg` logs, with the
    command line's data.*/train.* overrides and this machine's local knobs."""
    trial = OmegaConf.create(OmegaConf.to_container(candidate.config, resolve=True))
    OmegaConf.set_struct(trial, True)
    for key in [*LOCAL_KNOBS, *overridden]:
        OmegaConf.update(trial, key, OmegaConf.select(cfg, key), force_add=False)
    if trial.data.split_seed is None:  # the sweep split val/ with its own seed: keep that split
        trial.data.split_seed = candidate.config.seed
    trial.seed = seed
    trial.mlflow = OmegaConf.create(OmegaConf.to_container(cfg.mlflow, resolve=True))
    return trial


def overridden_keys(overrides: Sequence[str]) -> list[str]:
    """The DATA_LOCATION keys the command line sets; a UserError for keys that would change what the
    candidates train on or how (the split, the model, the optimizer, the training loop)."""
    keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]
    refused = [
        k
        for k in keys
        if (k == "seed" or k.split(".")[0] in CONFIG_GROUPS) and k not in DATA_LOCATION and k not in LOCAL_KNOBS
    ]
    if refused:
        raise UserError(
            f"{', '.join(refused)}: best retrains the sweep's configurations as their trials "
            "recorded them, on the sweep's validation split; only where the data lives may "
            f"change ({', '.join(DATA_LOCATION)})"
        )
    return [k for k in keys if k in DATA_LOCATION]


# ---- retraining --------------------------------------------------------------------------------


@dataclass
class Retraining:
    candidate: Candidate
    seed: int
    run_id: str
    status: str
    val_accuracy: float  # at its best epoch (the sweep's score), nan if it failed
    best_epoch: int
    seconds: float = 0.0
    model: Optional[keras.Model] = None  # None when reused from an earlier session (kept in MLflow)


def retrain(
    candidate: Candidate,
    cfg: DictConfig,
    prepared: PreparedData,
    experiment_id: str,
    best_run_id: str,
    patience: Optional[int],
    print_fn: Optional[Progress] = None,
) -> Retraining:
    """Train `candidate` once with `cfg.seed`, as a run nested under the `best` run; no test split.

    The sweep's early stopping, and the best validation-accuracy epoch's weights kept: the run's model is
    the best-epoch model, as KerasTuner's checkpoint of a trial is.
    """
    result = train_and_log(
        cfg,
        prepared,
        experiment_id,
        parent_run_id=best_run_id,
        run_name=f"trial-{candidate.trial_id}-seed{cfg.seed}",
        print_fn=print_fn,
        test=False,
        patience=patience,
        keep_best=True,
        tags={
            "lenet_sweep.kind": "retrain",
            "lenet_sweep.trial_id": candidate.trial_id,
            "lenet_sweep.seed": cfg.seed,
            "lenet_sweep.candidate": candidate.rank,
        },
    )
    epoch, score = best_epoch(result.history)
    status = "FAILED" if result.diverged else "FINISHED"
    return Retraining(
        candidate,
        cfg.seed,
        result.run_id,
        status,
        float("nan") if result.diverged else score,
        epoch,
        result.seconds,
        result.model,
    )


def kept(candidate: Candidate, seed: int, run) -> Retraining:
    """A retraining finished by a cut-off session, from its MLflow run (its model stays there)."""
    m = run.data.metrics
    return Retraining(candidate, seed, run.info.run_id, "FINISHED", m["best_val_accuracy"], int(m["best_epoch"]))


def reusable(client: MlflowClient, experiment_id: str, best_run_id: str) -> dict[tuple[str, int], Any]:
    """Finished retrainings of a cut-off `best` run, by (trial id, seed). Runs left RUNNING, and finished
    ones that lack what keeping them needs (an older version's, a damaged store's), end KILLED: the resumed
    `best` trains them again, and the report does not count them beside their replacements."""
    done = {}
    for run in store.trial_runs(client, experiment_id, best_run_id):
        if run.info.status == "RUNNING":
            end_killed(
                client,
                run.info.run_id,
                "cut off: `best` stopped before this retraining ended; the resumed `best` trains it again",
            )
        elif run.info.status == "FINISHED":
            lacks = _lacks(client, run)
            if lacks:
                end_killed(client, run.info.run_id, f"no {lacks} recorded: the resumed `best` trains it again")
            else:
                done[(run.data.tags["lenet_sweep.trial_id"], int(run.data.tags["lenet_sweep.seed"]))] = run
    return done


def _lacks(client: MlflowClient, run) -> str:
    """What a finished retraining lacks to be kept ('' if nothing): its score, best epoch, trial and seed
    tags, and the model files `load_run_model` reads."""
    m, tags = run.data.metrics, run.data.tags
    missing = [k for k in ("best_val_accuracy", "best_epoch") if not np.isfinite(m.get(k, np.nan))]
    missing += [k for k in ("lenet_sweep.trial_id", "lenet_sweep.seed") if k not in tags]
    if "lenet_sweep.seed" in tags and not tags["lenet_sweep.seed"].isdigit():
        missing.append("lenet_sweep.seed (a number)")
    try:
        files = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    except Exception:  # noqa: BLE001  a store that cannot list them: the model cannot be read either
        files = set()
    missing += [
        f"model/{name}" for name in (export.MODEL, export.LABELS, export.PREPROCESSING) if f"model/{name}" not in files
    ]
    return ", ".join(missing)


def load_run_model(client: MlflowClient, run_id: str) -> keras.Model:
    """A retraining's model from its MLflow run, loaded without running code from it."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return export.load(client.download_artifacts(run_id, "model", tmp)).model
        except Exception as err:  # noqa: BLE001  absent or damaged: the run must be trained again
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(
                f"the model of retraining run {run_id} cannot be read ({reason}): if it is gone or damaged, "
                f"delete that run (mlflow runs delete --run-id {run_id}) and rerun best, which trains it again"
            ) from None


# ---- the choice --------------------------------------------------------------------------------


@dataclass
class Summary:
    """A candidate over its seeds."""

    candidate: Candidate
    runs: list[Retraining] = field(default_factory=list)

    @property
    def scores(self) -> np.ndarray:
        return np.array([r.val_accuracy for r in self.runs], dtype=float)

    @property
    def failed(self) -> int:
        return int(sum(r.status != "FINISHED" for r in self.runs))

    @property
    def mean(self) -> float:
        return float(np.nanmean(self.scores)) if np.isfinite(self.scores).any() else float("nan")

    @property
    def std(self) -> float:
        """Sample standard deviation over the seeds (0 with one seed)."""
        ok = self.scores[np.isfinite(self.scores)]
        return float(np.std(ok, ddof=1)) if len(ok) > 1 else 0.0


def choose(summaries: list[Summary]) -> tuple[Summary, Retraining]:
    """The winner: no diverged seed, then the highest mean validation accuracy (then the sweep's rank);
    exported is its seed with the highest validation accuracy. Test plays no part."""
    usable = [s for s in summaries if np.isfinite(s.mean)]
    if not usable:
        raise UserError(
            "every retraining of every candidate failed (see the FAILED runs' failure_reason): "
            "check the sweep's configurations"
        )
    winner = min(usable, key=lambda s: (s.failed > 0, -s.mean, s.candidate.rank))
    run = max((r for r in winner.runs if r.status == "FINISHED"), key=lambda r: (r.val_accuracy, -r.seed))
    return winner, run


def format_summaries(summaries: list[Summary], winner: Summary) -> str:
    lines = [
        f"{'':1} {'rank':>4}  {'trial':>5}  {'sweep val':>9}  {'val mean ± std':>15}  {'seeds':>5}  hyperparameters"
    ]
    for s in summaries:
        mark = "*" if s is winner else " "
        failed = f" ({s.failed} failed)" if s.failed else ""
        lines.append(
            f"{mark} {s.candidate.rank:>4}  {s.candidate.trial_id:>5}  "
            f"{s.candidate.sweep_val_accuracy:>9.4f}  {s.mean:>7.4f} ± {s.std:.4f}  "
            f"{len(s.runs):>5}{failed}  {describe(s.candidate.values)}"
        )
    return "\n".join(lines)


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class BestResult:
    run_id: str
    summaries: list[Summary]
    winner: Summary
    exported: Retraining
    test_loss: float
    test_accuracy: float
    export_dir: Path
    model_version: Optional[str]
    resumed: bool
    seconds: float


def sweep_patience(params: Mapping[str, str]) -> Optional[int]:
    """The sweep's early-stopping patience from its parent run's params (None: it never stopped early)."""
    recorded = params.get("sweep.early_stopping_patience", "None")
    return None if recorded == "None" else int(recorded)


def run_best(cfg: DictConfig, overridden: Sequence[str] = (), print_fn: Optional[Progress] = None) -> BestResult:
    """Choose, confirm, test once, export and register the winner of sweep `cfg.sweep.name`.

    `overridden`: the DATA_LOCATION keys the command line set (see `overridden_keys`).
    """
    say = print_fn or (lambda _: None)
    check(cfg)
    experiment_id = open_store(cfg.mlflow, create=False)
    client = MlflowClient(mlflow.get_tracking_uri())
    parent = store.find_sweep(client, experiment_id, cfg.sweep.name, cfg.mlflow.experiment)
    if parent.info.status == "RUNNING":
        say(f"note: sweep {cfg.sweep.name!r} is still RUNNING (or was cut off): ranking the trials it has")
    chosen = candidates(client, experiment_id, parent, cfg.best.top_k)
    patience = sweep_patience(parent.data.params)
    seeds = [cfg.best.first_seed + i for i in range(cfg.best.seeds)]
    settings = {
        "sweep.run_id": parent.info.run_id,
        "best.top_k": cfg.best.top_k,
        "best.seeds": cfg.best.seeds,
        "best.first_seed": cfg.best.first_seed,
        "best.candidates": ",".join(c.trial_id for c in chosen),
        "best.overrides": ",".join(f"{k}={OmegaConf.select(cfg, k)}" for k in overridden),
    }
    latest = store.latest_best(client, experiment_id, parent.info.run_id)
    resumable = (
        latest is not None
        and latest.info.status != "FINISHED"
        and all(latest.data.params.get(k) == str(v) for k, v in settings.items())
    )
    previous = latest if resumable else None
    # A resumed run may have exported already: its own export may be replaced.
    ours = (
        previous is not None
        and bool(cfg.export.dir)
        and previous.data.tags.get("lenet_sweep.export_dir") == str(Path(cfg.export.dir).expanduser().resolve())
    )
    target = export.check_target(cfg.export.dir, cfg.export.overwrite or ours)
    if latest is not None and previous is None and latest.info.status == "RUNNING":
        reusable(client, experiment_id, latest.info.run_id)  # closes its cut-off retrainings KILLED
        end_killed(client, latest.info.run_id, "cut off, then `best` started afresh with other settings")
    say(
        f"sweep {cfg.sweep.name!r} (MLflow run {parent.info.run_id}): retraining its {len(chosen)} best "
        f"configuration(s) by validation accuracy with seeds {seeds}"
        + (f"; resuming best run {previous.info.run_id}" if previous else "")
    )

    started = time.perf_counter()
    # Train and val splits per data config (one unless the search varies data.*), kept as the sweep does.
    trial_data: dict[str, DataBySize] = {}

    with tracked_run(
        experiment_id=experiment_id,
        run_id=previous.info.run_id if previous else None,
        run_name=None if previous else f"best-{cfg.sweep.name}",
        tags={
            "lenet_sweep.kind": "best",
            "lenet_sweep.sweep": cfg.sweep.name,
            "lenet_sweep.sweep_run_id": parent.info.run_id,
        },
    ) as best_run:
        best_id = best_run.info.run_id
        done = reusable(client, experiment_id, best_id) if previous else {}
        if not previous:
            mlflow.log_params(settings | {"best.early_stopping_patience": patience})
        summaries = []
        for candidate in chosen:
            summary = Summary(candidate)
            for seed in seeds:
                name = f"trial {candidate.trial_id} (sweep rank {candidate.rank}) seed {seed}"
                if (candidate.trial_id, seed) in done:
                    summary.runs.append(kept(candidate, seed, done[(candidate.trial_id, seed)]))
                    say(f"{name}: val_accuracy {summary.runs[-1].val_accuracy:.4f} (kept from the cut-off session)")
                    continue
                trial_cfg = retraining_config(candidate, cfg, overridden, seed)
                say(f"{name}: training up to {trial_cfg.train.epochs} epochs")
                data = trial_data.setdefault(
                    OmegaConf.to_yaml(trial_cfg.data), DataBySize(trial_cfg.data, trial_cfg.seed, say)
                )
                r = retrain(
                    candidate,
                    trial_cfg,
                    data.at(trial_cfg.model.input_size),
                    experiment_id,
                    best_id,
                    patience,
                    print_fn,
                )
                summary.runs.append(r)
                outcome = (
                    f"val_accuracy {r.val_accuracy:.4f} at epoch {r.best_epoch}"
                    if r.status == "FINISHED"
                    else "FAILED (diverged)"
                )
                say(f"{name}: {outcome}, {r.seconds:.0f}s, elapsed {clock(time.perf_counter() - started)}")
            summaries.append(summary)
        winner, chosen_run = choose(summaries)
        say(
            "configurations by mean validation accuracy over seeds (* = winner):\n"
            + format_summaries(summaries, winner)
        )
        _log_choice(summaries, winner, chosen_run)

        # The test split, once, for the winner only.
        final_cfg = retraining_config(winner.candidate, cfg, overridden, chosen_run.seed)
        model = chosen_run.model or load_run_model(client, chosen_run.run_id)
        test = prepare_data(final_cfg.data, final_cfg.model.input_size, final_cfg.seed, say, splits=("test",))
        split = test.decoded["test"]
        tested = evaluate_on_test(model, split, final_cfg.train.batch_size, len(test.splits.classes))
        test_loss, test_accuracy = tested.loss, tested.accuracy
        mlflow.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy})
        title = f"test confusion: trial {winner.candidate.trial_id}, seed {chosen_run.seed}"
        log_confusion(tested.confusion, test.splits.classes, test.names, title)
        _log_predictions(tested.scores, split, test.splits.classes)
        say(
            f"winner: trial {winner.candidate.trial_id} (sweep rank {winner.candidate.rank}), "
            f"val_accuracy {winner.mean:.4f} ± {winner.std:.4f} over {len(winner.runs)} seed(s); "
            f"seed {chosen_run.seed} exported; test_accuracy {test_accuracy:.4f} on {len(split.labels)} "
            "images (evaluated once)"
        )

        final_yaml = config_yaml(final_cfg)
        prep = export.preprocessing(final_cfg.model.input_size, final_cfg.data.interpolation, final_cfg.data.antialias)
        card = model_card(
            cfg,
            final_cfg,
            test,
            summaries,
            winner,
            chosen_run,
            test_accuracy,
            test_loss,
            parent.info.run_id,
            best_id,
            patience,
        )
        mlflow.log_text(card, export.CARD)
        export.write(target, model, final_yaml, export.labels(test.splits.classes, test.names), prep, card)
        mlflow.set_tag("lenet_sweep.export_dir", str(target))
        say(f"exported to {target}")
        version = previous.data.tags.get("lenet_sweep.registered_version") if previous else None
        if version is None:  # (a resumed run that registered already does not register twice)
            version = register(cfg, target, best_id, winner, test_accuracy)
            if version:
                mlflow.set_tag("lenet_sweep.registered_version", version)
        if version:
            say(
                f"registered as version {version} of {cfg.export.registered_model!r}"
                + (f" (alias {cfg.export.alias!r})" if cfg.export.alias else "")
            )
        if previous and "failure_reason" in previous.data.tags:  # from the session this one resumed
            client.delete_tag(best_id, "failure_reason")
    return BestResult(
        best_id,
        summaries,
        winner,
        chosen_run,
        test_loss,
        test_accuracy,
        target,
        version,
        previous is not None,
        time.perf_counter() - started,
    )


def _log_choice(summaries: list[Summary], winner: Summary, chosen_run: Retraining) -> None:
    rows = [
        [
            s.candidate.rank,
            s.candidate.trial_id,
            s.candidate.sweep_val_accuracy,
            s.mean,
            s.std,
            len(s.runs),
            s.failed,
            " ".join(f"{r.val_accuracy:.4f}" for r in s.runs),
            describe(s.candidate.values),
            "yes" if s is winner else "",
        ]
        for s in summaries
    ]
    mlflow.log_text(
        csv_text(
            rows,
            [
                "sweep_rank",
                "trial",
                "sweep_val_accuracy",
                "val_accuracy_mean",
                "val_accuracy_std",
                "seeds",
                "failed",
                "val_accuracy_per_seed",
                "hyperparameters",
                "winner",
            ],
        ),
        "best/candidates.csv",
    )
    mlflow.log_metrics(
        {
            "val_accuracy_mean": winner.mean,
            "val_accuracy_std": winner.std,
            "exported_val_accuracy": chosen_run.val_accuracy,
        }
    )
    mlflow.set_tags(
        {
            "lenet_sweep.winner_trial": winner.candidate.trial_id,
            "lenet_sweep.winner_run_id": chosen_run.run_id,
            "lenet_sweep.winner_seed": chosen_run.seed,
        }
    )


def _log_predictions(scores: np.ndarray, split: D.DecodedSplit, classes: Sequence[str]) -> None:
    """Every test image's prediction (for the report's confusions and misclassified grid)."""
    predicted = np.argmax(scores, axis=1)
    rows = [
        [path, classes[label], classes[p], f"{scores[i, p]:.6f}", int(label == p)]
        for i, (path, label, p) in enumerate(zip(split.paths, split.labels, predicted))
    ]
    mlflow.log_text(
        csv_text(rows, ["path", "label", "predicted", "score", "correct"]), "evaluation/test_predictions.csv"
    )


def _requirements() -> list[str]:
    """The winner's serving requirements: the versions it was trained with (MLflow would otherwise infer
    them by loading the model in a subprocess). lenet_sweep itself, whose serving module runs the model,
    is not listed: it is not on PyPI, and a package of that name from an index would be someone else's
    code; serve from an environment that has it installed (`--env-manager local`)."""
    versions = package_versions() | {"pandas": importlib.metadata.version("pandas")}  # pandas: the answers
    served = ("tensorflow-cpu", "tensorflow", "keras", "mlflow", "numpy", "pillow", "pandas")
    return [f"{name}=={versions[name]}" for name in served if name in versions]


def register(cfg: DictConfig, folder: Path, best_run_id: str, winner: Summary, test_accuracy: float) -> Optional[str]:
    """Log the export in `folder` as an MLflow pyfunc model (lenet_sweep.serving: image files or pixels in;
    nothing in the artifact runs as code) and register a new version."""
    name = cfg.export.registered_model
    info = serving.log_model(folder, name, _requirements(), max_pixels=cfg.data.max_pixels)
    size = json.loads((folder / export.PREPROCESSING).read_text())["input_size"]
    if not name:
        return None
    version = str(info.registered_model_version)
    client = MlflowClient(mlflow.get_tracking_uri())
    for key, value in {
        "sweep": cfg.sweep.name,
        "trial": winner.candidate.trial_id,
        "val_accuracy_mean": f"{winner.mean:.4f}",
        "val_accuracy_std": f"{winner.std:.4f}",
        "test_accuracy": f"{test_accuracy:.4f}",
        "best_run_id": best_run_id,
        "input": f"image files (bytes, or base64 strings in JSON) in a column {serving.IMAGE!r}, "
        f"or float32 RGB pixels (N, {size}, {size}, 3) in [0, 1]",
    }.items():
        client.set_model_version_tag(name, version, key, value)
    if cfg.export.alias:
        client.set_registered_model_alias(name, cfg.export.alias, version)
    return version


# ---- the model card ----------------------------------------------------------------------------


def model_card(
    cfg: DictConfig,
    final_cfg: DictConfig,
    test: PreparedData,
    summaries: list[Summary],
    winner: Summary,
    chosen_run: Retraining,
    test_accuracy: float,
    test_loss: float,
    sweep_run_id: str,
    best_run_id: str,
    patience: Optional[int],
) -> str:
    """MODEL_CARD.md: every number in it comes from this run."""
    stopping = f", stopped early after {patience} epochs without a lower validation loss" if patience else ""
    counts = {split: len(files.paths) for split, files in test.splits.files.items()}
    m, o = final_cfg.model, final_cfg.optimizer
    rows = "".join(
        f"| {s.candidate.rank} | {s.candidate.trial_id} | {s.candidate.sweep_val_accuracy:.4f} | "
        f"{s.mean:.4f} ± {s.std:.4f} | {len(s.runs)}{f' ({s.failed} failed)' if s.failed else ''}"
        f" | {describe(s.candidate.values)} | {'**yes**' if s is winner else ''} |\n"
        for s in summaries
    )
    study = "".join(f"| {row.model} ({row.optimizer}), the study | {row.test_accuracy:.4f} |\n" for row in cfg.study)
    title = cfg.export.registered_model or "lenet_sweep model"
    versions = package_versions()
    relu = (
        "Its ReLU output gives non-negative scores, not probabilities: the argmax is the prediction.\n"
        if m.output_activation == "relu"
        else ""
    )
    return f"""# Model card: {title} from sweep `{cfg.sweep.name}`

## Model
{m.name} (family {m.family}): {m.input_size}x{m.input_size} RGB input, conv filters \
{list(m.filters)[: m.conv_layers or len(m.filters)]} ({m.kernel_sizes[0]}x{m.kernel_sizes[0]}, {m.padding}, \
{m.pooling} pooling), dense {list(m.dense)}, {m.output_activation} output, batch norm {m.batch_norm}, \
dropout {m.dropout}, flip {m.augment_flip}, shift {m.augment_shift}. Optimizer {o.name}, learning rate \
{o.learning_rate:.4g}; batch {final_cfg.train.batch_size}; up to {final_cfg.train.epochs} epochs{stopping}; \
weights of the best validation-accuracy epoch (epoch {chosen_run.best_epoch}).
Trained with seed {chosen_run.seed}. Config: `config.yaml`; preprocessing: `preprocessing.json`.

## Data and split
Classes ({len(test.names)}): {", ".join(f"{c} ({n})" for c, n in zip(test.splits.classes, test.names))}.
Data root `{test.splits.root}`: `train/` trains ({counts["train"]} files); `val/` is split \
{1 - final_cfg.data.test_fraction:.0%}:{final_cfg.data.test_fraction:.0%} per class with seed \
{final_cfg.data.split_seed} into validation ({counts["val"]} files) and test ({counts["test"]} files; \
{len(test.decoded["test"].labels)} decoded, {len(test.decoded["test"].skipped)} skipped).

## How it was chosen
The sweep's trials were ranked by validation accuracy; its {len(summaries)} best distinct configurations \
were retrained with {cfg.best.seeds} seed(s) each ({", ".join(str(r.seed) for r in winner.runs)}); the \
winner has the highest mean validation accuracy (sample standard deviation over seeds). The test split was \
evaluated once, for the exported model only.

| sweep rank | trial | sweep val acc (1 seed) | val acc mean ± std | seeds | hyperparameters | winner |
|---|---|---|---|---|---|---|
{rows}
## Results
- Validation accuracy of the winner: **{winner.mean:.4f} ± {winner.std:.4f}** over {len(winner.runs)} \
seed(s); the exported seed: {chosen_run.val_accuracy:.4f}.
- Test accuracy (evaluated once): **{test_accuracy:.4f}** (test loss {test_loss:.4f}).

| model | test accuracy |
|---|---|
{study}| {m.name}, this export | {test_accuracy:.4f} |

## Provenance
MLflow: sweep run `{sweep_run_id}`, best run `{best_run_id}`, exported retraining `{chosen_run.run_id}`.
Packages: {", ".join(f"{k} {v}" for k, v in versions.items())}.

## Limits
Trained on {len(test.names)} classes only: any image is put in one of them, with no "none of these" answer.
{relu}"""


# ---- entry point -------------------------------------------------------------------------------


def run(cfg: DictConfig, overrides: Sequence[str]) -> BestResult:
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    result = run_best(cfg, overridden_keys(overrides), print)
    print(
        f"best: {len(result.summaries)} configuration(s) x {cfg.best.seeds} seed(s) in "
        f"{clock(result.seconds)}; MLflow run {result.run_id} in {mlflow.get_tracking_uri()}"
    )
    return result


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="best")
def main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    cli.guarded(lambda: store.exclusively(cfg.mlflow, lambda: run(cfg, overrides)))


if __name__ == "__main__":
    cli.quote_path_overrides(("export.dir", "data.root"))
    main()
