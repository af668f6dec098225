"""Speed benchmark: `python -m lenet_sweep.bench data.root=DIR` (or `make bench DATA=DIR`).

For each case of `bench.cases` (conf/bench.yaml) it times one epoch (training + validation) of
  - lenet_sweep: the decode cache, tf.data from memory and the compile settings every run uses, and
  - plain Keras: `image_dataset_from_directory` (decoding every epoch), the same model, `compile` with
    Keras' defaults, and TensorFlow's own CPU defaults (no TF_ENABLE_ONEDNN_OPTS from lenet_sweep),
each in a fresh process, one after the other, and prints their ratio. It also measures the best float32
matmul GFLOP/s of NumPy and of TensorFlow, and sets the convolutional model's achieved training GFLOP/s
beside them. Each pipeline runs `bench.epochs` epochs in each of `bench.rounds` processes, alternating with
the other pipeline, and its fastest epoch after each process's first counts; cases capped at `steps` train
steps are extrapolated to a full epoch (all epoch timings are in the JSON output).

In lenet_sweep's process it then times the bare train step: the same compiled model's Keras train function,
called directly on a few batches held in memory as float32 tensors, for the same number of steps as an
epoch in `fit`. `fit / bare step` is the share of the step's speed that training keeps inside `fit` (data
feeding, callbacks, the epoch loop); the rest is what `fit` costs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import hydra
import keras
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from lenet_sweep.cli import guarded
from lenet_sweep.config import check, register_configs
from lenet_sweep.errors import UserError

PIPELINES = ("lenet_sweep", "plain Keras")


def numpy_matmul_gflops(n: int, repeats: int) -> float:
    """Best GFLOP/s of an n x n float32 matmul in NumPy over `repeats` tries."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    a @ b  # BLAS warm-up: thread pool start, page faults
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def tensorflow_matmul_gflops(n: int, repeats: int) -> float:
    """Best GFLOP/s of an n x n float32 matmul in TensorFlow (this process's kernels) over `repeats`."""
    import tensorflow as tf

    a, b = tf.random.uniform((n, n)), tf.random.uniform((n, n))
    matmul = tf.function(tf.linalg.matmul)
    matmul(a, b).numpy()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        matmul(a, b).numpy()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def model_flops(model: keras.Model) -> tuple[float, float]:
    """(training, inference) FLOPs per image of the Conv2D and Dense layers (multiply-add = 2).

    Training = forward + weight gradient + input gradient, the last skipped for the layer that reads
    the model's input (nothing needs it). Pooling, activations and the optimizer are left out.
    """
    forward = training = 0.0
    weighted = [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    for i, layer in enumerate(weighted):
        kernel = layer.kernel.shape
        if isinstance(layer, keras.layers.Conv2D):
            out_h, out_w = layer.output.shape[1:3]
            flops = 2.0 * out_h * out_w * np.prod(kernel)
        else:
            flops = 2.0 * np.prod(kernel)
        forward += flops
        training += flops * (2 if i == 0 else 3)
    return training, forward


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch, and of the validation pass inside it."""

    def __init__(self):
        super().__init__()
        self.epochs: list[tuple[float, float]] = []  # (epoch seconds, validation seconds)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._val = time.perf_counter(), 0.0

    def on_test_begin(self, logs=None):
        self._val_started = time.perf_counter()

    def on_test_end(self, logs=None):
        self._val += time.perf_counter() - self._val_started

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append((time.perf_counter() - self._epoch, self._val))


def _datasets(cfg: DictConfig, pipeline: str) -> tuple[Any, Any, int, int, int, float, str]:
    """(train, val, n_train, n_val, classes, seconds to prepare, how) for one pipeline; lenet_sweep's
    (train, val) is (its PreparedData, None): trial.fit makes the datasets."""
    import tensorflow as tf

    from lenet_sweep.data import prepare_data

    size, batch = cfg.model.input_size, cfg.train.batch_size
    started = time.perf_counter()
    if pipeline == "lenet_sweep":  # trial.fit makes the datasets, as in every run
        prepared = prepare_data(cfg.data, size, cfg.seed, progress=lambda line: print(line, flush=True))
        train, val = prepared.decoded["train"], prepared.decoded["val"]
        return (
            prepared,
            None,
            len(train.labels),
            len(val.labels),
            len(prepared.splits.classes),
            time.perf_counter() - started,
            "decode cache" if cfg.data.decode_cache else "decoded in memory",
        )
    # The plain-Keras way: Keras' folder loader for train/, and val/ split 80:20 by the same loader.
    root = Path(cfg.data.root).expanduser()
    common = dict(image_size=(size, size), batch_size=batch, seed=cfg.seed, verbose=False)
    train = keras.utils.image_dataset_from_directory(root / "train", **common)
    val = keras.utils.image_dataset_from_directory(
        root / "val", validation_split=cfg.data.test_fraction, subset="training", **common
    )
    n_train, n_val, classes = len(train.file_paths), len(val.file_paths), len(train.class_names)
    scale = lambda x, y: (x / 255.0, y)  # noqa: E731 - to [0, 1], as lenet_sweep scales
    return (
        train.map(scale).prefetch(tf.data.AUTOTUNE),
        val.map(scale).prefetch(tf.data.AUTOTUNE),
        n_train,
        n_val,
        classes,
        time.perf_counter() - started,
        "decoded every epoch",
    )


BARE_BATCHES = 8  # distinct batches the bare step cycles through (float32 in memory: 50 MB at 128 px)


def time_bare_step(model: keras.Model, split: Any, batch_size: int, steps: int, repeats: int) -> dict:
    """Images/s of `model`'s compiled train function on batches already in memory, `steps` steps per try,
    the fastest of `repeats` tries after a warm-up call.

    The batches are the split's first, made by make_dataset as fit's are and cached once as float32 tensors;
    each try is a fresh iterator over `steps` of them, which Keras' train function consumes
    `steps_per_execution` steps per call, its last call stopping short as the last call of an epoch does.
    """
    from lenet_sweep.data import make_dataset

    kept = max(1, min(BARE_BATCHES, len(split.labels) // batch_size))  # whole batches where there are any
    cached = make_dataset(split, batch_size, shuffle=False).take(kept).cache()
    # Same element spec (batch dimension None) as fit's dataset: the train function fit traced is reused.
    epoch = cached.repeat().take(steps)
    per_call = model.steps_per_execution
    model.make_train_function()
    warm = iter(cached.repeat())
    # The cache is complete only once its input has been read to the end: kept + 1 steps.
    for _ in range(math.ceil((kept + 1) / per_call)):
        logs = model.train_function(warm)
    float(logs["loss"])
    timings = []
    for _ in range(repeats):
        iterator = iter(epoch)
        started = time.perf_counter()
        for _ in range(math.ceil(steps / per_call)):
            logs = model.train_function(iterator)
        float(logs["loss"])  # the last call's results are computed (eager calls return when they are)
        timings.append(time.perf_counter() - started)
    images = steps * min(batch_size, len(split.labels))  # every cached batch is whole, or the split is one
    return {
        "bare_steps_timed": steps,
        "bare_step_images": images,
        "bare_step_timings": timings,
        "bare_step_images_per_second": images / min(timings),
    }


def time_case(
    container: dict, pipeline: str, steps: int | None, val_steps: int | None, epochs: int, matmul: tuple[int, int]
) -> dict:
    """Time `epochs` epochs of one pipeline in this process; the fastest after the first counts.
    Runs in a child process (see `_in_child`)."""
    import tensorflow as tf

    from lenet_sweep import trial
    from lenet_sweep.models import create_model

    cfg = OmegaConf.create(container)
    train_ds, val_ds, n_train, n_val, classes, prep_seconds, how = _datasets(cfg, pipeline)
    keras.utils.set_random_seed(cfg.seed)
    if pipeline == "lenet_sweep":
        if cfg.train.deterministic:
            tf.config.experimental.enable_op_determinism()
        model = trial.compile_model(cfg, classes)
    else:
        model = create_model(cfg.model, classes)
        model.compile(
            optimizer=trial.make_optimizer(cfg.optimizer),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
        )
    batch = cfg.train.batch_size
    full_steps, full_val_steps = math.ceil(n_train / batch), math.ceil(n_val / batch)
    # Keras runs whole executions of `steps_per_execution` steps, so a cap is rounded up to one; both
    # pipelines time the same number of steps.
    per_call = cfg.train.steps_per_execution
    steps = min(math.ceil(steps / per_call) * per_call, full_steps) if steps else None
    val_steps = min(math.ceil(val_steps / per_call) * per_call, full_val_steps) if val_steps else None
    timer = EpochTimer()
    if pipeline == "lenet_sweep":  # the path every run takes (no MLflow run here: nothing is logged)
        trial.fit(
            cfg,
            model,
            train_ds,
            seed=cfg.seed,
            callbacks=[timer],
            epochs=epochs,
            steps_per_epoch=steps,
            validation_steps=val_steps,
        )
    else:
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            steps_per_epoch=steps,
            validation_steps=val_steps,
            callbacks=[timer],
            verbose=0,
            shuffle=False,
        )
    # The fastest epoch after the first (which traces the step functions and warms caches): this
    # machine shares its cores, and another tenant's load only ever makes an epoch slower.
    epoch_s, val_s = min(timer.epochs[1:] or timer.epochs)
    train_s = epoch_s - val_s
    # Per-step rates scale a capped epoch up to the whole split; a cap of the whole split counts its last,
    # partial batch as it is.
    train_images = min(steps * batch, n_train) if steps else n_train
    val_images = min(val_steps * batch, n_val) if val_steps else n_val
    train_epoch_s = train_s * (full_steps / steps if steps else 1.0)
    val_epoch_s = val_s * (full_val_steps / val_steps if val_steps else 1.0)
    train_flops, _ = model_flops(model)
    bare = {}
    if pipeline == "lenet_sweep":  # as many tries as fit's timed epochs, after fit: its timings stay untouched
        bare = time_bare_step(
            model, train_ds.decoded["train"], batch, steps or full_steps, max(1, len(timer.epochs) - 1)
        )
    return {
        "pipeline": pipeline,
        "input": how,
        "prepare_seconds": prep_seconds,
        "n_train": n_train,
        "n_val": n_val,
        "epoch_timings": [{"epoch_seconds": e, "val_seconds": v} for e, v in timer.epochs],
        "steps_timed": steps or full_steps,
        "val_steps_timed": val_steps or full_val_steps,
        "extrapolated": bool(steps or val_steps),
        "train_seconds": train_epoch_s,
        "val_seconds": val_epoch_s,
        "epoch_seconds": train_epoch_s + val_epoch_s,
        "train_images_per_second": train_images / train_s,
        "val_images_per_second": val_images / val_s,
        "train_gflop_per_image": train_flops / 1e9,
        "achieved_gflops": train_flops * train_images / train_s / 1e9,
        "tf_matmul_gflops": tensorflow_matmul_gflops(*matmul),
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(TensorFlow's default)"),
        "tensorflow": tf.__version__,
        **bare,
    }


def _in_child(pipeline: str, *args) -> dict:
    """`time_case` in a fresh process: TensorFlow reads its CPU settings once, when it loads, so the
    baseline gets its own process with TensorFlow's defaults; one child at a time (2 cores)."""
    saved = os.environ.copy()
    if pipeline == "plain Keras":
        os.environ.pop("TF_ENABLE_ONEDNN_OPTS", None)
        os.environ["LENET_SWEEP_TF_DEFAULTS"] = "1"
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(time_case, *args).result()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def compose_cases(cfg: DictConfig, task_overrides: list[str]) -> list[tuple[Any, dict]]:
    """(case, its resolved train config) for each of `cfg.bench.cases`: conf/train.yaml with the command
    line's non-bench overrides, then the case's model, optimizer and input size. Needs Hydra initialised."""
    shared = [o for o in task_overrides if not o.lstrip("+~").startswith("bench")]
    cases = []
    for case in cfg.bench.cases:
        overrides = [*shared, f"model={case.model}", f"optimizer={case.optimizer}"]
        if case.input_size:
            overrides.append(f"model.input_size={case.input_size}")
        try:
            case_cfg = hydra.compose(config_name="train", overrides=overrides)
        except HydraException as err:
            raise UserError(
                f"the bench case {case.model}/{case.optimizer} cannot take these overrides: {str(err).splitlines()[0]}"
            ) from None
        check(case_cfg)
        cases.append((case, OmegaConf.to_container(case_cfg, resolve=True)))
    return cases


def run_bench(cfg: DictConfig, task_overrides: list[str]) -> dict:
    """Time every case with both pipelines; return all numbers (see `format_report`)."""
    if not cfg.data.root:
        raise UserError("the benchmark reads a local dataset: set data.root=DIR (or make bench DATA=DIR)")
    if cfg.data.limit_per_class:
        raise UserError(
            "data.limit_per_class would time lenet_sweep on fewer images than the plain-Keras "
            "baseline, which reads whole folders: leave it unset for the benchmark"
        )
    check(cfg)
    cases = compose_cases(cfg, task_overrides)
    matmul = (cfg.bench.matmul_size, cfg.bench.matmul_repeats)
    report: dict[str, Any] = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "numpy_matmul_gflops": numpy_matmul_gflops(*matmul),
        "cases": [],
    }
    pipelines = PIPELINES if cfg.bench.baseline else PIPELINES[:1]
    for case, container in cases:
        row = {
            "model": case.model,
            "optimizer": case.optimizer,
            "input_size": container["model"]["input_size"],
            "results": {},
        }
        # Rounds alternate the pipelines, so a neighbour's load on this shared machine hits both alike.
        for round_ in range(1, cfg.bench.rounds + 1):
            for pipeline in pipelines:
                print(
                    f"== {case.model} at {row['input_size']} px: {pipeline}, round {round_}/{cfg.bench.rounds}",
                    flush=True,
                )
                result = _in_child(pipeline, container, pipeline, case.steps, case.val_steps, cfg.bench.epochs, matmul)
                best = row["results"].get(pipeline)
                timings = (best["epoch_timings"] if best else []) + result["epoch_timings"]
                if not best or result["epoch_seconds"] < best["epoch_seconds"]:
                    best = result
                merged = {**best, "epoch_timings": timings, "epochs_timed": max(round_, len(timings) - round_)}
                if "bare_step_timings" in result:
                    # The fastest bare step of any round against the fastest fit: load only slows either down.
                    earlier = row["results"].get(pipeline, {}).get("bare_step_timings", [])
                    bare_timings = earlier + result["bare_step_timings"]
                    bare_rate = result["bare_step_images"] / min(bare_timings)
                    merged.update(
                        bare_step_timings=bare_timings,
                        bare_step_images_per_second=bare_rate,
                        fit_over_bare_step=merged["train_images_per_second"] / bare_rate,
                    )
                row["results"][pipeline] = merged
        report["cases"].append(row)
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _label(row: dict) -> str:
    return f"{row['model']} ({row['input_size']} px)"  # one model may be a case at several sizes


