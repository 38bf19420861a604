"""The frozen-prefix cache of ``finetune --train heads | last:N``: the tower's frozen groups run once per image.

With no augmentation, everything before the first trained group computes the same activations every epoch. The
tower is cut there (``PrefixSplit``): the prefix runs once per image (in eval mode) and every epoch runs only the
suffix from the cached activations, with the same losses and gradients and far fewer FLOPs.

Where the cut comes from: the encoder's own ``image_split(first_trained)`` (the packaged EfficientNet, aligned pairs),
else a replay through the model's forward with the frozen modules swapped for stubs (any ``tower_layout`` model).
The first batch checks the replay against the full tower (to 1e-5); a cut that differs is not used.

Where the activations live: in the embedding store when one is given (a space per encoder fingerprint before training
+ cut point + activation shape, rows keyed by image content, so a second fine-tune of the same encoder at the same
cut — another seed, lr or epoch count — reads them instead of recomputing), else in memory for one fit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..hashing import json_digest

#: the store space's ``kind`` in its meta: what ``store list`` shows for these spaces
SPACE_KIND = "prefix-activations"
Augment = Callable[[Any], Any]


@dataclass
class PrefixSplit:
    """The tower cut before its first trained group: ``suffix(prefix(pixels))`` is ``tower(pixels)``."""

    cut: str  # the first trained group ("features" for heads: the whole tower is the prefix)
    prefix: Callable[[torch.Tensor], torch.Tensor]  # pixels -> activations (frozen, deterministic in eval)
    suffix: Callable[[torch.Tensor], torch.Tensor]  # activations -> tower features, with gradients


def prefix_split(encoder: Encoder, tower: torch.nn.Module, plan: Any, augment: Augment | None
                 ) -> tuple[PrefixSplit | None, str]:
    """The frozen prefix to run once per image, or None, with why."""
    if augment is not None:
        return None, "augmentation: the prefix sees a different image every epoch"
    if plan.spec.kind == "heads":
        return PrefixSplit("features", tower, lambda a: a), "heads: the whole tower is frozen"
    if plan.spec.kind != "last":
        return None, f"--train {plan.spec}: every group of the tower trains"
    from ..encoders.trainable import as_trainable

    names = [n for n, _ in as_trainable(encoder).parameter_groups("image")]
    first = names[len(names) - plan.spec.n]
    if names.index(first) == 0:
        return None, f"--train {plan.spec}: every group of the tower trains"
    split = getattr(encoder, "image_split", None)
    parts = split(first) if callable(split) else None
    if parts is not None:
        return PrefixSplit(first, parts[0], parts[1]), f"last:{plan.spec.n}: groups before {first} are frozen"
    generic = _replay_split(encoder, tower, names, first)
    if generic is None:
        return None, f"{encoder.spec!r}: no way to run the tower from {first} (no image_split, no block layout)"
    return generic, f"last:{plan.spec.n}: groups before {first} are frozen (replayed through the model's forward)"


def _group_modules(encoder: Encoder, names: list[str]) -> list[list[str]] | None:
    layout = getattr(encoder, "tower_layout", None)
    if not callable(layout):
        return None
    lay = layout("image")
    parts = dict((*lay.before, *lay.after))
    out = []
    for n in names:
        if n.startswith("block.") and n[6:].isdigit():
            out.append([f"{lay.blocks}.{n[6:]}"])
        elif n in parts:
            out.append(list(parts[n]))
        else:
            return None
    return out


def _replay_split(encoder: Encoder, tower: torch.nn.Module, names: list[str], first: str) -> PrefixSplit | None:
    """A cut through the model's own forward: the frozen modules are swapped for stubs while the suffix runs (the
    first returns the cached activations, the others pass their input on); the prefix is a full forward that keeps
    the last frozen module's output. ``cached_activations`` checks the replay against the full tower."""
    paths = _group_modules(encoder, names[: names.index(first)])
    model = getattr(encoder, "model", None)
    if not paths or not isinstance(model, torch.nn.Module):
        return None
    try:
        frozen = [model.get_submodule(p) for ps in paths for p in ps]
    except AttributeError:
        return None
    shape: list[tuple[int, ...]] = []

    def prefix(pixels: torch.Tensor) -> torch.Tensor:
        got: list[Any] = []
        handle = frozen[-1].register_forward_hook(lambda m, a, out: got.append(out))
        try:
            tower(pixels)
        finally:
            handle.remove()
        if not got or not isinstance(got[-1], torch.Tensor):
            raise EncoderlabError("the last frozen module returns no tensor", "prefix caching is not possible")
        shape[:] = [tuple(pixels.shape[1:])]
        return got[-1]

    @contextlib.contextmanager
    def stubs(acts: torch.Tensor):
        def entry(*a: Any, **k: Any) -> torch.Tensor:
            return acts

        def passthrough(*a: Any, **k: Any) -> Any:
            return a[0] if a else next(iter(k.values()))

        for i, m in enumerate(frozen):
            m.forward = entry if i == 0 else passthrough  # type: ignore[method-assign]
        try:
            yield
        finally:
            for m in frozen:
                del m.forward

    def suffix(acts: torch.Tensor) -> torch.Tensor:
        dummy = torch.zeros((), device=acts.device).expand(acts.shape[0], *shape[0])
        with stubs(acts):
            return tower(dummy)

    return PrefixSplit(first, prefix, suffix)


