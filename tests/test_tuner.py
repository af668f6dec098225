"""tuner.py: the KerasTuner behaviour the adapter relies on, pinned on a tiny model (no data folder, no
MLflow), so a KerasTuner upgrade that changes one of them fails here first, saying which."""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np
import pytest

from lenet_sweep import budget as budget_module
from lenet_sweep import tuner as adapter

X = np.random.default_rng(0).random((32, 4), dtype=np.float32)
Y = (X[:, 0] > 0.5).astype("int32")


class Probe(kt.HyperModel):
    """Records what KerasTuner hands the hypermodel; `fail` raises from fit."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail, self.events, self.fits = fail, [], []

    def build(self, hp):
        self.events.append("build")
        width = hp.Int("width", 1, 32)
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(width, "relu"), keras.layers.Dense(2, "softmax")]
        )
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def fit(self, hp, model, *args, callbacks=(), epochs=None, initial_epoch=0, **kwargs):
        self.fits.append(
            {
                "values": dict(hp.values),
                "epochs": epochs,
                "initial_epoch": initial_epoch,
                "callbacks": [type(c).__name__ for c in callbacks],
            }
        )
        if self.fail:
            raise kt.errors.FailedTrialError("diverged")
        return model.fit(
            X,
            Y,
            validation_data=(X, Y),
            epochs=epochs or 2,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            verbose=0,
        )


class Counting(kt.RandomSearch):
    """Counts `_build_and_fit_model` (per execution) and `run_trial` calls; stops after `stop_after` trials by
    lowering the oracle's max_trials in `on_trial_end`, as TrialTracking does."""

    def __init__(self, *args, stop_after: int | None = None, **kwargs):
        self.executions, self.trials_run, self.ended, self.stop_after = 0, 0, [], stop_after
        super().__init__(*args, **kwargs)

    def _build_and_fit_model(self, trial, *args, **kwargs):
        self.executions += 1
        return super()._build_and_fit_model(trial, *args, **kwargs)

    def run_trial(self, trial, *args, **kwargs):
        self.trials_run += 1
        return super().run_trial(trial, *args, **kwargs)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.ended.append((trial.status, trial.message or ""))
        if self.stop_after and len(self.oracle.trials) >= self.stop_after:
            self.oracle.max_trials = len(self.oracle.trials)


def make(tmp_path, hypermodel, **kwargs):
    return Counting(
        hypermodel=hypermodel,
        objective=kt.Objective("val_accuracy", "max"),
        seed=1,
        directory=str(tmp_path),
        project_name="p",
        overwrite=True,
        **kwargs,
    )


def test_each_execution_builds_and_fits_once_and_the_score_is_the_mean_best_epoch(tmp_path, monkeypatch):
    probe = Probe()
    real_clear = keras.backend.clear_session
    monkeypatch.setattr(keras.backend, "clear_session", lambda *a, **k: (probe.events.append("clear"), real_clear())[1])
    tuner = make(tmp_path, probe, max_trials=1, executions_per_trial=2)
    tuner.search(epochs=3, verbose=0)
    assert tuner.trials_run == 1 and tuner.executions == 2 and len(probe.fits) == 2
    # the session is cleared right before each build, dropping the global seed: TrialModel.build seeds itself
    assert [e for e in probe.events if e in ("clear", "build")][-4:] == ["clear", "build", "clear", "build"]
    # KerasTuner adds its own callbacks to each execution's copy: ours (trial.fit's) join them in fit
    assert all({"TunerCallback", "SaveBestEpoch"} <= set(f["callbacks"]) for f in probe.fits)
    (trial,) = tuner.oracle.trials.values()
    assert trial.status == "COMPLETED" and trial.score is not None
    # the adapter's best_epoch_metrics is KerasTuner's score of the same histories
    histories = [keras.callbacks.History() for _ in range(2)]
    for h, best in zip(histories, (0.5, 0.75)):
        h.history, h.epoch = {"val_accuracy": [0.25, best, 0.5], "val_loss": [3.0, 2.0, 1.0]}, [0, 1, 2]
    assert adapter.best_epoch_metrics(histories) == {"val_accuracy": 0.625, "val_loss": 2.0, "best_epoch": 2.0}


def test_a_failed_trial_error_marks_the_trial_failed_without_a_retry_and_the_search_goes_on(tmp_path):
    tuner = make(tmp_path, Probe(fail=True), max_trials=2, max_consecutive_failed_trials=2**31)
    tuner.search(epochs=1, verbose=0)
    assert tuner.trials_run == 2 and [s for s, _ in tuner.ended] == ["FAILED", "FAILED"]
    assert all("diverged" in message for _, message in tuner.ended)  # the reason reaches on_trial_end


