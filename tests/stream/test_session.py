"""Session: one JPEG per frame whatever the viewers; reset, pause, bounded memory, events."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from detector.core import CountEvent, Detections, Frame, Summary
from detector.errors import InputError
from detector.tally import Tally
from stream.session import Session, SessionSettings
from stream.sources import LiveSource, Source


@dataclass
class FakeResult:
    frame: Frame
    detections: Detections
    counted: list[CountEvent]
    summary: Summary
    timings: dict[str, float] = field(default_factory=dict)
    thumbs: dict[int, np.ndarray] = field(default_factory=dict)


class FakeClassifier:
    labels = ("neutrophil", "lymphocyte")
    model_path = Path("models/fake.tflite")

    def __init__(self, min_score: float) -> None:
        self.min_score = min_score


class FakeAnalyzer:
    """Counts one 'neutrophil' every ``every`` frames (track id = frame index) on a real Tally."""

    def __init__(self, settings: SessionSettings, every: int = 2) -> None:
        self.settings = settings
        self.classifier = FakeClassifier(settings.min_score or 0.5)
        self.every = every
        self.tally = Tally(FakeClassifier.labels, target=settings.target)
        self.processed = 0
        self.renders = 0
        self.resets = 0

    def reset(self) -> None:
        self.tally.reset()
        self.resets += 1

    def set_target(self, n: int) -> None:
        self.tally.target = n

    def set_min_score(self, value: float) -> None:
        self.classifier.min_score = value

    def finish(self) -> list[CountEvent]:
        return []

    def process(self, frame: Frame) -> FakeResult:
        self.processed += 1
        counted = []
        if frame.index % self.every == 0:
            event = self.tally.count(frame.index, "neutrophil", 0.9, frame.index, frame.index,
                                     (2.0, 2.0, 20.0, 20.0))
            counted = [event] if event is not None else []
        return FakeResult(frame, Detections.empty(), counted, self.tally.summary(),
                          {"segment": 0.001})

    def render(self, result: FakeResult, fps: float | None = None) -> np.ndarray:
        self.renders += 1
        return result.frame.bgr.copy()


class ListSource(Source):
    """N synthetic frames, read in the consumer's thread (analysis mode)."""

    monotonic_clock = True

    def __init__(self, n: int, size: tuple[int, int] = (64, 48)) -> None:
        super().__init__()
        self.name, self.fps, self.n, self.i, self.size = "list", 30.0, n, 0, size

    def read(self, timeout: float | None = None) -> Frame | None:
        if self.i >= self.n:
            self.state = "stopped"
            return None
        img = np.zeros((self.size[1], self.size[0], 3), np.uint8)
        img[:, :, 1] = self.i % 256
        f = Frame(img, self.i, time.monotonic())
        self.i += 1
        return f


def _session(tmp_path: Path, n: int = 50, **kw: Any) -> tuple[Session, list[FakeAnalyzer]]:
    made: list[FakeAnalyzer] = []

    def factory(settings: SessionSettings) -> FakeAnalyzer:
        a = FakeAnalyzer(settings)
        made.append(a)
        return a

    opener = kw.pop("opener", lambda spec, realtime: ListSource(n))
    s = Session("fake", factory, out_dir=tmp_path / "session", source_opener=opener,
                realtime=False, **kw)
    return s, made


