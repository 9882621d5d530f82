"""``hematovision synth``: write a simulator clip (video.mp4 + truth.json) for the evaluations,
and the README's annotated simulator frame. The simulator itself is :mod:`stream.synth` (the
runtime's ``demo`` source needs it without the training extras)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detector.core import CELL_TYPES
from stream.synth import SlideSimulator, load_truth, render_video
from stream.synth.settings import RBC_PX_640


def annotate(bgr: np.ndarray, frame_truth: dict[str, Any], labels: dict[int, str]) -> np.ndarray:
    """A copy of ``bgr`` with the truth boxes drawn ("#id label", colour by type) and a caption
    (frame, segment, blur): for looking at the truth, e.g. docs/synth_frame.png."""
    from detector.draw import colour_of

    img = bgr.copy()
    scale = max(min(img.shape[:2]) / 900.0, 0.4)
    for c in frame_truth["cells"]:
        x1, y1, x2, y2 = (int(round(v)) for v in c["box"])
        label = labels.get(c["id"], "?")
        col = colour_of(label)
        cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), col, 2)
        text = f"#{c['id']} {label}" + ("" if c["visible_fraction"] > 0.99
                                          else f" {100 * c['visible_fraction']:.0f}%")
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - th - base - 4 if y1 - th - base - 4 >= 0 else y1
        tx = min(max(x1, 0), max(img.shape[1] - tw - 4, 0))
        cv2.rectangle(img, (tx, ty), (tx + tw + 4, ty + th + base + 4), col, cv2.FILLED)
        lum = 0.114 * col[0] + 0.587 * col[1] + 0.299 * col[2]
        cv2.putText(img, text, (tx + 2, ty + th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (0, 0, 0) if lum > 140 else (255, 255, 255), 1, cv2.LINE_AA)
    caption = (f"synthetic smear, frame {frame_truth['frame']}  {frame_truth['segment']}  "
               f"blur {frame_truth['blur']:.1f}px")
    cv2.putText(img, caption, (8, img.shape[0] - 10), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (40, 40, 40), 1, cv2.LINE_AA)
    return img


def save_docs_frame(path: str | Path, seed: int = 1, index: int = 894) -> Path:
    """Write the README picture: one annotated simulator frame as a 256-colour PNG (small enough
    for the repo). ``python -c "from training.synth import save_docs_frame as f;
    f('docs/synth_frame.png')"`` regenerates it."""
    sim = SlideSimulator(seed=seed)
    bgr, tr = sim.frame(index)
    img = annotate(bgr, tr, {c.id: c.label for c in sim.cells})
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        from PIL import Image
    except ImportError:  # full-colour PNG without Pillow
        cv2.imwrite(str(out), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        return out
    rgb = Image.fromarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    rgb.quantize(colors=256, method=Image.Quantize.FASTOCTREE,
                 dither=Image.Dither.NONE).save(out, optimize=True)
    return out



def main(args: Any) -> int:
    """``hematovision synth OUT_DIR [--seconds S] [--fps F] [--seed N] [--size WxH]
    [--wbc-per-frame D] [--stain PRESET] [--magnification X]``."""
    # FFmpeg reads this once, at OpenCV's first video I/O: keeps the H.264 probe quiet.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    settings: dict[str, Any] = {}
    if getattr(args, "wbc_per_frame", None) is not None:
        settings["wbc_per_frame"] = float(args.wbc_per_frame)
    if getattr(args, "stain", None) is not None:
        settings["stain"] = args.stain
    if getattr(args, "magnification", None) is not None:
        w, h = args.size
        settings["rbc_px"] = RBC_PX_640 * min(w / 640.0, h / 480.0) * float(args.magnification)
    out = render_video(args.out_dir, seconds=args.seconds, fps=args.fps, seed=args.seed,
                       size=tuple(args.size), progress=None, **settings)
    truth = load_truth(out)
    labels = {c["id"]: c["label"] for c in truth["cells"]}
    seen = {c["id"] for f in truth["frame_truth"] for c in f["cells"]}
    by_type = ", ".join(f"{n} {t}" for t in CELL_TYPES
                        if (n := sum(1 for i in seen if labels[i] == t))) or "none"
    w, h = truth["size"]
    print(f"wrote {out / 'video.mp4'} ({truth['frames']} frames, {w}x{h} at {truth['fps']:g} fps, "
          f"{truth['video']['codec']}) and truth.json: {len(seen)} of {len(labels)} white cells "
          f"in view ({by_type})")
    return 0
