"""Tiny synthetic data sets for the training tests (hand-made, a few KB, built in a temp dir)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

#: two classes that differ in nucleus shape and colour, 8 images each (one cell centred)
CLASSES = {"NEUTROPHILS": "neutrophil", "LYMPHOCYTE": "lymphocyte"}


def cell_image(kind: str, rng: np.random.Generator, size: tuple[int, int] = (80, 64)) -> np.ndarray:
    """A pink background with one centred white cell: lobed purple nucleus or one dark round one."""
    w, h = size
    img = np.full((h, w, 3), (200, 190, 235), np.uint8)
    img = (img + rng.normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8)
    cx, cy = w // 2 + int(rng.integers(-2, 3)), h // 2 + int(rng.integers(-2, 3))
    cv2.circle(img, (cx, cy), 18, (215, 180, 200), -1)
    if kind == "neutrophil":
        for dx, dy in ((-7, -4), (0, 5), (7, -3)):
            cv2.circle(img, (cx + dx, cy + dy), 5, (150, 60, 120), -1)
    else:
        cv2.circle(img, (cx, cy), 13, (110, 30, 60), -1)
    return img


def write_class_folders(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """Kaggle-like tree: root/NEUTROPHILS/_0_K.jpeg, _1_K.jpeg (two copies of each original K)."""
    rng = np.random.default_rng(seed)
    for folder, kind in CLASSES.items():
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class // 2):
            for copy in range(2):
                cv2.imwrite(str(d / f"_{copy}_{k + (100 if kind == 'neutrophil' else 200)}.png"),
                            cell_image(kind, rng))
    return root


def write_voc(root: Path, n: int = 6, seed: int = 0) -> Path:
    """A tiny Pascal VOC folder with wbc_types.csv: one or two WBC boxes per 160x120 image."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    rows = ["image,wbc_type"]
    for i in range(n):
        kind = "neutrophil" if i % 2 == 0 else "lymphocyte"
        img = np.full((120, 160, 3), (200, 190, 235), np.uint8)
        cell = cell_image(kind, rng)
        img[20:84, 30:110] = cell
        boxes = [(50, 30, 90, 72)]
        if i == 0:  # a second, smaller WBC: the main (labelled) one is the larger
            cv2.circle(img, (140, 100), 8, (110, 30, 60), -1)
            boxes.append((130, 90, 150, 110))
        name = f"Img_{i:03d}"
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), img)
        objs = "".join(
            f"<object><name>WBC</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for b in boxes
        )
        objs += ("<object><name>RBC</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax>"
                 "<ymax>20</ymax></bndbox></object>")
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>160</width>"
            f"<height>120</height><depth>3</depth></size>{objs}</annotation>"
        )
        rows.append(f"{name}.jpg,{kind}")
    rows.append("Img_999.jpg,basophil")  # labelled but missing: skipped
    (root / "wbc_types.csv").write_text("\n".join(rows) + "\n")
    return root


def train_tiny(root: Path) -> dict:
    """Train once (weights none, input 32, 1+1 epochs) in ``root`` and export.

    Returns paths, the card and the calibration crops the exporter received.
    """
    import training.export as export
    from training.train import TrainConfig, train

    data = write_class_folders(root / "cells")
    seen: dict = {}
    original = export.export_models

    def recording(model, calibration, *args, **kw):
        seen["calibration"] = calibration.copy()
        return original(model, calibration, *args, **kw)

    export.export_models = recording
    try:
        cfg = TrainConfig(data=[str(data)], out=str(root / "models" / "tiny.tflite"),
                          input_size=32, weights="none", frozen_epochs=1, epochs=1, copies=2,
                          batch_size=8, val_fraction=0.25, monitor_fraction=0.25,
                          min_images=2, use_segmenter=False, run_dir=str(root / "run"),
                          cache_dir=None, calib_max=200, run_eagerly=True)
        card = train(cfg)
    finally:
        export.export_models = original
    return {"root": root, "data": data, "model": Path(cfg.out), "card": card, "cfg": cfg,
            "calibration": seen["calibration"], "run_dir": root / "run"}
