"""The climb: rungs level by level on the decision split, and the rule that stops it.

Rule (``step_decision``): after a level has run, its best rung is compared with the best rung of every level below
by a paired bootstrap over the decision split's items (top-1 correctness, the same items for both). The climb goes
on only when the lower end of the 95% interval of that difference exceeds ``min_gain`` (default 0.01: one point):
a gain that is not clearly above a point does not justify a deeper, costlier rung. Level 1 (frozen) has nothing
below it and always runs, so level 2 (a head on cached embeddings) always runs too: both cost seconds on cached
features, and "skipping the frozen baseline" is the first mistake the workflow warns about. A level where no rung
can run (e.g. CoOp on a single tower) does not stop the climb. ``run_all`` runs every level anyway
(the decision is still recorded); ``max_level`` and ``budget_seconds`` cap the climb, and what they cut is said.

The best rung of a level is the one with the highest decision top-1; a tie goes to the cheaper one (fit seconds).
The rung chosen at the end is the best of all levels up to the last step that was justified.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics.bootstrap import paired_bootstrap
from ..results import RunResult
from ..rungs import RungInputs, RungOptions, create_rung, list_rungs

LEVEL_NAMES = {1: "frozen", 2: "shallow head", 3: "small adaptation", 4: "larger adaptation"}


@dataclass
class RungScore:
    """One rung's number on one split: top-1 of its main setting, per-item correctness, costs."""

    name: str
    level: int
    setting: str
    top1: float
    items: np.ndarray
    fit_seconds: float
    costs: dict[str, Any]
    result: RunResult

    def row(self) -> dict[str, Any]:
        m = self.result.metrics
        prefix = "" if self.setting in ("full", "zeroshot") else f"{self.setting}/"
        return {"rung": self.name, "level": self.level, "setting": self.setting, "top1": self.top1,
                "top1_ci_low": m.get(f"{prefix}top1_ci_low"), "top1_ci_high": m.get(f"{prefix}top1_ci_high"),
                "fit_seconds": self.fit_seconds, "predict_ms_per_item": self.costs.get("predict_ms_per_item"),
                "predict_ms_per_item_with_encoder": self.costs.get("predict_ms_per_item_with_encoder"),
                "peak_rss_mb": self.costs.get("peak_rss_mb"), "trainable_params": self.costs.get("trainable_params"),
                "selection": self.result.config.get("selection", "-"), "knobs": self.knobs()}

    def knobs(self) -> list[dict[str, Any]]:
        """The knobs the rung chose in its main setting (one entry per seed) and how."""
        settings = self.result.extra.get("settings") or []
        return [{"seed": s.get("seed"), "knobs": s.get("knobs"), "chosen_by": s.get("chosen_by")}
                for s in settings if s.get("setting") == self.setting]

    def decided(self) -> dict[str, Any]:
        """What a decision may depend on: the rung's numbers and chosen knobs, not its timings."""
        r = self.row()
        return {k: r[k] for k in ("rung", "level", "setting", "top1", "top1_ci_low", "top1_ci_high", "selection",
                                  "knobs")}


def main_setting(result: RunResult) -> str | None:
    """The setting a rung is compared by: all labels ("full"), zero-shot's own, else its largest few-shot."""
    for s in ("full", "zeroshot"):
        if s in result.per_item:
            return s
    shots = sorted((int(s.split("-")[0]), s) for s in result.per_item if s.endswith("-shot"))
    return shots[-1][1] if shots else None


def score(name: str, result: RunResult) -> RungScore | None:
    setting = main_setting(result)
    if setting is None:
        return None
    items = np.asarray(result.per_item[setting], dtype=float)
    costs = result.costs
    prefix = "" if setting in ("full", "zeroshot") else f"{setting}/"
    fit = costs.get(f"{prefix}fit_seconds", costs.get("fit_seconds")) or 0.0
    return RungScore(name, create_rung(name).level, setting, float(items.mean()) if items.size else float("nan"),
                     items, float(fit), dict(costs), result)


def best_of(scores: Sequence[RungScore]) -> RungScore | None:
    """Highest top-1; a tie goes to the simpler rung (lower level, then its rank: zero-shot before kNN), then the
    cheaper fit, then the name (deterministic)."""
    ok = [s for s in scores if np.isfinite(s.top1)]
    return min(ok, key=lambda s: (-round(s.top1, 12), s.level, create_rung(s.name).rank, s.fit_seconds,
                                  s.name)) if ok else None


def step_decision(below: RungScore, here: RungScore, *, min_gain: float, n_boot: int, seed: int = 0
                  ) -> dict[str, Any]:
    """Whether ``here`` (best of a level) clearly beats ``below`` (best of the levels below) on the same items."""
    test = paired_bootstrap(here.items, below.items, n_boot=n_boot, seed=seed)
    climb = bool(test["ci_low"] > min_gain)
    return {"level": here.level, "from": below.name, "to": here.name, "from_top1": below.top1, "to_top1": here.top1,
            "diff": test["diff"], "ci_low": test["ci_low"], "ci_high": test["ci_high"], "p_value": test["p_value"],
            "n_items": int(here.items.size), "min_gain": min_gain, "justified": climb,
            "extra_fit_seconds": here.fit_seconds - below.fit_seconds,
            "rule": f"lower 95% bound of the paired difference on the decision split > {min_gain:g}"}


