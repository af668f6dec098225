"""The registered model as an MLflow pyfunc: image files or pixels in, labels and probabilities out.

`log_model` logs an export's model.keras, labels.json and preprocessing.json as the pyfunc's data; the code
that loads and runs them is this module of the installed lenet_sweep (`loader_module`), never code stored
in the model: nothing is pickled, and model.keras is loaded with Keras safe_mode (export.load). Serving
therefore needs lenet_sweep installed, e.g. `mlflow models serve ... --env-manager local` from our venv.

Inputs `predict` takes:
  - encoded image files (JPEG, PNG, ... any format Pillow reads; grayscale, CMYK and alpha included) in a
    column `image` of a DataFrame (or a dict with key `image`, or a plain list): bytes, or base64 strings
    as JSON carries them (`{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}`). Each is
    decoded and resized exactly as training did (export.images_for). Answer: a DataFrame, one row per input
    row, with `label` (readable name), `class_id` (labels.json's class, the training folder's name), one
    column `p_<class_id>` per class with the model's probability, and `error`: "" when the image was
    classified; otherwise why not, with `label` and `class_id` "" and every probability 0.
  - pixels: float32 RGB (N, size, size, 3) in [0, 1], what model.keras takes. Answer: the (N, classes)
    probabilities, as the Keras flavour this pyfunc replaces answered.

The model is logged without a signature: MLflow enforces either a column schema (it turns an ndarray
input into a DataFrame, which fails for a 4-D pixel batch) or a tensor schema (which refuses a column of
image files), so no signature admits both inputs. `predict` checks its input itself and raises an
MlflowException (HTTP 400 when served) that names what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import io
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from lenet_sweep import export

IMAGE = "image"  # the input column of encoded image files
FILES = (export.MODEL, export.LABELS, export.PREPROCESSING)  # what the pyfunc's data holds: all export.load reads


def log_model(
    folder: Path,
    registered_model_name: Optional[str],
    pip_requirements: Sequence[str],
    name: str = "model",
    max_pixels: Optional[int] = None,
):
    """Log the export in `folder` as a pyfunc model run by this module (in the active MLflow run), and
    register it as a new version of `registered_model_name` unless that is None; returns MLflow's ModelInfo.

    `max_pixels`: a request's image whose header claims more pixels (width x height) is refused before it
    is decoded (a decompression bomb); None leaves only Pillow's own guard."""
    prep = export.load(folder).preprocessing  # refuses an export that would not load when served
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "export"
        data.mkdir()
        for file in FILES:
            shutil.copy2(Path(folder) / file, data / file)
        return mlflow.pyfunc.log_model(
            name=name,
            loader_module=__name__,
            data_path=str(data),
            registered_model_name=registered_model_name,
            pip_requirements=list(pip_requirements),
            # Saved as the model's example request (serving_input_example.json), which MLflow's UI shows;
            # MLflow also answers it with the logged model before registering (a warning if that fails).
            input_example=example_request(int(prep["input_size"])),
            model_config={"max_pixels": max_pixels} if max_pixels is not None else None,
        )


