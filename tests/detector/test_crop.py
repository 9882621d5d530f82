"""The crop rule: the window it cuts, and what the camera adds read as glass."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from detector.crop import CropRule, crop_cell, crop_window

RULE = CropRule(margin=0.15, size=64)


def _photo(bccd_dir) -> np.ndarray:
    return cv2.imread(str(bccd_dir / "JPEGImages" / "BloodImage_00010.jpg"))


def test_a_plain_photo_is_cut_and_resized_as_it_is(bccd_dir) -> None:
    img = _photo(bccd_dir)
    box = np.array([100, 220, 250, 420], np.float32)
    x1, y1, x2, y2 = crop_window(box, RULE)
    assert (x1, y1, x2, y2) == (45, 190, 305, 450)  # 200 px + 15% on each side, square
    expected = cv2.resize(img[y1:y2, x1:x2], (64, 64), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(crop_cell(img, box, RULE), expected)


@pytest.mark.parametrize(("kind", "box"), [
    ("field_stop", (60, 200, 200, 330)),  # a cell at the round field's rim
    ("burned_text", (0, 300, 150, 480)),  # a cell over the time stamp
])
def test_black_the_camera_adds_is_read_as_glass(bccd_dir, kind: str, box) -> None:
    """The model never saw black in training: in a crop it is filled with the crop's glass, as
    the segmenter reads the frame."""
    from training.detection_eval import perturb

    img = perturb(_photo(bccd_dir), np.empty((0, 4), np.float32), kind)[0]
    box = np.array(box, np.float32)
    x1, y1, x2, y2 = crop_window(box, RULE)
    raw = img[max(y1, 0):y2, max(x1, 0):x2]
    assert (raw.max(axis=2) < 30).mean() > 0.005  # black in the window
    crop = crop_cell(img, box, RULE)
    assert (crop.max(axis=2) < 30).mean() == 0  # none left in the crop
    assert (crop.max(axis=2) > 150).mean() > 0.1  # glass, not grey
