"""``hematovision train``: MobileNetV2 transfer learning on white-cell crops, then int8 export.

Recipe (the usual Keras transfer-learning advice): ImageNet MobileNetV2 (alpha 1.0, no top) with a
small head; first the base frozen (head only), then the whole network fine-tuned at a low learning
rate with BatchNorm kept in inference mode (the base is called with ``training=False``). Heavy
augmentation suited to smears (flips, 90-degree and small rotations, zoom, stain/colour jitter),
several jittered crops per training image, class weights, early stopping on a monitor split,
ReduceLROnPlateau, best weights restored.

Splits are by image: a held-out validation split (for the card's figures; never used for training
or model selection) and, inside the rest, a small monitor split for early stopping.
TensorFlow/Keras are imported inside functions only.
"""

from __future__ import annotations

import argparse
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
from training.data import ImageCache, cut_crops, load_datasets, preprocess, split_by_group

log = logging.getLogger(__name__)

MAIN_CLASSES = ("neutrophil", "eosinophil", "lymphocyte", "monocyte")


@dataclass
class TrainConfig:
    """Everything that decides a training run (recorded in the card's recipe)."""

    data: list[str]
    out: str = "models/hematovision.tflite"
    input_size: int = 112
    weights: str = "imagenet"
    margin: float = 0.15
    seed: int = 0
    #: fraction of images held out for the card's validation figures
    val_fraction: float = 0.2
    #: fraction of the remaining images used to monitor early stopping / LR schedule; 0 = train
    #: on all of them and let the callbacks watch the training loss (BCCD: a 30-image monitor
    #: split proved too noisy to choose epochs by; it stopped runs after 1-3 fine-tuning epochs)
    monitor_fraction: float = 0.0
    min_images: int = 5
    frozen_epochs: int = 5
    epochs: int = 15
    batch_size: int = 32
    lr_head: float = 1e-3
    lr_fine: float = 1e-4
    dropout: float = 0.3
    #: crops per training image (first exact, others with jittered box)
    copies: int = 3
    jitter: float = 0.08
    patience: int = 4
    min_score: float = 0.5
    #: calibration: photometric variants per real crop, and the cap on calibration crops
    calib_copies: int = 1
    calib_max: int = 1200
    #: multiply a class's balanced weight (e.g. {"eosinophil": 1.5}); empty = balanced
    class_weight_scale: dict = field(default_factory=dict)
    run_dir: str | None = None
    use_segmenter: bool = True
    augment: dict = field(
        default_factory=lambda: {
            "flips": "horizontal+vertical",
            "rot90": True,
            "rotation_deg": 15,
            "zoom": 0.1,
            "hue": 0.02,
            "saturation": [0.8, 1.2],
            "brightness": 0.1,
            "contrast": [0.8, 1.2],
        }
    )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        cfg = cls(data=list(args.data))
        for name in cfg.__dataclass_fields__:
            value = getattr(args, name, None)
            if value is not None and name != "data":
                setattr(cfg, name, value)
        return cfg


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


def build_model(num_classes: int, size: int, weights: str | None, dropout: float) -> tuple:
    """(model, base): float RGB [-1, 1] in -> softmax out; base frozen, BN in inference mode."""
    import keras

    inputs = keras.Input((size, size, 3), name="image")
    base = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=1.0, include_top=False, weights=weights
    )
    base.trainable = False
    x = base(inputs, training=False)  # BatchNorm stays in inference mode, also when fine-tuned
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="hematovision"), base


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
            x = tf.image.random_hue(x, aug["hue"])
            x = tf.image.random_saturation(x, *aug["saturation"])
            x = tf.image.random_brightness(x, aug["brightness"])
            x = tf.image.random_contrast(x, *aug["contrast"])
            return tf.clip_by_value(x, 0.0, 1.0), y

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


# ----------------------------------------------------------------------------------- training


def _set_seeds(seed: int) -> None:
    import keras

    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    keras.utils.set_random_seed(seed)


