"""``local:DIR`` — a model directory on disk.

A directory saved by transformers (``config.json``) loads through the ``hf:`` adapter, so ``local:`` and ``hf:`` agree
on the same directory. Directories written by encoderlab itself (``encoderlab.json``) are dispatched to the adapter
named in that file: every such kind registers a loader with ``register_local_kind`` (aligned heads today;
fine-tuned and prompt-learned models the same way).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import EncoderlabError
from ..registry import Registry
from .base import Encoder
from .registry import register_prefix

LocalLoader = Callable[..., Encoder]  # loader(path: Path, *, device: torch.device, precision: str) -> Encoder


@dataclass(frozen=True)
class LocalKind:
    """How to load one kind of encoderlab model directory."""

    name: str
    loader: LocalLoader
    description: str


#: kind name in ``encoderlab.json`` -> its loader; the builtin kinds register when their module is imported
LOCAL_KINDS: Registry[LocalKind] = Registry(
    "saved model kind",
    builtins=("encoderlab.encoders.aligned", "encoderlab.encoders.prompted", "encoderlab.encoders.finetuned"))


def register_local_kind(kind: str, loader: LocalLoader, *, description: str) -> LocalKind:
    """Make directories whose ``encoderlab.json`` names ``kind`` load as ``local:DIR`` through ``loader``."""
    return LOCAL_KINDS.register(kind, LocalKind(kind, loader, description))


def read_model_config(path: str | os.PathLike, kind: str, what: str, made_by: str,
                      format_version: int) -> dict[str, Any]:
    """The ``encoderlab.json`` of a saved model of ``kind``, checked for kind and format version.

    ``what`` names the kind in messages ("an aligned model"), ``made_by`` the command that writes it ("align").
    """
    cfg_path = Path(path) / "encoderlab.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise EncoderlabError(f"cannot read {cfg_path} ({e})",
                              f"point local: at a directory written by {made_by}") from e
    if not isinstance(cfg, dict) or cfg.get("kind") != kind:
        found = cfg.get("kind") if isinstance(cfg, dict) else None
        raise EncoderlabError(f"{cfg_path} is not {what} (kind {found!r})",
                              f"point local: at a directory written by {made_by}")
    if int(cfg.get("format_version", 0)) > format_version:
        raise EncoderlabError(f"{cfg_path} has format_version {cfg.get('format_version')}, newer than this "
                              f"encoderlab reads ({format_version})", "upgrade encoderlab")
    return cfg


def rebuild_base(path: Path, cfg: dict[str, Any], *, device: torch.device, precision: str, what: str,
                 command: str) -> Encoder:
    """The base encoder a saved model (prompt context, fine-tuned weights) was trained from, rebuilt from its spec.

    A base whose fingerprint differs from the recorded one is loaded with a warning (``what`` names the saved model in
    it, ``command`` the command that retrains it): the saved weights were fit to the old base.
    """
    from .aligned import resolve_spec, tower_fingerprint
    from .registry import create_encoder

    base = create_encoder(resolve_spec(cfg["base"], path), device=str(device), precision=precision)
    if tower_fingerprint(base) != cfg.get("base_fingerprint"):
        warnings.warn(f"{what} {str(path)!r}: the base encoder {cfg['base']!r} is not the one it was trained from "
                      f"(its fingerprint changed); the saved weights may not fit it (retrain with encoderlab "
                      f"{command})", UserWarning, stacklevel=4)
    return base


def load_local(target: str, *, device: torch.device, precision: str) -> Encoder:
    """``local:DIR``: an encoderlab model directory by its kind, or a transformers directory through ``hf:``."""
    path = Path(target).expanduser()
    if not path.is_dir():
        raise EncoderlabError(f"local model directory {str(path)!r} does not exist", "pass a directory path")
    own = path / "encoderlab.json"
    if own.exists():
        try:
            kind = json.loads(own.read_text()).get("kind")
        except (OSError, ValueError, AttributeError) as e:
            raise EncoderlabError(f"{own} is truncated or damaged ({e})",
                                  "save or copy the model directory again (align --force retrains an aligned model)"
                                  ) from e
        if not isinstance(kind, str) or kind not in LOCAL_KINDS:
            raise EncoderlabError(
                f"{own} names model kind {kind!r}, which this encoderlab does not know",
                f"known kinds: {', '.join(LOCAL_KINDS.names()) or 'none'}; upgrade encoderlab",
            )
        return LOCAL_KINDS.get(kind).loader(path, device=device, precision=precision)
    if (path / "config.json").exists():
        from .hf import load_hf

        return load_hf(str(path), device=device, precision=precision)
    from ..atomic import interrupted_saves

    left = interrupted_saves(path)
    if left:  # a save killed mid-swap (atomic.replace_entries): the previous model's files are next to it
        raise EncoderlabError(
            f"{str(path)!r} holds no encoderlab.json: a save into it was interrupted, and the previous model's "
            f"files are in {str(left[-1])!r}",
            f"move the files of {str(left[-1])!r} back into {str(path)!r}, or train the model again",
        )
    raise EncoderlabError(
        f"{str(path)!r} holds neither encoderlab.json nor a transformers config.json",
        "point local: at a directory saved by encoderlab or by transformers' save_pretrained",
    )


register_prefix("local", load_local, "a model directory on disk (saved by encoderlab or transformers)")
