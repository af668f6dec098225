"""A sweep's winner, raced over seeds, refit at the final fidelity and tested once:
`python -m lenet_sweep.best sweep.name=NAME mlflow.tracking_uri=URI mlflow.experiment=NAME export.dir=DIR`.

Reading order: candidates (the sweep's trials from MLflow, ranked on validation) -> racing them over seeds
-> the choice (the highest lower confidence bound of the mean validation accuracy) -> the winner's refit at
the final fidelity -> the one test evaluation -> export and registry -> how the budget was spent.

Racing. A sweep's top trial is often a lucky seed, and a flat grid (every candidate x every seed) spends as
much on a candidate clearly behind after two seeds as on the close ones. Every candidate trains
`best.min_seeds` seeds (the same seeds for all, first_seed, first_seed+1, ...); then, round by round, a
candidate whose t interval of its mean validation accuracy lies wholly below the leader's lower bound stops,
and the contenders left (the leader too) train one more seed each, up to `best.max_seeds` (`best.seeds=N`:
exactly N each, the flat grid). `race_round` is a pure function of the scores, so the decisions are
testable without training and a resumed run replays them from the retrainings it keeps.

The refit. The sweep searched at a cheap fidelity (small inputs, few epochs); the model worth exporting is
the winner's config trained at `best.final.input_size` for up to `best.final.epochs`. It trains on the
train split only, validating on the sweep's val split: its best validation-accuracy epoch is kept (there
is no early stopping, and the epoch is chosen on validation, never test), and its validation accuracy at
the final fidelity is recorded and checks that the larger input did not hurt. Below the winner's racing
lower bound (mean minus half-width) the refit is not exported: the best racing model is, at the sweep's
fidelity. Training on train+val would leave neither the epoch choice nor that check, and the test split
stays untouched until the single evaluation of the exported model. The refit uses seed `first_seed`, not
the winner's best racing seed: a seed picked for its validation score would bias the check upwards (at
the same input size the refit replays that seed's run for its first epochs), while first_seed is one
every candidate trained and none was chosen for.

The budget. `best.budget_minutes` bounds the whole command on whatever machine runs it. Racing may spend
1 - `best.final.share` of it: a retraining is not started when its estimate (the median of that
candidate's retrainings, else of any candidate's) would overrun racing's share. The refit gets the rest,
racing's leftover included; its epochs come from the racing runs' recorded epoch_seconds scaled by the
step-time ratio between the two input sizes, timed on this machine (`step_ratio`), and never fall below
`best.final.min_epochs` (a refit that short is not worth its time: it then runs over budget, and says so).
The command prints how the budget was spent.

Every retraining and the refit is an MLflow run nested under one `best` run; a cut-off `best` run is
resumed by the same command (finished retrainings and a finished refit are kept).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
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
from scipy import stats

from lenet_sweep import cli, export, serving
from lenet_sweep import data as D
from lenet_sweep.cli import clock
from lenet_sweep.config import check, register_configs
from lenet_sweep.data import DataBySize, PreparedData, prepare_data
from lenet_sweep.errors import UserError
from lenet_sweep.report.fronts import add_to_card, export_cost
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
from lenet_sweep.train import RunResult, train_and_log
from lenet_sweep.trial import OBJECTIVE, best_epoch, compile_model, evaluate_on_test
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
    seconds: float = 0.0  # wall clock of the whole run (0: not known)
    model: Optional[keras.Model] = None  # None when reused from an earlier session (kept in MLflow)
    epoch_seconds: list[float] = field(default_factory=list)  # each epoch's, as the run recorded them

    @property
    def input_size(self) -> int:
        return int(self.candidate.config.model.input_size)


def retrain(
    candidate: Candidate,
    cfg: DictConfig,
    prepared: PreparedData,
    experiment_id: str,
    best_run_id: str,
    patience: Optional[int],
    print_fn: Optional[Progress] = None,
    refit_why: str = "",
) -> Retraining:
    """Train `candidate` once with `cfg` (its seed, input size and epochs), as a run nested under the `best`
    run; no test split. The best validation-accuracy epoch's weights are kept: the run's model is the
    best-epoch model, as KerasTuner's checkpoint of a trial is.

    A racing retraining (tag `lenet_sweep.kind=retrain`) unless `refit_why` says how a refit's epochs were
    chosen (then `kind=refit`, and that reason is a tag of the run). `patience`: early stopping on
    validation loss, None for none.
    """
    started = time.perf_counter()
    kind = "refit" if refit_why else "retrain"
    name = f"refit-trial-{candidate.trial_id}-{cfg.model.input_size}px" if refit_why else f"trial-{candidate.trial_id}"
    result = train_and_log(
        cfg,
        prepared,
        experiment_id,
        parent_run_id=best_run_id,
        run_name=f"{name}-seed{cfg.seed}",
        print_fn=print_fn,
        test=False,
        patience=patience,
        keep_best=True,
        tags={
            "lenet_sweep.kind": kind,
            "lenet_sweep.trial_id": candidate.trial_id,
            "lenet_sweep.seed": cfg.seed,
            "lenet_sweep.candidate": candidate.rank,
        }
        | ({"lenet_sweep.refit_epochs": refit_why} if refit_why else {}),
    )
    return _trained(candidate, cfg.seed, result, time.perf_counter() - started)


def _trained(candidate: Candidate, seed: int, result: RunResult, seconds: float) -> Retraining:
    epoch, score = best_epoch(result.history)
    return Retraining(
        candidate,
        seed,
        result.run_id,
        "FAILED" if result.diverged else "FINISHED",
        float("nan") if result.diverged else score,
        epoch,
        seconds,
        result.model,
        [row["epoch_seconds"] for row in result.history if "epoch_seconds" in row],
    )


def kept(client: MlflowClient, candidate: Candidate, seed: int, run) -> Retraining:
    """A retraining (or refit) finished by a cut-off session, from its MLflow run (its model stays there);
    its duration and epoch times, which budget the runs still to come, as the run recorded them."""
    m, info = run.data.metrics, run.info
    seconds = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else 0.0
    timed = [x.value for x in client.get_metric_history(info.run_id, "epoch_seconds")]
    return Retraining(
        candidate, seed, info.run_id, "FINISHED", m["best_val_accuracy"], int(m["best_epoch"]), seconds, None, timed
    )


def reusable(client: MlflowClient, experiment_id: str, best_run_id: str) -> dict[tuple[str, str, int], Any]:
    """Finished retrainings and refits of a cut-off `best` run, by (kind, trial id, seed). Runs left
    RUNNING, and finished ones that lack what keeping them needs (an older version's, a damaged store's),
    end KILLED: the resumed `best` trains them again, and the report does not count them beside their
    replacements."""
    done = {}
    for run in store.trial_runs(client, experiment_id, best_run_id):
        kind = run.data.tags.get("lenet_sweep.kind", "retrain")
        what = "refit" if kind == "refit" else "retraining"
        if run.info.status == "RUNNING":
            end_killed(
                client,
                run.info.run_id,
                f"cut off: `best` stopped before this {what} ended; the resumed `best` trains it again",
            )
        elif run.info.status == "FINISHED":
            lacks = _lacks(client, run)
            if lacks:
                end_killed(client, run.info.run_id, f"no {lacks} recorded: the resumed `best` trains it again")
            else:
                done[(kind, run.data.tags["lenet_sweep.trial_id"], int(run.data.tags["lenet_sweep.seed"]))] = run
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
    """A retraining's model from its MLflow run, loaded without running code from it, and compiled with the
    loss and metric every run is scored with (the test evaluation reads them; it never trains again)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model = export.load(client.download_artifacts(run_id, "model", tmp)).model
        except Exception as err:  # noqa: BLE001  absent or damaged: the run must be trained again
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(
                f"the model of retraining run {run_id} cannot be read ({reason}): if it is gone or damaged, "
                f"delete that run (mlflow runs delete --run-id {run_id}) and rerun best, which trains it again"
            ) from None
    # as trial.compile_model: from_logits=False, the study's setting, so test_loss is Keras' val_loss
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    return model


