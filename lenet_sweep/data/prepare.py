"""What a run trains and evaluates on: the data config listed, split and decoded (through the cache)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from lenet_sweep.data import cache
from lenet_sweep.data.decode import DecodedSplit, decode_split, screen_split
from lenet_sweep.data.download import download_imagenette
from lenet_sweep.data.listing import SPLITS, DataError, Splits, find_splits, readable_names

Progress = Callable[[str], None]


@dataclass
class PreparedData:
    """Everything a run trains and evaluates on: the split lists and the decoded images."""

    splits: Splits
    decoded: dict[str, DecodedSplit]
    names: list[str]  # readable class names, by label

    @property
    def skipped(self) -> list[tuple[str, str, str]]:
        """(split, relative path, reason) of every file that was left out: by listing (split "-": before
        val/ is split), by the size limits or by decoding."""
        rows = [("-", path, why) for path, why in self.splits.skipped]
        for split, dec in self.decoded.items():
            rows += [(split, path, why) for path, why in dec.skipped]
        return rows


def prepare_data(
    data_cfg: DictConfig,
    image_size: int,
    seed: int,
    progress: Optional[Progress] = None,
    splits: Sequence[str] = SPLITS,
) -> PreparedData:
    """List, split and decode the data named by `data_cfg` at `image_size` pixels (only `splits`).

    `seed` splits val/ into validation and test unless `data_cfg.split_seed` is set. Files over
    `data_cfg.max_file_mb` or `data_cfg.max_pixels` are refused before decoding: they are left out of
    what is decoded, so the decode cache never holds them and a changed limit changes its key.
    """
    root = data_cfg.root
    if not root:
        if progress:
            progress(f"data.root is not set: fetching {data_cfg.url}")
        root = download_imagenette(data_cfg.url, data_cfg.checksum, data_cfg.cache_dir)
    split_seed = seed if data_cfg.split_seed is None else data_cfg.split_seed
    listed = find_splits(root, split_seed, data_cfg.test_fraction, data_cfg.limit_per_class)
    decoded = {}
    for split in splits:
        started = time.perf_counter()
        files, refused = screen_split(listed.root, listed.files[split], data_cfg.max_pixels, data_cfg.max_file_mb)
        if data_cfg.decode_cache:
            decoded[split], how = cache.load_or_decode(
                data_cfg.decode_cache,
                listed.root,
                split,
                files,
                image_size,
                data_cfg.interpolation,
                data_cfg.antialias,
                data_cfg.decode_threads,
                progress,
            )
        else:
            decoded[split], how = (
                decode_split(
                    listed.root, files, image_size, data_cfg.interpolation, data_cfg.antialias, data_cfg.decode_threads
                ),
                "decoded",
            )
        decoded[split] = dataclasses.replace(decoded[split], skipped=refused + decoded[split].skipped)
        if progress:
            dec = decoded[split]
            source = "loaded from the decode cache" if how == "cache" else "decoded"
            progress(
                f"{split}: {len(dec.labels)} images at {image_size}x{image_size} {source} in "
                f"{time.perf_counter() - started:.1f}s ({len(dec.skipped)} skipped)"
            )
        if not len(decoded[split].labels):
            raise DataError(
                f"no file of the {split} split could be decoded "
                f"({len(listed.files[split].paths)} tried): see the reasons in the skipped-files report"
            )
    return PreparedData(listed, decoded, readable_names(listed.classes, data_cfg.class_names))


class DataBySize:
    """The train and val splits decoded at each input size trials ask for, kept for later trials."""

    def __init__(self, data_cfg: DictConfig, seed: int, progress: Optional[Progress] = None):
        self.data_cfg, self.seed, self.progress = data_cfg, seed, progress
        self._by_size: dict[int, PreparedData] = {}

    def at(self, size: int) -> PreparedData:
        if size not in self._by_size:
            self._by_size[size] = prepare_data(self.data_cfg, size, self.seed, self.progress, splits=("train", "val"))
        return self._by_size[size]
