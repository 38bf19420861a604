"""Prompted text towers (CoOp, Zhou et al. 2022) and ``local:DIR`` for a saved learned prompt context.

CoOp replaces the hand-written words of a prompt ("a photo of a") by ``n_ctx`` learned vectors in the text tower's
input-embedding space, placed before, around or after the class-name tokens; the tower itself stays frozen. One
"prompted text forward" per family runs the tower from input embeddings with the family's own rules:

- CLIP (``hf:``): position embeddings, causal mask + attention mask, final norm, the state at the end-of-text
  token (whose position shifts by ``n_ctx``), ``text_projection``;
- SigLIP (``hf:``): padded to ``max_length`` with no attention mask, as its tokenizer and training do; the head
  reads the last position;
- ALIGN (``hf:``) and aligned pairs (``local:``) with a BERT-family text tower: the context goes after [CLS];
  ALIGN pools [CLS]; an aligned pair pools as its tower does (MiniLM: the mean over the attention mask, context
  positions included, exactly as a written phrase's tokens would be) and applies its projection head.

With the context set to the token embeddings of a real phrase, every prompted forward equals the plain
``encode_texts`` of "phrase classname." (tested to 1e-5 per family).

A saved context (``encoderlab coop --out DIR``) holds ``context.safetensors`` and ``encoderlab.json`` (kind
"prompted": base encoder spec and fingerprint, n_ctx, class-token position, csc, class names, training record).
It loads as ``local:DIR``: a dual encoder whose images are the base's, and whose texts map as follows (the
inference contract):

1. a text that is a saved class name or label, or a packaged template (clip80, simple, name) filled with one, gets
   that class's learned prompt — so ``encoderlab zeroshot --encoder local:DIR`` with any packaged ``--templates``
   classifies with the learned prompts (an ensemble of identical prompts is that prompt);
2. any other text with a unified context is put in the class-name slot ("[CTX] text."), CoOp's transfer to new
   class names; with class-specific contexts (``csc``) there is no context for it, which is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..atomic import atomic_write_bytes, atomic_write_json, replace_entries
from ..errors import EncoderlabError
from ..hashing import bytes_digest, json_digest
from .base import Encoder, FeatureSource, Modality, TrainingItems, inference_context
from .local import read_model_config, rebuild_base, register_local_kind

KIND = "prompted"
FORMAT_VERSION = 1
CONFIG_NAME = "encoderlab.json"
CONTEXT_NAME = "context.safetensors"
TRAINING_ITEMS_NAME = "training_items.json.gz"  # same format as an aligned model's (aligned.encode_training_items)
EVAL_NAME = "eval"  # the run directory ``encoderlab coop --out`` writes the few-shot results to
#: every entry a prompt-context directory owns: replaced together on retraining; all other entries are kept
MODEL_FILES = (CONFIG_NAME, CONTEXT_NAME, TRAINING_ITEMS_NAME, EVAL_NAME)
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
#: what a prompt ends with after the class name, as in CoOp's "X X X X classname."
PERIOD = "."


@dataclass(frozen=True)
class PromptLayout:
    """Token ids of one prompt per class with placeholder slots for the context, and where to pool.

    ``ids`` [C, L]; ``attention_mask`` [C, L] or None (SigLIP); ``ctx_index`` [C, n_ctx] positions of the context
    slots; ``pool_index`` [C] the position a pooling-by-token family reads (CLIP: end-of-text; SigLIP: last).
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor | None
    ctx_index: torch.Tensor
    pool_index: torch.Tensor


