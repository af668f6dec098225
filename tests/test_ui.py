"""`make ui` serves the store, and a sweep's runs compare in the MLflow UI: checked in headless Chromium."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import REPO
from lenet_sweep import ui as ui_module
from lenet_sweep.errors import UserError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a headless Chromium on a machine with no network: no background connections, no sandbox as root.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # a 2-core machine under test load renders slowly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def swept(tiny_sweep):
    """The session's two-trial sweep: (store URI, experiment id, trial runs by name)."""
    return tiny_sweep["store"], tiny_sweep["experiment"], tiny_sweep["trials"]


@pytest.fixture(scope="module")
def ui(swept, tmp_path_factory):
    """`make ui` against the sweep's store on a free port (env PORT): (URL, the file with what it printed)."""
    store, _, _ = swept
    port = free_port()
    log = tmp_path_factory.mktemp("ui-log") / "make-ui.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PORT": str(port)}
    with log.open("w") as out:
        server = subprocess.Popen(
            ["make", "--no-print-directory", "ui"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                assert server.poll() is None, f"make ui exited: {log.read_text()[-3000:]}"
                time.sleep(1)
        else:
            pytest.fail(f"the MLflow UI did not answer within 180 s: {log.read_text()[-3000:]}")
        yield url, log
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_make_ui_serves_the_store_on_loopback_and_prints_the_url(ui, swept):
    url, log = ui
    store, _, _ = swept
    printed = log.read_text()
    assert f"MLflow UI for {store} at {url} (Ctrl-C stops it)" in printed
    assert f"Uvicorn running on {url}" in printed  # the server itself bound to loopback, on PORT


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed and `make browser` could not install "
    "it (it needs root and apt-get: apt-get install chromium)",
)
def test_a_sweeps_trials_compare_in_the_browser(ui, swept, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, _ = ui
    _, experiment, trials = swept
    assert sorted(trials) == ["trial-0", "trial-1"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)  # expect() has its own timeout (5 s)
        try:
            # the experiment, in MLflow's model-training view
            page.goto(f"{url}/#/experiments")
            page.get_by_text("Model training", exact=True).click()
            page.get_by_role("link", name="sweep", exact=True).click()
            parent = page.get_by_role("row").filter(has=page.get_by_role("link", name="sweep-ui", exact=True))
            expect(parent).to_be_visible()
            assistant = page.get_by_role("button", name="Close")  # MLflow's chat side panel: make room
            if assistant.count():
                assistant.first.click()
            page.screenshot(path=tmp_path / "1-experiment.png")

            # the parent run lists its trials
            parent.get_by_role("button").first.click()
            for name in trials:
                row = page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))
                expect(row).to_be_visible()
                row.get_by_role("checkbox").first.check()
            page.screenshot(path=tmp_path / "2-trials.png")

            # the compare view: both trials, their hyperparameters and results side by side
            page.get_by_role("button", name="Compare").click()
            expect(page.get_by_text("Comparing 2 Runs")).to_be_visible()
            for name in (
                "dense_1",
                "model.dense",
                "model.filters",
                "model.conv_layers",
                "model.input_size",
                "model.output_activation",
                "optimizer.name",
                "optimizer.learning_rate",
                "train.epochs",
            ):
                expect(page.get_by_text(name, exact=True).first).to_be_visible()
            for name in ("best_val_accuracy", "val_accuracy", "val_loss", "epochs_run", "trial_seconds"):
                expect(page.get_by_text(name, exact=True).first).to_be_visible()
            expect(page.locator(".js-plotly-plot").first).to_be_visible()  # the parallel-coordinates plot
            page.screenshot(path=tmp_path / "3-compare.png")

            # a trial's loss curves, previewed from its artifacts
            page.goto(f"{url}/#/experiments/{experiment}/runs/{trials['trial-0']}")
            page.get_by_role("tab", name="Artifacts").click()
            page.get_by_text("plots", exact=True).click()
            page.get_by_text("curves.png", exact=True).click()
            image = page.locator("img[src^='blob:']").first
            expect(image).to_be_visible()
            assert image.evaluate("img => img.complete && img.naturalWidth") > 100  # decoded, not broken
            page.screenshot(path=tmp_path / "4-curves.png")
        except Exception:
            page.screenshot(path=tmp_path / "failed.png")  # what the browser showed when the check failed
            print(f"browser at {page.url}; screenshot {tmp_path / 'failed.png'}")
            raise
        finally:
            browser.close()
    assert all(
        (tmp_path / f).stat().st_size > 10_000
        for f in ("1-experiment.png", "2-trials.png", "3-compare.png", "4-curves.png")
    )


def test_ui_refuses_a_taken_port_and_a_tracking_server(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "mlflow": {"tracking_uri": None, "store_dir": str(tmp_path / "mlruns")},
            "ui": {"host": "127.0.0.1", "port": 0},
        }
    )
    command, url = ui_module.server_command(cfg)
    store = command[command.index("--backend-store-uri") + 1]
    assert store == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert command[command.index("--host") + 1] == "127.0.0.1" and url == "http://127.0.0.1:0"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg.ui.port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"port {cfg.ui.port} on 127.0.0.1 is taken"):
            ui_module.serve(cfg)
    cfg.mlflow.tracking_uri = "https://mlflow.example"
    with pytest.raises(UserError, match="is a tracking server"):
        ui_module.server_command(cfg)
