"""``hematovision run``: report and events contents, events flushed per cell, errors keep counts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from detector.analyzer import Analyzer
from detector.errors import InputError
from stream import cli
from stream.run import run
from tests.detector.fakes import Cell, FakeClassifier, FakeSegmenter, Slide, pan, view

CELLS = [Cell(1, "neutrophil", 300, 300), Cell(2, "eosinophil", 460, 320),
         Cell(3, "lymphocyte", 620, 290), Cell(4, "neutrophil", 780, 310)]


@pytest.fixture(scope="module")
def slide() -> Slide:
    return Slide(1200, 600, CELLS, seed=5)


PATH = pan((80, 170), (6, 0), 120)


def args_for(tmp: Path, source: str, **kw) -> argparse.Namespace:
    ns = argparse.Namespace(source=source, model=None, report=str(tmp / "report.json"),
                            events=str(tmp / "events.jsonl"), record=None, target=4,
                            max_frames=None)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def write_frames(slide: Slide, folder: Path, n: int = len(PATH)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (x, y) in enumerate(PATH[:n]):
        cv2.imwrite(str(folder / f"f{i:04d}.png"), view(slide, x, y))
    return folder


def write_video(slide: Slide, path: Path, n: int = len(PATH)) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 30.0, (320, 240))
    for x, y in PATH[:n]:
        w.write(view(slide, x, y))
    w.release()
    return path


def fake_analyzer(slide: Slide, segmenter: FakeSegmenter | None = None) -> Analyzer:
    return Analyzer(segmenter or FakeSegmenter(slide, PATH), FakeClassifier(), target=4)


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_report_and_events(tmp_path, slide):
    folder = write_frames(slide, tmp_path / "frames")
    report = run(args_for(tmp_path, str(folder)), analyzer=fake_analyzer(slide))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["counts"] == report["counts"]
    assert saved["counts"] == {"neutrophil": 2, "eosinophil": 1, "lymphocyte": 1,
                               "unidentified": 0}
    assert saved["total"] == 4 and saved["target_reached"] and saved["unidentified"] == 0
    assert saved["frames"] == len(PATH) and saved["source"] == str(folder)
    assert saved["differential"]["neutrophil"] == 50.0
    assert set(saved["ci95"]) == set(saved["counts"])
    assert saved["error"] is None and saved["interrupted"] is False
    events = read_events(tmp_path / "events.jsonl")
    assert len(events) == 4 and len({e["track_id"] for e in events}) == 4
    keys = {"track_id", "label", "score", "first_frame", "last_frame", "box"}
    assert keys <= set(events[0]) <= keys | {"cut"} and not events[0].get("cut")
    assert saved["mode"] == "sequence"


def test_folder_of_unrelated_photos_counts_each(tmp_path, slide):
    """Photos of different fields: no tracking across them, each image's cells counted."""
    far = [(60, 170), (380, 60), (700, 300)]
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (x, y) in enumerate(far):
        cv2.imwrite(str(folder / f"p{i}.png"), view(slide, x, y))
    seg = FakeSegmenter(slide, far)
    report = run(args_for(tmp_path, str(folder)), analyzer=fake_analyzer(slide, seg))
    assert report["mode"] == "stills" and report["frames"] == 3
    from tests.detector.fakes import truth_boxes

    # a photo has no next frame: cells cut by its edge are counted too, and flagged
    cut = [bool(c) for x, y in far for c in truth_boxes(slide, x, y)[1]]
    assert report["total"] == len(cut) > sum(cut) > 0
    events = read_events(tmp_path / "events.jsonl")
    assert [e["cut"] for e in events] == cut


