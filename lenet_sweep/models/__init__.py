"""Model families by name: `create_model(spec, num_classes)` builds `spec["family"]`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import keras
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lenet_sweep.config import ModelConfig, check, one_line
from lenet_sweep.errors import UserError
from lenet_sweep.models.lenet import build_lenet

BUILDERS: dict[str, Callable[[Mapping[str, Any], int], keras.Model]] = {"lenet": build_lenet}


def create_model(spec: Mapping[str, Any], num_classes: int) -> keras.Model:
    """Build the model family named by `spec["family"]` from its config."""
    if keras.backend.backend() != "tensorflow":
        raise UserError(
            f"KERAS_BACKEND={keras.backend.backend()}: lenet_sweep runs on TensorFlow; "
            "unset KERAS_BACKEND or set it to tensorflow"
        )
    typed = typed_model(spec)
    if typed.family not in BUILDERS:
        raise UserError(f"model.family={typed.family!r} is unknown: choose one of {', '.join(BUILDERS)}")
    return BUILDERS[typed.family](typed, num_classes)


def typed_model(spec: Mapping[str, Any]) -> DictConfig:
    """`spec` typed and range-checked by the schema's ModelConfig (closed sets, ranges), whoever made it: a
    composed config, a trial's, or a YAML file loaded by hand; a UserError naming the key otherwise."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(ModelConfig), spec)
    except OmegaConfBaseException as err:
        raise UserError(one_line(err, "model")) from None
    check(typed, "model.")
    return typed
