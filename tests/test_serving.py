"""The registered model's pyfunc (lenet_sweep.serving): image files or pixels in, labels and
probabilities out, in process and behind `mlflow models serve`; nothing in the artifact runs as code."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO, pattern, png_header
from lenet_sweep import best, export, serving
from lenet_sweep.errors import UserError
from lenet_sweep.tracking.store import open_store

SIZE = 16  # the tiny model's input size; the test images are larger, so serving must resize them
CLASSES = ("n01440764", "n02102040", "n03000684")
MAX_PIXELS = 1_000_000  # the served model's limit (data.max_pixels when best registers it)
NAMES = ("tench", "English springer", "cassette player")
MODEL_URI = "models:/lenet_sweep-best@champion"
SERVE_START_S = 180  # bound on `mlflow models serve` start-up (about 20 s on 2 busy cores)


def write_export(folder: Path, model: keras.Model) -> Path:
    """The three files of an export that the pyfunc carries (what export.write writes, less SavedModel)."""
    folder.mkdir(parents=True)
    model.save(folder / export.MODEL)
    (folder / export.LABELS).write_text(json.dumps(export.labels(CLASSES, NAMES)))
    (folder / export.PREPROCESSING).write_text(json.dumps(export.preprocessing(SIZE, "bilinear", False)))
    return folder


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny untrained model registered by best.register into its own store, alias champion:
    {"store", "export", "version", "run_id"}. Its random weights give each image its own probabilities."""
    tmp = tmp_path_factory.mktemp("serving")
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Flatten(),
            keras.layers.Dense(
                len(CLASSES), activation="softmax", kernel_initializer=keras.initializers.RandomNormal(0, 0.2)
            ),
        ]
    )
    folder = write_export(tmp / "export", model)
    store = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    experiment = open_store(OmegaConf.create({"tracking_uri": store, "store_dir": str(tmp), "experiment": "serving"}))
    cfg = OmegaConf.create(
        {
            "sweep": {"name": "s"},
            "data": {"max_pixels": MAX_PIXELS},
            "export": {"registered_model": "lenet_sweep-best", "alias": "champion"},
        }
    )
    candidate = best.Candidate(1, "trial_1", "sweep-run", 0.61, {}, OmegaConf.create({}))
    winner = best.Summary(candidate, [best.Retraining(candidate, 1000, "retrain-run", "FINISHED", 0.6, 3)])
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            version = best.register(cfg, folder, run.info.run_id, winner, 0.55)
        yield {"store": store, "export": folder, "version": version, "run_id": run.info.run_id}
    finally:
        # (set_tracking_uri exported the store to the environment of every later child process)
        mlflow.set_tracking_uri(None)


