"""The page hands out nothing it was not given: server paths sent to every endpoint, uploads checked
by content, the login on every route, URL sources only when `serve` allows them."""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from detector.errors import InputError
from stream.app import create_app, page_source_spec
from stream.session import Session, SessionSettings
from tests.stream.test_session import FakeAnalyzer, ListSource

REFUSED = "only files uploaded through this page can be used"


class _Opened(ListSource):
    """A fake live source at ~100 fps that remembers what it was opened for."""

    def __init__(self, spec: Any) -> None:
        super().__init__(10**6)
        self.spec = spec

    def read(self, timeout: float | None = None):  # noqa: ANN201
        time.sleep(0.01)
        return super().read(timeout)


def _session(tmp_path: Path) -> Session:
    s = Session("fake", lambda st: FakeAnalyzer(st), settings=SessionSettings(target=50),
                out_dir=tmp_path / "session", source_opener=lambda spec, realtime: _Opened(spec))
    return s


@pytest.fixture
def gradio_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Gradio's upload cache for this test (read by Gradio when the page is built)."""
    folder = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder


@pytest.fixture
def page(tmp_path: Path, gradio_tmp: Path) -> Iterator[tuple[TestClient, Session]]:
    s = _session(tmp_path)
    app = create_app(s, models={"hematovision": str(tmp_path / "hematovision.tflite")})
    with TestClient(app) as client:
        yield client, s
    s.close()


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".png", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _file_payloads(path: Path) -> list[Any]:
    """Every way a request can name a server file."""
    rel = os.path.relpath(path, Path.cwd())
    meta = {"_type": "gradio.FileData"}
    return [
        {"path": str(path), "meta": meta},
        {"path": str(path), "meta": meta, "orig_name": "x.png", "url": f"/gradio_api/file={path}"},
        {"path": str(path)},
        {"path": rel, "meta": meta},
        [{"path": str(path), "meta": meta}],
        str(path),
    ]


def _call(client: TestClient, name: str, data: list[Any]) -> list[str]:
    """One endpoint called both ways the API offers (direct and queued): all response texts."""
    texts = [client.post(f"/gradio_api/run{name}", json={"data": data}).text]
    r = client.post(f"/gradio_api/call{name}", json={"data": data})
    texts.append(r.text)
    if r.status_code == 200:
        texts.append(client.get(f"/gradio_api/call{name}/{r.json()['event_id']}").text)
    return texts


def _errors(texts: list[str]) -> list[str]:
    """The error messages among response texts (what the page shows a user in a toast)."""
    out = []
    for t in texts:
        if t.startswith("event: error") or '"error"' in t[:12]:
            out.append(t)
    return out


