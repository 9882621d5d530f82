"""detector.still: every cell of a photo named, listed top-left first, cut ones flagged."""

from __future__ import annotations

import numpy as np

from detector.core import UNIDENTIFIED, Detections
from detector.draw import colour_of
from detector.still import analyse_still, cut_by_edge, draw_still

LABELS = ("neutrophil", "lymphocyte")


class BoxSegmenter:
    """Returns fixed boxes (the last one flagged touching the edge by the 'segmenter')."""

    def __init__(self, boxes: list[list[float]], edge: list[bool]) -> None:
        self.boxes, self.edge = boxes, edge

    def find(self, image: np.ndarray) -> Detections:
        return Detections(xyxy=np.array(self.boxes, np.float32),
                          touches_edge=np.array(self.edge))

    def find_still(self, image: np.ndarray) -> Detections:
        return self.find(image)  # a photo is read as a field


class ByWidthClassifier:
    """Wide boxes are neutrophils, narrow ones lymphocytes, tiny ones below min_score."""

    labels = LABELS
    min_score = 0.5

    def __init__(self) -> None:
        self.calls = 0

    def classify_boxes(self, frame_bgr: np.ndarray, xyxy: np.ndarray) -> np.ndarray:
        self.calls += 1
        rows = {"wide": [0.9, 0.1], "narrow": [0.1, 0.9], "tiny": [0.45, 0.4]}
        w = xyxy[:, 2] - xyxy[:, 0]
        kinds = ["wide" if v > 30 else "narrow" if v > 10 else "tiny" for v in w]
        return np.array([rows[k] for k in kinds], np.float32).reshape(-1, 2)

    def label_of(self, row: np.ndarray) -> tuple[str, float]:
        k = int(np.argmax(row))
        return (LABELS[k] if row[k] >= self.min_score else UNIDENTIFIED), float(row[k])


def test_cut_by_edge_margin_and_segmenter_flag() -> None:
    dets = Detections(xyxy=np.array([[0.5, 10, 20, 30], [5, 5, 20, 20], [80, 50, 99.5, 60],
                                     [40, 40, 50, 50]], np.float32),
                      touches_edge=np.array([False, False, False, True]))
    assert cut_by_edge(dets, 100, 60).tolist() == [True, False, True, True]


def test_every_cell_named_in_one_call_sorted_and_flagged() -> None:
    img = np.full((60, 100, 3), 200, np.uint8)
    seg = BoxSegmenter([[60, 30, 100, 50], [5, 5, 45, 25], [50, 2, 62, 14], [20, 40, 25, 45]],
                       [False, False, False, False])
    clf = ByWidthClassifier()
    cells = analyse_still(img, seg, clf)
    assert clf.calls == 1
    assert cells.detections.xyxy[:, 1].tolist() == [2, 5, 30, 40]  # top to bottom
    assert cells.names == ["lymphocyte", "neutrophil", "neutrophil", "unidentified"]
    assert cells.detections.class_id.tolist() == [1, 0, 0, -1]
    assert cells.cut.tolist() == [False, False, True, False]  # reaches the right edge
    assert cells.scores.shape == (4, 2)


def test_cut_cells_drawn_dashed_whole_ones_solid() -> None:
    img = np.full((60, 100, 3), 200, np.uint8)
    seg = BoxSegmenter([[10, 10, 50, 50], [60, 20, 100, 50]], [False, False])
    cells = analyse_still(img, seg, ByWidthClassifier())
    out = draw_still(img, cells)
    colour = np.array(colour_of("neutrophil"))
    whole_side = out[20:48, 10].astype(int)  # left side of the whole cell: solid
    cut_side = out[24:48, 60].astype(int)  # left side of the cut cell: dashed
    assert (np.abs(whole_side - colour).sum(axis=1) < 30).all()
    on = np.abs(cut_side - colour).sum(axis=1) < 30
    assert 0.2 < on.mean() < 0.8
