"""``hematovision train``: MobileNetV2 transfer learning on cell crops, then int8 export.

Recipe: ImageNet MobileNetV2 (alpha 1.0, no top) with a small head; first the base frozen (head
only), then the whole network fine-tuned at a low, cosine-decaying learning rate with BatchNorm kept
in inference mode (the base is called with ``training=False``). Several data folders train one
model (e.g. BCCD's VOC photos and PBC's folder-per-class single cells): VOC cells are cut at the
run-time segmenter's box with several jittered copies (few images), folder cells once. Robustness
to other microscopes comes from augmentation: stain jitter in haematoxylin/eosin/DAB optical
density space, white-balance casts, gamma, brightness, contrast, saturation, hue, blur, noise, JPEG
re-compression, flips, rotations and scale (zoom). Classes are balanced by weights.

Splits are by image (content hash for folder data), stratified by data folder and class, seeded:
a held-out validation split (for the card's figures; never used for training or model selection)
and, inside the rest, a small monitor split that picks the best epoch and fits the softmax
temperature (so ``min_score`` is a calibrated probability). Crops are cached in ``runs/cache``.
TensorFlow/Keras are imported inside functions only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detector.crop import CropRule
from detector.errors import InputError
from training.data import (
    DataSet,
    cut_crops_cached,
    load_datasets,
    preprocess,
    split_by_group,
)

log = logging.getLogger(__name__)

DEFAULT_RUNS = Path("runs")
#: Data sets the project knows, by folder name: what the card says about their origin and licence.
DATA_LICENCES: dict[str, str] = {
    "pbc": "PBC dataset, Acevedo A, Merino A, Alferez S, Molina A, Boldu L, Rodellar J, 'A "
           "dataset of microscopic peripheral blood cell images for development of automatic "
           "recognition systems', Data in Brief 30 (2020) 105474, Mendeley Data "
           "doi:10.17632/snkd93bnjr.1; licence CC BY 4.0 (part of it: 9,345 readable images)",
    "bccd-trainval": "BCCD dataset (Shenggan, github.com/Shenggan/BCCD_Dataset), trainval "
                     "images; MIT licence",
}
DEFAULT_AUGMENT: dict[str, Any] = {
    "flips": "horizontal+vertical",
    "rot90": True,
    "rotation_deg": 15,
    "zoom": 0.15,
    "stain_hed_scale": 0.25,
    "stain_hed_shift": 0.15,
    "white_balance_gain": 0.15,
    "gamma": [0.8, 1.25],
    "brightness": 0.08,
    "contrast": [0.8, 1.2],
    "saturation": [0.7, 1.3],
    "hue": 0.03,
    "blur_p": 0.3,
    "blur_sigma": [0.3, 1.5],
    "noise_sd": 0.015,
    "jpeg_p": 0.3,
    "jpeg_quality": [40, 95],
}


@dataclass
class TrainConfig:
    """Everything that decides a training run (recorded in the card's recipe)."""

    data: list[str]
    #: output .tflite; default RUN_DIR/hematovision.tflite (never the shipped model unless named)
    out: str | None = None
    input_size: int = 128
    weights: str = "imagenet"
    margin: float = 0.15
    seed: int = 0
    #: fraction of images held out for the card's validation figures (per data folder and class)
    val_fraction: float = 0.2
    #: fraction of the remaining images that picks the best epoch and fits the temperature
    monitor_fraction: float = 0.06
    min_images: int = 5
    frozen_epochs: int = 2
    epochs: int = 8
    batch_size: int = 32
    lr_head: float = 1e-3
    lr_fine: float = 2e-4
    dropout: float = 0.2
    #: crops per training image of folder-per-class data (first exact, others jittered)
    copies: int = 1
    #: crops per training image of VOC data (few images, so more jittered boxes)
    voc_copies: int = 6
    jitter: float = 0.08
    #: VOC platelet boxes as ``platelet`` and a few red-cell boxes as ``artefact``
    voc_extras: bool = True
    patience: int = 3
    min_score: float = 0.5
    #: calibration: photometric variants per real crop, and the cap on calibration crops
    calib_copies: int = 1
    calib_max: int = 1000
    #: multiply a class's balanced weight (e.g. {"eosinophil": 1.5}); empty = balanced
    class_weight_scale: dict = field(default_factory=dict)
    run_dir: str | None = None
    use_segmenter: bool = True
    #: batches per epoch (None = the whole training set; small values time a run)
    steps_per_epoch: int | None = None
    #: run the training steps eagerly instead of tracing a graph: only for a few steps on tiny
    #: data (tests), where tracing MobileNetV2's graph costs more than the steps themselves
    run_eagerly: bool = False
    #: keep the read data set and the cut crops in runs/cache (None: no cache)
    cache_dir: str | None = str(DEFAULT_RUNS / "cache")
    augment: dict = field(default_factory=lambda: dict(DEFAULT_AUGMENT))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        cfg = cls(data=list(args.data))
        for name in cfg.__dataclass_fields__:
            value = getattr(args, name, None)
            if value is not None and name != "data":
                setattr(cfg, name, value)
        return cfg

    def resolve_paths(self) -> tuple[Path, Path]:
        """(run_dir, out): default run folder ``runs/hv-DATE-TIME``, default model inside it."""
        if self.run_dir:
            run_dir = Path(self.run_dir)
        elif self.out:
            run_dir = DEFAULT_RUNS / Path(self.out).stem
        else:
            run_dir = DEFAULT_RUNS / _dt.datetime.now().strftime("hv-%Y%m%d-%H%M%S")
        out = Path(self.out) if self.out else run_dir / "hematovision.tflite"
        if out.suffix != ".tflite":
            raise InputError(f"{out}: output must end in .tflite")
        return run_dir, out


# ----------------------------------------------------------------------------------- Keras bits


def resolve_weights(weights: str) -> str | None:
    """``imagenet`` | ``none`` | path -> value for keras.applications.MobileNetV2(weights=...)."""
    w = (weights or "none").strip()
    if w.lower() == "none":
        return None
    if w.lower() == "imagenet":
        return "imagenet"
    p = Path(w)
    if not p.is_file():
        raise InputError(f"{p}: weights file not found (use imagenet, none or a .weights.h5 file)")
    if not p.name.endswith(".weights.h5"):
        raise InputError(f"{p}: Keras needs a '.weights.h5' file for MobileNetV2 weights")
    return str(p)


def _mobilenet(size: int, weights: str | None) -> Any:
    """MobileNetV2 base; a failed ImageNet download is one InputError, not a traceback chain."""
    import keras

    try:
        return keras.applications.MobileNetV2(
            input_shape=(size, size, 3), alpha=1.0, include_top=False, weights=weights
        )
    except Exception as exc:
        if weights != "imagenet":
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise InputError(
            f"downloading the ImageNet weights failed ({first}); pass --weights PATH to a local "
            "mobilenet_v2 .weights.h5 file (or --weights none)"
        ) from None


def build_model(num_classes: int, size: int, weights: str | None, dropout: float) -> tuple:
    """(model, base): float RGB [-1, 1] in -> softmax out; base frozen, BN in inference mode.

    The last dense layer is named ``logits`` so a temperature can be put between it and the
    softmax for export (:func:`with_temperature`).
    """
    import keras

    inputs = keras.Input((size, size, 3), name="image")
    base = _mobilenet(size, weights)
    base.trainable = False
    x = base(inputs, training=False)  # BatchNorm stays in inference mode, also when fine-tuned
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(dropout)(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    outputs = keras.layers.Softmax(name="probs")(logits)
    return keras.Model(inputs, outputs, name="hematovision"), base


def logits_model(model: Any) -> Any:
    import keras

    return keras.Model(model.inputs, model.get_layer("logits").output)


def with_temperature(model: Any, temperature: float) -> Any:
    """The same weights with softmax(logits / T): calibrated probabilities, same arg-max."""
    import keras

    logits = model.get_layer("logits").output
    scaled = keras.layers.Rescaling(1.0 / float(temperature), name="temperature")(logits)
    return keras.Model(model.inputs, keras.layers.Softmax(name="probs_calibrated")(scaled))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood (1-D search over log T)."""

    def nll(t: float) -> float:
        z = logits / t
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    grid = np.exp(np.linspace(np.log(0.3), np.log(5.0), 60))
    best = float(grid[int(np.argmin([nll(t) for t in grid]))])
    fine = best * np.exp(np.linspace(-0.06, 0.06, 25))
    return float(fine[int(np.argmin([nll(t) for t in fine]))])


_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]],
                         dtype=np.float32)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


def augment_image(x: Any, aug: dict[str, Any]) -> Any:
    """One RGB float [0, 1] image re-photographed under another stain, lamp and camera.

    Stain: optical density (-log I) projected onto the haematoxylin/eosin/DAB vectors (Ruifrok &
    Johnston), each stain's amount scaled and shifted, projected back. Then a white-balance cast
    (per-channel gain), gamma, brightness, contrast, saturation and hue, an occasional Gaussian blur
    (focus), sensor noise and an occasional JPEG re-compression.
    """
    import tensorflow as tf

    u = tf.random.uniform
    shape = tf.shape(x)
    od = -tf.math.log(tf.clip_by_value(x, 1.0 / 255.0, 1.0))
    hed = tf.reshape(od, [-1, 3]) @ _HED_FROM_RGB
    s, b = aug["stain_hed_scale"], aug["stain_hed_shift"]
    hed = hed * u([1, 3], 1.0 - s, 1.0 + s) + u([1, 3], -b, b)
    x = tf.reshape(tf.exp(-(hed @ _RGB_FROM_HED)), shape)
    g = aug["white_balance_gain"]
    x = tf.clip_by_value(x * u([1, 1, 3], 1.0 - g, 1.0 + g), 0.0, 1.0)
    x = tf.pow(x + 1e-6, u([], *aug["gamma"]))
    x = tf.image.random_brightness(x, aug["brightness"])
    x = tf.image.random_contrast(x, *aug["contrast"])
    x = tf.image.random_saturation(x, *aug["saturation"])
    x = tf.image.random_hue(x, aug["hue"])
    x = tf.clip_by_value(x, 0.0, 1.0)

    def blur(img: Any) -> Any:
        sigma = u([], *aug["blur_sigma"])
        r = tf.range(-3.0, 4.0)
        k = tf.exp(-(r * r) / (2.0 * sigma * sigma))
        k = k / tf.reduce_sum(k)
        kx = tf.tile(tf.reshape(k, [1, 7, 1, 1]), [1, 1, 3, 1])
        ky = tf.tile(tf.reshape(k, [7, 1, 1, 1]), [1, 1, 3, 1])
        out = tf.nn.depthwise_conv2d(img[None], kx, [1, 1, 1, 1], "SAME")
        return tf.nn.depthwise_conv2d(out, ky, [1, 1, 1, 1], "SAME")[0]

    x = tf.cond(u([]) < aug["blur_p"], lambda: blur(x), lambda: x)
    x = x + tf.random.normal(shape, 0.0, u([], 0.0, aug["noise_sd"]))
    x = tf.clip_by_value(x, 0.0, 1.0)
    lo, hi = aug["jpeg_quality"]
    x = tf.cond(u([]) < aug["jpeg_p"],
                lambda: tf.image.random_jpeg_quality(x, lo, hi), lambda: x)
    return tf.reshape(x, shape)


def make_dataset(crops_rgb: np.ndarray, labels: np.ndarray, cfg: TrainConfig, train: bool) -> Any:
    """tf.data pipeline: uint8 RGB -> (augmented) float [-1, 1] batches."""
    import keras
    import tensorflow as tf

    aug = cfg.augment
    ds = tf.data.Dataset.from_tensor_slices((crops_rgb, labels.astype(np.int32)))
    if train:
        ds = ds.shuffle(len(labels), seed=cfg.seed, reshuffle_each_iteration=True)

        def per_image(x: Any, y: Any) -> tuple:
            x = tf.image.convert_image_dtype(x, tf.float32)
            x = tf.image.random_flip_left_right(x)
            x = tf.image.random_flip_up_down(x)
            x = tf.image.rot90(x, k=tf.random.uniform([], 0, 4, dtype=tf.int32))
            return augment_image(x, aug), y

        geo = keras.Sequential(
            [
                keras.layers.RandomRotation(aug["rotation_deg"] / 360.0, fill_mode="reflect",
                                            seed=cfg.seed),
                keras.layers.RandomZoom(aug["zoom"], fill_mode="reflect", seed=cfg.seed),
            ]
        )
        ds = ds.map(per_image, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(cfg.batch_size)
        ds = ds.map(lambda x, y: (geo(x, training=True) * 2.0 - 1.0, y),
                    num_parallel_calls=tf.data.AUTOTUNE)
        if cfg.steps_per_epoch:
            ds = ds.repeat()
    else:
        ds = ds.batch(cfg.batch_size).map(
            lambda x, y: (tf.cast(x, tf.float32) / 127.5 - 1.0, y)
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced weights n / (k * n_c)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return {i: float(w[i]) for i in range(num_classes)}


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: |accuracy - confidence| per confidence bin, weighted by the bin's share."""
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    if not len(y):
        return 0.0
    conf = probs.max(1)
    correct = (probs.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


# ----------------------------------------------------------------------------------- training


def _set_seeds(seed: int) -> None:
    import keras

    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    keras.utils.set_random_seed(seed)


class _Progress:
    """A Keras callback printing batches done, loss and time left every ``every`` batches."""

    def __new__(cls, total: int, every: int = 25) -> Any:
        import keras

        class Progress(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.t0, self.epoch = time.monotonic(), epoch

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                if (batch + 1) % every == 0 or batch + 1 == total:
                    dt = time.monotonic() - self.t0
                    left = dt / (batch + 1) * (total - batch - 1)
                    print(f"  epoch {self.epoch + 1} batch {batch + 1}/{total} "
                          f"loss {logs.get('loss', float('nan')):.4f} "
                          f"acc {logs.get('accuracy', float('nan')):.3f} "
                          f"{dt / (batch + 1):.2f} s/batch, epoch ends in {left:.0f} s",
                          flush=True)

        return Progress()


def _crops(ds: DataSet, cfg: TrainConfig, rule: CropRule, cache: Path | None,
           train: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BGR crops, labels and data-folder index of a split (training copies per folder kind)."""
    xs, ys, srcs = [], [], []
    labels = ds.labels
    for name in ds.datasets:
        idx = [i for i, s in enumerate(ds.samples) if s.dataset == name]
        kind = ds.info.get("per_dataset", {}).get(name, {}).get("kind")
        for extra in (False, True):
            sel = [i for i in idx if ds.samples[i].extra == extra]
            if not sel:
                continue
            copies = 1
            if train and not extra:
                copies = cfg.voc_copies if kind == "voc" else cfg.copies
            x, k = cut_crops_cached([ds.samples[i] for i in sel], rule, cache, copies=copies,
                                    jitter=cfg.jitter, seed=cfg.seed)
            xs.append(x)
            ys.append(labels[np.asarray(sel)][k])
            srcs.append(np.full(len(x), ds.datasets.index(name)))
    if not xs:
        return (np.zeros((0, rule.size, rule.size, 3), np.uint8), np.zeros(0, np.int64),
                np.zeros(0, np.int64))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(srcs)


def monitor_crops(mo: DataSet, cfg: TrainConfig, rule: CropRule,
                  cache: Path | None) -> list[np.ndarray]:
    """The monitor split's crops per data folder, with the training copies (jittered boxes), for
    the export's float-vs-int8 agreement: a folder of few photographs (BCCD's 13 monitor
    images) then gives enough crops to see a disagreement."""
    x, _, src = _crops(mo, cfg, rule, cache, train=True)
    return [x[src == k] for k in np.unique(src)]


def calibration_crops(x: np.ndarray, source: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Up to ``cap`` training crops, an equal share from each data folder (in their order).

    Quantization ranges set on the larger folder alone clip the other microscope's activations
    (BCCD is ~10 % of the crops): each source gets the same number of calibration crops.
    """
    rng = np.random.default_rng(seed)
    kinds = np.unique(source)
    share = max(cap // max(len(kinds), 1), 1)
    pick = [np.sort(rng.permutation(np.flatnonzero(source == k))[:share]) for k in kinds]
    return x[np.sort(np.concatenate(pick))] if pick else x[:0]


def train(cfg: TrainConfig) -> dict:
    """Run a full training: data, split, two phases, temperature, export, held-out figures, card.

    Returns the card as a dict (also written beside the .tflite).
    """
    import keras

    from detector.classify import ModelCard
    from training.evaluate import evaluate_split
    from training.export import build_card, export_models, float_card, input_dtype, write_card

    t_start = time.monotonic()
    run_dir, out = cfg.resolve_paths()
    cfg.run_dir, cfg.out = str(run_dir), str(out)  # fixed once (the default name has the time)
    _set_seeds(cfg.seed)
    rule = CropRule(margin=cfg.margin, square=True, size=cfg.input_size)
    weights = resolve_weights(cfg.weights)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None

    print(f"reading {', '.join(cfg.data)} (segmenter boxes; cached in {cache})", flush=True)
    ds = load_datasets(cfg.data, rule, finder="default" if cfg.use_segmenter else None,
                       min_images=cfg.min_images, voc_extras=cfg.voc_extras, cache_dir=cache)
    classes = ds.classes
    if len(classes) < 2:
        raise InputError(f"need at least 2 classes to train, found {list(classes)}")
    rest, held = split_by_group(ds, cfg.val_fraction, cfg.seed)
    monitor: list[str] = []
    train_groups = rest
    if cfg.monitor_fraction > 0:
        train_groups, monitor = split_by_group(ds.subset(rest), cfg.monitor_fraction,
                                               cfg.seed + 1)
    assert not (set(train_groups) & set(held)) and not (set(monitor) & set(held))
    tr, mo, va = ds.subset(train_groups), ds.subset(monitor), ds.subset(held)
    print(f"images: train {len(set(tr.groups))}, monitor {len(set(mo.groups))}, held-out "
          f"{len(set(va.groups))}; classes {list(classes)}", flush=True)

    t_crop = time.monotonic()
    x_tr, y_tr, src_tr = _crops(tr, cfg, rule, cache, train=True)
    x_mo, y_mo, _ = _crops(mo, cfg, rule, cache, train=False)
    print(f"crops: train {len(y_tr)}, monitor {len(y_mo)} ({time.monotonic() - t_crop:.0f} s)",
          flush=True)

    model, base = build_model(len(classes), cfg.input_size, weights, cfg.dropout)
    cw = class_weights(y_tr, len(classes))
    for name, factor in cfg.class_weight_scale.items():
        if name in classes:
            cw[classes.index(name)] *= float(factor)
    d_tr = make_dataset(np.ascontiguousarray(x_tr[..., ::-1]), y_tr, cfg, train=True)
    d_mo = (make_dataset(np.ascontiguousarray(x_mo[..., ::-1]), y_mo, cfg, train=False)
            if len(y_mo) else None)
    monitor_key = "val_loss" if d_mo is not None else "loss"
    steps = cfg.steps_per_epoch or int(np.ceil(len(y_tr) / cfg.batch_size))
    ckpt = run_dir / "best.weights.h5"

    history: dict[str, list] = {}
    model.compile(optimizer=keras.optimizers.Adam(cfg.lr_head),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  run_eagerly=cfg.run_eagerly)
    t0 = time.monotonic()
    if cfg.frozen_epochs > 0:
        print(f"phase 1: head only, base frozen ({cfg.frozen_epochs} epochs of {steps} batches, "
              f"{len(y_tr)} crops)", flush=True)
        h = model.fit(d_tr, validation_data=d_mo, epochs=cfg.frozen_epochs, class_weight=cw,
                      steps_per_epoch=steps, callbacks=[_Progress(steps)], verbose=2)
        history["frozen"] = {k: [float(v) for v in vs] for k, vs in h.history.items()}
    fine_epochs_run = 0
    if cfg.epochs > 0:
        base.trainable = True
        schedule = keras.optimizers.schedules.CosineDecay(cfg.lr_fine, cfg.epochs * steps,
                                                          alpha=0.02)
        model.compile(optimizer=keras.optimizers.Adam(schedule),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                      run_eagerly=cfg.run_eagerly)
        print(f"phase 2: full fine-tuning, lr {cfg.lr_fine} cosine (up to {cfg.epochs} epochs)",
              flush=True)
        callbacks = [
            _Progress(steps),
            keras.callbacks.ModelCheckpoint(str(ckpt), monitor=monitor_key, save_best_only=True,
                                            save_weights_only=True),
            keras.callbacks.ModelCheckpoint(str(run_dir / "last.weights.h5"),
                                            save_weights_only=True),
            keras.callbacks.EarlyStopping(monitor=monitor_key, patience=cfg.patience,
                                          restore_best_weights=True),
        ]
        h = model.fit(d_tr, validation_data=d_mo, epochs=cfg.epochs, class_weight=cw,
                      steps_per_epoch=steps, callbacks=callbacks, verbose=2)
        history["fine"] = {k: [float(v) for v in vs] for k, vs in h.history.items()}
        fine_epochs_run = len(h.history.get("loss", []))
        if ckpt.is_file():
            model.load_weights(ckpt)  # the best epoch on the monitor split
    train_seconds = time.monotonic() - t0
    (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    model.save(run_dir / "final.keras")

    # ---- temperature on the monitor split (never the held-out one)
    temperature, calib_fig = 1.0, {"fitted_on": "nothing (no monitor split)"}
    if len(y_mo):
        z = logits_model(model).predict(preprocess(x_mo), verbose=0)
        temperature = fit_temperature(z, y_mo)

        def _p(t: float) -> np.ndarray:
            e = np.exp((z - z.max(1, keepdims=True)) / t)
            return e / e.sum(1, keepdims=True)

        calib_fig = {
            "fitted_on": f"monitor split ({len(y_mo)} crops, never the held-out split)",
            "temperature": round(temperature, 4),
            "monitor_ece_before": round(expected_calibration_error(y_mo, _p(1.0)), 4),
            "monitor_ece_after": round(expected_calibration_error(y_mo, _p(temperature)), 4),
            "bins": 15,
        }
        print(f"temperature {temperature:.3f}: monitor ECE {calib_fig['monitor_ece_before']:.4f}"
              f" -> {calib_fig['monitor_ece_after']:.4f}", flush=True)
    shipped = with_temperature(model, temperature)

    # ---- export: int8 (shipped) and float (kept in run_dir for comparisons)
    print("exporting int8 TFLite (calibrated on real training crops; float layers chosen on "
          "the monitor split)", flush=True)
    float_path = run_dir / f"{out.stem}.float.tflite"
    exported = export_models(shipped, calibration_crops(x_tr, src_tr, cfg.calib_max, cfg.seed),
                             out, float_path, monitor_crops(mo, cfg, rule, cache),
                             max_samples=cfg.calib_max, augmented_copies=cfg.calib_copies)
    dtype = input_dtype(out)
    card = build_card(out.stem, classes, rule, cfg.min_score, input_dtype=dtype)
    write_card(out, card)  # provisional, so the run-time classifier loads both files
    write_card(float_path, float_card(card))

    # ---- held-out figures of the exported int8 file itself, per data folder
    print("held-out evaluation (int8 file, per data folder)", flush=True)
    evaluation = evaluate_split(out, va, float_path)
    evaluation["calibration"] = calib_fig

    trained_on = {
        "datasets": ds.info["datasets"],
        "licences": {n: DATA_LICENCES.get(n, "unknown: see the data set's own licence")
                     for n in ds.info["datasets"]},
        "kinds": ds.info["kinds"],
        "images": len(set(ds.groups)),
        "counts_per_class": ds.counts(),
        "train_counts_per_class": tr.counts(),
        "counts_per_dataset": {n: ds.where(n).counts() for n in ds.datasets},
        "dropped_classes": ds.info["dropped_classes"],
        "min_images_per_class": cfg.min_images,
        "crop_box_sources": ds.info.get("sources", {}),
        "segmenter_used": ds.info["segmenter_used"],
        "per_dataset": ds.info.get("per_dataset", {}),
    }
    split = {
        "method": "by image (content hash for folder data: byte-identical copies on one side), "
                  "stratified by data folder and class, seeded; the held-out split is never "
                  "used for training or model selection"
                  + ("; a monitor split inside the rest picks the best epoch and fits the "
                     "temperature" if monitor else "; no monitor split"),
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "monitor_fraction": cfg.monitor_fraction,
        "train_images": len(set(tr.groups)),
        "monitor_images": sorted(monitor),
        "val_images": sorted(held),
        "val_counts_per_class": va.counts(),
        "val_counts_per_dataset": {n: va.where(n, main_only=True).counts()
                                   for n in va.datasets},
    }
    recipe = {
        "backbone": "MobileNetV2 alpha=1.0, include_top=False, GAP, dropout, dense logits, "
                    "softmax(logits / temperature)",
        "weights": cfg.weights if weights != str(Path(cfg.weights)) else Path(cfg.weights).name,
        "input_size": cfg.input_size,
        "frozen_epochs": cfg.frozen_epochs,
        "fine_tune_epochs_max": cfg.epochs,
        "fine_tune_epochs_run": fine_epochs_run,
        "steps_per_epoch": steps,
        "lr_head": cfg.lr_head,
        "lr_fine": f"{cfg.lr_fine} cosine decay to 2 %",
        "batch_size": cfg.batch_size,
        "optimizer": "Adam",
        "batchnorm": "inference mode during fine-tuning",
        "class_weights": {classes[i]: round(w, 3) for i, w in cw.items()},
        "train_crops": len(y_tr),
        "crops_per_train_image": {"folder_per_class": cfg.copies, "voc": cfg.voc_copies},
        "box_jitter": cfg.jitter,
        "augmentation": cfg.augment,
        "model_selection": f"best epoch by {monitor_key} (monitor split), early stopping "
                           f"patience {cfg.patience}",
        "temperature": round(temperature, 4),
        "calibration": (
            f"int8 ranges from up to {cfg.calib_max} real training crops (an equal share "
            "from each data folder), "
            f"{cfg.calib_copies} photometric variant(s) each and one auto-levels copy "
            "(input range [-1, 1])"
        ),
        "int8_export": exported,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.monotonic() - t_start, 1),
    }
    card = build_card(out.stem, classes, rule, cfg.min_score, trained_on=trained_on,
                      split=split, recipe=recipe, evaluation=evaluation, input_dtype=dtype)
    write_card(out, card)
    write_card(float_path, float_card(card))
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    assert isinstance(card, ModelCard)
    return card.to_dict()


def main(args: argparse.Namespace) -> int:
    """CLI handler for ``hematovision train``."""
    from training.evaluate import print_source

    cfg = TrainConfig.from_args(args)
    card = train(cfg)
    _, out = cfg.resolve_paths()
    print(f"wrote {out} and {out.with_suffix('.json')}")
    print(f"classes: {', '.join(card['labels'])}")
    for name, rep in card["evaluation"].get("sources", {}).items():
        print_source(name, rep)
    print(f"training time: {card['recipe']['train_seconds']:.0f} s "
          f"(total {card['recipe']['total_seconds']:.0f} s)")
    return 0


def average_models(models: list[Any]) -> Any:
    """One Keras model whose output is the mean of ``models``' probabilities (an ensemble: its
    members' errors differ, so the mean names cells more steadily than any one of them, and one
    file keeps the runtime's one-model contract)."""
    import keras

    inputs = keras.Input(models[0].input_shape[1:], name="image")
    outs = [keras.Model(m.inputs, m.outputs[0], name=f"member{i}")(inputs)
            for i, m in enumerate(models)]
    return keras.Model(inputs, keras.layers.Average(name="probs_mean")(outs))


def _run_model(run_dir: Path) -> Path:
    """The .tflite a finished run wrote: its config's ``out``, else the run folder's default."""
    out = json.loads((run_dir / "config.json").read_text()).get("out")
    return Path(out or run_dir / "hematovision.tflite")


def reexport(run_dirs: str | Path | list[str | Path], out: str | Path | None = None) -> dict:
    """Export finished runs' Keras models again with the current export, re-measure the
    held-out figures and write the card (the first run's data, split and recipe kept).

    One run: its model. Several runs of the same data, split, classes and crop rule (the same
    recipe and ``--seed`` trained again): one model that averages their calibrated
    probabilities (:func:`average_models`), each member with its own temperature. The
    calibration and monitor crops are cut again from the first run's images with its config;
    the split comes from the run's card, so held-out images stay held out.
    """
    import keras

    from detector.classify import ModelCard
    from training.evaluate import evaluate_split
    from training.export import export_models, float_card, input_dtype, write_card

    dirs = [Path(d) for d in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    if not dirs:
        raise InputError("no run folder to export")
    run_dir = dirs[0]
    cfg = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    cards = [ModelCard.load(_run_model(d).with_suffix(".json")) for d in dirs]
    old = cards[0]
    for d, c in zip(dirs[1:], cards[1:], strict=True):
        if (c.split != old.split or c.crop != old.crop or c.labels != old.labels
                or c.input_size != old.input_size):
            raise InputError(f"{d}: not the same split, classes, crop rule and input size as "
                             f"{run_dir}: an ensemble's members must share them")
    out = Path(out) if out else _run_model(run_dir)
    kept = _recipe_figures(out, old)
    rule = old.crop
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    ds = load_datasets(cfg.data, rule, finder="default" if cfg.use_segmenter else None,
                       min_images=cfg.min_images, voc_extras=cfg.voc_extras, cache_dir=cache)
    monitor = list(old.split.get("monitor_images", []))
    not_train = set(old.split["val_images"]) | set(monitor)
    tr = ds.subset([g for g in set(ds.groups) if g not in not_train])
    va = ds.subset(old.split["val_images"])
    x_tr, _, src_tr = _crops(tr, cfg, rule, cache, train=True)
    temperatures = [float(c.recipe.get("temperature", 1.0)) for c in cards]
    members = [with_temperature(keras.models.load_model(d / "final.keras"), t)
               for d, t in zip(dirs, temperatures, strict=True)]
    model = members[0] if len(members) == 1 else average_models(members)
    # an ensemble's float reference beside its int8 file; one run's in its run folder
    float_path = (out.parent if len(dirs) > 1 else run_dir) / f"{out.stem}.float.tflite"
    exported = export_models(model, calibration_crops(x_tr, src_tr, cfg.calib_max, cfg.seed),
                             out, float_path,
                             monitor_crops(ds.subset(monitor), cfg, rule, cache),
                             max_samples=cfg.calib_max, augmented_copies=cfg.calib_copies)
    card = dataclasses.replace(old, name=out.stem, input_dtype=input_dtype(out), path=None,
                               date=_dt.date.today().isoformat())
    write_card(out, card)
    write_card(float_path, float_card(card))
    evaluation = evaluate_split(out, va, float_path)
    evaluation["calibration"] = old.evaluation.get("calibration", {})
    source = " + ".join(f"{d.name}/final.keras" for d in dirs)
    recipe = {**old.recipe, "int8_export": {
        **exported, "note": f"re-exported {_dt.date.today().isoformat()} from {source}"}}
    if len(dirs) > 1:
        recipe["ensemble"] = {
            "members": [d.name for d in dirs],
            "temperatures": [round(t, 4) for t in temperatures],
            "combine": "mean of the members' softmax(logits / temperature)",
            "train_seconds_each": [c.recipe.get("train_seconds") for c in cards],
        }
        for key in ("train_seconds", "total_seconds"):  # the members trained one after another
            recipe[key] = round(sum(float(c.recipe.get(key) or 0.0) for c in cards), 1)
        recipe["temperature"] = recipe["ensemble"]["temperatures"]  # one per member
        recipe["fine_tune_epochs_run"] = [c.recipe.get("fine_tune_epochs_run") for c in cards]
        evaluation["calibration"] = {
            "members": [c.evaluation.get("calibration", {}) for c in cards],
            "note": "each member's temperature fitted on the monitor split; the mean of "
                    "calibrated probabilities is not refitted (see the held-out ECE)"}
    for part, figures in (("evaluation", evaluation), ("recipe", recipe)):
        figures.update(kept.get(part, {}))
    card = dataclasses.replace(card, evaluation=evaluation, recipe=recipe)
    write_card(out, card)
    write_card(float_path, float_card(card))
    return card.to_dict()


#: Figures of a card that belong to its recipe, not to its file, measured by commands of their
#: own (the recipe trained on one source alone, other input sizes): (card part, key).
RECIPE_FIGURES = (("evaluation", "cross_microscope"), ("recipe", "input_size_comparison"))
#: What makes a recipe the same recipe (keys of a card's ``recipe``).
RECIPE_KEYS = ("backbone", "weights", "input_size", "frozen_epochs", "fine_tune_epochs_max",
               "lr_head", "lr_fine", "batch_size", "optimizer", "box_jitter",
               "crops_per_train_image", "augmentation")


def _recipe_figures(out: Path, card: Any) -> dict[str, dict]:
    """The recipe's figures (:data:`RECIPE_FIGURES`) of the card a re-export replaces at ``out``,
    to be kept: when it is a model of the same split, classes, crop rule and recipe
    (:data:`RECIPE_KEYS`) as ``card`` (the first run's), they still describe the new file; a
    re-export re-measures everything else."""
    from detector.classify import ModelCard
    from detector.errors import ModelError

    path = out.with_suffix(".json")
    if not path.is_file():
        return {}
    try:
        prev = ModelCard.load(path)
    except ModelError as exc:  # an unreadable card is replaced anyway: nothing to keep
        log.warning("%s: not kept (%s)", path, exc)
        return {}
    if (prev.split.get("val_images") != card.split.get("val_images")
            or prev.labels != card.labels or prev.crop != card.crop
            or any(prev.recipe.get(k) != card.recipe.get(k) for k in RECIPE_KEYS)):
        return {}
    kept: dict[str, dict] = {}
    for part, key in RECIPE_FIGURES:
        value = getattr(prev, part).get(key)
        if value is not None:
            kept.setdefault(part, {})[key] = value
    return kept


if __name__ == "__main__":  # python -m training.train RUN_DIR [RUN_DIR ...] [--out OUT]
    import sys

    from training.evaluate import print_source

    logging.basicConfig(level=logging.INFO)
    _p = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Export finished runs again: one run, or several runs of the same split "
                    "as one model averaging their calibrated probabilities.")
    _p.add_argument("run_dirs", nargs="+", help="run folders (config.json, final.keras, card)")
    _p.add_argument("--out", help="output .tflite (default: the first run's)")
    _a = _p.parse_args()
    try:
        result = reexport(_a.run_dirs, _a.out)
    except InputError as exc:
        sys.exit(f"error: {exc}")
    for _name, _rep in result["evaluation"]["sources"].items():
        print_source(_name, _rep)
