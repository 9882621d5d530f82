"""Frame sources: cameras, the Pi camera, video files, image folders, stream URLs and the demo.

``open_source(spec, realtime=...)`` turns a user's SOURCE argument into a :class:`Source`, a
context manager and iterator of :class:`detector.core.Frame`.

Two ways of delivering frames:

* Live (cameras, URLs, the Pi camera, and files or folders replayed with ``realtime=True``): a
  capture thread reads the device at its own pace into a one-slot buffer. A slow consumer always
  gets the newest frame; frames it never took are dropped and counted in ``Source.dropped``, so
  lag never grows. ``Frame.index`` counts every frame read, so gaps are visible downstream. A
  camera or stream that fails or stalls is reopened with exponential backoff.
* Analysis (files and folders with ``realtime=False``): frames are read in the consumer's thread,
  as fast as it asks, and none is dropped.

Devices (``stream.devices``) are opened by small factories (``device_factory`` arguments), so
tests can inject a fake ``cv2.VideoCapture``-like object.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from detector.core import Frame
from detector.errors import InputError
from stream.devices import (
    OPEN_TIMEOUT_MS,
    READ_TIMEOUT_MS,
    Device,
    DeviceFactory,
    FolderDevice,
    PiCameraDevice,
    device_fps,
    device_frame_count,
    is_opened,
    make_camera,
    make_url,
    open_video_file,
    safe_read,
    safe_release,
)
from stream.images import IMAGE_EXTENSIONS, bit_depth, expand_image_arg, normalize_image, read_still

log = logging.getLogger(__name__)

URL_RE = re.compile(r"^(rtsp|rtsps|http|https)://", re.IGNORECASE)
#: Names of video files: one that cannot be read is "not a readable video file"; any other
#: file that is not a video is read as a photo (and named as ``detect`` names a bad one).
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts", ".wmv",
     ".flv", ".ogv", ".3gp", ".mjpeg", ".mjpg", ".h264"})

#: Demo video parameters (the cache folder name includes DEMO_VERSION; bump it when they change).
DEMO_VERSION = "1"
DEMO_SECONDS = 60.0
DEMO_FPS = 30.0
DEMO_SIZE = (640, 480)


# --------------------------------------------------------------------------------------------
# Base class


class Source:
    """An iterator of frames with a name, a nominal fps and a drop counter.

    Attributes:
        name: What the user asked for, for display and reports.
        fps: Nominal frames per second of the source (0.0 when unknown, e.g. image folders).
        is_live: True for cameras and streams (frames arrive whether or not anyone reads them).
        dropped: Frames read from the device that the consumer never received.
        state: "running", "reconnecting", "stopped" or "error: ...".
        monotonic_clock: True when ``Frame.t`` is ``time.monotonic()`` at capture (False: the
            presentation time within a file).
        pass_start: ``Frame.index`` of the first frame of the current pass through a looping file
            (0 until it loops): frames from this index on show the same cells again.
        frame_count: Frames a video file's header announces (None: unknown, or not a file).
        errors: One line for each input that was skipped (an image folder's unusable files).
    """

    name: str = ""
    fps: float = 0.0
    is_live: bool = False
    monotonic_clock: bool = True

    def __init__(self) -> None:
        self.dropped = 0
        self.state = "running"
        self.pass_start = 0
        self.frame_count: int | None = None
        self.errors: list[str] = []
        self._bits: int | None = None  # bit depth of 16-bit frames, fixed at the first one

    def _as_bgr(self, img: np.ndarray | None) -> np.ndarray | None:
        """A device's frame as (H, W, 3) uint8 BGR, converted as image files are (None if
        unusable). 16-bit frames are scaled by one bit depth for the whole source."""
        if img is None or not isinstance(img, np.ndarray) or img.size == 0:
            return None
        if img.dtype == np.uint16 and self._bits is None:
            self._bits = bit_depth(img)
        try:
            return normalize_image(img, self.name, bits=self._bits)
        except InputError as exc:
            log.warning("%s", exc)
            return None

    def read(self, timeout: float | None = None) -> Frame | None:
        """Next frame, or None at the end of the source (or when ``timeout`` expires)."""
        raise NotImplementedError

    @property
    def ended(self) -> bool:
        """True once ``read`` has nothing more to give. Sources read in the consumer's thread
        return None only at their end; live sources override this."""
        return True

    def close(self) -> None:
        """Stop reading and release the device."""
        self.state = "stopped"

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.read()
            if frame is None:
                return
            yield frame

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, state={self.state!r})"


# --------------------------------------------------------------------------------------------
# Live sources: a capture thread and a one-slot buffer


class LiveSource(Source):
    """Frames read by a capture thread into a one-slot buffer (latest-frame semantics).

    Args:
        name: Display name.
        factory: Opens the device; called again (after a backoff delay) when it fails.
        fps: Nominal fps (0: ask the device).
        is_live: True for cameras/streams. Files replayed in real time set False.
        pace: Deliver frames no faster than ``pace`` per second (file replay); None: as the
            device gives them (cameras block in read() themselves).
        reconnect: Reopen the device when a read fails (cameras, streams). When False, a
            failed read is the end of the source (or a restart, if ``loop``).
        loop: Restart from the beginning at the end (the demo on the live page).
        backoff: (first, max) reopen delay in seconds, doubled after each failure. A stalled
            stream is caught by the device's own read timeout (``make_url``), then reopened.
        first_device: An already opened device (open_source checks it opens before starting).
    """

    def __init__(
        self,
        name: str,
        factory: DeviceFactory,
        *,
        fps: float = 0.0,
        is_live: bool = True,
        pace: float | None = None,
        reconnect: bool = True,
        loop: bool = False,
        backoff: tuple[float, float] = (0.1, 5.0),
        first_device: Device | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.is_live = is_live
        self._factory = factory
        self._pace = pace
        self._reconnect = reconnect
        self._loop = loop
        self._backoff = backoff
        self._cond = threading.Condition()
        self._slot: Frame | None = None
        self._ended = False
        self._stop = threading.Event()
        self.reconnects = 0
        self.frames_read = 0
        self._device: Device | None = first_device
        if self._device is None:
            self._device = factory()
        self.fps = fps or device_fps(self._device) or 0.0
        self._thread = threading.Thread(target=self._run, name=f"capture:{name}", daemon=True)
        self._thread.start()

    # -- capture thread --------------------------------------------------------------------
    def _run(self) -> None:
        delay = self._backoff[0]
        next_t = time.monotonic()
        restart = False
        try:
            while not self._stop.is_set():
                dev = self._device
                if dev is None:
                    dev = self._reopen(0.0 if restart else delay)
                    restart = False
                    if dev is None:
                        delay = min(delay * 2, self._backoff[1])
                        continue
                ok, img = safe_read(dev)
                if self._stop.is_set():
                    break
                if not ok or img is None:
                    safe_release(dev)
                    self._device = None
                    if self._reconnect:
                        self._set_state("reconnecting")
                        log.warning("%s: read failed; reopening in %.2f s", self.name, delay)
                        continue
                    if self._loop:
                        restart = True  # reopen at once: play the file again
                        self.pass_start = self.frames_read
                        continue
                    break  # end of file
                delay = self._backoff[0]
                frame = self._make_frame(img)
                if frame is None:
                    continue
                if self._pace:
                    next_t += 1.0 / self._pace
                    wait = next_t - time.monotonic()
                    if wait > 0:
                        self._stop.wait(wait)
                    else:
                        next_t = time.monotonic()  # fell behind: don't try to catch up
                    frame = Frame(frame.bgr, frame.index, time.monotonic())
                self._put(frame)
                if self.state != "running":
                    self._set_state("running")
        except Exception as exc:  # noqa: BLE001 - the thread must report, not die silently
            log.error("%s: capture thread failed: %s: %s", self.name, type(exc).__name__, exc,
                      exc_info=exc if log.isEnabledFor(logging.INFO) else None)
            self._set_state(f"error: {type(exc).__name__}: {exc}")
        finally:
            if self._device is not None:
                safe_release(self._device)
                self._device = None
            with self._cond:
                self._ended = True
                if not self.state.startswith("error"):
                    self.state = "stopped"
                self._cond.notify_all()

    def _reopen(self, delay: float) -> Device | None:
        if self._stop.wait(delay) if delay > 0 else self._stop.is_set():
            return None
        self.reconnects += 1
        try:
            dev = self._factory()
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: reopen failed (%s)", self.name, exc)
            self._set_state("reconnecting")
            return None
        if not is_opened(dev):
            safe_release(dev)
            self._set_state("reconnecting")
            return None
        self._device = dev
        return dev

    def _make_frame(self, img: np.ndarray) -> Frame | None:
        img = self._as_bgr(img)
        if img is None:
            return None
        frame = Frame(img, self.frames_read, time.monotonic())
        self.frames_read += 1
        return frame

    def _put(self, frame: Frame) -> None:
        with self._cond:
            if self._slot is not None:
                self.dropped += 1
            self._slot = frame
            self._cond.notify_all()

    def _set_state(self, state: str) -> None:
        with self._cond:
            self.state = state
            self._cond.notify_all()

    # -- consumer side -------------------------------------------------------------------------
    def read(self, timeout: float | None = None) -> Frame | None:
        """The newest frame not yet taken; blocks until one arrives, the source ends or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._slot is None:
                if self._ended:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining if remaining is not None else 0.5)
            frame, self._slot = self._slot, None
            return frame

    @property
    def ended(self) -> bool:
        return self._ended

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10.0)
            if self._thread.is_alive():
                log.warning("%s: capture thread did not stop within 10 s", self.name)
        self.state = "stopped"


