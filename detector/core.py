"""The data contracts that cross module borders: frames, detections and cell labels.

Only plain NumPy arrays and Python scalars travel between the segmenter, tracker, classifier,
tally and drawing code; never OpenCV or interpreter objects. Modelled on supervision's
``Detections``: parallel arrays, validated once when built, so a shape mistake fails where it is
made with a message that names the expected and the actual shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import cv2
import numpy as np

#: The white cells: they make the count and the differential (display order).
WHITE_CELLS: tuple[str, ...] = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte",
                                "immature_granulocyte")
#: A nucleated red cell: reported as NRBC per 100 white cells, not in the white-cell total.
ERYTHROBLAST = "erythroblast"
#: Not a white cell: a candidate named so is rejected and never counted.
VETO_LABELS: tuple[str, ...] = ("platelet", "artefact")
#: A candidate is rejected by a veto label only when the model gives it at least this (calibrated)
#: probability; below, it is counted ``unidentified``, shown for review: a rejected cell is lost
#: from the count without a trace, an unidentified one stays in view.
VETO_MIN_SCORE = 0.9
#: Every label a model may output, in display order. A model card decides which of these a given
#: model knows; ``UNIDENTIFIED`` is added by the runtime for low-confidence cells.
KNOWN_LABELS: tuple[str, ...] = (*WHITE_CELLS, ERYTHROBLAST, *VETO_LABELS)
#: The white-cell types the smear simulator paints, in its fixed order (it draws cell types in
#: this order: changing it changes every simulated video).
CELL_TYPES: tuple[str, ...] = ("neutrophil", "eosinophil", "lymphocyte", "monocyte", "basophil")
UNIDENTIFIED = "unidentified"


def naming_bars(labels: Sequence[str], min_score: float) -> np.ndarray:
    """Per label (in ``labels`` order), the least top score that names a cell so; below it the
    cell is ``unidentified``: ``min_score``, and at least ``VETO_MIN_SCORE`` for a veto label."""
    return np.array([max(min_score, VETO_MIN_SCORE) if x in VETO_LABELS else min_score
                     for x in labels], dtype=np.float32)


def counted_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """The labels of a model that make the white-cell count, plus ``unidentified`` (the order the
    tally and reports use): every label but ``erythroblast`` and the veto labels (a label the
    project does not know counts as a white cell, as the model card says it is one)."""
    names = tuple(str(x) for x in labels if x != ERYTHROBLAST and x not in VETO_LABELS)
    return names if UNIDENTIFIED in names else (*names, UNIDENTIFIED)


@dataclass(frozen=True)
class CountEvent:
    """One cell counted: its track, label and score, the frames it was seen in, and where.

    Attributes:
        track_id: the tracker's id (the tally counts an id once).
        label: the locked label (a white cell, ``erythroblast`` or ``unidentified``).
        score: mean top score of the votes it was decided from (0 for ``unidentified`` cells
            never seen sharp).
        first_frame, last_frame: first and last frame index it was seen in.
        box: ``(x1, y1, x2, y2)`` where it was last seen, in frame pixels.
        cut: the image's edge cuts the cell (still photos only: video waits for a whole view).
    """

    track_id: int
    label: str
    score: float
    first_frame: int
    last_frame: int
    box: tuple[float, float, float, float]
    cut: bool = False

    @classmethod
    def of(cls, track_id: int, label: str, score: float, first_frame: int, last_frame: int,
           box: Iterable[float], cut: bool = False) -> CountEvent:
        """Built from any numbers (NumPy scalars, an array box)."""
        x1, y1, x2, y2 = (float(v) for v in box)
        return cls(int(track_id), str(label), float(score), int(first_frame), int(last_frame),
                   (x1, y1, x2, y2), bool(cut))

    def to_json(self) -> dict[str, Any]:
        """The event as written to the events file, the page's log and reports."""
        return {"track_id": self.track_id, "label": self.label, "score": round(self.score, 4),
                "first_frame": self.first_frame, "last_frame": self.last_frame,
                "box": [round(v, 1) for v in self.box], "cut": self.cut}