# ---- racing over seeds and the choice ---------------------------------------------------------


def t_interval(scores: Sequence[float], confidence: float, min_std: float = 0.0) -> tuple[float, float]:
    """Two-sided t confidence interval of the mean of the finite `scores`, their spread taken as at least
    `min_std` (two equal scores are no certainty); unbounded (-inf, inf) with fewer than two, where nothing
    bounds the spread yet."""
    ok = np.asarray(scores, dtype=float)
    ok = ok[np.isfinite(ok)]
    if len(ok) < 2:
        return -math.inf, math.inf
    spread = max(float(np.std(ok, ddof=1)), min_std)
    half = float(stats.t.ppf((1 + confidence) / 2, len(ok) - 1) * spread / np.sqrt(len(ok)))
    mean = float(np.mean(ok))
    return mean - half, mean + half


@dataclass
class Summary:
    """A candidate over its seeds, and where racing left it."""

    candidate: Candidate
    runs: list[Retraining] = field(default_factory=list)
    stopped: str = ""  # why it trains no more seeds: "winner (...)", "clearly behind: ...", "max seeds", ...
    out: bool = False  # out of the choice: clearly behind the leader, or diverged where others did not
    min_std: float = 0.0  # best.min_std: the smallest seed-to-seed spread its interval assumes

    @property
    def scores(self) -> np.ndarray:
        return np.array([r.val_accuracy for r in self.runs], dtype=float)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def scored(self) -> int:
        """Seeds with a validation score (not diverged)."""
        return int(np.isfinite(self.scores).sum())

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

    def interval(self, confidence: float) -> tuple[float, float]:
        return t_interval(self.scores, confidence, self.min_std)

    def lcb(self, confidence: float) -> float:
        """The lower confidence bound of its mean validation accuracy: what racing and the choice rank by."""
        return self.interval(confidence)[0]


def standing(summary: Summary, confidence: float) -> tuple:
    """Sort key, best first: no diverged seed, then the highest lower bound, the highest mean, the sweep's rank.

    A lower bound rewards a mean that holds over seeds: one lucky seed beside a poor one ranks below two
    steady seeds of the same mean. Test plays no part."""
    mean = summary.mean if np.isfinite(summary.mean) else -math.inf
    return summary.failed > 0, -summary.lcb(confidence), -mean, summary.candidate.rank


@dataclass
class RaceRound:
    leader: Summary
    stopped: dict[int, str]  # sweep rank -> why that candidate is out of the race (and of the choice)
    contenders: list[Summary]  # still in the race, the leader among them, in the order given
    more: list[Summary]  # the contenders below max_seeds: each trains one more seed


def race_round(racing: Sequence[Summary], confidence: float, max_seeds: int) -> RaceRound:
    """One round of racing among the candidates still in it: a pure function of their scores.

    While some candidate has a scored seed and none diverged, one with a diverged seed is out: it loses to
    any without (as it always has in `choose`). The leader has the highest lower bound (`standing`); a
    candidate whose upper bound is below the leader's lower bound is clearly behind. The others contend:
    those below `max_seeds` train one more seed each, the leader too, so it stays comparable.
    """
    clean = any(s.scored and not s.failed for s in racing)
    stopped = {
        s.candidate.rank: f"{s.failed} seed(s) diverged: loses to any candidate without"
        for s in racing
        if clean and s.failed
    }
    left = [s for s in racing if s.candidate.rank not in stopped]
    leader = min(left, key=lambda s: standing(s, confidence))
    bar = leader.lcb(confidence)
    for s in left:
        upper = s.interval(confidence)[1]
        if s is not leader and upper < bar:
            stopped[s.candidate.rank] = f"clearly behind: upper bound {upper:.4f} < leader's lower bound {bar:.4f}"
    contenders = [s for s in left if s.candidate.rank not in stopped]
    return RaceRound(leader, stopped, contenders, [s for s in contenders if len(s.runs) < max_seeds])


