"""``hematovision bench`` on a short clip with a tiny real model: every figure is there and sane.

No speed is asserted (figures depend on the machine); this checks the bench measures what it
says: all stages, the naive design classifying far more crops, and the memory of a real run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import pytest

from stream import bench
from tests.detector.fakes import Cell, Slide, pan, view
from tests.tiny_models import tiny_models  # noqa: F401


@pytest.fixture()
def short_clip(tmp_path, monkeypatch):
    slide = Slide(1200, 600, [Cell(1, "neutrophil", 300, 300), Cell(2, "eosinophil", 520, 320)])
    path = tmp_path / "clip.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 30.0, (320, 240))
    for x, y in pan((60, 170), (5, 0), 60):
        w.write(view(slide, x, y))
    w.release()
    monkeypatch.setattr(bench, "bench_clip", lambda: path)
    return path


def test_bench_figures(short_clip, tiny_models, capsys):  # noqa: F811
    model = str(tiny_models / "int8.tflite")
    r = bench.run_bench(threads=1, model=model, memory=True)
    assert r["clip"]["frames"] == 60
    assert set(r["cpu_ms_per_frame"]) == {"decode", "segment", "track", "classify", "tally",
                                          "draw"}
    assert all(v >= 0 for v in r["cpu_ms_per_frame"].values())
    assert r["cpu_ms_per_frame"]["segment"] > 0 and r["cpu_ms_per_frame"]["decode"] > 0
    assert r["fps_end_to_end"] > 0 and r["fps_naive"] > 0
    assert r["crops_classified_naive"] >= r["crops_classified"]
    assert r["peak_rss_mb_run"] is not None and 30 < r["peak_rss_mb_run"] < 2000
    text = bench.format_report(r)
    assert "end-to-end" in text and "naive" in text and "peak memory" in text
    code = bench.main(argparse.Namespace(threads=1, json=True, model=model))
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["threads"] == 1 and "fps_end_to_end" in out


def test_serve_bench_leaves_no_temporary_files(tmp_path, monkeypatch):
    """The live-page measurements write their session files to a folder removed at the end."""
    from stream import bench_serve, sources
    from stream.synth import render_video

    clip = render_video(tmp_path / "clip", seconds=1.0, fps=30.0, seed=1, progress=False)
    monkeypatch.setattr(sources, "demo_video_path", lambda: clip / "video.mp4")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(bench_serve.tempfile, "tempdir", str(scratch))
    made = []
    real = bench_serve.tempfile.TemporaryDirectory

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(bench_serve.tempfile, "TemporaryDirectory", spy)
    r = bench_serve.bench_long(frames=40, model=None)
    assert r["frames"] >= 40
    assert [Path(m.name).name.startswith("hv-bench-") for m in made] == [True]
    assert list(scratch.iterdir()) == []  # written during the run, removed after it
