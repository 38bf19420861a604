"""Robust image decoding: every bad-file kind gets its stable reason; every mode comes back as correct RGB."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from encoderlab.data.images import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, load_image, probe_image, to_rgb
from encoderlab.errors import BadImageError, EncoderlabError


def _png_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(size: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB")


def _reason(path, **kw) -> str:
    with pytest.raises(BadImageError) as info:
        load_image(path, **kw)
    assert info.value.path == str(path)
    return info.value.reason


def test_good_png_and_jpeg_load_as_rgb(tmp_path):
    formats = (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp"), ("GIF", "gif"), ("TIFF", "tif"))
    for fmt, ext in formats:
        p = tmp_path / f"ok.{ext}"
        p.write_bytes(_png_bytes(_noise(), fmt))
        im = load_image(p)
        assert im.mode == "RGB" and im.size == (64, 64)
        header = probe_image(p)
        assert (header.width, header.height) == (64, 64)


def test_missing_and_directory(tmp_path):
    assert _reason(tmp_path / "nope.png") == "missing"
    d = tmp_path / "x.png"
    d.mkdir()
    assert _reason(d) == "is-a-directory"


def test_zero_byte(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    assert _reason(p) == "zero-byte"


def test_truncated_png_and_jpeg(tmp_path):
    png = _png_bytes(_noise())
    jpg = _png_bytes(_noise(), "JPEG")
    (tmp_path / "t.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "t.jpg").write_bytes(jpg[: len(jpg) // 2])
    assert _reason(tmp_path / "t.png") == "truncated"
    assert _reason(tmp_path / "t.jpg") == "truncated"


def test_truncation_still_reported_when_another_library_sets_the_global(tmp_path, monkeypatch):
    png = _png_bytes(_noise())
    (tmp_path / "t.png").write_bytes(png[: len(png) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert _reason(tmp_path / "t.png") == "truncated"


def test_corrupt_data_with_a_valid_header(tmp_path):
    png = bytearray(_png_bytes(_noise()))
    png[100:300] = b"\x00" * 200  # inside IDAT: header fine, data broken
    (tmp_path / "c.png").write_bytes(bytes(png))
    assert _reason(tmp_path / "c.png") == "corrupt"


def test_text_file_and_random_bytes_are_not_images(tmp_path):
    (tmp_path / "notes.png").write_text("this is a text file, not a picture\n")
    assert _reason(tmp_path / "notes.png") == "not-an-image"
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(1).integers(0, 255, 500, dtype=np.uint8).tobytes())
    assert _reason(tmp_path / "noise.jpg") == "not-an-image"


def test_unreadable(tmp_path, monkeypatch):
    p = tmp_path / "locked.png"
    p.write_bytes(_png_bytes(_noise()))
    real_open = open

    def deny(file, *a, **kw):  # tests run as root, where chmod 000 does not block reads
        if os.fspath(file) == str(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(file, *a, **kw)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(BadImageError) as info:
        load_image(p)
    assert info.value.reason == "unreadable" and "Permission denied" in info.value.detail


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files despite chmod 000")
def test_unreadable_by_permissions(tmp_path):
    p = tmp_path / "locked.png"
    p.write_bytes(_png_bytes(_noise()))
    p.chmod(0)
    try:
        assert _reason(p) == "unreadable"
    finally:
        p.chmod(0o644)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny IDAT: a 'bomb' that costs nothing to make."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_huge_png_refused_from_header_without_decoding(tmp_path):
    # 400 Mpx claimed by a 100-byte file: must be refused before any decoding.
    p = tmp_path / "huge.png"
    p.write_bytes(_png_header_only(20000, 20000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either: our header probe answers first
        with pytest.raises(BadImageError) as info:
            load_image(p)
    assert info.value.reason == "too-large" and "20000x20000" in info.value.detail
    with pytest.raises(BadImageError):
        probe_image(p)
    # Pillow's own bomb check (reached for formats our header probe does not read) maps to too-large as well.
    with pytest.raises(BadImageError) as info:
        load_image(p, max_pixels=10**12)
    assert info.value.reason == "too-large"


def test_pixel_limit_argument_and_env(tmp_path, monkeypatch):
    p = tmp_path / "img.png"
    _noise(100).save(p)
    assert _reason(p, max_pixels=5000) == "too-large"
    assert load_image(p, max_pixels=0).size == (100, 100)  # 0 = no limit
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    assert _reason(p) == "too-large"
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(EncoderlabError, match="ENCODERLAB_MAX_PIXELS"):
        load_image(p)
    monkeypatch.delenv(MAX_PIXELS_ENV)
    assert DEFAULT_MAX_PIXELS == 64_000_000


def test_limit_for_formats_without_our_header_probe(tmp_path):
    p = tmp_path / "img.tif"
    _noise(100).save(p)
    assert _reason(p, max_pixels=5000) == "too-large"


def test_large_jpeg_header_probe(tmp_path):
    p = tmp_path / "wide.jpg"
    Image.new("RGB", (3000, 10)).save(p)
    assert probe_image(p).width == 3000
    assert _reason(p, max_pixels=1000) == "too-large"


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    a[..., 0] = 200  # red-ish but fully transparent, except one opaque blue pixel
    a[0, 0] = (0, 0, 255, 255)
    p = tmp_path / "rgba.png"
    Image.fromarray(a, "RGBA").save(p)
    im = np.asarray(load_image(p))
    assert tuple(im[1, 1]) == (255, 255, 255)
    assert tuple(im[0, 0]) == (0, 0, 255)


def test_half_transparent_is_blended_with_white():
    a = np.zeros((1, 1, 4), dtype=np.uint8)
    a[0, 0] = (0, 0, 0, 128)
    out = np.asarray(to_rgb(Image.fromarray(a, "RGBA")))
    assert 120 <= out[0, 0, 0] <= 135


def test_la_and_palette_transparency_on_white(tmp_path):
    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert tuple(np.asarray(load_image(tmp_path / "la.png"))[0, 0]) == (255, 255, 255)

    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    p.save(tmp_path / "p.gif", transparency=0)
    for name in ("p.png", "p.gif"):
        im = np.asarray(load_image(tmp_path / name))
        assert tuple(im[0, 0]) == (255, 255, 255), name
        assert tuple(im[1, 1]) == (200, 0, 0), name


def test_cmyk_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "c.jpg", quality=95)
    cmyk.save(tmp_path / "c.tif")
    for name in ("c.jpg", "c.tif"):
        px = np.asarray(load_image(tmp_path / name))[4, 4].astype(int)
        assert px[0] > 200 and px[1] < 60 and px[2] < 60, (name, px)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    out = np.asarray(load_image(p))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 64, 128, 255]


def test_32_bit_int_and_float_modes():
    i32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I")
    assert np.asarray(to_rgb(i32))[0, :, 0].tolist() == [0, 255]
    i8 = Image.fromarray(np.array([[0, 200]], dtype=np.int32), "I")
    assert np.asarray(to_rgb(i8))[0, :, 0].tolist() == [0, 200]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255]


def test_grey_and_bilevel(tmp_path):
    Image.new("L", (3, 3), 77).save(tmp_path / "l.png")
    Image.new("1", (3, 3), 1).save(tmp_path / "b.png")
    assert tuple(np.asarray(load_image(tmp_path / "l.png"))[0, 0]) == (77, 77, 77)
    assert tuple(np.asarray(load_image(tmp_path / "b.png"))[0, 0]) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif.tobytes())
    assert Image.open(p).size == (40, 20)
    assert load_image(p).size == (20, 40)


def test_returned_image_is_detached_from_file(tmp_path):
    p = tmp_path / "a.png"
    _noise(16).save(p)
    im = load_image(p)
    os.remove(p)
    assert np.asarray(im).shape == (16, 16, 3)


def _probe_reason(path, **kw) -> str:
    with pytest.raises(BadImageError) as info:
        probe_image(path, **kw)
    assert info.value.path == str(path)
    return info.value.reason


def test_header_check_catches_truncated_png_and_jpeg_from_the_tail(tmp_path):
    png = _png_bytes(_noise())
    jpg = _png_bytes(_noise(), "JPEG")
    cuts = {"half.png": png[: len(png) // 2], "half.jpg": jpg[: len(jpg) // 2], "no-eoi.jpg": jpg[:-2],
            "head-only.png": png[:40], "head-only.jpg": jpg[:300],
            "zero-tail.png": png[: len(png) // 2] + b"\0" * (len(png) // 2)}  # preallocated, never finished
    for name, data in cuts.items():
        (tmp_path / name).write_bytes(data)
        assert _probe_reason(tmp_path / name) in ({"truncated", "corrupt"} if "zero" in name else {"truncated"}), name
    # A valid header and recognised format that Pillow cannot open is a cut-short file, not "not an image".
    assert _reason(tmp_path / "head-only.png") == "truncated"


def test_header_check_reads_only_head_and_tail_of_complete_files(tmp_path, monkeypatch):
    import encoderlab.data.images as images

    def no_decode(*a, **kw):
        raise AssertionError("probe_image decoded a complete file")

    monkeypatch.setattr(images, "load_image", no_decode)
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
        p = tmp_path / f"ok.{ext}"
        p.write_bytes(_png_bytes(_noise(), fmt))
        assert probe_image(p).format == fmt
    big = tmp_path / "big.png"  # larger than the 64 KB head: the tail is read separately
    big.write_bytes(_png_bytes(_noise(256)))
    assert big.stat().st_size > 64 * 1024 and probe_image(big).width == 256


def test_padding_and_data_after_the_end_marker_are_not_truncation(tmp_path):
    jpg = _png_bytes(_noise(), "JPEG")
    png = _png_bytes(_noise())
    (tmp_path / "pad.jpg").write_bytes(jpg + b"\0\0\0\0\0\0")  # camera padding after EOI
    (tmp_path / "ws.png").write_bytes(png + b"\r\n \0")
    # A "motion photo": a video appended after EOI. The marker is not at the end; a decode confirms the image.
    (tmp_path / "motion.jpg").write_bytes(jpg + np.random.default_rng(2).bytes(70_000))
    for name in ("pad.jpg", "ws.png", "motion.jpg"):
        assert probe_image(tmp_path / name).width == 64, name
        assert load_image(tmp_path / name).size == (64, 64), name


def test_corrupt_data_behind_a_valid_header_and_tail_needs_a_decode(tmp_path):
    png = bytearray(_png_bytes(_noise()))
    png[100:300] = b"\x00" * 200
    (tmp_path / "c.png").write_bytes(bytes(png))
    assert probe_image(tmp_path / "c.png").width == 64
    assert _reason(tmp_path / "c.png") == "corrupt"
