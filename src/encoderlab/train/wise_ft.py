"""WiSE-FT: weight-space ensembles of the zero-shot and the fine-tuned model (``encoderlab finetune --wise-ft``).

Wortsman et al. 2022, "Robust fine-tuning of zero-shot models": ``θ(α) = (1 − α)·θ_zero-shot + α·θ_fine-tuned``
over every parameter fine-tuning changed — here the image tower's trained tensors (for LoRA the merged weights)
and the classifier head, whose zero-shot value is its step-0 init (the normalised class prompt embeddings for dual
encoders; the LP-FT linear probe for single towers). Everything else (the text tower, frozen blocks) is untouched.
Mixing recovers much of the zero-shot model's robustness at little or no cost in target accuracy.

α is chosen on validation top-1 (ties: the smaller α, nearer zero-shot); test top-1 is read once per α for the
report and never for choosing. ``also_eval`` adds zero-shot accuracy on a second labelled dataset (its classes'
prompts through the unchanged text tower, its images through the interpolated image tower), to show what
fine-tuning forgot. The endpoints are exact: α = 0 is the zero-shot model and α = 1 the fine-tuned one, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..encoders.base import Encoder
from ..encoders.finetuned import LORA_PREFIX
from ..errors import EncoderlabError
from ..extract.labelled import LabelledEmbeddings
from ..store import EmbeddingStore
from .finetune import FinetuneResult, is_dual, predict, split_items, trainable_module

#: a finer grid costs one val + test (+ also-eval) pass per α and chooses nothing better on small val sets
MAX_ALPHAS = 101
SPEC_EXAMPLE = "use e.g. --wise-ft 0:1:0.1 (START:STOP:STEP with 0 <= START < STOP <= 1 and STEP > 0)"
CHOSEN_BY = "val top-1 (ties: the smaller alpha, nearer zero-shot)"


# ---- the grid ---------------------------------------------------------------------------------------------


def parse_alpha_grid(text: str) -> list[float]:
    """``START:STOP:STEP`` -> ``[START, START+STEP, ..., STOP]``; STOP is always on the grid (α = 1 is the reference).

    Fails naming the spec, with an example, on anything but 0 <= START < STOP <= 1, STEP > 0, at most MAX_ALPHAS.
    """
    value = str(text).strip()
    parts = value.split(":")
    try:
        start, stop, step = (float(p) for p in parts)
    except ValueError:
        raise EncoderlabError(f"--wise-ft {value!r} is not START:STOP:STEP", SPEC_EXAMPLE) from None
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise EncoderlabError(f"--wise-ft {value!r}: START, STOP and STEP must be finite numbers", SPEC_EXAMPLE)
    if not 0 <= start < stop <= 1:
        raise EncoderlabError(f"--wise-ft {value!r}: needs 0 <= START < STOP <= 1", SPEC_EXAMPLE)
    if step <= 0:
        raise EncoderlabError(f"--wise-ft {value!r}: STEP must be > 0", SPEC_EXAMPLE)
    n = int(math.floor((stop - start) / step + 1e-9))  # the tolerance: 0:1:0.1 reaches 1.0 despite rounding
    if n + 1 > MAX_ALPHAS:
        raise EncoderlabError(f"--wise-ft {value!r} gives {n + 1} alphas, more than {MAX_ALPHAS}",
                              "use a larger STEP, e.g. --wise-ft 0:1:0.05")
    return check_alphas([start + i * step for i in range(n + 1)] + [stop])


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """Sorted, de-duplicated α values, each in [0, 1]; fails before any work otherwise."""
    # rounded: 0.1 * 3 must print (and compare) as 0.3, not 0.30000000000000004
    out = sorted({round(float(a), 10) for a in alphas})
    if not out or not all(0 <= a <= 1 for a in out):
        raise EncoderlabError(f"WiSE-FT alphas must lie in [0, 1], got {list(alphas)!r}", SPEC_EXAMPLE)
    return out


def check_wise_ft(encoder: Encoder, emb: LabelledEmbeddings, alphas: Sequence[float],
                  also_eval: LabelledEmbeddings | None = None) -> list[float]:
    """Everything WiSE-FT needs that can be checked before training: the grid, val items, the also-eval data."""
    grid = check_alphas(alphas)
    if "val" not in set(emb.split.tolist()) or emb.index("val").size == 0:
        raise EncoderlabError("WiSE-FT chooses alpha on the val split, which has no labelled items",
                              "make one with --split-ratios train=0.6,val=0.2,test=0.2")
    if also_eval is not None:
        if not is_dual(encoder):
            raise EncoderlabError(f"--also-eval classifies zero-shot, which needs a dual encoder; {encoder.spec!r} "
                                  f"encodes {'+'.join(encoder.modalities)}", "drop --also-eval for single towers")
        if also_eval.modality != "image" or not also_eval.classes or not (also_eval.y >= 0).any():
            raise EncoderlabError(f"--also-eval {also_eval.dataset.source!r} has no labelled images",
                                  "pass a dataset with labelled images to --also-eval")
    return grid


# ---- θ(α) in place ----------------------------------------------------------------------------------------


def mix(t0: torch.Tensor, t1: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 − α)·t0 + α·t1`` in at least float32, cast back; exact at α = 0 and α = 1 (0·x = 0, 1·x = x)."""
    if not (t0.is_floating_point() or t0.is_complex()):
        return (t0 if alpha < 0.5 else t1).clone()  # counters (BatchNorm's num_batches_tracked): the nearer end
    wide = torch.promote_types(t0.dtype, torch.float32)
    return ((1.0 - alpha) * t0.to(wide) + alpha * t1.to(t0.device, wide)).to(t0.dtype)


