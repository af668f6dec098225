"""Data: find the image folders, split them as the study did, decode once, feed through tf.data.

The study's protocol: `train/` trains; `val/` is split 80:20, stratified by class, into validation and
test. Classes are the sorted folder names of `train/`, pinned for every split. Images of any channel
layout become RGB, are resized as Keras' `image_dataset_from_directory` resizes them
(`tf.image.resize`, bilinear, no antialias) and are kept in memory as uint8 (and on disk, see
cache.py); batches are scaled to [0, 1] on the fly. Files that fail to decode are skipped and
reported; nothing under the data root is ever written.
"""
from __future__ import annotations

import os
import unicodedata
import urllib.parse
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from lenet_sweep.errors import UserError

# Suffixes Pillow decodes that image folders commonly hold; anything else is listed as ignored.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")


class DataError(UserError):
    """A problem with the user's data folder, phrased so the user knows what to fix."""


@dataclass
class SplitFiles:
    """The files of one split: paths relative to the data root, and class indices."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


@dataclass
class Splits:
    """The study's three splits over one data root, before decoding."""

    root: Path
    classes: list[str]                 # folder names, sorted; index = label
    files: dict[str, SplitFiles]       # "train" | "val" | "test"
    ignored: list[str]                 # relative paths skipped for not being image files

    def manifest_rows(self) -> list[tuple[str, str, str]]:
        """(split, class folder, relative path) for every file, the split manifest."""
        return [(split, self.classes[label], path)
                for split in SPLITS
                for path, label in zip(self.files[split].paths, self.files[split].labels)]


@dataclass
class DecodedSplit:
    """One split decoded: uint8 images (N, size, size, 3), int32 labels, the files kept and skipped."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]
    skipped: list[tuple[str, str]]     # (relative path, reason)


def readable_names(classes: Sequence[str], names: Mapping[str, str]) -> list[str]:
    """Readable class names (WordNet id -> 'tench'); folders without one keep their own name."""
    return [names.get(c, c) for c in classes]


def _visible_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(folder: Path, root: Path) -> tuple[list[str], list[str]]:
    """Image files (sorted, relative to root) under one class folder, and the non-image files."""
    images, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            (images if Path(name).suffix.lower() in IMAGE_SUFFIXES else ignored).append(rel)
    return sorted(images), ignored


def find_splits(root: str | os.PathLike, seed: int, test_fraction: float = 0.2,
                limit_per_class: Optional[int] = None) -> Splits:
    """List `root/train` and `root/val`, and split `val/` into validation and test.

    The split is stratified: each class of `val/` is shuffled with `seed` (and its name) and its first
    round(test_fraction * n) files go to test. `limit_per_class` then keeps the first N files (sorted)
    of each class in each split, so a quick run's files are a subset of the full run's, split alike.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} is not a folder: set data.root to a folder with "
                        "train/ and val/ inside, one sub-folder per class")
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise DataError(f"{str(root / sub)!r} is missing: data.root must hold train/ and val/, "
                            "each with one sub-folder per class")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"data.test_fraction must lie between 0 and 1, got {test_fraction}")
    if limit_per_class is not None and limit_per_class < 1:
        raise DataError(f"data.limit_per_class must be a positive number of files, got {limit_per_class}")

    classes = _visible_dirs(root / "train")
    if len(classes) < 2:
        raise DataError(f"{str(root / 'train')!r} has {len(classes)} class folder(s) "
                        f"({', '.join(classes) or 'none'}); a classifier needs at least two")
    # Folder names compared in NFC: a class copied from macOS (NFD) matches its twin.
    val_folder = {unicodedata.normalize("NFC", c): c for c in _visible_dirs(root / "val")}
    missing = [c for c in classes if unicodedata.normalize("NFC", c) not in val_folder]
    if missing:
        raise DataError(f"class folder(s) {', '.join(missing)} of train/ are missing from val/: "
                        "every class needs validation and test images")
    extra = sorted(set(val_folder) - {unicodedata.normalize("NFC", c) for c in classes})
    if extra:
        raise DataError(f"val/ has class folder(s) {', '.join(extra)} that train/ lacks: "
                        "the model cannot learn them; add them to train/ or remove them from val/")

    if seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}")
    files = {split: SplitFiles() for split in SPLITS}
    ignored: list[str] = []
    for label, name in enumerate(classes):
        train, skipped_train = _class_files(root / "train" / name, root)
        val, skipped_val = _class_files(root / "val" / val_folder[unicodedata.normalize("NFC", name)], root)
        ignored += skipped_train + skipped_val
        for split, found in (("train", train), ("val", val)):
            if not found:
                raise DataError(f"class folder {split}/{name} holds no image files "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))}): add images or remove the folder")
        if len(val) < 2:
            raise DataError(f"class folder val/{name} holds {len(val)} image(s); splitting val/ into "
                            "validation and test needs at least two per class")
        # One generator per class, keyed by its name: a file added to one class moves no other's split.
        order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(val))
        # At least one file on each side, so every class is validated and tested.
        n_test = min(len(val) - 1, max(1, int(round(test_fraction * len(val)))))
        chosen = {"train": train,
                  "val": sorted(val[i] for i in order[n_test:]),
                  "test": sorted(val[i] for i in order[:n_test])}
        for split, paths in chosen.items():
            kept = paths[:limit_per_class] if limit_per_class else paths
            files[split].paths += kept
            files[split].labels += [label] * len(kept)
    return Splits(root=root, classes=classes, files=files, ignored=ignored)


