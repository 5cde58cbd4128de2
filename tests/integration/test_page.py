"""The gateway's status page in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium): tables from the broker, charts drawn from live
traffic, the try-it form answered, and screenshots that show it.

Skipped when Chromium or its driver is missing, unless KETCH_REQUIRE_BROWSER=1 (set by
scripts/test.sh, whose setup installs them). Screenshots go to the test's folder, and to
$KETCH_SCREENSHOT_DIR when set.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ketch import Client
from ketch.admin import Admin
from ketch.local import LocalBroker, LocalModel, wait_for

pytestmark = pytest.mark.timeout(240)

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BLUE = (0x25, 0x63, 0xEB)  # the first series' colour in page.js


@pytest.fixture(scope="module")
def browser():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)):
        if os.environ.get("KETCH_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromium-driver are missing: scripts/setup.sh --test installs them")
        pytest.skip("chromium and chromium-driver are missing")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = Path(tempfile.mkdtemp(prefix="ketch-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def gateway(tmp_path):
    """A broker, its HTTP gateway on a free port, the iris model and app."""
    with LocalBroker() as broker:
        ready = tmp_path / "gateway.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "ketch.cli", "--admin", broker.admin, "gateway",
             "--broker", broker.frontend, "--listen", "127.0.0.1:0", "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "gateway.log", "wb"),  # noqa: SIM115
        )  # fmt: skip
        model = LocalModel(
            "ketch.examples.iris:model", "iris", backend=broker.backend, input_shape="4"
        ).start()
        try:
            wait_for(ready.exists, 60, "the gateway to listen")
            with Admin(broker.admin) as admin:
                model.wait_ready(admin, timeout_s=90)
                admin.create_app("iris", input_type="float64", input_shape=[4], slo_ms=2000, models=["iris"])
            yield json.loads(ready.read_text())["url"], broker
        finally:
            model.stop()
            proc.terminate()
            proc.wait(15)


def blue_pixels(png: bytes, box: tuple[float, float, float, float] | None = None) -> int:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    if box is not None:
        image = image.crop(tuple(int(v) for v in box))
    pixels = np.asarray(image, dtype=np.int16)
    return int((np.abs(pixels - np.array(BLUE, dtype=np.int16)) < 30).all(axis=-1).sum())


def save(name: str, png: bytes, tmp_path: Path) -> None:
    (tmp_path / name).write_bytes(png)
    out = os.environ.get("KETCH_SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_bytes(png)


def test_the_page_shows_the_broker_draws_its_charts_and_answers_the_form(browser, gateway, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, broker = gateway
    stop = threading.Event()

    def traffic() -> None:  # bounded: at most 60 s, 50 queries every 50 ms
        with Client(broker.frontend) as client:
            end = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < end:
                client.predict_many("iris", [np.random.rand(4) * 5 for _ in range(50)])
                stop.wait(0.05)

    load = threading.Thread(target=traffic, daemon=True)
    load.start()
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.2)
        wait.until(lambda d: int(d.execute_script("return document.body.dataset.polls || 0")) >= 4)
        row = browser.find_element(By.CSS_SELECTOR, "#apps tr[data-app=iris]")
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        assert cells[:5] == ["iris", "yes", "float64 [4]", "2000", "single"], cells
        model_row = browser.find_element(By.CSS_SELECTOR, "#models tr[data-model=iris]")
        assert [td.text for td in model_row.find_elements(By.TAG_NAME, "td")][:5] == [
            "iris",
            "1",
            "*",
            "1",
            "1",
        ]
        # no third-party origin: every script and stylesheet comes from the gateway
        sources = browser.execute_script(
            "return [...document.scripts].map(s => s.src).concat("
            "[...document.querySelectorAll('link[rel=stylesheet]')].map(l => l.href))"
        )
        assert sources and all(s.startswith(url + "/ui/") for s in sources), sources
        # the charts have lines in them (the canvas' own pixels)
        drawn = "const c = document.getElementById(arguments[0]).getContext('2d');" \
                "const d = c.getImageData(0, 0, c.canvas.width, c.canvas.height).data; let n = 0;" \
                "for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i]-37) < 30" \
                " && Math.abs(d[i+1]-99) < 30 && Math.abs(d[i+2]-235) < 30) n++; return n;"  # fmt: skip
        wait.until(lambda d: d.execute_script(drawn, "qps") > 50 and d.execute_script(drawn, "p99") > 20)
        # the try-it form posts to the gateway and shows the answer
        form = browser.find_element(By.CSS_SELECTOR, "form.try[data-app=iris]")
        area = form.find_element(By.TAG_NAME, "textarea")
        assert json.loads(area.get_attribute("value")) == [0.0, 0.0, 0.0, 0.0] or json.loads(
            area.get_attribute("value")
        ) == [0, 0, 0, 0]
        area.clear()
        area.send_keys("[6.7, 3.0, 5.2, 2.3]")
        form.find_element(By.TAG_NAME, "button").click()
        result = form.find_element(By.CSS_SELECTOR, "pre.result")
        wait.until(lambda d: "HTTP 200" in result.text)
        answer = json.loads(result.text.split("\n", 1)[1])
        assert answer["output"] == 2 and answer["default"] is False and answer["model"] == "iris"
        area.clear()
        area.send_keys("[1, 2]")
        form.find_element(By.TAG_NAME, "button").click()
        wait.until(lambda d: "HTTP 400" in result.text)
        assert "BAD_INPUT" in result.text
        png = browser.get_screenshot_as_png()
        save("status-page.png", png, tmp_path)
    finally:
        stop.set()
        load.join(10)
    # the screenshot shows a page, its charts and the form's answer
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the screenshot is blank"
    ratio = browser.execute_script("return window.devicePixelRatio") or 1
    for chart in ("p99", "qps"):
        box = browser.execute_script(
            "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
            "return [r.left, r.top, r.right, r.bottom];",
            chart,
        )
        assert blue_pixels(png, tuple(v * ratio for v in box)) > 20, f"no line in the {chart} chart"
    assert image.size[0] >= 1000
