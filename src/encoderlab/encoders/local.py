"""``local:DIR`` — a model directory on disk.

A directory saved by transformers (``config.json``) loads through the ``hf:`` adapter, so ``local:`` and ``hf:`` agree
on the same directory. Directories written by encoderlab itself (``encoderlab.json``) are dispatched to the adapter
named in that file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import EncoderlabError
from .base import Encoder
from .registry import register_prefix

#: kind name in ``encoderlab.json`` -> loader(path, device, precision)
LOCAL_KINDS: dict[str, object] = {}


def load_local(target: str, *, device: torch.device, precision: str) -> Encoder:
    path = Path(target).expanduser()
    if not path.is_dir():
        raise EncoderlabError(f"local model directory {str(path)!r} does not exist", "pass a directory path")
    own = path / "encoderlab.json"
    if own.exists():
        kind = json.loads(own.read_text()).get("kind")
        loader = LOCAL_KINDS.get(kind)
        if loader is None:
            raise EncoderlabError(
                f"{own} names model kind {kind!r}, which this encoderlab does not know",
                f"known kinds: {', '.join(sorted(LOCAL_KINDS)) or 'none'}; upgrade encoderlab",
            )
        return loader(path, device=device, precision=precision)  # type: ignore[operator]
    if (path / "config.json").exists():
        from .hf import load_hf

        return load_hf(str(path), device=device, precision=precision)
    raise EncoderlabError(
        f"{str(path)!r} holds neither encoderlab.json nor a transformers config.json",
        "point local: at a directory saved by encoderlab or by transformers' save_pretrained",
    )


register_prefix("local", load_local, "a model directory on disk (saved by encoderlab or transformers)")
