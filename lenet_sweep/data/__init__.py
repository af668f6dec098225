"""Data: list the image folders, split them as the study did, decode once (cache), feed through tf.data.

listing.py (folders, classes, the study's split) -> decode.py (any image to RGB uint8 at the input size)
-> cache.py (decoded splits on disk) -> prepare.py (a run's data) -> pipeline.py (tf.data batches);
download.py fetches the published archive when no `data.root` is given.
"""

from lenet_sweep.data.decode import (
    DECODE_ERRORS,
    INTERPOLATIONS,
    DecodedSplit,
    decode_image,
    decode_split,
    read_rgb,
    resize,
)
from lenet_sweep.data.download import download_imagenette
from lenet_sweep.data.listing import IMAGE_SUFFIXES, SPLITS, DataError, SplitFiles, Splits, find_splits, readable_names
from lenet_sweep.data.pipeline import make_dataset
from lenet_sweep.data.prepare import DataBySize, PreparedData, prepare_data

__all__ = [
    "DECODE_ERRORS",
    "IMAGE_SUFFIXES",
    "INTERPOLATIONS",
    "SPLITS",
    "DataBySize",
    "DataError",
    "DecodedSplit",
    "PreparedData",
    "SplitFiles",
    "Splits",
    "decode_image",
    "decode_split",
    "download_imagenette",
    "find_splits",
    "make_dataset",
    "prepare_data",
    "read_rgb",
    "readable_names",
    "resize",
]
