"""Models: every family of the builder registry builds each of its configs with the layer table its
docstring documents (shapes and parameters read from the built model), trains, and fails clearly."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR
from lenet_sweep.errors import UserError
from lenet_sweep.models import BUILDERS, create_model

MODEL_CONFIGS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))


def documented_tables(family: str) -> dict[str, tuple[int, list[tuple[tuple[int, ...], int]]]]:
    """The layer tables of a family's module docstring: {config name: (parameters, [(output shape,
    parameters of the row)])}, from blocks headed "... (`model=NAME`, N parameters with 10 classes)::"."""
    doc = inspect.getmodule(BUILDERS[family]).__doc__
    tables = {}
    for block in re.split(r"\n(?=\S[^\n]*\(`model=)", doc):
        head = re.match(r"[^\n]*\(`model=(\w+)`, ([\d,]+) parameters", block)
        if not head:
            continue
        rows = []
        for line in block.split("::", 1)[1].split("\n\n")[1].splitlines():
            shape = re.search(r"\(([\d, ]+),?\)", line)
            if shape is None:  # the header row
                continue
            params = re.search(r"\)\s+([\d,]+)\s*$", line)
            rows.append(
                (
                    tuple(int(x) for x in shape.group(1).split(",") if x.strip()),
                    int(params.group(1).replace(",", "")) if params else 0,
                )
            )
        tables[head.group(1)] = (int(head.group(2).replace(",", "")), rows)
    return tables


DOCUMENTED = {name: (family, table) for family in BUILDERS for name, table in documented_tables(family).items()}


def spec(name: str, **changes):
    cfg = OmegaConf.load(Path(CONF_DIR) / "model" / f"{name}.yaml")
    return OmegaConf.merge(cfg, changes)


def test_every_model_config_is_documented_by_its_familys_builder():
    assert set(MODEL_CONFIGS) == set(DOCUMENTED)
    assert all(spec(name).family == family for name, (family, _) in DOCUMENTED.items())


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_builds_with_the_documented_layer_table(name):
    _, (parameters, rows) = DOCUMENTED[name]
    model = create_model(spec(name), 10)
    assert model.count_params() == parameters
    # each row of the table is a layer of the model, in order (a row may name a layer and the ones it
    # folds in, such as "BatchNormalization, ReLU"): its output shape, and the parameters of the layers
    # from it up to the next row's layer
    shapes = [tuple(layer.output.shape[1:]) for layer in model.layers]
    params = [layer.count_params() for layer in model.layers]
    start = 0
    for i, (shape, row_params) in enumerate(rows):
        at = shapes.index(shape, start)
        while row_params and params[at] == 0 and shape in shapes[at + 1 :]:
            # a weightless layer of the same shape (dropout after global pooling) folds into the row before
            at = shapes.index(shape, at + 1)
        assert sum(params[start:at]) == 0, (name, i, "parameters in layers the table leaves out")
        assert params[at] == row_params, (name, i, model.layers[at].name)
        start = at + 1
    assert start == len(shapes) or sum(params[start:]) == 0
    assert model.get_layer("output").activation.__name__ == spec(name).output_activation


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_overfits_one_batch(name):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    size = spec(name).input_size
    x = rng.random((16, size, size, 3), dtype=np.float32)
    y = np.arange(16) % 4
    # softmax here: the point is that the layers can fit; the ReLU output's trap is tested below.
    model = create_model(spec(name, output_activation="softmax"), 4)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=16, epochs=60, verbose=0)
    assert history.history["accuracy"][-1] == 1.0
    assert history.history["loss"][-1] < 0.1 * history.history["loss"][0]


def test_relu_output_with_dead_units_scores_ln10_and_passes_no_gradient():
    import tensorflow as tf

    loss = keras.losses.SparseCategoricalCrossentropy()
    dead = tf.zeros((4, 10))
    with tf.GradientTape() as tape:
        tape.watch(dead)
        value = loss(np.array([0, 3, 5, 9]), dead)
    assert math.isclose(float(value), math.log(10), rel_tol=1e-6)
    assert float(tf.reduce_max(tf.abs(tape.gradient(value, dead)))) == 0.0
    # non-probability outputs are renormalised: (2, 1) -> -log(2/3)
    two = loss(np.array([0]), np.array([[2.0, 1.0, 0, 0, 0, 0, 0, 0, 0, 0]], np.float32))
    assert math.isclose(float(two), -math.log((1 - 1e-7) / (2 - 1e-7 + 8e-7)), rel_tol=1e-4)


def test_output_activation_switches_to_softmax():
    model = create_model(spec("modified_lenet", output_activation="softmax"), 10)
    out = model(np.random.default_rng(0).random((2, 128, 128, 3), dtype=np.float32)).numpy()
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"kernel_sizes": [5]}, "one kernel size per conv layer"),
        ({"pooling": "median"}, "model.pooling"),
        ({"padding": "full"}, "model.padding"),
        ({"filters": [6, 16, 16, 16], "kernel_sizes": [5, 5, 5, 5]}, "larger model.input_size"),
        ({"family": "resnet"}, "model.family"),
    ],
)
def test_bad_model_configs_fail_clearly(changes, message):
    with pytest.raises(UserError, match=message):
        create_model(spec("lenet5", **changes), 10)


def test_optional_layers_train_only_and_conv_layers_picks_the_first_slots():
    model = create_model(spec("lenet_search", conv_layers=4, augment_shift=0.125, dropout=0.5), 10)
    names = [layer.name for layer in model.layers]
    assert {"flip", "shift", "conv4", "bn4", "dropout0", "dropout1"} <= set(names)
    assert model.get_layer("conv4").filters == 256 and not model.get_layer("conv1").use_bias
    x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    # inference: augmentation and dropout are the identity, so two calls agree exactly
    assert np.array_equal(model(x, training=False).numpy(), model(x, training=False).numpy())
    assert not np.allclose(model(x, training=True).numpy(), model(x, training=False).numpy())
    plain = create_model(spec("lenet_search", conv_layers=2, batch_norm=False, dropout=0.0, augment_flip=False), 10)
    assert [layer.name for layer in plain.layers] == [
        "image",
        "conv1",
        "pool1",
        "conv2",
        "pool2",
        "gap",
        "dense1",
        "output",
    ]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"conv_layers": 5}, "model.conv_layers=5"),
        ({"dropout": 1.0}, "model.dropout=1.0"),
        ({"augment_shift": -0.1}, "model.augment_shift=-0.1"),
    ],
)
def test_optional_layer_knobs_are_checked(changes, message):
    with pytest.raises(UserError, match=message):
        create_model(spec("lenet_search", **changes), 10)
