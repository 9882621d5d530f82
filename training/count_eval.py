"""Counting-mode evaluation on simulator videos (``hematovision evaluate SYNTH_DIR``).

Runs the full analyzer (segment, track, classify, tally) over each ``video.mp4`` and compares what
it counted with ``truth.json``:

- **Truth total**: the white cells that were *fully in view* (``visible_fraction`` >= 0.999 and
  the box at least 1 px off the border) in at least ``MIN_FULL_FRAMES`` frames (0.1 s at 30
  frames/s). A cell only ever seen cut by the
  frame border cannot be named, and is not counted by design, so it is not in the truth total.
- **Matching**: every counted track is mapped to the truth cell it overlapped most (sum of IoU
  between the track's boxes and the truth boxes over the frames where the track was seen; at
  least one frame with IoU >= ``MIN_IOU``). A counted track that maps to no truth cell is a
  *false count* (something that is not a white cell, or a box far from any); a truth cell that
  two or more counted tracks map to is a *double count*; a truth cell no counted track maps to
  is *missed* (``missed_never_detected``: of those, the ones the segmenter never found while they
  were fully in view, i.e. misses the tracker could not have avoided).
- **Classes**: counted cells per class vs truth cells per class. To separate counting errors
  from classifier errors, the classifier is also run on crops of the truth boxes (the
  ``CROPS_PER_CELL`` least blurred fully visible sightings of each cell, every 3rd frame): the
  *crop accuracy*; and on the
  cells whose truth crops it names right (majority), the share whose counted label is right
  (``label_accuracy_where_crop_right``): what tracking and the vote alone lose.

Targets (from the issue): total within 1 % of truth, double counts <= 1 % of cells, per-class
counts within 2 cells or 3 % where the classifier is right on the crop.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detector.analyzer import Analyzer, build_analyzer
from detector.core import UNIDENTIFIED, Frame, box_iou
from detector.crop import crop_cell
from detector.errors import InputError

log = logging.getLogger(__name__)

MIN_FULL_FRAMES = 3
FULL_VISIBLE = 0.999
MIN_IOU = 0.3
CROPS_PER_CELL = 3


def synth_folders(path: Path) -> list[Path]:
    """The folder itself when it holds truth.json, else its sub-folders that do (sorted)."""
    if (path / "truth.json").is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_dir() and (p / "truth.json").is_file())
    if not found:
        raise InputError(f"{path}: no truth.json here or in its sub-folders")
    return found


def fully_visible(cell: dict[str, Any], w: int, h: int) -> bool:
    """A truth cell entirely in the frame: ``visible_fraction`` >= 0.999 and its box off the
    border by at least 1 px (a box reaching the border is a cell the border cuts)."""
    x1, y1, x2, y2 = cell["box"]
    return (cell.get("visible_fraction", 0.0) >= FULL_VISIBLE
            and x1 >= 1 and y1 >= 1 and x2 <= w - 1 and y2 <= h - 1)


def truth_cells(truth: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Truth cells that count (fully in view >= MIN_FULL_FRAMES frames): id -> cell record."""
    full = Counter()
    w, h = truth["size"]
    for ft in truth["frame_truth"]:
        for c in ft["cells"]:
            if fully_visible(c, w, h):
                full[int(c["id"])] += 1
    cells = {int(c["id"]): c for c in truth["cells"]}
    return {i: {**cells[i], "full_frames": n} for i, n in full.items()
            if n >= MIN_FULL_FRAMES and i in cells}


