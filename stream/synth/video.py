"""Files of the simulator: ``video.mp4`` plus ``truth.json`` (written and read back), and clips
rendered once and cached (the ``demo`` source, the bench's reference clip)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2

from detector.core import CELL_TYPES
from detector.errors import InputError
from stream.synth.settings import TRUTH_VERSION
from stream.synth.simulator import SlideSimulator, frame_count

log = logging.getLogger(__name__)

_CODECS = ("avc1", "mp4v")
_codec_ok: dict[str, bool] = {}  # codec -> could open a writer (probed once per process)


def _open_writer(path: Path, fps: float, size: tuple[int, int]) -> tuple[cv2.VideoWriter, str]:
    """An MP4 writer: H.264 ('avc1') when this OpenCV build can encode it, else 'mp4v'.

    opencv-python-headless wheels usually lack an H.264 encoder; FFmpeg then logs a few error
    lines once per process while we probe (``hematovision synth`` silences them)."""
    old = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        for codec in _CODECS:
            if _codec_ok.get(codec) is False:
                continue
            wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size)
            _codec_ok[codec] = wr.isOpened()
            if _codec_ok[codec]:
                return wr, codec
            wr.release()
    finally:
        cv2.utils.logging.setLogLevel(old)
    raise InputError(f"cannot write {path}: this OpenCV build has no MP4 encoder (avc1/mp4v)")


def _with_progress(n: int, progress: bool | str | None, desc: str) -> Iterable[int]:
    """range(n), reported as a tqdm bar on stderr (True; None: if stderr is a terminal and the
    clip is long), as a log line every 10% ("log": for servers without a terminal), or not."""
    if progress is None:
        progress = n > 150 and sys.stderr.isatty()
    if progress == "log":
        return _logged_range(n, desc)
    if progress:
        from tqdm import tqdm

        return tqdm(range(n), desc=desc, unit="frame", leave=False)
    return range(n)


def _logged_range(n: int, desc: str) -> Iterator[int]:
    step = max(n // 10, 1)
    for i in range(n):
        if i and i % step == 0:
            log.warning("%s: %d%% (%d of %d frames)", desc, round(100 * i / n), i, n)
        yield i


def render_video(out_dir: str | Path, seconds: float = 60.0, fps: float = 30.0, seed: int = 0,
                 size: tuple[int, int] = (640, 480), progress: bool | str | None = None,
                 desc: str = "synth", **settings: Any) -> Path:
    """Render ``video.mp4`` and ``truth.json`` into ``out_dir`` (created if needed); return
    ``out_dir`` as a Path. ``settings`` are :class:`SynthSettings` fields; ``progress``: see
    :func:`_with_progress` (``desc`` names the clip there)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    sim = SlideSimulator(seed=seed, size=size, fps=fps, **settings)
    n = frame_count(seconds, sim.fps)
    assert n is not None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {out}: {exc.strerror or exc}") from None
    video = out / "video.mp4"
    writer, codec = _open_writer(video, sim.fps, sim.size)
    frames_truth = []
    try:
        for i in _with_progress(n, progress, desc):
            bgr, tr = sim.frame(i)
            writer.write(bgr)
            frames_truth.append(tr)
    finally:
        writer.release()
    truth = sim.header(n)
    truth["video"] = {"file": video.name, "codec": codec}
    truth["frame_truth"] = frames_truth
    tmp = out / "truth.json.tmp"
    tmp.write_text(json.dumps(truth, separators=(",", ":")) + "\n")
    tmp.replace(out / "truth.json")
    log.info("wrote %s (%d frames, %s) and truth.json", video, n, codec)
    return out


def cache_root() -> Path:
    """Where rendered clips are cached: $XDG_CACHE_HOME/hematovision (default ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hematovision"


def cached_video(name: str, seconds: float, fps: float = 30.0, seed: int = 0,
                 size: tuple[int, int] = (640, 480), **settings: Any) -> Path:
    """``video.mp4`` of a clip rendered once and cached (the demo, the bench's reference clip).

    The cache folder's name carries a hash of the parameters and of the simulator's source, so a
    changed simulator or clip renders anew instead of replaying a stale file. Rendering goes to a
    temporary folder first, so an interrupted render never leaves a half-written clip behind.
    The first render takes about half a minute: it shows a progress bar on a terminal and a log
    line every 10% otherwise, so a first ``serve`` does not sit silent.
    """
    key = json.dumps([seconds, fps, seed, list(size), sorted(settings.items())], default=str)
    h = hashlib.sha1(key.encode())
    for module in sorted(Path(__file__).parent.glob("*.py")):
        h.update(module.read_bytes())
    digest = h.hexdigest()[:10]
    folder = cache_root() / f"{name}-{digest}"
    video = folder / "video.mp4"
    if video.is_file() and video.stat().st_size > 0:
        return video
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    log.warning("rendering the %s clip into %s (first use only, about half a minute)", name,
                folder)
    render_video(tmp, seconds=seconds, fps=fps, seed=seed, size=size,
                 progress=True if sys.stderr.isatty() else "log", desc=f"rendering the {name} clip",
                 **settings)
    folder.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        os.replace(item, folder / item.name)
    tmp.rmdir()
    return video


def _fail(path: Path, what: str) -> InputError:
    return InputError(f"{path}: not a valid synth truth file: {what}")


def load_truth(path: str | Path) -> dict[str, Any]:
    """Read and validate a truth.json (or the synth folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "truth.json"
    if not p.is_file():
        raise InputError(f"{p}: truth file not found")
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(p, f"cannot parse JSON ({exc})") from None
    if not isinstance(d, dict):
        raise _fail(p, "top level is not an object")
    if d.get("version") != TRUTH_VERSION:
        raise _fail(p, f"version {d.get('version')!r}, expected {TRUTH_VERSION}")
    for key, typ in (("seed", int), ("fps", (int, float)), ("size", list), ("frames", int),
                     ("settings", dict), ("cells", list), ("frame_truth", list)):
        if not isinstance(d.get(key), typ):
            raise _fail(p, f"missing or wrong type for {key!r}")
    if len(d["size"]) != 2:
        raise _fail(p, "size must be [width, height]")
    if len(d["frame_truth"]) != d["frames"]:
        raise _fail(p, f"frames={d['frames']} but frame_truth has {len(d['frame_truth'])} entries")
    ids = {}
    for c in d["cells"]:
        if not (isinstance(c, dict) and isinstance(c.get("id"), int)
                and c.get("label") in CELL_TYPES
                and isinstance(c.get("slide_box"), list) and len(c["slide_box"]) == 4):
            raise _fail(p, f"bad cell entry {c!r}")
        ids[c["id"]] = c["label"]
    w, h = d["size"]
    for k, f in enumerate(d["frame_truth"]):
        if not isinstance(f, dict) or f.get("frame") != k or not isinstance(f.get("cells"), list):
            raise _fail(p, f"frame_truth[{k}] is malformed")
        for c in f["cells"]:
            box = c.get("box") if isinstance(c, dict) else None
            if c.get("id") not in ids or not isinstance(box, list) or len(box) != 4:
                raise _fail(p, f"frame {k}: bad cell {c!r}")
            if not (0 <= box[0] <= box[2] <= w and 0 <= box[1] <= box[3] <= h):
                raise _fail(p, f"frame {k}: box {box} outside the {w}x{h} frame")
    return d
