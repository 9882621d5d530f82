"""Tracker tests on a virtual slide: pans, skipped frames, a still stage, re-entry, ended ids."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from detector.core import Detections, Frame
from detector.track import Tracker, TrackerOptions
from tests.detector.fakes import Cell, Slide, pan, row_slide, truth_boxes, view


def run_tracker(slide: Slide, path: list[tuple[int, int]], step: int = 1,
                tracker: Tracker | None = None) -> dict[int, set[int]]:
    """truth id -> set of track ids given to it (frames taken every ``step``)."""
    tracker = tracker or Tracker()
    seen: dict[int, set[int]] = {}
    for i in range(0, len(path), step):
        x, y = path[i]
        boxes, edge, ids = truth_boxes(slide, x, y)
        dets = tracker.update(Detections(xyxy=boxes, touches_edge=edge),
                              Frame(view(slide, x, y), index=i), period=step)
        for cid, tid in zip(ids, dets.track_id, strict=True):
            seen.setdefault(cid, set()).add(int(tid))
    return seen


@pytest.mark.parametrize(
    ("name", "start", "step", "frames"),
    [
        ("pan right slow", (0, 150), (3, 0), 300),
        ("pan left slow", (900, 150), (-3, 0), 300),
        ("pan right fast", (0, 150), (35, 0), 30),
        ("pan left fast", (1150, 150), (-35, 0), 30),
        ("diagonal", (0, 100), (12, 4), 60),
    ],
)
def test_pans_give_one_track_per_cell(name, start, step, frames):
    slide = row_slide()
    seen = run_tracker(slide, pan(start, step, frames))
    assert len(seen) >= 3, name
    for cid, tids in seen.items():
        assert len(tids) == 1, f"{name}: cell {cid} got track ids {tids}"
    all_ids = [t for tids in seen.values() for t in tids]
    assert len(all_ids) == len(set(all_ids)), f"{name}: two cells share a track"


def test_skipped_frames_with_period_keep_ids():
    slide = row_slide()
    seen = run_tracker(slide, pan((0, 150), (6, 0), 240), step=3)
    assert all(len(t) == 1 for t in seen.values())


def test_fast_pan_without_shift_compensation_would_fail():
    """Sanity check of the test itself: the same fast pan breaks a tracker that ignores shift."""
    slide = row_slide()
    path = pan((0, 150), (35, 0), 30)
    tracker = Tracker()
    seen: dict[int, set[int]] = {}
    for x, y in path:
        boxes, edge, ids = truth_boxes(slide, x, y)
        dets = tracker.update(Detections(xyxy=boxes, touches_edge=edge), None)
        for cid, tid in zip(ids, dets.track_id, strict=True):
            seen.setdefault(cid, set()).add(int(tid))
    assert any(len(t) > 1 for t in seen.values())


def test_still_stage_close_neighbours_not_merged():
    cells = [Cell(1, "neutrophil", 300, 300), Cell(2, "lymphocyte", 346, 300)]
    slide = Slide(700, 600, cells)
    rng = np.random.default_rng(1)
    path = [(150 + int(rng.integers(-1, 2)), 180 + int(rng.integers(-1, 2))) for _ in range(60)]
    tracker = Tracker()
    seen: dict[int, set[int]] = {}
    for i, (x, y) in enumerate(path):
        boxes, edge, ids = truth_boxes(slide, x, y)
        if 20 <= i < 26:  # the segmenter misses cell 2 for a few frames
            boxes, edge, ids = boxes[:1], edge[:1], ids[:1]
        dets = tracker.update(Detections(xyxy=boxes, touches_edge=edge),
                              Frame(view(slide, x, y), index=i))
        for cid, tid in zip(ids, dets.track_id, strict=True):
            seen.setdefault(cid, set()).add(int(tid))
    assert seen == {1: {1}, 2: {2}}


def test_reentry_within_gap_keeps_id():
    cells = [Cell(1, "neutrophil", 360, 300)]
    slide = Slide(1200, 600, cells)
    # pan right so the cell leaves on the left, stay away ~12 frames, come back
    path = pan((150, 180), (10, 0), 30)  # x 150..440: cell (at 360) leaves the view around x=385
    path += [path[-1]] * 4
    path += pan((path[-1][0], 180), (-10, 0), 30)
    seen = run_tracker(slide, path)
    assert seen[1] == {1}


@pytest.mark.parametrize(("max_outside", "n_ids"), [(150, 1), (20, 2)])
def test_out_of_view_gap(max_outside, n_ids):
    """Carried out of view for ~50 frames: same id within ``max_lost_outside``, new one after."""
    cells = [Cell(1, "neutrophil", 360, 300)]
    slide = Slide(1200, 600, cells)
    path = pan((150, 180), (10, 0), 30) + [(440, 180)] * 40 + pan((440, 180), (-10, 0), 30)
    opts = TrackerOptions(max_lost=10, max_lost_outside=max_outside)
    seen = run_tracker(slide, path, tracker=Tracker(opts))
    assert len(seen[1]) == n_ids


def test_missed_in_view_beyond_gap_gets_new_id():
    cells = [Cell(1, "neutrophil", 360, 300)]
    slide = Slide(1200, 600, cells)
    tracker = Tracker(TrackerOptions(max_lost=10))
    ids = []
    for i in range(40):
        boxes, edge, _ = truth_boxes(slide, 200, 180)
        if 10 <= i < 25:  # not detected for 15 frames while in view
            boxes, edge = boxes[:0], edge[:0]
        d = tracker.update(Detections(xyxy=boxes, touches_edge=edge),
                           Frame(view(slide, 200, 180), index=i))
        ids += d.track_id.tolist()
    assert set(ids) == {1, 2}


def test_cells_overrule_a_static_pattern():
    """A still background (dust, an overlay) pins phase correlation at zero while every cell
    moves 30 px per frame: the shift is taken from the cells, and no cell gets a second id."""
    bg = Slide(700, 400, [], seed=2).image[:240, :320]
    starts = [(40.0, 60.0), (40.0, 170.0), (120.0, 110.0)]
    tracker = Tracker()
    seen: dict[int, set[int]] = {}
    for i in range(8):
        img = bg.copy()
        boxes = []
        for x, y in starts:
            cx = x + 30 * i
            cv2.circle(img, (int(cx), int(y)), 22, (200, 60, 60), -1)
            boxes.append([cx - 22, y - 22, cx + 22, y + 22])
        dets = tracker.update(Detections(xyxy=np.array(boxes, np.float32)), Frame(img, index=i))
        for k, tid in enumerate(dets.track_id):
            seen.setdefault(k, set()).add(int(tid))
        if i == 1:  # (later frames start from the last shift, which the cells then confirm)
            assert tracker.motion.source == "cells"
        if i >= 1:
            assert tracker.motion.shift[0] == pytest.approx(30, abs=1)
    assert seen == {0: {1}, 1: {2}, 2: {3}}


@pytest.mark.parametrize("name", ["BloodImage_00000", "BloodImage_00010", "BloodImage_00100"])
def test_real_smear_pan_shift_and_id(bccd_dir, name):
    """A camera window panning across a real smear photo: the measured shift matches the pan
    and the annotated white cell keeps one id."""
    import xml.etree.ElementTree as ET

    img = cv2.imread(str(bccd_dir / "JPEGImages" / f"{name}.jpg"))
    root = ET.parse(bccd_dir / "Annotations" / f"{name}.xml").getroot()
    wbc = next(o for o in root.iter("object") if o.findtext("name") == "WBC")
    bb = wbc.find("bndbox")
    box = np.array([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")], np.float32)
    big = img
    w, h = 400, 300
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = int(np.clip(cx - w / 2 - 40, 0, big.shape[1] - w - 81))
    y0 = int(np.clip(cy - h / 2 - 20, 0, big.shape[0] - h - 41))
    tracker = Tracker()
    ids = set()
    for i in range(9):
        x, y = x0 + 10 * i, y0 + 5 * i  # the stage moves the view right and down
        frame = big[y:y + h, x:x + w]
        b = box - np.array([x, y, x, y], np.float32)
        clipped = np.clip(b, [0, 0, 0, 0], [w, h, w, h]).astype(np.float32)
        edge = bool((clipped != b).any())
        dets = tracker.update(Detections(xyxy=clipped[None], touches_edge=np.array([edge])),
                              Frame(np.ascontiguousarray(frame), index=i))
        ids.add(int(dets.track_id[0]))
        if i:
            assert tracker.motion.source == "phase"
            assert tracker.motion.shift == pytest.approx((-10.0, -5.0), abs=1.0)
    assert ids == {1}


def test_ids_confirmation_and_ended_tracks():
    """A cell seen 4 frames then gone for good: tentative, confirmed at its 3rd sighting, lost
    (not ended) while in the gap, ended after ``max_lost`` unseen frames in view; its id is not
    reused. A one-frame blip ends as noise after ``tentative_max_misses``."""
    cells = [Cell(1, "neutrophil", 360, 300)]
    slide = Slide(1200, 600, cells)
    tracker = Tracker(TrackerOptions(max_lost=5, tentative_max_misses=2))
    img = view(slide, 200, 180)
    boxes, edge, _ = truth_boxes(slide, 200, 180)
    blip = np.array([[20, 20, 60, 60]], np.float32)
    confirmed, ended, lost = [], [], []
    for i in range(14):
        xyxy = boxes if i < 4 else np.empty((0, 4), np.float32)
        if i == 1:
            xyxy = np.concatenate([boxes, blip])
        d = tracker.update(Detections(xyxy=xyxy), Frame(img, index=i))
        assert d.track_id.tolist() == ([1, 2] if i == 1 else [1] if i < 4 else [])
        confirmed.append(d.data["confirmed"].tolist())
        ended.append(list(tracker.ended))
        lost.append(tracker.lost(after_in_view=2))
    assert confirmed[:4] == [[False], [False, False], [True], [True]]
    assert ended[4] == [2]  # the blip: unseen at frames 2, 3, 4 (> 2 misses)
    # last seen at frame 3: unseen in view at frames 4..9, 6 > max_lost 5 -> ends at frame 9
    assert [k for k, e in enumerate(ended) if e == [1]] == [9]
    assert lost[5] == [] and lost[6] == [1]  # unseen in view 3 > 2 frames from frame 6 on
    assert tracker.tracks == []
    d = tracker.update(Detections(xyxy=boxes), Frame(img, index=14))
    assert d.track_id.tolist() == [3]


def test_flush_ends_every_track():
    tracker = Tracker()
    d = tracker.update(Detections(xyxy=np.array([[10, 10, 40, 40], [100, 100, 140, 150]])))
    assert d.track_id.tolist() == [1, 2]
    assert tracker.flush() == [1, 2] == tracker.ended
    assert tracker.tracks == []
    d = tracker.update(Detections(xyxy=np.array([[10, 10, 40, 40]])))
    assert d.track_id.tolist() == [3]  # a flushed id is never given again before a reset
    tracker.reset()
    assert tracker.update(Detections(xyxy=np.array([[10, 10, 40, 40]]))).track_id.tolist() == [1]


def _visible_boxes(slide: Slide, x: int, y: int, w: int = 320, h: int = 240
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of the visible pixels of each cell, as a segmenter reports a cell the border cuts:
    a cell more than half out of view shows only a chord of itself."""
    boxes, edge = [], []
    for c in slide.cells:
        mask = np.zeros((h, w), np.uint8)
        cv2.circle(mask, (int(c.x - x), int(c.y - y)), int(c.r), 1, -1)
        ys, xs = np.nonzero(mask)
        if len(xs) < 16:
            continue
        b = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        boxes.append(b)
        edge.append(b[0] == 0 or b[1] == 0 or b[2] == w or b[3] == h)
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(edge, bool)