def test_run_and_detect_count_the_same_cells(tmp_path, bccd_dir, shipped_model, capsys):
    """Real BCCD photos, two of them with a cell cut by the edge: one still-image analysis."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for n in (0, 1, 2, 8):
        name = f"BloodImage_{n:05d}.jpg"
        (folder / name).write_bytes((bccd_dir / "JPEGImages" / name).read_bytes())
    assert cli.main(["detect", str(folder), "--json", "--model", str(shipped_model)]) == 0
    cells = [c for line in capsys.readouterr().out.splitlines()
             for c in json.loads(line)["cells"]]
    assert cli.main(["run", str(folder), "--model", str(shipped_model),
                     "--report", str(tmp_path / "r.json"),
                     "--events", str(tmp_path / "e.jsonl")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    events = read_events(tmp_path / "e.jsonl")
    assert report["mode"] == "stills" and report["total"] == len(cells) == len(events) == 4
    assert [(e["label"], e["cut"]) for e in events] == [(c["label"], c["cut"]) for c in cells]
    assert sum(c["cut"] for c in cells) == 2
    for e, c in zip(events, cells, strict=True):
        assert np.allclose(e["box"], c["box"], atol=1)


def test_unusable_images_one_line_each_exit_1(tmp_path, capsys, slide):
    """Not an image, greyscale: the message detect gives, the other photos counted, exit 1."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a_fake.jpg").write_text("this is not a jpeg")
    cv2.imwrite(str(folder / "b_grey.png"), np.full((240, 320, 3), 128, np.uint8))
    code = cli.main(["run", str(folder / "a_fake.jpg"), "--report", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.splitlines() == [f"hematovision run: {folder / 'a_fake.jpg'}: not a readable image"]
    code = cli.main(["run", str(folder)])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"hematovision run: {folder / 'a_fake.jpg'}: not a readable image",
        f"hematovision run: {folder / 'b_grey.png'}: greyscale image: white cells are found and "
        "named by their stain, so a colour photo of a stained smear is needed"]


def test_record_where_a_file_is_in_the_way(tmp_path, capsys, slide):
    folder = write_frames(slide, tmp_path / "frames", n=3)
    (tmp_path / "afile").write_text("x")
    code = cli.main(["run", str(folder), "--record", str(tmp_path / "afile" / "out.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [
        f"hematovision run: error: {tmp_path / 'afile' / 'out.mp4'}: cannot write the video "
        "there (File exists)"]


class SpySegmenter(FakeSegmenter):
    """Reads the events file at every frame: what is in it must match what was counted."""

    def __init__(self, *a, events: Path, analyzer_ref: list, **kw) -> None:
        super().__init__(*a, **kw)
        self.events, self.ref, self.checked = events, analyzer_ref, 0

    def find(self, image, *, in_sequence: bool = False):
        if self.ref and self.events.exists():
            on_disk = len(self.events.read_text().splitlines())
            assert on_disk == len(self.ref[0].tally.events)
            self.checked += on_disk > 0
        return super().find(image)


def test_events_flushed_per_cell(tmp_path, slide):
    folder = write_frames(slide, tmp_path / "frames")
    ref: list = []
    seg = SpySegmenter(slide, PATH, events=tmp_path / "events.jsonl", analyzer_ref=ref)
    an = fake_analyzer(slide, seg)
    ref.append(an)
    run(args_for(tmp_path, str(folder)), analyzer=an)
    assert seg.checked > 0


def test_events_are_appended(tmp_path, slide):
    folder = write_frames(slide, tmp_path / "frames")
    run(args_for(tmp_path, str(folder)), analyzer=fake_analyzer(slide))
    run(args_for(tmp_path, str(folder)), analyzer=fake_analyzer(slide))
    assert len(read_events(tmp_path / "events.jsonl")) == 8


def test_video_record_and_max_frames(tmp_path, slide):
    video = write_video(slide, tmp_path / "clip.mp4")
    out = tmp_path / "annotated.mp4"
    report = run(args_for(tmp_path, str(video), record=str(out), max_frames=50),
                 analyzer=fake_analyzer(slide))
    assert report["frames"] == 50
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 50
    cap.release()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: str(tmp / "missing.mp4"), "no such file"),
        (lambda tmp: str((tmp / "empty").mkdir() or tmp / "empty"), "holds no images"),
        (lambda tmp: str((tmp / "bad.mp4").write_bytes(b"\x00junk" * 500) and tmp / "bad.mp4"),
         "bad.mp4"),
    ],
)
def test_unusable_source_errors_and_writes_report(tmp_path, slide, make, message):
    source = make(tmp_path)
    with pytest.raises(InputError, match=message):
        run(args_for(tmp_path, source), analyzer=fake_analyzer(slide))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["total"] == 0 and message in saved["error"]