class PrefixCache:
    """Outputs of the frozen prefix per image content for one (encoder fingerprint before training, cut): rows of a
    store space when ``store`` is given (kept for later fine-tunes), else in memory for this fit."""

    def __init__(self, encoder: Encoder, split: PrefixSplit, tower: Any, batch_size: int, store: Any = None) -> None:
        """``tower``: the full tower module (pixels -> features) the cut must reproduce."""
        self.split, self.tower, self.batch_size, self.store = split, tower, batch_size, store
        self.fingerprint = encoder.fingerprint("image")
        self.device = encoder.device
        self.memory: dict[str, np.ndarray] = {}
        self.shape: tuple[int, ...] | None = None
        self.checked = False
        self.computed = self.reused = 0
        self.space = None
        if store is not None:
            self.space = store.space(json_digest({"kind": SPACE_KIND, "encoder": self.fingerprint, "cut": split.cut}))
            meta = self.space.meta
            if meta is not None:
                self.shape = tuple(int(d) for d in meta["shape"])
            elif self.space.keys():
                raise EncoderlabError(f"store space {self.space.fingerprint} holds prefix activations without their "
                                      "shape (space.json is missing)",
                                      f"encoderlab store rm {self.space.fingerprint}; they are recomputed")

    def _missing(self, keys: list[str]) -> set[str]:
        if self.space is None:
            return {k for k in keys if k not in self.memory}
        return set(self.space.missing(keys)) if keys else set()

    def _check(self, pixels: torch.Tensor, acts: torch.Tensor) -> None:
        """The cut must be the tower (else caching would change the model): suffix(prefix(x)) == tower(x)."""
        full, again = self.tower(pixels).float(), self.split.suffix(acts).float()
        err = float((full - again).abs().max()) / (1.0 + float(full.abs().max()))
        if err > 1e-5:
            raise EncoderlabError(f"prefix replay differs from the tower by {err:.2e}",
                                  "prefix caching is not possible for this encoder")
        self.checked = True

    def _compute(self, items: Any, positions: list[int], keys: list[str]) -> None:
        writer = self.space.writer(shard_size=256) if self.space is not None else contextlib.nullcontext()
        with writer as w:
            for s in range(0, len(positions), self.batch_size):
                pos = positions[s:s + self.batch_size]
                pixels = items.pixels(pos)
                acts = self.split.prefix(pixels).detach()
                if not self.checked:
                    self._check(pixels, acts)
                rows = acts.float().cpu().numpy()
                if self.shape is None:
                    self.shape = tuple(rows.shape[1:])
                    if self.space is not None:
                        self.store.space(self.space.fingerprint, meta={
                            "kind": SPACE_KIND, "encoder_fingerprint": self.fingerprint, "cut": self.split.cut,
                            "shape": list(self.shape)})
                flat = rows.reshape(len(pos), -1)
                if w is None:
                    self.memory.update({keys[i]: r for i, r in zip(pos, flat)})
                else:
                    w.add([keys[i] for i in pos], flat)
                self.computed += len(pos)

    def activations(self, model: torch.nn.Module, items: Any) -> torch.Tensor:
        """[n, ...] prefix outputs of ``items`` (``model``, what trains, in eval mode; once per image content)."""
        from ..hashing import image_key

        keys = [image_key(p) for p in items.paths]
        if not keys:
            return torch.zeros(0)
        missing = self._missing(keys)
        todo = _first_positions(keys, missing)
        model.eval()
        with torch.no_grad():
            if not self.checked and not todo:  # all stored: still check the cut (and the rows) on one batch
                pos = list(range(min(self.batch_size, len(keys))))
                pixels = items.pixels(pos)
                acts = self.split.prefix(pixels).detach()
                self._check(pixels, acts)
                stored = self._rows([keys[i] for i in pos])
                if not torch.allclose(stored, acts.float().cpu(), atol=1e-5, rtol=1e-5):
                    raise EncoderlabError("stored prefix activations differ from the tower's",
                                          f"remove the store space {self.space.fingerprint} (encoderlab store rm)")
            self._compute(items, todo, keys)
        self.reused += len(keys) - len(todo)
        return self._rows(keys).to(self.device)

    def _rows(self, keys: list[str]) -> torch.Tensor:
        if self.space is None:
            flat = np.stack([self.memory[k] for k in keys])
        else:
            self.space.refresh()
            flat = self.space.get(keys)
        return torch.from_numpy(np.ascontiguousarray(flat)).reshape(len(keys), *(self.shape or ()))

    def nbytes(self) -> int:
        n = len(self.memory) if self.space is None else self.computed + self.reused
        return int(n * int(np.prod(self.shape or (0,))) * 4)


