"""Glues segmenter, tracker, voter, classifier and tally: one call per frame, no I/O, one thread.

Per frame: segment -> track (stage shift, matching) -> classify only the cells that are due
(confirmed, whole in view, sharp, label not locked yet), all of them in ONE batched invoke ->
vote and lock labels -> count the cells decided. Drawing happens only in ``render``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from detector.core import CountEvent, Detections, Frame, Summary, in_view
from detector.focus import SharpGate, cell_sharpness, frame_sharpness
from detector.tally import Tally
from detector.track import Tracker, TrackerOptions
from detector.vote import VoteOptions, Voter

log = logging.getLogger(__name__)

STAGES = ("segment", "track", "classify", "tally")
#: Side of the thumbnail kept for each cell (its sharpest sighting).
THUMB = 96


class SegmenterLike(Protocol):
    """What the analyzer needs of a segmenter: ``find`` reads a video frame (``in_sequence``:
    it follows the frame of the previous call, so what changes only with the microscope may be
    kept); ``find_still`` a photo (the still-image path, :mod:`detector.still`, which ``run``
    gives the analyzer's own segmenter for a folder of separate fields)."""

    def find(self, image: np.ndarray | Frame, *, in_sequence: bool = False) -> Detections: ...

    def find_still(self, image: np.ndarray | Frame) -> Detections: ...


class ClassifierLike(Protocol):
    labels: tuple[str, ...]
    min_score: float

    def classify_boxes(self, frame_bgr: np.ndarray, xyxy: np.ndarray) -> np.ndarray: ...

    def label_of(self, scores_row: np.ndarray) -> tuple[str, float]: ...


@dataclass
class FrameResult:
    """What one frame produced.

    Attributes:
        frame: the input frame.
        detections: cells in this frame with ``track_id``; ``class_id``/``score`` set for cells
            whose label is locked (-1 / 0 otherwise); ``data["label"]`` holds the label name
            ('' while undecided).
        counted: events of the cells counted in this frame.
        summary: the count so far.
        timings: seconds spent per stage (segment, track, classify, tally).
        classified: how many crops the classifier saw in this frame.
        thumbs: track id -> small BGR crop (``THUMB`` px square) of the sharpest sighting of
            each cell counted in this frame (a cell counted after it left the view is not in
            this frame: use this, not a crop of ``frame`` at the event's box).
    """

    frame: Frame
    detections: Detections
    counted: list[CountEvent]
    summary: Summary
    timings: dict[str, float] = field(default_factory=dict)
    classified: int = 0
    thumbs: dict[int, np.ndarray] = field(default_factory=dict)


class Analyzer:
    """Frame in -> cells, tracks, counts out (see module docstring)."""

    def __init__(
        self,
        segmenter: SegmenterLike,
        classifier: ClassifierLike,
        *,
        target: int = 100,
        track: TrackerOptions | None = None,
        vote: VoteOptions | None = None,
        naive: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``target``: cells to count; ``track``: tracker settings; ``vote``: how many sightings
        vote and how sharp they must be. ``naive=True`` classifies every cell in every frame
        (the costly pipeline ``hematovision bench`` compares against). ``clock`` times the stages
        (``time.thread_time`` gives CPU time, which a busy machine does not inflate)."""
        self.segmenter = segmenter
        self.classifier = classifier
        self.tracker = Tracker(track)
        self.labels: tuple[str, ...] = tuple(classifier.labels)
        self.voter = Voter(self.labels, self._label_of, vote)
        self.tally = Tally(self.labels, target=target)
        #: Skips frames blurred as a whole (focus relative to the recent frames).
        self.frame_gate = SharpGate(ratio=0.6)
        self.naive = naive
        self.clock = clock
        self._last_index: int | None = None

    def _label_of(self, scores_row: np.ndarray) -> tuple[str, float]:
        return self.classifier.label_of(scores_row)  # reads min_score as it is now

    def reset(self) -> None:
        """Start a new slide: tracks, votes, counts and focus statistics forgotten."""
        self.tracker.reset()
        self.voter.reset()
        self.tally.reset()
        self.frame_gate.reset()
        self._last_index = None

    def process(self, frame: Frame | np.ndarray) -> FrameResult:
        """Analyse one video frame (BGR image or Frame). A still photo, with no next frame to
        show a cut cell whole, goes through ``detector.still.analyse_still`` instead."""
        if not isinstance(frame, Frame):
            frame = Frame(bgr=frame, index=0 if self._last_index is None else self._last_index + 1)
        clock = self.clock
        t0 = clock()
        dets = self.segmenter.find(frame, in_sequence=self._last_index is not None)
        t1 = clock()
        period = 1 if self._last_index is None else max(1, frame.index - self._last_index)
        self._last_index = frame.index
        dets = self.tracker.update(dets, frame, period=period)
        whole = in_view(dets, frame.width, frame.height, self.tracker.options.edge_margin)
        self.voter.observe(dets, whole, frame.index)
        t2 = clock()

        decided, n_cls = self._classify(frame, dets, whole)
        t3 = clock()

        voter, tracker = self.voter, self.tracker
        ended = voter.close(tracker.ended)
        left = voter.leaving(tracker.lost(voter.options.decide_after))
        counted = self.tally.update(ended + left + decided)
        thumbs = {e.track_id: th for e in counted
                  if (th := voter.thumb(e.track_id)) is not None}
        voter.forget(tracker.ended)
        voter.annotate(dets)
        summary = self.tally.summary()
        timings = {"segment": t1 - t0, "track": t2 - t1, "classify": t3 - t2,
                   "tally": clock() - t3}
        return FrameResult(frame=frame, detections=dets, counted=counted, summary=summary,
                           timings=timings, classified=n_cls, thumbs=thumbs)

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

    def finish(self) -> list[CountEvent]:
        """End of stream: decide and count the cells still tracked -> their events."""
        ended = self.tracker.flush()
        counted = self.tally.update(self.voter.close(ended))
        self.voter.forget(ended)
        return counted

    def _classify(self, frame: Frame, dets: Detections, whole: np.ndarray
                  ) -> tuple[list[CountEvent], int]:
        """Classify the due cells in one invoke and vote -> (events of labels locked now,
        crops classified)."""
        voter = self.voter
        if self.naive:
            if len(dets) == 0:
                return [], 0
            probs = self.classifier.classify_boxes(frame.bgr, dets.xyxy)
            due = voter.due(dets, whole)
            return voter.vote([int(dets.track_id[i]) for i in due], probs[due]), len(dets)
        frame_ok = self.frame_gate.check(frame_sharpness(frame))
        due = voter.due(dets, whole)
        if not due or not frame_ok:
            return [], 0
        sharp: list[int] = []
        for i in due:
            tid = int(dets.track_id[i])
            box = dets.xyxy[i]
            ok, best = voter.sighting(tid, cell_sharpness(frame.bgr, box))
            if ok:
                sharp.append(i)
                if best:
                    voter.set_thumb(tid, cell_thumbnail(frame.bgr, box))
        if not sharp:
            return [], 0
        probs = self.classifier.classify_boxes(frame.bgr, dets.xyxy[sharp])
        return voter.vote([int(dets.track_id[i]) for i in sharp], probs), len(sharp)

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
