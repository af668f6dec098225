"""Shared fixtures: tiny generated image folders (never the real dataset) and a temporary MLflow store."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Quieter TensorFlow in test logs; set before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The decode cache of every test (and of the CLI processes they start) in a folder of this session's,
# never the user's ~/.cache.
os.environ["LENET_SWEEP_CACHE"] = tempfile.mkdtemp(prefix="lenet_sweep-test-cache-")
# Tests use temporary stores only, never the store (or server) the user's shell points MLflow at.
os.environ.pop("MLFLOW_TRACKING_URI", None)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "imagenette"


def _pattern(label: int, index: int, size: int) -> np.ndarray:
    """An RGB image a small CNN can tell apart by class: a class-specific colour and stripe direction."""
    rng = np.random.default_rng(label * 1000 + index)
    hue = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 181 + 40) % 256], float)
    y, x = np.mgrid[0:size, 0:size]
    stripes = np.sin((x if label % 2 else y) * (0.3 + 0.15 * label))[..., None]
    img = hue * (0.6 + 0.4 * stripes) + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, classes=("n01440764", "n02102040", "n03000684"), n_train=8,
                      n_val=10, size=40, messy=True) -> Path:
    """root/train/<class>/*.JPEG and root/val/<class>/*.JPEG, plus, when `messy`, the awkward files:
    a grayscale JPEG, a CMYK JPEG, a PNG with alpha (all decodable), a truncated JPEG and a text
    file named .jpg (both skipped), a hidden file and a README.txt (ignored)."""
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_pattern(label, i + (0 if split == "train" else 500), size)).save(
                    folder / f"img_{i:03d}.JPEG", quality=90)
    if messy:
        first = root / "train" / classes[0]
        rgb = Image.fromarray(_pattern(0, 900, size))
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
