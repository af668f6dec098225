"""Structured configs: the schema Hydra type-checks conf/*.yaml against.

The YAML files carry the values and their units; these dataclasses carry the types, so a bad
override such as `train.epochs=fail` fails at composition with Hydra's own message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from lenet_sweep.errors import UserError


@dataclass
class DataConfig:
    root: Optional[str] = None
    url: str = ""
    checksum: Optional[str] = None
    cache_dir: Optional[str] = None
    test_fraction: float = 0.2
    split_seed: Optional[int] = None
    limit_per_class: Optional[int] = None
    interpolation: str = "bilinear"
    antialias: bool = False
    decode_threads: int = 2
    decode_cache: Optional[str] = None
    class_names: Dict[str, str] = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "lenet5"
    family: str = "lenet"
    input_size: int = 32
    filters: List[int] = field(default_factory=lambda: [6, 16])
    kernel_sizes: List[int] = field(default_factory=lambda: [5, 5])
    padding: str = "valid"
    conv_activation: str = "relu"
    pooling: str = "avg"
    dense: List[int] = field(default_factory=lambda: [120, 84])
    dense_activation: str = "relu"
    output_activation: str = "softmax"
    conv_layers: Optional[int] = None
    batch_norm: bool = False
    dropout: float = 0.0
    augment_flip: bool = False
    augment_shift: float = 0.0


@dataclass
class OptimizerConfig:
    """Fields every Keras optimizer takes; `name` is the Keras class (SGD, Adam, ...)."""

    name: str = "SGD"
    learning_rate: float = 0.01
    weight_decay: Optional[float] = None
    clipnorm: Optional[float] = None
    clipvalue: Optional[float] = None
    global_clipnorm: Optional[float] = None
    use_ema: bool = False
    ema_momentum: float = 0.99
    gradient_accumulation_steps: Optional[int] = None


@dataclass
class SGDConfig(OptimizerConfig):
    momentum: float = 0.0
    nesterov: bool = False


@dataclass
class AdamConfig(OptimizerConfig):
    name: str = "Adam"
    learning_rate: float = 0.001
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    amsgrad: bool = False


@dataclass
class TrainLoopConfig:
    epochs: int = 25
    batch_size: int = 32
    steps_per_execution: int = 1
    deterministic: bool = True
    keras_verbose: str = "auto"
    sample_grid: int = 5


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None
    store_dir: str = "mlruns"
    experiment: str = "lenet_sweep"
    run_name: Optional[str] = None


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # The optimizer group's file picks the subclass (SGDConfig, AdamConfig) through its schema.
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    seed: int = 0


@dataclass
class StudyRun:
    model: str = "lenet5"
    optimizer: str = "sgd"
    test_accuracy: float = 0.0
    epochs: Optional[int] = None
    overfits_after: Optional[int] = None  # the study's epoch where validation loss turns up


@dataclass
class ReproduceConfig(TrainConfig):
    study: List[StudyRun] = field(default_factory=list)


@dataclass
class BenchCase:
    model: str = "lenet5"
    optimizer: str = "sgd"
    steps: Optional[int] = None
    val_steps: Optional[int] = None


@dataclass
class BenchSettings:
    cases: List[BenchCase] = field(default_factory=list)
    epochs: int = 3
    rounds: int = 2
    baseline: bool = True
    matmul_size: int = 4096
    matmul_repeats: int = 3
    output: Optional[str] = None


@dataclass
class BenchConfig(TrainConfig):
    bench: BenchSettings = field(default_factory=BenchSettings)


@dataclass
class HyperParameterSpec:
    """One dimension of a search space: which config key it sets and KerasTuner's hp arguments."""

    key: str = ""                  # config key it sets ("model.filters.0"); "optimizer" picks the group
    type: str = "choice"           # choice | int | float | boolean
    values: Optional[List[Any]] = None  # choice: the values
    min: Optional[float] = None    # int/float: lowest value
    max: Optional[float] = None    # int/float: highest value
    step: Optional[float] = None   # int/float: grid step; null: continuous float / step 1 int
    sampling: str = "linear"       # linear | log | reverse_log
    default: Optional[Any] = None  # first value KerasTuner tries; null: its own default
    when: Optional[Dict[str, List[Any]]] = None  # active only when these hyperparameters take these values