def _first_positions(keys: list[str], wanted: set[str]) -> list[int]:
    """Positions of the first occurrence of each wanted key."""
    seen: set[str] = set()
    out = []
    for i, k in enumerate(keys):
        if k in wanted and k not in seen:
            seen.add(k)
            out.append(i)
    return out


def prefix_activations(encoder: Encoder, tower: Any, plan: Any, augment: Augment | None, model: Any,
                       train_items: Any, val_items: Any, has_val: bool, batch_size: int,
                       prefix_cache: bool | None, store: Any = None) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(split, train activations, val activations, record)`` of the frozen-prefix cache, or Nones and why not.

    The cache is an optimization: when building it fails, training runs uncached and the record says why. Under
    torchrun with a store, rank 0 fills the store first and the other ranks read it (one copy, computed once).
    """
    from . import distributed as dp

    args = (encoder, tower, plan, augment, model, train_items, val_items, has_val, batch_size, prefix_cache, store)
    if store is not None and dp.active():
        return dp.main_first(lambda: _build(*args), "the frozen-prefix cache")
    return _build(*args)


def _build(encoder: Encoder, tower: Any, plan: Any, augment: Augment | None, model: Any, train_items: Any,
           val_items: Any, has_val: bool, batch_size: int, prefix_cache: bool | None, store: Any
           ) -> tuple[Any, Any, Any, dict[str, Any]]:
    t0 = time.perf_counter()
    split, why = prefix_split(encoder, tower, plan, augment) if prefix_cache is not False else (None, "switched off")
    info: dict[str, Any] = {"enabled": split is not None, "reason": why}
    if split is None:
        return None, None, None, info
    try:
        cache = PrefixCache(encoder, split, tower, batch_size, store)
        acts_tr = cache.activations(model, train_items)
        acts_va = cache.activations(model, val_items) if has_val else None
    except Exception as e:  # noqa: BLE001 - the cache is an optimization: train uncached, and say why
        why = e.message if isinstance(e, EncoderlabError) else f"{type(e).__name__}: {e}"
        return None, None, None, {"enabled": False, "reason": f"prefix replay failed ({why})"}
    info.update(cut=split.cut, computed=cache.computed, reused=cache.reused,
                seconds=round(time.perf_counter() - t0, 3), bytes=cache.nbytes(),
                where="store" if cache.space is not None else "memory")
    if cache.space is not None:
        info["space"] = cache.space.fingerprint
    return split, acts_tr, acts_va, info