@dataclass
class Climb:
    """What ran on the decision split, each step's decision, what was skipped and why, the chosen rung."""

    scores: dict[str, RungScore] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    stopped: str = ""
    chosen: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"rows": [s.row() for s in self.scores.values()], "steps": self.steps, "skipped": self.skipped,
                "stopped": self.stopped, "chosen": self.chosen, "seconds": round(self.seconds, 2)}


def ladder_rungs(max_level: int, names: Sequence[str] | None = None) -> dict[int, list[str]]:
    """Classification rungs by level (registry order), up to ``max_level``; ``names`` restricts them."""
    out: dict[int, list[str]] = {}
    for name in list_rungs(task="classification"):
        rung = create_rung(name)
        if rung.level <= max_level and (names is None or name in names):
            out.setdefault(rung.level, []).append(name)
    return out


def climb(inputs: RungInputs, options: RungOptions, *, max_level: int = 4, run_all: bool = False,
          min_gain: float = 0.01, budget_seconds: float | None = None, rungs: Sequence[str] | None = None,
          say: Any = None, work_dir: Path | None = None) -> Climb:
    """Run the levels in order on ``inputs`` (the decision dataset) and stop by the rule of the module docstring.

    ``work_dir``: where each finished rung's result is kept until the ladder completes (``run_saved``)."""
    out, t0 = Climb(), time.perf_counter()
    levels = ladder_rungs(max_level, rungs)
    justified_up_to = 0
    for level in sorted(levels):
        if out.stopped and not run_all:
            out.skipped.update({n: f"not run: the climb stopped at {out.stopped.split(':')[0]}" for n in levels[level]})
            continue
        ran = _run_level(inputs, options, levels[level], out, t0, budget_seconds, say, work_dir)
        here = best_of(ran)
        below = best_of([s for s in out.scores.values() if s.level < level])
        if here is None:  # nothing at this level could run here: the next level is compared with what did
            continue
        if below is None:
            justified_up_to = level
            continue
        step = step_decision(below, here, min_gain=min_gain, n_boot=options.n_boot, seed=options.seed)
        out.steps.append(step)
        if out.stopped:  # --all: later levels run and are recorded, but the choice stays where the rule stopped
            continue
        if step["justified"]:
            justified_up_to = level
        else:
            out.stopped = (f"level {level} ({LEVEL_NAMES.get(level, level)}): its best, {here.name}, is not clearly "
                           f"better than {below.name} (Δ {step['diff']:+.3f}, 95% CI [{step['ci_low']:+.3f}, "
                           f"{step['ci_high']:+.3f}]; the rule needs a lower bound above {min_gain:g})")
    eligible = [s for s in out.scores.values() if s.level <= max(justified_up_to, 1)]
    chosen = best_of(eligible)
    out.chosen = chosen.name if chosen is not None else None
    out.seconds = time.perf_counter() - t0
    return out


def failure(e: Exception) -> str:
    from ..errors import EncoderlabError

    return e.message if isinstance(e, EncoderlabError) else f"{type(e).__name__}: {e}"


def run_saved(rung: Any, inputs: RungInputs, options: RungOptions, path: Path | None) -> RunResult:
    """``rung.run``, kept in ``path`` (a pickle of the whole result, per-item values included, written atomically)
    so that an interrupted ladder rerun with the same request reads finished rungs instead of refitting them."""
    if path is not None and path.exists():
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        except Exception:  # noqa: BLE001 - a damaged file is only a lost shortcut: run the rung again
            pass
    result = rung.run(inputs, options)
    if path is not None:
        from ..atomic import atomic_write_bytes

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, pickle.dumps(result))
    return result


def _run_level(inputs: RungInputs, options: RungOptions, names: list[str], out: Climb, t0: float,
               budget_seconds: float | None, say: Any, work_dir: Path | None = None) -> list[RungScore]:
    ran = []
    for name in names:
        rung = create_rung(name)
        why = rung.unmet(inputs.encoder, inputs.dataset)
        if why is None and budget_seconds is not None and time.perf_counter() - t0 > budget_seconds:
            why = f"the budget of {budget_seconds / 60:g} min was spent"
        if why is not None:
            out.skipped[name] = why
            continue
        if say is not None:
            say(f"ladder: level {rung.level} {name} ...")
        try:
            s = score(name, run_saved(rung, inputs, options, work_dir / name if work_dir else None))
        except Exception as e:  # noqa: BLE001 - one rung failing must not lose the others; the note says why
            out.skipped[name] = f"failed: {failure(e)}"
            continue
        if s is None:
            out.skipped[name] = "produced no classification setting"
            continue
        out.scores[name] = s
        ran.append(s)
    return ran
