"""Tiny real .tflite classifiers with predictable answers, for tests without the shipped model.

Every model takes an RGB crop scaled to [-1, 1] (MobileNetV2 preprocessing), averages it per
channel and scores three classes with fixed weights:

* ``TINY_LABELS[0]`` ("eosinophil") wins when the crop is redder than it is blue,
* ``TINY_LABELS[1]`` ("lymphocyte") wins when it is bluer than red,
* ``TINY_LABELS[2]`` ("neutrophil") has a constant logit 0, so a grey crop (red == blue) scores
  1/3 for each class -> below a 0.5 ``min_score`` -> "unidentified".

A pure red crop gives logits (8, -8, 0) -> p(eosinophil) ~ 0.9997. Because the model sees RGB, a
runtime that forgot to turn OpenCV's BGR into RGB names red crops "lymphocyte".

Variants: ``int8`` (full-integer, int8 in/out), ``uint8`` (uint8 in/out), ``float32``, and
``logits`` (int8, no softmax; its card says ``"outputs": "logits"``). Plus two deliberately odd
models for error tests: ``gray`` (1-channel float input) and ``int32in`` (int32 input tensor).

The models are committed in ``tests/data/tiny_models/`` (about 30 KB in all), so inference tests
run without TensorFlow (as on a Raspberry Pi). They are made by this module with TensorFlow:
``python -m tests.tiny_models`` rewrites them (about 10-20 s on 2 cores); a ``train`` test checks
that a rebuild gives the committed models' answers. Tests use the ``tiny_models`` fixture
(offered by ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

log = logging.getLogger(__name__)

#: Where the committed tiny models live.
TINY_DIR = Path(__file__).resolve().parent / "data" / "tiny_models"
TINY_SIZE = 32
TINY_LABELS = ("eosinophil", "lymphocyte", "neutrophil")
VARIANTS = ("int8", "uint8", "float32", "logits")

#: BGR colours of synthetic crops and the label the tiny models give them.
RED_BGR = (0, 0, 255)
BLUE_BGR = (255, 0, 0)
GREY_BGR = (128, 128, 128)

def card_for(name: str, *, dtype: str, size: int = TINY_SIZE, channels: int = 3,
             labels: tuple[str, ...] = TINY_LABELS, outputs: str = "probabilities",
             min_score: float = 0.5) -> dict:
    """A model card matching one of the tiny models (edit the dict to make a wrong one)."""
    return {
        "name": name,
        "format_version": 1,
        "labels": list(labels),
        "input": {"size": size, "channels": channels, "dtype": dtype, "color_order": "RGB"},
        "preprocessing": "mobilenet_v2: RGB float scaled to [-1, 1] (x/127.5 - 1), then "
                         "quantized with the input tensor's scale/zero point",
        "outputs": outputs,
        "crop": {"margin": 0.15, "square": True, "size": size},
        "min_score": min_score,
        "trained_on": {"note": "fixed weights, not trained: red vs blue"},
        "split": {},
        "recipe": {},
        "evaluation": {},
        "date": "2026-01-01",
    }


def write_model(dirpath: Path, name: str, tflite_bytes: bytes, card: dict | None) -> Path:
    """Write NAME.tflite (+ NAME.json when ``card`` is given) into ``dirpath``; return .tflite."""
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / f"{name}.tflite"
    path.write_bytes(tflite_bytes)
    if card is not None:
        (dirpath / f"{name}.json").write_text(json.dumps(card, indent=2))
    return path


def solid_crops(colours_bgr: list[tuple[int, int, int]], size: int = TINY_SIZE) -> np.ndarray:
    """(N, size, size, 3) uint8 BGR crops, each filled with one colour."""
    out = np.empty((len(colours_bgr), size, size, 3), dtype=np.uint8)
    for i, c in enumerate(colours_bgr):
        out[i] = c
    return out


def _representative(size: int, channels: int = 3):
    """Calibration inputs covering the colours the tests use (never random noise)."""
    rng = np.random.default_rng(0)
    colours = [RED_BGR, BLUE_BGR, GREY_BGR, (0, 0, 0), (255, 255, 255), (40, 200, 120),
               (200, 60, 180), (90, 90, 230), (230, 90, 90)]

    def gen():
        for c in colours * 3:
            rgb = np.array(c[::-1], dtype=np.float32)
            img = np.broadcast_to(rgb, (size, size, 3)).copy()
            img += rng.normal(0, 8, img.shape).astype(np.float32)
            img = np.clip(img, 0, 255) / 127.5 - 1.0
            if channels == 1:
                img = img.mean(axis=2, keepdims=True)
            yield [img[None].astype(np.float32)]

    return gen


def _keras_model(size: int, *, softmax: bool, channels: int = 3, int_input: bool = False):
    import keras

    inp = keras.Input((size, size, channels), dtype="int32" if int_input else "float32")
    x = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32"))(inp) if int_input else inp
    conv = keras.layers.Conv2D(channels, 1, use_bias=False)
    x = conv(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(3)
    x = dense(x)
    if softmax:
        x = keras.layers.Softmax()(x)
    model = keras.Model(inp, x)
    conv.set_weights([np.eye(channels, dtype=np.float32).reshape(1, 1, channels, channels)])
    k = 4.0
    w = np.zeros((channels, 3), dtype=np.float32)
    if channels == 3:
        w[:, 0] = [k, 0.0, -k]  # red - blue
        w[:, 1] = [-k, 0.0, k]  # blue - red
    dense.set_weights([w, np.zeros(3, dtype=np.float32)])
    return model


def _convert(model, *, quant: str | None, size: int, channels: int = 3) -> bytes:
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if quant is not None:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = _representative(size, channels)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io = {"int8": tf.int8, "uint8": tf.uint8}[quant]
        conv.inference_input_type = io
        conv.inference_output_type = io
    with warnings.catch_warnings():  # "Statistics for quantized inputs were expected": harmless
        warnings.simplefilter("ignore", UserWarning)
        return conv.convert()


def build_tiny_models(out_dir: Path, names: tuple[str, ...] | None = None) -> Path:
    """Convert and write the tiny models (each with its card) into ``out_dir``: all of them, or
    only ``names``; return ``out_dir``."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    s = TINY_SIZE
    recipes = {  # name: (keras model arguments, quantization, card arguments)
        "int8": ({"softmax": True}, "int8", {"dtype": "int8"}),
        "uint8": ({"softmax": True}, "uint8", {"dtype": "uint8"}),
        "float32": ({"softmax": True}, None, {"dtype": "float32"}),
        "logits": ({"softmax": False}, "int8", {"dtype": "int8", "outputs": "logits"}),
        "gray": ({"softmax": True, "channels": 1}, None, {"dtype": "float32", "channels": 1}),
        "int32in": ({"softmax": True, "int_input": True}, None, {"dtype": "float32"}),
    }
    for name in names or tuple(recipes):
        model_kw, quant, card_kw = recipes[name]
        model = _keras_model(s, **model_kw)
        tflite = _convert(model, quant=quant, size=s, channels=model_kw.get("channels", 3))
        write_model(out_dir, name, tflite, card_for(name, **card_kw))
    return out_dir


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """The committed folder with ``int8.tflite``, ``uint8.tflite``, ``float32.tflite``,
    ``logits.tflite``, ``gray.tflite`` and ``int32in.tflite`` and their cards (read only: copy a
    model to change it). ``tests/conftest.py`` offers it to every test."""
    names = (*VARIANTS, "gray", "int32in")
    missing = [v for v in names if not (TINY_DIR / f"{v}.tflite").is_file()]
    assert not missing, f"tiny models {missing} missing in {TINY_DIR}: python -m tests.tiny_models"
    return TINY_DIR


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else TINY_DIR
    build_tiny_models(out)
    for path in sorted(out.glob("*.tflite")):
        log.info("%s: %d bytes", path, path.stat().st_size)
