"""The served app: /stats.json schema, /video.mjpg frames and disconnects, login, upload limit."""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from detector.errors import InputError
from stream.app import (
    UploadRegistry,
    counts_table_html,
    create_app,
    differential_svg,
    media_kind,
    page_source_spec,
    status_html,
)
from stream.publish import public_source, scrub_paths
from stream.session import Session, SessionSettings
from tests.stream.test_session import FakeAnalyzer, ListSource


class EndlessSource(ListSource):
    """Frames at ~200 fps until closed (a fast live camera)."""

    def __init__(self) -> None:
        super().__init__(10**9)
        self.closed = False

    def read(self, timeout: float | None = None):  # noqa: ANN201
        if self.closed:
            return None
        time.sleep(0.005)
        return super().read(timeout)

    def close(self) -> None:
        self.closed = True
        self.state = "stopped"


@pytest.fixture(autouse=True)
def _gradio_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradio's uploads and outputs go to the test's folder, not /tmp/gradio."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-cache"))


def _session(tmp_path: Path, endless: bool = True) -> Session:
    opener = (lambda spec, realtime: EndlessSource()) if endless else (
        lambda spec, realtime: ListSource(10))
    s = Session("fake", lambda st: FakeAnalyzer(st), settings=SessionSettings(target=50),
                out_dir=tmp_path / "s", source_opener=opener)
    s.start()
    assert s.wait_jpeg(-1, timeout=5) is not None
    return s


