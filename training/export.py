"""The int8 TFLite export, its float reference, latency and the model cards.

The int8 model takes RGB crops scaled to [-1, 1] (x/127.5 - 1) as float and quantizes them inside
the graph; it runs int8 but for the few layers kept float, and outputs float probabilities.
Calibration uses REAL training crops preprocessed exactly as at run time plus photometric variants
of the same crops (other stains/microscopes), never random noise; one auto-levels copy of a real
crop makes the input range [-1, 1] (step 2/255), so no pixel level clips. Which layers stay float
is chosen on the monitor split: the worst-quantized ones, until the int8 file names the monitor
crops as the float one does.

Both exports get a card beside them (``NAME.json``, ``NAME.float.json``), built as the run time's
own :class:`detector.classify.ModelCard`, so the run-time ``CellClassifier`` loads either: every
figure training and evaluation publish comes from the code users run. The SavedModel the converters
read lives in a temporary folder removed as soon as the export ends.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from detector.classify import ModelCard
from detector.crop import CropRule
from training.data import preprocess

log = logging.getLogger(__name__)

#: Layers kept float inside the int8 model. MobileNetV2's first depthwise convolution has channels
#: whose ranges differ by orders of magnitude after batch-norm folding; quantized per tensor its
#: output error is over one step on average (quantization debugger, BCCD crops), and it loses
#: the eosinophil's colour cue: on the BCCD held-out crops top-1 agreement with the float model
#: rose from 0.927 to 0.982 when this one layer ran in float, at the same latency (~0.7 ms).
FLOAT_LAYERS: tuple[str, ...] = ("expanded_conv_depthwise_relu",)

PREPROCESSING = (
    "mobilenet_v2: RGB float scaled to [-1, 1] (x/127.5 - 1), then quantized with the input "
    "tensor's scale/zero point"
)


@contextmanager
def saved_model(model: Any) -> Iterator[str]:
    """The Keras model as a SavedModel in a temporary folder, removed when the block ends.

    The converters read this (the robust route for Keras 3); written once per export, the float
    and the int8 files both come from it.
    """
    with tempfile.TemporaryDirectory(prefix="hv_export_") as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        yield tmp


def convert_float(saved: str) -> bytes:
    """Float32 TFLite bytes of a SavedModel (the reference the int8 file is compared with)."""
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_saved_model(saved).convert()


def tensor_names(data: bytes) -> list[str]:
    """The tensor names of a TFLite model (the same in its float and int8 conversions)."""
    from detector.classify import _interpreter_class

    cls, _ = _interpreter_class()
    return [t["name"] for t in cls(model_content=data).get_tensor_details()]


class Quantizer:
    """Calibrate once, quantize many: int8 TFLite bytes of a SavedModel with chosen layers float.

    Calibration (the representative crops run through the float graph to fix every tensor's
    range) is the slow part of a conversion; quantizing the calibrated model takes a fraction of
    a second, so several sets of float layers can be tried on one calibration. Built on
    TensorFlow's quantization debugger (denylisted nodes), which also measures each layer's own
    quantization error. The file takes float input (x/127.5 - 1) and gives float probabilities,
    quantizing inside the graph; its first int8 tensor covers [-1, 1] (see
    :func:`calibration_set`).
    """

    def __init__(self, saved: str, calibration: np.ndarray, max_samples: int = 1200,
                 augmented_copies: int = 1, debug_samples: int = 32) -> None:
        """``calibration``: (N, S, S, 3) uint8 BGR crops cut by the crop rule from training
        images; ``debug_samples`` of the calibration crops measure the per-layer errors."""
        import tensorflow as tf

        if calibration.ndim != 4 or calibration.dtype != np.uint8 or not len(calibration):
            raise ValueError(f"calibration must be (N,S,S,3) uint8 crops, got {calibration.shape}")
        calib = preprocess(calibration_set(calibration, max_samples, augmented_copies))
        self.n_calibration, self.n_real = len(calib), len(calibration)
        debug = calib[:: max(len(calib) // debug_samples, 1)][:debug_samples]

        def representative() -> Iterator[list[np.ndarray]]:
            for x in calib:
                yield [x[None].astype(np.float32)]

        conv = tf.lite.TFLiteConverter.from_saved_model(saved)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                          tf.lite.OpsSet.TFLITE_BUILTINS]
        self._tf = tf
        self._debugger = tf.lite.experimental.QuantizationDebugger(
            converter=conv, debug_dataset=lambda: ([x[None].astype(np.float32)] for x in debug))

    def quantize(self, float_tensors: Sequence[str] = ()) -> bytes:
        """The int8 model with the layers whose output tensors are named here kept float."""
        opts = self._tf.lite.experimental.QuantizationDebugOptions
        self._debugger.options = opts(denylisted_nodes=list(float_tensors) or None)
        return self._debugger.get_nondebug_quantized_model()

    def layer_errors(self) -> list[tuple[str, float]]:
        """(output tensor name, error) of every quantized layer, worst first.

        The error is the root-mean-square difference between the layer's int8 output and its
        float output on the same input, in quantization steps (TensorFlow's "rmse/scale"): a
        layer near or above one step loses information its neighbours do not.
        """
        import csv
        import io

        self._debugger.options = self._tf.lite.experimental.QuantizationDebugOptions()
        self._debugger.run()
        buf = io.StringIO()
        self._debugger.layer_statistics_dump(buf)
        buf.seek(0)
        rows = [r for r in csv.DictReader(buf) if float(r["scale"]) > 0]
        errors = [(r["tensor_name"], float(np.sqrt(float(r["mean_squared_error"]))
                                           / float(r["scale"]))) for r in rows]
        return sorted(errors, key=lambda e: -e[1])


def float_layer_tensors(names: Sequence[str], layers: Sequence[str]) -> list[str]:
    """The tensor names (of :func:`tensor_names`) that belong to layers named like ``layers``."""
    return [n for n in names if any(f in n for f in layers)]


def top1_agreement(a: bytes, b: bytes, x: np.ndarray, batch: int = 32) -> float:
    """Share of the preprocessed inputs ``x`` on which two float-input TFLite models agree."""
    pa, pb = _predict(a, x, batch), _predict(b, x, batch)
    return float(np.mean(pa.argmax(1) == pb.argmax(1))) if len(x) else 1.0


def _predict(data: bytes, x: np.ndarray, batch: int) -> np.ndarray:
    """Probabilities of a candidate model still in memory (no file, no card yet: the run-time
    ``CellClassifier`` reads files) on preprocessed float inputs, ``batch`` at a time."""
    from detector.classify import _interpreter_class

    cls, _ = _interpreter_class()
    interp = cls(model_content=data, num_threads=2)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    probs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch].astype(np.float32)
        interp.resize_tensor_input(inp["index"], list(chunk.shape))
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], chunk)
        interp.invoke()
        probs.append(interp.get_tensor(out["index"]).copy())
    return np.concatenate(probs) if probs else np.zeros((0, 0), np.float32)


def choose_float_layers(
    quantize: Callable[[Sequence[str]], bytes],
    agreement: Callable[[bytes], float],
    candidates: Sequence[str],
    start: Sequence[str] = (),
    target: float = 0.99,
    max_float: int = 6,
) -> tuple[list[str], bytes, list[tuple[int, float]]]:
    """Keep the worst-quantized layers float, one at a time, until the int8 model agrees with
    the float one on ``target`` of the monitor crops (or ``max_float`` layers are float).

    ``candidates`` are output tensor names worst first (:meth:`Quantizer.layer_errors`),
    ``start`` the ones always kept float. Returns the float tensors, the model bytes and the
    agreement after each step ``[(n_float, agreement), ...]``; the smallest set that reaches the
    target wins, else the best one seen (fewest float layers on ties). Chosen on the monitor
    split, never the held-out one.
    """
    chosen = list(start)
    data = quantize(chosen)
    best = (agreement(data), -len(chosen), list(chosen), data)
    steps = [(len(chosen), best[0])]
    for name in candidates:
        if best[0] >= target or len(chosen) >= max_float:
            break
        if name in chosen:
            continue
        chosen.append(name)
        data = quantize(chosen)
        agree = agreement(data)
        steps.append((len(chosen), agree))
        if (agree, -len(chosen)) > best[:2]:
            best = (agree, -len(chosen), list(chosen), data)
    return best[2], best[3], steps


def input_dtype(path: str | Path) -> str:
    """The input tensor's dtype name of a .tflite file (``int8`` or ``float32``)."""
    from detector.classify import _interpreter_class

    cls, _ = _interpreter_class()
    interp = cls(model_path=str(path))
    return np.dtype(interp.get_input_details()[0]["dtype"]).name


def photometric_variants(
    crops_bgr: np.ndarray, copies: int = 1, seed: int = 0
) -> np.ndarray:
    """Real crops re-photographed under other microscopes/stains (for calibration only).

    Each copy draws a stain/white-balance gain per channel, saturation, contrast, brightness and
    gamma change, wider than the training augmentation, so darker and more saturated smears than
    BCCD's are inside the calibrated ranges. Pixel levels clip at 0 and 255 like a camera's.
    Returns (N*copies, S, S, 3) uint8 BGR.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(copies):
        x = crops_bgr.astype(np.float32) / 255.0
        n = len(x)
        gain = rng.uniform(0.8, 1.2, (n, 1, 1, 3))
        sat = rng.uniform(0.6, 1.8, (n, 1, 1, 1))
        con = rng.uniform(0.7, 1.8, (n, 1, 1, 1))
        bri = rng.uniform(-0.3, 0.15, (n, 1, 1, 1))
        gamma = rng.uniform(0.7, 1.6, (n, 1, 1, 1))
        x = x * gain
        grey = x.mean(axis=3, keepdims=True)
        x = grey + (x - grey) * sat
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = mean + (x - mean) * con + bri
        x = np.clip(x, 0.0, 1.0) ** gamma
        out.append(np.round(x * 255.0).astype(np.uint8))
    return np.concatenate(out) if out else crops_bgr[:0]


def calibration_set(
    crops_bgr: np.ndarray, max_samples: int = 1200, augmented_copies: int = 1, seed: int = 0
) -> np.ndarray:
    """Calibration crops: the real crops plus photometric variants of them, covering 0..255.

    The input tensor's range is set by the calibration data: one contrast-stretched (auto-levels,
    as a camera would) copy of a real crop with its end points at 0 and 255 fixes it to [-1, 1],
    so the int8 input step is 2/255: every uint8 pixel level stays representable and none clips
    (BCCD crops alone only reach ~[-0.6, 1], so darker smears clipped). Returned shuffled and
    capped at ``max_samples`` (half real, half variants if capped with variants).

    The variants also put darker/more saturated smears inside the inner layers' ranges. On BCCD
    (one trained model, held-out crops) real crops alone and real + variants are within noise of
    each other (float-vs-int8 agreement 0.922 vs 0.911 on 550 box-jittered held-out crops, 0.933
    vs 0.926 on photometric variants of them); both beat the earlier calibration on 222 crops
    with a BCCD-only input range (0.904, and 0.827 on the variants).
    """
    rng = np.random.default_rng(seed)
    real = crops_bgr[rng.permutation(len(crops_bgr))]
    var = photometric_variants(crops_bgr, augmented_copies, seed + 1)
    var = var[rng.permutation(len(var))]
    if len(real) + len(var) > max_samples:
        n_var = min(len(var), max_samples // 2) if augmented_copies else 0
        real, var = real[: max_samples - n_var], var[:n_var]
    # auto-levels copy of one real crop: stretch its own 1st..99th percentiles to 0..255
    c = crops_bgr[int(rng.integers(len(crops_bgr)))].astype(np.float32)
    lo, hi = np.percentile(c, 1), np.percentile(c, 99)
    stretched = np.clip((c - lo) * 255.0 / max(hi - lo, 1.0), 0, 255).round().astype(np.uint8)
    stretched.reshape(-1)[:2] = (0, 255)  # exact end points whatever the crop
    both = np.concatenate([real, var, stretched[None]])
    return both[rng.permutation(len(both))]


def export_models(
    model: Any,
    calibration: np.ndarray,
    out: str | Path,
    float_out: str | Path,
    monitor: Sequence[np.ndarray] = (),
    max_samples: int = 1200,
    augmented_copies: int = 1,
    float_layers: Sequence[str] = FLOAT_LAYERS,
    target: float = 0.99,
    max_float: int = 6,
) -> dict:
    """Write the int8 file (``out``) and its float32 reference (``float_out``) of a Keras model.

    The int8 file is calibrated on real crops (:class:`Quantizer`) with the layers named like
    ``float_layers`` kept float. Given ``monitor`` crops (the monitor split, never the held-out
    one; one array per data folder), more layers are kept float, worst-quantized first, until
    the int8 model names the crops of every folder as the float one does on ``target`` of them
    (:func:`choose_float_layers`, at most ``max_float`` float layer tensors): the smallest
    folder, another microscope, counts as much as the largest.

    Args:
        model: Keras model taking float RGB in [-1, 1].
        calibration: (N, S, S, 3) uint8 BGR crops cut by the crop rule from training images.
        monitor: (M, S, S, 3) uint8 BGR monitor crops per data folder; none: ``float_layers``
            alone.
        max_samples: cap on calibration crops (real + photometric variants).
        augmented_copies: photometric variants per real crop (see ``calibration_set``).

    Returns what the card's recipe records: the float layers, the monitor agreement after each
    step, the calibration size and the seconds taken.
    """
    t0 = time.monotonic()
    with saved_model(model) as saved:
        reference = convert_float(saved)
        quantizer = Quantizer(saved, calibration, max_samples, augmented_copies)
        names = tensor_names(reference)
        start = float_layer_tensors(names, float_layers)
        if float_layers and not start:
            log.warning("no layer named like %s: none kept float", list(float_layers))
        xs = [preprocess(m) for m in monitor if len(m)]
        if xs:
            candidates = [n for n, _ in quantizer.layer_errors() if n in names]
            kept, data, steps = choose_float_layers(
                quantizer.quantize, lambda d: min(top1_agreement(reference, d, x) for x in xs),
                candidates, start, target, max_float)
        else:
            kept, steps = start, []
            data = quantizer.quantize(kept)
    for path, blob in ((Path(out), data), (Path(float_out), reference)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    log.info("wrote %s (%.1f kB, %d layer tensors float, calibrated on %d crops from %d real "
             "ones) and %s", out, len(data) / 1e3, len(kept), quantizer.n_calibration,
             quantizer.n_real, float_out)
    return {
        "float_tensors": list(kept),
        "monitor_agreement_steps": [{"float_tensors": n, "lowest_top1_agreement": round(a, 4)}
                                    for n, a in steps],
        "monitor_crops": [len(m) for m in monitor],
        "target_agreement": target if xs else None,
        "calibration_crops": quantizer.n_calibration,
        "seconds": round(time.monotonic() - t0, 1),
    }


def measure_latency(path: str | Path, batch: int = 1, threads: int = 1, runs: int = 50) -> float:
    """Median milliseconds per crop of ``CellClassifier.classify_crops`` on ``batch`` crops.

    The run-time path itself (colour conversion + LUT, one invoke, dequantization), on random
    uint8 crops, ``threads`` interpreter threads, after 5 warm-up calls.
    """
    from detector.classify import CellClassifier

    clf = CellClassifier(path, num_threads=threads)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (batch, clf.size, clf.size, 3), dtype=np.uint8)
    for _ in range(5):
        clf.classify_crops(crops)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        clf.classify_crops(crops)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0 / batch)


def build_card(
    name: str,
    labels: tuple[str, ...] | list[str],
    rule: CropRule,
    min_score: float,
    trained_on: dict | None = None,
    split: dict | None = None,
    recipe: dict | None = None,
    evaluation: dict | None = None,
    input_dtype: str = "int8",
) -> ModelCard:
    """The card of an int8 export: the run time's ModelCard, dated today."""
    return ModelCard(
        name=name,
        labels=tuple(labels),
        input_size=rule.size,
        input_dtype=input_dtype,
        color_order="RGB",
        preprocessing=PREPROCESSING,
        outputs="probabilities",
        crop=rule,
        min_score=float(min_score),
        date=_dt.date.today().isoformat(),
        trained_on=trained_on or {},
        split=split or {},
        recipe=recipe or {},
        evaluation=evaluation or {},
    )


def write_card(tflite_path: str | Path, card: ModelCard) -> Path:
    """Write ``NAME.json`` beside ``NAME.tflite`` (checked by reading it back as the run time)."""
    path = Path(tflite_path).with_suffix(".json")
    data = card.to_dict()
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    ModelCard.from_dict(json.loads(text), source=path)  # exactly what the run time will read
    path.write_text(text)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def float_card(card: ModelCard) -> ModelCard:
    """The card of the float32 reference export: the int8 card with a float32 input, marked."""
    return dataclasses.replace(
        card, name=f"{card.name}.float", input_dtype="float32",
        note="float32 reference export of the same Keras weights, for float-vs-int8 "
             "comparisons only; not for shipping (the int8 model is the product)",
    )
