"""The exported model: what `python -m lenet_sweep.best` writes and `python -m lenet_sweep.predict` reads.

    export.dir/
      model.keras          the Keras model; loaded with safe_mode, so loading runs no code from the file
      saved_model/1/       TensorFlow SavedModel with a `serve` endpoint (TF Serving's versioned layout)
      labels.json          {"labels": [{"index": 0, "class": "n01440764", "name": "tench"}, ...]}
      preprocessing.json   input size, channel order, scaling and resize method the model expects
      config.yaml          the resolved config the model was trained with
      MODEL_CARD.md        data, split, hyperparameters, validation mean ± std, test accuracy, the study

The model takes float32 RGB images in [0, 1], (N, size, size, 3), and returns class probabilities (a
ReLU output returns non-negative scores: argmax is still the prediction). `images_for` turns files into
that input exactly as training decoded them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from lenet_sweep import data as D
from lenet_sweep.errors import UserError, place_errno, unwritable

MODEL, SAVED_MODEL, LABELS, PREPROCESSING, CONFIG, CARD = (
    "model.keras",
    "saved_model/1",
    "labels.json",
    "preprocessing.json",
    "config.yaml",
    "MODEL_CARD.md",
)
TOP_LEVEL = {MODEL, SAVED_MODEL.split("/")[0], LABELS, PREPROCESSING, CONFIG, CARD}  # all an export holds


def preprocessing(input_size: int, interpolation: str, antialias: bool) -> dict[str, Any]:
    """What `preprocessing.json` says: how a file becomes the model's input (see data.py)."""
    return {
        "input_size": input_size,
        "layout": "NHWC",
        "channels": "RGB",
        "dtype": "float32",
        # x / 255 in float32, as data.make_dataset scales batches (not x * (1/255), which rounds apart)
        "divide_by": 255.0,
        "resize": {"method": interpolation, "antialias": antialias, "library": "tf.image.resize"},
        "decode": "Pillow; grayscale, CMYK and palette converted to RGB, alpha dropped, 16-bit scaled to 8-bit",
    }


def labels(classes: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
    return {"labels": [{"index": i, "class": c, "name": n} for i, (c, n) in enumerate(zip(classes, names))]}


def check_target(folder: str | os.PathLike | None, overwrite: bool) -> Path:
    """The export folder, checked before any work: new or empty, or an earlier export with `overwrite`.

    A folder holding anything but an export's own files is never replaced, whatever `overwrite` says.
    """
    if not folder:
        raise UserError("export.dir is not set: give export.dir=DIR, a new or empty folder for the model")
    target = Path(folder).expanduser().resolve()
    _clean_up_after_a_kill(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"export.dir={str(target)!r} is a file: give a folder")
    if os.path.ismount(target):
        raise UserError(
            f"export.dir={str(target)!r} is a mount point, and an export is built beside its folder and "
            f"renamed into place: give a folder inside it (export.dir={str(target / 'model')!r})"
        )
    if target.is_dir() and any(target.iterdir()):
        others = sorted(p.name for p in target.iterdir() if p.name not in TOP_LEVEL)
        if others or not (target / MODEL).is_file():
            raise UserError(
                f"export.dir={str(target)!r} holds files that are not a lenet_sweep export "
                f"({', '.join(others[:3]) or 'no model.keras'}): choose a new or empty folder "
                "(nothing there was touched)"
            )
        if not overwrite:
            raise UserError(
                f"export.dir={str(target)!r} already holds an export: give export.overwrite=true "
                "to replace it, or choose another folder"
            )
    _check_writable(target)
    return target


def _clean_up_after_a_kill(target: Path) -> None:
    """Undo what a `write` killed mid-way left beside `target`: the previous export set aside as
    `.NAME.old-PID` goes back if the new one never arrived (whatever became of PID: after a reboot the
    number may be another process's); a half-built `.NAME.partial-PID` of a process that is gone is
    removed."""
    if not target.parent.is_dir():
        return
    for leftover in sorted(target.parent.iterdir()):
        stem, _, pid = leftover.name.rpartition("-")
        if stem not in (f".{target.name}.old", f".{target.name}.partial") or not pid.isdigit():
            continue
        if stem.endswith(".old") and not target.exists():
            leftover.rename(target)
        elif not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _check_writable(target: Path) -> None:
    """Refuse a place the export cannot be written to (read-only, not ours; full, where a folder takes
    space) now rather than after the retrainings: `write` builds beside `target`, so that is probed."""
    folder = target.parent
    while not folder.exists():  # `write` creates the missing folders; the nearest existing one decides
        folder = folder.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=folder))
    except OSError as err:
        code = place_errno(err)
        if code is None:
            raise
        advice = "make it writable (or free space), or choose another export.dir; nothing was written"
        raise unwritable(code, "the export", target, advice) from None


def write(
    target: Path, model: keras.Model, config_yaml: str, label_table: dict[str, Any], prep: dict[str, Any], card: str
) -> Path:
    """Write the export to `target` (checked by `check_target`) all at once: it is built beside the
    target and renamed into place, so an interrupted export leaves no half-written folder, and a full
    or read-only disk leaves the previous export as it was (a UserError says where and what to do)."""
    try:
        _write(target, model, config_yaml, label_table, prep, card)
    except Exception as err:  # OSError, or TensorFlow's OpError from the SavedModel, of a full disk
        code = place_errno(err)
        if code is None:
            raise
        kept = "; the export there before is unchanged" if (target / MODEL).is_file() else ""
        raise unwritable(
            code, "the export", target, f"free space there (or make it writable), or choose another export.dir{kept}"
        ) from err
    return target


