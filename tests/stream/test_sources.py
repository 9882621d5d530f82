"""Sources: reconnect with backoff, latest-frame drops, lossless file replay, errors, timeouts."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from detector.errors import InputError
from stream.sources import LiveSource, open_source


class FakeCapture:
    """A cv2.VideoCapture-like device: frames whose first pixel is the frame number.

    ``fail_after``: read() returns (False, None) once this many frames were read (a camera
    unplugged, a stream that dropped). ``delay``: seconds per read (a camera's frame period).
    """

    opened: list[FakeCapture] = []

    def __init__(self, fail_after: int | None = None, delay: float = 0.0, start: int = 0,
                 opens: bool = True) -> None:
        self.fail_after = fail_after
        self.delay = delay
        self.n = 0
        self.start = start
        self.released = False
        self.opens = opens
        FakeCapture.opened.append(self)

    def isOpened(self) -> bool:  # noqa: N802
        return self.opens

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.delay:
            time.sleep(self.delay)
        if self.released or (self.fail_after is not None and self.n >= self.fail_after):
            return False, None
        img = np.zeros((8, 8, 3), np.uint8)
        img[0, 0, 0] = (self.start + self.n) % 256
        self.n += 1
        return True, img

    def get(self, prop: int) -> float:
        return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def release(self) -> None:
        self.released = True


def _write_video(path: Path, n: int, fps: float = 30.0, size: tuple[int, int] = (64, 48)) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert w.isOpened()
    for i in range(n):
        img = np.full((size[1], size[0], 3), (i * 7) % 255, np.uint8)
        w.write(img)
    w.release()
    return path


def test_camera_that_fails_is_reopened_with_backoff_and_keeps_counting() -> None:
    devices: list[FakeCapture] = []

    def factory() -> FakeCapture:
        # the 2nd open fails outright, the others deliver 5 frames then fail
        opens = len(devices) != 1
        dev = FakeCapture(fail_after=5, delay=0.002, opens=opens)
        devices.append(dev)
        return dev

    src = open_source(0, realtime=True, device_factory=factory)
    src._backoff = (0.01, 0.05)  # type: ignore[attr-defined]  # fast retries for the test
    seen: list[int] = []
    states: set[str] = set()
    deadline = time.monotonic() + 10
    while len(seen) < 12 and time.monotonic() < deadline:
        states.add(src.state)
        f = src.read(timeout=1.0)
        if f is not None:
            seen.append(f.index)
    src.close()
    assert len(seen) >= 12, seen
    assert seen == sorted(seen) and len(set(seen)) == len(seen)  # ids keep counting up
    assert len(devices) >= 4  # reopened after each failure, including the failed open
    assert all(d.released for d in devices)  # every device released
    assert src.reconnects >= 3
    assert src.state == "stopped"
    assert src.name == "camera 0"


def test_state_shows_reconnecting_while_device_is_down() -> None:
    devices: list[FakeCapture] = []

    def factory() -> FakeCapture:
        dev = FakeCapture(fail_after=2 if not devices else 0, opens=not devices or False)
        devices.append(dev)
        return dev

    src = open_source("3", realtime=True, device_factory=factory)
    deadline = time.monotonic() + 5
    while src.state != "reconnecting" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert src.state == "reconnecting"
    src.close()
    assert src.state == "stopped"


def test_latest_frame_semantics_drop_old_frames_and_count_them() -> None:
    devices: list[FakeCapture] = []

    def factory() -> FakeCapture:
        devices.append(FakeCapture(delay=0.001))
        return devices[-1]

    src = LiveSource("fast", factory, reconnect=False, loop=False)
    frames = []
    for _ in range(5):
        time.sleep(0.05)  # a slow consumer: many frames arrive per read
        produced = devices[0].n if devices else 0
        f = src.read(timeout=1.0)
        assert f is not None
        # never a backlog: what we get is at least as new as the newest frame already captured
        # when we asked (a queue would hand out the oldest), however loaded the machine is
        assert f.index >= produced - 2  # (one frame may be between device and slot)
        frames.append(f)
    src.close()
    gaps = np.diff([f.index for f in frames])
    assert (gaps >= 1).all() and gaps.sum() > 5
    assert src.dropped >= sum(gaps - 1)  # every frame we never saw was counted as dropped
    assert src.dropped > 20
    # timestamps are monotonic capture times
    ts = [f.t for f in frames]
    assert ts == sorted(ts) and ts[-1] <= time.monotonic()


def test_file_replay_in_analysis_mode_drops_nothing(tmp_path: Path) -> None:
    video = _write_video(tmp_path / "clip.mp4", 40)
    with open_source(str(video), realtime=False) as src:
        assert src.fps == pytest.approx(30.0)
        assert not src.is_live
        indices = []
        for f in src:
            time.sleep(0.001)  # a slow consumer loses nothing
            indices.append(f.index)
        assert indices == list(range(40))
        assert src.dropped == 0


def test_a_video_file_decodes_on_one_thread_and_gives_every_frame(tmp_path: Path) -> None:
    """FFmpeg's thread-per-core decoding costs CPU the analysis needs (see DECODE_THREADS)."""
    from stream.devices import DECODE_THREADS, open_video_file

    video = _write_video(tmp_path / "clip.mp4", 12)
    cap = open_video_file(video)
    try:
        assert cap.get(cv2.CAP_PROP_N_THREADS) == DECODE_THREADS == 1
        levels = []
        while (got := cap.read())[0]:
            levels.append(int(got[1][0, 0, 0]))
    finally:
        cap.release()
    # every frame, in order: the grey level steps by 7 a frame (the codec's range shifts it)
    steps = np.diff(levels[1:])
    assert len(levels) == 12 and steps.min() >= 6 and steps.max() <= 8
    assert levels[0] < levels[1]


def test_file_replay_in_realtime_mode_is_paced(tmp_path: Path) -> None:
    video = _write_video(tmp_path / "clip.mp4", 15, fps=30.0)  # 0.5 s of video
    t0 = time.monotonic()
    with open_source(str(video), realtime=True) as src:
        frames = list(src)
    elapsed = time.monotonic() - t0
    assert len(frames) + src.dropped == 15
    assert elapsed > 0.3  # paced at ~30 fps, not decoded at full speed (rough, not strict)


def test_folder_source_sorted_and_glob(tmp_path: Path) -> None:
    for name, value in [("b.png", 2), ("a.png", 1), ("c.jpg", 3)]:
        cv2.imwrite(str(tmp_path / name), np.full((40, 48, 3), (value * 40, 0, 200), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    with open_source(str(tmp_path), realtime=False) as src:
        frames = list(src)
    assert [f.index for f in frames] == [0, 1, 2]
    assert [round(f.bgr[0, 0, 0] / 40) for f in frames] == [1, 2, 3]  # a.png, b.png, c.jpg
    with open_source(str(tmp_path / "*.png"), realtime=False) as src:
        assert len(list(src)) == 2


def test_grayscale_and_corrupt_images_in_a_folder(tmp_path: Path) -> None:
    """Unusable photos are skipped, each with the one-line message ``detect`` gives."""
    cv2.imwrite(str(tmp_path / "a.png"), np.full((40, 48), 90, np.uint8))  # grayscale
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg at all")
    cv2.imwrite(str(tmp_path / "c.png"), np.full((40, 48, 3), (90, 40, 200), np.uint8))
    with open_source(str(tmp_path), realtime=False) as src:
        frames = list(src)
    assert len(frames) == 1 and frames[0].bgr.shape == (40, 48, 3)
    assert src.errors == [
        f"{tmp_path / 'a.png'}: greyscale image: white cells are found and named by their "
        "stain, so a colour photo of a stained smear is needed",
        f"{tmp_path / 'b.jpg'}: not a readable image"]


def test_missing_path_empty_folder_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        open_source(str(tmp_path / "nope.mp4"), realtime=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no images"):
        open_source(str(empty), realtime=False)
    with pytest.raises(InputError, match="no images match"):
        open_source(str(tmp_path / "*.png"), realtime=False)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(InputError, match="bad.mp4"):
        open_source(str(bad), realtime=False)


def test_camera_that_does_not_open_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="camera 7 could not be opened"):
        open_source(7, realtime=True, device_factory=lambda: FakeCapture(opens=False))


def test_picamera_without_picamera2_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args, **kwargs):  # noqa: ANN002, ANN003
        if name == "picamera2":
            raise ImportError("No module named 'picamera2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(InputError, match=r"hematovision\[pi\]"):
        open_source("picamera", realtime=True)


def test_url_that_never_answers_times_out_with_a_message() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    conns: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conns.append(server.accept()[0])  # accept, then never say anything
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(InputError, match=r"no answer within 1 s"):
            open_source(f"http://user:secret@127.0.0.1:{port}/video.mjpg", realtime=True,
                        open_timeout_ms=1000, read_timeout_ms=1000)
    finally:
        server.close()
        for c in conns:
            c.close()
    assert time.monotonic() - t0 < 10


def test_url_password_is_not_shown() -> None:
    with pytest.raises(InputError) as err:
        open_source("rtsp://user:secret@127.0.0.1:9/x", realtime=True,
                    device_factory=lambda: FakeCapture(opens=False))
    assert "secret" not in str(err.value) and "user:***@" in str(err.value)


def test_close_joins_the_capture_thread() -> None:
    src = open_source(0, realtime=True, device_factory=lambda: FakeCapture(delay=0.01))
    assert src.read(timeout=2.0) is not None
    thread = src._thread  # type: ignore[attr-defined]
    src.close()
    assert not thread.is_alive()
    assert src.read(timeout=0.1) is None


def test_looping_replay_keeps_counting_frames(tmp_path: Path) -> None:
    video = _write_video(tmp_path / "clip.mp4", 6, fps=200.0)
    with open_source(str(video), realtime=True, loop=True) as src:
        indices = [f.index for f in (src.read(timeout=2.0) for _ in range(15)) if f is not None]
    assert len(indices) == 15 and indices == sorted(indices) and indices[-1] >= 14
    with open_source(str(video), realtime=False, loop=True) as src:
        frames = [src.read() for _ in range(14)]
    assert [f.index for f in frames] == list(range(14))  # analysis mode: every frame, looped
    assert src.pass_start == 12  # the third pass began at frame 12


def test_12_bit_camera_frame_reads_as_the_same_picture_from_a_file(tmp_path: Path) -> None:
    """One conversion for files and devices: 12-bit data in 16-bit words is scaled by 12 bits
    in both (a camera frame used to come out ~16x darker than the same picture from a file)."""
    rng = np.random.default_rng(3)
    picture = (rng.integers(0, 4096, (48, 64, 3)) | 0x800).astype(np.uint16)  # 12-bit, bright
    path = tmp_path / "frame.png"
    assert cv2.imwrite(str(path), picture)
    from stream.images import read_image

    from_file = read_image(path)

    class Camera12:
        def isOpened(self) -> bool:  # noqa: N802
            return True

        def read(self) -> tuple[bool, np.ndarray]:
            return True, picture.copy()

        def get(self, prop: int) -> float:
            return 30.0

        def release(self) -> None:
            pass

    with open_source(0, realtime=True, device_factory=Camera12) as src:
        frame = src.read(timeout=2.0)
    assert frame is not None
    assert np.array_equal(frame.bgr, from_file)
    assert int(frame.bgr.min()) >= 128 and int(frame.bgr.max()) == 255


def test_a_file_that_is_no_picture_is_refused_live_and_skipped_in_analysis(tmp_path: Path) -> None:
    """`serve notes.txt` fails at once with detect's line; `run` skips it (and says why)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    with pytest.raises(InputError, match=r"^.*notes\.txt: not a readable image$"):
        open_source(str(notes), realtime=True)
    with open_source(str(notes), realtime=False) as src:
        assert list(src) == [] and src.errors == [f"{notes}: not a readable image"]
    broken = tmp_path / "clip.mov"
    broken.write_text("not a video either\n")
    with pytest.raises(InputError, match="clip.mov: not a readable video file"):
        open_source(str(broken), realtime=False)
