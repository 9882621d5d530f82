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
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from detector.errors import HematoVisionError, InputError
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
    images, ms_median, ms_mean, ms_p95 and ``failures``: one entry per image with a miss or a
    false detection (image, missed GT boxes, false boxes, all detections).
    """
    records = list(records)
    if not records:
        raise InputError("no annotated images to evaluate")
    old_threads = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    tp = fp = fn = 0
    fp_edge = 0
    times: list[float] = []
    failures: list[dict] = []
    it: Iterable[VocRecord] = records
    if progress:
        from tqdm import tqdm

        it = tqdm(records, desc="detection", unit="img", file=sys.stderr)
    try:
        for rec in it:
            img = cv2.imread(str(rec.image), cv2.IMREAD_COLOR)
            if img is None:
                raise InputError(f"{rec.image}: cannot read image")
            t0 = time.perf_counter()
            det = segmenter.find(img)
            times.append(time.perf_counter() - t0)
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
        "threads": threads,
        "failures": failures,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.detection_eval FOLDER [--json]``: print the detection figures."""
    from detector.segment import Segmenter

    p = argparse.ArgumentParser(prog="python -m training.detection_eval", description=__doc__)
    p.add_argument("folder", type=Path, help="Pascal VOC folder (JPEGImages/, Annotations/)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--threads", type=int, default=1, help="OpenCV threads while timing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = evaluate_detection(read_voc(args.folder), Segmenter(), threads=args.threads)
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
        f"p95 {res['ms_p95']:.2f}  ({res['threads']} thread)"
    )
    for fail in res["failures"]:
        print(f"  {Path(fail['image']).name}: missed {fail['missed']} false {fail['false']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
