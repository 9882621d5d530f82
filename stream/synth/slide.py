"""Painting the virtual slide: red cells with central pallor (some crenated), platelets (some
clumped) and white cells of the five types with their textbook morphology, composed in optical
density so overlapping cells darken as stained cells do."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

from detector.core import CELL_TYPES
from detector.errors import InputError
from stream.synth.settings import (
    NORMAL_DIFFERENTIAL,
    RBC_PX_640,
    STAIN_PRESETS,
    SynthSettings,
    check_seed,
    check_size,
    make_settings,
)

log = logging.getLogger(__name__)

RBC_UM = 7.5
#: White-cell diameters in micrometres (min, max).
WBC_DIAMETER_UM: dict[str, tuple[float, float]] = {
    "neutrophil": (12.0, 15.0),
    "eosinophil": (12.0, 17.0),
    "basophil": (10.0, 14.0),
    "lymphocyte": (7.0, 10.0),
    "monocyte": (15.0, 20.0),
}
LARGE_LYMPHOCYTE_UM = (10.0, 15.0)
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
    "mono_cyto": _od((194, 180, 176)),  # grey-blue, paler than a lymphocyte's
    "platelet": _od((200, 165, 180)),
    "platelet_gran": _od((185, 125, 155)),
}
_HEMA_KEYS = {"nucleus", "nucleus_dense", "nucleus_mono", "baso_gran", "lymph_cyto", "mono_cyto",
              "platelet", "platelet_gran", "neut_gran"}
_EOSIN_KEYS = {"rbc", "eos_gran", "neut_cyto", "eos_cyto", "baso_cyto"}



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
    wob = {"basophil": 0.07, "monocyte": 0.12}.get(label, 0.035)
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
        # the largest white cell (BCCD's monocytes, any haematology atlas): an irregular outline,
        # a large nucleus off the centre, folded into a kidney or horseshoe (the fold a quarter
        # to half of its width deep), lacy chromatin, pale grey-blue cytoplasm with vacuoles
        a = rng.uniform(0, 2 * math.pi)
        off = r * rng.uniform(0.08, 0.2)
        ncx, ncy = lx + off * math.cos(a), ly + off * math.sin(a)
        ax, ay = r * rng.uniform(0.66, 0.8), r * rng.uniform(0.5, 0.64)
        _, m = _shape_rho(h, w, ncx, ncy, ax, ay, a, _wobble(rng, 0.1, 6))
        bite_r = ay * rng.uniform(0.6, 0.9)
        dist = ay + bite_r - 2 * ay * rng.uniform(0.25, 0.5)  # centre of the fold's bite
        bx, by = ncx - math.sin(a) * dist, ncy + math.cos(a) * dist
        _, bite = _shape_rho(h, w, bx, by, bite_r, bite_r, 0.0, [])
        nuc = m * (1 - bite)
        nv = int(rng.choice([0, 0, 1, 2, 3, 5]))
        _dots(gran, rng, nv, lx, ly, 0.8 * r, (0.04 * r, 0.08 * r))  # vacuoles
        cyto_od, gran_od, nuc_od, gran_amt = c["mono_cyto"], c["mono_cyto"], c["nucleus_mono"], -0.7
        tex = 1.0 + 0.28 * _smooth_noise(rng, h, w, max(r * 0.02, 1.0))
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
    """Stain OD vectors for one slide: the stain preset's colours, strength and hue varied per
    seed."""
    preset = STAIN_PRESETS.get(s.stain or "", {})
    out = {}
    for key, od in _OD.items():
        v = _od(preset[key]) if key in preset else od.copy()
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
    seed = check_seed(seed)
    fw, fh = check_size(size)
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
