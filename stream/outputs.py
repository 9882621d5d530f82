"""What a count leaves behind: the event log, the annotated video and the report.

Shared by ``hematovision run`` and the live session, so both write the same files the same way.

- :class:`EventLog`: one JSON line per event (each counted cell as it is counted, and for the
  live page its controls), appended and flushed at once, so a crash loses nothing already
  counted. The file and its folder are created only when the first line is written.
- :class:`VideoRecorder`: the annotated video. The container follows the file's extension:
  ``.webm`` is VP8, which every current browser plays (the page records in it); ``.mp4`` is
  MPEG-4 Part 2 (``mp4v``: players such as VLC, not browsers: the H.264 encoder is not in
  OpenCV's bundled FFmpeg); ``.avi`` is Motion-JPEG. With ``background=True`` frames are encoded
  on a thread of their own (VP8 takes ~18 ms a frame at 640x480, too slow for the live loop); if
  it falls behind, frames are left out of the recording and counted in ``skipped``.
- :func:`build_report`, :func:`write_report`, :func:`write_report_csv`: the report's fields
  common to ``run --report`` and the page's export, written atomically.
- :class:`Runs`: the runs of a live session (a replayed file starts a new one) and the reports
  of the finished ones; :func:`export_files` writes them all for download.
"""

from __future__ import annotations

import csv
import json
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from detector.errors import InputError

log = logging.getLogger(__name__)

#: Video codec per file extension (FourCC); anything else is written as ``.mp4``'s.
CODECS = {".webm": "VP80", ".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG"}


class EventLog:
    """A JSON Lines file, appended and flushed per line; created at the first line.

    ``hold_until="counted"``: records before the first whose ``event`` is that are held in
    memory (the last ``hold`` of them) and written with it, so a live session that counted
    nothing leaves no file or folder behind.
    """

    def __init__(self, path: str | Path | None, *, hold_until: str | None = None,
                 hold: int = 200) -> None:
        self.path = Path(path) if path else None
        self._fh: IO[str] | None = None
        self._lock = threading.Lock()
        self._hold_until = hold_until
        self._held: deque[dict[str, Any]] = deque(maxlen=hold)

    def check(self) -> None:
        """Fail now, with one line, when the file cannot be written (not at the first cell)."""
        if self.path is not None:
            self._open()

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self._lock:
            if self._hold_until is not None:
                self._held.append(record)
                if record.get("event") != self._hold_until:
                    return
                self._hold_until = None
            records = [*self._held, *([] if self._held else [record])]
            self._held.clear()
            fh = self._fh or self._open()
            fh.write("".join(json.dumps(r) + "\n" for r in records))
            fh.flush()

    def _open(self) -> IO[str]:
        assert self.path is not None
        if self._fh is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise InputError(f"{self.path}: cannot write events ({exc.strerror or exc})"
                                 ) from None
        return self._fh

    def read_bytes(self) -> bytes:
        """The log so far, held records included."""
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
            held = "".join(json.dumps(r) + "\n" for r in self._held).encode()
        if self.path is not None and self.path.exists():
            return self.path.read_bytes() + held
        return held

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class VideoRecorder:
    """An annotated video file, opened at the first frame (its size is then fixed).

    Args:
        path: Output file; its extension picks the codec (:data:`CODECS`).
        fps: Frame rate written in the file.
        background: Encode on a thread of its own with a queue of ``queue_frames`` frames.
    """

    def __init__(self, path: str | Path, fps: float = 30.0, *, background: bool = False,
                 queue_frames: int = 90) -> None:
        self.path = Path(path)
        self.fps = float(fps or 30.0)
        self.frames = 0
        self.skipped = 0
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self._queue: queue.Queue[np.ndarray | None] | None = None
        self._thread: threading.Thread | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot write the video there ({exc.strerror or exc})"
                             ) from None
        if background:
            self._queue = queue.Queue(maxsize=queue_frames)
            self._thread = threading.Thread(target=self._drain, name="recorder", daemon=True)
            self._thread.start()

    def write(self, bgr: np.ndarray) -> None:
        """Add one frame (resized to the first frame's size if it differs)."""
        if self._queue is None:
            self._encode(bgr)
            return
        try:
            self._queue.put_nowait(bgr)
        except queue.Full:
            self.skipped += 1

    def close(self) -> None:
        """Write out what is queued and close the file."""
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60.0)
            self._queue = None
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self.skipped:
            log.warning("%s: %d frames left out (the encoder could not keep up)", self.path,
                        self.skipped)

    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            bgr = self._queue.get()
            if bgr is None:
                return
            try:
                self._encode(bgr)
            except InputError as exc:
                log.error("%s", exc)
                return

    def _encode(self, bgr: np.ndarray) -> None:
        if self._writer is None:
            h, w = bgr.shape[:2]
            codec = CODECS.get(self.path.suffix.lower(), "mp4v")
            writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter.fourcc(*codec), self.fps,
                                     (w, h))
            if not writer.isOpened():
                raise InputError(f"{self.path}: cannot write a {codec} video there")
            self._writer, self._size = writer, (w, h)
        if (bgr.shape[1], bgr.shape[0]) != self._size:
            bgr = cv2.resize(bgr, self._size)
        self._writer.write(bgr)
        self.frames += 1