def _wait_stopped(s: Session, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while s.state != "stopped" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.state == "stopped"


def test_one_jpeg_per_analyzed_frame_whatever_the_viewers(tmp_path: Path) -> None:
    s, made = _session(tmp_path, n=60)
    got: dict[int, list[int]] = {i: [] for i in range(10)}
    stop = threading.Event()

    def viewer(i: int) -> None:
        last = -1
        while not stop.is_set():
            pub = s.wait_jpeg(last, timeout=0.2)
            if pub is not None:
                last = pub.seq
                got[i].append(id(pub.jpeg))

    threads = [threading.Thread(target=viewer, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    calls = []
    s.add_listener(calls.append)
    s.start()
    _wait_stopped(s)
    stop.set()
    for t in threads:
        t.join()
    assert made[0].processed == 60
    assert s.publisher.encoded == 60 and calls == list(range(60))  # a JPEG a frame, not a viewer
    # viewers share the same bytes objects (no per-viewer copy or re-encode)
    shared = set(got[0]) & set(got[9])
    assert shared
    img = cv2.imdecode(np.frombuffer(s.latest().jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (48, 64, 3) and abs(int(img[10, 10, 1]) - 59) <= 3
    s.close()


def test_counts_events_and_exports(tmp_path: Path) -> None:
    s, _ = _session(tmp_path, n=20)
    s.start()
    _wait_stopped(s)
    st = s.stats()
    assert st["counts"]["neutrophil"] == 10 and st["total"] == 10
    assert st["state"] == "stopped" and st["frames"] == 20
    assert st["ci95"]["neutrophil"][1] == pytest.approx(100.0)
    cells = s.recent_cells()
    assert len(cells) == 10 and cells[0].track_id == 18  # newest first
    assert cells[0].jpeg[:2] == b"\xff\xd8"
    paths = s.export(tmp_path / "out")
    rep = json.loads(paths["json"].read_text())
    assert rep["counts"]["neutrophil"] == 10 and rep["differential"]["neutrophil"] == 100.0
    csv_lines = paths["csv"].read_text().splitlines()
    assert csv_lines[0] == "label,count,percent,ci95_low,ci95_high"
    assert csv_lines[1].startswith("neutrophil,10,100.0,")
    events = [json.loads(line) for line in paths["events"].read_text().splitlines()]
    counted = [e for e in events if e["event"] == "counted"]
    assert [e["track_id"] for e in counted] == list(range(0, 20, 2))
    assert events[0]["event"] == "start"
    s.close()


def test_reset_pause_target_min_score(tmp_path: Path) -> None:
    frames_in = threading.Semaphore(0)

    class GatedSource(ListSource):
        def read(self, timeout: float | None = None) -> Frame | None:
            if not frames_in.acquire(timeout=timeout or 5):
                return None
            return super().read(timeout)

    s, made = _session(tmp_path, opener=lambda spec, realtime: GatedSource(1000))
    s.start()

    def feed(n: int) -> None:
        before = made[0].processed
        for _ in range(n):
            frames_in.release()
        deadline = time.monotonic() + 5
        while made[0].processed < before + n and time.monotonic() < deadline:
            time.sleep(0.005)

    feed(10)
    assert s.stats()["counts"]["neutrophil"] == 5
    s.reset()
    assert made[0].resets == 1 and s.stats()["total"] == 0 and s.recent_cells() == []
    feed(4)
    assert s.stats()["total"] == 2

    s.pause()
    assert s.state == "paused"
    processed = made[0].processed
    for _ in range(6):
        frames_in.release()
    time.sleep(0.2)
    assert made[0].processed == processed  # nothing analyzed while paused
    s.start()  # resumes
    feed(2)
    assert made[0].processed == processed + 2

    s.set_target(200)
    feed(1)
    assert s.stats()["target"] == 200
    s.set_min_score(0.8)
    assert made[0].classifier.min_score == 0.8 and s.stats()["min_score"] == 0.8
    s.switch_model("other.tflite")
    assert len(made) == 2 and made[1].settings.model == "other.tflite"
    with pytest.raises(Exception, match="between 0 and 1"):
        s.set_min_score(2)
    kinds = [json.loads(line)["event"]
             for line in (tmp_path / "session" / "events.jsonl").read_text().splitlines()]
    assert {"reset", "pause", "resume", "target", "min_score", "model"} <= set(kinds)
    s.close()
    assert s.state == "stopped"


def test_memory_is_bounded(tmp_path: Path) -> None:
    s, _ = _session(tmp_path, n=3000, max_cells=8, window=30)
    s.start()
    _wait_stopped(s, timeout=60)
    assert s.frames == 3000
    assert len(s.recent_cells()) == 8
    assert len(s.meter._latency) == 30 and len(s.meter._times) == 30
    assert all(len(v) <= 30 for v in s.meter._stages.values())
    # the file keeps every event
    lines = (tmp_path / "session" / "events.jsonl").read_text().splitlines()
    assert sum('"counted"' in line for line in lines) == 1500
    s.close()


def test_recording_writes_the_annotated_video(tmp_path: Path) -> None:
    """The page's recording is VP8 in WebM, which browsers play; every frame is in it."""
    s, _ = _session(tmp_path, n=30)
    path = s.set_recording(True)
    s.start()
    _wait_stopped(s)
    assert path is not None and path.suffix == ".webm" and path.exists()
    cap = cv2.VideoCapture(str(path))
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little")
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert fourcc == b"VP80" and n == 30
    assert s.export(tmp_path / "out")["video"] == path
    s.close()


def test_live_source_latency_and_drops(tmp_path: Path) -> None:
    class Cam:
        def __init__(self) -> None:
            self.n = 0

        def isOpened(self) -> bool:  # noqa: N802
            return True

        def read(self) -> tuple[bool, np.ndarray]:
            time.sleep(0.002)
            self.n += 1
            return True, np.zeros((48, 64, 3), np.uint8)

        def get(self, prop: int) -> float:
            return 0.0

        def release(self) -> None:
            pass

    class SlowAnalyzer(FakeAnalyzer):
        def process(self, frame: Frame) -> FakeResult:
            time.sleep(0.02)
            return super().process(frame)

    s = Session("cam", lambda st: SlowAnalyzer(st), out_dir=tmp_path / "s",
                source_opener=lambda spec, realtime: LiveSource("cam", Cam))
    s.start()
    assert s.wait_jpeg(-1, timeout=5) is not None
    time.sleep(0.5)
    st = s.stats()
    s.close()
    assert st["dropped"] > 0  # the camera is faster than the analyzer: old frames dropped
    assert st["latency_ms"] is not None and st["latency_ms"] < 200  # never a growing lag
    assert st["state"] == "running"


def test_source_error_becomes_state(tmp_path: Path) -> None:
    def bad(spec: Any, realtime: bool) -> Source:
        raise InputError("camera 9 could not be opened")

    s, _ = _session(tmp_path, opener=bad)
    with pytest.raises(InputError, match="camera 9"):
        s.start()
    assert s.state == "error: camera 9 could not be opened"
    s.close()


def test_gallery_uses_the_analyzers_thumbnails(tmp_path: Path) -> None:
    class ThumbAnalyzer(FakeAnalyzer):
        def process(self, frame: Frame) -> FakeResult:
            res = super().process(frame)
            res.thumbs = {ev.track_id: np.full((30, 30, 3), (0, 0, 200), np.uint8)
                          for ev in res.counted}  # red crops: not from this (green) frame
            return res

    s = Session("fake", lambda st: ThumbAnalyzer(st), out_dir=tmp_path / "s",
                source_opener=lambda spec, realtime: ListSource(4), realtime=False)
    s.start()
    _wait_stopped(s)
    cells = s.recent_cells()
    s.close()
    assert len(cells) == 2
    img = cv2.imdecode(np.frombuffer(cells[0].jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (96, 96, 3) and img[48, 48, 2] > 150 and img[48, 48, 1] < 50


def test_viewers_get_frames_after_a_source_switch(tmp_path: Path) -> None:
    """Frame indices restart with a new source; a viewer waiting across the switch keeps getting
    newer JPEGs (``seq`` only grows), all from the new source, up to its last frame.

    ``switch_source`` runs the new source itself: calling ``start()`` after it would play the
    file again once it has ended (a new run), so the test does not."""
    sizes = {"fake": (64, 48), "other": (80, 60)}  # the frame's size tells the source
    s, _ = _session(tmp_path, opener=lambda spec, realtime: ListSource(20, sizes[spec]))
    s.start()
    _wait_stopped(s)
    last = s.latest()
    assert (last.frame_id, last.seq, last.width) == (19, 19, 64)
    got: list[Any] = []

    def viewer() -> None:
        seq = last.seq
        while not (got and got[-1].frame_id == 19 and got[-1].width == 80):
            pub = s.wait_jpeg(seq, timeout=5)
            if pub is None:
                return
            got.append(pub)
            seq = pub.seq

    t = threading.Thread(target=viewer)
    t.start()
    s.switch_source("other")
    t.join(timeout=30)
    _wait_stopped(s)
    seqs = [p.seq for p in got]
    assert seqs and seqs[0] > last.seq and seqs == sorted(set(seqs)), seqs  # always newer
    assert {(p.width, p.height) for p in got} == {(80, 60)}  # from the new source only
    assert got[-1].frame_id == 19  # the viewer saw the new source to its end
    assert got[-1].seq == s.latest().seq == 39  # one JPEG per frame of both sources
    s.close()


class LoopingSource(ListSource):
    """``n`` frames played ``passes`` times; the frame index keeps counting, as a looping file's."""

    def __init__(self, n: int, passes: int) -> None:
        super().__init__(n * passes)
        self.period = n

    def read(self, timeout: float | None = None) -> Frame | None:
        frame = super().read(timeout)
        if frame is not None and frame.index and frame.index % self.period == 0:
            self.pass_start = frame.index
        return frame


def test_a_looping_file_never_counts_a_cell_twice(tmp_path: Path) -> None:
    """Two passes of a looping clip: the second is a new run, the first one's report is kept."""
    # the fake gives each frame's cell a new track id, as a tracker would on a replay
    s = Session("demo", lambda st: FakeAnalyzer(st), out_dir=tmp_path / "s",
                source_opener=lambda spec, realtime: LoopingSource(10, passes=2), realtime=False)
    s.start()
    _wait_stopped(s)
    st = s.stats()
    assert st["total"] == 5 and st["run"] == 2  # not 10: the second pass restarted the count
    assert st["note"] == ("run 2: the demo started again from its beginning, so the count "
                          "restarted; run 1 (5 cells) is kept in the export")
    paths = s.export(tmp_path / "out")
    first = json.loads(paths["run1"].read_text())
    assert first["total"] == 5 and first["frames"] == 10 and first["run"] == 1
    assert json.loads(paths["json"].read_text())["run"] == 2
    s.close()


def test_a_finished_file_started_again_is_a_new_run(tmp_path: Path) -> None:
    s, _ = _session(tmp_path, n=8)
    s.start()
    _wait_stopped(s)
    assert s.stats()["total"] == 4 and s.stats()["run"] == 1
    s.start()  # the file plays again from its beginning
    _wait_stopped(s)
    st = s.stats()
    assert st["total"] == 4 and st["run"] == 2 and "was started again" in st["note"]
    assert json.loads(s.export(tmp_path / "out")["run1"].read_text())["total"] == 4
    s.close()


def test_demo_clip_total_after_two_passes_equals_one(tmp_path: Path) -> None:
    """The real pipeline on a short simulator clip, looping as the demo does (analysis mode:
    no frame dropped, so both passes see the same frames)."""
    from stream import resolve_model
    from stream.app import default_analyzer_factory
    from stream.sources import open_source
    from stream.synth import render_video

    clip = render_video(tmp_path / "clip", seconds=3.0, fps=30.0, seed=3, progress=False)
    sources: list[Source] = []

    def opener(spec: Any, realtime: bool) -> Source:
        sources.append(open_source(clip / "video.mp4", realtime=False, loop=True))
        return sources[0]

    s = Session("demo", default_analyzer_factory, out_dir=tmp_path / "s", realtime=False,
                settings=SessionSettings(model=resolve_model(None)), source_opener=opener)
    s.start()
    deadline = time.monotonic() + 120
    totals = []
    while s.runs.number < 3 and time.monotonic() < deadline:
        totals.append(s.stats()["total"])
        time.sleep(0.01)
    s.close()
    runs = [r["total"] for r in s.runs.finished]
    assert len(runs) == 2 and runs[0] == runs[1] > 0  # pass 2 counted what pass 1 counted
    assert max(totals) == runs[0]  # and the shown total never went past one pass


PLAY_JS = """
async () => {
  const v = document.querySelector('video');
  const ok = await new Promise(done => {
    if (v.readyState >= 2) return done(true);
    if (v.error) return done(false);
    v.addEventListener('loadeddata', () => done(true));
    v.addEventListener('error', () => done(false));
    setTimeout(() => done(false), 20000);
  });
  return {ok, width: v.videoWidth, duration: v.duration, error: v.error && v.error.code};
}
"""


def test_recording_plays_in_a_browser(tmp_path: Path) -> None:
    """Chromium decodes the page's recording (VP8 WebM); the old mp4v MP4 it refuses as a
    format it does not support (one browser for both files)."""
    from stream.outputs import VideoRecorder

    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("chromium not installed")
    playwright = pytest.importorskip("playwright.sync_api")
    results = {}
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium),
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            for name in ("page.webm", "page.mp4"):
                rec = VideoRecorder(tmp_path / name, 30.0)
                for i in range(30):
                    img = np.full((96, 128, 3), 40, np.uint8)
                    cv2.circle(img, (4 * i, 48), 12, (0, 0, 255), -1)
                    rec.write(img)
                rec.close()
                html = tmp_path / f"{name}.html"
                html.write_text(f"<video src='{name}' muted></video>")
                page.goto(html.as_uri())
                results[name] = page.evaluate(PLAY_JS)
        finally:
            browser.close()
    webm, mp4 = results["page.webm"], results["page.mp4"]
    assert webm["ok"] is True and webm["width"] == 128
    assert webm["duration"] == pytest.approx(1.0, abs=0.1)
    assert mp4["ok"] is False and mp4["error"] == 4, mp4  # MEDIA_ERR_SRC_NOT_SUPPORTED


@pytest.mark.parametrize("spec, shown", [
    ("/srv/lab/uploads/3f2a9c/smear.mp4", "smear.mp4"),
    ("rtsp://lab:pa55@cam.lab/live", "rtsp://lab:***@cam.lab/live"),
    ("https://cams.example.org/live.m3u8?token=s3cr3t&quality=hd",
     "https://cams.example.org/live.m3u8?token=***&quality=***"),
])
def test_exports_name_the_source_without_server_path_or_password(
        tmp_path: Path, spec: str, shown: str) -> None:
    """report.json, report-runN.json and events.jsonl of the page's export (and /stats.json)
    hand out neither the server's folders nor a URL's password or access token."""
    s = Session(spec, lambda st: FakeAnalyzer(st), out_dir=tmp_path / "s",
                source_opener=lambda spec, realtime: ListSource(8), realtime=False)
    s.set_recording(True)
    s.start()
    _wait_stopped(s)
    s.start()  # a file started again: run 2, run 1's report kept
    _wait_stopped(s)
    s.switch_source(spec)
    _wait_stopped(s)
    assert s.stats()["source"] == shown
    paths = s.export(tmp_path / "out")
    s.close()
    assert {"json", "csv", "run1", "events", "video"} <= set(paths)
    for key in ("json", "run1"):
        assert json.loads(paths[key].read_text())["source"] == shown
    events = [json.loads(line) for line in paths["events"].read_text().splitlines()]
    assert [e["source"] for e in events if "source" in e] == [shown] * 4  # start x3, source
    assert [e["file"] for e in events if e["event"] == "record"] == [paths["video"].name]
    for key in ("json", "csv", "run1", "events"):
        text = paths[key].read_text()
        assert "/srv/lab" not in text and "pa55" not in text and str(tmp_path) not in text, key


class BrokenAnalyzer(FakeAnalyzer):
    """Fails on the fourth frame with an error that names a server file."""

    def process(self, frame: Frame) -> FakeResult:
        if frame.index == 3:
            raise RuntimeError("cannot read /opt/hematovision/secret/weights.bin")
        return super().process(frame)


def test_a_crash_of_the_worker_is_one_log_line_and_an_error_state(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = Session("fake", lambda st: BrokenAnalyzer(st), out_dir=tmp_path / "s",
                source_opener=lambda spec, realtime: ListSource(50), realtime=False)
    with caplog.at_level(logging.WARNING, logger="stream"):
        s.start()
        deadline = time.monotonic() + 10
        while not s.state.startswith("error") and time.monotonic() < deadline:
            time.sleep(0.01)
    want = "error: analysis stopped (RuntimeError: cannot read weights.bin)"
    assert s.state == want and s.stats()["state"] == want
    assert s.stats()["total"] == 2 and s.frames == 3  # what was counted stays shown
    (rec,) = [r for r in caplog.records if r.name.startswith("stream")]
    assert rec.levelno == logging.ERROR and rec.exc_info is None  # one line, no traceback
    assert rec.getMessage() == ("session worker failed: RuntimeError: cannot read "
                                "/opt/hematovision/secret/weights.bin")  # the server's own log
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stream"):  # -v: the traceback too
        s.start()
        deadline = time.monotonic() + 10
        while not s.state.startswith("error") and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [r.exc_info is not None for r in caplog.records
            if r.getMessage().startswith("session worker failed")] == [True]
    s.close()
