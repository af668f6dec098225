"""What speeds up TensorFlow training on this CPU? Each variant in a fresh process (TensorFlow reads its
CPU settings once, when it loads), one after the other, on synthetic uint8 images fed from memory.

    .venv/bin/python benchmarks/compute_options.py            # both models, every variant
    .venv/bin/python benchmarks/compute_options.py lenet5     # one model

Prints training images/s (best of `ROUNDS` rounds of `STEPS` steps after a warm-up) and, for the modified
LeNet, inference images/s at the validation batch sizes. `make bench` is the end-to-end benchmark; this
script is the record of which compute options were tried (docs/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROUNDS, BATCH = 3, 32
STEPS = {"lenet5": 96, "modified_lenet": 16}
# name -> (environment, options); every variant but the first sets TF_ENABLE_ONEDNN_OPTS itself.
VARIANTS = {
    "TensorFlow defaults": ({}, {}),
    "oneDNN on": ({"TF_ENABLE_ONEDNN_OPTS": "1"}, {}),
    "oneDNN on, op determinism": ({"TF_ENABLE_ONEDNN_OPTS": "1"}, {"deterministic": True}),
    "oneDNN on, XLA (jit_compile)": ({"TF_ENABLE_ONEDNN_OPTS": "1"}, {"jit_compile": True}),
    "oneDNN off, XLA (jit_compile)": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, {"jit_compile": True}),
    "oneDNN on, inter-op threads 1": ({"TF_ENABLE_ONEDNN_OPTS": "1"}, {"inter": 1}),
    "oneDNN on, intra-op 1, inter-op 2": ({"TF_ENABLE_ONEDNN_OPTS": "1"}, {"intra": 1, "inter": 2}),
    "oneDNN on, channels_first": ({"TF_ENABLE_ONEDNN_OPTS": "1"}, {"channels_first": True}),
    "oneDNN on, input padded to 4 channels": ({"TF_ENABLE_ONEDNN_OPTS": "1"}, {"channels": 4}),
    "oneDNN on, max-pool before ReLU": ({"TF_ENABLE_ONEDNN_OPTS": "1"}, {"pool_first": True}),
    "oneDNN on, steps_per_execution 32": ({"TF_ENABLE_ONEDNN_OPTS": "1"}, {"steps_per_execution": 32}),
}


def measure(model_name: str, opts: dict) -> dict:
    """Runs in the child: build, warm up, time; returns images/s."""
    import keras
    import numpy as np
    import tensorflow as tf

    if "intra" in opts:
        tf.config.threading.set_intra_op_parallelism_threads(opts["intra"])
    if "inter" in opts:
        tf.config.threading.set_inter_op_parallelism_threads(opts["inter"])
    if opts.get("deterministic"):
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    fmt = "channels_first" if opts.get("channels_first") else "channels_last"
    channels = opts.get("channels", 3)
    L = keras.layers
    if model_name == "lenet5":
        size, convs, pool, dense, optimizer = (
            32,
            [(6, 5, "valid"), (16, 5, "valid")],
            L.AveragePooling2D,
            [120, 84],
            "sgd",
        )
    else:
        size, convs, pool, dense, optimizer = (
            128,
            [(64, 3, "same"), (64, 3, "same"), (32, 3, "same")],
            L.MaxPooling2D,
            [64],
            "adam",
        )
    shape = (size, size, channels) if fmt == "channels_last" else (channels, size, size)
    x = inputs = keras.Input(shape)
    for filters, kernel, padding in convs:
        if opts.get("pool_first"):  # max(relu(z)) == relu(max(z)): the same numbers, ReLU on a quarter
            conv = L.Conv2D(filters, kernel, padding=padding, data_format=fmt)
            x = L.ReLU()(pool(2, data_format=fmt)(conv(x)))
        else:
            conv = L.Conv2D(filters, kernel, padding=padding, activation="relu", data_format=fmt)
            x = pool(2, data_format=fmt)(conv(x))
    x = L.Flatten()(x)
    for width in dense:
        x = L.Dense(width, activation="relu")(x)
    model = keras.Model(inputs, L.Dense(10, activation="softmax")(x))
    spe = opts.get("steps_per_execution", 1)
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=opts.get("jit_compile", False),
        steps_per_execution=spe,
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH * 8, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, BATCH * 8).astype(np.int32)
    ds = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .batch(BATCH)
        .map(lambda a, b: (tf.cast(a, tf.float32) / 255.0, b))
        .cache()
        .repeat()
        .prefetch(2)
    )
    batches = iter(ds)
    model.make_train_function()
    step = model.train_function
    steps = STEPS[model_name]
    calls = max(1, steps // spe)
    for _ in range(max(1, 3 // spe + 1)):
        step(batches)
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(calls):
            logs = step(batches)
        float(logs["loss"])
        best = min(best, time.perf_counter() - started)
    result = {"train_images_per_second": calls * spe * BATCH / best}
    if model_name == "modified_lenet" and spe == 1:
        for eval_batch in (32, 256):
            data = (
                tf.data.Dataset.from_tensor_slices(images)
                .batch(eval_batch)
                .map(lambda a: tf.cast(a, tf.float32) / 255.0)
                .cache()
            )
            model.predict(data, verbose=0)
            started = time.perf_counter()
            model.predict(data, verbose=0)
            result[f"inference_images_per_second_batch_{eval_batch}"] = len(images) / (time.perf_counter() - started)
    return result


def main(models: list[str]) -> None:
    rows = []
    for model_name in models:
        for name, (env, opts) in VARIANTS.items():
            child_env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
            child_env.update(env, TF_CPP_MIN_LOG_LEVEL="2")
            code = (
                f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                "from compute_options import measure; "
                f"print('RESULT', json.dumps(measure({model_name!r}, {opts!r})))"
            )
            done = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True)
            line = [out for out in done.stdout.splitlines() if out.startswith("RESULT ")]
            result = json.loads(line[0][7:]) if line else {"error": done.stderr.strip().splitlines()[-1:]}
            rows.append((model_name, name, result))
            print(model_name, "|", name, "|", json.dumps(result), flush=True)
    print("\n| model | variant | train img/s | inference img/s, batch 32 | batch 256 |\n|---|---|---|---|---|")
    for model_name, name, r in rows:
        cells = [
            f"{r[k]:.1f}" if k in r else ""
            for k in (
                "train_images_per_second",
                "inference_images_per_second_batch_32",
                "inference_images_per_second_batch_256",
            )
        ]
        print(f"| {model_name} | {name} | " + " | ".join(cells) + " |" + (f" {r['error']}" if "error" in r else ""))


if __name__ == "__main__":
    main(sys.argv[1:] or ["lenet5", "modified_lenet"])
