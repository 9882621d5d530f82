"""Glues segmenter, tracker, classifier and tally into one call per frame. No I/O, one thread.

Per frame: segment -> track (global shift, matching) -> classify only the tracks that are due
(confirmed, fully in view, sharp, label not locked yet), all of them in ONE batched invoke ->
vote and lock labels -> count newly decided cells. Drawing happens only in ``render``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from detector.core import Detections, Frame
from detector.crop import CropRule
from detector.focus import SharpGate, cell_sharpness, sharpness
from detector.tally import Tally
from detector.track import Track, Tracker, finalize_track

log = logging.getLogger(__name__)

STAGES = ("segment", "track", "classify", "tally")
#: Side of the thumbnail kept for each cell (its sharpest sighting).
THUMB = 96


class SegmenterLike(Protocol):
    def find(self, image: np.ndarray | Frame) -> Detections: ...


class ClassifierLike(Protocol):
    labels: tuple[str, ...]
    crop_rule: CropRule
    min_score: float

    def classify_boxes(self, frame_bgr: np.ndarray, xyxy: np.ndarray) -> np.ndarray: ...

    def label_of(self, scores_row: np.ndarray) -> tuple[str, float]: ...


@dataclass
class FrameResult:
    """What one frame produced.

    Attributes:
        frame: the input frame.
        detections: cells in this frame with ``track_id``; ``class_id``/``score`` set for tracks
            whose label is locked (-1 / 0 otherwise); ``data["label"]`` holds the label name
            ('' while undecided), ``data["judged"]`` whether the cell is fully in view.
        counted: counting events (dicts) of the cells counted in this frame.
        summary: the tally summary (counts, total, target, differential, ci95, target_reached).
        timings: seconds spent per stage (segment, track, classify, tally).
        classified: how many crops the classifier saw in this frame.
        thumbs: track id -> small BGR crop (``THUMB`` px square) of the sharpest sighting of
            each cell counted in this frame (a cell counted after it left the view is not in
            this frame: use this, not a crop of ``frame`` at the event's box).
    """

    frame: Frame
    detections: Detections
    counted: list[dict[str, Any]]
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    classified: int = 0
    thumbs: dict[int, np.ndarray] = field(default_factory=dict)


class Analyzer:
    """Frame in -> cells, tracks, counts out (see module docstring)."""

    def __init__(
        self,
        segmenter: SegmenterLike,
        classifier: ClassifierLike,
        tracker: Tracker | None = None,
        tally: Tally | None = None,
        *,
        target: int = 100,
        frame_gate: SharpGate | None = None,
        cell_ratio: float = 0.6,
        naive: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``frame_gate`` skips blurred frames (focus relative to the recent frames);
        ``cell_ratio``: a sighting votes only when at least this sharp relative to the same
        cell's sharpest sighting so far. ``naive=True`` classifies every cell in every frame
        (the design we avoid; for bench). ``clock`` times the stages (``time.thread_time``
        gives CPU time, which a busy machine does not inflate)."""
        self.segmenter = segmenter
        self.classifier = classifier
        self.tracker = tracker or Tracker()
        self.labels: tuple[str, ...] = tuple(classifier.labels)
        self.tally = tally or Tally(self.labels, target=target)
        self.frame_gate = frame_gate or SharpGate(ratio=0.6)
        self.cell_ratio = cell_ratio
        self.naive = naive
        self.clock = clock
        self._label_of: Callable[[np.ndarray], tuple[str, float]] = classifier.label_of
        self._last_index: int | None = None

    def reset(self) -> None:
        """Start a new slide: tracks, counts and focus statistics forgotten."""
        self.tracker.reset()
        self.tally.reset()
        self.frame_gate.reset()
        self._last_index = None

    def process(self, frame: Frame | np.ndarray, still: bool = False) -> FrameResult:
        """Analyse one frame (BGR image or Frame).

        ``still=True``: the image is a field of its own (a folder of unrelated photos), not a
        video frame: every white cell fully in view is named in one invoke and counted at once,
        no tracking (cells cut by the border are shown, not counted).
        """
        if not isinstance(frame, Frame):
            frame = Frame(bgr=frame, index=0 if self._last_index is None else self._last_index + 1)
        if still:
            return self._process_still(frame)
        timings: dict[str, float] = {}
        clock = self.clock
        t0 = clock()
        dets = self.segmenter.find(frame)
        t1 = clock()
        period = 1 if self._last_index is None else max(1, frame.index - self._last_index)
        self._last_index = frame.index
        dets = self.tracker.update(dets, frame, period=period)
        t2 = clock()
        timings["segment"], timings["track"] = t1 - t0, t2 - t1

        n_cls = self._classify(frame, dets)
        t3 = clock()
        timings["classify"] = t3 - t2

        finished = [t for t in self.tracker.removed if not t.counted] + self.tracker.leaving()
        for t in finished:
            finalize_track(t, self._label_of, self.labels)
        counted = self.tally.update(finished)
        counted += self.tally.update(t for t in self.tracker.tracks if t.label is not None)
        self._annotate(dets)
        summary = self.tally.summary()
        thumbs = self._thumbs(counted, finished)
        timings["tally"] = clock() - t3
        return FrameResult(frame=frame, detections=dets, counted=counted, summary=summary,
                           timings=timings, classified=n_cls, thumbs=thumbs)

    def _process_still(self, frame: Frame) -> FrameResult:
        clock = self.clock
        t0 = clock()
        dets = self.segmenter.find(frame)
        t1 = clock()
        self._last_index = frame.index
        n = len(dets)
        ids = np.arange(self.tracker._next_id, self.tracker._next_id + n, dtype=np.int64)
        self.tracker._next_id += n
        dets.track_id = ids
        self.tracker.frame_size = (frame.width, frame.height)
        full = self.tracker.fully_in_view(dets)
        t2 = clock()
        names = np.full(n, "", dtype=object)
        counted: list[dict[str, Any]] = []
        thumbs: dict[int, np.ndarray] = {}
        idx = np.flatnonzero(full)
        if len(idx):
            probs = self.classifier.classify_boxes(frame.bgr, dets.xyxy[idx])
            for i, row in zip(idx, probs, strict=True):
                label, score = self._label_of(row)
                dets.class_id[i] = self.labels.index(label) if label in self.labels else -1
                dets.score[i] = score
                names[i] = label
                ev = self.tally.count(int(ids[i]), label, score, frame.index, frame.index,
                                      dets.xyxy[i])
                if ev is not None:
                    counted.append(ev)
                    thumb = cell_thumbnail(frame.bgr, dets.xyxy[i])
                    if thumb is not None:
                        thumbs[int(ids[i])] = thumb
        t3 = clock()
        dets.data["label"] = names
        dets.data["judged"] = full
        return FrameResult(frame=frame, detections=dets, counted=counted,
                           summary=self.tally.summary(),
                           timings={"segment": t1 - t0, "track": t2 - t1, "classify": t3 - t2,
                                    "tally": clock() - t3},
                           classified=len(idx), thumbs=thumbs)

    def _thumbs(self, counted: list[dict[str, Any]], finished: list[Track]
                ) -> dict[int, np.ndarray]:
        if not counted:
            return {}
        by_id = {t.id: t for t in self.tracker.tracks}
        by_id.update({t.id: t for t in finished})
        out: dict[int, np.ndarray] = {}
        for ev in counted:
            t = by_id.get(int(ev["track_id"]))
            if t is not None and t.thumb is not None:
                out[t.id] = t.thumb
        return out

    def set_target(self, n: int) -> None:
        """Cells to count (a 100- or 200-cell differential)."""
        if int(n) < 1:
            raise ValueError(f"target must be >= 1, got {n}")
        self.tally.target = int(n)

    def set_min_score(self, value: float) -> None:
        """Top score below which a cell is ``unidentified``; applies to labels decided from now
        on (locked labels do not change)."""
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {value}")
        self.classifier.min_score = float(value)

    def finish(self) -> list[dict[str, Any]]:
        """End of stream: decide and count the tracks still alive -> their events."""
        tracks = self.tracker.flush()
        for t in tracks:
            finalize_track(t, self._label_of, self.labels)
        return self.tally.update(tracks)

    def _classify(self, frame: Frame, dets: Detections) -> int:
        if self.naive:
            if len(dets) == 0:
                return 0
            probs = self.classifier.classify_boxes(frame.bgr, dets.xyxy)
            for t in self.tracker.tracks:
                if t.seen_now and t.label is None and t.confirmed and t.full_now:
                    t.add_vote(probs[t.det_index])
                    if len(t.votes) >= self.tracker.options.votes_needed:
                        t.decide(self._label_of, self.labels)
            return len(dets)
        grey = self.tracker.small_grey
        frame_ok = True
        if grey is not None:
            frame_ok = self.frame_gate.check(sharpness(grey))  # on the tracker's small grey frame
        due: list[Track] = self.tracker.due_for_vote()
        if not due or not frame_ok:
            return 0
        sharp: list[Track] = []
        for t in due:
            # relative to the same cell's best sighting: cell types differ in texture, so a
            # threshold shared by all cells would favour the grainy ones
            s = cell_sharpness(frame.bgr, t.box)
            best = max((v for _, v in t.sightings), default=0.0)
            t.sightings.append((frame.index, s))
            if s >= self.cell_ratio * best:
                sharp.append(t)
                if s >= best:
                    t.thumb = cell_thumbnail(frame.bgr, t.box)
        if not sharp:
            return 0
        boxes = np.stack([t.box for t in sharp]).astype(np.float32)
        probs = self.classifier.classify_boxes(frame.bgr, boxes)
        need = self.tracker.options.votes_needed
        for t, row in zip(sharp, probs, strict=True):
            t.add_vote(row)
            if len(t.votes) >= need:
                t.decide(self._label_of, self.labels)
        return len(sharp)

    def _annotate(self, dets: Detections) -> None:
        """Copy locked labels of the tracks onto this frame's detections (for drawing, JSON)."""
        n = len(dets)
        names = np.full(n, "", dtype=object)
        judged = np.zeros(n, bool)
        for t in self.tracker.tracks:
            if not t.seen_now or t.det_index < 0:
                continue
            i = t.det_index
            judged[i] = t.full_now
            if t.label is not None:
                dets.class_id[i] = t.class_id
                dets.score[i] = t.score
                names[i] = t.label
        dets.data["label"] = names
        dets.data["judged"] = judged

    def render(self, result: FrameResult, fps: float | None = None) -> np.ndarray:
        """Annotated BGR copy of the frame: cell boxes with labels and ids, and the count panel."""
        from detector import draw

        img = draw.draw_cells(result.frame.bgr, result.detections, self.labels)
        return draw.draw_panel(img, result.summary, fps, inplace=True)


def build_analyzer(model: str | Path, *, target: int = 100, min_score: float | None = None,
                   threads: int = 1) -> Analyzer:
    """The default pipeline: classical segmenter + TFLite classifier (``model``; the command
    layer picks the default) + tracker + tally. ``run``, ``serve`` and the evaluations all build
    it here."""
    from detector.classify import CellClassifier
    from detector.segment import Segmenter

    classifier = CellClassifier(model, num_threads=threads, min_score=min_score)
    return Analyzer(Segmenter(), classifier, target=target)


def cell_thumbnail(bgr: np.ndarray, box: np.ndarray, side: int = THUMB) -> np.ndarray | None:
    """Square crop around a box for the gallery, resized to ``side`` (None when it lies outside
    the frame). Clipped at the frame, not padded: a picture for people, not a model input."""
    h, w = bgr.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    r = max(x2 - x1, y2 - y1) * 0.6
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    a, b = int(max(cx - r, 0)), int(max(cy - r, 0))
    c, d = int(min(cx + r, w)), int(min(cy + r, h))
    if c - a < 2 or d - b < 2:
        return None
    return cv2.resize(bgr[b:d, a:c], (side, side), interpolation=cv2.INTER_AREA)
