"""Rung ``retrieval``: cross-modal retrieval evaluation of a dual encoder on a dataset's image–caption pairs.

Every image is a query over all distinct captions of the split, and every distinct caption a query over all
images. A caption shared by several images is one gallery item with several positives, so duplicates are never
counted as negatives (OpenClipart has one caption on ~1,400 images). Ranks are computed in chunks, so memory stays
bounded for large splits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..extract.embeddings import caption_pairs, image_embeddings, text_embeddings
from ..hashing import text_key
from ..metrics.bootstrap import bootstrap_ci
from ..metrics.retrieval import metrics_from_ranks, per_query_hits, reciprocal_ranks, retrieval_ranks
from ..normalize import normalize_rows
from ..results import RunResult, data_provenance
from ..store import EmbeddingStore
from .base import Rung, RungInputs, RungOptions, register_rung
from .common import seen_in_training
from .costs import encoder_ms_per_item, peak_rss_mb


def run_retrieval(
    encoder: Encoder,
    dataset: Dataset,
    store: EmbeddingStore,
    *,
    split: str | None = "test",
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    n_boot: int = 1000,
    seed: int = 0,
    encoder_ms: float | None = None,
    progress: bool = True,
) -> RunResult:
    """Image→text and text→image retrieval on ``split`` (None or "all": every item)."""
    if "image" not in encoder.modalities or "text" not in encoder.modalities:
        raise EncoderlabError(
            f"retrieval needs a dual encoder; {encoder.spec!r} encodes only {'+'.join(encoder.modalities)}",
            "use a CLIP-style model (hf:..., open_clip:...) or align two towers with `encoderlab align`",
        )
    ds = dataset if split in (None, "all") else dataset.select_split(split)
    if not ds.has_texts:
        raise EncoderlabError(f"dataset {dataset.source!r} has no captions", "retrieval needs image–text pairs")
    t0 = time.perf_counter()
    emb = image_embeddings(encoder, ds, store, progress=progress)
    texts, pair_img, pair_txt = caption_pairs(ds, emb.rows)
    if not texts:
        raise EncoderlabError(f"no captioned image in split {split!r} of {dataset.source!r}", "choose another --split")
    T = text_embeddings(encoder, texts, store, progress=progress)
    embed_seconds = time.perf_counter() - t0
    img, txt = normalize_rows(emb.X), normalize_rows(T)
    t1 = time.perf_counter()
    i2t, t2i = retrieval_ranks(img, txt, pair_img, pair_txt, chunk_size)
    search_ms = round((time.perf_counter() - t1) * 1000.0 / (len(img) + len(txt)), 4)  # scored once, timed once
    metrics = metrics_from_ranks(i2t, t2i, pair_img, pair_txt, ks)
    for d, ranks in (("i2t", i2t), ("t2i", t2i)):
        per_query = {f"{d}_R@{k}": per_query_hits(ranks, k) for k in ks}
        per_query[f"{d}_mrr"] = reciprocal_ranks(ranks)
        for name, values in per_query.items():
            metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    metrics["images"], metrics["texts"], metrics["pairs"] = len(img), len(txt), len(pair_img)
    if encoder_ms is None:
        encoder_ms = encoder_ms_per_item(encoder, ds, "image")
    costs = {
        "fit_seconds": 0.0,
        "embed_seconds": round(embed_seconds, 3),
        "predict_ms_per_item": search_ms,
        "encoder_ms_per_item": encoder_ms,
        "predict_ms_per_item_with_encoder": round(search_ms + encoder_ms, 4),
        "trainable_params": 0,
        "peak_rss_mb": peak_rss_mb(),
    }
    ids = np.asarray(ds.table["id"].astype(str))[emb.rows]
    predictions = _predictions(img, txt, ids, texts, i2t, t2i)
    config = {"method": "retrieval", "encoder": encoder.spec, "split": split or "all", "ks": list(ks), "chosen": {},
              "chunk_size": chunk_size, "n_boot": n_boot, "seed": seed, "similarity": "cosine",
              "duplicates": "a caption shared by several images is one text with several positive images"}
    data = data_provenance(dataset, {split or "all": list(ids)})
    where = f"{split or 'all'} images"
    image_keys = [emb.result.keys[int(r)] for r in emb.rows]
    data["seen_in_training"] = {
        "image": seen_in_training(encoder, image_keys, "image", where),
        # captions repeat across images ("a photo of a dog"), so a seen caption alone is counted, not warned about
        "text": seen_in_training(encoder, [text_key(t) for t in texts], "text", f"{split or 'all'} captions",
                                 warn=False),
    }
    config["notes"] = [s["warning"] for s in data["seen_in_training"].values() if s["warning"]]
    return RunResult("retrieval", metrics, costs, config, data, primary="i2t_R@1", predictions=predictions)


def _predictions(img: np.ndarray, txt: np.ndarray, ids: np.ndarray, texts: list[str], i2t: np.ndarray,
                 t2i: np.ndarray, k: int = 5, chunk: int = 1024) -> pd.DataFrame:
    """Per query: direction, the query (image id or caption), rank of its first positive, and its top-k results."""
    rows: list[dict] = []
    for direction, Q, G, ranks, q_names, g_names in (("i2t", img, txt, i2t, ids, texts),
                                                      ("t2i", txt, img, t2i, texts, ids)):
        for start in range(0, len(Q), chunk):
            s = Q[start : start + chunk] @ G.T
            kk = min(k, s.shape[1])
            top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable"), 1)
            for i, r in enumerate(top):
                q = start + i
                rows.append({"direction": direction, "query": str(q_names[q]), "rank": int(ranks[q]),
                             "top": [str(g_names[j]) for j in r],
                             "top_scores": [round(float(s[i, j]), 5) for j in r]})
    return pd.DataFrame(rows)


def _run(inputs: RungInputs, options: RungOptions) -> RunResult:
    return run_retrieval(inputs.encoder, inputs.dataset, inputs.store, split=options.split,
                         chunk_size=options.chunk_size, n_boot=options.n_boot, seed=options.seed,
                         encoder_ms=options.encoder_ms, progress=options.progress)


register_rung(Rung("retrieval", level=1, rank=2, task="retrieval", needs=("dual", "captions"), knobs=(),
                   description="image↔text retrieval: Recall@K, MRR, median rank (dual encoders)", run=_run))