def encoded(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    """Image files of every layout training decodes (RGB JPEG and PNG, grayscale, RGBA), 40x40, and a
    truncated JPEG; also written to disk so export.images_for can decode them as training did."""
    rgb = [Image.fromarray(pattern(label, 10 + label, 40)) for label in range(3)]
    rgba = rgb[2].convert("RGBA")
    rgba.putalpha(90)
    found = {
        "rgb.jpg": encoded(rgb[0], "JPEG"),
        "rgb.png": encoded(rgb[1], "PNG"),
        "gray.png": encoded(rgb[2].convert("L"), "PNG"),
        "gray.jpg": encoded(rgb[0].convert("L"), "JPEG"),
        "rgba.png": encoded(rgba, "PNG"),
    }
    found["truncated.jpg"] = found["rgb.jpg"][: len(found["rgb.jpg"]) // 2]
    found["large.png"] = encoded(Image.new("L", (1100, 1000)), "PNG")  # over MAX_PIXELS, under Pillow's guard
    found["bomb.png"] = png_header(30000, 30000)  # a decompression bomb: a header of 900 megapixels
    folder = tmp_path_factory.mktemp("images")
    for name, content in found.items():
        (folder / name).write_bytes(content)
    found["folder"] = folder
    return found


def as_trained(registered, files, names: list[str]) -> np.ndarray:
    """The model's probabilities for files decoded and resized as training decoded them."""
    loaded = export.load(registered["export"])
    pixels, kept, failed = export.images_for([files["folder"] / n for n in names], loaded.preprocessing)
    assert not failed and len(kept) == len(names)
    return loaded.model.predict(pixels, verbose=0)


def b64(content: bytes) -> str:
    return base64.b64encode(content).decode("ascii")


def test_image_files_are_decoded_as_training_decoded_them_and_bad_rows_say_why(registered, files):
    pyfunc = mlflow.pyfunc.load_model(MODEL_URI)
    good = ["rgb.jpg", "rgb.png", "gray.png", "gray.jpg", "rgba.png"]
    cells = [
        files["rgb.jpg"],  # bytes, as a Python caller has them
        b64(files["rgb.png"]),  # base64, as JSON carries them
        base64.encodebytes(files["gray.png"]).decode("ascii"),  # wrapped at 76 columns, as `base64` writes
        "data:image/jpeg;base64," + b64(files["gray.jpg"]),  # a browser's data URL
        b64(files["rgba.png"]),
        files["truncated.jpg"],
        "not base64 at all!",
        None,
        b"",
        files["large.png"],
        b64(files["bomb.png"]),
    ]
    answer = pyfunc.predict(pd.DataFrame({"image": cells, "ignored": range(len(cells))}))

    probabilities = [f"p_{c}" for c in CLASSES]
    assert list(answer.columns) == ["label", "class_id", *probabilities, "error"]
    assert len(answer) == len(cells)
    expected = as_trained(registered, files, good)
    ok = answer.iloc[: len(good)]
    np.testing.assert_allclose(ok[probabilities].to_numpy(), expected, atol=1e-6)
    assert len({tuple(np.round(row, 4)) for row in expected}) == len(good)  # (each row its own answer)
    assert list(ok["class_id"]) == [CLASSES[i] for i in expected.argmax(1)]
    assert list(ok["label"]) == [NAMES[i] for i in expected.argmax(1)]
    assert list(ok["error"]) == [""] * len(good)

    bad = answer.iloc[len(good) :]
    errors = list(bad["error"])
    assert errors[0].startswith("row 5: not an image Pillow can read") and "truncated" in errors[0].lower()
    assert errors[1].startswith("row 6: a string that is not base64")
    assert errors[2].startswith("row 7: a NoneType, not an image file")
    assert errors[3] == "row 8: an empty image file"
    assert errors[4] == "row 9: 1100x1000 = 1,100,000 pixels, over the limit of 1,000,000: not decoded"
    assert errors[5].startswith("row 10: Image size (900000000 pixels) exceeds limit") and "Not decoded" in errors[5]
    assert list(bad["label"]) == list(bad["class_id"]) == [""] * 6
    assert (bad[probabilities].to_numpy() == 0).all()

    # the other shapes a JSON request takes: a plain list (`inputs`), a dict of columns (`instances`)
    alone = pyfunc.predict([b64(files["rgb.png"])])
    np.testing.assert_allclose(alone[probabilities].to_numpy(), expected[1:2], atol=1e-6)
    columns = pyfunc.predict({"image": np.array([b64(files["rgb.jpg"]), b64(files["rgba.png"])])})
    np.testing.assert_allclose(columns[probabilities].to_numpy(), expected[[0, 4]], atol=1e-6)


def test_pixels_keep_working_and_bad_input_is_refused_with_what_to_do(registered, files):
    pyfunc = mlflow.pyfunc.load_model(MODEL_URI)
    loaded = export.load(registered["export"])
    pixels, _, _ = export.images_for([files["folder"] / "rgb.jpg", files["folder"] / "rgba.png"], loaded.preprocessing)
    answer = pyfunc.predict(pixels)
    assert isinstance(answer, np.ndarray)  # as the Keras flavour answered: probabilities only
    np.testing.assert_allclose(answer, loaded.model.predict(pixels, verbose=0), atol=1e-6)
    np.testing.assert_allclose(pyfunc.predict(pixels.astype(np.float64).tolist()), answer, atol=1e-6)

    refusals = {
        "has columns ['picture'] but no 'image'": pd.DataFrame({"picture": [b64(files["rgb.png"])]}),
        "the pixels have shape (16, 16, 3)": pixels[0],
        "values are divided by 255": pixels * 255,
        "an array of datetime64[D] (1,)": np.array(["2026-01-01"], dtype="datetime64[D]"),
        "the input is not an array": [[0.5, 0.5], [0.5]],
    }
    for message, given in refusals.items():
        with pytest.raises(MlflowException, match=re.escape(message)) as err:
            pyfunc.predict(given)
        assert err.value.error_code == "INVALID_PARAMETER_VALUE"  # (served: HTTP 400)


def test_the_logged_model_is_data_and_our_installed_code_only(registered, tmp_path):
    client = MlflowClient(registered["store"])
    version = client.get_model_version_by_alias("lenet_sweep-best", "champion")
    assert str(version.version) == registered["version"] == "1"
    assert version.tags["trial"] == "trial_1" and version.tags["test_accuracy"] == "0.5500"
    assert "'image'" in version.tags["input"] and f"(N, {SIZE}, {SIZE}, 3)" in version.tags["input"]

    local = Path(
        mlflow.artifacts.download_artifacts(MODEL_URI, dst_path=str(tmp_path), tracking_uri=registered["store"])
    )
    flavors = mlflow.models.Model.load(local / "MLmodel").flavors
    assert set(flavors) == {"python_function"}  # no Keras flavour, no cloudpickled PythonModel
    assert flavors["python_function"]["loader_module"] == "lenet_sweep.serving"
    assert flavors["python_function"]["code"] is None  # no code shipped (and so none put on sys.path)
    stored = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {f"data/export/{f}" for f in serving.FILES} <= stored
    assert stored - {f"data/export/{f}" for f in serving.FILES} <= {
        "MLmodel",
        "conda.yaml",
        "python_env.yaml",
        "requirements.txt",
        "input_example.json",
        "serving_input_example.json",
        "registered_model_meta",
    }
    requirements = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("pandas==") for r in requirements) and not any("lenet" in r for r in requirements)
    # the example request MLflow shows (and answered when logging) is a base64 image in `image`
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]
    answered = mlflow.pyfunc.load_model(str(local)).predict(
        pd.DataFrame(example["dataframe_split"]["data"], columns=["image"])
    )
    assert answered["error"].tolist() == [""]


