"""Serving figures: fps delivered to viewers, capture-to-JPEG latency, cost of extra viewers,
memory over a long run. ``python -m stream.bench_serve [--viewers 1,2,10] [--seconds 10]
[--browser] [--long-frames N] [--json]``.

What it measures (on the machine it runs on; other CPU load makes every figure pessimistic):

* ``viewers``: the first ``--frames`` demo frames are analysed as fast as possible (analysis
  mode, nothing dropped) while 0, 1, 2 and 10 MJPEG clients (in a separate process) pull
  ``/video.mjpg``; per viewer count: the analysis fps and the server's CPU ms per frame
  (median of ``--rounds``). One JPEG is encoded per analysed frame whatever the number of
  viewers, so extra viewers should cost only their socket writes.
* ``live``: the demo replayed in real time (30 fps, as the live page plays it) with one MJPEG
  client: frames per second received by the client, the session's median capture-to-JPEG
  latency, and dropped frames.
* ``browser`` (``--browser``): headless Debian chromium opens ``/video.mjpg``; a script samples
  the ``<img>`` on every animation frame and counts how often its pixels change: the fps a
  person actually sees.
* ``long_serve`` (``--long-serve S``): ``hematovision serve demo`` in a subprocess for S seconds
  of real time with one MJPEG viewer; RSS of the server sampled 30 times.
* ``long`` (``--long-frames N``): the session runs over the demo (looping, analysis speed) for N
  frames (54000 = 30 min at 30 fps) and RSS is sampled every ``N/20`` frames.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_MP = mp.get_context("spawn")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _viewer(port: int, seconds: float, out: Any, idx: int) -> None:
    """One MJPEG client: count frames received in ``seconds`` (raw socket, minimal CPU)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /video.mjpg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    marker = b"--frame\r\n"
    frames, tail, t_end = 0, b"", None
    t0 = time.monotonic()
    while True:
        data = sock.recv(1 << 16)
        if not data:
            break
        buf = tail + data
        frames += buf.count(marker)
        tail = buf[-(len(marker) - 1):]
        now = time.monotonic()
        if now - t0 >= seconds:
            t_end = now
            break
    sock.close()
    out[idx] = frames / max(1e-6, (t_end or time.monotonic()) - t0)