def test_lowering_the_oracles_max_trials_in_on_trial_end_stops_the_search(tmp_path):
    tuner = make(tmp_path, Probe(), max_trials=10, stop_after=2)
    tuner.search(epochs=1, verbose=0)
    assert tuner.trials_run == 2 and len(tuner.oracle.trials) == 2


def test_hyperband_hands_each_trial_its_epochs_and_the_trial_it_continues(tmp_path):
    probe = Probe()
    tuner = kt.Hyperband(
        hypermodel=probe,
        objective=kt.Objective("val_accuracy", "max"),
        max_epochs=3,
        factor=3,
        seed=1,
        directory=str(tmp_path),
        project_name="h",
        overwrite=True,
    )
    tuner.search(verbose=0)
    assert all(f["epochs"] == f["values"]["tuner/epochs"] for f in probe.fits)
    assert all(f["initial_epoch"] == f["values"]["tuner/initial_epoch"] for f in probe.fits)
    continued = [f for f in probe.fits if "tuner/trial_id" in f["values"]]
    assert continued and all(f["initial_epoch"] > 0 for f in continued)  # from the earlier round's epoch


def test_a_seed_of_zero_is_unseeded(tmp_path):
    # KerasTuner's oracles take `seed or random.randint(...)`: the schema refuses tuner.seed=0 for that reason
    oracle = kt.oracles.RandomSearchOracle(objective=kt.Objective("val_accuracy", "max"), max_trials=1, seed=0)
    assert oracle.seed != 0


@pytest.mark.parametrize("kind", ["random", "bayesian", "hyperband"])
def test_make_tuner_builds_each_kind_with_its_own_knobs(kind, tmp_path):
    from omegaconf import OmegaConf

    t = OmegaConf.create(
        {
            "kind": kind,
            "max_trials": 2,
            "executions_per_trial": 1,
            "seed": 1,
            "max_consecutive_failed_trials": 3,
            "num_initial_points": 1,
            "alpha": 1e-4,
            "beta": 2.6,
            "max_epochs": 3,
            "factor": 3,
            "hyperband_iterations": 1,
        }
    )
    context = adapter.SweepContext("", "", "s", None, 0.0)
    made = adapter.make_tuner(t, Probe(), context, str(tmp_path), "p", True)
    assert isinstance(made, adapter.TrialTracking) and made.oracle.max_trials == 2
    # KerasTuner's own tuner and oracle of that kind, the oracle ours on a budget (none here)
    assert (
        type(made).__mro__[3]
        is {"random": kt.RandomSearch, "bayesian": kt.BayesianOptimization, "hyperband": kt.Hyperband}[kind]
    )
    oracles = {"random": kt.oracles.RandomSearchOracle, "bayesian": kt.oracles.BayesianOptimizationOracle}
    assert isinstance(made.oracle, oracles.get(kind, kt.oracles.HyperbandOracle)) and made.oracle.budget is None
    assert isinstance(made.oracle, adapter.BudgetedOracle)


# ---- the budget: cost estimates, bracket plans, the oracles on a clock of the test's -------------


class Clock:
    """The budget's clock, moved by the test."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(budget_module, "budget_clock", fake)
    return fake


def drive(oracle, clock: Clock, per_epoch: float, setup: float = 0.0, limit: int = 200) -> tuple[list[dict], str]:
    """Run `oracle` as a tuner does, each trial taking `setup` + its epochs x `per_epoch` on `clock` and
    reporting the epochs it trained: (each trial's values, in order; the status that ended the search)."""
    ran = []
    for _ in range(limit):
        trial = oracle.create_trial("tuner0")
        if trial.status != "RUNNING":
            return ran, trial.status
        epochs = oracle.budget.planned_epochs(trial.hyperparameters.values)
        clock.now += setup + per_epoch * epochs
        score = (int(trial.trial_id) * 37 % 101) / 101  # any scores: Hyperband promotes the best
        oracle.update_trial(trial.trial_id, {"val_accuracy": score, budget_module.EPOCHS_TRAINED: epochs})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)
        ran.append(dict(trial.hyperparameters.values) | {"ended": clock.now})
    raise AssertionError(f"still running after {limit} trials")


def oracle_of(kind, tmp_path, budget, **kwargs):
    oracle = kind(objective=kt.Objective("val_accuracy", "max"), seed=1, budget=budget, **kwargs)
    oracle._set_project_dir(str(tmp_path), "p")
    oracle.verbose = 0  # KerasTuner's trial display
    hp = kt.HyperParameters()
    hp.Int("width", 1, 256)
    hp.Choice("epochs", [1, 20])
    oracle.update_space(hp)
    return oracle


