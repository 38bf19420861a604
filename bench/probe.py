"""Linear-probe speed: encoderlab's LinearProbe vs scikit-learn's LogisticRegression looped over the same C grid.

    python bench/probe.py                       # synthetic emoji-shaped features, 10- and 99-class settings
    python bench/probe.py --data emoji --threads 1  # real: emoji embedded by efficientnet-lite0, 10 and 99 classes
    python bench/probe.py --features feats.npz  # arrays X_train, y_train, X_val, y_val, X_test, y_test
    python bench/probe.py --json bench/results/probe.json

Same split, same C grid, same standardization (z-score with train statistics) for both:
  ours     LinearProbe(Cs=grid).fit(X_train, y_train, X_val, y_val): the sweep on val with warm starts, then a
           refit on train+val with the best C (its standardization is inside the timed fit);
  sklearn  for C in grid: LogisticRegression(C=C, max_iter=1000) (lbfgs, multinomial) on the standardized train
           features, accuracy on val; then a refit on train+val with the best C (ties -> smaller C, as ours).
           Standardization is done once outside its timer.
Times are the median of 3 runs. Both use the same threads, all the machine's cores by default (torch threads
and scikit-learn's BLAS/OpenMP pools set to os.cpu_count(); --threads changes both). On a machine shared with other
work, the load average printed with the results says how much the timings can be trusted.
Targets: >= 3x faster, |test accuracy difference| <= 0.5 pt.

The synthetic data stands in for the emoji set embedded by EfficientNet-Lite0 (1911 items, 1280-d non-negative
pooled features, splits 1521/188/202): 99 sub-categories nested in 10 categories with long-tailed sizes, a class
signal in a 64-d subspace, a strong 16-d nuisance and isotropic noise. "emoji-10" labels the categories,
"emoji-99" the sub-categories, on the same features.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from encoderlab.heads.linear import DEFAULT_CS, LinearProbe


def emoji_like(seed: int = 0, n: int = 1911, d: int = 1280, n_sub: int = 99, n_cat: int = 10,
               extra_test: int = 3000) -> dict:
    """Synthetic features shaped like the embedded emoji set, split train/val/test per sub-category (80/10/10),
    plus ``extra_test`` more test items from the same distribution (so a test accuracy difference of 0.5 pt is
    more than one item)."""
    rng = np.random.default_rng(seed)
    n_split, n = n, n + extra_test
    cat_of_sub = np.sort(np.r_[np.arange(n_cat), rng.integers(0, n_cat, n_sub - n_cat)])
    sizes = rng.pareto(1.5, n_sub) + 0.2  # long tail, like the real sub-categories
    sub = np.r_[np.arange(n_sub), np.arange(n_sub), rng.choice(n_sub, n - 2 * n_sub, p=sizes / sizes.sum())]
    split = np.full(n, "test", dtype="<U5")
    latent = 64
    centers = rng.normal(0, 0.4, (n_cat, latent))[cat_of_sub] + rng.normal(0, 0.4, (n_sub, latent))
    z = centers[sub] + rng.normal(0, 1, (n, latent))
    A = rng.normal(0, 1 / np.sqrt(latent), (latent, d))
    B = rng.normal(0, 3 / 4, (16, d))
    X = np.maximum(z @ A + rng.normal(0, 1, (n, 16)) @ B + rng.normal(0, 1, (n, d)), 0).astype(np.float32)
    for s in range(n_sub):  # every sub-category has >= 1 train item (the first two items of each are in `sub`)
        idx = rng.permutation(np.flatnonzero(sub[:n_split] == s))
        n_val = n_test = round(0.1 * len(idx))
        split[idx] = "train"
        split[idx[1 : 1 + n_val]] = "val"
        split[idx[1 + n_val : 1 + n_val + n_test]] = "test"
    return {"X": X, "category": cat_of_sub[sub], "subcategory": sub, "split": split}


def _sklearn_sweep(Z_tr, y_tr, Z_va, y_va, Cs, tol: float = 1e-4) -> tuple[object, float]:
    from sklearn.linear_model import LogisticRegression

    best_acc, best_C = -1.0, Cs[0]
    for C in sorted(Cs):
        acc = LogisticRegression(C=C, max_iter=1000, tol=tol).fit(Z_tr, y_tr).score(Z_va, y_va)
        if acc > best_acc:
            best_acc, best_C = acc, C
    model = LogisticRegression(C=best_C, max_iter=1000, tol=tol).fit(np.vstack([Z_tr, Z_va]), np.r_[y_tr, y_va])
    return model, best_C


def run(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, X_test: np.ndarray,
        y_test: np.ndarray, Cs=DEFAULT_CS, repeats: int = 3, tol: float | None = None,
        sklearn_tol: float = 1e-4) -> dict:
    """Time and score both methods on one split; returns per-method results, the speed ratio and the verdict."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression  # noqa: F401  (loads its OpenMP runtime before the limit)
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    n_threads = torch.get_num_threads()

    seen = np.isin(y_val, y_train), np.isin(y_test, y_train)
    dropped = int((~seen[0]).sum() + (~seen[1]).sum())  # labels never trained on cannot be predicted by either
    X_val, y_val, X_test, y_test = X_val[seen[0]], y_val[seen[0]], X_test[seen[1]], y_test[seen[1]]
    Cs = [float(c) for c in Cs]
    scaler = StandardScaler().fit(X_train)
    Z_tr, Z_va, Z_te = (scaler.transform(a) for a in (X_train, X_val, X_test))

    ours_t, sk_t, n_conv_warn = [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        probe = LinearProbe(Cs=Cs, **({} if tol is None else {"tol": tol})).fit(X_train, y_train, X_val, y_val)
        ours_t.append(time.perf_counter() - t0)
        # scikit-learn's BLAS and OpenMP loops get as many threads as torch
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=n_threads):
            warnings.simplefilter("always", ConvergenceWarning)
            t0 = time.perf_counter()
            sk, sk_C = _sklearn_sweep(Z_tr, y_train, Z_va, y_val, Cs, sklearn_tol)
            sk_t.append(time.perf_counter() - t0)
        n_conv_warn = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    ours_acc = probe.score(X_test, y_test)
    sk_acc = float(sk.score(Z_te, y_test))
    # the same C as scikit-learn chose: separates solver agreement from a different choice on a small val set
    at_sk_C = LinearProbe(Cs=[sk_C], **({} if tol is None else {"tol": tol})).fit(X_train, y_train, X_val, y_val)
    at_sk_C_acc = at_sk_C.score(X_test, y_test)
    ratio = statistics.median(sk_t) / statistics.median(ours_t)
    diff_pt = 100 * (ours_acc - sk_acc)
    return {
        "n_train": len(y_train), "n_val": len(y_val), "n_test": len(y_test), "dims": X_train.shape[1],
        "n_classes": len(np.unique(y_train)), "dropped_unseen_label_items": dropped, "Cs": Cs, "threads": n_threads,
        "ours": {"tol": probe.tol, "fit_seconds": statistics.median(ours_t), "all_seconds": ours_t,
                 "best_C": probe.best_C_,
                 "test_accuracy": ours_acc, "sweep_iters": [s["n_iter"] for s in probe.sweep_],
                 "refit_iters": probe.n_iter_},
        "sklearn": {"tol": sklearn_tol, "fit_seconds": statistics.median(sk_t), "all_seconds": sk_t, "best_C": sk_C,
                    "test_accuracy": sk_acc, "convergence_warnings": n_conv_warn},
        "ours_at_sklearn_C": {"best_C": sk_C, "test_accuracy": at_sk_C_acc,
                              "accuracy_diff_pt": 100 * (at_sk_C_acc - sk_acc)},
        "speed_ratio": ratio, "accuracy_diff_pt": diff_pt,
        "meets_targets": bool(ratio >= 3.0 and abs(diff_pt) <= 0.5),
    }


