"""The live page in a real browser: `hematovision serve` on the demo, opened by headless chromium.

Two servers (one plain, one with --auth) are started side by side once for the module, and one
chromium is shared by its tests (each test opens its own browser context: no shared cookies).
The plain server serves the live test only (it pauses, resets and resumes the count); the --auth
server waits paused meanwhile, then serves the login test and the server-path probe.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]  # a test camera
AUTH = ("lab", "s3cret")
#: serve options of each server the module starts
CONFIGS = {"plain": [], "auth": ["--auth", ":".join(AUTH)]}

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


def _wait(pred, timeout: float, step: float = 0.1):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


@dataclass
class _Served:
    """One `hematovision serve demo` process: its address, folder and logs."""

    proc: subprocess.Popen
    base: str
    folder: Path
    auth: tuple[str, str] | None

    @property
    def log(self) -> str:
        return (self.folder / "serve.log").read_text()

    def listening(self) -> bool:
        """Wait for the address line, which serve prints only once it listens."""
        out = self.folder / "serve.out"
        _wait(lambda: self.proc.poll() is not None or
              "HematoVision live view: http" in out.read_text(), 240, 0.05)
        return self.proc.poll() is None and "HematoVision live view: http" in out.read_text()

    def ready(self) -> _Served:
        assert self.listening(), f"server did not come up:\n{self.log}"
        return self

    def stats(self) -> dict:
        return httpx.get(f"{self.base}/stats.json", auth=self.auth, timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, _Served]]:
    """Both servers, started at once (their start-up, mostly imports, overlaps)."""
    if not (REPO / "models" / "hematovision.tflite").is_file() and \
            not os.environ.get("HEMATOVISION_MODEL"):
        pytest.skip("no model: models/hematovision.tflite missing and HEMATOVISION_MODEL unset")
    from stream.sources import demo_video_path
    from stream.synth import cache_root

    demo_video_path()  # rendered here once if missing, not by both servers at the same time
    started: dict[str, _Served] = {}
    try:
        for name, extra in CONFIGS.items():
            folder = tmp_path_factory.mktemp(f"serve-{name}")
            # the server's session folder (under HOME) and Gradio's files stay in the test
            # folder; the rendered demo clip is still taken from the usual place
            (folder / "home").mkdir()
            env = {**os.environ, "HOME": str(folder / "home"),
                   "XDG_CACHE_HOME": str(cache_root().parent),
                   "GRADIO_TEMP_DIR": str(folder / "gradio-cache")}
            port = _free_port()
            with open(folder / "serve.out", "w") as out, open(folder / "serve.log", "w") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "stream.cli", "serve", "demo", "--port", str(port),
                     *extra], cwd=REPO, stdout=out, stderr=err, env=env)
            started[name] = _Served(proc, f"http://127.0.0.1:{port}", folder,
                                    AUTH if "--auth" in extra else None)
        yield started
    finally:
        for served in started.values():
            served.stop()


@pytest.fixture
def served(servers: dict[str, _Served]) -> Iterator[_Served]:
    """The plain server, for one test (stopped after it). The --auth server waits paused
    meanwhile, so that only one server analyses the demo at a time."""
    plain = servers["plain"].ready()
    other = servers["auth"]
    if other.listening():
        httpx.post(f"{other.base}/gradio_api/run/pause", json={"data": []}, auth=other.auth,
                   timeout=30).raise_for_status()
    yield plain
    plain.stop()


@pytest.fixture(scope="module")
def served_auth(servers: dict[str, _Served]) -> _Served:
    """The --auth server, running (resumed if the plain server's test had it wait paused)."""
    auth = servers["auth"].ready()
    httpx.post(f"{auth.base}/gradio_api/run/start", json={"data": []}, auth=auth.auth,
               timeout=30).raise_for_status()
    assert _wait(lambda: auth.stats()["state"] == "running", 10)
    return auth


@pytest.fixture(scope="module")
def browser(servers: dict[str, _Served]) -> Iterator[Browser]:
    """Headless Debian chromium for the module (launched while the servers start)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright not installed ([dev] extra)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            b.close()


@contextlib.contextmanager
def _page(browser: Browser):  # noqa: ANN202
    """A page in a fresh context (its own cookies), closed afterwards."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.mark.browser
def test_live_page_shows_video_counts_and_reset(browser: Browser, served: _Served,
                                                tmp_path: Path) -> None:
    with _page(browser) as page:
        page.goto(served.base, timeout=60_000)
        page.wait_for_selector("#hv-video", timeout=60_000)

        # the <img> receives frames, and they change (the demo pans over the slide)
        first = _wait(lambda: page.evaluate(FRAME_SIGNATURE_JS), 20)
        assert first is not None, "no frame reached the <img>"
        assert first[0] == 640 and first[1] == 480
        seen = {first[2]}
        _wait(lambda: seen.add(page.evaluate(FRAME_SIGNATURE_JS)[2]) or len(seen) >= 5, 10,
              step=0.05)
        assert len(seen) >= 5, "the video did not change"

        # counts grow
        assert _wait(lambda: _total(page) >= 1, 90), "no cell counted on the page"
        page.screenshot(path=str(tmp_path / "live.png"), full_page=True)

        # pause holds the count: the server's total and the page's stay the same across more
        # than one refresh of the page (once a frame being analysed at the click is done)
        page.click("#hv-pause")
        assert _wait(lambda: served.stats()["state"] == "paused", 10)

        def held() -> bool:
            shown, counted = _total(page), served.stats()["total"]
            time.sleep(1.3)  # the page refreshes once a second
            return shown == counted == _total(page) == served.stats()["total"] >= 1

        assert _wait(held, 15), "the count kept changing while paused"
        # reset then returns it to zero (paused, so no cell in view can be counted again
        # before the page refreshes, however slow the machine)
        page.click("#hv-reset")
        assert _wait(lambda: _total(page) == 0, 10), f"total after reset: {_total(page)}"
        assert served.stats()["total"] == 0
        page.screenshot(path=str(tmp_path / "after-reset.png"), full_page=True)
        page.click("#hv-start")  # resume: the video moves again
        before = page.evaluate(FRAME_SIGNATURE_JS)[2]
        assert _wait(lambda: page.evaluate(FRAME_SIGNATURE_JS)[2] != before, 20), \
            "the video did not resume after start"
        assert served.stats()["state"] == "running"

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
    log = served.log
    assert "Traceback" not in log and "stream.app: page " not in log, log[-2000:]  # none failed


@pytest.mark.browser
def test_login_form_then_live_view(browser: Browser, served_auth: _Served) -> None:
    """With --auth the browser lands on the login form; after it, the page and video work."""
    base = served_auth.base
    with _page(browser) as page:
        page.goto(base, timeout=60_000)
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
        assert _wait(lambda: page.evaluate(FRAME_SIGNATURE_JS)[2] != first[2], 20), \
            "the video did not move after login"
        assert _wait(lambda: _total(page) >= 0, 20), "the counts table did not load"
        assert page.request.get(f"{base}/stats.json").status == 200
        with _page(browser) as stranger:  # no cookie
            assert stranger.request.get(f"{base}/stats.json").status == 401
            assert stranger.request.get(f"{base}/gradio_api/info").status == 401
    assert "Traceback" not in served_auth.log, served_auth.log[-2000:]


def test_real_server_hands_out_no_server_file(served_auth: _Served, tmp_path: Path) -> None:
    """An outside probe, logged in, sends server paths to every endpoint of the real server
    (as tests/stream/test_security.py does on the app in the test's process)."""
    from tests.stream.test_security import probe_server_paths

    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    with httpx.Client(base_url=served_auth.base, auth=AUTH, timeout=60) as client:
        probe_server_paths(client, secret_dir, served_auth.folder / "gradio-cache", workers=4)
