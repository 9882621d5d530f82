"""Detection figures of the white-cell segmenter on a Pascal VOC folder.

Matching rule: a detection matches a ground-truth ``WBC`` box when the detection's box centre lies
inside that box, one-to-one. Where one centre lies in several boxes or several centres in one box,
the matching with the most pairs is taken (augmenting paths), preferring nearer centres; this is
small (a few cells a frame), so no Hungarian solver is needed.

Run ``python -m training.detection_eval FOLDER`` for a quick report (recall, precision, ms/frame).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from detector.errors import HematoVisionError, InputError
from stream.images import read_image
from training.data import class_folder_images, content_group, folder_label
from training.voc import VocRecord, read_voc

log = logging.getLogger(__name__)


def match_centres(
    pred_xyxy: np.ndarray, gt_xyxy: np.ndarray
) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Match detections to GT boxes by "detection centre inside GT box", one-to-one.

    Returns (pairs as (pred index, gt index) sorted by pred, unmatched pred indices, unmatched gt
    indices). Maximum number of pairs; among candidates, nearer box centres are tried first.
    """
    pred = np.asarray(pred_xyxy, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_xyxy, dtype=np.float64).reshape(-1, 4)
    pc = (pred[:, :2] + pred[:, 2:]) / 2.0
    gc = (gt[:, :2] + gt[:, 2:]) / 2.0
    inside = (
        (pc[:, None, 0] >= gt[None, :, 0])
        & (pc[:, None, 0] <= gt[None, :, 2])
        & (pc[:, None, 1] >= gt[None, :, 1])
        & (pc[:, None, 1] <= gt[None, :, 3])
    )
    dist = np.linalg.norm(pc[:, None, :] - gc[None, :, :], axis=2)
    cand = [
        sorted(np.nonzero(inside[i])[0].tolist(), key=lambda j, i=i: dist[i, j])
        for i in range(len(pred))
    ]
    gt_owner: dict[int, int] = {}

    def augment(i: int, seen: set[int]) -> bool:
        for j in cand[i]:
            if j in seen:
                continue
            seen.add(j)
            if j not in gt_owner or augment(gt_owner[j], seen):
                gt_owner[j] = i
                return True
        return False

    # Preds with the closest candidate first, so uncontested near matches win ties.
    order = sorted(
        (i for i in range(len(pred)) if cand[i]), key=lambda i: float(dist[i, cand[i][0]])
    )
    for i in order:
        augment(i, set())
    pairs = sorted((i, j) for j, i in gt_owner.items())
    matched_p = {i for i, _ in pairs}
    matched_g = {j for _, j in pairs}
    return (
        pairs,
        [i for i in range(len(pred)) if i not in matched_p],
        [j for j in range(len(gt)) if j not in matched_g],
    )


def evaluate_detection(
    records: Sequence[VocRecord] | Iterable[VocRecord],
    segmenter,
    progress: bool = True,
    threads: int = 1,
) -> dict:
    """Run ``segmenter.find`` on every record and count matches against its WBC boxes.

    Timing covers only the ``find`` call (image already decoded), with OpenCV limited to
    ``threads`` threads (restored afterwards). Returns a dict with tp, fp, fn, recall, precision,
    images, ms_median, ms_mean, ms_p95 (wall clock), cpu_ms_median (this thread's CPU time,
    which other processes on the machine do not inflate) and ``failures``: one entry per image
    with a miss or a false detection (image, missed GT boxes, false boxes, all detections).
    """
    records = list(records)
    if not records:
        raise InputError("no annotated images to evaluate")
    old_threads = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    tp = fp = fn = 0
    fp_edge = 0
    times: list[float] = []
    cpu: list[float] = []
    failures: list[dict] = []
    it: Iterable[VocRecord] = records
    if progress:
        from tqdm import tqdm

        it = tqdm(records, desc="detection", unit="img", file=sys.stderr)
    try:
        for rec in it:
            img = read_image(rec.image)
            t0, c0 = time.perf_counter(), time.thread_time()
            det = segmenter.find(img)
            times.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
            pairs, up, ug = match_centres(det.xyxy, rec.wbc)
            tp += len(pairs)
            fp += len(up)
            fn += len(ug)
            fp_edge += int(np.sum(det.touches_edge[up])) if up else 0
            if up or ug:
                failures.append(
                    {
                        "image": str(rec.image),
                        "missed": rec.wbc[ug].round(1).tolist(),
                        "false": det.xyxy[up].round(1).tolist(),
                        "false_touches_edge": det.touches_edge[up].tolist(),
                        "detections": det.xyxy.round(1).tolist(),
                    }
                )
    finally:
        cv2.setNumThreads(old_threads)
    ms = [t * 1000.0 for t in times]
    return {
        "images": len(records),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "fp_touching_edge": fp_edge,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "ms_median": statistics.median(ms),
        "ms_mean": statistics.fmean(ms),
        "ms_p95": float(np.percentile(ms, 95)),
        # CPU time of the calling thread: robust to other processes sharing the machine.
        "cpu_ms_median": statistics.median(c * 1000.0 for c in cpu),
        "threads": threads,
        "failures": failures,
    }


