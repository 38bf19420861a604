"""One registry of encoders and one spec parser.

A spec is ``PREFIX:REST`` (``hf:openai/clip-vit-base-patch32``, ``hf-vision:facebook/dinov2-small``,
``hf-text:BAAI/bge-small-en``, ``open_clip:ViT-B-32/laion2b_s34b_b79k``, ``local:path/to/dir``) or a registered
name (``efficientnet-lite0``, ``minilm-l6``). Adapters register a prefix factory; named encoders register a
factory under their name. ``create_encoder`` is the only place that turns a string into a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import EncoderlabError, UnknownNameError, close_matches
from ..registry import Registry, matches
from .base import Encoder, EncoderInfo

Factory = Callable[..., Encoder]  # factory(target: str, *, device, precision) -> Encoder


@dataclass(frozen=True)
class ParsedSpec:
    prefix: str | None  # None for a registered name
    target: str  # the part after the prefix, or the name


# Adapters register themselves on import; imported lazily so `import encoderlab` stays light.
_BUILTINS = tuple(f"encoderlab.encoders.{m}" for m in ("aligned", "hf", "local", "open_clip", "packaged"))
PREFIXES: Registry[tuple[Factory, str]] = Registry("encoder prefix", builtins=_BUILTINS)
NAMED: Registry[tuple[Factory, EncoderInfo]] = Registry("encoder", builtins=_BUILTINS)


def register_prefix(prefix: str, factory: Factory, description: str) -> None:
    """Register an adapter for specs of the form ``prefix:target``."""
    PREFIXES.register(prefix, (factory, description))


def register_encoder(info: EncoderInfo, factory: Factory) -> None:
    """Register a named encoder (``factory(name, device=..., precision=...)``)."""
    NAMED.register(info.name, (factory, info))


def unregister_encoder(name: str) -> None:
    """Remove a named encoder (tests undo their registrations with it)."""
    NAMED.unregister(name)


def _load_builtins() -> None:
    PREFIXES.load_builtins()
    NAMED.load_builtins()


def parse_spec(spec: str) -> ParsedSpec:
    """Split a spec into prefix and target; unknown prefixes and names fail with close matches."""
    _load_builtins()
    if not isinstance(spec, str) or not spec.strip():
        raise EncoderlabError(f"empty encoder spec {spec!r}", "see `encoderlab encoders list`")
    spec = spec.strip()
    if spec in NAMED:
        return ParsedSpec(None, spec)
    prefix, sep, target = spec.partition(":")
    if sep and prefix in PREFIXES:
        if not target:
            raise EncoderlabError(f"encoder spec {spec!r} names no model after '{prefix}:'", _example(prefix))
        return ParsedSpec(prefix, target)
    choices = NAMED.names() + [p + ":" for p in PREFIXES.names()]
    guess = close_matches(prefix + ":" if sep else spec, choices)
    hint = f"did you mean {', '.join(guess)}?" if guess else "see `encoderlab encoders list`"
    what = f"unknown encoder prefix {prefix + ':'!r} in {spec!r}" if sep else f"unknown encoder {spec!r}"
    raise UnknownNameError(f"{what}; {hint} Known: {', '.join(choices)}")


def _example(prefix: str) -> str:
    return {
        "hf": "e.g. hf:openai/clip-vit-base-patch32 or hf:/path/to/saved/model",
        "hf-vision": "e.g. hf-vision:facebook/dinov2-small",
        "hf-text": "e.g. hf-text:sentence-transformers/all-MiniLM-L6-v2",
        "open_clip": "e.g. open_clip:ViT-B-32/laion2b_s34b_b79k",
        "local": "e.g. local:runs/aligned-model",
    }.get(prefix, "see `encoderlab encoders list`")


def create_encoder(spec: str, device: str | None = None, precision: str | None = None) -> Encoder:
    """Build the encoder a spec names. ``device``: auto/cpu/cuda/mps; ``precision``: auto/fp32/fp16/bf16."""
    from .base import select_device, select_precision

    parsed = parse_spec(spec)
    dev = select_device(device)
    prec = select_precision(dev, precision)
    if parsed.prefix is None:
        factory, _ = NAMED.get(parsed.target)
    else:
        factory, _ = PREFIXES.get(parsed.prefix)
    enc = factory(parsed.target, device=dev, precision=prec)
    enc.spec = spec.strip()
    return enc


def list_encoders(pattern: str | None = None) -> list[EncoderInfo]:
    """Named encoders and adapter prefixes, filtered by a glob or substring pattern."""
    _load_builtins()
    infos = [info for _, (_, info) in NAMED.items()]
    infos += [EncoderInfo(name=p + ":<id>", modalities=(), description=d) for p, (_, d) in PREFIXES.items()]
    return sorted((i for i in infos if matches(i.name, pattern)), key=lambda i: i.name)
