"""tuner.py: the KerasTuner behaviour the adapter relies on, pinned on a tiny model (no data folder, no
MLflow), so a KerasTuner upgrade that changes one of them fails here first, saying which."""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np
import pytest

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
    assert (
        type(made).__mro__[2]
        is {"random": kt.RandomSearch, "bayesian": kt.BayesianOptimization, "hyperband": kt.Hyperband}[kind]
    )
