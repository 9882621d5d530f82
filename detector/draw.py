"""Drawing only, never counting: cell boxes with labels and track ids, and the count panel.

Runs on every displayed frame, so it uses OpenCV primitives only, with colours fixed in advance:
one distinguishable colour per known label (``detector.core.KNOWN_LABELS``), grey for
``unidentified`` and for cells not classified yet; platelets and artefacts (rejected, never
counted) in dull colours and thin boxes. ``draw_cells`` and ``draw_panel`` return an annotated
copy and leave the input untouched (``inplace=True`` draws on the given array instead, saving a
copy); ``style_for`` and ``draw_tag`` are the shared sizes and label tags (``detector.still``
uses them for cut cells).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from detector.core import UNIDENTIFIED, VETO_LABELS, Detections, Summary

#: BGR colour per known label (bright and distinguishable on pink/purple smears for the white
#: cells, as far as six hues allow for common forms of colour blindness; dull for the rejects).
TYPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "neutrophil": (235, 160, 30),   # blue
    "eosinophil": (30, 110, 250),   # orange
    "basophil": (20, 230, 240),     # yellow
    "lymphocyte": (60, 200, 40),    # green
    "monocyte": (200, 60, 220),     # magenta
    "immature_granulocyte": (210, 210, 0),  # teal
    "erythroblast": (40, 40, 200),  # dark red
    "platelet": (120, 90, 140),     # dull purple
    "artefact": (90, 110, 120),     # dull olive
}
GREY: tuple[int, int, int] = (170, 170, 170)
#: Colours for labels outside KNOWN_LABELS (a model may know other classes), picked by label hash.
_EXTRA = ((255, 255, 0), (0, 170, 255), (150, 90, 255), (90, 255, 190), (255, 120, 150))

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_colour_cache: dict[str, tuple[int, int, int]] = {UNIDENTIFIED: GREY, "": GREY}


def colour_of(label: str | None) -> tuple[int, int, int]:
    """BGR colour for a label: fixed per cell type, grey for unidentified / unclassified."""
    if label is None:
        return GREY
    colour = _colour_cache.get(label)
    if colour is None:
        colour = TYPE_COLOURS.get(label) or _EXTRA[sum(label.encode()) % len(_EXTRA)]
        _colour_cache[label] = colour
    return colour


def _text_colour(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    b, g, r = bg
    return (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)


def style_for(shape: tuple[int, ...]) -> tuple[float, int, int]:
    """Font scale, text thickness and box thickness suited to the image size."""
    side = min(shape[0], shape[1])
    scale = float(np.clip(side / 1000.0, 0.4, 1.2))
    return scale, 1 if side < 900 else 2, 2 if side < 1200 else 3


def draw_tag(img: np.ndarray, text: str, x: int, y: int, colour: tuple[int, int, int],
         scale: float, thick: int) -> None:
    """Text on a filled background (drawn in place), above (x, y) or just below it when there
    is no room."""
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
    h, w = img.shape[:2]
    x = int(min(max(x, 0), max(w - tw - 4, 0)))
    top = y - th - base - 4
    if top < 0:
        top = y
    top = int(min(max(top, 0), max(h - th - base - 4, 0)))
    cv2.rectangle(img, (x, top), (x + tw + 4, top + th + base + 4), colour, cv2.FILLED)
    cv2.putText(img, text, (x + 2, top + th + 2), _FONT, scale, _text_colour(colour), thick,
                cv2.LINE_AA)


def draw_cells(bgr: np.ndarray, detections: Detections, labels: Sequence[str],
               show_track_ids: bool = True, inplace: bool = False) -> np.ndarray:
    """Boxes coloured by cell type with a "label 0.97" tag and "#12" track id.

    Args:
        bgr: H x W x 3 uint8 BGR frame (not modified unless ``inplace``).
        detections: cells; ``class_id`` indexes ``labels`` (-1: not classified yet, or
            unidentified), ``score`` is shown with the label, ``track_id`` >= 0 as "#id".
            A ``data["label"]`` string column, when present, names cells with ``class_id`` -1.
        labels: the model's labels (may include ``unidentified``).
        show_track_ids: prefix tags with "#id" for tracked cells.

    Returns:
        The annotated BGR image (a copy unless ``inplace``).
    """
    img = bgr if inplace else bgr.copy()
    n = len(detections)
    if n == 0:
        return img
    scale, thick, box_thick = style_for(img.shape)
    boxes = np.round(detections.xyxy).astype(np.int32)
    names = detections.data.get("label")
    n_labels = len(labels)
    for i in range(n):
        cid = int(detections.class_id[i])
        name: str | None = labels[cid] if 0 <= cid < n_labels else None
        if name is None and names is not None and names[i]:
            name = str(names[i])
        colour = colour_of(name)
        x1, y1, x2, y2 = (int(v) for v in boxes[i])
        strong = bool(name) and name not in VETO_LABELS
        cv2.rectangle(img, (x1, y1), (x2, y2), colour, box_thick if strong else 1)
        parts = []
        tid = int(detections.track_id[i])
        if show_track_ids and tid >= 0:
            parts.append(f"#{tid}")
        if name:
            parts.append(f"{name} {float(detections.score[i]):.2f}")
        if parts:
            draw_tag(img, " ".join(parts), x1, y1, colour, scale, thick)
    return img


def draw_panel(bgr: np.ndarray, summary: Summary | None, fps: float | None = None,
               inplace: bool = False) -> np.ndarray:
    """A semi-transparent panel (top left): count and differential % per class, NRBC per 100
    white cells (when any was counted), cells so far / target, and fps.

    Args:
        bgr: H x W x 3 uint8 BGR frame (not modified unless ``inplace``).
        summary: the count so far (None: nothing counted yet, no classes known).
        fps: frames per second to show, if given.
    """
    img = bgr if inplace else bgr.copy()
    counts = summary.counts if summary is not None else {}
    diff = summary.differential if summary is not None else {}
    total = summary.total if summary is not None else 0
    target = summary.target if summary is not None else None
    scale, thick, _ = style_for(img.shape)
    scale *= 1.05

    rows: list[tuple[str, str, str, tuple[int, int, int] | None]] = []
    for label, n in counts.items():
        pct = diff.get(label)
        pct_text = f"{pct:5.1f}%" if pct is not None else ""
        rows.append((label, str(int(n)), pct_text, colour_of(label)))
    footer = [f"cells {total} / {int(target)}" if target else f"cells {total}"]
    if summary is not None and summary.nrbc:
        footer.insert(0, f"NRBC {summary.nrbc} ({summary.nrbc_per_100_wbc:.1f}/100 WBC)")
    if fps is not None:
        footer.append(f"{fps:.1f} fps")

    (_, th), base = cv2.getTextSize("Hg", _FONT, scale, thick)
    line = th + base + 6
    swatch = th
    w_label = max([cv2.getTextSize(r[0], _FONT, scale, thick)[0][0] for r in rows] + [0])
    w_num = max([cv2.getTextSize(r[1], _FONT, scale, thick)[0][0] for r in rows] + [0])
    w_pct = cv2.getTextSize("100.0%", _FONT, scale, thick)[0][0]
    w_rows = swatch + 6 + w_label + 12 + w_num + 12 + w_pct if rows else 0
    w_foot = max(cv2.getTextSize(t, _FONT, scale, thick)[0][0] for t in footer)
    pad = 8
    pw = max(w_rows, w_foot) + 2 * pad
    ph = (len(rows) + len(footer)) * line + 2 * pad
    h, w = img.shape[:2]
    pw, ph = min(pw, w), min(ph, h)
    x0, y0 = 0, 0

    roi = img[y0:y0 + ph, x0:x0 + pw]
    cv2.addWeighted(roi, 0.35, np.zeros_like(roi), 0.65, 0.0, dst=roi)

    y = y0 + pad
    white = (255, 255, 255)
    for label, num, pct, colour in rows:
        base_y = y + th + 2
        x = x0 + pad
        cv2.rectangle(img, (x, y + 3), (x + swatch, y + 3 + swatch), colour or GREY, cv2.FILLED)
        x += swatch + 6
        cv2.putText(img, label, (x, base_y), _FONT, scale, white, thick, cv2.LINE_AA)
        x += w_label + 12
        nw = cv2.getTextSize(num, _FONT, scale, thick)[0][0]
        cv2.putText(img, num, (x + w_num - nw, base_y), _FONT, scale, white, thick, cv2.LINE_AA)
        x += w_num + 12
        if pct:
            cv2.putText(img, pct, (x, base_y), _FONT, scale, white, thick, cv2.LINE_AA)
        y += line
    for text in footer:
        cv2.putText(img, text, (x0 + pad, y + th + 2), _FONT, scale, white, thick, cv2.LINE_AA)
        y += line
    return img
