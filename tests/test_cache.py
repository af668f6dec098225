"""The on-disk decode cache: reused when valid, rebuilt when stale or damaged, never touching user data."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import make_image_folder
from lenet_sweep.data import cache, decode_split, find_splits


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.labels.dtype == b.labels.dtype == np.int32
    assert a.paths == b.paths and [tuple(r) for r in a.skipped] == [tuple(r) for r in b.skipped]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_second_load_comes_from_the_cache_and_equals_decoding(image_folder, tmp_path):
    splits = find_splits(image_folder, seed=0)
    files = splits.files["train"]
    before = _snapshot(image_folder)
    lines = []
    built, how_built = cache.load_or_decode(tmp_path / "c", splits.root, "train", files, 24, progress=lines.append)
    loaded, how_loaded = cache.load_or_decode(tmp_path / "c", splits.root, "train", files, 24)
    assert (how_built, how_loaded) == ("decoded", "cache")
    direct = decode_split(splits.root, files, 24)
    _same(built, direct)
    _same(loaded, direct)
    assert len(loaded.skipped) == 2  # the truncated JPEG and the text file named .jpg, as without a cache
    assert _snapshot(image_folder) == before  # the data folder is only read
    entries = [p.name for p in (tmp_path / "c").iterdir()]
    assert len(entries) == 1 and entries[0].startswith("train-24px-")  # no temporary folder left


def test_a_changed_file_or_size_or_split_is_a_different_entry(image_folder, tmp_path):
    splits = find_splits(image_folder, seed=0)
    files = splits.files["train"]
    first, _ = cache.load_or_decode(tmp_path / "c", splits.root, "train", files, 24)
    _, how = cache.load_or_decode(tmp_path / "c", splits.root, "train", files, 28)
    assert how == "decoded"
    _, how = cache.load_or_decode(tmp_path / "c", splits.root, "val", splits.files["val"], 24)
    assert how == "decoded"

    # Same name, new pixels: the stale entry must not be used.
    target = splits.root / files.paths[-1]
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(target, format="JPEG")
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second, how = cache.load_or_decode(tmp_path / "c", splits.root, "train", files, 24)
    assert how == "decoded"
    assert second.images[-1].max() < 10 < first.images[-1].max()
    _, how = cache.load_or_decode(tmp_path / "c", splits.root, "train", files, 24)
    assert how == "cache"


def _damage_truncate(entry: Path) -> None:
    data = (entry / "images.npy").read_bytes()
    (entry / "images.npy").write_bytes(data[: len(data) // 2])


def _damage_flip_a_byte(entry: Path) -> None:
    data = bytearray((entry / "images.npy").read_bytes())
    data[-1] ^= 0xFF
    (entry / "images.npy").write_bytes(bytes(data))


def _damage_drop_meta(entry: Path) -> None:
    (entry / "meta.json").unlink()


def _damage_garble_meta(entry: Path) -> None:
    (entry / "meta.json").write_text("{not json")


def test_damaged_or_partly_written_entries_are_reported_and_rebuilt(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=4, n_val=3, messy=False)
    splits = find_splits(root, seed=0)
    files = splits.files["train"]
    good, _ = cache.load_or_decode(tmp_path / "c", splits.root, "train", files, 20)
    (entry,) = (tmp_path / "c").iterdir()
    for damage in (_damage_truncate, _damage_flip_a_byte, _damage_drop_meta, _damage_garble_meta):
        damage(entry)
        lines = []
        again, how = cache.load_or_decode(tmp_path / "c", splits.root, "train", files, 20, progress=lines.append)
        assert how == "decoded", damage.__name__
        assert any("unusable" in line and "rebuilding" in line for line in lines), (damage.__name__, lines)
        _same(again, good)
        assert cache.load_or_decode(tmp_path / "c", splits.root, "train", files, 20)[1] == "cache"


def test_an_interrupted_build_leaves_no_entry(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", n_train=4, n_val=3, messy=False)
    splits = find_splits(root, seed=0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "_write_npy", killed)
    try:
        cache.load_or_decode(tmp_path / "c", splits.root, "train", splits.files["train"], 20)
    except KeyboardInterrupt:
        pass
    assert list((tmp_path / "c").iterdir()) == []  # neither an entry nor its temporary folder
    monkeypatch.undo()
    assert cache.load_or_decode(tmp_path / "c", splits.root, "train", splits.files["train"], 20)[1] == "decoded"


def test_an_unwritable_cache_costs_speed_not_the_run(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=4, n_val=3, messy=False)
    splits = find_splits(root, seed=0)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    lines = []
    split, how = cache.load_or_decode(
        blocker / "cache", splits.root, "train", splits.files["train"], 20, progress=lines.append
    )
    assert how == "decoded" and len(split.labels) == 12
    # A file where the folder should be is no full or read-only disk: the line gives the OS's own words.
    assert any(
        line.startswith("warning:") and f"writing the decode cache at {blocker / 'cache'}:" in line for line in lines
    ), lines


def test_progress_bar_in_a_log_prints_at_most_a_line_per_tenth():
    out = io.StringIO()
    update = cache.progress_bar("decoding train at 32x32", 1000, stream=out)
    for done in range(1, 1001):
        update(done)
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 11
    assert lines[-1].startswith("decoding train at 32x32: 1000/1000 images")