@dataclass(frozen=True)
class Summary:
    """The count so far (see ``detector.tally`` for the conventions).

    Attributes:
        counts: white cells per label, ``unidentified`` included, in display order.
        total: sum of ``counts`` (the white-cell total).
        target: cells to count (a 100- or 200-cell differential).
        differential: share of each label in percent of ``total`` (sums to 100).
        ci95: 95 % Wilson interval of each share, in percent: label -> (lo, hi).
        nrbc: nucleated red cells (``erythroblast``) counted, not in ``total``.
        nrbc_per_100_wbc: ``100 * nrbc / total`` (0 before the first white cell).
        vetoed: candidates named ``platelet`` or ``artefact``, rejected, never counted.
    """

    counts: Mapping[str, int]
    total: int
    target: int
    differential: Mapping[str, float]
    ci95: Mapping[str, tuple[float, float]]
    nrbc: int = 0
    nrbc_per_100_wbc: float = 0.0
    vetoed: int = 0

    @property
    def target_reached(self) -> bool:
        return self.total >= self.target

    def to_json(self) -> dict[str, Any]:
        """The summary for reports, /stats.json and the page: percentages to 2 decimals."""
        return {
            "counts": dict(self.counts),
            "total": self.total,
            "target": self.target,
            "target_reached": self.target_reached,
            "differential": {k: round(v, 2) for k, v in self.differential.items()},
            "ci95": {k: [round(lo, 2), round(hi, 2)] for k, (lo, hi) in self.ci95.items()},
            "nrbc": self.nrbc,
            "nrbc_per_100_wbc": round(self.nrbc_per_100_wbc, 2),
            "vetoed": self.vetoed,
        }


#: Outside the field of view: no channel above this share of the glass's brightness (the black
#: surround of a round field stop; the densest nuclei keep ~0.4 in their brightest channel:
#: 0.47 the darkest of BCCD's and PBC's).
OUTSIDE_FIELD = 0.15
#: Black: no channel above this share of the glass's; no stain comes near it, but a camera's
#: marks (a scale bar, text) and dirt on its sensor do.
BLACK = 0.06
#: The camera's text: near-black strokes narrower than this share of the frame's width (5 px at
#: 640; a nucleus is a blob, its lobes twice as thick even at 0.35x BCCD's magnification).
MARK_WIDTH = 1 / 128


def outside_field(image: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """What of a frame is not the specimen's picture (uint8 mask, a little wider than the black
    itself, to take in the dim rim and the marks' anti-aliased edges), or None when the frame
    has none. ``image``: BGR or one channel, uint8, at full resolution (a burned-in stroke two
    pixels wide is no longer near black in a reduced copy). ``size``: (width, height) of the
    working copy the mask is wanted for; every working pixel that holds any of it is outside.

    Black is no stain: it reads as the densest stain of all (a giant nucleus) and never moves
    with the stage (a stage shift of zero), so the segmenter and the stage-motion estimate set
    it apart and read it as glass. Near black (``OUTSIDE_FIELD``) is that where it is joined to
    the frame's border (the surround of a round field seen by an eyepiece camera, or by a
    sensor larger than the image circle; black bars), where it holds black (``BLACK``: a scale
    bar, a label, dirt on the sensor) and where it is a thin stroke (the camera's text, a time
    stamp). No stain is near black: the darkest nuclei keep about half the glass's light in
    their brightest channel. A frame with no near-black pixel (a camera that sees the field to
    its edges and marks nothing) costs one look.
    """
    one = image.ndim == 2
    grey = image if one else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if int(grey.min()) > OUTSIDE_FIELD * 255:
        return None  # no near-black pixel, however bright the glass (4x cheaper a look)
    sample = image[::4, ::4]
    if not one:  # each pixel's brightest channel
        sample = np.maximum(np.maximum(sample[..., 0], sample[..., 1]), sample[..., 2])
    cdf = np.cumsum(np.bincount(sample.ravel(), minlength=256))
    glass = float(np.searchsorted(cdf, 0.97 * cdf[-1]))
    if glass * OUTSIDE_FIELD < 1:
        return None

    def below(share: float) -> np.ndarray:  # every channel below share x the glass's level
        top = int(np.ceil(share * glass)) - 1
        return cv2.inRange(image, 0, top) if one else cv2.inRange(image, (0, 0, 0), (top,) * 3)

    dark = below(OUTSIDE_FIELD)
    if not cv2.countNonZero(dark):
        return None
    # joined to the border, or holding black: floods from a black frame drawn around the
    # picture and from a pixel of every black piece
    framed = cv2.copyMakeBorder(dark, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=255)
    cv2.floodFill(framed, None, (0, 0), 128, flags=8)
    pieces, _ = cv2.findContours(below(BLACK), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    for piece in pieces:
        x, y = (int(v) + 1 for v in piece[0, 0])
        if framed[y, x] == 255:
            cv2.floodFill(framed, None, (x, y), 128, flags=8)
    outside = cv2.compare(framed[1:-1, 1:-1], 128, cv2.CMP_EQ)
    # thin strokes: what an opening wider than a stroke removes
    k = max(3, int(round(MARK_WIDTH * image.shape[1]))) | 1
    marks = cv2.subtract(dark, cv2.morphologyEx(dark, cv2.MORPH_OPEN, np.ones((k, k), np.uint8)))
    outside = cv2.bitwise_or(outside, marks)
    if not cv2.countNonZero(outside):
        return None
    outside = cv2.threshold(outside, 0, 1, cv2.THRESH_BINARY)[1]
    if size is not None and size != (image.shape[1], image.shape[0]):
        outside = (cv2.resize(outside, size, interpolation=cv2.INTER_AREA) > 0).view(np.uint8)
    # the rim where the field fades to black, and the marks' soft edges, go with it
    rim = max(1, int(round(0.01 * max(outside.shape))))
    return cv2.dilate(outside, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rim + 1,) * 2))


