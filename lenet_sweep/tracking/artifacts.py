"""Reading back what runs recorded: files, per-epoch histories and configs. One reader for sweep (Hyperband's
promoted trials), best (the candidates' configs) and report (everything it shows).

A run's config is its `config.yaml` artifact (every run logs one since configs describe themselves); runs
recorded before that are read from their flattened params, typed by the schema.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import tempfile
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lenet_sweep.config import TrainConfig, typed_train_config
from lenet_sweep.errors import UserError
from lenet_sweep.tracking.runs import CONFIG, TRAIN_GROUPS

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")  # per-epoch metrics a history is rebuilt from


class Artifacts:
    """Reads runs' artifacts into memory; absent or unreadable ones read as None (or empty)."""

    def __init__(self, client: MlflowClient):
        self.client = client

    def raw(self, run_id: str, path: str) -> Optional[bytes]:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = Path(self.client.download_artifacts(run_id, path, tmp))
            except Exception:  # noqa: BLE001  absent, or a store that cannot serve it (S3, a server): unread
                return None
            return local.read_bytes() if local.is_file() else None

    def text(self, run_id: str, path: str) -> Optional[str]:
        raw = self.raw(run_id, path)
        return raw.decode("utf-8", errors="replace") if raw is not None else None

    def json(self, run_id: str, path: str) -> Optional[Any]:
        text = self.text(run_id, path)
        try:
            return json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            return None

    def csv(self, run_id: str, path: str) -> list[dict]:
        text = self.text(run_id, path)
        return list(csv.DictReader(io.StringIO(text))) if text else []

    def yaml(self, run_id: str, path: str) -> Optional[dict]:
        """A YAML artifact as a plain dict (None if absent or not a mapping)."""
        text = self.text(run_id, path)
        if text is None:
            return None
        try:
            loaded = OmegaConf.to_container(OmegaConf.create(text))
        except Exception:  # noqa: BLE001  unreadable YAML reads as absent
            return None
        return loaded if isinstance(loaded, dict) else None

    def history(self, run_id: str) -> list[dict[str, float]]:
        """Per-epoch rows from history.csv, else from the run's per-epoch metrics (steps are epochs)."""
        rows = [{k: to_float(v) for k, v in row.items() if k != "epoch"} for row in self.csv(run_id, "history.csv")]
        if rows:
            return rows
        by_epoch: dict[int, dict[str, float]] = {}
        for key in HISTORY_KEYS:
            try:
                points = self.client.get_metric_history(run_id, key)
            except Exception:  # noqa: BLE001  a store that cannot answer: the run has no history here
                points = []
            for m in points:
                by_epoch.setdefault(int(m.step), {})[key] = float(m.value)
        last = max(by_epoch, default=0)
        return [by_epoch.get(epoch, {}) for epoch in range(1, last + 1)]

    def config(self, run) -> dict[str, Any]:
        """A run's training config as a plain dict: its config.yaml, else rebuilt from its params (keys an
        older run did not record are left out)."""
        logged = self.yaml(run.info.run_id, CONFIG)
        if logged:  # an empty config.yaml is a run cut off while logging it: its params know more
            return logged
        return _present(OmegaConf.to_container(config_from_params(run.data.params), enum_to_str=True))

    def train_config(self, run) -> DictConfig:
        """A run's training config typed by the schema, ready to train again. Its `mlflow` group (where it
        logged) may be unrecorded: runs before config.yaml never logged it as params, and whoever trains
        again says where the new run logs."""
        try:
            tree = self.config(run)
        except UserError as err:  # params an older or newer version logged
            raise UserError(f"run {run.info.run_id}: {err}; use the version that recorded it") from None
        try:
            typed = typed_train_config(tree, partial=True)
        except OmegaConfBaseException as err:
            raise UserError(
                f"run {run.info.run_id}'s recorded config does not fit this version of lenet_sweep: "
                f"{str(err).splitlines()[0]}; use the version that recorded it, or run it again with this one"
            ) from None
        missing = sorted(k for k in OmegaConf.missing_keys(typed) if not k.startswith("mlflow."))
        if missing:
            raise UserError(
                f"run {run.info.run_id} recorded no {', '.join(missing[:5])}"
                f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}: an older lenet_sweep logged "
                "it, and it cannot be trained again as it was; run it again with this version"
            )
        return typed


def no_scored_trial(parent, statuses: Sequence[str]) -> str:
    """Why sweep `parent` has nothing to report or choose from, and what to do, from the statuses of its
    trials' latest attempts."""
    name = parent.data.tags.get("lenet_sweep.sweep")
    what = ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses))) or "none recorded"
    if statuses and set(statuses) <= {"FAILED", "FINISHED"}:  # it ended: resuming it would add nothing
        todo = (
            "each failed or scored no epoch (see the failed trials' failure_reason tag in MLflow): run a sweep "
            "with other settings"
        )
    else:
        todo = "run or resume the sweep first"
    return (
        f"sweep {name!r} (MLflow run {parent.info.run_id}) has no finished trial with a validation score "
        f"(trials: {what}): {todo}"
    )


def _present(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` without OmegaConf's "???" (missing) values, at every depth."""
    return {k: _present(v) if isinstance(v, dict) else v for k, v in tree.items() if v != "???"}


def to_float(text: Optional[str]) -> float:
    """A CSV cell or param as a float (NaN for empty, None or text)."""
    try:
        return float(text) if text not in (None, "", "None") else math.nan
    except ValueError:
        return math.nan


# ---- runs recorded before config.yaml: their flattened params --------------------------------------


def _is_text(path: Sequence[str]) -> bool:
    """Whether the config field at `path` is a string (so '1e5' or 'True' stay text)."""
    kind: Any = TrainConfig
    for part in path:
        if typing.get_origin(kind) is dict:
            kind = typing.get_args(kind)[1]
            continue
        hints = typing.get_type_hints(kind) if hasattr(kind, "__dataclass_fields__") else {}
        if part not in hints:
            return False
        kind = hints[part]
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is typing.Union and len(options) == 1:
            kind = options[0]
    return kind is str


def config_from_params(params: Mapping[str, str]) -> DictConfig:
    """The config a run trained with, rebuilt from its MLflow params (`str(value)` of each config key) and
    typed by the schema: the reading of runs that logged no config.yaml."""
    tree: dict[str, Any] = {}
    for key, text in params.items():
        path = key.split(".")
        if key != "seed" and (len(path) == 1 or path[0] not in TRAIN_GROUPS):
            continue  # hyperparameter names (a dimension may be called `optimizer`) and tuner/* values
        if path[:2] == ["data", "class_names"]:
            path = path[:2] + [".".join(path[2:])]  # a class folder name may hold dots
        if text == "None":
            value: Any = None
        elif _is_text(path):
            value = text
        else:
            try:
                value = ast.literal_eval(text)  # params are str(value): 0.001, [32, 64], True
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # not a literal: text
                value = text
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    try:
        return typed_train_config(tree, partial=True)
    except OmegaConfBaseException as err:
        raise UserError(
            f"a run's recorded params do not fit this version of lenet_sweep: {str(err).splitlines()[0]}"
        ) from None
