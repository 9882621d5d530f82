"""Names each tracked cell once: sightings, votes, the thumbnail and the label lock, by track id.

A track is *due* for the classifier when it is confirmed, seen in this frame, whole (not cut by
the border) and its label is not locked yet. A due sighting votes when it is sharp: at least
``cell_ratio`` times as sharp as the same cell's sharpest recent sighting (cell types differ in
texture, so a threshold shared by all cells would favour the grainy ones). The class scores of
``votes_needed`` votes are averaged and the label is then decided and locked: it never flickers.

A track that leaves (the stage carried it out of view, or it stayed unseen in view for
``decide_after`` frames) or ends before it has all its votes is decided from the votes it has; a
confirmed track that was whole in view but never sharp is ``unidentified``; a track never whole
in view is not judged at all (it was only ever seen cut by the border). Each decision is a
:class:`~detector.core.CountEvent` for the tally.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from detector.core import UNIDENTIFIED, CountEvent, Detections

log = logging.getLogger(__name__)


@dataclass
class VoteOptions:
    """Voting settings (frames are source frames)."""

    votes_needed: int = 3
    """Sharp, whole sightings averaged before a label is decided and locked."""
    cell_ratio: float = 0.6
    """A sighting votes when at least this sharp relative to the cell's sharpest recent one."""
    max_sightings: int = 8
    """How many recent sightings' sharpness values are remembered per cell."""
    decide_after: int = 30
    """Frames a cell may be unseen in view before it is decided from the votes it has (about
    1 s): the count does not wait for its track to end."""


@dataclass(eq=False)
class Ballot:
    """What the voter knows about one track."""

    first_frame: int
    last_frame: int
    last_box: np.ndarray
    sightings: deque[float]
    """Sharpness of the recent due sightings."""
    confirmed: bool = False
    ever_whole: bool = False
    votes: list[np.ndarray] = field(default_factory=list)
    thumb: np.ndarray | None = None
    label: str | None = None
    class_id: int = -1
    score: float = 0.0


class Voter:
    """Ballots keyed by track id; decisions come out as count events."""

    def __init__(self, labels: Sequence[str], label_of: Callable[[np.ndarray], tuple[str, float]],
                 options: VoteOptions | None = None) -> None:
        """``labels``: the classifier's labels (output order); ``label_of``: scores row ->
        (label, top score), ``unidentified`` below the classifier's minimum score."""
        self.labels = tuple(labels)
        self.label_of = label_of
        self.options = options or VoteOptions()
        self.ballots: dict[int, Ballot] = {}

    def reset(self) -> None:
        self.ballots = {}

    def observe(self, dets: Detections, whole: np.ndarray, frame_index: int) -> None:
        """Note where each tracked cell was seen in this frame (``dets.track_id``,
        ``dets.data["confirmed"]``; ``whole``: not cut by the border)."""
        confirmed = dets.data.get("confirmed")
        for i, tid in enumerate(dets.track_id.tolist()):
            b = self.ballots.get(tid)
            if b is None:
                b = self.ballots[tid] = Ballot(
                    first_frame=frame_index, last_frame=frame_index, last_box=dets.xyxy[i],
                    sightings=deque(maxlen=self.options.max_sightings))
            b.last_frame = frame_index
            b.last_box = dets.xyxy[i].copy()
            b.confirmed = bool(confirmed[i]) if confirmed is not None else True
            b.ever_whole |= bool(whole[i])

    def due(self, dets: Detections, whole: np.ndarray) -> list[int]:
        """Indices of this frame's detections the classifier should look at, in track order."""
        need = self.options.votes_needed
        out = []
        for i in np.argsort(dets.track_id, kind="stable"):
            b = self.ballots.get(int(dets.track_id[i]))
            if (b is not None and whole[i] and b.confirmed and b.label is None
                    and len(b.votes) < need):
                out.append(int(i))
        return out

    def sighting(self, track_id: int, sharpness: float) -> tuple[bool, bool]:
        """Record one due sighting -> (sharp enough to vote, the sharpest so far)."""
        b = self.ballots[track_id]
        best = max(b.sightings, default=0.0)
        b.sightings.append(sharpness)
        return sharpness >= self.options.cell_ratio * best, sharpness >= best

    def set_thumb(self, track_id: int, thumb: np.ndarray | None) -> None:
        self.ballots[track_id].thumb = thumb

    def thumb(self, track_id: int) -> np.ndarray | None:
        """The gallery picture of a cell: its sharpest sighting (None if never sharp)."""
        b = self.ballots.get(track_id)
        return None if b is None else b.thumb

    def vote(self, track_ids: Sequence[int], scores: np.ndarray) -> list[CountEvent]:
        """Add one vote (a row of class scores) per track -> events of the labels locked now."""
        out = []
        for tid, row in zip(track_ids, scores, strict=True):
            b = self.ballots[tid]
            if b.label is not None:
                continue
            b.votes.append(np.asarray(row, dtype=np.float32).reshape(-1))
            if len(b.votes) >= self.options.votes_needed:
                out.append(self._decide(tid, b))
        return out

    def close(self, track_ids: Iterable[int]) -> list[CountEvent]:
        """Decide tracks that ended (or left), from the votes they have -> events. Without
        votes, a confirmed track once whole in view is ``unidentified``; one never confirmed or
        never whole is not judged."""
        out = []
        for tid in track_ids:
            b = self.ballots.get(tid)
            if b is None or b.label is not None or not b.confirmed:
                continue
            if b.votes:
                out.append(self._decide(tid, b))
            elif b.ever_whole:
                b.label, b.score, b.class_id = UNIDENTIFIED, 0.0, -1
                out.append(self._event(tid, b))
        return out

    def leaving(self, track_ids: Iterable[int]) -> list[CountEvent]:
        """Decide tracks that left the view (they may come back, keeping the locked label) ->
        events. Only those with a vote: one without waits, as a return may show it sharp."""
        return self.close(t for t in track_ids if (b := self.ballots.get(t)) is not None
                          and b.votes)

    def forget(self, track_ids: Iterable[int]) -> None:
        """Drop the ballots of ended tracks."""
        for tid in track_ids:
            self.ballots.pop(tid, None)

    def annotate(self, dets: Detections) -> None:
        """Locked labels onto this frame's detections: ``class_id``, ``score`` and
        ``data["label"]`` ('' while undecided)."""
        names = np.full(len(dets), "", dtype=object)
        for i, tid in enumerate(dets.track_id.tolist()):
            b = self.ballots.get(tid)
            if b is not None and b.label is not None:
                dets.class_id[i] = b.class_id
                dets.score[i] = b.score
                names[i] = b.label
        dets.data["label"] = names

    def _decide(self, tid: int, b: Ballot) -> CountEvent:
        label, score = self.label_of(np.mean(np.stack(b.votes), axis=0))
        b.label, b.score = str(label), float(score)
        b.class_id = self.labels.index(b.label) if b.label in self.labels else -1
        return self._event(tid, b)

    def _event(self, tid: int, b: Ballot) -> CountEvent:
        assert b.label is not None
        return CountEvent.of(tid, b.label, b.score, b.first_frame, b.last_frame, b.last_box)
