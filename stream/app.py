"""``hematovision serve``: the live page (Gradio) plus ``/video.mjpg`` and ``/stats.json``.

One FastAPI app, served by uvicorn. The capture and analysis run server-side in a
:class:`stream.session.Session` (the camera sits on the Pi; the browser is elsewhere). The live
video goes out as MJPEG from the session's single encoder (``<img src="/video.mjpg">`` in a
``gr.HTML``); counts, the differential chart, progress and the gallery refresh from a
``gr.Timer`` once a second.

Login (``--auth USER:PASS``): the Gradio page asks for it (Gradio's login form, which sets a
session cookie). ``/video.mjpg`` and ``/stats.json`` accept either that cookie (so the page's
``<img>`` works after login) or HTTP basic auth with the same USER:PASS (for scripts and lab
dashboards: ``curl -u USER:PASS http://host:7860/stats.json``).

The page never reads arbitrary server paths: a source is the demo, a camera index, an
``rtsp://``/``http(s)://`` URL, or a file uploaded through the page (size-limited by Gradio's
``max_file_size``). Models are chosen by name from the models folder.
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from fastapi import FastAPI, HTTPException, Request, status
from fastapi.responses import RedirectResponse
from fastapi.security.utils import get_authorization_scheme_param

from detector.core import CELL_TYPES, UNIDENTIFIED, Frame
from detector.errors import HematoVisionError, InputError
from hematovision_models import shipped_model
from stream import resolve_model
from stream.mjpeg import make_router
from stream.session import AnalyzerFactory, Session, SessionSettings
from stream.sources import URL_RE

log = logging.getLogger(__name__)

MAX_FILE_SIZE = "500mb"
TIMER_SECONDS = 1.0
#: Display order of labels in tables and charts.
LABEL_ORDER = (*CELL_TYPES, UNIDENTIFIED)


def colour_hex(label: str) -> str:
    """The overlay's colour of a label (detector.draw), as CSS hex: page and video agree."""
    from detector.draw import colour_of

    b, g, r = colour_of(label)
    return f"#{r:02x}{g:02x}{b:02x}"


# ------------------------------------------------------------------------------ analyzers


def default_analyzer_factory(settings: SessionSettings) -> Any:
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


class Guard:
    """Same login for the page (Gradio) and the raw routes (cookie or HTTP basic)."""

    def __init__(self, auth: tuple[str, str] | None) -> None:
        self.auth = auth
        self.gradio_app: Any = None  # set after mounting: holds the login cookies

    def __call__(self, request: Request) -> None:
        if self.auth is None:
            return
        if self._basic_ok(request) or self._cookie_ok(request):
            return
        raise HTTPException(status_code=status.HTTP_401_UNAUTHORIZED,
                            detail="login required (Gradio login cookie or HTTP basic auth)",
                            headers={"WWW-Authenticate": 'Basic realm="hematovision"'})

    def _basic_ok(self, request: Request) -> bool:
        scheme, param = get_authorization_scheme_param(request.headers.get("Authorization"))
        if scheme.lower() != "basic" or not param:
            return False
        try:
            user, _, password = base64.b64decode(param).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        assert self.auth is not None
        return secrets.compare_digest(user.encode(), self.auth[0].encode()) and \
            secrets.compare_digest(password.encode(), self.auth[1].encode())

    def _cookie_ok(self, request: Request) -> bool:
        app = self.gradio_app
        if app is None:
            return False
        cid = getattr(app, "cookie_id", "")
        token = (request.cookies.get(f"access-token-{cid}")
                 or request.cookies.get(f"access-token-unsecure-{cid}"))
        return bool(token) and token in getattr(app, "tokens", {})


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
    state = html.escape(str(stats.get("state", "")))
    colour = "#2ca02c" if state == "running" else ("#d62728" if state.startswith("error")
                                                    else "#ff7f0e")
    lat = stats.get("latency_ms")
    rec = " &#9679; REC" if stats.get("recording") else ""
    return (f"<div class='hv-status'><span id='hv-state' style='color:{colour}'>{state}</span>"
            f"{rec} &middot; source <code>{html.escape(_short_source(stats.get('source')))}</code> "
            f"&middot; model <code>{html.escape(str(stats.get('model', '')))}</code><br>"
            f"<span id='hv-fps'>{float(stats.get('fps', 0)):.1f}</span> fps analysed &middot; "
            f"latency {'-' if lat is None else f'{lat:.0f} ms'} &middot; "
            f"dropped {int(stats.get('dropped', 0))} &middot; viewers "
            f"{int(stats.get('viewers', 0))}</div>")


