"""How much of the bare train step does training keep inside `fit`, with each way of feeding it batches?

    .venv/bin/python benchmarks/feeding.py                          # every case below
    .venv/bin/python benchmarks/feeding.py lenet5 lenet_search@64   # some cases (model[@input size])

For each case, in one process: the model compiled as every run compiles it (trial.compile_model), synthetic
uint8 images, then, interleaved over `ROUNDS` rounds so a neighbour's load hits every variant alike, Keras
`fit` with the run's per-epoch callbacks on each feeding variant below and the bare train step
(lenet_sweep.bench.time_bare_step: the same train function on float32 batches already in memory). Prints
each variant's train seconds per epoch (median and fastest of the epochs after each fit's first) and
`fit / bare step`. Every variant is checked to feed exactly the batches `make_dataset` feeds (same order,
same float32 bits) before it is timed, so a faster one can replace it without changing any result.

`make bench` measures fit against the bare step for the pipeline as it is; this script is where another
pipeline is tried. All four default cases take about 8 minutes on the project's 2-core machine.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

import lenet_sweep  # noqa: F401 - sets TF_ENABLE_ONEDNN_OPTS, as every run has it, before TensorFlow loads

ROUNDS, EPOCHS, BATCH = 3, 3, 32  # interleaved rounds; epochs per fit (the first traces); images per step
# case -> train steps per epoch (the synthetic training set's size); capped where a step is slow.
CASES = {"lenet5": 128, "lenet_search@32": 64, "lenet_search@64": 32, "modified_lenet": 8}


def variants() -> dict:
    """name -> make_dataset-like function. All build the same batches from the same ops."""
    import tensorflow as tf

    from lenet_sweep.data import make_dataset

    def batches(split, batch_size, shuffle, seed=0, epoch=None, *, parallel=False, prefetch=2, scaled_once=False):
        images, labels, n = tf.constant(split.images), tf.constant(split.labels), len(split.labels)
        if scaled_once:  # the same cast and division, on every image at once (4x the memory of uint8)
            images = tf.cast(images, tf.float32) / 255.0

        def order(idx):
            return tf.random.experimental.index_shuffle(
                idx, tf.stack([tf.constant(seed, tf.int64), epoch.read_value()]), n - 1
            )

        def load(idx):
            x = tf.gather(images, idx)
            return (x if scaled_once else tf.cast(x, tf.float32) / 255.0), tf.gather(labels, idx)

        ds = tf.data.Dataset.range(n).batch(batch_size)
        if parallel:  # make_dataset until the bare-step line of `make bench`: two maps, autotuned
            ds = ds.map(order) if shuffle else ds
            return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

        def batch_of(idx):
            return load(order(idx) if shuffle else idx)

        ds = ds.map(batch_of)
        ds = ds.prefetch(prefetch) if prefetch else ds
        opts = tf.data.Options()
        opts.autotune.enabled = False
        return ds.with_options(opts)

    return {
        "make_dataset (one map, prefetch 2, no autotune)": make_dataset,
        "parallel map, autotuned prefetch (the earlier make_dataset)": lambda *a, **k: batches(*a, **k, parallel=True),
        "one map, no prefetch, no autotune": lambda *a, **k: batches(*a, **k, prefetch=0),
        "float32 scaled once, one map, prefetch 2": lambda *a, **k: batches(*a, **k, scaled_once=True),
    }


def same_batches(reference, candidate, epoch, epochs: int = 2) -> bool:
    """Whether two datasets yield bit-identical batches for `epochs` values of the epoch variable."""
    for e in range(epochs):
        epoch.assign(e)
        for (x0, y0), (x1, y1) in zip(reference, candidate, strict=True):
            if not (np.array_equal(x0.numpy().view(np.uint32), x1.numpy().view(np.uint32)) and np.array_equal(y0, y1)):
                return False
    return True


def measure(case: str) -> list[tuple[str, list[float]]]:
    """(variant, train seconds of each timed epoch or bare try) for one case, interleaved over ROUNDS."""
    import keras
    import tensorflow as tf
    from hydra import compose, initialize_config_dir

    from lenet_sweep import trial
    from lenet_sweep.bench import EpochTimer, time_bare_step
    from lenet_sweep.config import register_configs
    from lenet_sweep.data import DecodedSplit, make_dataset

    model_name, _, size = case.partition("@")
    overrides = [f"model={model_name}", "optimizer=adam", *([f"model.input_size={size}"] if size else [])]
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    model = trial.compile_model(cfg, 10)
    side, steps = cfg.model.input_size, CASES.get(case, 32)
    rng = np.random.default_rng(0)
    n = steps * BATCH
    split = DecodedSplit(rng.integers(0, 256, (n, side, side, 3), np.uint8), rng.integers(0, 10, n, np.int32), [], [])
    counter = tf.Variable(0, dtype=tf.int64, trainable=False)
    feeds = variants()
    reference = make_dataset(split, BATCH, True, 0, counter)
    for name, make in feeds.items():
        if not same_batches(reference, make(split, BATCH, True, 0, counter), counter):
            raise SystemExit(f"{name} feeds other batches than make_dataset: not a candidate")
    timings: dict[str, list[float]] = {"bare train step": [], **{name: [] for name in feeds}}
    for _ in range(ROUNDS):
        for name, make in feeds.items():
            timer = EpochTimer()
            model.fit(
                make(split, BATCH, True, 0, counter),
                epochs=EPOCHS,
                callbacks=[trial.EpochCounter(counter), keras.callbacks.TerminateOnNaN(), timer],
                verbose=0,
                shuffle=False,
            )
            timings[name] += [seconds for seconds, _ in timer.epochs[1:]]
        timings["bare train step"] += time_bare_step(model, split, BATCH, steps, EPOCHS - 1)["bare_step_timings"]
    return list(timings.items())


def main(cases: list[str]) -> None:
    rows = []
    for case in cases:
        started = time.perf_counter()
        results = measure(case)
        bare = statistics.median(results[0][1])
        for name, seconds in results:
            rows.append((case, name, statistics.median(seconds), min(seconds), bare / statistics.median(seconds)))
            print(" | ".join(f"{v:.3f}" if isinstance(v, float) else v for v in rows[-1]), flush=True)
        print(f"({case}: {time.perf_counter() - started:.0f} s)", flush=True)
    print("\n| case | feeding | median s/epoch | fastest | fit / bare step (medians) |\n|---|---|---|---|---|")
    for case, name, median, fastest, ratio in rows:
        print(f"| {case} | {name} | {median:.3f} | {fastest:.3f} | {ratio:.0%} |")


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