def test_the_cost_model_separates_set_up_from_epochs_and_adds_up_to_the_time_taken():
    Cost = budget_module.Cost
    assert budget_module.estimate_cost([]) is None and budget_module.estimate_cost([(0, 5.0)]) is None
    # 5 s per trial + 2 s per epoch, exactly
    assert budget_module.estimate_cost([(1, 7.0), (3, 11.0), (9, 23.0), (3, 11.0)]) == Cost(5.0, 2.0)
    # the set-up is the median of what each trial took beyond its epochs (Theil-Sen's "joint" intercept), not
    # median(seconds) - slope x median(epochs): many short trials and a few long ones set it apart
    skewed = budget_module.estimate_cost([(2, 9.0), (2, 11.0), (2, 10.0), (20, 46.0), (20, 48.0)])
    assert skewed.setup / skewed.per_epoch == pytest.approx((5 + 8 / 9) / (2 + 1 / 18))
    # trials all as long: set-up and epochs cannot be told apart, so it all counts per epoch
    assert budget_module.estimate_cost([(3, 30.0), (3, 36.0)]) == Cost(0.0, 11.0)
    # one odd trial does not bend the line, but its seconds are spent: the model adds up to the total
    records = [(1, 7.0), (3, 11.0), (9, 23.0), (3, 11.0), (1, 47.0)]
    cost = budget_module.estimate_cost(records)
    assert cost.per_epoch / cost.setup == pytest.approx(2 / 5)
    assert sum(cost.of(e) for e, _ in records) == pytest.approx(sum(s for _, s in records))
    # trials given more epochs than they train (early stopping, pruning) cost that share of them, at least half
    budget = budget_module.Budget(10)
    budget.records = [{"epochs": 4, "planned": 10, "seconds": 8.0}, {"epochs": 12, "planned": 12, "seconds": 24.0}]
    assert budget.cost() == Cost(0.0, 2.0, 16 / 22) and budget.cost().of(11) == pytest.approx(16.0)
    budget.records = [{"epochs": 1, "planned": 25, "seconds": 2.0}]
    assert budget.cost().share == 0.5


def test_a_resumed_budget_adds_its_trials_to_the_earlier_costs_and_a_taken_back_trial_restarts_its_clock(clock):
    Cost = budget_module.Cost
    budget = budget_module.Budget(10)
    # the earlier invocation's trials (saved with the oracle): 5 s set-up + 2 s per epoch
    budget.earlier = [{"epochs": e, "planned": e, "seconds": 5.0 + 2 * e} for e in (1, 3, 9)]
    assert budget.cost() == Cost(5.0, 2.0)
    # one trial of this invocation joins them; it does not replace them (alone it could not split set-up off)
    budget.records = [{"epochs": 3, "planned": 3, "seconds": 11.0}]
    assert budget.cost() == Cost(5.0, 2.0)
    # a worker asking again for its ongoing trial keeps the clock; another worker taking it over restarts it
    budget.begin("0007", {"tuner/epochs": 3}, "worker-a")
    clock.now += 100.0
    budget.begin("0007", {"tuner/epochs": 3}, "worker-a")
    assert budget.running["0007"][0] == clock.now - 100.0
    budget.begin("0007", {"tuner/epochs": 3}, "worker-b")
    clock.now += 11.0
    budget.end("0007", 3)
    assert budget.records[-1] == {"trial": "0007", "epochs": 3, "planned": 3, "seconds": 11.0}


def test_the_bracket_planner_starts_the_due_bracket_if_it_fits_else_a_smaller_one():
    plan = budget_module.plan_bracket
    one = budget_module.Cost(0.0, 1.0)  # seconds are epochs
    # KerasTuner's default brackets (max_epochs 25, factor 3): 12+4+2 trials to 3/9/25 epochs (92 epochs),
    # 6+2 to 9/25 (86), 4 to 25 (100); promoted trials count their new epochs only
    whole, skipped = plan(25, 3, 2, one, 1e9)
    assert (whole.sizes, whole.epochs, whole.epochs_trained(), skipped) == ((12, 4, 2), (3, 9, 25), 92, [])
    assert plan(25, 3, 0, one, 100)[0].describe() == "bracket 0: 4 trials to epoch 25"
    # bracket 0 is due and does not fit: the next whole one that fits, in KerasTuner's order (2, then 1)
    assert plan(25, 3, 0, one, 95) == (budget_module.Plan(2, (12, 4, 2), (3, 9, 25)), [0])
    assert plan(25, 3, 0, one, 90) == (budget_module.Plan(1, (6, 2), (9, 25)), [0, 2])
    # no whole one fits: one with its last round dropped (fewer, shorter trials), then two
    assert plan(25, 3, 0, one, 70) == (budget_module.Plan(2, (12, 4), (3, 9)), [0])
    assert plan(25, 3, 1, one, 40) == (budget_module.Plan(2, (12,), (3,)), [1, 0])
    assert plan(25, 3, 0, one, 30)[0] is None
    # set-up per trial makes the many-trial brackets dearer: 18 trials x 10 s more for bracket 2
    assert plan(25, 3, 2, budget_module.Cost(10.0, 1.0), 150) == (budget_module.Plan(0, (4,), (25,)), [2, 1])
    # with 2 workers a round's trials run two at a time; 2 executions per trial train twice the epochs
    assert whole.seconds(one, workers=2) == 6 * 3 + 2 * 6 + 1 * 16
    assert whole.seconds(one, executions=2) == 2 * 92