def evaluate_video(folder: Path, analyzer: Analyzer,
                   max_frames: int | None = None) -> dict[str, Any]:
    """Count one synth video with ``analyzer`` and compare with its truth -> figures."""
    from stream.synth import load_truth

    truth = load_truth(folder)
    video = folder / truth.get("video", {}).get("file", "video.mp4")
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise InputError(f"{video}: not a readable video file")
    eligible = truth_cells(truth)
    fw, fh = truth["size"]
    label_of_truth = {int(c["id"]): c["label"] for c in truth["cells"]}
    classifier = analyzer.classifier
    rule = classifier.crop_rule

    overlap: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    best_iou: dict[tuple[int, int], float] = defaultdict(float)
    crops: list[np.ndarray] = []
    crop_ids: list[int] = []
    best_crops: dict[int, list[tuple[float, int, np.ndarray]]] = defaultdict(list)
    detected_full: set[int] = set()
    n = 0
    t0 = time.perf_counter()
    analyzer.reset()
    try:
        while max_frames is None or n < max_frames:
            ok, img = cap.read()
            if not ok:
                break
            if n >= len(truth["frame_truth"]):
                log.warning("%s: more frames than truth.json lists; stopping at %d", video, n)
                break
            ft = truth["frame_truth"][n]
            res = analyzer.process(Frame(img, n, n / float(truth["fps"])))
            tboxes = np.array([c["box"] for c in ft["cells"]], np.float32).reshape(-1, 4)
            tids = [int(c["id"]) for c in ft["cells"]]
            dets = res.detections
            if len(dets) and len(tids):
                iou = box_iou(dets.xyxy, tboxes)
                full_k = [k for k, c in enumerate(ft["cells"]) if fully_visible(c, fw, fh)]
                for k in full_k:
                    if iou[:, k].max() >= MIN_IOU:
                        detected_full.add(tids[k])
                for j, tr in enumerate(dets.track_id.tolist()):
                    for k in np.flatnonzero(iou[j] > 0.05):
                        overlap[tr][tids[k]] += float(iou[j, k])
                        key = (tr, tids[k])
                        best_iou[key] = max(best_iou[key], float(iou[j, k]))
            for c in ft["cells"]:
                cid = int(c["id"])
                if (cid in eligible and n % 3 == 0
                        and fully_visible(c, fw, fh)):
                    blur = float(c.get("blur", ft.get("blur", 0.0)))
                    kept = best_crops[cid]
                    if len(kept) < CROPS_PER_CELL or blur < kept[-1][0]:
                        kept.append((blur, n, crop_cell(img, np.array(c["box"], np.float32),
                                                        rule)))
                        kept.sort(key=lambda x: (x[0], x[1]))
                        del kept[CROPS_PER_CELL:]
            n += 1
    finally:
        cap.release()
    analyzer.finish()
    seconds = time.perf_counter() - t0
    for cid, kept in best_crops.items():
        for _, _, crop in kept:
            crops.append(crop)
            crop_ids.append(cid)
    if n < truth["frames"] and max_frames is None:
        log.warning("%s: decoded %d of %d frames", video, n, truth["frames"])

    # counted tracks -> truth ids
    events = list(analyzer.tally.events)
    mapped: dict[int, int | None] = {}
    for ev in events:
        tr = ev.track_id
        cand = {tid: s for tid, s in overlap.get(tr, {}).items() if best_iou[(tr, tid)] >= MIN_IOU}
        mapped[tr] = max(cand, key=cand.get) if cand else None
    by_truth: dict[int, list[int]] = defaultdict(list)
    for tr, tid in mapped.items():
        if tid is not None:
            by_truth[tid].append(tr)
    false_counts = sum(1 for v in mapped.values() if v is None)
    double = sum(len(v) - 1 for tid, v in by_truth.items() if len(v) > 1)
    missed = sorted(set(eligible) - set(by_truth))
    outside = sorted(tid for tid in by_truth if tid not in eligible)
    label_of_event = {e.track_id: e.label for e in events}
    right = sum(1 for tr, tid in mapped.items()
                if tid is not None and label_of_event[tr] == label_of_truth.get(tid))
    matched = sum(1 for v in mapped.values() if v is not None)

    # classifier on truth crops
    crop_acc = None
    wrong: Counter[str] = Counter()
    crop_right: dict[int, bool] = {}  # truth id -> classifier right on most of its crops
    if crops:
        probs = classifier.classify_crops(np.stack(crops))
        got = [classifier.label_of(row)[0] for row in probs]
        ok = [g == label_of_truth[c] for g, c in zip(got, crop_ids, strict=True)]
        crop_acc = float(np.mean(ok))
        wrong = Counter(f"{label_of_truth[c]}->{g}" for g, c, k in
                        zip(got, crop_ids, ok, strict=True) if not k)
        votes: dict[int, list[bool]] = defaultdict(list)
        for c, k in zip(crop_ids, ok, strict=True):
            votes[c].append(k)
        crop_right = {c: sum(v) * 2 > len(v) for c, v in votes.items()}
    # counting + voting on its own: cells whose truth crops the classifier gets right
    easy = [(tr, tid) for tr, tid in mapped.items() if tid is not None and crop_right.get(tid)]
    easy_right = sum(1 for tr, tid in easy if label_of_event[tr] == label_of_truth[tid])

    labels = list(analyzer.tally.labels)
    truth_counts = Counter(c["label"] for c in eligible.values())
    counts = dict(analyzer.tally.counts)
    per_class = {lab: {"counted": counts.get(lab, 0), "truth": truth_counts.get(lab, 0)}
                 for lab in labels}
    total_truth = len(eligible)
    total = analyzer.tally.total
    return {
        "folder": str(folder),
        "seed": truth.get("seed"),
        "frames": n,
        "seconds": round(seconds, 2),
        "fps": round(n / seconds, 1) if seconds > 0 else 0.0,
        "truth_total": total_truth,
        "truth_cells_any_view": len({int(c["id"]) for ft in truth["frame_truth"]
                                     for c in ft["cells"]}),
        "counted": total,
        "total_error_pct": round(100.0 * (total - total_truth) / max(total_truth, 1), 2),
        "matched": matched,
        "double_counts": double,
        "double_pct": round(100.0 * double / max(total_truth, 1), 2),
        "missed": len(missed),
        "missed_ids": missed,
        "missed_never_detected": len([m for m in missed if m not in detected_full]),
        "false_counts": false_counts,
        "counted_partial_only": len(outside),
        "unidentified": counts.get(UNIDENTIFIED, 0),
        "label_accuracy_counted": round(right / matched, 4) if matched else None,
        "crop_accuracy": round(crop_acc, 4) if crop_acc is not None else None,
        "crops_checked": len(crop_ids),
        "counted_where_crop_right": len(easy),
        "label_accuracy_where_crop_right": round(easy_right / len(easy), 4) if easy else None,
        "per_class": per_class,
        "nrbc": analyzer.tally.nrbc,
        "vetoed": analyzer.tally.vetoed,
        "crops_named_wrong": dict(wrong.most_common()),
    }


