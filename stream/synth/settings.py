"""The simulator's settings: every knob (density, type mix, stain, optics, motion) in one
dataclass, with the seed filling whatever is left unset, and the checks of size and seed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from detector.core import CELL_TYPES
from detector.errors import InputError

TRUTH_VERSION = 1
#: Red-cell diameter in frame pixels at 640x480 (BCCD, 100x objective: ~90-110 px).
RBC_PX_640 = 105.0
#: A normal adult differential (fractions).
NORMAL_DIFFERENTIAL: dict[str, float] = {
    "neutrophil": 0.60,
    "lymphocyte": 0.30,
    "monocyte": 0.06,
    "eosinophil": 0.03,
    "basophil": 0.01,
}
MIN_SIZE = (128, 96)


#: Stains and cameras of other labs: the red cells' colour (BGR as seen on the reference
#: illuminant) and the camera's white balance, exposure and vignetting. Nuclei keep the
#: Romanowsky violet (strength and hue still vary with the seed).
STAIN_PRESETS: dict[str, dict[str, Any]] = {
    "bccd": {},
    "grey_rbc": {"rbc": (163, 160, 163), "white_balance": (1.02, 1.0, 0.97)},
    "teal_rbc": {"rbc": (178, 166, 146), "white_balance": (1.05, 1.0, 0.9)},
    "yellow_bg": {"rbc": (150, 160, 192), "white_balance": (0.78, 0.95, 1.04)},
    "blue_bg": {"rbc": (166, 160, 170), "white_balance": (1.06, 0.97, 0.82)},
    "dim_vignetted": {"exposure": 0.45, "vignette": 0.5},
    "eyepiece": {"field_stop": 1.0},
}


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
    field_stop: float | None = None
    """Diameter of a round field of view in frame heights, black around it (an eyepiece camera,
    a sensor wider than the optics' image circle); 0: the camera sees to the frame's edges."""
    illum_gradient: float | None = None
    """Linear brightness slope across the frame (fraction, uneven illumination)."""
    noise_sigma: float | None = None
    """Sensor noise standard deviation in grey levels."""
    stain: str | None = None
    """A named stain and camera (see ``STAIN_PRESETS``): red-cell colour and white balance of
    another lab's microscope; None: BCCD's pink red cells."""
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
        out = self._resolved(seed, size)
        preset = STAIN_PRESETS.get(out.stain or "", {})
        for name, value in preset.items():  # a preset's camera, unless set explicitly
            if (name in ("white_balance", "exposure", "vignette", "field_stop")
                    and getattr(self, name) is None):
                setattr(out, name, value)
        out.validate()
        return out

    def _resolved(self, seed: int, size: tuple[int, int]) -> SynthSettings:
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
            "field_stop": 0.0,  # (not drawn: a camera's, set by a preset)
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

        need(self.stain is None or self.stain in STAIN_PRESETS,
             f"stain must be one of {sorted(STAIN_PRESETS)}, got {self.stain!r}")
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
        need(self.field_stop is None or self.field_stop == 0 or 0.5 <= self.field_stop <= 2,
             f"field_stop must be 0 or in [0.5, 2] frame heights, got {self.field_stop}")
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


def check_size(size: tuple[int, int]) -> tuple[int, int]:
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


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a whole number >= 0, got {seed!r}")
    return int(seed)
