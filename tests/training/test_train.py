"""training/train.py: paths, arguments, calibration maths, augmentation, a tiny end-to-end run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detector.errors import InputError
from training.train import (
    DEFAULT_AUGMENT,
    TrainConfig,
    class_weights,
    expected_calibration_error,
    fit_temperature,
    resolve_weights,
)


def test_class_weights_balance_the_classes():
    w = class_weights(np.array([0, 0, 0, 1]), 2)
    assert w == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0)}


def test_resolve_weights(tmp_path):
    assert resolve_weights("none") is None
    assert resolve_weights("imagenet") == "imagenet"
    with pytest.raises(InputError, match="weights file not found"):
        resolve_weights(str(tmp_path / "missing.weights.h5"))
    bad = tmp_path / "w.h5"
    bad.write_bytes(b"x")
    with pytest.raises(InputError, match=".weights.h5"):
        resolve_weights(str(bad))


def test_config_from_cli_args():
    from stream.cli import build_parser

    args = build_parser().parse_args(
        ["train", "a", "b", "--input-size", "96", "--weights", "none", "--epochs", "3",
         "--voc-copies", "2"])
    cfg = TrainConfig.from_args(args)
    assert cfg.data == ["a", "b"] and cfg.input_size == 96 and cfg.weights == "none"
    assert cfg.epochs == 3 and cfg.voc_copies == 2
    assert cfg.frozen_epochs == TrainConfig.frozen_epochs and cfg.out is None


@pytest.mark.parametrize("option", ["--epochs", "--frozen-epochs", "--seed", "--copies",
                                     "--voc-copies", "--batch-size", "--min-images"])
def test_impossible_numbers_are_refused_by_the_parser(option, capsys):
    from stream.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["train", "a", option, "-1"])
    assert exc.value.code == 2
    assert "expected a number >=" in capsys.readouterr().err


def test_default_output_is_a_new_run_folder_never_the_shipped_model():
    run_dir, out = TrainConfig(data=["x"]).resolve_paths()
    assert run_dir.parent == Path("runs") and run_dir.name.startswith("hv-")
    assert out == run_dir / "hematovision.tflite"
    assert "models" not in out.parts
    run_dir, out = TrainConfig(data=["x"], run_dir="runs/a").resolve_paths()
    assert out == Path("runs/a/hematovision.tflite")
    # only an explicit --out names the shipped model
    run_dir, out = TrainConfig(data=["x"], out="models/hematovision.tflite").resolve_paths()
    assert out == Path("models/hematovision.tflite") and run_dir == Path("runs/hematovision")
    with pytest.raises(InputError, match="must end in .tflite"):
        TrainConfig(data=["x"], out="m.h5").resolve_paths()


def test_failed_imagenet_download_is_one_line(monkeypatch):
    keras = pytest.importorskip("keras")
    from training.train import _mobilenet

    def offline(**kw):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- "
                        "[Errno -3] Temporary failure in name resolution\nmore\nlines")

    monkeypatch.setattr(keras.applications, "MobileNetV2", offline)
    with pytest.raises(InputError) as exc:
        _mobilenet(32, "imagenet")
    msg = str(exc.value)
    assert "downloading the ImageNet weights failed" in msg and "--weights PATH" in msg
    assert "\n" not in msg and exc.value.__cause__ is None


def test_temperature_recovers_a_known_one():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 5))
    p = np.exp(logits / 2.0)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p])
    assert fit_temperature(logits, y) == pytest.approx(2.0, rel=0.08)


def test_expected_calibration_error_hand_checked():
    y = np.array([0, 0, 1, 1])
    # confidences 0.9 (bin 0.867-0.933) twice, one right: |0.5 - 0.9| = 0.4 on half the cells;
    # 0.6 twice, both right: |1 - 0.6| = 0.4 on the other half
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.4, 0.6], [0.4, 0.6]])
    assert expected_calibration_error(y, probs) == pytest.approx(0.4)
    perfect = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert expected_calibration_error(y, perfect) == pytest.approx(0.0)


def test_augmentation_neutral_settings_give_the_image_back_and_defaults_change_it():
    tf = pytest.importorskip("tensorflow")
    from training.train import augment_image

    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0.05, 1.0, (16, 16, 3)).astype(np.float32))
    neutral = {**DEFAULT_AUGMENT, "stain_hed_scale": 0.0, "stain_hed_shift": 0.0,
               "white_balance_gain": 0.0, "gamma": [1.0, 1.0], "brightness": 0.0,
               "contrast": [1.0, 1.0001], "saturation": [1.0, 1.0001], "hue": 0.0, "blur_p": 0.0,
               "noise_sd": 0.0, "jpeg_p": 0.0}
    # the stain round trip (optical density -> H/E/DAB -> back) is exact
    np.testing.assert_allclose(augment_image(x, neutral).numpy(), x.numpy(), atol=2e-3)
    tf.random.set_seed(1)
    outs = [augment_image(x, DEFAULT_AUGMENT).numpy() for _ in range(4)]
    for out in outs:
        assert out.shape == (16, 16, 3) and out.min() >= 0.0 and out.max() <= 1.0
        assert np.abs(out - x.numpy()).mean() > 0.01
    assert np.abs(outs[0] - outs[1]).mean() > 0.01  # a new draw each time


@pytest.mark.train
def test_tiny_training_writes_model_card_and_splits_by_image(tiny_run):
    t = tiny_run
    card = t["card"]
    assert t["model"].is_file() and t["model"].with_suffix(".json").is_file()
    assert card["labels"] == ["neutrophil", "lymphocyte"]
    # int8 inside, the first depthwise layer float: float input, quantized in the graph
    assert card["input"] == {"size": 32, "channels": 3, "dtype": "float32",
                             "color_order": "RGB"}
    assert card["crop"] == {"margin": 0.15, "square": True, "size": 32}
    val = set(card["split"]["val_images"])
    assert len(val) == 2  # one original image per class, both of its Kaggle copies held out
    assert card["trained_on"]["images"] == 8
    # the 6 other originals (groups): 2 pick the epoch, the float layers and the temperature
    assert len(card["split"]["monitor_images"]) == 2
    assert not set(card["split"]["monitor_images"]) & val
    assert card["split"]["train_images"] == 4
    assert card["recipe"]["train_crops"] == 16  # 8 files x 2 copies
    assert card["trained_on"]["counts_per_class"] == {"neutrophil": 8, "lymphocyte": 8}
    src = card["evaluation"]["sources"]["cells"]
    assert src["kind"] == "class_folders" and src["crops"]["n"] == 4
    assert src["float_vs_int8"]["max_abs_prob_diff"] < 0.1
    # the same held-out cells under another microscope's colours, in every card
    from training.evaluate import NAMING_PERTURBATIONS

    assert list(src["robustness"]) == list(NAMING_PERTURBATIONS)
    assert "another microscope" in card["evaluation"]["robustness_note"]
    assert (t["run_dir"] / "tiny.float.tflite").is_file()
    assert (t["run_dir"] / "history.json").is_file()


@pytest.mark.train
def test_calibration_uses_real_training_crops(tiny_run):
    from detector.crop import CropRule
    from training.data import cut_crops, load_datasets

    t = tiny_run
    calib = t["calibration"]
    rule = CropRule(size=32)
    ds = load_datasets([t["data"]], rule, finder=None, min_images=2)
    split = t["card"]["split"]
    not_train = set(split["val_images"]) | set(split["monitor_images"])
    train_ds = ds.subset([g for g in set(ds.groups) if g not in not_train])
    real, _ = cut_crops(train_ds.samples, rule, copies=2, jitter=t["cfg"].jitter,
                        seed=t["cfg"].seed)
    assert len(calib) == len(real) == 16
    # the exporter receives exactly the real training crops (exact + jittered boxes, no held-out
    # or monitor image, no noise); it adds photometric variants of these itself
    assert [c.tobytes() for c in calib] == [c.tobytes() for c in real]


@pytest.mark.train
def test_runs_of_one_split_export_as_one_averaging_model(tiny_run, tmp_path):
    """Several runs of the same split become one file whose probabilities are the mean of the
    members' (here one run twice: the mean is the run's own); runs of another split are
    refused."""
    import json
    import shutil

    from detector.classify import CellClassifier
    from detector.errors import InputError
    from training.train import reexport

    t = tiny_run
    out = tmp_path / "ens" / "ens.tflite"
    out.parent.mkdir()
    # the card of the file being replaced (a model of the same split) holds figures of the
    # recipe measured by their own commands: kept; figures of the file: measured again
    before = {**t["card"], "evaluation": {**t["card"]["evaluation"],
                                          "cross_microscope": {"a_on_b": 0.5}},
              "recipe": {**t["card"]["recipe"], "input_size_comparison": {"160": 0.9}}}
    out.with_suffix(".json").write_text(json.dumps(before))
    card = reexport([t["run_dir"], t["run_dir"]], out)
    assert card["evaluation"]["cross_microscope"] == {"a_on_b": 0.5}
    assert card["recipe"]["input_size_comparison"] == {"160": 0.9}
    assert "robustness" in card["evaluation"]["sources"]["cells"]
    assert card["recipe"]["ensemble"]["members"] == ["run", "run"]
    assert out.is_file() and (out.parent / "ens.float.tflite").is_file()
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    one = CellClassifier(t["model"], num_threads=1).classify_crops(crops)
    ens = CellClassifier(out, num_threads=1).classify_crops(crops)
    assert ens.shape == one.shape and np.abs(ens - one).max() < 0.1  # int8 of the same mean

    other = tmp_path / "other"
    shutil.copytree(t["run_dir"], other)
    cfg = json.loads((other / "config.json").read_text())
    model_card = json.loads(Path(cfg["out"]).with_suffix(".json").read_text())
    model_card["split"]["val_images"] = model_card["split"]["val_images"][:1]
    cfg["out"] = str(other / "hematovision.tflite")
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "hematovision.json").write_text(json.dumps(model_card))
    with pytest.raises(InputError, match="same split"):
        reexport([t["run_dir"], other], tmp_path / "bad.tflite")
    # over a card of another split, or of another recipe, nothing is kept: its figures are
    # another model's
    other_out = tmp_path / "over" / "ens.tflite"
    other_out.parent.mkdir()
    other_out.with_suffix(".json").write_text(json.dumps(
        {**before, "split": {**before["split"], "val_images": before["split"]["val_images"][:1]}}))
    assert "cross_microscope" not in reexport([t["run_dir"]], other_out)["evaluation"]
    other_out.with_suffix(".json").write_text(json.dumps(
        {**before, "recipe": {**before["recipe"], "augmentation": {"flips": "none"}}}))
    assert "cross_microscope" not in reexport([t["run_dir"]], other_out)["evaluation"]
