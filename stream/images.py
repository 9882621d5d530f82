"""Still-image input: expand files, folders and globs, and read any common image as BGR uint8.

``read_image`` turns what microscope software and users actually save into the one format the
analysis takes (H x W x 3 uint8 BGR):

- grayscale -> 3 equal channels; gray+alpha, RGBA/BGRA and palette images with transparency ->
  composited on white (a slide's background is bright, so white is what transparency hides);
- 16-bit (and 10/12/14-bit data stored in 16 bits, common with scientific cameras) -> 8-bit,
  scaled by the smallest of 10, 12, 14, 16 bits that holds the image's largest value (camera
  and video frames go through the same conversion, ``normalize_image``);
- floating-point images -> [0, 1] (or [0, 255] when the values exceed 1) scaled to 8-bit.

Limits, each an :class:`InputError` naming the file: not decodable ("not a readable image"),
smaller than ``MIN_SIDE`` pixels on a side ("too small"), larger than ``MAX_PIXELS`` ("too large").
The size is checked from the file's header (Pillow reads it without decoding) before OpenCV
decodes the pixels, so a small file that declares a huge image (a page upload, say) is refused
without the gigabytes its pixels would take; formats Pillow does not know are checked once
decoded.
Huge images are refused rather than silently downscaled: the segmenter's cell sizes are in pixels
at the microscope's usual magnification, so shrinking a whole-slide scan would not give a
trustworthy answer. EXIF orientation is not applied (microscope cameras don't rotate).

``read_still`` is the reader of every still photo to analyse (``detect``, ``run`` on images, the
page's image tab): ``read_image`` plus a refusal of greyscale pictures, in which no cell can be
found or named (the segmenter and the classifier both work on the stain's colours).
"""

from __future__ import annotations

import glob
import logging
import warnings
from pathlib import Path

import cv2
import numpy as np

from detector.errors import InputError

log = logging.getLogger(__name__)

#: File extensions taken from folders (files named explicitly are tried whatever their name).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".pbm", ".pgm",
     ".ppm", ".pnm", ".jp2", ".sr", ".ras"}
)
#: Smallest accepted image side in pixels (a white cell needs room around it).
MIN_SIDE = 32
#: Largest accepted image in pixels (40 megapixels).
MAX_PIXELS = 40_000_000
#: An image whose 99th percentile of per-pixel colour spread (max - min channel) stays below
#: this is greyscale. Stained smears measure 85-128 on BCCD; a grey photo saved as JPEG, 0-3.
GREY_SPREAD = 12

_GLOB_CHARS = set("*?[")


