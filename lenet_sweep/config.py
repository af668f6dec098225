"""Structured configs: the schema Hydra type-checks conf/*.yaml against.

The YAML files carry every value and its unit; these dataclasses carry the types, the closed sets (Enums)
and the ranges (`knob(...)` metadata, checked by `check`). A value lives in one place: fields the YAML sets
have no default here (MISSING), so the two cannot drift. A bad override such as `train.epochs=fail` or
`model.pooling=mean` fails at composition with Hydra's message naming the key and what it takes;
`train.epochs=0` fails in `check` with one line naming the key and its range.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from lenet_sweep.errors import UserError


class Choice(str, Enum):
    """A closed set of config values; a member is its YAML string (str(x), f"{x}", == "avg")."""

    def __str__(self) -> str:
        return self.value


class Padding(Choice):
    valid = "valid"
    same = "same"


class Head(Choice):
    flatten = "flatten"
    gap = "gap"


class Schedule(Choice):
    constant = "constant"
    cosine = "cosine"


class Pooling(Choice):
    avg = "avg"
    max = "max"


class Interpolation(Choice):
    """tf.image.resize's methods."""

    bilinear = "bilinear"
    nearest = "nearest"
    bicubic = "bicubic"
    area = "area"
    lanczos3 = "lanczos3"
    lanczos5 = "lanczos5"
    gaussian = "gaussian"
    mitchellcubic = "mitchellcubic"


class TunerKind(Choice):
    random = "random"
    bayesian = "bayesian"
    hyperband = "hyperband"


class Role(Choice):
    """What a sweep process does: all of it (local), serve the oracle (chief), or run trials (worker)."""

    local = "local"
    chief = "chief"
    worker = "worker"


class SpaceType(Choice):
    choice = "choice"
    int = "int"
    float = "float"
    boolean = "boolean"


class Sampling(Choice):
    linear = "linear"
    log = "log"
    reverse_log = "reverse_log"


def knob(
    *,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: tuple | None = None,
    why: str | None = None,
    default: Any = MISSING,
) -> Any:
    """A schema field with its range (ge/gt/lt/le; for a list, of every entry) or its allowed values, and
    `why` the range is what it is (added to the message). No default (MISSING): the YAML sets it; entries
    of lists that are partial by design (bench cases, study rows) take `default`."""
    limits = {"ge": ge, "gt": gt, "lt": lt, "le": le, "choices": choices, "why": why}
    return field(default=default, metadata={k: v for k, v in limits.items() if v is not None})


# ---- one training run ----------------------------------------------------------------------------


@dataclass
class DataConfig:
    root: Optional[str] = MISSING
    url: str = MISSING
    checksum: Optional[str] = MISSING
    cache_dir: Optional[str] = MISSING
    test_fraction: float = knob(gt=0.0, lt=1.0)
    split_seed: Optional[int] = knob(ge=0)
    limit_per_class: Optional[int] = knob(ge=1)
    interpolation: Interpolation = MISSING
    antialias: bool = MISSING
    decode_threads: int = knob(ge=1)
    decode_cache: Optional[str] = MISSING
    # Added after runs were recorded: older config.yaml files lack them and read back as no limit, as they ran.
    max_pixels: Optional[int] = knob(ge=1, default=None)
    max_file_mb: Optional[float] = knob(gt=0.0, default=None)
    class_names: Dict[str, str] = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = MISSING  # a key of lenet_sweep.models.BUILDERS (checked there: the registry is open)
    input_size: int = knob(ge=2)
    filters: List[int] = knob(ge=1)
    kernel_sizes: List[int] = knob(ge=1)
    padding: Padding = MISSING
    conv_activation: str = MISSING  # any Keras activation (an open set: checked by the builder)
    pooling: Pooling = MISSING
    dense: List[int] = knob(ge=1)
    dense_activation: str = MISSING
    output_activation: str = MISSING
    conv_layers: Optional[int] = knob(ge=1)
    batch_norm: bool = MISSING
    dropout: float = knob(ge=0.0, lt=1.0)
    augment_flip: bool = MISSING
    augment_shift: float = knob(ge=0.0, lt=1.0)
    # Added after runs were recorded: older config.yaml files lack it and read back as the study's head.
    head: Head = Head.flatten


