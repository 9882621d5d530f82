"""Smear simulator: a synthetic microscope video of a blood smear with per-cell ground truth.

No public data set gives smear *videos* with the identity of every white cell in every frame, so
this module renders one. A virtual slide several times larger than the camera's view is painted
once (red cells with central pallor, some crenated; platelets, some clumped; white cells of the
five types drawn with their textbook morphology, never touching each other), in optical-density
space so overlapping cells darken like stained cells do. A camera then moves over the slide the
way a person drives a stage: pauses, pans in all directions at changing speeds (some fast),
sub-pixel nudges, and returns to places already seen, so the same cell leaves and re-enters the
view. Each frame gets focus drift (including fully blurred moments), motion blur, vignetting and
uneven illumination, sensor noise, and the file is compressed (H.264 'avc1' where OpenCV can
write it, else 'mp4v'). Colours, red-cell density and cell sizes are matched to the BCCD
photographs (100x objective, 640x480, red cell ~105 px across; other frame sizes keep the field
of view, so cells scale with the frame). Stain strength, white balance, illumination and motion
style change with the seed; everything is deterministic from the seed (same seed: identical
truth.json and identical frames before compression; frame i can be rendered on its own).

Only NumPy and OpenCV are needed (no TensorFlow): the runtime's ``demo`` source uses it, and
``hematovision synth`` (training/synth.py) writes clips with per-cell truth for the evaluations.
Painting a 640x480 slide (8 frame areas) takes about a second and ~70 MB transiently; a frame
then costs a warp, blur, vignetting and noise (~7 ms on one core at 640x480).

Modules: ``settings`` (every knob), ``slide`` (painting), ``camera`` (stage motion, focus),
``simulator`` (frame pixels and truth), ``video`` (files, cached clips).

Python API:
    - :func:`make_slide` / :class:`Slide`: the painted slide and its white cells.
    - :class:`SlideSimulator`: slide + camera + optics; ``frame(i) -> (bgr, frame_truth)``.
    - :func:`iter_frames`: generator of ``(frame_bgr, frame_truth)`` (endless if ``seconds=None``),
      no disk I/O.
    - :func:`render_video`: writes ``video.mp4`` and ``truth.json`` into a folder.
    - :func:`load_truth`: reads and validates a ``truth.json`` (or the folder holding it).
    - :func:`cached_video`: a clip rendered once and cached (the demo, the bench's clip).
    - :class:`SynthSettings`: every knob (density, type mix, stain, optics, motion); the functions
      above take its fields as keyword arguments, e.g. ``wbc_mix={"eosinophil": 1}``.

truth.json (version 1)::

    {
      "version": 1,
      "seed": 0,                      # the --seed
      "fps": 30.0,
      "size": [640, 480],             # frame width, height
      "frames": 1800,                 # frames in video.mp4 == len(frame_truth)
      "video": {"file": "video.mp4", "codec": "avc1" | "mp4v"},
      "slide_size": [W, H],           # virtual slide in pixels (frame pixel scale)
      "settings": {...},              # every SynthSettings field as used (stain, optics, motion)
      "cells": [                      # every white cell on the slide, seen or not
        {"id": 0, "label": "neutrophil", "slide_box": [x1, y1, x2, y2],
         "diameter_um": 13.1}
      ],
      "frame_truth": [                # one entry per frame, in order
        {"frame": 0, "t": 0.0,
         "camera": [x, y],            # slide position of the frame's top-left corner (float)
         "segment": "pause" | "pan" | "fast_pan" | "return" | "nudge",
         "motion": [dx, dy],          # camera displacement to the next frame, pixels
         "blur": 0.8,                 # Gaussian defocus sigma of the whole frame, pixels
         "cells": [                   # every white cell at least partly in view
           {"id": 0, "box": [x1, y1, x2, y2],   # frame pixels, visible part, clipped to frame
            "visible_fraction": 0.93,            # share of the cell's area inside the frame
            "blur": 0.8}
         ]}
      ]
    }

Boxes are ``[x1, y1, x2, y2]`` floats with x2/y2 exclusive (pixel-edge coordinates); a cell's
box covers its whole cytoplasm. Red cells and platelets are not listed.
"""


from stream.synth.settings import SynthSettings, make_settings
from stream.synth.simulator import SlideSimulator, iter_frames
from stream.synth.slide import Slide, SlideCell, make_slide
from stream.synth.video import cache_root, cached_video, load_truth, render_video

__all__ = [
    "Slide",
    "SlideCell",
    "SlideSimulator",
    "SynthSettings",
    "cache_root",
    "cached_video",
    "iter_frames",
    "load_truth",
    "make_settings",
    "make_slide",
    "render_video",
]
