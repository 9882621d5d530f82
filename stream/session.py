"""A live counting session: a source read by a worker thread, analysed and published.

The session owns the worker and the lifecycle (start, pause, stop, reset, switching source or
model). One worker thread owns the analyzer (its tracker and tally are stateful: one thread
only); for each frame it renders the overlay and hands it to the :class:`Publisher` (one JPEG
for every viewer), the counted cells to the :class:`Gallery` and the event log, and the
annotated frame to the recorder when recording is on.

Runs: a replayed source never adds the same physical cell twice. When a looping file (the demo)
starts again, or a file that was stopped or ended is started again, the count so far is closed
as a run, its report kept for the export, and a new run starts from zero; ``stats()["run"]`` and
``stats()["note"]`` say so to the page. A camera or stream that is stopped and started again
keeps counting (the slide under it has moved on, and the tracker knows the cells in view).

Files are written only when there is something to write: the session folder (event log,
recordings) appears with the first line of the event log.

What the session hands out (``stats()``, ``report()``, the event log and the export) names its
source as viewers may see it (:func:`stream.publish.public_source`: a file by its name, a URL
without its password) and its errors without server paths: page users did not choose the
server's folders and must not learn them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from detector.analyzer import cell_thumbnail
from detector.core import CountEvent, Frame, Summary
from detector.errors import HematoVisionError
from stream.outputs import EventLog, Runs, VideoRecorder, build_report, export_files
from stream.publish import (
    CellThumb,
    Gallery,
    Meter,
    Published,
    Publisher,
    public_error,
    public_source,
    scrub_paths,
)
from stream.sources import Source, open_source

__all__ = ["AnalyzerFactory", "CellThumb", "Published", "Session", "SessionSettings"]

log = logging.getLogger(__name__)



@dataclass
class SessionSettings:
    """What an analyzer is built from; the factory gets a copy each time it is called.

    Attributes:
        model: Path of the .tflite model (None: the default model).
        min_score: Top score below which a cell is ``unidentified`` (None: the model card's).
        target: How many cells make a full count (a differential is usually 100 or 200).
    """

    model: str | None = None
    min_score: float | None = None
    target: int = 100


class ClassifierInfo(Protocol):
    """What the session shows of the classifier (``detector.classify.CellClassifier``)."""

    labels: tuple[str, ...]
    min_score: float
    model_path: Path


class TallyLike(Protocol):
    """The count, read for the figures (``detector.tally.Tally``)."""

    def summary(self) -> Summary: ...


class AnalysisResult(Protocol):
    """What the session reads from one analysed frame (``detector.analyzer.FrameResult``)."""

    frame: Frame
    counted: list[CountEvent]
    summary: Summary
    timings: dict[str, float]
    thumbs: dict[int, np.ndarray]


class AnalyzerLike(Protocol):
    """The analyzer as the session uses it (``detector.analyzer.Analyzer``)."""

    classifier: ClassifierInfo
    tally: TallyLike

    def process(self, frame: Frame) -> AnalysisResult: ...

    def render(self, result: AnalysisResult, fps: float | None = None) -> np.ndarray: ...

    def finish(self) -> list[CountEvent]: ...

    def reset(self) -> None: ...

    def set_target(self, n: int) -> None: ...

    def set_min_score(self, value: float) -> None: ...


#: Builds an analyzer from the session's settings.
AnalyzerFactory = Callable[[SessionSettings], AnalyzerLike]


class Session:
    """Runs a source through an analyzer and publishes the results for any number of viewers.

    Args:
        source_spec: SOURCE as the CLI takes it (camera index, file, URL, 'demo', ...).
        analyzer_factory: Builds an analyzer from :class:`SessionSettings`.
        settings: Initial model / min_score / target.
        realtime: Open files in real time (the live page) rather than as fast as possible.
        out_dir: Folder for the event log and recordings (made at the first write; default
            a new folder under ``~/.cache/hematovision/sessions``).
        jpeg_quality: JPEG quality of the published frames.
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

        self._lock = threading.RLock()  # guards the analyzer, settings and outputs
        self.publisher = Publisher(jpeg_quality)
        self.gallery = Gallery(max_cells)
        self.meter = Meter(window)
        self._log = EventLog(self.out_dir / "events.jsonl", hold_until="counted")
        self._recorder: VideoRecorder | None = None
        self.recording_path: Path | None = None
        self.last_recording: Path | None = None

        self._analyzer: AnalyzerLike | None = None
        self._source: Source | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._error: str | None = None
        self.frames = 0  # analysed by this session, all runs
        self.viewers = 0

        self.runs = Runs()
        self._pass_start = 0
        self._replays = False  # the last source was a file (started again = a replay)

    # ---------------------------------------------------------------- controls
    def start(self) -> None:
        """Open the source and start the worker thread (resume when already running).

        A file started again after it ended or was stopped is a new run (see the module notes).

        Raises:
            HematoVisionError: the source cannot be opened (also shown as ``state``).
        """
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                if self._paused.is_set():
                    self._paused.clear()
                    self._log_event({"event": "resume"})
                return
            if self._analyzer is None:
                self._analyzer = self._build_analyzer()
            try:
                source = self._opener(self.source_spec, realtime=self.realtime)
            except Exception as exc:
                self._error = public_error(exc)
                log.info("source %s: %s", self.source_spec, self._error)
                raise
            if self._replays and self.frames > self.runs.first_frame:
                self._new_run(f"{_name(self.source_spec)} was started again from its beginning")
            self._launch(source)

    def _launch(self, source: Source) -> None:
        """Run an opened source in a new worker thread."""
        with self._lock:
            self._error = None
            self._source = source
            self._replays = not source.is_live
            self._pass_start = source.pass_start
            self._stop.clear()
            self._paused.clear()
            self._thread = threading.Thread(target=self._work, args=(source,), name="session",
                                            daemon=True)
            self._thread.start()
            self._log_event({"event": "start", "source": public_source(self.source_spec)})

    def pause(self) -> None:
        """Freeze the view and the count; frames arriving meanwhile are discarded (``start``
        resumes)."""
        self._paused.set()
        self._log_event({"event": "pause"})

    def stop(self) -> None:
        """Stop the worker, close the source and any recording (the last frame stays shown)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=15.0)
            if thread.is_alive():
                log.warning("session worker did not stop within 15 s")
        self._thread = None
        self._close_recorder()
        if self._source is not None:
            self._source.close()
            self._source = None
        self._log_event({"event": "stop"})

    def close(self) -> None:
        """Stop and close the event log."""
        self.stop()
        self._log.close()

    def reset(self) -> None:
        """Start a new count: fresh tracker and tally (same model and settings)."""
        with self._lock:
            if self._analyzer is None:
                self._analyzer = self._build_analyzer()
            else:
                self._analyzer.reset()
            self._start_count()
            self._log_event({"event": "reset"})

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
            self._start_count()
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
            self._start_count()
            self._log_event({"event": "source", "source": public_source(spec)})
            self._launch(source)

    def set_recording(self, on: bool) -> Path | None:
        """Record the annotated video (WebM, plays in a browser) from the next frame (on), or
        close the file (off)."""
        with self._lock:
            if on and self._recorder is None:
                stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
                path = self.out_dir / f"annotated-{stamp}.webm"
                fps = self._source.fps if self._source is not None else 30.0
                self._recorder = VideoRecorder(path, fps or 30.0, background=True)
                self.recording_path = path
                self._log_event({"event": "record", "on": True, "file": path.name})
            elif not on and self._recorder is not None:
                self._close_recorder()
                self._log_event({"event": "record", "on": False})
            return self.recording_path

    @property
    def recording(self) -> bool:
        return self._recorder is not None

    # ---------------------------------------------------------------- viewers
    def latest(self) -> Published:
        """The latest published output (JPEG, id, summary)."""
        return self.publisher.latest()

    def wait_jpeg(self, after_seq: int, timeout: float = 1.0) -> Published | None:
        """Block until a JPEG with ``seq > after_seq`` is published (None on timeout)."""
        return self.publisher.wait(after_seq, timeout)

    def add_listener(self, callback: Callable[[int], None]) -> None:
        self.publisher.add_listener(callback)

    def remove_listener(self, callback: Callable[[int], None]) -> None:
        self.publisher.remove_listener(callback)

    def recent_cells(self) -> list[CellThumb]:
        """Last counted cells, newest first."""
        return self.gallery.newest_first()

    @property
    def state(self) -> str:
        if self._error:
            return f"error: {self._error}"
        if self._thread is None or not self._thread.is_alive():
            return "stopped"
        if self._paused.is_set():
            return "paused"
        src = self._source
        if src is not None and src.state not in ("running", "stopped"):
            return scrub_paths(src.state)  # reconnecting, error: ...
        return "running"  # (also while the worker finishes a source that has ended)

    @property
    def fps(self) -> float:
        return self.meter.fps

    @property
    def latency_median_ms(self) -> float | None:
        return self.meter.latency_median_ms

    def stage_medians_ms(self) -> dict[str, float]:
        return self.meter.stage_medians_ms()

    def stats(self) -> dict[str, Any]:
        """The session as JSON-ready figures (the /stats.json payload)."""
        pub = self.latest()
        summary = pub.summary or self._empty_summary()
        src = self._source
        lat = self.latency_median_ms
        return {
            **summary,  # Summary.to_json(): counts, total, target, differential, ci95, NRBC
            "fps": round(self.fps, 2),
            "dropped": int(src.dropped) if src is not None else 0,
            "source": public_source(self.source_spec),
            "state": self.state,
            "run": self.runs.number,
            "note": self.runs.note,
            "frame": pub.frame_id,
            "frames": self.frames,
            "latency_ms": None if lat is None else round(lat, 1),
            "viewers": self.viewers,
            "recording": self.recording,
            "model": self.model_name,
            "min_score": self._current_min_score(),
            "size": [pub.width, pub.height],
        }

    @property
    def model_name(self) -> str:
        if self._analyzer is not None:
            return Path(self._analyzer.classifier.model_path).stem
        return Path(self.settings.model).stem if self.settings.model else "default"

    # ---------------------------------------------------------------- reports
    def report(self) -> dict[str, Any]:
        """The current run's report (the fields of ``run --report`` that a live count has)."""
        s = self.stats()
        started = self.runs.started
        summary = {**s, "target_reached": s["total"] >= s["target"]}
        return build_report(summary, source=s["source"], model=s["model"],
                            frames=self.frames - self.runs.first_frame,
                            seconds=time.monotonic() - started if started else 0.0,
                            run=self.runs.number, min_score=s["min_score"],
                            dropped=s["dropped"], state=s["state"])

    def export(self, folder: str | Path) -> dict[str, Path]:
        """Write the reports (this run's and earlier runs') and the event log into ``folder``;
        name the last recording (:func:`stream.outputs.export_files`)."""
        with self._lock:
            earlier = list(self.runs.finished)
        return export_files(folder, self.report(), earlier, self._log.read_bytes(),
                            self.last_recording)

    # ---------------------------------------------------------------- worker
    def _build_analyzer(self) -> AnalyzerLike:
        return self._factory(dataclasses.replace(self.settings))

    def _empty_summary(self) -> dict[str, Any]:
        if self._analyzer is not None:
            return self._analyzer.tally.summary().to_json()
        return Summary({}, 0, self.settings.target, {}, {}).to_json()

    def _current_min_score(self) -> float | None:
        if self._analyzer is not None:
            return float(self._analyzer.classifier.min_score)
        return self.settings.min_score

    def _start_count(self) -> None:
        """A fresh count in the analyzer: clear the gallery, publish zero counts."""
        self.gallery.clear()
        self.runs.begin(self.frames)
        self.publisher.set_summary(self._empty_summary())

    def _new_run(self, why: str) -> None:
        """Close the current count as a finished run (its report kept) and start from zero."""
        with self._lock:
            analyzer = self._analyzer
            if analyzer is None:
                return
            self._finish()
            self.runs.close(self.report(), why)
            analyzer.reset()
            self._start_count()
            self._log_event({"event": "new_run", "run": self.runs.number, "why": why})
            log.info("%s", self.runs.note)

    def _work(self, source: Source) -> None:
        with self._lock:
            if self.runs.started is None:
                self.runs.started = time.monotonic()
            if not self.latest().summary:
                self.publisher.set_summary(self._empty_summary())
        try:
            while not self._stop.is_set():
                frame = source.read(timeout=0.5)
                if frame is None:
                    if source.ended or source.state == "stopped":
                        self._finish()
                        break
                    continue
                received = time.monotonic()
                if self._paused.is_set():
                    continue
                if source.pass_start > self._pass_start and frame.index >= source.pass_start:
                    self._pass_start = source.pass_start
                    self._new_run(f"{_name(self.source_spec)} started again from its beginning")
                    self.runs.started = time.monotonic()
                self._process(frame, source, received)
        except Exception as exc:  # noqa: BLE001 - surface as state, keep the page alive
            self._error = f"analysis stopped ({public_error(exc)})"
            log.error("session worker failed: %s: %s", type(exc).__name__, exc,
                      exc_info=exc if log.isEnabledFor(logging.INFO) else None)
        finally:
            self._close_recorder()
            source.close()

    def _process(self, frame: Frame, source: Source, received: float) -> None:
        with self._lock:
            analyzer = self._analyzer
            assert analyzer is not None
            t0 = time.perf_counter()
            result = analyzer.process(frame)
            t1 = time.perf_counter()
            annotated = analyzer.render(result, fps=self.fps or None)
            t2 = time.perf_counter()
            summary = result.summary.to_json()
            for counted in result.counted:
                event = counted.to_json()
                self._log_event({"event": "counted", **event})
                crop = result.thumbs.get(counted.track_id)  # its sharpest sighting
                if crop is None:
                    crop = cell_thumbnail(frame.bgr, np.asarray(counted.box, np.float32))
                self.gallery.add(crop, event)
            if self._recorder is not None:
                self._recorder.write(annotated)
        if not self.publisher.publish(frame.index, annotated, summary):
            return
        t3 = time.perf_counter()
        self.frames += 1
        latency = time.monotonic() - (frame.t if source.monotonic_clock else received)
        self.meter.frame(latency, {**result.timings, "analyze": t1 - t0, "render": t2 - t1,
                                   "jpeg": t3 - t2})

    def _finish(self) -> None:
        """End of a file or of a run: count the cells still in view, publish the summary."""
        with self._lock:
            analyzer = self._analyzer
            if analyzer is None:
                return
            for event in analyzer.finish():
                self._log_event({"event": "counted", **event.to_json()})
            self.publisher.set_summary(analyzer.tally.summary().to_json())

    def _log_event(self, record: dict[str, Any]) -> None:
        """Append to the event log (its file starts with the first counted cell)."""
        try:
            self._log.write({"time": round(time.time(), 3), **record})
        except HematoVisionError as exc:  # a full disk must not stop the count
            log.warning("%s", exc)

    def _close_recorder(self) -> None:
        with self._lock:
            recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.close()
            if recorder.frames:
                self.last_recording = recorder.path


def _name(spec: str | int) -> str:
    """A source for a message: 'the demo', a file's name (:func:`public_source`)."""
    return "the demo" if str(spec) == "demo" else public_source(spec)


def _default_out_dir() -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path.home() / ".cache" / "hematovision" / "sessions" / f"{stamp}-{os.getpid()}"