@dataclass
class OptimizerConfig:
    """Fields every Keras optimizer takes; `name` is the Keras class (SGD, Adam, ...)."""

    name: str = MISSING
    learning_rate: float = knob(gt=0.0)
    weight_decay: Optional[float] = knob(ge=0.0)
    clipnorm: Optional[float] = knob(gt=0.0)
    clipvalue: Optional[float] = knob(gt=0.0)
    global_clipnorm: Optional[float] = knob(gt=0.0)
    use_ema: bool = MISSING
    ema_momentum: float = knob(ge=0.0, le=1.0)
    gradient_accumulation_steps: Optional[int] = knob(ge=1)


@dataclass
class SGDConfig(OptimizerConfig):
    momentum: float = knob(ge=0.0, le=1.0)
    nesterov: bool = MISSING


@dataclass
class AdamConfig(OptimizerConfig):
    beta_1: float = knob(ge=0.0, lt=1.0)
    beta_2: float = knob(ge=0.0, lt=1.0)
    epsilon: float = knob(gt=0.0)
    amsgrad: bool = MISSING


OPTIMIZER_SCHEMAS = {"SGD": SGDConfig, "Adam": AdamConfig}  # optimizer.name -> its schema


@dataclass
class TrainLoopConfig:
    epochs: int = knob(ge=1)
    batch_size: int = knob(ge=1)
    steps_per_execution: int = knob(ge=1)
    deterministic: bool = MISSING
    keras_verbose: str = knob(choices=("auto", "0", "1", "2"))
    sample_grid: int = knob(ge=1)
    # Added after runs were recorded: older config.yaml files lack them and read back with these values.
    resume: bool = False
    backup_dir: str = "mlruns/backups"
    lr_schedule: Schedule = Schedule.constant
    warmup_epochs: int = knob(ge=0, default=0)


@dataclass
class StoreConfig:
    tracking_uri: Optional[str] = MISSING
    store_dir: str = MISSING


@dataclass
class MlflowConfig(StoreConfig):
    experiment: str = MISSING
    run_name: Optional[str] = MISSING


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # The optimizer group's file picks the subclass (SGDConfig, AdamConfig) through its schema.
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    seed: int = knob(ge=0)


def typed_train_config(tree: Any, partial: bool = False) -> DictConfig:
    """A recorded training config (plain dict) typed by the schema, its optimizer by `optimizer.name`.

    Raises OmegaConf's error for a value the schema refuses; `partial` allows missing keys (old runs).
    """
    name = ((tree or {}).get("optimizer") or {}).get("name")
    schema = TrainConfig(optimizer=OPTIMIZER_SCHEMAS.get(name, SGDConfig)())
    typed = OmegaConf.merge(OmegaConf.structured(schema), tree)
    if not partial:
        missing = sorted(OmegaConf.missing_keys(typed))
        if missing:
            raise UserError(
                f"the recorded config lacks {', '.join(missing[:5])}: record the run again "
                "with this version of lenet_sweep"
            )
    return typed


# ---- the study, the benchmark ------------------------------------------------------------------


@dataclass
class StudyRun:
    model: str = MISSING
    optimizer: str = MISSING
    test_accuracy: float = knob(ge=0.0, le=1.0)
    epochs: Optional[int] = knob(ge=1, default=None)
    overfits_after: Optional[int] = knob(ge=1, default=None)  # the study's epoch where validation loss turns up


@dataclass
class ReproduceConfig(TrainConfig):
    study: List[StudyRun] = MISSING


@dataclass
class BenchCase:
    model: str = MISSING
    optimizer: str = MISSING
    steps: Optional[int] = knob(ge=1, default=None)  # a case given on the command line may leave these out
    val_steps: Optional[int] = knob(ge=1, default=None)
    input_size: Optional[int] = knob(ge=2, default=None)  # null: the model file's own input_size


@dataclass
class BenchSettings:
    cases: List[BenchCase] = MISSING
    epochs: int = knob(ge=1)
    rounds: int = knob(ge=1)
    baseline: bool = MISSING
    matmul_size: int = knob(ge=1)
    matmul_repeats: int = knob(ge=1)
    output: Optional[str] = MISSING


@dataclass
class BenchConfig(TrainConfig):
    bench: BenchSettings = field(default_factory=BenchSettings)


# ---- the sweep ---------------------------------------------------------------------------------


