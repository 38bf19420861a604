"""The ladder's facts as plain JSON: the sections of ``results.json``, and the document ``report.render_report``
draws."""

from __future__ import annotations

import datetime
from typing import Any

import numpy as np

from .climb import Climb
from .note import next_move


def _baseline_json(b: Any) -> dict[str, Any]:
    return b.to_json() if hasattr(b, "to_json") else dict(b)


def ladder_sections(facts: dict[str, Any]) -> dict[str, Any]:
    """``results.json`` sections: shape, decision phase, test phase, diagnosis, retrieval, next move."""
    out: dict[str, Any] = {"shape": facts["shape"]}
    decided, reported = facts["decided"], facts["reported"]
    if decided:
        climb: Climb = decided["climb"]
        out["decision"] = {**climb.to_json(), "split": decided["split"],
                           "baselines": [_baseline_json(b) for b in decided["baselines"]],
                           "vs_baselines": decided["vs_baselines"], "curve": decided["curve"],
                           "modality": decided["modality"]}
    if reported:
        diag = reported.get("diagnosis")
        out["test"] = {"rows": [s.row() for s in reported["scores"].values()],
                       "baselines": [_baseline_json(b) for b in reported["baselines"]],
                       "vs_baselines": reported["vs_baselines"], "chosen_vs_frozen": reported["chosen_vs_frozen"]}
        out["diagnosis"] = diag.to_json() if diag is not None else None
    retrieval = facts.get("retrieval")
    if retrieval:
        out["retrieval"] = ({"skipped": retrieval["skipped"]} if "skipped" in retrieval else
                            {"metrics": retrieval["result"].metrics, "prior": _baseline_json(retrieval["prior"])})
    move, why, rules = next_move(facts)
    out["next_move"] = {"move": move, "why": why, "rules": rules}
    return out


def _rung_rows(facts: dict[str, Any]) -> list[dict[str, Any]]:
    decided, reported = facts["decided"], facts["reported"]
    rows = []
    chosen = decided["climb"].chosen
    for b in reported["baselines"]:
        if getattr(b, "kind", "") != "classification" or getattr(b, "unavailable", None):
            continue
        m = b.metrics
        rows.append({"name": b.name, "level": 0, "kind": "baseline", "metric": "top1", "value": m.get("top1"),
                     "ci_low": m.get("top1_ci_low"), "ci_high": m.get("top1_ci_high"), "fit_seconds": b.fit_seconds,
                     "predict_ms_per_item": None, "peak_rss_mb": None, "trainable_params": None, "chosen": False,
                     "skipped": None})
    for name, s in reported["scores"].items():
        r = s.row()
        rows.append({"name": name, "level": s.level, "kind": "rung", "metric": "top1", "value": r["top1"],
                     "ci_low": r["top1_ci_low"], "ci_high": r["top1_ci_high"], "fit_seconds": r["fit_seconds"],
                     "predict_ms_per_item": r["predict_ms_per_item_with_encoder"] or r["predict_ms_per_item"],
                     "peak_rss_mb": r["peak_rss_mb"], "trainable_params": r["trainable_params"],
                     "chosen": name == chosen, "skipped": None})
    for name, why in decided["climb"].skipped.items():
        rows.append({"name": name, "level": None, "kind": "rung", "metric": "top1", "value": None, "chosen": False,
                     "skipped": why})
    return rows


def _images(facts: dict[str, Any]) -> dict[str, str]:
    """Item id -> image path (for thumbnails of failing items and their neighbours)."""
    le = facts["reported"]["inputs"].labelled()
    t = le.dataset.table
    if "image" not in t:
        return {}
    return {str(i): str(p) for i, p in zip(t["id"], t["image"]) if isinstance(p, str)}


