"""Tests of the smear simulator: determinism, truth that matches the pixels, the camera's
behaviour, the written files and clear errors. Short clips at small sizes keep them fast."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from detector.core import CELL_TYPES
from detector.errors import InputError
from stream.synth import SlideSimulator, iter_frames, load_truth, make_slide, render_video
from training import synth

SMALL = (320, 240)


@pytest.fixture(scope="module")
def sim_small() -> SlideSimulator:
    return SlideSimulator(seed=5, size=SMALL, fps=10)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "clip"
    return render_video(out, seconds=1.5, fps=10, seed=2, size=SMALL)


def _purple(bgr: np.ndarray) -> np.ndarray:
    """Nucleus-like pixels: much more blue than red light, green strongly absorbed."""
    b, g, r = (bgr[..., k].astype(np.int16) for k in range(3))
    return (b - r > 45) & (b - g > 70)


def test_same_seed_same_frames_and_truth() -> None:
    a = list(iter_frames(seconds=0.5, fps=10, seed=3, size=SMALL))
    b = list(iter_frames(seconds=0.5, fps=10, seed=3, size=SMALL))
    assert len(a) == len(b) == 5
    for (fa, ta), (fb, tb) in zip(a, b, strict=True):
        assert np.array_equal(fa, fb)
        assert ta == tb
    sa = SlideSimulator(seed=3, size=SMALL).header(5)
    sb = SlideSimulator(seed=3, size=SMALL).header(5)
    assert json.dumps(sa) == json.dumps(sb)


def test_different_seeds_differ_in_stain_motion_and_pixels() -> None:
    s1 = SlideSimulator(seed=1, size=SMALL)
    s2 = SlideSimulator(seed=2, size=SMALL)
    for name in ("hema_strength", "eosin_strength", "white_balance", "pan_speed", "vignette"):
        assert getattr(s1.settings, name) != getattr(s2.settings, name)
    assert not np.array_equal(s1.frame(0)[0], s2.frame(0)[0])
    cams1 = [s1.truth(i)["camera"] for i in range(0, 300, 30)]
    cams2 = [s2.truth(i)["camera"] for i in range(0, 300, 30)]
    assert cams1 != cams2


def test_random_access_equals_sequential(sim_small: SlideSimulator) -> None:
    seq = list(itertools.islice(iter_frames(seconds=None, fps=10, seed=5, size=SMALL), 8))
    bgr, truth = sim_small.frame(7)
    assert np.array_equal(bgr, seq[7][0])
    assert truth == seq[7][1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_slide_has_every_cell_type_and_no_touching_white_cells(seed: int) -> None:
    slide = make_slide(seed, size=SMALL)
    assert {c.label for c in slide.cells} == set(CELL_TYPES)
    boxes = np.array([c.box for c in slide.cells], float)
    for i, j in itertools.combinations(range(len(boxes)), 2):
        a, b = boxes[i], boxes[j]
        overlap = min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
        assert not overlap, f"white cells {i} and {j} overlap"
    # sizes relative to the red cell: lymphocyte smallest on average, monocyte largest
    rbc = slide.settings.rbc_px
    for c in slide.cells:
        d = (c.box[2] - c.box[0] + c.box[3] - c.box[1]) / 2 / rbc
        assert 0.85 < d < 3.0, (c.label, d)


def test_many_seeds_and_sizes_render() -> None:
    """Cells cut by the slide edge, odd sizes and extreme draws must not break painting."""
    for seed in range(12):
        size = (128 + 37 * seed, 96 + 23 * seed)
        sim = SlideSimulator(seed=seed, size=size, fps=10)
        bgr, tr = sim.frame(seed * 3)
        assert bgr.shape == (size[1], size[0], 3)
        assert {c.label for c in sim.cells} == set(CELL_TYPES)


def test_wbc_mix_and_density_settings() -> None:
    slide = make_slide(4, size=SMALL, wbc_mix={"lymphocyte": 1.0}, wbc_per_frame=2.0)
    labels = Counter(c.label for c in slide.cells)
    assert set(labels) == {"lymphocyte"}
    assert labels["lymphocyte"] >= 8  # ~2 per frame area x 8 frame areas


def test_truth_boxes_hold_nucleus_pixels_and_nothing_big_outside() -> None:
    sim = SlideSimulator(seed=7, size=(640, 480), fps=10, defocus_per_min=0, focus_drift=0.2)
    checked = 0
    for cell in sim.cells:
        x1, y1, x2, y2 = cell.box
        x0, y0 = (x1 + x2) / 2 - 320, (y1 + y2) / 2 - 240
        view = sim.view(x0, y0, sigma=0.8)
        (entry,) = [c for c in sim.cells_in_view(x0, y0) if c["id"] == cell.id]
        assert entry["visible_fraction"] == 1.0
        assert entry["box"][2] - entry["box"][0] == pytest.approx(x2 - x1)
        assert entry["box"][3] - entry["box"][1] == pytest.approx(y2 - y1)
        bx1, by1, bx2, by2 = (int(round(v)) for v in entry["box"])
        inside = _purple(view[by1:by2, bx1:bx2])
        assert inside.mean() > 0.04, f"{cell.label}: box holds too few nucleus pixels"
        # the box is tight: a ring just outside it holds almost no cell pixels
        ring = _purple(view[max(by1 - 6, 0):by2 + 6, max(bx1 - 6, 0):bx2 + 6]).sum() - inside.sum()
        assert ring < 0.05 * inside.sum() + 30, f"{cell.label}: nucleus pixels outside its box"
        checked += 1
    assert checked == len(sim.cells) >= 5
    # frames: every truth box holds nucleus pixels; outside boxes purple is only platelet-sized
    hits = 0
    for i in range(0, 300, 15):
        bgr, tr = sim.frame(i)
        mask = _purple(bgr)
        outside = mask.copy()
        for c in tr["cells"]:
            x1, y1, x2, y2 = (int(round(v)) for v in c["box"])
            outside[max(y1 - 3, 0):y2 + 3, max(x1 - 3, 0):x2 + 3] = False
            if c["visible_fraction"] > 0.5:
                assert mask[y1:y2, x1:x2].sum() > 200, f"frame {i}: no nucleus in box {c}"
                hits += 1
        n, _, stats, _ = cv2.connectedComponentsWithStats(outside.astype(np.uint8))
        biggest = stats[1:, cv2.CC_STAT_AREA].max() if n > 1 else 0
        rbc_area = np.pi * (sim.settings.rbc_px / 2) ** 2
        assert biggest < 0.25 * rbc_area, f"frame {i}: a large purple blob outside truth boxes"
    assert hits >= 5


def test_frames_listing_a_cell_are_exactly_those_that_see_it(sim_small: SlideSimulator) -> None:
    fw, fh = SMALL
    for i in range(0, 200, 7):
        tr = sim_small.truth(i)
        x0, y0 = tr["camera"]
        listed = {c["id"] for c in tr["cells"]}
        for cell in sim_small.cells:
            v, u = np.nonzero(cell.mask)
            xs, ys = cell.box[0] + u + 0.5, cell.box[1] + v + 0.5  # pixel centres on the slide

            def seen(margin: float, xs=xs, ys=ys, x0=x0, y0=y0) -> bool:
                return bool(np.any((xs > x0 + margin) & (xs < x0 + fw - margin)
                                   & (ys > y0 + margin) & (ys < y0 + fh - margin)))

            if seen(1.0):
                assert cell.id in listed, f"frame {i}: cell {cell.id} in view but not listed"
            if cell.id in listed:
                assert seen(-1.0), f"frame {i}: cell {cell.id} listed but not in view"
        for c in tr["cells"]:
            x1, y1, x2, y2 = c["box"]
            assert 0 <= x1 < x2 <= fw and 0 <= y1 < y2 <= fh
            assert 0 < c["visible_fraction"] <= 1


def test_pause_has_zero_motion_and_identical_frames() -> None:
    sim = SlideSimulator(seed=11, size=SMALL, fps=10, noise_sigma=0, focus_drift=0,
                         defocus_per_min=0)
    truths = [sim.truth(i) for i in range(120)]
    pauses = [i for i in range(119)
              if truths[i]["segment"] == "pause" and truths[i + 1]["segment"] == "pause"]
    assert pauses, "no pause in 12 s"
    for i in pauses:
        assert truths[i]["camera"] == truths[i + 1]["camera"]
        assert truths[i]["motion"] == [0.0, 0.0]
        assert [c["box"] for c in truths[i]["cells"]] == [c["box"] for c in truths[i + 1]["cells"]]
    i = pauses[0]
    a, b = sim.frame(i)[0], sim.frame(i + 1)[0]
    # only the slow lamp flicker may differ
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    moving = [i for i in range(119) if truths[i]["segment"] in ("pan", "fast_pan", "return")]
    assert moving and any(truths[i]["camera"] != truths[i + 1]["camera"] for i in moving)


def test_camera_behaves_like_a_person_at_the_stage() -> None:
    sim = SlideSimulator(seed=0, size=SMALL, fps=30)
    truths = [sim.truth(i) for i in range(1800)]  # 60 s, truth only (no pixels)
    kinds = Counter(t["segment"] for t in truths)
    assert kinds["pause"] > 0 and kinds["pan"] + kinds["return"] > 0
    speeds = [np.hypot(*t["motion"]) * 30 / SMALL[0] for t in truths]  # frame widths / s
    assert max(speeds) >= 1 / 3, "no fast pan in a minute"
    frac = [abs(v - round(v)) for t in truths for v in t["camera"]]
    assert max(frac) > 0.1, "camera positions should be sub-pixel"
    blur = [t["blur"] for t in truths]
    assert max(blur) > 3.0 * sim.scale and min(blur) < 1.5 * sim.scale
    entries: Counter[int] = Counter()
    prev: set[int] = set()
    for t in truths:
        cur = {c["id"] for c in t["cells"]}
        entries.update(cur - prev)
        prev = cur
    assert max(entries.values()) >= 2, "no cell left and re-entered the view"


def test_video_file_reads_back(clip: Path) -> None:
    cap = cv2.VideoCapture(str(clip / "video.mp4"))
    assert cap.isOpened()
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
    assert int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == SMALL[0]
    assert int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == SMALL[1]
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    assert len(frames) == 15
    # compression changes pixels only a little
    sim = SlideSimulator(seed=2, size=SMALL, fps=10)
    diff = np.abs(frames[3].astype(int) - sim.frame(3)[0].astype(int)).mean()
    assert diff < 6.0


def test_truth_json_schema(clip: Path) -> None:
    d = load_truth(clip)
    assert d == load_truth(clip / "truth.json")
    assert d["version"] == 1 and d["seed"] == 2 and d["fps"] == 10.0
    assert d["size"] == list(SMALL) and d["frames"] == 15 == len(d["frame_truth"])
    assert d["video"]["file"] == "video.mp4" and d["video"]["codec"] in ("avc1", "mp4v")
    assert {"pan_speed", "hema_strength", "white_balance", "noise_sigma"} <= set(d["settings"])
    ids = {c["id"] for c in d["cells"]}
    assert {c["label"] for c in d["cells"]} == set(CELL_TYPES)
    for c in d["cells"]:
        assert set(c) >= {"id", "label", "slide_box"} and len(c["slide_box"]) == 4
    for k, f in enumerate(d["frame_truth"]):
        assert f["frame"] == k
        assert set(f) >= {"frame", "t", "camera", "segment", "motion", "blur", "cells"}
        for c in f["cells"]:
            assert c["id"] in ids and set(c) == {"id", "box", "visible_fraction", "blur"}


def test_load_truth_rejects_bad_files(tmp_path: Path, clip: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_truth(tmp_path / "nothing")
    bad = tmp_path / "truth.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="cannot parse JSON"):
        load_truth(bad)
    d = json.loads((clip / "truth.json").read_text())
    d["version"] = 99
    bad.write_text(json.dumps(d))
    with pytest.raises(InputError, match="version"):
        load_truth(bad)
    d["version"] = 1
    d["frames"] = 99
    bad.write_text(json.dumps(d))
    with pytest.raises(InputError, match="frame_truth has 15"):
        load_truth(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": (64, 48)}, "too small"),
        ({"seed": -1}, "seed must be"),
        ({"seconds": 0}, "seconds must be"),
        ({"fps": 0.5}, "fps must be"),
        ({"wbc_per_frame_typo": 2}, "unknown synth setting"),
        ({"wbc_mix": {"erythroblast": 1.0}}, "unknown cell types"),
        ({"noise_sigma": -1}, "noise_sigma"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"seconds": 0.2, "fps": 10, "seed": 0, "size": SMALL, **kwargs}
    with pytest.raises(InputError, match=message):
        render_video(tmp_path / "x", **args)


def test_out_dir_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        render_video(f, seconds=0.2, fps=10, size=SMALL)


def test_cli_handler(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stream.cli import main as cli_main

    out = tmp_path / "cli"
    assert cli_main(["synth", str(out), "--seconds", "0.5", "--fps", "10", "--size", "320x240",
                     "--seed", "1"]) == 0
    line = capsys.readouterr().out
    assert "video.mp4" in line and "5 frames" in line
    assert load_truth(out)["seed"] == 1
    assert cli_main(["synth", str(tmp_path / "small"), "--size", "64x48"]) == 2
    assert "too small" in capsys.readouterr().err
    # the handler takes an argparse-like namespace
    ns = SimpleNamespace(out_dir=str(tmp_path / "ns"), seconds=0.3, fps=10.0, seed=0, size=SMALL)
    assert synth.main(ns) == 0


def _segmenter_score(sim: SlideSimulator, cells: list, rng: np.random.Generator,
                     jitter: tuple[float, float], blur: tuple[float, float],
                     frame_index: bool = False) -> tuple[int, int, int]:
    """Views around ``cells`` (off centre by up to ``jitter`` px, focus blur sigma in ``blur``):
    (white cells > 95% in view, how many of them the segmenter found, its unmatched detections)."""
    from detector.segment import Segmenter
    from training.detection_eval import match_centres

    seg = Segmenter()
    found = total = false = 0
    for cell in cells:
        x1, y1, x2, y2 = cell.box
        x0 = (x1 + x2) / 2 - 320 + rng.uniform(-jitter[0], jitter[0])
        y0 = (y1 + y2) / 2 - 240 + rng.uniform(-jitter[1], jitter[1])
        sigma = float(rng.uniform(*blur))
        index = int(rng.integers(100)) if frame_index else 0
        bgr = sim.view(x0, y0, sigma=sigma, index=index)
        in_view = sim.cells_in_view(x0, y0, sigma)
        gt = np.array([c["box"] for c in in_view], float).reshape(-1, 4)
        pairs, unmatched_pred, _ = match_centres(seg.find(bgr).xyxy, gt)
        hit = {j for _, j in pairs}
        for j, c in enumerate(in_view):
            if c["visible_fraction"] > 0.95:
                total += 1
                found += j in hit
        false += len(unmatched_pred)
    return total, found, false


def test_segmenter_finds_the_white_cells_of_synthetic_frames() -> None:
    """The runtime segmenter, unchanged, works on simulator frames as on real photographs."""
    found = total = false = 0
    rng = np.random.default_rng(0)
    for seed in (0, 3):
        sim = SlideSimulator(seed=seed, size=(640, 480), fps=10)
        # a view around every white cell, off centre
        t, f, x = _segmenter_score(sim, sim.cells, rng, (120, 80), (0.5, 2.0), frame_index=True)
        total, found, false = total + t, found + f, false + x
    assert total >= 10
    assert found / total >= 0.9
    assert false <= 2


@pytest.mark.parametrize("label", CELL_TYPES)
def test_segmenter_finds_each_cell_type_alone(label: str) -> None:
    """Frames holding one type only (e.g. eosinophils, whose granules could pull the
    segmenter's stain estimate) still give the segmenter every white cell."""
    sim = SlideSimulator(seed=8, size=(640, 480), fps=10, wbc_mix={label: 1.0}, all_types=False)
    rng = np.random.default_rng(1)
    total, found, _ = _segmenter_score(sim, sim.cells[:6], rng, (100, 70), (0.5, 1.5))
    assert total >= 4
    assert found / total >= 0.8, f"{label}: {found}/{total}"


def test_progress_as_log_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without a terminal (a server's first ``serve``), rendering says how far it is."""
    with caplog.at_level("WARNING", logger="stream.synth.video"):
        render_video(tmp_path / "p", seconds=2.0, fps=10, size=SMALL, progress="log",
                     desc="rendering the demo clip")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "rendering the demo clip: 10% (2 of 20 frames)"
    assert lines[-1] == "rendering the demo clip: 90% (18 of 20 frames)"
    assert len(lines) == 9


def test_demo_needs_no_training_package() -> None:
    """The runtime's demo source renders with the simulator alone (no ``training`` import)."""
    import subprocess
    import sys

    code = ("import sys, stream.sources, stream.synth as s; next(s.iter_frames(seconds=0.2, "
            "size=(320, 240))); print(sorted(m for m in sys.modules if m.split('.')[0] == "
            "'training'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]"


def test_stain_presets_change_colours_not_cells() -> None:
    """Another lab's stain changes the red cells' colour and the camera, never the slide's
    cells (same seed, same truth); an unknown preset is a clear error."""
    base = make_slide(seed=4, size=SMALL)
    teal = make_slide(seed=4, size=SMALL, stain="teal_rbc")
    assert [c.box for c in teal.cells] == [c.box for c in base.cells]
    # red-cell pixels: the commonest stained colour. Pink absorbs green most (B > R in OD
    # terms: R light passes); teal absorbs red more than blue.
    def stained_mean(img: np.ndarray) -> np.ndarray:
        px = img.reshape(-1, 3).astype(float)
        dark = px.sum(1) < np.percentile(px.sum(1), 50)
        return px[dark].mean(0)

    b, g, r = stained_mean(base.image)
    assert r > b  # pink
    b, g, r = stained_mean(teal.image)
    assert b > r  # blue-grey / teal
    dim = make_slide(seed=4, size=SMALL, stain="dim_vignetted")
    assert dim.settings.exposure == 0.45 and dim.settings.vignette == 0.5
    assert dim.image.mean() < 0.6 * base.image.mean()
    with pytest.raises(InputError, match="stain must be one of"):
        make_slide(seed=4, size=SMALL, stain="purple")


def test_eyepiece_camera_sees_a_round_field_and_its_truth_says_so() -> None:
    """The ``eyepiece`` camera: a round field as wide as the frame is high, black around it; a
    white cell's visible fraction is what the field shows of it, so a cell the field's rim cuts
    is not fully in view (and is not one the count must include until it is)."""
    from training.count_eval import fully_visible

    sim = SlideSimulator(seed=11, size=SMALL, fps=10, stain="eyepiece")
    plain = SlideSimulator(seed=11, size=SMALL, fps=10)
    assert sim.settings.field_stop == 1.0 and plain.settings.field_stop == 0.0
    img, _ = sim.frame(0)
    assert img[:12, :12].max() < 40 and img[-12:, -12:].max() < 40  # the black corners
    assert abs(float(img[110:130, 150:170].mean()) - float(plain.frame(0)[0][110:130, 150:170]
                                                           .mean())) < 3  # the field itself
    w, h = SMALL
    cut = whole = 0
    for i in range(0, 400, 4):
        truth, ref = sim.truth(i), {c["id"]: c for c in plain.truth(i)["cells"]}
        for c in truth["cells"]:
            x1, y1, x2, y2 = c["box"]
            far = np.hypot((x1 + x2) / 2 - (w - 1) / 2, (y1 + y2) / 2 - (h - 1) / 2)
            if far + max(x2 - x1, y2 - y1) / 2 < 0.5 * h - 3:  # well inside the field
                assert c["visible_fraction"] == ref[c["id"]]["visible_fraction"]
                whole += fully_visible(c, w, h)
            elif far - max(x2 - x1, y2 - y1) / 2 < 0.5 * h < far:  # the rim runs through it
                assert c["visible_fraction"] < ref[c["id"]]["visible_fraction"]
                assert not fully_visible(c, w, h)
                cut += 1
    assert cut and whole


def test_cli_stain_and_magnification(tmp_path: Path) -> None:
    from stream.cli import main as cli_main

    out = tmp_path / "mag"
    assert cli_main(["synth", str(out), "--seconds", "0.2", "--fps", "10", "--size", "320x240",
                     "--stain", "yellow_bg", "--magnification", "0.5"]) == 0
    settings = load_truth(out)["settings"]
    assert settings["stain"] == "yellow_bg"
    assert settings["rbc_px"] == pytest.approx(105.0 * 0.5 * 0.5)


def _nucleus_and_cytoplasm(label: str, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(nucleus mask, cytoplasm BGR pixels) of each white cell of a slide of one type."""
    slide = make_slide(seed=seed, wbc_mix={label: 1.0}, all_types=False, wbc_per_frame=1.0)
    out = []
    for c in slide.cells:
        x1, y1, x2, y2 = c.box
        px = slide.image[y1:y2, x1:x2]
        nuc = _purple(px) & c.mask
        cyto = c.mask & ~cv2.dilate(nuc.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        out.append((nuc, px[cyto]))
    return out


def test_monocytes_look_like_monocytes_not_nucleated_red_cells() -> None:
    """A monocyte's nucleus is folded (kidney or horseshoe: far from its convex hull) and its
    cytoplasm greyer than a lymphocyte's sky blue; drawn round in blue cytoplasm, the
    simulator's monocytes looked like erythroblasts (PBC's) to the classifier."""
    solidity, mono_sat = [], []
    for nuc, cyto in _nucleus_and_cytoplasm("monocyte", 4):
        contours, _ = cv2.findContours(nuc.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        big = max(contours, key=cv2.contourArea)
        solidity.append(cv2.contourArea(big) / cv2.contourArea(cv2.convexHull(big)))
        mono_sat.append(np.median(cyto.max(1).astype(int) - cyto.min(1)))
    lymph_sat = [np.median(cy.max(1).astype(int) - cy.min(1))
                 for _, cy in _nucleus_and_cytoplasm("lymphocyte", 4) if len(cy) > 50]
    assert len(solidity) >= 5 and len(lymph_sat) >= 5
    assert np.median(solidity) < 0.88, solidity
    assert np.median(mono_sat) < 0.8 * np.median(lymph_sat), (mono_sat, lymph_sat)