# --------------------------------------------------------------------------------------------
# Analysis sources: read in the consumer's thread, nothing dropped


class FileSource(Source):
    """A video file read frame by frame in the consumer's thread (no drops).

    ``Frame.t`` is the presentation time (index / fps), so analysis is independent of speed.
    The first frame is decoded when the file is opened: a file that has none is refused then.
    """

    is_live = False
    monotonic_clock = False

    def __init__(self, path: Path, factory: DeviceFactory | None = None, *,
                 first_device: Device | None = None, loop: bool = False) -> None:
        super().__init__()
        self.name = str(path)
        self._factory = factory or (lambda: open_video_file(path))
        self._cap: Device | None = first_device if first_device is not None else self._factory()
        self.fps = device_fps(self._cap) or 30.0
        self.frame_count = device_frame_count(self._cap)
        self._index = 0
        self._loop = loop
        self._first: Frame | None = None
        first = self.read()
        if first is None:
            raise InputError(f"{path}: no decodable video frames (corrupt or not a video)")
        self._first = first

    def read(self, timeout: float | None = None) -> Frame | None:
        if self._first is not None:
            frame, self._first = self._first, None
            return frame
        if self._cap is None:
            return None
        ok, img = safe_read(self._cap)
        img = self._as_bgr(img) if ok else None
        if img is None and self._loop and self._index > 0:
            safe_release(self._cap)
            self._cap = self._factory()  # start again (index and time keep counting)
            self.pass_start = self._index
            ok, img = safe_read(self._cap)
            img = self._as_bgr(img) if ok else None
        if img is None:
            self.state = "stopped"
            self.close()
            return None
        frame = Frame(img, self._index, self._index / self.fps)
        self._index += 1
        return frame

    def close(self) -> None:
        self._first = None
        if self._cap is not None:
            safe_release(self._cap)
            self._cap = None
        self.state = "stopped"


