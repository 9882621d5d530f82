"""``hematovision evaluate``: figures for a model on a data folder.

The kind of folder decides what is measured:

* Pascal VOC with wbc_types.csv -> detection figures (training.detection_eval), classification of
  the exported .tflite itself on the model's held-out images (all images when the folder is not
  the training set), and end-to-end accuracy (segment, classify, match to the main GT WBC).
* folder per class -> classification figures.
* a folder with truth.json (``hematovision synth`` output) -> counting figures
  (training.count_eval.main_counting).

Prints a readable summary; with ``--out`` writes report.json, confusion.txt and confusion.png.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from detector.classify import CellClassifier
from detector.core import UNIDENTIFIED
from detector.errors import InputError, ModelError

log = logging.getLogger(__name__)

MAIN_CLASSES = ("neutrophil", "eosinophil", "lymphocyte", "monocyte")


# ----------------------------------------------------------------------------------- metrics


def classification_figures(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: tuple[str, ...] | list[str],
    min_score: float = 0.0,
    main_classes: tuple[str, ...] = MAIN_CLASSES,
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1, macro-F1 (main classes), confusion, unidentified.

    Top-1 figures use the arg-max label. Cells whose top score is below ``min_score`` are
    ``unidentified`` (as at run time): counted, and accuracy is given both over the identified
    cells and over all cells (unidentified counted as wrong). The confusion matrix has rows =
    true class, columns = predicted class plus a last ``unidentified`` column.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float32).reshape(len(y_true), len(classes))
    k = len(classes)
    pred = probs.argmax(1) if len(y_true) else np.zeros(0, np.int64)
    top = probs.max(1) if len(y_true) else np.zeros(0, np.float32)
    unid = top < min_score
    n = len(y_true)
    correct = pred == y_true
    per_class: dict[str, dict[str, float]] = {}
    for i, c in enumerate(classes):
        tp = int(np.sum((pred == i) & (y_true == i)))
        fp = int(np.sum((pred == i) & (y_true != i)))
        fn = int(np.sum((pred != i) & (y_true == i)))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per_class[c] = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4),
                        "support": int(np.sum(y_true == i))}
    mains = [c for c in main_classes if c in per_class and per_class[c]["support"] > 0]
    macro = float(np.mean([per_class[c]["f1"] for c in mains])) if mains else 0.0
    confusion = np.zeros((k, k + 1), dtype=np.int64)
    for t, p_, u in zip(y_true, pred, unid, strict=True):
        confusion[t, k if u else p_] += 1
    ident = ~unid
    return {
        "n": n,
        "accuracy": round(float(correct.mean()) if n else 0.0, 4),
        "macro_f1_main": round(macro, 4),
        "macro_f1_classes": mains,
        "per_class": per_class,
        "min_score": float(min_score),
        "unidentified": int(unid.sum()),
        "accuracy_identified": round(float(correct[ident].mean()) if ident.any() else 0.0, 4),
        "accuracy_unidentified_as_wrong": round(float((correct & ident).mean()) if n else 0.0, 4),
        "confusion_labels": [*classes, UNIDENTIFIED],
        "confusion": confusion.tolist(),
    }


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: tuple[str, ...] | list[str],
    rounds: int = 1000,
    seed: int = 0,
    main_classes: tuple[str, ...] = MAIN_CLASSES,
) -> dict[str, list[float]]:
    """95 % bootstrap intervals (images resampled) of accuracy and macro-F1 (small sets: noisy)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(probs).argmax(1)
    rng = np.random.default_rng(seed)
    idx_main = [i for i, c in enumerate(classes) if c in main_classes]
    accs, f1s = [], []
    for _ in range(rounds):
        s = rng.integers(0, len(y_true), len(y_true))
        t, p = y_true[s], pred[s]
        accs.append(float(np.mean(t == p)))
        f = []
        for i in idx_main:
            if not np.any(t == i):
                continue
            tp = np.sum((p == i) & (t == i))
            denom = np.sum(p == i) + np.sum(t == i)
            f.append(2 * tp / denom if denom else 0.0)
        f1s.append(float(np.mean(f)) if f else 0.0)
    q = [2.5, 97.5]
    return {"accuracy_95ci": [round(float(v), 4) for v in np.percentile(accs, q)],
            "macro_f1_main_95ci": [round(float(v), 4) for v in np.percentile(f1s, q)],
            "rounds": rounds}


