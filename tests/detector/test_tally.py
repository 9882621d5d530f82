"""Tally: counted once, differential, Wilson intervals (hand-checked), NRBC, vetoes, reset."""

from __future__ import annotations

import numpy as np
import pytest

from detector.core import UNIDENTIFIED, CountEvent
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


def ev(track_id: int, label: str, score: float = 0.9) -> CountEvent:
    return CountEvent.of(track_id, label, score, 0, 5, np.array([1, 2, 30, 40.04], np.float32))


def test_counts_each_track_id_once():
    tally = Tally(LABELS, target=3)
    events = tally.update([ev(1, "neutrophil"), ev(1, "eosinophil"), ev(2, "lymphocyte")])
    assert [(e.track_id, e.label) for e in events] == [(1, "neutrophil"), (2, "lymphocyte")]
    assert events[0].to_json() == {"track_id": 1, "label": "neutrophil", "score": 0.9,
                                   "first_frame": 0, "last_frame": 5,
                                   "box": [1.0, 2.0, 30.0, 40.0], "cut": False}
    assert tally.update([ev(1, "neutrophil")]) == []  # same track again: not counted twice
    assert tally.count(2, "monocyte", 0.5, 3, 4, [0, 0, 1, 1]) is None
    assert tally.total == 2 and tally.events == events


def test_differential_sums_to_100_and_target():
    tally = Tally(LABELS, target=4)
    tally.update([ev(1, "neutrophil"), ev(2, "neutrophil"), ev(3, "eosinophil")])
    s = tally.summary()
    assert s.counts == {"neutrophil": 2, "eosinophil": 1, "lymphocyte": 0, "unidentified": 0}
    assert s.total == 3 and not s.target_reached
    assert s.differential["neutrophil"] == pytest.approx(200 / 3)
    assert sum(s.differential.values()) == pytest.approx(100.0)
    lo, hi = s.ci95["neutrophil"]
    assert (lo, hi) == pytest.approx((100 * 0.2077, 100 * 0.9385), abs=0.01)  # Wilson, 2 of 3
    j = s.to_json()
    assert j["differential"]["neutrophil"] == 66.67 and j["ci95"]["neutrophil"] == [20.77, 93.85]
    tally.update([ev(4, UNIDENTIFIED)])
    s = tally.summary()
    assert s.total == 4 and s.target_reached and s.counts["unidentified"] == 1
    assert sum(s.differential.values()) == pytest.approx(100.0)


def test_erythroblasts_are_nrbc_and_platelets_veto():
    """The white cells make the total; erythroblasts are NRBC per 100 white cells; platelets
    and artefacts are never counted."""
    labels = ("neutrophil", "lymphocyte", "erythroblast", "platelet", "artefact")
    tally = Tally(labels, target=100)
    assert tally.labels == ("neutrophil", "lymphocyte", UNIDENTIFIED)
    got = tally.update([ev(1, "neutrophil"), ev(2, "lymphocyte"), ev(3, "neutrophil"),
                        ev(4, UNIDENTIFIED), ev(5, "erythroblast"), ev(6, "platelet"),
                        ev(7, "artefact")])
    assert [e.track_id for e in got] == [1, 2, 3, 4, 5]  # the NRBC event is logged
    assert tally.update([ev(6, "neutrophil")]) == []  # a vetoed track stays vetoed
    s = tally.summary()
    assert s.counts == {"neutrophil": 2, "lymphocyte": 1, UNIDENTIFIED: 1} and s.total == 4
    assert (s.nrbc, s.nrbc_per_100_wbc, s.vetoed) == (1, 25.0, 2)
    assert s.differential == {"neutrophil": 50.0, "lymphocyte": 25.0, UNIDENTIFIED: 25.0}
    assert s.to_json()["nrbc_per_100_wbc"] == 25.0


def test_unknown_label_counted_unidentified():
    tally = Tally(LABELS)
    (e,) = tally.update([ev(1, "smudge")])
    assert e.label == UNIDENTIFIED and tally.counts["unidentified"] == 1


def test_reset():
    tally = Tally(LABELS, target=2)
    tally.update([ev(1, "neutrophil"), ev(2, "eosinophil")])
    assert tally.target_reached
    tally.reset()
    s = tally.summary()
    assert s.total == 0 and not s.target_reached and tally.events == []
    assert all(v == 0.0 for v in s.differential.values())
    assert tally.update([ev(1, "neutrophil")])  # ids forgotten too: a new slide


def test_bad_target():
    with pytest.raises(ValueError, match="target"):
        Tally(LABELS, target=0)
