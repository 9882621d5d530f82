"""The live page in a real browser: `hematovision serve` on the demo, opened by headless chromium.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package (the [dev] extra); never
runs `playwright install`. The first run renders the demo video (~1 min, cached).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]  # a test camera

pytestmark = pytest.mark.browser

FRAME_SIGNATURE_JS = """
() => {
  const img = document.querySelector('#hv-video');
  if (!img || !img.naturalWidth) return null;
  const c = document.createElement('canvas');
  c.width = 64; c.height = 48;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0, 64, 48);
  const d = ctx.getImageData(0, 0, 64, 48).data;
  let h = 0;
  for (let i = 0; i < d.length; i += 3) h = (h * 31 + d[i]) | 0;
  return [img.naturalWidth, img.naturalHeight, h];
}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _total(page) -> int:  # noqa: ANN001
    text = page.evaluate("(document.querySelector('#hv-total') || {}).textContent || ''")
    return int(text) if text.strip().isdigit() else -1


def _stable_total(page) -> bool:  # noqa: ANN001
    """The total shown stays the same across two page refreshes (the timer ticks every second)."""
    a = _total(page)
    time.sleep(2.5)
    return a >= 0 and _total(page) == a


def _wait(pred, timeout: float, step: float = 0.25):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


AUTH = ("lab", "s3cret")


@pytest.fixture
def served(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    """`hematovision serve demo` on a free port; ``request.param``: extra serve options."""
    extra = list(getattr(request, "param", []))
    auth = AUTH if "--auth" in extra else None
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright not installed ([dev] extra)")
    if not (REPO / "models" / "hematovision.tflite").is_file() and \
            not os.environ.get("HEMATOVISION_MODEL"):
        pytest.skip("no model: models/hematovision.tflite missing and HEMATOVISION_MODEL unset")
    port = _free_port()
    from stream.synth import cache_root

    # the server's session folder (under HOME) and Gradio's files stay in the test folder;
    # the rendered demo clip is still taken from (or cached in) the usual place
    (tmp_path / "home").mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(cache_root().parent),
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio-cache")}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream.cli", "serve", "demo", "--port", str(port), *extra],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        def up() -> bool:
            if proc.poll() is not None:
                return True
            try:
                return httpx.get(f"{base}/stats.json", timeout=2, auth=auth).status_code == 200
            except httpx.HTTPError:
                return False

        # the first run renders and caches the demo video
        assert _wait(up, 240, 0.5), "server did not come up"
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def _chromium() -> Iterator[Browser]:
    """Headless Debian chromium, closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_live_page_shows_video_counts_and_reset(served: str, tmp_path: Path) -> None:
    with _chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(served, timeout=60_000)
        page.wait_for_selector("#hv-video", timeout=60_000)

        # the <img> receives frames, and they change (the demo pans over the slide)
        first = _wait(lambda: page.evaluate(FRAME_SIGNATURE_JS), 20)
        assert first is not None, "no frame reached the <img>"
        assert first[0] == 640 and first[1] == 480
        seen = {first[2]}
        _wait(lambda: seen.add(page.evaluate(FRAME_SIGNATURE_JS)[2]) or len(seen) >= 5, 10,
              step=0.1)
        assert len(seen) >= 5, "the video did not change"

        # counts grow
        assert _wait(lambda: _total(page) >= 1, 90), "no cell counted on the page"
        page.screenshot(path=str(tmp_path / "live.png"), full_page=True)

        # pause holds the count; reset then returns it to zero (paused, so no cell in view
        # can be counted again before the page refreshes, however slow the machine)
        page.click("#hv-pause")
        held = _wait(lambda: _stable_total(page), 10)
        assert held, "the count kept changing while paused"
        page.click("#hv-reset")
        assert _wait(lambda: _total(page) == 0, 10), f"total after reset: {_total(page)}"
        page.screenshot(path=str(tmp_path / "after-reset.png"), full_page=True)
        page.click("#hv-start")  # resume: the video moves again
        before = page.evaluate(FRAME_SIGNATURE_JS)[2]
        assert _wait(lambda: page.evaluate(FRAME_SIGNATURE_JS)[2] != before, 20), \
            "the video did not resume after start"

        # the export offers the report files for download
        page.click("#hv-export")
        exported = _wait(lambda: page.locator("a[href*='report.csv']").count() >= 1, 30)
        page.screenshot(path=str(tmp_path / "export.png"), full_page=True)
        assert exported, "export offered no report.csv"
        assert page.locator("a[href*='events.jsonl']").count() >= 1

        # the browser-webcam tab: chromium's test camera streams frames (data: URLs, no
        # server path), and they come back analysed
        page.get_by_role("tab", name="Browser webcam").click()
        page.get_by_text("Click to Access Webcam").first.click()
        page.get_by_text("Record").first.click()
        analysed = _wait(lambda: page.evaluate(
            "(document.querySelector('#hv-cam-out img') || {}).naturalWidth || 0"), 30)
        page.screenshot(path=str(tmp_path / "webcam.png"), full_page=True)
        assert analysed > 0, "no analysed webcam frame"
    assert (tmp_path / "live.png").stat().st_size > 10_000
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and "stream.app: page " not in log, log[-2000:]  # none failed


@pytest.mark.parametrize("served", [["--auth", ":".join(AUTH)]], indirect=True)
def test_login_form_then_live_view(served: str, tmp_path: Path) -> None:
    """With --auth the browser lands on the login form; after it, the page and video work."""
    with _chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(served, timeout=60_000)
        assert page.url.endswith("/login")
        page.fill("input[name=username]", AUTH[0])
        page.fill("input[name=password]", "wrong")
        page.click("button[type=submit]")
        assert "Wrong user name or password" in page.content()
        page.fill("input[name=username]", AUTH[0])
        page.fill("input[name=password]", AUTH[1])
        page.click("button[type=submit]")
        page.wait_for_selector("#hv-video", timeout=60_000)
        first = _wait(lambda: page.evaluate(FRAME_SIGNATURE_JS), 20)
        assert first is not None and first[:2] == [640, 480], "no frame after login"
        assert _wait(lambda: _total(page) >= 0, 20), "the counts table did not load"
        assert page.request.get(f"{served}/stats.json").status == 200
        stranger = browser.new_context().new_page()  # no cookie
        assert stranger.request.get(f"{served}/stats.json").status == 401
        assert stranger.request.get(f"{served}/gradio_api/info").status == 401

    # an outside probe, logged in, sends server paths to every endpoint of the real server
    import httpx

    from tests.stream.test_security import probe_server_paths

    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    with httpx.Client(base_url=served, auth=AUTH, timeout=60) as client:
        probe_server_paths(client, secret_dir, tmp_path / "gradio-cache")
