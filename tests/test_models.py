"""Models: every config in conf/model builds with the documented shapes, trains, and fails clearly."""
from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR
from lenet_sweep.errors import UserError
from lenet_sweep.models import create_model

MODEL_CONFIGS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))

# The layer tables of lenet_sweep/models/lenet.py's docstring.
DOCUMENTED = {
    "lenet5": ([(32, 32, 3), (28, 28, 6), (14, 14, 6), (10, 10, 16), (5, 5, 16), (400,), (120,), (84,),
                (10,)], 62_006, "softmax"),
    "modified_lenet": ([(128, 128, 3), (128, 128, 64), (64, 64, 64), (64, 64, 64), (32, 32, 64),
                        (32, 32, 32), (16, 16, 32), (8192,), (64,), (10,)], 582_186, "relu"),
    # input, flip, then (conv, bn, act, pool) x 3, flatten, dropout, dense, dropout, output
    "lenet_search": ([(32, 32, 3), (32, 32, 3), (32, 32, 32), (32, 32, 32), (32, 32, 32), (16, 16, 32),
                      (16, 16, 64), (16, 16, 64), (16, 16, 64), (8, 8, 64), (8, 8, 64), (8, 8, 64), (8, 8, 64),
                      (4, 4, 64), (1024,), (1024,), (128,), (128,), (10,)], 189_290, "softmax"),
}


def spec(name: str, **changes):
    cfg = OmegaConf.load(Path(CONF_DIR) / "model" / f"{name}.yaml")
    return OmegaConf.merge(cfg, changes)


def test_every_model_config_is_covered():
    assert set(MODEL_CONFIGS) == set(DOCUMENTED)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_builds_with_documented_shapes_and_parameters(name):
    shapes, params, activation = DOCUMENTED[name]
    model = create_model(spec(name), 10)
    assert [tuple(layer.output.shape[1:]) for layer in model.layers] == shapes
    assert model.count_params() == params
    assert model.get_layer("output").activation.__name__ == activation


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_overfits_one_batch(name):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    size = spec(name).input_size
    x = rng.random((16, size, size, 3), dtype=np.float32)
    y = np.arange(16) % 4
    # softmax here: the point is that the layers can fit; the ReLU output's trap is tested below.
    model = create_model(spec(name, output_activation="softmax"), 4)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(),
                  metrics=["accuracy"])
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


@pytest.mark.parametrize("changes, message", [
    ({"kernel_sizes": [5]}, "one kernel size per conv layer"),
    ({"pooling": "median"}, "model.pooling"),
    ({"padding": "full"}, "model.padding"),
    ({"filters": [6, 16, 16, 16], "kernel_sizes": [5, 5, 5, 5]}, "larger model.input_size"),
    ({"family": "resnet"}, "model.family"),
])
def test_bad_model_configs_fail_clearly(changes, message):
    with pytest.raises(UserError, match=message):
        create_model(spec("lenet5", **changes), 10)


def test_optional_layers_train_only_and_conv_layers_picks_the_first_slots():
    model = create_model(spec("lenet_search", conv_layers=4, augment_shift=0.125, dropout=0.5), 10)
    names = [layer.name for layer in model.layers]
    assert {"flip", "shift", "conv4", "bn4", "dropout0", "dropout1"} <= set(names)
    assert model.get_layer("conv4").filters == 128 and not model.get_layer("conv1").use_bias
    x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    # inference: augmentation and dropout are the identity, so two calls agree exactly
    assert np.array_equal(model(x, training=False).numpy(), model(x, training=False).numpy())
    assert not np.allclose(model(x, training=True).numpy(), model(x, training=False).numpy())
    plain = create_model(spec("lenet_search", conv_layers=2, batch_norm=False, dropout=0.0,
                              augment_flip=False), 10)
    assert [layer.name for layer in plain.layers] == ["image", "conv1", "pool1", "conv2", "pool2", "flatten",
                                                       "dense1", "output"]


@pytest.mark.parametrize("changes, message", [
    ({"conv_layers": 5}, "model.conv_layers=5"),
    ({"dropout": 1.0}, "model.dropout=1.0"),
    ({"augment_shift": -0.1}, "model.augment_shift=-0.1"),
])
def test_optional_layer_knobs_are_checked(changes, message):
    with pytest.raises(UserError, match=message):
        create_model(spec("lenet_search", **changes), 10)
