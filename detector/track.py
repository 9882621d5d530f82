"""Follows white cells across frames of a moving microscope stage: one id per physical cell.

``Tracker.update(detections, frame, period)`` fills ``detections.track_id`` (as supervision's
``ByteTrack.update_with_detections`` does) and lists the ids that ended in ``ended``. It only
tracks: naming and counting cells are the voter's and the tally's jobs, keyed by these ids.

The stage moves as a whole, so before matching, every track is moved by the stage shift that
``detector.motion.StageMotion`` measures for this frame; then tracks and detections are matched
by IoU and centre distance. So a fast pan does not start new tracks, and on a still stage two
close neighbours are not merged (the prediction is where they are, not somewhere between them).

Track life: tentative (new) -> confirmed (seen in ``confirm_hits`` of the last ``confirm_window``
updates) -> lost (unseen, kept and moved with the stage for up to ``max_lost`` frames in view, or
``max_lost_outside`` once the stage has carried it out of view; found again in that gap it keeps
its id) -> ended. Moving lost tracks with the measured stage shift is dead reckoning: its drift
(about 1 px/s on the simulator) is what limits how long a track can wait for a return. A
tentative track unseen for more than ``tentative_max_misses`` frames ends as noise.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from detector.core import Detections, Frame, box_iou, in_view
from detector.motion import MotionOptions, StageMotion

log = logging.getLogger(__name__)


@dataclass
class TrackerOptions:
    """Tracker settings (frames are source frames; sizes in full-resolution pixels)."""

    confirm_hits: int = 3
    """Sightings among the last ``confirm_window`` updates that confirm a track."""
    confirm_window: int = 5
    """Number of recent updates looked at for confirmation."""
    max_lost: int = 300
    """Frames a confirmed track is kept while unseen where it should be visible (about 10 s):
    the segmenter may miss a cell for a while (blur, a neighbour); found again it keeps its id."""
    max_lost_outside: int = 1800
    """Frames a confirmed track is kept once the stage has moved it out of view (about 60 s),
    moved with the stage (dead reckoning): it cannot be confused with a visible cell, and a
    return to a place already seen finds it again, so the cell is not counted twice."""
    tentative_max_misses: int = 2
    """Frames a tentative track may be unseen before it ends as noise."""
    min_iou: float = 0.1
    """A detection overlapping a predicted box at least this much may match it..."""
    max_center_dist: float = 0.6
    """...or one whose centre is within this fraction of the track's box size of the prediction."""
    edge_margin: float = 1.0
    """A box closer than this to the frame border is not fully in view."""
    motion: MotionOptions = field(default_factory=MotionOptions)
    """Stage-motion estimate (phase correlation window, minimum response)."""


@dataclass(eq=False)
class Track:
    """One physical cell followed over frames (tracking state only)."""

    id: int
    box: np.ndarray
    """Predicted box, moved with the stage; grown back to the whole cell when the border cuts it."""
    recent: deque[bool]
    """Seen or not in each of the last ``confirm_window`` updates."""
    confirmed: bool = False
    misses: int = 0
    """Frames since it was last seen."""
    misses_in_view: int = 0
    """Of those, frames where it should have been visible."""
    out_of_view: bool = False
    size: np.ndarray | None = None
    """Width and height when last seen whole (to grow a box the border cuts)."""


