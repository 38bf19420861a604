"""Robust image decoding: every failure becomes a ``BadImageError`` with a short, stable reason.

Reasons: ``missing``, ``is-a-directory``, ``unreadable`` (permissions / IO error), ``zero-byte``,
``not-an-image`` (no image format recognised), ``truncated``, ``corrupt`` (recognised format, undecodable
data or an unsupported pixel mode), ``too-large`` (over the pixel limit).

The pixel limit is checked from the file header *before* any pixel is decoded: PNG, JPEG, GIF, BMP and WebP
headers are read by our own few-byte probe (so Pillow never even warns about them); other formats go through
Pillow's lazy ``Image.open``, which reads only the header, and Pillow's own ``DecompressionBombError`` is
mapped to ``too-large`` as well. Every decoded image comes back as 8-bit RGB: transparency is composited on
white, 16-bit data is scaled (not clipped) to 8 bits, and the EXIF orientation is applied.

Truncation: Pillow pads truncated files silently only when the process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES``
is True. We never set that global (other code in the process may rely on it); when someone else has set it,
PNG and JPEG files are additionally checked for their end markers so truncation is still reported.
The header check ``probe_image`` also reads the last few KB of PNG and JPEG files: a file that does not end with
its end marker (IEND / EOI, after a little zero or whitespace padding) is decoded to confirm, so truncated
files are caught without ``--decode`` while files with data after the marker (phone "motion photos") pass.
"""

from __future__ import annotations

import errno
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import BadImageError

DEFAULT_MAX_PIXELS = 64_000_000
MAX_PIXELS_ENV = "ENCODERLAB_MAX_PIXELS"

# Reasons an image check gives; reasons a source gives while listing are in sources.LISTING_REASONS.
REASONS = (
    "missing",
    "is-a-directory",
    "unreadable",
    "zero-byte",
    "not-an-image",
    "truncated",
    "corrupt",
    "too-large",
)

_WHITE = (255, 255, 255)
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole (empty) IEND chunk: length, type, CRC
_JPEG_EOI = b"\xff\xd9"
_TAIL_BYTES = 4096
_TAIL_PADDING = b"\x00 \t\r\n"  # some cameras and tools pad files after the end marker


@dataclass(frozen=True)
class ImageHeader:
    """What a header says about an image, without decoding it."""

    path: str
    format: str | None
    width: int
    height: int
    mode: str | None = None  # known only when Pillow read the header

    @property
    def pixels(self) -> int:
        return self.width * self.height


def max_pixels_default() -> int:
    """The pixel limit: ``$ENCODERLAB_MAX_PIXELS`` if set (``0`` = no limit), else 64 Mpx."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        from ..errors import EncoderlabError

        raise EncoderlabError(
            f"{MAX_PIXELS_ENV}={raw!r} is not a number", "set it to a pixel count such as 64000000, or 0 for no limit"
        ) from None
    return value


def _resolve_limit(max_pixels: int | None) -> int:
    limit = max_pixels_default() if max_pixels is None else int(max_pixels)
    return max(0, limit)


def _check_file(path: str) -> int:
    """Stat the path; return its size or raise the matching ``BadImageError``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadImageError(path, "missing") from None
    except NotADirectoryError:
        raise BadImageError(path, "missing", "a parent of the path is not a directory") from None
    except OSError as e:
        raise BadImageError(path, "unreadable", e.strerror or str(e)) from None
    if os.path.isdir(path):
        raise BadImageError(path, "is-a-directory")
    if st.st_size == 0:
        raise BadImageError(path, "zero-byte")
    return st.st_size


def _io_error(path: str, e: OSError) -> BadImageError:
    if isinstance(e, FileNotFoundError):
        return BadImageError(path, "missing")
    if isinstance(e, IsADirectoryError):
        return BadImageError(path, "is-a-directory")
    return BadImageError(path, "unreadable", e.strerror or str(e))


def _read_head(path: str, n: int = 64 * 1024) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise _io_error(path, e) from None


