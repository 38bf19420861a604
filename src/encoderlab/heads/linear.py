"""Linear probe: multinomial logistic regression on frozen embeddings, L2 strength chosen on a validation split.

The regularization is parametrized exactly like scikit-learn's ``LogisticRegression(C=...)`` so a grid of ``C``
means the same thing in both: the objective is ``C * sum_i w_i CE_i + 0.5 * ||W||^2`` (bias not penalized), which
has the same minimizer as ``sum_i w_i CE_i / S + ||W||^2 / (2 C S)`` with ``S = sum_i w_i`` (``w_i`` = class
weights, 1 by default) -- the scaled form is what is minimized, and what ``tol`` refers to.

Why it is fast (vs. looping ``LogisticRegression`` over the grid): float32; features standardized once; loss and
gradient written out by hand (one forward and one backward matmul per evaluation, no autograd); L-BFGS with a
diagonal preconditioner that fixes the flat directions of rare classes; and warm starts along the grid from strong
to weak regularization, each from the better of the previous solution and a linear extrapolation (in log C) of
the last two, so most fits start close to their optimum. ``bench/probe.py`` measures it against scikit-learn.

``tol`` is scikit-learn's stopping rule (largest gradient entry of the scaled objective, default 1e-4 as there).
It is loose for weak regularization, where the objective is nearly flat: there, solutions of either solver depend
on where it started (scikit-learn: from zero, which acts as early stopping) and agree only at a tighter ``tol``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import EncoderlabError
from ._base import (
    MIN_VAL_ITEMS,
    Head,
    as_features,
    as_labels,
    best_on_grid,
    carve_val,
    check_scoring,
    check_val_pair,
    class_counts,
    encode_labels,
    number_grid,
    val_arrays,
    val_score,
)

#: default grid of inverse L2 strengths (scikit-learn's ``C``): 13 values, 1e-3 ... 1e3, half a decade apart
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 3, 13))
#: L-BFGS memory: up to 50 curvature pairs (fewer iterations than 10-20 on 1e4-1e5 parameters), within 256 MB
_HISTORY_MAX, _HISTORY_BYTES = 50, 256 << 20


def class_weights(y_index: np.ndarray, n_classes: int, class_weight: Any, classes: np.ndarray) -> np.ndarray:
    """Per-class weights: ones, ``n / (n_classes * count_c)`` for ``"balanced"``, or a ``{label: weight}`` map."""
    if class_weight is None:
        return np.ones(n_classes)
    if isinstance(class_weight, str) and class_weight == "balanced":
        counts = np.bincount(y_index, minlength=n_classes).astype(np.float64)
        # a class absent from this fit's labels gets weight 0 instead of a division by zero
        return np.where(counts > 0, len(y_index) / (n_classes * np.maximum(counts, 1)), 0.0)
    if isinstance(class_weight, Mapping):
        return np.array([float(class_weight.get(c, 1.0)) for c in classes])
    raise EncoderlabError(f"class_weight={class_weight!r} is not supported", 'use None, "balanced" or {label: w}')


class _Objective:
    """Scaled objective ``sum_i wn_i CE_i + lam/2 ||W||^2`` and its gradient, for ``theta = [W | b]`` [k, d + 1].

    ``Z`` carries a trailing column of ones, so one matmul gives the logits and one more the gradient.
    ``r`` is a diagonal preconditioner, the inverse square root of the Hessian's diagonal at ``W = 0``
    (``lam + pi_c (1 - pi_c) E[z_j^2]``, ``pi_c`` the class's weight share): without it the bias of a rare class
    (curvature ~ ``pi_c``) is orders of magnitude flatter than the weights, and L-BFGS crawls along it.
    """

    def __init__(self, Z: torch.Tensor, y: torch.Tensor, sw: torch.Tensor, C: float, n_classes: int) -> None:
        self.Z, self.y = Z, y
        self.wn = sw / sw.sum()
        self.lam = float(1.0 / (C * float(sw.sum())))
        self.rows = torch.arange(Z.shape[0], device=Z.device)
        pi = torch.zeros(n_classes, dtype=Z.dtype, device=Z.device).index_add_(0, y, self.wn)
        h = (pi * (1 - pi))[:, None] * (self.wn @ (Z * Z))[None, :]
        h[:, :-1] += self.lam
        self.r = h.clamp_min(1e-12).rsqrt()

    def __call__(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        logits = theta @ self.Z.T  # [k, n]: faster than Z @ theta.T for few classes (BLAS shape)
        lse = torch.logsumexp(logits, dim=0)
        W = theta[:, :-1]
        # sums in float64, so the line search still sees decreases near the optimum
        ce = torch.dot(self.wn.double(), (lse - logits[self.y, self.rows]).double())
        loss = float(ce) + 0.5 * self.lam * float(torch.sum(W.double() ** 2))
        P = logits.sub_(lse).exp_()  # softmax, in the logits buffer
        P[self.y, self.rows] -= 1.0  # d(CE)/d(logits) = softmax - onehot
        P.mul_(self.wn)
        grad = P @ self.Z
        grad[:, :-1] += self.lam * W
        return loss, grad


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _lbfgs(fun: _Objective, theta: torch.Tensor, max_iter: int, tol: float,
           at_theta: tuple[float, torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """Minimize ``fun`` from ``theta`` by L-BFGS in the preconditioned variables ``theta / fun.r``.

    Stops when the largest entry of the (unpreconditioned) gradient is <= ``tol`` -- scikit-learn's criterion --,
    at ``max_iter``, or when no step decreases the objective any more. The line search is Armijo backtracking:
    the objective is convex, so ``s.y > 0`` holds without a Wolfe curvature check. ``at_theta`` is
    ``fun(theta)`` when the caller has it already. Returns (theta, iterations).
    """
    r = fun.r
    history = int(np.clip(_HISTORY_BYTES // (2 * theta.numel() * theta.element_size()), 5, _HISTORY_MAX))
    x = theta / r
    f, g_raw = fun(theta) if at_theta is None else at_theta
    g = g_raw * r
    memory: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / s.y)
    it = 0
    while it < max_iter and float(g_raw.abs().max()) > tol:
        it += 1
        # two-loop recursion: d = -H g
        q = g.clone()
        coefs = []
        for s, yv, rho in reversed(memory):
            a = rho * _dot(s, q)
            q.sub_(yv, alpha=a)
            coefs.append(a)
        if memory:
            s, yv, rho = memory[-1]
            q.mul_(1.0 / (rho * _dot(yv, yv)))
        else:  # no curvature yet: a first step that changes the logits by O(1)
            q.mul_(1.0 / max(float(g.norm()), 1e-12))
        for (s, yv, rho), a in zip(memory, reversed(coefs)):
            q.add_(s, alpha=a - rho * _dot(yv, q))
        d = q.neg_()
        slope = _dot(g, d)
        if slope >= 0:  # numerically not a descent direction: forget the curvature, go down the gradient
            memory.clear()
            d = -g / max(float(g.norm()), 1e-12)
            slope = _dot(g, d)
        t = 1.0
        for _ in range(30):
            f_new, g_raw_new = fun((x + t * d) * r)
            if f_new <= f + 1e-4 * t * slope:
                break
            # minimum of the quadratic through f, the slope and f_new, kept within [0.1 t, 0.5 t]
            t = min(0.5 * t, max(0.1 * t, -slope * t * t / (2.0 * (f_new - f - slope * t))))
        else:
            break  # no decrease found: converged as far as float32 can tell
        g_new = g_raw_new * r
        s, yv = t * d, g_new - g
        sy = _dot(s, yv)
        if sy > 1e-10 * _dot(yv, yv):
            memory.append((s, yv, 1.0 / sy))
            if len(memory) > history:
                memory.pop(0)
        x = x + s
        f_old, f, g, g_raw = f, f_new, g_new, g_raw_new
        if f_old - f <= 1e-12 * max(abs(f), 1.0):
            break  # stalled
    return x * r, it


class LinearProbe(Head):
    """Multinomial logistic regression on embeddings, with the L2 strength swept on validation data.

    Parameters
    ----------
    Cs: inverse L2 strengths to try (scikit-learn's ``C``; larger = weaker regularization). Default
        :data:`DEFAULT_CS`, ``np.logspace(-3, 3, 13)``.
    val_fraction: share of each class carved from ``X`` for the sweep when ``fit`` gets no ``X_val``.
    standardize: z-score features with the statistics of the ``X`` given to ``fit`` (stored as ``mean_``,
        ``scale_``; folded into ``coef_`` so it applies to raw features).
    class_weight: ``None``, ``"balanced"`` (``n / (n_classes * count_c)`` on each fit's labels) or ``{label: w}``.
    scoring: validation metric for the sweep, ``"accuracy"`` or ``"balanced_accuracy"``.
    max_iter, tol: L-BFGS iterations per fit, and the max-abs gradient of the scaled objective at which it stops
        (scikit-learn's lbfgs stops at 1e-4 on the same quantity).
    seed: seeds the validation carve (the solver itself is deterministic).
    device: torch device the solver runs on.
    refit: after the sweep, fit once more on train+val with ``best_C_`` (else keep the train-only model).

    Attributes: ``classes_``, ``coef_`` [n_classes, d] and ``intercept_`` [n_classes] in the raw (unstandardized)
    feature space -- always one row per class, also for two classes (softmax over two logits, which is a binary
    logistic regression with ``C`` doubled) -- ``mean_``, ``scale_``, ``best_C_``, ``sweep_`` (one dict per C:
    ``C``, ``val_accuracy``, ``val_score``, ``n_iter``), ``n_iter_`` (final fit), ``n_features_in_``,
    ``fit_seconds_``.
    """

    def __init__(self, Cs: Sequence[float] = DEFAULT_CS, val_fraction: float = 0.2, standardize: bool = True,
                 class_weight: None | str | Mapping[Any, float] = None, scoring: str = "accuracy",
                 max_iter: int = 1000, tol: float = 1e-4, seed: int = 0, device: str | torch.device = "cpu",
                 refit: bool = True) -> None:
        self.Cs = Cs
        self.val_fraction = val_fraction
        self.standardize = standardize
        self.class_weight = class_weight
        self.scoring = scoring
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.device = device
        self.refit = refit

    # ---- fitting -----------------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> LinearProbe:
        """Sweep ``Cs`` on ``(X_val, y_val)`` (or on a stratified split carved from ``X``), then refit.

        Without validation data and too few items to carve one (fewer than :data:`MIN_VAL_ITEMS`, e.g. one shot
        per class), or with a single C, there is no sweep (``sweep_ == []``): the model is fit on all of ``X``
        with the grid's middle value (1.0 for the default grid).
        """
        t0 = time.perf_counter()
        X = as_features(X)
        classes, y_idx = encode_labels(as_labels(y, X.shape[0]))
        Cs = number_grid(self.Cs, "Cs", strict=True, example="[0.01, 0.1, 1, 10]")
        check_scoring(self.scoring)
        if check_val_pair(X_val, y_val):
            X_val, val_idx_labels = val_arrays(X_val, y_val, classes, X.shape[1])

        dev = torch.device(self.device)
        mean = X.mean(axis=0, dtype=np.float64)
        scale = X.std(axis=0, dtype=np.float64) if self.standardize else np.ones(X.shape[1])
        if not self.standardize:
            mean = np.zeros(X.shape[1])
        scale = np.where(scale < 1e-8 * max(1.0, float(scale.max())), 1.0, scale)  # constant features: leave as is

        mean32, scale32 = torch.from_numpy(mean).float().to(dev), torch.from_numpy(scale).float().to(dev)

        def prepare(A: np.ndarray) -> torch.Tensor:
            # standardized once per array (in float32, no float64 copy), with a column of ones for the bias
            Z = torch.empty((A.shape[0], A.shape[1] + 1), dtype=torch.float32, device=dev)
            torch.div(torch.from_numpy(A).to(dev) - mean32, scale32, out=Z[:, :-1])
            Z[:, -1] = 1.0
            return Z

        Z_all = prepare(X)
        if X_val is not None:
            Z_tr, y_tr, Z_va, y_va = Z_all, y_idx, prepare(X_val), val_idx_labels
        elif len(Cs) > 1:
            tr, va = carve_val(y_idx, float(self.val_fraction), int(self.seed))
            if len(va) >= MIN_VAL_ITEMS:
                Z_tr, y_tr, Z_va, y_va = Z_all[tr], y_idx[tr], Z_all[va], y_idx[va]
            else:
                Z_va = None
        else:
            Z_va = None

        self.sweep_: list[dict[str, Any]] = []
        if Z_va is None:
            self.best_C_ = float(Cs[len(Cs) // 2])
            theta, self.n_iter_ = self._solve(Z_all, y_idx, classes, self.best_C_, [])
            y_fit = y_idx
        else:
            self.best_C_, theta, self.n_iter_ = self._sweep(Z_tr, y_tr, Z_va, y_va, classes, Cs)
            y_fit = y_tr
            if self.refit:
                Z_fit = torch.cat([Z_tr, Z_va]) if X_val is not None else Z_all
                y_fit = np.concatenate([y_tr, y_va]) if X_val is not None else y_idx
                theta, self.n_iter_ = self._solve(Z_fit, y_fit, classes, self.best_C_, [theta])

        W = theta[:, :-1].double().cpu().numpy()
        b = theta[:, -1].double().cpu().numpy()
        self.classes_ = classes
        self.fit_counts_ = class_counts(y_fit, len(classes))
        self.n_features_in_ = X.shape[1]
        self.mean_, self.scale_ = mean, scale
        self.coef_ = W / scale  # fold the standardization into the weights: raw features in, same logits out
        self.intercept_ = b - self.coef_ @ mean
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _sweep(self, Z_tr: torch.Tensor, y_tr: np.ndarray, Z_va: torch.Tensor, y_va: np.ndarray,
               classes: np.ndarray, Cs: list[float]) -> tuple[float, torch.Tensor, int]:
        """Fit every C on train, score it on val (``sweep_``); returns the best ``(C, theta, n_iter)``.

        Ascending C (strong -> weak regularization), each fit warm-started from the previous solutions; ties keep
        the smaller C.
        """
        theta: torch.Tensor | None = None
        path: list[tuple[float, torch.Tensor]] = []
        for C in Cs:
            starts = [theta] if theta is not None else []
            if len(path) >= 2:  # the solution path is smooth in log C: extrapolate from the last two
                (c1, t1), (c2, t2) = path[-2:]
                starts.append(t2 + float(np.log(C / c2) / np.log(c2 / c1)) * (t2 - t1))
            theta, n_iter = self._solve(Z_tr, y_tr, classes, C, starts, warn=False)
            path.append((C, theta))
            pred = (Z_va @ theta.T).argmax(dim=1).cpu().numpy()
            acc, score = val_score(pred, y_va, self.scoring)
            self.sweep_.append({"C": C, "val_accuracy": acc, "val_score": score, "n_iter": n_iter})
        best = best_on_grid([s["val_score"] for s in self.sweep_])
        return path[best][0], path[best][1], self.sweep_[best]["n_iter"]

    def _solve(self, Z: torch.Tensor, y_idx: np.ndarray, classes: np.ndarray, C: float, starts: list[torch.Tensor],
               warn: bool = True) -> tuple[torch.Tensor, int]:
        """Fit at one C from the best of ``starts`` (lowest objective); with none, from the infinite-L2 optimum."""
        cw = class_weights(y_idx, len(classes), self.class_weight, classes)
        sw = torch.as_tensor(cw[y_idx], dtype=torch.float32, device=Z.device)
        fun = _Objective(Z, torch.as_tensor(y_idx, device=Z.device), sw, C, len(classes))
        if not starts:
            # W = 0 with the bias at the log class frequencies: the exact optimum at infinite regularization
            theta0 = torch.zeros((len(classes), Z.shape[1]), dtype=torch.float32, device=Z.device)
            mass = torch.zeros(len(classes), dtype=torch.float64, device=Z.device).index_add_(0, fun.y, sw.double())
            theta0[:, -1] = torch.log(mass / mass.sum()).clamp_min(-30.0).float()
            at_theta = None
        else:
            at_theta, theta0 = min(((fun(t), t) for t in starts), key=lambda pair: pair[0][0])
        theta, n_iter = _lbfgs(fun, theta0, int(self.max_iter), float(self.tol), at_theta)
        if warn and n_iter >= int(self.max_iter):
            warnings.warn(f"LinearProbe: L-BFGS stopped at max_iter={self.max_iter} before reaching tol={self.tol} "
                          f"(C={C:g}); raise max_iter or tol", RuntimeWarning, stacklevel=3)
        return theta, n_iter

    # ---- inference ---------------------------------------------------------------------------------------
    def decision_function(self, X: Any) -> np.ndarray:
        """Logits [n, n_classes] (float32) for raw features."""
        self._check_fitted()
        X = as_features(X, "X", self.n_features_in_)
        dev = torch.device(self.device)
        W = torch.as_tensor(self.coef_, dtype=torch.float32, device=dev)
        b = torch.as_tensor(self.intercept_, dtype=torch.float32, device=dev)
        return torch.addmm(b, torch.from_numpy(X).to(dev), W.T).cpu().numpy()

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the logits; rows sum to 1."""
        return torch.softmax(torch.from_numpy(self.decision_function(X)), dim=1).numpy()

    @property
    def n_trainable_params(self) -> int:
        """Weights plus biases: ``n_classes * (d + 1)``."""
        self._check_fitted()
        return int(self.coef_.size + self.intercept_.size)
