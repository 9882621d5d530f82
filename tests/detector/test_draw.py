"""Drawing on synthetic frames: colours on the box outline, tags, panel, input left untouched."""

from __future__ import annotations

import numpy as np
import pytest

from detector.core import KNOWN_LABELS, UNIDENTIFIED, Detections, Summary
from detector.draw import GREY, TYPE_COLOURS, colour_of, draw_cells, draw_panel
from detector.tally import Tally

CELL_TYPES = KNOWN_LABELS
LABELS = (*CELL_TYPES, UNIDENTIFIED)


def _frame(value: int = 60, h: int = 240, w: int = 320) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_colours_fixed_and_distinct() -> None:
    assert set(TYPE_COLOURS) == set(CELL_TYPES)
    colours = [colour_of(t) for t in CELL_TYPES] + [colour_of(UNIDENTIFIED)]
    assert len(set(colours)) == len(colours)
    assert colour_of(UNIDENTIFIED) == GREY == colour_of(None)
    assert colour_of("smudge") == colour_of("smudge") != GREY  # labels outside KNOWN_LABELS


@pytest.mark.parametrize("cid", range(len(CELL_TYPES)))
def test_box_outline_has_type_colour(cid: int) -> None:
    frame = _frame()
    dets = Detections(xyxy=[[100, 100, 180, 170]], class_id=[cid], score=[0.97], track_id=[12])
    out = draw_cells(frame, dets, LABELS)
    colour = TYPE_COLOURS[CELL_TYPES[cid]]
    assert tuple(out[170, 140]) == colour  # bottom edge, away from the tag
    assert tuple(out[135, 100]) == colour  # left edge
    assert tuple(out[135, 140]) == (60, 60, 60)  # inside untouched
    # the tag's filled background sits just above the box
    assert (out[80:99, 100:200] == colour).all(axis=2).sum() > 200
    assert (frame == 60).all()  # input not modified


def test_unidentified_and_unclassified_are_grey() -> None:
    frame = _frame()
    dets = Detections(xyxy=[[20, 60, 80, 120], [150, 60, 220, 130]],
                      class_id=[LABELS.index(UNIDENTIFIED), -1], score=[0.31, 0.0],
                      track_id=[3, -1])
    out = draw_cells(frame, dets, LABELS)
    assert tuple(out[120, 50]) == GREY
    assert tuple(out[130, 185]) == GREY
    # the unclassified, untracked cell has no tag above it
    assert (out[40:59, 150:220] == 60).all()


def test_label_column_names_cells_without_class_id() -> None:
    dets = Detections(xyxy=[[100, 100, 180, 170]], class_id=[-1], score=[0.4],
                      data={"label": np.array([UNIDENTIFIED], dtype=object)})
    out = draw_cells(_frame(), dets, CELL_TYPES)
    assert tuple(out[170, 140]) == GREY
    assert (out[80:99, 100:200] == GREY).all(axis=2).sum() > 200


def test_track_ids_can_be_hidden() -> None:
    dets = Detections(xyxy=[[100, 100, 180, 170]], class_id=[-1], track_id=[7])
    shown = draw_cells(_frame(), dets, LABELS)
    hidden = draw_cells(_frame(), dets, LABELS, show_track_ids=False)
    assert (shown[80:99, 100:200] == GREY).all(axis=2).sum() > 50
    assert (hidden[80:99, 100:200] == 60).all()


def test_empty_and_out_of_frame_boxes() -> None:
    frame = _frame()
    out = draw_cells(frame, Detections.empty(), LABELS)
    assert out is not frame and np.array_equal(out, frame)
    dets = Detections(xyxy=[[-30, -30, 40, 40], [300, 200, 400, 300]], class_id=[0, 99],
                      score=[0.9, 0.9], track_id=[1, 2])
    out = draw_cells(frame, dets, LABELS)  # tags clamped into the image, bad class_id -> grey
    assert out.shape == frame.shape
    assert tuple(out[40, 20]) == TYPE_COLOURS["neutrophil"]  # bottom edge of the clipped box
    assert tuple(out[220, 300]) == GREY  # left edge of the box with an unknown class_id


def test_inplace() -> None:
    frame = _frame()
    dets = Detections(xyxy=[[100, 100, 180, 170]], class_id=[0], score=[0.9])
    assert draw_cells(frame, dets, LABELS, inplace=True) is frame
    assert tuple(frame[170, 140]) == TYPE_COLOURS["neutrophil"]


def test_panel_is_semi_transparent_and_shows_rows() -> None:
    frame = _frame(200, 480, 640)
    summary = Summary(counts={"neutrophil": 12, "lymphocyte": 5, UNIDENTIFIED: 1}, total=18,
                      target=100, ci95={},
                      differential={"neutrophil": 66.7, "lymphocyte": 27.8, UNIDENTIFIED: 5.6})
    out = draw_panel(frame, summary, fps=24.5)
    assert (frame == 200).all()
    corner = out[2:6, 2:6]
    assert (corner < 200).all() and (corner > 20).all()  # darkened, not opaque
    panel = out[:150, :250]
    assert (panel == 255).all(axis=2).sum() > 100  # white text
    # a swatch per row in the class colour
    assert (panel == TYPE_COLOURS["neutrophil"]).all(axis=2).sum() > 20
    assert (panel == TYPE_COLOURS["lymphocyte"]).all(axis=2).sum() > 20
    assert (out[400:, 400:] == 200).all()  # the rest untouched


def test_panel_empty_summary_and_tiny_frame() -> None:
    out = draw_panel(_frame(), None, fps=None)
    assert (out[5, 5] < 60).all()
    tiny = draw_panel(_frame(100, 20, 30), Summary({"neutrophil": 3}, 3, 100,
                                                   {"neutrophil": 100.0}, {}))
    assert tiny.shape == (20, 30, 3)


def test_panel_shows_nrbc_only_when_counted() -> None:
    """An NRBC line (one more text row) appears once an erythroblast was counted."""
    tally = Tally(("neutrophil", "erythroblast"))
    tally.count(1, "neutrophil", 0.9, 0, 1, [0, 0, 9, 9])

    def rows(summary: Summary) -> int:
        out = draw_panel(_frame(200, 480, 640), summary)
        dark = (out[:, 5] < 200).all(axis=1)  # the panel's darkened column
        return int(np.flatnonzero(dark).max())

    before = rows(tally.summary())
    tally.count(2, "erythroblast", 0.9, 0, 1, [0, 0, 9, 9])
    s = tally.summary()
    assert (s.nrbc, s.total, s.nrbc_per_100_wbc) == (1, 1, 100.0)
    assert rows(s) > before + 10


def test_rejected_cells_drawn_thin() -> None:
    """A platelet (vetoed, never counted) gets its colour but a 1 px box, a white cell 2 px."""
    labels = ("neutrophil", "platelet")
    dets = Detections(xyxy=[[20, 20, 80, 80], [150, 20, 210, 80]], class_id=[0, 1],
                      score=[0.9, 0.9])
    out = draw_cells(_frame(), dets, labels)
    assert tuple(out[50, 21]) == TYPE_COLOURS["neutrophil"]  # second pixel of a 2 px line
    assert tuple(out[50, 150]) == TYPE_COLOURS["platelet"]
    assert tuple(out[50, 151]) == (60, 60, 60)
