"""``hematovision evaluate``: figures for a model on one or more data folders, each on its own.

The kind of folder decides what is measured (every source is reported separately, never pooled):

* Pascal VOC with wbc_types.csv -> detection figures (training.detection_eval), classification of
  the exported .tflite itself on the model's held-out images (all images when the folder is not
  one the model was trained on), and end to end (segment the photo, match the found cell to the
  main GT WBC, classify it): accuracy, per-class recall, macro-F1, confusion.
* folder per class (single-cell images, e.g. PBC) -> classification figures on the held-out
  images (all images for a folder the model never saw).
* a folder with truth.json (``hematovision synth`` output) -> counting figures
  (training.count_eval.main_counting).

Every classification report holds accuracy, per-class precision/recall/F1, macro-F1 over the
classes present, the expected calibration error, float-vs-int8 agreement when the float export is
found, and the confusion matrix; ``--robustness`` adds the same cells named in photos changed as
another microscope would take them (colour, light, focus, camera); ``--split monitor`` measures on
the model's monitor split instead of the held-out one (for choosing between models). Prints a
readable summary; with ``--out`` writes OUT/SOURCE/report.json, confusion.txt and confusion.png
(and end_to_end_confusion.* for VOC).
"""

from __future__ import annotations

import argparse
import json
import logging
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from detector.classify import CellClassifier
from detector.core import UNIDENTIFIED, VETO_MIN_SCORE, naming_bars
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
    """Accuracy, per-class precision/recall/F1, macro-F1, ECE, confusion, unidentified.

    ``macro_f1`` averages the F1 of every class with support; ``macro_f1_main`` that of the
    ``main_classes`` with support. A row of zeros is a cell never classified (e.g. missed by the
    segmenter): it counts as unidentified and wrong. Top-1 figures use the arg-max label.
    Cells whose top score is below ``min_score`` (below ``VETO_MIN_SCORE`` when the top label
    rejects the cell) are ``unidentified`` (as at run time, ``detector.core.naming_bars``):
    counted, and accuracy is given both over the identified cells and over all cells
    (unidentified counted as wrong). The confusion matrix has rows = true class, columns =
    predicted class plus a last ``unidentified`` column.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float32).reshape(len(y_true), len(classes))
    k = len(classes)
    pred = probs.argmax(1) if len(y_true) else np.zeros(0, np.int64)
    top = probs.max(1) if len(y_true) else np.zeros(0, np.float32)
    pred = np.where(top > 0, pred, -1)
    bars = naming_bars(classes, min_score)
    unid = (top < bars[np.maximum(pred, 0)]) | (top <= 0)
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
    present = [c for c in classes if per_class[c]["support"] > 0]
    macro_all = float(np.mean([per_class[c]["f1"] for c in present])) if present else 0.0
    from training.train import expected_calibration_error

    seen = top > 0
    confusion = np.zeros((k, k + 1), dtype=np.int64)
    for t, p_, u in zip(y_true, pred, unid, strict=True):
        confusion[t, k if u else p_] += 1
    ident = ~unid
    return {
        "n": n,
        "accuracy": round(float(correct.mean()) if n else 0.0, 4),
        "macro_f1": round(macro_all, 4),
        "macro_f1_classes": present,
        "macro_f1_main": round(macro, 4),
        "ece": round(expected_calibration_error(y_true[seen], probs[seen]), 4),
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
    from detector.classify import default_model_path

    return Path(default_model_path())


def find_float_model(model: Path) -> Path | None:
    """The float .tflite export of the same training run, if kept (not shipped)."""
    for p in (model.with_name(model.stem + ".float.tflite"),
              Path("runs") / model.stem / f"{model.stem}.float.tflite",
              model.parent.parent / "runs" / model.stem / f"{model.stem}.float.tflite"):
        if p.is_file():
            return p
    return None


# ----------------------------------------------------------------------------------- sources


def _progress(it: Any, total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="img", leave=False)


def _end_to_end(clf: CellClassifier, samples: list, label_index: dict[str, int]) -> dict[str, Any]:
    """Segment each photo, match a found cell to the main GT WBC, classify its crop.

    A cell the segmenter misses counts as wrong (a row of zeros in the figures).
    """
    from detector.crop import crop_cells
    from detector.segment import Segmenter
    from stream.images import read_image
    from training.data import main_wbc_box, match_box

    seg = Segmenter()
    probs = np.zeros((len(samples), len(clf.labels)), np.float32)
    missed = 0
    for i, s in enumerate(_progress(samples, len(samples), "end-to-end")):
        img = read_image(s.image)
        m = match_box(seg.find(img).xyxy, main_wbc_box(s.image))
        if m is None:
            missed += 1
            continue
        probs[i] = clf.classify_crops(crop_cells(img, m[None], clf.crop_rule))[0]
    y = np.array([label_index[s.label] for s in samples], dtype=np.int64)
    fig = classification_figures(y, probs, clf.labels, clf.min_score)
    fig.update({"images": len(samples), "wbc_found": len(samples) - missed,
                "wbc_missed": missed,
                "note": "main GT WBC per image, segmented then classified; a missed cell and "
                        "an arg-max label count as wrong/right in 'accuracy' (unidentified "
                        "below min_score in 'accuracy_unidentified_as_wrong')"})
    return fig


#: Sources with fewer cells also get the float-vs-int8 agreement on jittered copies of them.
JITTER_BELOW = 500
JITTER_COPIES = 10


def source_report(clf: CellClassifier, ds: Any, kind: str,
                  float_clf: CellClassifier | None = None,
                  robustness: bool = False) -> dict[str, Any]:
    """Figures of one data source: its crops (cut at the training boxes) and, for VOC photos,
    end to end; with ``robustness``, the crops again from photos changed as another microscope
    would take them. Only the labelled cells (no VOC platelet/red-cell extras) of the model's
    labels."""
    from training.data import ImageCache, cut_crops

    label_index = {c: i for i, c in enumerate(clf.labels)}
    main = [s for s in ds.samples if not s.extra]
    keep = [s for s in main if s.label in label_index]
    left_out = Counter(s.label for s in main if s.label not in label_index)
    skipped = sorted(left_out)
    if not keep:
        raise InputError(f"no images of the model's classes {list(clf.labels)}: the class "
                         f"folders read as {skipped} (a folder per class is expected, e.g. "
                         f"TRAIN/ of a TRAIN/ and TEST/ layout, not the folder above it)")
    cache = ImageCache()
    x = np.concatenate([cut_crops([s], clf.crop_rule, cache=cache)[0]
                        for s in _progress(keep, len(keep), "cropping")])
    y = np.array([label_index[s.label] for s in keep], dtype=np.int64)
    probs = clf.classify_crops(x)
    fig = classification_figures(y, probs, clf.labels, clf.min_score)
    fig["bootstrap"] = bootstrap_ci(y, probs, clf.labels)
    report: dict[str, Any] = {"kind": kind, "images": len(keep), "classes_not_in_model": skipped,
                              "images_not_in_model": dict(sorted(left_out.items())),
                              "crops": fig}
    # how the class folders were read (a merged data set keeps each folder's under its name)
    names = {s.dataset for s in main}
    own = ds.info.get("per_dataset", {}).get(names.pop()) if len(names) == 1 else None
    folders = (own or ds.info).get("folders")
    if folders:
        report["folders"] = folders
    if float_clf is not None:
        pf = float_clf.classify_crops(x)
        report["float_vs_int8"] = {
            "compared": "float32 TFLite export of the same weights vs the int8 file, same crops",
            "top1_agreement": round(float(np.mean(pf.argmax(1) == probs.argmax(1))), 4),
            "max_abs_prob_diff": round(float(np.abs(pf - probs).max()), 4),
            "float_accuracy": round(float(np.mean(pf.argmax(1) == y)), 4),
        }
        if len(keep) < JITTER_BELOW:
            # few cells (BCCD's 55): one disagreement moves the figure by 2 %. Boxes jittered as
            # the segmenter's vary give more inputs of the same cells to compare on.
            jitter = float(clf.card.recipe.get("box_jitter", 0.08))  # as the model trained
            xj, _ = cut_crops(keep, clf.crop_rule, copies=JITTER_COPIES, jitter=jitter, seed=0,
                              cache=cache)
            pj, pfj = clf.classify_crops(xj), float_clf.classify_crops(xj)
            differ = pfj.argmax(1) != pj.argmax(1)
            report["float_vs_int8"]["jittered"] = {
                "crops": len(xj),
                "top1_agreement": round(float(np.mean(~differ)), 4),
                # near-ties flip first: how sure the float model was where the two differ
                "float_top_prob_where_they_differ": sorted(
                    round(float(v), 2) for v in pfj.max(1)[differ]),
                "note": f"{JITTER_COPIES} crops per cell, the box jittered by up to "
                        f"{100 * jitter:.0f} %",
            }
    if robustness:
        report["robustness"] = robustness_report(clf, keep, y, probs, cache)
    if kind == "voc":
        report["end_to_end"] = _end_to_end(clf, keep, label_index)
    return report


#: Another microscope's colour, light, focus and camera, as the detection evaluation applies them
#: (training.detection_eval.perturb), those that keep the photo's geometry: the same crops are cut
#: from the changed photo. Magnification is left out: the crop rule sizes every crop by its box.
NAMING_PERTURBATIONS = (
    "wb_warm", "wb_cool", "wb_led", "dark", "bright", "gamma_0.7", "gamma_1.4", "contrast_0.6",
    "stain_pale", "stain_dark", "hue_-10", "hue_+10", "rbc_grey", "rbc_teal", "bg_yellow",
    "bg_blue", "dim", "blur_1.5", "noise_8", "jpeg_30", "rbc_teal+wb_cool", "rbc_grey+bg_yellow",
)


class _Perturbed:
    """A source's photos as ``kind`` would have photographed them (one seed per photo)."""

    def __init__(self, images: Any, kind: str) -> None:
        from training.detection_eval import perturb

        self._images, self.kind, self._perturb = images, kind, perturb

    def __call__(self, path: str) -> np.ndarray:
        no_boxes = np.empty((0, 4), np.float32)
        return self._perturb(self._images(path), no_boxes, self.kind,
                             seed=zlib.crc32(str(path).encode()))[0]


