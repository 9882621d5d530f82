"""``hematovision serve``: the live page (Gradio) plus ``/video.mjpg`` and ``/stats.json``.

One FastAPI app, served by uvicorn. The capture and analysis run server-side in a
:class:`stream.session.Session` (the camera sits on the Pi; the browser is elsewhere). The live
video goes out as MJPEG from the session's single encoder (``<img src="/video.mjpg">`` in a
``gr.HTML``); counts, the differential chart, progress and the gallery refresh from a
``gr.Timer`` once a second.

Login (``--auth USER:PASS``): every route but ``/login`` needs it, the page, Gradio's API,
``/video.mjpg``, ``/stats.json``, ``/healthz`` and the API docs alike. :class:`LoginGate` (ASGI
middleware) accepts the signed session cookie that ``/login`` sets, or HTTP basic auth with the
same USER:PASS (for scripts: ``curl -u USER:PASS http://host:7860/stats.json``); the Gradio app
gets the same check as its ``auth_dependency``.

Files: Gradio copies any file a request names into its cache before a handler runs, and a
mounted (not launched) Blocks skips Gradio's own allowed-path check. So :class:`UploadGate`
records what ``/gradio_api/upload`` wrote (refusing, and deleting, anything that is not an
image or a video by its content) and the page refuses every event whose input names any other
file, before Gradio touches it. Gradio's file route never fetches URLs for a page user.

Sources: the page takes the demo, a camera index, or its own uploads; ``rtsp://``/``http(s)://``
URLs only when ``serve`` was started with ``--allow-url-sources``. Models are chosen by name
from the models folder. A page action that fails logs one line (the traceback with ``-v``) and
shows a short message without server paths.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import errno
import functools
import hashlib
import hmac
import html
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import HTTPConnection

from detector.core import KNOWN_LABELS, UNIDENTIFIED, Frame
from detector.errors import HematoVisionError, InputError
from hematovision_models import shipped_model
from stream import resolve_model
from stream.mjpeg import make_router
from stream.publish import public_source, scrub_paths
from stream.session import AnalyzerFactory, Session, SessionSettings
from stream.sources import URL_RE, media_kind

if TYPE_CHECKING:
    from gradio.block_function import BlockFunction
    from gradio.state_holder import SessionState

    from detector.analyzer import Analyzer
    from detector.classify import CellClassifier
    from detector.segment import Segmenter

log = logging.getLogger(__name__)

MAX_FILE_SIZE = "500mb"
TIMER_SECONDS = 1.0
#: Display order of labels in tables and charts.
LABEL_ORDER = (*KNOWN_LABELS, UNIDENTIFIED)


def colour_hex(label: str) -> str:
    """The overlay's colour of a label (detector.draw), as CSS hex: page and video agree."""
    from detector.draw import colour_of

    b, g, r = colour_of(label)
    return f"#{r:02x}{g:02x}{b:02x}"


# ------------------------------------------------------------------------------ analyzers


def default_analyzer_factory(settings: SessionSettings) -> Analyzer:
    """Segmenter + CellClassifier + tracker + tally, as ``hematovision run`` builds them."""
    from detector.analyzer import build_analyzer

    return build_analyzer(resolve_model(settings.model), target=settings.target,
                          min_score=settings.min_score)


def list_models(extra: str | None = None) -> dict[str, str]:
    """Model name -> path: the shipped models (and those in the folder of ``extra``)."""
    folders = [shipped_model().parent]
    env = os.environ.get("HEMATOVISION_MODEL")
    for p in (extra, env):
        if p:
            folders.append(Path(p).expanduser().resolve().parent)
    found: dict[str, str] = {}
    for p in (extra, env):
        if p and Path(p).is_file():
            found[Path(p).stem] = str(Path(p).expanduser().resolve())
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.glob("*.tflite")):
                if path.with_suffix(".json").is_file():
                    found.setdefault(path.stem, str(path.resolve()))
    return found


# ------------------------------------------------------------------------------ auth

#: Paths reachable without a login: the login form itself (and its logout link).
PUBLIC_PATHS = frozenset({"/login", "/logout"})
SESSION_COOKIE = "hv_session"
SESSION_SECONDS = 12 * 3600


