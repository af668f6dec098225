"""Hostile input: every file that cannot be an image, or must not be decoded, is reported with its path and
reason (or stops the run with one line), nothing hangs, and no file under the data folder is changed.
Covers training data (listing, size limits, decoding) and `predict` (streaming, limits, non-regular files)."""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import signal
import socket
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import compose_config, make_image_folder, pattern, png_header
from lenet_sweep import cli, export, predict
from lenet_sweep import data as D
from lenet_sweep.data.decode import screen
from lenet_sweep.data.listing import shown

CLASSES = ("a", "b", "c")
NOT_UTF8 = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name, as an old camera or a Windows zip writes it


# ---- building hostile files --------------------------------------------------------------------


def png_header_only(path: Path, width: int, height: int) -> None:
    path.write_bytes(png_header(width, height))


def sparse_200mb(path: Path) -> None:
    """A real small PNG padded to 200 MB on disk as a sparse file: stat says 200 MB, the disk holds ~1 KB."""
    Image.fromarray(pattern(0, 1, 8)).save(path)
    os.truncate(path, 200_000_000)


def unix_socket(path: Path) -> socket.socket:
    """A socket file at `path` (bound in a short folder first: socket paths are limited to 107 bytes)."""
    short = Path(tempfile.mkdtemp(prefix="s")) / "s"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(short))
    os.rename(short, path)
    return sock