def race(
    summaries: Sequence[Summary],
    train_next: Callable[[Summary], str],
    confidence: float,
    min_seeds: int,
    max_seeds: int,
    print_fn: Optional[Progress] = None,
) -> None:
    """Race the candidates over seeds, recording on each why it stopped (`stopped`) and whether it is out of
    the choice (`out`).

    `train_next(s)` trains `s`'s next seed and returns '', or, leaving it untrained, why (the budget): that
    candidate trains no more seeds but stays in the race with those it has. Every candidate first trains
    `min_seeds` seeds, seed by seed across the candidates (a tight budget then gives each its first seed
    before any its second); then `race_round` after `race_round`, until one contender is left or every
    contender has `max_seeds` or is held by the budget. Given the scores, the decisions are the same every
    time: a resumed `best` replays them from the retrainings it keeps.
    """
    say = print_fn or (lambda _: None)
    held: dict[int, str] = {}

    def train(s: Summary) -> None:
        if s.candidate.rank not in held:
            why = train_next(s)
            if why:
                held[s.candidate.rank] = why

    for _ in range(min_seeds):
        for s in summaries:
            train(s)
    racing = list(summaries)
    while True:
        step = race_round(racing, confidence, max_seeds)
        for s in racing:
            if s.candidate.rank in step.stopped:
                s.stopped, s.out = step.stopped[s.candidate.rank], True
                say(f"trial {s.candidate.trial_id} (sweep rank {s.candidate.rank}) stops: {s.stopped}")
        racing = step.contenders
        more = [s for s in step.more if s.candidate.rank not in held]
        if len(racing) == 1 or not more:
            break
        for s in more:
            train(s)
    for s in racing:
        s.stopped = "only contender left" if len(racing) == 1 else held.get(s.candidate.rank, "max seeds")


def choose(summaries: Sequence[Summary], confidence: float) -> tuple[Summary, Retraining]:
    """The winner among the candidates racing left in the choice: the best `standing` (no diverged seed,
    the highest lower bound of the mean validation accuracy, the highest mean, the sweep's rank); and its
    best racing model, its seed with the highest validation accuracy. Test plays no part."""
    usable = [s for s in summaries if not s.out and np.isfinite(s.mean)]
    if not usable:
        raise UserError(
            "no candidate has a finished retraining: every retraining failed (see the FAILED runs' "
            "failure_reason: check the sweep's configurations), or best.budget_minutes allowed none"
        )
    winner = min(usable, key=lambda s: standing(s, confidence))
    run = max((r for r in winner.runs if r.status == "FINISHED"), key=lambda r: (r.val_accuracy, -r.seed))
    return winner, run


def _num(value: float) -> str:
    return f"{value:.4f}" if not math.isnan(value) else "–"


def format_summaries(summaries: Sequence[Summary], winner: Summary, confidence: float) -> str:
    """The racing table: per candidate its sweep rank, trial, seeds, mean validation accuracy, interval,
    lower bound, why it stopped and hyperparameters; * marks the winner."""
    level = f"{confidence:.0%} interval"
    seeds = [",".join(map(str, s.seeds)) + (f" ({s.failed} failed)" if s.failed else "") for s in summaries]
    wide = max(len("seeds"), *map(len, seeds)), max(len("stopped"), *(len(s.stopped) for s in summaries))
    lines = [
        f"  {'rank':>4}  {'trial':>5}  {'seeds':<{wide[0]}}  {'mean':>6}  {level:>18}  {'LCB':>7}  "
        f"{'stopped':<{wide[1]}}  hyperparameters"
    ]
    for s, listed in zip(summaries, seeds):
        lo, hi = s.interval(confidence)
        lines.append(
            f"{'*' if s is winner else ' '} {s.candidate.rank:>4}  {s.candidate.trial_id:>5}  {listed:<{wide[0]}}  "
            f"{_num(s.mean):>6}  {f'[{_num(lo)}, {_num(hi)}]':>18}  {_num(lo):>7}  {s.stopped:<{wide[1]}}  "
            f"{describe(s.candidate.values)}"
        )
    return "\n".join(lines)


# ---- the budget and the refit -------------------------------------------------------------------


def retraining_estimate(summary: Summary, summaries: Sequence[Summary]) -> Optional[float]:
    """Seconds the next retraining of `summary` should take: the median of its own so far, else of every
    candidate's, else None (the very first: nothing to go by, so it is started)."""
    own = [r.seconds for r in summary.runs if r.seconds > 0]
    every = [r.seconds for s in summaries for r in s.runs if r.seconds > 0]
    pool = own or every
    return float(np.median(pool)) if pool else None


def over_budget(estimate: Optional[float], elapsed: float, allowed: float) -> str:
    """Why a retraining expected to take `estimate` seconds is not started `elapsed` seconds into a share
    of `allowed` seconds ('' if it fits, or if there is no estimate)."""
    left = allowed - elapsed
    if estimate is None or estimate <= left:
        return ""
    return f"budget: its next seed would take ~{estimate:.0f}s, {max(left, 0.0):.0f}s of racing's {allowed:.0f}s left"


