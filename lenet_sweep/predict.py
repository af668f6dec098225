"""Classify files and folders with an export:
`python -m lenet_sweep.predict export.dir=DIR images=PATH[,PATH...]`.

Each file is decoded and resized exactly as training decoded its images (export.images_for). Files that
cannot be read are reported and skipped; the model is loaded with Keras safe_mode (export.load).
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from lenet_sweep import cli, export
from lenet_sweep.config import register_configs
from lenet_sweep.errors import UserError


@dataclass
class Prediction:
    path: Path
    top: list[tuple[str, str, float]]  # (class id, readable name, score), most likely first
    error: str = ""  # why the file was skipped ("" if it was classified)


def find_images(paths: Sequence[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(files to classify, (path, reason) of paths that are not there); folders are searched recursively
    for files with a suffix Pillow reads, hidden files left out. A file named directly is always tried."""
    suffixes = {s.lower() for s in Image.registered_extensions()}
    files, missing = [], []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files += [
                    Path(dirpath) / n
                    for n in sorted(filenames)
                    if not n.startswith(".") and Path(n).suffix.lower() in suffixes
                ]
        elif path.is_file():
            files.append(path)
        else:
            missing.append((path, "no such file or folder"))
    return files, missing


def classify(exported: export.Export, paths: Sequence[Path], top_k: int = 3, batch_size: int = 32) -> list[Prediction]:
    """Top-k labels of each file, in the order given; unreadable files come back with their reason."""
    k = max(1, min(top_k, len(exported.classes)))
    results: dict[Path, Prediction] = {}
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        batch, kept, failed = export.images_for(chunk, exported.preprocessing)
        for path, why in failed:
            results[path] = Prediction(path, [], why)
        if not kept:
            continue
        scores = np.asarray(exported.model.predict(batch, verbose=0))
        for path, row in zip(kept, scores):
            order = np.argsort(-row, kind="stable")[:k]
            results[path] = Prediction(path, [(exported.classes[i], exported.names[i], float(row[i])) for i in order])
    return [results[p] for p in paths]


def write_csv(predictions: Sequence[Prediction], output: Path, top_k: int) -> None:
    header = ["path"] + [f"{what}_{i}" for i in range(1, top_k + 1) for what in ("class", "name", "score")]
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*header, "error"])
        for p in predictions:
            cells = [v for c, n, s in p.top for v in (c, n, f"{s:.6f}")]
            writer.writerow([str(p.path), *cells, *[""] * (len(header) - 1 - len(cells)), p.error])


def run(cfg: DictConfig) -> list[Prediction]:
    if not cfg.images:
        raise UserError("images is empty: give images=PATH[,PATH...] (files or folders)")
    if cfg.predict.top_k < 1 or cfg.predict.batch_size < 1:
        raise UserError("predict.top_k and predict.batch_size must be at least 1")
    output: Optional[Path] = Path(cfg.predict.output).expanduser() if cfg.predict.output else None
    if output is not None and output.is_dir():
        raise UserError(f"predict.output={str(output)!r} is a folder: give a file name such as predictions.csv")
    exported = export.load(cfg.export.dir)
    files, missing = find_images(list(cfg.images))
    predictions = [Prediction(path, [], why) for path, why in missing]
    predictions += classify(exported, files, cfg.predict.top_k, cfg.predict.batch_size)
    for p in predictions:
        if p.error:
            print(f"skipped {p.path}: {p.error}", file=sys.stderr)
        else:
            print(f"{p.path}: " + ", ".join(f"{name} {score:.3f}" for _, name, score in p.top))
    k = min(cfg.predict.top_k, len(exported.classes))
    if output is not None:
        try:
            write_csv(predictions, output, k)
        except OSError as err:
            raise UserError(
                f"predict.output={str(output)!r} cannot be written ({err.strerror}): give a "
                "writable file; the predictions are printed above"
            ) from None
        print(f"wrote {output}")
    done = sum(not p.error for p in predictions)
    print(f"{done} image(s) classified, {len(predictions) - done} skipped")
    if not done:
        raise UserError("no image could be classified (see the reasons above)")
    return predictions


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    cli.guarded(lambda: run(cfg))


if __name__ == "__main__":
    cli.quote_path_overrides(("export.dir", "predict.output"), ("images",))
    main()
