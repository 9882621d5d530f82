"""Smear simulator: a synthetic microscope video of a blood smear with per-cell ground truth.

No public data set gives smear *videos* with the identity of every white cell in every frame, so
this module renders one. A virtual slide several times larger than the camera's view is painted
once (red cells with central pallor, some crenated; platelets, some clumped; white cells of the
five types drawn with their textbook morphology, never touching each other), in optical-density
space so overlapping cells darken like stained cells do. A camera then moves over the slide the
way a person drives a stage: pauses, pans in all directions at changing speeds (some fast),
sub-pixel nudges, and returns to places already seen, so the same cell leaves and re-enters the
view. Each frame gets focus drift (including fully blurred moments), motion blur, vignetting and
uneven illumination, sensor noise, and the file is compressed (H.264 'avc1' where OpenCV can
write it, else 'mp4v'). Colours, red-cell density and cell sizes are matched to the BCCD
photographs (100x objective, 640x480, red cell ~105 px across; other frame sizes keep the field
of view, so cells scale with the frame). Stain strength, white balance, illumination and motion
style change with the seed; everything is deterministic from the seed (same seed: identical
truth.json and identical frames before compression; frame i can be rendered on its own).

Only NumPy and OpenCV are needed (no TensorFlow): the runtime's ``demo`` source uses it.
Painting a 640x480 slide (8 frame areas) takes about a second and ~70 MB transiently; a frame
then costs a warp, blur, vignetting and noise (~7 ms on one core at 640x480).

Python API:
    - :func:`make_slide` / :class:`Slide`: the painted slide and its white cells.
    - :class:`SlideSimulator`: slide + camera + optics; ``frame(i) -> (bgr, frame_truth)``.
    - :func:`iter_frames`: generator of ``(frame_bgr, frame_truth)`` (endless if ``seconds=None``),
      no disk I/O.
    - :func:`render_video`: writes ``video.mp4`` and ``truth.json`` into a folder.
    - :func:`load_truth`: reads and validates a ``truth.json`` (or the folder holding it).
    - :func:`annotate` / :func:`save_docs_frame`: draw the truth on a frame (docs/synth_frame.png).
    - :func:`main`: the ``hematovision synth`` handler.
    - :class:`SynthSettings`: every knob (density, type mix, stain, optics, motion); the functions
      above take its fields as keyword arguments, e.g. ``wbc_mix={"eosinophil": 1}``.

truth.json (version 1)::

    {
      "version": 1,
      "seed": 0,                      # the --seed
      "fps": 30.0,
      "size": [640, 480],             # frame width, height
      "frames": 1800,                 # frames in video.mp4 == len(frame_truth)
      "video": {"file": "video.mp4", "codec": "avc1" | "mp4v"},
      "slide_size": [W, H],           # virtual slide in pixels (frame pixel scale)
      "settings": {...},              # every SynthSettings field as used (stain, optics, motion)
      "cells": [                      # every white cell on the slide, seen or not
        {"id": 0, "label": "neutrophil", "slide_box": [x1, y1, x2, y2],
         "diameter_um": 13.1}
      ],
      "frame_truth": [                # one entry per frame, in order
        {"frame": 0, "t": 0.0,
         "camera": [x, y],            # slide position of the frame's top-left corner (float)
         "segment": "pause" | "pan" | "fast_pan" | "return" | "nudge",
         "motion": [dx, dy],          # camera displacement to the next frame, pixels
         "blur": 0.8,                 # Gaussian defocus sigma of the whole frame, pixels
         "cells": [                   # every white cell at least partly in view
           {"id": 0, "box": [x1, y1, x2, y2],   # frame pixels, visible part, clipped to frame
            "visible_fraction": 0.93,            # share of the cell's area inside the frame
            "blur": 0.8}
         ]}
      ]
    }

Boxes are ``[x1, y1, x2, y2]`` floats with x2/y2 exclusive (pixel-edge coordinates); a cell's
box covers its whole cytoplasm. Red cells and platelets are not listed.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detector.core import CELL_TYPES
from detector.errors import InputError

log = logging.getLogger(__name__)

TRUTH_VERSION = 1
RBC_UM = 7.5
#: Red-cell diameter in frame pixels at 640x480 (BCCD, 100x objective: ~90-110 px).
RBC_PX_640 = 105.0
#: White-cell diameters in micrometres (min, max).
WBC_DIAMETER_UM: dict[str, tuple[float, float]] = {
    "neutrophil": (12.0, 15.0),
    "eosinophil": (12.0, 17.0),
    "basophil": (10.0, 14.0),
    "lymphocyte": (7.0, 10.0),
    "monocyte": (15.0, 20.0),
}
LARGE_LYMPHOCYTE_UM = (10.0, 15.0)
#: A normal adult differential (fractions).
NORMAL_DIFFERENTIAL: dict[str, float] = {
    "neutrophil": 0.60,
    "lymphocyte": 0.30,
    "monocyte": 0.06,
    "eosinophil": 0.03,
    "basophil": 0.01,
}
MIN_SIZE = (128, 96)
MAX_SLIDE_PIXELS = 24_000_000

# Reference illuminant (BGR, 0-255) that the target colours below are measured against.
_I0 = np.array([206.0, 212.0, 206.0], np.float32)


_Lobe = tuple[float, float, float, float, float]  # centre x, y, half axes, angle (degrees)


def _od(bgr: tuple[float, float, float]) -> np.ndarray:
    """Optical density (per BGR channel) of a stain that shows colour ``bgr`` on the illuminant."""
    return np.log(_I0 / np.asarray(bgr, np.float32)).astype(np.float32)


# Target colours (BGR) read off the BCCD photographs, as optical densities.
_OD = {
    "plasma": _od((196, 203, 197)),
    "rbc": _od((155, 158, 186)),
    "nucleus": _od((204, 98, 130)),
    "nucleus_dense": _od((196, 86, 116)),
    "nucleus_mono": _od((207, 112, 143)),
    "neut_cyto": _od((206, 178, 192)),
    "neut_gran": _od((198, 165, 190)),
    "eos_cyto": _od((200, 185, 200)),
    "eos_gran": _od((150, 118, 184)),
    "baso_gran": _od((172, 80, 122)),
    "baso_cyto": _od((200, 175, 195)),
    "lymph_cyto": _od((204, 180, 160)),
    "mono_cyto": _od((204, 178, 160)),
    "platelet": _od((200, 165, 180)),
    "platelet_gran": _od((185, 125, 155)),
}
_HEMA_KEYS = {"nucleus", "nucleus_dense", "nucleus_mono", "baso_gran", "lymph_cyto", "mono_cyto",
              "platelet", "platelet_gran", "neut_gran"}
_EOSIN_KEYS = {"rbc", "eos_gran", "neut_cyto", "eos_cyto", "baso_cyto"}


@dataclass
class SynthSettings:
    """Every knob of the simulator. Fields left ``None`` are drawn from the seed (stain, optics
    and motion style change from slide to slide); pass a value to fix one."""

    # --- slide ---
    slide_area: float = 8.0
    """Slide area in frame areas (the camera sees 1/slide_area of it at a time)."""
    rbc_px: float | None = None
    """Red-cell diameter in frame pixels; None: 100 px at 640x480, scaled with the frame size."""
    rbc_cover: float = 1.0
    """Red-cell area per slide area before overlaps (BCCD frames: about half the area is red)."""
    crenated_fraction: float = 0.06
    """Share of red cells drawn crenated (echinocytes)."""
    wbc_per_frame: float = 1.5
    """White cells per frame area (real smears have far fewer; this keeps videos useful)."""
    wbc_mix: dict[str, float] | None = None
    """Relative frequency of each white-cell type; None: a normal differential."""
    all_types: bool = True
    """Put at least one white cell of every type in ``wbc_mix`` on the slide."""
    platelets_per_frame: float = 7.0
    """Platelets per frame area."""
    platelet_clump_fraction: float = 0.15
    """Share of platelet sites that are clumps of 3-8 platelets."""
    # --- stain and illumination (None: from the seed) ---
    hema_strength: float | None = None
    """Scale of the blue-purple (azure/haematoxylin) stain: nuclei, granules, platelets."""
    eosin_strength: float | None = None
    """Scale of the pink-red (eosin) stain: red cells, eosinophil granules."""
    stain_hue: float | None = None
    """Shift of nuclear colour towards blue (<0) or magenta (>0)."""
    white_balance: tuple[float, float, float] | None = None
    """Camera gains per BGR channel."""
    exposure: float | None = None
    """Overall brightness gain."""
    vignette: float | None = None
    """Brightness lost in the frame corners (fraction)."""
    illum_gradient: float | None = None
    """Linear brightness slope across the frame (fraction, uneven illumination)."""
    noise_sigma: float | None = None
    """Sensor noise standard deviation in grey levels."""
    # --- focus ---
    focus_base: float | None = None
    """Smallest defocus blur sigma, pixels at 640x480 scale."""
    focus_drift: float | None = None
    """Amplitude of slow focus drift (blur sigma, pixels at 640x480 scale)."""
    defocus_per_min: float = 3.0
    """Fully blurred moments per minute."""
    defocus_max: float = 7.0
    """Largest blur sigma of a fully blurred moment (pixels at 640x480 scale)."""
    motion_blur: bool = True
    """Smear the image along the motion during pans."""
    exposure_fraction: float = 0.5
    """Shutter open time as a fraction of the frame period (length of motion blur)."""
    # --- motion (None: from the seed) ---
    pan_speed: float | None = None
    """Typical pan speed, frame widths per second."""
    fast_pan_prob: float | None = None
    """Share of pans that are fast (1/3 to 0.8 frame widths per second)."""
    pause_prob: float = 0.7
    """Chance that a pause follows a pan."""
    pause_seconds: tuple[float, float] = (0.5, 3.0)
    """Pause length range, seconds."""
    revisit_prob: float | None = None
    """Chance that a pan goes back to a place seen one to three moves ago."""
    seek_wbc_prob: float = 0.55
    """Chance that a pan heads for a white cell (as a person hunting cells does)."""
    nudge_prob: float = 0.15
    """Chance of a tiny sub-pixel to few-pixel adjustment instead of a pan."""

    def resolved(self, seed: int, size: tuple[int, int]) -> SynthSettings:
        """A copy with every None filled from the seed (stain/optics/motion differ per seed)."""
        rng = np.random.default_rng([seed, 1])
        w, h = size
        draws: dict[str, Any] = {
            "rbc_px": RBC_PX_640 * min(w / 640.0, h / 480.0),
            "wbc_mix": dict(NORMAL_DIFFERENTIAL),
            "hema_strength": float(rng.uniform(0.8, 1.2)),
            "eosin_strength": float(rng.uniform(0.85, 1.15)),
            "stain_hue": float(rng.uniform(-0.15, 0.15)),
            "white_balance": tuple(float(v) for v in rng.uniform(0.97, 1.03, 3)),
            "exposure": float(rng.uniform(1.0, 1.08)),
            "vignette": float(rng.uniform(0.05, 0.25)),
            "illum_gradient": float(rng.uniform(-0.06, 0.06)),
            "noise_sigma": float(rng.uniform(1.2, 3.0)),
            "focus_base": float(rng.uniform(0.7, 1.5)),
            "focus_drift": float(rng.uniform(0.3, 1.5)),
            "pan_speed": float(rng.uniform(0.1, 0.3)),
            "fast_pan_prob": float(rng.uniform(0.08, 0.25)),
            "revisit_prob": float(rng.uniform(0.12, 0.3)),
        }
        out = SynthSettings(**asdict(self))
        for name, value in draws.items():
            if getattr(out, name) is None:
                setattr(out, name, value)
        out.validate()
        return out

    def validate(self) -> None:
        """Raise InputError naming the first unusable value."""
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise InputError(f"synth setting {what}")

        need(1.5 <= self.slide_area <= 200,
             f"slide_area must be in [1.5, 200], got {self.slide_area}")
        need(self.rbc_px is None or 8 <= self.rbc_px <= 1000,
             f"rbc_px must be in [8, 1000], got {self.rbc_px}")
        need(0 <= self.rbc_cover <= 1.5, f"rbc_cover must be in [0, 1.5], got {self.rbc_cover}")
        need(0 <= self.crenated_fraction <= 1, "crenated_fraction must be in [0, 1]")
        need(0 <= self.wbc_per_frame <= 5,
             f"wbc_per_frame must be in [0, 5], got {self.wbc_per_frame}")
        need(self.platelets_per_frame >= 0, "platelets_per_frame must be >= 0")
        need(0 <= self.platelet_clump_fraction <= 1, "platelet_clump_fraction must be in [0, 1]")
        if self.wbc_mix is not None:
            unknown = sorted(set(self.wbc_mix) - set(CELL_TYPES))
            need(not unknown,
                 f"wbc_mix has unknown cell types {unknown}; known: {list(CELL_TYPES)}")
            need(all(v >= 0 for v in self.wbc_mix.values()) and sum(self.wbc_mix.values()) > 0,
                 "wbc_mix needs non-negative weights with a positive sum")
        for name in ("hema_strength", "eosin_strength", "exposure"):
            v = getattr(self, name)
            need(v is None or 0.2 <= v <= 3, f"{name} must be in [0.2, 3], got {v}")
        if self.white_balance is not None:
            need(len(self.white_balance) == 3 and all(0.5 <= g <= 1.5 for g in self.white_balance),
                 "white_balance must be three gains in [0.5, 1.5]")
        need(self.vignette is None or 0 <= self.vignette < 0.8, "vignette must be in [0, 0.8)")
        need(self.noise_sigma is None or 0 <= self.noise_sigma <= 50,
             "noise_sigma must be in [0, 50]")
        for name in ("focus_base", "focus_drift"):
            v = getattr(self, name)
            need(v is None or 0 <= v <= 20, f"{name} must be in [0, 20], got {v}")
        need(0 <= self.defocus_per_min <= 60, "defocus_per_min must be in [0, 60]")
        need(0 <= self.defocus_max <= 30, "defocus_max must be in [0, 30]")
        need(0 <= self.exposure_fraction <= 1, "exposure_fraction must be in [0, 1]")
        need(self.pan_speed is None or 0.005 <= self.pan_speed <= 5,
             "pan_speed must be in [0.005, 5]")
        for name in ("fast_pan_prob", "revisit_prob", "pause_prob", "seek_wbc_prob", "nudge_prob"):
            v = getattr(self, name)
            need(v is None or 0 <= v <= 1, f"{name} must be in [0, 1], got {v}")
        lo, hi = self.pause_seconds
        need(0 < lo <= hi <= 60,
             f"pause_seconds must be 0 < min <= max <= 60, got {self.pause_seconds}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


_SETTING_NAMES = {f.name for f in fields(SynthSettings)}


def make_settings(**overrides: Any) -> SynthSettings:
    """SynthSettings from keyword arguments, with a clear error for unknown names."""
    unknown = sorted(set(overrides) - _SETTING_NAMES)
    if unknown:
        raise InputError(f"unknown synth setting(s) {unknown}; known: {sorted(_SETTING_NAMES)}")
    if "pause_seconds" in overrides:
        overrides["pause_seconds"] = tuple(overrides["pause_seconds"])
    if overrides.get("white_balance") is not None:
        overrides["white_balance"] = tuple(overrides["white_balance"])
    s = SynthSettings(**overrides)
    s.validate()
    return s


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"size must be (width, height), got {size!r}") from None
    if w < MIN_SIZE[0] or h < MIN_SIZE[1]:
        raise InputError(
            f"frame size {w}x{h} is too small: white cells would not fit; use at least "
            f"{MIN_SIZE[0]}x{MIN_SIZE[1]}")
    if w > 8192 or h > 8192:
        raise InputError(f"frame size {w}x{h} is too large (at most 8192x8192)")
    return w, h


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a whole number >= 0, got {seed!r}")
    return int(seed)


# ----------------------------------------------------------------------------------------------
# Painting the slide (in optical density: overlapping stain adds up as it does in a real smear)
# ----------------------------------------------------------------------------------------------

@dataclass
class SlideCell:
    """One white cell on the slide."""

    id: int
    label: str
    center: tuple[float, float]
    diameter_um: float
    box: tuple[int, int, int, int]
    """Tight box of ``mask`` in slide pixels (x2, y2 exclusive)."""
    mask: np.ndarray = field(repr=False)
    """Bool mask of the cell (cytoplasm included) inside ``box``."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "slide_box": [float(v) for v in self.box],
                "diameter_um": round(self.diameter_um, 2)}


