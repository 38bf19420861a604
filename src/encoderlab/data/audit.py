"""Find the image files of a dataset that cannot be used, without embedding anything (`encoderlab data inspect`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ..errors import BadImageError
from ..progress import progress_bar
from .images import load_image, probe_image


def check_images(
    paths: Sequence[str | os.PathLike],
    *,
    decode: bool = False,
    max_pixels: int | None = None,
    progress: bool = True,
    workers: int = 4,
) -> list[dict[str, str]]:
    """``[{path, reason}]`` for every file that would be skipped.

    The default check (``probe_image``: format, dimensions, pixel limit, empty/missing/unreadable, and the PNG/JPEG
    end marker, so truncated files are found) reads a file's head and tail only; ``decode=True`` decodes every
    image and so also finds corrupt pixel data behind a valid header and tail. Results keep the order of ``paths``.
    """
    check = load_image if decode else probe_image

    def one(p: str | os.PathLike) -> dict[str, str] | None:
        try:
            check(p, max_pixels=max_pixels)
        except BadImageError as e:
            return {"path": e.path, "reason": e.reason}
        return None

    unique = list(dict.fromkeys(os.fspath(p) for p in paths))
    out: list[dict[str, str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            progress_bar(len(unique), "img", progress and bool(unique), "decode" if decode else "check",
                         leave=False) as bar:
        for r in pool.map(one, unique):
            if r:
                out.append(r)
            bar.update(1)
    return out
