"""Counting logic: each cell counted once, counts per class, the differential and its uncertainty.

Logic only (drawing is in ``detector.draw``), as supervision's ``LineZone``: it counts
``(track_id, label)`` events (:class:`~detector.core.CountEvent`, made by the voter when a label
locks) and remembers the ids it has seen, so the same track is never counted twice. It never
reads or writes tracker state.

Conventions:
- The six white-cell kinds make the count: ``total`` counts every counted white cell,
  ``unidentified`` ones included (the cell was seen; the model was not sure what it is). The
  differential is the share of each label, ``unidentified`` included, in percent of ``total``, so
  the shares sum to 100.
- ``erythroblast`` (a nucleated red cell) is not a white cell: counted apart and reported as NRBC
  per 100 white cells, as analysers do. ``platelet`` and ``artefact`` veto the candidate: never
  counted (``vetoed`` says how many were rejected). The classifier gives them only when sure
  (``VETO_MIN_SCORE``); an unsure one comes as ``unidentified`` and is counted.
- The 95 % interval of each share is the Wilson score interval (z = 1.96): unlike the normal
  (Wald) interval it stays inside [0, 100] and is sensible for small counts and shares near 0.
- ``target_reached`` when ``total >= target`` (a "100-cell differential").
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence

from detector.core import (
    ERYTHROBLAST,
    UNIDENTIFIED,
    VETO_LABELS,
    CountEvent,
    Summary,
    counted_labels,
)

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


class Tally:
    """Counts per label, total, differential with 95 % Wilson intervals, and counting events."""

    def __init__(self, labels: Sequence[str], target: int = 100) -> None:
        """``labels``: the classifier's labels; the counted ones are its white-cell labels plus
        ``unidentified`` (see :func:`detector.core.counted_labels`)."""
        if target < 1:
            raise ValueError(f"target must be >= 1, got {target}")
        self.labels: tuple[str, ...] = counted_labels(labels)
        self.target = int(target)
        self.counts: dict[str, int] = {}
        self.events: list[CountEvent] = []
        self.nrbc = 0
        self.vetoed = 0
        self._seen_ids: set[int] = set()
        self.reset()

    def reset(self) -> None:
        """Forget everything counted (a new slide)."""
        self.counts = {name: 0 for name in self.labels}
        self.events = []
        self.nrbc = self.vetoed = 0
        self._seen_ids = set()

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))

    @property
    def target_reached(self) -> bool:
        return self.total >= self.target

    def count(self, track_id: int, label: str, score: float, first_frame: int, last_frame: int,
              box: Iterable[float], cut: bool = False) -> CountEvent | None:
        """Count one decided cell -> its event (see :meth:`add`)."""
        return self.add(CountEvent.of(track_id, label, score, first_frame, last_frame, box, cut))

    def add(self, event: CountEvent) -> CountEvent | None:
        """Count one event -> the event as counted, or None when its track id was seen already
        or its label vetoes the cell. A label that is none of the counted ones, erythroblast or
        a veto label is counted ``unidentified`` (with a warning)."""
        if event.track_id in self._seen_ids:
            return None
        self._seen_ids.add(event.track_id)
        if event.label in VETO_LABELS:
            self.vetoed += 1
            return None
        if event.label == ERYTHROBLAST:
            self.nrbc += 1
        elif event.label not in self.counts:
            log.warning("label %r is not one of %s: counted as %s",
                        event.label, self.labels, UNIDENTIFIED)
            event = dataclasses.replace(event, label=UNIDENTIFIED)
        if event.label != ERYTHROBLAST:
            self.counts[event.label] += 1
        self.events.append(event)
        return event

    def update(self, events: Iterable[CountEvent]) -> list[CountEvent]:
        """Count each event not seen yet -> the ones counted in this call."""
        return [e for e in map(self.add, events) if e is not None]

    def differential(self) -> dict[str, float]:
        """Share of each label in percent of the total (all zeros before the first cell)."""
        n = self.total
        return {k: (100.0 * v / n if n else 0.0) for k, v in self.counts.items()}

    def ci95(self) -> dict[str, tuple[float, float]]:
        """95 % Wilson score interval of each share, in percent: {label: (lo, hi)}."""
        n = self.total
        out: dict[str, tuple[float, float]] = {}
        for k, v in self.counts.items():
            lo, hi = wilson_interval(v, n)
            out[k] = (100.0 * lo, 100.0 * hi)
        return out

    def summary(self) -> Summary:
        """The count so far, for the panel, the report and /stats.json (``Summary.to_json``)."""
        n = self.total
        return Summary(counts=dict(self.counts), total=n, target=self.target,
                       differential=self.differential(), ci95=self.ci95(), nrbc=self.nrbc,
                       nrbc_per_100_wbc=100.0 * self.nrbc / n if n else 0.0,
                       vetoed=self.vetoed)
