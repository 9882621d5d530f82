"""Cheap focus measures, and a gate that says whether a sighting is sharp enough to vote.

A moving stage drifts in and out of focus; a cell seen blurred gives the classifier a poor crop.
The measure is the variance of the Laplacian of a grey patch resized to a fixed side, divided by the
patch's intensity variance: resizing makes it comparable across magnifications and cell sizes,
dividing by the contrast makes it comparable across stains and illumination. "Sharp enough" is
relative: a sighting passes when it is not much blurrier than the recent ones (running median).
"""

from __future__ import annotations

import logging
from collections import deque

import cv2
import numpy as np

from detector.core import Frame

log = logging.getLogger(__name__)

#: Side (pixels) a cell patch is resized to before measuring, so magnification does not matter.
PATCH_SIDE = 48


def to_grey(image: np.ndarray) -> np.ndarray:
    """BGR or grey uint8 image -> grey uint8 (no copy when already grey)."""
    if image.ndim == 2:
        return image
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def sharpness(grey: np.ndarray) -> float:
    """Contrast-normalised variance of the Laplacian of a grey patch (0 for a flat patch)."""
    g = grey.astype(np.float32, copy=False)
    std = float(cv2.meanStdDev(g)[1][0, 0])
    if std < 1e-3:
        return 0.0
    lap_std = float(cv2.meanStdDev(cv2.Laplacian(g, cv2.CV_32F, ksize=3))[1][0, 0])
    return (lap_std / std) ** 2


def cell_sharpness(image: np.ndarray, box: np.ndarray, side: int = PATCH_SIDE) -> float:
    """Focus measure of one cell: its box cut from ``image`` (BGR or grey), resized to ``side``."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if x2 - x1 < 3 or y2 - y1 < 3:
        return 0.0
    patch = to_grey(image[y1:y2, x1:x2])
    interp = cv2.INTER_AREA if max(patch.shape) > side else cv2.INTER_LINEAR
    patch = cv2.resize(patch, (side, side), interpolation=interp)
    return sharpness(patch)


def frame_sharpness(image: Frame | np.ndarray, size: tuple[int, int] = (160, 120)) -> float:
    """Focus measure of a whole frame, cheap: the centre half of the frame (where cells are
    whole), green channel (the stain's contrast), area-averaged to ``size``; read from a Frame's
    shared half-size copy when that is large enough."""
    img = image.reduced(2 * size[0], 2 * size[1]) if isinstance(image, Frame) else image
    h, w = img.shape[:2]
    x0, y0 = w // 4, h // 4
    centre = img[y0:y0 + h // 2, x0:x0 + w // 2]
    green = cv2.extractChannel(centre, 1) if centre.ndim == 3 else centre
    if green.shape[1] != size[0] or green.shape[0] != size[1]:
        green = cv2.resize(green, size, interpolation=cv2.INTER_AREA)
    return sharpness(green)


class SharpGate:
    """Says whether a focus value is sharp enough, relative to the recent values it has seen.

    A value passes when it is at least ``ratio`` times the running median of the last ``window``
    values (the values themselves are added to the window whether they pass or not). During the
    first ``warmup`` values everything passes: there is nothing to compare with yet.
    """

    def __init__(self, ratio: float = 0.6, window: int = 120, warmup: int = 5) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        self.warmup = warmup
        self._values: deque[float] = deque(maxlen=window)

    @property
    def threshold(self) -> float:
        """Current pass mark (0 during warm-up)."""
        if len(self._values) < self.warmup:
            return 0.0
        return self.ratio * float(np.median(np.fromiter(self._values, dtype=np.float64)))

    def check(self, value: float) -> bool:
        """True when ``value`` is sharp enough; ``value`` then joins the running window."""
        ok = value >= self.threshold
        self._values.append(float(value))
        return ok

    def reset(self) -> None:
        self._values.clear()