def test_a_cell_that_left_half_seen_is_looked_for_at_its_whole_size():
    """A large cell carried out through the top edge shows a narrowing chord of itself; its
    lost track keeps the cell's whole width (not the last chord's), so when the stage brings
    the cell back in from the side, the prediction still covers it and the id is kept."""
    cells = [Cell(1, "neutrophil", 500, 400, r=70)]
    slide = Slide(1400, 900, cells)
    tracker = Tracker()
    path = [(340, 300)] * 5 + pan((340, 300), (0, 10), 30)  # down: it leaves through the top
    path += pan(path[-1], (20, 0), 20)                          # right, the cell out of view
    path += pan(path[-1], (0, -10), 24)                         # up: level with the view again
    path += pan(path[-1], (-10, 0), 36)                         # left: it comes in from the left
    ids: set[int] = set()
    width_after_leaving = None
    for i, (x, y) in enumerate(path):
        boxes, edge = _visible_boxes(slide, x, y)
        d = tracker.update(Detections(xyxy=boxes, touches_edge=edge),
                           Frame(view(slide, x, y), index=i))
        ids |= set(d.track_id.tolist())
        if i == 40:
            (t,) = tracker.tracks
            width_after_leaving = float(t.box[2] - t.box[0])
    assert ids == {1}  # before: a second id for the same cell when it came back
    assert width_after_leaving == pytest.approx(140, abs=6)