def robustness_report(clf: CellClassifier, samples: list, y: np.ndarray, clean: np.ndarray,
                      images: Any, kinds: tuple[str, ...] = NAMING_PERTURBATIONS
                      ) -> dict[str, Any]:
    """How the model names the same cells in photos changed as another microscope would take them.

    Per kind: accuracy and macro-F1 on the crops cut at the same boxes from the changed photos,
    and the share of cells whose label changed from the unchanged photos' (``clean`` probs)."""
    from training.data import cut_crops

    out: dict[str, Any] = {}
    for kind in _progress(kinds, len(kinds), "robustness"):
        x, _ = cut_crops(samples, clf.crop_rule, cache=_Perturbed(images, kind))
        probs = clf.classify_crops(x)
        fig = classification_figures(y, probs, clf.labels, clf.min_score)
        out[kind] = {"accuracy": round(fig["accuracy"], 4),
                     "macro_f1": round(fig["macro_f1"], 4),
                     "label_changed": round(float(np.mean(probs.argmax(1) != clean.argmax(1))),
                                            4)}
    return out


def _latency(model: Path) -> dict[str, Any]:
    from training.export import measure_latency

    return {"threads": 1, "batch1": round(measure_latency(model, batch=1), 3),
            "batch8": round(measure_latency(model, batch=8), 3),
            "note": "ms per crop, CellClassifier.classify_crops (LiteRT, XNNPACK), median"}


