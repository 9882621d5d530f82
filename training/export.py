"""Full-integer int8 TFLite export, a small TFLite runner, latency measurement and the model card.

The int8 model takes RGB crops scaled to [-1, 1] (x/127.5 - 1) and quantized with the input
tensor's scale/zero point, and outputs int8 softmax probabilities. Calibration uses REAL training
crops preprocessed exactly as at run time, never random noise.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from detector.crop import CropRule
from detector.errors import ModelError
from training.data import preprocess

log = logging.getLogger(__name__)

PREPROCESSING = (
    "mobilenet_v2: RGB float scaled to [-1, 1] (x/127.5 - 1), then quantized with the input "
    "tensor's scale/zero point"
)


def _converter(model: Any) -> Any:
    """A TFLiteConverter for a Keras 3 model (via a SavedModel export, the robust route)."""
    import tensorflow as tf

    tmp = tempfile.mkdtemp(prefix="hv_export_")
    model.export(tmp, format="tf_saved_model", verbose=False)
    return tf.lite.TFLiteConverter.from_saved_model(tmp)


def export_int8(
    model: Any, calibration: np.ndarray, out: str | Path, max_samples: int = 300
) -> Path:
    """Write a full-integer int8 .tflite (int8 in, int8 out) calibrated on real crops.

    Args:
        model: Keras model taking float RGB in [-1, 1].
        calibration: (N, S, S, 3) uint8 BGR crops cut by the crop rule from training images.
        out: destination path.
    """
    import tensorflow as tf

    if calibration.ndim != 4 or calibration.dtype != np.uint8 or not len(calibration):
        raise ValueError(f"calibration must be (N,S,S,3) uint8 crops, got {calibration.shape}")
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(calibration))[:max_samples]
    calib = preprocess(calibration[idx])

    def representative():
        for x in calib:
            yield [x[None].astype(np.float32)]

    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    data = conv.convert()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    log.info("wrote int8 model %s (%.1f kB, calibrated on %d real crops)", out, len(data) / 1e3,
             len(calib))
    return out


def export_float(model: Any, out: str | Path) -> Path:
    """Write a float32 .tflite of the same Keras model (for float-vs-int8 comparisons)."""
    data = _converter(model).convert()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - fallbacks as in DESIGN.md
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            import tensorflow as tf

            Interpreter = tf.lite.Interpreter  # noqa: N806
    return Interpreter


class TFLiteRunner:
    """Minimal .tflite runner (int8/uint8 or float input) on BGR uint8 crops -> probabilities.

    Same contract as detector.classify.CellClassifier.classify_crops; used by training code so the
    exported file itself is what gets measured.
    """

    def __init__(self, path: str | Path, num_threads: int = 1) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: model file not found")
        self._interp = _interpreter_class()(model_path=str(self.path), num_threads=num_threads)
        self._interp.allocate_tensors()
        self._in = self._interp.get_input_details()[0]
        self._out = self._interp.get_output_details()[0]
        self.size = int(self._in["shape"][1])
        self.num_classes = int(self._out["shape"][-1])
        self._batch = 1

    @property
    def input_details(self) -> dict:
        return self._in

    @property
    def output_details(self) -> dict:
        return self._out

    def _resize(self, n: int) -> None:
        if n != self._batch:
            self._interp.resize_tensor_input(self._in["index"], [n, self.size, self.size, 3])
            self._interp.allocate_tensors()
            self._in = self._interp.get_input_details()[0]
            self._out = self._interp.get_output_details()[0]
            self._batch = n

    def quantize_input(self, crops_bgr: np.ndarray) -> np.ndarray:
        x = preprocess(crops_bgr)
        dtype = self._in["dtype"]
        if dtype in (np.int8, np.uint8):
            scale, zero = self._in["quantization"]
            info = np.iinfo(dtype)
            return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
        return x.astype(dtype)

    def invoke_raw(self, x: np.ndarray) -> np.ndarray:
        self._resize(len(x))
        self._interp.set_tensor(self._in["index"], x)
        self._interp.invoke()
        return self._interp.get_tensor(self._out["index"]).copy()

    def classify_crops(self, crops_bgr: np.ndarray, batch: int = 32) -> np.ndarray:
        """(N, S, S, 3) BGR uint8 -> (N, C) float32 probabilities."""
        outs = []
        for i in range(0, len(crops_bgr), batch):
            y = self.invoke_raw(self.quantize_input(crops_bgr[i : i + batch]))
            if self._out["dtype"] in (np.int8, np.uint8):
                scale, zero = self._out["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            outs.append(y.astype(np.float32))
        if not outs:
            return np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(outs)


def measure_latency(path: str | Path, batch: int = 1, threads: int = 1, runs: int = 50) -> float:
    """Median milliseconds per crop of invoking ``path`` with ``batch`` crops on ``threads``."""
    r = TFLiteRunner(path, num_threads=threads)
    r._resize(batch)
    rng = np.random.default_rng(0)
    dtype = r.input_details["dtype"]
    if dtype in (np.int8, np.uint8):
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, (batch, r.size, r.size, 3)).astype(dtype)
    else:
        x = rng.uniform(-1, 1, (batch, r.size, r.size, 3)).astype(dtype)
    for _ in range(5):
        r.invoke_raw(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r.invoke_raw(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0 / batch)


def build_card(
    name: str,
    labels: tuple[str, ...] | list[str],
    rule: CropRule,
    min_score: float,
    trained_on: dict,
    split: dict,
    recipe: dict,
    evaluation: dict,
) -> dict:
    """The model card (schema in COMMON.md)."""
    return {
        "name": name,
        "format_version": 1,
        "labels": list(labels),
        "input": {"size": rule.size, "channels": 3, "dtype": "int8", "color_order": "RGB"},
        "preprocessing": PREPROCESSING,
        "outputs": "probabilities",
        "crop": rule.to_dict(),
        "min_score": float(min_score),
        "trained_on": trained_on,
        "split": split,
        "recipe": recipe,
        "evaluation": evaluation,
        "date": _dt.date.today().isoformat(),
    }


def write_card(tflite_path: str | Path, card: dict) -> Path:
    """Write ``NAME.json`` beside ``NAME.tflite``."""
    path = Path(tflite_path).with_suffix(".json")
    path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return path
