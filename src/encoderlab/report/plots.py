"""The report's plots, drawn with matplotlib and returned as PNG bytes (``png_data_uri`` inlines them).

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas directly, never through
``pyplot``: pyplot keeps a global registry of open figures (a leak unless each is closed) and its backend choice is
process-wide, so a report rendered inside a notebook or a GUI program would otherwise change that program's
backend. A ``Figure`` made this way belongs to nobody else and is freed with its last reference.

Every function takes the plain rows of the report document and returns None when there is nothing to draw.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .html import finite_number as number

DPI = 100
#: bars drawn in the per-class chart; beyond this only the lowest recalls are drawn (the table lists all)
MAX_CLASS_BARS = 60
#: a confusion matrix with more classes than this gets no count in each cell (the text would not fit)
MAX_ANNOTATED_CLASSES = 25
_RUNG, _BASELINE, _CHOSEN = "#1f77b4", "#7f7f7f", "#ff7f0e"


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf, metadata={"Software": None})  # no version string: same doc, same bytes
    return buf.getvalue()


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _cost_scale(ax: Any, xs: Sequence[float]) -> None:
    # A log axis cannot show 0 (zero-shot fits in 0 s): symlog is linear below the smallest positive cost.
    positive = [x for x in xs if x > 0]
    if xs and len(positive) == len(xs):
        ax.set_xscale("log")
    elif positive:
        ax.set_xscale("symlog", linthresh=min(positive))


def _cost_panel(ax: Any, rungs: Sequence[Mapping[str, Any]], key: str, label: str) -> None:
    drawn = [r for r in rungs if number(r.get(key)) is not None and number(r.get(key)) >= 0]
    for r in drawn:
        x, y = number(r[key]), number(r["value"])
        lo, hi = number(r.get("ci_low")), number(r.get("ci_high"))
        err = [[max(0.0, y - lo) if lo is not None else 0.0], [max(0.0, hi - y) if hi is not None else 0.0]]
        chosen, baseline = bool(r.get("chosen")), r.get("kind") == "baseline"
        color = _CHOSEN if chosen else _BASELINE if baseline else _RUNG
        ax.errorbar([x], [y], yerr=err, fmt="s" if baseline else "o", color=color, ecolor=color, capsize=3,
                    markersize=11 if chosen else 6, markeredgecolor="black" if chosen else color,
                    markeredgewidth=1.5 if chosen else 1, zorder=3 if chosen else 2)
        ax.annotate(str(r.get("name", "")), (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7)
    _cost_scale(ax, [number(r[key]) for r in drawn])
    missing = len(rungs) - len(drawn)
    if not drawn:
        ax.text(0.5, 0.5, f"no {label} recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
    elif missing:
        ax.text(0.99, 0.01, f"{missing} without {label}", ha="right", va="bottom", transform=ax.transAxes,
                fontsize=7, color="gray")
    ax.set_xlabel(label + (" (log)" if ax.get_xscale() != "linear" else ""))
    ax.grid(True, alpha=0.3)


def quality_vs_cost(rungs: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Each rung's value with its interval against prediction cost and against fit time; chosen rung ringed."""
    shown = [r for r in rungs if not r.get("skipped") and number(r.get("value")) is not None]
    if not shown:
        return None
    fig = Figure(figsize=(11, 4.4), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    _cost_panel(left, shown, "predict_ms_per_item", "predict ms / item")
    _cost_panel(right, shown, "fit_seconds", "fit seconds")
    metrics = sorted({str(r["metric"]) for r in shown if r.get("metric")})
    left.set_ylabel(", ".join(metrics) or "value")
    handles = [Line2D([], [], marker="o", ls="", color=_RUNG, label="rung"),
               Line2D([], [], marker="s", ls="", color=_BASELINE, label="baseline"),
               Line2D([], [], marker="o", ls="", color=_CHOSEN, markeredgecolor="black", markersize=10,
                      label="chosen")]
    right.legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle("quality vs cost (bars: confidence interval)", fontsize=11)
    return png_bytes(fig)


def _full_x(rows: Sequence[Mapping[str, Any]]) -> float:
    """Where ``"full"`` goes when a row does not say its labels per class: one octave right of the largest shots."""
    shots = [number(r.get("shots")) for r in rows if r.get("shots") != "full"]
    ints = [s for s in shots if s is not None and s >= 1]
    return 2.0 ** (math.floor(math.log2(max(ints))) + 1) if ints else 1.0


def _x_of(r: Mapping[str, Any], full_x: float) -> tuple[float, str] | None:
    """(x, tick label) of a row: its ``labels_per_class`` when given, else its shots (``"full"`` at ``full_x``)."""
    lpc, shots = number(r.get("labels_per_class")), r.get("shots")
    if shots == "full":
        return (lpc, f"full\n({lpc:.3g})") if lpc is not None and lpc > 0 else (full_x, "full")
    if lpc is not None and lpc > 0:
        return lpc, f"{lpc:.3g}"
    k = number(shots)
    return (k, f"{k:g}") if k is not None and k > 0 else None


def _series(rows: Sequence[Mapping[str, Any]], full_x: float, ticks: dict[float, str],
            *keys: str) -> list[tuple[float, ...]]:
    """Sorted (x, *values) of the rows with an x and a first value; missing later values repeat the first."""
    out = []
    for r in rows:
        where, vals = _x_of(r, full_x), [number(r.get(k)) for k in keys]
        if where is not None and vals[0] is not None:
            ticks.setdefault(where[0], where[1])
            out.append((where[0], *[v if v is not None else vals[0] for v in vals]))
    return sorted(out)


def _draw_fit(ax: Any, pred: list[tuple[float, ...]], start: tuple[float, float] | None, color: str,
              method: str) -> None:
    x, p, lo, hi = (np.array(c) for c in zip(*pred))
    if len(x) == 1:  # one extrapolated point: dashed from the last observed point, its interval as a dashed bar
        if start is not None:
            ax.plot([start[0], x[0]], [start[1], p[0]], "--", color=color, lw=1.2)
        bar = ax.errorbar(x, p, yerr=[[max(0.0, p[0] - lo[0])], [max(0.0, hi[0] - p[0])]], fmt="o", mfc="white",
                          color=color, capsize=4, label=f"{method} (fit)")
        bar[-1][0].set_linestyle("--")
        return
    ax.plot(x, p, "--", color=color, label=f"{method} (fit)")
    ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)


