"""``local:DIR`` for a model written by ``encoderlab align``: two frozen towers plus trained projection heads.

A directory holds ``encoderlab.json`` (kind "aligned": tower specs, head shape, learned temperature, the towers'
fingerprints and how it was trained), ``heads.safetensors`` (``image.*`` / ``text.*`` head weights and the
exponentiated ``logit_scale``), ``training_items.json.gz`` (content keys of the train and val images and captions, so
an evaluation can tell when it scores items the heads were fit or selected on), ``request.json`` (what it was
trained from, for reuse) and, from the CLI, ``eval/`` (its test retrieval). Those are ``MODEL_FILES``; anything else
in the directory is the user's and survives retraining. The towers are rebuilt from their specs, so the directory
stays small; a tower whose weights or preprocessing changed since training is reported, because the heads were fit
to its old features.

Because embeddings are ``head(tower(x))``, ``feature_source`` exposes (tower, head): extraction caches the tower
features once and derives this model's embeddings from them (and from any features cached before training).
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..atomic import atomic_write_bytes, atomic_write_json, interrupted_saves, replace_entries
from ..errors import EncoderlabError
from ..hashing import json_digest
from .aligned_training import TrainablePair
from .base import Encoder, FeatureSource, Modality, TrainingItems, state_dict_digest
from .local import read_model_config, register_local_kind

KIND = "aligned"
FORMAT_VERSION = 1
HEAD_KINDS = ("linear", "mlp")
CONFIG_NAME = "encoderlab.json"
WEIGHTS_NAME = "heads.safetensors"
TRAINING_ITEMS_NAME = "training_items.json.gz"
REQUEST_NAME = "request.json"  # digest of what the model was trained from (``train.align.request_digest``)
EVAL_NAME = "eval"  # the run directory ``encoderlab align`` writes the model's test retrieval to
#: every entry an aligned model directory owns: replaced together on retraining; all other entries are kept
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, TRAINING_ITEMS_NAME, REQUEST_NAME, EVAL_NAME)
TRAINING_ITEMS_FORMAT = 1
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
    """Refuse a non-empty directory that is not an aligned model: it is someone's, not a model to retrain.

    An existing aligned model is fine: retraining replaces its ``MODEL_FILES`` and keeps every other entry.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise EncoderlabError(f"output path {str(out)!r} is a file", "pass a directory path for the aligned model")
    if out.is_dir() and not is_aligned_dir(out):
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise EncoderlabError(
                f"output directory {str(out)!r} is not empty ({shown}) and is not an encoderlab aligned model"
                + _interrupted_hint(out),
                "pass a new or empty directory (in an existing aligned model directory only the model's own files "
                "are replaced)",
            )


def _interrupted_hint(out: Path) -> str:
    """Where a save killed mid-swap left the previous model, for messages about a directory without a config."""
    left = interrupted_saves(out)
    if not left:
        return ""
    return (f"; a save into it was interrupted and the previous model's files are in {str(left[-1])!r} "
            f"(move them back into {str(out)!r} to restore it)")


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
                 extra_json: Mapping[str, Any] | None = None, training_items: TrainingItems | None = None) -> Path:
    """Write config + weights (+ ``extra_json``: name -> JSON document, + the training items) into ``out_dir``.

    The files are written into a temporary sibling, then swapped in (``atomic.replace_entries``): a reader never
    sees a half-written model, a previous aligned model's ``MODEL_FILES`` are replaced (its ``eval/`` too, which
    scored the old heads), and every other entry of ``out_dir`` is kept.
    """
    from safetensors.torch import save as st_save

    out = Path(out_dir)
    check_output_dir(out)
    unknown = [name for name in (extra_json or {}) if name not in MODEL_FILES]
    if unknown:
        raise ValueError(f"save_aligned: {unknown} are not aligned-model files (add them to MODEL_FILES)")
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    with replace_entries(out, MODEL_FILES, commit=CONFIG_NAME) as tmp:
        atomic_write_bytes(tmp / WEIGHTS_NAME, st_save(weights, metadata={"format": "pt", "kind": KIND}))
        if training_items is not None:
            atomic_write_bytes(tmp / TRAINING_ITEMS_NAME, encode_training_items(training_items))
        for name, doc in (extra_json or {}).items():
            atomic_write_json(tmp / name, doc)
        atomic_write_json(tmp / CONFIG_NAME, config)
    return out