@dataclass
class SearchConfig:
    name: str = "default"
    # Entries are HyperParameterSpec; typed when the sweep reads them (lenet_sweep.sweep.typed_space),
    # so `+search.space.NAME={...}` on the command line can add one.
    space: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TunerConfig:
    kind: str = "hyperband"
    max_trials: Optional[int] = None
    executions_per_trial: int = 1
    seed: int = 1
    max_consecutive_failed_trials: int = 3
    max_epochs: int = 25
    factor: int = 3
    hyperband_iterations: int = 1
    num_initial_points: Optional[int] = None
    alpha: float = 1e-4
    beta: float = 2.6


@dataclass
class SweepSettings:
    name: str = "default"
    dir: str = "sweeps"
    overwrite: bool = False
    early_stopping_patience: Optional[int] = 3
    time_limit_minutes: Optional[float] = None
    top: int = 5


@dataclass
class SweepConfig(TrainConfig):
    search: SearchConfig = field(default_factory=SearchConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    sweep: SweepSettings = field(default_factory=SweepSettings)


@dataclass
class SweepRef:
    name: str = "default"


@dataclass
class BestSettings:
    top_k: int = 3
    seeds: int = 3
    first_seed: int = 1000


@dataclass
class ExportSettings:
    dir: Optional[str] = None
    overwrite: bool = False
    registered_model: Optional[str] = "lenet_sweep-best"
    alias: Optional[str] = "champion"


@dataclass
class BestConfig(ReproduceConfig):
    sweep: SweepRef = field(default_factory=SweepRef)
    best: BestSettings = field(default_factory=BestSettings)
    export: ExportSettings = field(default_factory=ExportSettings)


@dataclass
class PredictSettings:
    top_k: int = 3
    output: Optional[str] = None
    batch_size: int = 32


@dataclass
class ExportFolder:
    dir: Optional[str] = None


@dataclass
class PredictConfig:
    export: ExportFolder = field(default_factory=ExportFolder)
    images: List[str] = field(default_factory=list)
    predict: PredictSettings = field(default_factory=PredictSettings)


@dataclass
class SweepName:
    name: Optional[str] = None


@dataclass
class ReportSettings:
    dir: Optional[str] = None
    top_trials: int = 3
    chance_margin: float = 0.05
    epochs: List[int] = field(default_factory=lambda: [5, 10, 25])
    turning_min_epochs: int = 9
    confused_pairs: int = 5
    misclassified: int = 16
    grid_columns: int = 4
    study_packages: Dict[str, Optional[str]] = field(default_factory=dict)


@dataclass
class ReportConfig(ReproduceConfig):
    sweep: SweepName = field(default_factory=SweepName)
    report: ReportSettings = field(default_factory=ReportSettings)


@dataclass
class UiSettings:
    host: str = "127.0.0.1"
    port: int = 5000


@dataclass
class UiConfig:
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ui: UiSettings = field(default_factory=UiSettings)


def register_configs() -> None:
    """Register the schemas under the names the YAML defaults lists use."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="train", node=TrainConfig)
    cs.store(group="optimizer", name="sgd_schema", node=SGDConfig)
    cs.store(group="optimizer", name="adam_schema", node=AdamConfig)
    cs.store(group="schema", name="reproduce", node=ReproduceConfig)
    cs.store(group="schema", name="bench", node=BenchConfig)
    cs.store(group="schema", name="sweep", node=SweepConfig)
    cs.store(group="schema", name="best", node=BestConfig)
    cs.store(group="schema", name="predict", node=PredictConfig)
    cs.store(group="schema", name="ui", node=UiConfig)
    cs.store(group="schema", name="report", node=ReportConfig)


def check(cfg: Any) -> None:
    """Value checks that types cannot express; raises UserError naming the knob."""
    at_least_one = {"train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
                    "train.sample_grid": cfg.train.sample_grid,
                    "train.steps_per_execution": cfg.train.steps_per_execution,
                    "data.decode_threads": cfg.data.decode_threads}
    for knob, value in at_least_one.items():
        if value < 1:
            raise UserError(f"{knob}={value}: must be at least 1")
    if cfg.train.keras_verbose not in ("auto", "0", "1", "2"):
        raise UserError(f"train.keras_verbose={cfg.train.keras_verbose!r}: choose auto, 0, 1 or 2")
