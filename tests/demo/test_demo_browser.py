"""demo/app.py in a real browser: Debian's headless Chromium (driven by Playwright) loads the page, waits for the
gallery to be indexed, runs a text, an image and an audio query, checks the results and saves screenshots to
`test-artifacts/demo.png` (image query) and `demo-audio.png` (ignored by git)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import REPO_ROOT
from demo.sample_gallery import EXPECTED_IDS, make_gallery
from serving.launch import free_port, stop_process

pytest.importorskip("gradio", reason="the demo needs gradio (requirements-serving.txt)")
pytest.importorskip("faiss", reason="the demo's index needs faiss-cpu (requirements-serving.txt)")
pytest.importorskip("av", reason="the test gallery's video needs PyAV")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with playwright")

ARTIFACTS = REPO_ROOT / "test-artifacts"


def _chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM_PATH"), "chromium", "chromium-browser"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it as root: apt-get install chromium)")


@pytest.fixture(scope="module")
def app_url(tiny_repo, tmp_path_factory):
    gallery = make_gallery(tmp_path_factory.mktemp("gallery"), decoys=True)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    log = tmp_path_factory.mktemp("log") / "app.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "demo.app", "--model", str(tiny_repo), "--gallery", str(gallery),
             "--cache-dir", str(tmp_path_factory.mktemp("cache")), "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"demo.app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"demo.app did not answer on {url} within 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, gallery
    finally:
        stop_process(process)


def _table_ids(page) -> list[str]:
    """The `id` column of the results table, in rank order (gradio 6 renders cells as `data-testid="cell-ROW-COL"`)."""
    return [text.strip() for text in page.locator('#results-table [data-testid^="cell-"][data-testid$="-3"]').all_inner_texts()]


def _wait_for_results(page, first_id: str | None, timeout_s: float = 120) -> list[str]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        ids = [i for i in _table_ids(page) if i]
        if ids and (first_id is None or ids[0] == first_id):
            return ids
        time.sleep(0.5)
    raise AssertionError(f"results table shows {_table_ids(page)}; expected a first row {first_id!r}")


def test_demo_text_image_and_audio_queries_in_chromium(app_url):
    url, gallery = app_url
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.set_default_timeout(180_000)
            page.goto(url)
            status = page.locator("#index-status")
            sync_api.expect(status).to_contain_text("Indexed 8 items", timeout=240_000)
            assert "1 audio" in status.inner_text() and "2 pdf" in status.inner_text()

            page.locator("#top-k input[type=number]").fill("5")
            page.locator("#top-k input[type=number]").press("Enter")
            page.locator("#query-text textarea").fill("a red square")
            page.locator("#search-text").click()
            ids = _wait_for_results(page, None)
            assert len(ids) == 5 and set(ids) <= set(EXPECTED_IDS) and len(set(ids)) == 5
            sync_api.expect(page.locator("#results-gallery")).to_contain_text("#1 ·")

            page.get_by_role("tab", name="Image").click()
            page.locator("#query-image input[type=file]").set_input_files(str(gallery / "green.png"))
            sync_api.expect(page.locator("#query-image img")).to_be_visible()
            page.locator("#search-image").click()
            ids = _wait_for_results(page, "green.png")
            assert len(ids) == 5
            first_score = float(page.locator('#results-table [data-testid="cell-0-1"]').inner_text())
            assert first_score == pytest.approx(1.0, abs=1e-3)  # the query image is in the gallery
            page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

            page.get_by_role("tab", name="Audio").click()
            page.locator("#query-audio input[type=file]").set_input_files(str(gallery / "tone.wav"))
            page.locator("#search-audio").click()
            assert _wait_for_results(page, "tone.wav")[0] == "tone.wav"
            page.screenshot(path=str(ARTIFACTS / "demo-audio.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000
