"""The Encoder Note: the five answers of one ladder run, each with its numbers, in short markdown.

1. the task shape; 2. whether frozen reuse was enough (best frozen vs chosen, Δ with interval, costs); 3. what still
fails (worst classes, confused pairs, slices, neighbour agreement, data problems); 4. the next move, by the rules
stated in the note (``next_move``); 5. why that depth is worth it (gain per added cost, the seeds' spread).
The workflow's common mistakes are checked and named when they occur.

Everything here is read from the facts ``run.run_ladder`` gathered; test numbers come from the report phase, every
decision from the decision phase.
"""

from __future__ import annotations

from typing import Any

from .climb import LEVEL_NAMES, best_of
from .modality import modality_sentence
from .shape import describe_shape

#: share of test items with a near-duplicate in train/val above which fixing the data comes before any rung
LEAK_SHARE = 0.05


def _ci(v: float | None, lo: float | None, hi: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else f"{v:.3f}"


def _delta(t: dict[str, Any]) -> str:
    return f"Δ {t['diff']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}]"


def _cost(row: dict[str, Any]) -> str:
    parts = [f"fit {row['fit_seconds']:.1f} s" if row.get("fit_seconds") is not None else None,
             f"{row['predict_ms_per_item_with_encoder']:.1f} ms/item with the encoder"
             if row.get("predict_ms_per_item_with_encoder") is not None else None,
             f"{int(row['trainable_params']):,} trained params" if row.get("trainable_params") else None]
    return ", ".join(p for p in parts if p)


def next_move(facts: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """(the move, why — each reason with its number, the rules in the order they are applied)."""
    rules = [f"1. test items with a near-duplicate in train/val (> {LEAK_SHARE:.0%} of test) → fix the data first: "
             "every number is inflated (fewer: deduplicate, as a second move);",
             "2. the climb justified a level-3/4 rung → that adaptation (CoOp / fine-tune);",
             "3. the chosen rung is a head on cached embeddings (level 2) → probe;",
             "4. the chosen rung is frozen (level 1) → stop here (retrieval / zero-shot as it is);",
             "5. then, as a second move: the few-shot curve predicts > min-gain from twice the labels (lower bound) → "
             "more labels; zero-shot more than 10 points under the best head → better class names / prompts."]
    decided, reported = facts["decided"], facts["reported"]
    why: list[str] = []
    if not decided:
        return ("retrieval as it is (no labels to adapt to)", ["the data has captions but no labels"], rules)
    diag = reported.get("diagnosis") if reported else None
    test_n = diag.overall["n"] if diag is not None else 0
    leaks = diag.counts.get("test_items_with_near_duplicate", 0) if diag is not None else 0
    chosen = decided["climb"].chosen
    level = decided["climb"].scores[chosen].level if chosen in decided["climb"].scores else 1
    if test_n and leaks / test_n > LEAK_SHARE:
        move = "fix the data"
        why.append(f"{leaks} of {test_n} test items have a near-duplicate in train/val")
    elif level >= 3:
        move = f"adapt: {chosen}"
    elif level == 2:
        move = f"probe: {chosen} on cached embeddings"
    else:
        move = f"stop here: {chosen} on the frozen encoder"
    if test_n and 0 < leaks / test_n <= LEAK_SHARE:
        why.append(f"deduplicate: {leaks} of {test_n} test items have a near-duplicate in train/val (their numbers "
                   "are optimistic)")
    fit = (decided["curve"].get("fit") or [None])[0]
    min_gain = facts["config"].min_gain
    if fit is not None and fit["gain_lo"] > min_gain:
        why.append(f"more labels: twice the labels per class would likely add {fit['gain']:+.3f} "
                   f"[{fit['gain_lo']:+.3f}, {fit['gain_hi']:+.3f}] ({fit['method']})")
    scores = decided["climb"].scores
    heads = [s for s in scores.values() if s.level == 2]
    if "zeroshot" in scores and heads:
        gap = max(h.top1 for h in heads) - scores["zeroshot"].top1
        if gap > 0.10:
            why.append(f"better class names / prompts: zero-shot is {gap * 100:.1f} points under the best head "
                       "(on the decision split) — worth it where labels are scarce")
    return move, why, rules


def _frozen_section(facts: dict[str, Any]) -> list[str]:
    decided, reported = facts["decided"], facts["reported"]
    climb, scores = decided["climb"], reported["scores"]
    lines = ["## 2. Was frozen reuse enough?"]
    picked = best_of([s for s in climb.scores.values() if s.level == 1])  # chosen on the decision split
    best_frozen = scores.get(picked.name) if picked is not None else None
    chosen = scores.get(climb.chosen or "")
    if best_frozen is not None:
        r = best_frozen.row()
        lines.append(f"- Best frozen rung (on the decision split): **{best_frozen.name}** "
                     f"{_ci(r['top1'], r['top1_ci_low'], r['top1_ci_high'])} test top-1 ({_cost(r)}).")
    if chosen is not None:
        r = chosen.row()
        lines.append(f"- Chosen: **{chosen.name}** (level {chosen.level}, {LEVEL_NAMES.get(chosen.level)}) "
                     f"{_ci(r['top1'], r['top1_ci_low'], r['top1_ci_high'])} ({_cost(r)}).")
    cvf = reported.get("chosen_vs_frozen")
    if cvf:
        lines.append(f"- Chosen vs best frozen on the same test items: {_delta(cvf)}.")
    elif chosen is not None and best_frozen is not None and chosen.name == best_frozen.name:
        lines.append("- **Yes**: no rung above the frozen ones was clearly better on the decision split.")
    for step in climb.steps:
        verdict = "justified" if step["justified"] else "not justified"
        lines.append(f"- Decision, level {step['level']}: {step['to']} vs {step['from']} "
                     f"{_delta(step)} on {step['n_items']} decision items → {verdict} (rule: {step['rule']}).")
    if climb.stopped:
        lines.append(f"- The climb stopped at {climb.stopped}.")
    for name, why in (reported.get("failed") or {}).items():
        lines.append(f"- No test number for {name}: its refit on the original splits failed ({why}).")
    vb = reported.get("vs_baselines") or {}
    if vb.get("frozen"):
        lines.append(f"- Against the best simple baseline ({vb['best_baseline']}, {vb['best_baseline_top1']:.3f}): "
                     f"{vb['frozen']['rung']} {_delta(vb['frozen'])}.")
    return lines


def _fails_section(facts: dict[str, Any]) -> list[str]:
    diag = facts["reported"].get("diagnosis")
    lines = ["## 3. What still fails"]
    if diag is None:
        return lines + ["- No per-item predictions of the chosen rung to diagnose."]
    worst = [c for c in diag.per_class if c["recall"] < 1.0][:3]
    if worst:
        lines.append("- Worst classes (test recall): " + "; ".join(
            f"{c['class']} {_ci(c['recall'], c.get('ci_low'), c.get('ci_high'))} (n={c['n']})" for c in worst) + ".")
    if diag.confused_pairs:
        lines.append("- Most confused: " + "; ".join(
            f"{p['true']} → {p['predicted']} ×{p['count']}" for p in diag.confused_pairs[:3]) + ".")
    bad_slices = [s for s in diag.slices if not s.get("small")][:2]
    if bad_slices:
        lines.append("- Worst slices: " + "; ".join(
            f"{s['column']}={s['value']} {_ci(s['accuracy'], s.get('ci_low'), s.get('ci_high'))} (n={s['n']})"
            for s in bad_slices) + ".")
    mixed = [a for a in sorted(diag.neighbour_agreement, key=lambda a: a.get("agreement", 1.0))[:2]
             if a.get("agreement", 1.0) < 0.9]
    if mixed:
        lines.append("- Neighbours that disagree with labels (train/val kNN graph): " + "; ".join(
            f"{a['class']} {a['agreement']:.2f}" + (f" (mixed with {a['mixed_with']})" if a.get("mixed_with") else "")
            for a in mixed) + ".")
    c = diag.counts
    lines.append(f"- Data: {c.get('label_error_candidates', 0)} label-error candidates (neighbours and an "
                 "out-of-fold probe both disagree with the label; the strongest are listed in the report), "
                 f"{c.get('test_items_with_near_duplicate', 0)} test items with a near-duplicate in train/val, "
                 f"{c.get('exact_duplicate_groups', 0)} exact-duplicate groups, {c.get('outliers', 0)} outliers, "
                 f"imbalance {diag.imbalance_ratio:.1f}x (kNN graph: {diag.backend}, {diag.graph_seconds:.1f} s).")
    return lines


def _worth_section(facts: dict[str, Any]) -> list[str]:
    decided = facts["decided"]
    lines = ["## 5. Why this depth"]
    climb = decided["climb"]
    for step in climb.steps:
        extra = step["extra_fit_seconds"]
        rate = f"{step['diff'] * 100 / extra:+.2f} points per extra fit second" if extra > 0.05 else "no extra fit time"
        lines.append(f"- Level {step['level']}: {step['diff'] * 100:+.1f} points for {extra:+.1f} s of fitting "
                     f"({rate}).")
    spread = []
    for name, s in climb.scores.items():
        shots = sorted(int(k.split("-")[0]) for k in s.result.per_item if k.endswith("-shot"))
        std = s.result.metrics.get(f"{shots[-1]}-shot/top1_std") if shots else None
        if std is not None:
            spread.append(f"{name} ±{std:.3f} at {shots[-1]} shots")
    if spread:
        lines.append(f"- Spread over seeds (std of decision top-1): {', '.join(spread)}.")
    curve = decided.get("curve") or {}
    if curve.get("note"):
        lines.append(f"- Few-shot curve (decision split): {curve['note']}.")
    return lines


def _mistakes(facts: dict[str, Any]) -> list[str]:
    """The workflow's common mistakes, each checked on this run."""
    decided = facts["decided"]
    out = ["## Common mistakes, checked"]
    climb = decided["climb"]
    levels = {s.level for s in climb.scores.values()}
    out.append("- Skipping the frozen baseline: " + ("no — frozen rungs ran first." if 1 in levels else
                                                     "**yes** — no frozen rung could run."))
    mod = decided.get("modality") or {}
    out.append("- Multimodal where one modality suffices: " + modality_sentence(mod, facts["config"].min_gain))
    tiny = [s for s in climb.steps if s["diff"] > 0 and not s["justified"]]
    for s in tiny:
        out.append(f"- A tiny validation gain is not proof: level {s['level']} ({s['to']}) gained "
                   f"{s['diff'] * 100:+.1f} points on {s['n_items']} decision items, interval "
                   f"[{s['ci_low'] * 100:+.1f}, {s['ci_high'] * 100:+.1f}] — not enough to climb.")
    out.append("- Changing encoder, head and split at once: no — one encoder, one split (fingerprints in "
               "results.json), only the rung changes.")
    out.append("- Cost against gain: see §5; every row carries fit seconds, ms/item, memory and trained parameters.")
    return out


def encoder_note(facts: dict[str, Any]) -> str:
    """The note as markdown."""
    shape = facts["shape"]
    lines = [f"# Encoder Note — {shape['encoder']}", "", "## 1. Task", f"- {describe_shape(shape)}."]
    decided = facts["decided"]
    if decided:
        sp = decided["split"]
        lines.append(f"- Decisions on {sp['decision_items']} held-out val items (half of val; the other "
                     f"{sp['val_items_left']} choose each rung's knobs); the {sp['test_items_excluded']} test items "
                     "were read once, afterwards, for the numbers below.")
        lines += ["", *_frozen_section(facts), "", *_fails_section(facts)]
    retrieval = facts.get("retrieval")
    if retrieval and "result" in retrieval:
        m = retrieval["result"].metrics
        prior = retrieval["prior"].metrics
        lines += ["", "## Retrieval (test)", f"- Frozen: i2t R@1 {m.get('i2t_R@1', float('nan')):.3f}, t2i R@1 "
                  f"{m.get('t2i_R@1', float('nan')):.3f}, MRR {m.get('i2t_mrr', m.get('mrr', float('nan'))):.3f}; "
                  f"content-blind caption prior i2t R@1 {prior.get('i2t_R@1', float('nan')):.3f}."]
    move, why, rules = next_move(facts)
    lines += ["", "## 4. Next move", f"**{move}**" + (": " + "; ".join(why) if why else "."), "",
              "Rules, in order:", *[f"{r}" for r in rules]]
    if decided:
        lines += ["", *_worth_section(facts), "", *_mistakes(facts)]
    lines += ["", f"_Ladder time: {facts['seconds'] / 60:.1f} min._"]
    return "\n".join(lines) + "\n"