class Guard:
    """One login for every route: a signed session cookie (set by ``/login``) or HTTP basic.

    The cookie is ``base64(user|expiry).hmac`` keyed by a random per-process secret, so a
    restart logs everyone out and nothing is stored server-side.
    """

    def __init__(self, auth: tuple[str, str] | None) -> None:
        self.auth = auth
        self._key = secrets.token_bytes(32)

    def user(self, headers: Any, cookies: dict[str, str]) -> str | None:
        """The logged-in user of a request, or None (always "" when no login is configured)."""
        if self.auth is None:
            return ""
        return self._basic_user(headers.get("authorization")) or self._cookie_user(
            cookies.get(SESSION_COOKIE))

    def request_user(self, request: Request) -> str | None:
        """``auth_dependency`` for Gradio: the same check on a FastAPI request."""
        return self.user(request.headers, request.cookies)

    def check(self, user: str, password: str) -> bool:
        assert self.auth is not None
        ok_user = secrets.compare_digest(user.encode(), self.auth[0].encode())
        ok_pass = secrets.compare_digest(password.encode(), self.auth[1].encode())
        return ok_user and ok_pass

    def make_cookie(self, user: str, now: float | None = None) -> str:
        payload = f"{user}|{int((now or time.time()) + SESSION_SECONDS)}".encode()
        sig = hmac.new(self._key, payload, hashlib.sha256).hexdigest()
        return base64.urlsafe_b64encode(payload).decode("ascii") + "." + sig

    def _cookie_user(self, value: str | None) -> str | None:
        if not value or "." not in value:
            return None
        b64, _, sig = value.rpartition(".")
        try:
            payload = base64.urlsafe_b64decode(b64.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            return None
        good = hmac.new(self._key, payload, hashlib.sha256).hexdigest()
        if not secrets.compare_digest(sig.encode(), good.encode()):
            return None
        user, _, expiry = payload.decode("utf-8", "replace").rpartition("|")
        if not expiry.isdigit() or int(expiry) < time.time():
            return None
        return user

    def _basic_user(self, header: str | None) -> str | None:
        scheme, param = get_authorization_scheme_param(header)
        if scheme.lower() != "basic" or not param:
            return None
        try:
            user, _, password = base64.b64decode(param).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return user if self.check(user, password) else None


class LoginGate:
    """ASGI middleware: nothing but ``/login`` answers without the login.

    A browser asking for a page is sent to the login form; any other request gets 401 (with a
    basic-auth challenge, so ``curl -u`` works).
    """

    def __init__(self, app: Any, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        if self.guard.user(conn.headers, conn.cookies) is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope.get("method") == "GET" and "text/html" in conn.headers.get("accept", ""):
            response: Response = RedirectResponse("/login", status_code=303)
        else:
            response = JSONResponse({"detail": "login required"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="hematovision"'})
        await response(scope, receive, send)


LOGIN_FORM = """<!doctype html><html><head><meta charset="utf-8"><title>HematoVision login</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:sans-serif;max-width:22em;margin:4em auto}}input,button{{display:block;
width:100%;margin:.4em 0;padding:.4em;font-size:1em}}.err{{color:#b00}}</style></head><body>
<h2>HematoVision</h2><p>Log in to see the live count.</p>{error}
<form method="post" action="/login"><input name="username" placeholder="user" autofocus
autocomplete="username" required><input name="password" type="password" placeholder="password"
autocomplete="current-password" required><button type="submit">Log in</button></form>
</body></html>"""


def add_login_routes(app: FastAPI, guard: Guard) -> None:
    """``GET/POST /login`` (a plain form that sets the session cookie) and ``GET /logout``."""

    @app.get("/login", include_in_schema=False)
    async def login_form() -> HTMLResponse:
        return HTMLResponse(LOGIN_FORM.format(error=""))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await request.form()
        user, password = str(form.get("username", "")), str(form.get("password", ""))
        if not guard.check(user, password):
            await asyncio.sleep(0.5)  # slows guessing
            log.warning("failed login for user %r from %s", user[:64],
                        request.client.host if request.client else "?")
            return HTMLResponse(LOGIN_FORM.format(
                error="<p class='err'>Wrong user name or password.</p>"), status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, guard.make_cookie(user), max_age=SESSION_SECONDS,
                            httponly=True, samesite="lax", path="/",
                            secure=request.url.scheme == "https")
        return response

    @app.get("/logout", include_in_schema=False)
    async def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response


# ------------------------------------------------------------------------------ uploads

class UploadRegistry:
    """The files ``/gradio_api/upload`` wrote for this app: the only files a page event may use."""

    def __init__(self, limit: int = 4096) -> None:
        self._paths: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit

    def add(self, path: str | Path) -> None:
        key = str(Path(path).resolve())
        with self._lock:
            self._paths[key] = None
            self._paths.move_to_end(key)
            while len(self._paths) > self._limit:
                self._paths.popitem(last=False)

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str | Path) or not str(path):
            return False
        try:
            p = Path(path)
            key = str(p.resolve())
            with self._lock:
                return key in self._paths and p.is_file() and not p.is_symlink()
        except (OSError, ValueError):
            return False


class UploadGate:
    """ASGI middleware around Gradio's file routes.

    - ``POST /gradio_api/upload``: every file written must be an image or a video by content;
      otherwise all files of that request are deleted and the answer is 415. Accepted files
      are recorded in the :class:`UploadRegistry`.
    - ``/gradio_api/file=URL`` and ``/gradio_api/proxy=``: refused (Gradio would fetch the URL
      for the caller: the page never needs that); so is ``/gradio_api/process_recording``
      (ffmpeg on any posted file, for Gradio's screen recorder, which the page does not use).
    """

    def __init__(self, app: Any, uploads: UploadRegistry) -> None:
        self.app = app
        self.uploads = uploads

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        rest = ""  # what Gradio's file routes would serve
        for marker in ("/file=", "/gradio_api/file/"):
            if marker in path:
                rest = path.split(marker, 1)[1]
        if "/proxy=" in path or "://" in rest or rest.lower().startswith(("http:", "https:")) \
                or path.rstrip("/").endswith("/gradio_api/process_recording"):
            await JSONResponse({"detail": "not allowed"}, status_code=403)(scope, receive, send)
            return
        if scope.get("method") == "POST" and path.rstrip("/").endswith("/gradio_api/upload"):
            await self._upload(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _upload(self, scope: dict, receive: Any, send: Any) -> None:
        start: dict | None = None
        body = bytearray()

        async def capture(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        await self.app(scope, receive, capture)
        assert start is not None
        paths: list[str] = []
        if start["status"] == 200:
            try:
                paths = [p for p in json.loads(bytes(body)) if isinstance(p, str)]
            except (ValueError, TypeError):
                paths = []
        bad = [p for p in paths if media_kind(p) is None]
        if bad:
            for p in paths:
                _remove_upload(Path(p))
            names = ", ".join(Path(p).name for p in bad)
            log.warning("upload refused, not an image or video: %s", names)
            await JSONResponse({"detail": f"not an image or video: {names}"},
                               status_code=415)(scope, receive, send)
            return
        for p in paths:
            self.uploads.add(p)
        await send(start)
        await send({"type": "http.response.body", "body": bytes(body)})


def _remove_upload(path: Path) -> None:
    """Delete a refused upload and its (per-upload) folder when that is left empty."""
    with contextlib.suppress(OSError):
        path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def foreign_files(value: Any, uploads: UploadRegistry) -> int:
    """How many file objects in an event's input name a file that is not a page upload."""
    if isinstance(value, dict):
        if value.get("path") is not None:  # (a webcam frame comes as a data: URL, no path)
            return 0 if value["path"] in uploads else 1
        return sum(foreign_files(v, uploads) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(foreign_files(v, uploads) for v in value)
    return 0


# ------------------------------------------------------------------------------ page errors

def page_error(action: str, exc: BaseException) -> Exception:
    """Log one line (the traceback too with -v) and make the short message the page shows."""
    import gradio as gr

    expected = isinstance(exc, HematoVisionError | gr.Error)
    text = exc.message if isinstance(exc, gr.Error) else str(exc)
    detail = scrub_paths(text) if expected else f"{type(exc).__name__}: {scrub_paths(text)}"
    log.log(logging.WARNING if expected else logging.ERROR, "page %s: %s", action, detail,
            exc_info=exc if log.isEnabledFor(logging.INFO) else None)
    shown = detail if expected else f"{action} failed (the server log says why)"
    return gr.Error(shown, print_exception=False)


def page_action(action: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a page handler: any exception becomes :func:`page_error`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is shown and logged the same way
            raise page_error(action, exc) from None

    return wrapper


# ------------------------------------------------------------------------------ HTML pieces


def _ordered(labels: Any) -> list[str]:
    labels = list(labels)
    return [x for x in LABEL_ORDER if x in labels] + [x for x in labels if x not in LABEL_ORDER]


def counts_table_html(stats: dict[str, Any]) -> str:
    """Counts, percentages and 95 % intervals as an HTML table."""
    counts, diff, ci = stats.get("counts", {}), stats.get("differential", {}), stats.get("ci95", {})
    rows = []
    for label in _ordered(counts):
        lo, hi = (ci.get(label) or [0.0, 0.0])[:2]
        rows.append(
            f"<tr data-label='{html.escape(label)}'><td><span class='hv-dot' "
            f"style='background:{colour_hex(label)}'></span>{html.escape(label)}</td>"
            f"<td class='hv-n'>{int(counts[label])}</td><td>{float(diff.get(label, 0)):.1f}</td>"
            f"<td>{float(lo):.1f}&ndash;{float(hi):.1f}</td></tr>")
    total = int(stats.get("total", 0))
    return ("<table class='hv-table'><thead><tr><th>cell</th><th>count</th><th>%</th>"
            "<th>95% CI</th></tr></thead><tbody>" + "".join(rows) +
            f"</tbody><tfoot><tr><th>total</th><th id='hv-total'>{total}</th><th></th><th></th>"
            "</tr></tfoot></table>")


def differential_svg(stats: dict[str, Any], width: int = 380) -> str:
    """Horizontal bars of the differential (%) with 95 % Wilson intervals as error bars."""
    diff, ci = stats.get("differential", {}), stats.get("ci95", {})
    labels = _ordered(diff)
    row, left, right = 24, 92, 40
    plot_w = width - left - right
    height = row * len(labels) + 26
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             f"role='img' aria-label='differential with 95% intervals' class='hv-chart'>"]
    for tick in (0, 25, 50, 75, 100):
        x = left + plot_w * tick / 100
        parts.append(f"<line x1='{x:.1f}' y1='4' x2='{x:.1f}' y2='{height - 18}' "
                     "stroke='#ddd' stroke-width='1'/>")
        parts.append(f"<text x='{x:.1f}' y='{height - 4}' font-size='10' text-anchor='middle' "
                     f"fill='#666'>{tick}%</text>")
    for i, label in enumerate(labels):
        y = 6 + i * row
        pct = max(0.0, min(100.0, float(diff.get(label, 0.0))))
        lo, hi = (ci.get(label) or [0.0, 0.0])[:2]
        colour = colour_hex(label)
        bw = plot_w * pct / 100
        parts.append(f"<text x='{left - 6}' y='{y + 13}' font-size='12' text-anchor='end' "
                     f"fill='#222'>{html.escape(label)}</text>")
        parts.append(f"<rect x='{left}' y='{y + 2}' width='{bw:.1f}' height='{row - 8}' "
                     f"fill='{colour}' opacity='0.85'/>")
        if stats.get("total", 0):
            x1, x2 = left + plot_w * float(lo) / 100, left + plot_w * float(hi) / 100
            ym = y + (row - 4) / 2
            parts.append(f"<line x1='{x1:.1f}' y1='{ym:.1f}' x2='{x2:.1f}' y2='{ym:.1f}' "
                         "stroke='#111' stroke-width='1.5'/>")
            for x in (x1, x2):
                parts.append(f"<line x1='{x:.1f}' y1='{ym - 5:.1f}' x2='{x:.1f}' "
                             f"y2='{ym + 5:.1f}' stroke='#111' stroke-width='1.5'/>")
        parts.append(f"<text x='{left + plot_w + 4}' y='{y + 13}' font-size='11' "
                     f"fill='#222'>{pct:.0f}%</text>")
    parts.append("</svg>")
    return "".join(parts)


def progress_html(stats: dict[str, Any]) -> str:
    total, target = int(stats.get("total", 0)), max(1, int(stats.get("target", 100)))
    done = " &#10003; target reached" if total >= target else ""
    return (f"<div class='hv-progress'><progress id='hv-progress' value='{min(total, target)}' "
            f"max='{target}'></progress> <b>{total}</b> / {target} cells{done}</div>")


def status_html(stats: dict[str, Any]) -> str:
    """State, source, model and speed of ``Session.stats()`` (whose source and state are
    already as viewers may see them)."""
    state = html.escape(str(stats.get("state", "")))
    colour = "#2ca02c" if state == "running" else ("#d62728" if state.startswith("error")
                                                    else "#ff7f0e")
    lat = stats.get("latency_ms")
    rec = " &#9679; REC" if stats.get("recording") else ""
    return (f"<div class='hv-status'><span id='hv-state' style='color:{colour}'>{state}</span>"
            f"{rec} &middot; source <code>{html.escape(str(stats.get('source', '')))}</code> "
            f"&middot; model <code>{html.escape(str(stats.get('model', '')))}</code><br>"
            f"<span id='hv-fps'>{float(stats.get('fps', 0)):.1f}</span> fps analysed &middot; "
            f"latency {'-' if lat is None else f'{lat:.0f} ms'} &middot; "
            f"dropped {int(stats.get('dropped', 0))} &middot; viewers "
            f"{int(stats.get('viewers', 0))}"
            + (f"<br><span id='hv-note'>{html.escape(str(stats['note']))}</span>"
               if stats.get("note") else "") + "</div>")


def gallery_html(cells: list[Any]) -> str:
    """The last counted cells as small tiles (inline JPEGs: nothing written to disk)."""
    if not cells:
        return "<div class='hv-gallery hv-empty'>no cell counted yet</div>"
    tiles = []
    for c in cells:
        b64 = base64.b64encode(c.jpeg).decode("ascii")
        tiles.append(
            f"<figure title='track #{c.track_id}, frame {c.frame}'>"
            f"<img src='data:image/jpeg;base64,{b64}' width='88' height='88' alt=''/>"
            f"<figcaption style='border-color:{colour_hex(c.label)}'>"
            f"{html.escape(c.label)} {c.score:.2f}</figcaption></figure>")
    return "<div class='hv-gallery'>" + "".join(tiles) + "</div>"


CSS = """
.hv-live img {width: 100%; max-width: 960px; background: #111; display: block;}
.hv-table {border-collapse: collapse; width: 100%;}
.hv-table td, .hv-table th {padding: 2px 8px; text-align: right;}
.hv-table td:first-child, .hv-table th:first-child {text-align: left;}
.hv-dot {display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 6px;}
.hv-progress progress {width: 60%; height: 14px;}
.hv-gallery {display: flex; flex-wrap: wrap; gap: 6px;}
.hv-gallery figure {margin: 0; width: 88px; font-size: 11px; text-align: center;}
.hv-gallery figcaption {border-top: 4px solid; }
"""

LIVE_IMG = ("<div class='hv-live'><img id='hv-video' src='/video.mjpg' "
            "alt='live annotated view'/></div>")


# ------------------------------------------------------------------------------ single images


class ImageAnalyzer:
    """Segmenter + classifier for still images (the "Image" tab); built on first use.

    The one still-image analysis of ``detect`` and ``run`` (stream.images.read_still,
    detector.still), so the page and the CLI give the same cells for the same photo.
    """

    def __init__(self, model: str | None) -> None:
        self.model = resolve_model(model)
        self._lock = threading.Lock()
        self._seg: Segmenter | None = None
        self._clf: CellClassifier | None = None

    def analyze(self, path: str | Path) -> tuple[np.ndarray, list[list[Any]]]:
        """-> (annotated RGB image, rows [cell, label, score, x1, y1, x2, y2, cut])."""
        from detector.classify import CellClassifier
        from detector.segment import Segmenter
        from detector.still import analyse_still, draw_still
        from stream.detect import image_record
        from stream.images import read_still

        bgr = read_still(path)
        with self._lock:
            if self._seg is None or self._clf is None:
                self._seg, self._clf = Segmenter(), CellClassifier(self.model)
            cells = analyse_still(bgr, self._seg, self._clf)
        rec = image_record(Path(path).name, bgr, cells)
        rows = [[i + 1, c["label"], c["score"], *c["box"], "cut" if c["cut"] else ""]
                for i, c in enumerate(rec["cells"])]
        return cv2.cvtColor(draw_still(bgr, cells), cv2.COLOR_BGR2RGB), rows


# ------------------------------------------------------------------------------ sources


def page_source_spec(kind: str, camera: float | int | None, url: str | None,
                     upload: str | None, *, allow_urls: bool = False,
                     uploads: UploadRegistry | None = None) -> str | int:
    """The source the page asked for: the demo, a camera, a page upload, a URL if allowed.

    Raises:
        InputError: anything else (in particular a server path, or a URL when ``serve`` was
            not started with ``--allow-url-sources``).
    """
    kind = (kind or "").lower()
    if kind == "demo":
        return "demo"
    if kind == "camera":
        if camera is None or float(camera) != int(camera) or not 0 <= int(camera) < 64:
            raise InputError("camera index must be a whole number from 0 to 63")
        return int(camera)
    if kind == "url":
        if not allow_urls:
            raise InputError("stream URLs are off on this page (start `hematovision serve "
                             "--allow-url-sources` to allow them)")
        text = (url or "").strip()
        if not URL_RE.match(text):
            raise InputError("stream URL must start with rtsp://, http:// or https://")
        return text
    if kind == "upload":
        if not upload:
            raise InputError("upload a video or image first")
        if uploads is None or upload not in uploads:
            raise InputError("only files uploaded through this page can be used")
        if media_kind(upload) is None:
            raise InputError(f"{Path(upload).name}: not an image or a video")
        return str(Path(upload).resolve())
    raise InputError(f"unknown source kind {kind!r}")


# ------------------------------------------------------------------------------ the page


def build_page(session: Session, *, models: dict[str, str], image_model: str | None,
               analyzer_factory: AnalyzerFactory, uploads: UploadRegistry | None = None,
               allow_urls: bool = False) -> Any:
    """The Gradio Blocks page bound to ``session``.

    ``uploads``: the files this app's upload route wrote, the only files an event may name.
    ``allow_urls``: offer URL sources (``serve --allow-url-sources``).
    """
    import gradio as gr

    registry = uploads if uploads is not None else UploadRegistry()
    image_analyzer = ImageAnalyzer(image_model)

    class Page(gr.Blocks):
        """Blocks whose events refuse any file the page did not receive as an upload.

        ``preprocess_data`` is where Gradio copies the files an event names into its cache
        (every input, whatever its component); the check runs before that copy. Gradio's own
        errors in reading an input or in turning a handler's result into the page's output
        are shown and logged like the handlers' (one line, no traceback in the terminal).
        """

        async def preprocess_data(self, block_fn: BlockFunction, inputs: list[Any],
                                  state: SessionState | None, explicit_call: bool = False
                                  ) -> list[Any]:
            action = _action_name(block_fn)
            if foreign_files(inputs, registry):
                raise page_error(action, InputError(
                    "only files uploaded through this page can be used"))
            try:
                return await super().preprocess_data(block_fn, inputs, state, explicit_call)
            except Exception as exc:  # noqa: BLE001 - shown and logged as one line
                raise page_error(action, exc) from None

        async def postprocess_data(self, block_fn: BlockFunction, predictions: list | dict,
                                   state: SessionState | None) -> list[Any]:
            try:
                return await super().postprocess_data(block_fn, predictions, state)
            except Exception as exc:  # noqa: BLE001 - shown and logged as one line
                raise page_error(_action_name(block_fn), exc) from None

    def refresh(sent: dict | None = None) -> tuple[Any, ...]:
        """New HTML for the panels; unchanged ones are skipped (no resend, no re-render)."""
        st = session.stats()
        cells = session.recent_cells()
        cells_key = tuple((c.track_id, c.frame) for c in cells)
        new = (status_html(st), progress_html(st), counts_table_html(st),
               differential_svg(st))
        sent = dict(sent or {})
        out: list[Any] = []
        for i, value in enumerate(new):
            out.append(gr.skip() if sent.get(i) == value else value)
            sent[i] = value
        out.append(gr.skip() if sent.get("cells") == cells_key and "cells" in sent
                   else gallery_html(cells))
        sent["cells"] = cells_key
        return (*out, sent)

    def _do(action: Callable[[], Any], done: str) -> str:
        action()
        return done

    with Page(title="HematoVision") as page:
        gr.Markdown("## HematoVision: live white-cell differential")
        with gr.Tab("Live"):
            with gr.Row():
                with gr.Column(scale=3):
                    gr.HTML(LIVE_IMG)
                    status = gr.HTML(elem_id="hv-status-box")
                with gr.Column(scale=2):
                    progress = gr.HTML()
                    table = gr.HTML(elem_id="hv-counts")
                    chart = gr.HTML(elem_id="hv-chart")
            gr.Markdown("#### Last counted cells")
            gallery = gr.HTML(elem_id="hv-gallery")
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary", elem_id="hv-start")
                pause_btn = gr.Button("Pause", elem_id="hv-pause")
                stop_btn = gr.Button("Stop", elem_id="hv-stop")
                reset_btn = gr.Button("Reset counts", variant="stop", elem_id="hv-reset")
            message = gr.Markdown(elem_id="hv-message")
            with gr.Accordion("Source, model and settings", open=False):
                with gr.Row():
                    kind = gr.Radio(["demo", "camera", "upload"] + (["url"] if allow_urls
                                                                   else []),
                                    value="demo", label="source")
                    camera = gr.Number(value=0, precision=0, minimum=0, maximum=63,
                                       label="camera index")
                    url = gr.Textbox(label="stream URL (rtsp://, http://, https://)",
                                     visible=allow_urls)
                upload = gr.File(label="video or image upload", type="filepath",
                                 file_types=["video", "image"])
                use_btn = gr.Button("Use this source", elem_id="hv-use-source")
                with gr.Row():
                    target = gr.Number(value=session.settings.target, precision=0, minimum=1,
                                       maximum=10000, label="target cells")
                    min_score = gr.Slider(0.0, 1.0, step=0.01,
                                          value=session.stats().get("min_score") or 0.5,
                                          label="min score (below: unidentified)")
                    model = gr.Dropdown(list(models), label="model",
                                        value=_current_model_name(session, models))
                    record = gr.Checkbox(label="record annotated video",
                                         value=session.recording)
            with gr.Row():
                export_btn = gr.Button("Export report (JSON, CSV, events, video)",
                                       elem_id="hv-export")
                files = gr.File(label="downloads", file_count="multiple", interactive=False)

        with gr.Tab("Image"):
            with gr.Row():
                img_in = gr.Image(type="filepath", label="smear photo", sources=["upload"])
                img_out = gr.Image(type="numpy", label="annotated", interactive=False)
            img_table = gr.Dataframe(headers=["cell", "label", "score", "x1", "y1", "x2", "y2",
                                              "edge"],
                                     interactive=False, label="cells")

        with gr.Tab("Browser webcam"):
            gr.Markdown("A microscope camera plugged into *this* computer: frames stream from the "
                        "browser and are analysed by a separate counter.")
            cam_state = gr.State(None, time_to_live=900)
            with gr.Row():
                cam_in = gr.Image(sources=["webcam"], streaming=True, type="numpy",
                                  label="webcam")
                cam_out = gr.Image(type="numpy", label="analysed", interactive=False,
                                   elem_id="hv-cam-out")
            cam_counts = gr.HTML()
            cam_reset = gr.Button("Reset webcam counts")

        sent_state = gr.State({})  # what this browser tab was last sent
        outputs = [status, progress, table, chart, gallery, sent_state]
        gr.Timer(TIMER_SECONDS).tick(page_action("refresh", refresh), inputs=sent_state,
                                     outputs=outputs, show_progress="hidden", queue=False)
        page.load(page_action("refresh", lambda: refresh(None)), outputs=outputs, queue=False,
                  api_name="load")

        start_btn.click(page_action("start", lambda: _do(session.start, "started")),
                        outputs=message, api_name="start")
        pause_btn.click(page_action("pause", lambda: _do(session.pause, "paused")),
                        outputs=message, api_name="pause")
        stop_btn.click(page_action("stop", lambda: _do(session.stop, "stopped")),
                       outputs=message, api_name="stop")
        reset_btn.click(page_action("reset", lambda: _do(session.reset, "counts reset")),
                        outputs=message, api_name="reset").then(page_action("refresh", refresh),
                                              inputs=sent_state, outputs=outputs)

        def use_source(k: str, c: float, u: str, f: str | None) -> str:
            spec = page_source_spec(k, c, u, f, allow_urls=allow_urls, uploads=registry)
            shown = public_source(spec)
            running = public_source(session.source_spec)
            try:
                session.switch_source(spec)
            except HematoVisionError as exc:
                raise InputError(f"could not switch to {shown}: {exc} (still on {running})"
                                 ) from None
            return f"source: {shown}"

        use_btn.click(page_action("source change", use_source),
                      inputs=[kind, camera, url, upload], outputs=message)
        target.change(page_action("target", lambda n: _do(
            lambda: session.set_target(int(n or 1)), f"target {int(n or 1)}")),
            inputs=target, outputs=message, api_name="set_target")
        min_score.release(page_action("min score", lambda v: _do(
            lambda: session.set_min_score(float(v)), f"min score {float(v):.2f}")),
            inputs=min_score, outputs=message, api_name="set_min_score")

        def choose_model(name: str | None) -> str:
            if not name or name not in models:
                raise InputError(f"unknown model {str(name)[:40]!r}")
            return _do(lambda: session.switch_model(models[name]),
                       f"model {name} (count restarted)")

        model.input(page_action("model choice", choose_model), inputs=model, outputs=message)

        def toggle_record(on: bool) -> str:
            path = session.set_recording(bool(on))
            return f"recording to {path.name}" if on and path else "recording stopped"

        record.input(page_action("recording", toggle_record), inputs=record, outputs=message)

        def export() -> list[str]:
            # straight into Gradio's cache, which serves the files as they are: no second copy,
            # and nothing left in the system's temporary folder
            folder = Path(page.GRADIO_CACHE) / f"export-{secrets.token_hex(8)}"
            folder.mkdir(parents=True)
            paths = session.export(folder)
            if "video" in paths and paths["video"].parent != folder:
                dst = folder / paths["video"].name
                shutil.copyfile(paths["video"], dst)
                paths["video"] = dst
            return [str(p) for p in paths.values()]

        export_btn.click(page_action("export", export), outputs=files)

        def analyze_image(path: str | None) -> tuple[Any, list[list[Any]]]:
            if not path:
                return None, []
            return image_analyzer.analyze(path)

        img_in.change(page_action("image analysis", analyze_image), inputs=img_in,
                      outputs=[img_out, img_table])

        def webcam_frame(rgb: np.ndarray | None, state: dict | None) -> tuple[Any, str, dict]:
            if rgb is None:
                return None, "", state or {}
            state = state or {}
            if state.get("analyzer") is None:
                state["analyzer"] = analyzer_factory(dataclasses.replace(session.settings))
                state["n"] = 0
            an = state["analyzer"]
            bgr = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, :3]), cv2.COLOR_RGB2BGR)
            res = an.process(Frame(bgr, state["n"], time.monotonic()))
            state["n"] += 1
            out = an.render(res)
            return (cv2.cvtColor(out, cv2.COLOR_BGR2RGB), counts_table_html(res.summary.to_json()),
                    state)

        cam_in.stream(page_action("webcam", webcam_frame), inputs=[cam_in, cam_state],
                      outputs=[cam_out, cam_counts, cam_state], stream_every=0.2,
                      time_limit=3600, concurrency_limit=2)

        def webcam_reset(state: dict | None) -> tuple[str, dict]:
            if state and state.get("analyzer") is not None:
                state["analyzer"].reset()
            return "", state or {}

        cam_reset.click(page_action("webcam reset", webcam_reset), inputs=cam_state,
                        outputs=[cam_counts, cam_state])
    return page


def _action_name(block_fn: BlockFunction) -> str:
    """A page event as the log names it: its API name (start, set_target, ...) or handler."""
    return block_fn.api_name or block_fn.name or "event"


def _current_model_name(session: Session, models: dict[str, str]) -> str | None:
    if session.settings.model:
        for name, path in models.items():
            if Path(path) == Path(session.settings.model).resolve():
                return name
    return "hematovision" if "hematovision" in models else (next(iter(models), None))


# ------------------------------------------------------------------------------ the app


def create_app(
    session: Session,
    *,
    auth: tuple[str, str] | None = None,
    models: dict[str, str] | None = None,
    image_model: str | None = None,
    analyzer_factory: AnalyzerFactory = default_analyzer_factory,
    max_file_size: str | int = MAX_FILE_SIZE,
    page: bool = True,
    allow_url_sources: bool = False,
) -> FastAPI:
    """FastAPI app: ``/video.mjpg``, ``/stats.json`` and (``page``) the Gradio page at ``/``.

    ``auth``: USER:PASS needed for everything but ``/login``. ``allow_url_sources``: the page
    may switch to ``rtsp://``/``http(s)://`` sources (the command line always may).
    """
    guard = Guard(auth)
    uploads = UploadRegistry()
    app = FastAPI(title="HematoVision", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.session = session
    app.state.guard = guard
    app.state.uploads = uploads
    app.state.closing = threading.Event()  # set at shutdown: open MJPEG streams end
    app.include_router(make_router(lambda: app.state.session, closing=app.state.closing))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"state": session.state}

    if auth is not None:
        add_login_routes(app, guard)  # before the mount: these win over Gradio's own /login
    if page:
        import gradio as gr

        blocks = build_page(session, models=models if models is not None else list_models(),
                            image_model=image_model, analyzer_factory=analyzer_factory,
                            uploads=uploads, allow_urls=allow_url_sources)
        # off: run history (Hugging Face buckets), MCP (its tools take URLs), error details
        gr.mount_gradio_app(app, blocks, path="/", max_file_size=max_file_size,
                            auth_dependency=guard.request_user if auth is not None else None,
                            ssr_mode=False, css=CSS, footer_links=[], run_history=False,
                            mcp_server=False, show_error=False)
    else:
        @app.get("/", include_in_schema=False)
        async def root() -> RedirectResponse:
            return RedirectResponse("/stats.json")
    app.add_middleware(UploadGate, uploads=uploads)
    if auth is not None:
        app.add_middleware(LoginGate, guard=guard)  # added last: runs first
    return app


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything starts: a port in use or an address this
    machine does not have is one line (exit 2), and nothing is left behind."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise HematoVisionError(f"cannot listen on {host}:{port} ({exc.strerror or exc})"
                                ) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or exc)
        raise HematoVisionError(f"cannot listen on {host}:{port}: {why}") from None
    return sock


def main(args: argparse.Namespace) -> int:
    """``hematovision serve [SOURCE] [--model M] [--host H] [--port P] [--auth USER:PASS]``."""
    import uvicorn

    model = args.model
    if model is not None and not Path(model).expanduser().is_file():
        raise HematoVisionError(f"{model}: model file not found")
    sock = _listen(args.host, int(args.port))
    settings = SessionSettings(model=str(Path(model).expanduser().resolve()) if model else None)
    session = Session(args.source, default_analyzer_factory, settings=settings, realtime=True)
    try:
        session.start()  # a missing camera / bad file / dead URL fails here, with its message
    except BaseException:
        sock.close()
        raise
    app = create_app(session, auth=args.auth, models=list_models(model), image_model=model,
                     allow_url_sources=args.allow_url_sources)
    host = args.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if host not in ("127.0.0.1", "localhost", "::1") and args.auth is None:
        log.warning("serving on %s without --auth: anyone on the network can see the page",
                    host)

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # listening: only now is the address worth printing
                print(f"HematoVision live view: http://{shown}:{args.port}/  (source: "
                      f"{args.source}; MJPEG /video.mjpg, figures /stats.json; events in "
                      f"{session.out_dir} once a cell is counted)", flush=True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.closing.set()  # end the MJPEG streams, or shutdown waits for them
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=int(args.port), log_level="warning",
                                   timeout_graceful_shutdown=3))
    try:
        server.run(sockets=[sock])
    finally:
        session.close()
        sock.close()
    return 0