def report_document(facts: dict[str, Any], note: str) -> dict[str, Any]:
    """The document of ``report.render_report``: rungs vs cost, the curve, per-class recall, confusion, slices,
    failing items with neighbours, retrieval, data problems."""
    shape = facts["shape"]
    doc: dict[str, Any] = {"title": f"encoderlab ladder — {shape['encoder']}", "encoder": shape["encoder"],
                           "dataset": facts.get("dataset", ""), "note_md": note,
                           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    decided, reported = facts["decided"], facts["reported"]
    retrieval = facts.get("retrieval") or {}
    if "result" in retrieval:
        doc["retrieval"] = retrieval_examples(retrieval["result"], retrieval.get("root"), retrieval.get("images"))
    if decided and reported:
        doc["rungs"] = _rung_rows(facts)
        doc["curve"] = decided["curve"]
        diag = reported.get("diagnosis")
        if diag is not None:
            doc["per_class"] = diag.per_class
            le = reported["inputs"].labelled()
            doc["confusion"] = _confusion(facts, le)
            doc["slices"] = diag.slices[:30]
            images = _images(facts)
            doc["failing"] = [{**f, "image": images.get(f["id"]), "text": None, "prediction": f.get("predicted"),
                               "neighbours": [{**n, "image": images.get(n["id"]), "text": None}
                                              for n in f.get("neighbours", [])]} for f in diag.failing_examples]
            doc["data_problems"] = {"counts": diag.counts, "items": (
                [{"kind": "label error?", "id": c["id"], "detail": f"{c.get('label')} → {c.get('suggested')}"}
                 for c in diag.label_error_candidates[:10]] +
                [{"kind": "near-duplicate", "id": d["id"], "detail": f"{d.get('split')} ~ {d.get('other_id')} "
                  f"({d.get('other_split')}), cos {d.get('similarity', 0):.3f}"}
                 for d in diag.cross_split_near_duplicates[:10]])}
    return doc


def _confusion(facts: dict[str, Any], le: Any) -> dict[str, Any] | None:
    from ..metrics.classification import confusion_matrix

    reported, chosen = facts["reported"], facts["decided"]["climb"].chosen
    result = reported["results"].get(chosen or "")
    s = reported["scores"].get(chosen or "")
    if result is None or s is None or result.predictions is None:
        return None
    p = result.predictions[result.predictions["setting"] == s.setting]
    idx = {c: i for i, c in enumerate(le.classes)}
    y = np.asarray([idx[c] for c in p["label"].astype(str)])
    yhat = np.asarray([idx[c] for c in p["prediction"].astype(str)])
    return {"classes": list(le.classes), "matrix": np.asarray(confusion_matrix(y, yhat, len(le.classes))).tolist()}


def retrieval_examples(result: Any, root: Any, images: dict[str, str] | None = None, n: int = 3
                       ) -> list[dict[str, Any]]:
    """A few image->text and text->image queries with their top results; the true match's rank marks "correct".

    Retrieval predictions name images by item id or by a path relative to the dataset root: ``images`` (id -> path)
    and ``root`` turn either into a file for the thumbnails."""
    from pathlib import Path

    p = result.predictions
    if p is None or not len(p):
        return []

    def image(name: Any) -> str | None:
        if not isinstance(name, str):
            return None
        if images and name in images:
            return images[name]
        q = Path(name)
        return str(q if q.is_absolute() or root is None else Path(root) / q)

    out = []
    for direction in ("i2t", "t2i"):
        rows = p[p["direction"] == direction]
        picked = [*rows[rows["rank"] == 1].head(1).itertuples(), *rows[rows["rank"] > 1].head(n - 1).itertuples()]
        for r in picked:
            results = [{"image": image(t) if direction == "t2i" else None, "text": t if direction == "i2t" else None,
                        "rank": i + 1, "score": float(sc), "correct": i + 1 == int(r.rank)}
                       for i, (t, sc) in enumerate(zip(list(r.top), list(r.top_scores)))]
            query = {"image": image(r.query), "text": None} if direction == "i2t" else {"text": r.query, "image": None}
            out.append({"query": query, "results": results, "rank": int(r.rank)})
    return out
