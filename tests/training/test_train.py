"""training/train.py: a tiny end-to-end run (weights none, input 32, 1+1 epochs)."""

from __future__ import annotations

import numpy as np
import pytest

from detector.errors import InputError
from training.train import TrainConfig, class_weights, resolve_weights


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
        ["train", "a", "b", "--input-size", "96", "--weights", "none", "--epochs", "3"])
    cfg = TrainConfig.from_args(args)
    assert cfg.data == ["a", "b"] and cfg.input_size == 96 and cfg.weights == "none"
    assert cfg.epochs == 3 and cfg.frozen_epochs == TrainConfig.frozen_epochs


@pytest.mark.train
def test_tiny_training_writes_model_card_and_splits_by_image():
    from tests.training.tiny_data import tiny_training

    t = tiny_training()
    card = t["card"]
    assert t["model"].is_file() and t["model"].with_suffix(".json").is_file()
    assert card["labels"] == ["neutrophil", "lymphocyte"]
    assert card["input"] == {"size": 32, "channels": 3, "dtype": "int8", "color_order": "RGB"}
    assert card["crop"] == {"margin": 0.15, "square": True, "size": 32}
    val = set(card["split"]["val_images"])
    assert len(val) == 2  # one original image per class, both of its Kaggle copies held out
    assert card["trained_on"]["images"] == 8
    assert card["split"]["train_images"] == 12  # the 6 other groups x 2 copies
    assert card["trained_on"]["counts_per_class"] == {"neutrophil": 8, "lymphocyte": 8}
    ev = card["evaluation"]
    assert ev["int8"]["n"] == 4
    assert ev["latency_ms_per_crop"]["batch1"] > 0
    assert (t["run_dir"] / "tiny.float.tflite").is_file()


@pytest.mark.train
def test_calibration_uses_real_training_crops():
    from detector.crop import CropRule
    from tests.training.tiny_data import tiny_training
    from training.data import cut_crops, load_datasets

    t = tiny_training()
    calib = t["calibration"]
    rule = CropRule(size=32)
    ds = load_datasets([t["data"]], rule, finder=None, min_images=2)
    train_ds = ds.subset([g for g in set(ds.groups) if g not in t["card"]["split"]["val_images"]])
    real, _ = cut_crops(train_ds.samples, rule, copies=2, jitter=t["cfg"].jitter,
                        seed=t["cfg"].seed)
    assert len(calib) == len(real) == 24
    # the exporter receives exactly the real training crops (exact + jittered boxes, no held-out
    # image, no noise); it adds photometric variants of these itself
    assert [c.tobytes() for c in calib] == [c.tobytes() for c in real]
