"""``hematovision run SOURCE``: count the white cells of a video, image folder or the demo.

Analysis mode: every frame is analysed (none dropped). A folder of images is either the frames
of one moving field (tracked like a video) or unrelated photos, each counted on its own ("stills"
mode); the first two images decide (``detector.motion.same_scene``), the report says which.
Stills go through the same still-image analysis as ``detect`` (``detector.still``): every cell is
named and counted, those cut by the photo's edge too (flagged ``"cut": true`` in their event),
so ``run`` and ``detect`` count the same cells. An image that cannot be used (not an image, too
large, greyscale) is reported on one line as ``detect`` does, the others are counted, and the
exit code is 1.
Each counted cell is appended to the ``--events`` JSON Lines file and flushed at once, so a
crash loses nothing already counted. The
``--report`` JSON is written at the end, also after an error in the middle of the input (a
corrupt or truncated file) or Ctrl-C, with what was counted so far.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np

from detector.analyzer import STAGES, Analyzer, FrameResult, build_analyzer
from detector.core import UNIDENTIFIED, CountEvent, Frame
from detector.errors import HematoVisionError, InputError
from detector.still import StillCells, analyse_still, draw_still
from stream.detect import native_stderr_silenced
from stream.outputs import EventLog, VideoRecorder, build_report, write_report
from stream.sources import Source, open_source

log = logging.getLogger(__name__)


class RunStats:
    """What the run did, for the report: frames, wall time, per-stage time."""

    def __init__(self) -> None:
        self.frames = 0
        self.classified = 0
        self.stage_s: dict[str, float] = dict.fromkeys((*STAGES, "decode", "draw"), 0.0)
        self.t0 = time.perf_counter()
        self.wall = 0.0

    def add(self, result: FrameResult) -> None:
        self.frames += 1
        self.classified += result.classified
        for k, v in result.timings.items():
            self.stage_s[k] = self.stage_s.get(k, 0.0) + v

    def add_still(self, cells: int, seconds: float) -> None:
        self.frames += 1
        self.classified += cells
        self.stage_s["still"] = self.stage_s.get("still", 0.0) + seconds


def run_report(analyzer: Analyzer | None, stats: RunStats, *, source: str, model: str,
               source_fps: float | None, error: str | None, interrupted: bool
               ) -> dict[str, Any]:
    """The ``--report`` dict, with what was counted so far."""
    summary = analyzer.tally.summary().to_json() if analyzer else {}
    wall = stats.wall or (time.perf_counter() - stats.t0)
    n = max(stats.frames, 1)
    return build_report(
        summary, source=source, model=model, frames=stats.frames, seconds=wall,
        video_seconds=round(stats.frames / source_fps, 3) if source_fps else None,
        source_fps=source_fps,
        unidentified=summary.get("counts", {}).get(UNIDENTIFIED, 0),
        classified_crops=stats.classified,
        ms_per_frame={k: round(1000 * v / n, 3) for k, v in stats.stage_s.items()},
        error=error, interrupted=interrupted)


def format_summary(report: dict[str, Any]) -> str:
    """One screen: counts, differential with 95 % CI, speed."""
    lines = [f"source: {report['source']}   model: {report['model']}",
             f"frames: {report['frames']}   {report['seconds']:.1f} s   "
             f"{report['fps']:.1f} frames/s",
             "",
             f"{'cell type':<14}{'count':>7}{'percent':>10}   95% CI (Wilson)"]
    for label, n in report["counts"].items():
        pct = report["differential"].get(label, 0.0)
        lo, hi = report["ci95"].get(label, [0.0, 100.0])
        lines.append(f"{label:<14}{n:>7}{pct:>9.1f}%   {lo:5.1f} - {hi:5.1f} %")
    status = "reached" if report["target_reached"] else "not reached"
    lines.append(f"{'total':<14}{report['total']:>7}   target {report['target']} {status}")
    if report.get("error"):
        lines.append(f"stopped early: {report['error']}")
    if report.get("interrupted"):
        lines.append("interrupted: counts so far")
    return "\n".join(lines)


def _frames(source: Source, max_frames: int | None, stats: RunStats) -> Iterator[Frame]:
    """Frames of the source, timing the decode."""
    it = iter(source)
    while max_frames is None or stats.frames < max_frames:
        t = time.perf_counter()
        try:
            frame = next(it)
        except StopIteration:
            return
        stats.stage_s["decode"] += time.perf_counter() - t
        yield frame


def _stills_or_sequence(frames: Iterator[Frame], max_frames: int | None
                        ) -> tuple[Iterator[Frame], bool]:
    """Look at the first two images: unrelated photos (True: count each image on its own) or
    frames of one moving field (False: track)? Returns the frames, none lost, and the answer."""
    import itertools

    from detector.motion import same_scene

    head = [f for f in itertools.islice(frames, 1 if max_frames == 1 else 2)]
    still = len(head) < 2 or not same_scene(head[0].bgr, head[1].bgr)
    log.info("images look like %s", "separate fields (stills)" if still else "one video")
    return itertools.chain(head, frames), still


def count_still(analyzer: Analyzer, frame: Frame, first_id: int
                ) -> tuple[StillCells, list[CountEvent]]:
    """Name every cell of one photo (``detector.still``) and count each once -> (cells, events).

    Cells get ids ``first_id, first_id + 1, ...``; each event carries ``cut``."""
    cells = analyse_still(frame, analyzer.segmenter, analyzer.classifier)
    dets, cut = cells.detections, cells.cut
    events = []
    for i, name in enumerate(cells.names):
        event = analyzer.tally.count(first_id + i, name, float(dets.score[i]), frame.index,
                                     frame.index, dets.xyxy[i], cut=bool(cut[i]))
        if event is not None:
            events.append(event)
    return cells, events


class SourceError(InputError):
    """SOURCE itself cannot be used (missing, empty, not a video, no camera): the input failed,
    as a bad image does for ``detect`` (exit code 1), not the model or an output (2)."""


def count(args: argparse.Namespace, analyzer: Analyzer | None = None
          ) -> tuple[dict[str, Any], BaseException | None]:
    """Count ``args.source`` -> (the report, also written to ``--report``; what stopped the
    count early or None).

    What stops it: :class:`SourceError`, another ``HematoVisionError`` (the model, an output
    file, a video that breaks off), ``KeyboardInterrupt``, or a bug; the report and events hold
    what was counted until then.
    """
    stats = RunStats()
    source_name, source_fps = str(args.source), None
    model_name = str(args.model) if args.model else "default"
    error: str | None = None
    interrupted = False
    events = EventLog(args.events)
    recorder: VideoRecorder | None = None
    pending: BaseException | None = None
    still, mode = False, "video"
    skipped: list[str] = []
    try:
        if analyzer is None:
            with native_stderr_silenced():
                analyzer = build_analyzer(args.model, target=args.target)
        events.check()
        if args.record:
            recorder = VideoRecorder(args.record)
        try:
            source = open_source(args.source, realtime=False)
        except InputError as exc:
            raise SourceError(str(exc)) from None
        with source as src:
            source_name, source_fps = src.name, float(src.fps or 0.0) or None
            expected = src.frame_count
            if recorder is not None:
                recorder.fps = source_fps or 30.0
            total = expected if args.max_frames is None else min(expected or args.max_frames,
                                                                  args.max_frames)
            from tqdm import tqdm

            frames = _frames(src, args.max_frames, stats)
            if not src.fps:  # images: consecutive frames of one field, or unrelated photos?
                frames, still = _stills_or_sequence(frames, args.max_frames)
                mode = "stills" if still else "sequence"
            next_id = 1
            with tqdm(total=total, unit="frame", file=sys.stderr, disable=None, leave=False,
                      desc="counting") as bar:
                for frame in frames:
                    if still:
                        t = time.perf_counter()
                        cells, counted = count_still(analyzer, frame, next_id)
                        next_id += len(cells)
                        stats.add_still(len(cells), time.perf_counter() - t)
                    else:
                        result = analyzer.process(frame)
                        stats.add(result)
                        counted = result.counted
                    for ev in counted:
                        events.write(ev.to_json())
                    if recorder is not None:
                        t = time.perf_counter()
                        recorder.write(_draw_still(frame, cells, analyzer) if still
                                       else analyzer.render(result, fps=None))
                        stats.stage_s["draw"] += time.perf_counter() - t
                    bar.update(1)
            skipped = list(src.errors)
        # (a container's frame count can be an estimate: allow a few percent)
        short = (expected is not None and args.max_frames is None
                 and stats.frames < 0.97 * expected - 1)
        if short:
            error = (f"{args.source}: video ended after {stats.frames} of {expected} frames "
                     "(truncated or corrupt); counts so far were kept")
    except KeyboardInterrupt as exc:
        interrupted, pending = True, exc
    except HematoVisionError as exc:
        error, pending = str(exc), exc
    except cv2.error as exc:
        error = f"{args.source}: cannot decode ({str(exc).strip().splitlines()[-1]})"
    except Exception as exc:  # a bug: keep the counts, note it in the report, then re-raise
        error, pending = f"internal error: {type(exc).__name__}: {exc}", exc
    finally:
        stats.wall = time.perf_counter() - stats.t0
        try:
            if analyzer is not None:
                for ev in analyzer.finish():
                    events.write(ev.to_json())
        except HematoVisionError as exc:  # the events file itself cannot be written
            error = error or str(exc)
        finally:
            events.close()
            if recorder is not None:
                recorder.close()
        report = run_report(analyzer, stats, source=source_name, model=model_name,
                            source_fps=source_fps, error=error, interrupted=interrupted)
        report["mode"] = mode
        report["skipped"] = skipped
        if args.report:
            write_report(args.report, report)
    if pending is None and error is not None:
        pending = InputError(error)
    return report, pending


def run(args: argparse.Namespace, analyzer: Analyzer | None = None) -> dict[str, Any]:
    """Count ``args.source``; returns the report (also written to ``--report``).

    Raises what stopped the count (:func:`count`), after the report and events are written.
    """
    report, failure = count(args, analyzer)
    if failure is not None:
        raise failure
    return report


def _draw_still(frame: Frame, cells: StillCells, analyzer: Analyzer) -> np.ndarray:
    from detector.draw import draw_panel

    return draw_panel(draw_still(frame.bgr, cells), analyzer.tally.summary(), None, inplace=True)


def main(args: argparse.Namespace) -> int:
    """CLI handler of ``hematovision run``: 1 when the input could not be used (SOURCE, or some
    of its images: each named on one line, as ``detect`` does), else 0; the model or an output
    that cannot be used raises (exit code 2)."""
    report, failure = count(args)
    if isinstance(failure, SourceError):
        print(f"hematovision run: {failure}", file=sys.stderr, flush=True)
        return 1
    if failure is not None:
        if isinstance(failure, KeyboardInterrupt) or report["frames"]:
            print(format_summary(report), flush=True)  # what was counted until then
        raise failure
    if report["frames"] or not report["skipped"]:
        print(format_summary(report))
    for message in report["skipped"]:
        print(f"hematovision run: {message}", file=sys.stderr, flush=True)
    return 1 if report["skipped"] else 0