def test_stats_json_schema(tmp_path: Path) -> None:
    s = _session(tmp_path)
    deadline = time.monotonic() + 10  # a loaded machine may need a few frames before a count
    while s.stats()["total"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        with TestClient(create_app(s, page=False)) as client:
            r = client.get("/stats.json")
            assert r.status_code == 200
            st = r.json()
    finally:
        s.close()
    for key in ("counts", "total", "differential", "ci95", "fps", "dropped", "source", "state",
                "latency_ms", "target", "frames"):
        assert key in st, key
    assert st["source"] == "fake" and st["state"] == "running" and st["target"] == 50
    assert set(st["counts"]) == {"neutrophil", "lymphocyte", "unidentified"}
    assert st["total"] == sum(st["counts"].values()) > 0
    assert isinstance(st["dropped"], int) and st["fps"] > 0


def test_mjpeg_snapshot_frames(tmp_path: Path) -> None:
    s = _session(tmp_path)
    try:
        with TestClient(create_app(s, page=False)) as client:
            r = client.get("/video.mjpg?frames=3")
    finally:
        s.close()
    assert r.status_code == 200
    assert r.headers["content-type"] == "multipart/x-mixed-replace; boundary=frame"
    parts = r.content.split(b"--frame\r\n")[1:]
    assert len(parts) == 3
    for p in parts:
        head, _, body = p.partition(b"\r\n\r\n")
        assert b"Content-Type: image/jpeg" in head
        n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        assert body[:2] == b"\xff\xd8" and len(body) == n + 2  # JPEG + CRLF


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """uvicorn in a thread (a real socket, so a client can really disconnect)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_mjpeg_stream_ends_cleanly_when_clients_disconnect(tmp_path: Path) -> None:
    s = _session(tmp_path)
    try:
        with _Server(create_app(s, page=False)) as base:
            for _ in range(3):
                with httpx.stream("GET", f"{base}/video.mjpg", timeout=5) as r:
                    assert r.status_code == 200
                    got = b""
                    for chunk in r.iter_bytes():
                        got += chunk
                        if got.count(b"--frame") >= 4:
                            break
                assert s.viewers <= 1  # never more than the one client we opened
            deadline = time.monotonic() + 5
            while (s.viewers or s.publisher.listener_count) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.viewers == 0 and s.publisher.listener_count == 0  # nothing left behind
            frames_before = s.publisher.encoded
            time.sleep(0.2)
            assert s.publisher.encoded > frames_before  # the session runs on
    finally:
        s.close()


def test_basic_auth_and_login_cookie_open_stream_and_stats(tmp_path: Path) -> None:
    """Scripts use HTTP basic; the browser's login form gives a cookie for the <img> too.
    (Every other route: tests/stream/test_security.py.)"""
    s = _session(tmp_path)
    try:
        app = create_app(s, auth=("lab", "s3cret"), page=False)
        with TestClient(app) as client:
            assert client.get("/stats.json").status_code == 401
            assert client.get("/video.mjpg?frames=1").status_code == 401
            bad = base64.b64encode(b"lab:wrong").decode()
            assert client.get("/stats.json",
                              headers={"Authorization": f"Basic {bad}"}).status_code == 401
            assert client.get("/stats.json", auth=("lab", "s3cret")).status_code == 200
            r = client.post("/login", data={"username": "lab", "password": "s3cret"})
            assert r.status_code == 200  # redirected to / (here: to /stats.json)
            assert client.get("/stats.json").status_code == 200
            r = client.get("/video.mjpg?frames=1")
            assert r.status_code == 200 and r.content.count(b"--frame") == 1
    finally:
        s.close()


def test_page_served_without_auth_and_upload_size_limited(tmp_path: Path) -> None:
    s = _session(tmp_path)
    try:
        app = create_app(s, max_file_size=1000, models={})
        with TestClient(app) as client:
            r = client.get("/")
            assert r.status_code == 200 and "gradio" in r.text.lower()
            assert client.get("/stats.json").status_code == 200
            small = client.post("/gradio_api/upload", files={"files": (
                "a.png", b"\x89PNG\r\n\x1a\n" + b"x" * 100, "image/png")})
            assert small.status_code == 200
            big = client.post("/gradio_api/upload", files={"files": (
                "b.mp4", b"\x00\x00\x00\x18ftypmp42" + b"x" * 5000, "video/mp4")})
            assert big.status_code == 413
            # Gradio's file route does not serve arbitrary server files
            for path in ("/gradio_api/file=/etc/passwd",
                         f"/gradio_api/file={tmp_path}/s/events.jsonl"):
                r = client.get(path)
                assert r.status_code in (403, 404) and "root:" not in r.text
    finally:
        s.close()


def test_page_sources_never_read_arbitrary_paths(tmp_path: Path) -> None:
    assert page_source_spec("demo", None, None, None) == "demo"
    assert page_source_spec("camera", 2, None, None) == 2
    assert page_source_spec("url", None, " rtsp://cam/x ", None, allow_urls=True) == "rtsp://cam/x"
    with pytest.raises(InputError, match="rtsp://"):
        page_source_spec("url", None, "/etc/passwd", None, allow_urls=True)
    with pytest.raises(InputError, match="rtsp://"):
        page_source_spec("url", None, "file:///etc/passwd", None, allow_urls=True)
    with pytest.raises(InputError, match="uploaded through this page"):
        page_source_spec("upload", None, None, "/etc/passwd")
    video = tmp_path / "video.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(100))
    uploads = UploadRegistry()
    with pytest.raises(InputError, match="uploaded through this page"):
        page_source_spec("upload", None, None, str(video), uploads=uploads)
    uploads.add(video)
    assert page_source_spec("upload", None, None, str(video), uploads=uploads) == str(video)
    video.write_bytes(b"#!/bin/sh\n")  # replaced by something that is not a video
    with pytest.raises(InputError, match="video.mp4: not an image or a video"):
        page_source_spec("upload", None, None, str(video), uploads=uploads)
    with pytest.raises(InputError, match="camera index"):
        page_source_spec("camera", 1.5, None, None)
    with pytest.raises(InputError):
        page_source_spec("path", None, None, None)


def test_media_kind_by_content_not_name(tmp_path: Path) -> None:
    cases = {"a.txt": (cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes(), "image"),
             "b.png": (cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes(), "image"),
             "c.mp4": (b"\x00\x00\x00\x20ftypisom" + bytes(64), "video"),
             "d.mkv": (b"\x1a\x45\xdf\xa3" + bytes(64), "video"),
             "e.avi": (b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(64), "video"),
             "f.png": (b"<html><script>alert(1)</script></html>", None),
             "g.mp4": (b"", None)}
    for name, (content, kind) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert media_kind(tmp_path / name) == kind, name
    assert media_kind(tmp_path / "missing.png") is None


def test_scrub_paths_keeps_names_and_urls() -> None:
    assert scrub_paths("/tmp/gradio/3f2a/smear 1.mp4: cannot open") == "smear 1.mp4: cannot open" \
        or scrub_paths("/tmp/gradio/3f2a/smear.mp4: cannot open") == "smear.mp4: cannot open"
    assert scrub_paths("/tmp/gradio/3f2a/smear.mp4: cannot open") == "smear.mp4: cannot open"
    assert scrub_paths("file '/home/lab/x/y.png' unreadable") == "file 'y.png' unreadable"
    assert scrub_paths("stream rtsp://cam.lab/live/1 could not be opened") == \
        "stream rtsp://cam.lab/live/1 could not be opened"
    assert scrub_paths("12/50 cells, C:\\data\\a.png") == "12/50 cells, a.png"
    assert scrub_paths("line one\n  line two") == "line one line two"


class _FailingOpener:
    """Opens anything but camera 7 and files named bad.mp4 (as open_source would fail)."""

    def __call__(self, spec: Any, realtime: bool) -> EndlessSource:
        if spec == 7:
            raise InputError("camera 7 could not be opened (is it plugged in?)")
        if str(spec).endswith("bad.mp4"):
            raise InputError(f"{spec}: not a readable video")
        if spec == "boom":
            raise RuntimeError(f"device {spec} exploded at /dev/video9")
        return EndlessSource()


def test_failed_source_change_keeps_the_running_source(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    s = Session("demo", lambda st: FakeAnalyzer(st), settings=SessionSettings(target=50),
                out_dir=tmp_path / "s", source_opener=_FailingOpener())
    s.start()
    assert s.wait_jpeg(-1, timeout=5) is not None
    bad = tmp_path / "gradio-cache" / "upload1" / "bad.mp4"  # as Gradio's upload route saves
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(100))
    try:
        app = create_app(s, models={})
        app.state.uploads.add(bad)
        fd = {"path": str(bad), "meta": {"_type": "gradio.FileData"}, "orig_name": "bad.mp4"}
        with TestClient(app) as client, caplog.at_level(logging.WARNING, logger="stream.app"):
            def use(kind: str, cam: int, upload: Any = None) -> dict:
                return client.post("/gradio_api/run/use_source",
                                   json={"data": [kind, cam, "", upload]}).json()

            out = use("camera", 7)
            assert out["error"] == ("could not switch to 7: camera 7 could not be opened "
                                    "(is it plugged in?) (still on demo)")
            out = use("upload", 0, fd)
            assert out["error"] == ("could not switch to bad.mp4: bad.mp4: not a readable video "
                                    "(still on demo)")
            frames = s.frames
            time.sleep(0.3)
            assert s.state == "running" and s.source_spec == "demo" and s.frames > frames
            assert use("camera", 1)["data"] == ["source: 1"]
            assert s.source_spec == 1 and s.state == "running"
    finally:
        s.close()
    lines = [r for r in caplog.records if r.name == "stream.app"]
    assert len(lines) == 2 and all(r.exc_info is None for r in lines)  # one line each
    assert all(str(tmp_path) not in r.getMessage() for r in lines)


def test_unexpected_page_error_is_one_line_and_hides_details(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = Session("demo", lambda st: FakeAnalyzer(st), settings=SessionSettings(target=50),
                out_dir=tmp_path / "s", source_opener=_FailingOpener())
    try:
        app = create_app(s, models={})
        with TestClient(app) as client:
            with caplog.at_level(logging.WARNING, logger="stream.app"):
                s.source_spec = "boom"  # the start button fails with an unexpected error
                out = client.post("/gradio_api/run/start", json={"data": []}).json()
            assert out["error"] == "start failed (the server log says why)"
            (rec,) = [r for r in caplog.records if r.name == "stream.app"]
            assert rec.exc_info is None and "RuntimeError: device boom exploded at video9" in \
                rec.getMessage()
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="stream.app"):  # -v: with the traceback
                client.post("/gradio_api/run/start", json={"data": []})
            (rec,) = [r for r in caplog.records if r.name == "stream.app"]
            assert rec.exc_info is not None
    finally:
        s.close()


def test_sources_shown_without_server_paths_or_passwords(tmp_path: Path) -> None:
    assert public_source("rtsp://lab:pa55@cam.lab/live") == "rtsp://lab:***@cam.lab/live"
    assert public_source("/tmp/gradio/3f2a/smear.mp4") == "smear.mp4"
    assert public_source("C:\\videos\\smear.mp4") == "smear.mp4"
    assert public_source(0) == "0" and public_source("demo") == "demo"
    s = Session("rtsp://lab:pa55@cam.lab/live", lambda st: FakeAnalyzer(st),
                out_dir=tmp_path / "s", source_opener=lambda spec, realtime: EndlessSource())
    s.start()
    try:
        with TestClient(create_app(s, page=False)) as client:
            assert client.get("/stats.json").json()["source"] == "rtsp://lab:***@cam.lab/live"
        assert "pa55" not in status_html(s.stats())
    finally:
        s.close()


def test_counts_table_and_chart_html() -> None:
    st = {"counts": {"unidentified": 1, "neutrophil": 3}, "total": 4,
          "differential": {"unidentified": 25.0, "neutrophil": 75.0},
          "ci95": {"unidentified": [4.6, 69.9], "neutrophil": [30.1, 95.4]}}
    table = counts_table_html(st)
    assert table.index("neutrophil") < table.index("unidentified")  # display order
    assert "<th id='hv-total'>4</th>" in table and "30.1&ndash;95.4" in table
    svg = differential_svg(st)
    assert svg.startswith("<svg") and svg.count("<rect") == 2 and "75%" in svg


def test_worker_crash_and_output_errors_are_one_line_and_shown(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash of the session's worker is an 'error' state on /stats.json and the page; an
    error in Gradio's output processing is one log line and a short message, no traceback."""
    import gradio as gr

    from tests.stream.test_session import BrokenAnalyzer, ListSource

    s = Session("/srv/lab/uploads/smear.mp4", lambda st: BrokenAnalyzer(st),
                out_dir=tmp_path / "s", source_opener=lambda spec, realtime: ListSource(50))
    try:
        app = create_app(s, models={})
        with TestClient(app) as client, caplog.at_level(logging.WARNING, logger="stream"):
            s.start()
            deadline = time.monotonic() + 10
            while not s.state.startswith("error") and time.monotonic() < deadline:
                time.sleep(0.01)
            st = client.get("/stats.json").json()
            assert st["state"] == "error: analysis stopped (RuntimeError: cannot read weights.bin)"
            assert st["source"] == "smear.mp4" and st["total"] == 2
            page = status_html(st)
            assert "analysis stopped" in page and "#d62728" in page and "/opt" not in page

            def broken(self: Any, value: Any) -> Any:
                raise ValueError("cannot show /usr/lib/python3/site-packages/x.py")

            monkeypatch.setattr(gr.Markdown, "postprocess", broken)
            out = client.post("/gradio_api/run/pause", json={"data": []}).json()
            assert out["error"] == "pause failed (the server log says why)"
    finally:
        s.close()
    crash, output = [r for r in caplog.records if r.name.startswith("stream")]
    assert crash.getMessage() == ("session worker failed: RuntimeError: cannot read "
                                  "/opt/hematovision/secret/weights.bin")
    assert output.getMessage().startswith("page pause: ComponentProcessingError: Could not "
                                          "postprocess output")
    assert output.getMessage().endswith("Original error: ValueError: cannot show x.py")
    assert crash.exc_info is None and output.exc_info is None
    assert "Traceback" not in capfd.readouterr().err


def test_mjpeg_repeats_the_last_frame_while_no_new_one_comes(tmp_path: Path) -> None:
    """A browser shows a part only once the next begins: a viewer who arrives after the source
    ended (or while it is paused) must still get the last frame followed by another part."""
    import asyncio

    from stream.mjpeg import mjpeg_frames

    s = _session(tmp_path, endless=False)
    try:
        deadline = time.monotonic() + 10
        while s.state == "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        last = s.latest()

        async def first_parts(n: int) -> list[bytes]:
            gen = mjpeg_frames(s, idle_check=0.05)
            parts = [await asyncio.wait_for(gen.__anext__(), timeout=5) for _ in range(n)]
            await gen.aclose()
            return parts

        parts = asyncio.run(first_parts(3))
    finally:
        s.close()
    assert s.state != "running"
    assert all(p.endswith(last.jpeg + b"\r\n") for p in parts)  # the same, last frame each time
