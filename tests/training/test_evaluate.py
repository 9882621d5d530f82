"""training/evaluate.py: figures, the report files, the folder-kind dispatch."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from detector.errors import InputError
from training.evaluate import classification_figures, confusion_text, main


def test_classification_figures_hand_checked():
    classes = ("neutrophil", "eosinophil", "lymphocyte", "monocyte")
    y = np.array([0, 0, 1, 2, 3, 3])
    probs = np.array([
        [0.9, 0.05, 0.03, 0.02],  # right
        [0.4, 0.35, 0.2, 0.05],   # right but below 0.5 -> unidentified
        [0.1, 0.8, 0.05, 0.05],   # right
        [0.1, 0.1, 0.7, 0.1],     # right
        [0.1, 0.1, 0.1, 0.7],     # right
        [0.1, 0.1, 0.6, 0.2],     # monocyte called lymphocyte
    ])
    f = classification_figures(y, probs, classes, min_score=0.5)
    assert f["accuracy"] == pytest.approx(5 / 6, abs=1e-4)
    assert f["unidentified"] == 1
    assert f["accuracy_identified"] == pytest.approx(4 / 5)
    assert f["accuracy_unidentified_as_wrong"] == pytest.approx(4 / 6, abs=1e-4)
    assert f["per_class"]["lymphocyte"] == {"precision": 0.5, "recall": 1.0, "f1": 0.6667,
                                            "support": 1}
    assert f["per_class"]["monocyte"]["recall"] == 0.5
    macro = np.mean([1.0, 1.0, 2 / 3, 2 / 3])
    assert f["macro_f1"] == pytest.approx(macro, abs=1e-3)
    assert f["macro_f1_classes"] == list(classes)
    assert f["confusion"][0] == [1, 0, 0, 0, 1]
    assert f["confusion"][3] == [0, 0, 1, 1, 0]
    text = confusion_text(f)
    assert "unidentified" in text and "monocyte" in text


def test_missed_cells_count_as_wrong_and_macro_f1_skips_absent_classes():
    classes = ("neutrophil", "eosinophil", "basophil")
    y = np.array([0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 0.0]])  # last: never seen
    f = classification_figures(y, probs, classes, min_score=0.5)
    assert f["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert f["per_class"]["eosinophil"]["recall"] == 0.5
    assert f["per_class"]["neutrophil"]["precision"] == 1.0  # the missed cell is not a neutrophil
    assert f["confusion"][1] == [0, 1, 0, 1]
    assert f["macro_f1_classes"] == ["neutrophil", "eosinophil"]  # no basophil in the data
    assert f["ece"] == pytest.approx((0.1 + 0.2) / 2, abs=1e-4)  # of the two classified cells


def _args(data, model=None, out=None, float_model=None, robustness=False, split="held-out"):
    return argparse.Namespace(data=str(data), model=str(model) if model else None,
                              out=str(out) if out else None,
                              float_model=str(float_model) if float_model else None,
                              robustness=robustness, split=split)


def test_bad_folder_and_synth_dispatch(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="not a folder"):
        main(_args(tmp_path / "none"))
    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "truth.json").write_text("{}")
    import sys
    import types

    called = {}
    fake = types.ModuleType("training.count_eval")
    fake.main_counting = lambda args: called.setdefault("data", args.data) and 0
    monkeypatch.setitem(sys.modules, "training.count_eval", fake)
    assert main(_args(tmp_path / "synth")) == 0
    assert called["data"] == str(tmp_path / "synth")


def test_published_folder_names_are_read_as_the_models_classes(tmp_path, capsys, tiny_models):
    """A data set laid out as published (here the Munich AML set's codes) is evaluated under the
    model's class names; a folder that names no class of the model is left out and said so."""
    import cv2

    from tests.tiny_models import BLUE_BGR, RED_BGR

    tree = tmp_path / "AML-Cytomorphology"
    for folder, colour, n in (("EOS", RED_BGR, 4), ("LYT", BLUE_BGR, 3), ("MYO", BLUE_BGR, 2)):
        (tree / folder).mkdir(parents=True)
        for i in range(n):
            img = np.full((64, 64, 3), colour, np.uint8)
            img[i, i] = (i * 7) % 255  # no two files alike (copies would share a group)
            cv2.imwrite(str(tree / folder / f"{folder}_{i}.tiff"), img)
    assert main(_args(tree, tiny_models / "uint8.tflite", tmp_path / "rep")) == 0
    out = capsys.readouterr().out
    assert "folders read as: EOS -> eosinophil, LYT -> lymphocyte" in out
    assert "left out, not classes of the model: myo (2 images)" in out
    rep = json.loads((tmp_path / "rep" / tree.name / "report.json").read_text())
    per_class = rep["crops"]["per_class"]
    assert per_class["eosinophil"]["support"] == 4 and per_class["lymphocyte"]["support"] == 3
    assert rep["crops"]["accuracy"] == 1.0
    assert rep["images_not_in_model"] == {"myo": 2}


def test_a_split_folder_above_the_class_folders_is_refused_with_a_hint(tmp_path, tiny_models):
    import cv2

    for split in ("TRAIN", "TEST"):
        (tmp_path / "images" / split / "EOSINOPHIL").mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "images" / split / "EOSINOPHIL" / "a.png"),
                    np.full((32, 32, 3), 90 if split == "TEST" else 30, np.uint8))
    with pytest.raises(InputError, match=r"read as \['test', 'train'\].*a folder per class"):
        main(_args(tmp_path / "images", tiny_models / "uint8.tflite"))


