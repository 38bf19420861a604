"""What the ladder is solving, read from the data and the encoder, and the split its decisions are made on.

The task shape (``task_shape``) is stated in every note: classification (labels), retrieval / matching (captions and
no labels) or both; image or text inputs; how many classes, labels per class, imbalance.

Decisions are never made on test. Every rung already chooses its own knobs on ``val``; choosing *between* rungs on
the very items their knobs were tuned on would favour the rung with the most knobs. So the ladder halves ``val``
(stratified by class, by seeded id hash, as ``splits.carve_validation``): one half stays ``val`` for the rungs' own
knobs, the other becomes the *decision* split. ``decision_dataset`` returns train + both halves with the decision
half named ``test`` — every rung evaluates on it unchanged — and the real test rows left out entirely, so no
decision can read a test label. The report's test numbers come afterwards, from the original dataset.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data.manifest import Dataset
from ..data.splits import carve_validation
from ..encoders.base import Encoder
from ..errors import EncoderlabError

#: the share of ``val`` the decision split takes
DECISION_FRACTION = 0.5


def task_shape(ds: Dataset, encoder: Encoder) -> dict[str, Any]:
    """The task as the data and the encoder define it (plain JSON)."""
    t = ds.table
    labelled = t["label"].notna() if "label" in t else np.zeros(len(t), bool)
    has_labels = bool(ds.classes) and bool(labelled.any())
    has_pairs = bool(ds.has_images and ds.has_texts)
    kind = "both" if has_labels and has_pairs else "classification" if has_labels else \
        "retrieval" if has_pairs else "none"
    inputs = "image" if ds.has_images else "text" if ds.has_texts else "none"
    shape: dict[str, Any] = {
        "kind": kind, "inputs": inputs, "encoder": encoder.spec, "encoder_modalities": list(encoder.modalities),
        "dual": "image" in encoder.modalities and "text" in encoder.modalities,
        "items": int(len(t)), "splits": {str(k): int(v) for k, v in t["split"].value_counts().sort_index().items()},
        "has_captions": bool(ds.has_texts), "has_images": bool(ds.has_images),
    }
    if has_labels:
        train = t[(t["split"] == "train") & labelled]
        counts = train["label"].value_counts()
        shape.update(n_classes=len(ds.classes), labels_per_class={
            "min": int(counts.min()) if len(counts) else 0, "median": float(counts.median()) if len(counts) else 0.0,
            "max": int(counts.max()) if len(counts) else 0},
            imbalance_ratio=round(float(counts.max() / max(counts.min(), 1)), 2) if len(counts) else None,
            classes_without_train_items=sorted(set(map(str, ds.classes)) - set(map(str, counts.index))))
    return shape


def describe_shape(shape: dict[str, Any]) -> str:
    """One sentence: "classification of images into 10 classes (87-270 labels per class, imbalance 3.1x) ..."."""
    if shape["kind"] in ("classification", "both"):
        lpc = shape["labels_per_class"]
        text = (f"classification of {shape['inputs']}s into {shape['n_classes']} classes ({lpc['min']}-{lpc['max']} "
                f"train labels per class, median {lpc['median']:g}; imbalance {shape['imbalance_ratio']}x)")
        if shape["kind"] == "both":
            text += ", with captions for retrieval"
    elif shape["kind"] == "retrieval":
        text = "image-text retrieval (captions, no labels)"
    else:
        text = "no task: the data has neither labels nor image-caption pairs"
    return f"{text}; encoder {shape['encoder']} ({'+'.join(shape['encoder_modalities'])})"


def decision_dataset(ds: Dataset, seed: int = 0) -> tuple[Dataset, dict[str, Any]]:
    """(train + val halves with the decision half as ``test``, the record of which ids went where).

    Needs a ``val`` split with at least two labelled items per class for a decision half; ``ensure_validation``
    carves ``val`` from train first when the data has none.
    """
    ds = ds.ensure_validation(seed=seed)
    t = ds.table
    if "val" not in set(t["split"]):
        raise EncoderlabError(f"dataset {ds.source!r} has no train split to carve a validation split from",
                              "give the data train / val / test splits (--split-ratios train=0.8,val=0.1,test=0.1)")
    val = t[t["split"] == "val"]
    decide = set(carve_validation(val[["id", "label"]], DECISION_FRACTION, seed=f"decide:{seed}"))
    if not decide:
        raise EncoderlabError(f"the val split of {ds.source!r} is too small to hold out a decision half "
                              f"({len(val)} items)", "use more validation items (--split-ratios with a larger val)")
    kept = t[t["split"] != "test"].copy()
    kept.loc[kept["id"].astype(str).isin(decide), "split"] = "test"
    record = {"method": "half of val, stratified by label, seeded id hash", "fraction": DECISION_FRACTION,
              "seed": seed, "decision_items": len(decide), "val_items_left": int(len(val) - len(decide)),
              "test_items_excluded": int((t["split"] == "test").sum()),
              "decision_ids": sorted(decide)}
    return ds.derive(kept, source=f"{ds.source} (decision split)"), record