def label_curve(points: Sequence[Mapping[str, Any]], fit: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Mean ± std over seeds against labels per class (log2 x), with each method's fitted curve and band dashed."""
    full_x, ticks = _full_x([*points, *fit]), {}
    methods = list(dict.fromkeys(str(r.get("method", "")) for r in [*points, *fit]))
    fig = Figure(figsize=(9, 4.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    drawn, last = 0, None
    for i, method in enumerate(methods):
        color = f"C{i % 10}"
        mine = [p for p in points if str(p.get("method", "")) == method]
        # the few-shot points form the curve; full data is a separate diamond, not a point on the same line
        for rows, fmt, label in (([p for p in mine if p.get("shots") != "full"], "o-", method),
                                 ([p for p in mine if p.get("shots") == "full"], "D", f"{method} (full data)")):
            obs = _series(rows, full_x, ticks, "mean", "std")
            if obs:
                x, mean, std = (np.array(c) for c in zip(*obs))
                ax.errorbar(x, mean, yerr=std, fmt=fmt, color=color, capsize=3, label=label)
                drawn, last = drawn + 1, (float(x[-1]), float(mean[-1]))
        pred = _series([f for f in fit if str(f.get("method", "")) == method], full_x, ticks, "pred", "lo", "hi")
        if pred:
            _draw_fit(ax, pred, last if mine else None, color, method)
            drawn += 1
        last = None
    if not drawn:
        return None
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), list(ticks.values()))
    ax.minorticks_off()
    ax.set_xlabel("labels per class")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return png_bytes(fig)


def per_class_recall(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Horizontal bars of recall, lowest at the top, with interval whiskers; at most ``MAX_CLASS_BARS`` bars."""
    rows = sorted((r for r in rows if number(r.get("recall")) is not None), key=lambda r: number(r["recall"]))
    if not rows:
        return None
    drawn = rows[:MAX_CLASS_BARS]
    recall = np.array([number(r["recall"]) for r in drawn])
    lo = np.array([number(r.get("ci_low")) if number(r.get("ci_low")) is not None else v
                   for r, v in zip(drawn, recall)])
    hi = np.array([number(r.get("ci_high")) if number(r.get("ci_high")) is not None else v
                   for r, v in zip(drawn, recall)])
    fig = Figure(figsize=(8, 0.8 + 0.24 * len(drawn)), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(drawn))
    ax.barh(y, recall, color=[_recall_color(v) for v in recall], height=0.7)
    ax.errorbar(recall, y, xerr=[np.clip(recall - lo, 0, None), np.clip(hi - recall, 0, None)], fmt="none",
                ecolor="black", elinewidth=0.8, capsize=2)
    labels = [f"{_short(str(r.get('class', '')))} (n={r.get('n', '?')})" for r in drawn]
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("recall")
    ax.grid(True, axis="x", alpha=0.3)
    if len(rows) > len(drawn):
        ax.set_title(f"the {len(drawn)} lowest of {len(rows)} classes", fontsize=9)
    return png_bytes(fig)


def _recall_color(v: float) -> tuple[float, float, float]:
    # red (0) through amber to green (1), readable on white
    v = min(1.0, max(0.0, v))
    return (0.85 - 0.6 * v, 0.3 + 0.45 * v, 0.25)


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def confusion_heatmap(classes: Sequence[str], matrix: np.ndarray) -> bytes:
    """Counts in each cell, colour by the row's fraction (what share of a true class went where)."""
    n = len(classes)
    sums = matrix.sum(axis=1, keepdims=True)
    frac = np.divide(matrix, sums, out=np.zeros(matrix.shape, dtype=float), where=sums > 0)
    side = min(22.0, max(4.5, 1.6 + 0.38 * n))
    fig = Figure(figsize=(side + 1.2, side), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    names = [_short(str(c), 22) for c in classes]
    size = 8 if n <= 30 else 6 if n <= 60 else 4
    ax.set_xticks(range(n), names, rotation=90, fontsize=size)
    ax.set_yticks(range(n), names, fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    return png_bytes(fig)


def histogram(values: Sequence[Any], cut: float | None, xlabel: str, title: str) -> bytes | None:
    """A histogram of ``values`` with the curation cut as a vertical line and the count on each side."""
    v = np.array([x for x in (number(x) for x in values) if x is not None])
    if not v.size:
        return None
    fig = Figure(figsize=(7, 3.2), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.hist(v, bins=int(min(60, max(10, math.sqrt(v.size)))), color="#4c72b0", edgecolor="white", linewidth=0.4)
    if cut is not None:
        below = int((v < cut).sum())
        ax.axvline(cut, color="#d62728", ls="--", lw=1.5,
                   label=f"cut {cut:g}: {below} below, {v.size - below} at or above")
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("items")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    return png_bytes(fig)
