"""Classical white-blood-cell segmentation for Wright/Giemsa (Romanowsky) stained smears.

``Segmenter.find(image)`` returns one box per white cell (nucleus and cytoplasm) in full-resolution
pixels. Everything runs on a small working copy of the frame (``working_width`` px wide), which
keeps a 640x480 frame well under the real-time budget on one core.

How a frame is read (all steps adapt to the frame, none uses a colour threshold tuned to one
image set):

- **What is not the specimen.** Near-black joined to the border (a round field's surround seen
  by an eyepiece camera, black bars) and the camera's black marks (a time stamp, text, a scale
  bar: :func:`detector.core.outside_field`) are filled with glass before anything is measured,
  stains and red cells are read inside the field only, and a cell touching them is cut.
0. **Illumination field.** The lamp's field (vignetting, an off-centre or tilted lamp) is the
   upper envelope of the glass brightness: the brightest pixel of each block fitted by a
   quadratic surface, refitted on the blocks at or above it (blocks covered by cells do not pull
   it down; a cell filling a crop cannot dent a quadratic). Where it falls below 0.8 of its peak
   it is divided out, so a cell in a dark corner reads as it would in the centre.
1. **White balance and optical density.** The brightest mode of each channel (a high percentile:
   the plasma/glass between cells) is the frame's white point. Each pixel becomes optical density
   ``OD_c = -log(I_c / I0_c)`` (Beer-Lambert), so illumination colour and brightness drop out and
   stains add up linearly (a yellowish or bluish background is the white point, not a stain).
2. **Red-cell stain direction.** Red cells are most of the stained area in a smear; their OD
   direction is found per frame as the mode of the stained pixels' directions, by mean shift in
   a narrowing cone from each of three priors (pink, grey, blue-grey/teal: other stains, buffers
   and cameras); a mode that drifts far from all three is a large white cell's cytoplasm (a
   frame or crop filled by one cell), not red cells. Their median density ``m`` is the frame's
   stain strength.
3. **Nucleus-stain channel.** Romanowsky stains colour nuclei bluer than red cells whatever the
   exact hue: they absorb more red and less blue light. In the plane orthogonal to the red-cell
   direction (so red cells of any density and the glass score ~0) the channel points from that
   "blue shift" towards violet; where a frame has enough strongly stained pixels near that
   direction (nuclei, platelets), their median direction is used, so redder or bluer stains keep
   full contrast. It is divided by ``m``, so one threshold works for pale and dark stains
   (gamma, staining time, lamp). Red cells that are not pink (grey, teal) lie closer to the
   nuclear violet and leave less of it off their direction: the channel is scaled by 1 / sin of
   the angle between the violet and the red cells (relative to pink), as colour deconvolution
   does. So a nucleus is dense blue-violet stain, not "darker or more purple than pink".
4. **Nuclei and cells.** Pixels above ``nucleus_level`` are nucleus cores. Core fragments closer
   than ``merge_distance`` red-cell diameters are one cell (the lobes of a neutrophil); cores
   further apart stay separate cells. The cell body (nucleus + cytoplasm) is the smoothed stain
   off the red-cell direction (any hue: lilac, blue or eosinophil-orange cytoplasm) above
   ``cell_level``, connected to the nucleus and within ``max_cytoplasm`` red-cell diameters of
   it; a body shared by two cells is split between them by distance to each nucleus. The box is
   the body's bounding box. A body reaching the frame border is checked at a firmer level: when
   only faint stain (a vignetted corner, a pale neighbour) joins it to the border, that stain is
   dropped, so a cell standing clear of the border is not flagged ``touches_edge``.

Scale: all sizes are in red-cell diameters. The diameter is estimated per frame from the red-cell
mask by granulometry (the disc radius whose morphological opening keeps 60 % of the red-cell area,
which touching and overlapping cells do not fool; pale centres are filled first, but not the plasma
enclosed by a ring of packed cells, which would merge them into one blob); when a frame has too few
red cells, no disc-shaped ones (only rims of pale cells cut open by the border, as in a crop
zoomed in on one white cell), or the estimate is implausible (outside 0.3-3x), the configured
``rbc_diameter`` is used (scaled up for frames wider than 640 px: a camera with more pixels over
the same field, not a crop). So other magnifications and cameras work without retuning. At low
magnification (red cells under 18 working pixels, ~0.7x BCCD's at 640x480) the frame is read
again at a working width that gives red cells ~24 pixels, so nuclei and platelets stay apart
(slower: ~0.8-2.1 ms for such frames at 0.5x-0.35x on a development machine). A frame much
wider than 640 px is first read finely enough for red cells of 35 px to be measured (in a
12-megapixel photo of the whole eyepiece field red cells of ~100 px are 4 px at 160 px wide,
and their size read 2-4x too large). In a video the
size is measured every ``rbc_every`` frames and kept in between (it changes only with the
objective), which saves the measurement and, at low magnification, the first reading of the
frame; the stain directions (red-cell and nuclear, which change only with the slide) and the
illumination field (which changes only with the lamp and optics) are kept with it.
The opening radius is calibrated to BCCD's
annotated red-cell boxes (x1.42: red cells with open pale centres read small as binary masks);
on BCCD 90 % of frames fall within -16 % / +20 % of the annotated size. Crisp cells with filled
centres read up to ~1/3 large (the simulator's red cells read 1.2-1.4x), which makes the nucleus
size and stain rules stricter by up to ~2x in area terms; the cytoplasm rule for faint nuclei
(``weak_nucleus_mass``) keeps such frames' small-lobed cells.
Overexposed frames (clipped glass) use the configured diameter.

Deliberate handling of the things that are not white cells:

- **Platelets** are purple like nuclei but tiny: a nucleus group smaller than ``min_nucleus_area``
  red-cell areas is rejected (a platelet is ~0.05 red-cell areas, the smallest lymphocyte nucleus
  ~0.35), and so is one with little nuclear stain (``min_nucleus_mass``: pale granular giant
  platelets); a nucleus with between half and all of that stain is kept only inside a white
  cell's cytoplasm (``min_weak_cytoplasm``), which keeps small-lobed nuclei in defocused frames.
  Platelet clumps right next to a white cell are not merged into it unless they are within
  the merge distance.
- **Large granular platelets** (PBC's: up to ~0.3 red-cell areas, granular, almost no
  cytoplasm) are kept only with ``min_small_cytoplasm`` around a nucleus smaller than
  ``small_nucleus_area``; the largest still pass and are left to the classifier's ``platelet``
  class, which vetoes them.
- **Platelet clumps** are a scatter of platelet-sized dots: a nucleus group needs one solid piece
  of ``min_fragment_area`` and, when no piece is most of it and none is a nucleus's size (twice
  ``small_nucleus_area``, larger than any platelet), a white cell's cytoplasm. (A neutrophil cut by
  the frame edge keeps a lobe that size but may have lost the cytoplasm the rule asks for.)
- **Stain debris / precipitate and dust** are small or not blue-shifted (dark grey dirt absorbs all
  channels alike and scores ~0 on the nucleus channel); groups larger than ``max_cell_diameter``
  red-cell diameters (stain smears, thick clumped areas) are rejected too.
- **Cells cut by the frame edge** are returned with ``touches_edge=True`` when their visible
  nucleus passes the same size rules and the cell reaches ``min_edge_depth`` red-cell diameters
  into the frame (a sliver at the border is not a cell one could name); the tracker judges a
  cell once it is fully in view, still images still get it.
- **Blank, dark or unstained frames** (no glass background, nothing blue-shifted) give no cells.

**Single-cell images** (a crop centred on one cell, as in analysers' galleries and single-cell
data sets; the cell may fill or touch the crop): ``find_single`` returns the cell over the centre
(or nearest it), falling back, when the red cells of the crop are too few or the cell fills it,
on the densest nuclear stain at the centre with the red-cell stain read from the crop's outer
band; ``find_still`` recognises such an image (its only whole cell centred and at least a fifth
of the shorter side) and returns that one cell, else the field's cells (with a large nucleus over
the centre added when the field analysis missed it).

``score`` is a segmentation confidence in [0, 1] from the nucleus contrast and how plausible its
size is. Focus is not measured here: the analyzer measures it only for the cells it may
classify (``detector.focus``). ``data["nucleus_area"]`` (full-res px) and ``data["nucleus_mass"]``
are the nucleus size and stain figures the filters used. Diagnostics of the last frame:
``last_rbc_diameter`` (full-res px), ``last_rbc_measured``, ``last_background``,
``last_illumination``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from detector.core import Detections, Frame, box_iou, glass_filled, outside_field
from detector.errors import InputError

log = logging.getLogger(__name__)

#: Default red-cell OD direction (B, G, R order) for Romanowsky-stained smears; only a starting
#: point, refined per frame.
_RBC_DIR0 = np.array([0.64, 0.67, 0.37], dtype=np.float32)
_RBC_DIR0 /= np.linalg.norm(_RBC_DIR0)
#: Starting points for the red-cell direction: pink (eosin-rich), grey and blue-grey/teal red
#: cells (other stains, buffers and cameras).
_RBC_PRIORS = [
    d / np.linalg.norm(d)
    for d in (
        _RBC_DIR0, np.array([1.0, 1.0, 1.0], np.float32), np.array([0.45, 0.55, 0.7], np.float32)
    )
]
#: Least cosine between a red-cell colour mode and the nearest of _RBC_PRIORS (~16 degrees).
_RBC_PRIOR_COS = 0.96
#: Romanowsky nuclear violet (BGR OD direction), and its sine with pink red cells (_RBC_DIR0).
_VIOLET = np.array([0.15, 0.85, 0.5], dtype=np.float32)
_VIOLET /= np.linalg.norm(_VIOLET)
_SIN_PINK = float(np.linalg.norm(_VIOLET - float(_VIOLET @ _RBC_DIR0) * _RBC_DIR0))
#: "Absorbs more red light, less blue light" in BGR OD space.
_BLUE_SHIFT = np.array([-1.0, 0.0, 1.0], dtype=np.float32)
_ONES3 = np.ones(3, dtype=np.float32)
#: Red-cell diameter / (2 x opening radius), calibrated on BCCD's annotated red-cell boxes.
_GRANULOMETRY_CAL = 1.42
#: Fraction of the red-cell area the opening must keep.
_GRANULOMETRY_KEEP = 0.6
#: Prior angle of the nuclear stain from the blue shift, in the plane orthogonal to the red-cell
#: direction (Romanowsky nuclei are violet, not pure blue), and how far a frame may move it.
_NUCLEUS_ANGLE = float(np.radians(-35.0))
_ANGLE_CONE = float(np.radians(70.0))
#: Least share of a border-reaching body that must be firm cytoplasm (``edge_level``) for the
#: faint rest to be judged stain beyond the cell (BCCD's cells at the border: 0.7-0.95).
_FIRM_FRACTION = 0.5
#: A frame whose illumination field's darkest point has at least this share of its brightest
#: is taken as evenly lit (no correction).
_FLAT_ENOUGH = 0.8
#: Grid (columns, rows) the illumination field is evaluated on before it is resized.
_COARSE = (32, 24)
#: Enclosed background pieces up to this many times their inscribed disc's area are red cells'
#: pale centres (filled); more elongated or branched ones are plasma enclosed by a ring of packed
#: red cells (see _round_holes). Chosen on the even-numbered BCCD images (2.2-6 tried).
_ROUND_HOLE = 3.0
_OPEN3 = np.ones((3, 3), np.uint8)
#: Leaving the enclosed pieces that are not round unfilled must shrink the red-cell size below
#: this share of the size with them filled for them to be taken as plasma between packed cells
#: (merged cells read 1.5-2x large; slit-like pale centres change it by ~10 %).
_MERGED = 0.8
#: Small ridge term of the illumination fit's normal equations (6 quadratic coefficients).
_RIDGE6 = 1e-3 * np.eye(6, dtype=np.float32)
#: Single-cell images: the cell is at least this share of the crop's shorter side, and its
#: centre at most ``_SINGLE_MAX_OFFSET`` of it from the crop's centre.
_SINGLE_MIN_SIZE = 0.2
_SINGLE_MAX_OFFSET = 0.2
#: Below this red-cell diameter in working pixels (low magnification) the frame is read again
#: at a larger working width.
_MIN_RBC_WORKING = 18.0
#: The first reading of a frame is at least wide enough to give the smallest red cells it is
#: made for (``rbc_diameter`` at ``_LOWEST_MAGNIFICATION``: 35 px) this many working pixels:
#: fewer and their size reads several times too large (a 12-megapixel photo's red cells, ~100
#: px, are 4 px in a 160-px copy).
_FIRST_READ_RBC = 8.0
_LOWEST_MAGNIFICATION = 0.35
#: A first reading this many times wider than the red cells need is read again narrower.
_NARROWER = 1.3


@dataclass(frozen=True)
class SegmenterOptions:
    """Settings of the white-cell segmenter. Sizes are in red-cell diameters unless stated.

    Attributes:
        working_width: width in pixels of the reduced copy the analysis runs on (frames narrower
            than this are used as they are). 160 suits 640x480 at a 100x objective (a red cell is
            then ~25 working pixels); raise it for wide frames at low magnification.
        rbc_diameter: expected red-cell diameter in full-resolution pixels of a frame up to
            ``reference_width`` wide, used when a frame has too few red cells to measure it
            (about 100 px for 640x480 frames at 100x).
        reference_width: a frame wider than this is taken as a camera with more pixels over the
            same field (not a crop of a frame, which cannot be wider than it): its expected red
            cells, and the largest it accepts as measured, are as many times larger.
        estimate_rbc: measure the red-cell diameter in every frame (so other magnifications work
            unchanged); False always uses ``rbc_diameter``.
        min_red_cell_fraction: the red-cell mask must cover at least this fraction of the frame
            for the measured diameter to be trusted.
        nucleus_level: nucleus-stain level of nucleus cores, as a multiple of the frame's red-cell
            optical density.
        cell_level: lower level that takes in the cytoplasm (cell body), same unit.
        merge_distance: nucleus fragments closer than this are lobes of one cell.
        min_nucleus_area: smallest nucleus (visible part, for edge cells) in red-cell disc areas;
            rejects platelets, debris and slivers of cells at the frame edge.
        small_nucleus_area: a nucleus smaller than this (red-cell disc areas) is a white cell's
            only with ``min_small_cytoplasm`` red-cell areas of cytoplasm around it: the small
            lobes of a neutrophil have it, a large granular platelet (up to ~0.3; PBC's) has
            almost none.
        min_small_cytoplasm: cytoplasm (red-cell areas) a small nucleus needs.
        min_fragment_area: the largest solid piece of a nucleus group, in red-cell disc areas:
            a nucleus or one of its lobes is a blob of this size at least, a platelet clump only
            a scatter of platelet-sized dots (a platelet is ~0.05) however many it holds.
        min_nucleus_mass: least nuclear stain: the core's stain above ``nucleus_level`` summed
            over its area, in red-cell areas x ``nucleus_level``. Separates dense nuclei from
            pale granular giant platelets and platelet clumps of similar area.
        weak_nucleus_mass: a nucleus with less stain than ``min_nucleus_mass`` but at least
            this fraction of it is still a white cell when a cell body surrounds it (see
            ``min_weak_cytoplasm``): defocus and motion blur spread the stain below
            ``nucleus_level`` and so cut the mass of small-lobed nuclei, and a red-cell size read
            large (crisp cells with filled centres) makes the rule stricter.
        min_weak_cytoplasm: cytoplasm (body beyond the nucleus core), in red-cell areas, that
            such a faint nucleus needs; platelets and platelet clumps have none.
        edge_level: a cell whose body reaches the frame border is cut by it only when its body
            at ``edge_level`` x ``cell_level`` (firm cytoplasm) reaches the border too; faint
            stain beyond (vignetted corners, pale neighbours) neither cuts it nor widens its box.
        max_cell_diameter: largest nucleus group extent; bigger stained areas are smears or clumps
            (generous, so that an underestimated red-cell size never drops a large cell).
        min_edge_depth: a cell cut by the frame border is reported only when its stained body
            reaches at least this far into the frame (about a third of a white cell, which is
            ~1.4 red cells across: about half the cell with the pale rim an annotator's box
            takes in); thinner slivers are left for the frames in which the cell is in view.
            (At 0.6, 6 of BCCD's 287 cells in view after a 1.25x zoom were dropped though
            half of each was in the frame.)
        max_cytoplasm: how far the cell body may reach beyond the nucleus.
        background_percentile: percentile of each channel taken as the illuminant (the glass).
        body_any_hue: the cell body is stain off the red-cell direction in any hue (takes in
            lilac neutrophil and orange eosinophil cytoplasm); False uses only the nucleus-stain
            channel (blue cytoplasm only, tighter boxes).
        rbc_every: in a video (``find(frame, in_sequence=True)``) the red-cell diameter, which
            only a change of objective or camera alters, the stain directions, which only
            another slide alters, and the illumination field (lamp and optics) are measured on
            every n-th frame and kept in between (frame to frame they vary by ~1 %); 1 measures
            every frame.
    """

    working_width: int = 160
    rbc_diameter: float = 100.0
    reference_width: int = 640
    estimate_rbc: bool = True
    min_red_cell_fraction: float = 0.05
    nucleus_level: float = 0.55
    cell_level: float = 0.2
    merge_distance: float = 0.2
    min_nucleus_area: float = 0.15
    small_nucleus_area: float = 0.3
    min_small_cytoplasm: float = 0.5
    min_nucleus_mass: float = 0.22
    min_fragment_area: float = 0.08
    weak_nucleus_mass: float = 0.5
    min_weak_cytoplasm: float = 1.0
    edge_level: float = 1.5
    max_cell_diameter: float = 5.0
    min_edge_depth: float = 0.5
    max_cytoplasm: float = 0.5
    background_percentile: float = 97.0
    body_any_hue: bool = True
    rbc_every: int = 8

    def __post_init__(self) -> None:
        if self.rbc_every < 1:
            raise ValueError(f"rbc_every must be >= 1, got {self.rbc_every}")
        if self.working_width < 32:
            raise ValueError(f"working_width must be >= 32 pixels, got {self.working_width}")
        if self.rbc_diameter <= 0:
            raise ValueError(f"rbc_diameter must be > 0 pixels, got {self.rbc_diameter}")
        if self.reference_width < 32:
            raise ValueError(f"reference_width must be >= 32 pixels, got {self.reference_width}")
        if not 0.0 < self.cell_level <= self.nucleus_level:
            raise ValueError(
                f"need 0 < cell_level <= nucleus_level, got {self.cell_level}, {self.nucleus_level}"
            )
        if not 50.0 <= self.background_percentile < 100.0:
            raise ValueError(
                f"background_percentile must be in [50, 100), got {self.background_percentile}"
            )


def _as_frame(image: np.ndarray | Frame) -> Frame:
    """Validate the input -> a Frame (an array is wrapped, so its half-size copy is made once
    however many steps read it)."""
    if not isinstance(image, Frame):
        if not isinstance(image, np.ndarray):
            raise InputError(
                f"segmenter needs an H x W x 3 uint8 BGR numpy image, got {type(image).__name__}"
            )
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(
                "segmenter needs an H x W x 3 uint8 BGR image, got "
                f"shape {image.shape} dtype {image.dtype}"
            )
        image = Frame(image)
    if image.height < 8 or image.width < 8:
        raise InputError(f"image too small to segment: {image.width}x{image.height} px")
    return image


def _no_cells() -> Detections:
    """Empty result with the same ``data`` keys as a non-empty one."""
    return Detections(
        xyxy=np.empty((0, 4), np.float32),
        data={k: np.empty(0, np.float32) for k in ("nucleus_area", "nucleus_mass")},
    )


def _shrink(frame: Frame, sw: int, sh: int) -> np.ndarray:
    """Reduce to (sw, sh): exact area-averaged halvings first (OpenCV's fast 2x path, the first
    one the frame's shared half-size copy), then the rest (less than 2x) by a 3x3 Gaussian
    blur and linear interpolation, which keeps area averaging's anti-aliasing at a fraction of
    its cost at a fractional ratio (about 5x cheaper from 320x240 to a low-magnification
    frame's 270x203)."""
    small = frame.reduced(sw, sh)
    while small.shape[1] >= 2 * sw and small.shape[0] >= 2 * sh:
        small = cv2.resize(
            small, (small.shape[1] // 2, small.shape[0] // 2), interpolation=cv2.INTER_AREA
        )
    if small.shape[1] != sw or small.shape[0] != sh:
        small = cv2.resize(cv2.GaussianBlur(small, (3, 3), 0), (sw, sh),
                           interpolation=cv2.INTER_LINEAR)
    return small


def _quantile(a: np.ndarray, q: float) -> float:
    """q-quantile (0..1) of a 1-D array by partial sort (no interpolation; cheaper)."""
    k = int(q * (a.size - 1))
    return float(np.partition(a, k)[k])


def _percentile_u8(hist: np.ndarray, q: float) -> float:
    """q-th percentile of a 256-bin histogram."""
    cdf = np.cumsum(hist)
    return float(np.searchsorted(cdf, cdf[-1] * q / 100.0))


@functools.lru_cache(maxsize=8)
def _quadratic_bases(
    blocks: tuple[int, int], size: tuple[int, int], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Quadratic-surface design matrices (1, x, y, x², xy, y² in frame-relative coordinates) at
    the centres of ``blocks`` (rows, cols) of ``k`` pixels over a frame of ``size`` (h, w), and on
    the ``_COARSE`` grid the fitted field is evaluated on (then resized to the frame)."""
    hs, ws = size

    def design(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        gy, gx = np.meshgrid(ys, xs, indexing="ij")
        return np.stack([np.ones_like(gx), gx, gy, gx * gx, gx * gy, gy * gy], -1).reshape(-1, 6)

    by = (np.arange(blocks[0], dtype=np.float32) * k + k / 2) / hs - 0.5
    bx = (np.arange(blocks[1], dtype=np.float32) * k + k / 2) / ws - 0.5
    cy = (np.arange(_COARSE[1], dtype=np.float32) + 0.5) / _COARSE[1] - 0.5
    cx = (np.arange(_COARSE[0], dtype=np.float32) + 0.5) / _COARSE[0] - 0.5
    return design(by, bx).astype(np.float32), design(cy, cx).astype(np.float32)


@dataclass(frozen=True)
class _Stain:
    """A frame's stain directions in optical density: the red cells' unit direction ``u`` and
    median density ``m``, and the nuclear stain's angle ``theta`` in the plane orthogonal to
    ``u`` (spanned by the two rows of ``basis``)."""

    u: np.ndarray
    m: float
    theta: float
    basis: np.ndarray


@dataclass(frozen=True)
class _Reading:
    """What a frame's reading measured that a video keeps for a few frames: the illumination
    field (on the ``_COARSE`` grid; None when the frame was too small to fit one), the stain
    directions and the part outside the field of view (at the working width it was read at;
    None: none)."""

    field: np.ndarray | None
    stain: _Stain
    outside: np.ndarray | None = None


@dataclass
class _Kept:
    """A video's red-cell size and reading as last measured: frame size it was read on,
    diameter (full-res px), whether it was measured (not the configured fallback), the
    illumination field and stain, frames it has been kept for."""

    frame_size: tuple[int, int]
    diameter: float
    measured: bool
    reading: _Reading
    frames: int = 0


class _Planes(NamedTuple):
    """A frame read at a working width (:meth:`Segmenter._planes`): nucleus-stain plane ``f``,
    the optical density ``od`` the cell-body stain is read from (:meth:`body`), the red-cell
    diameter in working px, the working-to-frame scale, and the reading (illumination field,
    stain, field of view) it was read with."""

    f: np.ndarray
    od: np.ndarray
    #: (2, 3) the two axes off the red-cell direction, in units of red-cell density; None: the
    #: cell body is read on ``f`` (``SegmenterOptions.body_any_hue`` off)
    off_axes: np.ndarray | None
    d_small: float
    sxy: tuple[float, float]
    reading: _Reading

    def body(self, ys: slice, xs: slice) -> np.ndarray:
        """The cell-body stain of one window: the stain off the red-cell direction in any hue
        (or the nuclear stain). Read per cell window, not over the frame: only the few windows
        around nuclei need it."""
        if self.off_axes is None:
            return self.f[ys, xs]
        a = cv2.transform(self.od[ys, xs], self.off_axes[:1])
        b = cv2.transform(self.od[ys, xs], self.off_axes[1:])
        return cv2.magnitude(a, b)


def _width_for(rbc_diameter: float, width: int, frame_width: int) -> int:
    """Working width for a frame whose red cells are ``rbc_diameter`` full-res px across: the
    usual ``width``, or at low magnification (red cells under ``_MIN_RBC_WORKING`` working px,
    too few to tell a nucleus from a platelet) one giving them ~24 px."""
    d_small = rbc_diameter * width / frame_width
    if d_small >= _MIN_RBC_WORKING or width >= frame_width:
        return width
    return min(frame_width, int(round(width * 24.0 / d_small)))


def _centre_index(xyxy: np.ndarray, w: int, h: int) -> int | None:
    """Index of the box over the image centre (nearest centre first), else of the box whose
    centre is nearest the image centre within ``_SINGLE_MAX_OFFSET`` of the shorter side."""
    if not len(xyxy):
        return None
    cx, cy = w / 2.0, h / 2.0
    bc = (xyxy[:, :2] + xyxy[:, 2:]) / 2.0
    dist = np.hypot(bc[:, 0] - cx, bc[:, 1] - cy)
    over = (xyxy[:, 0] <= cx) & (cx <= xyxy[:, 2]) & (xyxy[:, 1] <= cy) & (cy <= xyxy[:, 3])
    if over.any():
        return int(np.flatnonzero(over)[np.argmin(dist[over])])
    k = int(np.argmin(dist))
    return k if dist[k] <= _SINGLE_MAX_OFFSET * min(w, h) else None


def _components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """8-connected components of a uint8 mask with their stats, as
    ``cv2.connectedComponentsWithStats`` gives them (same labels and order), by the block-based
    algorithm: ~3x faster than the default one on a working frame, whose statistics pass
    dominates (measured on one thread: 45 vs 130 us for 160x120)."""
    return cv2.connectedComponentsWithStatsWithAlgorithm(mask, 8, cv2.CV_32S, cv2.CCL_BBDT)


def _boxed_components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components of a uint8 mask: their number (background included), labels and
    boxes ``(x, y, w, h)`` per label, the same as :func:`_components` gives, at half its cost on a
    sparse working frame (0.09 vs 0.18 ms at 241x181): the labels alone, and each box from the
    component's outer contour instead of a statistics pass over every pixel."""
    n, labels = cv2.connectedComponentsWithAlgorithm(mask, 8, cv2.CV_32S, cv2.CCL_BBDT)
    boxes = np.zeros((n, 4), np.int32)
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    parents = [] if hierarchy is None else hierarchy[0][:, 3]
    for contour, parent in zip(contours, parents, strict=True):
        if parent < 0:  # an outer contour (holes are its children; a component in a hole is not)
            x, y = contour[0, 0]
            boxes[labels[y, x]] = cv2.boundingRect(contour)
    return n, labels, boxes


def _granulometry(mask: np.ndarray, lo: float, hi: float) -> float | None:
    """Disc radius (px, bisected in [lo, hi]) whose morphological opening keeps
    ``_GRANULOMETRY_KEEP`` of the mask's area; None when no trial disc does: the mask holds no
    disc-shaped cells (e.g. only the rims of pale red cells whose centres open to the border, in
    a crop zoomed in on one white cell), and the bisection's floor would be read as a size.
    Touching and overlapping red cells do not fool it (a disc still fits each cell), unlike blob
    sizes or distance maxima. Opening by radius r = points within r of a point at least r deep,
    so each trial radius costs two distance transforms (one when no point is that deep)."""
    area = int(np.count_nonzero(mask))
    depth = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    deepest = float(depth.max())
    lo0 = lo
    for _ in range(6):
        r = (lo + hi) / 2
        kept = 0  # no disc wider than the deepest point fits
        if r <= deepest:
            outside = (depth < r).astype(np.uint8)
            kept = np.count_nonzero(cv2.distanceTransform(outside, cv2.DIST_L2, 3) <= r)
        lo, hi = (r, hi) if kept > area * _GRANULOMETRY_KEEP else (lo, r)
    return None if lo == lo0 else (lo + hi) / 2


def _round_holes(holes: np.ndarray) -> np.ndarray:
    """The round ones of the enclosed background pieces (uint8 mask): a red cell's pale centre is
    about a disc (area / inscribed disc area ~1), the plasma enclosed by a ring of packed red
    cells (crowded, zoomed-out frames) an elongated or branched channel. A piece is round when
    its area is at most ``_ROUND_HOLE`` times its inscribed disc's; filling the others merged
    packed cells into blobs whose size was read 1.5-2x too large."""
    ys, xs = np.nonzero(holes)
    if not len(ys):
        return holes
    n, lab = cv2.connectedComponents(holes, connectivity=4)
    depth = cv2.distanceTransform(holes, cv2.DIST_L2, 3)
    lv = lab[ys, xs]
    # round: some pixel at least sqrt(area / (_ROUND_HOLE pi)) deep (or that radius <= 0.7 px)
    least = np.sqrt(np.bincount(lv, minlength=n) / (_ROUND_HOLE * np.pi))
    deep = np.bincount(lv, weights=depth[ys, xs] >= least[lv], minlength=n)
    round_ = (deep > 0) | (least <= 0.7)
    round_[0] = False
    return round_[lab].astype(np.uint8)


def _body(
    planes: _Planes, core: np.ndarray, level: float, window: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Cell-body stain of one cell's window (x1, y1, x2, y2) of the frame -> (smoothed stain,
    body mask: above ``level``, opened, with the nucleus cores). Cytoplasm is faint but wide, so
    it is averaged (5x5) before thresholding (thin red-cell rims drop out); the opening (3x3)
    drops single pixels. Read with a 4-pixel margin (what the blur and the opening reach), so
    the window holds exactly what the whole frame would, for a few windows' cost instead of the
    frame's."""
    x1, y1, x2, y2 = window
    hs, ws = core.shape
    mx1, my1, mx2, my2 = max(0, x1 - 4), max(0, y1 - 4), min(ws, x2 + 4), min(hs, y2 + 4)
    smooth = cv2.blur(planes.body(slice(my1, my2), slice(mx1, mx2)), (5, 5))
    body = cv2.morphologyEx((smooth > level).astype(np.uint8), cv2.MORPH_OPEN, _OPEN3)
    inner = (slice(y1 - my1, y2 - my1), slice(x1 - mx1, x2 - mx1))
    return smooth[inner], body[inner] | core[y1:y2, x1:x2]


def _connected_to(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The parts of boolean ``mask`` (8-connected) that touch the boolean ``seed`` pixels."""
    nb, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if nb <= 2:
        return mask
    connected = np.zeros(nb, dtype=bool)
    connected[lab[seed & mask]] = True
    connected[0] = False
    return connected[lab]


class Segmenter:
    """Finds white cells in a smear frame; stateless between frames except diagnostics."""

    def __init__(self, options: SegmenterOptions | None = None) -> None:
        self.options = options or SegmenterOptions()
        #: Red-cell diameter (full-res px) used for the last frame, and whether it was measured.
        self.last_rbc_diameter: float = self.options.rbc_diameter
        self.last_rbc_measured: bool = False
        #: The illuminant (BGR) of the last frame.
        self.last_background: tuple[float, float, float] = (0.0, 0.0, 0.0)
        #: Darkest / brightest point of the last frame's illumination field (1.0: even).
        self.last_illumination: float = 1.0
        #: Video: the red-cell size, illumination and stain of the last measuring frame, and for
        #: how many frames kept.
        self._kept: _Kept | None = None

    # -- public -------------------------------------------------------------------------------
    def expected_diameter(self, frame_width: int) -> float:
        """The configured red-cell diameter (full-res px) for a frame ``frame_width`` px wide:
        ``rbc_diameter``, times ``frame_width / reference_width`` for a wider frame (a camera
        with more pixels over the same field: a 1920-px frame at BCCD's magnification has red
        cells ~300 px across, not 100)."""
        opt = self.options
        return opt.rbc_diameter * max(1.0, frame_width / opt.reference_width)

    def find(self, image: np.ndarray | Frame, *, in_sequence: bool = False) -> Detections:
        """White cells in one BGR frame -> Detections (full-res xyxy, score, area, touches_edge).

        ``in_sequence``: the frame follows the one the previous call read, in one video (the
        analyzer sets it); the red-cell diameter is then re-measured only every ``rbc_every``
        frames (and at low magnification the frame is read once, at the width it needs)."""
        frame = _as_frame(image)
        w = frame.width
        opt = self.options
        width = min(opt.working_width, w)
        kept = self._kept_for(frame, in_sequence)
        if kept is not None:
            if kept.measured:
                width = _width_for(kept.diameter, width, w)
            planes = self._planes(frame, width, kept.diameter, reading=kept.reading)
        else:
            first = self._first_width(frame, width, in_sequence)
            planes = self._planes(frame, first)
            if planes is not None and self.last_rbc_measured:
                # read again at the width the red cells need: wider at low magnification,
                # narrower when a wide first reading was more than they need
                need = _width_for(self.last_rbc_diameter, width, w)
                if need > first or need * _NARROWER < first:
                    planes = self._planes(frame, need)
            if planes is not None:
                self._kept = _Kept((w, frame.height), self.last_rbc_diameter,
                                   self.last_rbc_measured, planes.reading)
        if planes is None:
            return _no_cells()
        return self._cells(planes)

    def _first_width(self, frame: Frame, width: int, in_sequence: bool) -> int:
        """The working width a frame that measures its red cells is first read at: wide enough
        for the smallest red cells (the configured size at ``_LOWEST_MAGNIFICATION``) to be
        measured, which for a frame up to 640 px wide is the usual ``width``; in a video whose
        red cells were measured, no wider than they needed then (a camera's frames keep their
        magnification)."""
        w = frame.width
        smallest = _LOWEST_MAGNIFICATION * self.options.rbc_diameter
        first = max(width, min(w, int(np.ceil(w * _FIRST_READ_RBC / smallest))))
        kept = self._kept
        if (in_sequence and kept is not None and kept.measured
                and kept.frame_size == (w, frame.height)):
            first = max(width, min(first, _width_for(kept.diameter, width, w)))
        return first

    def _kept_for(self, frame: Frame, in_sequence: bool) -> _Kept | None:
        """The red-cell size and reading kept from an earlier frame of this video, or None when
        this frame must measure them (sets ``last_rbc_*`` when they are kept)."""
        kept = self._kept
        if (not in_sequence or kept is None or kept.frame_size != (frame.width, frame.height)
                or kept.frames + 1 >= self.options.rbc_every):
            return None
        kept.frames += 1
        self.last_rbc_diameter, self.last_rbc_measured = kept.diameter, kept.measured
        return kept

    def find_single(self, image: np.ndarray | Frame) -> Detections:
        """The one cell of a single-cell image -> Detections of at most one row.

        A single-cell image is a crop centred on one cell, as analysers' galleries and the
        public cell-image sets show them: the cell may fill the crop or touch its edge, and red
        cells around it may be few or none, so the red-cell size and stain read from the crop
        can be off. The cell is the one :meth:`find` reports over the centre (or nearest to it,
        within a fifth of the crop); failing that, the densest nuclear stain at the centre,
        boxed with a rim of cytoplasm. An image with no nucleus near its centre, or only a
        platelet-sized one, gives no cell.
        """
        frame = _as_frame(image)
        det = self.find(frame)
        k = _centre_index(det.xyxy, frame.width, frame.height)
        if k is not None:
            return det[[k]]
        return self._centre_nucleus(frame)

    def find_still(self, image: np.ndarray | Frame) -> Detections:
        """White cells of a still photo, recognising single-cell images.

        A photo whose only whole cell sits over its centre and is large for the photo (at least
        a fifth of its shorter side; other cells, if any, cut by its edge) is a single-cell
        image: the result is that one cell (:meth:`find_single`). Any other photo is a field and
        gets :meth:`find`'s cells; when none of them is over the centre but a large nucleus is
        (a single-cell crop whose red-cell size misread), that cell is added to them.
        """
        frame = _as_frame(image)
        h, w = frame.height, frame.width
        det = self.find(frame)
        k = _centre_index(det.xyxy, w, h)
        others = [i for i in range(len(det)) if i != k and not det.touches_edge[i]]

        def big(box: np.ndarray) -> bool:
            return max(box[2] - box[0], box[3] - box[1]) >= _SINGLE_MIN_SIZE * min(w, h)

        if k is not None:
            return det[[k]] if big(det.xyxy[k]) and not others else det
        one = self._centre_nucleus(frame)
        if not len(one):
            return det
        if not others:
            return one
        if not big(one.xyxy[0]):
            return det
        # A large nucleus over the centre that the field analysis did not box (in a crop
        # zoomed in on one cell, pale red cells cut by the border can read as rings and the
        # red-cell size small, which makes the cell too large to be one): the cell is added,
        # the field's cells that do not overlap it kept.
        apart = box_iou(det.xyxy, one.xyxy)[:, 0] == 0
        return Detections.concat([one, det[apart]])

    def _centre_nucleus(self, frame: Frame) -> Detections:
        """The densest nuclear stain at the centre of a crop, boxed with its cytoplasm rim."""
        opt = self.options
        planes = self._planes(frame, min(opt.working_width, frame.width), ring=True)
        if planes is None:
            return _no_cells()
        f, d, sxy = planes.f, planes.d_small, planes.sxy
        hs, ws = f.shape
        cy, cx = hs // 2, ws // 2
        win = f[hs // 3 : hs - hs // 3, ws // 3 : ws - ws // 3]
        peak = _quantile(win.ravel(), 0.98) if win.size else 0.0
        if peak < opt.nucleus_level:
            return _no_cells()  # nothing nuclear at the centre
        core = (f > max(opt.nucleus_level, 0.5 * peak)).astype(np.uint8)
        rm = max(1, int(round(opt.merge_distance * d / 2)))
        grown = cv2.dilate(core, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rm + 1,) * 2))
        n, labels, stats, cents = _components(grown)
        if n < 2:
            return _no_cells()
        dist = np.hypot(cents[1:, 0] - cx, cents[1:, 1] - cy)
        i = int(labels[cy, cx]) or 1 + int(np.argmin(dist))
        if labels[cy, cx] == 0 and dist[i - 1] > _SINGLE_MAX_OFFSET * min(hs, ws):
            return _no_cells()
        own = (labels == i) & (core > 0)
        area = float(np.count_nonzero(own))
        x, y, bw, bh = (int(v) for v in stats[i, :4])
        # a nucleus: red-cell sized rules where the red cells were measured, else (or when the
        # nucleus fills much of the crop) its size relative to the crop
        rbc_area = np.pi / 4 * d * d
        large = max(bw, bh) - 2 * rm >= _SINGLE_MIN_SIZE * min(hs, ws)
        if area < opt.small_nucleus_area * rbc_area and not large:  # platelet-sized
            return _no_cells()
        pad = int(round(0.3 * max(bw, bh)))
        x1, y1 = max(0, x - pad), max(0, y - pad)
        x2, y2 = min(ws, x + bw + pad), min(hs, y + bh + pad)
        touches = x1 == 0 or y1 == 0 or x2 == ws or y2 == hs
        mass = (float(f[own].sum()) - opt.nucleus_level * area) / (opt.nucleus_level * rbc_area)
        return Detections(
            xyxy=np.array([[x1 * sxy[0], y1 * sxy[1], x2 * sxy[0], y2 * sxy[1]]], np.float32),
            score=np.array([1.0 - 0.5 ** max(mass / opt.min_nucleus_mass, 0.0)], np.float32),
            area=np.array([(x2 - x1) * (y2 - y1) * sxy[0] * sxy[1]], np.float32),
            touches_edge=np.array([touches]),
            data={
                "nucleus_area": np.array([area * sxy[0] * sxy[1]], np.float32),
                "nucleus_mass": np.array([mass], np.float32),
            },
        )

    def _planes(
        self, frame: Frame, width: int, rbc: float | None = None, ring: bool = False,
        reading: _Reading | None = None,
    ) -> _Planes | None:
        """The frame read at ``width`` working pixels (:class:`_Planes`); None when the frame
        is too dark to read. ``rbc``: the red-cell diameter (full-res px) when known
        already (kept in a video), else measured. ``ring``: the red-cell stain is read from the
        outer band of the frame only (a crop centred on a large cell: the red cells are around
        it). ``reading``: the illumination field and stain directions when known already (kept
        in a video), else measured."""
        bgr = frame.bgr
        h, w = bgr.shape[:2]
        scale = min(1.0, width / w)
        small = _shrink(frame, width, max(8, int(round(h * scale)))) if scale < 1 else bgr
        sxy = (w / small.shape[1], h / small.shape[0])
        size = (small.shape[1], small.shape[0])
        if (reading is not None and reading.outside is not None
                and reading.outside.shape != small.shape[:2]):
            reading = dataclasses.replace(reading, outside=outside_field(bgr, size))
        # the field of view and the camera's marks: kept with the reading in a video
        outside = reading.outside if reading is not None else outside_field(bgr, size)
        if outside is not None:
            small = glass_filled(small, outside)
        field = reading.field if reading is not None else self._illumination_field(small)
        small = self._flatten_illumination(small, field)
        od = self._optical_density(small)
        if od is None:
            return None
        od2 = None
        if reading is None or rbc is None:
            od2 = np.ascontiguousarray(od[::2, ::2])  # every 4th pixel suffices for statistics
        inside2 = None if outside is None else outside[::2, ::2] == 0
        if reading is None:
            reading = _Reading(field, self._stain(od2, ring, inside2), outside)
        st = reading.stain
        u, m, theta, basis = st.u, st.m, st.theta, st.basis
        # The two axes off the red-cell direction, in units of red-cell density; f is the
        # nucleus-stain channel along ``theta`` between them (the cell body, read per cell, is
        # the any-hue magnitude off the red-cell direction).
        axes = (basis / m).astype(np.float32)
        # Red cells whose colour is closer to the nuclear violet (grey, blue-grey, teal) leave
        # less of a nucleus's stain off their direction: give it back (colour deconvolution's
        # 1 / sin of the angle between the two stains, relative to pink red cells).
        sin_u = float(np.linalg.norm(_VIOLET - float(_VIOLET @ u) * u))
        pink = max(range(len(_RBC_PRIORS)), key=lambda k: float(_RBC_PRIORS[k] @ u)) == 0
        gain = 1.0 if pink else min(max(_SIN_PINK / max(sin_u, 1e-3), 1.0), 2.0)
        along = gain * (float(np.cos(theta)) * axes[0] + float(np.sin(theta)) * axes[1])
        f = cv2.transform(od, along.reshape(1, 3))
        d_small = (self._rbc_diameter(od2, u, m, f, scale, inside2) if rbc is None
                   else rbc * scale)
        return _Planes(f, od, axes if self.options.body_any_hue else None, d_small, sxy, reading)

    def _stain(self, od2: np.ndarray, ring: bool, inside: np.ndarray | None = None) -> _Stain:
        """The stain directions of a frame from its sampled optical density ``od2``; ``ring``:
        the red cells' from the outer band only; ``inside``: from the field of view only (a
        frame half black around a round field would otherwise set the red cells' density by
        the empty glass it was filled with)."""
        sel = inside
        if ring:
            hh, ww = od2.shape[:2]
            band = np.ones((hh, ww), bool)
            band[hh // 4 : hh - hh // 4, ww // 4 : ww - ww // 4] = False
            sel = band if sel is None else band & sel
        if sel is not None:
            u, m = self._rbc_direction(od2[sel].reshape(-1, 1, 3))
        else:
            u, m = self._rbc_direction(od2)
        theta, basis = self._nucleus_direction(od2, u, m)
        return _Stain(u, m, theta, basis)

    # -- steps --------------------------------------------------------------------------------
    @staticmethod
    def _illumination_field(small: np.ndarray) -> np.ndarray | None:
        """The frame's illumination field (vignetting, a lamp off centre) on the ``_COARSE``
        grid; None when the frame is too small to fit one.

        The field is the upper envelope of the glass brightness: the brightest pixel of each
        block (the plasma between cells, where the lamp shows) fitted by a smooth quadratic
        surface, refitted on the blocks at or above it so that blocks covered by cells (no glass
        in them) do not pull it down. A white cell filling a crop cannot dent a quadratic.
        """
        hs, ws = small.shape[:2]
        k = max(4, min(hs, ws) // 10)
        if hs < 3 * k or ws < 3 * k:
            return None
        # block maxima of a 4x area-averaged grey copy (the averaging also drops noise and the
        # tiny bright refractile spots)
        q = 4 if min(hs, ws) >= 16 * 4 else 1
        grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        if q > 1:
            grey = cv2.resize(grey, (ws // q, hs // q), interpolation=cv2.INTER_AREA)
        kq = max(1, k // q)
        top = cv2.dilate(grey, np.ones((kq, kq), np.uint8))[kq // 2 :: kq, kq // 2 :: kq]
        z = top.ravel().astype(np.float32)
        basis, coarse = _quadratic_bases(top.shape, (hs // q, ws // q), kq)
        use = z > 0.5 * z.max()
        coef = np.zeros(6, np.float32)
        coef[0] = z.max()
        for _ in range(2):
            if use.sum() < 12:
                break
            bu = basis[use]
            _, sol = cv2.solve(bu.T @ bu + _RIDGE6, (bu.T @ z[use])[:, None],
                               flags=cv2.DECOMP_CHOLESKY)
            coef = sol.ravel()
            fit = basis @ coef
            use = z >= fit - 0.03 * float(fit.max())  # the upper envelope: glass-bearing blocks
        return (coarse @ coef).reshape(_COARSE[1], _COARSE[0])

    def _flatten_illumination(self, small: np.ndarray, field: np.ndarray | None) -> np.ndarray:
        """The frame with its illumination ``field`` (:meth:`_illumination_field`) divided out;
        frames lit evenly within ``_FLAT_ENOUGH`` are left as they are."""
        if field is None:
            self.last_illumination = 1.0
            return small
        hs, ws = small.shape[:2]
        lo, hi = float(field.min()), float(field.max())
        self.last_illumination = lo / hi if hi > 0 else 1.0
        if hi <= 0 or lo >= _FLAT_ENOUGH * hi:
            return small
        gain = cv2.resize(
            hi / np.maximum(field, 0.2 * hi), (ws, hs), interpolation=cv2.INTER_LINEAR
        )
        return cv2.convertScaleAbs(small.astype(np.float32) * gain[..., None])

    def _optical_density(self, small: np.ndarray) -> np.ndarray | None:
        """Per-pixel optical density relative to the frame illuminant; None for dark frames."""
        q = self.options.background_percentile
        bg = [
            _percentile_u8(cv2.calcHist([small], [c], None, [256], [0, 256]).ravel(), q)
            for c in range(3)
        ]
        self.last_background = (bg[0], bg[1], bg[2])
        if min(bg) < 40:
            log.debug("frame too dark to segment (illuminant %s)", bg)
            return None
        v = np.arange(256, dtype=np.float32)[:, None] + 1.0
        lut = -np.log(np.minimum(v / (np.asarray(bg, dtype=np.float32)[None, :] + 1.0), 1.0))
        return cv2.LUT(small, lut.reshape(1, 256, 3).astype(np.float32))

    @staticmethod
    def _rbc_direction(od2: np.ndarray) -> tuple[np.ndarray, float]:
        """OD direction and median density of the red cells (the commonest stain direction).

        Red cells may be pink, grey or blue-grey/teal depending on stain and camera, so the mode
        of the stained pixels' directions is sought from each of those priors (mean shift in a
        narrowing cone) and the mode holding most pixels wins. Pixels count as stained above
        half the typical stained density, so a large white cell filling a crop (its dense
        nucleus) does not set the bar above the pale red cells around it.
        """
        px = od2.reshape(-1, 3)[::2]  # every 8th working pixel is plenty for two statistics
        dens = px @ _ONES3
        stained = dens > 0.1
        if np.count_nonzero(stained) < 30:
            return _RBC_DIR0.copy(), 1.0
        sel = dens > max(0.1, 0.45 * _quantile(dens, 0.8))
        v = px[sel]
        vd = v / np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]
        best: tuple[int, np.ndarray, np.ndarray] | None = None
        for u0 in _RBC_PRIORS:
            u = u0.copy()
            inside = None
            for cone in (0.9, 0.95, 0.98):  # narrowing cone: converge on the mode, not the mean
                inside = vd @ u > cone
                if inside.sum() < 30:
                    inside = None
                    break
                u = inside.astype(np.float32) @ vd  # sum of the directions inside the cone
                u /= float(np.linalg.norm(u))
            # A mode that drifted far from every red-cell colour is a large white cell's
            # cytoplasm (a frame or crop filled by one cell), not the red cells.
            if inside is None or max(float(q @ u) for q in _RBC_PRIORS) < _RBC_PRIOR_COS:
                continue
            if best is None or int(inside.sum()) > best[0]:
                best = (int(inside.sum()), u, inside)
                if best[0] > 0.5 * len(vd):
                    break  # most stained pixels are of this colour: no other mode can be larger
        if best is None:
            return _RBC_DIR0.copy(), max(_quantile(v @ _RBC_DIR0, 0.5), 0.1)
        _, u, inside = best
        return u.astype(np.float32), max(_quantile(v[inside] @ u, 0.5), 0.1)

    def _nucleus_direction(
        self, od2: np.ndarray, u: np.ndarray, m: float
    ) -> tuple[float, np.ndarray]:
        """Unit OD direction of nuclear stain, orthogonal to the red-cell direction ``u``.

        In the plane orthogonal to ``u`` the prior is "absorbs more red, less blue" turned by
        ``_NUCLEUS_ANGLE``; where the frame has enough strongly blue-shifted pixels (nuclei,
        platelets) within ``_ANGLE_CONE`` of the prior, their median angle is used instead, so
        a stain with redder or bluer nuclei keeps its full contrast.
        """
        n0 = _BLUE_SHIFT - float(_BLUE_SHIFT @ u) * u
        n0 /= float(np.linalg.norm(n0))
        n1 = np.array(  # u x n0 (np.cross is slow on 3-vectors)
            [u[1] * n0[2] - u[2] * n0[1], u[2] * n0[0] - u[0] * n0[2], u[0] * n0[1] - u[1] * n0[0]],
            dtype=np.float32,
        )
        basis = np.stack([n0, n1]).astype(np.float32)
        ab = cv2.transform(od2, basis).reshape(-1, 2)
        strong = ab[np.einsum("ij,ij->i", ab, ab) > (self.options.nucleus_level * m) ** 2]
        theta = _NUCLEUS_ANGLE
        if len(strong) >= 20:
            ang = np.arctan2(strong[:, 1], strong[:, 0])
            near = np.abs(ang - _NUCLEUS_ANGLE) < _ANGLE_CONE
            if near.sum() >= 20:
                theta = _quantile(ang[near], 0.5)
        return theta, basis

    def _rbc_diameter(
        self, od2: np.ndarray, u: np.ndarray, m: float, f: np.ndarray, scale: float,
        inside: np.ndarray | None = None,
    ) -> float:
        """Red-cell diameter in working pixels, measured when possible, else the configured one
        (:meth:`expected_diameter`). ``inside``: the field of view at ``od2``'s resolution, where
        the red cells must cover their share (None: the whole frame)."""
        opt = self.options
        expected = self.expected_diameter(int(round(f.shape[1] / scale)))
        fallback = expected * scale
        self.last_rbc_diameter, self.last_rbc_measured = expected, False
        if not opt.estimate_rbc:
            return fallback
        if sorted(self.last_background)[1] >= 254:
            # Overexposed: the glass is clipped and so are the pale centres of red cells, which
            # breaks them into rings; their size cannot be read reliably. (One clipped channel,
            # as with a cream background whose red saturates, leaves the other two to read.)
            log.debug("illuminant clipped, using the configured red-cell diameter")
            return fallback
        # Everything at half the working resolution (od2): a red cell is still ~12 px across.
        proj = cv2.transform(od2, u.reshape(1, 3))
        rbc = ((proj > 0.6 * m) & (f[::2, ::2] < opt.cell_level)).astype(np.uint8)
        hs, ws = rbc.shape
        area = rbc.size if inside is None else np.count_nonzero(inside)
        if np.count_nonzero(rbc) < max(50, opt.min_red_cell_fraction * area):
            return fallback
        # Fill the pale centres (central pallor): background pieces not reaching the border
        # (4-connected: what a flood of the background from around the frame leaves).
        outer = cv2.copyMakeBorder(rbc, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        cv2.floodFill(outer, None, (0, 0), 1, flags=4)
        holes = 1 - outer[1:-1, 1:-1]
        round_ = _round_holes(holes)
        # radii at half resolution, from the smallest measurable (1 px) up
        lo, hi = 1.0, 1.5 * fallback / 2
        r = _granulometry(rbc | holes, lo, hi)
        if r is None:
            log.debug("no disc-shaped red cells to measure, using the configured diameter")
            return fallback
        if np.count_nonzero(holes) > np.count_nonzero(round_):
            # Some enclosed pieces are not round: slit-like pale centres, or the plasma enclosed
            # by a ring of packed red cells (crowded, zoomed-out frames), whose filling merges
            # the cells into blobs read 1.5-2x too large. Without them, the size falls by far
            # only in the second case.
            r_round = _granulometry(rbc | round_, lo, hi)
            if r_round is not None and r_round < _MERGED * r:
                r = r_round
        d = 4.0 * r * _GRANULOMETRY_CAL
        if not 0.3 * opt.rbc_diameter * scale <= d <= 3.0 * fallback:
            log.debug("implausible red-cell diameter %.1f px, using %.1f", d / scale, fallback)
            return fallback
        self.last_rbc_diameter, self.last_rbc_measured = d / scale, True
        return d

    def _cells(self, planes: _Planes) -> Detections:
        """Group nucleus cores into cells, take their cell bodies and box them. A cell reaching
        the frame's border, or the part outside the field of view, is cut."""
        opt = self.options
        f, d, sxy, outside = planes.f, planes.d_small, planes.sxy, planes.reading.outside
        hs, ws = f.shape
        core = (f > opt.nucleus_level).astype(np.uint8)
        if not core.any():
            return _no_cells()
        rm = max(1, int(round(opt.merge_distance * d / 2)))
        grown = cv2.dilate(core, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rm + 1,) * 2))
        n, labels, spans = _boxed_components(grown)
        is_core = core > 0
        on_core = labels[is_core]
        core_area = np.bincount(on_core, minlength=n).astype(np.float64)
        core_sum = np.bincount(on_core, weights=f[is_core], minlength=n)
        rbc_area = np.pi / 4 * d * d
        # Nuclear stain "mass": stain above the core level summed over the core, in red-cell
        # areas x level. Dense lymphocyte nuclei and large lobed nuclei score high, granular pale
        # platelets (no DNA) low even when a giant platelet reaches a small nucleus's area.
        mass = (core_sum - opt.nucleus_level * core_area) / (opt.nucleus_level * rbc_area)
        ok = (
            (core_area >= opt.min_nucleus_area * rbc_area)
            & (mass >= opt.weak_nucleus_mass * opt.min_nucleus_mass)
            & (np.maximum(spans[:, 2], spans[:, 3]) - 2 * rm <= opt.max_cell_diameter * d)
        )
        ok[0] = False  # the background
        keep = [int(i) for i in np.flatnonzero(ok)]
        if not keep:
            return _no_cells()
        reach = max(1, int(round(opt.max_cytoplasm * d)))
        boxes, scores, areas, edges, nuc, con = [], [], [], [], [], []
        for i in keep:
            x, y, bw, bh = (int(v) for v in spans[i])
            x1, y1 = max(0, x - reach), max(0, y - reach)
            x2, y2 = min(ws, x + bw + reach), min(hs, y + bh + reach)
            smooth, body = _body(planes, core, opt.cell_level, (x1, y1, x2, y2))
            own = (labels[y1:y2, x1:x2] == i) & (core[y1:y2, x1:x2] > 0)
            dist_own = cv2.distanceTransform((~own).astype(np.uint8), cv2.DIST_L2, 3)
            region = (body > 0) & (dist_own <= reach)
            others = (labels[y1:y2, x1:x2] > 0) & (labels[y1:y2, x1:x2] != i)
            others &= core[y1:y2, x1:x2] > 0
            if others.any():
                dist_oth = cv2.distanceTransform((~others).astype(np.uint8), cv2.DIST_L2, 3)
                region &= dist_own <= dist_oth
            # Keep the part of the body connected to this nucleus.
            region = _connected_to(region, own)
            # Largest solid piece of the nucleus group: a nucleus (or a lobe of one) is a blob;
            # a platelet clump is a scatter of platelet-sized dots however many there are.
            _, _, fst, _ = _components(own.view(np.uint8))
            biggest = float(fst[1:, 4].max()) if len(fst) > 1 else 0.0
            if biggest < opt.min_fragment_area * rbc_area:
                continue
            # A faint nucleus, or a scatter of pieces none of which is most of it (a platelet
            # clump looks like that; so do the lobes of a neutrophil, inside their cytoplasm),
            # needs a white cell's cytoplasm around it.
            cyto = np.count_nonzero(region) - np.count_nonzero(own)
            # (a piece twice the small-nucleus area is a nucleus's lobe, not a platelet: a cell cut
            # by the frame edge keeps such a lobe but loses part of its cytoplasm)
            scattered = biggest < 0.5 * core_area[i] and biggest < (
                2 * opt.small_nucleus_area * rbc_area
            )
            if (mass[i] < opt.min_nucleus_mass or scattered) and (
                cyto < opt.min_weak_cytoplasm * rbc_area
            ):
                continue
            if core_area[i] < opt.small_nucleus_area * rbc_area and (
                cyto < opt.min_small_cytoplasm * rbc_area
            ):
                continue  # platelet-sized and no cytoplasm: a (giant) platelet
            ys, xs = np.nonzero(region)
            bx1, bx2 = int(xs.min()) + x1, int(xs.max()) + x1 + 1
            by1, by2 = int(ys.min()) + y1, int(ys.max()) + y1 + 1
            if bx1 <= 0 or by1 <= 0 or bx2 >= ws or by2 >= hs:
                # Reaching the border: is that the cell, or faint stain next to it (a vignetted
                # corner, a pale neighbour)? Only body at a confident level counts as cut.
                firm = region & (smooth > opt.edge_level * opt.cell_level)
                firm = _connected_to(firm | own, own)
                fy, fx = np.nonzero(firm)
                # (a cell whose cytoplasm is faint all over keeps its whole body: nothing tells
                # its faint stain from faint stain beyond it)
                if fx.size >= _FIRM_FRACTION * np.count_nonzero(region) and not (
                    fx.min() + x1 <= 0
                    or fy.min() + y1 <= 0
                    or fx.max() + x1 + 1 >= ws
                    or fy.max() + y1 + 1 >= hs
                ):
                    # The cell stands clear of the border: its mask is the firm body with the
                    # faint rim around it (0.1 red-cell diameters), not the faint stain beyond.
                    g = max(1, int(round(0.1 * d)))
                    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * g + 1,) * 2)
                    region = region & (cv2.dilate(firm.astype(np.uint8), disc) > 0)
                    ys, xs = np.nonzero(region)
                    bx1, bx2 = int(xs.min()) + x1, int(xs.max()) + x1 + 1
                    by1, by2 = int(ys.min()) + y1, int(ys.max()) + y1 + 1
            depth = []
            if bx1 <= 0 or bx2 >= ws:
                depth.append(bx2 - bx1)
            if by1 <= 0 or by2 >= hs:
                depth.append(by2 - by1)
            touches = bool(depth)
            if touches and min(depth) < opt.min_edge_depth * d:
                continue  # a sliver of a cell at the border: not nameable, not reported
            if outside is not None and not touches:
                # at the field stop: the cell's body against the black surround's rim
                ring = cv2.dilate(outside[y1:y2, x1:x2], _OPEN3)
                touches = bool(np.count_nonzero(ring[region]))
            boxes.append([bx1 * sxy[0], by1 * sxy[1], bx2 * sxy[0], by2 * sxy[1]])
            areas.append(float(region.sum()) * sxy[0] * sxy[1])
            edges.append(touches)
            nuc.append(core_area[i] * sxy[0] * sxy[1])
            con.append(mass[i])
            scores.append(float(1.0 - 0.5 ** (mass[i] / opt.min_nucleus_mass)))
        return Detections(
            xyxy=np.asarray(boxes, dtype=np.float32),
            score=np.asarray(scores, dtype=np.float32),
            area=np.asarray(areas, dtype=np.float32),
            touches_edge=np.asarray(edges, dtype=bool),
            data={
                "nucleus_area": np.asarray(nuc, dtype=np.float32),
                "nucleus_mass": np.asarray(con, dtype=np.float32),
            },
        )