def train(cfg: TrainConfig) -> dict:
    """Run a full training: data, split, two phases, export, held-out evaluation, card.

    Returns the card (also written beside the .tflite).
    """
    import keras

    from detector.classify import CellClassifier
    from training.evaluate import bootstrap_ci, classification_figures
    from training.export import (
        build_card,
        export_float,
        export_int8,
        float_card,
        measure_latency,
        write_card,
    )

    t_start = time.monotonic()
    _set_seeds(cfg.seed)
    rule = CropRule(margin=cfg.margin, square=True, size=cfg.input_size)
    weights = resolve_weights(cfg.weights)
    out = Path(cfg.out)
    if out.suffix != ".tflite":
        raise InputError(f"{out}: output must end in .tflite")
    run_dir = Path(cfg.run_dir or Path("runs") / out.stem)
    run_dir.mkdir(parents=True, exist_ok=True)

    ds = load_datasets(cfg.data, rule, finder="default" if cfg.use_segmenter else None,
                       min_images=cfg.min_images)
    classes = ds.classes
    if len(classes) < 2:
        raise InputError(f"need at least 2 classes to train, found {list(classes)}")
    rest, held = split_by_group(ds, cfg.val_fraction, cfg.seed)
    rest_ds = ds.subset(rest)
    train_groups, monitor = split_by_group(rest_ds, cfg.monitor_fraction, cfg.seed + 1)
    if cfg.monitor_fraction <= 0:
        train_groups, monitor = rest, []
    assert not (set(train_groups) & set(held)) and not (set(monitor) & set(held))
    tr, mo, va = ds.subset(train_groups), ds.subset(monitor), ds.subset(held)
    log.info("images: train %d, monitor %d, held-out %d; classes %s", len(tr.samples),
             len(mo.samples), len(va.samples), classes)

    cache = ImageCache()
    x_tr, idx_tr = cut_crops(tr.samples, rule, copies=cfg.copies, jitter=cfg.jitter,
                             seed=cfg.seed, cache=cache)
    y_tr = tr.labels[idx_tr]
    x_mo, _ = cut_crops(mo.samples, rule, cache=cache)
    y_mo = mo.labels
    x_va, _ = cut_crops(va.samples, rule, cache=cache)
    y_va = va.labels
    # Calibration: all real training crops (exact and jittered boxes, as the segmenter cuts them);
    # the exporter adds photometric variants of them so other stains/microscopes fit the ranges.
    calib = x_tr

    model, base = build_model(len(classes), cfg.input_size, weights, cfg.dropout)
    cw = class_weights(y_tr, len(classes))
    for name, factor in cfg.class_weight_scale.items():
        if name in classes:
            cw[classes.index(name)] *= float(factor)
    d_tr = make_dataset(x_tr[..., ::-1].copy(), y_tr, cfg, train=True)
    d_mo = make_dataset(x_mo[..., ::-1].copy(), y_mo, cfg, train=False) if len(y_mo) else None
    monitor_key = "val_loss" if d_mo is not None else "loss"
    ckpt = run_dir / "best.keras"

    def callbacks() -> list:
        return [
            keras.callbacks.EarlyStopping(monitor=monitor_key, patience=cfg.patience,
                                          restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(monitor=monitor_key, factor=0.3,
                                              patience=max(cfg.patience // 2, 1), min_lr=1e-6),
            keras.callbacks.ModelCheckpoint(str(ckpt), monitor=monitor_key, save_best_only=True),
        ]

    history: dict[str, list] = {}
    model.compile(optimizer=keras.optimizers.Adam(cfg.lr_head),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    t0 = time.monotonic()
    if cfg.frozen_epochs > 0:
        print(f"phase 1: head only, base frozen ({cfg.frozen_epochs} epochs, "
              f"{len(y_tr)} crops from {len(tr.samples)} images)", flush=True)
        h = model.fit(d_tr, validation_data=d_mo, epochs=cfg.frozen_epochs, class_weight=cw,
                      verbose=2)
        history["frozen"] = {k: [float(v) for v in vs] for k, vs in h.history.items()}
    fine_epochs_run = 0
    if cfg.epochs > 0:
        base.trainable = True
        model.compile(optimizer=keras.optimizers.Adam(cfg.lr_fine),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        print(f"phase 2: full fine-tuning, lr {cfg.lr_fine} (up to {cfg.epochs} epochs)",
              flush=True)
        h = model.fit(d_tr, validation_data=d_mo, epochs=cfg.epochs, class_weight=cw,
                      callbacks=callbacks(), verbose=2)
        history["fine"] = {k: [float(v) for v in vs] for k, vs in h.history.items()}
        fine_epochs_run = len(h.history.get("loss", []))
    train_seconds = time.monotonic() - t0
    (run_dir / "history.json").write_text(json.dumps(history, indent=1))

    # ---- export: int8 (shipped) and float (kept in run_dir for comparisons)
    print("exporting int8 TFLite (calibrated on real training crops)", flush=True)
    model.save(run_dir / "final.keras")
    export_int8(model, calib, out, max_samples=cfg.calib_max, augmented_copies=cfg.calib_copies)
    float_path = export_float(model, run_dir / f"{out.stem}.float.tflite")
    # provisional cards (no evaluation yet) so the run-time CellClassifier loads both files;
    # rewritten in full below
    card = build_card(out.stem, classes, rule, cfg.min_score, {}, {}, {}, {})
    write_card(out, card)
    write_card(float_path, float_card(card))

    # ---- held-out evaluation of the exported int8 file itself
    evaluation: dict[str, Any] = {"on": "held-out validation split (images never trained on)"}
    if len(y_va):
        p_int8 = CellClassifier(out).classify_crops(x_va)
        p_float = CellClassifier(float_path).classify_crops(x_va)
        p_keras = model.predict(preprocess(x_va), verbose=0)
        evaluation["int8"] = classification_figures(y_va, p_int8, classes, cfg.min_score,
                                                    MAIN_CLASSES)
        evaluation["int8"]["bootstrap"] = bootstrap_ci(y_va, p_int8, classes)
        evaluation["float_keras"] = classification_figures(y_va, p_keras, classes,
                                                           cfg.min_score, MAIN_CLASSES)
        evaluation["float_vs_int8_top1_agreement"] = float(
            np.mean(p_float.argmax(1) == p_int8.argmax(1)))
        evaluation["float_vs_int8_max_abs_prob_diff"] = float(np.abs(p_float - p_int8).max())
        np.savez_compressed(run_dir / "heldout_predictions.npz", y=y_va, int8=p_int8,
                            float=p_float, keras=p_keras)
    evaluation["latency_ms_per_crop"] = {
        "threads": 1,
        "batch1": round(measure_latency(out, batch=1), 3),
        "batch8": round(measure_latency(out, batch=8), 3),
        "note": "ai-edge-litert, XNNPACK, median; CPU shared with other jobs (pessimistic)",
    }

    sources = ds.info.get("sources", {})
    trained_on = {
        "datasets": ds.info["datasets"],
        "kinds": ds.info["kinds"],
        "images": len({s.group for s in ds.samples}),
        "counts_per_class": ds.counts(),
        "train_counts_per_class": tr.counts(),
        "dropped_classes": ds.info["dropped_classes"],
        "min_images_per_class": cfg.min_images,
        "crop_box_sources": sources,
        "segmenter_used": ds.info["segmenter_used"],
    }
    split = {
        "method": "stratified by image (group), seeded; the held-out split is never used for "
                  "training or model selection"
                  + ("; a monitor split (inside the rest) drives early stopping" if monitor
                     else "; no monitor split: callbacks watch the training loss"),
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "monitor_fraction": cfg.monitor_fraction,
        "train_images": len(tr.samples),
        "monitor_images": sorted(monitor),
        "val_images": sorted(held),
        "val_counts_per_class": va.counts(),
    }
    recipe = {
        "backbone": "MobileNetV2 alpha=1.0, include_top=False, GAP, dropout, dense softmax",
        "weights": cfg.weights if weights != str(Path(cfg.weights)) else Path(cfg.weights).name,
        "frozen_epochs": cfg.frozen_epochs,
        "fine_tune_epochs_max": cfg.epochs,
        "fine_tune_epochs_run": fine_epochs_run,
        "lr_head": cfg.lr_head,
        "lr_fine": cfg.lr_fine,
        "batch_size": cfg.batch_size,
        "optimizer": "Adam",
        "batchnorm": "inference mode during fine-tuning",
        "class_weights": {classes[i]: round(w, 3) for i, w in cw.items()},
        "crops_per_train_image": cfg.copies,
        "box_jitter": cfg.jitter,
        "augmentation": cfg.augment,
        "early_stopping": {"monitor": monitor_key, "patience": cfg.patience,
                           "restore_best_weights": True},
        "reduce_lr_on_plateau": {"factor": 0.3, "patience": max(cfg.patience // 2, 1)},
        "calibration": (
            f"{min(len(calib) * (1 + cfg.calib_copies), cfg.calib_max) + 1} crops: the real "
            f"training crops ({len(calib)} = exact + jittered boxes, capped at {cfg.calib_max})"
            + (f", {cfg.calib_copies} photometric variant(s) of each (channel gain 0.8-1.2, "
               "saturation 0.6-1.8, contrast 0.7-1.8, brightness -0.3..+0.15, gamma 0.7-1.6)"
               if cfg.calib_copies else "")
            + " and one auto-levels (contrast-stretched to 0..255) copy of a real crop, which "
            "sets the input range to [-1, 1] (step 2/255: no pixel level clips)"
        ),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.monotonic() - t_start, 1),
    }
    card = build_card(out.stem, classes, rule, cfg.min_score, trained_on, split, recipe,
                      evaluation)
    write_card(out, card)
    write_card(float_path, float_card(card))
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return card


def main(args: argparse.Namespace) -> int:
    """CLI handler for ``hematovision train``."""
    cfg = TrainConfig.from_args(args)
    card = train(cfg)
    ev = card["evaluation"]
    print(f"wrote {cfg.out} and {Path(cfg.out).with_suffix('.json')}")
    print(f"classes: {', '.join(card['labels'])}")
    if "int8" in ev:
        f = ev["int8"]
        print(f"held-out ({sum(card['split']['val_counts_per_class'].values())} images), "
              f"int8 model: accuracy {f['accuracy']:.3f}, macro-F1 (main classes) "
              f"{f['macro_f1_main']:.3f}, unidentified {f['unidentified']}")
        print(f"float vs int8 top-1 agreement: {ev['float_vs_int8_top1_agreement']:.3f}")
    lat = ev["latency_ms_per_crop"]
    print(f"int8 latency per crop (1 thread): batch 1 {lat['batch1']} ms, "
          f"batch 8 {lat['batch8']} ms")
    print(f"training time: {card['recipe']['train_seconds']:.0f} s")
    return 0