def print_result(name: str, r: dict) -> None:
    print(f"\n{name}: {r['n_train']}/{r['n_val']}/{r['n_test']} items, {r['dims']} dims, {r['n_classes']} classes, "
          f"{len(r['Cs'])} C values" + (f" ({r['dropped_unseen_label_items']} val/test items of classes without "
                                        "train items dropped)" if r["dropped_unseen_label_items"] else ""))
    print(f"{'method':<10} {'fit s':>8} {'best C':>9} {'test acc':>9}")
    for m in ("ours", "sklearn"):
        s = r[m]
        print(f"{m:<10} {s['fit_seconds']:>8.2f} {s['best_C']:>9.3g} {100 * s['test_accuracy']:>8.2f}%")
    s = r["ours_at_sklearn_C"]
    print(f"{'ours@skC':<10} {'':>8} {s['best_C']:>9.3g} {100 * s['test_accuracy']:>8.2f}%  "
          "(ours refit at sklearn's C: "
          f"{s['accuracy_diff_pt']:+.2f} pt)")
    ok = "PASS" if r["meets_targets"] else "MISS"
    print(f"speed ratio sklearn/ours {r['speed_ratio']:.1f}x (target >= 3x), test accuracy diff "
          f"{r['accuracy_diff_pt']:+.2f} pt (target |diff| <= 0.5): {ok}")


