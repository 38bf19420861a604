"""Labelled embeddings of one dataset: the shared starting point of every classification rung.

All rungs of a comparison index the same ``LabelledEmbeddings``, so they see the same rows, labels, splits and
features. The test split is only ever read for the final numbers; choices (hyper-parameters, templates) use train
and val. A dataset that ships only train and test gets a validation part carved out of train (see
``Dataset.ensure_validation``), recorded in its ``split_info``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.manifest import Dataset
from ..data.splits import k_shot_sample
from ..encoders.base import Encoder
from ..errors import EncoderlabError, close_matches
from ..hashing import text_key
from ..store import EmbeddingStore
from .embeddings import image_embeddings, text_embeddings
from .loop import ExtractResult


@dataclass
class LabelledEmbeddings:
    """Embeddings ``X`` of the usable rows of ``dataset`` with their labels ``y`` (class index; -1 unlabelled),
    splits, ids, and the dataset row of each (``rows``)."""

    dataset: Dataset
    modality: str
    X: np.ndarray
    rows: np.ndarray  # dataset row of each X row
    ids: np.ndarray
    y: np.ndarray
    split: np.ndarray
    classes: list[str]
    extract: ExtractResult | None
    keys: np.ndarray | None = None  # content key of each X row (image file hash / text hash), as the store keys it

    def index(self, split: str, *, labelled: bool = True) -> np.ndarray:
        """Positions (into X) of one split's rows; an unknown split fails with the available ones."""
        if split not in set(self.split.tolist()):
            have = sorted({s for s in self.split.tolist() if s is not None})
            guess = close_matches(split, have)
            raise EncoderlabError(
                f"split {split!r} has no usable items in {self.dataset.source!r}",
                (f"did you mean {guess[0]!r}? " if guess else "")
                + f"available: {have or 'none'}; make splits with --split-ratios train=0.8,val=0.1,test=0.1",
            )
        mask = self.split == split
        if labelled:
            mask &= self.y >= 0
        return np.flatnonzero(mask)

    def k_shot(self, k: int, seed: int, split: str = "train") -> tuple[np.ndarray, str]:
        """Positions of a seeded k-per-class sample of ``split`` and the note on classes that had fewer than k."""
        table = self.dataset.table.iloc[self.rows]
        table = table[table["label"].notna()]
        picked = k_shot_sample(table, k, seed, split)
        pos_of = {i: p for p, i in enumerate(self.ids.tolist())}
        return np.asarray(sorted(pos_of[i] for i in picked.table["id"]), dtype=np.int64), picked.note()

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def classes_without(self, split: str = "train") -> list[str]:
        """Classes with labelled items in the data but none in ``split`` (hash splits can leave a rare class out)."""
        present = set(self.y[(self.split == split) & (self.y >= 0)].tolist())
        labelled = set(self.y[self.y >= 0].tolist())
        return [self.classes[c] for c in sorted(labelled - present)]

    def notes(self) -> list[str]:
        """What a user must know about these embeddings before reading a result: a carved validation split,
        unlabelled items left out, classes with no training items."""
        return [n for n in (self.validation_note, self.unlabelled_note(), self.untrained_class_note(),
                            self.duplicate_note()) if n]

    def test_items_with_copies(self) -> int:
        """Test items whose exact content (same file bytes / same text) is also in train or val: a leak of labels."""
        if self.keys is None:
            return 0
        known = {k for k, s in zip(self.keys, self.split) if s in ("train", "val") and k is not None}
        return int(sum(1 for k, s in zip(self.keys, self.split) if s == "test" and k in known))

    def duplicate_note(self) -> str:
        n = self.test_items_with_copies()
        if not n:
            return ""
        what = "images" if self.modality == "image" else "texts"
        return (f"{n} test item(s) have an identical copy (same {what[:-1]} content) in train or val: a head can "
                "look their labels up, so test numbers on them are optimistic")

    def unlabelled_note(self) -> str:
        """A sentence counting the usable items without a label, which classification leaves out ("" if none)."""
        n = int((self.y < 0).sum())
        if not n or not self.classes:
            return ""
        by_split = {s: int(((self.y < 0) & (self.split == s)).sum()) for s in sorted({str(x) for x in self.split})}
        where = ", ".join(f"{k} {v}" for k, v in by_split.items() if v)
        return f"{n} item(s) have no label and were left out of classification ({where})"

    def untrained_class_note(self) -> str:
        """A sentence naming the classes with no training items ("" when every class has some)."""
        missing = self.classes_without("train")
        if not missing:
            return ""
        index = {c: i for i, c in enumerate(self.classes)}
        where = {s: int(np.isin(self.y[self.split == s], [index[c] for c in missing]).sum()) for s in ("val", "test")}
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        names = ", ".join(repr(c) for c in missing[:10]) + more
        verb = "has" if len(missing) == 1 else "have"
        return (f"{names} {verb} no training items: a head cannot predict {'it' if len(missing) == 1 else 'them'}, "
                f"so {where['test']} test item(s) count as errors and {where['val']} val item(s) are left out of "
                "choosing (re-split with another --seed or --split-ratios to give every class training items)")

    @property
    def validation_note(self) -> str:
        """A sentence for the output when the validation split was carved out of train ("" otherwise)."""
        return validation_note(self.dataset.split_info)