# Bare train steps timed per input size to scale racing's seconds per epoch to the refit's (a few seconds).
PROBE_STEPS = 16


def step_ratio(cfg: DictConfig, race: PreparedData, race_size: int, final: PreparedData, final_size: int) -> float:
    """How many times longer a training step of `cfg`'s model takes per image at `final_size` than at
    `race_size`, timed on this machine (the bench's bare train step on each size's first training batches,
    the faster of two tries). Measured rather than assumed: scaling by pixels (4x from 32 to 64 px) priced
    the refit's epochs at twice what they took, as convolutions on small maps and the per-step overhead do
    not grow with the area."""
    from lenet_sweep.bench import time_bare_step

    seconds = []
    for size, prepared in ((race_size, race), (final_size, final)):
        sized = OmegaConf.merge(cfg, {"model": {"input_size": size}})
        model = compile_model(sized, len(prepared.splits.classes))
        timed = time_bare_step(model, prepared.decoded["train"], cfg.train.batch_size, PROBE_STEPS, repeats=2)
        seconds.append(1.0 / timed["bare_step_images_per_second"])
        del model
    return seconds[1] / seconds[0]


def epoch_estimate(runs: Sequence[Retraining], ratio: float, margin: float) -> tuple[float, float]:
    """(seconds per epoch, seconds per run besides its epochs) the refit should take: the median epoch of
    the racing `runs` times `ratio` (`step_ratio`), and their median time outside epochs (building, logging,
    saving), both times `margin`; nan when no epoch was timed."""
    timed = [e for r in runs for e in r.epoch_seconds if math.isfinite(e)]
    if not timed:
        return math.nan, math.nan
    besides = [max(r.seconds - sum(r.epoch_seconds), 0.0) for r in runs if r.epoch_seconds and r.seconds > 0]
    return (
        margin * float(np.median(timed)) * ratio,
        margin * (float(np.median(besides)) if besides else 0.0),
    )


def refit_epochs(
    epochs: int, min_epochs: int, seconds_left: float, per_epoch: float, besides: float
) -> tuple[int, str]:
    """The refit's epochs and why: `epochs` when the `seconds_left` afford them at `per_epoch` seconds
    each (plus `besides` once), else as many as they afford, but never fewer than `min_epochs`: a refit
    too short to be worth exporting would waste what it spends, so it then trains min_epochs over budget,
    and says by about how much."""
    if not math.isfinite(per_epoch) or per_epoch <= 0:
        return (
            epochs,
            f"{epochs} epochs (best.final.epochs): no racing epoch was timed to check them against the budget",
        )
    affordable = math.floor((seconds_left - besides) / per_epoch)
    cost = f"~{per_epoch:.1f}s each, {max(seconds_left, 0.0):.0f}s of the budget left"
    if affordable >= epochs:
        return epochs, f"{epochs} epochs (best.final.epochs): {cost}"
    if affordable >= min_epochs:
        return affordable, f"{affordable} of best.final.epochs={epochs}: {cost} affords no more"
    over = besides + min_epochs * per_epoch - seconds_left
    return min_epochs, (
        f"{min_epochs} epochs (best.final.min_epochs): {cost} affords {max(affordable, 0)}; "
        f"the budget will be exceeded by ~{over:.0f}s"
    )


@dataclass
class Refit:
    """The winner trained once more at the final fidelity."""

    run: Retraining  # its run; val_accuracy at its best epoch, nan if it diverged
    input_size: int
    epochs: int
    why: str  # how its epochs were chosen
    kept: bool = False  # finished by a cut-off session (its model stays in MLflow)


def refit_holds(refit_val_accuracy: float, winner: Summary, confidence: float) -> bool:
    """Whether the refit is exported: its best validation accuracy is at least the winner's racing mean
    minus its interval's half-width (the lower bound), so the final fidelity did not hurt."""
    return math.isfinite(refit_val_accuracy) and refit_val_accuracy >= winner.lcb(confidence)


def format_budget(spent: Mapping[str, float]) -> str:
    """How the budget was spent, as one line."""
    total, budget = spent["total"], spent["budget"]
    over = f"; over budget by {total - budget:.0f}s" if total > budget else ""
    return (
        f"budget: racing {spent['racing']:.0f}s, refit {spent['refit']:.0f}s, test+export "
        f"{spent['test_export']:.0f}s; total {total:.0f}s of {budget:.0f}s ({total / budget:.0%}){over}"
    )


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class BestResult:
    run_id: str
    summaries: list[Summary]
    winner: Summary
    exported: Retraining  # the refit's run, or the winner's best racing retraining if the refit fell short
    test_loss: float
    test_accuracy: float
    export_dir: Path
    model_version: Optional[str]
    resumed: bool
    seconds: float
    refit: Refit
    refit_exported: bool
    spent: dict[str, float]  # seconds: racing, refit, test_export, total, and the budget


def sweep_patience(params: Mapping[str, str]) -> Optional[int]:
    """The sweep's early-stopping patience from its parent run's params (None: it never stopped early)."""
    recorded = params.get("sweep.early_stopping_patience", "None")
    return None if recorded == "None" else int(recorded)


