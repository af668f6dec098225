"""Listing the data folder and the study's split: `train/` trains; `val/` is split 80:20, stratified by
class, into validation and test. Classes are the sorted folder names of `train/`, pinned for every split.
Nothing under the data root is ever written, and nothing is opened while listing: only names and stat().

What is left out is listed with its reason (`Splits.skipped`), never dropped silently:
- hidden files and folders (`.DS_Store`, `.ipynb_checkpoints/`) and files without an image suffix;
- anything that is not a regular file, whatever its name (a FIFO, socket or device: opening one for
  reading can block for ever), dangling and looping symlinks, empty files;
- a second path to a file already listed (a symlink or hard link to it): one image is not trained twice,
  nor put in two classes or in both train and test;
- names that are not valid UTF-8 (they cannot be written to the run's reports).
Symlinks are followed: a link to a file is that file, wherever it lies; a linked folder is listed as if
it were there, each folder once, so a link back to a parent (a loop) is reported and not followed.
"""

from __future__ import annotations

import errno
import os
import stat
import unicodedata
import zlib
from collections.abc import Collection, Mapping, Sequence
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
    skipped: list[tuple[str, str]]  # (relative path, reason) of what listing left out

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


def shown(path: str | os.PathLike) -> str:
    """`path` as text that can be printed and written to a UTF-8 file: bytes of a name that are not
    UTF-8 (Linux allows any) appear as \\xNN instead of failing the print or the CSV."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode keeps undecodable bytes as lone surrogates
        return False
    return True


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def stat_file(path: Path) -> tuple[Optional[os.stat_result], str]:
    """(stat, "") for a regular, non-empty file (through symlinks); (None, why) for anything else.

    Only stat() is called: a FIFO or device is recognised without being opened.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None, "symlink loop (the link leads back to itself): not followed"
        if os.path.islink(path):
            return None, f"dangling symlink (its target {shown(os.readlink(path))} does not exist)"
        if err.errno == errno.ENOENT:
            return None, "no such file or folder"
        return None, f"cannot be read ({err.strerror})"
    if not stat.S_ISREG(st.st_mode):
        kind = next((words for test, words in _KINDS if test(st.st_mode)), "not a regular file")
        return None, f"{kind}, not a regular file: never opened (reading one can block for ever)"
    if st.st_size == 0:
        return None, "empty file (0 bytes)"
    return st, ""


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether `entry` is a folder or a symlink to one; False for a dangling or looping link (for which
    DirEntry.is_dir raises, unlike Path.is_dir)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


@dataclass
class Walk:
    """What one folder holds, recursively: image files, what was ignored by its name (hidden, another
    suffix), what was refused for what it is, and second paths to files found before (see `walk_files`)."""

    images: list[Path] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (path, the first path to that file)


def walk_files(folder: Path, suffixes: Collection[str], seen: Optional[dict[tuple[int, int], Path]] = None) -> Walk:
    """Every file under `folder` with one of `suffixes` (lower case), in sorted order, following symlinks.

    Each real folder is listed once (by device and inode): a symlinked folder that leads to one already
    listed (a loop) is refused, so the walk ends however the links go. `seen` maps (device, inode) to the
    first path of each file found so far, across calls: a later path to the same file is a duplicate.
    """
    found = Walk()
    start = os.stat(folder)
    listed = {(start.st_dev, start.st_ino)}
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            found.refused.append((current, f"folder cannot be listed ({err.strerror})"))
            continue
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                found.ignored.append((path, "hidden (the name starts with '.'): not listed"))
                continue
            if _is_dir(entry):  # follows symlinks
                st = os.stat(path)
                if (st.st_dev, st.st_ino) in listed:
                    found.refused.append((path, "symlink to a folder listed already (a loop): not followed"))
                    continue
                listed.add((st.st_dev, st.st_ino))
                subfolders.append(path)
                continue
            if path.suffix.lower() not in suffixes:
                found.ignored.append((path, "not an image file (suffix)"))
                continue
            st, why = stat_file(path)
            if st is None:
                found.refused.append((path, why))
                continue
            if seen is not None:
                first = seen.setdefault((st.st_dev, st.st_ino), path)
                if first != path:
                    found.duplicates.append((path, first))
                    continue
            found.images.append(path)
        pending += reversed(subfolders)  # depth first, in sorted order
    return found


def _class_folders(split_dir: Path, root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The class folders of `split_dir` (sorted; symlinked folders count) and what else it holds."""
    names, skipped = [], []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        rel = Path(entry.path).relative_to(root).as_posix()
        if entry.name.startswith("."):
            skipped.append((shown(rel), "hidden (the name starts with '.'): not a class"))
        elif not _is_dir(entry):
            skipped.append((shown(rel), f"not in a class folder: {split_dir.name}/ holds one folder per class"))
        elif not _utf8(entry.name):
            skipped.append((shown(rel), "class folder name is not valid UTF-8: rename it to use it"))
        else:
            names.append(entry.name)
    return names, skipped


def _class_files(
    folder: Path, root: Path, seen: dict[tuple[int, int], Path]
) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files (sorted, relative to root) under one class folder, and (path, reason) of the rest."""
    walk = walk_files(folder, IMAGE_SUFFIXES, seen)
    images, skipped = [], []
    for path in walk.images:
        rel = path.relative_to(root).as_posix()
        if _utf8(rel):
            images.append(rel)
        else:
            skipped.append((shown(rel), "file name is not valid UTF-8: rename it to use it"))
    for path, why in walk.ignored + walk.refused:
        skipped.append((shown(path.relative_to(root)), why))
    for path, first in walk.duplicates:
        why = f"the same file as {shown(first.relative_to(root))} (a symlink or hard link to it): listed once"
        skipped.append((shown(path.relative_to(root)), why))
    return sorted(images), skipped


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

    classes, skipped = _class_folders(root / "train", root)
    if len(classes) < 2:
        raise DataError(
            f"{str(root / 'train')!r} has {len(classes)} class folder(s) "
            f"({', '.join(classes) or 'none'}); a classifier needs at least two"
        )
    val_names, val_skipped = _class_folders(root / "val", root)
    skipped += val_skipped
    # Folder names compared in NFC: a class copied from macOS (NFD) matches its twin.
    val_folder = {unicodedata.normalize("NFC", c): c for c in val_names}
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
    seen: dict[tuple[int, int], Path] = {}  # every file listed so far, by (device, inode)
    for label, name in enumerate(classes):
        train, skipped_train = _class_files(root / "train" / name, root, seen)
        val, skipped_val = _class_files(root / "val" / val_folder[unicodedata.normalize("NFC", name)], root, seen)
        skipped += skipped_train + skipped_val
        for split, found, left_out in (("train", train, skipped_train), ("val", val, skipped_val)):
            if not found:
                why = f" ({len(left_out)} left out, e.g. {left_out[0][0]}: {left_out[0][1]})" if left_out else ""
                raise DataError(
                    f"class folder {split}/{name} holds no image files "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))}){why}: add images or remove the folder"
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
    return Splits(root=root, classes=classes, files=files, skipped=skipped)
