"""The committed tiny models are what ``python -m tests.tiny_models`` makes, and answer as their
docstring says (red -> eosinophil, blue -> lymphocyte, grey -> unidentified)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detector.classify import CellClassifier
from tests.tiny_models import (
    BLUE_BGR,
    GREY_BGR,
    RED_BGR,
    TINY_DIR,
    VARIANTS,
    build_tiny_models,
    solid_crops,
)

CROPS = solid_crops([RED_BGR, BLUE_BGR, GREY_BGR, (40, 200, 120)])


@pytest.mark.parametrize("variant", VARIANTS)
def test_committed_models_answer_as_documented(tiny_models: Path, variant: str) -> None:
    clf = CellClassifier(tiny_models / f"{variant}.tflite")
    names = [clf.label_of(row)[0] for row in clf.classify_crops(CROPS[:3])]
    assert names == ["eosinophil", "lymphocyte", "unidentified"]
    assert (tiny_models / f"{variant}.tflite").stat().st_size < 4096


@pytest.mark.train
def test_rebuild_matches_the_committed_models(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    some = ("int8", "logits")  # (all six take ~4x as long; the recipe is shared)
    fresh = build_tiny_models(tmp_path, some)
    for variant in some:
        a = CellClassifier(TINY_DIR / f"{variant}.tflite").classify_crops(CROPS)
        b = CellClassifier(fresh / f"{variant}.tflite").classify_crops(CROPS)
        np.testing.assert_allclose(a, b, atol=1 / 255, err_msg=variant)
        card = f"{variant}.json"
        assert json.loads((TINY_DIR / card).read_text()) == json.loads((fresh / card).read_text())
