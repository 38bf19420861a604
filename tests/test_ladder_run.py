"""``encoderlab ladder``: the stop rule on mock rungs with a known answer, the decision split, the few-shot curve,
the whole run on a generated dataset (note, results, scrambled test labels change no decision) and the CLI."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd
import pytest

from encoderlab.cli import main
from encoderlab.data import load_dataset
from encoderlab.encoders import create_encoder
from encoderlab.ladder.climb import climb, step_decision
from encoderlab.ladder.curve import fit_curve
from encoderlab.ladder.run import LadderConfig, run_ladder
from encoderlab.ladder.shape import decision_dataset, task_shape
from encoderlab.results import RunResult
from encoderlab.rungs import RungInputs, RungOptions
from encoderlab.rungs.base import RUNGS, Rung, register_rung
from encoderlab.store import EmbeddingStore
from encoderlab.testing import color_dataset, color_spec, registered_color_encoder


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    path = color_dataset(root / "data", n_per_class=24)
    with registered_color_encoder() as name:
        yield {"root": root, "path": path, "spec": color_spec(path), "encoder": name,
               "store": EmbeddingStore(root / "store")}


# ---- the stop rule --------------------------------------------------------------------------------------------


def _score(name, level, items):
    from encoderlab.ladder.climb import RungScore

    items = np.asarray(items, float)
    return RungScore(name, level, "full", float(items.mean()), items, 0.0, {}, None)  # type: ignore[arg-type]


def test_step_rule_needs_a_gain_clearly_above_min_gain():
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.6).astype(float)
    same = _score("b", 2, base)
    assert not step_decision(_score("a", 1, base), same, min_gain=0.01, n_boot=500)["justified"]
    better = base.copy()
    better[np.flatnonzero(base == 0)[:80]] = 1.0  # +20 points on the same items
    step = step_decision(_score("a", 1, base), _score("b", 2, better), min_gain=0.01, n_boot=500)
    assert step["justified"] and step["ci_low"] > 0.1
    tiny = base.copy()
    tiny[np.flatnonzero(base == 0)[:2]] = 1.0  # +0.5 points: positive, but not proof
    step = step_decision(_score("a", 1, base), _score("b", 2, tiny), min_gain=0.01, n_boot=500)
    assert step["diff"] > 0 and not step["justified"]


def _mock_rung(name: str, level: int, share: float):
    """A rung whose items are correct for a fixed hash share of the ids (so gains are known exactly)."""

    def run(inputs, options):
        le = inputs.labelled()
        ids = le.ids[le.index("test")]
        items = np.asarray([(zlib.crc32(str(i).encode()) % 1000) / 1000 < share for i in ids], float)
        return RunResult("classification", {"top1": float(items.mean())}, {"fit_seconds": 0.01 * level},
                         {"selection": "fixed"}, {}, per_item={"full": items})

    return register_rung(Rung(name, level=level, rank=0, task="classification", needs=("labels",), knobs=(),
                              run=run, description=f"mock at level {level}"))


@pytest.mark.parametrize("gain", [False, True])
def test_climb_stops_when_a_level_adds_nothing_and_goes_on_after_a_real_gain(gain, colour):
    names = {1: f"mock1-{gain}", 2: f"mock2-{gain}", 3: f"mock3-{gain}"}
    shares = {1: 0.5, 2: 0.95 if gain else 0.5, 3: 0.95}
    for level, name in names.items():
        _mock_rung(name, level, shares[level])
    try:
        ds = load_dataset(colour["spec"])
        dds, _ = decision_dataset(ds)
        inputs = RungInputs(create_encoder(colour["encoder"]), dds, colour["store"], progress=False)
        out = climb(inputs, RungOptions(n_boot=300, progress=False), rungs=list(names.values()), min_gain=0.01)
    finally:
        for name in names.values():
            RUNGS.unregister(name)
    assert [s["level"] for s in out.steps] == ([2, 3] if gain else [2])
    if gain:
        assert out.steps[0]["justified"] and names[3] in out.scores and out.chosen == names[2]  # 3 adds nothing
        assert not out.steps[1]["justified"] and "level 3" in out.stopped
    else:
        assert not out.steps[0]["justified"] and names[3] not in out.scores and "stopped" in out.skipped[names[3]]
        assert out.chosen == names[1]  # a tie goes to the simpler rung


# ---- the decision split, the curve -----------------------------------------------------------------------------


def test_decision_split_is_half_of_val_and_holds_no_test_item(colour):
    ds = load_dataset(colour["spec"])
    dds, record = decision_dataset(ds, seed=0)
    t, d = ds.table, dds.table
    assert set(d["id"]) & set(t.loc[t["split"] == "test", "id"]) == set()
    assert set(d.loc[d["split"] == "test", "id"]) <= set(t.loc[t["split"] == "val", "id"])
    assert record["decision_items"] == (d["split"] == "test").sum() == (d["split"] == "val").sum()
    assert d.loc[d["split"] == "test"].groupby("label").size().min() >= 1  # stratified
    again, _ = decision_dataset(ds, seed=0)
    assert list(again.table["split"]) == list(d["split"])  # deterministic
    shape = task_shape(ds, create_encoder(colour["encoder"]))
    assert shape["kind"] == "both" and shape["n_classes"] == 3 and shape["labels_per_class"]["min"] == 16


def test_curve_fit_recovers_a_log_linear_curve_and_needs_three_points():
    points = [{"method": "m", "labels_per_class": float(k), "mean": 0.5 + 0.05 * np.log2(k)} for k in (4, 8, 16, 32)]
    fit = fit_curve(points, 64)
    assert fit["pred"] == pytest.approx(0.8) and fit["slope_per_doubling"] == pytest.approx(0.05)
    assert fit["lo"] == pytest.approx(0.8) and fit["hi"] == pytest.approx(0.8)  # no residual: no spread
    assert fit_curve(points[:2], 64) is None


# ---- the whole run ---------------------------------------------------------------------------------------------

FAST = LadderConfig(max_rung=2, shots=(1, 4), seeds=2, n_boot=100)


def test_ladder_writes_note_results_and_never_decides_on_test_labels(colour, tmp_path):
    ds = load_dataset(colour["spec"])
    enc = create_encoder(colour["encoder"])
    run = run_ladder(enc, ds, colour["store"], FAST, out_dir=tmp_path / "run", progress=False)
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    note = (tmp_path / "run" / "note.md").read_text()
    assert doc["task"] == "ladder" and doc["next_move"]["move"] and doc["decision"]["chosen"] == run.decision.chosen
    for heading in ("## 1. Task", "## 2. Was frozen reuse enough?", "## 3. What still fails", "## 4. Next move",
                    "## 5. Why this depth", "## Common mistakes, checked"):
        assert heading in note
    assert "one modality already solves it" in note  # colour words and mean colours both separate the classes
    assert {r["rung"] for r in doc["test"]["rows"]} == set(run.decision.scores)
    assert (tmp_path / "run" / "rungs" / "linear" / "results.json").exists()
    html = (tmp_path / "run" / "report.html").read_text()
    for section in ("Rungs", "Accuracy vs labels per class", "Confusion matrix", "Retrieval"):
        assert section in html, section
    # scramble the test labels: the decision phase never sees them, so nothing it decided may change
    t = ds.table.copy()
    test = t["split"] == "test"
    t.loc[test, "label"] = np.random.default_rng(1).permutation(t.loc[test, "label"].to_numpy()[::-1])
    scrambled = run_ladder(enc, ds.derive(t), colour["store"], FAST, progress=False)
    a, b = run.decision.to_json(), scrambled.decision.to_json()
    assert [s.decided() for s in run.decision.scores.values()] == [
        s.decided() for s in scrambled.decision.scores.values()]
    assert any(s.knobs() for s in run.decision.scores.values())  # the chosen knobs are compared too
    same = ("level", "from", "to", "diff", "ci_low", "ci_high", "justified")
    assert [{k: s[k] for k in same} for s in a["steps"]] == [{k: s[k] for k in same} for s in b["steps"]]
    assert a["chosen"] == b["chosen"]
    assert run.result.metrics != scrambled.result.metrics  # the test numbers did see the scramble


def test_cli_ladder_runs_and_fails_fast_on_bad_values(colour, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["ladder", "--encoder", colour["encoder"], "--data", colour["spec"], "--max-rung", "1",
                 "--shots", "1", "--seeds", "1", "--n-boot", "100", "--out", str(out), "--json", "--no-progress"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["note"].endswith("note.md") and (out / "note.md").exists()
    assert all(r["level"] == 1 for r in doc["decision"]["rows"]) and not doc.get("reused")
    argv = ["ladder", "--encoder", colour["encoder"], "--data", colour["spec"], "--max-rung", "1", "--shots", "1",
            "--seeds", "1", "--n-boot", "100", "--out", str(out), "--json", "--no-progress"]
    assert main(argv) == 0  # the same request again: the finished run is reused, not recomputed
    again = json.loads(capsys.readouterr().out)
    assert again["reused"] and again["decision"] == doc["decision"]
    assert main([*argv[:-2], "--min-gain", "0.05", "--json", "--no-progress"]) == 0  # another setting: a new run
    assert not json.loads(capsys.readouterr().out).get("reused")
    assert main(["ladder", "--encoder", colour["encoder"], "--data", colour["spec"], "--max-rung", "5"]) == 2
    assert "--max-rung must be 1, 2, 3 or 4" in capsys.readouterr().err
    code = main(["ladder", "--encoder", colour["encoder"], "--data", colour["spec"], "--rungs", "linaer", "--json"])
    assert code != 0 and "linear" in capsys.readouterr().out  # the close match is offered


def test_ladder_refuses_data_without_labels_or_pairs(colour, tmp_path):
    t = pd.DataFrame({"id": ["a", "b"], "image": [None, None], "texts": [["x"], ["y"]], "label": [None, None],
                      "split": ["train", "test"]})
    ds = load_dataset(colour["spec"]).derive(t)
    from encoderlab.errors import EncoderlabError

    with pytest.raises(EncoderlabError, match="neither labels nor image-caption pairs"):
        run_ladder(create_encoder(colour["encoder"]), ds, colour["store"], FAST, progress=False)


def test_finished_rungs_are_kept_so_an_interrupted_ladder_resumes(colour, tmp_path):
    """A rung's result is saved as it finishes; the rerun of the same request reads it instead of refitting."""
    from encoderlab.ladder.climb import run_saved

    calls = []
    rung = _mock_rung("mock-resume", 1, 0.5)
    try:
        original = rung.run

        def counted(inputs, options):
            calls.append(1)
            return original(inputs, options)

        object.__setattr__(rung, "run", counted)
        ds, _ = decision_dataset(load_dataset(colour["spec"]))
        inputs = RungInputs(create_encoder(colour["encoder"]), ds, colour["store"], progress=False)
        first = run_saved(rung, inputs, RungOptions(progress=False), tmp_path / "w" / "mock-resume")
        again = run_saved(rung, inputs, RungOptions(progress=False), tmp_path / "w" / "mock-resume")
    finally:
        RUNGS.unregister("mock-resume")
    assert len(calls) == 1 and np.array_equal(first.per_item["full"], again.per_item["full"])
    (tmp_path / "w" / "mock-resume").write_bytes(b"damaged")  # a damaged file is only a lost shortcut
    assert run_saved(rung, inputs, RungOptions(progress=False), tmp_path / "w" / "mock-resume").per_item


def test_a_complete_ladder_leaves_no_work_files(colour, tmp_path):
    ds = load_dataset(colour["spec"])
    run_ladder(create_encoder(colour["encoder"]), ds, colour["store"], LadderConfig(max_rung=1, shots=(1,), seeds=1,
               n_boot=100), out_dir=tmp_path / "run", progress=False, request="r1")
    assert not (tmp_path / "run" / ".ladder-work").exists() and (tmp_path / "run" / "results.json").exists()
