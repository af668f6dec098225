"""Classify files and folders with an export:
`python -m lenet_sweep.predict export.dir=DIR images=PATH[,PATH...]`.

Each file is decoded and resized exactly as training decoded its images (export.images_for). Results
stream: files are decoded and classified `predict.batch_size` at a time and each result is printed (and
written to `predict.output`) as its batch is done, so memory holds one batch however many files there
are. What cannot be classified is reported with its reason and skipped: paths that are not regular files
(FIFOs, sockets, devices such as /dev/null: recognised by stat() alone, as opening a FIFO blocks for
ever), dangling or looping symlinks, files over `predict.max_file_mb` or `predict.max_pixels` (refused
before decoding) and files that do not decode. The model is loaded with Keras safe_mode (export.load).
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Optional

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from lenet_sweep import cli, export
from lenet_sweep.config import register_configs
from lenet_sweep.data.decode import screen
from lenet_sweep.data.listing import shown, stat_file, walk_files
from lenet_sweep.errors import UserError


@dataclass
class Prediction:
    path: Path
    top: list[tuple[str, str, float]]  # (class id, readable name, score), most likely first
    error: str = ""  # why the file was skipped ("" if it was classified)


@dataclass
class Tally:
    classified: int
    skipped: int
    seconds: float


def find_images(paths: Sequence[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(files to classify, (path, reason) of paths refused without being opened).

    Folders are searched recursively (symlinks followed, each folder once) for files with a suffix Pillow
    reads; hidden files and other suffixes are left out silently. A path named directly is tried whatever
    its suffix, if it is a regular file.
    """
    suffixes = {s.lower() for s in Image.registered_extensions()}
    files, refused = [], []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            walk = walk_files(path, suffixes)
            files += walk.images
            refused += walk.refused
            continue
        st, why = stat_file(path)
        if st is None:
            refused.append((path, why))
        else:
            files.append(path)
    return files, refused


def classify(
    exported: export.Export,
    paths: Sequence[Path],
    top_k: int = 3,
    batch_size: int = 32,
    max_pixels: Optional[int] = None,
    max_file_mb: Optional[float] = None,
) -> Iterator[Prediction]:
    """Top-k labels of each file, in the order given, yielded a batch at a time: only one batch of decoded
    images is in memory. Files over the limits (see data.decode.screen) or unreadable come back with
    their reason."""
    k = max(1, min(top_k, len(exported.classes)))
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        results: dict[Path, Prediction] = {}
        allowed = []
        for path in chunk:
            why = screen(path, max_pixels, max_file_mb)
            if why:
                results[path] = Prediction(path, [], why)
            else:
                allowed.append(path)
        batch, kept, failed = export.images_for(allowed, exported.preprocessing)
        for path, why in failed:
            results[path] = Prediction(path, [], why)
        if kept:
            # predict_on_batch: one call on the batch; model.predict would set up a dataset per call
            scores = np.asarray(exported.model.predict_on_batch(batch))
            for path, row in zip(kept, scores):
                order = np.argsort(-row, kind="stable")[:k]
                results[path] = Prediction(
                    path, [(exported.classes[i], exported.names[i], float(row[i])) for i in order]
                )
        for path in chunk:
            yield results[path]


def csv_header(top_k: int) -> list[str]:
    return ["path", *[f"{what}_{i}" for i in range(1, top_k + 1) for what in ("class", "name", "score")], "error"]


def csv_row(p: Prediction, top_k: int) -> list[str]:
    cells = [v for c, n, s in p.top for v in (c, n, f"{s:.6f}")]
    return [shown(p.path), *cells, *[""] * (3 * top_k - len(cells)), p.error]


def run(cfg: DictConfig) -> Tally:
    if not cfg.images:
        raise UserError("images is empty: give images=PATH[,PATH...] (files or folders)")
    if cfg.predict.top_k < 1 or cfg.predict.batch_size < 1:
        raise UserError("predict.top_k and predict.batch_size must be at least 1")
    output: Optional[Path] = Path(cfg.predict.output).expanduser() if cfg.predict.output else None
    if output is not None and output.is_dir():
        raise UserError(f"predict.output={str(output)!r} is a folder: give a file name such as predictions.csv")
    exported = export.load(cfg.export.dir)
    started = time.perf_counter()
    files, refused = find_images(list(cfg.images))
    k = min(cfg.predict.top_k, len(exported.classes))
    total = len(files) + len(refused)
    print(f"{total} file(s) to classify, {cfg.predict.batch_size} at a time")
    sink = None
    if output is not None:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            # line-buffered: each row reaches the file as its result comes
            sink = output.open("w", newline="", encoding="utf-8", buffering=1)
        except OSError as err:
            raise UserError(
                f"predict.output={str(output)!r} cannot be written ({err.strerror}): give a writable file"
            ) from None
    done = 0
    try:
        writer = csv.writer(sink) if sink else None
        if writer:
            writer.writerow(csv_header(k))
        predictions = chain(
            (Prediction(path, [], why) for path, why in refused),
            classify(exported, files, k, cfg.predict.batch_size, cfg.predict.max_pixels, cfg.predict.max_file_mb),
        )
        for n, p in enumerate(predictions, 1):
            if p.error:
                print(f"[{n}/{total}] skipped {shown(p.path)}: {p.error}", file=sys.stderr)
            else:
                done += 1
                print(f"[{n}/{total}] {shown(p.path)}: " + ", ".join(f"{name} {s:.3f}" for _, name, s in p.top))
            if writer:
                writer.writerow(csv_row(p, k))
    finally:
        if sink:
            sink.close()
    seconds = time.perf_counter() - started
    if output is not None:
        print(f"wrote {output}")
    rate = done / max(seconds, 1e-9)
    print(f"{done} image(s) classified, {total - done} skipped in {seconds:.1f}s ({rate:.0f} images/s)")
    if not done:
        raise UserError("no image could be classified (see the reasons above)")
    return Tally(done, total - done, seconds)


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    cli.guarded(lambda: run(cfg))


if __name__ == "__main__":
    cli.quote_path_overrides(("export.dir", "predict.output"), ("images",))
    main()
