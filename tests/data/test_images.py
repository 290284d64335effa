import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from detrkit.data import DatasetError
from detrkit.data.images import read_image, read_image_size


def _write_png16(path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (grayscale [H, W] or RGB [H, W, 3]) written by hand: PIL cannot write
    16-bit RGB."""
    h, w = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _rgb(path) -> np.ndarray:
    image = read_image(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.array([[0, 7, 128, 255]], np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = _rgb(tmp_path / "g.png")
    assert out.shape == (1, 4, 3) and (out == gray[..., None]).all()


def test_rgba_drops_alpha_without_compositing(tmp_path):
    rgba = np.array([[[200, 10, 30, 0], [5, 250, 100, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert (_rgb(tmp_path / "a.png") == rgba[..., :3]).all()


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    assert _rgb(tmp_path / "p.png").tolist() == [[[255, 0, 0], [0, 0, 255]]]


def test_16bit_gray_scaled_not_clipped(tmp_path):
    values = np.array([[0, 255, 256, 30000, 65535]], np.uint16)
    for name, writer in (
        ("pil.png", lambda p: Image.fromarray(values).save(p)),
        ("raw.png", lambda p: _write_png16(p, values)),
    ):
        writer(tmp_path / name)
        out = _rgb(tmp_path / name)
        assert out[..., 0].tolist() == [[0, 0, 1, 117, 255]]  # v >> 8, not min(v, 255)
        assert (out[..., 0] == out[..., 2]).all()


def test_16bit_rgb_scaled(tmp_path):
    values = np.array([[[0, 300, 65535], [25600, 51455, 1000]]], np.uint16)
    _write_png16(tmp_path / "c.png", values)
    assert _rgb(tmp_path / "c.png").tolist() == [[[0, 1, 255], [100, 200, 3]]]


def test_int32_mode_with_16bit_values(tmp_path):
    values = np.array([[0, 512, 65535]], np.int32)
    Image.fromarray(values, "I").save(tmp_path / "i.tif")
    assert _rgb(tmp_path / "i.tif")[..., 1].tolist() == [[0, 2, 255]]


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="bad.png: cannot read image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(DatasetError, match="gone.png: image file not found"):
        read_image_size(tmp_path / "gone.png")
    Image.new("RGB", (7, 5)).save(tmp_path / "s.png")
    assert read_image_size(tmp_path / "s.png") == (5, 7)