def run_best(cfg: DictConfig, overridden: Sequence[str] = (), print_fn: Optional[Progress] = None) -> BestResult:
    """Race, choose, refit, test once, export and register the winner of sweep `cfg.sweep.name`.

    `overridden`: the DATA_LOCATION keys the command line set (see `overridden_keys`).
    """
    started = time.perf_counter()  # best.budget_minutes counts from here
    say = print_fn or (lambda _: None)
    check(cfg)
    b, final = cfg.best, cfg.best.final
    min_seeds, max_seeds = (b.seeds, b.seeds) if b.seeds else (b.min_seeds, b.max_seeds)
    if min_seeds > max_seeds:
        raise UserError(
            f"best.min_seeds={b.min_seeds} is more than best.max_seeds={b.max_seeds}: every candidate trains "
            "min_seeds seeds before racing stops any, and max_seeds at most"
        )
    if final.min_epochs > final.epochs:
        raise UserError(
            f"best.final.min_epochs={final.min_epochs} is more than best.final.epochs={final.epochs}: the refit "
            "trains final.epochs when the budget affords them, and never fewer than min_epochs"
        )
    budget = 60.0 * b.budget_minutes
    experiment_id = open_store(cfg.mlflow, create=False)
    client = MlflowClient(mlflow.get_tracking_uri())
    parent = store.find_sweep(client, experiment_id, cfg.sweep.name, cfg.mlflow.experiment)
    if parent.info.status == "RUNNING":
        say(f"note: sweep {cfg.sweep.name!r} is still RUNNING (or was cut off): ranking the trials it has")
    chosen = candidates(client, experiment_id, parent, b.top_k)
    # Racing on fixed epochs trains them all: a cosine rate's validation loss swings before it anneals, and
    # the sweep's early stopping (made for its own, longer rounds) ended racing runs after 3-4 of 10 epochs,
    # widening their candidates' intervals with scores of a half-trained model. The best epoch is kept anyway.
    patience = None if b.race_epochs else sweep_patience(parent.data.params)
    settings = {
        "sweep.run_id": parent.info.run_id,
        "best.top_k": b.top_k,
        "best.seeds": b.seeds,
        "best.first_seed": b.first_seed,
        "best.candidates": ",".join(c.trial_id for c in chosen),
        "best.overrides": ",".join(f"{k}={OmegaConf.select(cfg, k)}" for k in overridden),
    }
    # Added with racing: a cut-off run of an earlier version did not record these, and the retrainings it
    # finished are the same whatever they are, so one it lacks does not stop it from being resumed.
    race_settings = {
        "best.min_seeds": b.min_seeds,
        "best.max_seeds": b.max_seeds,
        "best.confidence": b.confidence,
        "best.budget_minutes": b.budget_minutes,
        "best.race_epochs": b.race_epochs,
        # racing's early stopping (none on fixed race epochs): a cut-off run that raced with another one is
        # not resumed, as its kept seeds and the new ones would not be trained alike
        "best.early_stopping_patience": patience,
        **{f"best.final.{k}": v for k, v in final.items()},
    }
    latest = store.latest_best(client, experiment_id, parent.info.run_id)
    recorded = latest.data.params if latest is not None else {}
    resumable = (
        latest is not None
        and latest.info.status != "FINISHED"
        and all(recorded.get(k) == str(v) for k, v in settings.items())
        and all(recorded.get(k, str(v)) == str(v) for k, v in race_settings.items())
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
        f"sweep {cfg.sweep.name!r} (MLflow run {parent.info.run_id}): racing its {len(chosen)} best "
        f"configuration(s) by validation accuracy over seeds {b.first_seed}, {b.first_seed + 1}, ... "
        f"({min_seeds} to {max_seeds} each, {b.confidence:.0%} intervals), then refitting the winner at "
        f"{f'{final.input_size} px' if final.input_size else 'its own input size'}; budget {b.budget_minutes:g} min"
        + (f"; resuming best run {previous.info.run_id}" if previous else "")
    )

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
        logged = previous.data.params if previous else {}
        wanted = settings | race_settings | {"best.early_stopping_patience": patience}
        mlflow.log_params({k: v for k, v in wanted.items() if k not in logged})
        summaries = [Summary(c, min_std=b.min_std) for c in chosen]
        racing_seconds = budget * (1 - final.share)

        def train_next(summary: Summary) -> str:
            """Train the next seed of `summary` ('' once done), or say why not (the budget)."""
            candidate, seed = summary.candidate, b.first_seed + len(summary.runs)
            name = f"trial {candidate.trial_id} (sweep rank {candidate.rank}) seed {seed}"
            if ("retrain", candidate.trial_id, seed) in done:  # replayed without the budget: it costs nothing
                summary.runs.append(kept(client, candidate, seed, done[("retrain", candidate.trial_id, seed)]))
                say(f"{name}: val_accuracy {summary.runs[-1].val_accuracy:.4f} (kept from the cut-off session)")
                return ""
            estimate = retraining_estimate(summary, summaries)
            why = over_budget(estimate, time.perf_counter() - started, racing_seconds)
            if why:
                say(f"{name}: not trained ({why})")
                return why
            trial_cfg = retraining_config(candidate, cfg, overridden, seed)
            if b.race_epochs:
                # The same budget for every candidate: a trial's own epochs are the Hyperband round it
                # scored in (3, 9 or 25), not a property of its configuration.
                trial_cfg.train.epochs = b.race_epochs
            say(f"{name}: training up to {trial_cfg.train.epochs} epochs")
            data = trial_data.setdefault(
                OmegaConf.to_yaml(trial_cfg.data), DataBySize(trial_cfg.data, trial_cfg.seed, say)
            )
            r = retrain(
                candidate, trial_cfg, data.at(trial_cfg.model.input_size), experiment_id, best_id, patience, print_fn
            )
            summary.runs.append(r)
            outcome = (
                f"val_accuracy {r.val_accuracy:.4f} at epoch {r.best_epoch}"
                if r.status == "FINISHED"
                else "FAILED (diverged)"
            )
            say(f"{name}: {outcome}, {r.seconds:.0f}s, elapsed {clock(time.perf_counter() - started)}")
            return ""

        race(summaries, train_next, b.confidence, min_seeds, max_seeds, say)
        winner, chosen_run = choose(summaries, b.confidence)
        winner.stopped = f"winner ({winner.stopped})"
        say(
            "candidates raced over seeds; the winner (*) has the highest lower bound of its mean validation "
            "accuracy:\n" + format_summaries(summaries, winner, b.confidence)
        )
        _log_choice(summaries, winner, chosen_run, b.confidence)
        raced = time.perf_counter()

        # The refit: the winner's config at the final fidelity, train split only, validated on val.
        refit_cfg = retraining_config(winner.candidate, cfg, overridden, b.first_seed)
        # Never smaller than the winner's own input (a sweep of the study's 128 px models is not refit down).
        size = max(int(final.input_size or 0), int(refit_cfg.model.input_size))
        refit_cfg.model.input_size = size
        name = f"refit of trial {winner.candidate.trial_id} (seed {b.first_seed}) at {size}x{size} px"
        earlier = done.get(("refit", winner.candidate.trial_id, b.first_seed))
        if (
            earlier is not None
            and earlier.data.params.get("model.input_size") == str(size)
            and earlier.data.params.get("train.epochs", "").isdigit()
        ):
            fitted = Refit(
                kept(client, winner.candidate, b.first_seed, earlier),
                size,
                int(earlier.data.params["train.epochs"]),
                earlier.data.tags.get("lenet_sweep.refit_epochs", ""),
                kept=True,
            )
            say(f"{name}: val_accuracy {fitted.run.val_accuracy:.4f} (kept from the cut-off session)")
        else:
            race_size = winner.runs[0].input_size if winner.runs else int(winner.candidate.config.model.input_size)
            # Racing's epochs at the winner's size (its own, else any candidate's at that size) scaled by
            # the measured step ratio (1 at the same size); the racing arrays are those racing decoded, or,
            # for a resumed run whose racing was all kept, that size decoded again (from the decode cache,
            # when it is on) to time it.
            timed = [r for r in winner.runs if r.epoch_seconds] or [
                r for s in summaries for r in s.runs if r.epoch_seconds and r.input_size == race_size
            ]
            probe = timed and race_size != size
            holder = trial_data.get(OmegaConf.to_yaml(refit_cfg.data)) or DataBySize(
                refit_cfg.data, refit_cfg.seed, say
            )
            racing_data = holder.at(race_size) if probe else None
            # Nothing trains at the racing sizes any more: their arrays go before the final size is decoded.
            trial_data.clear()
            del holder
            prepared = prepare_data(refit_cfg.data, size, refit_cfg.seed, say, splits=("train", "val"))
            ratio = 1.0 if timed and not probe else math.nan
            if probe:
                ratio = step_ratio(refit_cfg, racing_data, race_size, prepared, size)
            del racing_data
            per_epoch, besides = epoch_estimate(timed, ratio, final.margin)
            # (final.reserve_seconds kept for the test evaluation, export and registration after it)
            left = budget - (time.perf_counter() - started) - final.reserve_seconds
            epochs, why = refit_epochs(final.epochs, final.min_epochs, left, per_epoch, besides)
            refit_cfg.train.epochs = epochs
            say(f"{name}: {why}")
            run = retrain(winner.candidate, refit_cfg, prepared, experiment_id, best_id, None, print_fn, refit_why=why)
            fitted = Refit(run, size, epochs, why)
            del prepared
        refit_cfg.train.epochs = fitted.epochs
        refitted = time.perf_counter()
        holds = refit_holds(fitted.run.val_accuracy, winner, b.confidence)
        bound = winner.lcb(b.confidence)
        if holds:
            say(
                f"{name}: val_accuracy {fitted.run.val_accuracy:.4f} at epoch {fitted.run.best_epoch} of "
                f"{fitted.epochs}, {fitted.run.seconds:.0f}s; at least the winner's racing lower bound "
                f"{bound:.4f}: the refit is exported"
            )
            export_cfg, exported = refit_cfg, fitted.run
        else:
            shortfall = (
                f"its best validation accuracy {fitted.run.val_accuracy:.4f} is below the winner's racing mean "
                f"minus its half-width ({bound:.4f})"
                if math.isfinite(fitted.run.val_accuracy)
                else "it diverged"
            )
            say(
                f"warning: {name}: {shortfall}; exporting the best racing model instead (seed {chosen_run.seed}, "
                f"{chosen_run.input_size}x{chosen_run.input_size} px, the sweep's fidelity)"
            )
            export_cfg, exported = retraining_config(winner.candidate, cfg, overridden, chosen_run.seed), chosen_run
            if b.race_epochs:  # as it was trained (train_next)
                export_cfg.train.epochs = b.race_epochs
        _log_refit(fitted, exported, holds)

        # The test split, once, for the exported model only, at its input size.
        model = exported.model or load_run_model(client, exported.run_id)
        test = prepare_data(export_cfg.data, export_cfg.model.input_size, export_cfg.seed, say, splits=("test",))
        split = test.decoded["test"]
        tested = evaluate_on_test(model, split, export_cfg.train.batch_size, len(test.splits.classes))
        test_loss, test_accuracy = tested.loss, tested.accuracy
        mlflow.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy})
        what = (
            f"the refit at {size}x{size} px, {fitted.epochs} epochs"
            if holds
            else f"racing seed {chosen_run.seed} at {chosen_run.input_size}x{chosen_run.input_size} px"
        )
        title = f"test confusion: trial {winner.candidate.trial_id}, {what}"
        log_confusion(tested.confusion, test.splits.classes, test.names, title)
        _log_predictions(tested.scores, split, test.splits.classes)
        lo, hi = winner.interval(b.confidence)
        say(
            f"winner: trial {winner.candidate.trial_id} (sweep rank {winner.candidate.rank}), "
            f"val_accuracy {winner.mean:.4f} ± {winner.std:.4f} over {len(winner.runs)} seed(s) "
            f"({b.confidence:.0%} interval [{lo:.4f}, {hi:.4f}]); exported {what} (val_accuracy "
            f"{exported.val_accuracy:.4f}); test_accuracy {test_accuracy:.4f} on {len(split.labels)} images "
            "(evaluated once)"
        )

        export_yaml = config_yaml(export_cfg)
        prep = export.preprocessing(
            export_cfg.model.input_size, export_cfg.data.interpolation, export_cfg.data.antialias
        )
        card = model_card(
            cfg,
            export_cfg,
            test,
            summaries,
            winner,
            chosen_run,
            fitted,
            holds,
            test_accuracy,
            test_loss,
            parent.info.run_id,
            best_id,
            patience,
        )
        export.write(target, model, export_yaml, export.labels(test.splits.classes, test.names), prep, card)
        # Its size and speed as exported (model.keras loaded back, timed on this CPU), added to its card.
        cost = export_cost(target)
        mlflow.log_text(add_to_card(target, cost), export.CARD)
        mlflow.log_metrics(cost.metrics())
        mlflow.set_tag("lenet_sweep.export_dir", str(target))
        say(f"exported to {target}")
        version = previous.data.tags.get("lenet_sweep.registered_version") if previous else None
        if version is None:  # (a resumed run that registered already does not register twice)
            version = register(
                cfg,
                target,
                best_id,
                winner,
                test_accuracy,
                {"val_accuracy_lcb": f"{lo:.4f}", "exported": what},
            )
            if version:
                mlflow.set_tag("lenet_sweep.registered_version", version)
        if version:
            say(
                f"registered as version {version} of {cfg.export.registered_model!r}"
                + (f" (alias {cfg.export.alias!r})" if cfg.export.alias else "")
            )
        if previous and "failure_reason" in previous.data.tags:  # from the session this one resumed
            client.delete_tag(best_id, "failure_reason")
        ended = time.perf_counter()
        spent = {
            "racing": raced - started,
            "refit": refitted - raced,
            "test_export": ended - refitted,
            "total": ended - started,
            "budget": budget,
        }
        mlflow.log_metrics({f"{k}_seconds": v for k, v in spent.items()})
    return BestResult(
        best_id,
        summaries,
        winner,
        exported,
        test_loss,
        test_accuracy,
        target,
        version,
        previous is not None,
        spent["total"],
        fitted,
        holds,
        spent,
    )


