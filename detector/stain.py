"""Stain normalisation of cell crops: another microscope's colours mapped onto BCCD's.

Each photo is read for its own stains, as the segmenter reads them: the white point (the glass
between cells), the red cells' optical-density (OD) direction and density (pink, grey or teal
depending on eosin, buffer and camera) and the nuclear stain's direction (the dense off-red
stain of nuclei). A crop is then taken into OD, split into those stains (colour deconvolution
with the photo's own stain vectors), each stain's amount scaled to the reference red-cell
density, and rebuilt with the reference's vectors and white: a teal-stained smear under a
bluish lamp comes out as BCCD's pink-stained one would, with the nuclei, granules and cytoplasm
kept where they lie between the stains.

The photo is measured once (a small copy of it, ~1 ms), the mapping applied per crop (only the
crops the classifier is given): the per-frame cost is nothing while no cell is being named. The
same function cuts the training crops (:func:`detector.crop.crop_cells`, the crop rule's
``stain`` flag, recorded in the model card), so a model sees at run time what it saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from detector.segment import _percentile_u8, red_cell_stain

#: The photo is measured on a copy this many pixels wide (statistics need few pixels).
MEASURE_WIDTH = 192
#: Percentile of each channel taken as the white point (as the segmenter's background).
WHITE_PERCENTILE = 97.0
#: A nucleus-stain pixel is off the red cells' direction by more than this many red-cell
#: densities (nuclei are several times denser than red cells).
NUCLEUS_OFF = 1.0
#: Fewest nucleus-stain pixels (of the measuring copy's every other pixel) to measure its
#: direction; fewer (a field without white cells) keep the reference's.
MIN_NUCLEUS_PIXELS = 40
#: Largest cosine between the red-cell and nuclear directions that still separates the two.
MAX_STAIN_COS = 0.97


@dataclass(frozen=True)
class Stain:
    """One photo's stains: white point (BGR, 0-255), unit OD directions (BGR) of the red cells
    and of the nuclear stain, and the red cells' median density along their direction."""

    white: tuple[float, float, float]
    red: tuple[float, float, float]
    nucleus: tuple[float, float, float]
    density: float

    def basis(self) -> np.ndarray:
        """Rows: red-cell direction, nuclear direction, and the direction across both."""
        r, n = np.asarray(self.red, np.float64), np.asarray(self.nucleus, np.float64)
        w = np.cross(r, n)
        return np.stack([r, n, w / np.linalg.norm(w)])


#: BCCD's stains, the medians over its labelled photographs (measured with :func:`measure_stain`):
#: pink red cells, violet nuclei, a neutral white.
REFERENCE = Stain(white=(210.0, 210.0, 210.0), red=(0.641, 0.678, 0.373),
                  nucleus=(0.0, 0.877, 0.481), density=0.402)


def _unit(v: np.ndarray) -> tuple[float, float, float]:
    v = np.asarray(v, np.float64)
    v = v / np.linalg.norm(v)
    return float(v[0]), float(v[1]), float(v[2])


def measure_stain(image_bgr: np.ndarray) -> Stain | None:
    """The stains of one photo (uint8 BGR), or None when it is too dark or unstained to read
    (its crops are then left as they are)."""
    h, w = image_bgr.shape[:2]
    if w > MEASURE_WIDTH:
        small = cv2.resize(image_bgr, (MEASURE_WIDTH, max(8, round(h * MEASURE_WIDTH / w))),
                           interpolation=cv2.INTER_AREA)
    else:
        small = image_bgr
    white = np.array([_percentile_u8(cv2.calcHist([small], [c], None, [256], [0, 256]).ravel(),
                                     WHITE_PERCENTILE) for c in range(3)], np.float32)
    if float(white.min()) < 40.0:
        return None
    levels = np.arange(256, dtype=np.float32)[:, None] + 1.0
    lut = -np.log(np.minimum(levels / (white[None, :] + 1.0), 1.0))
    od2 = cv2.LUT(np.ascontiguousarray(small[::2, ::2]), lut.reshape(1, 256, 3))
    px = od2.reshape(-1, 3)
    if np.count_nonzero(px.sum(1) > 0.1) < 30:
        return None
    red, density = red_cell_stain(od2)
    off = px - np.outer(px @ red, red)
    strong = px[np.linalg.norm(off, axis=1) > NUCLEUS_OFF * density]
    nucleus = np.asarray(REFERENCE.nucleus, np.float64)
    if len(strong) >= MIN_NUCLEUS_PIXELS:
        v = np.median(strong / np.linalg.norm(strong, axis=1, keepdims=True), axis=0)
        if np.linalg.norm(v) > 0 and abs(float(_unit(v) @ red)) < MAX_STAIN_COS:
            nucleus = np.asarray(_unit(v))
    if abs(float(nucleus @ red)) >= MAX_STAIN_COS:
        return None
    return Stain(white=(float(white[0]), float(white[1]), float(white[2])), red=_unit(red),
                 nucleus=_unit(nucleus), density=float(density))


def stain_transform(stain: Stain, reference: Stain = REFERENCE) -> np.ndarray:
    """3x3 matrix T with OD_reference = OD_photo @ T (row vectors): the photo's stain amounts,
    scaled to the reference red-cell density, on the reference's stain vectors."""
    k = reference.density / max(stain.density, 1e-3)
    scale = np.diag([k, k, 1.0])
    return np.linalg.inv(stain.basis()) @ scale @ reference.basis()


def normalise_crop(crop_bgr: np.ndarray, stain: Stain | None,
                   reference: Stain = REFERENCE) -> np.ndarray:
    """A crop (uint8 BGR) of a photo with ``stain`` as the reference microscope would show it;
    unchanged when the photo's stain could not be read."""
    if stain is None:
        return crop_bgr
    white = np.asarray(stain.white, np.float32)
    od = -np.log((crop_bgr.astype(np.float32) + 1.0) / (white + 1.0))
    t = stain_transform(stain, reference).astype(np.float32)
    out = np.exp(-cv2.transform(od, np.ascontiguousarray(t.T)))
    out *= np.asarray(reference.white, np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
