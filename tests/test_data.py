"""Data: listing, the study's split, decoding of awkward files, tf.data feeding, the download path."""

from __future__ import annotations

import hashlib
import http.server
import tarfile
import threading
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REAL_DATA, make_image_folder
from lenet_sweep import data as D

CLASSES = ("n01440764", "n02102040", "n03000684")


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_classes_are_sorted_train_folders_and_pinned(image_folder):
    splits = D.find_splits(image_folder, seed=0)
    assert splits.classes == sorted(CLASSES)
    for split in D.SPLITS:
        for path, label in zip(splits.files[split].paths, splits.files[split].labels):
            assert path.split("/")[1] == splits.classes[label]


def test_split_is_stratified_seeded_and_disjoint(image_folder):
    a = D.find_splits(image_folder, seed=0)
    b = D.find_splits(image_folder, seed=0)
    c = D.find_splits(image_folder, seed=1)
    assert a.files == b.files
    assert a.files["test"].paths != c.files["test"].paths
    # 10 val images per class -> 8 validation, 2 test in every class
    assert Counter(a.files["val"].labels) == {0: 8, 1: 8, 2: 8}
    assert Counter(a.files["test"].labels) == {0: 2, 1: 2, 2: 2}
    assert not set(a.files["val"].paths) & set(a.files["test"].paths)
    assert all(p.startswith("val/") for p in a.files["val"].paths + a.files["test"].paths)
    assert all(p.startswith("train/") for p in a.files["train"].paths)


def test_limit_per_class_keeps_first_sorted_files_of_the_same_split(image_folder):
    full = D.find_splits(image_folder, seed=3)
    small = D.find_splits(image_folder, seed=3, limit_per_class=1)
    for split in D.SPLITS:
        assert Counter(small.files[split].labels) == {0: 1, 1: 1, 2: 1}
        assert set(small.files[split].paths) <= set(full.files[split].paths)
        for label in range(3):
            first = min(p for p, y in zip(full.files[split].paths, full.files[split].labels) if y == label)
            assert first in small.files[split].paths


def test_awkward_files_decode_or_are_reported_and_user_data_is_untouched(image_folder):
    before = _tree_digest(image_folder)
    splits = D.find_splits(image_folder, seed=0)
    left_out = {Path(p).name: why for p, why in splits.skipped}  # reported, not decoded
    assert set(left_out) == {"README.txt", ".DS_Store", ".cache"}
    assert "suffix" in left_out["README.txt"] and "hidden" in left_out[".cache"]
    decoded = D.decode_split(splits.root, splits.files["train"], 16)
    assert decoded.images.shape == (len(decoded.paths), 16, 16, 3) and decoded.images.dtype == np.uint8
    kept = {Path(p).name for p in decoded.paths}
    assert {"gray.JPEG", "cmyk.jpg", "alpha.png"} <= kept
    skipped = {Path(p).name: why for p, why in decoded.skipped}
    assert set(skipped) == {"truncated.JPEG", "notes.jpg"}
    assert all(skipped.values())
    assert ".DS_Store" not in kept | set(skipped)
    assert _tree_digest(image_folder) == before


def test_decoding_matches_keras_image_loader(tmp_path):
    import tensorflow as tf

    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    ours = D.decode_image(tmp_path / "a.png", 32)
    keras_way = tf.image.resize(
        tf.io.decode_image(tf.io.read_file(str(tmp_path / "a.png")), channels=3, expand_animations=False), (32, 32)
    )
    assert np.abs(ours.astype(float) - keras_way.numpy()).max() <= 0.5 + 1e-4


def test_grayscale_and_cmyk_become_rgb(tmp_path):
    gray = np.full((20, 20), 77, np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=100)
    out = D.decode_image(tmp_path / "g.jpg", 10)
    assert out.shape == (10, 10, 3)
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=100)
    red = D.decode_image(tmp_path / "red.jpg", 10).astype(int)
    assert red[..., 0].mean() > 200 and red[..., 1].mean() < 60 and red[..., 2].mean() < 60


