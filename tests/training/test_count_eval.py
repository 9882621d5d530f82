"""Counting evaluation on short simulator clips, with a segmenter that returns the true boxes.

With perfect detections the only error sources are the tracker and the tally, so the counted total
must equal the truth total (cells fully in view for a few frames) and nothing may be counted twice.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from detector.analyzer import Analyzer
from detector.core import CELL_TYPES, UNIDENTIFIED, Detections
from detector.crop import CropRule
from training import count_eval

synth = pytest.importorskip("stream.synth")


class TruthSegmenter:
    """The simulator's boxes for the frame (cut cells flagged ``touches_edge``)."""

    def __init__(self, truth: dict) -> None:
        self.truth = truth

    def find(self, frame, *, in_sequence: bool = False) -> Detections:
        cells = self.truth["frame_truth"][frame.index]["cells"]
        boxes = np.array([c["box"] for c in cells], np.float32).reshape(-1, 4)
        edge = np.array([c["visible_fraction"] < 0.999 for c in cells], bool)
        return Detections(xyxy=boxes, touches_edge=edge)


class NeutrophilClassifier:
    """Says neutrophil for every crop (so crop accuracy = share of neutrophils)."""

    labels = CELL_TYPES
    min_score = 0.5
    crop_rule = CropRule(size=32)

    def classify_crops(self, crops):
        out = np.zeros((len(crops), len(self.labels)), np.float32)
        out[:, 0] = 0.9
        return out

    def classify_boxes(self, frame_bgr, xyxy):
        return self.classify_crops(np.zeros((len(xyxy), 32, 32, 3), np.uint8))

    def label_of(self, row):
        i = int(np.argmax(row))
        return (self.labels[i] if row[i] >= self.min_score else UNIDENTIFIED), float(row[i])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    parent = tmp_path_factory.mktemp("synth")
    synth.render_video(parent / "seed3", seconds=5.0, fps=30.0, seed=3, progress=False)
    shutil.copytree(parent / "seed3", parent / "seed3copy")  # a second "video" for the parent
    return parent


def truth_analyzer(folder: Path) -> Analyzer:
    return Analyzer(TruthSegmenter(synth.load_truth(folder)), NeutrophilClassifier())


def test_truth_total_definition(clips):
    truth = synth.load_truth(clips / "seed3")
    eligible = count_eval.truth_cells(truth)
    for cid, cell in eligible.items():
        w, h = truth["size"]
        frames = [c for ft in truth["frame_truth"] for c in ft["cells"]
                  if c["id"] == cid and c["visible_fraction"] >= 0.999
                  and c["box"][0] >= 1 and c["box"][1] >= 1
                  and c["box"][2] <= w - 1 and c["box"][3] <= h - 1]
        assert len(frames) == cell["full_frames"] >= count_eval.MIN_FULL_FRAMES


def test_perfect_detections_count_every_cell_once(clips):
    folder = clips / "seed3"
    v = count_eval.evaluate_video(folder, truth_analyzer(folder))
    truth = synth.load_truth(folder)
    assert v["frames"] == truth["frames"]
    assert v["truth_total"] == len(count_eval.truth_cells(truth)) >= 1
    assert v["counted"] == v["truth_total"]
    assert v["double_counts"] == 0 and v["missed"] == 0 and v["false_counts"] == 0
    neutro = sum(1 for c in count_eval.truth_cells(truth).values()
                 if c["label"] == "neutrophil")
    # every counted cell is named neutrophil, or unidentified when never seen sharp
    assert v["per_class"]["neutrophil"]["truth"] == neutro
    assert v["per_class"]["neutrophil"]["counted"] + v["unidentified"] == v["counted"]
    # the classifier names every crop neutrophil: right exactly on the neutrophils' crops
    assert v["crops_checked"] >= 1
    if neutro == v["truth_total"]:
        assert v["crop_accuracy"] == 1.0
    elif neutro == 0:
        assert v["crop_accuracy"] == 0.0
    else:
        assert 0.0 < v["crop_accuracy"] < 1.0
    # where the crops named wrong went: only non-neutrophils, all "named neutrophil"
    assert all(k.endswith("->neutrophil") and not k.startswith("neutrophil")
               for k in v["crops_named_wrong"])
    assert sum(v["crops_named_wrong"].values()) == round((1 - v["crop_accuracy"])
                                                         * v["crops_checked"])
    assert v["nrbc"] == v["vetoed"] == 0