def summarize(videos: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall figures and the pass/fail of each target."""
    truth = sum(v["truth_total"] for v in videos)
    counted = sum(v["counted"] for v in videos)
    double = sum(v["double_counts"] for v in videos)
    labels: list[str] = []
    for v in videos:
        labels += [k for k in v["per_class"] if k not in labels]
    per_class = {lab: {"counted": sum(v["per_class"].get(lab, {}).get("counted", 0)
                                      for v in videos),
                       "truth": sum(v["per_class"].get(lab, {}).get("truth", 0) for v in videos)}
                 for lab in labels}
    class_ok = all(abs(pc["counted"] - pc["truth"]) <= max(2, 0.03 * pc["truth"])
                   for lab, pc in per_class.items() if lab != UNIDENTIFIED)
    accs = [v["crop_accuracy"] for v in videos if v["crop_accuracy"] is not None]
    crops = [v["crops_checked"] for v in videos if v["crop_accuracy"] is not None]
    return {
        "videos": len(videos),
        "frames": sum(v["frames"] for v in videos),
        "truth_total": truth,
        "counted": counted,
        "total_error_pct": round(100.0 * (counted - truth) / max(truth, 1), 2),
        "double_counts": double,
        "double_pct": round(100.0 * double / max(truth, 1), 2),
        "missed": sum(v["missed"] for v in videos),
        "missed_never_detected": sum(v["missed_never_detected"] for v in videos),
        "false_counts": sum(v["false_counts"] for v in videos),
        "unidentified": sum(v["unidentified"] for v in videos),
        "crop_accuracy": round(float(np.average(accs, weights=crops)), 4) if accs else None,
        "label_accuracy_where_crop_right": _pooled(videos),
        "per_class": per_class,
        "nrbc": sum(v.get("nrbc", 0) for v in videos),
        "vetoed": sum(v.get("vetoed", 0) for v in videos),
        "crops_named_wrong": dict(sum((Counter(v.get("crops_named_wrong", {})) for v in videos),
                                      Counter()).most_common()),
        "targets": {
            "total_within_1pct": abs(counted - truth) <= 0.01 * truth,
            # other microscopes' stains and magnifications (the simulator's presets): 2 %
            "total_within_2pct": abs(counted - truth) <= 0.02 * truth,
            "double_counts_le_1pct": double <= 0.01 * truth,
            "per_class_within_2_or_3pct": class_ok,
        },
    }


def _pooled(videos: list[dict[str, Any]]) -> float | None:
    n = sum(v.get("counted_where_crop_right", 0) for v in videos)
    if not n:
        return None
    right = sum(v["counted_where_crop_right"] * (v["label_accuracy_where_crop_right"] or 0.0)
                for v in videos)
    return round(right / n, 4)


def format_table(report: dict[str, Any]) -> str:
    head = (f"{'video':<22}{'frames':>7}{'truth':>7}{'counted':>8}{'double':>7}{'missed':>7}"
            f"{'false':>6}{'unid':>5}{'label acc':>10}{'crop acc':>9}{'fps':>7}")
    lines = [head]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    for v in report["per_video"]:
        lines.append(f"{Path(v['folder']).name[:21]:<22}{v['frames']:>7}{v['truth_total']:>7}"
                     f"{v['counted']:>8}{v['double_counts']:>7}{v['missed']:>7}"
                     f"{v['false_counts']:>6}{v['unidentified']:>5}"
                     f"{pct(v['label_accuracy_counted']):>10}{pct(v['crop_accuracy']):>9}"
                     f"{v['fps']:>7.0f}")
    o = report["overall"]
    lines.append(f"{'overall':<22}{o['frames']:>7}{o['truth_total']:>7}{o['counted']:>8}"
                 f"{o['double_counts']:>7}{o['missed']:>7}{o['false_counts']:>6}"
                 f"{o['unidentified']:>5}{'':>10}{pct(o['crop_accuracy']):>9}")
    lines.append("")
    lines.append(f"{'class':<14}{'counted':>8}{'truth':>7}")
    for lab, pc in o["per_class"].items():
        lines.append(f"{lab:<14}{pc['counted']:>8}{pc['truth']:>7}")
    lines.append("")
    lines.append(f"outside the white-cell total: {o['nrbc']} named erythroblast (NRBC), "
                 f"{o['vetoed']} vetoed (platelet or artefact)")
    if o["crops_named_wrong"]:
        lines.append("truth crops named wrong (truth->named, crops): " + ", ".join(
            f"{k} {n}" for k, n in o["crops_named_wrong"].items()))
    t = o["targets"]
    lines.append(f"total within 1% of truth: {'yes' if t['total_within_1pct'] else 'NO'} "
                 f"({o['total_error_pct']:+.1f}%; within 2%, the target on other stains and "
                 f"magnifications: {'yes' if t['total_within_2pct'] else 'NO'}); "
                 f"double counts <= 1%: "
                 f"{'yes' if t['double_counts_le_1pct'] else 'NO'} ({o['double_pct']:.1f}%); "
                 f"per class within 2 cells/3%: "
                 f"{'yes' if t['per_class_within_2_or_3pct'] else 'NO'}")
    acc = o.get("label_accuracy_where_crop_right")
    lines.append("counted label = truth, on cells the classifier names right from a sharp truth "
                 f"crop (tracking + vote alone): {pct(acc)}")
    lines.append(f"missed cells never detected while fully in view (segmenter misses): "
                 f"{o['missed_never_detected']} of {o['missed']}")
    lines.append(f"truth = white cells fully in view in >= {MIN_FULL_FRAMES} frames")
    return "\n".join(lines)


def evaluate_counting(path: Path, make: Callable[[], Analyzer],
                      max_frames: int | None = None) -> dict[str, Any]:
    """Evaluate every synth folder under ``path`` -> {"per_video": [...], "overall": {...}}."""
    videos = []
    for folder in synth_folders(path):
        log.info("counting %s", folder)
        videos.append(evaluate_video(folder, make(), max_frames=max_frames))
    return {"per_video": videos, "overall": summarize(videos),
            "definition": {"truth_total": f"white cells fully in view (visible_fraction >= "
                                          f"{FULL_VISIBLE}, box >= 1 px off the border) in >= "
                                          f"{MIN_FULL_FRAMES} frames",
                           "match": f"counted track -> truth cell with the largest IoU sum "
                                    f"(needs one frame with IoU >= {MIN_IOU})"}}


def main_counting(args: argparse.Namespace) -> int:
    """``hematovision evaluate SYNTH_DIR``: counting figures per video and overall."""

    path = Path(args.data)
    if not path.is_dir():
        raise InputError(f"{path}: not a folder")
    model = getattr(args, "model", None)
    build_analyzer(model)  # fail early with a clear message if the model is unusable
    report = evaluate_counting(path, lambda: build_analyzer(model))
    print(format_table(report))
    out = getattr(args, "out", None)
    if out:
        out_path = Path(out)
        if out_path.suffix.lower() != ".json":
            out_path.mkdir(parents=True, exist_ok=True)
            out_path = out_path / "counting.json"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out_path}")
    return 0
