"""The live view's output: one JPEG per analysed frame for every viewer, plus the figures.

- :class:`Publisher`: encodes each annotated frame to JPEG ONCE, whatever the number of viewers,
  and replaces the latest output as a whole. Viewers (the MJPEG route, the page, benchmarks) read
  it, wait for a newer one on a Condition, or register a callback run after each new JPEG.
- :class:`Gallery`: the last counted cells as small JPEG tiles.
- :class:`Meter`: frames per second, capture-to-JPEG latency and per-stage times over a window.
- :func:`public_source`, :func:`scrub_paths`: a source and a message as viewers may see them
  (the page, ``/stats.json``, the page's export): no URL password, no server path.

Everything is bounded (deques with maxlen), so a long run stays flat in memory.
"""

from __future__ import annotations

import logging
import re
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePath, PurePosixPath, PureWindowsPath
from typing import Any

import cv2
import numpy as np

from stream.sources import URL_RE, redact_url

log = logging.getLogger(__name__)

_PATH_RE = re.compile(r"(?<![\w:/.~-])(?:~|[A-Za-z]:)?[/\\](?:[^\s'\"/\\:]+[/\\])*([^\s'\"/\\:]*)")


def public_source(source: str | int | None) -> str:
    """A source as viewers see it: a file by its name, not its server path; a URL without its
    password; a camera by its index."""
    text = str(source if source is not None else "")
    if URL_RE.match(text):
        return redact_url(text)
    path: PurePath = PureWindowsPath(text) if "\\" in text else PurePosixPath(text)
    return path.name if len(path.parts) > 1 else text


def scrub_paths(text: str) -> str:
    """A message with every absolute server path cut to its last part (URLs are left alone),
    on one line."""
    return " ".join(_PATH_RE.sub(lambda m: m.group(1) or "/", text).split())


def public_error(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line for viewers: our own errors (``HematoVisionError``) by
    their message, anything else with its type (a bug), server paths cut to names."""
    from detector.errors import HematoVisionError

    text = scrub_paths(str(exc))
    if not isinstance(exc, HematoVisionError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class Published:
    """The latest output, replaced as a whole (readers never see a half-updated state).

    ``seq`` numbers the published JPEGs (it keeps growing when the source is switched, unlike
    ``frame_id``, the source's frame index): viewers wait for a newer ``seq``.
    """

    frame_id: int = -1
    jpeg: bytes = b""
    width: int = 0
    height: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    seq: int = -1


class Publisher:
    """The latest annotated JPEG and counts summary, shared by all viewers."""

    def __init__(self, jpeg_quality: int = 80) -> None:
        self.jpeg_quality = int(jpeg_quality)
        self._cond = threading.Condition()
        self._pub = Published()
        self._listeners: list[Callable[[int], None]] = []
        self.encoded = 0  # JPEGs encoded: one per published frame, whatever the viewers

    def publish(self, frame_id: int, bgr: np.ndarray, summary: dict[str, Any] | None) -> bool:
        """Encode ``bgr`` once and make it the latest output; False when encoding failed."""
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            log.warning("JPEG encoding failed for frame %d", frame_id)
            return False
        self.encoded += 1
        with self._cond:
            pub = Published(frame_id, buf.tobytes(), bgr.shape[1], bgr.shape[0],
                            summary or self._pub.summary, self._pub.seq + 1)
            self._pub = pub
            listeners = self._listeners
            self._cond.notify_all()
        for callback in listeners:
            try:
                callback(pub.seq)
            except Exception as exc:  # noqa: BLE001 - one broken viewer must not stop the others
                log.error("viewer callback failed: %s: %s", type(exc).__name__, exc,
                          exc_info=exc if log.isEnabledFor(logging.INFO) else None)
        return True

    def set_summary(self, summary: dict[str, Any]) -> None:
        """New counts with the same picture (a reset, the cells counted at a file's end)."""
        with self._cond:
            p = self._pub
            self._pub = Published(p.frame_id, p.jpeg, p.width, p.height, summary, p.seq)

    def latest(self) -> Published:
        with self._cond:
            return self._pub

    def wait(self, after_seq: int, timeout: float = 1.0) -> Published | None:
        """Block until a JPEG with ``seq > after_seq`` is published (None on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pub.seq <= after_seq:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._pub

    def add_listener(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(seq)`` from the worker after each new JPEG (keep it quick)."""
        with self._cond:
            self._listeners = [*self._listeners, callback]

    def remove_listener(self, callback: Callable[[int], None]) -> None:
        with self._cond:
            self._listeners = [c for c in self._listeners if c is not callback]

    @property
    def listener_count(self) -> int:
        return len(self._listeners)


@dataclass
class CellThumb:
    """One counted cell for the gallery: a small JPEG crop and its label."""

    jpeg: bytes
    label: str
    score: float
    track_id: int
    frame: int


class Gallery:
    """The last ``size`` counted cells, newest last."""

    def __init__(self, size: int = 24, side: int = 96) -> None:
        self.side = side
        self._cells: deque[CellThumb] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, crop: np.ndarray | None, event: dict[str, Any]) -> None:
        if crop is None or crop.size == 0 or crop.ndim != 3:
            return
        crop = cv2.resize(np.ascontiguousarray(crop), (self.side, self.side),
                          interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if ok:
            with self._lock:
                self._cells.append(CellThumb(buf.tobytes(), str(event.get("label", "")),
                                             float(event.get("score", 0.0) or 0.0),
                                             int(event.get("track_id", -1)),
                                             int(event.get("last_frame", -1))))

    def newest_first(self) -> list[CellThumb]:
        with self._lock:
            return list(reversed(self._cells))

    def clear(self) -> None:
        with self._lock:
            self._cells.clear()


class Meter:
    """Published frames per second, capture-to-JPEG latency and stage times over ``window``."""

    def __init__(self, window: int = 120) -> None:
        self.window = window
        self._times: deque[float] = deque(maxlen=window)
        self._latency: deque[float] = deque(maxlen=window)
        self._stages: dict[str, deque[float]] = {}

    def frame(self, latency: float, stages: dict[str, float]) -> None:
        self._times.append(time.monotonic())
        self._latency.append(latency)
        for k, v in stages.items():
            self._stages.setdefault(k, deque(maxlen=self.window)).append(float(v))

    @property
    def fps(self) -> float:
        times = list(self._times)
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    @property
    def latency_median_ms(self) -> float | None:
        values = list(self._latency)
        return 1000.0 * statistics.median(values) if values else None

    def stage_medians_ms(self) -> dict[str, float]:
        return {k: round(1000 * statistics.median(v), 2)
                for k, v in list(self._stages.items()) if v}
