"""detector.crop: the one crop rule, and crops in red-cell units that keep a cell's size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from detector.crop import CropRule, crop_cell, crop_window

FIELD = CropRule(margin=0.15, size=64, min_side_rbc=2.5)


def _disc_frame(radius: int) -> np.ndarray:
    frame = np.full((300, 300, 3), 230, np.uint8)
    cv2.circle(frame, (150, 150), radius, (120, 40, 90), -1)
    return frame


def _disc_width(crop: np.ndarray) -> int:
    """Columns of the crop the dark disc covers."""
    return int(np.count_nonzero((crop[..., 0] < 180).any(axis=0)))


def test_a_small_cell_stays_small_in_a_crop_in_red_cell_units() -> None:
    box = np.array([140, 140, 160, 160], np.float32)  # a platelet-sized disc, 20 px
    frame = _disc_frame(10)
    d = 40.0  # the frame's red cells: the disc is half a red cell across
    assert crop_window(box, FIELD, d) == (100, 100, 200, 200)  # 2.5 red cells
    small = crop_cell(frame, box, FIELD, d)
    filled = crop_cell(frame, box, FIELD)  # size not measured: the box fills the crop
    assert _disc_width(small) == pytest.approx(64 * 21 / 100, abs=2)  # the disc is 21 px
    assert _disc_width(filled) == pytest.approx(64 * 21 / 26, abs=2)


def test_a_large_cell_is_cut_by_its_box_whatever_the_red_cells() -> None:
    box = np.array([90, 90, 210, 210], np.float32)  # three red cells across
    assert crop_window(box, FIELD, 40.0) == crop_window(box, FIELD) == (72, 72, 228, 228)
    assert crop_window(box, CropRule(margin=0.15, size=64), 40.0) == (72, 72, 228, 228)


def test_the_card_keeps_the_rule_and_older_cards_read_as_the_box_alone() -> None:
    assert CropRule.from_dict(FIELD.to_dict()) == FIELD
    assert "min_side_rbc" not in CropRule().to_dict()  # cards of box-only models unchanged
    assert CropRule.from_dict({"margin": 0.15, "square": True, "size": 128}).min_side_rbc == 0
    with pytest.raises(ValueError, match="red-cell diameters"):
        CropRule(min_side_rbc=-1)
