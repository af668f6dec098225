"""The speed benchmark: both pipelines timed in their own processes, numbers printed and written."""

from __future__ import annotations

import json

import keras
import numpy as np
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, REPO, make_image_folder, run_cli
from lenet_sweep.bench import compose_cases, format_report, model_flops
from lenet_sweep.config import register_configs


def test_model_flops_counts_conv_and_dense_by_hand():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.Flatten(),
            keras.layers.Dense(5),
        ]
    )
    conv = 2 * 8 * 8 * 3 * 3 * 3 * 4
    dense = 2 * 8 * 8 * 4 * 5
    training, forward = model_flops(model)
    assert forward == conv + dense
    assert training == 2 * conv + 3 * dense  # the first layer needs no input gradient


def test_bench_times_both_pipelines_and_prints_the_ratio(tmp_path):
    # A plain folder: Keras' own loader, the baseline, would stop at the messy fixture's corrupt files.
    root = make_image_folder(tmp_path / "d", n_train=12, n_val=10, messy=False)
    out = tmp_path / "bench.json"
    result = run_cli(
        [
            "lenet_sweep.bench",
            f"data.root={root}",
            "bench.matmul_size=128",
            "bench.epochs=2",
            "train.steps_per_execution=1",  # else the 1-step cap is rounded up to a whole epoch
            # One capped case, two rounds: 4 processes, each starting TensorFlow (seconds apiece)
            "bench.cases=[{model:lenet5,optimizer:sgd,steps:1,val_steps:1}]",
            f"bench.output={out}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "| lenet5 (32 px) | lenet_sweep | decode cache |" in text
    assert "| lenet5 (32 px) | plain Keras | decoded every epoch |" in text
    assert "lenet5 (32 px): lenet_sweep" in text and "x faster" in text and "Best float32 matmul GFLOP/s: NumPy" in text
    assert "| bare step img/s | fit / bare step |" in text
    assert "lenet5 (32 px): training in fit" in text and "of its bare train step's" in text
    report = json.loads(out.read_text())
    assert report["numpy_matmul_gflops"] > 0
    for case in report["cases"]:
        ours, keras_ = case["results"]["lenet_sweep"], case["results"]["plain Keras"]
        assert ours["n_train"] == keras_["n_train"] == 36
        # The baseline runs with TensorFlow's own CPU settings, ours with oneDNN on.
        assert ours["TF_ENABLE_ONEDNN_OPTS"] == "1"
        assert keras_["TF_ENABLE_ONEDNN_OPTS"] == "(TensorFlow's default)"
        for r in (ours, keras_):
            assert r["epoch_seconds"] > 0 and r["tf_matmul_gflops"] > 0 and r["achieved_gflops"] > 0
            assert len(r["epoch_timings"]) == 4 and r["epochs_timed"] == 2  # 2 rounds of 2 epochs, 1 warm-up each
        # The bare train step: lenet_sweep's process only, as many steps as an epoch in fit, one try per
        # timed epoch in each round.
        assert "bare_step_images_per_second" not in keras_
        assert ours["bare_steps_timed"] == ours["steps_timed"] and len(ours["bare_step_timings"]) == 2
        assert ours["bare_step_images_per_second"] > 0
        assert ours["fit_over_bare_step"] == ours["train_images_per_second"] / ours["bare_step_images_per_second"]
    capped = report["cases"][0]["results"]["lenet_sweep"]
    assert capped["extrapolated"] and capped["steps_timed"] == 1


def test_default_cases_include_the_sweeps_family_at_32_and_64_px():
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="bench", overrides=["data.root=/nowhere", "train.batch_size=16"])
        cases = compose_cases(cfg, ["data.root=/nowhere", "train.batch_size=16"])
    sizes = [(case.model, container["model"]["input_size"]) for case, container in cases]
    assert sizes == [("lenet5", 32), ("modified_lenet", 128), ("lenet_search", 32), ("lenet_search", 64)]
    for case, container in cases:
        assert container["train"]["batch_size"] == 16  # the command line's overrides reach every case
        assert container["optimizer"]["name"] == ("SGD" if case.optimizer == "sgd" else "Adam")
    assert cases[3][0].steps  # 64 px is capped, so the benchmark stays minutes long


def test_a_case_sets_its_input_size_and_the_report_names_each_size(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=12, n_val=10, messy=False)
    out = tmp_path / "bench.json"
    result = run_cli(
        [
            "lenet_sweep.bench",
            f"data.root={root}",
            "bench.matmul_size=64",
            "bench.epochs=2",
            "bench.rounds=1",
            "bench.baseline=false",
            "train.batch_size=8",  # 36 images: 5 steps, the last of 4 images
            "train.steps_per_execution=2",  # the bare step's third call stops short, as the epoch's does
            "bench.cases=[{model:lenet_search,optimizer:adam,input_size:48,val_steps:1}]",
            f"bench.output={out}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| lenet_search (48 px) | lenet_sweep | decode cache |" in result.stdout
    assert "lenet_search (48 px): training in fit" in result.stdout
    (case,) = json.loads(out.read_text())["cases"]
    ours = case["results"]["lenet_sweep"]
    assert case["input_size"] == 48 and list(case["results"]) == ["lenet_sweep"]
    assert ours["steps_timed"] == ours["bare_steps_timed"] == 5
    assert len(ours["bare_step_timings"]) == 1 and ours["fit_over_bare_step"] > 0


def test_report_without_a_bare_step_leaves_its_cells_empty():
    result = {
        "input": "decode cache",
        "epoch_seconds": 2.0,
        "train_seconds": 1.5,
        "val_seconds": 0.5,
        "train_images_per_second": 100.0,
        "val_images_per_second": 300.0,
        "achieved_gflops": 1.0,
        "train_gflop_per_image": 0.01,
        "tf_matmul_gflops": 10.0,
        "TF_ENABLE_ONEDNN_OPTS": "1",
        "steps_timed": 4,
        "val_steps_timed": 2,
        "extrapolated": False,
        "epochs_timed": 2,
    }
    report = {
        "machine": {"cpu": "x", "cores": 2},
        "numpy_matmul_gflops": 10.0,
        "cases": [{"model": "m", "input_size": 8, "results": {"lenet_sweep": result}}],
    }
    text = format_report(report)
    assert "| 100 | - | - | 300 |" in text and "bare train step" not in text
    bare = {**result, "bare_step_images_per_second": 125.0, "fit_over_bare_step": 0.8, "bare_steps_timed": 4}
    report["cases"][0]["results"]["lenet_sweep"] = bare
    text = format_report(report)
    assert "| 100 | 125 | 80% | 300 |" in text
    assert "m (8 px): training in fit 100 images/s = 80% of its bare train step's 125" in text


def test_bench_needs_a_whole_local_dataset(tmp_path):
    result = run_cli(["lenet_sweep.bench", "data.root=null"])
    assert result.returncode != 0
    assert "set data.root=DIR" in result.stderr
    result = run_cli(["lenet_sweep.bench", f"data.root={tmp_path}", "data.limit_per_class=5"])
    assert result.returncode != 0
    assert "data.limit_per_class" in result.stderr and "Traceback" not in result.stderr


def _feeding():
    """benchmarks/feeding.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("feeding", REPO / "benchmarks" / "feeding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_feeding_variant_feeds_make_datasets_batches_bit_for_bit():
    import tensorflow as tf

    from lenet_sweep.data import DecodedSplit, make_dataset

    feeding = _feeding()
    # Every uint8 value occurs, so "the same float32 bits" holds for any image, not only these.
    images = np.arange(20 * 6 * 6 * 3).reshape(20, 6, 6, 3).astype(np.uint8)
    split = DecodedSplit(images, np.arange(20, dtype=np.int32) % 3, [], [])
    epoch = tf.Variable(0, dtype=tf.int64)
    made = feeding.variants()
    reference = make_dataset(split, 8, True, 7, epoch)
    for name, make in made.items():
        assert feeding.same_batches(reference, make(split, 8, True, 7, epoch), epoch, epochs=3), name
    for shuffle in (True, False):  # validation and test batches too
        earlier = made["parallel map, autotuned prefetch (the earlier make_dataset)"](split, 8, shuffle, 7, epoch)
        assert feeding.same_batches(make_dataset(split, 8, shuffle, 7, epoch), earlier, epoch)
    assert not feeding.same_batches(reference, make_dataset(split, 8, True, 8, epoch), epoch)  # the check can fail


def test_feeding_benchmark_times_each_variant_and_the_bare_step(monkeypatch):
    feeding = _feeding()
    monkeypatch.setattr(feeding, "ROUNDS", 1)
    monkeypatch.setattr(feeding, "EPOCHS", 2)
    monkeypatch.setattr(feeding, "CASES", {"lenet5": 2})
    results = dict(feeding.measure("lenet5"))
    assert list(results) == ["bare train step", *feeding.variants()]
    assert all(len(seconds) == 1 and seconds[0] > 0 for seconds in results.values())
