"""``GET /video.mjpg`` and ``GET /stats.json``: the live view and the figures, for any viewer.

The MJPEG generator sends the session's latest JPEG as it is (encoded once per analyzed frame by
the session's worker, never per viewer). It sleeps on an asyncio.Event that the worker sets via
``loop.call_soon_threadsafe`` when a new frame is published, so an idle viewer costs no polling
and no thread. A slow viewer simply skips frames (it always gets the newest). When the client
goes away, Starlette cancels the generator; its ``finally`` removes the listener, leaving nothing
behind. While no new frame comes (paused, ended), the last one is repeated once a second:
browsers show a part only when the next begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from stream.session import Session

log = logging.getLogger(__name__)

BOUNDARY = "frame"
MEDIA_TYPE = f"multipart/x-mixed-replace; boundary={BOUNDARY}"


def mjpeg_part(jpeg: bytes) -> bytes:
    """One multipart part: boundary, headers, the JPEG."""
    head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(jpeg)}\r\n\r\n").encode("ascii")
    return head + jpeg + b"\r\n"


async def mjpeg_frames(
    session: Session,
    request: Request | None = None,
    *,
    max_frames: int | None = None,
    idle_check: float = 1.0,
    closing: threading.Event | None = None,
) -> AsyncIterator[bytes]:
    """Yield multipart parts of each new published JPEG until the client disconnects.

    Args:
        session: Where the JPEGs come from.
        request: Checked for a disconnect while no new frame arrives (source paused/ended).
        max_frames: Stop after this many frames (a snapshot, tests); None = forever.
        idle_check: Seconds between disconnect checks while idle.
        closing: Set when the server shuts down: the stream ends so the server can exit.
    """
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def notify(_seq: int) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the viewer is gone
            loop.call_soon_threadsafe(event.set)

    session.add_listener(notify)
    session.viewers += 1
    sent = 0
    last = -1
    try:
        while closing is None or not closing.is_set():
            event.clear()
            pub = session.latest()
            if pub.seq > last and pub.jpeg:
                last = pub.seq
                yield mjpeg_part(pub.jpeg)
                sent += 1
                if max_frames is not None and sent >= max_frames:
                    return
                continue
            try:
                await asyncio.wait_for(event.wait(), timeout=idle_check)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    return
                if last >= 0 and pub.jpeg:
                    # Browsers show a multipart part only once the next one begins: while the
                    # source is paused or ended, the last frame is sent again (once per
                    # idle_check), so a viewer who arrives then sees it instead of nothing.
                    yield mjpeg_part(pub.jpeg)
    finally:
        session.remove_listener(notify)
        session.viewers -= 1


def make_router(get_session: Callable[[], Session], closing: threading.Event | None = None
                ) -> APIRouter:
    """Routes ``/video.mjpg`` and ``/stats.json``; ``get_session()`` returns the current Session.

    ``closing``: set at server shutdown to end the open MJPEG streams. (The login, when there
    is one, is checked before any route: ``stream.app.LoginGate``.)
    """
    router = APIRouter()

    @router.get("/video.mjpg")
    async def video(request: Request, frames: int | None = None) -> StreamingResponse:
        """The live annotated view (multipart/x-mixed-replace JPEG); ``?frames=N`` stops after N."""
        n = None if frames is None or frames <= 0 else int(frames)
        return StreamingResponse(
            mjpeg_frames(get_session(), request, max_frames=n, closing=closing),
            media_type=MEDIA_TYPE,
            headers={"Cache-Control": "no-cache, no-store, must-revalidate", "Pragma": "no-cache",
                     "X-Accel-Buffering": "no"},
        )

    @router.get("/stats.json")
    async def stats() -> JSONResponse:
        """counts, total, differential, ci95, fps, dropped, source, state, latency_ms, ..."""
        return JSONResponse(get_session().stats(), headers={"Cache-Control": "no-cache"})

    return router