def _log_choice(summaries: Sequence[Summary], winner: Summary, chosen_run: Retraining, confidence: float) -> None:
    """best/candidates.csv (the racing table), the winner's scores and which retraining is its best."""
    rows = []
    for s in summaries:
        lo, hi = s.interval(confidence)
        rows.append(
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
                " ".join(map(str, s.seeds)),
                lo,
                hi,
                s.lcb(confidence),
                s.stopped,
            ]
        )
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
                "seed_list",
                "val_accuracy_lo",  # the t interval at best.confidence: -inf/inf with fewer than two seeds
                "val_accuracy_hi",
                "val_accuracy_lcb",
                "stopped",
            ],
        ),
        "best/candidates.csv",
    )
    mlflow.log_metrics(
        {
            "val_accuracy_mean": winner.mean,
            "val_accuracy_std": winner.std,
            # (a bound is unbounded with one seed: MLflow holds no infinities, so none is logged then)
            **({"val_accuracy_lcb": winner.lcb(confidence)} if math.isfinite(winner.lcb(confidence)) else {}),
        }
    )
    mlflow.set_tags(
        {
            "lenet_sweep.winner_trial": winner.candidate.trial_id,
            "lenet_sweep.winner_run_id": chosen_run.run_id,
            "lenet_sweep.winner_seed": chosen_run.seed,
        }
    )


