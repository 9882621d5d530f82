"""Still-image input: argument expansion and reading odd but real image files as BGR uint8."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from detector.errors import InputError
from stream import images
from stream.images import expand_image_arg, normalize_image, read_image


def _write(path: Path, img: np.ndarray) -> Path:
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def palette_png(index: np.ndarray, palette_rgb: list[tuple[int, int, int]],
                trns: list[int] | None = None) -> bytes:
    """A paletted PNG (colour type 3), which OpenCV cannot write itself."""
    h, w = index.shape
    raw = b"".join(b"\x00" + bytes(row) for row in index.astype(np.uint8))
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
    out += _chunk(b"PLTE", bytes(np.array(palette_rgb, np.uint8).ravel()))
    if trns is not None:
        out += _chunk(b"tRNS", bytes(trns))
    return out + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


# -- paths ----------------------------------------------------------------------------------------


def test_expand_files_folders_globs(tmp_path: Path) -> None:
    img = np.zeros((40, 40, 3), np.uint8)
    for name in ("b.png", "a.jpg", "c.TIF"):
        _write(tmp_path / name.lower(), img)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "z.png", img)

    folder = expand_image_arg(str(tmp_path))
    assert [p.name for p in folder] == ["a.jpg", "b.png", "c.tif"]  # sorted, images only
    assert [p.name for p in expand_image_arg(str(tmp_path / "*.png"))] == ["b.png"]
    assert expand_image_arg(str(tmp_path / "notes.txt")) == [tmp_path / "notes.txt"]
    assert [p.name for p in expand_image_arg(str(tmp_path / "sub"))] == ["z.png"]


def test_expand_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: folder holds no images"):
        expand_image_arg(str(tmp_path / "empty"))
    missing = str(tmp_path / "missing.png")
    with pytest.raises(InputError, match="no such file or folder") as info:
        expand_image_arg(missing)
    assert str(info.value).startswith(missing)
    with pytest.raises(InputError, match="no images match"):
        expand_image_arg(str(tmp_path / "*.jpg"))


# -- reading --------------------------------------------------------------------------------------


def test_colour_roundtrip_and_unicode_path(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    out = read_image(_write(tmp_path / "größe µm.png", img))
    assert out.dtype == np.uint8 and np.array_equal(out, img)


def test_grayscale_to_three_channels(tmp_path: Path) -> None:
    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (40, 1))
    out = read_image(_write(tmp_path / "g.png", gray))
    assert out.shape == (40, 64, 3)
    assert np.array_equal(out[:, :, 0], gray) and np.array_equal(out[:, :, 2], gray)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    bgra = np.zeros((40, 60, 4), np.uint8)
    bgra[:, :, :3] = (200, 50, 10)
    bgra[:, :20, 3] = 255  # opaque
    bgra[:, 20:40, 3] = 0  # transparent -> white
    bgra[:, 40:, 3] = 128  # half
    out = read_image(_write(tmp_path / "a.png", bgra))
    assert out.shape == (40, 60, 3)
    assert tuple(out[5, 5]) == (200, 50, 10)
    assert tuple(out[5, 30]) == (255, 255, 255)
    assert tuple(out[5, 50]) == (227, 152, 132)  # round((c*128 + 255*127) / 255)


def test_16bit_scaled(tmp_path: Path) -> None:
    img = np.zeros((40, 40, 3), np.uint16)
    img[:, :20] = 65535
    img[:, 20:] = 32768
    out = read_image(_write(tmp_path / "w.png", img))
    assert out.dtype == np.uint8 and out[0, 0, 0] == 255 and out[0, 30, 0] == 128
    twelve = np.full((40, 40), 4095, np.uint16)  # 12-bit camera data in 16 bits
    twelve[:, :20] = 2048
    out = read_image(_write(tmp_path / "t.tif", twelve))
    assert out.shape == (40, 40, 3) and out[0, 30, 1] == 255 and out[0, 0, 1] == 128


def test_float_tiff(tmp_path: Path) -> None:
    img = np.full((40, 40, 3), 0.5, np.float32)
    out = read_image(_write(tmp_path / "f.tiff", img))
    assert out.dtype == np.uint8 and (out == 128).all()


def test_palette_png(tmp_path: Path) -> None:
    index = np.zeros((40, 50), np.uint8)
    index[:, 25:] = 1
    path = tmp_path / "p.png"
    path.write_bytes(palette_png(index, [(255, 0, 0), (0, 0, 255)]))
    out = read_image(path)
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[0, 30]) == (255, 0, 0)  # BGR
    path.write_bytes(palette_png(index, [(255, 0, 0), (0, 0, 255)], trns=[255, 0]))
    out = read_image(path)
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[0, 30]) == (255, 255, 255)


def test_normalize_gray_alpha() -> None:
    ga = np.zeros((40, 40, 2), np.uint8)
    ga[:, :, 0] = 100
    ga[:, 20:, 1] = 255
    out = normalize_image(ga)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 30]) == (100, 100, 100)


def test_too_small(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.png", np.zeros((20, 100, 3), np.uint8))
    with pytest.raises(InputError, match=r"s\.png: image too small \(100x20"):
        read_image(path)


def test_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_PIXELS", 60 * 60)
    path = _write(tmp_path / "big.png", np.zeros((61, 60, 3), np.uint8))
    with pytest.raises(InputError, match=r"big\.png: image too large \(60x61"):
        read_image(path)


@pytest.mark.parametrize("content", [b"", b"hello, not an image", "truncated"])
def test_not_an_image(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        ok, buf = cv2.imencode(".jpg", np.full((200, 200, 3), 90, np.uint8))
        content = buf.tobytes()[:300]
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        read_image(path)
    assert str(info.value) == f"{path}: not a readable image"


def test_missing_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="is a folder"):
        read_image(tmp_path)


def test_real_smear(bccd_dir: Path) -> None:
    path = sorted((bccd_dir / "JPEGImages").glob("*.jpg"))[0]
    img = read_image(path)
    assert img.shape == (480, 640, 3) and img.dtype == np.uint8


def _png_header(width: int, height: int) -> bytes:
    """A PNG declaring width x height 8-bit RGB, with no pixel data (a few dozen bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


@pytest.mark.parametrize(("side", "message"), [
    (8000, r"image too large \(8000x8000 = 64 megapixels; at most 40\)"),
    (60000, r"image too large \(over \d+ megapixels; at most 40\)"),
])
def test_a_declared_huge_image_is_refused_before_decoding(tmp_path: Path, side: int,
                                                          message: str) -> None:
    """A few bytes that declare a huge image are refused from the header (decoding it would
    take gigabytes): "too large", not "not a readable image"."""
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(side, side))
    with pytest.raises(InputError, match=message):
        read_image(path)
