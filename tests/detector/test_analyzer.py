"""Analyzer: fake segmenter + fake classifier over a virtual slide, known counts."""

from __future__ import annotations

import numpy as np
import pytest

from detector.analyzer import STAGES, Analyzer, FrameResult
from detector.core import Frame
from tests.detector.fakes import LABELS, Cell, FakeClassifier, FakeSegmenter, Slide, pan, view


def slide_and_path() -> tuple[Slide, list[tuple[int, int]]]:
    cells = [Cell(1, "neutrophil", 300, 300), Cell(2, "neutrophil", 420, 330),
             Cell(3, "eosinophil", 560, 280), Cell(4, "lymphocyte", 700, 320),
             Cell(5, "lymphocyte", 860, 300)]
    slide = Slide(1300, 600, cells, seed=3)
    return slide, pan((100, 170), (6, 0), 140)


def run(an: Analyzer, slide: Slide, path: list[tuple[int, int]]) -> list[FrameResult]:
    return [an.process(Frame(view(slide, x, y), index=i)) for i, (x, y) in enumerate(path)]


def test_counts_and_result_fields():
    slide, path = slide_and_path()
    clf = FakeClassifier()
    an = Analyzer(FakeSegmenter(slide, path), clf, target=5)
    results = run(an, slide, path)
    last = results[-1]
    assert set(last.timings) == set(STAGES)
    for r in results:
        for e in r.counted:
            thumb = r.thumbs[e.track_id]
            assert thumb.shape == (96, 96, 3) and thumb.dtype == np.uint8
    events = [e for r in results for e in r.counted] + an.finish()
    assert sorted(e.label for e in events) == sorted(c.label for c in slide.cells)
    s = an.tally.summary()
    assert s.counts == {"neutrophil": 2, "eosinophil": 1, "lymphocyte": 2, "unidentified": 0}
    assert s.total == 5 and s.target_reached and last.summary == s
    assert s.differential["neutrophil"] == 40.0
    # each cell is counted where it was last seen, between the frames it was seen in: the
    # camera pans 6 px per frame from x=100, so a cell at slide x is at x - 100 - 6 * frame
    by_id = {e.track_id: e for e in events}
    assert sorted(by_id) == [1, 2, 3, 4, 5]
    for e in events:
        assert e.first_frame <= e.last_frame < len(path)
        cell = min(slide.cells, key=lambda c: abs(c.x - 100 - 6 * e.last_frame
                                                  - (e.box[0] + e.box[2]) / 2))
        assert cell.label == e.label
        assert (e.box[0] + e.box[2]) / 2 == pytest.approx(cell.x - 100 - 6 * e.last_frame)
    # decided labels appear on the frame's detections
    labelled = [r for r in results if any(r.detections.data["label"])]
    assert labelled
    r = labelled[-1]
    for i in range(len(r.detections)):
        name = r.detections.data["label"][i]
        if name:
            assert LABELS[r.detections.class_id[i]] == name


def test_classifier_sees_few_crops_naive_sees_all():
    slide, path = slide_and_path()
    smart, naive = FakeClassifier(), FakeClassifier()
    run(Analyzer(FakeSegmenter(slide, path), smart), slide, path)
    an = Analyzer(FakeSegmenter(slide, path), naive, naive=True)
    results = run(an, slide, path)
    assert naive.crops == sum(len(r.detections) for r in results)
    assert smart.crops <= 3 * len(slide.cells) < naive.crops
    an.finish()
    assert an.tally.total == len(slide.cells)  # the naive design counts the same cells


def test_unsharp_only_cell_counted_unidentified():
    """A cell seen fully in view only in blurred frames is counted, as unidentified."""
    cells = [Cell(1, "neutrophil", 500, 300)]
    slide = Slide(1000, 600, cells)
    path = [(20 + i, 180) for i in range(12)] + [(250, 180)] * 8
    an = Analyzer(FakeSegmenter(slide, path), FakeClassifier())
    for i, (x, y) in enumerate(path):
        an.process(Frame(view(slide, x, y, blur=i >= 12), index=i))
    events = an.finish()
    assert [(e.label, e.score) for e in events] == [("unidentified", 0.0)]


def test_reset_and_render():
    slide, path = slide_and_path()
    seg = FakeSegmenter(slide, path)
    an = Analyzer(seg, FakeClassifier())
    results = run(an, slide, path[:60])
    img = an.render(results[-1], fps=30.0)
    assert img.shape == results[-1].frame.bgr.shape and img.dtype == np.uint8
    assert not np.array_equal(img, results[-1].frame.bgr)  # something was drawn
    an.reset()
    assert an.tally.total == 0 and an.tracker.tracks == [] and an.voter.ballots == {}
    r = an.process(Frame(view(slide, *path[0]), index=0))
    assert r.summary.total == 0
    assert sorted(r.detections.track_id.tolist()) == list(range(1, len(r.detections) + 1))
    # the segmenter is told which frames follow the previous one (a new slide does not)
    assert seg.in_sequence == [False] + [True] * 59 + [False]


def test_set_target_and_min_score():
    slide, path = slide_and_path()
    clf = FakeClassifier()
    an = Analyzer(FakeSegmenter(slide, path), clf)
    an.set_target(200)
    assert an.tally.summary().target == 200
    an.set_min_score(0.95)  # the fake's 0.9 top score is now too low
    run(an, slide, path)
    an.finish()
    assert an.tally.counts["unidentified"] == len(slide.cells)


def test_plain_array_input():
    slide, path = slide_and_path()
    seg = FakeSegmenter(slide, path)
    an = Analyzer(seg, FakeClassifier())
    r = an.process(view(slide, *path[0]))
    assert r.frame.index == 0 and len(r.detections) == len(seg.last_ids)


class RenamingClassifier(FakeClassifier):
    """The fake's answers under other names: eosinophil discs are erythroblasts, lymphocyte
    discs platelets."""

    labels = ("neutrophil", "erythroblast", "platelet")

    def label_of(self, scores_row: np.ndarray) -> tuple[str, float]:
        name, score = super().label_of(scores_row)
        return self.labels[LABELS.index(name)] if name in LABELS else name, score


def test_erythroblasts_reported_apart_and_platelets_never_counted():
    slide, path = slide_and_path()  # 2 neutrophils, 1 "eosinophil" disc, 2 "lymphocyte" discs
    an = Analyzer(FakeSegmenter(slide, path), RenamingClassifier(), target=5)
    results = run(an, slide, path)
    events = [e for r in results for e in r.counted] + an.finish()
    assert sorted(e.label for e in events) == ["erythroblast", "neutrophil", "neutrophil"]
    s = an.tally.summary()
    assert s.counts == {"neutrophil": 2, "unidentified": 0} and s.total == 2
    assert (s.nrbc, s.nrbc_per_100_wbc, s.vetoed) == (1, 50.0, 2)
    assert not s.target_reached
    shown = {str(x) for r in results for x in r.detections.data["label"]}
    assert {"platelet", "erythroblast", "neutrophil"} <= shown  # named on screen all the same