def _viewers_process(port: int, n: int, seconds: float, out: Any) -> None:
    threads = [threading.Thread(target=_viewer, args=(port, seconds, out, i)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class _Server:
    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def _session(realtime: bool, model: str | None, loop: bool = True) -> Iterator[Any]:
    """A demo session whose files go to a temporary folder, removed when it closes."""
    from stream.app import default_analyzer_factory
    from stream.session import Session, SessionSettings
    from stream.sources import open_source

    def opener(spec: str, realtime: bool) -> Any:
        return open_source(spec, realtime=realtime, loop=loop)

    with tempfile.TemporaryDirectory(prefix="hv-bench-") as tmp:
        session = Session("demo", default_analyzer_factory,
                          settings=SessionSettings(model=model), realtime=realtime,
                          out_dir=tmp, source_opener=opener)
        try:
            yield session
        finally:
            session.close()


def bench_viewers(counts: list[int], frames: int, model: str | None,
                  rounds: int = 2) -> dict[str, Any]:
    """Analyse the same first ``frames`` demo frames flat out with N MJPEG viewers attached.

    Reports per N the median over ``rounds`` of the wall-clock analysis fps (sensitive to other
    load on the machine) and of the server process's CPU milliseconds per frame (what the
    viewers really cost; the clients themselves run in another process).
    """
    import psutil

    from stream.app import create_app

    me = psutil.Process()
    raw: dict[int, list[tuple[float, float, float | None]]] = {n: [] for n in counts}
    for _ in range(rounds):
        for n in counts:
            port = _free_port()
            with _session(realtime=False, model=model, loop=False) as session, \
                    _Server(create_app(session, page=False), port):
                out = _MP.Array("d", max(n, 1))
                proc = None
                if n:
                    proc = _MP.Process(target=_viewers_process, args=(port, n, 600.0, out))
                    proc.start()
                    deadline = time.monotonic() + 30
                    while session.viewers < n and time.monotonic() < deadline:
                        time.sleep(0.05)
                c0 = sum(me.cpu_times()[:2])
                t0 = time.monotonic()
                session.start()
                while session.frames < frames and session.state == "running":
                    time.sleep(0.01)
                wall = time.monotonic() - t0
                cpu = sum(me.cpu_times()[:2]) - c0
                done = session.frames
                session.close()
                if proc is not None:
                    proc.terminate()
                    proc.join(timeout=5)
            raw[n].append((done / wall, 1000 * cpu / max(done, 1), None))
            log.info("%d viewers: %.1f fps, %.1f CPU ms/frame", n, done / wall,
                     1000 * cpu / max(done, 1))
    results: dict[str, Any] = {}
    for n, rows in raw.items():
        results[str(n)] = {
            "analysis_fps_median": round(statistics.median(r[0] for r in rows), 1),
            "analysis_fps_runs": [round(r[0], 1) for r in rows],
            "server_cpu_ms_per_frame_median": round(statistics.median(r[1] for r in rows), 2),
            "server_cpu_ms_per_frame_runs": [round(r[1], 2) for r in rows],
            "frames": frames,
        }
    return results


def bench_live(seconds: float, model: str | None, browser: bool,
               viewers: int = 1) -> dict[str, Any]:
    """Real-time demo (30 fps) -> MJPEG clients and optionally chromium: fps and latency."""
    from stream.app import create_app

    port = _free_port()
    res: dict[str, Any] = {}
    with _session(realtime=True, model=model) as session, \
            _Server(create_app(session, page=False), port):
        session.start()
        session.wait_jpeg(-1, timeout=10)
        time.sleep(1.0)
        out = _MP.Array("d", viewers)
        proc = _MP.Process(target=_viewers_process, args=(port, viewers, seconds, out))
        d0 = session._source.dropped if session._source else 0
        proc.start()
        lat: list[float] = []
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            time.sleep(0.5)
            if session.latency_median_ms is not None:
                lat.append(session.latency_median_ms)
        proc.join(timeout=seconds + 10)
        res["viewers"] = viewers
        res["client_fps"] = round(out[0], 1)
        res["client_fps_min"] = round(min(out[i] for i in range(viewers)), 1)
        res["analysis_fps"] = round(session.fps, 1)
        res["latency_median_ms"] = round(statistics.median(lat), 1) if lat else None
        res["dropped_during"] = (session._source.dropped if session._source else 0) - d0
        res["source_fps"] = session._source.fps if session._source else None
        res["stages_ms"] = session.stage_medians_ms()
        if browser:
            res["browser"] = browser_fps(f"http://127.0.0.1:{port}/video.mjpg", seconds)
            res["latency_median_ms_with_browser"] = round(session.latency_median_ms or 0, 1)
    return res


BROWSER_JS = """
async (seconds) => {
  const img = document.querySelector('img');
  const c = document.createElement('canvas');
  c.width = 64; c.height = 48;
  const ctx = c.getContext('2d', {willReadFrequently: true});
  let last = null, changes = 0, samples = 0;
  const t0 = performance.now();
  while (performance.now() - t0 < seconds * 1000) {
    await new Promise(r => requestAnimationFrame(r));
    if (!img.naturalWidth) continue;
    ctx.drawImage(img, 0, 0, 64, 48);
    const d = ctx.getImageData(0, 0, 64, 48).data;
    let h = 0;
    for (let i = 0; i < d.length; i += 7) h = (h * 31 + d[i]) | 0;
    samples++;
    if (last !== null && h !== last) changes++;
    last = h;
  }
  return {changes, samples, seconds: (performance.now() - t0) / 1000,
          width: img.naturalWidth, height: img.naturalHeight};
}
"""


def browser_fps(url: str, seconds: float) -> dict[str, Any]:
    """Frames a headless chromium shows per second (pixel changes of the <img>, per rAF)."""
    if not Path(CHROMIUM).exists():
        return {"skipped": f"{CHROMIUM} not found"}
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url.rsplit("/", 1)[0] + "/healthz")  # same origin: the canvas can be read
        page.set_content(f"<html><body style='margin:0'><img src='{url}'></body></html>")
        page.wait_for_function("document.querySelector('img').naturalWidth > 0",
                               timeout=20000)
        r = page.evaluate(BROWSER_JS, seconds)
        browser.close()
    r["fps_seen"] = round(r["changes"] / r["seconds"], 1)
    r["raf_per_s"] = round(r["samples"] / r["seconds"], 1)
    return r


def bench_long(frames: int, model: str | None) -> dict[str, Any]:
    """Run the looping demo for ``frames`` analysed frames, sampling RSS (MB)."""
    import psutil

    proc = psutil.Process()
    with _session(realtime=False, model=model, loop=True) as session:
        session.start()
        step = max(1, frames // 20)
        curve: list[tuple[int, float, float]] = []
        t0 = time.monotonic()
        next_mark = 0
        while session.frames < frames:
            if session.frames >= next_mark:
                curve.append((session.frames, round(time.monotonic() - t0, 1),
                              round(proc.memory_info().rss / 2**20, 1)))
                next_mark += step
            time.sleep(0.2)
            if session.state != "running":
                break
        curve.append((session.frames, round(time.monotonic() - t0, 1),
                      round(proc.memory_info().rss / 2**20, 1)))
        stats = session.stats()
        frames_done = session.frames
    rss = [c[2] for c in curve]
    half = rss[len(rss) // 2:]
    return {"frames": frames_done, "seconds": curve[-1][1], "total_counted": stats["total"],
            "rss_mb_curve": curve, "rss_first_mb": rss[0], "rss_last_mb": rss[-1],
            "rss_second_half_growth_mb": round(half[-1] - half[0], 1) if half else None}


def bench_long_serve(seconds: float, model: str | None, viewers: int = 1) -> dict[str, Any]:
    """``hematovision serve demo`` for ``seconds`` of real time with MJPEG viewers attached and
    /stats.json polled: RSS of the server process sampled every ``seconds / 30``."""
    import subprocess

    import httpx
    import psutil

    port = _free_port()
    cmd = [sys.executable, "-m", "stream.cli", "serve", "demo", "--port", str(port)]
    if model:
        cmd += ["--model", model]
    from stream.synth import cache_root

    home = tempfile.TemporaryDirectory(prefix="hv-bench-")  # the server's session folder
    env = {**os.environ, "HOME": home.name, "XDG_CACHE_HOME": str(cache_root().parent)}
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/stats.json", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        out = _MP.Array("d", max(viewers, 1))
        clients = _MP.Process(target=_viewers_process, args=(port, viewers, seconds, out))
        clients.start()
        proc = psutil.Process(server.pid)
        t0 = time.monotonic()
        curve: list[tuple[float, float, int, float]] = []
        step = seconds / 30
        while time.monotonic() - t0 < seconds:
            st = httpx.get(f"{base}/stats.json", timeout=5).json()
            curve.append((round(time.monotonic() - t0, 1),
                          round(proc.memory_info().rss / 2**20, 1), st["frames"], st["fps"]))
            time.sleep(step)
        clients.join(timeout=30)
        st = httpx.get(f"{base}/stats.json", timeout=5).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
        home.cleanup()
    rss = [c[1] for c in curve]
    half = rss[len(rss) // 2:]
    return {"seconds": seconds, "viewers": viewers, "frames": st["frames"],
            "total_counted": st["total"], "dropped": st["dropped"],
            "latency_ms_end": st["latency_ms"], "viewer_fps": [round(out[i], 1)
                                                              for i in range(viewers)],
            "curve_t_rss_frames_fps": curve, "rss_first_mb": rss[0], "rss_last_mb": rss[-1],
            "rss_second_half_growth_mb": round(half[-1] - half[0], 1) if half else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stream.bench_serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--viewers", type=str, default="0,1,2,10",
                    help="viewer counts to compare (default 0,1,2,10)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of live measurement")
    ap.add_argument("--frames", type=int, default=450,
                    help="demo frames analysed per viewer measurement (default 450)")
    ap.add_argument("--rounds", type=int, default=2, help="repeats of the viewer comparison")
    ap.add_argument("--browser", action="store_true", help="also measure in headless chromium")
    ap.add_argument("--live-viewers", type=int, default=10,
                    help="also run the live measurement with this many viewers (default 10)")
    ap.add_argument("--long-frames", type=int, default=0,
                    help="memory run over N frames (54000 = 30 min at 30 fps)")
    ap.add_argument("--long-serve", type=float, default=0.0,
                    help="run `hematovision serve demo` this many seconds with a viewer; RSS")
    ap.add_argument("--model", type=str, default=None, help="model .tflite (default: shipped)")
    ap.add_argument("--skip", type=str, default="", help="comma list of viewers,live to skip")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    skip = set(filter(None, args.skip.split(",")))
    report: dict[str, Any] = {"cpus": os.cpu_count(),
                              "load_avg_1min": round(os.getloadavg()[0], 2)}
    if "viewers" not in skip:
        counts = [int(v) for v in args.viewers.split(",") if v.strip()]
        report["viewers"] = bench_viewers(counts, args.frames, args.model, args.rounds)
    if "live" not in skip:
        report["live"] = bench_live(args.seconds, args.model, args.browser)
        if args.live_viewers > 1:
            report[f"live_{args.live_viewers}_viewers"] = bench_live(
                args.seconds, args.model, False, viewers=args.live_viewers)
    if args.long_frames:
        report["long"] = bench_long(args.long_frames, args.model)
    if args.long_serve:
        report["long_serve"] = bench_long_serve(args.long_serve, args.model)
    report["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(report, indent=None if args.json else 2)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
