"""Does `predict` stream? Seconds, images/s and peak memory on a folder of many small files (for
docs/RESULTS.md).

    .venv/bin/python benchmarks/predict_stream.py [FILES] [BATCH]   # default: 10000 files, batch 32

Writes FILES small JPEGs (64x64) into a temporary folder, exports an untrained LeNet-5
(conf/model/lenet5.yaml, 32 px, 10 classes) in the layout `best` writes (model.keras, labels.json,
preprocessing.json: classifying needs no trained weights to be timed), and runs
`python -m lenet_sweep.predict` on the folder as a user types it, in its own process, writing the CSV.
It does so for FILES and for FILES / 10 files and prints, for each: the command's wall seconds (start-up
and model loading included), the seconds and images/s predict reports for classifying, and the
command's peak resident memory (ru_maxrss from os.wait4). Streaming shows as a peak that does not grow
with the number of files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def make_export(folder: Path) -> None:
    from lenet_sweep import export
    from lenet_sweep.models import create_model

    spec = OmegaConf.load(REPO / "conf" / "model" / "lenet5.yaml")
    classes = [f"class_{i}" for i in range(10)]
    folder.mkdir(parents=True)
    create_model(spec, len(classes)).save(folder / "model.keras")
    (folder / "labels.json").write_text(json.dumps(export.labels(classes, classes)))
    prep = export.preprocessing(spec.input_size, "bilinear", False)
    (folder / "preprocessing.json").write_text(json.dumps(prep))


def make_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tiles = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(16)]
    for i in range(count):
        tiles[i % len(tiles)].save(folder / f"img_{i:05d}.jpg", quality=90)


def run_predict(work: Path, images: Path, batch: int) -> dict:
    """One `python -m lenet_sweep.predict` process: its wall seconds, peak RSS and summary line."""
    out, err = work / f"{images.name}.stdout", work / f"{images.name}.stderr"
    command = [
        sys.executable,
        "-m",
        "lenet_sweep.predict",
        f"export.dir={work / 'export'}",
        f"images={images}",
        f"predict.output={work / (images.name + '.csv')}",
        f"predict.batch_size={batch}",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not all children's
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"predict failed:\n{err.read_text()[-3000:]}")
    summary = out.read_text().splitlines()[-1]
    found = re.search(r"(\d+) image\(s\) classified, (\d+) skipped in ([\d.]+)s \((\d+) images/s\)", summary)
    if not found:
        sys.exit(f"predict printed no summary line: {summary!r}")
    return {
        "files": int(found.group(1)) + int(found.group(2)),
        "classified": int(found.group(1)),
        "wall_s": wall,
        "classify_s": float(found.group(3)),
        "images_per_s": int(found.group(4)),
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports kilobytes
        "command": " ".join(command[1:]),
    }


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    with tempfile.TemporaryDirectory(prefix="predict-stream-") as tmp:
        work = Path(tmp)
        make_export(work / "export")
        for n in (count // 10, count):
            make_images(work / f"files_{n}", n)
        for n in (count // 10, count):
            r = run_predict(work, work / f"files_{n}", batch)
            print(
                f"{r['files']:>6} files, batch {batch}: {r['classified']} classified in {r['classify_s']:.1f} s "
                f"({r['images_per_s']} images/s); command {r['wall_s']:.1f} s with start-up; "
                f"peak RSS {r['peak_rss_mb']:.0f} MB"
            )


if __name__ == "__main__":
    main()