def confusion_text(fig: dict[str, Any]) -> str:
    """Confusion matrix as an aligned text table (rows true, columns predicted)."""
    labels = fig["confusion_labels"]
    cm = fig["confusion"]
    rows_labels = labels[:-1]
    w = max(len(s) for s in labels) + 1
    head = " " * w + "".join(f"{s[:w - 1]:>{w}}" for s in labels)
    lines = ["rows: true class, columns: predicted", head]
    for lab, row in zip(rows_labels, cm, strict=True):
        lines.append(f"{lab:<{w}}" + "".join(f"{v:>{w}}" for v in row))
    return "\n".join(lines) + "\n"


def save_confusion_png(fig: dict[str, Any], path: Path, title: str) -> None:
    """Confusion matrix image (matplotlib imported lazily)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(fig["confusion"])
    labels = fig["confusion_labels"]
    f, ax = plt.subplots(figsize=(6.5, 5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right")
    ax.set_yticks(range(len(labels) - 1), labels[:-1])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    vmax = cm.max() if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > vmax / 2 else "black")
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)


# ----------------------------------------------------------------------------------- model


def _default_model() -> Path:
    from hematovision_models import shipped_model

    return shipped_model()


def find_float_model(model: Path) -> Path | None:
    """The float .tflite export of the same training run, if kept (not shipped)."""
    for p in (model.with_name(model.stem + ".float.tflite"),
              Path("runs") / model.stem / f"{model.stem}.float.tflite",
              model.parent.parent / "runs" / model.stem / f"{model.stem}.float.tflite"):
        if p.is_file():
            return p
    return None


# ----------------------------------------------------------------------------------- modes


def _progress(it: Any, total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="img", leave=False)


def _classify_dataset(clf: CellClassifier, ds: Any, label_index: dict[str, int]) -> tuple:
    from training.data import ImageCache, cut_crops

    keep = [s for s in ds.samples if s.label in label_index]
    skipped = sorted({s.label for s in ds.samples if s.label not in label_index})
    cache = ImageCache()
    crops = []
    for s in _progress(keep, len(keep), "cropping"):
        crops.append(cut_crops([s], clf.crop_rule, cache=cache)[0])
    side = clf.crop_rule.size
    x = np.concatenate(crops) if crops else np.zeros((0, side, side, 3), np.uint8)
    y = np.array([label_index[s.label] for s in keep], dtype=np.int64)
    probs = clf.classify_crops(x)  # batches by itself; (0, C) for no crops
    return x, y, probs, keep, skipped


def _end_to_end(clf: CellClassifier, samples: list, label_index: dict[str, int]) -> dict[str, Any]:
    """Segment each image, classify every found cell, score the one matched to the main GT WBC."""
    from detector.crop import crop_cells
    from detector.segment import Segmenter
    from training.data import match_box, read_image

    seg = Segmenter()
    correct = missed = 0
    y_true, y_pred = [], []
    for s in _progress(samples, len(samples), "end-to-end"):
        img = read_image(s.image)
        det = seg.find(img)
        gt = np.asarray(_gt_box(s), np.float32)
        m = match_box(det.xyxy, gt)
        if m is None:
            missed += 1
            continue
        probs = clf.classify_crops(crop_cells(img, m[None], clf.crop_rule))[0]
        label = clf.labels[int(probs.argmax())] if probs.max() >= clf.min_score else UNIDENTIFIED
        y_true.append(s.label)
        y_pred.append(label)
        correct += int(label == s.label)
    n = len(samples)
    return {
        "available": True,
        "images": n,
        "wbc_found": n - missed,
        "wbc_missed": missed,
        "correct": correct,
        "accuracy": round(correct / n, 4) if n else 0.0,
        "accuracy_of_found": round(correct / (n - missed), 4) if n - missed else 0.0,
        "note": "main GT WBC per image; a missed cell counts as wrong in 'accuracy'; "
                "unidentified counts as wrong",
    }


def _gt_box(sample: Any) -> tuple[float, ...]:
    """The main GT WBC box of a VOC sample (largest WBC box)."""
    from training.data import _voc_wbc_boxes

    xml = Path(sample.image).parent.parent / "Annotations" / (Path(sample.image).stem + ".xml")
    boxes = _voc_wbc_boxes(xml)
    return max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))


def _detection(data: Path) -> dict[str, Any]:
    """Segmenter recall/precision/timing on every annotated image (SEG's detection_eval)."""
    from detector.segment import Segmenter
    from training.detection_eval import evaluate_detection
    from training.voc import read_voc as read_voc_records

    result = evaluate_detection(read_voc_records(data), Segmenter(), progress=True, threads=1)
    result["failures"] = len(result.get("failures", []))
    return result


def evaluate_classification(
    data: Path, model: Path, voc: bool, float_model: Path | None = None
) -> dict[str, Any]:
    """Classification (+ end-to-end for VOC) figures of the .tflite file on ``data``."""
    from training.data import read_class_folders, read_voc

    clf = CellClassifier(model, num_threads=1)  # the exported .tflite itself, as users run it
    label_index = {c: i for i, c in enumerate(clf.labels)}
    from training.data import default_box_finder

    # the same boxes as training: the segmenter's (GT / central-square fallback)
    finder = default_box_finder()
    ds = read_voc(data, finder) if voc else read_class_folders(data, clf.crop_rule, finder)
    trained = clf.card.trained_on.get("datasets", [])
    val_images = clf.card.split.get("val_images")
    subset = "all images (not the model's training set)"
    if data.name in trained and val_images:
        ds = ds.subset(val_images)
        subset = f"the model's held-out validation split ({len(val_images)} images)"
    x, y, probs, kept, skipped = _classify_dataset(clf, ds, label_index)
    if not len(y):
        raise InputError(f"{data}: no images of the model's classes {list(clf.labels)}")
    fig = classification_figures(y, probs, clf.labels, clf.min_score)
    fig["bootstrap"] = bootstrap_ci(y, probs, clf.labels)
    report: dict[str, Any] = {
        "data": str(data),
        "model": str(model),
        "classifier": "detector.classify.CellClassifier",
        "subset": subset,
        "images": len(kept),
        "classes_not_in_model": skipped,
        "crop_box_sources": dict(ds.info.get("sources", {})),
        "classification": fig,
    }
    pf, float_missing = None, "no float export found (runs/NAME/NAME.float.tflite)"
    if float_model is not None:  # asked for: a model that does not load is an error
        pf = CellClassifier(float_model).classify_crops(x)
    elif (float_model := find_float_model(model)) is not None:
        try:
            pf = CellClassifier(float_model).classify_crops(x)
        except ModelError as exc:  # e.g. an export from before float cards were written
            float_missing = f"found float export not loadable: {exc}"
    if pf is not None:
        report["float_vs_int8"] = {
            "float_model": str(float_model),
            "compared": "float32 TFLite export of the same Keras weights vs the int8 file, "
                        "same crops",
            "top1_agreement": round(float(np.mean(pf.argmax(1) == probs.argmax(1))), 4),
            "max_abs_prob_diff": round(float(np.abs(pf - probs).max()), 4),
            "float_accuracy": round(float(np.mean(pf.argmax(1) == y)), 4),
        }
    else:
        report["float_vs_int8"] = {"available": False, "reason": float_missing}
    if voc:
        report["end_to_end"] = _end_to_end(clf, kept, label_index)
    from training.export import measure_latency

    report["latency_ms_per_crop"] = {
        "threads": 1,
        "batch1": round(measure_latency(model, batch=1), 3),
        "batch8": round(measure_latency(model, batch=8), 3),
    }
    return report


def print_summary(report: dict[str, Any]) -> None:
    fig = report["classification"]
    print(f"model {report['model']} on {report['data']}: {report['subset']}")
    print(f"  cells: {fig['n']}  accuracy: {fig['accuracy']:.3f}  macro-F1 "
          f"({', '.join(fig['macro_f1_classes'])}): {fig['macro_f1_main']:.3f}")
    if "bootstrap" in fig:
        b = fig["bootstrap"]
        print(f"  95% bootstrap interval: accuracy {b['accuracy_95ci']}, macro-F1 "
              f"{b['macro_f1_main_95ci']}")
    print(f"  unidentified (top score < {fig['min_score']}): {fig['unidentified']}  accuracy of "
          f"identified: {fig['accuracy_identified']:.3f}  all (unidentified = wrong): "
          f"{fig['accuracy_unidentified_as_wrong']:.3f}")
    print("  per class:       precision  recall      F1  support")
    for c, v in fig["per_class"].items():
        print(f"    {c:<14} {v['precision']:>9.3f} {v['recall']:>7.3f} {v['f1']:>7.3f} "
              f"{v['support']:>8d}")
    print(confusion_text(fig), end="")
    fv = report.get("float_vs_int8", {})
    if "top1_agreement" in fv:
        print(f"  float vs int8 top-1 agreement: {fv['top1_agreement']:.3f} "
              f"(max |dp| {fv['max_abs_prob_diff']:.3f})")
    elif fv:
        print(f"  float vs int8: not compared ({fv.get('reason')})")
    e2e = report.get("end_to_end")
    if e2e and e2e.get("available"):
        print(f"  end-to-end (segment+classify): {e2e['correct']}/{e2e['images']} = "
              f"{e2e['accuracy']:.3f} (WBC missed by the segmenter: {e2e['wbc_missed']})")
    det = report.get("detection")
    if det is not None:
        print(
            f"  detection on {det['images']} images: recall {det['recall']:.3f}, precision "
            f"{det['precision']:.3f} (tp {det['tp']}, fp {det['fp']}, fn {det['fn']}; a detection "
            "matches a WBC box when its centre falls inside it, one to one)"
        )
        print(
            f"  segmenter time per frame, {det['threads']} thread: median {det['ms_median']:.2f} "
            f"ms, p95 {det['ms_p95']:.2f} ms"
        )
    lat = report.get("latency_ms_per_crop")
    if lat:
        print(f"  int8 latency per crop, 1 thread: batch 1 {lat['batch1']} ms, "
              f"batch 8 {lat['batch8']} ms")


def _is_synth(data: Path) -> bool:
    return (data / "truth.json").is_file() or any(
        (p / "truth.json").is_file() for p in data.iterdir() if p.is_dir()
    )


def main(args: argparse.Namespace) -> int:
    """CLI handler for ``hematovision evaluate``."""
    from training.data import is_voc

    data = Path(args.data)
    if not data.is_dir():
        raise InputError(f"{data}: not a folder")
    if _is_synth(data):
        from training.count_eval import main_counting

        return int(main_counting(args) or 0)
    model = Path(args.model) if getattr(args, "model", None) else _default_model()
    voc = is_voc(data)
    fm = getattr(args, "float_model", None)
    report = evaluate_classification(data, model, voc, Path(fm) if fm else None)
    if voc:
        report["detection"] = _detection(data)
    print_summary(report)
    out = getattr(args, "out", None)
    if out:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (out_dir / "confusion.txt").write_text(confusion_text(report["classification"]))
        save_confusion_png(report["classification"], out_dir / "confusion.png",
                           f"{Path(report['model']).name}: {report['subset']}")
        print(f"wrote {out_dir / 'report.json'}, confusion.txt, confusion.png")
    return 0
