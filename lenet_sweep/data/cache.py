"""The decoded-split cache: each split is decoded and resized once per input size, written to disk as
uint8 arrays, and reused by every later trial and run that asks for the same files at the same size.

An entry is a folder `<split>-<size>px-<key>` holding `images.npy`, `labels.npy` and `meta.json`.
The key hashes what the pixels depend on: the data root, the split manifest (relative path and label
of every file, in order), each file's size and modification time (the dataset fingerprint), the input
size and the resize method. A changed, added or removed file changes the key, so a stale entry is never
looked up. An entry is written to a hidden temporary folder and renamed into place only when complete;
on load its recorded key, array shapes and SHA-256 are checked, and an entry that fails any check
(partly written, truncated, edited) is reported, deleted and rebuilt. A write that fails (disk full,
read-only) takes its temporary folder with it and is reported; the run goes on with the split in memory.
Nothing under the data root is ever written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional, TextIO

import numpy as np

from lenet_sweep.data.decode import DecodedSplit, decode_split
from lenet_sweep.data.listing import SplitFiles
from lenet_sweep.errors import place_errno, trouble

FORMAT = 1  # bump when the entry layout or the decoding changes: old entries then stop matching
Progress = Callable[[str], None]


def cache_key(root: Path, split: str, files: SplitFiles, size: int, interpolation: str, antialias: bool) -> str:
    """SHA-256 over everything the decoded pixels depend on (see the module docstring)."""
    digest = hashlib.sha256(
        json.dumps(
            {
                "format": FORMAT,
                "root": str(Path(root).resolve()),
                "split": split,
                "size": size,
                "interpolation": interpolation,
                "antialias": antialias,
            },
            sort_keys=True,
        ).encode()
    )
    for rel, label in zip(files.paths, files.labels):
        try:
            st = (root / rel).stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"  # decoding reports it as skipped; the key changes once it reappears
        digest.update(f"{rel}\0{label}\0{stamp}\n".encode())
    return digest.hexdigest()


def _sha256(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(images).data)
    digest.update(np.ascontiguousarray(labels).data)
    return digest.hexdigest()


def _load(entry: Path, key: str, size: int) -> DecodedSplit:
    """Read a complete entry; raises ValueError/OSError saying what is wrong with it."""
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("key") != key:
        raise ValueError("its key does not match the files it should hold")
    images = np.load(entry / "images.npy", allow_pickle=False)
    labels = np.load(entry / "labels.npy", allow_pickle=False)
    count = len(meta["paths"])
    if images.dtype != np.uint8 or images.shape != (count, size, size, 3) or labels.shape != (count,):
        raise ValueError(
            f"its arrays have shapes {images.shape} and {labels.shape}, "
            f"expected {(count, size, size, 3)} and {(count,)}"
        )
    if _sha256(images, labels) != meta["sha256"]:
        raise ValueError("its arrays do not match their recorded SHA-256")
    return DecodedSplit(images, labels.astype(np.int32), list(meta["paths"]), [tuple(row) for row in meta["skipped"]])


def _write_npy(path: Path, array: np.ndarray) -> None:
    """`np.save(path, array)`, except that a full disk raises OSError ENOSPC: NumPy writes through
    `ndarray.tofile`, which reports it as a short write with no errno ("331776 requested and 44928
    written"). np.load reads the file as any other .npy."""
    array = np.ascontiguousarray(array)
    with open(path, "wb") as out:
        np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(array))
        out.write(array.data)


def _save(cache_dir: Path, entry: Path, key: str, split: DecodedSplit) -> None:
    """Write `split` to a hidden temporary folder, then rename it to `entry` in one step."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=cache_dir))
    try:
        _write_npy(tmp / "images.npy", split.images)
        _write_npy(tmp / "labels.npy", split.labels)
        meta = {
            "format": FORMAT,
            "key": key,
            "paths": split.paths,
            "skipped": [list(row) for row in split.skipped],
            "sha256": _sha256(split.images, split.labels),
            "created": time.time(),
        }
        # meta.json last: an entry without it is incomplete by construction.
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():
                raise
            # Another process (a second sweep worker) finished the same entry first: keep theirs.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_decode(
    cache_dir: str | os.PathLike,
    root: Path,
    split: str,
    files: SplitFiles,
    size: int,
    interpolation: str = "bilinear",
    antialias: bool = False,
    threads: int = 2,
    progress: Optional[Progress] = None,
) -> tuple[DecodedSplit, str]:
    """The decoded `split` at `size` pixels from the cache under `cache_dir`, decoding and caching it
    first when no valid entry exists. Returns the split and how it was obtained ("cache" | "decoded")."""
    cache_dir = Path(cache_dir).expanduser()
    key = cache_key(root, split, files, size, interpolation, antialias)
    entry = cache_dir / f"{split}-{size}px-{key[:24]}"
    if entry.exists():
        try:
            return _load(entry, key, size), "cache"
        except (OSError, ValueError, KeyError, TypeError) as err:
            if progress:
                progress(f"{split}: the cached entry {entry} is unusable ({err}); deleting and rebuilding it")
            shutil.rmtree(entry, ignore_errors=True)
    bar = progress_bar(f"decoding {split} at {size}x{size}", len(files.paths)) if progress else None
    decoded = decode_split(root, files, size, interpolation, antialias, threads, on_image=bar)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save(cache_dir, entry, key, decoded)
    except OSError as err:
        # The cache only saves time and the split is decoded in memory already: a full or read-only disk
        # costs the next run a decode, never this run. `_save` took its temporary folder with it.
        code = place_errno(err)
        if progress:
            progress(
                f"warning: {trouble(code) if code else f'{err}: writing'} the decode cache at {cache_dir}: "
                f"{split} is used from memory this run and decoded again the next; free space there, "
                "or set data.decode_cache=null (no cache) or to another folder"
            )
    return decoded, "decoded"


def progress_bar(label: str, total: int, stream: TextIO = sys.stdout) -> Callable[[int], None]:
    """`update(done)`: a bar redrawn in place on a terminal, a line every 10 % in a log.

    Not keras.utils.Progbar: off a terminal it prints a line per time interval, not per share done.
    """
    started = time.perf_counter()
    state = {"shown": -1.0, "decile": -1}

    def update(done: int) -> None:
        now = time.perf_counter()
        finished = done >= total
        rate = done / max(now - started, 1e-9)
        eta = (total - done) / rate if rate else 0.0
        text = f"{label}: {done}/{total} images, {rate:.0f}/s, ETA {eta:.0f}s"
        if stream.isatty():
            if finished or now - state["shown"] >= 0.2:
                filled = int(30 * done / max(total, 1))
                stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {text}" + ("\n" if finished else ""))
                stream.flush()
                state["shown"] = now
        else:
            decile = 10 * done // max(total, 1)
            if decile > state["decile"]:
                stream.write(f"{text}\n")
                stream.flush()
                state["decile"] = decile

    return update