def test_sixteen_bit_and_transparent_palette_images(tmp_path):
    wide = np.full((8, 8), 40000, np.uint16)
    Image.fromarray(wide).save(tmp_path / "deep.png")
    assert abs(int(D.decode_image(tmp_path / "deep.png", 4)[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert D.decode_image(tmp_path / "pal.png", 4)[0, 0].tolist() == [200, 10, 10]


def test_bad_interpolation_is_a_config_error_not_a_skipped_file(image_folder):
    splits = D.find_splits(image_folder, seed=0)
    with pytest.raises(D.DataError, match="data.interpolation"):
        D.decode_split(splits.root, splits.files["val"], 8, interpolation="cubic-ish")


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing_val_class", "n03000684"),
        ("extra_val_class", "n09999999"),
        ("empty_class", "train/n02102040"),
        ("one_class", "at least two"),
        ("no_val", "val"),
        ("tiny_val_class", "val/n01440764"),
    ],
)
def test_bad_folders_fail_with_a_message_naming_the_problem(tmp_path, breakage, message):
    root = make_image_folder(tmp_path / "d", n_train=2, n_val=3, messy=False)
    if breakage == "missing_val_class":
        for f in (root / "val" / "n03000684").iterdir():
            f.unlink()
        (root / "val" / "n03000684").rmdir()
    elif breakage == "extra_val_class":
        (root / "val" / "n09999999").mkdir()
    elif breakage == "empty_class":
        for f in (root / "train" / "n02102040").iterdir():
            f.unlink()
    elif breakage == "one_class":
        root = make_image_folder(tmp_path / "one", classes=("n01440764",), n_train=2, n_val=3, messy=False)
    elif breakage == "no_val":
        (root / "val").rename(root / "validation")
    elif breakage == "tiny_val_class":
        for f in sorted((root / "val" / "n01440764").iterdir())[1:]:
            f.unlink()
    with pytest.raises(D.DataError, match=message):
        D.find_splits(root, seed=0)


def test_unicode_paths(tmp_path):
    root = make_image_folder(tmp_path / "données ✓", classes=("chat_é", "狗"), n_train=2, n_val=3, messy=False)
    splits = D.find_splits(root, seed=0)
    decoded = D.decode_split(splits.root, splits.files["train"], 8)
    assert splits.classes == ["chat_é", "狗"] and len(decoded.labels) == 4 and not decoded.skipped
    # the same class name, decomposed (as macOS writes it) in val/
    import unicodedata

    (root / "val" / "chat_é").rename(root / "val" / unicodedata.normalize("NFD", "chat_é"))
    again = D.find_splits(root, seed=0)
    assert again.classes == ["chat_é", "狗"] and len(again.files["val"].paths) == 4
    assert D.decode_split(again.root, again.files["test"], 8).skipped == []


def test_dataset_scales_to_unit_range_and_draws_each_epochs_order_from_seed_and_epoch(image_folder):
    import tensorflow as tf

    splits = D.find_splits(image_folder, seed=0)
    dec = D.decode_split(splits.root, splits.files["train"], 12)
    epoch = tf.Variable(0, dtype=tf.int64)
    ds = D.make_dataset(dec, batch_size=4, shuffle=True, seed=5, epoch=epoch)
    first = np.concatenate([y.numpy() for _, y in ds])
    epoch.assign(1)
    second = np.concatenate([y.numpy() for _, y in ds])
    assert sorted(first) == sorted(dec.labels.tolist()) and not np.array_equal(first, second)
    # The order is (seed, epoch)'s alone: a new dataset at epoch 1 (a resumed training) repeats it.
    again = np.concatenate([y.numpy() for _, y in D.make_dataset(dec, 4, shuffle=True, seed=5, epoch=epoch)])
    assert np.array_equal(second, again)
    x, _ = next(iter(ds))
    assert x.dtype.name == "float32" and 0.0 <= float(x.numpy().min()) and float(x.numpy().max()) <= 1.0
    ordered = np.concatenate([y.numpy() for _, y in D.make_dataset(dec, 4, shuffle=False)])
    assert np.array_equal(ordered, dec.labels)
    with pytest.raises(ValueError, match="epoch variable"):
        D.make_dataset(dec, 4, shuffle=True, seed=5)


def _serve(folder: Path):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_fetches_verifies_and_extracts_from_a_local_server(tmp_path):
    source = make_image_folder(tmp_path / "src" / "tinynette", n_train=2, n_val=3, messy=False)
    served = tmp_path / "served"
    served.mkdir()
    archive = served / "tinynette.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="tinynette")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    server = _serve(served)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/tinynette.tgz"
        root = D.download_imagenette(url, md5, cache_dir=str(tmp_path / "cache"))
        assert (root / "train").is_dir() and (root / "val").is_dir()
        assert D.find_splits(root, seed=0).classes == sorted(CLASSES)
        with pytest.raises(D.DataError, match="checksum"):
            D.download_imagenette(url, "0" * 32, cache_dir=str(tmp_path / "other_cache"))
        (served / "page.tgz").write_text("<html>not found</html>")
        with pytest.raises(D.DataError, match="not an archive"):
            D.download_imagenette(url.replace("tinynette", "page"), None, cache_dir=str(tmp_path / "c3"))
    finally:
        server.shutdown()
        server.server_close()
    # verified and extracted once: later runs use the cache without the server
    assert D.download_imagenette(url, md5, cache_dir=str(tmp_path / "cache")) == root


def test_download_without_a_server_says_to_set_data_root(tmp_path):
    server = _serve(tmp_path)  # bind a free port, then close it: nothing listens there
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(D.DataError, match="set data.root=DIR") as err:
        D.download_imagenette(f"http://127.0.0.1:{port}/imagenette2-320.tgz", None, cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(err.value)


@pytest.mark.integration
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="the real Imagenette is not under ../shared/datasets")
def test_real_imagenette_split_matches_the_study():
    splits = D.find_splits(REAL_DATA, seed=0)
    assert len(splits.classes) == 10 and splits.classes[0] == "n01440764"
    sizes = {s: len(splits.files[s].paths) for s in D.SPLITS}
    assert sizes["train"] == 9469 and sizes["val"] + sizes["test"] == 3925
    assert abs(sizes["test"] / 3925 - 0.2) < 0.01
    names = D.readable_names(splits.classes, {"n01440764": "tench"})
    assert names[0] == "tench"
