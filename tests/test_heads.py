"""Heads on frozen embeddings: LinearProbe vs scikit-learn, KNNClassifier vs a naive loop, TipAdapter vs zero-shot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from encoderlab.errors import EncoderlabError
from encoderlab.heads._base import carve_val
from encoderlab.heads.knn import KNNClassifier
from encoderlab.heads.linear import LinearProbe
from encoderlab.heads.tip import PAPER_ALPHA, PAPER_BETA, TipAdapter


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: a second thread only adds synchronization (and stalls on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(n: int, d: int, k: int, sep: float, seed: int = 0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(0, sep, (k, d))
    y = np.arange(n) % k
    rng.shuffle(y)
    X = means[y] + rng.normal(0, 1, (n, d))
    return (X * 3 + shift).astype(np.float32), y  # scaled and shifted so standardization matters


def balanced_acc(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


# ---- LinearProbe ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def five_blobs():
    X, y = blobs(800, 64, 5, sep=0.35, shift=1.0)
    return X[:480], y[:480], X[480:600], y[480:600], X[600:], y[600:]


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_linear_probe_matches_sklearn_at_fixed_C(five_blobs, C):
    X, y, Xv, yv, Xt, yt = five_blobs
    probe = LinearProbe(Cs=[C], tol=1e-6).fit(X, y, Xv, yv)  # one C: no choice, refit on train+val
    scaler = StandardScaler().fit(X)  # our standardization uses the training X only
    ref = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit(scaler.transform(np.vstack([X, Xv])), np.r_[y, yv])
    p_ref = ref.predict_proba(scaler.transform(Xt))
    assert np.abs(probe.predict_proba(Xt) - p_ref).max() < 1e-2
    assert abs(probe.score(Xt, yt) - ref.score(scaler.transform(Xt), yt)) <= 0.005
    assert probe.coef_.shape == (5, 64) and probe.intercept_.shape == (5,)
    assert probe.n_trainable_params == 5 * 65
    assert [s["C"] for s in probe.sweep_] == [C] and probe.best_C_ == C


def test_linear_probe_val_is_only_used_as_told(five_blobs):
    X, y, Xv, yv, Xt, _ = five_blobs
    scaler = StandardScaler().fit(X)
    # explicit val, no refit: trained on X alone
    probe = LinearProbe(Cs=[1.0], tol=1e-6, refit=False).fit(X, y, Xv, yv)
    ref = LogisticRegression(C=1.0, tol=1e-8, max_iter=5000).fit(scaler.transform(X), y)
    assert np.abs(probe.predict_proba(Xt) - ref.predict_proba(scaler.transform(Xt))).max() < 1e-2
    assert probe.sweep_[0]["val_accuracy"] == pytest.approx(probe.score(Xv, yv))
    # no val: carved from X (stratified, by seed) and nothing else; no refit -> trained on the carved train part
    probe = LinearProbe(Cs=[0.1, 1.0], tol=1e-6, refit=False, seed=3).fit(X, y)
    tr, va = carve_val(y, 0.2, 3)
    assert np.array_equal(np.bincount(y[va]), np.round(0.2 * np.bincount(y)).astype(int))
    assert not set(tr) & set(va) and len(tr) + len(va) == len(X)
    ref = LogisticRegression(C=probe.best_C_, tol=1e-8, max_iter=5000).fit(scaler.transform(X[tr]), y[tr])
    assert np.abs(probe.predict_proba(Xt) - ref.predict_proba(scaler.transform(Xt))).max() < 1e-2
    best = next(s for s in probe.sweep_ if s["C"] == probe.best_C_)
    assert best["val_accuracy"] == pytest.approx(probe.score(X[va], y[va]))


def test_carve_val_keeps_a_train_item_per_class():
    y = np.r_[np.zeros(10), np.ones(2), np.full(1, 2)].astype(int)
    tr, va = carve_val(y, 0.2, 0)
    assert set(y[tr]) == {0, 1, 2} and sorted(y[va].tolist()) == [0, 0, 1]
    assert np.array_equal(carve_val(y, 0.2, 0)[1], va)
    tr, va = carve_val(np.arange(6), 0.2, 0)  # one item per class: nothing to carve
    assert len(va) == 0 and len(tr) == 6


def test_linear_probe_sweep_picks_sensible_C():
    rng = np.random.default_rng(1)
    # about as many dimensions as items (near the interpolation threshold), weak signal: heavy regularization wins
    X, y = blobs(750, 100, 3, sep=0.2, seed=0)
    noisy = LinearProbe().fit(X[:150], y[:150], X[150:], y[150:])
    assert noisy.best_C_ <= 0.03
    assert max(s["val_accuracy"] for s in noisy.sweep_) > noisy.sweep_[-1]["val_accuracy"] + 0.05
    # the class signal is a small difference between two large, correlated features: only a weakly regularized
    # fit can find it (strong L2 spreads weight over both and keeps the nuisance)
    n = 600
    y = rng.integers(0, 2, n)
    u = rng.normal(0, 5, n)
    X = np.c_[u + 0.5 * (2 * y - 1) + 0.1 * rng.normal(size=n), u, rng.normal(size=(n, 8))]
    clean = LinearProbe().fit(X[:400], y[:400], X[400:], y[400:])
    assert clean.best_C_ >= 1.0
    accs = [s["val_accuracy"] for s in clean.sweep_]
    assert accs[-1] > accs[0] + 0.1
    assert [s["C"] for s in clean.sweep_] == sorted(s["C"] for s in clean.sweep_)


def test_linear_probe_balanced_class_weight_helps_minority_classes():
    rng = np.random.default_rng(2)
    means = rng.normal(0, 0.5, (3, 16))
    sizes = [400, 40, 15]
    y = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    X = means[y] + rng.normal(0, 1, (len(y), 16))
    yt = np.repeat(np.arange(3), 300)
    Xt = means[yt] + rng.normal(0, 1, (len(yt), 16))
    plain = LinearProbe(Cs=[1.0]).fit(X, y)
    balanced = LinearProbe(Cs=[1.0], class_weight="balanced").fit(X, y)
    assert balanced_acc(balanced.predict(Xt), yt) > balanced_acc(plain.predict(Xt), yt) + 0.03


def test_linear_probe_deterministic_labels_and_inputs(five_blobs):
    X, y, _, _, Xt, _ = five_blobs
    names = np.array(["cat", "dog", "emu", "fox", "gnu"])[y]
    a = LinearProbe(Cs=[0.1, 1.0, 10.0], seed=7).fit(X, names)
    b = LinearProbe(Cs=[0.1, 1.0, 10.0], seed=7).fit(torch.from_numpy(X), list(names))
    assert np.array_equal(a.coef_, b.coef_) and a.sweep_ == b.sweep_
    assert list(a.classes_) == ["cat", "dog", "emu", "fox", "gnu"]
    proba = a.predict_proba(torch.from_numpy(Xt))
    assert proba.shape == (len(Xt), 5) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert set(a.predict(Xt)) <= set(a.classes_)
    assert np.array_equal(a.classes_[proba.argmax(1)], a.predict(Xt))
    assert a.fit_seconds_ > 0 and a.n_iter_ >= 0 and a.n_features_in_ == 64


def test_linear_probe_one_shot_skips_the_sweep():
    X, y = blobs(4, 8, 4, sep=1.0)
    probe = LinearProbe().fit(X, y)
    assert probe.sweep_ == [] and probe.best_C_ == 1.0
    assert probe.score(X, y) == 1.0


def test_linear_probe_bad_input():
    X, y = blobs(40, 8, 2, sep=1.0)
    with pytest.raises(EncoderlabError, match="class"):
        LinearProbe().fit(X, np.zeros(40))
    with pytest.raises(EncoderlabError, match="39 labels"):
        LinearProbe().fit(X, y[:39])
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(EncoderlabError, match="NaN"):
        LinearProbe().fit(bad, y)
    with pytest.raises(EncoderlabError, match="features"):
        LinearProbe().fit(X, y, X[:5, :4], y[:5])
    with pytest.raises(EncoderlabError, match="not in the training labels"):
        LinearProbe().fit(X, y, X[:5], np.full(5, 9))
    with pytest.raises(EncoderlabError, match="Cs"):
        LinearProbe(Cs=[0.0]).fit(X, y)
    with pytest.raises(EncoderlabError, match="not fitted"):
        LinearProbe().predict(X)
    probe = LinearProbe(Cs=[1.0]).fit(X, y)
    with pytest.raises(EncoderlabError, match="8"):
        probe.predict(X[:, :5])


# ---- KNNClassifier -------------------------------------------------------------------------------------------
def naive_knn_proba(X: np.ndarray, y: np.ndarray, Q: np.ndarray, k: int, weights: str, T: float) -> np.ndarray:
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    classes = np.unique(y)
    out = np.zeros((len(Q), len(classes)))
    for i, q in enumerate(Q):
        sims = Xn @ (q / np.linalg.norm(q))
        for j in np.argsort(-sims, kind="stable")[:k]:
            out[i, np.searchsorted(classes, y[j])] += 1.0 if weights == "uniform" else np.exp(sims[j] / T)
        out[i] /= out[i].sum()
    return out


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_matches_naive_loop(weights):
    X, y = blobs(300, 16, 4, sep=0.5, seed=3)
    knn = KNNClassifier(k=7, weights=weights, chunk_size=64).fit(X[:200], y[:200])
    expected = naive_knn_proba(X[:200].astype(np.float64), y[:200], X[200:].astype(np.float64), 7, weights, 0.07)
    assert np.allclose(knn.predict_proba(X[200:]), expected, atol=1e-5)
    assert np.array_equal(knn.predict(X[200:]), expected.argmax(1))
    assert np.allclose(KNNClassifier(k=7, weights=weights, chunk_size=3).fit(X[:200], y[:200]).predict_proba(X[200:]),
                       expected, atol=1e-5)


def test_knn_matches_sklearn_uniform():
    X, y = blobs(400, 32, 5, sep=0.4, seed=4)
    ours = KNNClassifier(k=9).fit(X[:300], y[:300])
    ref = KNeighborsClassifier(n_neighbors=9, metric="cosine", weights="uniform", algorithm="brute")
    ref.fit(X[:300], y[:300])
    assert np.allclose(ours.predict_proba(X[300:]), ref.predict_proba(X[300:]), atol=1e-6)
    assert ours.score(X[300:], y[300:]) == pytest.approx(ref.score(X[300:], y[300:]))


def test_knn_distance_weighting_and_ties():
    X = np.array([[1.0, 0.0], [0.9, 0.44], [0.9, -0.44]], dtype=np.float32)  # class 0 nearest, two class 1 farther
    y = np.array(["a", "b", "b"])
    q = np.array([[1.0, 0.02]], dtype=np.float32)
    assert KNNClassifier(k=3, weights="uniform").fit(X, y).predict(q)[0] == "b"
    assert KNNClassifier(k=3, weights="distance").fit(X, y).predict(q)[0] == "a"
    # an exact vote tie goes to the lowest class index
    tie = KNNClassifier(k=2).fit(X[:2], np.array(["z", "y"]))
    assert tie.predict(np.array([[0.95, 0.22]]))[0] == "y"
    assert KNNClassifier(k=50).fit(X, y).k_ == 3  # clipped to the bank size


def test_knn_k_grid_selection():
    rng = np.random.default_rng(5)
    X, y = blobs(600, 8, 2, sep=1.0, seed=5)
    noisy = y.copy()
    flip = rng.random(400) < 0.3
    noisy[:400][flip] = 1 - noisy[:400][flip]  # label noise: large k averages it out, k=1 copies it
    knn = KNNClassifier(k_grid=[1, 3, 25]).fit(X[:400], noisy[:400], X[400:500], y[400:500])
    assert knn.best_k_ == 25 and [s["k"] for s in knn.sweep_] == [1, 3, 25]
    assert knn.sweep_[-1]["val_accuracy"] > knn.sweep_[0]["val_accuracy"]
    loo = KNNClassifier(k_grid=[1, 25]).fit(X[:400], noisy[:400])  # leave-one-out on train
    assert loo.best_k_ == 25
    no_refit = KNNClassifier(k_grid=[1, 25], refit=False).fit(X[:400], noisy[:400], X[400:500], y[400:500])
    assert no_refit.kneighbors(X[:2])[1].max() < 400 and knn.kneighbors(X[400:402], k=1)[1].min() >= 400


def test_knn_bad_input():
    X, y = blobs(20, 4, 2, sep=1.0)
    with pytest.raises(EncoderlabError, match="weights"):
        KNNClassifier(weights="gaussian").fit(X, y)
    with pytest.raises(EncoderlabError, match="k_grid"):
        KNNClassifier(k_grid=[0]).fit(X, y)
    with pytest.raises(EncoderlabError, match="class"):
        KNNClassifier().fit(X, np.ones(20))


# ---- TipAdapter ----------------------------------------------------------------------------------------------
def few_shot_task(shots: int, text_noise: float, seed: int = 6):
    """Class centers on the sphere, images around them, text embeddings = centers + noise (a weak zero-shot)."""
    rng = np.random.default_rng(seed)
    k, d = 10, 64
    centers = rng.normal(0, 1, (k, d))
    text = centers + text_noise * rng.normal(0, 1, (k, d))

    def images(n_per: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(k), n_per)
        return (centers[y] + 1.2 * rng.normal(0, 1, (len(y), d))).astype(np.float32), y

    return text.astype(np.float32), images(shots), images(10), images(40)


def zero_shot_pred(X: np.ndarray, text: np.ndarray) -> np.ndarray:
    return np.argmax((X / np.linalg.norm(X, axis=1, keepdims=True)) @ (text / np.linalg.norm(text, axis=1)[:, None]).T,
                     axis=1)


def test_tip_adapter_alpha_zero_is_zero_shot():
    text, (X, y), (Xv, yv), (Xt, _) = few_shot_task(4, text_noise=1.0)
    tip = TipAdapter(text, alphas=[0.0], betas=[1.0, 5.0]).fit(X, y, Xv, yv)
    assert tip.best_alpha_ == 0.0
    assert np.array_equal(tip.predict(Xt), zero_shot_pred(Xt, text))
    tuned = TipAdapter(text).fit(X, y, Xv, yv)  # any tuned head, evaluated with alpha=0
    assert np.array_equal(tuned.decision_function(Xt, alpha=0.0).argmax(1), zero_shot_pred(Xt, text))


def test_tip_adapter_cache_beats_noisy_zero_shot():
    text, (X, y), (Xv, yv), (Xt, yt) = few_shot_task(16, text_noise=1.5)
    zs_acc = float((zero_shot_pred(Xt, text) == yt).mean())
    tip = TipAdapter(text).fit(X, y, Xv, yv)
    assert tip.best_alpha_ > 0 and tip.score(Xt, yt) > zs_acc + 0.05
    assert len(tip.sweep_) == 21 * 20 and tip.cache_size_ == len(y) + len(yv) and tip.n_trainable_params == 0
    proba = tip.predict_proba(Xt)
    assert np.allclose(proba.sum(1), 1, atol=1e-5) and proba.shape == (len(yt), 10)
    carved = TipAdapter(text, refit=False).fit(X, y)  # no val: carved from the cache items
    assert carved.sweep_ and carved.cache_size_ == len(y) - 10 * round(0.2 * 16)


def test_tip_adapter_one_shot_defaults_and_class_order():
    text, (X, y), _, (Xt, _) = few_shot_task(1, text_noise=0.5)
    names = np.array([f"c{i}" for i in range(10)])
    tip = TipAdapter(text).fit(X, names[y])
    assert tip.sweep_ == [] and (tip.best_alpha_, tip.best_beta_) == (PAPER_ALPHA, PAPER_BETA)
    # rows named in another order give the same head
    perm = np.random.default_rng(0).permutation(10)
    shuffled = TipAdapter(text[perm], classes=list(names[perm])).fit(X, names[y])
    assert np.allclose(shuffled.decision_function(Xt), tip.decision_function(Xt), atol=1e-4)
    with pytest.raises(EncoderlabError, match="rows"):
        TipAdapter(text[:9]).fit(X, names[y])