@dataclass
class Slide:
    """A painted virtual slide: BGR uint8 image at frame-pixel scale and its white cells."""

    image: np.ndarray = field(repr=False)
    cells: list[SlideCell]
    settings: SynthSettings
    seed: int
    frame_size: tuple[int, int]
    """The camera frame size (width, height) the slide was painted for."""

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[0])


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Unit-variance spatially smooth noise field (float32)."""
    n = rng.standard_normal((h, w)).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), max(sigma, 0.3))
    s = float(n.std())
    return n / s if s > 1e-6 else n


def _shape_rho(h: int, w: int, cx: float, cy: float, rx: float, ry: float, angle: float,
               harmonics: list[tuple[int, float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius field (rho < 1 inside) of a rotated, wobbly ellipse, and an
    antialiased coverage mask in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = (dx * c + dy * s) / rx, (-dx * s + dy * c) / ry
    theta = np.arctan2(v, u)
    wob = np.ones_like(theta)
    for k, amp, ph in harmonics:
        wob += amp * np.cos(k * theta + ph)
    rho = np.sqrt(u * u + v * v) / wob
    scale = 0.5 * (rx + ry)
    mask = np.clip((1.0 - rho) * scale + 0.5, 0.0, 1.0)
    return rho, mask


def _wobble(rng: np.random.Generator, amp: float, kmax: int = 5) -> list[tuple[int, float, float]]:
    return [(k, float(rng.uniform(0, amp) / k ** 0.5), float(rng.uniform(0, 2 * math.pi)))
            for k in range(2, kmax + 1)]


def _dots(canvas: np.ndarray, rng: np.random.Generator, n: int, cx: float, cy: float,
          radius: float, r_dot: tuple[float, float], value: float = 1.0) -> None:
    """Draw n antialiased dots of radius r_dot uniformly inside a disc (in place, float canvas)."""
    ang = rng.uniform(0, 2 * math.pi, n)
    rad = radius * np.sqrt(rng.uniform(0, 1, n))
    rs = rng.uniform(r_dot[0], r_dot[1], n)
    for a, r, rd in zip(ang, rad, rs, strict=True):
        x, y = cx + r * math.cos(a), cy + r * math.sin(a)
        cv2.circle(canvas, (int(x * 16), int(y * 16)), max(int(rd * 16), 8), value, -1,
                   cv2.LINE_AA, 4)


class _Painter:
    """Accumulates stain optical density and cell coverage over the slide."""

    def __init__(self, w: int, h: int, od: dict[str, np.ndarray]) -> None:
        self.w, self.h = w, h
        # float16 storage halves the painting memory; 8-bit output needs no more precision
        self.od = np.zeros((h, w, 3), np.float16)
        self.cover = np.zeros((h, w), np.float16)
        self.rbc = np.zeros((h, w, 3), np.float16)
        self.colors = od

    def window(self, cx: float, cy: float, half: float) -> tuple[int, int, int, int]:
        x1, y1 = max(int(cx - half), 0), max(int(cy - half), 0)
        x2 = min(int(math.ceil(cx + half)) + 1, self.w)
        y2 = min(int(math.ceil(cy + half)) + 1, self.h)
        return x1, y1, x2, y2

    def add(self, win: tuple[int, int, int, int], od: np.ndarray, cover: np.ndarray,
            rbc: bool = False) -> None:
        x1, y1, x2, y2 = win
        if rbc:  # overlapping red cells: the thicker one plus a little of the other
            old = self.rbc[y1:y2, x1:x2].astype(np.float32)
            self.od[y1:y2, x1:x2] += 0.35 * np.minimum(old, od)
            self.rbc[y1:y2, x1:x2] = np.maximum(old, od)
        else:
            self.od[y1:y2, x1:x2] += od
        self.cover[y1:y2, x1:x2] = np.maximum(self.cover[y1:y2, x1:x2], cover)


def _paint_rbc(p: _Painter, rng: np.random.Generator, cx: float, cy: float, r: float,
               crenated: bool) -> None:
    win = p.window(cx, cy, r * 1.25 + 3)
    x1, y1, x2, y2 = win
    if x2 - x1 < 2 or y2 - y1 < 2:  # off the slide
        return
    ecc = rng.uniform(0.0, 0.14)
    harm = _wobble(rng, 0.08, 4)
    if crenated:
        harm.append((int(rng.integers(10, 17)), float(rng.uniform(0.05, 0.09)),
                     float(rng.uniform(0, 6.3))))
    rho, mask = _shape_rho(y2 - y1, x2 - x1, cx - x1, cy - y1, r * (1 + ecc), r * (1 - ecc),
                           float(rng.uniform(0, math.pi)), harm)
    pallor = rng.uniform(0.5, 0.9) if not crenated else rng.uniform(0.0, 0.3)
    # central pallor: a flat-topped pale zone, often a little off centre
    pw = rng.uniform(0.35, 0.55) * r
    pcx = cx - x1 + rng.normal(0, 0.08 * r)
    pcy = cy - y1 + rng.normal(0, 0.08 * r)
    yy, xx = np.ogrid[0:y2 - y1, 0:x2 - x1]
    d2 = ((xx + 0.5 - pcx) ** 2 + (yy + 0.5 - pcy) ** 2) / (pw * pw)
    thick = 1.0 - pallor * np.exp(-(d2 * d2)) + 0.08 * np.exp(-(((rho - 0.9) / 0.1) ** 2))
    thick *= rng.uniform(0.85, 1.15)
    od = p.colors["rbc"][None, None, :] * (thick * mask)[..., None]
    if rng.random() < 0.45:  # refractile bright spot seen in many BCCD red cells
        spot = np.zeros(mask.shape, np.float32)
        sx = cx - x1 + rng.normal(0, 0.12 * r)
        sy = cy - y1 + rng.normal(0, 0.12 * r)
        cv2.circle(spot, (int(sx * 16), int(sy * 16)), int(rng.uniform(0.03, 0.07) * r * 16),
                   1.0, -1, cv2.LINE_AA, 4)
        spot = cv2.GaussianBlur(spot, (0, 0), 0.8)
        od = od * (1 - 0.9 * spot[..., None]) - 0.12 * spot[..., None]
    p.add(win, od, mask, rbc=True)


def _paint_platelet(p: _Painter, rng: np.random.Generator, cx: float, cy: float, r: float) -> None:
    win = p.window(cx, cy, r * 1.4 + 3)
    x1, y1, x2, y2 = win
    if x2 - x1 < 2 or y2 - y1 < 2:  # off the slide
        return
    rho, mask = _shape_rho(y2 - y1, x2 - x1, cx - x1, cy - y1, r * rng.uniform(0.8, 1.2),
                           r * rng.uniform(0.7, 1.0), float(rng.uniform(0, math.pi)),
                           _wobble(rng, 0.25, 5))
    gran = np.zeros(mask.shape, np.float32)
    _dots(gran, rng, int(rng.integers(3, 9)), cx - x1, cy - y1, 0.5 * r, (0.12 * r, 0.25 * r))
    gran = cv2.GaussianBlur(gran, (0, 0), 0.7) * mask
    od = (p.colors["platelet"][None, None, :] * (0.7 * mask)[..., None]
          + p.colors["platelet_gran"][None, None, :] * (0.8 * gran)[..., None])
    p.add(win, od, mask)


def _lobe_chain(rng: np.random.Generator, n: int, r: float, cx: float, cy: float,
                lobe: tuple[float, float], spacing: float) -> list[_Lobe]:
    """``n`` nuclear lobes as a curving chain (C, S or clustered shapes), centred in the cell,
    consecutive lobes ``spacing`` lobe-radii apart so the constrictions between them show."""
    ax = r * rng.uniform(*lobe)
    d = ax * spacing
    turn = rng.uniform(0.5, 1.5) * rng.choice([-1.0, 1.0])
    a = rng.uniform(0, 2 * math.pi)
    pts = [(0.0, 0.0)]
    for _ in range(n - 1):
        a += turn + rng.normal(0, 0.35)
        if rng.random() < 0.25:
            turn = -turn  # S-shaped chains
        x, y = pts[-1]
        pts.append((x + d * math.cos(a), y + d * math.sin(a)))
    arr = np.array(pts)
    arr -= arr.mean(axis=0)
    reach = float(np.max(np.hypot(arr[:, 0], arr[:, 1]))) + ax
    if reach > 0.88 * r:  # keep the nucleus inside the cell
        arr *= max(0.88 * r - ax, 0.1 * r) / max(reach - ax, 1e-6)
    arr += np.array([cx, cy]) + rng.normal(0, 0.04 * r, 2)
    lobes = []
    for lx, ly in arr:
        a1 = ax * rng.uniform(0.8, 1.15)
        lobes.append((float(lx), float(ly), a1, a1 * rng.uniform(0.55, 0.85),
                      float(rng.uniform(0, 180))))
    return lobes


def _draw_lobes(mask: np.ndarray, lobes: list[_Lobe],
                bridge: float) -> None:
    for lx, ly, ax, ay, ang in lobes:
        cv2.ellipse(mask, (int(lx * 16), int(ly * 16)), (int(ax * 16), int(ay * 16)), ang, 0, 360,
                    1.0, -1, cv2.LINE_AA, 4)
    for (x1, y1, *_), (x2, y2, *_) in zip(lobes[:-1], lobes[1:], strict=True):
        cv2.line(mask, (int(x1 * 16), int(y1 * 16)), (int(x2 * 16), int(y2 * 16)), 1.0,
                 max(int(round(bridge)), 1), cv2.LINE_AA, 4)


def _paint_wbc(p: _Painter, rng: np.random.Generator, label: str, cx: float, cy: float,
               r: float, large: bool = False) -> np.ndarray:
    """Paint one white cell of radius r (pixels) centred at (cx, cy); return its coverage mask
    over the painter window (float) together with the window via attribute."""
    c = p.colors
    win = p.window(cx, cy, r * 1.2 + 4)
    x1, y1, x2, y2 = win
    h, w = y2 - y1, x2 - x1
    lx, ly = cx - x1, cy - y1
    wob = {"basophil": 0.07, "monocyte": 0.06}.get(label, 0.035)
    _, cell = _shape_rho(h, w, lx, ly, r * rng.uniform(0.95, 1.05), r * rng.uniform(0.92, 1.0),
                         float(rng.uniform(0, math.pi)), _wobble(rng, wob, 6))
    nuc = np.zeros((h, w), np.float32)
    gran = np.zeros((h, w), np.float32)
    tex = 1.0 + 0.22 * _smooth_noise(rng, h, w, max(r * 0.03, 1.0))
    if label == "neutrophil":
        n = int(rng.choice([3, 4, 5], p=[0.45, 0.4, 0.15]))
        lobes = _lobe_chain(rng, n, r, lx, ly, (0.25, 0.32), rng.uniform(1.6, 2.0))
        _draw_lobes(nuc, lobes, max(0.05 * r, 2.0))
        _dots(gran, rng, int(3.0 * r * r / 25), lx, ly, 0.92 * r, (0.006 * r + 0.5, 0.01 * r + 0.7))
        cyto_od, gran_od, nuc_od, gran_amt = c["neut_cyto"], c["neut_gran"], c["nucleus"], 0.25
    elif label == "eosinophil":
        n = int(rng.choice([2, 3], p=[0.8, 0.2]))
        lobes = _lobe_chain(rng, n, r, lx, ly, (0.3, 0.37), rng.uniform(1.5, 1.9))
        _draw_lobes(nuc, lobes, max(0.08 * r, 2.5))
        gr = (0.02 * r + 0.8, 0.03 * r + 1.0)
        _dots(gran, rng, int(0.8 * r * r / (gr[1] ** 2)), lx, ly, 0.92 * r, gr)
        cyto_od, gran_od, nuc_od, gran_amt = c["eos_cyto"], c["eos_gran"], c["nucleus"] * 1.15, 1.0
    elif label == "basophil":
        lobes = _lobe_chain(rng, int(rng.integers(2, 4)), r, lx, ly, (0.25, 0.33), 1.4)
        _draw_lobes(nuc, lobes, max(0.1 * r, 2.5))
        gr = (0.025 * r + 0.8, 0.045 * r + 1.0)
        _dots(gran, rng, int(0.9 * r * r / (gr[1] ** 2)), lx, ly, 0.92 * r, gr)
        cyto_od, gran_od, nuc_od, gran_amt = c["baso_cyto"], c["baso_gran"], c["nucleus"] * 0.8, 1.0
    elif label == "lymphocyte":
        frac = rng.uniform(0.62, 0.75) if large else rng.uniform(0.84, 0.94)
        off = r * (1 - frac) * rng.uniform(0.2, 0.9)
        a = rng.uniform(0, 2 * math.pi)
        _, m = _shape_rho(h, w, lx + off * math.cos(a), ly + off * math.sin(a), frac * r,
                          frac * r * rng.uniform(0.88, 1.0), float(rng.uniform(0, math.pi)),
                          _wobble(rng, 0.04, 4))
        nuc = m
        if large:
            _dots(gran, rng, int(rng.integers(0, 8)), lx, ly, 0.85 * r,
                  (0.02 * r + 0.5, 0.03 * r + 0.7))  # a few azurophil granules
        cyto_od, gran_od, nuc_od = c["lymph_cyto"], c["eos_gran"] * 0.8, c["nucleus_dense"]
        gran_amt = 0.6
        tex = 1.0 + 0.12 * _smooth_noise(rng, h, w, max(r * 0.04, 1.0))
    elif label == "monocyte":
        a = rng.uniform(0, 2 * math.pi)
        ncx, ncy = lx + 0.1 * r * math.cos(a), ly + 0.1 * r * math.sin(a)
        ax, ay = r * rng.uniform(0.68, 0.8), r * rng.uniform(0.55, 0.68)
        _, m = _shape_rho(h, w, ncx, ncy, ax, ay, a, _wobble(rng, 0.07, 5))
        # kidney / horseshoe: bite out of one long side
        bite_r = ay * rng.uniform(0.3, 0.6)
        bx = ncx - math.sin(a) * ay * rng.uniform(0.9, 1.3)
        by = ncy + math.cos(a) * ay * rng.uniform(0.9, 1.3)
        _, bite = _shape_rho(h, w, bx, by, bite_r, bite_r, 0.0, [])
        nuc = m * (1 - bite)
        nv = int(rng.choice([0, 0, 1, 2, 3, 5]))
        _dots(gran, rng, nv, lx, ly, 0.8 * r, (0.04 * r, 0.08 * r))  # vacuoles
        cyto_od, gran_od, nuc_od, gran_amt = c["mono_cyto"], c["mono_cyto"], c["nucleus_mono"], -0.7
        tex = 1.0 + 0.18 * _smooth_noise(rng, h, w, max(r * 0.03, 1.0))
    else:
        raise ValueError(f"unknown cell type {label!r}")
    nuc = cv2.GaussianBlur(nuc, (0, 0), 0.8) * cell
    gran = np.clip(cv2.GaussianBlur(gran, (0, 0), 0.6), 0, 1) * cell
    if label == "eosinophil":
        gran *= 1 - 0.9 * nuc  # granules sit mostly beside the lobes
    cyto = cell * (1 - nuc)
    od = cyto_od[None, None, :] * (cyto * (1 + 0.1 * (tex - 1)))[..., None]
    od += nuc_od[None, None, :] * (nuc * np.clip(tex, 0.4, 1.8))[..., None]
    if label == "monocyte":
        od *= (1 - 0.7 * gran)[..., None]  # vacuoles are clear holes
    elif label == "neutrophil":
        od += gran_od[None, None, :] * (gran_amt * gran * (1 - nuc))[..., None]
    else:
        od = (od * (1 - gran_amt * 0.5 * gran)[..., None]
              + gran_od[None, None, :] * (gran_amt * gran)[..., None])
    p.add(win, od, cell)
    return cell


def _build_colors(s: SynthSettings) -> dict[str, np.ndarray]:
    """Stain OD vectors for one slide: strength and hue varied per seed."""
    out = {}
    for key, od in _OD.items():
        v = od.copy()
        if key in _HEMA_KEYS:
            v *= s.hema_strength
            # hue: move absorbance between blue/green (magenta-ish) and red (blue-ish)
            v = v * np.array([1 - 0.5 * s.stain_hue, 1.0, 1 + s.stain_hue], np.float32)
        if key in _EOSIN_KEYS:
            v *= s.eosin_strength
        out[key] = np.clip(v, -0.2, None).astype(np.float32)
    return out


def _sample_types(rng: np.random.Generator, n: int, mix: dict[str, float],
                  all_types: bool) -> list[str]:
    names = [t for t in CELL_TYPES if mix.get(t, 0) > 0]
    probs = np.array([mix[t] for t in names], float)
    probs /= probs.sum()
    forced = list(names) if all_types else []
    n = max(n, len(forced))
    rest = list(rng.choice(names, size=n - len(forced), p=probs)) if n > len(forced) else []
    types = forced + [str(t) for t in rest]
    rng.shuffle(types)
    return types


def make_slide(seed: int = 0, size: tuple[int, int] = (640, 480),
               settings: SynthSettings | None = None, **overrides: Any) -> Slide:
    """Paint a virtual slide for frames of ``size`` (width, height), deterministic from ``seed``.

    ``settings`` (or keyword overrides of :class:`SynthSettings` fields) change density, mix and
    stain; unset stain fields are drawn from the seed.
    """
    seed = _check_seed(seed)
    fw, fh = _check_size(size)
    base = settings if settings is not None else make_settings(**overrides)
    if settings is not None and overrides:
        base = make_settings(**{**asdict(settings), **overrides})
    s = base.resolved(seed, (fw, fh))
    k = math.sqrt(s.slide_area)
    sw, sh = int(round(fw * k)), int(round(fh * k))
    if sw * sh > MAX_SLIDE_PIXELS:
        raise InputError(f"slide of {sw}x{sh} pixels is too large for memory; use a smaller frame "
                         f"size or slide_area (now {s.slide_area})")
    rng = np.random.default_rng([seed, 2])
    px_um = s.rbc_px / RBC_UM
    p = _Painter(sw, sh, _build_colors(s))
    frame_areas = (sw * sh) / float(fw * fh)

    # white cells first: positions with no overlap between white cells
    expected = s.wbc_per_frame * frame_areas
    n_wbc = int(rng.binomial(int(round(2 * expected)), 0.5)) if expected > 0 else 0
    mix = s.wbc_mix or NORMAL_DIFFERENTIAL
    types = _sample_types(rng, n_wbc, mix, s.all_types) if (n_wbc or s.all_types) else []
    placed: list[tuple[float, float, float, str, float, bool]] = []
    for label in types:
        large = label == "lymphocyte" and rng.random() < 0.25
        lo, hi = LARGE_LYMPHOCYTE_UM if large else WBC_DIAMETER_UM[label]
        d_um = float(rng.uniform(lo, hi))
        r = 0.5 * d_um * px_um
        for _ in range(400):
            cx = rng.uniform(r * 1.3 + 4, sw - r * 1.3 - 4)
            cy = rng.uniform(r * 1.3 + 4, sh - r * 1.3 - 4)
            if all(math.hypot(cx - qx, cy - qy) > 1.25 * (r + qr) + 0.3 * s.rbc_px
                   for qx, qy, qr, *_ in placed):
                placed.append((cx, cy, r, label, d_um, large))
                break
        else:
            log.warning("no room for a %s on a %dx%d slide; skipped", label, sw, sh)

    # red cells: random positions, limited overlap, pushed out of white cells (slight overlap ok)
    r_rbc = 0.5 * s.rbc_px
    n_rbc = int(s.rbc_cover * sw * sh / (math.pi * r_rbc * r_rbc))
    xs = rng.uniform(-r_rbc * 0.5, sw + r_rbc * 0.5, n_rbc * 3)
    ys = rng.uniform(-r_rbc * 0.5, sh + r_rbc * 0.5, n_rbc * 3)
    grid: dict[tuple[int, int], list[tuple[float, float]]] = {}
    cellsz = 2 * r_rbc
    accepted = 0
    for x, y in zip(xs, ys, strict=True):
        if accepted >= n_rbc:
            break
        if any(math.hypot(x - qx, y - qy) < qr + r_rbc * 0.8 for qx, qy, qr, *_ in placed):
            continue
        gx, gy = int(x // cellsz), int(y // cellsz)
        min_d = 2 * r_rbc * rng.uniform(0.62, 0.95)
        near = [q for i in (-1, 0, 1) for j in (-1, 0, 1) for q in grid.get((gx + i, gy + j), ())]
        if any(math.hypot(x - ox, y - oy) < min_d for ox, oy in near):
            continue
        grid.setdefault((gx, gy), []).append((x, y))
        accepted += 1
        rr = r_rbc * rng.normal(1.0, 0.06)
        _paint_rbc(p, rng, x, y, rr, rng.random() < s.crenated_fraction)

    # platelets in the gaps, some clumped
    # sites on red cells are mostly skipped, so draw more
    n_sites = int(rng.poisson(2.5 * s.platelets_per_frame * frame_areas))
    for _ in range(n_sites):
        x, y = rng.uniform(0, sw), rng.uniform(0, sh)
        if any(math.hypot(x - qx, y - qy) < qr * 1.1 for qx, qy, qr, *_ in placed):
            continue
        xi, yi = min(int(x), sw - 1), min(int(y), sh - 1)
        if p.cover[yi, xi] > 0.5 and rng.random() < 0.85:  # mostly in the gaps, few on red cells
            continue
        count = int(rng.integers(3, 9)) if rng.random() < s.platelet_clump_fraction else 1
        for _j in range(count):
            px_ = x + (rng.normal(0, 0.25 * r_rbc) if count > 1 else 0)
            py_ = y + (rng.normal(0, 0.25 * r_rbc) if count > 1 else 0)
            _paint_platelet(p, rng, px_, py_, r_rbc * rng.uniform(0.1, 0.2))

    cells: list[SlideCell] = []
    for idx, (cx, cy, r, label, d_um, large) in enumerate(placed):
        cov = _paint_wbc(p, rng, label, cx, cy, r, large)
        wx1, wy1, _, _ = p.window(cx, cy, r * 1.2 + 4)
        m = cov > 0.5
        ys_, xs_ = np.nonzero(m)
        bx1, by1, bx2, by2 = xs_.min(), ys_.min(), xs_.max() + 1, ys_.max() + 1
        cells.append(SlideCell(id=idx, label=label, center=(float(cx), float(cy)), diameter_um=d_um,
                               box=(int(wx1 + bx1), int(wy1 + by1), int(wx1 + bx2), int(wy1 + by2)),
                               mask=m[by1:by2, bx1:bx2].copy()))

    # background: plasma film where no cell is, with gentle mottling; then Beer-Lambert.
    # Composed in bands of rows so no extra full-size float arrays are made (memory).
    mott_small = _smooth_noise(rng, max(sh // 16, 2), max(sw // 16, 2), 2.0)
    mott = cv2.resize(mott_small, (sw, sh), interpolation=cv2.INTER_LINEAR)
    illum = (_I0 * np.asarray(s.white_balance, np.float32) * s.exposure)[None, None, :]
    plasma = p.colors["plasma"][None, None, :]
    img = np.empty((sh, sw, 3), np.uint8)
    for y in range(0, sh, 128):
        band = slice(y, min(y + 128, sh))
        bg = (1.0 - p.cover[band].astype(np.float32)) * (1.0 + 0.15 * mott[band])
        od = p.od[band].astype(np.float32) + p.rbc[band] + plasma * bg[..., None]
        img[band] = np.clip(np.exp(-od) * illum, 0, 255).astype(np.uint8)
    del p, mott
    img = cv2.GaussianBlur(img, (0, 0), 0.6 * s.rbc_px / RBC_PX_640)
    log.info("slide %dx%d px: %d red cells, %d white cells (%s)", sw, sh, accepted, len(cells),
             ", ".join(f"{t} {sum(c.label == t for c in cells)}" for t in CELL_TYPES))
    return Slide(image=img, cells=cells, settings=s, seed=seed, frame_size=(fw, fh))


# ----------------------------------------------------------------------------------------------
# The camera: a person driving the stage
# ----------------------------------------------------------------------------------------------

@dataclass
class _Segment:
    kind: str
    start: int
    frames: int
    p0: tuple[float, float]
    p1: tuple[float, float]


class _CameraPlan:
    """Camera positions (slide coords of the frame's top-left corner), extended lazily so an
    endless stream is possible; deterministic from its generator."""

    def __init__(self, rng: np.random.Generator, s: SynthSettings, fps: float,
                 slide_size: tuple[int, int], frame_size: tuple[int, int],
                 targets: list[tuple[float, float]]) -> None:
        self.rng, self.s, self.fps = rng, s, fps
        fw, fh = frame_size
        sw, sh = slide_size
        m = 4.0
        self.fw = fw
        self.lo = np.array([m, m])
        self.hi = np.array([max(sw - fw - m, m), max(sh - fh - m, m)])
        self.frame_size = frame_size
        self.targets = targets  # white-cell centres
        self.segments: list[_Segment] = []
        self.starts: list[int] = []
        self.history: list[tuple[float, float]] = []
        self.visited: set[int] = set()
        self.heading = float(rng.uniform(0, 2 * math.pi))
        p0 = self._pick_target(seek=True)
        self._append("pause", max(int(rng.uniform(0.5, 1.5) * fps), 1), p0, p0)

    def _clamp(self, p: np.ndarray) -> tuple[float, float]:
        q = np.clip(p, self.lo, self.hi)
        return float(q[0]), float(q[1])

    def _pick_target(self, seek: bool, cur: tuple[float, float] | None = None,
                     reach: float = 1.2) -> tuple[float, float]:
        """Next place to look at: a white cell not looked at yet, preferably near by (seek), or
        a step of at most ``reach`` frame widths roughly along the current scanning heading."""
        rng = self.rng
        fw, fh = self.frame_size
        half = np.array([fw / 2, fh / 2])
        if cur is None:
            if self.targets:
                k = int(rng.integers(len(self.targets)))
                self.visited.add(k)
                return self._clamp(np.array(self.targets[k]) - half)
            return self._clamp(rng.uniform(self.lo, self.hi))
        c = np.asarray(cur)
        if seek and self.targets:
            tl = np.array(self.targets) - half
            if len(self.visited) >= len(tl):
                self.visited.clear()  # every cell seen: start another round
            todo = np.array([k for k in range(len(tl)) if k not in self.visited])
            d = np.hypot(*(tl[todo] - c).T)
            near = todo[d < reach * 1.5 * fw]
            k = int(near[rng.integers(len(near))]) if len(near) else int(todo[np.argmin(d)])
            self.visited.add(k)
            off = rng.uniform(-0.25, 0.25, 2) * np.array([fw, fh])
            return self._clamp(tl[k] + off)
        a = self.heading + rng.normal(0, 0.6)
        step = rng.uniform(0.2, reach) * fw
        vec = step * np.array([math.cos(a), math.sin(a)])
        tgt = c + vec
        if np.any(tgt < self.lo) or np.any(tgt > self.hi):  # slide edge: turn back
            a += math.pi
            tgt = c - vec
        self.heading = a
        return self._clamp(tgt)

    def _append(self, kind: str, frames: int, p0: tuple[float, float],
                p1: tuple[float, float]) -> None:
        start = self.segments[-1].start + self.segments[-1].frames if self.segments else 0
        self.segments.append(_Segment(kind, start, max(frames, 1), p0, p1))
        self.starts.append(start)
        if not self.history or self.history[-1] != p1:
            self.history.append(p1)

    def _extend(self) -> None:
        s, rng, fps = self.s, self.rng, self.fps
        cur = self.segments[-1].p1
        last_kind = self.segments[-1].kind
        if last_kind != "pause" and rng.random() < s.pause_prob:
            self._append("pause", int(rng.uniform(*s.pause_seconds) * fps), cur, cur)
            return
        u = rng.random()
        if u < s.nudge_prob:
            d = rng.uniform(0.3, 6.0) * self.fw / 640.0
            a = rng.uniform(0, 2 * math.pi)
            tgt = self._clamp(np.array(cur) + d * np.array([math.cos(a), math.sin(a)]))
            self._append("nudge", int(rng.uniform(0.3, 1.0) * fps), cur, tgt)
            return
        fast = rng.random() < s.fast_pan_prob
        kind = "fast_pan" if fast else "pan"
        if u < s.nudge_prob + s.revisit_prob and len(self.history) >= 3:
            back = int(rng.integers(2, min(4, len(self.history)) + 1))
            tgt = self.history[-back]
            kind = "return"
        else:
            tgt = self._pick_target(rng.random() < s.seek_wbc_prob, cur, 2.0 if fast else 1.0)
        dist = math.hypot(tgt[0] - cur[0], tgt[1] - cur[1])
        if dist < 1.0:
            self._append("pause", int(rng.uniform(*s.pause_seconds) * fps), cur, cur)
            return
        if fast:
            speed = rng.uniform(0.34, 0.8) * self.fw
        else:
            speed = s.pan_speed * self.fw * math.exp(rng.normal(0, 0.35))
        dx, dy = abs(tgt[0] - cur[0]), abs(tgt[1] - cur[1])
        if min(dx, dy) > 0.1 * self.fw and rng.random() < 0.5:
            # a mechanical stage has two knobs: one axis, then the other
            corner = (tgt[0], cur[1]) if rng.random() < 0.5 else (cur[0], tgt[1])
            for p0, p1 in ((cur, corner), (corner, tgt)):
                d = math.hypot(p1[0] - p0[0], p1[1] - p0[1])
                self._append(kind, int(round(max(d / speed, 0.3) * fps)), p0, p1)
            return
        secs = max(dist / speed, 0.3)
        self._append(kind, int(round(secs * fps)), cur, tgt)

    def segment_at(self, i: int) -> _Segment:
        while self.segments[-1].start + self.segments[-1].frames <= i:
            self._extend()
        return self.segments[bisect.bisect_right(self.starts, i) - 1]

    def position(self, i: int) -> tuple[float, float, str]:
        seg = self.segment_at(i)
        if seg.p0 == seg.p1:
            return seg.p0[0], seg.p0[1], seg.kind
        u = (i - seg.start) / seg.frames
        e = u - math.sin(2 * math.pi * u) / (2 * math.pi)  # accelerate, cruise, slow down
        x = seg.p0[0] + (seg.p1[0] - seg.p0[0]) * e
        y = seg.p0[1] + (seg.p1[1] - seg.p0[1]) * e
        return x, y, seg.kind


class _Focus:
    """Defocus blur sigma over time: slow drift plus brief fully blurred moments."""

    def __init__(self, seed: int, s: SynthSettings, scale: float) -> None:
        rng = np.random.default_rng([seed, 3])
        self.seed, self.s, self.scale = seed, s, scale
        self.freqs = rng.uniform(0.02, 0.25, 3)
        self.phases = rng.uniform(0, 2 * math.pi, 3)
        self._blocks: dict[int, list[tuple[float, float, float]]] = {}

    def _events(self, block: int) -> list[tuple[float, float, float]]:
        if block not in self._blocks:
            rng = np.random.default_rng([self.seed, 4, block])
            n = int(rng.poisson(self.s.defocus_per_min)) if self.s.defocus_per_min > 0 else 0
            self._blocks[block] = [
                (block * 60.0 + float(rng.uniform(0, 60)), float(rng.uniform(0.25, 0.8)),
                 float(rng.uniform(0.5, 1.0) * self.s.defocus_max)) for _ in range(n)]
        return self._blocks[block]

    def sigma(self, t: float) -> float:
        drift = float(np.mean(np.sin(2 * math.pi * self.freqs * t + self.phases)))
        sig = self.s.focus_base + self.s.focus_drift * (0.5 + 0.5 * drift)
        b = int(t // 60)
        for bb in (b - 1, b, b + 1):
            if bb < 0:
                continue
            for tc, wdt, peak in self._events(bb):
                sig = max(sig, peak * math.exp(-(((t - tc) / wdt) ** 2)))
        return sig * self.scale


class SlideSimulator:
    """A slide under a moving camera: ``frame(i)`` renders frame i and its truth.

    Frames are deterministic from the seed and can be asked for in any order (the camera plan is
    extended as needed)."""

    def __init__(self, seed: int = 0, size: tuple[int, int] = (640, 480), fps: float = 30.0,
                 slide: Slide | None = None, **settings: Any) -> None:
        self.seed = _check_seed(seed)
        self.size = _check_size(size)
        if not (isinstance(fps, (int, float)) and 1.0 <= fps <= 240.0):
            raise InputError(f"fps must be between 1 and 240, got {fps!r}")
        self.fps = float(fps)
        if slide is not None and settings:
            raise InputError("pass either a painted slide or settings, not both")
        if slide is not None and tuple(slide.frame_size) != self.size:
            raise InputError(f"slide was painted for {slide.frame_size[0]}x{slide.frame_size[1]} "
                             f"frames, not {self.size[0]}x{self.size[1]}")
        self.slide = slide if slide is not None else make_slide(self.seed, self.size, **settings)
        s = self.settings = self.slide.settings
        fw, fh = self.size
        self.scale = s.rbc_px / RBC_PX_640
        cam_rng = np.random.default_rng([self.seed, 5])
        self.camera = _CameraPlan(cam_rng, s, self.fps, self.slide.size, self.size,
                                  [c.center for c in self.slide.cells])
        self.focus = _Focus(self.seed, s, self.scale)
        orng = np.random.default_rng([self.seed, 6])
        # vignetting + uneven illumination: fixed in frame coordinates
        yy, xx = np.mgrid[0:fh, 0:fw].astype(np.float32)
        ocx = fw / 2 + orng.uniform(-0.12, 0.12) * fw
        ocy = fh / 2 + orng.uniform(-0.12, 0.12) * fh
        rr = ((xx - ocx) ** 2 + (yy - ocy) ** 2) / (0.25 * (fw * fw + fh * fh))
        ga = orng.uniform(0, 2 * math.pi)
        grad = ((xx - fw / 2) * math.cos(ga) + (yy - fh / 2) * math.sin(ga)) / max(fw, fh)
        self.gain = (1.0 - s.vignette * np.clip(rr, 0, 1.6) ** 1.2 + s.illum_gradient * grad)
        self.gain = self.gain.astype(np.float32)[..., None]
        # dust on the sensor: small rings that stay put while the slide moves
        for _ in range(int(orng.integers(2, 7))):
            x, y = orng.uniform(0, fw), orng.uniform(0, fh)
            rad = int(orng.uniform(2, 4) * 16 * self.scale)
            cv2.circle(self.gain, (int(x * 16), int(y * 16)), rad, (0.85,),
                       max(int(self.scale), 1), cv2.LINE_AA, 4)
        self.flicker = (float(orng.uniform(0.2, 1.0)), float(orng.uniform(0, 6.3)))
        # noise bank: a few noise fields, cut at a random offset per frame (fast, deterministic)
        pad = 32
        self._noise = [orng.standard_normal((fh + pad, fw + pad, 3)).astype(np.float32)
                       for _ in range(3)] if s.noise_sigma > 0 else []
        self._pad = pad
        # cell lookup arrays
        self._boxes = np.array([c.box for c in self.slide.cells], np.float32).reshape(-1, 4)

    @property
    def cells(self) -> list[SlideCell]:
        return self.slide.cells

    def header(self, frames: int | None = None) -> dict[str, Any]:
        """The truth.json fields that do not depend on the frame."""
        return {
            "version": TRUTH_VERSION,
            "seed": self.seed,
            "fps": self.fps,
            "size": list(self.size),
            "frames": frames,
            "slide_size": list(self.slide.size),
            "settings": self.settings.to_json(),
            "cells": [c.to_json() for c in self.slide.cells],
        }

    def camera_at(self, i: int) -> tuple[float, float, str]:
        return self.camera.position(i)

    def truth(self, i: int) -> dict[str, Any]:
        """Frame i's truth (camera, blur, white cells in view) without rendering pixels."""
        x0, y0, kind = self.camera.position(i)
        x1n, y1n, _ = self.camera.position(i + 1)
        t = i / self.fps
        sigma = self.focus.sigma(t)
        return {"frame": i, "t": round(t, 6), "camera": [round(x0, 4), round(y0, 4)],
                "segment": kind, "motion": [round(x1n - x0, 4), round(y1n - y0, 4)],
                "blur": round(sigma, 3), "cells": self.cells_in_view(x0, y0, sigma)}

    def cells_in_view(self, x0: float, y0: float, blur: float = 0.0) -> list[dict[str, Any]]:
        """Truth entries (id, box, visible_fraction, blur) of the white cells seen by a camera
        whose top-left corner is at slide position (x0, y0); see :meth:`view`."""
        fw, fh = self.size
        cells: list[dict[str, Any]] = []
        if not len(self._boxes):
            return cells
        b = self._boxes
        inside = (b[:, 0] < x0 + fw) & (b[:, 2] > x0) & (b[:, 1] < y0 + fh) & (b[:, 3] > y0)
        for k in np.nonzero(inside)[0]:
            c = self.slide.cells[int(k)]
            bx1, by1, _, _ = c.box
            # visible part of the mask (pixel (u, v) of the mask sits at slide bx1+u, by1+v)
            u1 = max(int(math.ceil(x0 - 0.5)) - bx1, 0)
            v1 = max(int(math.ceil(y0 - 0.5)) - by1, 0)
            u2 = min(int(math.floor(x0 + fw - 0.5)) + 1 - bx1, c.mask.shape[1])
            v2 = min(int(math.floor(y0 + fh - 0.5)) + 1 - by1, c.mask.shape[0])
            if u2 <= u1 or v2 <= v1:
                continue
            sub = c.mask[v1:v2, u1:u2]
            n_vis = int(sub.sum())
            if n_vis == 0:
                continue
            cols = np.nonzero(sub.any(axis=0))[0]
            rows = np.nonzero(sub.any(axis=1))[0]
            box = [bx1 + u1 + cols[0] - x0, by1 + v1 + rows[0] - y0,
                   bx1 + u1 + cols[-1] + 1 - x0, by1 + v1 + rows[-1] + 1 - y0]
            box = [min(max(box[0], 0.0), fw), min(max(box[1], 0.0), fh),
                   min(max(box[2], 0.0), fw), min(max(box[3], 0.0), fh)]
            cells.append({"id": c.id, "box": [round(float(v), 2) for v in box],
                          "visible_fraction": round(n_vis / float(c.mask.sum()), 4),
                          "blur": round(blur, 3)})
        return cells

    def render(self, i: int, truth: dict[str, Any] | None = None) -> np.ndarray:
        """Frame i as BGR uint8 (before video compression)."""
        tr = truth if truth is not None else self.truth(i)
        x0, y0, _ = self.camera.position(i)  # full precision (truth is rounded)
        return self.view(x0, y0, sigma=float(self.focus.sigma(i / self.fps)),
                         motion=tuple(tr["motion"]), index=i)

    def view(self, x0: float, y0: float, sigma: float = 0.0,
             motion: tuple[float, float] = (0.0, 0.0), index: int = 0) -> np.ndarray:
        """The camera image with its top-left corner at slide position (x0, y0): defocus
        ``sigma``, motion blur for a displacement ``motion`` per frame, vignetting and the
        noise of frame ``index``."""
        fw, fh = self.size
        s = self.settings
        mx, my = motion
        mlen = math.hypot(mx, my) * s.exposure_fraction if s.motion_blur else 0.0
        p = int(math.ceil(3 * sigma + mlen)) + 2
        m = np.array([[1, 0, -(x0 - p)], [0, 1, -(y0 - p)]], np.float32)
        img = cv2.warpAffine(self.slide.image, m, (fw + 2 * p, fh + 2 * p), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)
        if mlen >= 1.0:
            k = int(math.ceil(mlen)) | 1
            ker = np.zeros((k + 2, k + 2), np.float32)
            c = (k + 1) / 2.0
            norm = math.hypot(mx, my)
            dx, dy = mx / norm * mlen / 2, my / norm * mlen / 2
            cv2.line(ker, (int((c - dx) * 16), int((c - dy) * 16)), (int((c + dx) * 16),
                     int((c + dy) * 16)), 1.0, 1, cv2.LINE_AA, 4)
            ker /= ker.sum()
            img = cv2.filter2D(img, -1, ker, borderType=cv2.BORDER_REFLECT)
        if sigma > 0.25:
            img = cv2.GaussianBlur(img, (0, 0), sigma)
        img = img[p:p + fh, p:p + fw]
        t = index / self.fps
        g = 1.0 + 0.012 * self.flicker[0] * math.sin(2 * math.pi * 0.4 * t + self.flicker[1])
        out = img.astype(np.float32)
        out *= self.gain * g
        if self._noise:
            rng = np.random.default_rng([self.seed, 7, index])
            k = int(rng.integers(len(self._noise)))
            ox, oy = (int(v) for v in rng.integers(0, self._pad, 2))
            out += self._noise[k][oy:oy + fh, ox:ox + fw] * s.noise_sigma
        np.clip(out, 0, 255, out=out)
        return out.astype(np.uint8)

    def frame(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        """(frame_bgr, frame_truth) for frame i."""
        if i < 0:
            raise InputError(f"frame index must be >= 0, got {i}")
        tr = self.truth(i)
        return self.render(i, tr), tr


def annotate(bgr: np.ndarray, frame_truth: dict[str, Any], labels: dict[int, str]) -> np.ndarray:
    """A copy of ``bgr`` with the truth boxes drawn ("#id label", colour by type) and a caption
    (frame, segment, blur): for looking at the truth, e.g. docs/synth_frame.png."""
    from detector.draw import colour_of

    img = bgr.copy()
    scale = max(min(img.shape[:2]) / 900.0, 0.4)
    for c in frame_truth["cells"]:
        x1, y1, x2, y2 = (int(round(v)) for v in c["box"])
        label = labels.get(c["id"], "?")
        col = colour_of(label)
        cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), col, 2)
        text = f"#{c['id']} {label}" + ("" if c["visible_fraction"] > 0.99
                                          else f" {100 * c['visible_fraction']:.0f}%")
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - th - base - 4 if y1 - th - base - 4 >= 0 else y1
        tx = min(max(x1, 0), max(img.shape[1] - tw - 4, 0))
        cv2.rectangle(img, (tx, ty), (tx + tw + 4, ty + th + base + 4), col, cv2.FILLED)
        lum = 0.114 * col[0] + 0.587 * col[1] + 0.299 * col[2]
        cv2.putText(img, text, (tx + 2, ty + th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (0, 0, 0) if lum > 140 else (255, 255, 255), 1, cv2.LINE_AA)
    caption = (f"synthetic smear, frame {frame_truth['frame']}  {frame_truth['segment']}  "
               f"blur {frame_truth['blur']:.1f}px")
    cv2.putText(img, caption, (8, img.shape[0] - 10), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (40, 40, 40), 1, cv2.LINE_AA)
    return img


def save_docs_frame(path: str | Path, seed: int = 1, index: int = 894) -> Path:
    """Write the README picture: one annotated simulator frame as a 256-colour PNG (small enough
    for the repo). ``python -c "from training.synth import save_docs_frame as f;
    f('docs/synth_frame.png')"`` regenerates it."""
    sim = SlideSimulator(seed=seed)
    bgr, tr = sim.frame(index)
    img = annotate(bgr, tr, {c.id: c.label for c in sim.cells})
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        from PIL import Image
    except ImportError:  # full-colour PNG without Pillow
        cv2.imwrite(str(out), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        return out
    rgb = Image.fromarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    rgb.quantize(colors=256, method=Image.Quantize.FASTOCTREE,
                 dither=Image.Dither.NONE).save(out, optimize=True)
    return out


def _frame_count(seconds: float | None, fps: float) -> int | None:
    if seconds is None:
        return None
    if not isinstance(seconds, (int, float)) or seconds <= 0 or not math.isfinite(seconds):
        raise InputError(f"seconds must be a number > 0, got {seconds!r}")
    n = int(round(seconds * fps))
    if n < 1:
        raise InputError(f"{seconds} s at {fps} fps is less than one frame")
    if n > 3 * 3600 * 60:
        raise InputError(f"{seconds} s at {fps} fps is too long (at most 3 hours at 60 fps)")
    return n


def iter_frames(seconds: float | None = 10.0, fps: float = 30.0, seed: int = 0,
                size: tuple[int, int] = (640, 480), start: int = 0,
                **settings: Any) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Yield ``(frame_bgr, frame_truth)`` for a synthetic smear video, without any file I/O.

    ``seconds=None`` streams for ever (the ``demo`` source). ``frame_truth`` is one entry of
    truth.json's ``frame_truth``; the slide's cells are in ``SlideSimulator.header()``.
    Validation errors are raised on the first ``next()``; use :class:`SlideSimulator` directly
    to get them at construction.
    """
    sim = SlideSimulator(seed=seed, size=size, fps=fps, **settings)
    n = _frame_count(seconds, sim.fps)
    i = start
    while n is None or i < n:
        yield sim.frame(i)
        i += 1


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

_CODECS = ("avc1", "mp4v")
_codec_ok: dict[str, bool] = {}  # codec -> could open a writer (probed once per process)


def _open_writer(path: Path, fps: float, size: tuple[int, int]) -> tuple[cv2.VideoWriter, str]:
    """An MP4 writer: H.264 ('avc1') when this OpenCV build can encode it, else 'mp4v'.

    opencv-python-headless wheels usually lack an H.264 encoder; FFmpeg then logs a few error
    lines once per process while we probe (``hematovision synth`` silences them)."""
    old = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        for codec in _CODECS:
            if _codec_ok.get(codec) is False:
                continue
            wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size)
            _codec_ok[codec] = wr.isOpened()
            if _codec_ok[codec]:
                return wr, codec
            wr.release()
    finally:
        cv2.utils.logging.setLogLevel(old)
    raise InputError(f"cannot write {path}: this OpenCV build has no MP4 encoder (avc1/mp4v)")


def render_video(out_dir: str | Path, seconds: float = 60.0, fps: float = 30.0, seed: int = 0,
                 size: tuple[int, int] = (640, 480), progress: bool | None = None,
                 **settings: Any) -> Path:
    """Render ``video.mp4`` and ``truth.json`` into ``out_dir`` (created if needed); return
    ``out_dir`` as a Path. ``settings`` are :class:`SynthSettings` fields."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    sim = SlideSimulator(seed=seed, size=size, fps=fps, **settings)
    n = _frame_count(seconds, sim.fps)
    assert n is not None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {out}: {exc.strerror or exc}") from None
    video = out / "video.mp4"
    writer, codec = _open_writer(video, sim.fps, sim.size)
    if progress is None:
        progress = n > 150 and sys.stderr.isatty()
    frames_truth = []
    it: Any = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="synth", unit="frame", leave=False)
    try:
        for i in it:
            bgr, tr = sim.frame(i)
            writer.write(bgr)
            frames_truth.append(tr)
    finally:
        writer.release()
    truth = sim.header(n)
    truth["video"] = {"file": video.name, "codec": codec}
    truth["frame_truth"] = frames_truth
    tmp = out / "truth.json.tmp"
    tmp.write_text(json.dumps(truth, separators=(",", ":")) + "\n")
    tmp.replace(out / "truth.json")
    log.info("wrote %s (%d frames, %s) and truth.json", video, n, codec)
    return out


def cache_root() -> Path:
    """Where rendered clips are cached: $XDG_CACHE_HOME/hematovision (default ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hematovision"


def cached_video(name: str, seconds: float, fps: float = 30.0, seed: int = 0,
                 size: tuple[int, int] = (640, 480), **settings: Any) -> Path:
    """``video.mp4`` of a clip rendered once and cached (the demo, the bench's reference clip).

    The cache folder's name carries a hash of the parameters and of this module's source, so a
    changed simulator or clip renders anew instead of replaying a stale file. Rendering goes to a
    temporary folder first, so an interrupted render never leaves a half-written clip behind.
    """
    import hashlib

    key = json.dumps([seconds, fps, seed, list(size), sorted(settings.items())], default=str)
    digest = hashlib.sha1(key.encode() + Path(__file__).read_bytes()).hexdigest()[:10]
    folder = cache_root() / f"{name}-{digest}"
    video = folder / "video.mp4"
    if video.is_file() and video.stat().st_size > 0:
        return video
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    log.warning("rendering the %s clip into %s (first use only)", name, folder)
    render_video(tmp, seconds=seconds, fps=fps, seed=seed, size=size, progress=False, **settings)
    folder.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        os.replace(item, folder / item.name)
    tmp.rmdir()
    return video


def _fail(path: Path, what: str) -> InputError:
    return InputError(f"{path}: not a valid synth truth file: {what}")


def load_truth(path: str | Path) -> dict[str, Any]:
    """Read and validate a truth.json (or the synth folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "truth.json"
    if not p.is_file():
        raise InputError(f"{p}: truth file not found")
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(p, f"cannot parse JSON ({exc})") from None
    if not isinstance(d, dict):
        raise _fail(p, "top level is not an object")
    if d.get("version") != TRUTH_VERSION:
        raise _fail(p, f"version {d.get('version')!r}, expected {TRUTH_VERSION}")
    for key, typ in (("seed", int), ("fps", (int, float)), ("size", list), ("frames", int),
                     ("settings", dict), ("cells", list), ("frame_truth", list)):
        if not isinstance(d.get(key), typ):
            raise _fail(p, f"missing or wrong type for {key!r}")
    if len(d["size"]) != 2:
        raise _fail(p, "size must be [width, height]")
    if len(d["frame_truth"]) != d["frames"]:
        raise _fail(p, f"frames={d['frames']} but frame_truth has {len(d['frame_truth'])} entries")
    ids = {}
    for c in d["cells"]:
        if not (isinstance(c, dict) and isinstance(c.get("id"), int)
                and c.get("label") in CELL_TYPES
                and isinstance(c.get("slide_box"), list) and len(c["slide_box"]) == 4):
            raise _fail(p, f"bad cell entry {c!r}")
        ids[c["id"]] = c["label"]
    w, h = d["size"]
    for k, f in enumerate(d["frame_truth"]):
        if not isinstance(f, dict) or f.get("frame") != k or not isinstance(f.get("cells"), list):
            raise _fail(p, f"frame_truth[{k}] is malformed")
        for c in f["cells"]:
            box = c.get("box") if isinstance(c, dict) else None
            if c.get("id") not in ids or not isinstance(box, list) or len(box) != 4:
                raise _fail(p, f"frame {k}: bad cell {c!r}")
            if not (0 <= box[0] <= box[2] <= w and 0 <= box[1] <= box[3] <= h):
                raise _fail(p, f"frame {k}: box {box} outside the {w}x{h} frame")
    return d


def main(args: Any) -> int:
    """``hematovision synth OUT_DIR [--seconds S] [--fps F] [--seed N] [--size WxH]``."""
    # FFmpeg reads this once, at OpenCV's first video I/O: keeps the H.264 probe quiet.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    density = getattr(args, "wbc_per_frame", None)
    settings = {} if density is None else {"wbc_per_frame": float(density)}
    out = render_video(args.out_dir, seconds=args.seconds, fps=args.fps, seed=args.seed,
                       size=tuple(args.size), progress=None, **settings)
    truth = load_truth(out)
    labels = {c["id"]: c["label"] for c in truth["cells"]}
    seen = {c["id"] for f in truth["frame_truth"] for c in f["cells"]}
    by_type = ", ".join(f"{n} {t}" for t in CELL_TYPES
                        if (n := sum(1 for i in seen if labels[i] == t))) or "none"
    w, h = truth["size"]
    print(f"wrote {out / 'video.mp4'} ({truth['frames']} frames, {w}x{h} at {truth['fps']:g} fps, "
          f"{truth['video']['codec']}) and truth.json: {len(seen)} of {len(labels)} white cells "
          f"in view ({by_type})")
    return 0