def _short_source(source: Any) -> str:
    """A file's name instead of its full (upload cache) path; URLs and cameras as they are."""
    text = str(source or "")
    return text if URL_RE.match(text) or "/" not in text else Path(text).name


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
        self._seg: Any = None
        self._clf: Any = None

    def analyze(self, path: str | Path) -> tuple[np.ndarray, list[list[Any]]]:
        """-> (annotated RGB image, rows [cell, label, score, x1, y1, x2, y2, cut])."""
        from detector.classify import CellClassifier
        from detector.segment import Segmenter
        from detector.still import analyse_still, draw_still
        from stream.detect import image_record
        from stream.images import read_still

        bgr = read_still(path)
        with self._lock:
            if self._seg is None:
                self._seg, self._clf = Segmenter(), CellClassifier(self.model)
            cells = analyse_still(bgr, self._seg, self._clf)
        rec = image_record(Path(path).name, bgr, cells)
        rows = [[i + 1, c["label"], c["score"], *c["box"], "cut" if c["cut"] else ""]
                for i, c in enumerate(rec["cells"])]
        return cv2.cvtColor(draw_still(bgr, cells), cv2.COLOR_BGR2RGB), rows


# ------------------------------------------------------------------------------ sources


def _upload_roots() -> list[Path]:
    roots = [Path(tempfile.gettempdir()) / "gradio"]
    if os.environ.get("GRADIO_TEMP_DIR"):
        roots.append(Path(os.environ["GRADIO_TEMP_DIR"]))
    return [r.resolve() for r in roots]


def page_source_spec(kind: str, camera: float | int | None, url: str | None,
                     upload: str | None) -> str | int:
    """The source the page asked for, allowing only the demo, cameras, URLs and uploads.

    Raises:
        InputError: anything else (in particular a local path typed by a page visitor).
    """
    kind = (kind or "").lower()
    if kind == "demo":
        return "demo"
    if kind == "camera":
        if camera is None or float(camera) != int(camera) or not 0 <= int(camera) < 64:
            raise InputError("camera index must be a whole number from 0 to 63")
        return int(camera)
    if kind == "url":
        text = (url or "").strip()
        if not URL_RE.match(text):
            raise InputError("stream URL must start with rtsp://, http:// or https://")
        return text
    if kind == "upload":
        if not upload:
            raise InputError("upload a video or image first")
        path = Path(upload).resolve()
        if not any(path.is_relative_to(root) for root in _upload_roots()):
            raise InputError("only files uploaded through this page can be used")
        return str(path)
    raise InputError(f"unknown source kind {kind!r}")


# ------------------------------------------------------------------------------ the page