def _write(
    target: Path, model: keras.Model, config_yaml: str, label_table: dict[str, Any], prep: dict[str, Any], card: str
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        model.save(partial / MODEL)
        saved_model(model, partial / SAVED_MODEL)
        (partial / LABELS).write_text(json.dumps(label_table, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        (partial / PREPROCESSING).write_text(json.dumps(prep, indent=1) + "\n")
        (partial / CONFIG).write_text(config_yaml, encoding="utf-8")
        (partial / CARD).write_text(card, encoding="utf-8")
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            target.rename(old)
        try:
            partial.rename(target)
        except OSError:
            if old.exists():
                old.rename(target)  # the previous export goes back where it was
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def saved_model(model: keras.Model, path: Path) -> None:
    """A SavedModel whose `serve` endpoint runs the model in inference mode.

    `model.export` traces `model(x)` with training unset, and Keras 3's augmentation layers (RandomFlip,
    RandomTranslation) then transform the input: served predictions would be randomly flipped ones.
    """
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        lambda images: model(images, training=False),
        input_signature=[tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, "images")],
    )
    archive.write_out(str(path), verbose=False)


@dataclass
class Export:
    """A loaded export: the model and what its outputs and inputs mean."""

    folder: Path
    model: keras.Model
    classes: list[str]
    names: list[str]
    preprocessing: dict[str, Any]


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(
            f"{path} cannot be read ({err}): export the model again (python -m lenet_sweep.best ... export.dir=DIR)"
        ) from None


def load(folder: str | os.PathLike | None) -> Export:
    """Load an export safely: Keras' safe_mode refuses anything in the file that would run code
    (a Lambda layer's pickled function), and the files are checked against each other."""
    if not folder:
        raise UserError("export.dir is not set: give export.dir=DIR, a folder written by python -m lenet_sweep.best")
    folder = Path(folder).expanduser()
    missing = [name for name in (MODEL, LABELS, PREPROCESSING) if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"export.dir={str(folder)!r} lacks {', '.join(missing)}: give a folder written by "
            "python -m lenet_sweep.best ... export.dir=DIR"
        )
    table = _json(folder / LABELS)
    prep = _json(folder / PREPROCESSING)
    try:
        entries = sorted(table["labels"], key=lambda e: e["index"])
        classes, names = [str(e["class"]) for e in entries], [str(e["name"]) for e in entries]
        size = int(prep["input_size"])
        checks = {
            "label indices are 0..N-1": [e["index"] for e in entries] == list(range(len(entries))),
            "divide_by is positive": float(prep["divide_by"]) > 0,
            "resize.method is a tf.image.resize method": prep["resize"]["method"] in D.INTERPOLATIONS,
            "resize.antialias is true or false": isinstance(prep["resize"]["antialias"], bool),
        }
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{folder / LABELS} or {folder / PREPROCESSING} is not what lenet_sweep.best writes "
            f"(missing or bad {err}): export the model again"
        ) from None
    broken = [what for what, ok in checks.items() if not ok]
    if broken:
        raise UserError(
            f"{folder}: {LABELS} or {PREPROCESSING} is inconsistent (expected: "
            f"{'; '.join(broken)}): export the model again"
        )
    try:
        model = keras.saving.load_model(folder / MODEL, compile=False, safe_mode=True)
    except Exception as err:  # Keras raises ValueError, TypeError, OSError... naming the layer at fault
        raise UserError(
            f"{folder / MODEL} was not loaded: {str(err).splitlines()[0][:400]} "
            "(lenet_sweep loads models with Keras safe_mode and never runs code from a file)"
        ) from None
    if tuple(model.input_shape[1:]) != (size, size, 3) or model.output_shape[-1] != len(classes):
        raise UserError(
            f"{folder}: the model takes {model.input_shape[1:]} and gives "
            f"{model.output_shape[-1]} "
            f"scores, but {PREPROCESSING} says {size}x{size}x3 and {LABELS} lists {len(classes)} "
            "classes: the export's files do not belong together"
        )
    return Export(folder, model, classes, names, prep)


def images_for(paths: Sequence[Path], prep: dict[str, Any]) -> tuple[np.ndarray, list[Path], list[tuple[Path, str]]]:
    """(model input, files decoded, (file, reason) of files that were not): each file as training
    decoded it (data.read_rgb, data.resize), scaled as `prep` says."""
    images, kept, failed = [], [], []
    for path in paths:
        try:
            rgb = D.read_rgb(path)
        except D.DECODE_ERRORS as err:
            failed.append((path, f"{type(err).__name__}: {err}"))
            continue
        resized = D.resize(rgb, int(prep["input_size"]), prep["resize"]["method"], prep["resize"]["antialias"])
        images.append(resized.astype(np.float32) / np.float32(prep["divide_by"]))
        kept.append(path)
    size = int(prep["input_size"])
    batch = np.stack(images) if images else np.zeros((0, size, size, 3), np.float32)
    return batch, kept, failed