def probe_server_paths(client: httpx.Client, secret_dir: Path, gradio_tmp: Path,
                       workers: int = 1) -> None:
    """Send every endpoint of ``/gradio_api/info`` the server paths of two secrets made in
    ``secret_dir``, ask the file routes for them and for whatever Gradio's cache holds, and
    assert that no secret byte comes back, no copy lands in ``gradio_tmp`` and no error
    message names a server path. Works on a TestClient and on a real server alike (there with
    ``workers`` requests at a time)."""
    token = secrets.token_hex(16).encode()
    secret_txt = secret_dir / "secret.txt"
    secret_txt.write_bytes(b"password=" + token)
    secret_png = secret_dir / "secret.png"  # a real image: a content check alone would pass it
    secret_png.write_bytes(_png(7))
    secrets_bytes = [secret_txt.read_bytes(), secret_png.read_bytes()]

    info = client.get("/gradio_api/info").json()["named_endpoints"]
    # the endpoints that take files or names must be among those probed, or this test is empty
    assert {"/use_source", "/analyze_image", "/choose_model", "/webcam_frame"} <= set(info)
    calls: list[tuple[str, list[Any]]] = []
    for name, endpoint in info.items():
        n = len(endpoint["parameters"]) + 1  # + 1: a State input takes no parameter
        for payload in [*_file_payloads(secret_txt), *_file_payloads(secret_png)[:1]]:
            calls.append((name, [payload] * n))
        # each parameter alone carries the file, the others plain values
        for i in range(len(endpoint["parameters"])):
            data: list[Any] = [None] * n
            data[i] = _file_payloads(secret_png)[0]
            calls.append((name, data))
    texts: list[str] = []
    refused: dict[str, int] = {}
    with ThreadPoolExecutor(workers) as pool:  # a real server answers several at once
        answers = list(pool.map(lambda call: _call(client, *call), calls))
    for (name, _), outs in zip(calls, answers, strict=True):
        texts.extend(outs)
        refused[name] = refused.get(name, 0) + sum(REFUSED in out for out in outs)
    for name in ("/use_source", "/analyze_image", "/choose_model", "/webcam_frame"):
        assert refused[name] > 0, f"{name} never refused a server file"

    # the file routes, for the secrets and for anything Gradio may have put in its cache
    # (the cache holds the page's own outputs, e.g. exported reports: those may be served)
    cached = [p for p in gradio_tmp.rglob("*") if p.is_file()] if gradio_tmp.exists() else []
    for target in [secret_txt, secret_png, *cached]:
        for route in (f"/gradio_api/file={target}", f"/gradio_api/file/{target}",
                      f"/file={target}", f"/gradio_api/proxy=http://127.0.0.1/{target}",
                      f"/gradio_api/file=http://127.0.0.1/{target}",
                      f"/gradio_api/file/http://127.0.0.1/{target}"):
            r = client.get(route)
            texts.append(r.text)
            assert r.status_code in (403, 404) or target in cached, route
            assert all(s not in r.content for s in secrets_bytes), route

    blob = "\n".join(texts)
    assert token.decode() not in blob
    assert base64.b64encode(secrets_bytes[1]).decode()[:40] not in blob
    errors = _errors(texts)
    assert len(errors) > 20 and all(str(secret_dir) not in e for e in errors), \
        "an error message names a server path"
    for p in cached:
        content = p.read_bytes()
        assert all(s not in content for s in secrets_bytes), f"copy of a secret in {p}"


def test_no_endpoint_hands_out_a_server_file(page: tuple[TestClient, Session], tmp_path: Path,
                                             gradio_tmp: Path) -> None:
    client, session = page
    probe_server_paths(client, tmp_path, gradio_tmp)
    assert session.source_spec == "fake"  # nothing switched to a server file


def _upload(client: TestClient, name: str, content: bytes, mime: str) -> Any:
    return client.post("/gradio_api/upload", files={"files": (name, content, mime)})


def test_uploads_checked_by_content_then_usable(page: tuple[TestClient, Session],
                                                gradio_tmp: Path) -> None:
    client, session = page
    for name, content, mime in (("a.png", b"not an image at all", "image/png"),
                                ("b.mp4", b"#!/bin/sh\necho hi\n" * 10, "video/mp4"),
                                ("c.jpg", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                 "image/jpeg")):
        r = _upload(client, name, content, mime)
        assert r.status_code == 415, name
        assert "not an image or video" in r.json()["detail"] and str(gradio_tmp) not in r.text
    assert not [p for p in gradio_tmp.rglob("*") if p.is_file()], "a refused upload was kept"
    # Gradio's screen-recording route runs ffmpeg on any posted file: the page does not use it
    r = client.post("/gradio_api/process_recording",
                    files={"video": ("v.mp4", b"\x00\x00\x00\x18ftypmp42", "video/mp4")})
    assert r.status_code == 403

    r = _upload(client, "smear.png", _png(1), "image/png")
    assert r.status_code == 200
    (path,) = r.json()
    assert Path(path).is_relative_to(gradio_tmp)
    fd = {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "smear.png"}
    out = client.post("/gradio_api/run/use_source", json={"data": ["upload", 0, "", fd]}).json()
    assert out["data"] == ["source: smear.png"]
    assert session.source_spec == str(Path(path).resolve())


def _routes() -> list[tuple[str, str]]:
    return [("GET", "/"), ("GET", "/config"), ("GET", "/gradio_api/info"),
            ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/healthz"),
            ("GET", "/video.mjpg?frames=1"), ("GET", "/stats.json"),
            ("GET", "/gradio_api/file=/etc/hostname"), ("POST", "/gradio_api/upload"),
            ("POST", "/gradio_api/run/use_source"), ("POST", "/gradio_api/queue/join")]


