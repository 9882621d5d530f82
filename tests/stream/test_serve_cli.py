"""``hematovision serve`` from the command line: bad ports and a port in use are one line (exit 2,
nothing left behind), and the address is printed only once the server really listens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from stream import cli

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("port", ["99999", "-1", "0", "http"])
def test_impossible_port_is_one_line(port: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--port", port])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("hematovision serve: error: argument --port: ")
    assert err.rstrip().endswith("(see hematovision serve --help)")


def test_port_in_use_is_one_line_and_leaves_no_session_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = cli.main(["serve", "demo", "--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"hematovision serve: error: cannot listen on 127.0.0.1:{port}: the port is in use"]
    assert not (tmp_path / ".cache" / "hematovision" / "sessions").exists()


def test_address_printed_once_listening(tmp_path: Path) -> None:
    """A serve that counted nothing leaves no session folder either."""
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "a.png"), np.full((240, 320, 3), (200, 185, 225), np.uint8))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HOME": str(tmp_path), "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "serve", str(photos),
                             "--port", str(port)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the server prints
        t_line = time.monotonic()
        assert line.startswith(f"HematoVision live view: http://127.0.0.1:{port}/")
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)  # no retry: it listens
        assert r.status_code == 200 and time.monotonic() - t_line < 5
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert not (tmp_path / ".cache" / "hematovision" / "sessions").exists()
