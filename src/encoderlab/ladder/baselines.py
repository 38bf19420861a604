"""Simple baselines every ladder rung is reported against: what a task gives away without a pretrained encoder.

A rung that barely beats "always the commonest class", logistic regression on 16x16 pixels or on a colour
histogram, or TF-IDF words, has learnt little that the data did not hand over for free; a retrieval score close to
"rank captions by how often they occur in train" says the same for retrieval. Each baseline fits on train, chooses
its one knob (the L2 strength ``C``) on val, refits on train+val with that ``C`` (as the linear probe does), and is
scored once on test. Test labels are read only for those final numbers.

Images are decoded once each, at a small size, with the robust loader of ``data.images``; a file that cannot be
decoded is skipped and named in the baseline's ``skipped`` list and notes, never a crash. Test predictions are
class indices into ``dataset.classes`` (the order ``LabelledEmbeddings.classes`` uses), aligned with ``test_rows``
(dataset table rows), so a rung's per-item results can be compared with a baseline's item for item.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.images import load_image
from ..data.manifest import Dataset
from ..errors import BadImageError, EncoderlabError
from ..extract.embeddings import caption_pairs
from ..metrics.bootstrap import bootstrap_ci, classification_intervals
from ..metrics.classification import classification_metrics
from ..metrics.retrieval import metrics_from_ranks, per_query_hits, reciprocal_ranks
from ..progress import progress_bar

#: inverse L2 strengths tried on val, strongest regularization first (a tie keeps the simpler model)
DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
#: side of the raw-pixel thumbnail (16x16 RGB = 768 features)
PIXEL_SIZE = 16
#: bins per channel of the colour histogram, over R, G, B, H, S and V (6 x 8 = 48 features)
HIST_BINS = 8
#: side of the thumbnail the histogram is counted on: enough pixels for stable shares, cheap to make
_HIST_SIZE = 32
#: train items a logistic-regression baseline fits on at most (a seeded random subset beyond that, recorded)
MAX_TRAIN_ITEMS = 20_000
#: names of skipped images quoted in a note before "and N more"
_NAMED_SKIPS = 5


@dataclass
class Baseline:
    """One baseline's test result and how it was obtained.

    ``predictions[i]`` is the predicted class index (into ``classes``) of dataset row ``test_rows[i]``; retrieval
    baselines have none and carry their numbers in ``metrics`` (``i2t_R@1``, ..., with ``_ci_low``/``_ci_high``).
    ``selection`` says how knobs were chosen: ``"val"`` (``chosen`` on the ``sweep``), or ``"fixed"`` (nothing to
    choose). ``skipped`` lists ``{"id", "path", "reason"}`` for images that could not be decoded. A baseline that
    could not run at all has ``unavailable`` set to the reason and no numbers.
    """

    name: str
    kind: str  # "classification" or "retrieval"
    test_rows: np.ndarray
    predictions: np.ndarray | None
    classes: list[str]
    metrics: dict[str, float]
    val_metric: float | None
    val_metric_name: str
    fit_seconds: float
    selection: str
    chosen: dict[str, Any] = field(default_factory=dict)
    sweep: list[dict[str, float]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    feature_seconds: float = 0.0
    unavailable: str | None = None

    @property
    def primary(self) -> str:
        """The headline metric name: test top-1 for classification, image-to-text R@1 for retrieval."""
        return "top1" if self.kind == "classification" else "i2t_R@1"

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (predictions as a list), for a run directory or the Encoder Note."""
        return {"name": self.name, "kind": self.kind, "primary": self.primary,
                "test_rows": [int(r) for r in self.test_rows],
                "predictions": None if self.predictions is None else [int(p) for p in self.predictions],
                "classes": list(self.classes), "metrics": {k: _num(v) for k, v in self.metrics.items()},
                "val_metric": _num(self.val_metric), "val_metric_name": self.val_metric_name,
                "fit_seconds": round(self.fit_seconds, 4), "feature_seconds": round(self.feature_seconds, 4),
                "selection": self.selection, "chosen": dict(self.chosen), "sweep": [dict(s) for s in self.sweep],
                "skipped": [dict(s) for s in self.skipped], "notes": list(self.notes),
                "unavailable": self.unavailable}


