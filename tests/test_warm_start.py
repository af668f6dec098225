"""Warm start (`sweep.warm_start`): which earlier trials fit a new sweep, how they enter KerasTuner's oracle,
and a warm-started sweep that trains only what it did not inherit."""

from __future__ import annotations

from types import SimpleNamespace

import keras_tuner as kt
import pytest
from keras_tuner.src.engine.trial import TrialStatus
from mlflow.tracking import MlflowClient

from conftest import compose_sweep, make_image_folder, runs_of, sweep_overrides
from lenet_sweep import sweep, tuner, warm_start
from lenet_sweep.errors import UserError
from lenet_sweep.tracking.artifacts import Artifacts
from lenet_sweep.tracking.runs import TRAIN_GROUPS, loggable_config


def _space(values=(16, 32, 64)) -> kt.HyperParameters:
    hp = kt.HyperParameters()
    hp.Choice("dense_1", list(values))
    return hp


# ---- the oracle ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "bayesian", "hyperband"])
def test_inherited_trials_are_completed_scored_and_never_drawn_again(kind, tmp_path):
    args = dict(objective=kt.Objective("val_accuracy", "max"), seed=1, hyperparameters=_space())
    if kind == "random":
        oracle = tuner.BudgetedRandomSearchOracle(max_trials=2, **args)
    elif kind == "bayesian":
        oracle = tuner.BudgetedBayesianOptimizationOracle(max_trials=2, num_initial_points=10, **args)
    else:
        oracle = tuner.BudgetedHyperbandOracle(max_epochs=3, factor=3, **args)
    oracle._set_project_dir(str(tmp_path), "p")
    ids = oracle.inherit_trials([({"dense_1": 16}, 0.5, "run-a"), ({"dense_1": 32}, 0.7, "run-b")])
    assert ids == [f"{i:0{len(str(oracle.max_trials))}d}" for i in range(2)]
    assert [oracle.trials[i].status for i in ids] == [TrialStatus.COMPLETED] * 2
    assert oracle.get_best_trials(1)[0].trial_id == ids[1] and oracle.get_best_trials(1)[0].score == 0.7
    assert oracle.max_trials == (4 if kind != "hyperband" else None)  # max_trials counts trials trained here
    drawn = oracle.populate_space("x")
    assert drawn["status"] == "RUNNING" and drawn["values"]["dense_1"] == 64  # the only value left
    # Saved and reloaded (a resumed sweep): the same trials, max_trials raised once however often it is set.
    state = oracle.get_state()
    oracle.set_state(state)
    oracle.set_state(state)
    assert oracle.inherited == {ids[0]: "run-a", ids[1]: "run-b"}
    assert oracle.max_trials == (4 if kind != "hyperband" else None)


def test_values_are_checked_against_the_space_and_typed_as_kerastuner_holds_them():
    hp = kt.HyperParameters()
    hp.Choice("d", [0.0, 0.25, 0.5])
    hp.Boolean("b")
    hp.Int("n", 2, 8, step=2)
    hp.Float("lr", 1e-3, 1e-1, sampling="log")
    choice, flag, ints, rate = hp.space
    out = warm_start._OUT
    assert warm_start.in_space(choice, 0) == 0.0 and isinstance(warm_start.in_space(choice, 0), float)
    assert warm_start.in_space(choice, 0.3) is out and warm_start.in_space(choice, None) is out
    assert warm_start.in_space(flag, True) is True and warm_start.in_space(flag, 1) is out
    assert warm_start.in_space(ints, 4.0) == 4 and warm_start.in_space(ints, 5) is out
    assert warm_start.in_space(ints, 10) is out
    assert warm_start.in_space(rate, 0.0123) == 0.0123 and warm_start.in_space(rate, 0.5) is out


def test_a_recorded_config_gives_back_its_values_and_matches_the_config_this_sweep_builds():
    cfg, optimizers = compose_sweep(["tuner=random"])
    space = sweep.active_space(cfg, optimizers)
    hps = kt.HyperParameters()
    sweep.hyperparameter_values(hps, space)
    hp = hps.copy()
    hp.values.update({"conv_layers": 3, "filters_3": 128, "optimizer": "sgd", "sgd_learning_rate": 0.02})
    hp.values.pop("adam_learning_rate")
    hp.values["sgd_momentum"] = 0.9
    recorded = loggable_config(sweep.trial_config(cfg, space, optimizers, hp), TRAIN_GROUPS)
    values, outside = warm_start.space_values(hps, space, recorded, {}, optimizers)
    assert outside == "" and values == sweep.hyperparameter_values(hp, space)  # active ones only, sgd's branch
    rebuilt = hps.copy()
    rebuilt.values = values
    now = loggable_config(sweep.trial_config(cfg, space, optimizers, rebuilt), TRAIN_GROUPS)
    assert warm_start.config_differences(recorded, now) == []
    recorded["train"]["keras_verbose"], recorded["mlflow"]["experiment"] = "2", "elsewhere"  # not compared
    recorded["train"]["epochs"] = 3
    assert warm_start.config_differences(recorded, now) == [f"train.epochs: 3 -> {now['train']['epochs']}"]