def example_request(size: int) -> pd.DataFrame:
    """A request as REST clients send it: one base64 PNG (a grey square) in the `image` column."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format="PNG")
    return pd.DataFrame({IMAGE: [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def _load_pyfunc(data_path: str, model_config: Optional[dict[str, Any]] = None) -> Classifier:
    """MLflow's loader_module entry point: the pyfunc's data folder (and the model_config it was logged
    with) -> a model with `predict`."""
    return Classifier(export.load(data_path), (model_config or {}).get("max_pixels"))


class _Encoded(io.BytesIO):
    """One request row's image file; its repr is what Pillow's "cannot identify image file" names."""

    def __init__(self, content: bytes, row: Any, position: int):
        super().__init__(content)
        self.row, self.position = row, position

    def __repr__(self) -> str:
        return f"<image of row {self.row}>"


class Classifier:
    """An export answering `predict` for MLflow's pyfunc and scoring server (see the module docstring)."""

    def __init__(self, loaded: export.Export, max_pixels: Optional[int] = None):
        self.export = loaded
        self.max_pixels = max_pixels
        self.size = int(loaded.preprocessing["input_size"])
        self.columns = [f"p_{c}" for c in loaded.classes]
        # The scoring server answers requests from a thread pool; Keras builds its predict function on
        # the first call and does not promise that concurrent calls are safe.
        self._lock = threading.Lock()

    def predict(self, model_input: Any, params: Optional[dict[str, Any]] = None) -> pd.DataFrame | np.ndarray:
        """Image files -> a DataFrame of labels, probabilities and per-row errors; pixels -> probabilities."""
        if isinstance(model_input, pd.DataFrame):
            if IMAGE not in model_input.columns:
                raise _bad(
                    f"the input has columns {[str(c) for c in model_input.columns]} but no {IMAGE!r}: put the "
                    f"encoded image files (bytes or base64 strings) in a column named {IMAGE!r}"
                )
            return self._classify(model_input[IMAGE])
        if isinstance(model_input, dict):
            if IMAGE not in model_input:
                raise _bad(
                    f"the input has keys {sorted(map(str, model_input))} but no {IMAGE!r}: give the encoded "
                    f"image files (bytes or base64 strings) under {IMAGE!r}"
                )
            cells = model_input[IMAGE]
            cells = [cells] if isinstance(cells, (str, bytes)) else list(np.asarray(cells, dtype=object).ravel())
            return self._classify(pd.Series(cells, dtype=object))
        if isinstance(model_input, pd.Series):
            return self._classify(model_input)
        if isinstance(model_input, (list, tuple)) and model_input and isinstance(model_input[0], (str, bytes)):
            # (not through np.asarray: a bytes array would cut trailing NUL bytes off every file)
            return self._classify(pd.Series(list(model_input), dtype=object))
        try:
            array = np.asarray(model_input)
        except (ValueError, TypeError) as err:  # ragged nested lists
            raise _bad(
                f"the input is not an array ({err}): give float32 RGB pixels (N, {self.size}, {self.size}, 3) "
                f"in [0, 1], or encoded image files in a column {IMAGE!r}"
            ) from None
        if array.dtype.kind in "SUO" and array.ndim == 1:
            return self._classify(pd.Series(list(array), dtype=object))
        return self._scores(self._pixels(array))

    def _pixels(self, array: np.ndarray) -> np.ndarray:
        want = f"float32 RGB pixels (N, {self.size}, {self.size}, 3) in [0, 1]"
        if array.dtype.kind not in "biuf":
            raise _bad(
                f"the input is an array of {array.dtype} {array.shape}: give {want}, or encoded image files "
                f"in a column {IMAGE!r}"
            )
        if array.ndim != 4 or array.shape[1:] != (self.size, self.size, 3):
            raise _bad(f"the pixels have shape {array.shape}: give {want} (a single image needs the N axis too)")
        pixels = array.astype(np.float32)
        if pixels.size and (not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1):
            raise _bad(
                f"the pixels range over [{pixels.min()}, {pixels.max()}]: give {want} "
                f"(8-bit values are divided by {self.export.preprocessing['divide_by']:g}, as "
                f"{export.PREPROCESSING} says)"
            )
        return pixels

    def _scores(self, pixels: np.ndarray) -> np.ndarray:
        if not len(pixels):
            return np.zeros((0, len(self.columns)), np.float32)
        with self._lock:
            return np.asarray(self.export.model.predict(pixels, verbose=0))

    def _classify(self, cells: pd.Series) -> pd.DataFrame:
        # Rows are tracked by position (an index may repeat) and named by their index label.
        errors: dict[int, str] = {}
        files = []
        for i, cell in enumerate(cells):
            try:
                file = _Encoded(_file_bytes(cell), cells.index[i], i)
                _check_size(file, self.max_pixels)
                files.append(file)
            except ValueError as err:
                errors[i] = f"row {cells.index[i]}: {err}"
        batch, kept, failed = export.images_for(files, self.export.preprocessing)
        for file, why in failed:
            errors[file.position] = f"row {file.row}: not an image Pillow can read ({why})"
        scores = dict(zip((file.position for file in kept), self._scores(batch)))
        rows = []
        for i in range(len(cells)):
            if i in errors:
                rows.append(["", "", *[0.0] * len(self.columns), errors[i]])
                continue
            best = int(np.argmax(scores[i]))
            rows.append([self.export.names[best], self.export.classes[best], *map(float, scores[i]), ""])
        return pd.DataFrame(rows, index=cells.index, columns=["label", "class_id", *self.columns, "error"])


def _file_bytes(cell: Any) -> bytes:
    """One cell's encoded image file: bytes as given, or a base64 string (whitespace and a `data:` URL
    prefix allowed, as `base64` and browsers write them); raises ValueError saying what the cell is."""
    if isinstance(cell, (bytes, bytearray, memoryview)):
        content = bytes(cell)
    elif isinstance(cell, str):
        text = cell.split(",", 1)[1] if cell.startswith("data:") and "," in cell else cell
        try:
            content = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"a string that is not base64 ({err}): send each image file base64-encoded") from None
    else:
        raise ValueError(f"a {type(cell).__name__}, not an image file: send bytes or a base64 string")
    if not content:
        raise ValueError("an empty image file")
    return content


def _check_size(file: io.BytesIO, max_pixels: Optional[int]) -> None:
    """Refuse (ValueError) an image whose header claims more than `max_pixels` pixels, before decoding it."""
    try:
        with Image.open(file) as img:  # the header only
            width, height = img.size
    except Image.DecompressionBombError as err:  # Pillow's own guard, whatever max_pixels says
        raise ValueError(f"{err} Not decoded") from None
    except Exception:  # not an image: export.images_for says why, as for every other file
        return
    finally:
        file.seek(0)
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}: not decoded")


def _bad(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
