"""training/export.py: the int8 file, its tensors, agreement with the float model, the card."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.export import PREPROCESSING, TFLiteRunner


@pytest.mark.train
def test_int8_model_tensors_and_card():
    from tests.training.tiny_data import tiny_training

    t = tiny_training()
    r = TFLiteRunner(t["model"])
    assert r.input_details["dtype"] == np.int8 and r.output_details["dtype"] == np.int8
    assert list(r.input_details["shape"]) == [1, 32, 32, 3]
    assert r.output_details["shape"][-1] == 2
    scale, zero = r.input_details["quantization"]
    # input contract: x/127.5 - 1 quantized with the tensor's scale/zero point; the calibrated
    # range covers the real crops and stays inside [-1, 1]
    lo, hi = (-128 - zero) * scale, (127 - zero) * scale
    from training.data import preprocess

    x = preprocess(t["calibration"])
    assert -1.01 <= lo <= x.min() + 0.01 and x.max() - 0.01 <= hi <= 1.01
    card = json.loads(t["model"].with_suffix(".json").read_text())
    assert card["preprocessing"] == PREPROCESSING and card["format_version"] == 1
    for key in ("trained_on", "split", "recipe", "evaluation", "date", "min_score"):
        assert key in card


@pytest.mark.train
def test_int8_output_agrees_with_float_model_on_real_crops():
    from detector.crop import CropRule
    from tests.training.tiny_data import tiny_training
    from training.data import cut_crops, load_datasets

    t = tiny_training()
    ds = load_datasets([t["data"]], CropRule(size=32), finder=None, min_images=2)
    crops, _ = cut_crops(ds.samples, CropRule(size=32))
    p8 = TFLiteRunner(t["model"]).classify_crops(crops)
    pf = TFLiteRunner(t["run_dir"] / "tiny.float.tflite").classify_crops(crops)
    assert p8.shape == pf.shape == (16, 2)
    np.testing.assert_allclose(p8.sum(1), 1.0, atol=0.03)
    assert np.abs(p8 - pf).max() < 0.1
    clear = np.abs(pf[:, 0] - pf[:, 1]) > 0.1
    assert np.all(p8[clear].argmax(1) == pf[clear].argmax(1))


@pytest.mark.train
def test_cell_classifier_loads_the_exported_model():
    classify = pytest.importorskip("detector.classify")
    from tests.training.tiny_data import tiny_training

    t = tiny_training()
    clf = classify.CellClassifier(t["model"])
    assert tuple(clf.labels) == ("neutrophil", "lymphocyte")
    crops = np.zeros((3, 32, 32, 3), np.uint8)
    probs = clf.classify_crops(crops)
    np.testing.assert_allclose(probs, TFLiteRunner(t["model"]).classify_crops(crops), atol=1e-6)