def _header_size(head: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) from the first bytes for PNG/GIF/BMP/JPEG/WebP; None when not parsable here."""
    if head.startswith(_PNG_SIG) and len(head) >= 24 and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return "PNG", w, h
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        w, h = struct.unpack("<HH", head[6:10])
        return "GIF", w, h
    if head[:2] == b"BM" and len(head) >= 26:
        hdr_size = struct.unpack("<I", head[14:18])[0]
        if hdr_size == 12:
            w, h = struct.unpack("<HH", head[18:22])
        else:
            w, h = struct.unpack("<ii", head[18:26])
        return "BMP", abs(w), abs(h)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8X":
            w = 1 + int.from_bytes(head[24:27], "little")
            h = 1 + int.from_bytes(head[27:30], "little")
            return "WEBP", w, h
        if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
            w, h = struct.unpack("<HH", head[26:30])
            return "WEBP", w & 0x3FFF, h & 0x3FFF
        if chunk == b"VP8L" and head[20:21] == b"\x2f":
            bits = int.from_bytes(head[21:25], "little")
            return "WEBP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        return None
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(head)
    return None


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(head: bytes) -> tuple[str, int, int] | None:
    i = 2
    while i + 9 < len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg_len = struct.unpack(">H", head[i + 2 : i + 4])[0]
        if marker in _SOF_MARKERS:
            h, w = struct.unpack(">HH", head[i + 5 : i + 9])
            return "JPEG", w, h
        i += 2 + seg_len
    return None  # SOF beyond the head (huge EXIF block): Pillow's lazy open reads it instead


def _too_large(path: str, w: int, h: int, limit: int) -> BadImageError:
    return BadImageError(path, "too-large", f"{w}x{h} = {w * h / 1e6:.1f} Mpx > limit {limit / 1e6:g} Mpx")


def probe_image(path: str | os.PathLike, max_pixels: int | None = None) -> ImageHeader:
    """Cheap header check: existence, size, format and dimensions, plus the end marker of PNG and JPEG files.

    Raises ``BadImageError`` for anything ``load_image`` would refuse before decoding (missing, zero-byte,
    not-an-image, too-large, ...) and ``truncated`` for a PNG/JPEG cut short: one whose tail lacks its end
    marker is decoded to confirm (so data after the marker is not mistaken for truncation). Other corruption
    inside the pixel data is only found by ``load_image``. Not used on the embedding path, which decodes anyway.
    """
    path = os.fspath(path)
    limit = _resolve_limit(max_pixels)
    size = _check_file(path)
    head = _read_head(path, 64 * 1024)
    quick = _header_size(head)
    if quick is not None:
        fmt, w, h = quick
        if limit and w * h > limit:
            raise _too_large(path, w, h, limit)
        if w == 0 or h == 0:
            raise BadImageError(path, "corrupt", f"{fmt} header says {w}x{h}")
        header = ImageHeader(path, fmt, w, h)
    else:
        with _LazyOpen(path, limit) as im:
            header = ImageHeader(path, im.format, im.width, im.height, im.mode)
    if not _tail_looks_complete(path, header.format, size, head):
        # A missing end marker is the sign of truncation, but not proof: some files carry data after it (an
        # appended video, a vendor trailer). Decoding is the only sure test, and only suspicious files pay for it.
        load_image(path, max_pixels=limit)
    return header


def _tail_looks_complete(path: str, fmt: str | None, size: int, head: bytes) -> bool:
    """Whether a PNG ends with its IEND chunk / a JPEG with EOI, ignoring zero/whitespace padding after it.

    Other formats: True. Reads only the last ``_TAIL_BYTES`` bytes (``head`` already holds them for small files).
    """
    if fmt not in ("PNG", "JPEG"):
        return True
    if size <= len(head):
        tail = head[-_TAIL_BYTES:]
    else:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, size - _TAIL_BYTES))
                tail = f.read(_TAIL_BYTES)
        except OSError as e:
            raise _io_error(path, e) from None
    tail = tail.rstrip(_TAIL_PADDING)
    return tail.endswith(_PNG_IEND if fmt == "PNG" else _JPEG_EOI)


class _LazyOpen:
    """Context manager around ``Image.open`` mapping its failures and checking the pixel limit.

    ``known``: (format, file size, first bytes) when our own header probe already recognised the file, so that a
    file Pillow cannot identify is reported as ``truncated``/``corrupt`` rather than ``not-an-image``.
    """

    def __init__(self, path: str, limit: int, known: tuple[str, int, bytes] | None = None) -> None:
        self.path = path
        self.limit = limit
        self.known = known
        self.im: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        path = self.path
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise BadImageError(path, "too-large", str(e)) from None
        except UnidentifiedImageError:
            if self.known is not None:
                # A valid PNG/JPEG/... header that Pillow still cannot open: the file was cut short or damaged.
                fmt, size, head = self.known
                cut = not _tail_looks_complete(path, fmt, size, head)
                raise BadImageError(path, "truncated" if cut else "corrupt", f"{fmt} header, unreadable body") from None
            raise BadImageError(path, "not-an-image", "no known image format") from None
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT, errno.EISDIR):
                raise _io_error(path, e) from None
            raise BadImageError(path, _decode_reason(e), str(e)) from None
        except (SyntaxError, ValueError, struct.error, EOFError, IndexError, TypeError) as e:
            raise BadImageError(path, "corrupt", f"{type(e).__name__}: {e}") from None
        self.im = im
        w, h = im.size
        if self.limit and w * h > self.limit:
            im.close()
            raise _too_large(path, w, h, self.limit)
        return im

    def __exit__(self, *exc: object) -> None:
        if self.im is not None:
            self.im.close()


def _decode_reason(e: BaseException) -> str:
    msg = str(e).lower()
    if "truncated" in msg or isinstance(e, EOFError) or "premature end" in msg:
        return "truncated"
    return "corrupt"


def _check_end_marker(path: str, fmt: str | None) -> None:
    """Only used when another library set ``LOAD_TRUNCATED_IMAGES``: a PNG must end with IEND, a JPEG with EOI."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            tail = f.read()
    except OSError as e:
        raise _io_error(path, e) from None
    if fmt == "PNG" and b"IEND" not in tail:
        raise BadImageError(path, "truncated", "PNG has no IEND chunk")
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise BadImageError(path, "truncated", "JPEG has no end-of-image marker")


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file to an 8-bit RGB ``PIL.Image``, or raise ``BadImageError`` with a stable reason.

    ``max_pixels``: refuse images with more pixels than this (checked from the header before decoding);
    default ``$ENCODERLAB_MAX_PIXELS`` or 64 Mpx; 0 disables the limit.
    """
    path = os.fspath(path)
    limit = _resolve_limit(max_pixels)
    size = _check_file(path)
    head = _read_head(path, 64 * 1024)
    quick = _header_size(head)
    if quick is not None and limit and quick[1] * quick[2] > limit:
        raise _too_large(path, quick[1], quick[2], limit)
    with _LazyOpen(path, limit, (quick[0], size, head) if quick is not None else None) as im:
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            _check_end_marker(path, im.format)
        try:
            im.load()
            oriented = _apply_exif_orientation(im)
            rgb = to_rgb(oriented)
            # The opened image is closed on exit (which frees its pixels), so never hand it out itself.
            return rgb.copy() if rgb is im else rgb
        except Image.DecompressionBombError as e:
            raise BadImageError(path, "too-large", str(e)) from None
        except BadImageError:
            raise
        except MemoryError:
            raise BadImageError(path, "too-large", "out of memory while decoding") from None
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EIO):
                raise _io_error(path, e) from None
            raise BadImageError(path, _decode_reason(e), str(e)) from None
        except (SyntaxError, ValueError, struct.error, EOFError, IndexError, TypeError, KeyError) as e:
            raise BadImageError(path, _decode_reason(e), f"{type(e).__name__}: {e}") from None


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    # A damaged EXIF block should not make an otherwise good image unusable: keep it unrotated.
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - any EXIF parsing failure means "no usable orientation"
        return im
    return out if out is not None else im


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha composited on white, 16/32-bit and float scaled to 0..255."""
    mode = im.mode
    if mode in ("RGB", "L", "1") and "transparency" in im.info:
        # tRNS in a PNG: one colour is transparent; Pillow honours it when converting to RGBA.
        return to_rgb(im.convert("RGBA"))
    if mode == "RGB":
        return im
    if mode == "P":
        has_alpha = "transparency" in im.info or im.palette is not None and im.palette.mode == "RGBA"
        with warnings.catch_warnings():
            # Pillow advises converting palette-with-transparency images to RGBA, which is what this line does.
            warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
            im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("RGBa", "La"):
        im = im.convert("RGBA" if mode == "RGBa" else "LA")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "1" or mode == "L":
        return im.convert("RGB")
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(im), mode), "L").convert("RGB")
    if mode in ("CMYK", "YCbCr", "RGBX", "HSV"):
        return im.convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        path = getattr(im, "filename", "") or "<image>"
        raise BadImageError(path, "corrupt", f"unsupported mode {mode}: {e}") from None


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale high-bit-depth grey to 8 bits by the type's range, so 16-bit white stays white (no clipping)."""
    if a.ndim == 3:
        a = a[..., 0]
    if mode.startswith("I;16"):
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if mode == "F":
        a = np.nan_to_num(a.astype(np.float64))
        hi = float(a.max()) if a.size else 0.0
        scale = 255.0 if hi <= 1.0 else 1.0
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    # Mode "I" (32-bit int) usually holds 16-bit samples (e.g. 16-bit TIFF/PNG in older Pillow): scale by the
    # 16-bit range when any value exceeds 8 bits, otherwise the data already is 8-bit.
    a = a.astype(np.int64)
    if a.size and a.max() > 255:
        return ((np.clip(a, 0, 65535) + 128) // 257).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