def build_report(summary: dict[str, Any], *, source: str, model: str, frames: int,
                 seconds: float, **extra: Any) -> dict[str, Any]:
    """The report of one count: source, model, frames, time, then from ``summary`` (the tally's
    ``Summary.to_json()``, already rounded) counts, total, differential and 95 % intervals,
    target, nucleated red cells (NRBC, and per 100 white cells) and vetoed candidates
    (platelets, artefacts), then ``extra`` fields, then the date."""
    return {
        "source": source,
        "model": model,
        "frames": int(frames),
        "seconds": round(float(seconds), 3),
        "fps": round(frames / seconds, 2) if seconds > 0 else 0.0,
        "counts": dict(summary.get("counts", {})),
        "total": int(summary.get("total", 0)),
        "differential": dict(summary.get("differential", {})),
        "ci95": dict(summary.get("ci95", {})),
        "ci_method": "Wilson score interval, 95 %, percent of total",
        "target": int(summary.get("target", 0)),
        "target_reached": bool(summary.get("target_reached", False)),
        "nrbc": int(summary.get("nrbc", 0)),
        "nrbc_per_100_wbc": float(summary.get("nrbc_per_100_wbc", 0.0)),
        "vetoed": int(summary.get("vetoed", 0)),
        **extra,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write the report as JSON (atomically: a reader never sees half a file)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write the report ({exc.strerror})") from None
    return path


def write_report_csv(path: str | Path, report: dict[str, Any]) -> Path:
    """The counts table as CSV: label, count, percent, 95 % interval."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "count", "percent", "ci95_low", "ci95_high"])
        for label, n in report["counts"].items():
            lo, hi = report["ci95"].get(label, [0.0, 0.0])
            w.writerow([label, n, report["differential"].get(label, 0.0), lo, hi])
        w.writerow(["total", report["total"], 100.0 if report["total"] else 0.0, "", ""])
    return path


@dataclass
class Runs:
    """The counts of one live session: the current run (its number, first frame, start time)
    and the reports of the finished ones, kept for the export (the last ``keep``)."""

    number: int = 1
    note: str = ""
    first_frame: int = 0
    started: float | None = None
    keep: int = 20
    finished: deque[dict[str, Any]] = field(default_factory=deque)

    def begin(self, frame: int) -> None:
        """The count restarts at session frame ``frame`` (its clock starts with the worker)."""
        self.first_frame, self.started = frame, None

    def close(self, report: dict[str, Any], why: str) -> None:
        """The current run ended (``why``): keep its report and number the next one."""
        self.finished.append({**report, "ended": why})
        while len(self.finished) > self.keep:
            self.finished.popleft()
        self.number += 1
        self.note = (f"run {self.number}: {why}, so the count restarted; run {self.number - 1} "
                     f"({report['total']} cells) is kept in the export")


def export_files(folder: str | Path, report: dict[str, Any], earlier: list[dict[str, Any]],
                 events: bytes, video: Path | None) -> dict[str, Path]:
    """The downloads of a count: report.json and report.csv, report-runN.json for each earlier
    run, events.jsonl, and the recorded video (named, not copied) when there is one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_report(folder / "report.json", report),
             "csv": write_report_csv(folder / "report.csv", report)}
    for old in earlier:
        paths[f"run{old['run']}"] = write_report(folder / f"report-run{old['run']}.json", old)
    paths["events"] = folder / "events.jsonl"
    paths["events"].write_bytes(events)
    if video is not None and video.exists() and video.stat().st_size > 0:
        paths["video"] = video
    return paths