class ImageFolderSource(Source):
    """Images from a folder or glob, sorted by name. A file that cannot be used (unreadable, out
    of the size limits, greyscale) is skipped; ``errors`` keeps its one-line message."""

    is_live = False
    monotonic_clock = False

    def __init__(self, name: str, paths: list[Path]) -> None:
        super().__init__()
        self.name = name
        self.paths = paths
        self.fps = 0.0
        self._i = 0

    def read(self, timeout: float | None = None) -> Frame | None:
        while self._i < len(self.paths):
            path = self.paths[self._i]
            index = self._i
            self._i += 1
            try:
                img = read_still(path)
            except InputError as exc:
                log.info("skipping %s", exc)
                self.errors.append(str(exc))
                continue
            return Frame(img, index, float(index))
        self.state = "stopped"
        return None


# --------------------------------------------------------------------------------------------
# The demo video


def demo_video_path() -> Path:
    """The simulator's demo video, rendered on first use (about a minute) and cached."""
    from stream import synth

    return synth.cached_video(f"demo-{DEMO_VERSION}", seconds=DEMO_SECONDS, fps=DEMO_FPS,
                              seed=0, size=DEMO_SIZE)


# --------------------------------------------------------------------------------------------
# open_source


def open_source(
    spec: str | int,
    *,
    realtime: bool,
    width: int | None = None,
    height: int | None = None,
    fps: float | None = None,
    device_factory: DeviceFactory | None = None,
    open_timeout_ms: int = OPEN_TIMEOUT_MS,
    read_timeout_ms: int = READ_TIMEOUT_MS,
    loop: bool | None = None,
) -> Source:
    """Open SOURCE: a camera index, 'picamera', a video file, an image folder or glob, a stream
    URL or 'demo'.

    Args:
        spec: What the user typed (an int or digit string is a camera index).
        realtime: Replay files and folders at their own pace with latest-frame semantics (the
            live page). False: deliver every frame as fast as the consumer reads (analysis).
        width, height, fps: Requested camera mode (cameras and the Pi camera).
        device_factory: Opens the device instead of the default (tests inject fakes).
        open_timeout_ms, read_timeout_ms: Network stream timeouts.
        loop: Restart files at the end (default: only the demo in real time).

    Raises:
        InputError: the source does not exist, is empty, or cannot be opened.
    """
    if isinstance(spec, bool):
        raise InputError(f"invalid source {spec!r}")
    text = str(spec).strip()
    if not text:
        raise InputError("empty source: give a camera index, file, folder, URL, picamera or demo")

    # Camera index
    if isinstance(spec, int) or text.isdigit():
        index = int(text)
        factory = device_factory or (lambda: make_camera(index, width, height, fps))
        return _open_live(f"camera {index}", factory, fps or 0.0,
                          f"camera {index} could not be opened (is it connected? "
                          f"ls /dev/video*)")

    if text.lower() == "picamera":
        factory = device_factory or (lambda: PiCameraDevice(width, height, fps))
        return _open_live("picamera", factory, fps or 30.0, "the Pi camera could not be opened")

    if URL_RE.match(text):
        factory = device_factory or (lambda: make_url(text, open_timeout_ms, read_timeout_ms))
        return _open_live(
            redact_url(text), factory, fps or 0.0,
            f"stream {redact_url(text)} could not be opened (no answer within "
            f"{open_timeout_ms / 1000:g} s, or not a video stream)",
        )

    if text.lower() == "demo":
        path = demo_video_path()
        return _open_file(path, realtime=realtime, loop=realtime if loop is None else loop,
                          name="demo", device_factory=device_factory)

    # Files, folders and globs
    path = Path(text).expanduser()
    if path.is_dir() or (not path.exists() and any(ch in text for ch in "*?[")):
        paths = [p for p in expand_image_arg(text) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not paths:
            raise InputError(f"{text}: no images match this pattern")
        return _open_images(text, paths, realtime=realtime, fps=fps)
    if not path.exists():
        raise InputError(f"{path}: no such file, folder, camera or URL")
    kind = media_kind(path)  # by its bytes
    if path.suffix.lower() in IMAGE_EXTENSIONS or kind == "image":
        return _open_images(str(path), [path], realtime=realtime, fps=fps)
    try:
        return _open_file(path, realtime=realtime, loop=bool(loop), name=str(path),
                          device_factory=device_factory)
    except InputError:
        if device_factory is not None or path.suffix.lower() in VIDEO_EXTENSIONS or kind:
            raise  # a video by its name or bytes that cannot be read: say so
    # Neither a video nor an image: the one-line message ``detect`` gives for it ("notes.txt:
    # not a readable image"), and ``run`` skips it as it skips a bad photo
    return _open_images(str(path), [path], realtime=realtime, fps=fps)


def _open_live(name: str, factory: DeviceFactory, fps: float, fail_message: str) -> LiveSource:
    try:
        first = factory()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{fail_message}: {exc}") from None
    if not is_opened(first):
        safe_release(first)
        raise InputError(fail_message)
    return LiveSource(name, factory, fps=fps, is_live=True, reconnect=True, first_device=first)


def _open_file(path: Path, *, realtime: bool, loop: bool, name: str,
               device_factory: DeviceFactory | None) -> Source:
    factory = device_factory or (lambda: open_video_file(path))
    first = factory()
    if not is_opened(first):
        raise InputError(f"{path}: not a readable video file")
    probe_fps = device_fps(first)
    if realtime:
        src: Source = LiveSource(name, factory, fps=probe_fps or 30.0, is_live=False,
                                 pace=probe_fps or 30.0, reconnect=False, loop=loop,
                                 first_device=first)
    else:
        src = FileSource(path, factory=factory, first_device=first, loop=loop)
        src.name = name
    if src.fps <= 0:
        src.fps = 30.0
    return src


def _open_images(name: str, paths: list[Path], *, realtime: bool, fps: float | None) -> Source:
    """Images as a source. In analysis a file that cannot be used is skipped and named in
    ``errors``; live, a single image that cannot be used is refused at once (InputError)."""
    if realtime:
        if len(paths) == 1:
            read_still(paths[0])
        rate = fps or 2.0
        return LiveSource(name, lambda: FolderDevice(paths), fps=rate, is_live=False,
                          pace=rate, reconnect=False, loop=False)
    return ImageFolderSource(name, paths)


# --------------------------------------------------------------------------------------------
# Helpers

#: Leading bytes of the image formats OpenCV reads.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM",
                b"II*\x00", b"MM\x00*")
#: Leading bytes of common video containers (offset 0).
_VIDEO_MAGIC = (b"\x1a\x45\xdf\xa3", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3", b"FLV",
                b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", b"OggS")
#: ISO media (MP4, MOV, 3GP, M4V): a box type at offset 4.
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"wide")


def media_kind(path: str | Path) -> str | None:
    """"image" or "video" from a file's first bytes (not its name or the browser's claim)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(192)
    except OSError:
        return None
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head.startswith(_VIDEO_MAGIC) or head[4:8] in _ISO_BOXES or (
            head[:4] == b"RIFF" and head[8:12] == b"AVI ") or (
            len(head) > 188 and head[0] == 0x47 and head[188] == 0x47):  # MPEG-TS
        return "video"
    return None



def redact_url(url: str) -> str:
    """The URL without its secrets: the password (rtsp://user:pass@host -> rtsp://user:***@host;
    an ``@`` in the password is hidden too) and the values of its query parameters
    (...?token=abc -> ...?token=***), where cameras and stream services put access keys."""
    url = re.sub(r"(://[^:/@]*):[^/]*@", r"\1:***@", url)
    return re.sub(r"([?&;][^=&;#]*=)[^&;#]*", r"\1***", url)


