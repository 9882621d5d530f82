"""White-cell segmenter: synthetic smears with known answers, and real BCCD images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from detector.core import Frame, box_iou
from detector.errors import InputError
from detector.segment import Segmenter, SegmenterOptions, _boxed_components

BG = (214, 212, 210)  # BGR glass
RBC = (155, 150, 182)  # pink red cell
CYTO = (196, 160, 190)  # pale lilac neutrophil cytoplasm
NUC = (200, 100, 130)  # violet nucleus
PLT = (200, 110, 140)  # platelet


def smear(
    size: tuple[int, int] = (640, 480),
    cells: tuple[tuple[int, int], ...] = ((320, 240),),
    platelets: tuple[tuple[int, int], ...] = (),
    scale: float = 1.0,
    seed: int = 0,
    rbc: tuple[int, int, int] = RBC,
    bg: tuple[int, int, int] = BG,
) -> np.ndarray:
    """A synthetic smear: red-cell discs (100 px at scale 1; pink unless ``rbc`` says
    otherwise) on glass, neutrophils (a 180 px cytoplasm disc with a three-lobed nucleus)
    centred at ``cells``, and platelet dots."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = bg
    pallor = tuple(int((a + b) / 2) for a, b in zip(rbc, bg, strict=True))
    r_rbc = int(50 * scale)
    # A loose grid of red cells, away from the white cells.
    for y in range(r_rbc, h, int(2.3 * r_rbc)):
        for x in range(r_rbc, w, int(2.3 * r_rbc)):
            jx, jy = rng.integers(-8, 9, 2) * scale
            c = (int(x + jx), int(y + jy))
            if any(np.hypot(c[0] - cx, c[1] - cy) < 150 * scale for cx, cy in cells):
                continue
            cv2.circle(img, c, r_rbc, rbc, -1, cv2.LINE_AA)
            cv2.circle(img, c, int(r_rbc * 0.35), pallor, -1, cv2.LINE_AA)
    for cx, cy in cells:
        cv2.circle(img, (cx, cy), int(90 * scale), CYTO, -1, cv2.LINE_AA)
        for dx, dy in ((-35, -10), (0, 25), (35, -10)):  # three lobes joined by thin strands
            c = (int(cx + dx * scale), int(cy + dy * scale))
            cv2.ellipse(img, c, (int(24 * scale), int(20 * scale)), 30, 0, 360, NUC, -1)
        cv2.line(
            img,
            (int(cx - 35 * scale), int(cy - 10 * scale)),
            (int(cx + 35 * scale), int(cy - 10 * scale)),
            NUC,
            max(1, int(3 * scale)),
        )
    for px, py in platelets:
        cv2.circle(img, (px, py), int(7 * scale), PLT, -1, cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), 1.2 * scale)
    noise = rng.normal(0, 3, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def cell_box(cx: float, cy: float, scale: float = 1.0) -> np.ndarray:
    r = 90 * scale
    return np.array([[cx - r, cy - r, cx + r, cy + r]], np.float32)


def test_one_lobed_neutrophil_gives_one_box_covering_the_cell() -> None:
    det = Segmenter().find(smear(cells=((320, 240),)))
    assert len(det) == 1
    assert box_iou(det.xyxy, cell_box(320, 240))[0, 0] > 0.7
    assert not det.touches_edge[0]
    assert 0.5 < det.score[0] <= 1.0
    assert det.area[0] > 0.6 * np.pi * 90**2  # mask covers the cytoplasm, not just the nucleus
    assert det.xyxy.dtype == np.float32
    assert det.data["nucleus_area"][0] > 0 and det.data["nucleus_mass"][0] > 0


def test_two_separate_cells_stay_two() -> None:
    cells = ((170, 240), (470, 240))
    det = Segmenter().find(smear(cells=cells))
    assert len(det) == 2
    order = np.argsort(det.xyxy[:, 0])
    for k, (cx, cy) in zip(order, cells, strict=True):
        assert box_iou(det.xyxy[k : k + 1], cell_box(cx, cy))[0, 0] > 0.6


def test_platelets_and_red_cells_alone_give_nothing() -> None:
    img = smear(cells=(), platelets=((100, 100), (300, 200), (310, 210), (500, 400)))
    assert len(Segmenter().find(img)) == 0


def test_blank_and_dark_frames_give_nothing() -> None:
    seg = Segmenter()
    assert len(seg.find(np.full((480, 640, 3), 200, np.uint8))) == 0
    assert len(seg.find(np.zeros((480, 640, 3), np.uint8))) == 0


def test_cell_cut_by_border_is_reported_touching_edge() -> None:
    det = Segmenter().find(smear(cells=((40, 240),)))  # half of the cell is outside the frame
    assert len(det) == 1
    assert det.touches_edge[0]
    assert det.xyxy[0, 0] == 0.0


def small_lobed_cell(cytoplasm: bool, blur: float = 3.0) -> np.ndarray:
    """A neutrophil with three small lobes (16x13 px) in a 180 px lilac cytoplasm at the centre
    of a smear, defocused; without ``cytoplasm`` the lobes lie on bare glass (like a loose clump
    of platelets)."""
    img = smear(cells=()).astype(np.float32)
    img[150:330, 230:410] = BG
    if cytoplasm:
        cv2.circle(img, (320, 240), 90, (200, 140, 180), -1, cv2.LINE_AA)
    for dx, dy in ((-30, -10), (0, 20), (30, -10)):
        cv2.ellipse(img, (320 + dx, 240 + dy), (16, 13), 30, 0, 360, NUC, -1)
    img = cv2.GaussianBlur(img, (0, 0), blur)
    img += np.random.default_rng(0).normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_faint_small_lobed_nucleus_counts_only_inside_cytoplasm() -> None:
    # Regression: small lobes in a defocused frame carry less than min_nucleus_mass (the cell was
    # never detected); inside a white cell's cytoplasm they are still a cell ...
    det = Segmenter().find(small_lobed_cell(cytoplasm=True))
    assert len(det) == 1
    assert box_iou(det.xyxy, cell_box(320, 240))[0, 0] > 0.7
    assert det.data["nucleus_mass"][0] < SegmenterOptions().min_nucleus_mass
    # ... while the same faint stain on bare glass is not.
    assert len(Segmenter().find(small_lobed_cell(cytoplasm=False))) == 0


def _synth_frame(seed: int, index: int, cell_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One simulator frame and the truth box of one of its white cells."""
    synth = pytest.importorskip("stream.synth")
    bgr, truth = synth.SlideSimulator(seed=seed).frame(index)
    box = [c["box"] for c in truth["cells"] if int(c["id"]) == cell_id]
    assert box, f"simulator no longer shows cell {cell_id} in frame {index} of seed {seed}"
    return bgr, np.array(box, np.float32)


def test_cell_clear_of_the_border_is_not_cut_by_faint_stain_beyond_it() -> None:
    # Regression (simulator seed 13, frame 1351): a neutrophil 29 px below the top border, with
    # faint stain (vignetted corner) joining its cytoplasm to the border; it was boxed up to the
    # border and flagged touches_edge, so the tracker never judged it.
    bgr, truth = _synth_frame(13, 1351, 6)
    assert truth[0, 1] > 20
    det = Segmenter().find(bgr)
    iou = box_iou(det.xyxy, truth)[:, 0]
    k = int(iou.argmax())
    assert iou[k] > 0.85
    assert not det.touches_edge[k]
    assert det.xyxy[k, 1] > 8


def test_defocused_small_lobed_neutrophil_in_simulator_frame_is_found() -> None:
    # Regression (simulator seed 11, frame 905): a small-lobed neutrophil in a defocused frame
    # (blur ~1.7 px) was never detected while in view.
    bgr, truth = _synth_frame(11, 905, 8)
    det = Segmenter().find(bgr)
    assert len(det) and box_iou(det.xyxy, truth)[:, 0].max() > 0.7


def test_boxes_are_in_full_resolution_pixels_at_any_frame_size() -> None:
    # A 960x720 frame at 1.5x the magnification (red cells 150 px), analysed 160 px wide.
    seg = Segmenter(SegmenterOptions(working_width=160))
    det = seg.find(smear(size=(960, 720), cells=((480, 360),), scale=1.5))
    assert len(det) == 1
    assert box_iou(det.xyxy, cell_box(480, 360, 1.5))[0, 0] > 0.7
    # The red-cell diameter is measured, so the larger magnification is seen as such.
    assert seg.last_rbc_measured
    assert 130 < seg.last_rbc_diameter < 220


def test_red_cell_diameter_is_estimated_from_the_frame() -> None:
    seg = Segmenter(SegmenterOptions(rbc_diameter=60.0))  # a wrong configured value
    seg.find(smear())
    assert seg.last_rbc_measured
    # Calibrated on real smears, where pale centres make red cells read small; crisp synthetic
    # discs with filled centres read up to ~1/3 large.
    assert 85 < seg.last_rbc_diameter < 145


def test_video_keeps_the_red_cell_size_for_a_few_frames_then_measures_again() -> None:
    """In a video the red-cell size is measured every ``rbc_every`` frames and kept between:
    the cells found are the same, a change of objective is seen within ``rbc_every`` frames,
    and a photo not in sequence (or of another size) is always measured on its own."""
    one, low = smear(cells=((320, 240),)), smear(cells=((150, 120), (450, 130)), scale=0.4)
    seg = Segmenter(SegmenterOptions(rbc_every=4))
    first = seg.find(one)
    d1 = seg.last_rbc_diameter
    for _ in range(2):  # the same field, kept size: the same cell
        det = seg.find(Frame(one), in_sequence=True)
        assert np.array_equal(det.xyxy, first.xyxy) and seg.last_rbc_diameter == d1
    seg.find(low, in_sequence=True)  # a lower objective on the 3rd frame: not seen yet
    assert seg.last_rbc_diameter == d1
    seg.find(low, in_sequence=True)  # 4th frame after the measure: measured again
    assert seg.last_rbc_diameter < 0.6 * d1
    assert len(seg.find(low, in_sequence=True)) == 2  # kept at low magnification too
    seg.find(one)  # not in sequence (a separate photo): measured
    assert seg.last_rbc_diameter == d1
    seg.find(cv2.resize(one, (480, 360)), in_sequence=True)  # another frame size: measured
    assert seg.last_rbc_diameter < 0.9 * d1
    with pytest.raises(ValueError, match="rbc_every"):
        SegmenterOptions(rbc_every=0)


def test_white_balance_and_exposure_shift_give_the_same_answer() -> None:
    img = smear(cells=((250, 200),))
    base = Segmenter().find(img)
    warm = np.clip(img * np.array([0.8, 0.95, 1.15]), 0, 255).astype(np.uint8)
    dim = (img * 0.6).astype(np.uint8)
    for shifted in (warm, dim):
        det = Segmenter().find(shifted)
        assert len(det) == len(base) == 1
        assert box_iou(det.xyxy, base.xyxy)[0, 0] > 0.85


def test_frame_input_is_accepted() -> None:
    det = Segmenter().find(Frame(smear(), index=3, t=0.1))
    assert len(det) == 1


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((48, 64), np.uint8), "shape (48, 64)"),
        (np.zeros((48, 64, 4), np.uint8), "shape (48, 64, 4)"),
        (np.zeros((48, 64, 3), np.float32), "dtype float32"),
        (np.zeros((4, 4, 3), np.uint8), "too small"),
        ([[1, 2, 3]], "got list"),
    ],
)
def test_bad_input_raises_clear_error(bad, words: str) -> None:
    with pytest.raises(InputError, match="BGR|too small") as exc:
        Segmenter().find(bad)
    assert words in str(exc.value)


def test_component_boxes_match_opencvs_statistics_with_nested_and_diagonal_pieces() -> None:
    # the cheap boxes (labels + outer contours) must be OpenCV's own, label for label, also for a
    # piece inside another's hole, pieces touching only diagonally and pieces at the border
    ring = np.zeros((20, 24), np.uint8)
    cv2.rectangle(ring, (2, 2), (17, 15), 1, 2)
    ring[8:10, 8:11] = 1  # inside the ring's hole
    ring[0, 21], ring[1, 22], ring[19, 23] = 1, 1, 1  # diagonal pair at the top, one at a corner
    rng = np.random.default_rng(3)
    masks = [ring] + [(rng.random((37, 53)) < p).astype(np.uint8) for p in (0.1, 0.4, 0.6)]
    for mask in masks:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        n2, labels2, boxes = _boxed_components(mask)
        assert n2 == n
        assert (labels2 == labels).all()
        assert (boxes[1:] == stats[1:, :4]).all()
    assert _boxed_components(np.zeros((5, 5), np.uint8))[0] == 1


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="working_width"):
        SegmenterOptions(working_width=4)
    with pytest.raises(ValueError, match="cell_level"):
        SegmenterOptions(cell_level=0.9, nucleus_level=0.5)
    with pytest.raises(ValueError, match="reference_width"):
        SegmenterOptions(reference_width=0)


# -- other microscopes: stains, illumination, magnification, single-cell images ---------------

TEAL = (180, 160, 130)  # blue-grey red cells (another stain's buffer / another camera)


@pytest.mark.parametrize("rbc", [TEAL, (160, 160, 160)], ids=["teal", "grey"])
def test_red_cells_grey_or_teal_do_not_hide_or_fake_white_cells(rbc) -> None:
    img = smear(cells=((200, 240), (470, 260)), rbc=rbc, platelets=((80, 80), (560, 420)))
    det = Segmenter().find(img)
    assert len(det) == 2
    order = np.argsort(det.xyxy[:, 0])
    for k, (cx, cy) in zip(order, ((200, 240), (470, 260)), strict=True):
        assert box_iou(det.xyxy[k : k + 1], cell_box(cx, cy))[0, 0] > 0.6
    # red cells alone, teal or grey, are not white cells
    assert len(Segmenter().find(smear(cells=(), rbc=rbc))) == 0


@pytest.mark.parametrize("gains", [(0.72, 0.92, 1.0), (1.0, 0.9, 0.74)], ids=["yellow", "blue"])
def test_yellowish_or_bluish_light_gives_the_same_cell(gains) -> None:
    img = (smear(cells=((300, 220),)) * np.array(gains)).astype(np.uint8)
    det = Segmenter().find(img)
    assert len(det) == 1 and box_iou(det.xyxy, cell_box(300, 220))[0, 0] > 0.7


def _vignetted(img: np.ndarray, depth: float = 0.6) -> np.ndarray:
    """``img`` lit by a lamp whose corners get ``1 - depth`` of the centre's light."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / ((w / 2) ** 2 + (h / 2) ** 2)
    return (img.astype(np.float32) * (1.0 - depth * r2)[..., None]).astype(np.uint8)


def test_cell_in_a_dark_vignetted_corner_is_whole_not_cut() -> None:
    # Corners at 40% of the centre's light; the cell sits 20 px clear of the corner's borders.
    img = _vignetted(smear(cells=((112, 112),)))
    seg = Segmenter()
    det = seg.find(img)
    assert seg.last_illumination < 0.6
    assert len(det) == 1 and not det.touches_edge[0]
    assert box_iou(det.xyxy, cell_box(112, 112))[0, 0] > 0.6


def test_video_keeps_the_lamp_field_and_stain_with_the_size() -> None:
    """The lamp's field and the stain directions are measured with the red-cell size and kept
    with it: a kept frame gives the cells its own reading gives, and another lamp or slide is
    read at the next measuring frame."""
    dark = _vignetted(smear(cells=((112, 112),)))
    teal = smear(cells=((200, 240), (470, 260)), rbc=TEAL)
    alone = Segmenter().find(dark)
    seg = Segmenter(SegmenterOptions(rbc_every=3))
    seg.find(dark)
    lamp = seg.last_illumination
    assert lamp < 0.6
    det = seg.find(Frame(dark), in_sequence=True)  # kept: the same whole corner cell
    assert np.array_equal(det.xyxy, alone.xyxy) and not det.touches_edge.any()
    seg.find(teal, in_sequence=True)  # kept: still divided by the vignetted lamp's field
    assert seg.last_illumination == lamp
    det = seg.find(teal, in_sequence=True)  # measured again: even light, teal red cells
    assert seg.last_illumination > 0.9
    assert len(det) == 2
    for cx, cy in ((200, 240), (470, 260)):
        assert box_iou(det.xyxy, cell_box(cx, cy))[:, 0].max() > 0.6



def _eyepiece(img: np.ndarray) -> np.ndarray:
    """The frame as an eyepiece camera sees it: the robustness suite's ``field_stop`` (a round
    field as wide as the frame is high, a soft rim, near-black around it)."""
    from training.detection_eval import perturb

    return perturb(img, np.empty((0, 4), np.float32), "field_stop")[0]


def test_a_round_field_in_a_black_surround_gives_its_cells_and_nothing_in_the_black() -> None:
    """Black reads as the densest stain: without setting the surround apart, the frame gave one
    giant 'cell' or none. A cell the field's rim cuts is flagged cut, as at the frame's edge."""
    img = smear(cells=((320, 240), (505, 240)))
    seg = Segmenter()
    det = seg.find(_eyepiece(img))  # the field as wide as the frame is high
    assert len(det) == 2
    order = np.argsort(det.xyxy[:, 0])
    assert box_iou(det.xyxy[order[:1]], cell_box(320, 240))[0, 0] > 0.7
    assert not det.touches_edge[order[0]]  # whole, in the middle of the field
    assert det.touches_edge[order[1]]  # the field's rim runs through it (x = 560)
    assert seg.last_rbc_measured and 80 < seg.last_rbc_diameter < 145  # the red cells inside
    # in a video the surround is the camera's: kept with the reading, the same cells come out
    video = Segmenter()
    for i in range(3):
        kept = video.find(_eyepiece(img), in_sequence=i > 0)
        np.testing.assert_array_equal(kept.xyxy, det.xyxy)
        np.testing.assert_array_equal(kept.touches_edge, det.touches_edge)
    # the whole frame black but for a round field with no white cell: nothing
    assert len(Segmenter().find(_eyepiece(smear(cells=())))) == 0


def test_outside_the_field_is_the_black_joined_to_the_border_not_a_cut_nucleus() -> None:
    from detector.core import outside_field

    img = smear(cells=((320, 240), (20, 240)))  # a cell cut by the left edge, nucleus and all
    assert outside_field(img) is None  # a dark nucleus at the border is stain, not black
    round_ = _eyepiece(img)
    mask = outside_field(round_)
    assert mask is not None and mask.shape == img.shape[:2]
    assert mask[0, 0] and mask[-1, -1] and not mask[240, 320]  # corners out, centre in
    grey = outside_field(cv2.cvtColor(round_, cv2.COLOR_BGR2GRAY))  # one channel reads alike
    assert grey is not None and np.mean(grey != mask) < 0.01


def test_black_text_the_camera_burns_in_is_not_stain() -> None:
    """A time stamp and a scale bar in black (strokes 2 px wide at 640x480): their strokes read
    as the densest stain; they are set apart and read as glass, the nuclei are not."""
    from detector.core import outside_field
    from training.detection_eval import perturb

    img = smear(cells=((200, 380), (450, 200)))  # one cell just above the time stamp
    plain = Segmenter().find(img)
    marked = perturb(img, np.empty((0, 4), np.float32), "burned_text")[0]
    det = Segmenter().find(marked)
    assert len(plain) == 2 and len(det) == 2
    assert (box_iou(det.xyxy, plain.xyxy).max(axis=1) > 0.8).all()
    mask = outside_field(marked)
    assert mask is not None and mask[460:470, 20:300].any()  # the time stamp's strokes
    assert mask[424, 560]  # the scale bar: too thick for a stroke, but black
    assert not mask[380, 200] and not mask[200, 450]  # the nuclei


def test_a_phone_photo_through_the_eyepiece(bccd_dir) -> None:
    """A 12-megapixel photo (4032x3024) of the whole eyepiece field: 36 BCCD photos side by
    side (red cells ~100 px, as a phone sees them through a 100x objective) in a round field.
    Read first at 160 px, red cells 4 px across read 2-4x too large and missed most cells (0 of
    these 21); the first reading is now wide enough for red cells of 35 px."""
    from training.detection_eval import match_centres, phone_photo
    from training.voc import read_voc

    photo, wbc = phone_photo(read_voc(bccd_dir), 3)
    assert photo.shape == (3024, 4032, 3) and (photo[0, 0] < 20).all()  # black around the field
    seg = Segmenter()
    det = seg.find(photo)
    pairs, _, _ = match_centres(det.xyxy, wbc)
    assert len(wbc) == 21 and len(pairs) >= 20
    assert seg.last_rbc_measured and 70 < seg.last_rbc_diameter < 160


def test_real_photos_through_an_eyepiece_camera(bccd_dir) -> None:
    """Every 10th BCCD photo in a round field as wide as the frame is high (the robustness
    suite's ``field_stop``): its cells found as on the plain photos (before the surround was set
    apart: recall 0, no cell found in any photo)."""
    from training.detection_eval import evaluate_robustness
    from training.voc import read_voc

    res = evaluate_robustness(read_voc(bccd_dir)[::10], Segmenter(),
                              kinds=("field_stop", "burned_text"))
    for kind in ("field_stop", "burned_text"):
        assert res[kind]["recall"] >= 0.95 and res[kind]["precision"] >= 0.95, kind

@pytest.mark.parametrize("scale, size", [(0.4, (640, 480)), (2.0, (1280, 960))])
def test_low_and_high_magnification(scale: float, size: tuple[int, int]) -> None:
    """Red cells of 40 px (0.4x BCCD's magnification) or 200 px (2x): the size is measured
    from the frame and the cells are found with the configured (100 px) size left as it is."""
    w, h = size
    cells = ((150, 120), (450, 130), (300, 360)) if scale < 1 else ((w // 2, h // 2),)
    seg = Segmenter()
    det = seg.find(smear(size=size, cells=cells, scale=scale, platelets=((40, 40), (600, 300))))
    assert seg.last_rbc_measured
    assert 0.7 * 100 * scale < seg.last_rbc_diameter < 1.45 * 100 * scale
    assert len(det) == len(cells)
    for cx, cy in cells:
        assert box_iou(det.xyxy, cell_box(cx, cy, scale))[:, 0].max() > 0.6


def test_white_cell_filling_a_2x_frame() -> None:
    """At 2x on a 640x480 camera a white cell fills most of the frame and few red cells are
    left to measure: the cell is still found, whole."""
    det = Segmenter().find(smear(cells=((320, 240),), scale=2.0))
    assert len(det) == 1
    assert box_iou(det.xyxy, cell_box(320, 240, 2.0))[0, 0] > 0.6


def test_single_cell_crop_filling_the_frame() -> None:
    """A 200x200 crop of one cell that nearly fills it, with slivers of red cells around."""
    crop = smear(cells=((320, 240),))[140:340, 220:420]
    seg = Segmenter()
    one = seg.find_single(crop)
    assert len(one) == 1
    assert box_iou(one.xyxy, cell_box(100, 100))[0, 0] > 0.6
    still = seg.find_still(crop)
    assert len(still) == 1 and box_iou(still.xyxy, one.xyxy)[0, 0] > 0.9
    # a crop of red cells and a platelet at the centre is no cell
    plain = smear(cells=(), platelets=((320, 240),))[140:340, 220:420]
    assert len(seg.find_single(plain)) == 0


def test_field_with_two_whole_cells_is_not_a_single_cell_image() -> None:
    img = smear(cells=((320, 240), (520, 300)), size=(640, 480))
    assert len(Segmenter().find_still(img)) == 2


# -- real images -------------------------------------------------------------------------------


def test_real_bccd_subset_recall_and_precision(bccd_dir) -> None:
    from training.detection_eval import evaluate_detection
    from training.voc import read_voc

    records = read_voc(bccd_dir)[::7]  # a fixed subset of ~40 images
    assert len(records) >= 40
    res = evaluate_detection(records, Segmenter(), progress=False)
    assert res["recall"] >= 0.95, res["failures"]
    assert res["precision"] >= 0.93, res["failures"]


def test_real_image_box_overlaps_its_white_cell(bccd_dir) -> None:
    img = cv2.imread(str(bccd_dir / "JPEGImages" / "BloodImage_00000.jpg"))
    det = Segmenter().find(img)
    gt = np.array([[260, 177, 491, 376]], np.float32)  # from BloodImage_00000.xml
    assert len(det) == 1
    assert box_iou(det.xyxy, gt)[0, 0] > 0.6
    assert 60 < Segmenter().last_rbc_diameter <= 140


def test_real_photo_from_a_camera_with_three_times_the_pixels(bccd_dir) -> None:
    """The same field at 1920x1440 (a finer sensor behind the same optics: red cells ~300 px):
    the same cells, and the red cells measured 3x as large. Before the configured size scaled
    with a frame wider than 640 px, 300 px red cells were out of its 3x range, the size fell back
    to 100 px and BCCD's recall at 1920x1440 was 0.72."""
    from training.detection_eval import match_centres
    from training.voc import read_voc

    records = read_voc(bccd_dir)[::20]
    seg = Segmenter()
    found = missed = extra = 0
    for rec in records:
        img = cv2.imread(str(rec.image))
        seg.find(img)
        d = seg.last_rbc_diameter
        big = cv2.resize(img, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
        det = seg.find(big)
        # (the size is read in steps of ~5-15 %: 3.0x in 10 of these 15 photos, 3.2-4.1x in 5)
        assert seg.last_rbc_measured and 2.5 * d < seg.last_rbc_diameter < 4.5 * d, rec.image
        pairs, up, ug = match_centres(det.xyxy, np.asarray(rec.wbc, np.float32) * 3)
        found, extra, missed = found + len(pairs), extra + len(up), missed + len(ug)
    assert found >= 14 and missed <= 1 and extra <= 1
    # a frame no wider than 640 px (a crop, a thumbnail) keeps the configured size
    assert seg.expected_diameter(360) == seg.expected_diameter(640) == 100.0
    assert seg.expected_diameter(1920) == 300.0


def test_real_single_cell_crop_and_perturbed_copies(bccd_dir) -> None:
    """A cell-centred crop at another scale (as in single-cell data sets), and colour-shifted
    copies of a real frame, still give that one cell."""
    from training.detection_eval import match_centres, perturb

    img = cv2.imread(str(bccd_dir / "JPEGImages" / "BloodImage_00000.jpg"))
    gt = np.array([[260, 177, 491, 376]], np.float32)
    crop = cv2.resize(img[130:430, 220:530], None, fx=1.5, fy=1.5)
    det = Segmenter().find(crop)
    pairs, false, missed = match_centres(det.xyxy, (gt - [220, 130, 220, 130]) * 1.5)
    assert len(pairs) == 1 and not false and not missed
    for kind in ("wb_warm", "hue_-10", "hue_+10", "gamma_1.4", "blur_3", "noise_15"):
        shifted, boxes, _ = perturb(img, gt, kind)
        det = Segmenter().find(shifted)
        pairs, false, missed = match_centres(det.xyxy, boxes)
        assert len(pairs) == 1 and not false and not missed, kind


def test_real_neutrophil_cut_by_the_frame_edge_with_its_lobes_in_view(bccd_dir) -> None:
    """A field of grey red cells on yellowish glass at 0.6x (BloodImage_00199 in a mosaic of the
    next photos): the neighbour photo's neutrophil is cut by the frame's top edge, two large lobes
    in view, but most of its cytoplasm outside. Lobes that size are a nucleus, not a platelet
    clump: it is reported, cut (it was missed when any lobed group needed a whole cell's
    cytoplasm)."""
    from training.detection_eval import _MOSAIC_TILES, match_centres, perturb
    from training.voc import read_voc

    records = read_voc(bccd_dir)
    k = next(i for i, r in enumerate(records) if r.name == "BloodImage_00199")
    photos = [cv2.imread(str(records[k + i].image)) for i in range(_MOSAIC_TILES + 1)]
    around = [(photos[i], records[k + i].wbc) for i in range(1, _MOSAIC_TILES + 1)]
    img, gt, _ = perturb(photos[0], records[k].wbc, "rbc_grey+bg_yellow+scale_0.6", seed=k,
                         neighbours=around)
    det = Segmenter().find(img)
    pairs, false, missed = match_centres(det.xyxy, gt)
    assert len(gt) == 2 and len(pairs) == 2 and not missed, (det.xyxy, gt)
    top = next(d for d, g in pairs if gt[g, 1] == 0)
    assert det.touches_edge[top] and det.xyxy[top, 1] == 0


PBC_WHITE = ("basophil", "eosinophil", "immature_granulocyte", "lymphocyte", "monocyte",
             "neutrophil")


def test_real_pbc_single_cell_images(bccd_dir) -> None:
    """PBC (another analyser, stain, magnification and white balance): the labelled cell at
    the centre of the first 4 images of each white-cell class is the one cell reported."""
    pbc = bccd_dir.parent / "pbc"
    if not pbc.is_dir():
        pytest.skip(f"PBC images not found at {pbc}")
    seg = Segmenter()
    for name in PBC_WHITE:
        for f in [p for p in sorted((pbc / name).glob("*.jpg")) if not p.name.startswith(".")][:4]:
            img = cv2.imread(str(f))
            h, w = img.shape[:2]
            det = seg.find_still(img)
            assert len(det) == 1, f.name
            x1, y1, x2, y2 = det.xyxy[0]
            assert x1 <= w / 2 <= x2 and y1 <= h / 2 <= y2, f.name


def test_still_analysis_recognises_single_cell_images_and_whole_image_option() -> None:
    """The still-image analysis gives a crop's one centred cell, and with ``single_cell`` the
    whole image as one (uncut) cell, only classified."""
    from detector.still import analyse_still

    class OneClass:
        labels = ("neutrophil",)

        def classify_boxes(self, frame_bgr: np.ndarray, xyxy: np.ndarray) -> np.ndarray:
            return np.ones((len(xyxy), 1), np.float32)

        def label_of(self, row: np.ndarray) -> tuple[str, float]:
            return "neutrophil", float(row[0])

    # a crop centred on one cell, with a neighbour cut by its edge
    img = smear(cells=((320, 240), (560, 240)))[100:380, 180:460]
    cells = analyse_still(img, Segmenter(), OneClass())
    assert len(cells) == 1 and not cells.cut[0]
    assert box_iou(cells.detections.xyxy, cell_box(140, 140))[0, 0] > 0.6
    whole = analyse_still(img, Segmenter(), OneClass(), single_cell=True)
    assert whole.detections.xyxy.tolist() == [[0.0, 0.0, 280.0, 280.0]]
    assert whole.names == ["neutrophil"] and not whole.cut[0]


def test_round_holes_keep_pale_centres_not_plasma_channels() -> None:
    """Enclosed background: a disc (a red cell's pale centre) is filled; a long narrow channel
    (plasma enclosed by packed red cells, area ~9x its inscribed disc's) is not."""
    from detector.segment import _round_holes

    holes = np.zeros((40, 60), np.uint8)
    cv2.circle(holes, (12, 20), 5, 1, -1)
    holes[18:21, 30:55] = 1
    out = _round_holes(holes)
    assert out[20, 12] == 1 and out[:, :20].sum() == holes[:, :20].sum()
    assert out[:, 25:].sum() == 0
    assert _round_holes(np.zeros((10, 10), np.uint8)).sum() == 0


def test_granulometry_reads_disc_radius_and_no_size_from_rims() -> None:
    """Discs of radius 8 read ~8; thin rings (the rims of pale red cells whose centres open to
    the border) hold no disc and give no size, not the bisection's floor."""
    from detector.segment import _granulometry

    discs = np.zeros((80, 120), np.uint8)
    for x in (20, 60, 100):
        cv2.circle(discs, (x, 40), 8, 1, -1)
    assert 6.5 <= _granulometry(discs, 1.0, 20.0) <= 9.5
    rims = np.zeros((80, 120), np.uint8)
    for x in (20, 60, 100):
        cv2.ellipse(rims, (x, 40), (14, 14), 0, 20, 340, 1, 1)  # open 1-px rings
    assert _granulometry(rims, 1.0, 20.0) is None


def test_real_pbc_crops_zoomed_in_until_the_cell_fills_them(bccd_dir) -> None:
    """Crops zoomed in 1.5x on PBC cells (another gallery's framing: the cell fills the crop, the
    pale red cells around it cut open by the border) whose red-cell size used to read as the
    rims' width: the centre cell is still found."""
    from training.detection_eval import perturb

    pbc = bccd_dir.parent / "pbc"
    if not pbc.is_dir():
        pytest.skip(f"PBC images not found at {pbc}")
    seg = Segmenter()
    for name in ("eosinophil/EO_566829.jpg", "eosinophil/EO_94652.jpg",
                 "neutrophil/BNE_228660.jpg", "basophil/BA_457610.jpg"):
        img = cv2.imread(str(pbc / name))
        zoomed, _, _ = perturb(img, np.zeros((0, 4), np.float32), "scale_1.5")
        h, w = zoomed.shape[:2]
        det = seg.find_still(zoomed)
        assert any(x1 <= w / 2 <= x2 and y1 <= h / 2 <= y2 for x1, y1, x2, y2 in det.xyxy), name
