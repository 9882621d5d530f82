"""``hematovision bench`` on a short clip with a tiny real model: every figure is there and
measures what it says.

No speed is asserted (figures depend on the machine); what is pinned: the clip's frames, every
stage, the naive pipeline classifying every cell of every frame (as many crops as the segmenter
finds cells) against at most three crops per counted cell, the end-to-end figure never above
what the summed stages allow, the targets' verdicts, the memory of a real run, and the command
printing the figures it measured (one bench run: the command's output is checked on it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from detector.core import Frame
from detector.segment import Segmenter
from detector.vote import VoteOptions
from stream import bench


@pytest.fixture()
def short_clip(tmp_path, monkeypatch):
    """Two seconds of the simulator (the reference clip is ten): red cells sized as a smear's
    around the white cells, so the real segmenter reads them as it reads the reference clip
    (the tracking tests' fake slide has red cells a quarter of a white cell's size)."""
    from stream import synth

    folder = synth.render_video(tmp_path / "clip", seconds=2.0, fps=30.0, seed=bench.CLIP_SEED,
                                size=(320, 240), progress=False, **bench.CLIP_SETTINGS)
    path = folder / "video.mp4"
    monkeypatch.setattr(bench, "bench_clip", lambda: path)
    monkeypatch.setattr(bench, "magnification_clip", lambda m: path)  # one render suffices
    return path


def test_bench_figures(short_clip, tiny_models, capsys, monkeypatch):
    model = str(tiny_models / "int8.tflite")
    r = bench.run_bench(threads=1, model=model, memory=True)
    assert r["clip"]["path"] == str(short_clip) and r["model"] == model
    assert (r["clip"]["frames"], r["clip"]["size"], r["clip"]["seconds"]) == (60, [320, 240], 2.0)
    stages = r["cpu_ms_per_frame"]
    assert list(stages) == ["decode", "segment", "track", "classify", "tally", "draw"]
    assert stages["segment"] > 0 and stages["decode"] > 0 and stages["draw"] > 0

    # naive: every cell the segmenter finds in every frame goes to the classifier
    frames, _, _ = bench.decode_all(short_clip)
    seg = Segmenter()
    found = sum(len(seg.find(Frame(img, i))) for i, img in enumerate(frames))
    assert r["crops_classified_naive"] == found
    # the pipeline: at most ``votes_needed`` crops per counted cell, far fewer than naive
    assert r["cells_counted"] >= 1
    assert (0 < r["crops_classified"] <= VoteOptions().votes_needed * r["cells_counted"]
            < r["crops_classified_naive"])
    # end to end = frames per CPU second of decode..tally: never faster than the stages allow
    analysis_ms = sum(v for k, v in stages.items() if k != "draw")
    assert 0 < r["fps_end_to_end"] <= 1.01 * 1000.0 / analysis_ms
    assert r["fps_naive"] > 0 and r["fps_streaming"] > 0 and r["fps_with_draw"] > 0
    assert r["target_fps_reached"] == (max(r["fps_end_to_end"], r["fps_streaming"]) >= 300)
    rss = r["peak_rss_mb_run"]
    assert rss is not None and 30 < rss < 2000  # a real run: Python, OpenCV, the interpreter
    assert r["target_rss_reached"] == (rss <= 250)
    seg_ms = r["segment_ms_at_magnification"]
    assert list(seg_ms) == ["1", "0.35", "2"] and all(v > 0 for v in seg_ms.values())
    assert r["target_segment_reached"] == (max(seg_ms.values()) <= 2.0)

    text = bench.format_report(r)
    assert (f"crops classified: {r['crops_classified']} "
            f"(naive: {r['crops_classified_naive']})") in text
    assert f"{r['fps_end_to_end']:.0f} frames/s per CPU second" in text
    assert f"peak memory of 'hematovision run': {rss:.0f} MB" in text
    assert f"0.35x {seg_ms['0.35']:.2f}" in text

    # the command prints what run_bench measured, as JSON or as the text report
    calls = []
    monkeypatch.setattr(bench, "run_bench", lambda **kw: calls.append(kw) or r)
    assert bench.main(argparse.Namespace(threads=1, json=True, model=model, serve=False)) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(r))
    assert bench.main(argparse.Namespace(threads=2, json=False, model=None, serve=False)) == 0
    assert capsys.readouterr().out == text + "\n"
    assert calls == [{"threads": 1, "model": model}, {"threads": 2, "model": None}]


def test_magnification_clip_is_rendered_at_that_magnification(tmp_path, monkeypatch):
    from stream.synth import load_truth
    from stream.synth.settings import RBC_PX_640

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(bench, "MAG_CLIP_SECONDS", 0.2)
    clip = bench.magnification_clip(0.35)
    assert clip.is_file() and clip.parent.parent == tmp_path / "hematovision"
    truth = load_truth(clip.parent)
    assert truth["settings"]["rbc_px"] == pytest.approx(0.35 * RBC_PX_640)


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