def _log_refit(fitted: Refit, exported: Retraining, holds: bool) -> None:
    """The refit's fidelity, score and time, and which model is exported."""
    mlflow.log_metrics(
        {
            "refit_input_size": fitted.input_size,
            "refit_epochs": fitted.epochs,
            "refit_val_accuracy": fitted.run.val_accuracy,
            "refit_seconds": fitted.run.seconds,
            "exported_val_accuracy": exported.val_accuracy,
        }
    )
    mlflow.set_tags(
        {
            "lenet_sweep.refit_run_id": fitted.run.run_id,
            "lenet_sweep.exported": "refit" if holds else "racing",
            "lenet_sweep.exported_run_id": exported.run_id,
            "lenet_sweep.exported_seed": exported.seed,
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


def register(
    cfg: DictConfig,
    folder: Path,
    best_run_id: str,
    winner: Summary,
    test_accuracy: float,
    more: Optional[Mapping[str, str]] = None,
) -> Optional[str]:
    """Log the export in `folder` as an MLflow pyfunc model (lenet_sweep.serving: image files or pixels in;
    nothing in the artifact runs as code) and register a new version; `more`: tags beside the scores."""
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
        **(more or {}),
    }.items():
        client.set_model_version_tag(name, version, key, value)
    if cfg.export.alias:
        client.set_registered_model_alias(name, cfg.export.alias, version)
    return version


# ---- the model card ----------------------------------------------------------------------------


def model_card(
    cfg: DictConfig,
    export_cfg: DictConfig,
    test: PreparedData,
    summaries: Sequence[Summary],
    winner: Summary,
    chosen_run: Retraining,
    fitted: Refit,
    holds: bool,
    test_accuracy: float,
    test_loss: float,
    sweep_run_id: str,
    best_run_id: str,
    patience: Optional[int],
) -> str:
    """MODEL_CARD.md: every number in it comes from this run."""
    b = cfg.best
    exported = fitted.run if holds else chosen_run
    stopping = f", stopped early after {patience} epochs without a lower validation loss" if patience else ""
    training = (
        f"{fitted.epochs} epochs at the final fidelity, no early stopping"
        if holds
        else f"up to {export_cfg.train.epochs} epochs{stopping}"
    )
    counts = {split: len(files.paths) for split, files in test.splits.files.items()}
    m, o = export_cfg.model, export_cfg.optimizer
    level = f"{b.confidence:.0%}"
    rows = ""
    for s in summaries:
        lo, hi = s.interval(b.confidence)
        failed = f" ({s.failed} failed)" if s.failed else ""
        rows += (
            f"| {s.candidate.rank} | {s.candidate.trial_id} | {s.candidate.sweep_val_accuracy:.4f} | "
            f"{', '.join(map(str, s.seeds))}{failed} | {_num(s.mean)} ± {s.std:.4f} | [{_num(lo)}, {_num(hi)}] | "
            f"{_num(lo)} | {'**' + s.stopped + '**' if s is winner else s.stopped} | "
            f"{describe(s.candidate.values)} |\n"
        )
    seeds = (
        f"exactly {b.seeds} seed(s) each (best.seeds)"
        if b.seeds
        else f"{b.min_seeds} seed(s) each, then one more per round for the contenders left, up to {b.max_seeds}"
    )
    lo, hi = winner.interval(b.confidence)
    sweep_size = chosen_run.input_size
    verdict = (
        "The refit is the exported model."
        if holds
        else "**The refit is not exported**: "
        + ("its validation accuracy is below that bound" if math.isfinite(fitted.run.val_accuracy) else "it diverged")
        + f", so the winner's best racing model is exported instead: seed {chosen_run.seed}, at the sweep's "
        f"fidelity ({sweep_size}x{sweep_size} px), weights of its epoch {chosen_run.best_epoch}."
    )
    kept_note = " (trained by the session this run resumed)" if fitted.kept else ""
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
{o.learning_rate:.4g}; batch {export_cfg.train.batch_size}; {training}; \
weights of the best validation-accuracy epoch (epoch {exported.best_epoch}).
Trained with seed {exported.seed}. Config: `config.yaml`; preprocessing: `preprocessing.json`.

## Data and split
Classes ({len(test.names)}): {", ".join(f"{c} ({n})" for c, n in zip(test.splits.classes, test.names))}.
Data root `{test.splits.root}`: `train/` trains ({counts["train"]} files); `val/` is split \
{1 - export_cfg.data.test_fraction:.0%}:{export_cfg.data.test_fraction:.0%} per class with seed \
{export_cfg.data.split_seed} into validation ({counts["val"]} files) and test ({counts["test"]} files; \
{len(test.decoded["test"].labels)} decoded, {len(test.decoded["test"].skipped)} skipped).

## How it was chosen
The sweep's trials were ranked by validation accuracy; its {len(summaries)} best distinct configurations \
were raced over the same seeds ({b.first_seed}, {b.first_seed + 1}, ...): {seeds}. After each round a \
candidate whose {level} t interval of its mean validation accuracy lay wholly below the leader's lower \
bound stopped (clearly behind); racing ended when one contender was left, every contender had its \
seeds, or racing's share of the {b.budget_minutes:g}-minute budget ({1 - b.final.share:.0%}) was spent. \
The winner has the highest lower bound (a candidate with a diverged seed loses to any without). The test \
split played no part.

| sweep rank | trial | sweep val acc (1 seed) | seeds | val acc mean ± std | {level} interval | lower bound | \
stopped | hyperparameters |
|---|---|---|---|---|---|---|---|---|
{rows}
## Refit at the final fidelity
The winner's config trained once more with seed {fitted.run.seed} at {fitted.input_size}x{fitted.input_size} px \
(the sweep's: {sweep_size}x{sweep_size} px) for {fitted.epochs} epochs, on the train split only, validated on \
the validation split, with no early stopping and the best validation-accuracy epoch's weights kept (epoch \
{fitted.run.best_epoch}): validation accuracy **{_num(fitted.run.val_accuracy)}** in \
{fitted.run.seconds:.0f}s{kept_note}. Its epochs, from the budget: {fitted.why or "not recorded"}. The bar it \
had to clear, the winner's racing mean minus its half-width: {_num(lo)}. {verdict}

