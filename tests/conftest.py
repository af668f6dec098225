"""Shared helpers and fixtures: tiny generated image folders (never the real dataset), temporary MLflow
stores, configs composed as the commands compose them, the commands run as users type them, and one
session-wide tiny sweep."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from PIL import Image

# Quieter TensorFlow in test logs; set before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The decode cache of every test (and of the CLI processes they start) in a folder of this session's,
# never the user's ~/.cache.
os.environ["LENET_SWEEP_CACHE"] = tempfile.mkdtemp(prefix="lenet_sweep-test-cache-")
# Tests use temporary stores only, never the store (or server) the user's shell points MLflow at.
os.environ.pop("MLFLOW_TRACKING_URI", None)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
REPO = Path(CONF_DIR).parent
# The report's section headings, in order: every report, however odd its sweep, has each of them.
SECTIONS = (
    "Answers in short",
    "Table I: packages",
    "Table II: test accuracy",
    "Softmax or ReLU output?",
    "More filters or more conv layers?",
    "Other dense widths?",
    "5, 10 or 25 epochs?",
    "Where does overfitting start?",
    "Learning curves of the best configurations",
    "Which hyperparameters matter?",
    "Validation accuracy against each hyperparameter",
    "What does accuracy cost?",
    "The winner over seeds",
    "Test: confusion matrix and the most confused classes",
    "Misclassified test images of the winner",
    "Data check (representativeness)",
    "Provenance",
)
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "imagenette"


def pattern(label: int, index: int, size: int) -> np.ndarray:
    """An RGB image a small CNN can tell apart by class: a class-specific colour and stripe direction."""
    rng = np.random.default_rng(label * 1000 + index)
    hue = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 181 + 40) % 256], float)
    y, x = np.mgrid[0:size, 0:size]
    stripes = np.sin((x if label % 2 else y) * (0.3 + 0.15 * label))[..., None]
    img = hue * (0.6 + 0.4 * stripes) + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def png_header(width: int, height: int) -> bytes:
    """A valid PNG claiming width x height 8-bit gray pixels, with a few bytes of data: a decompression
    bomb's shape (decoding it would allocate width x height bytes and more)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def make_image_folder(
    root: Path, classes=("n01440764", "n02102040", "n03000684"), n_train=8, n_val=10, size=40, messy=True
) -> Path:
    """root/train/<class>/*.JPEG and root/val/<class>/*.JPEG, plus, when `messy`, the awkward files:
    a grayscale JPEG, a CMYK JPEG, a PNG with alpha (all decodable), a truncated JPEG and a text
    file named .jpg (both skipped), a hidden file and a README.txt (ignored)."""
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(pattern(label, i + (0 if split == "train" else 500), size)).save(
                    folder / f"img_{i:03d}.JPEG", quality=90
                )
    if messy:
        first = root / "train" / classes[0]
        rgb = Image.fromarray(pattern(0, 900, size))
        rgb.convert("L").save(first / "gray.JPEG")
        rgb.convert("CMYK").save(first / "cmyk.jpg")
        rgba = rgb.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(first / "alpha.png")
        whole = (first / "img_000.JPEG").read_bytes()
        (first / "truncated.JPEG").write_bytes(whole[: len(whole) // 2])
        (first / "notes.jpg").write_text("this is not an image")
        (first / ".DS_Store").write_bytes(b"\0\1")
        (first / "README.txt").write_text("ignored")
        (root / "train" / ".cache").mkdir()
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A temporary SQLite MLflow store URI (artifacts land beside it)."""
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


# ---- configs and commands ----------------------------------------------------------------------


def compose_config(name: str, overrides: list[str] = ()):
    """conf/<name>.yaml with `overrides`, as `python -m lenet_sweep.<command>` composes it."""
    from lenet_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def compose_sweep(overrides: list[str]):
    """(config, optimizers) as `python -m lenet_sweep.sweep OVERRIDES` composes them."""
    from lenet_sweep import sweep
    from lenet_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="sweep", overrides=overrides)
        return cfg, sweep.compose_optimizers(cfg, overrides)


def sweep_overrides(folder: Path, tmp_path: Path, store: str, *more: str, name: str = "t") -> list[str]:
    """A small sweep's overrides: data in `folder`, runs in `store` (experiment "sweep"), state in tmp_path."""
    return [
        f"data.root={folder}",
        f"mlflow.tracking_uri={store}",
        "mlflow.experiment=sweep",
        f"sweep.name={name}",
        f"sweep.dir={tmp_path / 'state'}",
        "train.batch_size=8",
        *more,
    ]


def runs_of(store: str, kind: str, experiment: str = "sweep") -> list:
    """The runs of `kind` (tag lenet_sweep.kind) in the experiment, oldest first."""
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    return (
        client.search_runs(
            [exp.experiment_id], f"tags.`lenet_sweep.kind` = '{kind}'", order_by=["attributes.start_time ASC"]
        )
        if exp
        else []
    )


def run_cli(args: list[str], cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m ARGS` (or `python ARGS` for a script path) as a user runs it, bounded in time."""
    # mlflow.set_tracking_uri (earlier tests, in this process) exports MLFLOW_TRACKING_URI, which the
    # commands read as the store to use: each command here gets only the store its arguments name.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_clis(commands: list[list[str]], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """`run_cli` for each of `commands`, all at once (each spends seconds starting Python and TensorFlow on one
    core; the machine has two), bounded in time together; every process is killed if time runs out."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    started = [
        (
            args,
            subprocess.Popen(
                [sys.executable, "-m", *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for args in commands
    ]
    done = []
    try:
        for args, process in started:
            out, err = process.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess([sys.executable, "-m", *args], process.returncode, out, err))
    finally:
        for _, process in started:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return done


def all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact path of a run, recursively."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= all_artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


# ---- one tiny sweep for the whole session ------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> dict:
    """A finished two-trial random sweep (dense_1 in {16, 32}, 2 epochs) in its own store, shared by the
    tests that only read a sweep: {"store", "experiment", "trials" (run id by run name), "folder", "tmp",
    "overrides", "result"}. Tests add to it (a metric, a tag) but never change or remove what is there."""
    from lenet_sweep import sweep

    tmp = tmp_path_factory.mktemp("tiny-sweep")
    folder = make_image_folder(tmp / "data", n_train=8, n_val=6, size=36, messy=False)
    store = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    overrides = sweep_overrides(
        folder, tmp, store, "search=tiny", "tuner=random", "tuner.max_trials=2", "train.epochs=2", name="ui"
    )
    cfg, optimizers = compose_sweep(overrides)
    result = sweep.run_sweep(cfg, optimizers)
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("sweep").experiment_id
    trials = {client.get_run(r["run_id"]).info.run_name: r["run_id"] for r in result.rows}
    return {
        "store": store,
        "experiment": experiment,
        "trials": trials,
        "folder": folder,
        "tmp": tmp,
        "overrides": overrides,
        "result": result,
    }
