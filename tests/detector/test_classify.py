"""CellClassifier and ModelCard on tiny real .tflite models with hand-checked answers."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from detector.classify import CellClassifier, ModelCard, card_path_for
from detector.core import UNIDENTIFIED, VETO_MIN_SCORE
from detector.crop import CropRule
from detector.errors import ModelError
from tests.tiny_models import (
    BLUE_BGR,
    GREY_BGR,
    RED_BGR,
    TINY_LABELS,
    TINY_SIZE,
    VARIANTS,
    card_for,
    solid_crops,
    tiny_models,  # noqa: F401  (session fixture)
)

train = pytest.mark.train


def _copy(tiny: Path, variant: str, dest: Path, card: dict | None | str = "same") -> Path:
    """Copy a tiny model into ``dest`` as ``m.tflite``; card: "same", None (none) or a dict."""
    dest.mkdir(parents=True, exist_ok=True)
    model = dest / "m.tflite"
    shutil.copy(tiny / f"{variant}.tflite", model)
    if card == "same":
        shutil.copy(tiny / f"{variant}.json", dest / "m.json")
    elif card is not None:
        (dest / "m.json").write_text(json.dumps(card))
    return model


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(ModelError) as info:
        CellClassifier(path, **kwargs)
    return str(info.value)


# -- answers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_labels_red_blue_grey(tiny_models: Path, variant: str) -> None:  # noqa: F811
    clf = CellClassifier(tiny_models / f"{variant}.tflite")
    assert clf.labels == TINY_LABELS
    scores = clf.classify_crops(solid_crops([RED_BGR, BLUE_BGR, GREY_BGR]))
    assert scores.shape == (3, 3) and scores.dtype == np.float32
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=0.02)
    # BGR (0, 0, 255) is red: a runtime that skipped BGR->RGB would call it a lymphocyte.
    assert clf.label_of(scores[0])[0] == "eosinophil" and scores[0, 0] > 0.98
    assert clf.label_of(scores[1])[0] == "lymphocyte" and scores[1, 1] > 0.98
    label, score = clf.label_of(scores[2])
    assert label == UNIDENTIFIED
    assert score == pytest.approx(1 / 3, abs=0.02)


@pytest.mark.parametrize("variant", ["int8", "uint8", "float32"])
@pytest.mark.parametrize("pad", [False, True])
def test_batch_equals_single_calls(tiny_models: Path, variant: str, pad: bool) -> None:  # noqa: F811
    clf = CellClassifier(tiny_models / f"{variant}.tflite", pad_batches=pad)
    colours = [RED_BGR, BLUE_BGR, GREY_BGR, (30, 60, 200), (200, 90, 10)]
    crops = solid_crops(colours)
    rng = np.random.default_rng(1)
    crops = np.clip(crops.astype(int) + rng.integers(-20, 20, crops.shape), 0, 255).astype(np.uint8)
    batch = clf.classify_crops(crops)
    singles = np.concatenate([clf.classify_crops(c[None]) for c in crops])
    np.testing.assert_allclose(batch, singles, atol=1e-6)
    # and again after the interpreter went back to batch 1 (resize both ways)
    np.testing.assert_allclose(clf.classify_crops(crops), batch, atol=1e-6)


def test_large_batch_is_chunked(tiny_models: Path) -> None:  # noqa: F811
    clf = CellClassifier(tiny_models / "int8.tflite")
    crops = solid_crops([RED_BGR, BLUE_BGR] * 25)  # 50 > MAX_BATCH
    labels = [clf.label_of(r)[0] for r in clf.classify_crops(crops)]
    assert labels == ["eosinophil", "lymphocyte"] * 25


def test_min_score_override_and_decide(tiny_models: Path) -> None:  # noqa: F811
    path = tiny_models / "int8.tflite"
    assert CellClassifier(path).min_score == 0.5  # from the card
    clf = CellClassifier(path, min_score=0.2)
    scores = clf.classify_crops(solid_crops([RED_BGR, GREY_BGR, BLUE_BGR]))
    assert clf.label_of(scores[1])[0] != UNIDENTIFIED
    strict = CellClassifier(path)
    ids, top = strict.decide(scores)
    assert ids.tolist() == [0, -1, 1]
    assert ids.dtype == np.int32 and top.dtype == np.float32
    assert [strict.label_of(r)[1] for r in scores] == pytest.approx(top.tolist())


def test_a_cell_is_rejected_only_when_the_model_is_sure_it_is_no_white_cell(shipped_model) -> None:
    """Below ``VETO_MIN_SCORE`` a candidate named platelet or artefact is ``unidentified`` (kept
    and shown for review), not rejected; white-cell labels keep ``min_score``."""
    clf = CellClassifier(shipped_model)
    labels = list(clf.labels)

    def row(**p: float) -> np.ndarray:
        r = np.zeros(len(labels), np.float32)
        for k, v in p.items():
            r[labels.index(k)] = v
        r[labels.index("lymphocyte")] += 1.0 - r.sum()
        return r

    rows = np.stack([row(platelet=0.95), row(platelet=0.85), row(artefact=0.7),
                     row(neutrophil=0.6)])
    assert [clf.label_of(r)[0] for r in rows] == ["platelet", UNIDENTIFIED, UNIDENTIFIED,
                                                  "neutrophil"]
    ids, top = clf.decide(rows)
    assert ids.tolist() == [labels.index("platelet"), -1, -1, labels.index("neutrophil")]
    assert top.tolist() == pytest.approx([0.95, 0.85, 0.7, 0.6])
    assert VETO_MIN_SCORE == 0.9
    clf.min_score = 0.97  # a stricter user setting applies to rejections too
    assert clf.label_of(rows[0])[0] == UNIDENTIFIED


def test_classify_boxes_cuts_with_the_card_rule(tiny_models: Path) -> None:  # noqa: F811
    clf = CellClassifier(tiny_models / "uint8.tflite")
    assert clf.crop_rule == CropRule(margin=0.15, square=True, size=TINY_SIZE)
    frame = np.full((120, 200, 3), 128, dtype=np.uint8)
    frame[20:60, 20:60] = RED_BGR
    frame[50:100, 120:170] = BLUE_BGR
    boxes = np.array([[25, 25, 55, 55], [125, 55, 165, 95]], dtype=np.float32)
    scores = clf.classify_boxes(frame, boxes)
    assert [clf.label_of(r)[0] for r in scores] == ["eosinophil", "lymphocyte"]
    assert clf.classify_boxes(frame, np.empty((0, 4))).shape == (0, 3)


def test_crop_shape_checked(tiny_models: Path) -> None:  # noqa: F811
    clf = CellClassifier(tiny_models / "int8.tflite")
    assert clf.classify_crops(np.empty((0, TINY_SIZE, TINY_SIZE, 3), np.uint8)).shape == (0, 3)
    assert clf.classify_crops(solid_crops([RED_BGR])[0]).shape == (1, 3)  # one (S, S, 3) crop
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\) uint8"):
        clf.classify_crops(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        clf.classify_crops(np.zeros((2, 32, 32, 3), np.float32))


def test_card_fields(tiny_models: Path) -> None:  # noqa: F811
    clf = CellClassifier(tiny_models / "logits.tflite")
    card = clf.card
    assert card.outputs == "logits" and card.input_dtype == "int8"
    assert card.trained_on == {"note": "fixed weights, not trained: red vs blue"}
    assert card.path == tiny_models / "logits.json"
    assert ModelCard.from_dict(card.to_dict(), source="x.json") == ModelCard.from_dict(
        json.loads((tiny_models / "logits.json").read_text()), source="x.json")


# -- errors ---------------------------------------------------------------------------------------


def test_missing_model_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.tflite"
    msg = _error(path)
    assert str(path) in msg and "not found" in msg


def test_missing_card(tmp_path: Path) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(b"whatever")
    msg = _error(path)
    assert str(tmp_path / "m.json") in msg and "card not found" in msg


def test_unparsable_card(tmp_path: Path) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(b"whatever")
    (tmp_path / "m.json").write_text('{"labels": ["a", "b"],\n "input": {')
    msg = _error(path)
    assert str(tmp_path / "m.json") in msg and "not valid JSON" in msg and "line 2" in msg


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c.update(labels=[]), "'labels' must be a non-empty list"),
        (lambda c: c.update(labels=["a", "a", "b"]), "duplicates"),
        (lambda c: c.update(labels=["a", "unidentified", "b"]), "must not contain"),
        (lambda c: c.pop("input"), "'input' must be an object"),
        (lambda c: c["input"].update(size="big"), "input.size"),
        (lambda c: c["input"].update(channels=1), "input.channels must be 3"),
        (lambda c: c["input"].update(dtype="float16"), "unsupported input.dtype 'float16'"),
        (lambda c: c["input"].update(color_order="HSV"), "color_order"),
        (lambda c: c.update(preprocessing="inception: x/255"), "unsupported preprocessing"),
        (lambda c: c.update(outputs="sigmoid"), "'outputs' must be one of"),
        (lambda c: c["crop"].update(size=64), "crop.size 64 differs from input.size 32"),
        (lambda c: c["crop"].update(margin=5), "bad 'crop' rule"),
        (lambda c: c.update(min_score=1.5), "'min_score' must be a number in [0, 1]"),
        (lambda c: c.update(format_version=2), "format_version"),
        (lambda c: c.update(evaluation=[1, 2]), "'evaluation' must be an object"),
    ],
)
def test_bad_card_fields(tmp_path: Path, change, expected: str) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(b"whatever")  # the card is checked before the model is opened
    card = card_for("m", dtype="int8")
    change(card)
    (tmp_path / "m.json").write_text(json.dumps(card))
    msg = _error(path)
    assert msg.startswith(str(tmp_path / "m.json")) and expected in msg


def test_card_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="must be a JSON object"):
        ModelCard.load(tmp_path / "m.json")


@pytest.mark.parametrize("content", [b"", b"not a flatbuffer at all" * 20])
def test_corrupt_tflite(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(content)
    (tmp_path / "m.json").write_text(json.dumps(card_for("m", dtype="int8")))
    msg = _error(path)
    assert msg.startswith(str(path)) and "not a valid TFLite model" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("variant", "card", "expected"),
    [
        ("int8", dict(dtype="int8", labels=("neutrophil", "lymphocyte")),
         "outputs 3 classes but the card lists 2 labels"),
        ("int8", dict(dtype="int8", size=64), "32x32 but the card says input.size 64"),
        ("int8", dict(dtype="uint8"), "input tensor is int8 but the card says uint8"),
        ("int32in", None, "unsupported input tensor dtype int32"),
    ],
    ids=["labels-count", "input-size", "dtype", "unsupported-dtype"],
)
def test_card_and_tensors_disagree(tiny_models: Path, tmp_path: Path, variant: str,  # noqa: F811
                                   card: dict | None, expected: str) -> None:
    """A card that disagrees with the tensors is a ModelError naming the model file."""
    path = _copy(tiny_models, variant, tmp_path, card_for("m", **card) if card else "same")
    msg = _error(path)
    assert msg.startswith(str(path)) and expected in msg


def test_wrong_channel_count(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    path = _copy(tiny_models, "gray", tmp_path, card_for("m", dtype="float32"))
    msg = _error(path)
    assert msg.startswith(str(path)) and "1 channel(s) but the card says 3" in msg
    path = _copy(tiny_models, "gray", tmp_path / "b")  # its own card says channels 1
    msg = _error(path)
    assert msg.startswith(str(tmp_path / "b" / "m.json")) and "input.channels must be 3" in msg


def test_card_path_and_missing_model(tmp_path: Path) -> None:
    assert card_path_for(tmp_path / "x.tflite") == tmp_path / "x.json"
    msg = _error(tmp_path / "x.tflite")
    assert msg == f"{tmp_path / 'x.tflite'}: model file not found"


@train
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter.*")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_falls_back_to_tensorflow_lite(tiny_models: Path,  # noqa: F811
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorflow")
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    clf = CellClassifier(tiny_models / "int8.tflite")
    assert clf.runtime == "tensorflow"
    scores = clf.classify_crops(solid_crops([RED_BGR, BLUE_BGR]))
    assert [clf.label_of(r)[0] for r in scores] == ["eosinophil", "lymphocyte"]
