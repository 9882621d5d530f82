"""The served app: /stats.json schema, /video.mjpg frames and disconnects, login, upload limit."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from detector.errors import InputError
from stream.app import counts_table_html, create_app, differential_svg, page_source_spec
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
            while (s.viewers or s.listener_count) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.viewers == 0 and s.listener_count == 0  # nothing left behind
            frames_before = s.encodes
            time.sleep(0.2)
            assert s.encodes > frames_before  # the session runs on
    finally:
        s.close()


def test_auth_required_for_stream_and_stats(tmp_path: Path) -> None:
    s = _session(tmp_path)
    try:
        app = create_app(s, auth=("lab", "s3cret"))
        with TestClient(app) as client:
            assert client.get("/stats.json").status_code == 401
            assert client.get("/video.mjpg?frames=1").status_code == 401
            bad = base64.b64encode(b"lab:wrong").decode()
            assert client.get("/stats.json",
                              headers={"Authorization": f"Basic {bad}"}).status_code == 401
            assert client.get("/stats.json", auth=("lab", "s3cret")).status_code == 200
            # the page itself asks for a login
            assert client.get("/config").status_code == 401
            # logging in through Gradio's form gives a cookie that also opens the raw routes
            r = client.post("/login", data={"username": "lab", "password": "s3cret"})
            assert r.status_code == 200
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
            small = client.post("/gradio_api/upload",
                                files={"files": ("a.png", b"x" * 100, "image/png")})
            assert small.status_code == 200
            big = client.post("/gradio_api/upload",
                              files={"files": ("b.mp4", b"x" * 5000, "video/mp4")})
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
    assert page_source_spec("url", None, " rtsp://cam/x ", None) == "rtsp://cam/x"
    with pytest.raises(InputError, match="rtsp://"):
        page_source_spec("url", None, "/etc/passwd", None)
    with pytest.raises(InputError, match="rtsp://"):
        page_source_spec("url", None, "file:///etc/passwd", None)
    with pytest.raises(InputError, match="uploaded through this page"):
        page_source_spec("upload", None, None, "/etc/passwd")
    with pytest.raises(InputError, match="uploaded through this page"):
        page_source_spec("upload", None, None, str(tmp_path / "video.mp4"))
    with pytest.raises(InputError, match="camera index"):
        page_source_spec("camera", 1.5, None, None)
    with pytest.raises(InputError):
        page_source_spec("path", None, None, None)


def test_counts_table_and_chart_html() -> None:
    st = {"counts": {"unidentified": 1, "neutrophil": 3}, "total": 4,
          "differential": {"unidentified": 25.0, "neutrophil": 75.0},
          "ci95": {"unidentified": [4.6, 69.9], "neutrophil": [30.1, 95.4]}}
    table = counts_table_html(st)
    assert table.index("neutrophil") < table.index("unidentified")  # display order
    assert "<th id='hv-total'>4</th>" in table and "30.1&ndash;95.4" in table
    svg = differential_svg(st)
    assert svg.startswith("<svg") and svg.count("<rect") == 2 and "75%" in svg
