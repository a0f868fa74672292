"""The web UI in a real headless Chromium: `python -m pasd_jax.app` with the embedded tiny models on 127.0.0.1,
driven by Playwright through Debian's `chromium` (Playwright's own browser download is never used)."""
from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

CHROMIUM = next((p for p in (os.environ.get("PASD_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium")
                 if p and pathlib.Path(p).is_file()), None)
# The flags that work on a closed network: no background connections, no sandbox as root, no GPU.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Records every progress-bar label the page shows, however briefly (two tiny steps take milliseconds).
WATCH_PROGRESS = """() => { window.__progress = []; new MutationObserver(() => {
    document.querySelectorAll('.progress-level').forEach(e => window.__progress.push(e.textContent.trim()));
  }).observe(document.body, {subtree: true, childList: true, characterData: true}); }"""


def _requirements():
    try:
        import gradio  # noqa: F401
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError as e:
        pytest.skip(f"browser test needs gradio and playwright ({e}): pip install -e \".[test]\"")
    if CHROMIUM is None:
        pytest.skip("browser test needs a Chromium: apt-get install chromium (Debian), or set PASD_CHROMIUM "
                    "to a chromium binary")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(tmp_path):
    _requirements()
    port = _free_port()
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pasd_jax.app", "--port", str(port), "--max-upload-mb", "2"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start: {(tmp_path / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield url, proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _upload(page, path: pathlib.Path) -> None:
    clear = page.locator("#pasd-input button[aria-label='Clear']")
    if clear.count():  # a file is shown: remove it, which brings the drop zone back
        clear.first.click()
    page.set_input_files("#pasd-input input[type=file]", str(path))


def _set_number(page, selector: str, value) -> None:
    box = page.locator(f"{selector} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


@pytest.mark.slow
def test_upload_run_download_then_a_non_image_then_again(app, tmp_path):
    from playwright.sync_api import sync_playwright

    from pasd_jax.prompts import build_prompt_fn

    url, proc = app
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(3)
    rgb = np.clip(rng.normal(128, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(photo)
    junk = tmp_path / "notes.txt"
    junk.write_text("not a picture\n")
    expected_prompt = build_prompt_fn("none", prompt="a test card")(Image.fromarray(rgb), "photo.png")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1360, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#pasd-run")
        _upload(page, photo)
        page.wait_for_selector("#pasd-status-idle:has-text('photo.png: 48x40')")
        _set_number(page, "#pasd-steps", 2)
        page.locator("#pasd-prompt textarea, #pasd-prompt input").first.fill("a test card")
        page.locator("#pasd-seed input").fill("4321")
        page.locator("#pasd-seed input").press("Enter")
        _set_number(page, "#pasd-upscale", 2)
        page.evaluate(WATCH_PROGRESS)
        page.click("#pasd-run")
        page.wait_for_selector("#pasd-status-ok", timeout=150_000)
        progress = page.evaluate("window.__progress")
        assert any(t.startswith("Denoising") for t in progress), progress
        assert page.inner_text("#pasd-used-seed") == "4321"
        assert page.inner_text("#pasd-used-prompt") == expected_prompt
        with page.expect_download() as download:
            page.click("#pasd-download")
        out = tmp_path / "downloaded.png"
        download.value.save_as(out)
        with Image.open(out) as img:
            assert (img.format, img.size) == ("PNG", (96, 80))  # 48x40 at upscale 2, full resolution
        page.screenshot(path=str(tmp_path / "webui.png"), full_page=True)
        print(f"screenshot: {tmp_path / 'webui.png'}; progress labels seen: {sorted(set(progress))}")

        _upload(page, junk)
        page.wait_for_selector("#pasd-status-error")
        page.click("#pasd-run")
        page.wait_for_selector("#pasd-status-error:has-text('notes.txt: not an image file')", timeout=30_000)
        assert proc.poll() is None

        _upload(page, photo)
        page.wait_for_selector("#pasd-status-idle:has-text('photo.png')")
        page.click("#pasd-run")
        page.wait_for_selector("#pasd-status-ok", timeout=60_000)  # same size and settings: no new compile
        assert page.inner_text("#pasd-used-seed") == "4321"
        browser.close()