def real_features(spec: str, encoder: str = "efficientnet-lite0") -> list[np.ndarray]:
    """X/y of train, val, test of a packaged set embedded by ``encoder``, read from the default store."""
    from encoderlab.data import load_dataset
    from encoderlab.encoders import create_encoder
    from encoderlab.extract import labelled_embeddings
    from encoderlab.store import EmbeddingStore

    prep = labelled_embeddings(create_encoder(encoder, device="cpu"), load_dataset(spec), EmbeddingStore(),
                               progress=True)
    return [a for split in ("train", "val", "test") for a in (prep.X[prep.index(split)], prep.y[prep.index(split)])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["synthetic", "emoji"], default="synthetic",
                    help="synthetic: emoji-shaped stand-in (default); emoji: the real set embedded by "
                         "efficientnet-lite0 (from the store; computed once if missing), categories and sub-categories")
    ap.add_argument("--features", type=Path, help="npz with X_train, y_train, X_val, y_val, X_test, y_test")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tol", type=float, help="LinearProbe tol (default: the class default)")
    ap.add_argument("--sklearn-tol", type=float, default=1e-4,
                    help="LogisticRegression tol (default 1e-4, its own default; smaller = closer to the optimum)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for both torch and scikit-learn (default: all cores)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="encoderlab")

    results: dict[str, dict] = {}
    if args.features is not None:
        with np.load(args.features, allow_pickle=False) as f:
            arrays = [f[k] for k in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")]
        results[args.features.stem] = run(*arrays, repeats=args.repeats, tol=args.tol, sklearn_tol=args.sklearn_tol)
    elif args.data == "emoji":
        for spec, name in (("emoji", "emoji-10 (real)"), ("emoji:subcategory", "emoji-99 (real)")):
            results[name] = run(*real_features(spec), repeats=args.repeats, tol=args.tol, sklearn_tol=args.sklearn_tol)
    else:
        data = emoji_like()
        s = data["split"]
        for name, y in (("emoji-10 (synthetic)", data["category"]), ("emoji-99 (synthetic)", data["subcategory"])):
            parts = [a[s == p] for p in ("train", "val", "test") for a in (data["X"], y)]
            results[name] = run(*parts, repeats=args.repeats, tol=args.tol, sklearn_tol=args.sklearn_tol)
    print(f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())} (other processes slow both methods)")
    for name, r in results.items():
        print_result(name, r)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0 if all(r["meets_targets"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
