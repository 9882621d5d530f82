"""A live counting session: source -> analyzer -> publishers, on worker threads.

One worker thread owns the analyzer (the tracker and tally are stateful: one thread only). For
every analyzed frame it renders the overlay and encodes ONE JPEG, whatever the number of viewers;
viewers (the MJPEG route, the Gradio page, benchmarks) read that JPEG and wait for the next one on
a Condition, or register a listener callback. It also keeps the counts summary, the last counted
cells (small JPEG crops), fps / dropped / latency figures, an event log (JSONL file and a bounded
in-memory copy) and an optional recording of the annotated video.

Everything kept in memory is bounded (deques with maxlen), so a long run stays flat.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detector.analyzer import cell_thumbnail
from detector.core import UNIDENTIFIED, Frame
from detector.errors import HematoVisionError
from detector.tally import Tally
from detector.tally import wilson_interval as _wilson
from stream.sources import Source, open_source

log = logging.getLogger(__name__)


@dataclass
class SessionSettings:
    """What an analyzer is built from; the factory gets a copy each time it is called.

    Attributes:
        model: Path of the .tflite model (None: the shipped default).
        min_score: Top score below which a cell is ``unidentified`` (None: the model card's).
        target: How many cells make a full count (a differential is usually 100 or 200).
    """

    model: str | None = None
    min_score: float | None = None
    target: int = 100


#: Builds an analyzer (``process(frame) -> FrameResult``, ``render(result) -> bgr``).
AnalyzerFactory = Callable[[SessionSettings], Any]


@dataclass
class CellThumb:
    """One counted cell for the gallery: a small JPEG crop and its label."""

    jpeg: bytes
    label: str
    score: float
    track_id: int
    frame: int


@dataclass
class Published:
    """The latest output, replaced as a whole (readers never see a half-updated state).

    ``seq`` numbers the published JPEGs of the session (it keeps growing when the source is
    switched, unlike ``frame_id``, the source's frame index): viewers wait for a newer ``seq``.
    """

    frame_id: int = -1
    jpeg: bytes = b""
    width: int = 0
    height: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    seq: int = -1


def wilson_interval(k: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n, in percent (the tally's, scaled)."""
    lo, hi = _wilson(k, n)
    return round(100 * lo, 2), round(100 * hi, 2)


def event_to_dict(event: Any) -> dict[str, Any]:
    """A counted-cell event (dataclass, dict or object) as a JSON-ready dict."""
    if hasattr(event, "to_json"):
        return event.to_json()
    if dataclasses.is_dataclass(event) and not isinstance(event, type):
        data = dataclasses.asdict(event)
    elif isinstance(event, dict):
        data = dict(event)
    else:
        data = {k: v for k, v in vars(event).items() if not k.startswith("_")}
    return {k: _jsonable(v) for k, v in data.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class Session:
    """Runs a source through an analyzer and publishes the results for any number of viewers.

    Args:
        source_spec: SOURCE as the CLI takes it (camera index, file, URL, 'demo', ...).
        analyzer_factory: Builds an analyzer from :class:`SessionSettings`.
        settings: Initial model / min_score / target.
        realtime: Open files in real time (the live page) rather than as fast as possible.
        out_dir: Folder for the event log, recordings and exports (created).
        jpeg_quality: JPEG quality of the published frames.
        max_events: Events kept in memory (the JSONL file keeps them all).
        max_cells: Counted-cell thumbnails kept for the gallery.
        window: Frames over which fps and median latency are computed.
        source_opener: ``open_source``-like callable (tests inject fakes).
    """

    def __init__(
        self,
        source_spec: str | int,
        analyzer_factory: AnalyzerFactory,
        *,
        settings: SessionSettings | None = None,
        realtime: bool = True,
        out_dir: str | Path | None = None,
        jpeg_quality: int = 80,
        max_events: int = 500,
        max_cells: int = 24,
        window: int = 120,
        source_opener: Callable[..., Source] | None = None,
    ) -> None:
        self.source_spec = source_spec
        self.settings = settings or SessionSettings()
        self.realtime = realtime
        self._factory = analyzer_factory
        self._opener = source_opener or open_source
        self.out_dir = Path(out_dir) if out_dir else _default_out_dir()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jpeg_quality = int(jpeg_quality)

        self._lock = threading.RLock()  # guards the analyzer and settings
        self._cond = threading.Condition()  # guards _pub; viewers wait on it
        self._pub = Published()
        self._listeners: list[Callable[[int], None]] = []

        self._events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self._cells: deque[CellThumb] = deque(maxlen=max_cells)
        self._jpeg_times: deque[float] = deque(maxlen=window)
        self._latency: deque[float] = deque(maxlen=window)
        self._stage: dict[str, deque[float]] = {}
        self._window = window

        self._events_path = self.out_dir / "events.jsonl"
        self._events_file = open(self._events_path, "a", encoding="utf-8")  # noqa: SIM115
        self._analyzer: Any = None
        self._source: Source | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._error: str | None = None
        self._ended = False
        self.frames = 0
        self.encodes = 0
        self.started_at: float | None = None
        self.viewers = 0

        self._recording = False
        self._writer: cv2.VideoWriter | None = None
        self.recording_path: Path | None = None
        self.last_recording: Path | None = None
        self._reset_pending = False

    # ---------------------------------------------------------------- controls
    def start(self) -> None:
        """Open the source and start the worker thread (resume when already running).

        Raises:
            HematoVisionError: the source cannot be opened (also shown as ``state``).
        """
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._paused.clear()
                return
            if self._analyzer is None:
                self._analyzer = self._build_analyzer()
            self._error = None
            try:
                source = self._opener(self.source_spec, realtime=self.realtime)
            except Exception as exc:
                self._error = str(exc) if isinstance(exc, HematoVisionError) else (
                    f"{type(exc).__name__}: {exc}")
                log.info("source %s: %s", self.source_spec, self._error)
                raise
            self._launch(source)

    def _launch(self, source: Source) -> None:
        """Run an opened source in a new worker thread."""
        with self._lock:
            self._error = None
            self._source = source
            self._stop.clear()
            self._paused.clear()
            self._ended = False
            self._thread = threading.Thread(target=self._run, args=(source,), name="session",
                                            daemon=True)
            self._thread.start()
            self._log_event({"event": "start", "source": str(self.source_spec)})

    def pause(self) -> None:
        """Freeze the view and the count; frames arriving meanwhile are discarded."""
        self._paused.set()
        self._log_event({"event": "pause"})

    def resume(self) -> None:
        self._paused.clear()
        self._log_event({"event": "resume"})

    def stop(self) -> None:
        """Stop the worker, close the source and any recording (the last frame stays shown)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=15.0)
            if thread.is_alive():
                log.warning("session worker did not stop within 15 s")
        self._thread = None
        self._close_writer()
        if self._source is not None:
            self._source.close()
            self._source = None
        self._log_event({"event": "stop"})

    def close(self) -> None:
        """Stop and close the event log."""
        self.stop()
        with self._lock:
            if not self._events_file.closed:
                self._events_file.close()

    def reset(self) -> None:
        """Start a new count: fresh tracker and tally (same model and settings)."""
        with self._lock:
            if self._analyzer is None:
                self._analyzer = self._build_analyzer()
            else:
                self._analyzer.reset()
            self._cells.clear()
            self._log_event({"event": "reset"})
            with self._cond:
                self._pub.summary = self._empty_summary()

    def set_target(self, n: int) -> None:
        n = int(n)
        if n < 1:
            raise HematoVisionError(f"target must be >= 1, got {n}")
        with self._lock:
            self.settings.target = n
            if self._analyzer is not None:
                self._analyzer.set_target(n)
            self._log_event({"event": "target", "target": n})

    def set_min_score(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise HematoVisionError(f"min score must be between 0 and 1, got {value}")
        with self._lock:
            self.settings.min_score = value
            if self._analyzer is not None:
                self._analyzer.set_min_score(value)
            self._log_event({"event": "min_score", "min_score": value})

    def switch_model(self, model: str | None) -> None:
        """Use another model; the count restarts (one differential, one model)."""
        with self._lock:
            old = self.settings.model
            self.settings.model = model
            try:
                analyzer = self._build_analyzer()
            except Exception:
                self.settings.model = old
                raise
            self._analyzer = analyzer
            self._cells.clear()
            self._log_event({"event": "model", "model": model})

    def switch_source(self, spec: str | int) -> None:
        """Open another source, then stop the old one and run the new one with a new count.

        The new source is opened first: if that fails (a camera that does not exist, a dead URL)
        the exception propagates and the running source, its count and its state are untouched.
        """
        source = self._opener(spec, realtime=self.realtime)
        try:
            analyzer = self._build_analyzer()
        except Exception:
            source.close()
            raise
        self.stop()
        with self._lock:
            self.source_spec = spec
            self._analyzer = analyzer
            self._cells.clear()
            self._log_event({"event": "source", "source": str(spec)})
            self._launch(source)

    def set_recording(self, on: bool) -> Path | None:
        """Record the annotated video from the next frame (on) or close the file (off)."""
        with self._lock:
            if on and not self._recording:
                stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
                self.recording_path = self.out_dir / f"annotated-{stamp}.mp4"
                self._recording = True
                self._log_event({"event": "record", "on": True, "path": str(self.recording_path)})
            elif not on and self._recording:
                self._recording = False
                self._close_writer()
                self._log_event({"event": "record", "on": False})
            return self.recording_path

    @property
    def recording(self) -> bool:
        return self._recording

    # ---------------------------------------------------------------- viewers
    def latest(self) -> Published:
        """The latest published output (JPEG, id, summary)."""
        with self._cond:
            return self._pub

    def wait_jpeg(self, after_seq: int, timeout: float = 1.0) -> Published | None:
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

    def recent_cells(self) -> list[CellThumb]:
        """Last counted cells, newest first."""
        with self._lock:
            return list(reversed(self._cells))

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    @property
    def state(self) -> str:
        if self._error:
            return f"error: {self._error}"
        thread_alive = self._thread is not None and self._thread.is_alive()
        if not thread_alive:
            return "stopped"
        if self._paused.is_set():
            return "paused"
        src = self._source
        if src is not None and src.state != "running":
            return src.state
        return "running"

    def stats(self) -> dict[str, Any]:
        """The session as JSON-ready figures (the /stats.json payload)."""
        pub = self.latest()
        summary = pub.summary or self._empty_summary()
        counts = dict(summary.get("counts", {}))
        total = int(summary.get("total", sum(counts.values())))
        src = self._source
        return {
            "counts": counts,
            "total": total,
            "target": int(summary.get("target", self.settings.target)),
            "differential": {k: round(float(v), 2)
                             for k, v in summary.get("differential", {}).items()},
            "ci95": {k: [round(float(a), 2), round(float(b), 2)] for k, (a, b) in
                     (summary.get("ci95") or {k: wilson_interval(int(v), total)
                                              for k, v in counts.items()}).items()},
            "fps": round(self.fps, 2),
            "dropped": int(src.dropped) if src is not None else 0,
            "source": str(self.source_spec),
            "state": self.state,
            "frame": pub.frame_id,
            "frames": self.frames,
            "latency_ms": _round(self.latency_median_ms),
            "viewers": self.viewers,
            "recording": self._recording,
            "model": self.model_name,
            "min_score": self._current_min_score(),
            "size": [pub.width, pub.height],
        }

    @property
    def fps(self) -> float:
        times = list(self._jpeg_times)
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    @property
    def latency_median_ms(self) -> float | None:
        values = list(self._latency)
        return 1000.0 * statistics.median(values) if values else None

    def stage_medians_ms(self) -> dict[str, float]:
        with self._lock:
            return {k: round(1000 * statistics.median(v), 2) for k, v in self._stage.items() if v}

    @property
    def model_name(self) -> str:
        clf = getattr(self._analyzer, "classifier", None)
        card = getattr(clf, "card", None)
        name = getattr(card, "name", None)
        if name:
            return str(name)
        return Path(self.settings.model).stem if self.settings.model else "default"

    # ---------------------------------------------------------------- reports
    def report(self) -> dict[str, Any]:
        s = self.stats()
        seconds = (time.monotonic() - self.started_at) if self.started_at else 0.0
        return {
            "source": s["source"],
            "model": s["model"],
            "frames": self.frames,
            "seconds": round(seconds, 2),
            "fps": s["fps"],
            "counts": s["counts"],
            "total": s["total"],
            "target": s["target"],
            "differential": s["differential"],
            "ci95": s["ci95"],
            "min_score": s["min_score"],
            "dropped": s["dropped"],
            "state": s["state"],
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def export(self, folder: str | Path | None = None) -> dict[str, Path]:
        """Write report.json, report.csv and a copy of the event log; name the last recording."""
        folder = Path(folder) if folder else self.out_dir / "export"
        folder.mkdir(parents=True, exist_ok=True)
        rep = self.report()
        paths: dict[str, Path] = {}
        paths["json"] = folder / "report.json"
        paths["json"].write_text(json.dumps(rep, indent=2) + "\n", encoding="utf-8")
        paths["csv"] = folder / "report.csv"
        with open(paths["csv"], "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["label", "count", "percent", "ci95_low", "ci95_high"])
            for label, n in rep["counts"].items():
                lo, hi = rep["ci95"].get(label, [0.0, 0.0])
                w.writerow([label, n, rep["differential"].get(label, 0.0), lo, hi])
            w.writerow(["total", rep["total"], 100.0 if rep["total"] else 0.0, "", ""])
        with self._lock:
            if not self._events_file.closed:
                self._events_file.flush()
        paths["events"] = folder / "events.jsonl"
        paths["events"].write_bytes(self._events_path.read_bytes()
                                    if self._events_path.exists() else b"")
        video = self.last_recording or (self.recording_path if self._recording else None)
        if video is not None and video.exists() and video.stat().st_size > 0:
            paths["video"] = video
        return paths

    # ---------------------------------------------------------------- worker
    def _build_analyzer(self) -> Any:
        return self._factory(dataclasses.replace(self.settings))

    def _empty_summary(self) -> dict[str, Any]:
        labels = getattr(getattr(self._analyzer, "classifier", None), "labels", ())
        return Tally(labels, self.settings.target).summary().to_json() if labels else {
            "counts": {}, "total": 0, "target": self.settings.target, "differential": {}}

    def _current_min_score(self) -> float | None:
        clf = getattr(self._analyzer, "classifier", None)
        value = getattr(clf, "min_score", None)
        return float(value) if value is not None else self.settings.min_score

    def _run(self, source: Source) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()
        with self._cond:
            if not self._pub.summary:
                self._pub.summary = self._empty_summary()
        try:
            while not self._stop.is_set():
                frame = source.read(timeout=0.5)
                if frame is None:
                    if getattr(source, "ended", True) or source.state == "stopped":
                        self._finish()
                        break
                    continue
                received = time.monotonic()
                if self._paused.is_set():
                    continue
                self._process(frame, source, received)
        except Exception as exc:  # noqa: BLE001 - surface as state, keep the page alive
            self._error = f"{type(exc).__name__}: {exc}"
            log.exception("session worker failed")
        finally:
            self._ended = True
            self._close_writer()
            source.close()

    def _process(self, frame: Frame, source: Source, received: float) -> None:
        with self._lock:
            analyzer = self._analyzer
            t0 = time.perf_counter()
            result = analyzer.process(frame)
            t1 = time.perf_counter()
            annotated = analyzer.render(result, fps=self.fps or None)
            t2 = time.perf_counter()
            summary = getattr(result, "summary", None) or {}
            summary = summary.to_json() if hasattr(summary, "to_json") else dict(summary)
            counted = list(getattr(result, "counted", []) or [])
            if summary:
                summary.setdefault("target", self.settings.target)
            thumbs = dict(getattr(result, "thumbs", {}) or {})
            for ev in counted:
                self._on_counted(ev, frame, thumbs)
            timings = dict(getattr(result, "timings", {}) or {})
            timings["render"] = t2 - t1
            timings.setdefault("analyze", t1 - t0)
            for k, v in timings.items():
                self._stage.setdefault(k, deque(maxlen=self._window)).append(float(v))
            if self._recording:
                self._write_video(annotated, source.fps)
        ok, buf = cv2.imencode(".jpg", annotated, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        now = time.monotonic()
        t3 = time.perf_counter()
        if not ok:
            log.warning("JPEG encoding failed for frame %d", frame.index)
            return
        self.encodes += 1
        self.frames += 1
        self._jpeg_times.append(now)
        self._latency.append(now - (frame.t if source.monotonic_clock else received))
        self._stage.setdefault("jpeg", deque(maxlen=self._window)).append(t3 - t2)
        with self._cond:
            pub = Published(frame.index, buf.tobytes(), annotated.shape[1], annotated.shape[0],
                            summary or self._pub.summary, self._pub.seq + 1)
            self._pub = pub
            listeners = self._listeners
            self._cond.notify_all()
        for cb in listeners:
            try:
                cb(pub.seq)
            except Exception:  # noqa: BLE001
                log.exception("listener failed")

    def _finish(self) -> None:
        """End of a file: count the cells still in view (analyzer.finish), publish the summary."""
        with self._lock:
            finish = getattr(self._analyzer, "finish", None)
            if finish is None:
                return
            events = list(finish() or [])
            for ev in events:
                self._log_event({"event": "counted", **event_to_dict(ev)})
            tally = getattr(self._analyzer, "tally", None)
            if events and tally is not None and hasattr(tally, "summary"):
                with self._cond:
                    pub = self._pub
                    self._pub = Published(pub.frame_id, pub.jpeg, pub.width, pub.height,
                                          tally.summary().to_json(), pub.seq)

    def _on_counted(self, event: Any, frame: Frame,
                    thumbs: dict[int, np.ndarray] | None = None) -> None:
        data = event_to_dict(event)
        record = {"event": "counted", **data}
        self._log_event(record)
        box = data.get("box") or data.get("xyxy")
        label = str(data.get("label", UNIDENTIFIED))
        score = float(data.get("score", 0.0) or 0.0)
        track_id = int(data.get("track_id", -1))
        crop = (thumbs or {}).get(track_id)
        if crop is not None:  # the analyzer's sharpest sighting (the cell may have left view)
            thumb = _encode_thumb(crop)
        elif box is not None:
            thumb = _encode_thumb(cell_thumbnail(frame.bgr, np.asarray(box, dtype=np.float32)[:4]))
        else:
            return
        if thumb is not None:
            self._cells.append(CellThumb(thumb, label, score, int(data.get("track_id", -1)),
                                         int(data.get("last_frame", frame.index))))

    def _log_event(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with self._lock:
            self._events.append(record)
            if not self._events_file.closed:
                self._events_file.write(json.dumps(record) + "\n")
                self._events_file.flush()

    def _write_video(self, bgr: np.ndarray, fps: float) -> None:
        if self._writer is None and self.recording_path is not None:
            h, w = bgr.shape[:2]
            writer = cv2.VideoWriter(str(self.recording_path), cv2.VideoWriter_fourcc(*"mp4v"),
                                     float(fps or 30.0), (w, h))
            if not writer.isOpened():
                log.error("cannot record to %s", self.recording_path)
                self._recording = False
                return
            self._writer = writer
            self._writer_size = (w, h)
        if self._writer is not None:
            if (bgr.shape[1], bgr.shape[0]) != self._writer_size:
                bgr = cv2.resize(bgr, self._writer_size)
            self._writer.write(bgr)

    def _close_writer(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.release()
                self._writer = None
                self.last_recording = self.recording_path
            if self._recording and self._thread is None:
                self._recording = False


# -------------------------------------------------------------------- helpers


def _encode_thumb(crop: np.ndarray | None, side: int = 96) -> bytes | None:
    """A BGR crop as a ``side`` px square JPEG."""
    if crop is None or crop.size == 0 or crop.ndim != 3:
        return None
    crop = cv2.resize(np.ascontiguousarray(crop), (side, side), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return buf.tobytes() if ok else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _default_out_dir() -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path.home() / ".cache" / "hematovision" / "sessions" / f"{stamp}-{os.getpid()}"
