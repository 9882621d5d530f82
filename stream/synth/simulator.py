"""A painted slide under a moving camera: frame i's pixels (defocus, motion blur, vignetting,
uneven illumination, dust, noise) and its truth (the white cells in view)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np

from detector.errors import InputError
from stream.synth.camera import CameraPlan, Focus
from stream.synth.settings import RBC_PX_640, TRUTH_VERSION, check_seed, check_size
from stream.synth.slide import Slide, SlideCell, make_slide

#: Grey level of the black around a round field of view (sensor noise comes on top).
_FIELD_BLACK = 8.0


class SlideSimulator:
    """A slide under a moving camera: ``frame(i)`` renders frame i and its truth.

    Frames are deterministic from the seed and can be asked for in any order (the camera plan is
    extended as needed)."""

    def __init__(self, seed: int = 0, size: tuple[int, int] = (640, 480), fps: float = 30.0,
                 slide: Slide | None = None, **settings: Any) -> None:
        self.seed = check_seed(seed)
        self.size = check_size(size)
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
        self.camera = CameraPlan(cam_rng, s, self.fps, self.slide.size, self.size,
                                  [c.center for c in self.slide.cells])
        self.focus = Focus(self.seed, s, self.scale)
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
        # a round field of view (an eyepiece camera): 1 inside, 0 in the black around it, a
        # 3-px soft rim; fixed in frame coordinates
        self.field: np.ndarray | None = None
        if s.field_stop:
            rim = 0.5 * s.field_stop * fh - np.hypot(xx - (fw - 1) / 2, yy - (fh - 1) / 2)
            self.field = np.clip(rim / 3.0 + 0.5, 0, 1).astype(np.float32)[..., None]
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
            if self.field is not None:  # what the round field of view shows of it
                ys = np.clip(np.arange(sub.shape[0]) + int(round(by1 + v1 - y0)), 0, fh - 1)
                xs = np.clip(np.arange(sub.shape[1]) + int(round(bx1 + u1 - x0)), 0, fw - 1)
                sub = np.logical_and(sub, self.field[ys[:, None], xs[None, :], 0] > 0.5)
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
        if self.field is not None:
            out *= self.field
            out += _FIELD_BLACK * (1.0 - self.field)
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



def frame_count(seconds: float | None, fps: float) -> int | None:
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
    n = frame_count(seconds, sim.fps)
    i = start
    while n is None or i < n:
        yield sim.frame(i)
        i += 1


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