def encode_training_items(items: TrainingItems) -> bytes:
    """``training_items.json.gz``: sorted keys per split and modality, gzip'd JSON (deterministic bytes)."""
    doc = {
        "format_version": TRAINING_ITEMS_FORMAT,
        "source": items.source,
        **{split: {m: sorted(keys) for m, keys in sorted(getattr(items, split).items())} for split in ("train", "val")},
    }
    return gzip.compress(json.dumps(doc, sort_keys=True).encode("utf-8"), mtime=0)


def read_training_items(path: str | os.PathLike) -> TrainingItems | None:
    """The training items recorded in an aligned model directory; None for a model saved before they were."""
    file = Path(path) / TRAINING_ITEMS_NAME
    if not file.exists():
        return None
    try:
        doc = json.loads(gzip.decompress(file.read_bytes()))
        if int(doc.get("format_version", 0)) > TRAINING_ITEMS_FORMAT:
            raise EncoderlabError(f"{file} has format_version {doc.get('format_version')}, newer than this "
                                  f"encoderlab reads ({TRAINING_ITEMS_FORMAT})", "upgrade encoderlab")
        splits = {split: {str(m): frozenset(map(str, keys)) for m, keys in doc[split].items()}
                  for split in ("train", "val")}
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise EncoderlabError(f"{file} is truncated or damaged ({e})",
                              "retrain the model with align --force (the heads are fine, this record is not)") from e
    return TrainingItems(train=splits["train"], val=splits["val"], source=str(doc.get("source", "")))


def load_head_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``heads.safetensors``; a truncated or damaged file is named, with the fix."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS_NAME
    try:
        return load_file(str(file))
    except SafetensorError as e:
        raise EncoderlabError(f"weights file {file} is truncated or damaged ({e})",
                              "retrain the aligned model with align --force, or copy the model directory again") from e
    except FileNotFoundError as e:
        raise EncoderlabError(f"aligned model {str(Path(path))!r} has no {WEIGHTS_NAME}",
                              "retrain it with align --force, or copy the model directory again") from e


def load_heads(path: str | os.PathLike, config: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    """The saved heads of an aligned model (eval mode, frozen, CPU), built from the dims its config records."""
    tensors = load_head_tensors(path)
    heads: dict[str, torch.nn.Module] = {}
    for modality, d_in in config["input_dims"].items():
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(modality + ".")}
        head = build_head(config["head"], int(d_in), int(config["dim"]), device="meta")  # no random init
        head.load_state_dict(state, assign=True)
        heads[modality] = head.eval().requires_grad_(False)
    return heads


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The aligned model's config, checked for kind and format version."""
    return read_model_config(path, KIND, "an aligned model", "align", FORMAT_VERSION)


# ---- the encoder ------------------------------------------------------------------------------------------


class AlignedDualEncoder(TrainablePair, Encoder):
    """A dual encoder made of two frozen towers and the projection heads ``align`` trained on their features.

    Trainable as a whole when both towers are (``aligned_training``): ``finetune`` can go past the heads.
    """

    score_kind = "softmax"

    def __init__(
        self, path: str | os.PathLike, *, device: torch.device, precision: str, strict: bool = False
    ) -> None:
        """``strict``: a tower whose fingerprint differs from the recorded one is an error instead of a warning."""
        from .registry import create_encoder

        self.path = Path(path)
        self.config = cfg = read_config(self.path)
        self.spec = f"local:{self.path}"
        self.modalities = ("image", "text")
        self.embed_dim = int(cfg["dim"])
        self.logit_scale = float(cfg["logit_scale"])
        self.device, self.precision = device, precision
        self.input_normalize = bool(cfg.get("input_normalize", True))
        tensors = load_head_tensors(self.path)
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
            "heads": self.heads_digest(),
            "head": self.config["head"],
            "dim": self.embed_dim,
            "input_normalize": self.input_normalize,
        }

    def training_items(self) -> TrainingItems | None:
        """The train / val image and caption keys the heads were fit and selected on (None: saved before they were).

        Read on first use, not at load: most uses of the encoder never ask.
        """
        if not hasattr(self, "_training_items"):
            self._training_items = read_training_items(self.path)
        return self._training_items

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
