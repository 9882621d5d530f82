"""training/export.py: the int8 file, its tensors, agreement with the float model, the card."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detector.classify import CellClassifier
from training.export import PREPROCESSING


@pytest.mark.train
def test_int8_model_keeps_only_the_named_layer_float(tiny_run):
    from training.export import FLOAT_LAYERS

    t = tiny_run
    r = CellClassifier(t["model"])
    # selective quantization: float in and out (x/127.5 - 1, probabilities), int8 inside
    assert r.card.input_dtype == "float32" and r.input_details["dtype"] == np.float32
    assert list(r.input_details["shape"]) == [1, 32, 32, 3]
    assert r.output_details["shape"][-1] == 2
    tensors = r._interp.get_tensor_details()
    kept = [d for d in tensors if any(f in d["name"] for f in FLOAT_LAYERS)]
    assert kept and all(d["dtype"] == np.float32 for d in kept)
    convs = [d for d in tensors if "project" in d["name"] and d["name"].endswith("sub1")]
    assert len(convs) >= 10 and all(d["dtype"] == np.int8 for d in convs)
    # the graph quantizes its input itself: the first int8 tensor covers all of [-1, 1]
    first = next(d for d in tensors if d["dtype"] == np.int8
                 and list(d["shape"]) == [1, 32, 32, 3])
    scale, zero = first["quantization"]
    assert (-128 - zero) * scale <= -1.0 + scale and (127 - zero) * scale >= 1.0 - scale
    assert scale <= 2.0 / 255.0 * 1.02
    card = json.loads(t["model"].with_suffix(".json").read_text())
    assert card["preprocessing"] == PREPROCESSING and card["format_version"] == 1
    assert card["input"]["dtype"] == "float32"
    # the card names the float tensors: the named layer's, plus any the monitor split asked for
    exported = card["recipe"]["int8_export"]
    assert {d["name"] for d in kept} <= set(exported["float_tensors"])
    floats = {d["name"] for d in tensors if d["dtype"] == np.float32}
    assert set(exported["float_tensors"]) <= floats
    # 2 monitor originals (2 files each), 2 training copies of each file
    assert exported["monitor_crops"] == [2 * 2 * 2]
    assert exported["monitor_agreement_steps"][0]["float_tensors"] == len(kept)
    assert exported["calibration_crops"] == len(t["calibration"]) * 2 + 1
    for key in ("trained_on", "split", "recipe", "evaluation", "date", "min_score"):
        assert key in card


def test_calibration_set_is_real_crops_and_variants_reaching_0_and_255():
    from training.export import calibration_set, photometric_variants

    rng = np.random.default_rng(1)
    # mid-grey "BCCD-like" crops: pixel levels 90..230 only
    crops = rng.integers(90, 231, (40, 8, 8, 3)).astype(np.uint8)
    var = photometric_variants(crops, copies=2, seed=0)
    assert var.shape == (80, 8, 8, 3) and var.dtype == np.uint8
    assert var.min() == 0 and var.max() == 255  # darker/brighter smears than the real crops
    calib = calibration_set(crops, max_samples=60, augmented_copies=1)
    assert len(calib) == 61 and calib.min() == 0 and calib.max() == 255
    real = {c.tobytes() for c in crops}
    n_real = sum(c.tobytes() in real for c in calib)
    assert n_real == 30  # half real crops when capped, the rest variants + one auto-levels copy
    only_real = calibration_set(crops, augmented_copies=0)
    assert len(only_real) == 41 and sum(c.tobytes() in real for c in only_real) == 40
    assert only_real.min() == 0 and only_real.max() == 255


@pytest.mark.train
def test_int8_output_agrees_with_float_model_on_real_crops(tiny_run):
    from detector.crop import CropRule
    from training.data import cut_crops, load_datasets

    t = tiny_run
    ds = load_datasets([t["data"]], CropRule(size=32), finder=None, min_images=2)
    crops, _ = cut_crops(ds.samples, CropRule(size=32))
    p8 = CellClassifier(t["model"]).classify_crops(crops)
    pf = CellClassifier(t["run_dir"] / "tiny.float.tflite").classify_crops(crops)
    assert p8.shape == pf.shape == (16, 2)
    np.testing.assert_allclose(p8.sum(1), 1.0, atol=0.03)
    assert np.abs(p8 - pf).max() < 0.1
    clear = np.abs(pf[:, 0] - pf[:, 1]) > 0.1
    assert np.all(p8[clear].argmax(1) == pf[clear].argmax(1))


@pytest.mark.train
def test_float_export_has_its_own_card(tiny_run):
    t = tiny_run
    clf = CellClassifier(t["run_dir"] / "tiny.float.tflite")
    assert clf.card.input_dtype == "float32" and clf.input_details["dtype"] == np.float32
    assert clf.labels == ("neutrophil", "lymphocyte")
    int8_card = json.loads(t["model"].with_suffix(".json").read_text())
    float_card = json.loads((t["run_dir"] / "tiny.float.json").read_text())
    assert "not for shipping" in float_card["note"]
    for key in ("labels", "crop", "preprocessing", "min_score", "split", "evaluation"):
        assert float_card[key] == int8_card[key]
    probs = clf.classify_crops(np.zeros((3, 32, 32, 3), np.uint8))
    assert probs.shape == (3, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_card_built_by_export_is_the_one_the_runtime_reads(tmp_path):
    from detector.classify import ModelCard
    from detector.crop import CropRule
    from training.export import build_card, float_card, write_card

    card = build_card("m", ("neutrophil", "platelet"), CropRule(margin=0.2, size=48), 0.4,
                      trained_on={"datasets": ["pbc"]}, recipe={"temperature": 1.3},
                      evaluation={"n": np.int64(3)})
    path = write_card(tmp_path / "m.tflite", card)
    assert path == tmp_path / "m.json"
    back = ModelCard.load(path)
    assert back.labels == ("neutrophil", "platelet") and back.crop == CropRule(0.2, True, 48)
    assert back.input_size == 48 and back.min_score == 0.4 and back.input_dtype == "int8"
    assert back.recipe == {"temperature": 1.3} and back.evaluation == {"n": 3}
    assert back.date == card.date and len(back.date) == 10
    fc = float_card(card)
    assert fc.input_dtype == "float32" and fc.name == "m.float" and "not for shipping" in fc.note
    assert "note" not in card.to_dict() and fc.to_dict()["note"] == fc.note


def test_float_layers_added_worst_first_until_the_monitor_agreement_is_reached():
    from training.export import choose_float_layers

    # a fake quantizer: each float layer is worth a known agreement gain
    gain = {"a": 0.05, "b": 0.004, "c": 0.003, "d": 0.001}
    calls = []

    def quantize(names):
        calls.append(tuple(names))
        return tuple(names)

    def agreement(model):
        return 0.94 + sum(gain[n] for n in model if n in gain)

    kept, model, steps = choose_float_layers(quantize, agreement, ["a", "b", "c", "d"],
                                             start=["first"], target=0.99)
    assert kept == ["first", "a"] and model == ("first", "a")  # 0.99 reached with one more
    assert [n for n, _ in steps] == [1, 2] and calls == [("first",), ("first", "a")]
    # never reached: the best set seen, within max_float
    kept, _, steps = choose_float_layers(quantize, agreement, ["d", "c", "b", "a"], start=[],
                                         target=0.999, max_float=3)
    assert kept == ["d", "c", "b"] and [n for n, _ in steps] == [0, 1, 2, 3]
    # a layer that makes it worse is not chosen when nothing better follows
    kept, _, _ = choose_float_layers(quantize, lambda m: 0.9 - 0.01 * len(m), ["a"],
                                     target=0.99)
    assert kept == []


@pytest.mark.train
def test_export_leaves_nothing_in_the_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    import keras

    from training.export import export_models

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    inp = keras.Input((8, 8, 3))
    out = keras.layers.Softmax()(keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(inp)))
    crops = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    done = export_models(keras.Model(inp, out), crops, tmp_path / "q.tflite",
                         tmp_path / "f.tflite", max_samples=10)
    assert (tmp_path / "q.tflite").stat().st_size > 100 and (tmp_path / "f.tflite").is_file()
    assert done["float_tensors"] == [] and done["calibration_crops"] == 11
    # no SavedModel, no model file left; TensorFlow's own autograph modules (written the first
    # time a process traces a function, removed when it exits) are not the export's
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("__autograph_generated")]
    assert left == []
