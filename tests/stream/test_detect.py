"""``hematovision detect`` end to end with a tiny real model and a fake (or the real) segmenter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from detector.core import Detections
from detector.draw import colour_of
from stream import cli, detect
from tests.tiny_models import (
    BLUE_BGR,
    RED_BGR,
    TINY_LABELS,
    tiny_models,  # noqa: F401  (session fixture)
)

REPO = Path(__file__).resolve().parents[2]
BG = 200  # background grey of the synthetic images
PINK = (200, 185, 225)  # a cell-free stained background (BGR): colour, but no blob


class SquareSegmenter:
    """Stands in for detector.segment.Segmenter: every non-background blob is a cell."""

    def __init__(self, options: object = None) -> None:
        pass

    def find(self, image: np.ndarray) -> Detections:
        mask = (np.abs(image.astype(int) - BG).max(axis=2) > 60).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask)
        boxes = [[x, y, x + w, y + h] for x, y, w, h, _ in stats[1:n]]
        return Detections(xyxy=np.array(boxes, np.float32).reshape(-1, 4))

    def find_still(self, image: np.ndarray) -> Detections:
        return self.find(image)  # a photo is read as a field


def _smear(h: int = 160, w: int = 240) -> np.ndarray:
    """Grey image with a red square (eosinophil for the tiny model) right of a blue one."""
    img = np.full((h, w, 3), BG, np.uint8)
    img[60:100, 130:170] = RED_BGR
    img[40:80, 30:70] = BLUE_BGR
    return img


def _write(path: Path, img: np.ndarray) -> Path:
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[str], list[str]]:
    code = cli.main(["detect", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


@pytest.fixture
def fake_seg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detect, "Segmenter", SquareSegmenter)



def test_json_schema_one_line_per_image(tiny_models: Path, tmp_path: Path,  # noqa: F811
                                        capsys: pytest.CaptureFixture, fake_seg: None) -> None:
    a = _write(tmp_path / "a.png", _smear())
    b = _write(tmp_path / "b.png", np.full((100, 120, 3), PINK, np.uint8))  # no cells
    code, out, err = _run(capsys, str(a), str(b), "--json", "--model",
                          str(tiny_models / "int8.tflite"))
    assert code == 0 and err == []
    assert len(out) == 2
    first, second = (json.loads(line) for line in out)
    assert set(first) == {"image", "width", "height", "cells"}
    assert (first["image"], first["width"], first["height"]) == (str(a), 240, 160)
    assert second["cells"] == [] and second["image"] == str(b)
    cells = first["cells"]
    # sorted top to bottom: the blue square (y=40) comes before the red one (y=60)
    assert [c["label"] for c in cells] == ["lymphocyte", "eosinophil"]
    assert cells[0]["box"] == [30, 40, 70, 80] and cells[1]["box"] == [130, 60, 170, 100]
    for c in cells:
        assert set(c) == {"box", "label", "score", "scores", "cut"} and c["cut"] is False
        assert all(isinstance(v, int) for v in c["box"])
        assert list(c["scores"]) == list(TINY_LABELS)
        assert c["score"] == max(c["scores"].values()) and c["score"] > 0.95
        assert all(round(p, 4) == p for p in c["scores"].values())


def test_bad_files_mixed_in(tiny_models: Path, tmp_path: Path,  # noqa: F811
                            capsys: pytest.CaptureFixture, fake_seg: None) -> None:
    good1 = _write(tmp_path / "good1.png", _smear())
    bad = tmp_path / "bad.jpg"
    bad.write_text("this is not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    small = _write(tmp_path / "small.png", np.zeros((10, 10, 3), np.uint8))
    good2 = _write(tmp_path / "good2.jpg", _smear())
    missing = tmp_path / "missing.png"
    code, out, err = _run(capsys, str(good1), str(bad), str(empty), str(missing), str(small),
                          str(good2), "--json", "--model", str(tiny_models / "uint8.tflite"))
    assert code == 1
    assert [json.loads(line)["image"] for line in out] == [str(good1), str(good2)]
    assert err == [
        f"hematovision detect: {bad}: not a readable image",
        f"hematovision detect: {empty}: not a readable image",
        f"hematovision detect: {missing}: no such file or folder",
        f"hematovision detect: {small}: image too small (10x10; at least 32x32 pixels)",
    ]


def test_odd_image_formats(tiny_models: Path, tmp_path: Path,  # noqa: F811
                           capsys: pytest.CaptureFixture, fake_seg: None) -> None:
    gray = _write(tmp_path / "gray.png", cv2.cvtColor(_smear(), cv2.COLOR_BGR2GRAY))
    rgba = np.dstack([_smear(), np.full((160, 240), 255, np.uint8)])
    rgba[:, :20, 3] = 0  # a transparent strip composites to white (background-like)
    rgba_path = _write(tmp_path / "rgba.png", rgba)
    deep = _write(tmp_path / "deep.png", _smear().astype(np.uint16) * 257)
    code, out, err = _run(capsys, str(gray), str(rgba_path), str(deep), "--json",
                          "--model", str(tiny_models / "float32.tflite"))
    # a greyscale photo has no stain colour: said so, instead of "0 white cells"
    assert code == 1 and err == [
        f"hematovision detect: {gray}: greyscale image: white cells are found and named by "
        "their stain, so a colour photo of a stained smear is needed"]
    recs = {Path(r["image"]).name: r for r in map(json.loads, out)}
    assert set(recs) == {"rgba.png", "deep.png"}
    assert [c["label"] for c in recs["rgba.png"]["cells"]] == ["lymphocyte", "eosinophil"]
    assert [c["label"] for c in recs["deep.png"]["cells"]] == ["lymphocyte", "eosinophil"]


def test_cell_cut_by_the_edge_named_flagged_and_drawn(
        tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture,  # noqa: F811
        fake_seg: None) -> None:
    img = _smear()
    img[130:160, 200:240] = RED_BGR  # a red cell cut by the bottom-right corner
    path = _write(tmp_path / "edge.png", img)
    code, out, err = _run(capsys, str(path), "--json", "--save-dir", str(tmp_path / "drawn"),
                          "--model", str(tiny_models / "int8.tflite"))
    assert code == 0 and err == []
    cells = json.loads(out[0])["cells"]
    assert [(c["label"], c["box"], c["cut"]) for c in cells] == [
        ("lymphocyte", [30, 40, 70, 80], False), ("eosinophil", [130, 60, 170, 100], False),
        ("eosinophil", [200, 130, 240, 160], True)]
    drawn = cv2.imread(str(tmp_path / "drawn" / "edge.png"))
    # the cut cell's box is dashed: down its left side, box colour alternates with the cell's
    side = drawn[136:158, 200].astype(int)
    box_colour = np.array(colour_of("eosinophil"))
    assert (np.abs(side - box_colour).sum(axis=1) < 30).sum() >= 4
    assert (np.abs(side - RED_BGR).sum(axis=1) < 30).sum() >= 4


def test_folder_table_and_save_dir(tiny_models: Path, tmp_path: Path,  # noqa: F811
                                   capsys: pytest.CaptureFixture, fake_seg: None) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    _write(src / "one.png", _smear())
    _write(src / "two.jpg", _smear())
    (src / "readme.txt").write_text("ignored")
    (tmp_path / "empty").mkdir()
    out_dir = tmp_path / "annotated"
    code, out, err = _run(capsys, str(src), str(tmp_path / "empty"), "--save-dir", str(out_dir),
                          "--model", str(tiny_models / "int8.tflite"))
    assert code == 1
    assert err == [f"hematovision detect: {tmp_path / 'empty'}: folder holds no images "
                   "(.bmp, .dib, .jp2, .jpe, .jpeg, .jpg, ...)"]
    text = "\n".join(out)
    assert f"{src / 'one.png'}  (240x160): 2 white cells" in text
    assert "lymphocyte" in text and "eosinophil" in text
    assert "2 images, 4 white cells: eosinophil 2, lymphocyte 2" in text
    saved = sorted(p.name for p in out_dir.iterdir())
    assert saved == ["one.png", "two.png"]
    annotated = cv2.imread(str(out_dir / "one.png"))
    assert annotated.shape == (160, 240, 3)
    assert not np.array_equal(annotated, _smear())  # boxes drawn


def test_missing_model_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    img = _write(tmp_path / "a.png", _smear())
    code, out, err = _run(capsys, str(img), "--model", str(tmp_path / "none.tflite"))
    assert code == 2 and out == []
    assert err == [f"hematovision detect: error: {tmp_path / 'none.tflite'}: model file not found"]


def test_real_segmenter_on_real_smear(tiny_models: Path, bccd_dir: Path,  # noqa: F811
                                      capsys: pytest.CaptureFixture) -> None:
    path = bccd_dir / "JPEGImages" / "BloodImage_00001.jpg"
    code, out, err = _run(capsys, str(path), "--json", "--model",
                          str(tiny_models / "int8.tflite"))
    assert code == 0 and err == []
    rec = json.loads(out[0])
    assert (rec["width"], rec["height"]) == (640, 480)
    assert len(rec["cells"]) >= 1
    for c in rec["cells"]:
        x1, y1, x2, y2 = c["box"]
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480


def test_runtime_imports_no_tensorflow() -> None:
    code = ("import sys; import detector, detector.classify, detector.draw, stream.detect, "
            "stream.images; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'keras', 'training')]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_shipped_model_on_real_smear(shipped_model: Path, bccd_dir: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    """The default model loads (card and tensors agree) and names the cell of a real smear."""
    path = bccd_dir / "JPEGImages" / "BloodImage_00047.jpg"  # a lymphocyte, held out in training
    code, out, err = _run(capsys, str(path), "--json", "--model", str(shipped_model))
    assert code == 0 and err == []
    rec = json.loads(out[0])
    labels = json.loads(shipped_model.with_suffix(".json").read_text())["labels"]
    assert len(rec["cells"]) >= 1
    for c in rec["cells"]:
        assert list(c["scores"]) == labels
        assert c["label"] in [*labels, "unidentified"]
        assert sum(c["scores"].values()) == pytest.approx(1.0, abs=0.02)
