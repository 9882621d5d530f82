"""Tracker tests on a virtual slide: pans, a still stage, re-entry, border cells, focus, votes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from detector.analyzer import Analyzer
from detector.core import Detections, Frame
from detector.track import Tracker, TrackerOptions
from tests.detector.fakes import (
    LABELS,
    Cell,
    FakeClassifier,
    FakeSegmenter,
    Slide,
    pan,
    truth_boxes,
    view,
)


def row_slide(n: int = 8, spacing: int = 110, y: float = 300.0, seed: int = 0) -> Slide:
    cells = [Cell(i + 1, LABELS[i % 3], 260 + i * spacing, y + (i % 2) * 40) for i in range(n)]
    return Slide(width=260 + n * spacing + 400, height=600, cells=cells, seed=seed)


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


def test_border_cell_tracked_but_not_judged_until_fully_in_view():
    cells = [Cell(1, "eosinophil", 330, 300)]
    slide = Slide(1000, 600, cells)
    # the cell sits cut by the right border for 10 frames, then the stage brings it in
    path = [(20, 180)] * 10 + pan((20, 180), (8, 0), 20)
    seg, clf = FakeSegmenter(slide, path), FakeClassifier()
    an = Analyzer(seg, clf)
    first_judged = None
    for i, (x, y) in enumerate(path):
        r = an.process(Frame(view(slide, x, y), index=i))
        if i < 10:
            assert len(r.detections) == 1 and r.detections.touches_edge[0]
            assert r.detections.track_id[0] == 1
            assert r.classified == 0
        elif r.classified and first_judged is None:
            first_judged = i
    assert first_judged is not None and first_judged >= 10
    tr = an.tracker.tracks[0]
    assert tr.label == "eosinophil" and tr.counted
    assert an.tally.counts["eosinophil"] == 1


def test_blurred_frames_skipped_in_vote():
    cells = [Cell(1, "lymphocyte", 500, 300)]
    slide = Slide(1000, 600, cells)
    path = [(20 + i, 180) for i in range(10)] + [(200 + i, 180) for i in range(20)]
    blurred = {i for i in range(10, 30) if i % 2 == 1}
    seg, clf = FakeSegmenter(slide, path), FakeClassifier()
    an = Analyzer(seg, clf)
    classified_on = []
    for i, (x, y) in enumerate(path):
        r = an.process(Frame(view(slide, x, y, blur=i in blurred), index=i))
        if r.classified:
            classified_on.append(i)
    assert classified_on, "the cell was never classified"
    assert not set(classified_on) & blurred
    assert an.tally.counts["lymphocyte"] == 1


class FlipClassifier(FakeClassifier):
    """Says neutrophil for the first three crops, eosinophil afterwards."""

    def classify_boxes(self, frame_bgr, xyxy):
        out = np.full((len(xyxy), 3), 0.05, np.float32)
        for i in range(len(xyxy)):
            out[i, 0 if self.crops + i < 3 else 1] = 0.9
        self.invokes += 1
        self.crops += len(xyxy)
        return out


def test_vote_locks_label():
    cells = [Cell(1, "neutrophil", 500, 300)]
    slide = Slide(1000, 600, cells)
    path = pan((250, 180), (2, 0), 40)
    clf = FlipClassifier()
    an = Analyzer(FakeSegmenter(slide, path), clf)
    labels = []
    for i, (x, y) in enumerate(path):
        r = an.process(Frame(view(slide, x, y), index=i))
        labels.append(r.detections.data["label"][0])
    decided = [lab for lab in labels if lab]
    assert decided and set(decided) == {"neutrophil"}
    assert clf.crops == 3  # no crop classified after the label was locked
    assert an.tally.total == 1


def test_each_cell_counted_exactly_once_with_one_invoke_per_frame():
    slide = row_slide(n=10, spacing=100)
    path = pan((0, 150), (5, 0), 260) + pan((1300, 150), (-5, 0), 60)
    seg, clf = FakeSegmenter(slide, path), FakeClassifier()
    an = Analyzer(seg, clf)
    events = []
    invokes_before = 0
    for i, (x, y) in enumerate(path):
        r = an.process(Frame(view(slide, x, y), index=i))
        events += r.counted
        assert clf.invokes - invokes_before <= 1
        invokes_before = clf.invokes
    events += an.finish()
    ids = [e["track_id"] for e in events]
    assert len(ids) == len(set(ids)) == 10
    truth = {lab: sum(c.label == lab for c in slide.cells) for lab in LABELS}
    assert {k: an.tally.counts[k] for k in LABELS} == truth
    # the classifier saw far fewer crops than (cells x frames)
    assert clf.crops <= 3 * 10


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
            assert tracker.shift_source == "cells"
        if i >= 1:
            assert tracker.shift[0] == pytest.approx(30, abs=1)
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
            assert tracker.shift_source == "phase"
            assert tracker.shift == pytest.approx((-10.0, -5.0), abs=1.0)
    assert ids == {1}


def test_same_scene_on_real_photos(bccd_dir):
    """Consecutive views of one field are one scene; two different smear photos are not."""
    from detector.track import same_scene

    a = cv2.imread(str(bccd_dir / "JPEGImages" / "BloodImage_00001.jpg"))
    b = cv2.imread(str(bccd_dir / "JPEGImages" / "BloodImage_00020.jpg"))
    assert same_scene(a[0:400, 0:560], a[12:412, 20:580])
    assert not same_scene(a, b)
