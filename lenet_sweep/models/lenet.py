"""The LeNet family: conv/pool blocks, then dense layers, then the class layer.

Both of the study's models are members, built from config values (conf/model/*.yaml):

LeNet-5 (`model=lenet5`, 62,006 parameters with 10 classes)::

    layer                               output shape     params
    Input                               (32, 32, 3)
    Conv2D 6, 5x5, valid, ReLU          (28, 28, 6)        456
    AveragePooling2D 2x2                (14, 14, 6)
    Conv2D 16, 5x5, valid, ReLU         (10, 10, 16)     2,416
    AveragePooling2D 2x2                (5, 5, 16)
    Flatten                             (400,)
    Dense 120, ReLU                     (120,)          48,120
    Dense 84, ReLU                      (84,)           10,164
    Dense 10, softmax                   (10,)              850

Modified LeNet (`model=modified_lenet`, 582,186 parameters with 10 classes)::

    layer                               output shape     params
    Input                               (128, 128, 3)
    Conv2D 64, 3x3, same, ReLU          (128, 128, 64)   1,792
    MaxPooling2D 2x2                    (64, 64, 64)
    Conv2D 64, 3x3, same, ReLU          (64, 64, 64)    36,928
    MaxPooling2D 2x2                    (32, 32, 64)
    Conv2D 32, 3x3, same, ReLU          (32, 32, 32)    18,464
    MaxPooling2D 2x2                    (16, 16, 32)
    Flatten                             (8192,)
    Dense 64, ReLU                      (64,)          524,352
    Dense 10, ReLU (sic)                (10,)              650

The sweep's starting point (`model=lenet_search`, 111,722 parameters with 10 classes at any input size;
the search space in conf/search/default.yaml varies every knob below)::

    layer                               output shape     params
    Input                               (32, 32, 3)
    RandomFlip horizontal (training)    (32, 32, 3)
    Conv2D 32, 3x3, same, no bias       (32, 32, 32)       864
    BatchNormalization, ReLU            (32, 32, 32)       128
    MaxPooling2D 2x2                    (16, 16, 32)
    Conv2D 64, 3x3, same, no bias       (16, 16, 64)    18,432
    BatchNormalization, ReLU            (16, 16, 64)       256
    MaxPooling2D 2x2                    (8, 8, 64)
    Conv2D 128, 3x3, same, no bias      (8, 8, 128)     73,728
    BatchNormalization, ReLU            (8, 8, 128)        512
    MaxPooling2D 2x2                    (4, 4, 128)
    GlobalAveragePooling2D, Dropout 0.25  (128,)
    Dense 128, ReLU, Dropout 0.25       (128,)          16,512
    Dense 10, softmax                   (10,)            1,290

A ReLU output is not a probability vector. The study trained it with Keras' sparse categorical
cross-entropy (`from_logits=False`), and so do we: on the TensorFlow backend Keras clips the outputs
to [1e-7, 1 - 1e-7] and renormalises them, loss = -log(clip(p_y) / sum_j clip(p_j)). Outputs of
dead ReLU units all clip to 1e-7, so a sample whose output units are all dead scores the uniform loss
ln 10 = 2.3026 and passes no gradient; a run whose units all die stays at chance. Clipped outputs
above 1 - 1e-7 also pass no gradient. `model.output_activation=softmax` makes the outputs
probabilities and removes both effects.

Optional layers, all off in the study's models and searched by the sweep (conf/search/default.yaml):

    knob                  adds
    conv_layers: N        keeps the first N entries of filters and kernel_sizes (null: all)
    head: gap             GlobalAveragePooling2D instead of Flatten: the dense layers see one value per
                          filter, so their size no longer grows with the input side (a 64 px model has as
                          many parameters as its 32 px version, and a model screened at 32 px refits at 64)
    augment_flip: true    RandomFlip horizontal after the input (training only)
    augment_shift: F      RandomTranslation by up to F of the side, zero fill (a padded crop; training only)
    batch_norm: true      Conv2D without bias -> BatchNormalization -> activation, in every conv block
    dropout: R            Dropout R after Flatten and after every hidden dense layer (training only)

Augmentation layers are the identity at inference, so an exported model needs no extra preprocessing.

Weights use Keras' default initialisers (Glorot uniform kernels, zero biases).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from lenet_sweep.errors import UserError

POOLING = {"avg": keras.layers.AveragePooling2D, "max": keras.layers.MaxPooling2D}


def build_lenet(spec: Mapping[str, Any], num_classes: int) -> keras.Model:
    """Build a LeNet-family model from a model config (see conf/model/*.yaml and the tables above), typed
    and range-checked by the schema (models.create_model); what is checked here spans several keys."""
    filters = list(spec["filters"])
    kernels = list(spec["kernel_sizes"])
    layers = spec["conv_layers"]
    if layers is not None:
        if not 1 <= layers <= min(len(filters), len(kernels)):
            raise UserError(
                f"model.conv_layers={layers}: must be between 1 and the number of entries "
                f"of model.filters ({len(filters)}) and model.kernel_sizes ({len(kernels)})"
            )
        filters, kernels = filters[:layers], kernels[:layers]
    if len(kernels) != len(filters):
        raise UserError(
            f"model.kernel_sizes has {len(kernels)} entries but model.filters has "
            f"{len(filters)}: give one kernel size per conv layer"
        )
    for knob in ("conv_activation", "dense_activation", "output_activation"):
        try:
            keras.activations.get(spec[knob])
        except ValueError:
            raise UserError(
                f"model.{knob}={spec[knob]!r} is not a Keras activation (relu, softmax, linear, tanh, ...)"
            ) from None
    dropout, shift = float(spec["dropout"]), float(spec["augment_shift"])  # ranges: checked by the schema
    size = int(spec["input_size"])
    side = size
    for i, k in enumerate(kernels, start=1):
        side = side - k + 1 if spec["padding"] == "valid" else side
        if side < 2:
            raise UserError(
                f"a {size}x{size} input is down to {max(side, 0)}x{max(side, 0)} before pool{i}: "
                "use a larger model.input_size, fewer conv layers or padding=same"
            )
        side //= 2

    inputs = keras.Input((size, size, 3), name="image")
    x = inputs
    if spec["augment_flip"]:
        x = keras.layers.RandomFlip("horizontal", name="flip")(x)
    if shift:
        x = keras.layers.RandomTranslation(shift, shift, fill_mode="constant", name="shift")(x)
    batch_norm = bool(spec["batch_norm"])
    for i, (n, k) in enumerate(zip(filters, kernels), start=1):
        if batch_norm:  # the BN shift replaces the conv bias
            x = keras.layers.Conv2D(n, k, padding=spec["padding"], use_bias=False, name=f"conv{i}")(x)
            x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
            x = keras.layers.Activation(spec["conv_activation"], name=f"act{i}")(x)
        else:
            x = keras.layers.Conv2D(n, k, padding=spec["padding"], activation=spec["conv_activation"], name=f"conv{i}")(
                x
            )
        x = POOLING[spec["pooling"]](2, name=f"pool{i}")(x)
    if spec["head"] == "gap":
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    else:
        x = keras.layers.Flatten(name="flatten")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout0")(x)
    for i, width in enumerate(spec["dense"], start=1):
        x = keras.layers.Dense(width, activation=spec["dense_activation"], name=f"dense{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"dropout{i}")(x)
    outputs = keras.layers.Dense(num_classes, activation=spec["output_activation"], name="output")(x)
    return keras.Model(inputs, outputs, name=str(spec["name"]))
