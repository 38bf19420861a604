"""What ``encoderlab filter`` leaves in ``--out``; nothing is ever deleted from the data itself.

- ``kept.jsonl``: the filtered manifest, a data spec for every command (``jsonl:OUT/kept.jsonl``): every row of
  the data with its kept captions, explicit splits (val and test rows unchanged), labels and metadata columns;
- ``dropped.parquet``: one row per dropped pair (a row without a pair counts as one, ``text_index`` -1) with its
  ``reason`` (a key of ``rules.RULES``: the first rule that drops it), ``detail``, ``score`` and ``duplicate_of``;
- ``pairs.parquet``: every pair in scope with its score and decision (kept + dropped = all);
- ``scores.png`` (the score histogram with the cut marked), ``near_duplicates.png`` (each image's similarity to its
  nearest other image, with the threshold), ``report.html`` (both, counts per rule, the lowest- and highest-scored
  pairs with thumbnails and the captions the model prefers, the largest near-duplicate groups);
- ``results.json`` (task ``filter``): counts per rule, the cut, sizes, costs, settings, data provenance.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..atomic import atomic_open, atomic_write_bytes
from ..data.manifest import Dataset
from ..normalize import normalize_rows
from ..results import RunResult, write_run
from ..results.run import json_default
from ..rungs.costs import peak_rss_mb
from ..store import EmbeddingSpace, EmbeddingStore
from .rules import RULES
from .run import FilterResult

KEPT_NAME = "kept.jsonl"
DROPPED_NAME = "dropped.parquet"
PAIRS_NAME = "pairs.parquet"
SCORES_PNG = "scores.png"
NEAR_PNG = "near_duplicates.png"
REPORT_NAME = "report.html"
DROPPED_COLUMNS = ("id", "text_index", "text", "image", "label", "split", "reason", "detail", "score",
                   "duplicate_of", "similarity", "group")
#: pool captions shown beside each example pair (the ones the model scores highest for that image)
TOP_CAPTIONS = 3


def _plain(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (np.generic,)):
        return _plain(v.item())
    return v


def write_manifest(dataset: Dataset, path: Path) -> str:
    """``dataset`` as JSON lines the ``jsonl:`` source reads back as the same rows; returns the data spec."""
    t = dataset.table
    meta = dataset.metadata_columns()
    with atomic_open(path, "w") as f:
        for rec in t.to_dict("records"):
            row = {"id": rec["id"], "image": rec["image"], "text": list(rec["texts"]), "label": rec["label"],
                   "split": rec["split"]}
            row.update({c: _plain(rec[c]) for c in meta})
            f.write(json.dumps(row, ensure_ascii=False, default=json_default) + "\n")
    return f"jsonl:{path}"


def _examples(result: FilterResult, store: EmbeddingStore, n: int) -> list[dict[str, Any]]:
    """Report entries for the ``n`` lowest- and ``n`` highest-scored pairs, each with the pool's best captions."""
    p = result.pairs[result.pairs["score"].notna()].sort_values(["score", "row", "text_index"], kind="stable")
    if p.empty:
        return []
    picked = pd.concat([p.head(n), p.tail(n).iloc[::-1]]).drop_duplicates(["row", "text_index"])
    image_space = store.space(result.scores.image_fingerprint)
    text_space = store.space(result.scores.text_fingerprint)
    Q = normalize_rows(image_space.get(picked["image_key"].tolist()))
    pool = p.drop_duplicates("text_key")
    top_s, top_i = _top_captions(Q, text_space, pool["text_key"].tolist(), TOP_CAPTIONS)
    texts = pool["text"].tolist()
    out = []
    for q, rec in enumerate(picked.itertuples(index=False)):
        state = "kept" if rec.kept else f"dropped: {rec.reason}"
        results = [{"text": texts[j], "rank": r + 1, "score": float(s), "correct": texts[j] == rec.text}
                   for r, (s, j) in enumerate(zip(top_s[q], top_i[q])) if j >= 0]
        out.append({"query": {"image": rec.image, "text": f"{rec.text} — score {rec.score:.3f}, {state}"},
                    "results": results})
    return out