def test_login_needed_everywhere_but_the_login_page(tmp_path: Path, gradio_tmp: Path) -> None:
    s = _session(tmp_path)
    s.start()
    assert s.wait_jpeg(-1, timeout=5) is not None
    app = create_app(s, auth=("lab", "s3cret"), models={})
    try:
        with TestClient(app) as client:
            assert client.get("/login").status_code == 200

            def statuses(**kw: Any) -> dict[str, int]:
                out = {}
                for method, route in _routes():
                    body = {"data": ["demo", 0, "", None]} if method == "POST" else None
                    r = client.request(method, route, json=body, follow_redirects=False, **kw)
                    out[route] = r.status_code
                return out

            anon = statuses()
            assert all(code == 401 for code in anon.values()), anon
            assert s.source_spec == "fake"  # the anonymous POST switched nothing
            assert _upload(client, "a.png", _png(2), "image/png").status_code == 401
            assert not gradio_tmp.exists() or not any(gradio_tmp.rglob("*.png"))
            html = client.get("/", headers={"accept": "text/html"}, follow_redirects=False)
            assert html.status_code == 303 and html.headers["location"] == "/login"
            assert set(statuses(auth=("lab", "wrong")).values()) == {401}
            client.cookies.set("hv_session", "bGFifDk5OTk5OTk5OTk5.forged")
            assert set(statuses().values()) == {401}
            expired = app.state.guard.make_cookie("lab", now=time.time() - 13 * 3600)
            client.cookies.set("hv_session", expired)  # signed by this server, 13 h old
            assert set(statuses().values()) == {401}
            client.cookies.clear()

            basic = statuses(auth=("lab", "s3cret"))
            assert not [r for r, c in basic.items() if c == 401], basic
            assert basic["/stats.json"] == basic["/healthz"] == basic["/"] == 200

            assert client.post("/login", data={"username": "lab", "password": "no"}
                               ).status_code == 401
            assert "hv_session" not in client.cookies
            r = client.post("/login", data={"username": "lab", "password": "s3cret"},
                            follow_redirects=False)
            assert r.status_code == 303 and "hv_session" in client.cookies
            cookie = statuses()
            assert not [r for r, c in cookie.items() if c == 401], cookie
            frame = client.get("/video.mjpg?frames=1")
            assert frame.status_code == 200 and frame.content.count(b"--frame") == 1
            # the logged-in POST /gradio_api/run/use_source did switch to the demo
            assert json.loads(client.get("/stats.json").text)["source"] == "demo"

            client.get("/logout")
            assert client.get("/stats.json").status_code == 401
    finally:
        s.close()


def test_url_sources_only_when_serve_allows_them(tmp_path: Path, gradio_tmp: Path) -> None:
    with pytest.raises(InputError, match="--allow-url-sources"):
        page_source_spec("url", None, "rtsp://cam/x", None)
    assert page_source_spec("url", None, " rtsp://cam/x ", None, allow_urls=True) == \
        "rtsp://cam/x"
    data = {"data": ["url", 0, "http://169.254.169.254/latest/meta-data", None]}
    for allow in (False, True):
        s = _session(tmp_path)
        app = create_app(s, models={}, allow_url_sources=allow)
        with TestClient(app) as client:
            radio = [c for c in client.get("/config").json()["components"]
                     if c.get("props", {}).get("label") == "source"][0]
            offered = [c[0] if isinstance(c, list) else c for c in radio["props"]["choices"]]
            out = client.post("/gradio_api/run/use_source", json=data).json()
        s.close()
        assert ("url" in offered) is allow
        if allow:
            assert out["data"] == ["source: http://169.254.169.254/latest/meta-data"]
            assert s.source_spec == "http://169.254.169.254/latest/meta-data"
        else:
            # the page does not offer it, so Gradio already refuses the choice
            assert "'url'" in out["error"] and "not in the list" in out["error"]
            assert s.source_spec == "fake"
