"""Tracks white cells across frames of a moving microscope stage, so each cell is counted once.

The stage moves as a whole: every cell in a frame shifts by about the same vector. The tracker
estimates that global shift once per frame (phase correlation on small grey copies of the frame,
checked against the cells themselves when its response is weak), moves every track by it, and
only then matches tracks to detections by IoU and centre distance. So a fast pan does not start
new tracks, and on a still stage two close neighbours are not merged (the prediction is where they
are, not somewhere between them).

Track life: tentative (new) -> confirmed (seen in ``confirm_hits`` of the last ``confirm_window``
updates) -> lost (unseen, kept and moved with the stage for up to ``max_lost`` frames in view, or
``max_lost_outside`` once the stage has carried it out of view; found again in that gap it keeps
its id) -> deleted. Moving lost tracks with the measured stage shift is dead reckoning: its drift
(about 1 px/s on the simulator) is what limits how long a track can wait for a return. A
tentative track unseen for more than ``tentative_max_misses`` frames is dropped as noise.

Voting (what the analyzer does with tracks): a track is *due* for the classifier when it is
confirmed, seen in this frame, fully in view (not cut by the border) and sharp; scores of
``votes_needed`` such sightings are averaged and the label is then decided and locked. A track
that leaves the view (or is deleted) before it has all its votes is decided from the votes it
has; a confirmed track that was fully in view but never sharp is counted ``unidentified``; a track
never fully in view is not judged at all (it was only ever seen cut by the border).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from detector.core import UNIDENTIFIED, Detections, Frame, box_iou

log = logging.getLogger(__name__)

#: Largest residual (half-size pixels) the fine phase-correlation step is trusted with.
_FINE_REACH = 6.0


@dataclass
class TrackerOptions:
    """Tracker settings (frames are source frames; sizes in full-resolution pixels)."""

    confirm_hits: int = 3
    """Sightings among the last ``confirm_window`` updates that confirm a track."""
    confirm_window: int = 5
    """Number of recent updates looked at for confirmation."""
    decide_after: int = 30
    """Frames a confirmed track may be unseen in view before it is decided from the votes it
    has (about 1 s): the count does not wait for the track's deletion."""
    max_lost: int = 300
    """Frames a confirmed track is kept while unseen where it should be visible (about 10 s):
    the segmenter may miss a cell for a while (blur, a neighbour); found again it keeps its id."""
    max_lost_outside: int = 1800
    """Frames a confirmed track is kept once the stage has moved it out of view (about 60 s),
    moved with the stage (dead reckoning): it cannot be confused with a visible cell, and a
    return to a place already seen finds it again, so the cell is not counted twice."""
    tentative_max_misses: int = 2
    """Frames a tentative track may be unseen before it is dropped as noise."""
    min_iou: float = 0.1
    """A detection overlapping a predicted box at least this much may match it..."""
    max_center_dist: float = 0.6
    """...or one whose centre is within this fraction of the track's box size of the prediction."""
    edge_margin: float = 1.0
    """A box closer than this to the frame border is not fully in view."""
    shift_size: tuple[int, int] = (160, 120)
    """Size of the phase-correlation window (width, height); the grey copy is twice this."""
    min_response: float = 0.08
    """Phase correlation response below which the shift is taken from the cells instead."""
    votes_needed: int = 3
    """Sharp, fully visible sightings averaged before a label is decided and locked."""
    max_sightings: int = 8
    """How many recent sightings (frame index, sharpness) a track remembers."""


