"""The sweep's wall-clock budget (`sweep.budget_minutes`): what a trial costs here, and which Hyperband
bracket fits the time left.

A slower machine gets fewer or shorter trials, not a longer sweep. The oracle (tuner.py's `Budgeted*Oracle`,
on the local tuner or on a distributed chief) times every trial on `budget_clock` and learns the epochs it
trained from its reported metrics; `estimate_cost` turns those into seconds of setup per trial plus seconds
per epoch, `trained_share` into the share of their epochs trials train (early stopping, pruning). Before a
Hyperband bracket starts, `choose_bracket` checks its whole plan (every round's trials, promoted trials
counting only their new epochs) against the time left; random and Bayesian search check each trial.
Nothing here trains or prints: the oracles call it, sweep.py reports what it recorded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from statistics import median
from typing import Any, Optional

import numpy as np
from scipy import stats

from lenet_sweep.cli import clock

EPOCHS_TRAINED = "epochs_trained"  # the trial's reported metric: epochs it trained (all executions), for the oracle
RECORDS_KEPT = 500  # ended trials' costs kept in the oracle's saved state, for the next invocation's first plans
RECORDS_FITTED = 200  # the latest trials the cost model is fitted to (its slope compares every pair)
SHARE_FLOOR = 0.5  # plans never count on trials training less than this share of their epochs


def budget_clock() -> float:
    """Seconds on the budget's clock; tests replace it to make time pass as they say."""
    return time.perf_counter()