#: Named image perturbations for robustness figures: white balance, exposure, gamma, stain
#: strength and hue, red cells stained grey or blue-grey/teal, yellowish and bluish backgrounds,
#: dim and vignetted illumination, a round field in a black surround (an eyepiece camera),
#: magnification 0.35x-2x (zooming out also with the photo's mirror image around it, a harsher
#: case), another microscope's field (a cast, red cells stained otherwise and a lower
#: magnification at once), a camera with half, twice or three times the pixels (1920x1440),
#: focus, sensor noise and compression.
PERTURBATIONS: tuple[str, ...] = (
    "wb_warm",
    "wb_cool",
    "wb_led",
    "dark",
    "bright",
    "gamma_0.7",
    "gamma_1.4",
    "contrast_0.6",
    "stain_pale",
    "stain_dark",
    "hue_-15",
    "hue_-10",
    "hue_+10",
    "hue_+15",
    "rbc_grey",
    "rbc_teal",
    "bg_yellow",
    "bg_blue",
    "dim",
    "vignette",
    "field_stop",
    "burned_text",
    "burned_text_blue",
    "scale_0.35",
    "scale_0.5",
    "scale_0.6",
    "scale_0.8",
    "scale_1.25",
    "scale_1.5",
    "scale_2",
    "mirror_0.35",
    "mirror_0.5",
    "mirror_0.6",
    "mirror_0.8",
    "rbc_teal+wb_cool+scale_0.5",
    "rbc_grey+bg_yellow+scale_0.6",
    "resize_0.5",
    "resize_2",
    "resize_3",
    "blur_1.5",
    "blur_3",
    "noise_8",
    "noise_15",
    "jpeg_30",
)


#: Where joined kinds meet: a "+" before a kind's name (not the sign of "hue_+10").
_JOINED = re.compile(r"\+(?=[a-z])")

#: Optical-density direction (BGR) of red cells under stains that leave them grey or blue-grey.
_RBC_TINTS = {
    "grey": np.array([1.0, 1.0, 1.0], np.float32),
    "teal": np.array([0.6, 0.75, 1.0], np.float32),
}


def _restain(img: np.ndarray, tint: np.ndarray) -> np.ndarray:
    """Re-colour what stains like the frame's red cells as ``tint`` (an OD direction), keeping
    the nuclear stain as it is: a linear map in optical density that sends the pink red-cell
    direction to ``tint`` and leaves the violet nuclear direction unchanged."""
    bg = np.percentile(img.reshape(-1, 3), 97, axis=0) + 1.0
    od = -np.log(np.clip((img + 1.0) / bg, 1e-3, 1.0))
    pink = np.array([0.64, 0.67, 0.37], np.float32)
    violet = np.array([0.15, 0.85, 0.5], np.float32)
    pink, violet, tint = (v / np.linalg.norm(v) for v in (pink, violet, tint))
    # covector w: w.pink = 1, w.violet = 0 (pink's part orthogonal to violet, rescaled)
    w = pink - (pink @ violet) * violet
    w /= float(w @ pink)
    m = np.eye(3, dtype=np.float32) + np.outer(tint * float(np.linalg.norm(pink)) - pink, w)
    od = np.clip(od.reshape(-1, 3) @ m.T, 0, None).reshape(od.shape)
    return bg * np.exp(-od) - 1.0


#: A cell's box within this share of the photo's size of its edge: the photo cuts the cell.
_EDGE = 0.03


def _cut_by_edge(boxes: np.ndarray, w: int, h: int) -> np.ndarray:
    """Which of a ``w`` x ``h`` photo's boxes (N, 4) are cells its edge cuts (within ``_EDGE``)."""
    m = _EDGE * max(w, h)
    return (boxes[:, 0] < m) | (boxes[:, 1] < m) | (boxes[:, 2] > w - m) | (boxes[:, 3] > h - m)


def _seam_bands(xs: Iterable[float], ys: Iterable[float], half: float, far: float) -> np.ndarray:
    """Ignore regions: bands ``2 * half`` wide along the vertical seams at ``xs`` and the
    horizontal ones at ``ys``, reaching ``far`` either way."""
    bands = [[x - half, -far, x + half, far] for x in xs]
    bands += [[-far, y - half, far, y + half] for y in ys]
    return np.asarray(bands, np.float32).reshape(-1, 4)