def _entries(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _assign(entries: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in values.items():
            entries[k].copy_(v.to(entries[k].device, entries[k].dtype))


@contextmanager
def interpolated(model: torch.nn.Module, theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor],
                 alpha: float) -> Iterator[torch.nn.Module]:
    """Set ``model``'s tensors named in ``theta0`` / ``theta1`` to θ(α) in place; restore their values on exit.

    The restore copies back clones taken on entry, so the model leaves exactly as it came (even after an error).
    """
    entries = _entries(model)
    if set(theta0) != set(theta1):
        raise ValueError("theta0 and theta1 must name the same tensors")
    unknown = [k for k in theta0 if k not in entries]
    wrong = [k for k in theta0 if k in entries and not (theta0[k].shape == theta1[k].shape == entries[k].shape)]
    if unknown or wrong:
        raise ValueError(f"theta does not fit the model (unknown {unknown[:3]}, shapes differ for {wrong[:3]})")
    saved = {k: entries[k].detach().clone() for k in theta0}
    try:
        _assign(entries, {k: mix(theta0[k], theta1[k], alpha) for k in theta0})
        yield model
    finally:
        _assign(entries, saved)


@dataclass
class Endpoints:
    """θ_zero-shot and θ_fine-tuned of every tensor fine-tuning changed, named within ``module``.

    ``module`` holds the trained encoder's model as ``model.`` (tower tensors) and the trained head as ``head.``.
    """

    module: torch.nn.Module
    theta0: dict[str, torch.Tensor]
    theta1: dict[str, torch.Tensor]
    tower_keys: list[str]

    @property
    def n_params(self) -> int:
        return int(sum(t.numel() for t in self.theta1.values()))


def tower_keys(trained: FinetuneResult) -> list[str]:
    """Names (in the encoder's model) of the tower tensors that trained; for LoRA the adapted layers' weights."""
    if trained.lora is not None:
        return sorted({k[len(LORA_PREFIX):].rsplit(".", 1)[0] + ".weight" for k in trained.tower_state})
    return sorted(trained.tower_state)


def endpoints(base_encoder: Encoder, trained: FinetuneResult) -> Endpoints:
    """θ0 from ``base_encoder`` (the zero-shot model) and the head's init, θ1 from the trained model now."""
    if trained.head0 is None:
        raise EncoderlabError("this fine-tune result has no record of its initial head (WiSE-FT's zero-shot end)",
                              "fine-tune again with this encoderlab version")
    keys = tower_keys(trained)
    parts: dict[str, torch.nn.Module] = {"head": trained.head}
    theta0: dict[str, torch.Tensor] = {}
    if keys:
        if base_encoder is trained.encoder:
            raise EncoderlabError("WiSE-FT needs the zero-shot encoder next to the fine-tuned one, got the same object",
                                  "fine-tune a copy (run_finetune(copy=True)) and pass the original as the base")
        trained_fp = trained.init.get("base_fingerprint")
        if trained_fp is not None:
            from ..encoders.aligned import tower_fingerprint

            if tower_fingerprint(base_encoder) != trained_fp:
                raise EncoderlabError(f"the base encoder {base_encoder.spec!r} is not the one that was fine-tuned "
                                      "(its fingerprint differs)", "pass the encoder the fine-tune started from")
        base = _entries(trainable_module(base_encoder))
        missing = [k for k in keys if k not in base]
        if missing:
            raise EncoderlabError(f"the base encoder {base_encoder.spec!r} has no tensors {missing[:3]}",
                                  "pass the encoder the fine-tune started from")
        parts["model"] = trainable_module(trained.encoder)
        theta0 = {f"model.{k}": base[k].detach().clone() for k in keys}
    module = torch.nn.ModuleDict(parts)  # a view naming both: registering children changes neither module
    head_keys = ["weight"] + (["bias"] if trained.head.kind == "linear" else [])  # a cosine head's bias never trains
    theta0.update({f"head.{k}": getattr(trained.head0, k).detach().clone() for k in head_keys})
    entries = _entries(module)
    theta1 = {k: entries[k].detach().clone() for k in theta0}
    return Endpoints(module, theta0, theta1, keys)


def _weights_changed(encoder: Encoder) -> None:
    getattr(encoder, "_weights_changed", lambda: None)()  # cached weight digests are stale


# ---- the curve --------------------------------------------------------------------------------------------


class _Features:
    """Tower features of a split at the current α, each frozen part computed once: all of the tower when only the
    head moves, the prefix before the first trained group with ``last:N`` (``train.prefix``)."""

    def __init__(self, trained: FinetuneResult, items: Mapping[str, Any], batch_size: int, tower_moves: bool,
                 prefix_cache: bool) -> None:
        self.model, self.items, self.batch_size, self.tower_moves = trained.model, items, batch_size, tower_moves
        self.cut = _frozen_cut(trained) if prefix_cache and tower_moves else None
        self.frozen: dict[str, np.ndarray] = {}
        self.acts: dict[str, torch.Tensor] = {}

    def __call__(self, split: str) -> np.ndarray:
        model, items, bs = self.model, self.items[split], self.batch_size
        if self.tower_moves and self.cut is not None:
            if split not in self.acts:
                self.acts[split] = _batched(self.cut.prefix, items, bs, model, pixels=True)
            return _batched(self.cut.suffix, self.acts[split], bs, model).numpy()
        if self.tower_moves:
            return predict(model.tower, items, bs)
        if split not in self.frozen:
            self.frozen[split] = predict(model.tower, items, bs)
        return self.frozen[split]


def _frozen_cut(trained: FinetuneResult) -> Any:
    """The tower's cut before its first trained group (``train.prefix``), when fine-tuning used one."""
    if trained.lora is not None or trained.plan.spec.kind != "last" or not trained.prefix_cache.get("enabled"):
        return None
    from .prefix import prefix_split

    cut, _ = prefix_split(trained.encoder, trained.model.tower, trained.plan, None)
    return cut


def _batched(fn: Any, source: Any, batch_size: int, model: torch.nn.Module, pixels: bool = False) -> torch.Tensor:
    """``fn`` over ``source`` (image items when ``pixels``, else a tensor) in batches, eval mode, no gradients."""
    model.eval()
    n = len(source)
    out = []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            x = source.pixels(range(s, min(s + batch_size, n))) if pixels else source[s:s + batch_size]
            out.append(fn(x).detach().float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _top1(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == y).mean()) if len(y) else float("nan")


def wise_ft_curve(
    base_encoder: Encoder,
    trained: FinetuneResult,
    emb: LabelledEmbeddings,
    store: EmbeddingStore,
    alphas: Sequence[float],
    *,
    also_eval: LabelledEmbeddings | None = None,
    templates: Sequence[str] = ("a photo of a {}.",),
    batch_size: int = 64,
    prefix_cache: bool = True,
) -> dict[str, Any]:
    """Val and test top-1 (and also-eval zero-shot top-1) of θ(α) for every α; α chosen on val.

    ``prefix_cache``: with ``--train last:N`` the groups before the first trained one are the same at every α, so
    their outputs are computed once per image and each α runs only the rest of the tower (``train.prefix``).

    ``base_encoder`` is the zero-shot encoder (not changed), ``trained`` the fine-tune of a copy of it; ``trained``
    leaves as it came. Returns a JSON-ready record (``curve``: one row per α, ``alpha``: the chosen one) plus
    ``scores``: the chosen α's test logits (numpy), for intervals.
    """
    from ..rungs.common import eval_split

    grid = check_wise_ft(base_encoder, emb, alphas, also_eval)
    ends = endpoints(base_encoder, trained)
    enc, model = trained.encoder, trained.model
    positions = {"val": trained.positions["val"], "test": eval_split(emb, "test")}
    items = {split: split_items(enc, emb, idx) for split, idx in positions.items()}
    labels = {split: emb.y[idx] for split, idx in positions.items()}
    zs = None
    if also_eval is not None:
        from ..rungs.zeroshot import zeroshot_classifier

        # the text tower never trains: the other dataset's class embeddings are the same for every α
        zs = zeroshot_classifier(base_encoder, also_eval.classes, store, list(templates))[0]
        also_pos = np.flatnonzero(also_eval.y >= 0)
        items["also_eval"] = split_items(enc, also_eval, also_pos)
        labels["also_eval"] = also_eval.y[also_pos]
    features = _Features(trained, items, batch_size, bool(ends.tower_keys), prefix_cache)

    rows: list[dict[str, Any]] = []
    test_scores: dict[float, np.ndarray] = {}
    for alpha in grid:
        with interpolated(ends.module, ends.theta0, ends.theta1, alpha):
            _weights_changed(enc)
            row: dict[str, Any] = {"alpha": alpha}
            for split in ("val", "test"):
                with torch.no_grad():
                    feats = torch.from_numpy(features(split)).to(trained.head.weight.device)
                    logits = model.head(feats).float().cpu().numpy()
                row[f"{split}_top1"] = _top1(logits, labels[split])
                if split == "test":
                    test_scores[alpha] = logits
            if zs is not None:
                row["also_eval_top1"] = _top1(zs.decision_function(features("also_eval")), labels["also_eval"])
        rows.append(row)
    _weights_changed(enc)
    best = max(rows, key=lambda r: (r["val_top1"], -r["alpha"]))  # test never enters this choice
    out: dict[str, Any] = {
        "alpha": best["alpha"], "chosen_by": CHOSEN_BY, "val_top1": best["val_top1"], "test_top1": best["test_top1"],
        "alphas": grid, "curve": rows, "theta0": trained.init.get("init"), "train": str(trained.plan.spec),
        "interpolated": {"tower_tensors": len(ends.tower_keys), "head_tensors": len(ends.theta0) - len(ends.tower_keys),
                         "params": ends.n_params},
        "counts": {"val": int(positions["val"].size), "test": int(positions["test"].size)},
        "scores": test_scores[best["alpha"]],
    }
    if also_eval is not None:
        out["also_eval"] = {"source": also_eval.dataset.source, "items": int(labels["also_eval"].size),
                            "classes": len(also_eval.classes), "split": "all labelled items",
                            "method": "zero-shot with the interpolated image tower and the unchanged text tower"}
        out["also_eval_top1"] = best["also_eval_top1"]
    return out


def apply_alpha(base_encoder: Encoder, trained: FinetuneResult, alpha: float) -> None:
    """Make ``trained`` the θ(α) model for good: its tower, head and ``tower_state`` (what ``save_finetune`` writes).

    For LoRA the saved factors keep their rank: ``(1 − α)·W0 + α·(W0 + s·B·A) = W0 + s·(α·B)·A``, so B is scaled.
    """
    ends = endpoints(base_encoder, trained)
    _assign(_entries(ends.module), {k: mix(ends.theta0[k], ends.theta1[k], alpha) for k in ends.theta0})
    if trained.lora is not None:
        trained.tower_state = {k: v * alpha if k.endswith(".B") else v.clone() for k, v in trained.tower_state.items()}
    else:
        model = _entries(trainable_module(trained.encoder)) if trained.tower_state else {}
        trained.tower_state = {k: model[k].detach().clone() for k in trained.tower_state}
    _weights_changed(trained.encoder)


def result_record(curve: Mapping[str, Any]) -> dict[str, Any]:
    """The curve without its numpy scores: what goes into ``RunResult.extra["wise_ft"]`` and the model's JSON."""
    return {k: v for k, v in curve.items() if k != "scores"}
