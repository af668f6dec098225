"""The published Imagenette archive, fetched into the Keras cache and verified (no `data.root`)."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Optional

from lenet_sweep.data.listing import DataError


def download_imagenette(url: str, checksum: Optional[str], cache_dir: Optional[str] = None) -> Path:
    """Fetch the archive at `url` into the Keras cache, verify its `checksum` (md5 or sha256), extract it
    once, and return the folder with train/ and val/.

    Raises DataError with one line telling the user what to do when the download or the checksum fails.
    """
    import keras

    name = os.path.basename(urllib.parse.urlsplit(url).path)
    if not name:
        raise DataError(f"data.url {url!r} names no file: give the archive's address, or set data.root=DIR")
    # get_file re-extracts on every call; a marker written after a verified extraction skips that.
    cache_dir = str(Path(cache_dir or os.environ.get("KERAS_HOME", "~/.keras")).expanduser())
    datadir = Path(cache_dir) / "datasets"
    # get_file silently moves to /tmp/.keras when cache_dir does not exist yet.
    datadir.mkdir(parents=True, exist_ok=True)
    marker = datadir / f"{name}.lenet_sweep-extracted"
    extracted = datadir / name
    if not (marker.is_file() and marker.read_text() == (checksum or "") and extracted.is_dir()):
        try:
            extracted = Path(
                keras.utils.get_file(
                    origin=url, file_hash=checksum, extract=True, cache_dir=cache_dir, cache_subdir="datasets"
                )
            )
        except ValueError as err:
            raise DataError(
                f"the file downloaded from {url} is not the expected archive ({err}); "
                "check data.url and data.checksum, or set data.root=DIR to a local copy"
            ) from None
        except Exception as err:  # offline, refused, HTTP error: Keras raises a bare Exception
            raise DataError(
                f"could not download the dataset from {url} ({err}); set data.root=DIR to a folder with train/ and val/"
            ) from None
        if not extracted.is_dir():
            raise DataError(
                f"the file downloaded from {url} is not an archive Keras can extract; "
                "check data.url, or set data.root=DIR to a folder with train/ and val/"
            )
        marker.write_text(checksum or "")
    for candidate in [extracted, *sorted(p for p in extracted.iterdir() if p.is_dir())]:
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    raise DataError(
        f"the archive {name} from {url} holds no train/ and val/ folders; "
        "set data.root=DIR to a folder with train/ and val/"
    )
