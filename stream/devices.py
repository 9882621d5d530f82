"""Devices: what a source reads frames from, each behind the same small cv2-like interface.

A device is ``cv2.VideoCapture`` or anything with its ``read``, ``isOpened``, ``get`` and
``release`` (:class:`Device`): USB cameras (V4L2, one-frame driver buffer), network streams
(FFmpeg with bounded open and read timeouts), video files, the Raspberry Pi camera and an image
list replayed as a video. Sources open devices through small factories, so tests can inject
fakes; every call on a device goes through the ``safe_*`` helpers, since a failing camera or a
dropped stream raises from deep inside OpenCV.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from detector.errors import InputError
from stream.images import read_still

log = logging.getLogger(__name__)

# FFmpeg's own log lines (e.g. "moov atom not found" for a broken file) off: a file or stream
# that cannot be read is reported once, on one line, by its source. Read by OpenCV at its
# first FFmpeg call; a value set by the user wins (OPENCV_FFMPEG_LOGLEVEL=24 shows warnings).
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

#: Defaults for network streams (milliseconds).
OPEN_TIMEOUT_MS = 10_000
READ_TIMEOUT_MS = 5_000

#: FFmpeg decoder threads for files and streams. A 640x480 frame decodes in ~0.4 ms on one
#: thread, a tenth of its analysis; FFmpeg's default (a thread per core, frame threading) spent
#: ~0.3-0.4 ms more CPU per frame on synchronisation (bench clip, 2 cores).
DECODE_THREADS = 1


class Device(Protocol):
    """The part of ``cv2.VideoCapture`` a source uses."""

    def read(self) -> tuple[bool, np.ndarray | None]: ...

    def release(self) -> None: ...

    def isOpened(self) -> bool: ...  # noqa: N802 (cv2 spelling)

    def get(self, prop: int) -> float: ...


DeviceFactory = Callable[[], Device]


class FolderDevice:
    """An image list as a cv2-like device, for real-time replay through LiveSource."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = list(paths)
        self._i = 0

    def read(self) -> tuple[bool, np.ndarray | None]:
        while self._i < len(self._paths):
            img = read_image_or_none(self._paths[self._i])
            self._i += 1
            if img is not None:
                return True, img
        return False, None

    def isOpened(self) -> bool:  # noqa: N802
        return True

    def get(self, prop: int) -> float:
        return 0.0

    def release(self) -> None:
        self._i = len(self._paths)


def make_camera(index: int, width: int | None, height: int | None, fps: float | None) -> Device:
    """Open V4L2 camera ``index`` with the requested size and fps (one-frame driver buffer)."""
    with quiet_opencv():  # a missing camera is our one-line error, not OpenCV's warnings
        cap = cv2.VideoCapture(index, cv2.CAP_V4L2)
    if width:
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
    if height:
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
    if fps:
        cap.set(cv2.CAP_PROP_FPS, fps)
    cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
    return cap


def make_url(
    url: str, open_timeout_ms: int = OPEN_TIMEOUT_MS, read_timeout_ms: int = READ_TIMEOUT_MS
) -> Device:
    """Open a network stream with bounded open and read timeouts (FFmpeg backend)."""
    params = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_ms),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout_ms),
        cv2.CAP_PROP_N_THREADS, DECODE_THREADS,
    ]
    with quiet_opencv():
        return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)


@contextlib.contextmanager
def quiet_opencv() -> Iterator[None]:
    """OpenCV's own log at ERROR level only, while opening a device (restored afterwards)."""
    try:
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:
        yield
        return
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


class PiCameraDevice:
    """The Raspberry Pi camera through picamera2, as a cv2-like device.

    One ``main`` stream at the requested size (default 640x480) feeds both analysis and display:
    at that size the ISP's scaler does the work a separate ``lores`` stream would (lores is
    YUV420 only and would need a colour conversion per frame). picamera2's "RGB888" is BGR byte
    order in memory, which is what OpenCV wants. Not tested on hardware here (no Pi camera).
    """

    def __init__(self, width: int | None, height: int | None, fps: float | None) -> None:
        try:
            from picamera2 import Picamera2  # type: ignore[import-not-found]
        except ImportError:
            raise InputError(
                "source 'picamera' needs picamera2: install hematovision[pi] on a Raspberry Pi "
                "(pip install 'hematovision[pi]', or apt install python3-picamera2)"
            ) from None
        size = (int(width or 640), int(height or 480))
        self._cam = Picamera2()
        controls = {"FrameRate": float(fps)} if fps else {}
        config = self._cam.create_video_configuration(
            main={"size": size, "format": "RGB888"}, controls=controls, buffer_count=2
        )
        self._cam.configure(config)
        self._cam.start()
        self._fps = float(fps or 30.0)

    def read(self) -> tuple[bool, np.ndarray | None]:
        try:
            return True, self._cam.capture_array("main")
        except Exception as exc:  # noqa: BLE001
            log.warning("picamera read failed: %s", exc)
            return False, None

    def isOpened(self) -> bool:  # noqa: N802
        return True

    def get(self, prop: int) -> float:
        return self._fps if prop == cv2.CAP_PROP_FPS else 0.0

    def release(self) -> None:
        with contextlib.suppress(Exception):
            self._cam.stop()
            self._cam.close()


def open_video_file(path: Path) -> Device:
    """A video file as a device; InputError (one line, no OpenCV warnings) when it cannot be
    opened."""
    with quiet_opencv():
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, DECODE_THREADS])
        if not cap.isOpened():  # an OpenCV built without FFmpeg (e.g. GStreamer only on a Pi)
            cap.release()
            cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise InputError(f"{path}: not a readable video file")
    return cap


def device_fps(dev: Device) -> float:
    try:
        value = float(dev.get(cv2.CAP_PROP_FPS))
    except Exception:  # noqa: BLE001
        return 0.0
    return value if 0.5 <= value <= 1000 else 0.0


def device_frame_count(dev: Device) -> int | None:
    """Frames a video file's header announces (None when unknown)."""
    try:
        value = int(dev.get(cv2.CAP_PROP_FRAME_COUNT))
    except Exception:  # noqa: BLE001
        return None
    return value if value > 0 else None


def is_opened(dev: Device) -> bool:
    try:
        return bool(dev.isOpened())
    except Exception:  # noqa: BLE001
        return False


def safe_read(dev: Device) -> tuple[bool, np.ndarray | None]:
    try:
        ok, img = dev.read()
    except Exception as exc:  # noqa: BLE001
        log.warning("device read raised %s", exc)
        return False, None
    return bool(ok), img


def safe_release(dev: Device) -> None:
    with contextlib.suppress(Exception):
        dev.release()


def read_image_or_none(path: Path) -> np.ndarray | None:
    """An image file to analyse as BGR; None, with a warning, if it cannot be used."""
    try:
        return read_still(path)
    except InputError as exc:
        log.warning("skipping %s", exc)
        return None