#: What the per-source ``robustness`` figures of a card are.
ROBUSTNESS_NOTE = (
    "per source 'robustness': the held-out cells named again in photos changed as another "
    "microscope would take them (training.detection_eval perturbations that keep the geometry), "
    "crops at the same boxes; accuracy, macro-F1 and the share of labels changed")


def evaluate_split(model: Path, ds: Any, float_model: Path | None = None,
                   robustness: bool = True) -> dict[str, Any]:
    """Per-source figures of an exported model on a split (e.g. the held-out one in training),
    with the same cells under another microscope's colours unless ``robustness`` is False: every
    card carries the figures the model is judged by."""
    clf = CellClassifier(model, num_threads=1)
    fclf = CellClassifier(float_model, num_threads=1) if float_model else None
    kinds = ds.info.get("per_dataset", {})
    sources = {name: source_report(clf, ds.where(name), kinds.get(name, {}).get("kind", "?"),
                                   fclf, robustness=robustness)
               for name in ds.datasets}
    out = {"on": "held-out validation split (images never trained on nor used to select)",
           "sources": sources, "latency_ms_per_crop": _latency(model)}
    if robustness:
        out["robustness_note"] = ROBUSTNESS_NOTE
    return out


#: ``--split``: the model card's split key and how reports name it.
_SPLITS = {"held-out": ("val_images", "held-out validation split ({n} images)"),
           "monitor": ("monitor_images", "monitor split ({n} images; not held out)")}