def test_truncated_video_keeps_counts(tmp_path, slide):
    video = write_video(slide, tmp_path / "clip.avi")
    full = run(args_for(tmp_path / "a", str(video)), analyzer=fake_analyzer(slide))
    data = video.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) * 2 // 3])
    try:
        run(args_for(tmp_path, str(cut)), analyzer=fake_analyzer(slide))
    except InputError as exc:
        assert "cut.avi" in str(exc)
        saved = json.loads((tmp_path / "report.json").read_text())
        assert saved["error"]
        assert 0 < saved["frames"] < full["frames"]
        events = read_events(tmp_path / "events.jsonl")
        assert len(events) == saved["total"] > 0
    else:  # a container that hides the cut: then at least the counts are right so far
        saved = json.loads((tmp_path / "report.json").read_text())
        assert saved["total"] == len(read_events(tmp_path / "events.jsonl")) > 0


class InterruptingSegmenter(FakeSegmenter):
    def find(self, image, *, in_sequence: bool = False):
        if image.index == 90:
            raise KeyboardInterrupt
        return super().find(image)


def test_ctrl_c_writes_report(tmp_path, slide):
    folder = write_frames(slide, tmp_path / "frames")
    an = fake_analyzer(slide, InterruptingSegmenter(slide, PATH))
    with pytest.raises(KeyboardInterrupt):
        run(args_for(tmp_path, str(folder)), analyzer=an)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["interrupted"] is True and saved["frames"] == 90
    assert saved["total"] == len(read_events(tmp_path / "events.jsonl")) >= 2


def test_cli_one_line_error(tmp_path, capsys):
    code = cli.main(["run", str(tmp_path / "nope.mp4"), "--report", str(tmp_path / "r.json"),
                     "--model", str(tmp_path / "m.tflite")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "hematovision run: error" in err
    assert json.loads((tmp_path / "r.json").read_text())["error"]


def test_real_segmenter_on_synth_clip(tmp_path):
    """The real segmenter and tracker run over a short simulator clip (accuracy: count_eval)."""
    synth = pytest.importorskip("stream.synth")
    folder = synth.render_video(tmp_path / "clip", seconds=4.0, fps=30.0, seed=2,
                                progress=False)
    from detector.segment import Segmenter

    class Constant(FakeClassifier):
        def classify_boxes(self, frame_bgr, xyxy):
            out = np.tile(np.array([[0.8, 0.1, 0.1]], np.float32), (len(xyxy), 1))
            self.crops += len(xyxy)
            return out

    an = Analyzer(Segmenter(), Constant(), target=100)
    report = run(args_for(tmp_path, str(folder / "video.mp4")), analyzer=an)
    truth = synth.load_truth(folder)
    in_view = {c["id"] for ft in truth["frame_truth"] for c in ft["cells"]}
    assert report["frames"] == 120
    assert report["total"] <= len(in_view)
    assert report["total"] == len(read_events(tmp_path / "events.jsonl"))


def _too_large_png(path: Path) -> Path:
    """A 6400x6400 photo (41 megapixels, over the 40 limit; small on disk)."""
    img = np.zeros((6400, 6400, 3), np.uint8)
    img[::2, :, 2] = 200
    cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return path


def test_a_source_that_is_no_picture_is_detects_one_line_exit_1(tmp_path, capfd):
    """`run notes.txt` and an over-size photo: exit 1 and the line `detect` gives (nothing
    else on stderr: no OpenCV/FFmpeg or TFLite runtime lines); a video that cannot be read
    is named as one, also exit 1."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    big = _too_large_png(tmp_path / "big.png")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 200)
    for path in (notes, big):
        assert cli.main(["detect", str(path)]) == 1
        detect_err = capfd.readouterr().err
        report = tmp_path / f"{path.stem}.json"
        assert cli.main(["run", str(path), "--report", str(report)]) == 1
        out, err = capfd.readouterr()
        assert out == "" and len(err.splitlines()) == 1
        assert err.replace("hematovision run:", "hematovision detect:") == detect_err
        assert json.loads(report.read_text())["skipped"] == [err.split(": ", 1)[1].strip()]
    assert detect_err.startswith(f"hematovision detect: {big}: image too large (6400x6400")
    assert cli.main(["run", str(broken)]) == 1
    out, err = capfd.readouterr()
    assert out == "" and err == f"hematovision run: {broken}: not a readable video file\n"


def test_a_photo_under_another_name_is_counted(tmp_path, slide):
    photo = tmp_path / "field.dat"  # a PNG whatever its name says
    photo.write_bytes(cv2.imencode(".png", view(slide, *PATH[0]))[1].tobytes())
    report = run(args_for(tmp_path, str(photo)), analyzer=fake_analyzer(slide))
    assert report["frames"] == 1 and report["mode"] == "stills" and report["skipped"] == []
