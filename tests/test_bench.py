"""The speed benchmark: both pipelines timed in their own processes, numbers printed and written."""

from __future__ import annotations

import json

import keras

from conftest import make_image_folder, run_cli
from lenet_sweep.bench import model_flops


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
            "bench.cases=[{model:lenet5,optimizer:sgd},{model:modified_lenet,optimizer:adam,steps:1,val_steps:1}]",
            f"bench.output={out}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "| lenet5 (32 px) | lenet_sweep | decode cache |" in text
    assert "| modified_lenet (128 px) | plain Keras | decoded every epoch |" in text
    assert "lenet5: lenet_sweep" in text and "x faster" in text and "Best float32 matmul GFLOP/s: NumPy" in text
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
    capped = report["cases"][1]["results"]["lenet_sweep"]
    assert capped["extrapolated"] and capped["steps_timed"] == 1


def test_bench_needs_a_whole_local_dataset(tmp_path):
    result = run_cli(["lenet_sweep.bench", "data.root=null"])
    assert result.returncode != 0
    assert "set data.root=DIR" in result.stderr
    result = run_cli(["lenet_sweep.bench", f"data.root={tmp_path}", "data.limit_per_class=5"])
    assert result.returncode != 0
    assert "data.limit_per_class" in result.stderr and "Traceback" not in result.stderr
