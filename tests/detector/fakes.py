"""A tiny virtual slide, a fake segmenter and a fake classifier for tracking/counting tests.

The slide is a textured background (red cells) with white cells drawn as discs whose colour
encodes their type; a "trajectory" is the list of top-left corners of the camera window over the
slide, one per frame. The fake segmenter returns the true boxes of the white cells in view (clipped
at the border, with ``touches_edge``), the fake classifier reads the colour at the box centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from detector.core import UNIDENTIFIED, Detections, Frame

LABELS = ("neutrophil", "eosinophil", "lymphocyte")
#: BGR colour of each type's disc (distinct hues).
COLOURS = {"neutrophil": (200, 60, 60), "eosinophil": (60, 60, 200), "lymphocyte": (60, 200, 60)}


@dataclass
class Cell:
    id: int
    label: str
    x: float  # centre on the slide
    y: float
    r: float = 22.0


@dataclass
class Slide:
    width: int
    height: int
    cells: list[Cell]
    seed: int = 0
    image: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        img = np.full((self.height, self.width, 3), (200, 190, 230), np.uint8)
        n = self.width * self.height // 900
        for x, y, r in zip(rng.integers(0, self.width, n), rng.integers(0, self.height, n),
                           rng.integers(6, 12, n), strict=True):
            shade = int(rng.integers(120, 180))
            cv2.circle(img, (int(x), int(y)), int(r), (shade, shade - 40, 220), -1)
        for c in self.cells:
            cv2.circle(img, (int(c.x), int(c.y)), int(c.r), COLOURS[c.label], -1)
            cv2.circle(img, (int(c.x), int(c.y)), int(c.r * 0.4), (40, 20, 60), -1)
        self.image = img


def view(slide: Slide, x: int, y: int, w: int = 320, h: int = 240,
         blur: bool = False) -> np.ndarray:
    out = slide.image[y:y + h, x:x + w].copy()
    if blur:
        out = cv2.GaussianBlur(out, (0, 0), 4)
    return out


def truth_boxes(slide: Slide, x: int, y: int, w: int = 320, h: int = 240
                ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Boxes (clipped) of the white cells visible in the window, touches_edge, cell ids."""
    boxes, edge, ids = [], [], []
    for c in slide.cells:
        bx1, by1, bx2, by2 = c.x - c.r - x, c.y - c.r - y, c.x + c.r - x, c.y + c.r - y
        cx1, cy1, cx2, cy2 = max(bx1, 0), max(by1, 0), min(bx2, w), min(by2, h)
        if cx2 - cx1 < 4 or cy2 - cy1 < 4:
            continue
        boxes.append([cx1, cy1, cx2, cy2])
        edge.append((cx1, cy1, cx2, cy2) != (bx1, by1, bx2, by2))
        ids.append(c.id)
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(edge, bool), ids


class FakeSegmenter:
    """Returns the true boxes for the frame's index along a trajectory."""

    def __init__(self, slide: Slide, path: list[tuple[int, int]], w: int = 320, h: int = 240):
        self.slide, self.path, self.w, self.h = slide, path, w, h
        self.last_ids: list[int] = []
        self.in_sequence: list[bool] = []  # what the analyzer said of each frame

    def find(self, image: np.ndarray | Frame, *, in_sequence: bool = False) -> Detections:
        self.in_sequence.append(in_sequence)
        x, y = self.path[image.index]
        boxes, edge, ids = truth_boxes(self.slide, x, y, self.w, self.h)
        self.last_ids = ids
        return Detections(xyxy=boxes, touches_edge=edge)

    def find_still(self, image: np.ndarray) -> Detections:
        return self.find(image)  # a photo is read as a field


class FakeClassifier:
    """Names a cell by the colour at its box centre; counts invokes and crops."""

    labels = LABELS
    min_score = 0.5

    def __init__(self) -> None:
        self.invokes = 0
        self.crops = 0

    def classify_boxes(self, frame_bgr: np.ndarray, xyxy: np.ndarray) -> np.ndarray:
        self.invokes += 1
        self.crops += len(xyxy)
        out = np.full((len(xyxy), len(LABELS)), 0.05, np.float32)
        for i, (x1, y1, x2, y2) in enumerate(np.asarray(xyxy)):
            cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
            ring = frame_bgr[int(cy - 0.7 * (cy - y1)), cx].astype(float)
            d = [np.abs(ring - np.array(COLOURS[k])).sum() for k in LABELS]
            out[i, int(np.argmin(d))] = 0.9
        return out

    def label_of(self, scores_row: np.ndarray) -> tuple[str, float]:
        k = int(np.argmax(scores_row))
        s = float(scores_row[k])
        return (LABELS[k], s) if s >= self.min_score else (UNIDENTIFIED, s)


def row_slide(n: int = 8, spacing: int = 110, y: float = 300.0, seed: int = 0) -> Slide:
    """``n`` cells in a row (types in turn), alternately 40 px lower."""
    cells = [Cell(i + 1, LABELS[i % 3], 260 + i * spacing, y + (i % 2) * 40) for i in range(n)]
    return Slide(width=260 + n * spacing + 400, height=600, cells=cells, seed=seed)


def pan(start: tuple[int, int], step: tuple[int, int], n: int) -> list[tuple[int, int]]:
    return [(start[0] + i * step[0], start[1] + i * step[1]) for i in range(n)]
