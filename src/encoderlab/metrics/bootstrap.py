"""Bootstrap confidence intervals, so a reported metric carries its sampling uncertainty.

Items (test images, queries) are resampled with replacement ``n_boot`` times and the metric recomputed on each
resample; the interval is the ``alpha/2`` and ``1 - alpha/2`` percentiles of those values (percentile
bootstrap). Resample indices come from ``np.random.default_rng(seed)`` in blocks of bounded size, so results are
deterministic for a given seed and memory stays bounded however many items there are.

Two methods compared on the same items must use ``paired_bootstrap``: resampling the items once per draw for both
keeps their correlation, which gives a much tighter (and correct) interval on the difference than two separate
intervals would suggest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import EncoderlabError
from .classification import as_class_indices, as_scores, f1_from_counts, top_k_rank

#: resample indices drawn per block (int64: 32 MiB), bounding memory for large n_items * n_boot
_BLOCK_ELEMS = 1 << 22

#: a per-item value array, or a statistic of a resample's item indices
ValuesOrStat = np.ndarray | Sequence[float] | Callable[[np.ndarray], float]


def _check_params(n_boot: int, alpha: float) -> None:
    """Refuse a draw count or level that would make the interval meaningless."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise EncoderlabError(f"n_boot must be a positive integer, got {n_boot!r}", "use e.g. n_boot=1000")
    if not 0.0 < alpha < 1.0:
        raise EncoderlabError(f"alpha must be in (0, 1), got {alpha!r}", "use alpha=0.05 for a 95% interval")


def _as_values(values: np.ndarray | Sequence[float], name: str) -> np.ndarray:
    """Per-item values as a finite, non-empty 1-D float64 array (booleans become 0/1)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise EncoderlabError(f"{name} must be 1-D (one value per item), got shape {arr.shape}",
                              "pass per-item values such as 0/1 correctness")
    if arr.size == 0:
        raise EncoderlabError(f"{name} is empty", "bootstrap needs at least one item")
    if arr.dtype.kind not in "biuf":
        raise EncoderlabError(f"{name} must be numeric, got dtype {arr.dtype}", "pass numbers or booleans")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise EncoderlabError(f"{name} holds NaN or infinite values", "drop or fix those items first")
    return arr


def _check_n_items(n_items: int | None) -> int:
    """The item count a callable statistic is resampled over."""
    if n_items is None:
        raise EncoderlabError("n_items is required when a callable statistic is given",
                              "pass n_items=<number of evaluated items>")
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 1:
        raise EncoderlabError(f"n_items must be a positive integer, got {n_items!r}", "bootstrap needs items")
    return int(n_items)


def resample_blocks(n_items: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield ``[rows, n_items]`` blocks of resample indices, ``n_boot`` rows in all, deterministic per seed."""
    rng = np.random.default_rng(seed)
    rows = max(1, min(n_boot, _BLOCK_ELEMS // n_items))
    done = 0
    while done < n_boot:
        r = min(rows, n_boot - done)
        yield rng.integers(0, n_items, size=(r, n_items))
        done += r


def _boot_stats(n_items: int, n_boot: int, seed: int, batch_stat: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``n_boot`` bootstrap replicates of a statistic that maps an index block ``[r, n]`` to ``r`` values."""
    out = np.concatenate([np.asarray(batch_stat(idx), dtype=np.float64).reshape(-1)
                          for idx in resample_blocks(n_items, n_boot, seed)])
    if out.size != n_boot:
        raise EncoderlabError(f"the batched statistic returned {out.size} values for {n_boot} resamples",
                              "return one value per row of the index block")
    if not np.all(np.isfinite(out)):
        raise EncoderlabError("the statistic returned NaN or infinite values on some resamples",
                              "make the statistic defined on every non-empty resample")
    return out


def _batch_of(values_or_stat: ValuesOrStat, n_items: int | None,
              batched: bool) -> tuple[int, Callable[[np.ndarray], np.ndarray]]:
    """(n_items, statistic of an index block) for either accepted input form."""
    if callable(values_or_stat):
        n = _check_n_items(n_items)
        stat = values_or_stat
        if batched:
            return n, stat
        return n, lambda idx: np.array([stat(row) for row in idx], dtype=np.float64)
    values = _as_values(values_or_stat, "values")
    if n_items is not None and n_items != values.size:
        raise EncoderlabError(f"n_items={n_items} but {values.size} values were given",
                              "leave n_items out when passing per-item values")
    return values.size, lambda idx: values[idx].mean(axis=1)


def _interval(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def bootstrap_ci(values_or_stat: ValuesOrStat, n_items: int | None = None, *, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0, batched: bool = False) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` interval at level ``1 - alpha``.

    Two forms:

    * a 1-D array of per-item values (e.g. 0/1 correctness): interval of their mean, fully vectorised;
    * a callable ``stat(idx) -> float`` over item indices plus ``n_items``, for metrics that are not a mean of
      per-item values (balanced accuracy, macro-F1). With ``batched=True`` the callable instead receives an
      ``[r, n_items]`` block of resamples and returns ``r`` values, which avoids a Python call per draw.
    """
    _check_params(n_boot, alpha)
    n, batch_stat = _batch_of(values_or_stat, n_items, batched)
    return _interval(_boot_stats(n, int(n_boot), seed, batch_stat), alpha)


def paired_bootstrap(a: ValuesOrStat, b: ValuesOrStat, *, n_items: int | None = None, n_boot: int = 1000,
                     alpha: float = 0.05, seed: int = 0) -> dict[str, float]:
    """Difference ``a - b`` between two methods scored on the same items, with interval and two-sided p-value.

    ``a`` and ``b`` are either per-item value arrays of equal length (the difference of their means is
    tested) or two callables ``stat(idx) -> float`` plus ``n_items``. Each draw resamples the items once and
    applies the same indices to both methods. ``p_value`` = 2 x min(share of draws with diff <= 0, share with
    diff >= 0), capped at 1; a p_value of 0 means "below 1 / n_boot", not exactly zero.

    Returns ``{"diff", "ci_low", "ci_high", "p_value"}``.
    """
    _check_params(n_boot, alpha)
    if callable(a) != callable(b):
        raise EncoderlabError("one of a, b is a callable and the other per-item values",
                              "pass two arrays of per-item values or two statistics")
    if callable(a):
        n = _check_n_items(n_items)
        full = np.arange(n)
        diff = float(a(full)) - float(b(full))
        boot = _boot_stats(n, int(n_boot), seed,
                           lambda idx: np.array([float(a(row)) - float(b(row)) for row in idx]))
    else:
        va, vb = _as_values(a, "a"), _as_values(b, "b")
        if va.size != vb.size:
            raise EncoderlabError(f"a has {va.size} items but b has {vb.size}",
                                  "score both methods on the same items, in the same order")
        if n_items is not None and n_items != va.size:
            raise EncoderlabError(f"n_items={n_items} but {va.size} values were given",
                                  "leave n_items out when passing per-item values")
        d = va - vb  # mean(a[idx]) - mean(b[idx]) == mean(d[idx]): one array to resample
        diff = float(d.mean())
        boot = _boot_stats(d.size, int(n_boot), seed, lambda idx: d[idx].mean(axis=1))
    lo, hi = _interval(boot, alpha)
    p = min(1.0, 2.0 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0))))
    return {"diff": diff, "ci_low": lo, "ci_high": hi, "p_value": p}


