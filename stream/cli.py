"""The ``hematovision`` command line.

Every sub-command's options are declared here (the command line users and scripts rely on); the work
is done by a ``main(args) -> int`` function in the module that owns it, imported only when that
command runs, so ``hematovision detect`` never imports TensorFlow or Gradio.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from detector.errors import HematoVisionError
from stream import resolve_model

log = logging.getLogger("hematovision")

# command -> "module:function"
_HANDLERS: dict[str, str] = {
    "serve": "stream.app:main",
    "run": "stream.run:main",
    "detect": "stream.detect:main",
    "synth": "training.synth:main",
    "train": "training.train:main",
    "evaluate": "training.evaluate:main",
    "bench": "stream.bench:main",
}


def _size(text: str) -> tuple[int, int]:
    """Parse ``WxH`` into (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH such as 640x480, got {text!r}") from None
    if w < 32 or h < 32 or w > 8192 or h > 8192:
        raise argparse.ArgumentTypeError(f"size must be between 32x32 and 8192x8192, got {text}")
    return w, h


def _number(cast: Callable[[str], float], lowest: float, *, above: bool = False,
            highest: float | None = None, what: str = "a number"
            ) -> Callable[[str], float]:
    """An argparse type: ``cast(text)``, refused (one line) below ``lowest`` (or at it, with
    ``above``) or over ``highest``."""

    def parse(text: str) -> float:
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if highest is not None and not lowest <= v <= highest:
            raise argparse.ArgumentTypeError(
                f"{what} is a number from {lowest:g} to {highest:g}, got {v}")
        if v < lowest or (above and v == lowest):
            raise argparse.ArgumentTypeError(
                f"expected a number {'>' if above else '>='} {lowest:g}, got {v}")
        return v

    return parse


_positive_int = _number(int, 1, what="a whole number")
_non_negative_int = _number(int, 0, what="a whole number")
_positive_float = _number(float, 0, above=True)
_port = _number(int, 1, highest=65535, what="a port")


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASS")
    return user, password


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: what is wrong, and where the help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="hematovision",
        description="Segment, classify, track and count white blood cells in smear images "
        "and video.",
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model_help = "model .tflite (its .json card beside it); default: the shipped model"

    s = sub.add_parser("serve", help="live view in the browser (Gradio page, MJPEG, /stats.json)")
    s.add_argument("source", nargs="?", default="demo", help="camera index, file, folder, URL, "
                   "'picamera' or 'demo' (default)")
    s.add_argument("--model", type=str, default=None, help=model_help)
    s.add_argument("--host", type=str, default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    s.add_argument("--auth", type=_auth, default=None, help="require a login USER:PASS")
    s.add_argument("--allow-url-sources", action="store_true",
                   help="let page users switch to rtsp:// and http(s):// sources (the server "
                   "then opens URLs they type; off by default)")

    r = sub.add_parser("run", help="headless count of a video, folder of images or 'demo'")
    r.add_argument("source", help="video file, image folder or glob, URL, camera index or 'demo'")
    r.add_argument("--model", type=str, default=None, help=model_help)
    r.add_argument("--report", type=str, default=None, help="write the final report JSON here")
    r.add_argument("--events", type=str, default=None, help="append one JSON line per counted cell")
    r.add_argument("--record", type=str, default=None,
                   help="write the annotated video (.webm plays in browsers; .mp4, .avi)")
    r.add_argument("--target", type=_positive_int, default=100, help="cells to count (default 100)")
    r.add_argument("--max-frames", type=_positive_int, default=None, help="stop after N frames")

    d = sub.add_parser("detect", help="find and name white cells in still images")
    d.add_argument("images", nargs="+", help="image files, folders or globs")
    d.add_argument("--model", type=str, default=None, help=model_help)
    d.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    d.add_argument("--save-dir", type=str, default=None, help="write an annotated PNG per image")
    d.add_argument("--single-cell", action="store_true",
                   help="each image is one cell (a crop): classify the whole image, no search")

    y = sub.add_parser("synth", help="render a synthetic smear video with per-cell ground truth")
    y.add_argument("out_dir", help="folder for video.mp4 and truth.json")
    y.add_argument("--seconds", type=_positive_float, default=60.0, help="length (default 60)")
    y.add_argument("--fps", type=_positive_float, default=30.0, help="frame rate (default 30)")
    y.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    y.add_argument("--size", type=_size, default=(640, 480),
                   help="frame size WxH (default 640x480)")
    y.add_argument("--wbc-per-frame", type=float, default=None,
                   help="white-cell density: mean cells per frame area (default 1.5, range 0-5)")
    y.add_argument("--stain", type=str, default=None,
                   help="another lab's stain and camera: grey_rbc, teal_rbc, yellow_bg, blue_bg, "
                   "dim_vignetted, eyepiece (a round field in a black surround) (default: BCCD's)")
    y.add_argument("--magnification", type=_positive_float, default=None,
                   help="relative to BCCD's 100x objective (0.35-2: red cells ~37-210 px at "
                   "640x480; default 1)")

    t = sub.add_parser("train", help="train a MobileNetV2 cell classifier and export int8 TFLite")
    t.add_argument("data", nargs="+", help="folder-per-class trees and/or Pascal VOC folders "
                   "with wbc_types.csv")
    t.add_argument("--out", type=str, default=None, help="output .tflite (default: "
                   "RUN_DIR/hematovision.tflite; the shipped model only when named here)")
    t.add_argument("--input-size", type=int, default=128, choices=[96, 112, 128, 160, 192, 224],
                   help="model input side in pixels (default 128)")
    t.add_argument("--weights", type=str, default="imagenet",
                   help="imagenet (download via Keras), none, or a local .weights.h5 file")
    t.add_argument("--epochs", type=_non_negative_int, default=None,
                   help="max fine-tuning epochs (default 8)")
    t.add_argument("--frozen-epochs", type=_non_negative_int, default=None,
                   help="head-only epochs with the base frozen (default 2)")
    t.add_argument("--copies", type=_positive_int, default=None,
                   help="crops per folder-per-class training image (default 1)")
    t.add_argument("--voc-copies", type=_positive_int, default=None,
                   help="crops per VOC training image, extra ones with jittered box (default 6)")
    t.add_argument("--batch-size", type=_positive_int, default=None, help="default 32")
    t.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                   help="batches per epoch (default: the whole training set; small = timing)")
    t.add_argument("--min-images", type=_positive_int, default=None,
                   help="drop classes with fewer images (default 5)")
    t.add_argument("--seed", type=_non_negative_int, default=None, help="random seed (default 0)")
    t.add_argument("--run-dir", type=str, default=None,
                   help="checkpoints, float .tflite, history and log (default runs/hv-DATE-TIME)")

    e = sub.add_parser("evaluate", help="measure detection, classification or counting figures")
    e.add_argument("data", nargs="+", help="Pascal VOC folder(s), folder-per-class tree(s) or "
                   "synth folder(s); each reported on its own")
    e.add_argument("--model", type=str, default=None, help=model_help)
    e.add_argument("--out", type=str, default=None, help="write the report (JSON, PNG) here")
    e.add_argument("--float-model", type=str, default=None,
                   help="float .tflite of the same training run, for float-vs-int8 agreement "
                        "(default: runs/NAME/NAME.float.tflite if present)")
    e.add_argument("--robustness", action="store_true",
                   help="also name the same cells in photos changed as another microscope would "
                        "take them (stain, light, white balance, focus, noise, JPEG)")
    e.add_argument("--split", choices=["held-out", "monitor"], default="held-out",
                   help="of a data set the model trained on, which images: the held-out split "
                        "(default) or the monitor split that chose its epoch (for choosing "
                        "between models without touching the held-out images)")

    b = sub.add_parser("bench", help="per-stage timings and end-to-end frames per second")
    b.add_argument("--threads", type=_positive_int, default=1, help="inference threads (default 1)")
    b.add_argument("--model", type=str, default=None, help=model_help)
    b.add_argument("--json", action="store_true", help="print the figures as JSON")
    b.add_argument("--serve", action="store_true",
                   help="measure the live page instead: fps to viewers, capture-to-JPEG latency, "
                   "1/2/10 viewers (python -m stream.bench_serve --help for more)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if hasattr(args, "model"):  # --model, else $HEMATOVISION_MODEL, else the shipped model
        args.model = resolve_model(args.model)
    module_name, func_name = _HANDLERS[args.command].split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except HematoVisionError as exc:
        print(f"hematovision {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hematovision {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
