"""Voting: who is due, sharp sightings, votes averaged then locked, decisions on leaving."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from detector.analyzer import Analyzer
from detector.core import UNIDENTIFIED, CountEvent, Detections, Frame
from detector.vote import VoteOptions, Voter
from tests.detector.fakes import (
    LABELS,
    Cell,
    FakeClassifier,
    FakeSegmenter,
    Slide,
    pan,
    row_slide,
    view,
)


def label_of(row: np.ndarray) -> tuple[str, float]:
    k = int(np.argmax(row))
    return (LABELS[k], float(row[k])) if row[k] >= 0.5 else (UNIDENTIFIED, float(row[k]))


def dets(ids: list[int], confirmed: list[bool]) -> Detections:
    boxes = [[10 + 50 * i, 10, 50 + 50 * i, 50] for i in range(len(ids))]
    d = Detections(xyxy=np.array(boxes, np.float32).reshape(-1, 4), track_id=np.array(ids))
    d.data["confirmed"] = np.array(confirmed, bool)
    return d


def test_due_only_confirmed_whole_undecided_in_track_order():
    v = Voter(LABELS, label_of, VoteOptions(votes_needed=2))
    d = dets([7, 3, 5, 9], [True, True, False, True])
    whole = np.array([True, True, True, False])
    v.observe(d, whole, frame_index=0)
    assert v.due(d, whole) == [1, 0]  # track 3 then 7; 5 is tentative, 9 cut by the border
    row = np.array([0.1, 0.8, 0.1], np.float32)
    assert v.vote([3], row[None]) == []
    events = v.vote([3], row[None])
    assert events == [CountEvent(3, "eosinophil", pytest.approx(0.8), 0, 0, (60.0, 10.0, 100.0,
                                                                            50.0))]
    assert v.due(d, whole) == [0]  # locked: no more crops for track 3
    assert v.vote([3], np.array([[1.0, 0.0, 0.0]])) == []  # a locked label does not change
    assert v.ballots[3].label == "eosinophil"


def test_votes_are_averaged():
    v = Voter(LABELS, label_of, VoteOptions(votes_needed=3))
    d = dets([1], [True])
    v.observe(d, np.array([True]), 0)
    rows = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.2, 0.7, 0.1]], np.float32)
    for r in rows[:2]:
        assert v.vote([1], r[None]) == []
    (e,) = v.vote([1], rows[2:])
    assert e.label == "eosinophil" and e.score == pytest.approx(0.5)


def test_sightings_relative_to_the_cells_sharpest():
    v = Voter(LABELS, label_of, VoteOptions(cell_ratio=0.6, max_sightings=3))
    v.observe(dets([1], [True]), np.array([True]), 0)
    assert v.sighting(1, 10.0) == (True, True)
    assert v.sighting(1, 5.0) == (False, False)  # 5 < 0.6 * 10
    assert v.sighting(1, 6.0) == (True, False)
    assert v.sighting(1, 4.0) == (False, False)  # 4 < 0.6 * 10
    assert list(v.ballots[1].sightings) == [5.0, 6.0, 4.0]  # 3 kept: 10 gone
    assert v.sighting(1, 4.0) == (True, False)  # best now 6: 4 >= 3.6


def test_close_and_leaving():
    """Ending: votes -> decided; whole but never sharp -> unidentified; tentative or never whole
    -> not judged. Leaving the view: only cells with a vote are decided, the others wait."""
    v = Voter(LABELS, label_of)
    d = dets([1, 2, 3, 4], [True, True, False, True])
    v.observe(d, np.array([True, True, True, False]), frame_index=4)
    v.vote([1], np.array([[0.1, 0.1, 0.8]], np.float32))
    assert v.leaving([1, 2, 3, 4]) == [CountEvent(1, "lymphocyte", pytest.approx(0.8), 4, 4,
                                                  (10.0, 10.0, 50.0, 50.0))]
    assert v.leaving([2]) == []
    events = v.close([1, 2, 3, 4])
    assert [(e.track_id, e.label, e.score) for e in events] == [(2, UNIDENTIFIED, 0.0)]
    v.forget([1, 2, 3, 4])
    assert v.ballots == {} and v.thumb(1) is None


def test_annotate_copies_locked_labels():
    v = Voter(LABELS, label_of, VoteOptions(votes_needed=1))
    d = dets([1, 2], [True, True])
    whole = np.array([True, False])
    v.observe(d, whole, 0)
    v.vote([1], np.array([[0.1, 0.9, 0.0]], np.float32))
    v.annotate(d)
    assert d.data["label"].tolist() == ["eosinophil", ""]
    assert d.class_id.tolist() == [1, -1] and d.score[0] == pytest.approx(0.9)


def test_ballot_keeps_first_and_last_sighting():
    v = Voter(LABELS, label_of)
    for i in range(3):
        d = dets([5], [i >= 2])
        d.xyxy[0] += i
        v.observe(d, np.array([True]), 10 + i)
    b = v.ballots[5]
    assert (b.first_frame, b.last_frame, b.confirmed) == (10, 12, True)
    assert b.last_box.tolist() == [12.0, 12.0, 52.0, 52.0]
    assert isinstance(b.sightings, deque)


# -- through the analyzer, on a virtual slide ---------------------------------------------------

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
    assert an.voter.ballots[1].label == "eosinophil"
    assert [(e.track_id, e.label) for e in an.tally.events] == [(1, "eosinophil")]
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
    ids = [e.track_id for e in events]
    assert len(ids) == len(set(ids)) == 10
    truth = {lab: sum(c.label == lab for c in slide.cells) for lab in LABELS}
    assert {k: an.tally.counts[k] for k in LABELS} == truth
    # the classifier saw far fewer crops than (cells x frames)
    assert clf.crops <= 3 * 10