def build_page(session: Session, *, models: dict[str, str], image_model: str | None,
               analyzer_factory: AnalyzerFactory) -> Any:
    """The Gradio Blocks page bound to ``session``."""
    import gradio as gr

    image_analyzer = ImageAnalyzer(image_model)

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
        try:
            action()
        except HematoVisionError as exc:
            raise gr.Error(str(exc)) from None
        return done

    with gr.Blocks(title="HematoVision") as page:
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
                    kind = gr.Radio(["demo", "camera", "url", "upload"], value="demo",
                                    label="source")
                    camera = gr.Number(value=0, precision=0, minimum=0, maximum=63,
                                       label="camera index")
                    url = gr.Textbox(label="stream URL (rtsp://, http://, https://)")
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
                cam_out = gr.Image(type="numpy", label="analysed", interactive=False)
            cam_counts = gr.HTML()
            cam_reset = gr.Button("Reset webcam counts")

        sent_state = gr.State({})  # what this browser tab was last sent
        outputs = [status, progress, table, chart, gallery, sent_state]
        gr.Timer(TIMER_SECONDS).tick(refresh, inputs=sent_state, outputs=outputs,
                                     show_progress="hidden", queue=False)
        page.load(lambda: refresh(None), outputs=outputs, queue=False)

        start_btn.click(lambda: _do(session.start, "started"), outputs=message)
        pause_btn.click(lambda: _do(session.pause, "paused"), outputs=message)
        stop_btn.click(lambda: _do(session.stop, "stopped"), outputs=message)
        reset_btn.click(lambda: _do(session.reset, "counts reset"), outputs=message
                        ).then(refresh, inputs=sent_state, outputs=outputs)

        def use_source(k: str, c: float, u: str, f: str | None) -> str:
            try:
                spec = page_source_spec(k, c, u, f)
            except HematoVisionError as exc:
                raise gr.Error(str(exc)) from None
            was = session.state
            _do(lambda: session.switch_source(spec), "")
            if was == "stopped" or was.startswith("error"):
                _do(session.start, "")
            return f"source: {spec if k != 'upload' else Path(str(spec)).name}"

        use_btn.click(use_source, inputs=[kind, camera, url, upload], outputs=message)
        target.change(lambda n: _do(lambda: session.set_target(int(n or 1)),
                                    f"target {int(n or 1)}"), inputs=target, outputs=message)
        min_score.release(lambda v: _do(lambda: session.set_min_score(float(v)),
                                        f"min score {float(v):.2f}"),
                          inputs=min_score, outputs=message)

        def choose_model(name: str | None) -> str:
            if not name or name not in models:
                raise gr.Error(f"unknown model {name!r}")
            return _do(lambda: session.switch_model(models[name]),
                       f"model {name} (count restarted)")

        model.input(choose_model, inputs=model, outputs=message)
        def toggle_record(on: bool) -> str:
            path = session.set_recording(bool(on))
            return f"recording to {path.name}" if on and path else "recording stopped"

        record.input(toggle_record, inputs=record, outputs=message)

        def export() -> list[str]:
            folder = Path(tempfile.mkdtemp(prefix="hematovision-export-"))
            paths = session.export(folder)
            if "video" in paths and paths["video"].parent != folder:
                dst = folder / paths["video"].name
                shutil.copyfile(paths["video"], dst)
                paths["video"] = dst
            return [str(p) for p in paths.values()]

        export_btn.click(export, outputs=files)

        def analyze_image(path: str | None) -> tuple[Any, list[list[Any]]]:
            if not path:
                return None, []
            try:
                return image_analyzer.analyze(path)
            except HematoVisionError as exc:
                raise gr.Error(str(exc)) from None

        img_in.change(analyze_image, inputs=img_in, outputs=[img_out, img_table])

        def webcam_frame(rgb: np.ndarray | None, state: dict | None) -> tuple[Any, str, dict]:
            if rgb is None:
                return None, "", state or {}
            state = state or {}
            if state.get("analyzer") is None:
                try:
                    state["analyzer"] = analyzer_factory(
                        SessionSettings(session.settings.model, session.settings.min_score,
                                        session.settings.target))
                except HematoVisionError as exc:
                    raise gr.Error(str(exc)) from None
                state["n"] = 0
            an = state["analyzer"]
            bgr = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, :3]), cv2.COLOR_RGB2BGR)
            res = an.process(Frame(bgr, state["n"], time.monotonic()))
            state["n"] += 1
            out = an.render(res)
            summ = dict(res.summary)
            summ.setdefault("ci95", {})
            return cv2.cvtColor(out, cv2.COLOR_BGR2RGB), counts_table_html(summ), state

        cam_in.stream(webcam_frame, inputs=[cam_in, cam_state],
                      outputs=[cam_out, cam_counts, cam_state], stream_every=0.2,
                      time_limit=3600, concurrency_limit=2)

        def webcam_reset(state: dict | None) -> tuple[str, dict]:
            if state and state.get("analyzer") is not None:
                state["analyzer"].reset()
            return "", state or {}

        cam_reset.click(webcam_reset, inputs=cam_state, outputs=[cam_counts, cam_state])
    return page


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
) -> FastAPI:
    """FastAPI app: ``/video.mjpg``, ``/stats.json`` and (``page``) the Gradio page at ``/``."""
    guard = Guard(auth)
    app = FastAPI(title="HematoVision", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.session = session
    app.state.guard = guard
    app.state.closing = threading.Event()  # set at shutdown: open MJPEG streams end
    app.include_router(make_router(lambda: app.state.session, dependencies=[guard],
                                   closing=app.state.closing))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"state": session.state}

    if not page:
        @app.get("/", include_in_schema=False)
        async def root() -> RedirectResponse:
            return RedirectResponse("/stats.json")
        return app

    import gradio as gr

    blocks = build_page(session, models=models if models is not None else list_models(),
                        image_model=image_model, analyzer_factory=analyzer_factory)
    gr.mount_gradio_app(app, blocks, path="/", auth=auth, max_file_size=max_file_size,
                        ssr_mode=False, css=CSS, footer_links=[],
                        auth_message="HematoVision: log in to see the live count")
    guard.gradio_app = _find_gradio_app(app)
    if auth is not None and guard.gradio_app is None:
        raise RuntimeError("could not find the mounted Gradio app for the login check")
    return app


def _find_gradio_app(app: FastAPI) -> Any:
    for route in app.routes:
        sub = getattr(route, "app", None)
        if sub is not None and hasattr(sub, "tokens") and hasattr(sub, "cookie_id"):
            return sub
    return None


def main(args: argparse.Namespace) -> int:
    """``hematovision serve [SOURCE] [--model M] [--host H] [--port P] [--auth USER:PASS]``."""
    import uvicorn

    model = getattr(args, "model", None)
    if model is not None and not Path(model).expanduser().is_file():
        raise HematoVisionError(f"{model}: model file not found")
    settings = SessionSettings(model=str(Path(model).expanduser().resolve()) if model else None)
    session = Session(args.source, default_analyzer_factory, settings=settings, realtime=True)
    session.start()  # a missing camera / bad file / dead URL fails here, with its message
    app = create_app(session, auth=args.auth, models=list_models(model), image_model=model)
    host = args.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"HematoVision live view: http://{shown}:{args.port}/  (source: {args.source}; "
          f"MJPEG /video.mjpg, figures /stats.json; events in {session.out_dir})", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and args.auth is None:
        log.warning("serving on %s without --auth: anyone on the network can see the page",
                    host)
    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.closing.set()  # end the MJPEG streams, or shutdown waits for them
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=int(args.port), log_level="warning",
                                   timeout_graceful_shutdown=3))
    try:
        server.run()
    finally:
        session.close()
    return 0
