"""A full disk or a read-only place, for real: the decode cache, the MLflow artifact store and the export
folder on a tiny tmpfs (`mount -t tmpfs -o size=...`, filled up or remounted read-only). Each failure ends
in one line naming the place and what to do, leaves what was written before readable and leaves no
half-written file or temporary folder behind.

Mounting needs root (or CAP_SYS_ADMIN); without it these tests skip: a monkeypatched write would only test
the patch, not what a full disk does to NumPy, Keras, TensorFlow's SavedModel writer and MLflow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_config, make_image_folder
from lenet_sweep import cli
from lenet_sweep.data import cache, decode_split, find_splits

KB = 1024


@pytest.fixture
def tmpfs(tmp_path):
    """mount(path, size_kb) -> path: a tmpfs of `size_kb` KiB at `path`, unmounted after the test,
    whether it passed or not (lazily if a connection this process keeps, such as SQLite's, holds it)."""
    mounted: list[Path] = []

    def mount(path: Path, size_kb: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if shutil.which("mount") is None:
            pytest.skip("no mount command here: a tmpfs cannot be mounted")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(volume: Path, leave: int) -> None:
    """Fill `volume` up to `leave` bytes free with one file, as other programs' files would."""
    with open(volume / "filler", "wb") as out:
        out.write(b"\0" * (free_bytes(volume) - leave))


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- the decode cache ---------------------------------------------------------------------------


def test_a_full_decode_cache_goes_on_in_memory_and_keeps_earlier_entries(tmp_path, tmpfs, monkeypatch):
    """ENOSPC in the middle of writing an entry: the run goes on with the split decoded in memory (the
    cache only saves time), says so in one line naming the cache and the knob, and leaves no temporary
    folder; the entry written before still loads."""
    root = make_image_folder(tmp_path / "d", n_train=4, n_val=4, size=40, messy=False)
    splits = find_splits(root, seed=0)
    volume = tmpfs(tmp_path / "vol", 64)
    cache_dir = volume / "cache"
    earlier, how = cache.load_or_decode(cache_dir, splits.root, "train", splits.files["train"], 16)
    assert how == "decoded"
    (entry,) = cache_dir.iterdir()
    free_before = free_bytes(volume)

    failures = []  # the array write itself hits the full disk, mid-entry (not mkdir): that is what is tested
    real_write = cache._write_npy

    def watched_write(*args, **kwargs):
        try:
            return real_write(*args, **kwargs)
        except OSError as err:
            failures.append(err)
            raise

    monkeypatch.setattr(cache, "_write_npy", watched_write)
    lines: list[str] = []
    # 12 images at 96x96 are 324 KiB of pixels: more than the 64 KiB volume holds.
    big, how = cache.load_or_decode(cache_dir, splits.root, "train", splits.files["train"], 96, progress=lines.append)
    assert how == "decoded" and failures and failures[0].errno == 28
    np.testing.assert_array_equal(big.images, decode_split(splits.root, splits.files["train"], 96).images)
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert f"no space left on device writing the decode cache at {cache_dir}:" in warning
    assert "data.decode_cache=null" in warning and "\n" not in warning
    assert [p.name for p in cache_dir.iterdir()] == [entry.name]  # no .partial folder left
    assert free_bytes(volume) == free_before  # nor anything else taking space
    again, how = cache.load_or_decode(cache_dir, splits.root, "train", splits.files["train"], 16)
    assert how == "cache"
    np.testing.assert_array_equal(again.images, earlier.images)


def test_the_run_prepares_its_data_with_a_full_decode_cache(tmp_path, tmpfs):
    """What a `train` or `sweep` run does (prepare_data): every split is there, the warning is printed once
    per split that did not fit, and a later run on a freed disk writes the cache as usual."""
    from lenet_sweep.data import prepare_data

    root = make_image_folder(tmp_path / "d", n_train=4, n_val=4, size=40, messy=False)
    volume = tmpfs(tmp_path / "vol", 1024)
    fill(volume, 4 * KB)
    cfg = compose_config("train", [f"data.root={root}", f"data.decode_cache={volume / 'cache'}"])
    lines: list[str] = []
    prepared = prepare_data(cfg.data, 64, cfg.seed, progress=lines.append)
    assert sorted(prepared.decoded) == ["test", "train", "val"]
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 3 and all("writing the decode cache at" in w for w in warnings), lines
    assert tree(volume / "cache") == []
    (volume / "filler").unlink()
    lines.clear()
    prepare_data(cfg.data, 64, cfg.seed, progress=lines.append)
    assert not [line for line in lines if line.startswith("warning:")], lines
    assert sorted(p.name.split("-")[0] for p in (volume / "cache").iterdir()) == ["test", "train", "val"]


def test_a_read_only_decode_cache_still_serves_its_entries(tmp_path, tmpfs):
    root = make_image_folder(tmp_path / "d", n_train=4, n_val=4, size=40, messy=False)
    splits = find_splits(root, seed=0)
    volume = tmpfs(tmp_path / "vol", 1024)
    cache_dir = volume / "cache"
    earlier, _ = cache.load_or_decode(cache_dir, splits.root, "train", splits.files["train"], 16)
    read_only(volume)
    lines: list[str] = []
    same, how = cache.load_or_decode(cache_dir, splits.root, "train", splits.files["train"], 16, progress=lines.append)
    assert how == "cache" and lines == []
    np.testing.assert_array_equal(same.images, earlier.images)
    _, how = cache.load_or_decode(cache_dir, splits.root, "train", splits.files["train"], 24, progress=lines.append)
    assert how == "decoded"
    assert any(f"read-only file system writing the decode cache at {cache_dir}:" in line for line in lines), lines


# ---- the MLflow artifact store ------------------------------------------------------------------


@pytest.mark.parametrize("trouble", ["full", "read-only"])
def test_a_training_run_on_a_full_artifact_store_ends_failed_with_one_line(tmp_path, tmpfs, trouble):
    """A SQLite store whose artifacts/ folder (beside mlflow.db) is its own small volume: the earlier run
    stays readable, the new one ends FAILED naming the artifact store, the command prints one line."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from lenet_sweep import train
    from lenet_sweep.tracking.runs import tracked_run
    from lenet_sweep.tracking.store import open_store

    root = make_image_folder(tmp_path / "d", n_train=4, n_val=4, size=32, messy=False)
    store_dir = tmp_path / "store"
    artifacts = tmpfs(store_dir / "artifacts", 1024)
    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    cfg = compose_config(
        "train",
        [
            f"data.root={root}",
            f"data.decode_cache={tmp_path / 'cache'}",
            f"mlflow.tracking_uri={uri}",
            f"mlflow.store_dir={tmp_path / 'mlruns'}",
            "mlflow.experiment=full",
            "model.input_size=32",
            "train.epochs=1",
            "train.batch_size=8",
        ],
    )
    experiment = open_store(cfg.mlflow)
    with tracked_run(experiment_id=experiment, run_name="earlier") as run:
        mlflow.log_text("model: lenet5\n", "config.yaml")
        earlier = run.info.run_id
    if trouble == "full":
        fill(artifacts, 16 * KB)  # less than the run's sample images or model
    else:
        read_only(artifacts)
    before = tree(artifacts)

    with pytest.raises(SystemExit) as stop:
        cli.guarded(lambda: train.run_one(cfg))
    line = str(stop.value.code)
    words = "no space left on device" if trouble == "full" else "read-only file system"
    assert line.startswith(f"error: {words} writing the MLflow artifact store at {artifacts}/"), line
    assert "mlflow.store_dir=DIR or mlflow.tracking_uri=URI" in line and "\n" not in line

    client = MlflowClient(uri)
    (failed,) = [r for r in client.search_runs([experiment]) if r.info.run_id != earlier]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["failure_reason"].startswith(f"{words} writing the MLflow artifact store at {artifacts}/")
    kept = client.get_run(earlier)
    assert kept.info.status == "FINISHED"
    assert mlflow.artifacts.load_text(f"{kept.info.artifact_uri}/config.yaml") == "model: lenet5\n"
    # MLflow stages each artifact in a hidden temporary file: none may be left where a reader looks.
    assert not [p for p in tree(artifacts) if ".artifact.uploading." in p]
    if trouble == "read-only":
        assert tree(artifacts) == before


def test_a_full_embedded_store_names_its_database_and_keeps_earlier_runs(tmp_path, tmpfs):
    """mlflow.db and artifacts/ on one full disk: SQLite's "database or disk is full" names no file; the
    line names the store. (The new run cannot be recorded, FAILED or otherwise: the database is full.)"""
    import mlflow
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from lenet_sweep.tracking.runs import tracked_run
    from lenet_sweep.tracking.store import open_store

    volume = tmpfs(tmp_path / "mlruns", 4096)
    settings = OmegaConf.create({"tracking_uri": None, "store_dir": str(volume), "experiment": "full"})
    experiment = open_store(settings)
    with tracked_run(experiment_id=experiment, run_name="earlier") as run:
        mlflow.log_metric("val_accuracy", 0.5, step=1)
        mlflow.log_text("model: lenet5\n", "config.yaml")
        earlier = run.info.run_id
    fill(volume, 0)

    def another_run():
        with tracked_run(experiment_id=open_store(settings), run_name="later"):
            mlflow.log_metric("val_accuracy", 0.6, step=1)

    with pytest.raises(SystemExit) as stop:
        cli.guarded(another_run)
    line = str(stop.value.code)
    assert line.startswith(
        f"error: no space left on device writing the MLflow tracking store at sqlite:///{volume}/mlflow.db:"
    )
    assert "\n" not in line
    client = MlflowClient(mlflow.get_tracking_uri())
    kept = client.get_run(earlier)
    assert kept.info.status == "FINISHED" and kept.data.metrics == {"val_accuracy": 0.5}
    assert mlflow.artifacts.load_text(f"{kept.info.artifact_uri}/config.yaml") == "model: lenet5\n"


# ---- the export folder --------------------------------------------------------------------------


def _model(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(), keras.layers.Dense(3, "softmax")]
    )


def _export(target: Path, seed: int) -> None:
    from lenet_sweep import export

    export.write(
        target,
        _model(seed),
        "model: tiny\n",
        export.labels(["a", "b", "c"], ["A", "B", "C"]),
        export.preprocessing(16, "bilinear", False),
        f"card {seed}\n",
    )


# Free space left: too little for model.keras (Keras' zip writer fails: OSError), or enough for it but not
# for the SavedModel (TensorFlow's writer fails: ResourceExhaustedError).
@pytest.mark.parametrize("leave_kb", [8, 48])
def test_a_full_export_folder_keeps_the_previous_export(tmp_path, tmpfs, leave_kb):
    from lenet_sweep import export
    from lenet_sweep.errors import UserError

    volume = tmpfs(tmp_path / "vol", 1024)
    target = volume / "model"
    _export(target, seed=1)
    first = export.load(target)
    probe = np.random.default_rng(0).random((2, 16, 16, 3), dtype=np.float32)
    expected = first.model.predict(probe, verbose=0)
    before = {p: (target / p).read_bytes() for p in tree(target) if (target / p).is_file()}
    fill(volume, leave_kb * KB)
    free_before = free_bytes(volume)

    assert export.check_target(target, overwrite=True) == target  # a full disk can still take a folder
    with pytest.raises(UserError) as refused:
        _export(target, seed=2)
    assert type(refused.value.__cause__).__name__ == ("OSError" if leave_kb == 8 else "ResourceExhaustedError")
    with pytest.raises(SystemExit) as stop:  # what `best` prints (its run ends FAILED with the same words)
        cli.guarded(lambda: _export(target, seed=2))
    line = str(stop.value.code)
    assert line.startswith(f"error: no space left on device writing the export at {target}:"), line
    assert "export.dir" in line and "the export there before is unchanged" in line

    assert sorted(p.name for p in volume.iterdir()) == ["filler", "model"]  # no .partial or .old folder
    assert free_bytes(volume) == free_before
    assert {p: (target / p).read_bytes() for p in tree(target) if (target / p).is_file()} == before
    np.testing.assert_array_equal(export.load(target).model.predict(probe, verbose=0), expected)


def test_an_export_whose_last_rename_fails_puts_the_previous_one_back(tmp_path, monkeypatch):
    """The swap's second rename failing (simulated: a tmpfs cannot run out of room for a rename, a full
    directory index elsewhere can) must not leave the previous export moved aside."""
    volume = tmp_path / "vol"
    target = volume / "model"
    _export(target, seed=1)
    before = {p: (target / p).read_bytes() for p in tree(target) if (target / p).is_file()}
    real_rename = Path.rename

    def rename(self, to):
        if ".partial-" in self.name:
            raise OSError(28, os.strerror(28), str(self), None, str(to))
        return real_rename(self, to)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(SystemExit, match=f"^error: no space left on device writing the export at {target}:"):
        cli.guarded(lambda: _export(target, seed=2))
    monkeypatch.undo()
    assert sorted(p.name for p in volume.iterdir()) == ["model"]
    assert {p: (target / p).read_bytes() for p in tree(target) if (target / p).is_file()} == before


def test_an_export_killed_between_its_renames_is_put_back_and_its_debris_removed(tmp_path):
    """kill -9 between `write`'s two renames leaves no export and the previous one set aside; the next
    check (the rerun of `best`) puts it back and removes the half-built folder of the dead process."""
    from lenet_sweep import export

    volume = tmp_path / "vol"
    target = volume / "model"
    _export(target, seed=1)
    before = {p: (target / p).read_bytes() for p in tree(target) if (target / p).is_file()}
    dead = _dead_pid()
    target.rename(volume / f".model.old-{dead}")
    (volume / f".model.partial-{dead}").mkdir()
    (volume / f".model.partial-{os.getpid()}").mkdir()  # a live writer's (this process): left alone
    with pytest.raises(export.UserError, match="already holds an export"):
        export.check_target(target, overwrite=False)
    assert sorted(p.name for p in volume.iterdir()) == [f".model.partial-{os.getpid()}", "model"]
    assert {p: (target / p).read_bytes() for p in tree(target) if (target / p).is_file()} == before


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_read_only_export_folder_is_refused_before_any_work(tmp_path, tmpfs):
    from lenet_sweep import export
    from lenet_sweep.errors import UserError

    volume = tmpfs(tmp_path / "vol", 1024)
    target = volume / "model"
    _export(target, seed=1)
    before = tree(volume)
    read_only(volume)
    for where in (target, volume / "new" / "model"):
        with pytest.raises(UserError, match=f"^read-only file system writing the export at {where}: .*export.dir"):
            export.check_target(where, overwrite=True)
    # Had the folder turned read-only only after the check, the write says the same.
    with pytest.raises(SystemExit, match=f"^error: read-only file system writing the export at {target}:"):
        cli.guarded(lambda: _export(target, seed=2))
    assert tree(volume) == before
    assert export.load(target).classes == ["a", "b", "c"]


def test_an_export_folder_that_is_a_mount_point_is_refused(tmp_path, tmpfs):
    """The export is built beside its folder and renamed into place; a mount point cannot be renamed."""
    from lenet_sweep import export
    from lenet_sweep.errors import UserError

    volume = tmpfs(tmp_path / "vol", 1024)
    with pytest.raises(UserError, match="mount point.*a folder inside it"):
        export.check_target(volume, overwrite=False)


# ---- any other place ----------------------------------------------------------------------------


def test_any_command_names_the_unwritable_file_and_keeps_tracebacks_for_bugs(tmp_path, tmpfs):
    volume = tmpfs(tmp_path / "vol", 64)
    read_only(volume)
    with pytest.raises(SystemExit) as stop:
        cli.guarded(lambda: (volume / "report.md").write_text("x"))
    assert str(stop.value.code) == (
        f"error: read-only file system writing {volume / 'report.md'}: free space there (or make it "
        "writable), or give the command another folder"
    )
    with pytest.raises(FileNotFoundError):  # not a full or read-only place: a bug, traceback kept
        cli.guarded(lambda: (tmp_path / "missing" / "x").read_text())
    source = tmp_path / "big"
    source.write_bytes(b"\0" * 128 * KB)
    # A copy into a full place names its destination, not its source.
    subprocess.run(["mount", "-o", "remount,rw", str(volume)], check=True)
    with pytest.raises(SystemExit, match=f"^error: no space left on device writing {volume / 'copy'}:"):
        cli.guarded(lambda: shutil.copyfile(source, volume / "copy"))


def test_a_second_place_failing_while_handling_the_first_is_named_after_it():
    """An MLflow store on another full disk cannot record the failure: the line names the first place,
    then the second (a wrapping error adds nothing; the same place again neither)."""
    from lenet_sweep.errors import place_message

    def fail() -> None:
        try:
            raise OSError(28, os.strerror(28), "/data/a.npy")
        except OSError:
            try:
                raise OSError(30, os.strerror(30), "/store/mlflow.db-journal")
            except OSError as err:
                raise RuntimeError("wrapped") from err

    with pytest.raises(RuntimeError) as caught:
        fail()
    assert place_message(caught.value) == (
        "no space left on device writing /data/a.npy: free space there (or make it writable), or give the "
        "command another folder; then read-only file system writing /store/mlflow.db-journal too, while handling it"
    )
