"""``local:DIR`` for a model written by ``encoderlab align``: two frozen towers plus trained projection heads.

A directory holds ``encoderlab.json`` (kind "aligned": tower specs, head shape, learned temperature, the towers'
fingerprints and how it was trained) and ``heads.safetensors`` (``image.*`` / ``text.*`` head weights and the
exponentiated ``logit_scale``). The towers are rebuilt from their specs, so the directory stays small; a tower whose
weights or preprocessing changed since training is reported, because the heads were fit to its old features.

Because embeddings are ``head(tower(x))``, ``feature_source`` exposes (tower, head): extraction caches the tower
features once and derives this model's embeddings from them (and from any features cached before training).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..atomic import atomic_dir, atomic_write_bytes, atomic_write_json
from ..errors import EncoderlabError
from ..hashing import json_digest
from .base import Encoder, FeatureSource, Modality, state_dict_digest
from .local import register_local_kind

KIND = "aligned"
FORMAT_VERSION = 1
HEAD_KINDS = ("linear", "mlp")
CONFIG_NAME = "encoderlab.json"
WEIGHTS_NAME = "heads.safetensors"
TOWER_MODALITY: dict[str, Modality] = {"vision": "image", "text": "text"}


def build_head(kind: str, d_in: int, dim: int, device: torch.device | str | None = None) -> torch.nn.Module:
    """``linear``: one bias-free projection (LiT's choice); ``mlp``: Linear -> GELU -> Linear with a 2*dim hidden."""
    if kind == "linear":
        return torch.nn.Linear(d_in, dim, bias=False, device=device)
    if kind == "mlp":
        hidden = 2 * dim
        return torch.nn.Sequential(
            torch.nn.Linear(d_in, hidden, device=device), torch.nn.GELU(), torch.nn.Linear(hidden, dim, device=device)
        )
    raise EncoderlabError(f"unknown head {kind!r}", f"use one of {', '.join(HEAD_KINDS)}")


def tower_fingerprint(encoder: Encoder) -> str:
    """Weights + preprocessing of a tower, without precision, so a GPU bf16 reload of the same tower matches."""
    return json_digest(encoder.fingerprint_parts())


class HeadFn:
    """Tower embeddings -> projected embeddings, with the input normalization the head was trained with."""

    def __init__(self, head: torch.nn.Module, input_normalize: bool, device: torch.device) -> None:
        self.head = head
        self.input_normalize = input_normalize
        self.device = device

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = features.to(self.device, dtype=torch.float32)
            if self.input_normalize:
                x = F.normalize(x, dim=-1)
            return self.head(x).float().cpu()


# ---- the directory format ---------------------------------------------------------------------------------


def is_aligned_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds an encoderlab aligned model (its config names kind "aligned")."""
    cfg = Path(path) / CONFIG_NAME
    try:
        return json.loads(cfg.read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(path: str | os.PathLike) -> None:
    """Refuse to write over a directory that holds anything but an aligned model (it would be replaced whole)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise EncoderlabError(f"output path {str(out)!r} is a file", "pass a directory path for the aligned model")
    if out.is_dir() and any(out.iterdir()) and not is_aligned_dir(out):
        raise EncoderlabError(
            f"output directory {str(out)!r} is not empty and is not an encoderlab aligned model",
            "pass a new or empty directory (an existing aligned model directory is replaced)",
        )


def portable_spec(spec: str, model_dir: Path) -> str:
    """A relative ``local:`` tower spec rewritten relative to the model directory, so the pair can move together."""
    prefix, sep, target = spec.partition(":")
    if prefix != "local" or not sep or Path(target).expanduser().is_absolute():
        return spec
    return "local:" + os.path.relpath(Path(target).resolve(), model_dir.resolve())


def resolve_spec(spec: str, model_dir: Path) -> str:
    """Inverse of ``portable_spec``: relative ``local:`` paths are relative to the model directory."""
    prefix, sep, target = spec.partition(":")
    if prefix != "local" or not sep or Path(target).expanduser().is_absolute():
        return spec
    return "local:" + os.path.normpath(model_dir / target)


def save_aligned(out_dir: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                 extra_json: Mapping[str, Any] | None = None) -> Path:
    """Write config + weights (+ ``extra_json`` files: name -> JSON document) into ``out_dir`` atomically.

    A reader never sees a half-written model; a previous aligned model at ``out_dir`` is swapped out, then removed.
    """
    from safetensors.torch import save as st_save

    out = Path(out_dir)
    check_output_dir(out)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    with atomic_dir(out) as tmp:
        atomic_write_bytes(tmp / WEIGHTS_NAME, st_save(weights, metadata={"format": "pt", "kind": KIND}))
        atomic_write_json(tmp / CONFIG_NAME, config)
        for name, doc in (extra_json or {}).items():
            atomic_write_json(tmp / name, doc)
    return out


def load_heads(path: str | os.PathLike, config: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    """The saved heads of an aligned model (eval mode, frozen, CPU), built from the dims its config records."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path) / WEIGHTS_NAME))
    heads: dict[str, torch.nn.Module] = {}
    for modality, d_in in config["input_dims"].items():
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(modality + ".")}
        head = build_head(config["head"], int(d_in), int(config["dim"]), device="meta")  # no random init
        head.load_state_dict(state, assign=True)
        heads[modality] = head.eval().requires_grad_(False)
    return heads


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The aligned model's config, checked for kind and format version."""
    cfg_path = Path(path) / CONFIG_NAME
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise EncoderlabError(f"cannot read {cfg_path} ({e})", "point local: at a directory written by align") from e
    if cfg.get("kind") != KIND:
        raise EncoderlabError(f"{cfg_path} is not an aligned model (kind {cfg.get('kind')!r})")
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
        raise EncoderlabError(
            f"{cfg_path} has format_version {cfg.get('format_version')}, newer than this encoderlab reads "
            f"({FORMAT_VERSION})",
            "upgrade encoderlab",
        )
    return cfg


# ---- the encoder ------------------------------------------------------------------------------------------


class AlignedDualEncoder(Encoder):
    """A dual encoder made of two frozen towers and the projection heads ``align`` trained on their features."""

    score_kind = "softmax"

    def __init__(
        self, path: str | os.PathLike, *, device: torch.device, precision: str, strict: bool = False
    ) -> None:
        """``strict``: a tower whose fingerprint differs from the recorded one is an error instead of a warning."""
        from safetensors.torch import load_file

        from .registry import create_encoder

        self.path = Path(path)
        self.config = cfg = read_config(self.path)
        self.spec = f"local:{self.path}"
        self.modalities = ("image", "text")
        self.embed_dim = int(cfg["dim"])
        self.logit_scale = float(cfg["logit_scale"])
        self.device, self.precision = device, precision
        self.input_normalize = bool(cfg.get("input_normalize", True))
        tensors = load_file(str(self.path / WEIGHTS_NAME))
        self.towers: dict[str, Encoder] = {}
        self.heads: dict[str, torch.nn.Module] = {}
        for role, modality in TOWER_MODALITY.items():
            tower = create_encoder(resolve_spec(cfg[role], self.path), device=str(device), precision=precision)
            tower.check_modality(modality)
            self._check_tower(role, modality, tower, strict)
            state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(modality + ".")}
            # Built on the meta device and filled by assignment: no random init, no use of the global RNG.
            head = build_head(cfg["head"], tower.embed_dim, self.embed_dim, device="meta")
            try:
                head.load_state_dict(state, assign=True)
            except RuntimeError as e:
                raise EncoderlabError(
                    f"{self.path / WEIGHTS_NAME} does not fit a {cfg['head']} head from {tower.embed_dim} to "
                    f"{self.embed_dim} dims for the {modality} tower {cfg[role]!r} ({str(e).splitlines()[0]})",
                    "the tower differs from the one trained on; retrain with align",
                ) from e
            self.towers[modality] = tower
            self.heads[modality] = head.to(device).eval().requires_grad_(False)
        self.head_fns = {m: HeadFn(h, self.input_normalize, device) for m, h in self.heads.items()}
        self.preferred_batch_size = self.towers["image"].preferred_batch_size
        self.text_max_length = self.towers["text"].text_max_length
        self._heads_digest = state_dict_digest(torch.nn.ModuleDict(self.heads))

    def _check_tower(self, role: str, modality: str, tower: Encoder, strict: bool) -> None:
        want = (self.config.get("tower_fingerprints") or {}).get(modality)
        have = tower_fingerprint(tower)
        if want is None or want == have:
            return
        message = (
            f"aligned model {str(self.path)!r}: the {modality} tower {self.config[role]!r} is not the one its heads "
            f"were trained on (fingerprint {have}, recorded {want}); its embeddings will not match the heads"
        )
        fix = "install the tower weights it was trained with, or retrain with align on the current tower"
        if strict:
            raise EncoderlabError(message, fix)
        warnings.warn(f"{message} ({fix})", UserWarning, stacklevel=3)

    def fingerprint_parts(self) -> dict[str, Any]:
        return {
            "adapter": KIND,
            "format_version": int(self.config.get("format_version", FORMAT_VERSION)),
            "towers": {m: t.fingerprint(m) for m, t in self.towers.items()},  # type: ignore[arg-type]
            "heads": self._heads_digest,
            "head": self.config["head"],
            "dim": self.embed_dim,
            "input_normalize": self.input_normalize,
        }

    def feature_source(self, modality: Modality) -> FeatureSource:
        self.check_modality(modality)
        return FeatureSource(self.towers[modality], self.head_fns[modality])

    def image_transform(self) -> Any:
        return self.towers["image"].image_transform()

    def encode_pixels(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.head_fns["image"](self.towers["image"].encode_pixels(pixel_values))
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        return self.head_fns["text"](self.towers["text"].encode_text_batch(texts))


def load_aligned(path: str | os.PathLike, *, device: torch.device, precision: str) -> Encoder:
    """``local:DIR`` loader for kind "aligned"."""
    return AlignedDualEncoder(path, device=device, precision=precision)


register_local_kind(KIND, load_aligned, description="two frozen towers + projection heads trained by align")