def validation_note(split_info: dict) -> str:
    if split_info.get("method") != "carved":
        return ""
    return (f"the data has no val split: {split_info['items']} items ({split_info['fraction']:.0%} of each class) "
            f"were carved out of train by id hash (seed {split_info['seed']}) to choose on; test is untouched")


def labelled_embeddings(
    encoder: Encoder,
    dataset: Dataset,
    store: EmbeddingStore,
    *,
    modality: str | None = None,
    progress: bool = True,
    require_labels: bool = True,
    val_seed: int = 0,
) -> LabelledEmbeddings:
    """Embed (or read from the store) every usable row of ``dataset`` in the encoder's space.

    When the dataset has a train split but no val split, a validation part is carved from train first
    (``Dataset.ensure_validation(seed=val_seed)``), so every rung that chooses something has data to choose on.
    """
    dataset = dataset.ensure_validation(seed=val_seed)
    if modality is None:
        modality = "image" if dataset.has_images and "image" in encoder.modalities else "text"
    if modality not in ("image", "text"):
        raise EncoderlabError(f"unknown modality {modality!r}", "use image or text")
    encoder.check_modality(modality)
    classes = dataset.classes
    if require_labels and not classes:
        raise EncoderlabError(
            f"dataset {dataset.source!r} has no labels",
            "classification needs a label column (folder:DIR uses class folders; csv:...?label=COLUMN)",
        )
    result: ExtractResult | None = None
    if modality == "image":
        if not dataset.has_images:
            raise EncoderlabError(f"dataset {dataset.source!r} has no images",
                                  "classify its texts instead (probe --modality text), or use another dataset")
        emb = image_embeddings(encoder, dataset, store, progress=progress)
        X, rows, result = emb.X, emb.rows, emb.result
        keys = np.asarray([result.keys[int(r)] for r in rows], dtype=object)
    else:
        firsts = [t[0] if t else None for t in dataset.table["texts"]]
        rows = np.asarray([i for i, t in enumerate(firsts) if t is not None], dtype=np.int64)
        if rows.size == 0:
            raise EncoderlabError(f"dataset {dataset.source!r} has no texts",
                                  "classify its images instead (probe --modality image), or use another dataset")
        X = text_embeddings(encoder, [firsts[i] for i in rows], store, progress=progress)
        keys = np.asarray([text_key(firsts[i]) for i in rows], dtype=object)
    t = dataset.table.iloc[rows]
    class_index = {c: i for i, c in enumerate(classes)}
    y = np.asarray([class_index.get(v, -1) if v is not None else -1 for v in t["label"]], dtype=np.int64)
    split = np.asarray([s if isinstance(s, str) else None for s in t["split"]], dtype=object)
    return LabelledEmbeddings(dataset, modality, X, rows, np.asarray(t["id"].astype(str)), y, split, classes, result,
                              keys)