def expand_image_arg(arg: str) -> list[Path]:
    """One command-line argument -> image paths: a file as is, a folder's images (sorted, not
    recursive), or a glob's matches (sorted). Raises InputError when nothing is found."""
    path = Path(arg).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise InputError(f"{arg}: folder holds no images "
                             f"({', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, ...)")
        return found
    if path.is_file():
        return [path]
    if _GLOB_CHARS & set(arg):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        found = [p for p in matches if p.is_file()]
        for d in (p for p in matches if p.is_dir()):
            found.extend(sorted(p for p in d.iterdir()
                                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        if not found:
            raise InputError(f"{arg}: no images match this pattern")
        return found
    if path.exists():
        raise InputError(f"{arg}: not a file or folder")
    raise InputError(f"{arg}: no such file or folder")


def bit_depth(img: np.ndarray) -> int:
    """Bits used by 16-bit pixel data: the smallest of 10, 12, 14, 16 that holds its largest
    value (scientific cameras store 10/12/14-bit data in 16-bit words)."""
    peak = int(img.max()) if img.size else 0
    return next((b for b in (10, 12, 14) if peak < (1 << b)), 16)


def _to_uint8(img: np.ndarray, path: Path, bits: int | None) -> np.ndarray:
    """Any depth -> uint8, keeping channels."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        bits = bits or bit_depth(img)
        return cv2.convertScaleAbs(img, alpha=255.0 / ((1 << bits) - 1))
    if img.dtype in (np.float32, np.float64, np.float16):
        f = np.nan_to_num(img.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if f.size and float(f.max()) <= 1.0 else 1.0
        return np.clip(np.round(f * scale), 0, 255).astype(np.uint8)
    if img.dtype in (np.int8, np.int16, np.int32):
        return np.clip(img, 0, 255).astype(np.uint8)
    raise InputError(f"{path}: unsupported pixel type {img.dtype}")


def _composite_on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend uint8 colour (H, W, C) over white with uint8 alpha (H, W)."""
    a = alpha.astype(np.uint16)[..., None]
    out = (colour.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def normalize_image(img: np.ndarray, path: str | Path = "<image>",
                    bits: int | None = None) -> np.ndarray:
    """Decoded image or camera frame of any layout (gray, gray+alpha, BGR, BGRA; 8/16-bit or
    float) -> BGR uint8. 16-bit data is scaled by ``bits`` (default: :func:`bit_depth` of this
    image; a video source fixes it at its first frame, so brightness does not jump)."""
    path = Path(path)
    img = _to_uint8(img, path, bits)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim != 3:
        raise InputError(f"{path}: unsupported image layout {img.shape}")
    channels = img.shape[2]
    if channels == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    if channels == 2:  # gray + alpha
        gray = _composite_on_white(img[:, :, :1], img[:, :, 1])[:, :, 0]
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    if channels == 3:
        return np.ascontiguousarray(img)
    if channels == 4:
        return _composite_on_white(img[:, :, :3], img[:, :, 3])
    raise InputError(f"{path}: unsupported number of channels ({channels})")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file -> H x W x 3 uint8 BGR, or raise InputError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    declared = _declared_size(path)
    if declared is not None:
        _check_size(path, *declared)
    img = None
    if data.size:
        try:
            img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        except cv2.error:
            img = None
    if img is None or img.size == 0:
        raise InputError(f"{path}: not a readable image")
    _check_size(path, img.shape[1], img.shape[0])
    return normalize_image(img, path)


def _check_size(path: Path, w: int, h: int) -> None:
    """InputError naming the file when a ``w`` x ``h`` image is out of the limits."""
    if min(h, w) < MIN_SIDE:
        raise InputError(f"{path}: image too small ({w}x{h}; at least {MIN_SIDE}x{MIN_SIDE} "
                         "pixels)")
    if h * w > MAX_PIXELS:
        raise InputError(f"{path}: image too large ({w}x{h} = {h * w / 1e6:.0f} megapixels; at "
                         f"most {MAX_PIXELS / 1e6:.0f}): crop or downscale it to the "
                         "microscope's usual field of view first")


def _declared_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from an image file's header, nothing decoded (None: Pillow is missing
    or does not know the format; the decoded image is checked then)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own large-image warning
            with Image.open(path) as im:
                return int(im.size[0]), int(im.size[1])
    except Image.DecompressionBombError:  # over Pillow's own limit: far over ours
        over = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
        raise InputError(f"{path}: image too large (over {over:.0f} megapixels; at most "
                         f"{MAX_PIXELS / 1e6:.0f}): crop or downscale it to the microscope's "
                         "usual field of view first") from None
    except Exception:  # noqa: BLE001 - unknown or broken header: OpenCV decides
        return None


def is_greyscale(bgr: np.ndarray) -> bool:
    """True when the image has (almost) no colour: all three channels nearly equal."""
    small = bgr[::4, ::4].astype(np.int16)
    spread = small.max(axis=2) - small.min(axis=2)
    return bool(spread.size) and float(np.percentile(spread, 99)) < GREY_SPREAD


def read_still(path: str | Path) -> np.ndarray:
    """Read a photo to analyse -> BGR uint8; InputError naming the file when it is unreadable,
    out of the size limits, or greyscale (cells are found and named by their stain colours)."""
    bgr = read_image(path)
    if is_greyscale(bgr):
        raise InputError(f"{path}: greyscale image: white cells are found and named by their "
                         "stain, so a colour photo of a stained smear is needed")
    return bgr