# ---- what a trial costs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """What one trial costs on this machine, on one worker: `setup` seconds (data, build, MLflow, its first
    epoch's tracing) plus `per_epoch` seconds for each epoch it trains, which is `share` of the epochs it is
    given (early stopping and pruning end many trials early)."""

    setup: float
    per_epoch: float
    share: float = 1.0

    def of(self, epochs: float) -> float:
        """Seconds of a trial given `epochs`."""
        return self.setup + self.per_epoch * self.share * epochs


def estimate_cost(records: Sequence[tuple[float, float]]) -> Optional[Cost]:
    """The cost of a trial, fitted to ended trials' (epochs trained, wall seconds); None before any.

    The seconds per epoch are the median slope between pairs of trials of different lengths (Theil-Sen,
    scipy's: a few odd trials do not move it), the setup the median of what each trial took beyond its epochs.
    While all trials trained equally long the two cannot be told apart, and all counts per epoch (the longer
    trials Hyperband promotes later are then overestimated, never under). Last, both are scaled so the model
    adds up to the seconds the trials took: trial costs vary with their configuration, and the budget is
    spent by their sum, not by the typical one.
    """
    points = [(float(e), float(s)) for e, s in records if e > 0 and s >= 0]
    if not points:
        return None
    per_epoch = setup = 0.0
    if len({e for e, _ in points}) > 1:  # theilslopes needs two lengths
        with np.errstate(invalid="ignore"):  # its confidence interval (unused) is nan for a few points
            fit = stats.theilslopes([s for _, s in points], [e for e, _ in points], method="joint")
        per_epoch, setup = float(fit.slope), float(fit.intercept)  # intercept: median of s - slope * e
    if per_epoch > 0:
        setup = max(setup, 0.0)
    else:  # one length only, or noise: everything per epoch
        setup, per_epoch = 0.0, median(s / e for e, s in points)
    modelled = sum(setup + per_epoch * e for e, _ in points)
    scale = sum(s for _, s in points) / modelled if modelled > 0 else 1.0
    return Cost(setup * scale, per_epoch * scale)


def trained_share(records: Sequence[tuple[float, float]]) -> float:
    """The share of their epochs ended trials trained, from (epochs trained, epochs given), weighted by the
    epochs (so long trials, which stop early most, weigh most); never below `SHARE_FLOOR`, 1 before any."""
    given = sum(g for _, g in records)
    return min(max(sum(t for t, _ in records) / given, SHARE_FLOOR), 1.0) if given > 0 else 1.0


# ---- Hyperband brackets ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A Hyperband bracket as KerasTuner runs it, or its first rounds only: each round's trials and the epoch
    they train to (`tuner/epochs`); a round's trials go on from the previous round's best."""

    bracket: int  # KerasTuner's bracket number (its rounds: bracket + 1)
    sizes: tuple[int, ...]  # trials per round
    epochs: tuple[int, ...]  # epoch each round's trials reach

    @property
    def whole(self) -> bool:
        return len(self.sizes) == self.bracket + 1

    @property
    def trials(self) -> int:
        return sum(self.sizes)

    def new_epochs(self) -> list[int]:
        """Epochs each round's trials train themselves (promoted ones go on from the last round's epoch)."""
        return [e - (self.epochs[r - 1] if r else 0) for r, e in enumerate(self.epochs)]

    def epochs_trained(self, executions: int = 1) -> int:
        return executions * sum(n * e for n, e in zip(self.sizes, self.new_epochs()))

    def seconds(self, cost: Cost, workers: int = 1, executions: int = 1, done: Sequence[int] = ()) -> float:
        """Wall seconds of the plan's trials not yet started (`done[r]` of round r are) on `workers` workers:
        a round starts when the last one ends, and its trials run `workers` at a time."""
        left = [max(n - (done[r] if r < len(done) else 0), 0) for r, n in enumerate(self.sizes)]
        return sum(math.ceil(n / workers) * cost.of(e * executions) for n, e in zip(left, self.new_epochs()))

    def shortened(self, rounds: int) -> Plan:
        """The plan's first `rounds` rounds: fewer trials, the last ones shorter."""
        return Plan(self.bracket, self.sizes[:rounds], self.epochs[:rounds])

    def summary(self) -> str:
        """`describe`, and how much of its bracket it is: `bracket 1 (1 of 2 rounds): 3 trials to epoch 1`."""
        if self.whole:
            return self.describe()
        head, _, rest = self.describe().partition(": ")
        return f"{head} ({len(self.sizes)} of {self.bracket + 1} rounds): {rest}"

    def describe(self) -> str:
        """`bracket 2: 12+4+2 trials to epoch 3/9/25`."""
        sizes, epochs = "+".join(map(str, self.sizes)), "/".join(map(str, self.epochs))
        return f"bracket {self.bracket}: {sizes} trials to epoch {epochs}"


def hyperband_plans(oracle: Any) -> dict[int, Plan]:
    """Every bracket of a KerasTuner `HyperbandOracle`, whole, as its own `_get_size`/`_get_epochs` plan it."""
    return {
        b: Plan(
            b,
            tuple(oracle._get_size(b, r) for r in range(oracle._get_num_rounds(b))),
            tuple(oracle._get_epochs(b, r) for r in range(oracle._get_num_rounds(b))),
        )
        for b in range(oracle._get_num_brackets())
    }


def bracket_cycle(due: int, brackets: int) -> list[int]:
    """KerasTuner's order of brackets from `due` on: down to 0, then from the largest again."""
    return [(due - i) % brackets for i in range(brackets)]


def choose_bracket(
    plans: Mapping[int, Plan], due: int, fits: Callable[[Plan], bool]
) -> tuple[Optional[Plan], list[int]]:
    """The bracket to start when bracket `due` is next in KerasTuner's cycle: (its plan or None if nothing
    fits, the brackets passed over).

    Whole brackets first, in the cycle's order from `due` (their best trials reach max_epochs); then with the
    last round dropped (fewer trials, the longest ones shorter), then two, ... A bracket is never cut short
    once started: it is planned to fit before its first trial.
    """
    order = bracket_cycle(due, len(plans))
    for dropped in range(len(plans)):
        for i, b in enumerate(order):
            rounds = b + 1 - dropped
            if rounds >= 1 and fits(plans[b].shortened(rounds)):
                return plans[b].shortened(rounds), order[:i]
    return None, order


def plan_bracket(
    max_epochs: int,
    factor: int,
    due: int,
    cost: Cost,
    seconds_left: float,
    workers: int = 1,
    executions: int = 1,
) -> tuple[Optional[Plan], list[int]]:
    """`choose_bracket` for KerasTuner's Hyperband(max_epochs, factor) when `seconds_left` remain."""
    from keras_tuner.src.tuners.hyperband import HyperbandOracle

    plans = hyperband_plans(HyperbandOracle(objective="val_accuracy", max_epochs=max_epochs, factor=factor, seed=1))
    return choose_bracket(plans, due, lambda p: p.seconds(cost, workers, executions) <= seconds_left)


# ---- the budget of one invocation --------------------------------------------------------------


@dataclass
class Budget:
    """`sweep.budget_minutes` of this invocation (a resumed sweep gets a new one), and what it went on.

    Plans (a bracket, a random trial) must end by `minutes` less `margin` of it; no trial starts after `minutes`
    (the hard end). The oracle calls `begin`/`end` around every trial and logs its bracket decisions here.
    """

    minutes: float
    margin: float = 0.05  # share of `minutes` plans keep free (estimates are estimates; the summary at the end)
    executions: int = 1  # trainings per trial (tuner.executions_per_trial)
    epochs_of: Callable[[Mapping[str, Any]], int] = lambda values: 1  # a random/Bayesian trial's epochs
    say: Optional[Callable[[str], None]] = None
    started: float = field(default_factory=lambda: budget_clock())
    search_started: Optional[float] = None
    ended: Optional[float] = None
    records: list[dict[str, Any]] = field(default_factory=list)  # this invocation's ended trials
    earlier: list[dict[str, Any]] = field(default_factory=list)  # earlier invocations' (the oracle's saved state)
    # trial id -> (start, planned epochs, the tuner (worker) that holds it)
    running: dict[str, tuple[float, float, Optional[str]]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)  # Hyperband brackets this invocation started
    skipped: list[int] = field(default_factory=list)  # brackets it passed over: they did not fit
    stopped_because: str = ""  # why the budget ended the search ('' if it did not)

    @property
    def seconds(self) -> float:
        return 60.0 * self.minutes

    def elapsed(self) -> float:
        return budget_clock() - self.started

    def over(self) -> bool:
        """The hard end: no trial starts any more."""
        return self.elapsed() >= self.seconds

    def left(self) -> float:
        """Seconds plans may still use: to the budget's end less the margin."""
        return self.seconds * (1.0 - self.margin) - self.elapsed()

    def cost(self) -> Optional[Cost]:
        """The cost model from the latest `RECORDS_FITTED` trials, earlier invocations' (the oracle's saved
        state) then this one's: a resumed sweep's first timed trial adds to what came before instead of
        replacing it, and its own trials push the oldest out as they end."""
        timed = [r for r in [*self.earlier, *self.records] if r.get("epochs") is not None][-RECORDS_FITTED:]
        cost = estimate_cost([(r["epochs"], r["seconds"]) for r in timed])
        share = trained_share([(r["epochs"], r["planned"]) for r in timed if r.get("planned")])
        return replace(cost, share=share) if cost else None

    def planned_epochs(self, values: Mapping[str, Any]) -> float:
        """Epochs a trial with hyperparameter `values` trains, all executions: Hyperband's new epochs, else
        `epochs_of(values)`."""
        if "tuner/epochs" in values:
            return self.executions * (int(values["tuner/epochs"]) - int(values.get("tuner/initial_epoch", 0)))
        return self.executions * self.epochs_of(values)

    def affords(self, epochs: float) -> bool:
        """A trial of `epochs` (all executions) ends before the plans' end, as far as trials so far tell."""
        cost = self.cost()
        return cost is None or cost.of(epochs) <= self.left()

    def committed(self, workers: int = 1) -> float:
        """Wall seconds the trials running now still need, shared by `workers`."""
        cost = self.cost()
        if cost is None:
            return 0.0
        now = budget_clock()
        return sum(max(cost.of(e) - (now - t0), 0.0) for t0, e, _ in self.running.values()) / max(workers, 1)

    def begin(self, trial_id: str, values: Mapping[str, Any], tuner_id: Optional[str] = None) -> None:
        """Trial `trial_id` is handed to tuner `tuner_id`. The same tuner asking again (KerasTuner hands back
        its ongoing trial) keeps the clock; another tuner (the trial was taken back from a worker whose lease
        lapsed) starts it again, as that worker trains it from the start."""
        held = self.running.get(trial_id)
        if held is None or held[2] != tuner_id:
            self.running[trial_id] = (budget_clock(), self.planned_epochs(values), tuner_id)

    def end(self, trial_id: str, epochs: Optional[float]) -> None:
        """Trial `trial_id` ended having trained `epochs` (None: it reported none, e.g. it failed)."""
        start = self.running.pop(trial_id, None)
        if start is not None:
            seconds = budget_clock() - start[0]
            self.records.append({"trial": trial_id, "epochs": epochs, "planned": start[1], "seconds": seconds})

    def started_bracket(self, plan: Plan, seconds: Optional[float], provisional: bool = False) -> None:
        """A bracket starts as `plan` (`provisional`: before any trial was timed, so its rounds are fitted later)."""
        self.runs.append({"bracket": plan.bracket, "rounds": len(plan.sizes), "provisional": provisional})
        if not plan.whole:
            self._say(f"started {plan.summary()}", seconds)

    def skipped_bracket(self, plan: Plan, seconds: float) -> None:
        self.skipped.append(plan.bracket)
        self._say(f"skipped {plan.describe()}", seconds)

    def refitted_bracket(self, plan: Plan, seconds: float) -> None:
        """The bracket started before any trial was timed now runs as `plan`."""
        run = next((r for r in reversed(self.runs) if r["bracket"] == plan.bracket and r["provisional"]), None)
        if run is not None:
            run["rounds"] = len(plan.sizes)
        self._say(f"{plan.summary()}, started before any trial was timed, fitted to the time left", seconds)

    def _say(self, what: str, seconds: Optional[float]) -> None:
        if self.say:
            needs = f"~{clock(seconds)} needed, " if seconds is not None else ""
            self.say(f"budget: {what} ({needs}{clock(max(self.left(), 0.0))} left to plan)")

    def stop(self, why: str) -> None:
        if not self.stopped_because:
            self.stopped_because = why
            if self.say:
                self.say(f"budget: {why}")

    def report(self) -> dict[str, Any]:
        """How the budget went, as numbers (MLflow metrics) and the reason it ended the search."""
        end = self.ended if self.ended is not None else budget_clock()
        search = self.search_started if self.search_started is not None else end
        cost = self.cost()
        timed = [r["epochs"] for r in self.records if r.get("epochs") is not None]
        trials = sum(r["seconds"] for r in self.records)
        return {
            "budget_minutes": self.minutes,
            "budget_used_seconds": end - self.started,
            "setup_seconds": search - self.started,
            "trials_seconds": trials,
            "other_seconds": max(end - search - trials, 0.0),
            "trials_timed": len(self.records),
            "epochs_trained": float(sum(timed)),
            "seconds_per_epoch": cost.per_epoch if cost else math.nan,
            "epochs_share": cost.share if cost else math.nan,
            "trial_setup_seconds": cost.setup if cost else math.nan,
            "brackets_run": len(self.runs),
            "brackets_shortened": sum(r["rounds"] < r["bracket"] + 1 for r in self.runs),
            "brackets_skipped": len(self.skipped),
            "stopped_because": self.stopped_because,
        }
