"""The camera: a person driving the stage (pauses, pans, nudges, returns to places seen) and the
focus over time (slow drift, brief fully blurred moments)."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from stream.synth.settings import SynthSettings


@dataclass
class _Segment:
    kind: str
    start: int
    frames: int
    p0: tuple[float, float]
    p1: tuple[float, float]


class CameraPlan:
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


class Focus:
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