def _read_source(data: Path, clf: CellClassifier, split: str = "held-out"
                 ) -> tuple[Any, str, str]:
    """A data folder read with the training boxes; the model's held-out part if it trained on it
    (``split="monitor"``: its monitor split, which chose the epoch: models are compared there, so
    the held-out images never choose a model)."""
    from training.data import is_voc, load_datasets

    cache = Path("runs") / "cache"
    seg = clf.card.trained_on.get("segmenter_used", True)
    ds = load_datasets([data], clf.crop_rule, finder="default" if seg else None, min_images=1,
                       cache_dir=cache if cache.is_dir() else None)
    kind = "voc" if is_voc(data) else "class_folders"
    subset = "all images (a data set the model never trained on)"
    if data.name in clf.card.trained_on.get("datasets", []):
        key, name = _SPLITS[split]
        keep = set(clf.card.split.get(key) or [])
        ds = ds.subset([g for g in set(ds.groups) if g in keep])
        subset = "the model's " + name.format(n=len(set(ds.groups)))
    elif split == "monitor":
        raise InputError(f"{data}: the model did not train on it, so it has no monitor split "
                         "there")
    return ds, kind, subset


def _detection(data: Path) -> dict[str, Any]:
    """Segmenter recall/precision/timing on every annotated image (SEG's detection_eval)."""
    from detector.segment import Segmenter
    from training.detection_eval import evaluate_detection
    from training.voc import read_voc as read_voc_records

    result = evaluate_detection(read_voc_records(data), Segmenter(), progress=True, threads=1)
    result["failures"] = len(result.get("failures", []))
    return result


def _print_fig(title: str, fig: dict[str, Any]) -> None:
    print(f"  {title}: cells {fig['n']}  accuracy {fig['accuracy']:.3f}  macro-F1 "
          f"{fig['macro_f1']:.3f} ({len(fig['macro_f1_classes'])} classes)  ECE {fig['ece']:.3f}")
    if "bootstrap" in fig:
        b = fig["bootstrap"]
        print(f"    95% bootstrap interval: accuracy {b['accuracy_95ci']}")
    print(f"    unidentified (top score < {fig['min_score']}, a rejection < {VETO_MIN_SCORE}): "
          f"{fig['unidentified']}  accuracy "
          f"of identified: {fig['accuracy_identified']:.3f}  all (unidentified = wrong): "
          f"{fig['accuracy_unidentified_as_wrong']:.3f}")
    print("    per class:           precision  recall      F1  support")
    for c, v in fig["per_class"].items():
        if v["support"] or v["precision"]:
            print(f"      {c:<20} {v['precision']:>9.3f} {v['recall']:>7.3f} {v['f1']:>7.3f} "
                  f"{v['support']:>8d}")
    print("    " + confusion_text(fig).replace("\n", "\n    ").rstrip() + "\n", end="")