@dataclass
class HyperParameterSpec:
    """One dimension of a search space: which config key it sets and KerasTuner's hp arguments.

    Entries are partial by design (a choice has no `min`), so the defaults here are the entries' own.
    """

    key: str = ""  # config key it sets ("model.filters.0"); "optimizer" picks the group
    type: SpaceType = SpaceType.choice
    values: Optional[List[Any]] = None  # choice: the values
    min: Optional[float] = None  # int/float: lowest value
    max: Optional[float] = None  # int/float: highest value
    step: Optional[float] = None  # int/float: grid step; null: continuous float / step 1 int
    sampling: Sampling = Sampling.linear
    default: Optional[Any] = None  # first value KerasTuner tries; null: its own default
    when: Optional[Dict[str, List[Any]]] = None  # active only when these hyperparameters take these values


@dataclass
class SearchConfig:
    name: str = MISSING
    # Entries are HyperParameterSpec; typed when the sweep reads them (lenet_sweep.sweep.typed_space),
    # so `+search.space.NAME={...}` on the command line can add one.
    space: Dict[str, Any] = MISSING


@dataclass
class TunerConfig:
    """What every tuner takes; conf/tuner/<kind>.yaml picks the subclass, so a knob of another tuner
    (`tuner=random tuner.factor=9`) is refused."""

    kind: TunerKind = MISSING
    max_trials: Optional[int] = knob(ge=1)
    executions_per_trial: int = knob(ge=1)
    seed: int = knob(ge=1, why="KerasTuner reads 0 as unseeded")  # its oracles take `seed or random...`
    max_consecutive_failed_trials: int = knob(ge=1)


@dataclass
class RandomTunerConfig(TunerConfig):
    pass


@dataclass
class BayesianTunerConfig(TunerConfig):
    num_initial_points: Optional[int] = knob(ge=1)
    alpha: float = knob(gt=0.0)
    beta: float = knob(ge=0.0)


@dataclass
class HyperbandTunerConfig(TunerConfig):
    max_epochs: int = knob(ge=1)
    factor: int = knob(ge=2)
    hyperband_iterations: int = knob(ge=1)


@dataclass
class PruneSettings:
    enabled: bool = True
    after_epochs: int = knob(ge=1, default=2)
    chance_margin: float = knob(ge=0.0, lt=1.0, default=0.05)
    diverged_loss: float = knob(gt=1.0, default=3.0)


@dataclass
class SweepSettings:
    name: str = MISSING
    dir: str = MISSING
    overwrite: bool = MISSING
    early_stopping_patience: Optional[int] = knob(ge=1)
    time_limit_minutes: Optional[float] = knob(gt=0.0)
    # Added after sweeps were recorded: older ones read back without a budget.
    budget_minutes: Optional[float] = knob(gt=0.0, default=None)
    budget_margin: float = knob(ge=0.0, lt=1.0, default=0.05)
    top: int = knob(ge=0)
    threads: Optional[int] = knob(ge=1)
    role: Role = MISSING
    chief: str = MISSING
    worker_id: Optional[str] = MISSING
    lease_seconds: float = knob(gt=0.0)
    chief_wait_minutes: float = knob(gt=0.0)
    # Added after sweeps were recorded: their configs read back with pruning as it is now (their saved state
    # folders hold no prune settings, so resuming one of them is refused as another configuration).
    prune: PruneSettings = field(default_factory=PruneSettings)
    # Added after sweeps were recorded: an earlier sweep's name (same MLflow experiment) whose matching trials
    # this one inherits instead of training them (lenet_sweep/warm_start.py); older sweeps had none.
    warm_start: Optional[str] = None


