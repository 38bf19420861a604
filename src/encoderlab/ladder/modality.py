"""The modality check: when the items have images *and* texts, does one modality already solve the task?

The same linear probe (C on val, refit on train + val, as the ``linear`` rung) is fitted on the image embeddings,
on the text embeddings of each item's first caption, and on both concatenated (each L2-normalised), on the same
items, and scored on the same decision items, so the note can say "the texts alone already give 0.97" — the
workflow's second mistake is using a multimodal encoder where one modality suffices.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..metrics.bootstrap import bootstrap_ci, paired_bootstrap
from ..normalize import normalize_rows
from ..store import EmbeddingStore

ROUTES = ("image", "text", "image+text")


def applicable(ds: Dataset, encoder: Encoder) -> str | None:
    """Why the check cannot run (None when it can)."""
    if not (ds.has_images and ds.has_texts):
        return "the items do not have both images and texts"
    if not ("image" in encoder.modalities and "text" in encoder.modalities):
        return f"{encoder.spec} encodes {'+'.join(encoder.modalities)} only"
    if not ds.classes:
        return "the data has no labels"
    return None


def modality_check(encoder: Encoder, ds: Dataset, store: EmbeddingStore, *, seed: int = 0, n_boot: int = 1000,
                   progress: bool = False) -> dict[str, Any]:
    """Per route: decision top-1 with interval; and the paired difference of each single modality to the joint."""
    from ..cpu import small_fit_threads
    from ..extract import labelled_embeddings
    from ..heads.linear import LinearProbe

    why = applicable(ds, encoder)
    if why is not None:
        return {"skipped": why}
    emb = {m: labelled_embeddings(encoder, ds, store, modality=m, progress=progress) for m in ("image", "text")}
    ids = sorted(set(emb["image"].ids) & set(emb["text"].ids))
    pos = {m: _positions(e.ids, ids) for m, e in emb.items()}
    img, txt = emb["image"], emb["text"]
    y = img.y[pos["image"]]
    split = np.asarray(img.split)[pos["image"]]
    feats = {"image": normalize_rows(img.X[pos["image"]]), "text": normalize_rows(txt.X[pos["text"]])}
    feats["image+text"] = np.hstack([feats["image"], feats["text"]])
    tr, va, te = (np.flatnonzero((split == s) & (y >= 0)) for s in ("train", "val", "test"))
    out: dict[str, Any] = {"items": {"train": int(tr.size), "val": int(va.size), "decision": int(te.size)},
                           "routes": {}, "head": "linear probe (C on val, refit on train+val)"}
    correct: dict[str, np.ndarray] = {}
    for route in ROUTES:
        probe = LinearProbe(seed=seed)
        with small_fit_threads("cpu"):
            probe.fit(feats[route][tr], y[tr], feats[route][va], y[va])
        correct[route] = (np.asarray(probe.predict(feats[route][te])) == y[te]).astype(float)
        lo, hi = bootstrap_ci(correct[route], n_boot=n_boot, seed=seed)
        out["routes"][route] = {"top1": float(correct[route].mean()), "ci_low": lo, "ci_high": hi,
                                "C": float(probe.best_C_)}
    for route in ("image", "text"):
        test = paired_bootstrap(correct[route], correct["image+text"], n_boot=n_boot, seed=seed)
        out["routes"][route]["vs_joint"] = {k: test[k] for k in ("diff", "ci_low", "ci_high", "p_value")}
    return out


def _positions(have: Any, want: list[str]) -> np.ndarray:
    where = {str(i): p for p, i in enumerate(have)}
    return np.asarray([where[i] for i in want], dtype=np.int64)


def modality_sentence(check: dict[str, Any], min_gain: float = 0.01) -> str:
    """What the check says, in one sentence with its numbers."""
    if "skipped" in check:
        return f"Modality check not run: {check['skipped']}."
    r = check["routes"]
    parts = ", ".join(f"{k} {v['top1']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]" for k, v in r.items())
    enough = [m for m in ("text", "image") if r[m]["vs_joint"]["ci_low"] > -min_gain]
    if enough:
        m = max(enough, key=lambda k: r[k]["top1"])
        verdict = (f"{m} alone is within {min_gain * 100:g} point of both (Δ {r[m]['vs_joint']['diff']:+.3f}, "
                   f"lower bound {r[m]['vs_joint']['ci_low']:+.3f}): one modality already solves it")
    else:
        verdict = "both modalities together are clearly better than either alone"
    return f"Linear probe by route on the decision split: {parts}; {verdict}."