def test_a_model_file_that_would_run_code_is_refused_at_load(tmp_path):
    """An artifact tampered with after registration: its model.keras has a Lambda layer whose function
    would leave a marker file. Loading it through MLflow refuses it, and the function never runs."""
    marker = tmp_path / "ran"
    inputs = keras.Input((SIZE, SIZE, 3))
    touch = keras.layers.Lambda(lambda x, m=str(marker): (open(m, "w").close(), x)[1])  # noqa: SIM115
    model = keras.Model(
        inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(keras.layers.Flatten()(touch(inputs)))
    )
    marker.unlink()  # (building the model ran the function once, here)
    folder = write_export(tmp_path / "export", model)
    assert not marker.exists()
    mlflow.pyfunc.save_model(
        tmp_path / "pyfunc", loader_module="lenet_sweep.serving", data_path=str(folder), pip_requirements=[]
    )
    with pytest.raises(UserError, match="safe_mode"):
        mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    assert not marker.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mlflow_models_serve_answers_base64_images_and_pixels(registered, files, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # the venv's bin first: `--env-manager local` runs the `uvicorn` on PATH, which must import lenet_sweep
    env |= {
        "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": registered["store"],
    }
    log = (tmp_path / "serve.log").open("w")
    command = [
        "mlflow",
        "models",
        "serve",
        "-m",
        MODEL_URI,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    # its own process group: the server forks uvicorn, and the whole group must go when the test ends
    server = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_START_S
        while True:
            assert server.poll() is None, f"mlflow models serve exited:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (
                f"no answer in {SERVE_START_S}s:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
            )
            time.sleep(0.5)

        status, body = post(
            f"{url}/invocations",
            {
                "dataframe_split": {
                    "columns": ["image"],
                    "data": [[b64(files["rgb.jpg"])], [b64(files["truncated.jpg"])]],
                }
            },
        )
        assert status == 200, body
        first, broken = body["predictions"]
        expected = as_trained(registered, files, ["rgb.jpg"])[0]
        np.testing.assert_allclose([first[f"p_{c}"] for c in CLASSES], expected, atol=1e-6)
        assert first["class_id"] == CLASSES[expected.argmax()] and first["label"] == NAMES[expected.argmax()]
        assert first["error"] == "" and broken["error"].startswith("row 1: not an image Pillow can read")

        loaded = export.load(registered["export"])
        pixels, _, _ = export.images_for([files["folder"] / "rgb.jpg"], loaded.preprocessing)
        status, body = post(f"{url}/invocations", {"inputs": pixels.tolist()})
        assert status == 200, body
        np.testing.assert_allclose(body["predictions"], [expected], atol=1e-6)

        status, body = post(f"{url}/invocations", {"dataframe_split": {"columns": ["img"], "data": [["x"]]}})
        assert status == 400 and "put the encoded image files" in body["message"]
        assert "Traceback" not in json.dumps(body)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):  # whatever of the group is left (uvicorn may outlive the CLI)
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        log.close()
