"""Stage motion: phase correlation on real smear photos, the cells' vote, scene changes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from detector.motion import StageMotion, same_scene


def _photo(bccd_dir, name: str = "BloodImage_00001") -> np.ndarray:
    return cv2.imread(str(bccd_dir / "JPEGImages" / f"{name}.jpg"))


@pytest.mark.parametrize(("dx", "dy"), [(0, 0), (7, -3), (-25, 12), (60, 0)])
def test_phase_shift_of_a_translated_real_photo(bccd_dir, dx, dy):
    """The stage moves the view by (dx, dy): the content moves by (-dx, -dy)."""
    img = _photo(bccd_dir)
    m = StageMotion()
    none = np.empty((0, 2), np.float32)
    radius = np.array([10.0], np.float32)
    m.update(np.ascontiguousarray(img[80:380, 80:480]), none, radius, none)
    assert m.source == "previous" and m.shift == (0.0, 0.0)  # first frame: nothing to compare
    shift = m.update(np.ascontiguousarray(img[80 + dy:380 + dy, 80 + dx:480 + dx]), none,
                     radius, none)
    assert m.source == "phase"
    assert shift == pytest.approx((-dx, -dy), abs=0.5)


def _round_field(img: np.ndarray) -> np.ndarray:
    """As an eyepiece camera sees it (the robustness suite's ``field_stop``): a round field as
    wide as the frame is high, black around it (the circle stays put while the stage moves)."""
    from training.detection_eval import perturb

    return perturb(img, np.empty((0, 4), np.float32), "field_stop")[0]


@pytest.mark.parametrize(("dx", "dy"), [(9, -4), (-30, 14), (45, 0)])
def test_phase_shift_through_a_round_field_of_view(bccd_dir, dx, dy):
    """The black surround and its rim do not move with the stage: they are left out of the
    correlation, which follows the smear (it locked onto the rim, a shift of zero, in 18 of
    1,800 frames of a simulator video before; 1 after)."""
    img = _photo(bccd_dir, "BloodImage_00010")
    m = StageMotion()
    none = np.empty((0, 2), np.float32)
    radius = np.array([10.0], np.float32)
    m.update(_round_field(img[60:400, 60:560]), none, radius, none)
    shift = m.update(_round_field(img[60 + dy:400 + dy, 60 + dx:560 + dx]), none, radius, none)
    assert m.source == "phase"
    assert shift == pytest.approx((-dx, -dy), abs=1.0)


def test_cells_decide_when_there_is_no_picture():
    """Without a frame the displacement most cells agree on wins (one outlier ignored)."""
    m = StageMotion()
    pred = np.array([[100, 100], [200, 120], [300, 200]], np.float32)
    centers = pred + np.array([14.0, -6.0], np.float32)
    centers[2] = [20, 400]  # a new cell elsewhere
    shift = m.update(None, pred, np.full(3, 12.0, np.float32), centers)
    assert m.source == "cells" and shift == pytest.approx((14.0, -6.0))
    # nobody agrees on anything: keep the previous shift
    shift = m.update(None, pred[:1], np.full(1, 12.0, np.float32), np.empty((0, 2), np.float32))
    assert m.source == "previous" and shift == pytest.approx((14.0, -6.0))


def test_same_scene_on_real_photos(bccd_dir):
    """Consecutive views of one field are one scene; two different smear photos are not."""
    a = _photo(bccd_dir)
    b = _photo(bccd_dir, "BloodImage_00020")
    assert same_scene(a[0:400, 0:560], a[12:412, 20:580])
    assert not same_scene(a, b)


@pytest.mark.parametrize("size", [(640, 480), (1280, 720), (500, 376)])
def test_frames_half_size_copy_gives_the_same_readings(bccd_dir, size):
    """The motion window and the focus gate read a Frame's shared half-size copy: the same
    pixels as reducing the full frame when the window is half the frame (640x480), within
    rounding when it is not; the full frame when the copy is too small."""
    from detector.core import Frame
    from detector.focus import frame_sharpness

    img = cv2.resize(_photo(bccd_dir), size, interpolation=cv2.INTER_AREA)
    m = StageMotion()
    shared, own = m.small_grey_of(Frame(img)), m.small_grey_of(img)
    diff = np.abs(shared.astype(int) - own)
    assert (diff.max() == 0) if size == (640, 480) else (diff.mean() < 0.5)
    assert frame_sharpness(Frame(img)) == pytest.approx(frame_sharpness(img),
                                                       rel=0 if size == (640, 480) else 0.02)
