"""Counting logic: each cell counted once, counts per class, the differential and its uncertainty.

Logic only (drawing is in ``detector.draw``). A cell is counted when its track is confirmed and its
label is decided (locked); the tally remembers the track ids it has counted, so calling ``update``
again with the same track never counts it twice.

Conventions:
- ``total`` counts every counted cell, ``unidentified`` ones included (the cell was seen; the
  model was not sure what it is). The differential is the share of each label, ``unidentified``
  included, in percent of ``total``, so the shares sum to 100.
- The 95 % interval of each share is the Wilson score interval (z = 1.96): unlike the normal
  (Wald) interval it stays inside [0, 100] and is sensible for small counts and shares near 0.
- ``target_reached`` when ``total >= target`` (a "100-cell differential").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from detector.core import UNIDENTIFIED, with_unidentified

log = logging.getLogger(__name__)

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n -> (lo, hi) as fractions in [0, 1]."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


class CountableTrack(Protocol):
    """What the tally reads from a track (``detector.track.Track`` has all of these)."""

    id: int
    confirmed: bool
    label: str | None
    score: float
    counted: bool
    first_frame: int
    last_frame: int
    box: np.ndarray


class Tally:
    """Counts per label, total, differential with 95 % Wilson intervals, and counting events."""

    def __init__(self, labels: Sequence[str], target: int = 100) -> None:
        if target < 1:
            raise ValueError(f"target must be >= 1, got {target}")
        self.labels: tuple[str, ...] = with_unidentified(labels)
        self.target = int(target)
        self.counts: dict[str, int] = {}
        self.events: list[dict[str, Any]] = []
        self._counted_ids: set[int] = set()
        self.reset()

    def reset(self) -> None:
        """Forget everything counted (a new slide)."""
        self.counts = {name: 0 for name in self.labels}
        self.events = []
        self._counted_ids = set()

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))

    @property
    def target_reached(self) -> bool:
        return self.total >= self.target

    def count(
        self,
        track_id: int,
        label: str,
        score: float,
        first_frame: int,
        last_frame: int,
        box: Iterable[float],
    ) -> dict[str, Any] | None:
        """Count one decided cell -> its event, or None when this track id was already counted."""
        track_id = int(track_id)
        if track_id in self._counted_ids:
            return None
        if label not in self.counts:
            log.warning("label %r is not one of %s: counted as %s",
                        label, self.labels, UNIDENTIFIED)
            label = UNIDENTIFIED
        self._counted_ids.add(track_id)
        self.counts[label] += 1
        event = {
            "track_id": track_id,
            "label": label,
            "score": round(float(score), 4),
            "first_frame": int(first_frame),
            "last_frame": int(last_frame),
            "box": [round(float(v), 1) for v in box],
        }
        self.events.append(event)
        return event

    def update(self, tracks: Iterable[CountableTrack]) -> list[dict[str, Any]]:
        """Count every confirmed track with a decided label not counted yet -> this call's events.

        Sets ``track.counted`` on the tracks it counts. The event's box is the track's
        ``last_box`` (where it was last seen) when it has one, else ``box``.
        """
        new: list[dict[str, Any]] = []
        for tr in tracks:
            if tr.counted or not tr.confirmed or tr.label is None:
                continue
            box = getattr(tr, "last_box", None)
            box = tr.box if box is None else box
            event = self.count(tr.id, tr.label, tr.score, tr.first_frame, tr.last_frame, box)
            tr.counted = True
            if event is not None:
                new.append(event)
        return new

    def differential(self) -> dict[str, float]:
        """Share of each label in percent of the total (all zeros before the first cell)."""
        n = self.total
        return {k: (100.0 * v / n if n else 0.0) for k, v in self.counts.items()}

    def ci95(self) -> dict[str, list[float]]:
        """95 % Wilson score interval of each share, in percent: {label: [lo, hi]}."""
        n = self.total
        out: dict[str, list[float]] = {}
        for k, v in self.counts.items():
            lo, hi = wilson_interval(v, n)
            out[k] = [100.0 * lo, 100.0 * hi]
        return out

    def summary(self) -> dict[str, Any]:
        """Plain dict for the panel, the report and /stats.json."""
        return {
            "counts": dict(self.counts),
            "total": self.total,
            "target": self.target,
            "differential": self.differential(),
            "ci95": self.ci95(),
            "target_reached": self.target_reached,
        }
