"""Centre-in-box matching on hand-made boxes, and the evaluation loop on a stub segmenter."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from detector.core import Detections
from training.detection_eval import (
    PERTURBATIONS,
    evaluate_detection,
    evaluate_phone_photos,
    match_centres,
    perturb,
    phone_photo,
)
from training.voc import read_voc

from .test_voc import make_voc


def test_centre_inside_box_matches() -> None:
    gt = np.array([[0, 0, 100, 100]], np.float32)
    pred = np.array([[50, 50, 140, 140], [120, 0, 200, 80]], np.float32)  # centres 95,95 / 160,40
    pairs, up, ug = match_centres(pred, gt)
    assert pairs == [(0, 0)] and up == [1] and ug == []


def test_one_to_one_second_detection_in_same_box_is_false() -> None:
    gt = np.array([[0, 0, 100, 100]], np.float32)
    pred = np.array([[10, 10, 30, 30], [40, 40, 60, 60]], np.float32)  # the second is nearer
    pairs, up, ug = match_centres(pred, gt)
    assert pairs == [(1, 0)] and up == [0] and ug == []


def test_conflict_resolved_to_most_matches() -> None:
    # Pred 0's centre (55, 50) is in both boxes and nearer box 1; pred 1's centre only in box 1.
    gt = np.array([[0, 0, 60, 100], [50, 0, 150, 100]], np.float32)
    pred = np.array([[50, 40, 60, 60], [90, 40, 110, 60]], np.float32)
    pairs, up, ug = match_centres(pred, gt)
    assert pairs == [(0, 0), (1, 1)] and up == [] and ug == []


def test_empty_inputs() -> None:
    assert match_centres(np.empty((0, 4)), np.empty((0, 4))) == ([], [], [])
    assert match_centres(np.empty((0, 4)), np.array([[0, 0, 1, 1]])) == ([], [], [0])
    assert match_centres(np.array([[0, 0, 1, 1]]), np.empty((0, 4))) == ([], [0], [])


class StubSegmenter:
    """Returns fixed boxes, whatever the image."""

    def __init__(self, boxes: list[list[float]]) -> None:
        self.boxes = boxes

    def find(self, image: np.ndarray) -> Detections:
        return Detections(xyxy=np.asarray(self.boxes, np.float32).reshape(-1, 4))

    def find_still(self, image: np.ndarray) -> Detections:
        return self.find(image)  # a photo is read as a field


def test_phone_photos_are_scored_on_the_cells_inside_the_field(bccd_dir) -> None:
    recs = read_voc(bccd_dir)
    photo, wbc = phone_photo(recs, 0)
    assert photo.shape == (3024, 4032, 3) and len(wbc) == 23  # (of 38 in its 36 photos)
    res = evaluate_phone_photos(recs, StubSegmenter(wbc[:20].tolist()), photos=1)
    assert (res["found"], res["cells"]) == (20, 23) and res["recall"] == pytest.approx(20 / 23)
    assert evaluate_phone_photos(recs, StubSegmenter([]), photos=1)["recall"] == 0.0


def test_evaluate_detection_counts_and_failures(tmp_path: Path) -> None:
    recs = read_voc(make_voc(tmp_path))
    # Each image has one WBC box [10, 5, 30, 25]: one hit and one false alarm per image.
    res = evaluate_detection(recs, StubSegmenter([[12, 6, 28, 24], [40, 30, 60, 46]]), False)
    assert (res["tp"], res["fp"], res["fn"]) == (2, 2, 0)
    assert res["recall"] == 1.0 and res["precision"] == 0.5
    assert len(res["failures"]) == 2 and res["failures"][0]["false"] == [[40, 30, 60, 46]]
    assert res["ms_median"] > 0.0 and res["threads"] == 1
    res = evaluate_detection(recs, StubSegmenter([]), progress=False)
    assert (res["tp"], res["fp"], res["fn"], res["recall"]) == (0, 0, 2, 0.0)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturbations_keep_shape_and_boxes(kind: str) -> None:
    img = np.full((48, 64, 3), 200, np.uint8)
    boxes = np.array([[20, 10, 44, 38]], np.float32)
    out, b, ign = perturb(img, boxes, kind)
    if kind.startswith("resize_"):  # fewer pixels, the same view: the box shrinks with it
        f = float(kind.split("_")[1])
        assert out.shape == (round(48 * f), round(64 * f), 3) and out.dtype == np.uint8
        np.testing.assert_allclose(b, boxes * f, rtol=1e-5)
        return
    assert out.shape == img.shape and out.dtype == np.uint8
    last = re.split(r"\+(?=[a-z])", kind)[-1]  # joined kinds: the magnification comes last
    s = float(last.split("_")[1]) if last.startswith(("scale_", "mirror_")) else 1.0
    if s < 1:  # a wider field: the photo's box and its copies (mosaic) or mirror images, shrunk
        centre = np.array([32 + (32 - 32) * s, 24 + (24 - 24) * s])  # the photo's centre
        mid = (b[:, :2] + b[:, 2:]) / 2
        k = int(np.argmin(np.hypot(*(mid - centre).T)))
        np.testing.assert_allclose(b[k, 2] - b[k, 0], 24 * s, rtol=0.1)
        assert len(b) + len(ign) >= (2 if s <= 0.5 else 1)
    else:
        assert len(b) + len(ign) == 1
    if s > 1:
        np.testing.assert_allclose(b[0, 2] - b[0, 0], 24 * s, rtol=0.05)


def test_zoom_out_ignores_cells_at_the_mirror_seams() -> None:
    from training.detection_eval import _mirror_boxes

    # a cell clear of the edges: nine copies to be found; a cell at the left edge meets its
    # own mirror image there: its copies and the seams are ignore regions
    keep, ignore = _mirror_boxes(np.array([[40, 30, 60, 50], [0, 10, 20, 30]], np.float32),
                                 100, 80)
    assert len(keep) == 9 and [40, 30, 60, 50] in keep.tolist()
    assert [-60, 30, -40, 50] in keep.tolist()  # its mirror image left of the photo
    assert [0, 10, 20, 30] in ignore.tolist() and [-20, 10, 0, 30] in ignore.tolist()
    assert len(ignore) == 9 + 4  # the edge cell's copies and four seam bands


def test_zoom_out_is_a_mosaic_of_the_neighbouring_photos() -> None:
    """Zooming out to 0.5x puts other photos around this one: their cells are to be found
    too, shrunk with the field; a cell cut by its photo's edge is ignored, and so are the
    bands along the seams."""
    w, h = 100, 80
    photo = np.full((h, w, 3), 200, np.uint8)
    other = np.full((h, w, 3), 120, np.uint8)
    mine = np.array([[40, 30, 60, 50]], np.float32)
    theirs = np.array([[40, 30, 60, 50], [0, 10, 20, 30]], np.float32)  # one clear, one cut
    out, gt, ign = perturb(photo, mine, "scale_0.5", neighbours=[(other, theirs)])
    assert out.shape == photo.shape
    assert out[h // 2, w // 2, 0] == 200 and out[2, 2, 0] == 120  # the photo amid the others
    # the photo's cell at the centre, half size, and the neighbours' clear cells around it
    centres = (gt[:, :2] + gt[:, 2:]) / 2
    assert [50.0, 40.0] in centres.tolist() and len(gt) == 5
    inner = gt[(gt[:, 0] > 0) & (gt[:, 2] < w)]  # (not clipped by the frame's sides)
    assert len(inner) == 3 and np.allclose(inner[:, 2] - inner[:, 0], 10)  # shrunk to half
    # the neighbours' cut cell is never a cell to find: in the tile right of the photo it is
    # at (100 + 0, 10) + the 50/40 px margin, halved
    assert [75.0, 25.0, 85.0, 35.0] in ign.tolist()
    assert not any(np.allclose(b, [75, 25, 85, 35]) for b in gt)
    # a detection at a seam (the photo's left edge, x = 25 in the frame) is ignored
    _, still, _ = match_centres(np.array([[22, 30, 28, 40]], np.float32), ign)
    assert still == []


def test_joined_kinds_tint_the_neighbours_too() -> None:
    """``wb_cool+scale_0.5``: the whole wider field has the cast, not only the photo."""
    grey = np.full((80, 100, 3), 160, np.uint8)
    out, gt, _ = perturb(grey, np.array([[40, 30, 60, 50]], np.float32), "wb_cool+scale_0.5",
                         neighbours=[(grey.copy(), np.empty((0, 4), np.float32))])
    alone, _, _ = perturb(grey, np.empty((0, 4)), "wb_cool")
    np.testing.assert_array_equal(out[2, 2], alone[2, 2])  # a neighbour's corner, tinted
    np.testing.assert_array_equal(out[40, 50], alone[40, 50])
    assert gt.tolist() == [[45.0, 35.0, 55.0, 45.0]]
    with pytest.raises(ValueError, match="magnification comes last"):
        perturb(grey, np.empty((0, 4)), "scale_0.5+wb_cool")


def test_restain_turns_red_cells_teal_and_keeps_nuclei() -> None:
    bg, pink, violet = (212, 212, 212), (155, 150, 182), (200, 100, 130)
    img = np.zeros((20, 30, 3), np.uint8)
    img[:] = bg
    img[:, 10:20] = pink
    img[:, 20:] = violet
    out, _, _ = perturb(img, np.empty((0, 4)), "rbc_teal")
    b, g, r = (int(v) for v in out[5, 15])
    assert b > r + 15  # red cells now absorb red more than blue: blue-grey/teal
    np.testing.assert_allclose(out[5, 25], violet, atol=10)  # the nucleus keeps its colour
    np.testing.assert_allclose(out[5, 5], bg, atol=2)


def test_single_cell_figures(tmp_path: Path) -> None:
    from training.detection_eval import evaluate_single_cells

    for name, n in (("lymphocyte", 3), ("platelet", 2)):
        (tmp_path / name).mkdir()
        for i in range(n):
            cv2.imwrite(str(tmp_path / name / f"{i}.png"), np.full((40, 40, 3), 200, np.uint8))
    (tmp_path / "platelet" / ".DS_1.jpg").write_bytes(b"not an image")

    class Centre(StubSegmenter):
        def find_still(self, image: np.ndarray) -> Detections:
            return self.find(image)

    res = evaluate_single_cells(tmp_path, Centre([[10, 10, 30, 30]]), progress=False,
                                tuned=lambda i: i == 0)
    assert res["lymphocyte"]["images"] == 3 and res["lymphocyte"]["found"] == 1.0
    assert res["lymphocyte"]["held_out_images"] == 2
    assert res["platelet"]["images"] == 2 and res["platelet"]["one_cell"] == 1.0
    res = evaluate_single_cells(tmp_path, Centre([[0, 0, 5, 5]]), progress=False)
    assert res["lymphocyte"]["found"] == 0.0
    assert res["lymphocyte"]["missed"] == ["0.png", "1.png", "2.png"]


def test_single_cell_robustness_per_kind_and_class(tmp_path: Path) -> None:
    """Every ``every``-th image of each white-cell class from the 6th, the tuned ones and the
    not-white folders left out, perturbed per kind; a segmenter that needs 30 px loses the
    quarter-size copies."""
    from training.detection_eval import SINGLE_CELL_PERTURBATIONS, evaluate_single_cell_robustness

    # (EBO: the Munich AML set's erythroblasts, not white cells whatever the folder's name)
    for name in ("lymphocyte", "monocyte", "platelet", "EBO"):
        (tmp_path / name).mkdir()
        for i in range(8):
            cv2.imwrite(str(tmp_path / name / f"{i}.png"), np.full((40, 40, 3), 200, np.uint8))

    class NeedsPixels:
        def find_still(self, image: np.ndarray) -> Detections:
            h, w = image.shape[:2]
            return Detections(xyxy=[[w / 4, h / 4, 3 * w / 4, 3 * h / 4]] if w >= 30 else [])

    res = evaluate_single_cell_robustness(tmp_path, NeedsPixels(), kinds=("none", "resize_0.25"),
                                          every=1, tuned=lambda i: i == 5)
    assert res["none"]["images"] == 4  # images 6 and 7 of the two white-cell classes
    assert res["none"]["found"] == 1.0 and set(res["none"]["per_class"]) == {"lymphocyte",
                                                                               "monocyte"}
    assert res["resize_0.25"]["found"] == 0.0 and res["resize_0.25"]["worst_found"] == 0.0
    # zooming out (a mirrored surround: copies of the cell around it) is not a single-cell case
    assert "scale_2" in SINGLE_CELL_PERTURBATIONS
    assert not any(re.search(r"(scale|mirror)_0\.", k) for k in SINGLE_CELL_PERTURBATIONS)
    assert {"hue_+15", "burned_text", "burned_text_blue"} <= set(SINGLE_CELL_PERTURBATIONS)
    assert len(SINGLE_CELL_PERTURBATIONS) == 34


def test_single_cell_figures_with_a_classifier_veto(tmp_path: Path) -> None:
    """A centre cell the classifier names platelet or artefact is vetoed (not kept); one named
    erythroblast is kept and reported as such; the model's held-out images are scored apart."""
    from training.detection_eval import evaluate_single_cells

    for name, n in (("lymphocyte", 4), ("platelet", 2)):
        (tmp_path / name).mkdir()
        for i in range(n):
            cv2.imwrite(str(tmp_path / name / f"{i}.png"), np.full((40, 40, 3), 10 * i, np.uint8))

    class Named:
        """Names a crop by its grey level: 0 lymphocyte, 10 platelet, 20 erythroblast, 30
        artefact (the crop of the whole plain image)."""

        labels = ("lymphocyte", "erythroblast", "platelet", "artefact")

        def classify_boxes(self, frame_bgr: np.ndarray, xyxy: np.ndarray) -> np.ndarray:
            k = {0: 0, 10: 2, 20: 1, 30: 3}[int(frame_bgr[20, 20, 0])]
            return np.eye(4, dtype=np.float32)[[k] * len(xyxy)]

        def label_of(self, row: np.ndarray) -> tuple[str, float]:
            return self.labels[int(np.argmax(row))], float(np.max(row))

    res = evaluate_single_cells(tmp_path, StubSegmenter([[10, 10, 30, 30]]), progress=False,
                                classifier=Named(), held_out=lambda f: f.name == "0.png")
    lym, plt = res["lymphocyte"], res["platelet"]
    assert lym["found"] == 1.0 and lym["kept"] == 0.5  # 1.png platelet, 3.png artefact: vetoed
    assert lym["as_erythroblast"] == 0.25
    assert lym["not_kept"] == ["1.png", "3.png"]
    assert lym["labels"] == {"lymphocyte": 1, "platelet": 1, "erythroblast": 1, "artefact": 1}
    assert (lym["model_held_out_images"], lym["model_held_out_kept"]) == (1, 1.0)
    assert plt["found"] == 1.0 and plt["kept"] == 0.5  # 0.png named lymphocyte: kept
    res = evaluate_single_cells(tmp_path, StubSegmenter([[0, 0, 5, 5]]), progress=False,
                                classifier=Named())
    assert res["lymphocyte"]["kept"] == 0.0 and res["lymphocyte"]["labels"] == {"(none)": 4}


def test_held_out_of_names_images_by_content(tmp_path: Path) -> None:
    from training.data import content_group
    from training.detection_eval import held_out_of

    (tmp_path / "pbc" / "platelet").mkdir(parents=True)
    a, b = tmp_path / "pbc" / "platelet" / "a.png", tmp_path / "pbc" / "platelet" / "b.png"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    held = held_out_of({"val_images": [content_group(tmp_path / "pbc", "platelet", a, b"first")]},
                       tmp_path / "pbc")
    assert held(a) and not held(b)


def test_model_option_needs_single_cells(tmp_path: Path) -> None:
    from training.detection_eval import main

    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--model", str(tmp_path / "m.tflite")])
    assert exc.value.code == 2