def format_report(report: dict) -> str:
    """The benchmark's numbers as a markdown table and a compute summary."""
    lines = [
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores",
        "",
        "| model | pipeline | input | s/epoch (train + val) | train s | val s | train img/s | "
        "bare step img/s | fit / bare step | val img/s | achieved GFLOP/s | timed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["cases"]:
        for pipeline, r in row["results"].items():
            timed = (
                f"{r['steps_timed']} + {r['val_steps_timed']} steps, extrapolated"
                if r["extrapolated"]
                else "full epochs"
            ) + f", best of {r['epochs_timed']}"
            bare = (
                f"{r['bare_step_images_per_second']:.0f} | {r['fit_over_bare_step']:.0%}"
                if "bare_step_images_per_second" in r
                else "- | -"
            )
            lines.append(
                f"| {_label(row)} | {pipeline} | {r['input']} | "
                f"{r['epoch_seconds']:.1f} | {r['train_seconds']:.1f} | {r['val_seconds']:.1f} | "
                f"{r['train_images_per_second']:.0f} | {bare} | {r['val_images_per_second']:.0f} | "
                f"{r['achieved_gflops']:.1f} | {timed} |"
            )
    lines.append("")
    best = {"NumPy": report["numpy_matmul_gflops"]}
    for row in report["cases"]:
        for pipeline, r in row["results"].items():
            best[f"TensorFlow ({pipeline}: TF_ENABLE_ONEDNN_OPTS={r['TF_ENABLE_ONEDNN_OPTS']})"] = r["tf_matmul_gflops"]
    top = max(best.values())
    lines.append("Best float32 matmul GFLOP/s: " + "; ".join(f"{k} {v:.1f}" for k, v in best.items()))
    for row in report["cases"]:
        ours = row["results"]["lenet_sweep"]
        base = row["results"].get("plain Keras")
        if "bare_step_images_per_second" in ours:
            lines.append(
                f"{_label(row)}: training in fit {ours['train_images_per_second']:.0f} images/s = "
                f"{ours['fit_over_bare_step']:.0%} of its bare train step's {ours['bare_step_images_per_second']:.0f} "
                f"(same process and model, {ours['bare_steps_timed']} steps on float32 batches in memory)"
            )
        if base:
            lines.append(
                f"{_label(row)}: lenet_sweep {ours['epoch_seconds']:.1f} s/epoch vs plain Keras "
                f"{base['epoch_seconds']:.1f} s/epoch: {base['epoch_seconds'] / ours['epoch_seconds']:.2f}x "
                "faster"
            )
        lines.append(
            f"{_label(row)}: {ours['train_gflop_per_image']:.3f} GFLOP per training image, "
            f"{ours['achieved_gflops']:.1f} GFLOP/s achieved = {ours['achieved_gflops'] / top:.0%} of the "
            f"best matmul ({top:.1f})"
            + (
                f"; plain Keras {base['achieved_gflops']:.1f} GFLOP/s = {base['achieved_gflops'] / top:.0%}"
                if base
                else ""
            )
        )
    return "\n".join(lines) + "\n"


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    report = guarded(lambda: run_bench(cfg, list(HydraConfig.get().overrides.task)))
    text = format_report(report)
    print("\n" + text)
    if cfg.bench.output:
        Path(cfg.bench.output).write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"numbers written to {cfg.bench.output}")


if __name__ == "__main__":
    main()