@pytest.mark.train
def test_evaluate_class_folders_prints_and_writes_report(tmp_path, capsys, tiny_run):
    t = tiny_run
    float_model = t["run_dir"] / "tiny.float.tflite"
    assert main(_args(t["data"], t["model"], tmp_path / "rep", float_model)) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro-F1" in out and "neutrophil" in out
    assert "float vs int8 top-1 agreement" in out
    assert "source cells (class_folders): the model's held-out validation split" in out
    rep = json.loads((tmp_path / "rep" / "cells" / "report.json").read_text())
    assert rep["crops"]["n"] == 4  # the 2 held-out originals x 2 copies only
    assert rep["crops"]["per_class"]["neutrophil"]["support"] == 2
    assert (tmp_path / "rep" / "cells" / "confusion.png").stat().st_size > 1000
    assert "rows: true class" in (tmp_path / "rep" / "cells" / "confusion.txt").read_text()
    # the 1-epoch tiny model is near-uniform, so compare probabilities, not arg-max
    assert rep["float_vs_int8"]["max_abs_prob_diff"] < 0.1
    # few cells: the agreement is also measured on 10 jittered crops of each
    jit = rep["float_vs_int8"]["jittered"]
    assert jit["crops"] == 4 * 10 and "jittered crops of the same cells" in out
    from detector.classify import CellClassifier
    from training.data import cut_crops, load_datasets

    q, f = CellClassifier(t["model"]), CellClassifier(float_model)
    ds = load_datasets([t["data"]], q.crop_rule, finder=None, min_images=1)
    held = ds.subset(t["card"]["split"]["val_images"])
    xj, _ = cut_crops(held.samples, q.crop_rule, copies=10, jitter=0.08, seed=0)
    pf = f.classify_crops(xj)
    same = q.classify_crops(xj).argmax(1) == pf.argmax(1)
    assert jit["top1_agreement"] == round(float(same.mean()), 4)
    # and how sure the float model was on each crop where the two differ
    assert jit["float_top_prob_where_they_differ"] == sorted(
        round(float(v), 2) for v in pf.max(1)[~same])
    # the figures are those training put in the card (same split, same int8 file)
    card_fig = t["card"]["evaluation"]["sources"]["cells"]["crops"]
    assert rep["crops"]["confusion"] == card_fig["confusion"]
    top = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert list(top["sources"]) == ["cells"] and top["latency_ms_per_crop"]["batch1"] > 0
    # --robustness: the same held-out cells in photos changed as another microscope takes them
    assert main(_args(t["data"], t["model"], tmp_path / "rob", robustness=True)) == 0
    assert "as another microscope would take them" in capsys.readouterr().out
    rob = json.loads((tmp_path / "rob" / "cells" / "report.json").read_text())["robustness"]
    from training.evaluate import NAMING_PERTURBATIONS

    assert list(rob) == list(NAMING_PERTURBATIONS)
    assert all(0.0 <= v["label_changed"] <= 1.0 for v in rob.values())
    # the held-out cells, cut at their boxes from each photo under a cool white balance (a
    # deterministic change), named by the int8 file: the report's figures, worked out here apart
    from detector.crop import crop_cell
    from stream.images import read_image
    from training.detection_eval import perturb

    cool = np.stack([crop_cell(perturb(read_image(s.image), np.empty((0, 4)), "wb_cool")[0],
                               np.asarray(s.box), q.crop_rule) for s in held.samples])
    truth = np.array([q.labels.index(s.label) for s in held.samples])
    named, clean = q.classify_crops(cool).argmax(1), q.classify_crops(
        cut_crops(held.samples, q.crop_rule)[0]).argmax(1)
    assert rob["wb_cool"]["accuracy"] == round(float(np.mean(named == truth)), 4)
    assert rob["wb_cool"]["label_changed"] == round(float(np.mean(named != clean)), 4)


