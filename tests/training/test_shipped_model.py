"""The shipped default model (models/hematovision.tflite + .json): card vs tensors, real cells.

Held-out images only (the card's ``split.val_images``): BCCD crops at their annotated box, and PBC
single-cell images through the run-time still-image analysis (find the centre cell, then name it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from detector.classify import CellClassifier
from detector.core import KNOWN_LABELS
from detector.crop import CropRule, crop_cells
from detector.segment import Segmenter
from detector.still import analyse_still
from stream.images import read_image
from tests.conftest import DATA
from training.data import content_group, read_voc

PBC = DATA / "pbc"
NUCLEATED = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte",
             "immature_granulocyte", "erythroblast")


def _card(model: Path) -> dict:
    return json.loads(model.with_suffix(".json").read_text())


_DEPTHWISE = re.compile(r"expanded_conv_depthwise|block_\d+_depthwise")


def test_card_matches_tensors(shipped_model):
    card = _card(shipped_model)
    r = CellClassifier(shipped_model)
    size = card["input"]["size"]
    # float input and output, quantized inside the graph: every weight is int8 but those of the
    # few layers the card's recipe names as kept float, so the file is a third of the float one
    assert card["input"]["dtype"] == "float32" and r.input_details["dtype"] == np.float32
    assert list(r.input_details["shape"]) == [1, size, size, 3]
    from ai_edge_litert.interpreter import Interpreter

    tensors = Interpreter(model_path=str(shipped_model)).get_tensor_details()
    kernels = [t for t in tensors if len(t["shape"]) == 4 and t["shape"][0] > 1]  # (out,kh,kw,in)
    depthwise = [t for t in tensors if len(t["shape"]) == 4 and "depthwise" in t["name"]]
    assert len(kernels) >= 30 and all(t["dtype"] == np.int8 for t in kernels)
    floats = [t["name"] for t in depthwise if t["dtype"] != np.int8]  # kernel and output
    kept = card["recipe"]["int8_export"]["float_tensors"]
    # the depthwise layer of each kept tensor (".../block_2_depthwise_relu_1/Relu6;...")
    layers = {m.group(0) for n in kept if (m := _DEPTHWISE.search(n))}
    assert 1 <= len(layers) <= 6 and "expanded_conv_depthwise" in layers
    # an ensemble holds one network per run: the same layers kept float in each
    members = len(card["recipe"].get("ensemble", {}).get("members", [None]))
    assert len(floats) <= 2 * len(layers) * members
    assert all(any(x in n for x in layers) for n in floats)
    named = {t["name"]: t["dtype"] for t in tensors}
    assert all(named[n] == np.float32 for n in kept if n in named)
    assert shipped_model.stat().st_size < 4_000_000 * members
    assert card["crop"]["size"] == size and card["input"]["color_order"] == "RGB"
    assert r.output_details["shape"][-1] == len(card["labels"])
    assert set(NUCLEATED) | {"platelet"} <= set(card["labels"]) <= set(KNOWN_LABELS)
    assert card["preprocessing"].startswith("mobilenet_v2")
    for key in ("trained_on", "split", "recipe", "evaluation", "date"):
        assert card[key]
    assert card["split"]["val_images"]
    licences = json.dumps(card["trained_on"])
    assert "CC BY 4.0" in licences and "Acevedo" in licences  # PBC's licence asks for credit


def test_card_records_every_figure_the_model_is_judged_by(shipped_model):
    """The card keeps, per source and never pooled, the held-out figures the model is judged by
    (accuracy, macro-F1, calibration error, int8 agreement; BCCD end to end; the same cells
    under another microscope's colours), the cross-microscope figures, the latency and the
    training time: a re-export must carry them, not drop them."""
    card = _card(shipped_model)
    ev = card["evaluation"]
    assert set(ev["sources"]) == {"bccd-trainval", "pbc"}
    for name, src in ev["sources"].items():
        for key in ("accuracy", "macro_f1", "ece"):
            assert 0.0 <= src["crops"][key] <= 1.0, (name, key)
        assert src["float_vs_int8"]["top1_agreement"] > 0.5, name
        rob = src["robustness"]
        assert len(rob) >= 20 and all(0.0 <= v["accuracy"] <= 1.0 for v in rob.values()), name
    assert ev["sources"]["bccd-trainval"]["end_to_end"]["n"] >= 40
    cross = ev["cross_microscope"]
    assert 0.0 < cross["pbc_only_on_bccd"]["end_to_end_accuracy"] < 1.0
    assert 0.0 < cross["bccd_only_on_pbc"]["accuracy_4_white_cell_classes"] < 1.0
    assert 0.0 < ev["latency_ms_per_crop"]["batch1"] <= 3.0
    assert card["recipe"]["train_seconds"] > 0 and card["date"]


def test_cell_classifier_loads_shipped_model(shipped_model):
    clf = CellClassifier(shipped_model)
    card = _card(shipped_model)
    assert list(clf.labels) == card["labels"] and clf.crop_rule.size == card["input"]["size"]


def test_classifies_real_bccd_validation_crops(shipped_model, bccd_dir):
    """Held-out BCCD images (never trained on), cut at their annotated WBC box with the card's
    rule. (The card's end-to-end figure on these 55 is 0.89.)"""
    card = _card(shipped_model)
    rule = CropRule.from_dict(card["crop"])
    val = set(card["split"]["val_images"])
    ds = read_voc(bccd_dir, finder=None).subset(val)
    samples = [s for s in ds.samples if s.label in card["labels"]]
    assert len(samples) >= 40
    crops = np.concatenate([crop_cells(read_image(s.image), np.array([s.box]), rule)
                            for s in samples])
    probs = CellClassifier(shipped_model).classify_crops(crops)
    pred = [card["labels"][i] for i in probs.argmax(1)]
    truth = [s.label for s in samples]
    acc = np.mean([p == t for p, t in zip(pred, truth, strict=True)])
    assert acc >= 0.8, f"accuracy {acc:.3f} on {len(samples)} held-out crops"
    # eosinophil recall is the known weak point on BCCD (see the README); the others are solid
    for label, least in (("neutrophil", 0.85), ("lymphocyte", 0.8), ("eosinophil", 0.4)):
        hits = [p == t for p, t in zip(pred, truth, strict=True) if t == label]
        assert np.mean(hits) >= least, f"{label}: recall {np.mean(hits):.2f}"


def test_names_held_out_pbc_cells_end_to_end(shipped_model):
    """Eight held-out PBC images per class, found and named by the still-image analysis."""
    if not PBC.is_dir():
        pytest.skip(f"PBC images not found at {PBC}")
    val = set(_card(shipped_model)["split"]["val_images"])
    seg, clf = Segmenter(), CellClassifier(shipped_model)
    right: dict[str, int] = {}
    for label in (*NUCLEATED, "platelet"):
        picked = []
        for path in sorted((PBC / label).glob("*.jpg")):
            if content_group(PBC, label, path, path.read_bytes()) in val:
                picked.append(path)
            if len(picked) == 8:
                break
        assert len(picked) == 8, label
        right[label] = 0
        for path in picked:
            cells = analyse_still(read_image(path), seg, clf).detections
            names = list(cells.data["label"])
            if label == "platelet":
                right[label] += all(n not in NUCLEATED for n in names)  # never a white cell
            else:
                right[label] += label in names
    assert sum(right.values()) >= 0.9 * 8 * len(right), right
    assert min(right.values()) >= 6, right
