"""The data contracts that cross module borders: frames, detections and cell labels.

Only plain NumPy arrays and Python scalars travel between the segmenter, tracker, classifier,
tally and drawing code; never OpenCV or interpreter objects. Modelled on supervision's
``Detections``: parallel arrays, validated once when built, so a shape mistake fails where it is
made with a message that names the expected and the actual shape.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Cell names the project knows, in a stable display order. A model card decides which of these
#: a given model can output; ``UNIDENTIFIED`` is added by the runtime for low-confidence cells.
CELL_TYPES: tuple[str, ...] = ("neutrophil", "eosinophil", "lymphocyte", "monocyte", "basophil")
UNIDENTIFIED = "unidentified"


def with_unidentified(labels: Sequence[str]) -> tuple[str, ...]:
    """A model's labels plus ``unidentified``: the order the tally and reports use."""
    names = tuple(str(x) for x in labels)
    return names if UNIDENTIFIED in names else (*names, UNIDENTIFIED)


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

    @property
    def wh(self) -> np.ndarray:
        """(N, 2) float32 box widths and heights."""
        return self.xyxy[:, 2:] - self.xyxy[:, :2]


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