class PromptedTextTower:
    """The shared interface of the prompted text forwards: layout, phrase embeddings, features from a context.

    Not an ``nn.Module`` on purpose: a trainer's module holds only the context, so its ``state_dict`` (copied by
    the training loop at every better epoch) never includes the frozen tower.
    """

    family = ""
    #: "longest" (CLIP, BERT: trimmed to the longest prompt) or "max_length" (SigLIP, as it was trained)
    padding = "longest"
    #: whether the tower reads an attention mask (SigLIP does not)
    uses_mask = True

    def __init__(self, encoder: Encoder, model: torch.nn.Module, tokenizer: Any, max_length: int | None,
                 token_embedding: torch.nn.Embedding) -> None:
        self.encoder = encoder
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.token_embedding = token_embedding
        self.device = encoder.device
        self.width = int(token_embedding.weight.shape[1])

    # ---- tokens --------------------------------------------------------------------------------------------
    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special, truncation=False)["input_ids"])

    def phrase_ids(self, phrase: str) -> list[int]:
        """The token ids of ``phrase`` without special tokens (what ``--ctx-init`` initialises the context from)."""
        return self._ids(phrase, False)

    def phrase_embeddings(self, phrase: str) -> torch.Tensor:
        """Input embeddings [n, width] of ``phrase``'s tokens (the CoOp initialisation from a phrase)."""
        ids = torch.tensor(self.phrase_ids(phrase), dtype=torch.long, device=self.token_embedding.weight.device)
        with torch.no_grad():
            return self.token_embedding(ids).detach().float().cpu()

    def _specials(self, body: str) -> tuple[list[int], list[int], list[int]]:
        """(leading special ids, body ids, trailing special ids) of ``body`` as the tokenizer frames it."""
        full, plain = self._ids(body, True), self._ids(body, False)
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], plain, full[start + len(plain) :]
        raise EncoderlabError(f"the tokenizer of {self.encoder.spec!r} frames {body!r} in a way prompts cannot "
                              "follow", "use another encoder for coop; please report it")

    def prompt_ids(self, name: str, n_ctx: int, position: str) -> tuple[list[int], list[int]]:
        """(token ids with placeholder slots, positions of the slots) of one class prompt (CoOp's layouts).

        end: "[CTX] name."; front: "name [CTX]."; middle: "[CTX/2] name [CTX/2]." (the first half rounded down).
        """
        body_text = name.rstrip() if name.rstrip().endswith(PERIOD) else name.rstrip() + PERIOD
        lead, body, trail = self._specials(body_text)
        name_ids = self._ids(name.rstrip().removesuffix(PERIOD), False)
        rest = body[len(name_ids):] if body[: len(name_ids)] == name_ids else self._ids(PERIOD, False)
        slot = self.placeholder_id()
        before = {"end": n_ctx, "front": 0}.get(position, n_ctx // 2)  # context slots ahead of the name
        after = n_ctx - before
        if position == "end":
            ids = lead + [slot] * n_ctx + body + trail
        else:
            ids = lead + [slot] * before + name_ids + [slot] * after + rest + trail
        first = len(lead) + before + len(name_ids)  # where the slots after the name start
        slots = list(range(len(lead), len(lead) + before)) + list(range(first, first + after))
        return ids, slots

    def placeholder_id(self) -> int:
        """Any id: the context slots' token embeddings are replaced before the tower runs."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def layout(self, names: Sequence[str], n_ctx: int, position: str) -> PromptLayout:
        """One prompt per name, padded as the family pads; a prompt longer than the context window is an error."""
        if position not in CLASS_TOKEN_POSITIONS:
            raise EncoderlabError(f"unknown class-token position {position!r}",
                                  f"use one of {', '.join(CLASS_TOKEN_POSITIONS)}")
        rows = [self.prompt_ids(n, n_ctx, position) for n in names]
        longest = max(len(ids) for ids, _ in rows)
        if self.max_length is not None and longest > self.max_length:
            name = names[max(range(len(rows)), key=lambda i: len(rows[i][0]))]
            raise EncoderlabError(
                f"the prompt of {name!r} with {n_ctx} context vectors is {longest} tokens, longer than the "
                f"{self.max_length}-token context window of {self.encoder.spec!r}",
                "use a smaller --n-ctx (or a shorter --ctx-init phrase)")
        length = self.max_length if self.padding == "max_length" and self.max_length else longest
        pad = self.placeholder_id()
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (row, _) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        ctx_index = torch.tensor([slots for _, slots in rows], dtype=torch.long).reshape(len(rows), n_ctx)
        pool = torch.tensor([self.pool_position(row, slots, length) for row, slots in rows], dtype=torch.long)
        return PromptLayout(ids, mask if self.uses_mask else None, ctx_index, pool)

    def pool_position(self, ids: list[int], slots: list[int], length: int) -> int:
        """The position a pooling-by-token family reads: the last real token by default."""
        return len(ids) - 1

    # ---- forward -------------------------------------------------------------------------------------------
    def features(self, layout: PromptLayout, ctx: torch.Tensor) -> torch.Tensor:
        """Projected text features [C, dim] of the prompts with ``ctx`` ([1 or C, n_ctx, width]) in their slots.

        Runs with gradients when the caller does (training), so they flow through the frozen tower to ``ctx``.
        """
        ids = layout.ids.to(self.device)
        embeds = self.token_embedding(ids)
        ctx = ctx.to(self.device, embeds.dtype).expand(ids.shape[0], -1, -1)
        index = layout.ctx_index.to(self.device)[..., None].expand(-1, -1, embeds.shape[-1])
        embeds = embeds.scatter(1, index, ctx)
        mask = layout.attention_mask.to(self.device) if layout.attention_mask is not None else None
        return self._encode(embeds, mask, layout.pool_index.to(self.device))

    def _encode(self, embeds: torch.Tensor, mask: torch.Tensor | None, pool: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - each family implements it


def _mask_fn(module: torch.nn.Module, name: str) -> Any:
    """The mask builder the model's own module uses (transformers 5: ``create_causal_mask`` and friends)."""
    import sys

    return getattr(sys.modules.get(type(module).__module__), name, None)


def _additive_mask(mask: torch.Tensor | None, length: int, causal: bool, dtype: torch.dtype,
                   device: torch.device, batch: int) -> torch.Tensor:
    """A [B, 1, L, L] additive float mask (fallback when the model module has no mask builder)."""
    allowed = torch.ones(batch, 1, length, length, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if mask is not None:
        allowed = allowed & mask[:, None, None, :].bool()
    out = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)


class ClipTower(PromptedTextTower):
    """CLIP: causal tower, positions added to the input embeddings, pooled at the end-of-text token."""

    family = "clip"

    def pool_position(self, ids: list[int], slots: list[int], length: int) -> int:
        """CLIP's own rule on the real tokens (context slots skipped): the first ``eos_token_id``, or the highest id
        for configs from before transformers PR #24773 (``eos_token_id == 2``)."""
        eos = getattr(self.model.text_model.config, "eos_token_id", None)
        real = [(i, t) for i, t in enumerate(ids) if i not in set(slots)]
        if eos == 2 or eos is None:
            return max(real, key=lambda it: (it[1], -it[0]))[0]
        return next((i for i, t in real if t == eos), len(ids) - 1)

    def _encode(self, embeds: torch.Tensor, mask: torch.Tensor | None, pool: torch.Tensor) -> torch.Tensor:
        tm = self.model.text_model
        hidden = tm.embeddings(inputs_embeds=embeds)
        build = _mask_fn(tm, "create_causal_mask")
        if build is not None:
            attn = build(config=tm.config, inputs_embeds=hidden, attention_mask=mask, cache=None)
        else:
            attn = _additive_mask(mask, hidden.shape[1], True, hidden.dtype, hidden.device, hidden.shape[0])
        out = tm.encoder(inputs_embeds=hidden, attention_mask=attn, is_causal=True).last_hidden_state
        out = tm.final_layer_norm(out)
        pooled = out[torch.arange(out.shape[0], device=out.device), pool]
        return self.model.text_projection(pooled)


class SiglipTower(PromptedTextTower):
    """SigLIP: bidirectional, padded to ``max_length``, no attention mask, the head on the last position."""

    family = "siglip"
    padding = "max_length"
    uses_mask = False

    def pool_position(self, ids: list[int], slots: list[int], length: int) -> int:
        return length - 1  # SigLIP reads the last position, whatever it holds (usually padding)

    def _encode(self, embeds: torch.Tensor, mask: torch.Tensor | None, pool: torch.Tensor) -> torch.Tensor:
        tm = self.model.text_model
        hidden = tm.embeddings(inputs_embeds=embeds)
        build = _mask_fn(tm, "create_bidirectional_mask")
        attn = build(config=tm.config, inputs_embeds=hidden, attention_mask=None) if build is not None else None
        out = tm.encoder(inputs_embeds=hidden, attention_mask=attn).last_hidden_state
        out = tm.final_layer_norm(out)
        return tm.head(out[torch.arange(out.shape[0], device=out.device), pool])


class AlignTower(PromptedTextTower):
    """ALIGN: a BERT text tower run from input embeddings, [CLS] pooled, ``text_projection``."""

    family = "align"

    def _encode(self, embeds: torch.Tensor, mask: torch.Tensor | None, pool: torch.Tensor) -> torch.Tensor:
        out = self.model.text_model(inputs_embeds=embeds, attention_mask=mask,
                                    token_type_ids=torch.zeros_like(mask)).last_hidden_state
        return self.model.text_projection(out[:, 0, :])


class AlignedBertTower(PromptedTextTower):
    """An aligned pair's BERT-family text tower (hf-text / minilm-l6), pooled as the tower pools, then its head."""

    family = "aligned-bert"

    def __init__(self, encoder: Encoder, tower: Any, head: torch.nn.Module, input_normalize: bool) -> None:
        super().__init__(encoder, tower.model, tower.tokenization.tokenizer, tower.tokenization.max_length,
                         tower.model.get_input_embeddings())
        self.pool, self.head, self.input_normalize = tower.pool, head, input_normalize
        self.device = tower.device

    def _encode(self, embeds: torch.Tensor, mask: torch.Tensor | None, pool: torch.Tensor) -> torch.Tensor:
        from .hf import pool_text_output

        assert mask is not None
        hidden = self.model(inputs_embeds=embeds, attention_mask=mask,
                            token_type_ids=torch.zeros_like(mask)).last_hidden_state
        # mean pooling counts the context positions, as it counts a written phrase's tokens
        x = pool_text_output(hidden, mask, self.pool).float()
        if self.input_normalize:
            x = F.normalize(x, dim=-1)
        return self.head(x.to(next(self.head.parameters()).device))


def prompted_tower(encoder: Encoder) -> PromptedTextTower:
    """The prompted text forward of ``encoder``; an encoder whose text tower cannot host a context is an error."""
    from .aligned import AlignedDualEncoder
    from .hf import HFDualEncoder, HFTextEncoder

    if "image" not in encoder.modalities or "text" not in encoder.modalities:
        raise EncoderlabError(
            f"coop needs a dual encoder (image and text towers); {encoder.spec!r} encodes "
            f"{'+'.join(encoder.modalities)}",
            "use an hf: CLIP / SigLIP / ALIGN model or an aligned pair (local:DIR from encoderlab align)")
    if isinstance(encoder, HFDualEncoder):
        model, tok = encoder.model, encoder.tokenization
        emb = model.text_model.embeddings
        table = getattr(emb, "token_embedding", None) or getattr(emb, "word_embeddings", None)
        kinds = {"clip": ClipTower, "siglip": SiglipTower, "align": AlignTower}
        if encoder.model_type in kinds and isinstance(table, torch.nn.Embedding):
            return kinds[encoder.model_type](encoder, model, tok.tokenizer, tok.max_length, table)
    if isinstance(encoder, AlignedDualEncoder):
        tower = encoder.towers["text"]
        model = getattr(tower, "model", None)
        bert = model is not None and hasattr(getattr(model, "embeddings", None), "word_embeddings")
        if isinstance(tower, HFTextEncoder) and bert:
            return AlignedBertTower(encoder, tower, encoder.heads["text"], encoder.input_normalize)
        raise EncoderlabError(f"the text tower {tower.spec!r} of {encoder.spec!r} is not a BERT-family transformers "
                              "model, so a context cannot be put into its input embeddings",
                              "align with a BERT-family text tower (minilm-l6, hf-text:...) to use coop")
    raise EncoderlabError(f"coop cannot put a prompt context into the text tower of {encoder.spec!r} "
                          f"({type(encoder).__name__})",
                          "use an hf: CLIP / SigLIP / ALIGN model or an aligned pair with a BERT-family text tower")


# ---- the saved context -----------------------------------------------------------------------------------


def check_output_dir(path: str | os.PathLike) -> None:
    """Refuse a file, or a non-empty directory that is not a prompted model (it is someone's)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise EncoderlabError(f"output path {str(out)!r} is a file", "pass a directory path for the prompt context")
    if out.is_dir() and any(out.iterdir()) and not _is_prompted_dir(out):
        raise EncoderlabError(f"output directory {str(out)!r} is not empty and is not an encoderlab prompt context",
                              "pass a new or empty directory (in an existing one only its own files are replaced)")


def _is_prompted_dir(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG_NAME).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def save_prompted(out_dir: str | os.PathLike, base: Encoder, ctx: torch.Tensor, *, n_ctx: int, class_token: str,
                  csc: bool, classes: Sequence[str], names: Sequence[str], train: Mapping[str, Any],
                  training_items: TrainingItems | None = None) -> Path:
    """Write a learned context (``ctx`` [1 or C, n_ctx, width]) and its config into ``out_dir``, atomically."""
    from safetensors.torch import save as st_save

    from .aligned import encode_training_items, portable_spec, tower_fingerprint

    out = Path(out_dir).expanduser()
    check_output_dir(out)
    config = {
        "kind": KIND, "format_version": FORMAT_VERSION, "method": "CoOp (Zhou et al. 2022)",
        "base": portable_spec(base.spec, out), "base_fingerprint": tower_fingerprint(base),
        "n_ctx": int(n_ctx), "class_token": class_token, "csc": bool(csc), "width": int(ctx.shape[-1]),
        "classes": [{"label": str(c), "name": str(n)} for c, n in zip(classes, names)],
        "train": dict(train),
    }
    tensor = ctx.detach().to("cpu", torch.float32).contiguous()
    with replace_entries(out, MODEL_FILES, commit=CONFIG_NAME) as tmp:
        atomic_write_bytes(tmp / CONTEXT_NAME, st_save({"ctx": tensor}, metadata={"format": "pt", "kind": KIND}))
        if training_items is not None:
            atomic_write_bytes(tmp / TRAINING_ITEMS_NAME, encode_training_items(training_items))
        atomic_write_json(tmp / CONFIG_NAME, config)
    return out


def read_prompted_config(path: str | os.PathLike) -> dict[str, Any]:
    """The saved context's config, checked for kind and format version."""
    return read_model_config(path, KIND, "a prompt context", "coop", FORMAT_VERSION)


def load_context(path: str | os.PathLike) -> torch.Tensor:
    """The saved context tensor; a missing or damaged file is named with the fix."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / CONTEXT_NAME
    try:
        return load_file(str(file))["ctx"]
    except (SafetensorError, FileNotFoundError, KeyError) as e:
        raise EncoderlabError(f"prompt context {file} is missing or damaged ({e})",
                              "train it again with encoderlab coop --out, or copy the directory again") from e


def _same(features: torch.Tensor) -> torch.Tensor:
    """The identity head: a prompted encoder's image embeddings are its base's."""
    return features.float()


def template_lookup(classes: Sequence[str], names: Sequence[str]) -> dict[str, int]:
    """Text -> class index for every saved label, display name, and packaged template filled with a name."""
    from ..data.prompts import load_templates, template_sets

    templates = [t for s in template_sets() for t in load_templates(s)]
    lookup: dict[str, int] = {}
    for i, (label, name) in enumerate(zip(classes, names)):
        for text in (label, name, *(t.replace("{}", name) for t in templates)):
            lookup.setdefault(text, i)
    return lookup


class PromptedDualEncoder(Encoder):
    """A base dual encoder whose class texts use a learned CoOp context (see the module docstring's contract)."""

    def __init__(self, path: str | os.PathLike, *, device: torch.device, precision: str) -> None:
        self.path = Path(path)
        self.config = cfg = read_prompted_config(self.path)
        self.spec = f"local:{self.path}"
        self.base = rebuild_base(self.path, cfg, device=device, precision=precision, what="prompt context",
                                 command="coop")
        self.tower = prompted_tower(self.base)
        self.ctx = load_context(self.path)
        self.n_ctx, self.class_token, self.csc = int(cfg["n_ctx"]), str(cfg["class_token"]), bool(cfg["csc"])
        self.classes = [str(c["label"]) for c in cfg["classes"]]
        self.names = [str(c["name"]) for c in cfg["classes"]]
        expected = (len(self.classes) if self.csc else 1, self.n_ctx, self.tower.width)
        if tuple(self.ctx.shape) != expected:
            raise EncoderlabError(f"{self.path / CONTEXT_NAME} has shape {tuple(self.ctx.shape)}, expected {expected} "
                                  f"for {cfg['base']!r}", "train it again with encoderlab coop --out")
        self.modalities = ("image", "text")
        self.embed_dim = self.base.embed_dim
        self.score_kind = self.base.score_kind
        self.logit_scale, self.logit_bias = self.base.logit_scale, self.base.logit_bias
        self.device, self.precision = device, precision
        self.text_max_length = self.base.text_max_length
        self.preferred_batch_size = self.base.preferred_batch_size
        self.lookup = template_lookup(self.classes, self.names)
        self._class_emb: torch.Tensor | None = None

    def fingerprint_parts(self) -> dict[str, Any]:
        from .aligned import tower_fingerprint

        return {"adapter": KIND, "format_version": int(self.config.get("format_version", FORMAT_VERSION)),
                "base": tower_fingerprint(self.base), "context": bytes_digest(self.ctx.float().numpy().tobytes()),
                "n_ctx": self.n_ctx, "class_token": self.class_token, "csc": self.csc,
                "classes": json_digest(list(zip(self.classes, self.names)))}

    def training_items(self) -> TrainingItems | None:
        from .aligned import read_training_items

        if not hasattr(self, "_training_items"):
            self._training_items = read_training_items(self.path)
        return self._training_items

    def feature_source(self, modality: Modality) -> FeatureSource | None:
        self.check_modality(modality)
        return FeatureSource(self.base, _same) if modality == "image" else None

    def image_transform(self) -> Any:
        return self.base.image_transform()

    def encode_pixels(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.base.encode_pixels(pixel_values, normalize=normalize)

    def class_embeddings(self) -> torch.Tensor:
        """The learned prompt embeddings [C, dim] of the saved classes (computed once)."""
        if self._class_emb is None:
            layout = self.tower.layout(self.names, self.n_ctx, self.class_token)
            with inference_context(self.device, self.precision):
                self._class_emb = self.tower.features(layout, self.ctx).float().cpu()
        return self._class_emb

    def encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        known = [self.lookup.get(t) for t in texts]
        out = torch.empty(len(texts), self.embed_dim)
        if any(k is not None for k in known):
            cls = self.class_embeddings()
            for i, k in enumerate(known):
                if k is not None:
                    out[i] = cls[k]
        others = [i for i, k in enumerate(known) if k is None]
        if others and self.csc:
            raise EncoderlabError(
                f"{self.spec!r} has class-specific contexts only for its {len(self.classes)} trained classes; "
                f"{texts[others[0]]!r} is none of them (nor a packaged template filled with one)",
                "encode the trained class names, or train a unified context (coop without --csc) for new texts")
        if others:
            layout = self.tower.layout([texts[i] for i in others], self.n_ctx, self.class_token)
            with inference_context(self.device, self.precision):
                out[others] = self.tower.features(layout, self.ctx).float().cpu()
        return out


def load_prompted(path: str | os.PathLike, *, device: torch.device, precision: str) -> Encoder:
    """``local:DIR`` loader for kind "prompted"."""
    return PromptedDualEncoder(path, device=device, precision=precision)


register_local_kind(KIND, load_prompted, description="a base dual encoder + a learned CoOp prompt context")