# ---- a warm-started sweep -----------------------------------------------------------------------


def test_a_warm_started_sweep_trains_only_what_it_did_not_inherit(tmp_path):
    folder = make_image_folder(tmp_path / "data", n_train=8, n_val=6, size=36, messy=False)
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"

    def overrides(name: str, *more: str) -> list[str]:
        return sweep_overrides(folder, tmp_path, store, "search=tiny", "train.epochs=1", *more, name=name)

    # A first sweep trains both configurations of dense_1 in {16, 32}.
    cfg, optimizers = compose_sweep(overrides("narrow", "tuner=random", "tuner.max_trials=2"))
    first = sweep.run_sweep(cfg, optimizers)
    trained = {r["dense_1"]: r["run_id"] for r in first.rows}
    assert sorted(trained) == [16, 32]

    with pytest.raises(UserError, match=r"sweep.warm_start='nope'.*sweeps there: narrow"):
        cfg, optimizers = compose_sweep(overrides("wide", "tuner=random", "sweep.warm_start=nope"))
        sweep.run_sweep(cfg, optimizers)

    # Another sweep with other settings (2 epochs) inherits nothing, and says why.
    cfg, optimizers = compose_sweep(overrides("other", "tuner=random", "train.epochs=2"))
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("sweep").experiment_id
    space = sweep.active_space(cfg, optimizers)
    hps = kt.HyperParameters()
    sweep.hyperparameter_values(hps, space)
    earlier = warm_start.earlier_sweep(cfg.mlflow, "narrow", "other")
    data = Artifacts(client).json(earlier.info.run_id, warm_start.DATA_SUMMARY)
    found = warm_start.select(
        client,
        experiment,
        earlier,
        cfg,
        space,
        hps,
        lambda hp: sweep.trial_config(cfg, space, optimizers, hp),
        optimizers,
        data,
    )
    assert found.trials == [] and found.considered == 2
    ((why, details),) = found.left_out.items()
    assert "other settings" in why and all("train.epochs: 1 -> 2" in d for d in details)

    # A wider space, another tuner: the two inherited, only dense_1=64 trained.
    wide = overrides("wide", "tuner=bayesian", "tuner.max_trials=2", "sweep.warm_start=narrow")
    lines: list[str] = []
    cfg, optimizers = compose_sweep([*wide, "search.space.dense_1.values=[16,32,64]"])
    second = sweep.run_sweep(cfg, optimizers, lines.append)
    assert any("2 of its 2 trials inherited" in line for line in lines)
    children = [r for r in runs_of(store, "trial") if r.data.tags["lenet_sweep.sweep"] == "wide"]
    inherited = [r for r in children if warm_start.INHERITED_FROM in r.data.tags]
    new = [r for r in children if warm_start.INHERITED_FROM not in r.data.tags]
    assert {r.data.tags[warm_start.INHERITED_FROM] for r in inherited} == set(trained.values())
    assert [r.data.params["dense_1"] for r in new] == ["64"]  # no inherited configuration trained again
    assert {(r.info.status, r.data.tags[warm_start.INHERITED_SWEEP]) for r in inherited} == {("FINISHED", "narrow")}
    art = Artifacts(client)
    for run in inherited:  # `best` retrains a trial from its config: the original's
        original = client.get_run(run.data.tags[warm_start.INHERITED_FROM])
        assert art.train_config(run) == art.train_config(original)
        assert run.data.metrics["best_val_accuracy"] == original.data.metrics["best_val_accuracy"]
    assert sum(bool(r["inherited_from"]) for r in second.rows) == 2 and len(second.rows) == 3
    assert client.get_run(second.parent_run_id).data.metrics["trials_inherited"] == 2

    # Resumed, the sweep inherits nothing twice and trains nothing again.
    cfg, optimizers = compose_sweep([*wide, "search.space.dense_1.values=[16,32,64]"])
    again = sweep.run_sweep(cfg, optimizers)
    assert again.resumed and len(again.rows) == 3
    assert len([r for r in runs_of(store, "trial") if r.data.tags["lenet_sweep.sweep"] == "wide"]) == 3


def test_the_earlier_sweep_is_part_of_the_fingerprint():
    cfg, _ = compose_sweep(["sweep.warm_start=narrow"])
    assert sweep.state_fingerprint(cfg)["sweep.warm_start"] == "narrow"
    first = SimpleNamespace(splits=SimpleNamespace(classes=["a"], files={"train": SimpleNamespace(paths=["x"])}))
    assert "sweep.warm_start" not in sweep.worker_fingerprint(cfg, first)  # the chief alone inherits