def test_random_search_starts_no_trial_the_budget_cannot_pay_for(tmp_path, clock):
    budget = budget_module.Budget(10, margin=0.0, epochs_of=lambda values: values["epochs"])
    oracle = oracle_of(adapter.BudgetedRandomSearchOracle, tmp_path, budget, max_trials=100)
    ran, status = drive(oracle, clock, per_epoch=7.0)
    # 20-epoch trials (140 s) while they fit, then only shorter draws (7 s), to within one of those
    assert status == "STOPPED" and ran[0]["epochs"] == 20 and ran[-1]["epochs"] == 1
    assert clock.now == 595 and all(t["ended"] <= 600 for t in ran)
    assert "does not fit the 0:00:05 left" in budget.stopped_because and "nor did a shorter" in budget.stopped_because
    # the hard end: past the budget no trial starts, however short
    clock.now = 601.0
    budget.stopped_because = ""
    assert oracle.create_trial("tuner0").status == "STOPPED" and "budget_minutes=10 reached" in budget.stopped_because


def test_hyperband_plans_each_bracket_to_fit_and_goes_on_past_its_iterations(tmp_path, clock):
    budget = budget_module.Budget(4, margin=0.0)  # 240 s; a pass over the 3 brackets takes 278 s here
    oracle = oracle_of(adapter.BudgetedHyperbandOracle, tmp_path, budget, max_epochs=25, factor=3)
    ran, status = drive(oracle, clock, per_epoch=1.0)
    assert status == "STOPPED" and clock.now <= 240 and "no Hyperband bracket fits" in budget.stopped_because
    brackets = [(t["tuner/bracket"], t["tuner/round"], t["tuner/epochs"]) for t in ran]
    # bracket 2 (92 s), bracket 1 (86 s); bracket 0 (100 s) is skipped for bracket 2 without its last round (60 s)
    first = [(2, 0, 3)] * 12 + [(2, 1, 9)] * 4 + [(2, 2, 25)] * 2 + [(1, 0, 9)] * 6 + [(1, 1, 25)] * 2
    assert brackets == first + [(2, 0, 3)] * 12 + [(2, 1, 9)] * 4
    report = budget.report()
    assert (report["brackets_run"], report["brackets_shortened"], report["brackets_skipped"]) == (3, 1, 1)
    assert report["epochs_trained"] == 92 + 86 + 60 == report["trials_seconds"]
    # the costs go into the oracle's saved state: a resumed sweep plans its first bracket with them
    again = oracle_of(adapter.BudgetedHyperbandOracle, tmp_path, budget_module.Budget(4), max_epochs=25, factor=3)
    again.set_state(oracle.get_state())
    assert again.budget.cost() == budget_module.Cost(0.0, 1.0)


def test_hyperbands_first_bracket_is_fitted_to_the_budget_once_a_trial_is_timed(tmp_path, clock):
    budget = budget_module.Budget(9, margin=0.0)  # 540 s; bracket 2 takes 920 s at 10 s per epoch
    oracle = oracle_of(adapter.BudgetedHyperbandOracle, tmp_path, budget, max_epochs=25, factor=3)
    lines = []
    budget.say = lines.append
    ran, status = drive(oracle, clock, per_epoch=10.0)
    # started before any trial was timed; after the first (30 s), its promotions (590 s) cannot fit: round 0 only
    assert status == "STOPPED" and [t["tuner/epochs"] for t in ran] == [3] * 12
    assert any("bracket 2 (1 of 3 rounds): 12 trials to epoch 3, started before any trial" in line for line in lines)
    assert budget.report()["brackets_shortened"] == 1 and clock.now == 360