@dataclass(eq=False)
class Track:
    """One physical cell followed over frames."""

    id: int
    box: np.ndarray
    first_frame: int
    last_frame: int
    misses: int = 0
    confirmed: bool = False
    seen_now: bool = True
    full_now: bool = False
    ever_full: bool = False
    det_index: int = -1
    recent: deque[bool] = field(default_factory=lambda: deque(maxlen=5))
    sightings: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=8))
    votes: list[np.ndarray] = field(default_factory=list)
    label: str | None = None
    class_id: int = -1
    score: float = 0.0
    counted: bool = False
    deleted: bool = False
    out_of_view: bool = False
    misses_in_view: int = 0
    size: np.ndarray | None = None
    last_box: np.ndarray | None = None
    thumb: np.ndarray | None = None

    def add_vote(self, probs: np.ndarray) -> None:
        """Add one sighting's class probabilities (ignored once the label is locked)."""
        if self.label is None:
            self.votes.append(np.asarray(probs, dtype=np.float32).reshape(-1))

    def decide(self, label_of: Callable[[np.ndarray], tuple[str, float]],
               labels: Sequence[str]) -> bool:
        """Lock the label from the mean of the votes (True when decided now)."""
        if self.label is not None:
            return False
        if self.votes:
            mean = np.mean(np.stack(self.votes), axis=0)
            label, score = label_of(mean)
            self.label, self.score = str(label), float(score)
            self.class_id = list(labels).index(self.label) if self.label in labels else -1
            return True
        return False


def same_scene(a_bgr: np.ndarray, b_bgr: np.ndarray, min_response: float = 0.5) -> bool:
    """True when two images look like consecutive frames of one field (a video, or a folder of
    frames), False for unrelated photos: the phase correlation response of consecutive
    simulator frames was >= 0.64 (blurred moments included), of unrelated BCCD photos 0.12 in
    the median."""
    t = Tracker()
    t.frame_size = (a_bgr.shape[1], a_bgr.shape[0])
    t._phase_shift(t.small_grey_of(a_bgr))
    out = t._phase_shift(t.small_grey_of(cv2.resize(b_bgr, t.frame_size)))
    return out is not None and out[2] >= min_response


def finalize_track(track: Track, label_of: Callable[[np.ndarray], tuple[str, float]],
                   labels: Sequence[str]) -> None:
    """Decide a track that is leaving for good (deleted, or the stream ended).

    With votes: decided from them. Confirmed and once fully in view but never sharp:
    ``unidentified``. Never confirmed or never fully in view: left undecided (not counted).
    """
    if track.label is not None or not track.confirmed:
        return
    if track.votes:
        track.decide(label_of, labels)
    elif track.ever_full:
        track.label, track.score, track.class_id = UNIDENTIFIED, 0.0, -1