def glass_filled(image: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """A copy of ``image`` (BGR or one channel) with the part ``outside`` the field of view
    (:func:`outside_field`) set to the glass's level (each channel's 97th percentile inside the
    field), so it reads as empty glass: no stain, and no edge that stays put."""
    inside = image[::2, ::2][outside[::2, ::2] == 0]
    if not len(inside):
        return image
    filled = np.empty_like(image)
    filled[:] = np.percentile(inside, 97, axis=0).astype(np.uint8)
    return cv2.copyTo(filled, outside, image.copy())


@dataclass(frozen=True)
class Frame:
    """One image from a source.

    Attributes:
        bgr: H x W x 3 uint8 image in OpenCV's BGR channel order.
        index: Frame number within the source, counting every frame the source produced
            (including frames a live source dropped), so gaps are visible downstream.
        t: Capture time in seconds (source clock: ``time.monotonic()`` for live sources, the
            presentation timestamp for files).
    """

    bgr: np.ndarray
    index: int = 0
    t: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.bgr, np.ndarray):
            raise TypeError(f"Frame.bgr must be a numpy array, got {type(self.bgr).__name__}")
        if self.bgr.ndim != 3 or self.bgr.shape[2] != 3 or self.bgr.dtype != np.uint8:
            raise ValueError(
                "Frame.bgr must be an (H, W, 3) uint8 BGR image, got "
                f"shape {self.bgr.shape} dtype {self.bgr.dtype}"
            )

    @property
    def height(self) -> int:
        return int(self.bgr.shape[0])

    @cached_property
    def half(self) -> np.ndarray:
        """Half-size copy (area-averaged: OpenCV's exact 2x path), made once per frame and
        shared by the steps that read a reduced frame (the segmenter's working copy, the
        stage-motion window, the focus gate), so the full frame is read once, not three times."""
        h, w = self.bgr.shape[:2]
        return cv2.resize(self.bgr, (w // 2, h // 2), interpolation=cv2.INTER_AREA)

    def reduced(self, width: int, height: int) -> np.ndarray:
        """The half-size copy when it is at least ``width`` x ``height``, else the frame."""
        h, w = self.bgr.shape[:2]
        return self.half if w >= 2 * width and h >= 2 * height else self.bgr

    @property
    def width(self) -> int:
        return int(self.bgr.shape[1])


def _column(name: str, value: np.ndarray | None, n: int, dtype: type, fill: float) -> np.ndarray:
    """Return ``value`` as a 1-D array of length ``n`` (or a filled one when None)."""
    if value is None:
        return np.full(n, fill, dtype=dtype)
    arr = np.asarray(value, dtype=dtype)
    if arr.shape != (n,):
        raise ValueError(f"Detections.{name} must have shape ({n},), got {arr.shape}")
    return arr


@dataclass
class Detections:
    """White-cell candidates in one frame, as parallel arrays of length N.

    Attributes:
        xyxy: (N, 4) float32 boxes ``x1, y1, x2, y2`` in pixels of the full-resolution frame.
        score: (N,) float32 confidence of the current label (classifier top score), or of the
            segmentation where no label has been given yet.
        class_id: (N,) int32 index into the model card's labels; -1 for "not classified yet" or
            ``unidentified``.
        track_id: (N,) int64 tracker id; -1 before tracking.
        area: (N,) float32 area of the cell's mask in full-resolution pixels.
        touches_edge: (N,) bool, True when the cell is cut by the frame border (judged only
            once fully in view).
        data: extra per-detection arrays, each with first dimension N (e.g. ``sharpness``).
    """

    xyxy: np.ndarray
    score: np.ndarray | None = None
    class_id: np.ndarray | None = None
    track_id: np.ndarray | None = None
    area: np.ndarray | None = None
    touches_edge: np.ndarray | None = None
    data: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float32)
        if xyxy.size == 0:
            xyxy = xyxy.reshape(0, 4)
        if xyxy.ndim != 2 or xyxy.shape[1] != 4:
            raise ValueError(f"Detections.xyxy must have shape (N, 4), got {xyxy.shape}")
        n = xyxy.shape[0]
        self.xyxy = xyxy
        self.score = _column("score", self.score, n, np.float32, 0.0)
        self.class_id = _column("class_id", self.class_id, n, np.int32, -1)
        self.track_id = _column("track_id", self.track_id, n, np.int64, -1)
        if self.area is None:
            wh = np.clip(xyxy[:, 2:] - xyxy[:, :2], 0, None)
            self.area = (wh[:, 0] * wh[:, 1]).astype(np.float32)
        else:
            self.area = _column("area", self.area, n, np.float32, 0.0)
        self.touches_edge = _column("touches_edge", self.touches_edge, n, bool, False)
        for key, value in self.data.items():
            arr = np.asarray(value)
            if arr.shape[:1] != (n,):
                raise ValueError(
                    f"Detections.data[{key!r}] must have first dimension {n}, got {arr.shape}"
                )
            self.data[key] = arr

    @classmethod
    def empty(cls) -> Detections:
        """No detections."""
        return cls(xyxy=np.empty((0, 4), dtype=np.float32))

    @classmethod
    def concat(cls, parts: Sequence[Detections]) -> Detections:
        """One Detections of ``parts`` in order (their ``data`` keys must match)."""
        if not parts:
            return cls.empty()
        keys = parts[0].data.keys()
        return cls(
            xyxy=np.concatenate([p.xyxy for p in parts]),
            score=np.concatenate([p.score for p in parts]),
            class_id=np.concatenate([p.class_id for p in parts]),
            track_id=np.concatenate([p.track_id for p in parts]),
            area=np.concatenate([p.area for p in parts]),
            touches_edge=np.concatenate([p.touches_edge for p in parts]),
            data={k: np.concatenate([p.data[k] for p in parts]) for k in keys},
        )

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))

    def __getitem__(self, index: int | slice | np.ndarray | list[int]) -> Detections:
        """Select detections by index, slice, index list or boolean mask; always a Detections."""
        if isinstance(index, int | np.integer):
            index = [int(index)]
        return Detections(
            xyxy=self.xyxy[index],
            score=self.score[index],
            class_id=self.class_id[index],
            track_id=self.track_id[index],
            area=self.area[index],
            touches_edge=self.touches_edge[index],
            data={k: v[index] for k, v in self.data.items()},
        )

    @property
    def centers(self) -> np.ndarray:
        """(N, 2) float32 box centres."""
        return (self.xyxy[:, :2] + self.xyxy[:, 2:]) / 2.0


def in_view(dets: Detections, width: int, height: int, margin: float = 1.0) -> np.ndarray:
    """Which detections are whole: not cut by the border (``touches_edge``) and at least
    ``margin`` pixels from it. Only whole cells are judged."""
    b = dets.xyxy
    return (~dets.touches_edge & (b[:, 0] >= margin) & (b[:, 1] >= margin)
            & (b[:, 2] <= width - margin) & (b[:, 3] <= height - margin))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M) float32."""
    a = np.asarray(a, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0).astype(np.float32)
