"""Listing the data folder and the study's split: `train/` trains; `val/` is split 80:20, stratified by
class, into validation and test. Classes are the sorted folder names of `train/`, pinned for every split.
Nothing under the data root is ever written."""

from __future__ import annotations

import os
import unicodedata
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

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
    classes: list[str]  # folder names, sorted; index = label
    files: dict[str, SplitFiles]  # "train" | "val" | "test"
    ignored: list[str]  # relative paths skipped for not being image files

    def manifest_rows(self) -> list[tuple[str, str, str]]:
        """(split, class folder, relative path) for every file, the split manifest."""
        return [
            (split, self.classes[label], path)
            for split in SPLITS
            for path, label in zip(self.files[split].paths, self.files[split].labels)
        ]


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


def find_splits(
    root: str | os.PathLike, seed: int, test_fraction: float = 0.2, limit_per_class: Optional[int] = None
) -> Splits:
    """List `root/train` and `root/val`, and split `val/` into validation and test.

    The split is stratified: each class of `val/` is shuffled with `seed` (and its name) and its first
    round(test_fraction * n) files go to test. `limit_per_class` then keeps the first N files (sorted)
    of each class in each split, so a quick run's files are a subset of the full run's, split alike.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.root {str(root)!r} is not a folder: set data.root to a folder with "
            "train/ and val/ inside, one sub-folder per class"
        )
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise DataError(
                f"{str(root / sub)!r} is missing: data.root must hold train/ and val/, "
                "each with one sub-folder per class"
            )
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"data.test_fraction must lie between 0 and 1, got {test_fraction}")
    if limit_per_class is not None and limit_per_class < 1:
        raise DataError(f"data.limit_per_class must be a positive number of files, got {limit_per_class}")

    classes = _visible_dirs(root / "train")
    if len(classes) < 2:
        raise DataError(
            f"{str(root / 'train')!r} has {len(classes)} class folder(s) "
            f"({', '.join(classes) or 'none'}); a classifier needs at least two"
        )
    # Folder names compared in NFC: a class copied from macOS (NFD) matches its twin.
    val_folder = {unicodedata.normalize("NFC", c): c for c in _visible_dirs(root / "val")}
    missing = [c for c in classes if unicodedata.normalize("NFC", c) not in val_folder]
    if missing:
        raise DataError(
            f"class folder(s) {', '.join(missing)} of train/ are missing from val/: "
            "every class needs validation and test images"
        )
    extra = sorted(set(val_folder) - {unicodedata.normalize("NFC", c) for c in classes})
    if extra:
        raise DataError(
            f"val/ has class folder(s) {', '.join(extra)} that train/ lacks: "
            "the model cannot learn them; add them to train/ or remove them from val/"
        )

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
                raise DataError(
                    f"class folder {split}/{name} holds no image files "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))}): add images or remove the folder"
                )
        if len(val) < 2:
            raise DataError(
                f"class folder val/{name} holds {len(val)} image(s); splitting val/ into "
                "validation and test needs at least two per class"
            )
        # One generator per class, keyed by its name: a file added to one class moves no other's split.
        order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(val))
        # At least one file on each side, so every class is validated and tested.
        n_test = min(len(val) - 1, max(1, int(round(test_fraction * len(val)))))
        chosen = {
            "train": train,
            "val": sorted(val[i] for i in order[n_test:]),
            "test": sorted(val[i] for i in order[:n_test]),
        }
        for split, paths in chosen.items():
            kept = paths[:limit_per_class] if limit_per_class else paths
            files[split].paths += kept
            files[split].labels += [label] * len(kept)
    return Splits(root=root, classes=classes, files=files, ignored=ignored)
