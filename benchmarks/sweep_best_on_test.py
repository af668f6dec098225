"""A finished sweep's best trial on the test split, evaluated once (for docs/RESULTS.md).

    .venv/bin/python benchmarks/sweep_best_on_test.py data.root=DIR sweep.name=NAME [the sweep's overrides]

KerasTuner ranks the trials on validation accuracy; this loads the best one with the weights of its best
epoch (KerasTuner's checkpoint), evaluates the test split once, prints the result and logs it to the
sweep's parent run as `best_trial_test_accuracy`. The multi-seed choice and export are
`python -m lenet_sweep.best`'s job; this only answers "how good is what the sweep found".
"""

from __future__ import annotations

import hydra
import mlflow
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from lenet_sweep import data as D
from lenet_sweep import sweep, tuner
from lenet_sweep.cli import guarded
from lenet_sweep.errors import UserError
from lenet_sweep.tracking import store


def best_on_test(cfg: DictConfig, overrides: list[str]) -> None:
    if cfg.sweep.overwrite:
        raise UserError("sweep.overwrite=true would delete the sweep this evaluates")
    project, saved = sweep.check_state(cfg)
    if not saved:
        raise UserError(f"no saved sweep in {project}: run the sweep first, with the same overrides")
    optimizers = sweep.compose_optimizers(cfg, overrides)
    space = sweep.active_space(cfg, optimizers)
    listed = D.prepare_data(cfg.data, cfg.model.input_size, cfg.seed, splits=())
    hypermodel = sweep.trial_model(cfg, space, optimizers, D.DataBySize(cfg.data, cfg.seed), len(listed.splits.classes))
    context = tuner.SweepContext("", "", cfg.sweep.name, None, 0.0)
    searched = tuner.make_tuner(cfg.tuner, hypermodel, context, str(project.parent), cfg.sweep.name, False)
    (best,) = searched.oracle.get_best_trials(1)
    model = searched.load_model(best)
    trial_cfg = hypermodel.config(best.hyperparameters)
    test = D.prepare_data(cfg.data, trial_cfg.model.input_size, cfg.seed, print, splits=("test",))
    result = model.evaluate(
        D.make_dataset(test.decoded["test"], trial_cfg.train.batch_size, shuffle=False), verbose=0, return_dict=True
    )
    values = tuner.describe(sweep.hyperparameter_values(best.hyperparameters, space))
    print(
        f"best trial {best.trial_id}: val_accuracy {best.score:.4f} (best epoch), "
        f"test_accuracy {result['accuracy']:.4f}, test_loss {result['loss']:.4f} "
        f"on {len(test.decoded['test'].labels)} test images\n  {values} "
        f"tuner/epochs={best.hyperparameters.values.get('tuner/epochs', trial_cfg.train.epochs)}"
    )
    experiment = store.open_store(cfg.mlflow)
    client = MlflowClient(mlflow.get_tracking_uri())
    parent = store.find_sweep_run(client, experiment, cfg.sweep.name, project)
    if parent is not None:
        client.log_metric(parent.info.run_id, "best_trial_test_accuracy", result["accuracy"])
        client.set_tag(parent.info.run_id, "best_trial_on_test", best.trial_id)
        print(f"logged to MLflow run {parent.info.run_id}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="sweep")
def main(cfg: DictConfig) -> None:
    guarded(lambda: best_on_test(cfg, list(HydraConfig.get().overrides.task)))


if __name__ == "__main__":
    main()