def test_parent_folder_overall_table_and_json(clips, tmp_path, monkeypatch, capsys):
    folders = count_eval.synth_folders(clips)
    assert [f.name for f in folders] == ["seed3", "seed3copy"]
    # no model needed: the analyzer of each video is replaced by the truth-box one below
    monkeypatch.setattr(count_eval, "build_analyzer", lambda model: None)
    made = []
    orig = count_eval.evaluate_video

    def spy(folder, analyzer, max_frames=None):
        made.append(folder.name)
        return orig(folder, truth_analyzer(folder), max_frames)

    monkeypatch.setattr(count_eval, "evaluate_video", spy)
    out = tmp_path / "report"
    code = count_eval.main_counting(argparse.Namespace(data=str(clips), model=None,
                                                       out=str(out)))
    assert code == 0 and made == ["seed3", "seed3copy"]
    text = capsys.readouterr().out
    assert "seed3copy" in text and "overall" in text
    report = json.loads((out / "counting.json").read_text())
    o = report["overall"]
    assert o["videos"] == 2
    assert o["counted"] == o["truth_total"] == sum(v["truth_total"] for v in report["per_video"])
    assert o["targets"]["total_within_1pct"] and o["targets"]["double_counts_le_1pct"]


def test_summarize_flags_double_counts():
    v = {"frames": 10, "truth_total": 50, "counted": 53, "double_counts": 3, "missed": 0,
         "missed_never_detected": 0, "false_counts": 0, "unidentified": 0,
         "crop_accuracy": 0.9, "crops_checked": 10,
         "per_class": {"neutrophil": {"counted": 33, "truth": 30},
                       "lymphocyte": {"counted": 20, "truth": 20}}}
    o = count_eval.summarize([v])
    assert o["nrbc"] == o["vetoed"] == 0 and o["crops_named_wrong"] == {}
    assert o["double_pct"] == 6.0 and not o["targets"]["double_counts_le_1pct"]
    assert not o["targets"]["total_within_1pct"] and not o["targets"]["total_within_2pct"]
    assert count_eval.summarize([{**v, "counted": 51}])["targets"]["total_within_2pct"]
    assert not o["targets"]["per_class_within_2_or_3pct"]  # 3 neutrophils too many (> 2, > 3 %)


def test_not_a_synth_folder(tmp_path):
    from detector.errors import InputError

    with pytest.raises(InputError, match="truth.json"):
        count_eval.synth_folders(tmp_path)


def test_summary_says_where_the_cells_outside_the_total_went():
    base = {"frames": 10, "truth_total": 10, "double_counts": 0, "missed": 0,
            "missed_never_detected": 0, "false_counts": 0, "unidentified": 0,
            "crop_accuracy": 0.8, "crops_checked": 10,
            "per_class": {"monocyte": {"counted": 8, "truth": 10}}}
    a = {**base, "counted": 8, "nrbc": 1, "vetoed": 1,
         "crops_named_wrong": {"monocyte->erythroblast": 1, "monocyte->platelet": 1}}
    b = {**base, "counted": 9, "nrbc": 1, "vetoed": 0,
         "crops_named_wrong": {"monocyte->erythroblast": 2}}
    o = count_eval.summarize([a, b])
    assert o["nrbc"] == 2 and o["vetoed"] == 1
    assert o["crops_named_wrong"] == {"monocyte->erythroblast": 3, "monocyte->platelet": 1}
    text = count_eval.format_table({"per_video": [], "overall": o})
    assert "2 named erythroblast (NRBC), 1 vetoed" in text
    assert "monocyte->erythroblast 3, monocyte->platelet 1" in text
