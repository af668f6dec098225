"""`python -m lenet_sweep.report sweep.name=NAME mlflow.tracking_uri=URI mlflow.experiment=NAME report.dir=DIR`
(conf/report.yaml; `make report`: the latest sweep)."""

import hydra
from omegaconf import DictConfig

from lenet_sweep import cli
from lenet_sweep.config import register_configs
from lenet_sweep.report import run
from lenet_sweep.tracking import store

register_configs()


@hydra.main(version_base="1.3", config_path="../../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    """The report command, its errors as one line."""
    cli.guarded(lambda: store.exclusively(cfg.mlflow, lambda: run(cfg)))


if __name__ == "__main__":
    cli.quote_path_overrides(("report.dir", "mlflow.store_dir"))
    main()
