"""White-cell segmenter: synthetic smears with known answers, and real BCCD images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from detector.core import Frame, box_iou
from detector.errors import InputError
from detector.segment import Segmenter, SegmenterOptions

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
) -> np.ndarray:
    """A synthetic smear: pink red-cell discs (100 px at scale 1) on glass, neutrophils (a
    180 px cytoplasm disc with a three-lobed nucleus) centred at ``cells``, and platelet dots."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BG
    r_rbc = int(50 * scale)
    # A loose grid of red cells, away from the white cells.
    for y in range(r_rbc, h, int(2.3 * r_rbc)):
        for x in range(r_rbc, w, int(2.3 * r_rbc)):
            jx, jy = rng.integers(-8, 9, 2) * scale
            c = (int(x + jx), int(y + jy))
            if any(np.hypot(c[0] - cx, c[1] - cy) < 150 * scale for cx, cy in cells):
                continue
            cv2.circle(img, c, r_rbc, RBC, -1, cv2.LINE_AA)
            cv2.circle(img, c, int(r_rbc * 0.35), (175, 172, 192), -1, cv2.LINE_AA)  # pallor
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


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="working_width"):
        SegmenterOptions(working_width=4)
    with pytest.raises(ValueError, match="cell_level"):
        SegmenterOptions(cell_level=0.9, nucleus_level=0.5)


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
