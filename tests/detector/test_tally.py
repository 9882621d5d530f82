"""Tally: counted once, differential, Wilson intervals (hand-checked), target, reset."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from detector.tally import Tally, wilson_interval

LABELS = ("neutrophil", "eosinophil", "lymphocyte")


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (5, 10, 0.2366, 0.7634),  # p = .5: symmetric
        (0, 10, 0.0, 0.2775),  # zero successes: the Wald interval would be [0, 0]
        (10, 10, 0.7225, 1.0),
        (10, 100, 0.0552, 0.1744),
        (60, 100, 0.5020, 0.6906),
    ],
)
def test_wilson_interval_hand_checked(k, n, lo, hi):
    a, b = wilson_interval(k, n)
    assert a == pytest.approx(lo, abs=1e-4)
    assert b == pytest.approx(hi, abs=1e-4)


def test_wilson_interval_no_data():
    assert wilson_interval(0, 0) == (0.0, 1.0)


@dataclass
class T:
    id: int
    label: str | None
    confirmed: bool = True
    score: float = 0.9
    counted: bool = False
    first_frame: int = 0
    last_frame: int = 5
    box: np.ndarray = field(default_factory=lambda: np.array([1, 2, 30, 40], np.float32))


def test_counts_once_and_only_decided_confirmed_tracks():
    tally = Tally(LABELS, target=3)
    tracks = [T(1, "neutrophil"), T(2, None), T(3, "lymphocyte", confirmed=False)]
    events = tally.update(tracks)
    assert [e["track_id"] for e in events] == [1]
    assert events[0] == {"track_id": 1, "label": "neutrophil", "score": 0.9, "first_frame": 0,
                         "last_frame": 5, "box": [1.0, 2.0, 30.0, 40.0]}
    assert tracks[0].counted
    assert tally.update(tracks) == []  # same track again: not counted twice
    tracks[0].counted = False  # even if a caller forgot the flag, the id is remembered
    assert tally.update(tracks) == []
    assert tally.total == 1


def test_differential_sums_to_100_and_target():
    tally = Tally(LABELS, target=4)
    tally.update([T(1, "neutrophil"), T(2, "neutrophil"), T(3, "eosinophil")])
    s = tally.summary()
    assert s["counts"] == {"neutrophil": 2, "eosinophil": 1, "lymphocyte": 0, "unidentified": 0}
    assert s["total"] == 3 and not s["target_reached"]
    assert s["differential"]["neutrophil"] == pytest.approx(200 / 3)
    assert sum(s["differential"].values()) == pytest.approx(100.0)
    lo, hi = s["ci95"]["neutrophil"]
    assert lo < 200 / 3 < hi
    tally.update([T(4, "unidentified")])
    s = tally.summary()
    assert s["total"] == 4 and s["target_reached"] and s["counts"]["unidentified"] == 1
    assert sum(s["differential"].values()) == pytest.approx(100.0)


def test_unknown_label_counted_unidentified():
    tally = Tally(LABELS)
    tally.update([T(1, "platelet")])
    assert tally.counts["unidentified"] == 1


def test_reset():
    tally = Tally(LABELS, target=2)
    tally.update([T(1, "neutrophil"), T(2, "eosinophil")])
    assert tally.target_reached
    tally.reset()
    s = tally.summary()
    assert s["total"] == 0 and not s["target_reached"] and tally.events == []
    assert all(v == 0.0 for v in s["differential"].values())
    assert tally.update([T(1, "neutrophil")])  # ids forgotten too: a new slide


def test_bad_target():
    with pytest.raises(ValueError, match="target"):
        Tally(LABELS, target=0)