def _mirror_boxes(boxes: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a ``w`` x ``h`` photo and of its mirror images on all sides (as
    ``cv2.BORDER_REFLECT`` pads it), in the padded photo's frame relative to the original's
    corner -> (boxes of cells clear of the photo's edge, ignore regions). A cell within 3% of
    the photo's size of its edge meets its own mirror image there: its copies are ignore
    regions, and so are bands of that width along the mirror lines."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    keep: list[list[float]] = []
    ignore: list[list[float]] = []
    for b, cut in zip(boxes, _cut_by_edge(boxes, w, h), strict=True):
        xs = [(b[0], b[2]), (-b[2], -b[0]), (2 * w - b[2], 2 * w - b[0])]
        ys = [(b[1], b[3]), (-b[3], -b[1]), (2 * h - b[3], 2 * h - b[1])]
        copies = [[float(x1), float(y1), float(x2), float(y2)] for x1, x2 in xs for y1, y2 in ys]
        (ignore if cut else keep).extend(copies)
    bands = _seam_bands((0.0, float(w)), (0.0, float(h)), _EDGE * max(w, h), 4.0 * max(w, h))
    return (np.asarray(keep, np.float32).reshape(-1, 4),
            np.concatenate([np.asarray(ignore, np.float32).reshape(-1, 4), bands]))


def _mosaic(
    img: np.ndarray,
    boxes: np.ndarray,
    px: int,
    py: int,
    neighbours: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The photo with ``px`` / ``py`` pixels of other photos around it, tiled edge to edge in a
    grid -> (the wider field, boxes relative to the photo's corner of cells clear of their
    photo's edge, ignore regions). Tiles cycle through ``neighbours`` (the photo itself when
    none; a tile of another size is resized to the photo's). A cell within 3% of the photo's
    size of its photo's edge is cut by a seam next to unrelated cells: it is ignored, and so is
    any detection within half a white cell (10% of the photo's size) of a seam, i.e. of a cell
    whose box crosses it: cut by its photo's edge, where annotators leave most cells out (BCCD's
    three unannotated cells are such), or two unrelated halves."""
    h, w = img.shape[:2]
    tiles = list(neighbours) or [(img, boxes)]
    nx, ny = -(-px // w), -(-py // h)  # tiles needed on each side
    big = np.empty(((2 * ny + 1) * h, (2 * nx + 1) * w, 3), img.dtype)
    keep: list[np.ndarray] = []
    ignore: list[np.ndarray] = []
    t = 0
    for j in range(-ny, ny + 1):
        for i in range(-nx, nx + 1):
            if (i, j) == (0, 0):
                tile, tb = img, np.asarray(boxes, np.float32).reshape(-1, 4)
            else:
                tile, tb = tiles[t % len(tiles)]
                t += 1
                tb = np.asarray(tb, np.float32).reshape(-1, 4)
                if tile.shape[:2] != (h, w):
                    th, tw = tile.shape[:2]
                    tb = tb * np.array([w / tw, h / th] * 2, np.float32)
                    tile = cv2.resize(tile, (w, h), interpolation=cv2.INTER_AREA)
            oy, ox = (j + ny) * h, (i + nx) * w
            big[oy:oy + h, ox:ox + w] = tile.astype(img.dtype)
            near = _cut_by_edge(tb, w, h)
            off = np.array([i * w, j * h, i * w, j * h], np.float32)
            keep.append(tb[~near] + off)
            ignore.append(tb[near] + off)
    ignore.append(_seam_bands((i * w for i in range(-nx, nx + 2)),
                              (j * h for j in range(-ny, ny + 2)),
                              0.1 * max(w, h), 4.0 * max(big.shape[:2])))
    # the wider field around the photo: cut from the grid at the photo's offset
    x0, y0 = nx * w - px, ny * h - py
    field = big[y0:y0 + h + 2 * py, x0:x0 + w + 2 * px]
    return field, np.concatenate(keep), np.concatenate(ignore)


def _visible(b: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes clipped to a ``w`` x ``h`` frame -> (at least half visible: to be found; less:
    ignored, neither a hit nor a false alarm)."""
    clipped = np.clip(b, 0, [w, h, w, h]).astype(np.float32)
    area = np.prod(np.clip(b[:, 2:] - b[:, :2], 1e-6, None), axis=1)
    vis = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1) / area
    return clipped[vis >= 0.5], clipped[(vis > 0) & (vis < 0.5)]


def perturb(
    image: np.ndarray,
    boxes: np.ndarray,
    kind: str,
    seed: int = 0,
    neighbours: Sequence[tuple[np.ndarray, np.ndarray]] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply one named perturbation -> (image, boxes, ignore boxes).

    Magnification changes keep the frame size: zooming out (``scale_S``, S < 1) widens the field
    of view, the photo in the middle of a mosaic of ``neighbours`` (other photos of the same
    smear with their white-cell boxes; the photo itself, shifted, when none are given), so the
    frame is full of cells as a real low-magnification frame is; ``mirror_S`` widens it with the
    photo's own mirror image instead (a harsher case: a cell and its mirror image merge at the
    seams). Zooming in (S > 1) crops the centre. GT boxes follow; a box less than half visible
    becomes an ignore box (a detection there is neither a hit nor a false alarm), and so do the
    cells at the seams.

    Kinds joined by ``+`` are applied in turn, the neighbours given the same colour and light
    ones (``rbc_teal+wb_cool+scale_0.5``: another microscope's field).
    """
    parts = _JOINED.split(kind, maxsplit=1)  # ("hue_+10" is one kind)
    if len(parts) == 2:
        first, rest = parts
        if first.startswith(("scale_", "mirror_", "resize_")):
            raise ValueError(f"in {kind!r} the magnification comes last")
        image, boxes, _ = perturb(image, boxes, first, seed)
        neighbours = [(perturb(im, b, first, seed)[0], b) for im, b in neighbours]
        return perturb(image, boxes, rest, seed, neighbours)
    rng = np.random.default_rng(seed)
    img = image.astype(np.float32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    ignore = np.empty((0, 4), dtype=np.float32)
    h, w = image.shape[:2]
    name, _, arg = kind.partition("_")
    if kind == "wb_warm":
        img *= np.array([0.8, 0.95, 1.15], np.float32)
    elif kind == "wb_cool":
        img *= np.array([1.15, 1.0, 0.8], np.float32)
    elif kind == "wb_led":  # cold white LED: strong blue cast
        img *= np.array([1.0, 0.88, 0.7], np.float32)
    elif name == "contrast":  # veiling glare / haze: contrast reduced about the mean
        img = img.mean() + float(arg) * (img - img.mean())
    elif kind == "dark":
        img *= 0.6
    elif name == "rbc":  # another eosin/buffer: red cells grey or blue-grey (teal), nuclei kept
        img = _restain(img, _RBC_TINTS[arg])
    elif name == "bg":  # coloured illumination / plasma: yellowish or bluish glass
        img *= np.array([0.72, 0.92, 1.0] if arg == "yellow" else [1.0, 0.9, 0.74], np.float32)
    elif kind == "dim":  # a weak lamp: a third of the light, the camera's noise stays
        img = img * 0.35 + rng.normal(0, 2.0, img.shape).astype(np.float32)
    elif kind == "vignette":  # uneven illumination: corners at half the centre's light
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r2 = ((xx - 0.45 * w) ** 2 + (yy - 0.55 * h) ** 2) / (0.25 * (w * w + h * h))
        img *= (1.0 - 0.5 * np.clip(r2, 0, 1.3))[..., None]
    elif kind == "bright":
        img = img * 1.25 + 10
    elif name == "gamma":
        img = 255.0 * (img / 255.0) ** float(arg)
    elif name == "stain":
        bg = np.percentile(img.reshape(-1, 3), 97, axis=0) + 1.0
        od = -np.log(np.clip((img + 1.0) / bg, 1e-3, 1.0))
        img = bg * np.exp(-od * (0.6 if arg == "pale" else 1.5)) - 1.0
    elif name == "hue":
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(arg)) % 180).astype(np.uint8)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR).astype(np.float32)
    elif name in ("scale", "mirror"):
        s = float(arg)
        if s < 1.0:
            # a wider field of view, all shrunk to the frame
            px, py = int(round((w / s - w) / 2)), int(round((h / s - h) / 2))
            if name == "mirror":  # the smear continues beyond the photo as its mirror image
                big = cv2.copyMakeBorder(img, py, py, px, px, cv2.BORDER_REFLECT)
                whole, seam = _mirror_boxes(boxes, w, h)
            else:  # ... as other photos of the smear
                big, whole, seam = _mosaic(img, boxes, px, py, neighbours)
            img = cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA)
            fx, fy = w / big.shape[1], h / big.shape[0]
            shift = np.array([px, py, px, py], np.float32)
            scale = np.array([fx, fy, fx, fy], np.float32)
            boxes, ignore = _visible((whole + shift) * scale, w, h)
            # cells at the photo's edge and the seams themselves are neither hits nor misses
            ignore = np.concatenate([ignore, ((seam + shift) * scale).astype(np.float32)])
        elif name == "scale":
            cw, ch = w / s, h / s
            ox, oy = (w - cw) / 2, (h - ch) / 2
            m = np.array([[s, 0, -ox * s], [0, s, -oy * s]], np.float32)
            img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR)
            boxes, ignore = _visible((boxes - np.array([ox, oy, ox, oy], np.float32)) * s, w, h)
        else:
            raise ValueError(f"mirror_S widens the field: S must be < 1, got {kind!r}")
    elif kind == "field_stop":  # an eyepiece camera: a round field as wide as the frame is
        # high, a soft rim, black around it; a cell less than half inside it is not to be found
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        dist = np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2)
        a = np.clip((0.5 * h - dist) / 6.0 + 0.5, 0.0, 1.0)[..., None]
        img = img * a + 10.0 * (1.0 - a)
        inside = np.array([float(np.mean(a[int(y1):max(int(y2), int(y1) + 1),
                                           int(x1):max(int(x2), int(x1) + 1)] > 0.5))
                           for x1, y1, x2, y2 in np.clip(boxes, 0, [w, h, w, h])])
        ignore = boxes[(inside > 0) & (inside < 0.5)]
        boxes = boxes[inside >= 0.5] if len(boxes) else boxes
    elif kind in ("burned_text", "burned_text_blue"):  # the camera's own marks: a time stamp
        # along the bottom edge, a scale bar with its label (black, or blue), a white file name
        img = _burned_text(img, (255, 0, 0) if kind.endswith("_blue") else (0, 0, 0))
    elif name == "resize":  # the same view in fewer pixels (a lower-resolution camera, a
        # thumbnail) or more (a camera with a finer sensor: 3x gives 1920x1440)
        s = float(arg)
        size = (max(8, int(round(w * s))), max(8, int(round(h * s))))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
        boxes = boxes * np.array([size[0] / w, size[1] / h] * 2, np.float32)
    elif name == "blur":
        img = cv2.GaussianBlur(img, (0, 0), float(arg))
    elif name == "noise":
        img = img + rng.normal(0, float(arg), img.shape).astype(np.float32)
    elif name == "jpeg":
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(arg)])
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR).astype(np.float32)
    elif kind != "none":
        raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(PERTURBATIONS)}")
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return out, boxes, ignore


def _burned_text(img: np.ndarray, ink: tuple[int, int, int]) -> np.ndarray:
    """``img`` with the marks a microscope camera burns into its pictures, sized to the frame
    (strokes 2 px wide at 480 px high): a time stamp along the bottom edge and a scale bar with
    its label in the bottom right corner, in ``ink`` (BGR), a white file name along the top."""
    h, w = img.shape[:2]
    k = h / 480.0
    thick = max(1, int(round(2 * k)))
    font = cv2.FONT_HERSHEY_SIMPLEX
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    cv2.putText(out, "2026-12-03 14:40:37  100x", (int(10 * k), h - int(12 * k)), font, 0.8 * k,
                ink, thick, cv2.LINE_AA)
    cv2.rectangle(out, (w - int(130 * k), h - int(60 * k)), (w - int(30 * k), h - int(52 * k)),
                  ink, -1)
    cv2.putText(out, "10 um", (w - int(120 * k), h - int(66 * k)), font, 0.6 * k, ink, thick,
                cv2.LINE_AA)
    cv2.putText(out, "IMG_0421.JPG", (int(10 * k), int(30 * k)), font, 0.8 * k,
                (255, 255, 255), thick, cv2.LINE_AA)
    return out.astype(np.float32)


#: Other photos a zoomed-out field is tiled from (8 surround the photo down to 0.33x).
_MOSAIC_TILES = 8


#: A phone photo of the whole eyepiece field: 6 x 6 photos of the set, in a 4032x3024 frame.
PHONE_TILES = 6
PHONE_SIZE = (4032, 3024)


def phone_photo(records: Sequence[VocRecord], start: int) -> tuple[np.ndarray, np.ndarray]:
    """A 12-megapixel phone photo of the whole eyepiece field, assembled from a set's photos ->
    (BGR image, white-cell boxes to find). Through a 100x objective a phone sees the whole field
    with red cells of ~100 px, as BCCD's photos have them: 36 photos (every 8th from ``start``)
    side by side on glass-grey, in a round field as wide as the frame is high with black around
    it. To be found: the cells whose centre is 60 px or more inside the field."""
    w, h = PHONE_SIZE
    photo = np.full((h, w, 3), 200, np.uint8)
    boxes = []
    for k, rec in enumerate(records[start::8][: PHONE_TILES * PHONE_TILES]):
        tile = read_image(rec.image)
        th, tw = tile.shape[:2]
        oy = (h - PHONE_TILES * th) // 2 + (k // PHONE_TILES) * th
        ox = (w - PHONE_TILES * tw) // 2 + (k % PHONE_TILES) * tw
        photo[oy:oy + th, ox:ox + tw] = tile
        boxes += [b + np.float32([ox, oy, ox, oy]) for b in np.float32(rec.wbc).reshape(-1, 4)]
    r = h // 2
    field = cv2.circle(np.zeros((h, w), np.uint8), (w // 2, h // 2), r, 255, -1)
    photo[field == 0] = 12
    wbc = np.array(boxes, np.float32).reshape(-1, 4)
    centre = (wbc[:, :2] + wbc[:, 2:]) / 2
    inside = np.hypot(centre[:, 0] - w / 2, centre[:, 1] - h / 2) < r - 60
    return photo, wbc[inside]


def evaluate_phone_photos(records: Sequence[VocRecord], segmenter, photos: int = 8) -> dict:
    """White cells found in ``photos`` phone photos of the whole eyepiece field
    (:func:`phone_photo`, starting at the set's photos 0..7): recall only, as the photos' seams
    cut cells the set's annotators left out."""
    found = truth = 0
    per_photo = []
    for start in range(photos):
        photo, wbc = phone_photo(records, start)
        det = segmenter.find_still(photo)
        pairs, _, _ = match_centres(det.xyxy, wbc)
        found, truth = found + len(pairs), truth + len(wbc)
        rbc = getattr(segmenter, "last_rbc_diameter", None)  # (the segmenter's diagnostics)
        per_photo.append({"found": len(pairs), "cells": len(wbc),
                          "rbc_diameter": None if rbc is None else round(float(rbc), 1)})
    return {"photos": per_photo, "found": found, "cells": truth,
            "recall": found / truth if truth else 0.0}


def evaluate_robustness(
    records: Sequence[VocRecord], segmenter, kinds: Sequence[str] = PERTURBATIONS
) -> dict[str, dict]:
    """Recall and precision of ``segmenter`` on perturbed copies of the records, per kind."""
    images = []
    for rec in records:
        images.append((rec, read_image(rec.image)))
    out: dict[str, dict] = {}
    n = len(images)
    for kind in kinds:
        tp = fp = fn = 0
        bad: list[str] = []
        for k, (rec, img) in enumerate(images):
            # a zoomed-out field continues with the next photos of the set
            around = [(images[(k + i) % n][1], images[(k + i) % n][0].wbc)
                      for i in range(1, min(n, _MOSAIC_TILES + 1))]
            pimg, gt, ign = perturb(img, rec.wbc, kind, seed=k, neighbours=around)
            det = segmenter.find(pimg)
            pairs, up, ug = match_centres(det.xyxy, gt)
            if len(ign) and up:
                _, still, _ = match_centres(det.xyxy[up], ign)
                up = [up[i] for i in still]
            tp, fp, fn = tp + len(pairs), fp + len(up), fn + len(ug)
            if up or ug:
                bad.append(rec.name)
        out[kind] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "recall": tp / (tp + fn) if tp + fn else 1.0,
            "precision": tp / (tp + fp) if tp + fp else 1.0,
            "failures": bad,
        }
    return out


#: Folder names of single-cell image sets that are not white cells (see evaluate_single_cells).
NOT_WHITE = ("platelet", "erythroblast")


#: Perturbations of single-cell images: those of a field that keep one centred cell (colour,
#: light, focus, noise, compression), zooming in until the cell fills and touches the crop, and
#: smaller crops (other analysers' galleries and data sets are 100-400 px). Zooming out is left
#: out: it would make a field of several cells.
SINGLE_CELL_PERTURBATIONS: tuple[str, ...] = tuple(
    k for k in PERTURBATIONS
    if not _JOINED.split(k)[-1].startswith(("scale_0.", "mirror_", "resize_"))
) + ("resize_0.6", "resize_0.4", "resize_0.25")


def evaluate_single_cell_robustness(
    folder: Path,
    segmenter,
    kinds: Sequence[str] = SINGLE_CELL_PERTURBATIONS,
    every: int = 20,
    tuned: Callable[[int], bool] = lambda i: False,
) -> dict[str, dict]:
    """Share of single-cell images whose centre cell the still-image analysis
    (``segmenter.find_still``) finds on perturbed copies, per kind and white-cell class, on every
    ``every``-th image of each class (from the 6th on; those marked ``tuned``, looked at while
    tuning, left out). The not-white folders (``NOT_WHITE``) are left out too."""
    sample = []
    for d, files in class_folder_images(Path(folder)):
        if folder_label(d.name) in NOT_WHITE:
            continue
        for f in [files[i] for i in range(5, len(files), every) if not tuned(i)]:
            try:
                sample.append((d.name, read_image(f)))
            except InputError as exc:
                log.warning("%s, skipped", exc)
    if not sample:
        raise InputError(f"{folder}: no white-cell class folders with images")
    out: dict[str, dict] = {}
    for kind in kinds:
        per: dict[str, list[bool]] = {}
        for k, (cls, img) in enumerate(sample):
            pimg, _, _ = perturb(img, np.zeros((0, 4), np.float32), kind, seed=k)
            h, w = pimg.shape[:2]
            per.setdefault(cls, []).append(_over_centre(segmenter.find_still(pimg).xyxy, w, h))
        found = {c: float(np.mean(v)) for c, v in per.items()}
        worst = min(found, key=found.__getitem__)
        out[kind] = {"images": len(sample), "found": float(np.mean(sum(per.values(), []))),
                     "worst_class": worst, "worst_found": found[worst], "per_class": found}
    return out


def _over_centre(xyxy: np.ndarray, w: int, h: int) -> bool:
    return bool(_centre_mask(xyxy, w, h).any())


def _centre_mask(xyxy: np.ndarray, w: int, h: int) -> np.ndarray:
    """Which boxes hold the image's centre."""
    cx, cy = w / 2.0, h / 2.0
    xyxy = np.asarray(xyxy, np.float32).reshape(-1, 4)
    return (xyxy[:, 0] <= cx) & (cx <= xyxy[:, 2]) & (xyxy[:, 1] <= cy) & (cy <= xyxy[:, 3])


def held_out_of(card_split: dict, root: Path) -> Callable[[Path], bool]:
    """Whether a single-cell image was in a model's held-out split (its card's
    ``split["val_images"]``): images are named there by their content group, as training named
    them (``training.data.content_group``), so renamed or copied files are still recognised."""
    val = set(card_split.get("val_images", ()))
    root = Path(root)
    return lambda f: content_group(root, f.parent.name, f, f.read_bytes()) in val


def evaluate_single_cells(
    folder: Path,
    segmenter,
    progress: bool = True,
    tuned: Callable[[int], bool] | None = None,
    classifier=None,
    held_out: Callable[[Path], bool] | None = None,
) -> dict[str, dict]:
    """Single-cell images (a folder per class, one labelled cell at the centre of each image,
    as PBC): per class, the share of images where the still-image analysis
    (``segmenter.find_still``) reports a cell over the centre (``found``), reports exactly one
    cell (``one_cell``), and where the field analysis (``segmenter.find``) has a cell over the
    centre (``found_field``). For folders of platelets and erythroblasts (named so or by a
    published set's name, :func:`training.data.folder_label`) ``found`` is the share taken for a
    white-cell candidate. ``tuned(i)`` marks images (by their index in the
    class folder's sorted list) used while tuning: figures are also given for the rest.
    Hidden files (``.DS_*``, macOS folder metadata in the published PBC archive) and
    unreadable files are skipped with a warning.

    With a ``classifier`` (``labels``, ``classify_boxes``, ``label_of``) the photo goes through
    the runtime's still-image analysis (``detector.still.analyse_still``: segmenter, then every
    cell named) and a cell named ``platelet`` or ``artefact`` is vetoed, as the tally does:
    ``kept`` is the share where a cell over the centre is found and not vetoed (what the user
    finally sees as a cell), ``as_erythroblast`` the share where it is named ``erythroblast``
    (reported as NRBC, not a white cell), ``labels`` the centre cell's names. ``held_out(path)``
    marks the images the model did not see in training: ``held_out_kept`` is on those only.
    """
    from detector.core import ERYTHROBLAST, VETO_LABELS
    from detector.still import analyse_still

    classes = class_folder_images(Path(folder))
    if not classes:
        raise InputError(f"{folder}: no class folders")
    out: dict[str, dict] = {}
    for d, files in classes:
        it: Iterable[tuple[int, Path]] = enumerate(files)
        if progress:
            from tqdm import tqdm

            it = tqdm(list(it), desc=d.name, unit="img", file=sys.stderr, leave=False)
        rows = []
        named: list[tuple[int, str, bool]] = []  # (index, centre cell's label or "", held out)
        for i, f in it:
            try:
                img = read_image(f)
            except InputError as exc:
                log.warning("%s, skipped", exc)
                continue
            h, w = img.shape[:2]
            if classifier is not None:
                cells = analyse_still(img, segmenter, classifier)
                still = cells.detections
                names = [n for n, c in zip(cells.names, _centre_mask(still.xyxy, w, h),
                                           strict=True) if c]
                # a cell over the centre that is not vetoed is what the user sees there
                label = next((n for n in names if n not in VETO_LABELS), names[0] if names else "")
                named.append((i, label, bool(held_out(f)) if held_out is not None else False))
            else:
                still = segmenter.find_still(img)
            field = segmenter.find(img)
            rows.append((i, _over_centre(still.xyxy, w, h), len(still) == 1,
                         _over_centre(field.xyxy, w, h)))
        arr = np.array([r[1:] for r in rows], dtype=float).reshape(-1, 3)
        res = {"images": len(rows), "found": float(arr[:, 0].mean()) if len(rows) else 0.0,
               "one_cell": float(arr[:, 1].mean()) if len(rows) else 0.0,
               "found_field": float(arr[:, 2].mean()) if len(rows) else 0.0,
               "missed": [files[r[0]].name for r in rows if not r[1]]}
        if tuned is not None:
            held = [r for r in rows if not tuned(r[0])]
            res["held_out_images"] = len(held)
            res["held_out_found"] = float(np.mean([r[1] for r in held])) if held else 0.0
        if classifier is not None:
            kept = [bool(lab) and lab not in VETO_LABELS for _, lab, _ in named]
            res["kept"] = float(np.mean(kept)) if kept else 0.0
            res["as_erythroblast"] = (
                float(np.mean([lab == ERYTHROBLAST for _, lab, _ in named])) if named else 0.0)
            res["labels"] = dict(Counter(lab or "(none)" for _, lab, _ in named).most_common())
            res["not_kept"] = [files[i].name for (i, _, _), k in zip(named, kept, strict=True)
                               if not k]
            if held_out is not None:
                hk = [k for (_, _, ho), k in zip(named, kept, strict=True) if ho]
                res["model_held_out_images"] = len(hk)
                res["model_held_out_kept"] = float(np.mean(hk)) if hk else 0.0
        out[d.name] = res
    return out


def _tuned(i: int) -> bool:
    """Images 0, 10, 20... and 1, 13, 25... of each single-cell class were looked at while
    tuning the segmenter."""
    return i % 10 == 0 or i % 12 == 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.detection_eval FOLDER [--json]``: print the detection figures."""
    from detector.segment import Segmenter

    p = argparse.ArgumentParser(prog="python -m training.detection_eval", description=__doc__)
    p.add_argument("folder", type=Path, help="Pascal VOC folder (JPEGImages/, Annotations/)")
    p.add_argument(
        "--single-cells", type=Path, default=None, metavar="FOLDER",
        help="also score single-cell images: a folder per class, the cell at each image's centre "
        "(e.g. PBC); folders of platelets and erythroblasts (platelet/, erythroblast/ or a "
        "published set's name for them, e.g. EBO/) count as not white cells",
    )
    p.add_argument(
        "--model", type=Path, default=None, metavar="M",
        help="with --single-cells: name each cell with this model (NAME.tflite, its card beside "
        "it) and veto cells named platelet or artefact, as the runtime does; reports per class "
        "the centre cell kept as a cell, also on the images of the card's held-out split",
    )
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--threads", type=int, default=1, help="OpenCV threads while timing")
    p.add_argument(
        "--robustness", action="store_true",
        help="also report figures on perturbed copies (with --single-cells: of every 20th "
        "single-cell image too) and on 8 phone photos of the whole eyepiece field assembled "
        "from the folder's photos (4032x3024, 36 photos each)",
    )
    args = p.parse_args(argv)
    if args.model is not None and args.single_cells is None:
        p.error("--model needs --single-cells")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        records = read_voc(args.folder)
        res = evaluate_detection(records, Segmenter(), threads=args.threads)
        if args.robustness:
            res["robustness"] = evaluate_robustness(records, Segmenter())
            res["phone_photos"] = evaluate_phone_photos(records, Segmenter())
        if args.single_cells is not None:
            clf = held = None
            if args.model is not None:
                from detector.classify import CellClassifier

                clf = CellClassifier(args.model)
                held = held_out_of(clf.card.split, args.single_cells)
                res["model"] = str(args.model)
            res["single_cells"] = evaluate_single_cells(
                args.single_cells, Segmenter(), tuned=_tuned, classifier=clf, held_out=held,
            )
            if args.robustness:
                res["single_cell_robustness"] = evaluate_single_cell_robustness(
                    args.single_cells, Segmenter(), tuned=_tuned)
    except HematoVisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(
        f"images {res['images']}  tp {res['tp']}  fp {res['fp']} "
        f"(touching edge {res['fp_touching_edge']})  fn {res['fn']}\n"
        f"recall {res['recall']:.4f}  precision {res['precision']:.4f}\n"
        f"ms/frame median {res['ms_median']:.2f}  mean {res['ms_mean']:.2f}  "
        f"p95 {res['ms_p95']:.2f}  cpu median {res['cpu_ms_median']:.2f}  "
        f"({res['threads']} thread)"
    )
    for fail in res["failures"]:
        print(f"  {Path(fail['image']).name}: missed {fail['missed']} false {fail['false']}")
    for name, r in res.get("single_cells", {}).items():
        what = "taken for a white cell" if folder_label(name) in NOT_WHITE else "found"
        print(
            f"{name:22s} {r['images']:5d} images  {what} {r['found']:.4f} "
            f"(held out {r['held_out_found']:.4f} of {r['held_out_images']})  one cell "
            f"{r['one_cell']:.4f}  field analysis {r['found_field']:.4f}"
        )
        if "kept" in r:
            what = "kept as a cell (not vetoed)"
            print(
                f"{'':22s} with {Path(res['model']).name}: {what} {r['kept']:.4f} (model's "
                f"held-out split {r['model_held_out_kept']:.4f} of "
                f"{r['model_held_out_images']})  named erythroblast {r['as_erythroblast']:.4f}"
            )
    for kind, r in res.get("robustness", {}).items():
        print(
            f"{kind:12s} recall {r['recall']:.4f}  precision {r['precision']:.4f}  "
            f"(fn {r['fn']}, fp {r['fp']})"
        )
    if "phone_photos" in res:
        r = res["phone_photos"]
        print(f"phone photos of the whole eyepiece field ({len(r['photos'])}, 4032x3024, "
              f"assembled): found {r['found']} of {r['cells']} cells, recall {r['recall']:.4f}")
    for kind, r in res.get("single_cell_robustness", {}).items():
        print(
            f"single cells {kind:12s} found {r['found']:.4f}  worst class {r['worst_class']} "
            f"{r['worst_found']:.4f}  ({r['images']} images)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
