"""Text of the curation results: the tables the CLI prints and the markdown of the reports (plain data in, strings
out, nothing printed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..results import RunResult, format_table, with_ci
from ..results.tables import p_value_text
from .rules import RULES

METRIC_NAMES = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")


def rule_counts_table(counts: Mapping[str, int], flagged: Mapping[str, int], pairs: int) -> str:
    """Dropped (first reason) and flagged (the rule alone) per rule that dropped or flagged anything."""
    rows = []
    for rule in RULES:
        d, f = counts.get(rule, 0), flagged.get(rule)
        if d or f:
            rows.append([rule, d, f"{100 * d / max(pairs, 1):.1f}%", "" if f is None else f])
    if not rows:
        return "no pair dropped"
    return format_table(rows, ["rule", "dropped", "of pairs", "flagged alone"])


def filter_lines(summary: Mapping[str, Any], scope: str, spec: str, out_dir: str) -> str:
    s = summary
    cut = s.get("cut")
    lines = [f"filtered split {scope}: {s['kept_pairs']} of {s['pairs']} pairs kept ({100 * s['kept_fraction']:.1f}%),"
             f" {s['kept_rows']} of {s['rows']} rows"
             + (f"; score cut {cut:.3f}" if cut is not None else ""),
             f"filtered data: --data '{spec}'", f"run:   {out_dir}  (report.html, dropped.parquet, scores.png)"]
    return "\n".join(lines)


def _arm_rows(table: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    return [[r["arm"], r["pairs"], r["images"], r["epochs"], r["steps"], *[with_ci(r, m) for m in METRIC_NAMES]]
            for r in table]


def _paired_rows(paired: Sequence[Mapping[str, Any]], n_boot: int | None) -> list[list[Any]]:
    return [[f"{p['a']} - {p['b']}", p["metric"], f"{p['diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]",
             p_value_text(p["p_value"], n_boot)] for p in paired]


def compare_tables(run: RunResult) -> str:
    """The arms (sizes, budget, test recall with intervals) and the paired differences, as two text tables."""
    table, paired = run.extra["table"], run.extra["paired"]
    n_boot = run.config.get("n_boot")
    head = ["arm", "pairs", "images", "epochs", "steps", *METRIC_NAMES]
    q = f"{run.metrics['test_images']} test images / {run.metrics['test_captions']} test captions"
    return (format_table(_arm_rows(table), head) + f"\n\npaired bootstrap on the same queries ({q}):\n"
            + format_table(_paired_rows(paired, n_boot), ["comparison", "metric", "difference [95% CI]", "p"]))


def _md_table(rows: list[list[Any]], head: Sequence[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def compare_note(run: RunResult, arms: Mapping[str, Any], paired: Sequence[Mapping[str, Any]]) -> str:
    """The markdown at the top of the filter-compare report."""
    c, m = run.config, run.metrics
    f = c["filter"]
    key = next((p for p in paired if p["a"] == "filtered" and p["b"] == "random" and p["metric"] == "i2t_R@1"), None)
    verdict = ""
    if key is not None:
        sig = key["ci_low"] > 0 or key["ci_high"] < 0
        verdict = (f"Filtered vs random subset of the same size, test i2t R@1: {key['diff']:+.3f} "
                   f"[{key['ci_low']:+.3f}, {key['ci_high']:+.3f}] - "
                   + ("the interval excludes 0." if sig else "the interval includes 0: not shown to help."))
    lines = [
        "## Protocol",
        f"- filter `{run.config['encoder']}` on the train split only: kept {f['kept_pairs']} of {f['pairs']} pairs "
        f"({100 * f['kept_fraction']:.1f}%); val and test untouched.",
        f"- rung: {c['rung']}, towers `{c['vision']}` + `{c['text']}`, dim {c['dim']}, batch {c['batch_size']}, "
        f"lr {c['lr']:g}, seed {c['seed']}; budget `{c['budget']}` (base {c['epochs']} epochs on all pairs); heads "
        "chosen on val.",
        f"- every arm scored once on the same {m['test_images']} test images / {m['test_captions']} captions.",
        "", "## Result", verdict, "",
        _md_table(_arm_rows(run.extra["table"]), ["arm", "pairs", "images", "epochs", "steps", *METRIC_NAMES]),
        "", "## Paired differences (bootstrap over the same test queries)",
        _md_table(_paired_rows(paired, c.get("n_boot")), ["comparison", "metric", "difference [95% CI]", "p"]),
        "", "The bar plot is `compare.png` beside this page; the filter's own report, manifest and dropped pairs "
        "are in `filter/`.",
    ]
    return "\n".join(lines)