def with_intervals(metrics: Mapping[str, float], per_item: Mapping[str, np.ndarray], *, n_boot: int = 1000,
                   alpha: float = 0.05, seed: int = 0) -> dict[str, float]:
    """A copy of ``metrics`` with ``<name>_ci_low`` / ``<name>_ci_high`` added for every name in ``per_item``.

    ``per_item[name]`` holds per-query values whose mean is ``metrics[name]`` (e.g. ``per_query_hits`` for
    R@k); a mismatch is refused because the interval would then belong to a different number.
    """
    out = dict(metrics)
    for name, values in per_item.items():
        arr = _as_values(values, f"per_item[{name!r}]")
        if name in metrics and not np.isclose(arr.mean(), float(metrics[name]), rtol=1e-9, atol=1e-9):
            raise EncoderlabError(f"per_item[{name!r}] has mean {arr.mean():.6g} but metrics[{name!r}] is "
                                  f"{float(metrics[name]):.6g}",
                                  "pass the per-item values the metric was computed from (same items, same scale)")
        lo, hi = bootstrap_ci(arr, n_boot=n_boot, alpha=alpha, seed=seed)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = lo, hi
    return out


def classification_intervals(y_true: np.ndarray | Sequence[int], scores: np.ndarray, n_classes: int | None = None,
                             n_boot: int = 1000, seed: int = 0, *, alpha: float = 0.05) -> dict[str, float]:
    """Bootstrap intervals for the headline numbers of ``classification_metrics``.

    Keys: ``top1_ci_low/high``, ``top5_ci_low/high`` (only when there are more than 5 classes),
    ``balanced_accuracy_ci_low/high`` and ``macro_f1_ci_low/high``. The last two are not means of per-item
    values, so each draw recomputes them from per-class counts (one ``np.bincount`` per block of draws); the
    draws are those ``bootstrap_ci`` makes with the same seed, so the callable form gives the same intervals.
    """
    _check_params(n_boot, alpha)
    scores = np.asarray(scores)
    if scores.ndim == 2 and n_classes is not None and scores.shape[1] != n_classes:
        raise EncoderlabError(f"scores has {scores.shape[1]} columns but n_classes={n_classes}",
                              "pass one score column per class")
    c = scores.shape[1] if scores.ndim == 2 else n_classes
    y = as_class_indices(y_true, "y_true", c)
    scores = as_scores(scores, y.size)
    rank = top_k_rank(y, scores)
    pred = scores.argmax(axis=1)
    n = y.size
    # one gather gives (true class, correct?) per resampled item: key // 2 is the class, key % 2 the hit
    true_hit = y * 2 + (pred == y)
    top5 = rank < 5
    stats: dict[str, list[np.ndarray]] = {"top1": [], "top5": [], "balanced_accuracy": [], "macro_f1": []}
    # all four statistics share each block of resamples (the same draws bootstrap_ci makes for this seed)
    for idx in resample_blocks(n, int(n_boot), seed):
        r = idx.shape[0]
        draw = np.arange(r)[:, None]
        th = np.bincount((draw * (2 * c) + true_hit[idx]).ravel(), minlength=r * 2 * c).reshape(r, c, 2)
        n_pred = np.bincount((draw * c + pred[idx]).ravel(), minlength=r * c).reshape(r, c)
        tp, n_true = th[:, :, 1], th.sum(axis=2)
        stats["top1"].append(tp.sum(axis=1) / n)
        if c > 5:
            stats["top5"].append(top5[idx].mean(axis=1))
        present = n_true > 0  # a resample is never empty, so at least one class is present
        recall = np.where(present, tp / np.maximum(n_true, 1), 0.0)
        stats["balanced_accuracy"].append(recall.sum(axis=1) / present.sum(axis=1))
        stats["macro_f1"].append(f1_from_counts(tp, n_true, n_pred))
    out: dict[str, float] = {}
    for name, parts in stats.items():
        if parts:
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = _interval(np.concatenate(parts), alpha)
    return out
