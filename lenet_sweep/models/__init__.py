"""Model families by name: `create_model(spec, num_classes)` builds `spec["family"]`."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import keras

from lenet_sweep.errors import UserError
from lenet_sweep.models.lenet import build_lenet

BUILDERS: dict[str, Callable[[Mapping[str, Any], int], keras.Model]] = {"lenet": build_lenet}


def create_model(spec: Mapping[str, Any], num_classes: int) -> keras.Model:
    """Build the model family named by `spec["family"]` from its config."""
    if keras.backend.backend() != "tensorflow":
        raise UserError(f"KERAS_BACKEND={keras.backend.backend()}: lenet_sweep runs on TensorFlow; "
                        "unset KERAS_BACKEND or set it to tensorflow")
    family = spec["family"]
    if family not in BUILDERS:
        raise UserError(f"model.family={family!r} is unknown: choose one of {', '.join(BUILDERS)}")
    return BUILDERS[family](spec, num_classes)
