"""Structured configs: the schema Hydra type-checks conf/*.yaml against.

The YAML files carry the values and their units; these dataclasses carry the types, so a bad
override such as `train.epochs=fail` fails at composition with Hydra's own message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class DataConfig:
    root: Optional[str] = None
    url: str = ""
    md5: Optional[str] = None
    cache_dir: Optional[str] = None
    test_fraction: float = 0.2
    limit_per_class: Optional[int] = None
    interpolation: str = "bilinear"
    antialias: bool = False
    decode_threads: int = 2
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


@dataclass
class TrainLoopConfig:
    epochs: int = 25
    batch_size: int = 32
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
    # Optimizers differ in their fields (SGD: momentum; Adam: beta_1, ...), so this node is free-form:
    # `name` is the Keras class, every other key one of its constructor arguments.
    optimizer: Dict[str, Any] = field(default_factory=dict)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    seed: int = 0


@dataclass
class StudyRun:
    model: str = "lenet5"
    optimizer: str = "sgd"
    test_accuracy: float = 0.0
    epochs: Optional[int] = None


@dataclass
class ReproduceConfig(TrainConfig):
    study: List[StudyRun] = field(default_factory=list)


def register_configs() -> None:
    """Register the schemas under the names the YAML defaults lists use."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="train", node=TrainConfig)
    cs.store(group="schema", name="reproduce", node=ReproduceConfig)