def _top_captions(Q: np.ndarray, space: EmbeddingSpace, keys: list[str], k: int,
                  chunk: int = 32768) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best-scoring pool captions of each query image, streaming the caption embeddings in chunks."""
    best_s = np.full((len(Q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(Q), k), -1, dtype=np.int64)
    for start in range(0, len(keys), chunk):
        T = normalize_rows(space.get(keys[start : start + chunk]))
        s = np.concatenate([best_s, Q @ T.T], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(T)), (len(Q), len(T)))], axis=1)
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return best_s, best_i


def _near_groups(result: FilterResult, n_groups: int = 6, per_group: int = 6) -> list[dict[str, Any]]:
    """Report entries for the largest near-duplicate groups: the kept image, then the images dropped as its copies."""
    d = result.pairs[(result.pairs["reason"] == "near-duplicate")].drop_duplicates("row")
    if d.empty:
        return []
    first = result.pairs.drop_duplicates("id").set_index("id")
    out = []
    for target, rows in sorted(d.groupby("duplicate_of"), key=lambda g: (-len(g[1]), str(g[0])))[:n_groups]:
        rows = rows.sort_values("similarity", ascending=False, kind="stable")
        sims = rows["similarity"].astype(float).tolist()
        cards = [{"image": img, "rank": i + 1, "score": s, "correct": True}
                 for i, (img, s) in enumerate(zip(rows["image"].tolist(), sims)) if i < per_group]
        out.append({"query": {"image": first.loc[target, "image"],
                              "text": f"kept {target}; {len(rows)} near-duplicate(s) dropped"}, "results": cards})
    return out


def _rule_table(result: FilterResult) -> str:
    lines = ["| rule | dropped (first reason) | flagged by the rule alone | what it means |", "|---|---|---|---|"]
    for rule, meaning in RULES.items():
        dropped, flagged = result.counts.get(rule, 0), result.flagged.get(rule)
        if dropped or flagged:
            lines.append(f"| {rule} | {dropped} | {'' if flagged is None else flagged} | {meaning} |")
    return "\n".join(lines)


def filter_note(result: FilterResult, spec: str | None) -> str:
    """The markdown summary at the top of the report (and what the CLI prints, minus the table)."""
    s, c = result.summary(), result.cuts
    cut = []
    if c.get("keep_top_cut") is not None:
        cut.append(f"keep-top {result.config.keep_top:g}: the best {c['keep_top_n']} of {s['pairs_scored']} scored "
                   f"pairs, score >= {c['keep_top_cut']:.3f}")
    if c.get("min_score") is not None:
        cut.append(f"min-score {c['min_score']:g}")
    lines = [
        "## What was filtered",
        f"- split `{result.scope}`: {s['rows']} rows, {s['pairs']} pairs, {s['pairs_scored']} scored with "
        f"`{result.encoder}` (cosine of the normalized image and text embeddings).",
        f"- **{s['kept_pairs']} pairs kept ({100 * s['kept_fraction']:.1f}%)** on {s['kept_rows']} rows; "
        f"{s['dropped_pairs']} dropped, each for the first rule below that applies.",
        f"- score cut: {'; '.join(cut) if cut else 'none (no --keep-top / --min-score)'}.",
    ]
    if result.scope != "all":
        lines.append("- the other splits pass through unchanged: no rule read them.")
    if result.near is not None:
        lines.append(f"- near-duplicates: cosine >= {result.near.threshold:g} between image embeddings "
                     f"({result.near.backend}), {s['near_duplicate_groups']} groups, the best-scored image of each "
                     "kept.")
    lines += ["", "## Dropped, by rule", _rule_table(result), ""]
    if spec:
        lines += ["## Use it", f"`--data '{spec}'`", ""]
    lines += ["## Examples",
              "The Retrieval section shows the lowest-scored pairs, then the highest: each image with its caption, "
              f"score and decision, then the {TOP_CAPTIONS} captions of the pool the model scores highest for it "
              "(green: the pair's own caption). After them, the largest near-duplicate groups: the kept image, then "
              "the images dropped as its copies, with their cosine."]
    return "\n".join(lines)


def _histograms(result: FilterResult) -> list[dict[str, Any]]:
    scores = result.pairs["score"].dropna().astype(float).tolist()
    hists = [{"title": "pair scores (cosine of normalized embeddings)", "values": scores,
              "cut": result.cuts.get("cut"), "xlabel": "pair score"}]
    if result.near is not None and np.isfinite(result.near.nn_similarity).any():
        nn = result.near.nn_similarity
        sampled = f", a sample of {result.near.nn_sampled}" if result.near.nn_sampled < len(nn) else ""
        hists.append({"title": f"nearest-neighbour image similarity (near-duplicate at >= {result.near.threshold:g}"
                               f"{sampled})",
                      "values": nn[np.isfinite(nn)].astype(float).tolist(), "cut": result.near.threshold,
                      "xlabel": "cosine to the nearest other image"})
    return hists


def _write_plots(hists: list[dict[str, Any]], out: Path) -> list[str]:
    try:
        from ..report.plots import histogram
    except ImportError:
        return []
    written = []
    for h, name in zip(hists, (SCORES_PNG, NEAR_PNG)):
        png = histogram(h["values"], h["cut"], h["xlabel"], h["title"])
        if png is not None:
            atomic_write_bytes(out / name, png)
            written.append(name)
    return written


def _write_tables(result: FilterResult, out: Path) -> None:
    with atomic_open(out / PAIRS_NAME, "wb") as f:
        result.pairs.to_parquet(f, index=False)
    with atomic_open(out / DROPPED_NAME, "wb") as f:
        result.dropped[list(DROPPED_COLUMNS)].to_parquet(f, index=False)


def write_filter(result: FilterResult, out_dir: str | Path, store: EmbeddingStore, *, examples: int = 12,
                 report: bool = True) -> RunResult:
    """Write every output of the module docstring into ``out_dir``; ``results.json`` last (its presence = done)."""
    from ..report import render_report

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    spec = write_manifest(result.dataset, out / KEPT_NAME)
    _write_tables(result, out)
    hists = _histograms(result)
    files = [KEPT_NAME, DROPPED_NAME, PAIRS_NAME, *_write_plots(hists, out)]
    if report:
        doc = {"title": f"encoderlab filter: {result.dataset.source}", "encoder": result.encoder,
               "dataset": result.dataset.source, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "note_md": filter_note(result, spec), "note_title": "Filter summary", "histograms": hists,
               "retrieval": _examples(result, store, examples) + _near_groups(result),
               "data_problems": {"counts": {k: v for k, v in result.counts.items() if v},
                                 "items": [{"kind": r.reason, "id": r.id, "detail": r.detail}
                                           for r in result.dropped.head(200).itertuples(index=False)]}}
        render_report(doc, out / REPORT_NAME)
        files.append(REPORT_NAME)
    run = _run_result(result, spec, files)
    write_run(run, out)
    return run


def _run_result(result: FilterResult, spec: str, files: list[str]) -> RunResult:
    costs = {f"{k}_seconds": round(v, 3) for k, v in result.seconds.items()}
    costs.update(scores_cached=result.scores.cached, scores_computed=result.scores.computed,
                 peak_rss_mb=peak_rss_mb())
    near = result.near
    config = {"method": "filter", "encoder": result.encoder, "split": result.scope,
              "filter": dataclasses.asdict(result.config),
              "fingerprints": {"image": result.scores.image_fingerprint, "text": result.scores.text_fingerprint},
              "score": "cosine of L2-normalized image and text embeddings",
              "near_duplicates": None if near is None else {"backend": near.backend, "nlist": near.nlist,
                                                            "nprobe": near.nprobe, "threshold": near.threshold}}
    extra = {"spec": spec, "outputs": files, "rules": RULES, "counts": result.counts, "flagged": result.flagged}
    return RunResult("filter", result.summary(), costs, config, result.provenance, primary="kept_fraction", extra=extra,
                     skipped=list(result.scores.skipped))
