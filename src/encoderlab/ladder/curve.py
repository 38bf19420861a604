"""The few-shot curve: accuracy against labels per class, and what twice the labels would likely give.

Points: each probe rung's k-shot means (± std over seeds) and its all-labels number, placed at the median number of
train labels per class. Fit: accuracy is close to linear in log2(labels per class) over the upper part of such
curves (the usual "log-linear" regime of few-shot learning), so a least-squares line through the points with k >= 4
(and the full split) predicts the accuracy at twice the current labels, with the line's 95% prediction interval.
It is an extrapolation and the note says so; with fewer than three points no prediction is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..results import RunResult

MIN_SHOTS_FOR_FIT = 4
#: two-sided 95% t quantiles by degrees of freedom (beyond the table: the normal 1.96)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def curve_points(name: str, result: RunResult, full_labels_per_class: float) -> list[dict[str, Any]]:
    """``[{method, shots, labels_per_class, mean, std, n_seeds}]`` of one rung's result (k-shot settings and full)."""
    m = result.metrics
    seeds = int(result.config.get("seeds", 1) or 1)
    points = []
    for setting in result.per_item:
        if setting.endswith("-shot"):
            k = int(setting.split("-")[0])
            points.append({"method": name, "shots": k, "labels_per_class": float(k),
                           "mean": m.get(f"{setting}/top1"), "std": m.get(f"{setting}/top1_std"), "n_seeds": seeds})
        elif setting == "full":
            points.append({"method": name, "shots": "full", "labels_per_class": float(full_labels_per_class),
                           "mean": m.get("top1"), "std": 0.0, "n_seeds": 1})
    return sorted((p for p in points if p["mean"] is not None), key=lambda p: p["labels_per_class"])


def fit_curve(points: list[dict[str, Any]], at: float) -> dict[str, Any] | None:
    """Line through (log2 labels per class, accuracy) of points with >= MIN_SHOTS_FOR_FIT labels; its value at ``at``
    with a 95% prediction interval (clipped to [0, 1]), or None with fewer than three points."""
    use = [p for p in points if p["labels_per_class"] >= MIN_SHOTS_FOR_FIT]
    if len(use) < 3 or at <= 0:
        return None
    x = np.log2([p["labels_per_class"] for p in use])
    y = np.asarray([p["mean"] for p in use], dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    dof = len(x) - 2
    s2 = float(resid @ resid) / dof if dof > 0 else 0.0
    x0 = math.log2(at)
    sxx = float(((x - x.mean()) ** 2).sum())
    se = math.sqrt(s2 * (1 + 1 / len(x) + (x0 - x.mean()) ** 2 / sxx)) if sxx > 0 else float("inf")
    t = _T95.get(dof, 1.96)
    pred = float(slope * x0 + intercept)
    return {"labels_per_class": at, "pred": min(max(pred, 0.0), 1.0), "lo": min(max(pred - t * se, 0.0), 1.0),
            "hi": min(max(pred + t * se, 0.0), 1.0), "slope_per_doubling": float(slope), "points_used": len(use),
            "method": use[0]["method"]}


def few_shot_curve(results: Mapping[str, RunResult], full_labels_per_class: float,
                   methods: tuple[str, ...] = ("linear", "knn", "clap", "tip")) -> dict[str, Any]:
    """Points of every probe rung that ran, and for the best-at-full one the prediction at twice the labels."""
    points, fits = [], []
    for name in methods:
        if name in results:
            points += curve_points(name, results[name], full_labels_per_class)
    full = [p for p in points if p["shots"] == "full"]
    note = "no probe rung ran with all labels: no prediction"
    if full:
        best = max(full, key=lambda p: p["mean"])
        fit = fit_curve([p for p in points if p["method"] == best["method"]], 2 * full_labels_per_class)
        if fit is not None:
            fit["gain"] = fit["pred"] - best["mean"]
            fit["gain_lo"], fit["gain_hi"] = fit["lo"] - best["mean"], fit["hi"] - best["mean"]
            fits.append(fit)
            note = (f"{best['method']}: {best['mean']:.3f} with {full_labels_per_class:g} labels per class; twice "
                    f"the labels: about {fit['pred']:.3f} [{fit['lo']:.3f}, {fit['hi']:.3f}] "
                    f"({fit['slope_per_doubling']:+.3f} per doubling, a log-linear extrapolation from "
                    f"{fit['points_used']} points)")
        else:
            note = f"{best['method']}: too few few-shot points (k >= {MIN_SHOTS_FOR_FIT}) to extrapolate"
    return {"points": points, "fit": fits, "note": note}
