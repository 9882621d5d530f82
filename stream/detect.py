"""``hematovision detect IMAGE... [--model M] [--json] [--save-dir D]``: name white cells in stills.

Each image goes through the one still-image analysis (``detector.still``, also behind ``run`` on
photos and the page's image tab): segmented, then all its cells classified in one batch.
``--json`` prints one JSON object per image per line::

    {"image": PATH, "width": W, "height": H,
     "cells": [{"box": [x1, y1, x2, y2], "label": "neutrophil", "score": 0.97,
                "scores": {"neutrophil": 0.97, ...}, "cut": false}]}

Boxes are integer pixels of the original image; scores are rounded to 4 decimals; cells are listed
top to bottom, then left to right; ``label`` is ``unidentified`` when the top score is below the
model card's ``min_score``; ``cut`` is true for a cell the photo's edge cuts (named and counted
all the same: a photo has no next frame that shows it whole). Without ``--json`` a readable
table per image is printed; ``--save-dir`` draws cut cells with a dashed box and a "cut" tag.

A bad input (missing, empty folder, not an image, too small ...) prints one line on stderr,
``hematovision detect: PATH: problem``, and the other images are still processed; the exit code is
then 1. A greyscale photo is such a bad input (no stain colour to find or name cells by). A missing
or broken model is one line and exit code 2. Never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detector.classify import CellClassifier
from detector.core import UNIDENTIFIED
from detector.errors import HematoVisionError, InputError
from detector.segment import Segmenter
from detector.still import StillCells, analyse_still, draw_still
from stream.images import expand_image_arg, read_still

log = logging.getLogger(__name__)

PROG = "hematovision detect"


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Hide the TFLite runtime's native "INFO: Created ... XNNPACK delegate" line (written to
    file descriptor 2 by C++, deaf to TF_CPP_MIN_LOG_LEVEL), so stderr holds only our messages.
    CLI only: it briefly redirects the process's fd 2, which a library must not do."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def image_record(path: Path | str, image_bgr: np.ndarray, cells: StillCells) -> dict[str, Any]:
    """The JSON object of one image (``detect --json``; the page's image table reads it too)."""
    h, w = image_bgr.shape[:2]
    dets, labels, cut = cells.detections, cells.labels, cells.cut
    out = []
    for i in range(len(dets)):
        x1, y1, x2, y2 = (int(round(float(v))) for v in dets.xyxy[i])
        cid = int(dets.class_id[i])
        out.append({
            "box": [max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)],
            "label": labels[cid] if cid >= 0 else UNIDENTIFIED,
            "score": round(float(dets.score[i]), 4),
            "scores": {lab: round(float(p), 4)
                       for lab, p in zip(labels, cells.scores[i], strict=True)},
            "cut": bool(cut[i]),
        })
    return {"image": str(path), "width": int(w), "height": int(h), "cells": out}


def format_table(record: dict[str, Any]) -> str:
    """A readable block for one image."""
    cells = record["cells"]
    n = len(cells)
    lines = [f"{record['image']}  ({record['width']}x{record['height']}): "
             f"{n} white cell{'s' if n != 1 else ''}"]
    if cells:
        lines.append(f"  {'#':>3}  {'box x1,y1,x2,y2':<22} {'label':<14} {'score':>5}")
        for i, c in enumerate(cells, 1):
            box = ",".join(str(v) for v in c["box"])
            edge = "  cut by the edge" if c["cut"] else ""
            lines.append(f"  {i:>3}  {box:<22} {c['label']:<14} {c['score']:>5.2f}{edge}")
    return "\n".join(lines)


def _save_name(path: Path, used: set[str]) -> str:
    name = f"{path.stem}.png"
    k = 1
    while name in used:
        name = f"{path.stem}_{k}.png"
        k += 1
    used.add(name)
    return name


def main(args: argparse.Namespace) -> int:
    """Run ``detect``; returns 0, 1 (some input failed) or 2 (model or output folder unusable)."""
    try:
        with native_stderr_silenced():
            classifier = CellClassifier(args.model)
    except HematoVisionError as exc:
        _err(f"error: {exc}")
        return 2
    save_dir: Path | None = None
    if args.save_dir:
        save_dir = Path(args.save_dir).expanduser()
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _err(f"error: {save_dir}: cannot create output folder ({exc.strerror or exc})")
            return 2
    segmenter = Segmenter()
    draw_labels = (*classifier.labels, UNIDENTIFIED)
    as_json = bool(args.json)

    failed = 0
    done = 0
    totals: Counter[str] = Counter()
    used_names: set[str] = set()
    seen: set[Path] = set()
    for arg in args.images:
        try:
            paths = expand_image_arg(arg)
        except InputError as exc:
            _err(str(exc))
            failed += 1
            continue
        for path in paths:
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                image = read_still(path)
                cells = analyse_still(image, segmenter, classifier,
                                      single_cell=bool(args.single_cell))
            except HematoVisionError as exc:
                _err(str(exc))
                failed += 1
                continue
            except Exception as exc:  # never a traceback for one bad image; keep going
                log.debug("detect failed on %s", path, exc_info=True)
                _err(f"{path}: analysis failed ({type(exc).__name__}: {exc})")
                failed += 1
                continue
            record = image_record(path, image, cells)
            done += 1
            totals.update(c["label"] for c in record["cells"])
            if as_json:
                print(json.dumps(record), flush=True)
            else:
                print(format_table(record), flush=True)
            if save_dir is not None:
                out = save_dir / _save_name(path, used_names)
                ok, buf = cv2.imencode(".png", draw_still(image, cells))
                try:
                    if not ok:
                        raise OSError("PNG encoding failed")
                    out.write_bytes(buf.tobytes())
                except OSError as exc:
                    _err(f"{out}: cannot write ({exc.strerror or exc})")
                    failed += 1
    if not as_json and done > 1:
        parts = ", ".join(f"{lab} {totals[lab]}" for lab in draw_labels if totals[lab])
        cells = sum(totals.values())
        print(f"\n{done} images, {cells} white cells" + (f": {parts}" if parts else ""))
    return 1 if failed else 0
