"""Metrics: classification against sklearn and naive loops, retrieval against a full-matrix sort, bootstrap sanity."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
from sklearn import metrics as skm

from encoderlab.errors import EncoderlabError
from encoderlab.metrics import (
    balanced_accuracy,
    bootstrap_ci,
    classification_intervals,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    mean_reciprocal_rank,
    paired_bootstrap,
    pairs_from_captions,
    per_class_recall,
    per_item_topk_correct,
    per_query_hits,
    recall_at_k,
    retrieval_metrics,
    retrieval_ranks,
    top_k_accuracy,
    with_intervals,
)

# ---------------------------------------------------------------- classification


def _cls_data(seed: int, n: int = 400, c: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels missing classes 3 and 7, and scores that never predict class 5 but sometimes predict 3."""
    rng = np.random.default_rng(seed)
    y = rng.choice([k for k in range(c) if k not in (3, 7)], size=n)
    scores = rng.normal(size=(n, c))
    scores[np.arange(n), y] += 1.0
    scores[:, 5] -= 10.0
    return y, scores, scores.argmax(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_sklearn(seed: int) -> None:
    y, scores, pred = _cls_data(seed)
    c = scores.shape[1]
    assert 3 in pred and 5 not in pred and 3 not in y  # the missing-class cases are really exercised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about classes missing from y_true / y_pred
        assert top_k_accuracy(y, scores, 1) == pytest.approx(skm.accuracy_score(y, pred))
        for k in (2, 5):
            assert top_k_accuracy(y, scores, k) == pytest.approx(
                skm.top_k_accuracy_score(y, scores, k=k, labels=np.arange(c)))
        assert balanced_accuracy(y, pred, c) == pytest.approx(skm.balanced_accuracy_score(y, pred))
        assert balanced_accuracy(y, pred) == pytest.approx(skm.balanced_accuracy_score(y, pred))
        assert macro_f1(y, pred, c) == pytest.approx(skm.f1_score(y, pred, average="macro"))
        assert macro_f1(y, pred) == pytest.approx(skm.f1_score(y, pred, average="macro"))
        sk_recall = skm.recall_score(y, pred, average=None, labels=np.arange(c), zero_division=0)
    np.testing.assert_array_equal(confusion_matrix(y, pred, c), skm.confusion_matrix(y, pred, labels=np.arange(c)))
    ours = per_class_recall(y, pred, c)
    present = np.isin(np.arange(c), y)
    assert np.all(np.isnan(ours[~present]))
    np.testing.assert_allclose(ours[present], sk_recall[present])


def test_classification_matches_naive_loops_with_ties() -> None:
    rng = np.random.default_rng(3)
    n, c = 300, 7
    y = rng.integers(0, c, n)
    scores = rng.integers(0, 3, size=(n, c)).astype(float)  # 3 levels: ties everywhere
    pred = scores.argmax(axis=1)
    for k in (1, 2, 3, 7, 50):
        naive = []
        for i in range(n):
            order = sorted(range(c), key=lambda j: (-scores[i, j], j))  # stable: lower class index first
            naive.append(y[i] in order[:k])
        np.testing.assert_array_equal(per_item_topk_correct(y, scores, k), naive)
    # with this tie rule top-1 is exactly "argmax is right", so a constant scorer is not rewarded for ties
    np.testing.assert_array_equal(per_item_topk_correct(y, scores, 1), pred == y)
    assert top_k_accuracy(y, np.zeros((n, c)), 1) == pytest.approx(np.mean(y == 0))
    cm = np.zeros((c, c), dtype=int)
    for t, p in zip(y, pred, strict=True):
        cm[t, p] += 1
    np.testing.assert_array_equal(confusion_matrix(y, pred, c), cm)
    recalls = [cm[k, k] / cm[k].sum() for k in range(c) if cm[k].sum()]
    assert balanced_accuracy(y, pred, c) == pytest.approx(np.mean(recalls))
    f1s = []
    for k in range(c):
        tp, fp, fn = cm[k, k], cm[:, k].sum() - cm[k, k], cm[k].sum() - cm[k, k]
        if cm[k].sum() or cm[:, k].sum():
            f1s.append(2 * tp / (2 * tp + fp + fn))
    assert macro_f1(y, pred, c) == pytest.approx(np.mean(f1s))
    assert top_k_accuracy(y, scores, 100) == 1.0  # k clipped to C


def test_classification_metrics_keys() -> None:
    y, scores, pred = _cls_data(0)
    names = [f"c{k}" for k in range(12)]
    out = classification_metrics(y, scores, names)
    recall_keys = {f"recall/c{k}" for k in range(12) if k not in (3, 7)}
    assert set(out) == {"top1", "top5", "balanced_accuracy", "macro_f1", "n_items"} | recall_keys
    assert out["n_items"] == 400 and out["top1"] == pytest.approx(np.mean(pred == y))
    assert out["recall/c5"] == 0.0 and out["macro_f1"] == pytest.approx(macro_f1(y, pred, 12))
    small = classification_metrics([0, 1, 2, 2], np.eye(4)[[0, 1, 1, 2]], ["a", "b", "c", "d"])
    assert "top5" not in small and set(small) == {"top1", "balanced_accuracy", "macro_f1", "n_items",
                                                  "recall/a", "recall/b", "recall/c"}
    assert small["top1"] == 0.75 and small["recall/c"] == 0.5 and small["balanced_accuracy"] == pytest.approx(5 / 6)


@pytest.mark.parametrize("call", [
    lambda: top_k_accuracy([0, 5], np.zeros((2, 3)), 1),  # label out of range
    lambda: top_k_accuracy([0, 1, 1], np.zeros((2, 3)), 1),  # rows != labels
    lambda: top_k_accuracy([], np.zeros((0, 3)), 1),  # empty
    lambda: top_k_accuracy([0, 1], np.zeros((2, 3)), 0),  # k < 1
    lambda: top_k_accuracy([0, 1], np.array([[0.0, np.nan, 1.0], [1, 2, 3]]), 1),  # NaN score
    lambda: top_k_accuracy([0.5, 1], np.zeros((2, 3)), 1),  # non-integer label
    lambda: confusion_matrix([0, 1], [0, 1, 1], 2),  # length mismatch
    lambda: confusion_matrix([0, -1], [0, 1], 2),  # negative label
    lambda: macro_f1([0, 3], [0, 1], 3),  # beyond n_classes
    lambda: classification_metrics([0, 1], np.zeros((2, 3)), ["a", "b"]),  # names != columns
])
def test_classification_bad_input(call: Callable[[], object]) -> None:
    with pytest.raises(EncoderlabError):
        call()


# ---------------------------------------------------------------- retrieval


def naive_ranks(q: np.ndarray, g: np.ndarray, positives: list[set[int]]) -> np.ndarray:
    """Full score matrix, sort each row with ties putting positives first, rank = position of the first positive."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    out = []
    for i in range(len(q)):
        if not positives[i]:
            out.append(-1)
            continue
        s = [float(np.dot(q[i].astype(np.float64), g[j].astype(np.float64))) for j in range(len(g))]
        order = sorted(range(len(g)), key=lambda j: (-s[j], j not in positives[i]))
        out.append(next(r for r, j in enumerate(order) if j in positives[i]) + 1)
    return np.array(out)


def _multi_caption_data(seed: int, ternary: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """40 images with 0-4 captions each drawn from 60 distinct texts, so many texts are shared by images."""
    rng = np.random.default_rng(seed)
    n_img, n_txt, d = 40, 60, 16
    caps = [rng.choice(n_txt, size=rng.integers(0, 5), replace=False) for _ in range(n_img)]
    pi = np.concatenate([np.full(len(c), i) for i, c in enumerate(caps)]).astype(int)
    pt = np.concatenate(caps).astype(int)
    if ternary:
        # +-1 entries in 16 dims: unit vectors have entries +-1/4, so every cosine is an exact multiple of 1/16
        # and ties are everywhere; float rounding cannot differ between the naive and chunked computations
        txt = rng.choice([-1.0, 1.0], size=(n_txt, d))
        img = rng.choice([-1.0, 1.0], size=(n_img, d))
    else:
        txt = rng.normal(size=(n_txt, d))
        img = rng.normal(size=(n_img, d))
        for i, c in enumerate(caps):  # images resemble their captions, so ranks are spread out, not all random
            img[i] += txt[c].sum(axis=0) * 0.7
    return img, txt, pi, pt


@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_ranks_match_naive(seed: int, ternary: bool) -> None:
    img, txt, pi, pt = _multi_caption_data(seed, ternary)
    i2t_pos = [set(pt[pi == i]) for i in range(len(img))]
    t2i_pos = [set(pi[pt == j]) for j in range(len(txt))]
    want_i2t, want_t2i = naive_ranks(img, txt, i2t_pos), naive_ranks(txt, img, t2i_pos)
    assert (want_i2t == -1).any() and (want_t2i == -1).any()  # queries without positives are exercised
    assert max(len(p) for p in t2i_pos) > 1  # shared captions are exercised
    for chunk in (1, 3, 1000):
        for g_chunk in (7, 1 << 15):
            i2t, t2i = retrieval_ranks(img, txt, pi, pt, chunk, gallery_chunk=g_chunk)
            np.testing.assert_array_equal(i2t, want_i2t)
            np.testing.assert_array_equal(t2i, want_t2i)
    m = retrieval_metrics(img, txt, pi, pt, chunk_size=5)
    ok = want_i2t[want_i2t > 0]
    assert m["i2t_queries"] == ok.size and m["i2t_R@5"] == pytest.approx(np.mean(ok <= 5))
    assert m["i2t_mrr"] == pytest.approx(np.mean(1 / ok)) and m["i2t_median_rank"] == np.median(ok)
    n_pos = np.array([len(p) for p in t2i_pos if p])
    assert m["t2i_chance_R@1"] == pytest.approx(np.mean(n_pos / len(img)))


def test_shared_caption_counted_once_not_as_a_miss() -> None:
    # "a dog" describes images 0 and 1 but looks more like image 0
    captions = [["a dog"], ["a dog", "a cat"], ["a bird"]]
    emb = {"a dog": [1.0, 0.5, 0.0], "a cat": [0.1, 1.0, 0.0], "a bird": [0.0, 0.0, 1.0]}
    img = np.eye(3)
    texts, pi, pt = pairs_from_captions(captions)
    assert texts == ["a dog", "a cat", "a bird"] and pi.tolist() == [0, 1, 1, 2] and pt.tolist() == [0, 0, 1, 2]
    _, t2i = retrieval_ranks(img, np.array([emb[t] for t in texts]), pi, pt)
    assert t2i.tolist() == [1, 1, 1]
    # naively one text per (image, caption): the copy belonging to image 1 ranks image 0 first, a false miss
    flat = [(i, c) for i, caps in enumerate(captions) for c in caps]
    naive_txt = np.array([emb[c] for _, c in flat])
    _, t2i_dup = retrieval_ranks(img, naive_txt, [i for i, _ in flat], np.arange(len(flat)))
    assert t2i_dup.tolist() == [1, 2, 1, 1]
    assert recall_at_k(t2i_dup, 1) < recall_at_k(t2i, 1) == 1.0


def test_perfect_embedding_and_metric_keys() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8))
    m = retrieval_metrics(emb, emb * 3.0, np.arange(50), np.arange(50), ks=(1, 5, 10), chunk_size=7)
    keys = {f"{d}_{k}" for d in ("i2t", "t2i") for k in ("R@1", "R@5", "R@10", "mrr", "median_rank", "queries",
                                                         "chance_R@1")}
    assert set(m) == keys
    assert m["i2t_R@1"] == m["t2i_R@1"] == m["i2t_mrr"] == m["t2i_median_rank"] == 1.0
    assert m["i2t_queries"] == 50 and m["i2t_chance_R@1"] == pytest.approx(1 / 50)


def test_rank_helpers_exclude_queries_without_positives() -> None:
    ranks = np.array([1, -1, 3, 12, 2])
    assert per_query_hits(ranks, 2).tolist() == [True, False, False, True]
    assert recall_at_k(ranks, 3) == 0.75
    assert mean_reciprocal_rank(ranks) == pytest.approx((1 + 1 / 3 + 1 / 12 + 1 / 2) / 4)
    with pytest.raises(EncoderlabError):
        recall_at_k(np.array([-1, -1]), 1)


def test_pairs_from_captions_dedupes() -> None:
    texts, pi, pt = pairs_from_captions([["a", "b", "a"], [], ["b", "c"]])
    assert texts == ["a", "b", "c"] and pi.tolist() == [0, 0, 2, 2] and pt.tolist() == [0, 1, 1, 2]
    with pytest.raises(EncoderlabError):
        pairs_from_captions(["a dog", "a cat"])  # strings, not lists of strings


@pytest.mark.parametrize("call", [
    lambda e: retrieval_ranks(e[:, :3], e, [0], [0]),  # dimension mismatch
    lambda e: retrieval_ranks(e, e, [0, 9], [0, 1]),  # image index out of range
    lambda e: retrieval_ranks(e, e, [0, 1], [0, -1]),  # negative text index
    lambda e: retrieval_ranks(e, e, [0, 1], [0]),  # pair arrays of different length
    lambda e: retrieval_ranks(e, e, [], []),  # no pairs
    lambda e: retrieval_ranks(np.zeros((2, 4)), e, [0], [0]),  # zero vector
    lambda e: retrieval_ranks(e, e, [0], [0], chunk_size=0),
    lambda e: retrieval_metrics(e, e[:0], [0], [0]),  # empty gallery
])
def test_retrieval_bad_input(call: Callable[[np.ndarray], object]) -> None:
    with pytest.raises(EncoderlabError):
        call(np.random.default_rng(0).normal(size=(4, 4)))


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_mean_coverage_and_width() -> None:
    x = (np.random.default_rng(0).random(2000) < 0.7).astype(float)
    lo, hi = bootstrap_ci(x, n_boot=2000, seed=1)
    assert lo < 0.7 < hi and lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.21 / 2000), rel=0.25)
    assert bootstrap_ci(x, n_boot=2000, seed=1) == (lo, hi)  # deterministic per seed
    assert bootstrap_ci(x, n_boot=2000, seed=2) != (lo, hi)
    assert bootstrap_ci(x.astype(bool), n_boot=2000, seed=1) == (lo, hi)


def test_bootstrap_callable_forms_agree_with_array_form() -> None:
    x = np.random.default_rng(4).normal(size=300)
    want = bootstrap_ci(x, n_boot=200, seed=3)
    per_draw = bootstrap_ci(lambda idx: float(x[idx].mean()), 300, n_boot=200, seed=3)
    batched = bootstrap_ci(lambda idx: x[idx].mean(axis=1), 300, n_boot=200, seed=3, batched=True)
    assert per_draw == pytest.approx(want) and batched == pytest.approx(want)


def test_paired_bootstrap() -> None:
    rng = np.random.default_rng(5)
    a = (rng.random(1000) < 0.8).astype(float)
    assert paired_bootstrap(a, a.copy()) == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}
    b = (rng.random(1000) < 0.6).astype(float)
    out = paired_bootstrap(a, b, n_boot=500, seed=0)
    assert out["diff"] == pytest.approx(a.mean() - b.mean())
    assert out["ci_low"] < out["diff"] < out["ci_high"] and out["ci_low"] > 0 and out["p_value"] < 0.01
    flipped = paired_bootstrap(b, a, n_boot=500, seed=0)
    assert flipped["diff"] == pytest.approx(-out["diff"]) and flipped["p_value"] < 0.01
    stat = paired_bootstrap(lambda i: a[i].mean(), lambda i: b[i].mean(), n_items=1000, n_boot=500, seed=0)
    assert stat == pytest.approx(out)
    # a small, noisy difference is not significant
    c = a.copy()
    c[:3] = 1 - c[:3]
    assert paired_bootstrap(a, c, n_boot=500)["p_value"] > 0.05


@pytest.mark.parametrize("call", [
    lambda: bootstrap_ci(np.array([])),
    lambda: bootstrap_ci(np.ones((3, 2))),
    lambda: bootstrap_ci(lambda idx: 0.0),  # callable without n_items
    lambda: bootstrap_ci(np.ones(5), n_items=6),
    lambda: bootstrap_ci(np.ones(5), alpha=1.5),
    lambda: bootstrap_ci(np.ones(5), n_boot=0),
    lambda: bootstrap_ci(np.array([1.0, np.nan])),
    lambda: paired_bootstrap(np.ones(5), np.ones(6)),
    lambda: paired_bootstrap(np.array([]), np.array([])),
    lambda: with_intervals({"acc": 0.9}, {"acc": np.array([1.0, 0.0])}),  # mean != metric
])
def test_bootstrap_bad_input(call: Callable[[], object]) -> None:
    with pytest.raises(EncoderlabError):
        call()


def test_with_intervals_retrieval() -> None:
    img, txt, pi, pt = _multi_caption_data(0, ternary=False)
    i2t, t2i = retrieval_ranks(img, txt, pi, pt)
    m = retrieval_metrics(img, txt, pi, pt)
    out = with_intervals(m, {"i2t_R@1": per_query_hits(i2t, 1), "t2i_R@5": per_query_hits(t2i, 5)}, n_boot=300)
    assert set(out) - set(m) == {"i2t_R@1_ci_low", "i2t_R@1_ci_high", "t2i_R@5_ci_low", "t2i_R@5_ci_high"}
    for name in ("i2t_R@1", "t2i_R@5"):
        assert out[f"{name}_ci_low"] <= m[name] <= out[f"{name}_ci_high"]


def test_classification_intervals_match_callable_form() -> None:
    y, scores, pred = _cls_data(1, n=2000)
    c = scores.shape[1]
    point = classification_metrics(y, scores, [str(k) for k in range(c)])
    out = classification_intervals(y, scores, c, n_boot=300, seed=7)
    assert set(out) == {f"{m}_ci_{s}" for m in ("top1", "top5", "balanced_accuracy", "macro_f1")
                        for s in ("low", "high")}
    for name in ("top1", "top5", "balanced_accuracy", "macro_f1"):
        assert out[f"{name}_ci_low"] < point[name] < out[f"{name}_ci_high"]
    # the vectorised per-block counting equals recomputing each metric per draw through the public functions
    kw = {"n_boot": 300, "seed": 7}
    assert bootstrap_ci(lambda i: macro_f1(y[i], pred[i], c), len(y), **kw) == pytest.approx(
        (out["macro_f1_ci_low"], out["macro_f1_ci_high"]), rel=1e-12)
    assert bootstrap_ci(lambda i: balanced_accuracy(y[i], pred[i], c), len(y), **kw) == pytest.approx(
        (out["balanced_accuracy_ci_low"], out["balanced_accuracy_ci_high"]), rel=1e-12)
    assert bootstrap_ci(per_item_topk_correct(y, scores, 5), **kw) == pytest.approx(
        (out["top5_ci_low"], out["top5_ci_high"]), rel=1e-12)
    small = classification_intervals([0, 1, 1, 2], np.eye(3)[[0, 1, 2, 2]], n_boot=50)
    assert "top5_ci_low" not in small and "top1_ci_low" in small
    with pytest.raises(EncoderlabError):
        classification_intervals(y, scores, c + 1)
