"""The study's Table II, reproduced: `python -m lenet_sweep.reproduce data.root=DIR`.

Trains each model of `study` (conf/reproduce.yaml) with the study's protocol as a child run of one
`reproduce` MLflow run, then prints Table II — ours beside the study's — and logs it to that run.
"""

from __future__ import annotations

import hydra
import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig

from lenet_sweep.cli import guarded
from lenet_sweep.config import check, register_configs
from lenet_sweep.errors import UserError
from lenet_sweep.tracking.runs import tracked_run
from lenet_sweep.tracking.store import exclusively, open_store
from lenet_sweep.train import run_one


def table_ii(rows: list[dict]) -> str:
    """Table II as markdown: model, optimizer, epochs, the study's and our test accuracy."""
    lines = [
        "| model | optimizer | epochs | study test accuracy | our test accuracy | "
        "val loss lowest at epoch | seconds/epoch | MLflow run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['epochs']} | {r['study']:.4f} | "
            f"{r['ours']:.4f} | {r['turning_point_epoch']} | {r['seconds_per_epoch']:.1f} | "
            f"{r['run_id']} |"
        )
    return "\n".join(lines) + "\n"


def reproduce(cfg: DictConfig, task_overrides: list[str]) -> list[dict]:
    """Train every study row under one parent run; return Table II's rows."""
    # The user's overrides apply to every row; the rows' own model and optimizer come last and win.
    # Every row is composed and checked before the first trains, so a bad override costs no training.
    shared = [o for o in task_overrides if not o.lstrip("+~").startswith("study")]
    run_cfgs = []
    for row in cfg.study:
        overrides = [
            *shared,
            f"model={row.model}",
            f"optimizer={row.optimizer}",
            *([f"train.epochs={row.epochs}"] if row.epochs else []),
        ]
        try:
            run_cfgs.append(hydra.compose(config_name="train", overrides=overrides))
        except HydraException as err:
            raise UserError(
                f"the study row {row.model}/{row.optimizer} cannot take these overrides: {str(err).splitlines()[0]}"
            ) from None
        check(run_cfgs[-1])
    exp = open_store(cfg.mlflow)
    rows = []
    with tracked_run(
        experiment_id=exp, run_name="reproduce-table-ii", tags={"lenet_sweep.kind": "reproduce"}
    ) as parent:
        for row, run_cfg in zip(cfg.study, run_cfgs):
            print(f"== {row.model} ({row.optimizer}, {run_cfg.train.epochs} epochs)")
            result = run_one(run_cfg, parent_run_id=parent.info.run_id)
            rows.append(
                {
                    "model": row.model,
                    "optimizer": row.optimizer,
                    "epochs": len(result.history),
                    "study": row.test_accuracy,
                    "ours": result.test_accuracy,
                    "turning_point_epoch": result.turning_point_epoch,
                    "seconds_per_epoch": result.seconds / max(1, len(result.history)),
                    "run_id": result.run_id,
                }
            )
        table = table_ii(rows)
        mlflow.log_text(table, "table_ii.md")
        mlflow.log_dict({"rows": rows}, "table_ii.json")
        for r in rows:
            mlflow.log_metric(f"{r['model']}.test_accuracy", r["ours"])
    return rows


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="reproduce")
def main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    rows = guarded(lambda: exclusively(cfg.mlflow, lambda: reproduce(cfg, overrides)))
    print("\nTable II: test accuracy (study vs lenet_sweep)\n")
    print(table_ii(rows))


if __name__ == "__main__":
    main()