@pytest.mark.train
def test_evaluate_on_the_monitor_split_names_the_cells_that_chose_the_epoch(tmp_path, capsys,
                                                                          tiny_run):
    """New models are compared with the shipped one there, so held-out images choose nothing."""
    t = tiny_run
    monitor = set(t["card"]["split"]["monitor_images"])
    assert monitor and not monitor & set(t["card"]["split"]["val_images"])
    assert main(_args(t["data"], t["model"], tmp_path / "mon", robustness=True,
                      split="monitor")) == 0
    out = capsys.readouterr().out
    assert f"the model's monitor split ({len(monitor)} images; not held out)" in out
    assert "mean accuracy over the 22 perturbations" in out
    rep = json.loads((tmp_path / "mon" / "cells" / "report.json").read_text())
    from detector.classify import CellClassifier
    from training.data import load_datasets

    ds = load_datasets([t["data"]], CellClassifier(t["model"]).crop_rule, finder=None,
                       min_images=1)
    assert rep["crops"]["n"] == len(ds.subset(sorted(monitor)).samples)
    # a folder the model never trained on has no monitor split
    other = tmp_path / "other"
    (other / "NEUTROPHILS").mkdir(parents=True)
    src = next(p for p in (t["data"] / "NEUTROPHILS").iterdir())
    (other / "NEUTROPHILS" / src.name).write_bytes(src.read_bytes())
    with pytest.raises(InputError, match="did not train on it, so it has no monitor split"):
        main(_args(other, t["model"], split="monitor"))


class _ByColour:
    """A stand-in classifier that names a crop by its colour: bluer than red -> class 0."""

    labels = ("neutrophil", "eosinophil")
    min_score = 0.0

    def __init__(self) -> None:
        from detector.crop import CropRule

        self.crop_rule = CropRule(size=16)

    def classify_crops(self, crops: np.ndarray) -> np.ndarray:
        bluer = crops[..., 0].mean((1, 2)) > crops[..., 2].mean((1, 2))
        return np.stack([bluer, ~bluer], 1).astype(np.float32)


def test_robustness_names_the_same_cells_in_changed_photos(tmp_path):
    """Each kind cuts the same boxes from the photo as that kind changes it: a cool white balance
    (blue x1.15, red x0.8) turns the slightly red photos bluer, a gamma change does not."""
    import cv2

    from training.data import ImageCache, Sample
    from training.evaluate import robustness_report

    samples = []
    for i, bgr in enumerate([(150, 150, 160), (150, 150, 170), (170, 150, 150)]):
        path = tmp_path / f"p{i}.png"
        cv2.imwrite(str(path), np.full((40, 40, 3), bgr, np.uint8))
        samples.append(Sample(str(path), (10, 10, 30, 30), "x", f"g{i}", "gt_box"))
    clf = _ByColour()
    y = np.array([1, 1, 0])  # the true classes: what the clean photos give
    clean = clf.classify_crops(np.stack([cv2.imread(s.image)[:16, :16] for s in samples]))
    rep = robustness_report(clf, samples, y, clean, ImageCache(), kinds=("wb_cool", "gamma_1.4"))
    # (150, 150, 160) -> (172, 150, 128): bluer; (150, 150, 170) -> (172, 150, 136): bluer
    # all three named class 0: F1 0.5 for class 0 (precision 1/3, recall 1), 0 for class 1
    assert rep["wb_cool"] == {"accuracy": round(1 / 3, 4), "macro_f1": 0.25,
                              "label_changed": round(2 / 3, 4)}
    assert rep["gamma_1.4"]["accuracy"] == 1.0 and rep["gamma_1.4"]["label_changed"] == 0.0
