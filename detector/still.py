"""One still photo in -> its white cells, each named, cells cut by the photo's edge flagged.

The single still-image analysis behind ``hematovision detect``, ``hematovision run`` on a folder
of separate photos and the page's image tab, so all three find and name the same cells.

A photo has no next frame that would show a cut cell whole, so every cell the segmenter finds is
named and counted, and the ones the photo's edge cuts are flagged ``cut`` (drawn with a dashed box
and a "cut" tag). In video the edge rule stays: the tracker waits until a cell is fully in view.
No I/O: arrays in, arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from detector import draw
from detector.core import UNIDENTIFIED, Detections, Frame

#: A box reaching this close (pixels) to the photo's border counts as cut by it.
EDGE_MARGIN = 1.0


class StillSegmenter(Protocol):
    def find_still(self, image: np.ndarray | Frame) -> Detections: ...


class StillClassifier(Protocol):
    labels: tuple[str, ...]

    def classify_boxes(self, frame_bgr: np.ndarray, xyxy: np.ndarray) -> np.ndarray: ...

    def label_of(self, scores_row: np.ndarray) -> tuple[str, float]: ...


@dataclass
class StillCells:
    """The cells of one photo, listed top to bottom, then left to right.

    Attributes:
        detections: boxes with ``class_id`` (-1: unidentified), ``score`` (top class score),
            ``data["label"]`` (the label name) and ``data["cut"]`` (the photo's edge cuts it).
        scores: (N, C) class probabilities in the order of ``labels``.
        labels: the classifier's labels.
    """

    detections: Detections
    scores: np.ndarray
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.detections)

    @property
    def names(self) -> list[str]:
        return [str(x) for x in self.detections.data["label"]]

    @property
    def cut(self) -> np.ndarray:
        return np.asarray(self.detections.data["cut"], dtype=bool)


def cut_by_edge(dets: Detections, width: int, height: int,
                margin: float = EDGE_MARGIN) -> np.ndarray:
    """Which cells the photo's edge cuts: flagged by the segmenter or reaching the border."""
    b = dets.xyxy
    near = ((b[:, 0] < margin) | (b[:, 1] < margin) | (b[:, 2] > width - margin)
            | (b[:, 3] > height - margin))
    return np.asarray(dets.touches_edge, dtype=bool) | near


def analyse_still(image: np.ndarray | Frame, segmenter: StillSegmenter,
                  classifier: StillClassifier, single_cell: bool = False) -> StillCells:
    """Find every white cell of one BGR photo and name it, all crops in one classifier call.

    A photo that shows one centred cell (a crop, as in single-cell data sets and analysers'
    galleries) gives that one cell (``Segmenter.find_still``). ``single_cell``: the whole photo
    is one cell, only classified.
    """
    bgr = image.bgr if isinstance(image, Frame) else image
    h, w = bgr.shape[:2]
    if single_cell:
        dets = Detections(xyxy=np.array([[0, 0, w, h]], np.float32),
                          touches_edge=np.zeros(1, dtype=bool))
    else:
        dets = segmenter.find_still(image)
    if len(dets):
        dets = dets[np.lexsort((dets.xyxy[:, 0], dets.xyxy[:, 1]))]
    labels = tuple(classifier.labels)
    scores = np.asarray(classifier.classify_boxes(bgr, dets.xyxy), dtype=np.float32)
    scores = scores.reshape(len(dets), len(labels))
    names = np.full(len(dets), "", dtype=object)
    for i, row in enumerate(scores):
        label, top = classifier.label_of(row)
        names[i] = label
        dets.class_id[i] = labels.index(label) if label in labels else -1
        dets.score[i] = top
    dets.data["label"] = names
    dets.data["cut"] = cut_by_edge(dets, w, h) & (not single_cell)  # a crop is the whole cell
    return StillCells(dets, scores, labels)


def draw_still(bgr: np.ndarray, cells: StillCells) -> np.ndarray:
    """Annotated copy: whole cells boxed as in video, cut cells with a dashed box and "cut"."""
    dets = cells.detections
    cut = cells.cut
    out = draw.draw_cells(bgr, dets[~cut], cells.labels, show_track_ids=False)
    if cut.any():
        scale, thick, box_thick = draw.style_for(out.shape)
        for i in np.flatnonzero(cut):
            name = str(dets.data["label"][i]) or UNIDENTIFIED
            colour = draw.colour_of(name)
            x1, y1, x2, y2 = (int(round(float(v))) for v in dets.xyxy[i])
            _dashed_rect(out, (x1, y1), (x2 - 1, y2 - 1), colour, box_thick)
            draw.draw_tag(out, f"{name} {float(dets.score[i]):.2f} cut", x1, y1, colour, scale,
                      thick)
    return out


def _dashed_rect(img: np.ndarray, p1: tuple[int, int], p2: tuple[int, int],
                 colour: tuple[int, int, int], thick: int, dash: int = 8) -> None:
    (x1, y1), (x2, y2) = p1, p2
    for a, b, fixed, horizontal in ((x1, x2, y1, True), (x1, x2, y2, True),
                                    (y1, y2, x1, False), (y1, y2, x2, False)):
        for s in range(a, b, 2 * dash):
            e = min(s + dash, b)
            q1, q2 = ((s, fixed), (e, fixed)) if horizontal else ((fixed, s), (fixed, e))
            cv2.line(img, q1, q2, colour, thick)
