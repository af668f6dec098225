"""Decoding: images of any channel layout become RGB and are resized as Keras'
`image_dataset_from_directory` resizes them (`tf.image.resize`, bilinear, no antialias), kept as uint8.
Files that fail to decode are skipped and reported, never touched. Before any decoding, `screen` refuses
files over the size limits (bytes on disk, pixels in the header), so one huge or hostile file (a
decompression bomb: a small file whose header claims 30000x30000 pixels) cannot exhaust memory."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from lenet_sweep.data.listing import DataError, SplitFiles


@dataclass
class DecodedSplit:
    """One split decoded: uint8 images (N, size, size, 3), int32 labels, the files kept and skipped."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]
    skipped: list[tuple[str, str]]  # (relative path, reason)


# tf.image.resize's methods.
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic")
# What Pillow raises for files it cannot read: unknown format, truncated data, corrupt headers.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def screen(path: Path, max_pixels: Optional[int], max_file_mb: Optional[float]) -> str:
    """Why `path` must not be decoded ("" if it may be): over `max_file_mb` megabytes on disk (checked
    with stat, the file is not opened), over `max_pixels` (width x height, read from the header alone),
    or no header Pillow knows. None: no limit of ours. Pillow's own guard refuses above 178,956,970 pixels
    (2 x PIL.Image.MAX_IMAGE_PIXELS) whatever `max_pixels` says.

    Opens only regular files: give it what `listing.stat_file` accepted.
    """
    try:
        size = path.stat().st_size
        if max_file_mb is not None and size > max_file_mb * 1e6:
            return f"{size / 1e6:.1f} MB on disk, over the limit of {max_file_mb:g} MB (max_file_mb): not opened"
        with Image.open(path) as img:  # reads the header only; pixels are decoded by load()
            width, height = img.size
    except Image.DecompressionBombError as err:  # Pillow's own guard, inside open(): whatever max_pixels says
        return f"DecompressionBombError: {err} Not decoded"
    except DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    if max_pixels is not None and width * height > max_pixels:
        return (
            f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} (max_pixels): not decoded"
        )
    return ""


def screen_split(
    root: Path, split: SplitFiles, max_pixels: Optional[int], max_file_mb: Optional[float]
) -> tuple[SplitFiles, list[tuple[str, str]]]:
    """(the files of `split` that may be decoded, (relative path, reason) of those `screen` refused)."""
    kept, refused = SplitFiles(), []
    for rel, label in zip(split.paths, split.labels):
        why = screen(root / rel, max_pixels, max_file_mb)
        if why:
            refused.append((rel, why))
        else:
            kept.paths.append(rel)
            kept.labels.append(label)
    return kept, refused


def read_rgb(path: Path) -> np.ndarray:
    """Decode one file of any layout to an RGB uint8 array (H, W, 3); raises DECODE_ERRORS.

    Grayscale, CMYK and palette images are converted; alpha is dropped, as Keras' loader drops it;
    16-bit and float images are scaled to 8 bits rather than clipped.
    """
    with Image.open(path) as img:
        img.load()  # truncated files fail here, not later
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            wide = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
            return np.repeat(np.clip(wide / top * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None], 3, -1)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return np.asarray(img.convert("RGB"))


def resize(rgb: np.ndarray, size: int, interpolation: str = "bilinear", antialias: bool = False) -> np.ndarray:
    """Resize as Keras' image_dataset_from_directory does (tf.image.resize), rounded back to uint8."""
    import tensorflow as tf

    resized = tf.image.resize(rgb, (size, size), method=interpolation, antialias=antialias)
    return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


def decode_image(path: Path, size: int, interpolation: str = "bilinear", antialias: bool = False) -> np.ndarray:
    """One file -> RGB uint8, size x size (see read_rgb and resize)."""
    return resize(read_rgb(path), size, interpolation, antialias)


def decode_split(
    root: Path,
    split: SplitFiles,
    size: int,
    interpolation: str = "bilinear",
    antialias: bool = False,
    threads: int = 2,
    on_image: Optional[Callable[[int], None]] = None,
) -> DecodedSplit:
    """Decode every file of a split; unreadable files are skipped and reported, never touched.

    `on_image(done)` is called after each file (a progress bar); see cache.py for the on-disk cache.
    """
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"data.interpolation={interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")

    def load(rel: str):
        try:
            rgb = read_rgb(root / rel)
        except DECODE_ERRORS as err:
            return None, f"{type(err).__name__}: {err}"
        return resize(rgb, size, interpolation, antialias), None

    images, labels, kept, skipped = [], [], [], []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for done, (rel, label, (img, why)) in enumerate(zip(split.paths, split.labels, pool.map(load, split.paths)), 1):
            if on_image:
                on_image(done)
            if img is None:
                skipped.append((rel, why))
            else:
                images.append(img)
                labels.append(label)
                kept.append(rel)
    array = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return DecodedSplit(array, np.asarray(labels, np.int32), kept, skipped)
