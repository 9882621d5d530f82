"""Stage motion: how far the whole field moved since the previous frame.

The stage moves as a whole, so every cell in a frame shifts by about the same vector. It is
measured once per frame by phase correlation on small one-channel copies of the frames (it suits
a translating stage on red-cell texture), and checked against the cells themselves: when the
correlation is weak (blur, an empty field) or the cells disagree with it (dust on the sensor, an
overlay, or a pan faster than the window can lock on), the displacement most cells agree on
wins. The tracker moves its tracks by this shift before matching (as supervision composes its
camera-motion compensator with a tracker).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from detector.core import Frame, glass_filled, outside_field

log = logging.getLogger(__name__)

#: A round field of view is the camera's: looked for again every this many frames.
_OUTSIDE_EVERY = 8
#: Largest residual (half-size pixels) the fine phase-correlation step is trusted with.
_FINE_REACH = 6.0


@dataclass
class MotionOptions:
    """Stage-motion settings."""

    shift_size: tuple[int, int] = (160, 120)
    """Size of the phase-correlation window (width, height); the grey copy is twice this."""
    min_response: float = 0.08
    """Phase correlation response below which the shift is taken from the cells instead."""


class StageMotion:
    """Global frame-to-frame shift in full-resolution pixels; ``update`` once per frame.

    After ``update``: ``shift`` (dx, dy) and ``source``, where it came from: "phase", "cells",
    "previous" (the last shift, kept) or "none" (no update yet).
    """

    def __init__(self, options: MotionOptions | None = None) -> None:
        self.options = options or MotionOptions()
        self.shift: tuple[float, float] = (0.0, 0.0)
        self.source = "none"
        self._prev_half: np.ndarray | None = None
        self._window: np.ndarray | None = None
        self._window_fine: np.ndarray | None = None
        #: the part of the frame outside a round field of view, as last looked for
        self._outside: np.ndarray | None = None
        self._outside_shape: tuple[int, ...] = ()
        self._outside_age = -1

    def reset(self) -> None:
        """Forget the previous frame (a new field, or a new slide)."""
        self.__init__(self.options)  # type: ignore[misc]

    def small_grey_of(self, image: Frame | np.ndarray) -> np.ndarray:
        """Half-size one-channel copy of a frame (2x ``shift_size``) for phase correlation.

        The green channel, area-averaged: stained cells absorb green most, so it carries most of
        the contrast, and it costs less than a grey conversion (area averaging, not subsampling:
        aliasing made the dead reckoning drift 3x more on the simulator). Read from the frame's
        shared half-size copy when that is large enough (for 640x480 the same pixels: averaging
        commutes with taking a channel; other sizes differ by rounding, under half a grey level
        on average). Outside a round field of view (an eyepiece camera), and where the camera burns
        in black marks, it is set to the glass's level: the black surround's rim and the marks
        stay put while the stage moves, and would pull the correlation towards no shift at
        all."""
        w, h = self.options.shift_size
        src = image.reduced(2 * w, 2 * h) if isinstance(image, Frame) else image
        green = cv2.extractChannel(src, 1) if src.ndim == 3 else src
        if green.shape[1] != 2 * w or green.shape[0] != 2 * h:
            green = cv2.resize(green, (2 * w, 2 * h), interpolation=cv2.INTER_AREA)
        # (found by every channel: a nucleus's green is near black; the camera's, so looked for
        # again only every few frames)
        self._outside_age = (self._outside_age + 1) % _OUTSIDE_EVERY
        if self._outside_age == 0 or self._outside_shape != src.shape[:2]:
            full = image.bgr if isinstance(image, Frame) else image
            self._outside, self._outside_shape = outside_field(full, (2 * w, 2 * h)), src.shape[:2]
        if self._outside is not None:
            green = glass_filled(green, self._outside)  # (a copy: never the frame's shared one)
        return green

    def update(self, image: Frame | np.ndarray | None, predicted: np.ndarray,
               radius: np.ndarray, centers: np.ndarray) -> np.ndarray:
        """Shift since the previous frame -> float32 (dx, dy).

        ``image``: this frame, a Frame or a BGR image (None: no picture, cells only);
        ``predicted``: (K, 2) centres where the tracker expects the cells it saw recently
        (before this shift), ``radius``: (K,) how far a centre may be from it and still agree;
        ``centers``: (N, 2) this frame's cells.
        """
        o = self.options
        bgr = image.bgr if isinstance(image, Frame) else image
        frame_size = (bgr.shape[1], bgr.shape[0]) if bgr is not None else (640, 480)
        phase = (self._phase_shift(self.small_grey_of(image), frame_size)
                 if image is not None else None)
        strong = phase is not None and phase[2] >= o.min_response
        shift = self._choose(phase, strong, predicted, radius, centers, frame_size)
        self.shift = (float(shift[0]), float(shift[1]))
        return shift

    def _choose(self, phase: tuple[float, float, float] | None, strong: bool,
                pred: np.ndarray, radius: np.ndarray, centers: np.ndarray,
                frame_size: tuple[int, int]) -> np.ndarray:
        explained = 0
        if strong:
            shift = np.array(phase[:2], np.float32)
            # do the cells agree? (a static pattern - dust on the sensor, an overlay - or a
            # pan faster than the correlation window can lock the phase onto a wrong shift)
            if len(pred) < 2 or len(centers) < 2:
                self.source = "phase"
                return shift
            d = np.linalg.norm(centers[None] - (pred + shift)[:, None], axis=2)
            explained = int((d.min(axis=1) <= radius).sum())
            if explained * 2 >= min(len(pred), len(centers)):
                self.source = "phase"
                return shift
        # weak response (blur, empty field) or cells disagreeing: the displacement most agree on
        cell_shift, support = _consensus(pred, centers, radius, 0.5 * max(frame_size))
        if strong:
            if support >= 2 and support > explained:
                self.source = "cells"
                return cell_shift
            self.source = "phase"
            return np.array(phase[:2], np.float32)
        if support >= 2 or (support == 1 and len(pred) == 1 and len(centers) == 1):
            self.source = "cells"
            return cell_shift
        self.source = "previous"
        return np.array(self.shift, np.float32)

    def _phase_shift(self, half: np.ndarray, frame_size: tuple[int, int]
                     ) -> tuple[float, float, float] | None:
        """Global shift from the previous frame, in full-resolution pixels -> (dx, dy, response).

        Fine step: phase correlation of the central ``shift_size`` patch of the half-size copies,
        the current patch displaced by a prediction of the shift (rounded). The prediction is
        the previous frame's shift (a stage moves smoothly); when the fine step cannot confirm
        it (weak response, or a residual beyond ``_FINE_REACH``), a coarse step - the whole
        frame at half ``shift_size``, 80x60: reaches +-320 px per frame at 640x480 - predicts
        instead, and the fine step runs again. The coarse step alone is not enough: sub-pixel
        estimates at such small scales are biased (a 160x120 whole-frame correlation under-reads
        slow pans by up to 30 %, which adds up for tracks moved by dead reckoning); skipping the
        fine step on a still stage tripled the drift on the simulator (slow creeps read as still).
        """
        w, h = self.options.shift_size
        cur_half = half.astype(np.float32)
        y0, x0 = h // 2, w // 2
        prev_half, self._prev_half = self._prev_half, cur_half
        if prev_half is None:
            return None
        if self._window is None:
            self._window = cv2.createHanningWindow((w // 2, h // 2), cv2.CV_32F)
            self._window_fine = cv2.createHanningWindow((w, h), cv2.CV_32F)
        fw, fh = frame_size
        kx, ky = fw / (2 * w), fh / (2 * h)  # full-size pixels per half-size pixel
        min_r = self.options.min_response

        def fine(px: float, py: float) -> tuple[float, float, float] | None:
            cx, cy = int(round(px)), int(round(py))
            if abs(cx) > x0 or abs(cy) > y0:
                return None
            # contiguous copies: cv2.phaseCorrelate writes into non-contiguous inputs (it
            # windowed the frames in place, corrupting them for the next frame)
            p = np.ascontiguousarray(prev_half[y0:y0 + h, x0:x0 + w])
            c = np.ascontiguousarray(cur_half[y0 + cy:y0 + cy + h, x0 + cx:x0 + cx + w])
            (fx, fy), r = cv2.phaseCorrelate(p, c, self._window_fine)
            if r < min_r or abs(fx) >= _FINE_REACH or abs(fy) >= _FINE_REACH:
                return None
            return cx + fx, cy + fy, float(r)

        guess = fine(self.shift[0] / kx, self.shift[1] / ky)
        if guess is not None and guess[2] >= 2 * min_r:
            return guess[0] * kx, guess[1] * ky, guess[2]
        small = (w // 2, h // 2)
        prev = cv2.resize(prev_half, small, interpolation=cv2.INTER_AREA)
        cur = cv2.resize(cur_half, small, interpolation=cv2.INTER_AREA)
        (dx, dy), response = cv2.phaseCorrelate(prev, cur, self._window)
        sx, sy = 4.0 * dx, 4.0 * dy  # in half-size pixels
        if response >= min_r:
            refined = fine(sx, sy)
            if refined is not None:
                sx, sy, response = refined[0], refined[1], max(response, refined[2])
        return sx * kx, sy * ky, float(response)


def _consensus(pred: np.ndarray, centers: np.ndarray, radius: np.ndarray,
               max_shift: float) -> tuple[np.ndarray, int]:
    """Displacement most detection/track pairs agree on -> (median shift, inliers)."""
    if len(pred) == 0 or len(centers) == 0:
        return np.zeros(2, np.float32), 0
    d = (centers[None, :, :] - pred[:, None, :]).reshape(-1, 2)
    d = d[np.abs(d).max(axis=1) <= max_shift]
    if len(d) == 0:
        return np.zeros(2, np.float32), 0
    r = float(np.median(radius))
    close = np.linalg.norm(d[:, None, :] - d[None, :, :], axis=2) <= r
    support = close.sum(axis=1)
    best = int(np.argmax(support))
    inl = d[close[best]]
    return np.median(inl, axis=0).astype(np.float32), int(support[best])


def same_scene(a_bgr: np.ndarray, b_bgr: np.ndarray, min_response: float = 0.5) -> bool:
    """True when two images look like consecutive frames of one field (a video, or a folder of
    frames), False for unrelated photos: the phase correlation response of consecutive
    simulator frames was >= 0.64 (blurred moments included), of unrelated BCCD photos 0.12 in
    the median."""
    m = StageMotion()
    size = (a_bgr.shape[1], a_bgr.shape[0])
    m._phase_shift(m.small_grey_of(a_bgr), size)
    out = m._phase_shift(m.small_grey_of(cv2.resize(b_bgr, size)), size)
    return out is not None and out[2] >= min_response