## Results
- Validation accuracy of the winner over racing: **{winner.mean:.4f} ± {winner.std:.4f}** over \
{len(winner.runs)} seed(s) ({level} interval [{_num(lo)}, {_num(hi)}]); the exported model: \
{exported.val_accuracy:.4f}.
- Test accuracy (evaluated once, on the exported model): **{test_accuracy:.4f}** (test loss {test_loss:.4f}).

| model | test accuracy |
|---|---|
{study}| {m.name}, this export | {test_accuracy:.4f} |

## Provenance
MLflow: sweep run `{sweep_run_id}`, best run `{best_run_id}`, exported run `{exported.run_id}` \
({"the refit" if holds else "a racing retraining"}), refit run `{fitted.run.run_id}`.
Packages: {", ".join(f"{k} {v}" for k, v in versions.items())}.

## Limits
Trained on {len(test.names)} classes only: any image is put in one of them, with no "none of these" answer.
{relu}"""


# ---- entry point -------------------------------------------------------------------------------


def run(cfg: DictConfig, overrides: Sequence[str]) -> BestResult:
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    result = run_best(cfg, overridden_keys(overrides), print)
    print(format_budget(result.spent))
    retrainings = sum(len(s.runs) for s in result.summaries)
    print(
        f"best: {len(result.summaries)} configuration(s), {retrainings} retraining(s) over seeds and a refit in "
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