def tree_state(top: Path) -> dict[str, tuple]:
    """Every entry under `top` (symlinks not followed, so loops are one entry): its type and permission
    bits, mtime, and the SHA-256 of a regular file's bytes or a link's target. FIFOs and sockets are
    never opened (opening a FIFO blocks)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            content = ""
            if stat.S_ISREG(st.st_mode):
                try:
                    with open(path, "rb") as f:
                        content = hashlib.file_digest(f, "sha256").hexdigest()
                except PermissionError:  # the mode-000 file, when the tests do not run as root
                    content = "unreadable"
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            state[os.path.relpath(path, top)] = (st.st_mode, st.st_mtime_ns, content)
    return state


@pytest.fixture
def no_hang():
    """Fail a test that blocks (as opening a FIFO would) after 60 s instead of hanging the suite."""

    def stuck(signum, frame):
        raise TimeoutError("blocked for 60 s: something opened a FIFO or looped")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def unreadable(monkeypatch):
    """Mode-000 files are unreadable to the process, as they are to any user but root.

    The tests run as root, whom the kernel lets read any file, so os.access and chmod alone cannot show
    what an ordinary user sees. As root, open() is patched to raise what the kernel raises for a
    non-root reader (EACCES) on files with no read bit; as another user the real kernel does it.
    """
    if os.geteuid() != 0:
        return
    real_open = open

    def open_as_a_user(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.exists(file) and not os.stat(file).st_mode & 0o444:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_as_a_user)


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """tmp_path/data: three classes of good JPEGs plus every kind of hostile entry; tmp_path/outside:
    files and a folder that symlinks in data/ point to."""
    root = make_image_folder(tmp_path / "data", classes=CLASSES, n_train=3, n_val=4, size=24, messy=False)
    a, b, c = (root / "train" / name for name in CLASSES)
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    Image.fromarray(pattern(1, 700, 24)).save(outside / "photo.jpg")
    Image.fromarray(pattern(1, 701, 24)).save(outside / "folder" / "ext_0.JPEG")

    # a: broken, odd and oversized files
    (a / "zero.jpg").write_bytes(b"")
    whole = (a / "img_000.JPEG").read_bytes()
    (a / "truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    (a / "notes.png").write_text("not an image, but named like one")
    Image.fromarray(np.full((24, 24), 40000, np.uint16)).save(a / "deep16.png")
    palette = Image.new("P", (24, 24), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(a / "palette.png")
    frames = [Image.new("RGB", (24, 24), (255, 0, 0)), Image.new("RGB", (24, 24), (0, 0, 255))]
    frames[0].save(a / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    png_header_only(a / "bomb.png", 30000, 30000)  # over Pillow's own guard (178,956,970 pixels)
    png_header_only(a / "eight_k.png", 8000, 8000)  # 64 M pixels: over ours (50 M), under Pillow's
    sparse_200mb(a / "huge.png")
    Image.fromarray(pattern(0, 702, 24)).save(a / "locked.jpg")
    os.chmod(a / "locked.jpg", 0)

    # b: symlinks
    (b / "outside.jpg").symlink_to(outside / "photo.jpg")  # a file outside the root: followed
    (b / "more").symlink_to(outside / "folder", target_is_directory=True)  # a folder outside: followed
    (b / "z_alias.JPEG").symlink_to("img_000.JPEG")  # a second path to a file listed before it
    (b / "loop").symlink_to(".", target_is_directory=True)  # a folder linking to itself
    (b / "self.jpg").symlink_to("self.jpg")  # a link to itself
    (b / "gone.jpg").symlink_to("nowhere.jpg")  # a dangling link

    # c: names and things that are not files
    os.mkfifo(c / "pipe.jpg")
    (c / "folder.jpg").mkdir()  # a folder named like an image: searched like any folder
    Image.fromarray(pattern(2, 703, 24)).save(c / "folder.jpg" / "inner.png")
    Image.fromarray(pattern(2, 704, 24)).save(c / "mon chat é 猫 (1).jpg")
    Image.fromarray(pattern(2, 705, 24)).save(c / NOT_UTF8)
    (c / ".ipynb_checkpoints").mkdir()
    Image.fromarray(pattern(2, 706, 24)).save(c / ".ipynb_checkpoints" / "img_000-checkpoint.JPEG")
    Image.fromarray(pattern(2, 707, 24)).save(root / "train" / "stray.jpg")  # not in a class folder
    return root


# ---- training data -----------------------------------------------------------------------------


def test_hostile_files_are_reported_with_their_reason_and_the_data_is_unchanged(hostile, tmp_path, no_hang, unreadable):
    sock = unix_socket(hostile / "train" / "c" / "sock.png")
    before = tree_state(hostile), tree_state(tmp_path / "outside")  # the data and what its links point to
    cfg = compose_config("train", [f"data.root={hostile}", f"data.decode_cache={tmp_path / 'cache'}"])
    prepared = D.prepare_data(cfg.data, 8, seed=0)
    # content, mode and mtime of every file, link and folder
    assert (tree_state(hostile), tree_state(tmp_path / "outside")) == before
    sock.close()

    reasons = {path: why for _, path, why in prepared.skipped}
    expected = {
        "train/a/zero.jpg": "empty file",
        "train/a/notes.png": "UnidentifiedImageError",
        "train/a/bomb.png": "DecompressionBombError",
        "train/a/eight_k.png": "8000x8000 = 64,000,000 pixels, over the limit of 50,000,000 (max_pixels)",
        "train/a/huge.png": "200.0 MB on disk, over the limit of 100 MB (max_file_mb): not opened",
        "train/a/locked.jpg": "Permission denied",
        "train/b/z_alias.JPEG": "the same file as train/b/img_000.JPEG",
        "train/b/loop": "symlink to a folder listed already (a loop)",
        "train/b/self.jpg": "symlink loop",
        "train/b/gone.jpg": "dangling symlink",
        "train/c/pipe.jpg": "FIFO",
        "train/c/sock.png": "socket",
        "train/c/.ipynb_checkpoints": "hidden",
        "train/c/caf\\xe9.jpg": "not valid UTF-8",
        "train/stray.jpg": "not in a class folder",
    }
    for path, words in expected.items():
        assert words in reasons.get(path, "(not reported)"), (path, reasons.get(path))
    assert reasons["train/a/truncated.JPEG"]  # decoding fails part-way; Pillow's words vary by version
    assert "train/c/.ipynb_checkpoints/img_000-checkpoint.JPEG" not in reasons  # the hidden folder, once

    train = prepared.decoded["train"]
    kept = set(train.paths)
    assert {
        "train/a/deep16.png",
        "train/a/palette.png",
        "train/a/anim.gif",
        "train/b/outside.jpg",
        "train/b/more/ext_0.JPEG",
        "train/c/folder.jpg/inner.png",
        "train/c/mon chat é 猫 (1).jpg",
    } <= kept
    assert not kept & set(reasons)
    pixel = {p: train.images[i][4, 4].tolist() for i, p in enumerate(train.paths)}
    assert pixel["train/a/anim.gif"] == [255, 0, 0]  # the first frame of the animation
    assert pixel["train/a/palette.png"] == [10, 200, 30]
    assert abs(pixel["train/a/deep16.png"][0] - round(40000 / 65535 * 255)) <= 1

    # Nothing lost: each listed file is decoded or reported, and each entry on disk is listed, reported,
    # inside a reported folder, or a followed folder link whose files are listed.
    for split, dec in prepared.decoded.items():
        assert set(prepared.splits.files[split].paths) == set(dec.paths) | {p for p, _ in dec.skipped}
    used = set().union(*(set(d.paths) for d in prepared.decoded.values())) | set(reasons)
    for dirpath, dirnames, filenames in os.walk(hostile):
        for name in dirnames + filenames:
            rel = shown(os.path.relpath(os.path.join(dirpath, name), hostile))
            inside = any(rel.startswith(p + "/") for p in used)
            is_folder = os.path.isdir(os.path.join(dirpath, name))
            assert rel in used or inside or is_folder, f"{rel} was neither used nor reported"


def test_limits_are_knobs_and_a_changed_limit_does_not_reuse_the_cache(tmp_path, no_hang):
    root = make_image_folder(tmp_path / "data", classes=CLASSES, n_train=2, n_val=3, size=24, messy=False)
    Image.fromarray(pattern(0, 9, 40)).save(root / "train" / "a" / "wide.png")  # 1600 pixels; the rest 576
    overrides = [f"data.root={root}", f"data.decode_cache={tmp_path / 'cache'}"]

    def prepare(max_pixels: int) -> tuple[D.DecodedSplit, str]:
        said: list[str] = []
        cfg = compose_config("train", [*overrides, f"data.max_pixels={max_pixels}"])
        decoded = D.prepare_data(cfg.data, 8, 0, said.append, splits=("train",)).decoded["train"]
        return decoded, said[-1]

    low, how = prepare(1000)
    assert low.skipped == [
        ("train/a/wide.png", "40x40 = 1,600 pixels, over the limit of 1,000 (max_pixels): not decoded")
    ]
    assert "decoded in" in how and len(low.labels) == 6
    again, how = prepare(1000)
    assert "from the decode cache" in how and again.skipped == low.skipped
    high, how = prepare(2000)  # the refused file is decoded now: the cache entry of the lower limit is not used
    assert "decoded in" in how and not high.skipped and "train/a/wide.png" in high.paths


def test_limits_refused_before_decoding(hostile, monkeypatch):
    """The screen opens headers only: a refused file never reaches Image.load."""
    loaded = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        loaded.append(Path(self.filename).name)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    folder = hostile / "train" / "a"
    for name in ("bomb.png", "eight_k.png", "huge.png"):
        assert screen(folder / name, 50_000_000, 100.0)
    assert screen(folder / "img_000.JPEG", 50_000_000, 100.0) == ""
    D.read_rgb(folder / "img_000.JPEG")
    assert set(loaded) == {"img_000.JPEG"}  # the spy sees decoding, and only the accepted file was decoded


@pytest.mark.parametrize(
    "breakage, words",
    [
        ("class_only_in_val", "val/ has class folder(s) d that train/ lacks"),
        ("empty_class", "class folder train/b holds no image files"),
    ],
)
def test_folder_problems_stop_with_one_line(tmp_path, breakage, words):
    root = make_image_folder(tmp_path / "d", classes=CLASSES, n_train=2, n_val=3, size=16, messy=False)
    if breakage == "class_only_in_val":
        (root / "val" / "d").mkdir()
        (root / "val" / "a" / "img_000.JPEG").rename(root / "val" / "d" / "img_000.JPEG")
    else:
        for f in (root / "train" / "b").iterdir():
            f.unlink()
        (root / "train" / "b" / ".DS_Store").write_bytes(b"\0")  # left out, and the message says so
    with pytest.raises(SystemExit) as stopped:
        cli.guarded(lambda: D.find_splits(root, seed=0))
    line = str(stopped.value.code)
    assert line.startswith("error: ") and words in line and "\n" not in line
    if breakage == "empty_class":
        assert ".DS_Store" in line


# ---- predict -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """An export `predict` loads: an 8x8 softmax model over three classes (untrained: only the plumbing
    is under test) with its labels.json and preprocessing.json."""
    import json

    import keras

    folder = tmp_path_factory.mktemp("export")
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inputs))
    keras.Model(inputs, outputs).save(folder / "model.keras")
    (folder / "labels.json").write_text(json.dumps(export.labels(list(CLASSES), ["A", "B", "C"])))
    (folder / "preprocessing.json").write_text(json.dumps(export.preprocessing(8, "bilinear", False)))
    return folder


def test_predict_skips_what_is_not_an_image_file_without_hanging(tiny_export, tmp_path, capsys, no_hang):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(pattern(0, 1, 20)).save(photos / "cat.png")
    Image.fromarray(pattern(1, 2, 20)).save(photos / NOT_UTF8)  # classified, printed with \xe9
    os.mkfifo(photos / "pipe.png")
    sock = unix_socket(photos / "sock.png")
    (photos / "loop").symlink_to(photos, target_is_directory=True)
    png_header_only(photos / "bomb.png", 30000, 30000)
    sparse_200mb(photos / "huge.png")
    (photos / ".hidden.png").write_bytes(b"")  # hidden: left out silently
    out = tmp_path / "predictions.csv"
    cfg = compose_config(
        "predict",
        [
            f"export.dir={tiny_export}",
            f"images=[{photos},{photos / 'pipe.png'},/dev/null,{tmp_path / 'missing.png'}]",
            f"predict.output={out}",
        ],
    )
    tally = predict.run(cfg)
    sock.close()
    assert (tally.classified, tally.skipped) == (2, 8)
    rows = {r["path"]: r for r in csv.DictReader(out.open(encoding="utf-8"))}
    why = {Path(p).name: r["error"] for p, r in rows.items() if r["error"]}
    assert "FIFO" in why["pipe.png"] and "socket" in why["sock.png"] and "loop" in why["loop"]
    assert "character device" in why["null"] and "no such file" in why["missing.png"]
    assert "DecompressionBombError" in why["bomb.png"] and "max_file_mb" in why["huge.png"]
    assert rows[str(photos / "caf\\xe9.jpg")]["class_1"] in CLASSES
    printed = capsys.readouterr()
    assert "caf\\xe9.jpg" in printed.out and "[10/10]" in printed.out + printed.err
    assert ".hidden.png" not in printed.out + printed.err


def test_predict_streams_in_batches(tiny_export, tmp_path, monkeypatch, capsys):
    """2,000 files with batch_size 50: the decoder sees 50 files at a time, and every earlier batch's
    rows are already in the CSV when the next is decoded (results are written as they come)."""
    folder = tmp_path / "many"
    folder.mkdir()
    tile = Image.fromarray(pattern(0, 3, 8))
    for i in range(2000):
        tile.save(folder / f"{i:04d}.png", compress_level=0)
    out = tmp_path / "predictions.csv"
    calls = []
    real_images_for = export.images_for

    def spy(paths, prep):
        rows_so_far = len(out.read_text(encoding="utf-8").splitlines()) - 1  # less the header
        calls.append((len(paths), rows_so_far))
        return real_images_for(paths, prep)

    monkeypatch.setattr(export, "images_for", spy)
    cfg = compose_config(
        "predict", [f"export.dir={tiny_export}", f"images=[{folder}]", f"predict.output={out}", "predict.batch_size=50"]
    )
    tally = predict.run(cfg)
    assert tally.classified == 2000 and len(calls) == 40
    assert calls == [(50, 50 * i) for i in range(40)]
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2001
    assert "[2000/2000]" in capsys.readouterr().out
