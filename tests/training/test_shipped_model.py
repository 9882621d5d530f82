"""The shipped default model (models/hematovision.tflite + .json): card vs tensors, real crops."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detector.classify import CellClassifier
from detector.core import CELL_TYPES
from detector.crop import CropRule, crop_cells
from training.data import read_image, read_voc


def test_card_matches_tensors(shipped_model):
    card = json.loads(shipped_model.with_suffix(".json").read_text())
    r = CellClassifier(shipped_model)
    assert r.input_details["dtype"] == np.int8 and r.output_details["dtype"] == np.int8
    size = card["input"]["size"]
    assert list(r.input_details["shape"]) == [1, size, size, 3]
    assert card["crop"]["size"] == size and card["input"]["color_order"] == "RGB"
    assert r.output_details["shape"][-1] == len(card["labels"])
    assert set(card["labels"]) <= set(CELL_TYPES)
    assert card["preprocessing"].startswith("mobilenet_v2")
    # input quantization (x/127.5 - 1) covers all of [-1, 1] within one step of ~2/255: no pixel
    # level clips, also on darker/more saturated stains than BCCD's (which alone reach ~-0.6)
    scale, zero = r.input_details["quantization"]
    assert (-128 - zero) * scale <= -1.0 + scale and (127 - zero) * scale >= 1.0 - scale
    assert scale <= 2.0 / 255.0 * 1.02
    # softmax output: int8 probabilities with scale 1/256, zero point -128
    assert r.output_details["quantization"] == (pytest.approx(1 / 256), -128)
    for key in ("trained_on", "split", "recipe", "evaluation", "date"):
        assert card[key]
    assert card["split"]["val_images"]


def test_cell_classifier_loads_shipped_model(shipped_model):
    clf = CellClassifier(shipped_model)
    card = json.loads(shipped_model.with_suffix(".json").read_text())
    assert list(clf.labels) == card["labels"] and clf.crop_rule.size == card["input"]["size"]


def test_classifies_real_validation_crops(shipped_model, bccd_dir):
    """Held-out BCCD images (never trained on), cut at their GT WBC box with the card's rule."""
    card = json.loads(shipped_model.with_suffix(".json").read_text())
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
    print(f"shipped model on {len(samples)} held-out GT-box crops: accuracy {acc:.3f}")
    assert acc >= 0.78, f"accuracy {acc:.3f} on {len(samples)} held-out crops"
    # eosinophil recall is the known weak point (see the card's notes); the others are solid
    for label, least in (("neutrophil", 0.85), ("lymphocyte", 0.8), ("eosinophil", 0.3)):
        hits = [p == t for p, t in zip(pred, truth, strict=True) if t == label]
        assert np.mean(hits) >= least, f"{label}: recall {np.mean(hits):.2f}"
