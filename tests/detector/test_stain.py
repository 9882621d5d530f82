"""Stain normalisation: a photo's stains read from the photo, its crops mapped onto the reference
microscope's, on synthetic stains with known answers and on real BCCD photographs changed as
other microscopes take them."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from detector.crop import CropRule, crop_cells
from detector.stain import REFERENCE, Stain, measure_stain, normalise_crop, stain_transform

GT = np.array([[260, 177, 491, 376]], np.float32)  # the white cell of BloodImage_00000


def _paint(stain: Stain, size: int = 240, seed: int = 0) -> np.ndarray:
    """A field of red cells and two nuclei painted with ``stain``'s vectors (Beer-Lambert)."""
    rng = np.random.default_rng(seed)
    red = np.zeros((size, size), np.float32)
    for _ in range(40):
        cv2.circle(red, (int(rng.integers(0, size)), int(rng.integers(0, size))), 14, 1.0, -1)
    red = np.minimum(red, 1.0) * stain.density
    nuc = np.zeros((size, size), np.float32)
    cv2.circle(nuc, (size // 3, size // 3), 18, 1.2, -1)
    cv2.circle(nuc, (2 * size // 3, 2 * size // 3), 15, 1.0, -1)
    od = (red[..., None] * np.asarray(stain.red, np.float32)
          + nuc[..., None] * np.asarray(stain.nucleus, np.float32))
    img = np.asarray(stain.white, np.float32) * np.exp(-od)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


TEAL = Stain(white=(235.0, 215.0, 170.0), red=tuple(np.array([0.45, 0.55, 0.7]) / np.linalg.norm(
    [0.45, 0.55, 0.7])), nucleus=REFERENCE.nucleus, density=0.6)


def test_reads_the_stains_it_was_painted_with() -> None:
    """White point, red-cell direction and density, and the nuclear direction of a painted field
    (yellow glass, teal red cells, denser stain than BCCD's) are measured back."""
    st = measure_stain(_paint(TEAL))
    assert st is not None
    assert np.allclose(st.white, TEAL.white, atol=3)
    assert float(np.dot(st.red, TEAL.red)) > 0.995
    assert abs(st.density - TEAL.density) < 0.08
    assert float(np.dot(st.nucleus, TEAL.nucleus)) > 0.99


def test_a_teal_field_under_yellow_light_comes_out_as_the_reference_one() -> None:
    """The same cells painted with another microscope's stains and with the reference's:
    normalised, the first matches the second within a few levels."""
    other, ref = _paint(TEAL), _paint(REFERENCE)
    out = normalise_crop(other, measure_stain(other))
    assert np.abs(other.astype(int) - ref).mean() > 25
    assert np.abs(out.astype(int) - ref).mean() < 4


def test_the_reference_stain_maps_to_itself_and_unreadable_photos_stay_as_they_are() -> None:
    assert np.allclose(stain_transform(REFERENCE), np.eye(3), atol=1e-6)
    ref = _paint(REFERENCE)
    assert np.abs(normalise_crop(ref, REFERENCE).astype(int) - ref).max() <= 1
    dark = np.full((64, 64, 3), 20, np.uint8)
    blank = np.full((64, 64, 3), 220, np.uint8)
    assert measure_stain(dark) is None and measure_stain(blank) is None
    assert normalise_crop(dark, None) is dark


def test_crop_rule_records_the_flag_and_old_cards_have_it_off() -> None:
    rule = CropRule(size=64, stain=True)
    assert CropRule.from_dict(rule.to_dict()) == rule
    assert CropRule.from_dict({"margin": 0.15, "square": True, "size": 64}).stain is False


@pytest.mark.parametrize("kind", ["rbc_teal", "rbc_grey", "wb_cool", "bg_yellow", "dim",
                                  "stain_dark"])
def test_real_photo_changed_as_another_microscope_takes_it(bccd_dir, kind: str) -> None:
    """A real BCCD photograph re-photographed with teal or grey red cells, a cool white balance,
    yellow glass, a dim lamp or a darker stain: the stain-normalised crop of its white cell is
    at most half as far from the normalised crop of the original as the raw crops are from each
    other (a hue shift of the whole photo is not undone: both stains turn together)."""
    from training.detection_eval import perturb

    img = cv2.imread(str(bccd_dir / "JPEGImages" / "BloodImage_00000.jpg"))
    changed, boxes, _ = perturb(img, GT, kind, seed=3)
    raw, norm = CropRule(size=96), CropRule(size=96, stain=True)
    d_raw = np.abs(crop_cells(changed, boxes, raw).astype(int) - crop_cells(img, GT, raw)).mean()
    d_norm = np.abs(crop_cells(changed, boxes, norm).astype(int)
                    - crop_cells(img, GT, norm)).mean()
    assert d_norm < 0.5 * d_raw, (d_raw, d_norm)