class Tracker:
    """Shift-compensated IoU tracker; ``update`` once per processed frame."""

    def __init__(self, options: TrackerOptions | None = None) -> None:
        self.options = options or TrackerOptions()
        self.tracks: list[Track] = []
        self.removed: list[Track] = []
        self.small_grey: np.ndarray | None = None
        """Central ``shift_size`` patch of this frame at half size, grey float32 (for a cheap
        frame focus measure)."""
        self.shift: tuple[float, float] = (0.0, 0.0)
        self.shift_source: str = "none"
        self.response: float = 0.0
        self.frame_index: int = -1
        self.frame_size: tuple[int, int] | None = None
        self._next_id = 1
        self._prev_half: np.ndarray | None = None
        self._window: np.ndarray | None = None
        self._window_fine: np.ndarray | None = None

    def reset(self) -> None:
        """Forget all tracks and the previous frame; ids start again at 1."""
        self.__init__(self.options)  # type: ignore[misc]

    # ----------------------------------------------------------------- global shift
    def small_grey_of(self, bgr: np.ndarray) -> np.ndarray:
        """Half-size one-channel copy of a frame (2x ``shift_size``) for phase correlation.

        The green channel, area-averaged: stained cells absorb green most, so it carries most of
        the contrast, and it costs less than a grey conversion (area averaging, not subsampling:
        aliasing made the dead reckoning drift 3x more on the simulator)."""
        w, h = self.options.shift_size
        green = cv2.extractChannel(bgr, 1) if bgr.ndim == 3 else bgr
        return cv2.resize(green, (2 * w, 2 * h), interpolation=cv2.INTER_AREA)

    def _phase_shift(self, half: np.ndarray) -> tuple[float, float, float] | None:
        """Global shift from the previous frame, in full-resolution pixels -> (dx, dy, response).

        Fine step: phase correlation of the central ``shift_size`` patch of the half-size copies,
        the current patch displaced by a prediction of the shift (rounded). The prediction is
        the previous frame's shift (a stage moves smoothly); when the fine step cannot confirm
        it (weak response, or a residual beyond ``_FINE_REACH``), a coarse step - the whole
        frame at half ``shift_size``, 80x60: reaches +-320 px per frame at 640x480 - predicts
        instead, and the fine step runs again. The coarse step alone is not enough: sub-pixel
        estimates at such small scales are biased (a 160x120 whole-frame correlation under-reads
        slow pans by up to 30 %, which adds up for tracks moved by dead reckoning); skipping the
        fine step on a still stage tripled the drift on the simulator (slow creeps read as still).
        """
        w, h = self.options.shift_size
        cur_half = half.astype(np.float32)
        if cur_half.shape != (2 * h, 2 * w):
            cur_half = cv2.resize(cur_half, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR)
        y0, x0 = h // 2, w // 2
        self.small_grey = np.ascontiguousarray(cur_half[y0:y0 + h, x0:x0 + w])
        prev_half, self._prev_half = self._prev_half, cur_half
        if prev_half is None:
            return None
        if self._window is None:
            self._window = cv2.createHanningWindow((w // 2, h // 2), cv2.CV_32F)
            self._window_fine = cv2.createHanningWindow((w, h), cv2.CV_32F)
        fw, fh = self.frame_size or (2 * w, 2 * h)
        kx, ky = fw / (2 * w), fh / (2 * h)  # full-size pixels per half-size pixel
        min_r = self.options.min_response

        def fine(px: float, py: float) -> tuple[float, float, float] | None:
            cx, cy = int(round(px)), int(round(py))
            if abs(cx) > x0 or abs(cy) > y0:
                return None
            # contiguous copies: cv2.phaseCorrelate writes into non-contiguous inputs (it
            # windowed the frames in place, corrupting them for the next frame)
            p = np.ascontiguousarray(prev_half[y0:y0 + h, x0:x0 + w])
            c = np.ascontiguousarray(cur_half[y0 + cy:y0 + cy + h, x0 + cx:x0 + cx + w])
            (fx, fy), r = cv2.phaseCorrelate(p, c, self._window_fine)
            if r < min_r or abs(fx) >= _FINE_REACH or abs(fy) >= _FINE_REACH:
                return None
            return cx + fx, cy + fy, float(r)

        guess = fine(self.shift[0] / kx, self.shift[1] / ky)
        if guess is not None and guess[2] >= 2 * min_r:
            return guess[0] * kx, guess[1] * ky, guess[2]
        small = (w // 2, h // 2)
        prev = cv2.resize(prev_half, small, interpolation=cv2.INTER_AREA)
        cur = cv2.resize(cur_half, small, interpolation=cv2.INTER_AREA)
        (dx, dy), response = cv2.phaseCorrelate(prev, cur, self._window)
        sx, sy = 4.0 * dx, 4.0 * dy  # in half-size pixels
        if response >= min_r:
            refined = fine(sx, sy)
            if refined is not None:
                sx, sy, response = refined[0], refined[1], max(response, refined[2])
        return sx * kx, sy * ky, float(response)

    @staticmethod
    def _consensus(pred: np.ndarray, centers: np.ndarray, radius: np.ndarray,
                   max_shift: float) -> tuple[np.ndarray, int]:
        """Displacement most detection/track pairs agree on -> (median shift, inliers)."""
        if len(pred) == 0 or len(centers) == 0:
            return np.zeros(2, np.float32), 0
        d = (centers[None, :, :] - pred[:, None, :]).reshape(-1, 2)
        d = d[np.abs(d).max(axis=1) <= max_shift]
        if len(d) == 0:
            return np.zeros(2, np.float32), 0
        r = float(np.median(radius))
        close = np.linalg.norm(d[:, None, :] - d[None, :, :], axis=2) <= r
        support = close.sum(axis=1)
        best = int(np.argmax(support))
        inl = d[close[best]]
        return np.median(inl, axis=0).astype(np.float32), int(support[best])

    def _estimate_shift(self, grey: np.ndarray | None, dets: Detections,
                        period: int) -> np.ndarray:
        o = self.options
        phase = self._phase_shift(grey) if grey is not None else None
        active = [t for t in self.tracks if t.misses <= period]
        centers = dets.centers
        if active and len(centers):
            pred = np.array([(t.box[:2] + t.box[2:]) / 2 for t in active], np.float32)
            sides = np.sqrt(np.clip([np.prod(t.box[2:] - t.box[:2]) for t in active], 1, None))
            radius = 0.35 * sides.astype(np.float32)
        else:
            pred = np.empty((0, 2), np.float32)
            radius = np.array([10.0], np.float32)
        strong = phase is not None and phase[2] >= o.min_response
        self.response = phase[2] if phase is not None else 0.0
        if strong:
            shift = np.array(phase[:2], np.float32)
            # do the cells agree? (a static pattern - dust on the sensor, an overlay - or a
            # pan faster than the correlation window can lock the phase onto a wrong shift)
            if len(pred) < 2 or len(centers) < 2:
                self.shift_source = "phase"
                return shift
            d = np.linalg.norm(centers[None] - (pred + shift)[:, None], axis=2)
            explained = int((d.min(axis=1) <= radius).sum())
            if explained * 2 >= min(len(pred), len(centers)):
                self.shift_source = "phase"
                return shift
        # weak response (blur, empty field) or cells disagreeing: the displacement most agree on
        fw, fh = self.frame_size or (640, 480)
        cell_shift, support = self._consensus(pred, centers, radius, 0.5 * max(fw, fh))
        if strong:
            if support >= 2 and support > explained:
                self.shift_source = "cells"
                return cell_shift
            self.shift_source = "phase"
            return np.array(phase[:2], np.float32)
        if support >= 2 or (support == 1 and len(active) == 1 and len(centers) == 1):
            self.shift_source = "cells"
            return cell_shift
        self.shift_source = "previous"
        return np.array(self.shift, np.float32)

    # ----------------------------------------------------------------- update
    def update(self, detections: Detections, frame: Frame | np.ndarray | None = None,
               period: int = 1) -> Detections:
        """Match ``detections`` to tracks -> the same object, its ``track_id`` filled in.

        ``frame`` (a Frame, a BGR image or an already small grey image) drives the global shift
        estimate; ``period`` is how many source frames passed since the previous update (norfair
        style: 2 when one frame was skipped). Tracks deleted by this update are in ``removed``.
        """
        o = self.options
        period = max(1, int(period))
        bgr = frame.bgr if isinstance(frame, Frame) else frame
        if isinstance(frame, Frame):
            self.frame_index = frame.index
        else:
            self.frame_index += period
        grey = None
        if bgr is not None:
            if bgr.ndim == 3:
                self.frame_size = (bgr.shape[1], bgr.shape[0])
                grey = self.small_grey_of(bgr)
            else:
                grey = bgr
                if self.frame_size is None:
                    self.frame_size = (bgr.shape[1], bgr.shape[0])
        self.removed = []

        self.small_grey = None
        shift = self._estimate_shift(grey, detections, period)
        self.shift = (float(shift[0]), float(shift[1]))
        for t in self.tracks:
            t.box = t.box + np.array([shift[0], shift[1], shift[0], shift[1]], np.float32)

        matches = self._match(detections)
        n = len(detections)
        track_id = np.full(n, -1, np.int64)
        full = self.fully_in_view(detections)
        matched_tracks: set[int] = set()
        for ti, di in matches:
            t = self.tracks[ti]
            matched_tracks.add(ti)
            t.full_now = bool(full[di])
            t.box = self._unclipped(detections.xyxy[di], t, bool(t.full_now))
            t.last_box = detections.xyxy[di].copy()
            t.misses = t.misses_in_view = 0
            t.last_frame = self.frame_index
            t.seen_now, t.det_index = True, di
            t.ever_full |= t.full_now
            t.recent.append(True)
            track_id[di] = t.id
        for ti, t in enumerate(self.tracks):
            if ti not in matched_tracks:
                t.misses += period
                t.seen_now, t.det_index, t.full_now = False, -1, False
                t.recent.append(False)
            if not t.confirmed and sum(t.recent) >= o.confirm_hits:
                t.confirmed = True
        keep: list[Track] = []
        for t in self.tracks:
            t.out_of_view = t.misses > 0 and self._outside(t.box)
            if t.misses > 0 and not t.out_of_view:
                t.misses_in_view += period
            if not t.confirmed:
                gone = t.misses > o.tentative_max_misses
            else:
                gone = t.misses_in_view > o.max_lost or t.misses > o.max_lost_outside
            if gone:
                t.deleted = True
                self.removed.append(t)
            else:
                keep.append(t)
        self.tracks = keep
        for di in np.flatnonzero(track_id < 0):
            t = Track(id=self._next_id, box=detections.xyxy[di].copy(),
                      first_frame=self.frame_index, last_frame=self.frame_index,
                      det_index=int(di), recent=deque([True], maxlen=o.confirm_window),
                      sightings=deque(maxlen=o.max_sightings))
            t.full_now = t.ever_full = bool(full[di])
            t.last_box = t.box.copy()
            if t.full_now:
                t.size = t.box[2:] - t.box[:2]
            t.confirmed = o.confirm_hits <= 1
            self._next_id += 1
            self.tracks.append(t)
            track_id[di] = t.id
        detections.track_id = track_id
        return detections

    def _unclipped(self, box: np.ndarray, t: Track, full: bool) -> np.ndarray:
        """The track's box from a detection: a box cut by the border is grown back to the size
        the cell had when last fully in view, so predictions keep the whole cell."""
        box = box.astype(np.float32).copy()
        if full or self.frame_size is None:
            if full:
                t.size = box[2:] - box[:2]
            return box
        if t.size is None:
            return box
        w, h = self.frame_size
        m = self.options.edge_margin
        bw, bh = float(t.size[0]), float(t.size[1])
        if box[0] <= m and box[2] < w - m:
            box[0] = min(box[0], box[2] - bw)
        elif box[2] >= w - m and box[0] > m:
            box[2] = max(box[2], box[0] + bw)
        if box[1] <= m and box[3] < h - m:
            box[1] = min(box[1], box[3] - bh)
        elif box[3] >= h - m and box[1] > m:
            box[3] = max(box[3], box[1] + bh)
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

    def leaving(self) -> list[Track]:
        """Confirmed, undecided tracks with at least one vote that the stage moved out of view,
        or unseen in view for ``decide_after`` frames: decide them now from what they have
        (they keep their id and locked label if they come back). A track without any vote waits
        for its deletion (or the end of the stream): a return may still show it sharp."""
        o = self.options
        return [t for t in self.tracks if t.confirmed and t.label is None and t.votes
                and (t.out_of_view or t.misses_in_view > o.decide_after)]

    def fully_in_view(self, dets: Detections) -> np.ndarray:
        """Which detections are not cut by the border (``touches_edge`` and a margin)."""
        full = ~dets.touches_edge
        if self.frame_size is not None and len(dets):
            w, h = self.frame_size
            m = self.options.edge_margin
            b = dets.xyxy
            full &= (b[:, 0] >= m) & (b[:, 1] >= m) & (b[:, 2] <= w - m) & (b[:, 3] <= h - m)
        return full

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

    # ----------------------------------------------------------------- voting helpers
    def due_for_vote(self) -> list[Track]:
        """Tracks the classifier should look at in this frame (before any focus check)."""
        n = self.options.votes_needed
        return [t for t in self.tracks
                if t.seen_now and t.confirmed and t.full_now and t.label is None
                and len(t.votes) < n]

    def flush(self) -> list[Track]:
        """End of stream: delete every track (they are returned, and also put in ``removed``)."""
        for t in self.tracks:
            t.deleted = True
        self.removed = self.tracks
        self.tracks = []
        return self.removed
