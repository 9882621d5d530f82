"""Centre-in-box matching on hand-made boxes, and the evaluation loop on a stub segmenter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detector.core import Detections
from training.detection_eval import PERTURBATIONS, evaluate_detection, match_centres, perturb
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
    assert out.shape == img.shape and out.dtype == np.uint8
    assert len(b) + len(ign) == 1
    if kind.startswith("scale_"):
        s = float(kind.split("_")[1])
        np.testing.assert_allclose(b[0, 2] - b[0, 0], 24 * s, rtol=0.05)
