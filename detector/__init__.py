"""Pure analysis: frame in -> cells, tracks, counts out. No I/O beyond loading a model, no threads.

Never imports ``stream`` or ``training`` (and so never TensorFlow).
"""

from detector.core import (
    CELL_TYPES,
    KNOWN_LABELS,
    UNIDENTIFIED,
    CountEvent,
    Detections,
    Frame,
    Summary,
    box_iou,
)
from detector.errors import HematoVisionError, InputError, ModelError

__all__ = [
    "CELL_TYPES",
    "KNOWN_LABELS",
    "UNIDENTIFIED",
    "CountEvent",
    "Detections",
    "Frame",
    "HematoVisionError",
    "InputError",
    "ModelError",
    "Summary",
    "box_iou",
]