def print_source(name: str, rep: dict[str, Any]) -> None:
    """One source's figures, readable."""
    print(f"source {name} ({rep['kind']}): {rep.get('subset', 'held-out split')}, "
          f"{rep['images']} images")
    # (a folder named as its class, in any case, singular or plural, goes without saying)
    named = {f: c for f, c in rep.get("folders", {}).items() if f.lower() not in (c, c + "s")}
    if named:
        print("  folders read as: " + ", ".join(f"{f} -> {c}" for f, c in named.items()))
    if rep.get("images_not_in_model"):
        print("  left out, not classes of the model: " + ", ".join(
            f"{c} ({n} image{'s' if n != 1 else ''})"
            for c, n in rep["images_not_in_model"].items()))
    _print_fig("single-cell crops (training boxes)", rep["crops"])
    fv = rep.get("float_vs_int8")
    if fv:
        print(f"  float vs int8 top-1 agreement: {fv['top1_agreement']:.3f} "
              f"(max |dp| {fv['max_abs_prob_diff']:.3f}, float accuracy "
              f"{fv['float_accuracy']:.3f})")
        if "jittered" in fv:
            print(f"  float vs int8 top-1 agreement on {fv['jittered']['crops']} jittered crops "
                  f"of the same cells: {fv['jittered']['top1_agreement']:.3f}")
            where = fv["jittered"].get("float_top_prob_where_they_differ")
            if where:
                print(f"    where they differ the float model's top probability was "
                      f"{', '.join(f'{v:.2f}' for v in where)}")
    else:
        print("  float vs int8: not compared (no float export found)")
    e2e = rep.get("end_to_end")
    if e2e:
        print(f"  end to end (segment, then classify; WBC missed by the segmenter: "
              f"{e2e['wbc_missed']} of {e2e['images']}):")
        _print_fig("end to end", e2e)
    rob = rep.get("robustness")
    if rob:
        print("  photos changed as another microscope would take them (crops at the same boxes):")
        print("    perturbation           accuracy  macro-F1  label changed")
        for k, v in rob.items():
            print(f"    {k:<22} {v['accuracy']:>8.3f} {v['macro_f1']:>9.3f} "
                  f"{v['label_changed']:>14.3f}")
        accs = [v["accuracy"] for v in rob.values()]
        print(f"    mean accuracy over the {len(accs)} perturbations {np.mean(accs):.3f}, "
              f"lowest {min(accs):.3f}")
    det = rep.get("detection")
    if det is not None:
        print(f"  detection on {det['images']} images: recall {det['recall']:.3f}, precision "
              f"{det['precision']:.3f} (tp {det['tp']}, fp {det['fp']}, fn {det['fn']}); "
              f"segmenter median {det['ms_median']:.2f} ms/frame")


def _is_synth(data: Path) -> bool:
    return (data / "truth.json").is_file() or any(
        (p / "truth.json").is_file() for p in data.iterdir() if p.is_dir()
    )


def _write(out_dir: Path, rep: dict[str, Any], title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
    (out_dir / "confusion.txt").write_text(confusion_text(rep["crops"]))
    save_confusion_png(rep["crops"], out_dir / "confusion.png", f"{title}: crops")
    if "end_to_end" in rep:
        (out_dir / "end_to_end_confusion.txt").write_text(confusion_text(rep["end_to_end"]))
        save_confusion_png(rep["end_to_end"], out_dir / "end_to_end_confusion.png",
                           f"{title}: end to end")


def main(args: argparse.Namespace) -> int:
    """CLI handler for ``hematovision evaluate``: each data folder reported on its own."""
    folders = [Path(d) for d in ([args.data] if isinstance(args.data, str) else args.data)]
    for data in folders:
        if not data.is_dir():
            raise InputError(f"{data}: not a folder")
    if any(_is_synth(d) for d in folders):
        from training.count_eval import main_counting

        if len(folders) > 1:
            raise InputError("evaluate one synth folder at a time")
        return int(main_counting(argparse.Namespace(**{**vars(args), "data": str(folders[0])}))
                   or 0)
    model = Path(args.model) if getattr(args, "model", None) else _default_model()
    clf = CellClassifier(model, num_threads=1)  # the exported .tflite itself, as users run it
    fm = getattr(args, "float_model", None)
    float_path = Path(fm) if fm else find_float_model(model)
    fclf = None
    if float_path is not None:
        try:
            fclf = CellClassifier(float_path, num_threads=1)
        except ModelError:
            if fm:  # asked for: a model that does not load is an error
                raise
    out = getattr(args, "out", None)
    reports = {}
    print(f"model {model} ({len(clf.labels)} labels, input {clf.size}, min_score "
          f"{clf.min_score})")
    split = getattr(args, "split", "held-out")
    for data in folders:
        ds, kind, subset = _read_source(data, clf, split)
        rep = source_report(clf, ds, kind, fclf, robustness=getattr(args, "robustness", False))
        rep.update({"data": str(data), "subset": subset})
        if kind == "voc" and split == "held-out":  # (detection: all photos, whatever the split)
            rep["detection"] = _detection(data)
        print_source(data.name, rep)
        reports[data.name] = rep
        if out:
            _write(Path(out) / data.name, rep, f"{model.name} on {data.name}")
    lat = _latency(model)
    print(f"int8 latency per crop, 1 thread: batch 1 {lat['batch1']} ms, batch 8 "
          f"{lat['batch8']} ms")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "report.json").write_text(json.dumps(
            {"model": str(model), "sources": reports, "latency_ms_per_crop": lat}, indent=2,
            default=str) + "\n")
        print(f"wrote {out}/report.json and per source report.json, confusion.txt/.png")
    return 0