def _num(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    return float(v)


# ---------------------------------------------------------------------------------------------- rows and labels


def _labels(ds: Dataset) -> np.ndarray:
    """Class index (into ``ds.classes``) of every table row; -1 for unlabelled rows."""
    index = {c: i for i, c in enumerate(ds.classes)}
    return np.asarray([index.get(v, -1) if v is not None else -1 for v in ds.table["label"]], dtype=np.int64)


def _split_rows(ds: Dataset, y: np.ndarray, split: str) -> np.ndarray:
    """Labelled table rows of one split."""
    return np.flatnonzero((ds.table["split"] == split).to_numpy() & (y >= 0))


def _test_rows(ds: Dataset, y: np.ndarray, test_rows: Sequence[int] | None) -> np.ndarray:
    """The rows predictions are aligned with: as given (checked), else every labelled test row."""
    if test_rows is None:
        return _split_rows(ds, y, "test")
    rows = np.asarray(test_rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= len(ds.table)):
        raise EncoderlabError(f"test_rows holds row {int(rows.max())}, out of range for {len(ds.table)} items",
                              "pass dataset table rows, e.g. LabelledEmbeddings.rows[le.index('test')]")
    return rows


def _prepare(ds: Dataset) -> Dataset:
    """The dataset with a val split (carved from train, as ``labelled_embeddings`` does) and checked labels."""
    ds = ds.ensure_validation()
    if not ds.classes:
        raise EncoderlabError(f"dataset {ds.source!r} has no labels", "classification baselines need a label column")
    if "train" not in ds.splits:
        raise EncoderlabError(f"dataset {ds.source!r} has no train split (it has {ds.splits})",
                              "make splits with --split-ratios train=0.8,val=0.1,test=0.1")
    return ds


def _classification(name: str, ds: Dataset, rows: np.ndarray, y: np.ndarray, scores: np.ndarray, *,
                    n_boot: int, seed: int, **fields: Any) -> Baseline:
    """A classification ``Baseline`` whose test numbers (with bootstrap intervals) are read from ``scores``."""
    pred = scores.argmax(axis=1).astype(np.int64)
    labelled = y[rows] >= 0
    metrics: dict[str, float] = {}
    if labelled.any():
        truth, s = y[rows][labelled], scores[labelled]
        full = classification_metrics(truth, s, ds.classes)
        metrics = {k: v for k, v in full.items() if not k.startswith("recall/")}
        metrics.update(classification_intervals(truth, s, len(ds.classes), n_boot=n_boot, seed=seed))
    return Baseline(name, "classification", rows, pred, list(ds.classes), metrics, **fields)


def unavailable(name: str, kind: str, why: str, classes: Sequence[str] = ()) -> Baseline:
    """A placeholder for a baseline that cannot run on this data, so the reason reaches the report."""
    return Baseline(name, kind, np.zeros(0, np.int64), None, list(classes), {}, None, "", 0.0, "fixed",
                    unavailable=why)


# ------------------------------------------------------------------------------------------------------ majority


def majority_baseline(ds: Dataset, *, test_rows: Sequence[int] | None = None, n_boot: int = 1000,
                      seed: int = 0) -> Baseline:
    """Always predict the commonest train class (ties: the first in ``ds.classes``): the floor of every rung."""
    ds = _prepare(ds)
    t0 = time.perf_counter()
    y = _labels(ds)
    train = _split_rows(ds, y, "train")
    if train.size == 0:
        return unavailable("majority", "classification", "no labelled train items", ds.classes)
    counts = np.bincount(y[train], minlength=len(ds.classes))
    best = int(np.argmax(counts))
    fit_seconds = time.perf_counter() - t0
    val = _split_rows(ds, y, "val")
    val_acc = float((y[val] == best).mean()) if val.size else None
    rows = _test_rows(ds, y, test_rows)
    scores = np.zeros((rows.size, len(ds.classes)), np.float32)
    scores[:, best] = 1.0
    note = f"always {ds.classes[best]!r} ({counts[best]} of {train.size} train items)"
    return _classification("majority", ds, rows, y, scores, n_boot=n_boot, seed=seed, val_metric=val_acc,
                           val_metric_name="val_top1", fit_seconds=fit_seconds, selection="fixed",
                           chosen={"class": ds.classes[best]}, notes=[note])


# ----------------------------------------------------------------------------------------- logistic regression


def _sklearn() -> Any:
    try:
        from sklearn import linear_model
    except ImportError:  # pragma: no cover - scikit-learn is in the dev extra
        raise EncoderlabError("the baselines need scikit-learn, which is not installed",
                              "pip install 'scikit-learn>=1.3' (or install encoderlab's dev extra)") from None
    return linear_model


def _cap_train(rows: np.ndarray, limit: int, seed: int) -> tuple[np.ndarray, str]:
    """At most ``limit`` train rows (a seeded random subset), and the note saying so ("" when all were kept)."""
    if rows.size <= limit:
        return rows, ""
    keep = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return keep, f"fitted on a seeded random {limit} of {rows.size} train items (keeps the baseline cheap)"


#: makes features from the rows preprocessing is learnt on: ``(F_fit, transform)``, ``transform(rows)`` for others
FeatureMaker = Callable[[np.ndarray], tuple[Any, Callable[[np.ndarray], Any]]]


def _fit_logreg(features: FeatureMaker, y: np.ndarray, train: np.ndarray, val: np.ndarray, Cs: Sequence[float],
                seed: int) -> tuple[Any, Callable[[np.ndarray], Any], dict[str, Any]]:
    """Sweep ``Cs`` (fit on train, accuracy on val), then refit on train+val with the best ``C``.

    Preprocessing (standardization, vocabulary) is learnt on the rows being fitted only. Returns the final model,
    the transform of its preprocessing, and the record ``{"sweep", "selection", "C", "val", "converged"}``.
    """
    try:
        dense = isinstance(features(train[:1])[0], np.ndarray)
    except ValueError:  # a vocabulary learnt from one text may be empty: sparse text features
        dense = False
    if dense:  # dense features: the linear rung's own solver (fast L-BFGS, same protocol)
        return _fit_dense(features, y, train, val, Cs, seed)
    lm = _sklearn()
    from sklearn.exceptions import ConvergenceWarning

    record: dict[str, Any] = {"sweep": [], "selection": "fixed", "C": 1.0, "val": None, "converged": True}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if val.size and len(np.unique(y[train])) > 1:
            F_train, transform = features(train)
            F_val = transform(val)
            model = lm.LogisticRegression(max_iter=500, warm_start=True, random_state=seed)
            for C in Cs:  # warm starts along the grid: each fit starts from the previous, stronger-regularized one
                model.set_params(C=float(C)).fit(F_train, y[train])
                record["sweep"].append({"C": float(C), "val_top1": float((model.predict(F_val) == y[val]).mean())})
            best = int(np.argmax([s["val_top1"] for s in record["sweep"]]))  # ties keep the smaller C
            record.update(selection="val", C=record["sweep"][best]["C"], val=record["sweep"][best]["val_top1"])
        fit_rows = np.concatenate([train, val])
        F_fit, transform = features(fit_rows)
        model = lm.LogisticRegression(C=record["C"], max_iter=1000, random_state=seed).fit(F_fit, y[fit_rows])
    record["converged"] = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model, transform, record


class _ProbeModel:
    """A fitted ``heads.LinearProbe`` in the shape ``_logreg_baseline`` reads (``classes_``, ``predict_proba``)."""

    def __init__(self, probe: Any) -> None:
        self.probe, self.classes_ = probe, np.asarray(probe.classes_)

    def predict_proba(self, F: np.ndarray) -> np.ndarray:
        return self.probe.predict_proba(F)


def _fit_dense(features: FeatureMaker, y: np.ndarray, train: np.ndarray, val: np.ndarray, Cs: Sequence[float],
               seed: int) -> tuple[Any, Callable[[np.ndarray], Any], dict[str, Any]]:
    """``_fit_logreg`` for dense features through ``heads.LinearProbe``: C swept on train / val, refit on both."""
    from ..cpu import small_fit_threads
    from ..heads.linear import LinearProbe

    fit_rows = np.concatenate([train, val])
    F_fit, transform = features(fit_rows)
    n_tr = train.size
    # standardize=True: z-scoring again with the train rows' statistics undoes the outer (train+val) affine map, so the
    # sweep sees train-only preprocessing, as the refit sees train+val
    probe = LinearProbe(Cs=list(Cs) if val.size else [1.0], seed=seed, refit=True, standardize=True)
    with small_fit_threads("cpu"):
        if val.size and len(np.unique(y[train])) > 1:
            probe.fit(F_fit[:n_tr], y[train], F_fit[n_tr:], y[val])
        else:
            probe.fit(F_fit, y[fit_rows])
    sweep = [{"C": float(r["C"]), "val_top1": float(r["val_accuracy"])} for r in probe.sweep_]
    record = {"sweep": sweep, "selection": "val" if sweep else "fixed", "C": float(probe.best_C_),
              "val": max((r["val_top1"] for r in sweep), default=None), "converged": True}
    return _ProbeModel(probe), transform, record


def _logreg_baseline(name: str, ds: Dataset, y: np.ndarray, usable: np.ndarray, rows: np.ndarray,
                     features: FeatureMaker, *, Cs: Sequence[float],
                     seed: int, n_boot: int, max_train: int, notes: list[str], skipped: list[dict[str, str]],
                     feature_seconds: float) -> Baseline:
    """Fit, choose, refit and score one logistic-regression baseline on rows whose features exist (``usable``)."""
    train = _split_rows(ds, y, "train")
    train, cap_note = _cap_train(train[usable[train]], max_train, seed)
    val = _split_rows(ds, y, "val")
    val = val[usable[val]]
    if len(np.unique(y[np.concatenate([train, val])])) < 2:
        return unavailable(name, "classification", "fewer than two classes among usable train/val items",
                           ds.classes)
    t0 = time.perf_counter()
    model, transform, record = _fit_logreg(features, y, train, val, Cs, seed)
    fit_seconds = time.perf_counter() - t0
    counts = np.bincount(y[train], minlength=len(ds.classes))
    scores = np.zeros((rows.size, len(ds.classes)), np.float64)
    scores[:, int(np.argmax(counts))] = 1.0  # a test item without features gets the majority class
    ok = usable[rows]
    if ok.any():
        scores[ok] = 0.0
        scores[np.ix_(ok, model.classes_.astype(np.int64))] = model.predict_proba(transform(rows[ok]))
    notes = list(notes) + [n for n in [cap_note] if n]
    if not ok.all():
        notes.append(f"{int((~ok).sum())} test item(s) without usable input were given the majority class")
    if not record["converged"]:
        notes.append("logistic regression stopped at its iteration limit for some C (a ConvergenceWarning)")
    return _classification(name, ds, rows, y, scores, n_boot=n_boot, seed=seed, val_metric=record["val"],
                           val_metric_name="val_top1", fit_seconds=fit_seconds, selection=record["selection"],
                           chosen={"C": record["C"]}, sweep=record["sweep"], skipped=skipped, notes=notes,
                           feature_seconds=feature_seconds)


def _standardized(F: np.ndarray) -> FeatureMaker:
    """Feature maker for dense features: z-score with the statistics of the fitting rows only."""

    def make(fit_rows: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
        mean = F[fit_rows].mean(axis=0)
        std = F[fit_rows].std(axis=0) + 1e-6
        return (F[fit_rows] - mean) / std, lambda rows: (F[rows] - mean) / std

    return make


# -------------------------------------------------------------------------------------------------------- images


@dataclass
class ImageFeatures:
    """Raw-pixel and colour-histogram features of image paths, decoded once; ``ok[i]`` False for bad files."""

    pixels: np.ndarray  # [n, size*size*3] float32 in [0, 1]
    histogram: np.ndarray  # [n, 6 * bins] float32, square roots of per-channel RGB and HSV bin shares (Hellinger)
    ok: np.ndarray
    skipped: list[dict[str, str]]
    seconds: float


def _image_vectors(path: str, size: int, bins: int, max_pixels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, histogram) of one file; ``BadImageError`` when it cannot be decoded."""
    from PIL import Image

    im = load_image(path, max_pixels=max_pixels)
    small = im.resize((_HIST_SIZE, _HIST_SIZE), Image.BILINEAR, reducing_gap=2.0)
    rgb = np.asarray(small, dtype=np.int64).reshape(-1, 3)
    pixels = np.asarray(small.resize((size, size), Image.BOX), dtype=np.float32).reshape(-1) / 255.0
    hsv = np.asarray(small.convert("HSV"), dtype=np.int64).reshape(-1, 3)
    channels = np.concatenate([rgb, hsv], axis=1) * bins // 256  # [pixels, 6] bin of each channel
    counts = np.bincount((channels + np.arange(6) * bins).reshape(-1), minlength=6 * bins)
    return pixels, np.sqrt(counts / rgb.shape[0]).astype(np.float32)


def image_features(paths: Sequence[str | None], *, size: int = PIXEL_SIZE, bins: int = HIST_BINS,
                   max_pixels: int | None = None, progress: bool = False, workers: int | None = None,
                   ids: Sequence[str] | None = None) -> ImageFeatures:
    """Decode every distinct path once (threads: Pillow releases the GIL while decoding) into both feature kinds.

    A None path or an undecodable file gets zero features and ``ok=False``, and is listed in ``skipped`` as
    ``{"id", "path", "reason"}``.
    """
    t0 = time.perf_counter()
    distinct = list(dict.fromkeys(p for p in paths if p is not None))
    found: dict[str, tuple[np.ndarray, np.ndarray] | BadImageError] = {}

    def one(p: str) -> tuple[np.ndarray, np.ndarray] | BadImageError:
        try:
            return _image_vectors(p, size, bins, max_pixels)
        except BadImageError as e:
            return e

    n_workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=n_workers) as pool, \
            progress_bar(len(distinct), "img", progress and bool(distinct), "decode", leave=False) as bar:
        for p, got in zip(distinct, pool.map(one, distinct)):
            found[p] = got
            bar.update(1)
    n = len(paths)
    pixels = np.zeros((n, size * size * 3), np.float32)
    hist = np.zeros((n, 6 * bins), np.float32)
    ok = np.zeros(n, bool)
    skipped: list[dict[str, str]] = []
    for i, p in enumerate(paths):
        got = found.get(p) if p is not None else None
        if isinstance(got, tuple):
            pixels[i], hist[i], ok[i] = got[0], got[1], True
        elif isinstance(got, BadImageError):
            skipped.append({"id": str(ids[i]) if ids is not None else str(i), "path": got.path, "reason": got.reason})
    return ImageFeatures(pixels, hist, ok, skipped, time.perf_counter() - t0)


def _skip_note(skipped: Sequence[dict[str, str]]) -> list[str]:
    if not skipped:
        return []
    named = ", ".join(f"{os.path.basename(s['path'])} ({s['reason']})" for s in skipped[:_NAMED_SKIPS])
    more = f" and {len(skipped) - _NAMED_SKIPS} more" if len(skipped) > _NAMED_SKIPS else ""
    return [f"{len(skipped)} image(s) could not be decoded and were left out: {named}{more}"]


def image_baselines(ds: Dataset, *, test_rows: Sequence[int] | None = None, Cs: Sequence[float] = DEFAULT_CS,
                    seed: int = 0, progress: bool = False, n_boot: int = 1000, max_train: int = MAX_TRAIN_ITEMS,
                    max_pixels: int | None = None) -> list[Baseline]:
    """Logistic regression on 16x16 RGB pixels (``pixels-16x16``) and on colour histograms (``color-histogram``).

    Pixels say how much a class is given away by layout and colour at thumbnail size; the histogram (8 bins per
    channel of RGB and HSV), by colour alone. Per-channel bins rather than a joint 8x8x8 histogram: with few
    training images a joint bin is often seen in test only, while a channel's bins are shared. Both feature kinds
    come from one decode of each train, val and test image.
    """
    ds = _prepare(ds)
    y = _labels(ds)
    names = ("pixels-16x16", "color-histogram")
    if not ds.has_images:
        return [unavailable(n, "classification", "the dataset has no images", ds.classes) for n in names]
    rows = _test_rows(ds, y, test_rows)
    need = np.zeros(len(ds.table), bool)
    need[np.concatenate([_split_rows(ds, y, "train"), _split_rows(ds, y, "val"), rows])] = True
    paths = [p if need[i] else None for i, p in enumerate(ds.table["image"].tolist())]
    feats = image_features(paths, max_pixels=max_pixels, progress=progress, ids=ds.table["id"].tolist())
    notes = _skip_note(feats.skipped)
    out = []
    for name, F in zip(names, (feats.pixels, feats.histogram)):
        out.append(_logreg_baseline(name, ds, y, feats.ok, rows, _standardized(F), Cs=Cs, seed=seed, n_boot=n_boot,
                                    max_train=max_train, notes=notes, skipped=feats.skipped,
                                    feature_seconds=feats.seconds))
    return out


# --------------------------------------------------------------------------------------------------------- texts


def _first_texts(ds: Dataset) -> list[str | None]:
    """The text classified for each row: its first caption, as ``labelled_embeddings`` embeds it."""
    return [t[0] if t else None for t in ds.table["texts"]]


def tfidf_baseline(ds: Dataset, *, test_rows: Sequence[int] | None = None, Cs: Sequence[float] = DEFAULT_CS,
                   seed: int = 0, n_boot: int = 1000, max_train: int = MAX_TRAIN_ITEMS) -> Baseline:
    """TF-IDF of word uni- and bigrams + logistic regression: how far the words alone decide the class.

    The vocabulary and IDF weights are learnt on the fitting rows only (train for the sweep, train+val after).
    """
    ds = _prepare(ds)
    y = _labels(ds)
    texts = _first_texts(ds)
    usable = np.asarray([t is not None for t in texts])
    if not usable.any():
        return unavailable("tfidf", "classification", "the dataset has no texts", ds.classes)
    from sklearn.feature_extraction.text import TfidfVectorizer

    def make(fit_rows: np.ndarray) -> tuple[Any, Callable[[np.ndarray], Any]]:
        vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), max_features=200_000)
        F_fit = vec.fit_transform([texts[r] for r in fit_rows])
        return F_fit, lambda rows: vec.transform([texts[r] for r in rows])

    rows = _test_rows(ds, y, test_rows)
    return _logreg_baseline("tfidf", ds, y, usable, rows, make, Cs=Cs, seed=seed, n_boot=n_boot,
                            max_train=max_train, notes=[], skipped=[], feature_seconds=0.0)


# ----------------------------------------------------------------------------------------------------- retrieval


def caption_frequencies(ds: Dataset, split: str = "train") -> Counter:
    """How many images of ``split`` carry each caption (a caption repeated on one image counts once)."""
    t = ds.table[(ds.table["split"] == split) & ds.table["image"].notna()]
    return Counter(c for caps in t["texts"] for c in set(caps))


def prior_ranks(ds: Dataset, split: str, freq: Counter, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Ranks of the content-blind prior on ``split``'s image-caption pairs: ``(i2t, t2i, pair_img, pair_txt)``.

    Image to text: every image gets the same order, its split's distinct captions by train frequency, most common
    first; equal frequencies are ordered by a seeded permutation, because the optimistic tie rule of the retrieval
    metrics would rank a positive tied with every other caption first. Text to image: no content-blind order
    exists (test images are unseen), so a seeded permutation, i.e. chance. None when the split has no pairs.
    """
    t = ds.table
    rows = np.flatnonzero(((t["split"] == split) & t["image"].notna()).to_numpy())
    texts, pair_img, pair_txt = caption_pairs(ds, rows)
    if not texts:
        return None
    rng = np.random.default_rng(seed)
    count = np.asarray([freq.get(c, 0) for c in texts], dtype=np.int64)
    order = np.lexsort((rng.permutation(len(texts)), -count))  # primary key: frequency, descending
    text_pos = np.empty(len(texts), np.int64)
    text_pos[order] = np.arange(len(texts))
    image_pos = rng.permutation(rows.size)
    # every gallery item above a query's best positive is a non-positive, so rank = 1 + the best positive's position
    return (_best_rank(rows.size, pair_img, text_pos[pair_txt]), _best_rank(len(texts), pair_txt, image_pos[pair_img]),
            pair_img, pair_txt)


def _best_rank(n_queries: int, query: np.ndarray, position: np.ndarray) -> np.ndarray:
    """1 + the smallest gallery position among each query's positives; -1 for a query without any."""
    none = np.iinfo(np.int64).max
    best = np.full(n_queries, none, np.int64)
    np.minimum.at(best, query, position + 1)
    best[best == none] = -1
    return best


def caption_prior_baseline(ds: Dataset, *, ks: Sequence[int] = (1, 5, 10), seed: int = 0,
                           n_boot: int = 1000) -> Baseline:
    """Recall@K / MRR on test pairs of ranking captions by their train frequency for every image (content-blind)."""
    name = "caption-prior"
    if not (ds.has_images and ds.has_texts):
        return unavailable(name, "retrieval", "retrieval needs images with captions")
    t0 = time.perf_counter()
    freq = caption_frequencies(ds, "train")
    fit_seconds = time.perf_counter() - t0
    test = prior_ranks(ds, "test", freq, seed) if "test" in ds.splits else None
    if test is None:
        return unavailable(name, "retrieval", "no captioned test image")
    i2t, t2i, pair_img, pair_txt = test
    metrics: dict[str, float] = dict(metrics_from_ranks(i2t, t2i, pair_img, pair_txt, ks))
    for d, ranks in (("i2t", i2t), ("t2i", t2i)):
        per_query = {f"{d}_R@{k}": per_query_hits(ranks, k) for k in ks}
        per_query[f"{d}_mrr"] = reciprocal_ranks(ranks)
        for key, values in per_query.items():
            metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    val = prior_ranks(ds, "val", freq, seed) if "val" in ds.splits else None
    val_r1 = float(per_query_hits(val[0], 1).mean()) if val is not None and (val[0] >= 1).any() else None
    notes = [f"captions ranked by how many train images carry them ({len(freq)} distinct train captions); "
             "text-to-image numbers are chance (a content-blind prior cannot order unseen images)"]
    rows = np.flatnonzero(((ds.table["split"] == "test") & ds.table["image"].notna()).to_numpy())
    return Baseline(name, "retrieval", rows, None, [], metrics, val_r1, "val_i2t_R@1", fit_seconds, "fixed",
                    notes=notes)


# ----------------------------------------------------------------------------------------------------- the entry


def run_baselines(ds: Dataset, *, modality: str, seed: int = 0, progress: bool = False,
                  test_rows: Sequence[int] | None = None, tasks: Sequence[str] | None = None,
                  n_boot: int = 1000) -> list[Baseline]:
    """Every baseline that applies to ``ds``: majority, plus pixels and colour histogram (``modality="image"``) or
    TF-IDF (``modality="text"``) for classification, and the caption-frequency prior for retrieval.

    ``tasks``: ``"classification"`` and/or ``"retrieval"``; default: classification when the data has labels,
    retrieval when it has images with captions. ``test_rows`` (dataset table rows) aligns the predictions with a
    rung's test items; default: every labelled test row. A baseline that cannot run comes back with
    ``unavailable`` set, so its absence is explained rather than silent.
    """
    if modality not in ("image", "text"):
        raise EncoderlabError(f"unknown modality {modality!r} for the baselines", "use image or text")
    if tasks is None:
        tasks = [t for t, ok in (("classification", bool(ds.classes)),
                                 ("retrieval", ds.has_images and ds.has_texts)) if ok]
    unknown = sorted(set(tasks) - {"classification", "retrieval"})
    if unknown:
        raise EncoderlabError(f"unknown baseline task(s) {unknown}", "use classification and/or retrieval")
    out: list[Baseline] = []
    if "classification" in tasks:
        out.append(majority_baseline(ds, test_rows=test_rows, n_boot=n_boot, seed=seed))
        if modality == "image":
            out += image_baselines(ds, test_rows=test_rows, seed=seed, progress=progress, n_boot=n_boot)
        else:
            out.append(tfidf_baseline(ds, test_rows=test_rows, seed=seed, n_boot=n_boot))
    if "retrieval" in tasks:
        out.append(caption_prior_baseline(ds, seed=seed, n_boot=n_boot))
    return out