class Tracker:
    """Shift-compensated IoU tracker; ``update`` once per processed frame."""

    def __init__(self, options: TrackerOptions | None = None) -> None:
        self.options = options or TrackerOptions()
        #: The stage-shift estimate of each update (``shift``, ``source``).
        self.motion = StageMotion(self.options.motion)
        self.tracks: list[Track] = []
        self.ended: list[int] = []
        """Ids of the tracks that ended in the last ``update`` (or ``flush``)."""
        self.frame_size: tuple[int, int] | None = None
        self._next_id = 1

    def reset(self) -> None:
        """Forget all tracks and the stage motion; ids start again at 1."""
        self.motion.reset()
        self.tracks, self.ended, self.frame_size, self._next_id = [], [], None, 1

    def update(self, detections: Detections, frame: Frame | np.ndarray | None = None,
               period: int = 1) -> Detections:
        """Match ``detections`` to tracks -> the same object, ``track_id`` filled in and
        ``data["confirmed"]`` (the track is confirmed).

        ``frame`` (a Frame or a BGR image) drives the stage-shift estimate; ``period`` is how
        many source frames passed since the previous update (norfair style: 2 when one frame was
        skipped). Ids of the tracks this update ended are in ``ended``.
        """
        o = self.options
        period = max(1, int(period))
        bgr = frame.bgr if isinstance(frame, Frame) else frame
        if bgr is not None:
            self.frame_size = (bgr.shape[1], bgr.shape[0])
        self.ended = []

        centers = detections.centers
        active = [t for t in self.tracks if t.misses <= period]
        if active and len(centers):
            pred = np.array([(t.box[:2] + t.box[2:]) / 2 for t in active], np.float32)
            sides = np.sqrt(np.clip([np.prod(t.box[2:] - t.box[:2]) for t in active], 1, None))
            radius = 0.35 * sides.astype(np.float32)
        else:
            pred = np.empty((0, 2), np.float32)
            radius = np.array([10.0], np.float32)
        shift = self.motion.update(frame, pred, radius, centers)
        step = np.array([shift[0], shift[1], shift[0], shift[1]], np.float32)
        for t in self.tracks:
            t.box = t.box + step

        matches = self._match(detections)
        n = len(detections)
        track_id = np.full(n, -1, np.int64)
        confirmed = np.zeros(n, bool)
        full = self._whole(detections)
        matched: dict[int, int] = {}  # track index -> detection index
        for ti, di in matches:
            t = self.tracks[ti]
            matched[ti] = di
            t.box = self._unclipped(detections.xyxy[di], t, bool(full[di]))
            t.misses = t.misses_in_view = 0
            t.recent.append(True)
            track_id[di] = t.id
        keep: list[Track] = []
        for ti, t in enumerate(self.tracks):
            if ti not in matched:
                t.misses += period
                t.recent.append(False)
            if not t.confirmed and sum(t.recent) >= o.confirm_hits:
                t.confirmed = True
            t.out_of_view = t.misses > 0 and self._outside(t.box)
            if t.misses > 0 and not t.out_of_view:
                t.misses_in_view += period
            if not t.confirmed:
                gone = t.misses > o.tentative_max_misses
            else:
                gone = t.misses_in_view > o.max_lost or t.misses > o.max_lost_outside
            if gone:
                self.ended.append(t.id)
            else:
                keep.append(t)
                if ti in matched:
                    confirmed[matched[ti]] = t.confirmed
        self.tracks = keep
        for di in np.flatnonzero(track_id < 0):
            box = detections.xyxy[di].copy()
            t = Track(id=self._next_id, box=box,
                      recent=deque([True], maxlen=o.confirm_window),
                      confirmed=o.confirm_hits <= 1,
                      size=box[2:] - box[:2] if full[di] else None)
            self._next_id += 1
            self.tracks.append(t)
            track_id[di] = t.id
            confirmed[di] = t.confirmed
        detections.track_id = track_id
        detections.data["confirmed"] = confirmed
        return detections

    def lost(self, after_in_view: int) -> list[int]:
        """Ids of the tracks not seen in the last update that the stage carried out of view, or
        that stayed unseen in view for more than ``after_in_view`` frames (they may come back)."""
        return [t.id for t in self.tracks
                if t.out_of_view or t.misses_in_view > after_in_view]

    def flush(self) -> list[int]:
        """End of stream: end every track -> their ids (also in ``ended``)."""
        self.ended = [t.id for t in self.tracks]
        self.tracks = []
        return self.ended

    def _whole(self, dets: Detections) -> np.ndarray:
        if self.frame_size is None:
            return ~dets.touches_edge
        return in_view(dets, *self.frame_size, self.options.edge_margin)

    def _unclipped(self, box: np.ndarray, t: Track, full: bool) -> np.ndarray:
        """The track's box from a detection: a box cut by the border is grown back to the size
        the cell had when last fully in view, so predictions keep the whole cell.

        Across the cut side it grows away from the border; along it (a cell more than half out
        of view shows only a chord of itself, narrower than the cell) it grows about the
        chord's middle. A cell that left half-seen is then looked for at its whole size when
        the stage brings it back, so it is not taken for a new one."""
        box = box.astype(np.float32).copy()
        if full or self.frame_size is None:
            if full:
                t.size = box[2:] - box[:2]
            return box
        if t.size is None:
            return box
        m = self.options.edge_margin
        size = (float(t.size[0]), float(t.size[1]))
        cut = []
        for a, n in enumerate(self.frame_size):  # a = 0: x (box[0], box[2]); a = 1: y
            lo, hi = box[a], box[a + 2]
            if lo <= m and hi < n - m:  # cut on the low side: grow away from it
                box[a] = min(lo, hi - size[a])
            elif hi >= n - m and lo > m:
                box[a + 2] = max(hi, lo + size[a])
            cut.append(bool(box[a] <= m or box[a + 2] >= n - m))
        for a in (0, 1):  # along a cut on the other axis: a chord, grown about its middle
            if cut[1 - a] and not cut[a] and box[a + 2] - box[a] < size[a]:
                mid = 0.5 * float(box[a] + box[a + 2])
                box[a], box[a + 2] = mid - 0.5 * size[a], mid + 0.5 * size[a]
        return box

    def _clip(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes cut at the frame border, as the segmenter reports cells there."""
        if self.frame_size is None:
            return boxes
        w, h = self.frame_size
        out = boxes.copy()
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w)
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h)
        return out

    def _outside(self, box: np.ndarray) -> bool:
        """True when less than 30 % of the box lies inside the frame."""
        if self.frame_size is None:
            return False
        w, h = self.frame_size
        x1, y1, x2, y2 = (float(v) for v in box)
        area = max(x2 - x1, 1.0) * max(y2 - y1, 1.0)
        iw = max(0.0, min(x2, w) - max(x1, 0.0))
        ih = max(0.0, min(y2, h) - max(y1, 0.0))
        return iw * ih < 0.3 * area

    def _match(self, dets: Detections) -> list[tuple[int, int]]:
        """Greedy assignment on a gated cost (1 - IoU + normalised centre distance)."""
        o = self.options
        if not self.tracks or len(dets) == 0:
            return []
        boxes = self._clip(np.stack([t.box for t in self.tracks]).astype(np.float32))
        iou = box_iou(boxes, dets.xyxy)
        pc = (boxes[:, :2] + boxes[:, 2:]) / 2
        side = np.sqrt(np.clip(np.prod(boxes[:, 2:] - boxes[:, :2], axis=1), 1.0, None))
        dist = np.linalg.norm(pc[:, None, :] - dets.centers[None, :, :], axis=2) / side[:, None]
        cost = (1.0 - iou) + dist
        # prefer tracks seen recently and confirmed ones when costs tie
        penalty = np.array([0.05 * min(t.misses, 10) - (0.05 if t.confirmed else 0.0)
                            for t in self.tracks], np.float32)
        cost = cost + penalty[:, None]
        allowed = (iou >= o.min_iou) | (dist <= o.max_center_dist)
        ti, di = np.nonzero(allowed)
        order = np.argsort(cost[ti, di], kind="stable")
        used_t: set[int] = set()
        used_d: set[int] = set()
        out: list[tuple[int, int]] = []
        for k in order:
            a, b = int(ti[k]), int(di[k])
            if a in used_t or b in used_d:
                continue
            used_t.add(a)
            used_d.add(b)
            out.append((a, b))
        return out
