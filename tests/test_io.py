"""Tests for vocabseg.io: image loading, listing, and label PNG round trips."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vocabseg.errors import ImageError, UserError
from vocabseg.io import list_images, load_image, read_label_png, save_label_png
from vocabseg.viz import make_palette


def _rgb_checker(h: int = 6, w: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# numpy inputs
# ---------------------------------------------------------------------------------------------


def test_uint8_rgb_array_is_returned_as_a_copy():
    a = _rgb_checker()
    out = load_image(a)
    assert out.dtype == np.uint8 and out.shape == a.shape
    np.testing.assert_array_equal(out, a)
    out[0, 0] = 0
    assert not np.shares_memory(out, a)


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 1)])
def test_grayscale_arrays_are_replicated_to_three_channels(shape):
    g = np.arange(12, dtype=np.uint8).reshape(shape) * 20
    out = load_image(g)
    assert out.shape == (4, 3, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g.reshape(4, 3))


def test_rgba_array_is_composited_onto_white():
    a = np.zeros((1, 3, 4), dtype=np.uint8)
    a[0, :, :3] = [10, 100, 200]
    a[0, :, 3] = [0, 255, 128]
    out = load_image(a)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # fully transparent -> white
    np.testing.assert_array_equal(out[0, 1], [10, 100, 200])  # opaque -> colour
    expected = np.rint(np.array([10, 100, 200]) * 128 / 255 + 255 * 127 / 255)
    np.testing.assert_allclose(out[0, 2], expected, atol=1)


def test_uint16_array_is_scaled_by_257_with_rounding():
    v = np.array([[0, 128, 129, 257, 32896, 65535]], dtype=np.uint16)
    out = load_image(v)[..., 0]
    np.testing.assert_array_equal(out[0], [0, 0, 1, 1, 128, 255])


def test_float_array_in_unit_range_is_rounded_to_8_bit():
    v = np.array([[0.0, 0.5, 1.0, 0.1]], dtype=np.float32)
    out = load_image(v)[..., 0]
    np.testing.assert_array_equal(out[0], [0, 128, 255, 26])


@pytest.mark.parametrize("bad", [np.full((2, 2), 2.0), np.full((2, 2), -0.5), np.array([[np.nan, 0.0]])])
def test_float_array_outside_unit_range_raises(bad):
    with pytest.raises(ImageError):
        load_image(bad)


def test_integer_arrays_in_byte_range_are_accepted_and_others_refused():
    np.testing.assert_array_equal(load_image(np.full((2, 2), 7, dtype=np.int64))[..., 1], 7)
    with pytest.raises(ImageError, match="values"):
        load_image(np.full((2, 2), 300, dtype=np.int32))


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4,), np.uint8), np.zeros((4, 4, 2), np.uint8), np.zeros((2, 2, 3, 1), np.uint8),
     np.zeros((0, 4, 3), np.uint8), np.zeros((2, 2, 3), np.complex64)],
)
def test_bad_array_shapes_and_dtypes_raise_image_error(bad):
    with pytest.raises(ImageError):
        load_image(bad)


def test_unsupported_input_type_raises():
    with pytest.raises(ImageError, match="int"):
        load_image(42)  # type: ignore[arg-type]
    assert issubclass(ImageError, UserError)


# ---------------------------------------------------------------------------------------------
# PIL modes
# ---------------------------------------------------------------------------------------------


def test_pil_l_la_rgba_and_1_modes():
    np.testing.assert_array_equal(load_image(Image.new("L", (3, 2), 77)), np.full((2, 3, 3), 77))
    np.testing.assert_array_equal(load_image(Image.new("LA", (3, 2), (77, 0))), np.full((2, 3, 3), 255))
    np.testing.assert_array_equal(load_image(Image.new("LA", (3, 2), (77, 255))), np.full((2, 3, 3), 77))
    np.testing.assert_array_equal(load_image(Image.new("RGBA", (1, 1), (9, 8, 7, 0)))[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(load_image(Image.new("RGBA", (1, 1), (9, 8, 7, 255)))[0, 0], [9, 8, 7])
    np.testing.assert_array_equal(load_image(Image.new("1", (2, 2), 1)), np.full((2, 2, 3), 255))
    np.testing.assert_array_equal(load_image(Image.new("1", (2, 2), 0)), np.zeros((2, 2, 3)))


def test_pil_palette_with_and_without_transparency():
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    out = load_image(im)
    np.testing.assert_array_equal(out[0], [[10, 20, 30], [200, 100, 50]])
    im.info["transparency"] = 0  # index 0 is transparent -> white
    out = load_image(im)
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [200, 100, 50]])


def test_pil_16_bit_32_bit_float_and_cmyk_modes():
    im16 = Image.fromarray(np.array([[0, 129, 65535]], dtype=np.uint16))
    assert im16.mode.startswith("I;16")
    np.testing.assert_array_equal(load_image(im16)[0, :, 0], [0, 1, 255])
    im32 = Image.fromarray(np.array([[0, 257, 65535, 100000]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(load_image(im32)[0, :, 0], [0, 1, 255, 255])
    imf = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(load_image(imf)[0, :, 2], [0, 128, 255])
    cmyk = Image.new("CMYK", (1, 1), (255, 0, 0, 0))  # pure cyan
    np.testing.assert_array_equal(load_image(cmyk)[0, 0], [0, 255, 255])


def test_pil_image_over_the_pixel_limit_is_refused():
    with pytest.raises(ImageError, match="limit"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=9_999)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def test_png_and_jpeg_files_load(tmp_path):
    a = _rgb_checker(8, 9)
    Image.fromarray(a).save(tmp_path / "x.png")
    np.testing.assert_array_equal(load_image(tmp_path / "x.png"), a)
    np.testing.assert_array_equal(load_image(str(tmp_path / "x.png")), a)
    flat = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    Image.fromarray(flat).save(tmp_path / "y.jpg", quality=95)
    out = load_image(tmp_path / "y.jpg")
    assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - flat).max() <= 4


@pytest.mark.parametrize("via_pil", [False, True])
def test_exif_orientation_is_applied(tmp_path, via_pil):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    im.save(tmp_path / "rot.png", exif=exif)
    src = Image.open(tmp_path / "rot.png") if via_pil else tmp_path / "rot.png"
    out = load_image(src)
    assert out.shape == (40, 20, 3)
    np.testing.assert_array_equal(out[5, 10], [255, 0, 0])  # left went to the top
    np.testing.assert_array_equal(out[35, 10], [0, 0, 255])


def test_missing_file_and_directory_raise(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_non_image_corrupt_and_truncated_files_raise(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(ImageError, match="notes.png"):
        load_image(tmp_path / "notes.png")
    Image.fromarray(_rgb_checker(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    Image.fromarray(_rgb_checker(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:200])
    with pytest.raises(ImageError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width×height but that carries no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    limit_before = Image.MAX_IMAGE_PIXELS
    # 1.2e8 pixels: over the default limit of 1e8 but under 2e8, where PIL itself only warns. The
    # file has no pixel data, so only a check of the header size before decoding reports "limit".
    _png_header_only(tmp_path / "bomb.png", 12_000, 10_000)
    with pytest.raises(ImageError, match="limit"):
        load_image(tmp_path / "bomb.png")
    _png_header_only(tmp_path / "huge.png", 100_000, 100_000)
    with pytest.raises(ImageError, match="limit"):
        load_image(tmp_path / "huge.png")
    # Just above the limit (PIL itself would only warn) is refused too; PIL's global is restored.
    Image.fromarray(_rgb_checker(100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="limit"):
        load_image(tmp_path / "big.png", max_pixels=9_000)
    with pytest.raises(ImageError, match="limit"):
        load_image(tmp_path / "big.png", max_pixels=1_000)  # PIL's DecompressionBombError path
    assert load_image(tmp_path / "big.png", max_pixels=10_000).shape == (100, 100, 3)
    assert Image.MAX_IMAGE_PIXELS == limit_before


# ---------------------------------------------------------------------------------------------
# list_images
# ---------------------------------------------------------------------------------------------


def test_list_images(tmp_path):
    for name in ["b.jpg", "a.PNG", "c.TIFF", "notes.txt", ".hidden.png", "d.webp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.bmp").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a directory named like an image is not an image
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.PNG", "b.jpg", "c.TIFF", "d.webp"]
    rec = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)]
    assert rec == ["a.PNG", "b.jpg", "c.TIFF", "d.webp", "sub/e.bmp"]
    assert list_images(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]
    assert list_images(str(tmp_path / "sub")) == [tmp_path / "sub" / "e.bmp"]
    with pytest.raises(ImageError):
        list_images(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# label PNGs
# ---------------------------------------------------------------------------------------------


def test_label_png_round_trip_8_bit_palette(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 20, size=(7, 9))
    labels[0, 0] = 255
    pal = make_palette(20)
    save_label_png(labels, tmp_path / "out" / "l.png", pal)  # parent folder is created
    with Image.open(tmp_path / "out" / "l.png") as im:
        assert im.mode == "P"
        colours = np.array(im.convert("RGB"))
    np.testing.assert_array_equal(colours[1, 1], pal[labels[1, 1]])
    back = read_label_png(tmp_path / "out" / "l.png")
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, labels)


def test_label_png_round_trip_16_bit(tmp_path):
    labels = np.array([[0, 300], [65535, 7]])
    save_label_png(labels, tmp_path / "l16.png", None)
    with Image.open(tmp_path / "l16.png") as im:
        assert im.mode.startswith("I")
    np.testing.assert_array_equal(read_label_png(tmp_path / "l16.png"), labels)
    # A palette with more than 256 colours forces 16 bits even when the values are small.
    small = np.array([[1, 2], [3, 4]])
    save_label_png(small, tmp_path / "s.png", make_palette(1000))
    with Image.open(tmp_path / "s.png") as im:
        assert im.mode != "P"
    np.testing.assert_array_equal(read_label_png(tmp_path / "s.png"), small)


def test_label_png_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "l.png"
    good = np.ones((4, 4), dtype=np.int64)
    save_label_png(good, target)
    before = target.read_bytes()

    def exploding_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        save_label_png(np.zeros((4, 4), dtype=np.int64), target)
    monkeypatch.undo()
    assert target.read_bytes() == before  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["l.png"]  # no temporary left behind


def test_bad_label_maps_raise(tmp_path):
    with pytest.raises(ImageError, match="negative"):
        save_label_png(np.array([[-1, 0]]), tmp_path / "a.png")
    with pytest.raises(ImageError, match="integer"):
        save_label_png(np.zeros((2, 2), np.float32), tmp_path / "a.png")
    with pytest.raises(ImageError, match="H×W"):
        save_label_png(np.zeros((2, 2, 3), np.uint8), tmp_path / "a.png")
    with pytest.raises(ImageError, match="65535"):
        save_label_png(np.array([[70000]]), tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_read_label_png_refuses_colour_and_missing_files(tmp_path):
    Image.fromarray(_rgb_checker()).save(tmp_path / "rgb.png")
    with pytest.raises(ImageError, match="RGB"):
        read_label_png(tmp_path / "rgb.png")
    with pytest.raises(ImageError, match="not found"):
        read_label_png(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ImageError, match="bad.png"):
        read_label_png(tmp_path / "bad.png")
