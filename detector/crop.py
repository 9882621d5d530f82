"""The one crop rule shared by training and inference.

A cell crop is the detection box grown by ``margin`` (a fraction of the box's longer side on every
side), made square around the box centre, cut from the frame with the part outside the frame
filled by edge replication and what the camera adds (a round field's black surround, burned-in
black marks: :func:`detector.core.outside_field`) read as glass, as the segmenter reads it, and
resized to the model's input size. Training cuts its crops with this same function, so the model
sees at run time exactly what it saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from detector.core import glass_filled, outside_field


@dataclass(frozen=True)
class CropRule:
    """How a cell box becomes a model input.

    Attributes:
        margin: context added on every side, as a fraction of the box's longer side.
        square: make the crop square around the box centre (keeps cell shape undistorted).
        size: side of the output crop in pixels (the model's input size).
    """

    margin: float = 0.15
    square: bool = True
    size: int = 128

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin <= 2.0:
            raise ValueError(f"crop margin must be in [0, 2], got {self.margin}")
        if self.size < 8:
            raise ValueError(f"crop size must be >= 8 pixels, got {self.size}")

    def to_dict(self) -> dict[str, float | bool | int]:
        return {"margin": self.margin, "square": self.square, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict) -> CropRule:
        return cls(
            margin=float(d.get("margin", 0.15)),
            square=bool(d.get("square", True)),
            size=int(d.get("size", 128)),
        )


def crop_window(box: np.ndarray, rule: CropRule) -> tuple[int, int, int, int]:
    """Integer window (x1, y1, x2, y2) the rule cuts for one xyxy box; may extend past the frame."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    pad = rule.margin * max(w, h)
    if rule.square:
        side = max(w, h) + 2 * pad
        w = h = side
    else:
        w, h = w + 2 * pad, h + 2 * pad
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    wx1 = int(round(cx - w / 2.0))
    wy1 = int(round(cy - h / 2.0))
    return wx1, wy1, wx1 + max(int(round(w)), 1), wy1 + max(int(round(h)), 1)


def crop_cell(image: np.ndarray, box: np.ndarray, rule: CropRule) -> np.ndarray:
    """Cut one cell from ``image`` (any channel order, kept) -> (size, size, C) uint8."""
    fh, fw = image.shape[:2]
    x1, y1, x2, y2 = crop_window(box, rule)
    cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, fw), min(y2, fh)
    if cx2 <= cx1 or cy2 <= cy1:
        raise ValueError(f"box {list(map(float, box))} lies outside the {fw}x{fh} image")
    patch = image[cy1:cy2, cx1:cx2]
    outside = outside_field(patch)
    if outside is not None:  # (no training crop has any: the model never saw black)
        patch = glass_filled(patch, outside)
    top, left, bottom, right = cy1 - y1, cx1 - x1, y2 - cy2, x2 - cx2
    if top or left or bottom or right:
        patch = cv2.copyMakeBorder(patch, top, bottom, left, right, cv2.BORDER_REPLICATE)
    interp = cv2.INTER_AREA if patch.shape[0] > rule.size else cv2.INTER_LINEAR
    return cv2.resize(patch, (rule.size, rule.size), interpolation=interp)


def crop_cells(image: np.ndarray, boxes: np.ndarray, rule: CropRule) -> np.ndarray:
    """Cut every box -> (N, size, size, C) uint8, ready to batch into one invoke."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    channels = image.shape[2] if image.ndim == 3 else 1
    out = np.empty((len(boxes), rule.size, rule.size, channels), dtype=np.uint8)
    for i, box in enumerate(boxes):
        out[i] = crop_cell(image, box, rule).reshape(rule.size, rule.size, channels)
    return out