@dataclass
class SweepConfig(TrainConfig):
    search: SearchConfig = field(default_factory=SearchConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    sweep: SweepSettings = field(default_factory=SweepSettings)


# ---- best, export, predict ---------------------------------------------------------------------


@dataclass
class SweepRef:
    name: str = MISSING


@dataclass
class FinalFit:
    """best.final: the winner's refit at the final fidelity, and the share of the budget it gets."""

    input_size: Optional[int] = knob(ge=2)
    epochs: int = knob(ge=1)
    min_epochs: int = knob(ge=1)
    share: float = knob(gt=0.0, lt=1.0)
    margin: float = knob(ge=1.0, why="a margin below 1 plans on epochs faster than any measured")
    reserve_seconds: float = knob(ge=0.0, default=0.0)


@dataclass
class BestSettings:
    top_k: int = knob(ge=1)
    seeds: Optional[int] = knob(ge=1)
    min_seeds: int = knob(ge=1)
    max_seeds: int = knob(ge=1)
    confidence: float = knob(gt=0.0, lt=1.0)
    first_seed: int = knob(ge=0)
    budget_minutes: float = knob(gt=0.0)
    final: FinalFit = field(default_factory=FinalFit)
    race_epochs: Optional[int] = knob(ge=1, default=None)
    min_std: float = knob(ge=0.0, lt=1.0, default=0.0)


@dataclass
class ExportSettings:
    dir: Optional[str] = MISSING
    overwrite: bool = MISSING
    registered_model: Optional[str] = MISSING
    alias: Optional[str] = MISSING


@dataclass
class BestConfig(ReproduceConfig):
    sweep: SweepRef = field(default_factory=SweepRef)
    best: BestSettings = field(default_factory=BestSettings)
    export: ExportSettings = field(default_factory=ExportSettings)


@dataclass
class PredictSettings:
    top_k: int = knob(ge=1)
    output: Optional[str] = MISSING
    batch_size: int = knob(ge=1)
    max_pixels: Optional[int] = knob(ge=1)
    max_file_mb: Optional[float] = knob(gt=0.0)


@dataclass
class ExportFolder:
    dir: Optional[str] = MISSING


@dataclass
class PredictConfig:
    export: ExportFolder = field(default_factory=ExportFolder)
    images: List[str] = MISSING
    predict: PredictSettings = field(default_factory=PredictSettings)


# ---- report, ui --------------------------------------------------------------------------------


@dataclass
class SweepName:
    name: Optional[str] = MISSING


@dataclass
class FrontSettings:
    latency_repeats: int = knob(ge=1)
    latency_warmup: int = knob(ge=1)
    max_measured: int = knob(ge=0)


class ImportanceEvaluator(Choice):
    """Optuna's importance evaluators (optuna.importance)."""

    fanova = "fanova"
    mean_decrease_impurity = "mean_decrease_impurity"


@dataclass
class ImportanceSettings:
    evaluator: ImportanceEvaluator = MISSING
    trees: int = knob(ge=1)
    bootstrap: int = knob(ge=0)
    confidence: float = knob(gt=0.0, lt=1.0)
    top_fraction: float = knob(gt=0.0, le=1.0)
    min_trials: int = knob(ge=2)
    edge_fraction: float = knob(ge=0.0, lt=0.5)
    seed: int = knob(ge=0)


@dataclass
class ReportSettings:
    dir: Optional[str] = MISSING
    top_trials: int = knob(ge=0)
    chance_margin: float = knob(ge=0.0, lt=1.0)
    confidence: float = knob(gt=0.0, lt=1.0)
    epochs: List[int] = knob(ge=1)
    turning_min_epochs: int = knob(ge=2)
    confused_pairs: int = knob(ge=0)
    misclassified: int = knob(ge=0)
    grid_columns: int = knob(ge=1)
    study_packages: Dict[str, Optional[str]] = MISSING
    fronts: FrontSettings = field(default_factory=FrontSettings)
    importance: ImportanceSettings = field(default_factory=ImportanceSettings)


@dataclass
class ReportConfig(ReproduceConfig):
    sweep: SweepName = field(default_factory=SweepName)
    report: ReportSettings = field(default_factory=ReportSettings)


@dataclass
class ReplaySettings:
    tolerance: float = knob(ge=0.0)
    allow_different_environment: bool = MISSING


@dataclass
class DataRoot:
    root: Optional[str] = MISSING


@dataclass
class ReplayConfig:
    """`python -m lenet_sweep.replay`: one recorded run (a sweep's trial=ID, or run=RUN_ID) trained again."""

    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    sweep: SweepName = field(default_factory=SweepName)
    trial: Optional[str] = MISSING
    run: Optional[str] = MISSING
    seed: Optional[int] = knob(ge=0)
    data: DataRoot = field(default_factory=DataRoot)
    replay: ReplaySettings = field(default_factory=ReplaySettings)


@dataclass
class UiSettings:
    host: str = MISSING
    port: int = knob(ge=1, le=65535)


@dataclass
class ServerSettings:
    host: str = MISSING
    port: int = knob(ge=1, le=65535)
    backend_store_uri: Optional[str] = MISSING
    artifacts_destination: str = MISSING
    app_name: Optional[str] = MISSING
    workers: int = knob(ge=1)


@dataclass
class ServerConfig:
    server: ServerSettings = field(default_factory=ServerSettings)


@dataclass
class DemoData:
    root: Optional[str] = MISSING


@dataclass
class DemoSettings:
    workers: int = knob(ge=1)
    trials: int = knob(ge=1)
    tuner: TunerKind = MISSING
    limit_per_class: int = knob(ge=1)
    threads: int = knob(ge=1)
    timeout_minutes: float = knob(gt=0.0)
    experiment: str = MISSING
    dir: str = MISSING
    backend_store_uri: Optional[str] = MISSING
    sweep_overrides: List[str] = MISSING


@dataclass
class DemoConfig:
    data: DemoData = field(default_factory=DemoData)
    demo: DemoSettings = field(default_factory=DemoSettings)


@dataclass
class UiConfig:
    mlflow: StoreConfig = field(default_factory=StoreConfig)
    ui: UiSettings = field(default_factory=UiSettings)


SCHEMAS = {
    "train": TrainConfig,
    "reproduce": ReproduceConfig,
    "bench": BenchConfig,
    "sweep": SweepConfig,
    "best": BestConfig,
    "predict": PredictConfig,
    "ui": UiConfig,
    "server": ServerConfig,
    "demo": DemoConfig,
    "report": ReportConfig,
    "replay": ReplayConfig,
}
GROUP_SCHEMAS = {
    ("optimizer", "sgd_schema"): SGDConfig,
    ("optimizer", "adam_schema"): AdamConfig,
    ("tuner", "random_schema"): RandomTunerConfig,
    ("tuner", "bayesian_schema"): BayesianTunerConfig,
    ("tuner", "hyperband_schema"): HyperbandTunerConfig,
}


def register_configs() -> None:
    """Register the schemas under the names the YAML defaults lists use."""
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(group="schema", name=name, node=node)
    for (group, name), node in GROUP_SCHEMAS.items():
        cs.store(group=group, name=name, node=node)


# ---- value checks --------------------------------------------------------------------------------


def _violation(value: Any, limits: dict[str, Any]) -> str:
    """Why `value` is outside `limits` ('' if it is not)."""
    if "choices" in limits and str(value) not in limits["choices"]:
        return f"choose one of {', '.join(limits['choices'])}"
    checks = (
        ("ge", lambda v, x: v >= x, "at least"),
        ("gt", lambda v, x: v > x, "more than"),
        ("le", lambda v, x: v <= x, "at most"),
        ("lt", lambda v, x: v < x, "less than"),
    )
    if all(ok(value, limits[k]) for k, ok, _ in checks if k in limits):
        return ""
    why = f" ({limits['why']})" if "why" in limits else ""
    return "must be " + " and ".join(f"{words} {limits[k]:g}" for k, _, words in checks if k in limits) + why


def check(cfg: Any, prefix: str = "") -> None:
    """Every range and choice the schema declares (`knob`), over the whole config (its keys shown after
    `prefix`); a UserError naming the first key that is out of range, e.g. "train.epochs=0: must be at least 1"."""
    for path, value, limits in _knobs(cfg, prefix):
        for item in value if isinstance(value, (list, tuple, ListConfig)) else [value]:
            why = _violation(item, limits) if item is not None else ""
            if why:
                shown = list(value) if isinstance(value, ListConfig) else value
                raise UserError(f"{path}={shown}: {why}")


def _knobs(node: Any, prefix: str):
    """(key path, value, limits) of every field with limits under `node`, lists of nodes included."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            if isinstance(item, (DictConfig, ListConfig)):
                yield from _knobs(item, f"{prefix}{i}.")
        return
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            continue
        value = node[key]
        limits = dict(fields[key].metadata) if key in fields else {}
        if limits:
            yield f"{prefix}{key}", value, limits
        if isinstance(value, (DictConfig, ListConfig)):
            yield from _knobs(value, f"{prefix}{key}.")


def one_line(err: Exception, where: str = "") -> str:
    """OmegaConf's multi-line validation message as one line: "where.key='x': choose one of a, b" for a
    closed set, else "where: <first line>"."""
    text = str(err)
    found = re.search(r"full_key: (\S+)", text)
    first = text.splitlines()[0] if text else type(err).__name__
    enum = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", first)
    if enum and found:
        key = f"{where}.{found.group(1)}" if where else found.group(1)
        return f"{key}={enum.group(1)!r}: choose one of {enum.group(2)}"
    return f"{where}: {first}" if where else first
