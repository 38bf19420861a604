"""Text tables of results: the one renderer the CLI prints and reports and notes reuse.

Every function takes plain data (rows, flat metric dicts, ``RunResult``) and returns a string; nothing prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

COST_KEYS = ("fit_seconds", "predict_ms_per_item", "encoder_ms_per_item", "predict_ms_per_item_with_encoder",
             "trainable_params", "peak_rss_mb")


def fmt(v: Any, digits: int = 3) -> str:
    """A cell: floats to ``digits`` places, None/NaN as "-", anything else as ``str``."""
    if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}f}"
    return str(v)


def p_value_text(p: float, n_boot: int | None = None) -> str:
    """``p=0.034``, or ``p<0.001`` when the bootstrap cannot resolve the value (below ``1 / n_boot``, or 0.001)."""
    floor = 1.0 / n_boot if n_boot else 0.001
    return f"p<{max(floor, 0.001):g}" if p < max(floor, 0.001) else f"p={p:.3f}"


def format_table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    """Left-aligned columns separated by two spaces, a dashed rule under the header, no trailing blanks."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def with_ci(m: Mapping[str, Any], name: str, digits: int = 3) -> str:
    """``value [low, high]`` from ``name``, ``name_ci_low``, ``name_ci_high`` (just the value without an interval)."""
    v = m.get(name)
    if v is None:
        return "-"
    lo, hi = m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")
    if lo is None or hi is None:
        return fmt(v, digits)
    return f"{fmt(v, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def costs_line(costs: Mapping[str, Any]) -> str:
    return "costs: " + ", ".join(f"{k}={costs[k]}" for k in COST_KEYS if k in costs)


def skipped_lines(skipped: Sequence[Mapping[str, Any]], limit: int = 10,
                  full_list: str | None = "the run's skipped.jsonl / --json") -> str:
    """What was skipped and why, the first ``limit`` by path ("" when nothing was).

    ``full_list`` says where the rest can be read, in the terms of the command printing it (a command without a
    run directory passes "--json"); None leaves the pointer out.
    """
    if not skipped:
        return ""
    out = [f"skipped {len(skipped)} file(s):"]
    out += [f"  {s['path']}: {s['reason']}" for s in skipped[:limit]]
    if len(skipped) > limit:
        where = f" (full list in {full_list})" if full_list else ""
        out.append(f"  ... and {len(skipped) - limit} more{where}")
    return "\n".join(out)


def classification_table(m: Mapping[str, Any]) -> str:
    """Headline classification metrics with their intervals, then per-class recall on one line."""
    out = format_table([[n, with_ci(m, n)] for n in ("top1", "top5", "balanced_accuracy", "macro_f1") if n in m],
                       ["metric", "value [95% CI]"])
    recalls = sorted((k[len("recall/"):], v) for k, v in m.items() if k.startswith("recall/") and v is not None)
    if recalls:
        out += "\nper-class recall: " + ", ".join(f"{c} {v:.2f}" for c, v in recalls)
    return out


def template_table(rows: Sequence[Mapping[str, Any]]) -> str:
    cols = [c for c in rows[0] if c != "template"]
    return format_table([[r["template"]] + [fmt(r[c]) for c in cols] for r in rows], ["template"] + cols)


def few_shot_table(m: Mapping[str, Any], shots: Sequence[int], full: bool) -> str:
    """One row per k-shot setting (mean ± std over seeds, interval) and the full-data row."""
    rows = []
    for k in sorted(set(shots)):
        p = f"{k}-shot/"
        rows.append([f"{k}-shot", f"{fmt(m.get(p + 'top1'))} ± {fmt(m.get(p + 'top1_std'))}",
                     f"[{fmt(m.get(p + 'top1_ci_low'))}, {fmt(m.get(p + 'top1_ci_high'))}]",
                     fmt(m.get(p + "balanced_accuracy")), fmt(m.get(p + "macro_f1"))])
    if full:
        rows.append(["full", fmt(m.get("top1")), f"[{fmt(m.get('top1_ci_low'))}, {fmt(m.get('top1_ci_high'))}]",
                     fmt(m.get("balanced_accuracy")), fmt(m.get("macro_f1"))])
    return format_table(rows, ["setting", "top-1 (mean ± std over seeds)", "95% CI", "bal. acc", "macro-F1"])


def retrieval_table(m: Mapping[str, Any], label: str = "direction", full: bool = True) -> str:
    """R@1/5/10 (with intervals), MRR, median rank, chance R@1 and the number of queries per direction."""
    rows = []
    for d in ("i2t", "t2i"):
        if f"{d}_R@1" not in m:
            continue
        row = [d] + [with_ci(m, f"{d}_R@{k}") for k in (1, 5, 10)] + [with_ci(m, f"{d}_mrr")]
        if full:
            row += [fmt(m.get(f"{d}_median_rank"), 1), fmt(m.get(f"{d}_chance_R@1"), 4), fmt(m.get(f"{d}_queries"))]
        else:
            row += [fmt(m.get(f"{d}_chance_R@1"), 4)]
        rows.append(row)
    header = [label, "R@1 [95% CI]", "R@5", "R@10", "MRR"]
    header += ["median rank", "chance R@1", "queries"] if full else ["chance R@1"]
    return format_table(rows, header)


COMPARISON_HEADER = ["rung", "setting", "features", "top-1 [95% CI]", "± std", "bal. acc", "macro-F1",
                     "Δ vs zero-shot (p)", "fit s", "ms/item head", "ms/item +encoder", "params"]


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The classification rungs of a comparison, one row per (rung, setting)."""
    lines = []
    for r in rows:
        delta = "-"
        if r.get("delta_vs_zeroshot") is not None:
            delta = f"{r['delta_vs_zeroshot']:+.3f} ({p_value_text(r['delta_p_value'], r.get('delta_n_boot'))})"
        lines.append([r["rung"], r["setting"], r["features"],
                      f"{fmt(r['top1'])} [{fmt(r['top1_ci_low'])}, {fmt(r['top1_ci_high'])}]",
                      fmt(r["top1_std"]), fmt(r["balanced_accuracy"]), fmt(r["macro_f1"]), delta,
                      fmt(r["fit_seconds"], 2), fmt(r["predict_ms_per_item"], 4),
                      fmt(r["predict_ms_per_item_with_encoder"], 2), fmt(r["trainable_params"])])
    return format_table(lines, COMPARISON_HEADER)


def format_comparison(rows: Sequence[Mapping[str, Any]], retrieval: Mapping[str, Any] | None,
                      skipped: Mapping[str, str], notes: Sequence[str] = ()) -> str:
    """A whole comparison: classification rungs, retrieval, then what was skipped and why, then notes."""
    out = []
    if rows:
        out.append(comparison_table(rows))
    if retrieval:
        out.append(retrieval_table(retrieval, label="retrieval"))
    out += [f"skipped {rung}: {why}" for rung, why in skipped.items()]
    out += [f"note: {n}" for n in notes]
    return "\n\n".join(out) if out else "no rung ran"