# tf.image.resize's methods.
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian",
                  "mitchellcubic")
# What Pillow raises for files it cannot read: unknown format, truncated data, corrupt headers.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def read_rgb(path: Path) -> np.ndarray:
    """Decode one file of any layout to an RGB uint8 array (H, W, 3); raises DECODE_ERRORS.

    Grayscale, CMYK and palette images are converted; alpha is dropped, as Keras' loader drops it;
    16-bit and float images are scaled to 8 bits rather than clipped.
    """
    with Image.open(path) as img:
        img.load()  # truncated files fail here, not later
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            wide = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
            return np.repeat(np.clip(wide / top * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None], 3, -1)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return np.asarray(img.convert("RGB"))


def resize(rgb: np.ndarray, size: int, interpolation: str = "bilinear", antialias: bool = False) -> np.ndarray:
    """Resize as Keras' image_dataset_from_directory does (tf.image.resize), rounded back to uint8."""
    import tensorflow as tf

    resized = tf.image.resize(rgb, (size, size), method=interpolation, antialias=antialias)
    return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


def decode_image(path: Path, size: int, interpolation: str = "bilinear",
                 antialias: bool = False) -> np.ndarray:
    """One file -> RGB uint8, size x size (see read_rgb and resize)."""
    return resize(read_rgb(path), size, interpolation, antialias)


def decode_split(root: Path, split: SplitFiles, size: int, interpolation: str = "bilinear",
                 antialias: bool = False, threads: int = 2,
                 on_image: Optional[Callable[[int], None]] = None) -> DecodedSplit:
    """Decode every file of a split; unreadable files are skipped and reported, never touched.

    `on_image(done)` is called after each file (a progress bar); see cache.py for the on-disk cache.
    """
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"data.interpolation={interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")

    def load(rel: str):
        try:
            rgb = read_rgb(root / rel)
        except DECODE_ERRORS as err:
            return None, f"{type(err).__name__}: {err}"
        return resize(rgb, size, interpolation, antialias), None

    images, labels, kept, skipped = [], [], [], []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for done, (rel, label, (img, why)) in enumerate(
                zip(split.paths, split.labels, pool.map(load, split.paths)), 1):
            if on_image:
                on_image(done)
            if img is None:
                skipped.append((rel, why))
            else:
                images.append(img)
                labels.append(label)
                kept.append(rel)
    array = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return DecodedSplit(array, np.asarray(labels, np.int32), kept, skipped)


def make_dataset(split: DecodedSplit, batch_size: int, shuffle: bool, seed: int = 0):
    """Batches of (float32 images in [0, 1], int32 labels), reshuffled every epoch when `shuffle`.

    Shuffling indices and gathering each batch keeps one copy of the images in memory.
    """
    import tensorflow as tf

    images = tf.constant(split.images)
    labels = tf.constant(split.labels)
    ds = tf.data.Dataset.range(len(split.labels))
    if shuffle:
        ds = ds.shuffle(len(split.labels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda idx: (tf.cast(tf.gather(images, idx), tf.float32) / 255.0, tf.gather(labels, idx)),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def download_imagenette(url: str, checksum: Optional[str], cache_dir: Optional[str] = None) -> Path:
    """Fetch the archive at `url` into the Keras cache, verify its `checksum` (md5 or sha256), extract it
    once, and return the folder with train/ and val/.

    Raises DataError with one line telling the user what to do when the download or the checksum fails.
    """
    import keras

    name = os.path.basename(urllib.parse.urlsplit(url).path)
    if not name:
        raise DataError(f"data.url {url!r} names no file: give the archive's address, or set data.root=DIR")
    # get_file re-extracts on every call; a marker written after a verified extraction skips that.
    cache_dir = str(Path(cache_dir or os.environ.get("KERAS_HOME", "~/.keras")).expanduser())
    datadir = Path(cache_dir) / "datasets"
    # get_file silently moves to /tmp/.keras when cache_dir does not exist yet.
    datadir.mkdir(parents=True, exist_ok=True)
    marker = datadir / f"{name}.lenet_sweep-extracted"
    extracted = datadir / name
    if not (marker.is_file() and marker.read_text() == (checksum or "") and extracted.is_dir()):
        try:
            extracted = Path(keras.utils.get_file(origin=url, file_hash=checksum, extract=True,
                                                  cache_dir=cache_dir, cache_subdir="datasets"))
        except ValueError as err:
            raise DataError(f"the file downloaded from {url} is not the expected archive ({err}); "
                            "check data.url and data.checksum, or set data.root=DIR to a local copy") from None
        except Exception as err:  # offline, refused, HTTP error: Keras raises a bare Exception
            raise DataError(f"could not download the dataset from {url} ({err}); "
                            "set data.root=DIR to a folder with train/ and val/") from None
        if not extracted.is_dir():
            raise DataError(f"the file downloaded from {url} is not an archive Keras can extract; "
                            "check data.url, or set data.root=DIR to a folder with train/ and val/")
        marker.write_text(checksum or "")
    for candidate in [extracted, *sorted(p for p in extracted.iterdir() if p.is_dir())]:
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    raise DataError(f"the archive {name} from {url} holds no train/ and val/ folders; "
                    "set data.root=DIR to a folder with train/ and val/")
