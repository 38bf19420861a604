"""The rung registry and its contract, the few-shot protocol (equal labels for every head), run directories, and
datasets that ship only train and test.

Every registered rung runs through the same ``Rung.run(inputs, options)`` on the mock colour encoder, whose answers
are exact; the contract test is parametrized over ``list_rungs()``, so a new rung is covered the day it registers.
"""

from __future__ import annotations

import csv
import json
import math
import threading

import numpy as np
import pytest

from encoderlab.cli import main
from encoderlab.data import load_dataset
from encoderlab.encoders import create_encoder
from encoderlab.encoders.base import TrainingItems
from encoderlab.errors import EncoderlabError, UnknownNameError
from encoderlab.extract import labelled_embeddings
from encoderlab.heads import ZeroShotClassifier
from encoderlab.ladder import run_comparison
from encoderlab.results import SCHEMA_VERSION, RunResult, default_run_dir, read_run, write_run
from encoderlab.rungs import HeadContext, RungInputs, RungOptions, create_rung, list_rungs, run_probe, run_retrieval
from encoderlab.rungs.zeroshot import zeroshot_classifier
from encoderlab.store import EmbeddingStore
from encoderlab.testing import ColorEncoder, color_dataset, color_spec, registered_color_encoder

BUILTIN = ["zeroshot", "knn", "retrieval", "linear", "tip", "clap", "coop", "tip-f", "finetune-last", "finetune"]
#: what compare runs by default: the frozen and shallow rungs (levels 1-2)
DEFAULT = [r for r in BUILTIN if create_rung(r).level <= 2]


@pytest.fixture(autouse=True)
def color_encoder():
    with registered_color_encoder() as name:
        yield name


@pytest.fixture
def color_data(tmp_path):
    return load_dataset(color_spec(color_dataset(tmp_path / "colors")))


@pytest.fixture
def store(tmp_path):
    return EmbeddingStore(tmp_path / "store")


class ImageOnly(ColorEncoder):
    """The colour encoder without its text tower: a single-modality backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.spec, self.modalities = "image-only-color", ("image",)

    def fingerprint_parts(self) -> dict:
        return {"kind": "image-only-color", "version": 1}


# ---- registry ----------------------------------------------------------------------------------------------------
def test_registry_lists_in_ladder_order_and_suggests_close_matches():
    assert list_rungs() == BUILTIN
    assert list_rungs(head=True) == ["knn", "linear", "tip", "clap", "tip-f"]
    assert list_rungs(task="retrieval") == ["retrieval"]
    assert list_rungs("*e*") == ["zeroshot", "retrieval", "linear", "finetune-last", "finetune"]
    with pytest.raises(UnknownNameError, match="unknown rung 'lienar'; did you mean linear"):
        create_rung("lienar")
    for name in list_rungs():
        rung = create_rung(name)
        assert rung.name == name and set(rung.needs) <= {"dual", "labels", "captions"}
        assert rung.describe()["knobs"] == list(rung.knobs)


def test_needs_are_checked_against_encoder_and_data(color_data):
    image_only = ImageOnly()
    assert create_rung("zeroshot").unmet(image_only, color_data) == "needs a dual encoder (image and text towers)"
    assert create_rung("knn").unmet(image_only, color_data) is None
    unlabelled = color_data.subset(color_data.table["label"].isna() | True)
    unlabelled.table["label"] = None
    assert "labelled" in create_rung("linear").unmet(ColorEncoder(), unlabelled)
    no_captions = color_data.subset(color_data.table["label"].notna())
    no_captions.table["texts"] = [[] for _ in range(len(no_captions))]
    assert "captions" in create_rung("retrieval").unmet(ColorEncoder(), no_captions)


# ---- the contract, over every registered rung ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list_rungs())
def test_rung_contract(name, color_data, store, tmp_path):
    rung = create_rung(name)
    enc = create_encoder("test-color", device="cpu")
    why = rung.unmet(enc, color_data)
    if why is not None:  # the mock has no real towers to train: a rung that needs one says so (and has its own tests)
        assert rung.supports is not None and ("prompt context" in why or "not trainable" in why)
        pytest.skip(f"{name} cannot run on the mock encoder: {why}")
    result = rung.run(RungInputs(enc, color_data, store, progress=False),
                      RungOptions(shots=(1, 2), seeds=2, n_boot=50, templates="name", progress=False))
    assert isinstance(result, RunResult)
    assert result.primary in result.metrics and math.isfinite(result.metrics[result.primary])
    assert {"predict_ms_per_item", "encoder_ms_per_item", "trainable_params", "peak_rss_mb"} <= set(result.costs)
    # every knob the rung says it chooses is recorded, with how it was chosen
    if rung.make_head is not None:
        for s in result.extra["settings"]:
            assert set(s["knobs"]) == set(rung.knobs) or s["chosen_by"] == "fixed"
            assert s["chosen_by"] in ("val", "k-shot-val", "fixed")
    else:
        assert set(result.config["chosen"]) == set(rung.knobs)
    # one writer, one reader
    doc = result.to_json()
    assert doc["schema_version"] == SCHEMA_VERSION and json.loads(json.dumps(doc)) == doc
    back = read_run(write_run(result, tmp_path / name))
    assert back.task == result.task and back.metrics == doc["metrics"] and back.config == doc["config"]
    assert (back.predictions is not None) == (result.predictions is not None)


@pytest.mark.parametrize("name", list_rungs(head=True))
def test_head_rungs_follow_one_fit_contract(name, color_data, store):
    enc = create_encoder("test-color", device="cpu")
    emb = labelled_embeddings(enc, color_data, store, progress=False)
    tr, va = emb.index("train"), emb.index("val")
    zs = zeroshot_classifier(enc, emb.classes, store, ["a photo of a {}."])[0]
    rung = create_rung(name)
    head = rung.make_head(HeadContext(seed=0, refit=False, zero_shot_factory=lambda: zs))
    with pytest.raises(EncoderlabError, match="not fitted"):
        head.predict(emb.X[:2])
    assert head.fit(emb.X[tr], emb.y[tr], emb.X[va], emb.y[va]) is head
    assert np.array_equal(head.fit_counts_, np.bincount(emb.y[tr], minlength=emb.n_classes))
    refit = rung.make_head(HeadContext(seed=0, refit=True, zero_shot_factory=lambda: zs))
    refit.fit(emb.X[tr], emb.y[tr], emb.X[va], emb.y[va])
    assert refit.n_fit_items_ == tr.size + va.size  # the full-data protocol refits on train + val
    assert head.predict(emb.X[:3]).shape == (3,) and head.score(emb.X[va], emb.y[va]) > 0.9


def test_zeroshot_classifier_is_a_head():
    zs = ZeroShotClassifier()
    with pytest.raises(EncoderlabError, match="ZeroShotClassifier is not fitted"):
        zs.predict(np.ones((2, 3)))
    zs.fit(np.eye(3, dtype=np.float32), ["a", "b", "c"])
    assert list(zs.predict(np.eye(3)[[2, 0]])) == ["c", "a"] and zs.n_fit_items_ == 0


# ---- the few-shot protocol: every head's final model holds exactly k labels per class ---------------------------
@pytest.mark.parametrize("name", list_rungs(head=True))
def test_few_shot_heads_see_exactly_k_labels_per_class(name, color_data, store):
    enc = create_encoder("test-color", device="cpu")
    emb = labelled_embeddings(enc, color_data, store, progress=False)
    result = run_probe(enc, emb, store, method=name, shots=[1, 2], seeds=2, n_boot=50, templates="name")
    few = [s for s in result.extra["settings"] if s["setting"] != "full"]
    assert len(few) == 4
    for s in few:
        k = int(s["setting"].split("-")[0])
        assert s["val_items"] > 0  # validation labels were there to leak
        assert s["final_model_items_per_class"] == dict.fromkeys(emb.classes, k), s
        assert s["final_model_items"] == k * emb.n_classes == s["train_items"]
    full = next(s for s in result.extra["settings"] if s["setting"] == "full")
    assert full["final_model_items"] == full["train_items"] + full["val_items"]


# ---- run directories -----------------------------------------------------------------------------------------------
def test_default_run_dirs_are_unique_and_created_exclusively(tmp_path):
    made: list = []
    threads = [threading.Thread(target=lambda: made.append(default_run_dir("probe-knn", "a/b:c", tmp_path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(p.is_dir() and not any(p.iterdir()) for p in made)
    assert all(p.name.startswith("probe-knn-") and "a_b_c" in p.name for p in made)


def test_read_run_checks_the_schema(tmp_path):
    write_run(RunResult("t", {"x": np.float32(0.5), "n": np.int64(3), "gone": float("nan")}, {}, {}, {}), tmp_path)
    assert read_run(tmp_path).metrics == {"x": 0.5, "n": 3, "gone": None}
    doc = json.loads((tmp_path / "results.json").read_text())
    doc["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / "results.json").write_text(json.dumps(doc))
    with pytest.raises(EncoderlabError, match="schema_version"):
        read_run(tmp_path)
    with pytest.raises(EncoderlabError, match="holds no results.json"):
        read_run(tmp_path / "nothing")


def test_comparison_with_every_rung_skipped_still_writes_a_result(color_data, store, tmp_path):
    comp = run_comparison(ImageOnly(), color_data, store, rungs=["zeroshot", "tip", "retrieval"], n_boot=50,
                          progress=False, out_dir=tmp_path / "cmp")
    assert comp.results == {} and set(comp.skipped) == {"zeroshot", "tip", "retrieval"}
    doc = read_run(tmp_path / "cmp")
    assert doc.task == "compare" and doc.extra["skipped_rungs"] == comp.skipped
    assert "skipped tip: needs a dual encoder" in comp.format()
    with pytest.raises(UnknownNameError, match="did you mean knn"):
        run_comparison(ImageOnly(), color_data, store, rungs=["knnn"], progress=False)


# ---- a source with train and test only ---------------------------------------------------------------------------
def _train_test_csv(tmp_path) -> str:
    src = color_dataset(tmp_path / "colors", splits=("train",) * 10 + ("test",) * 2)
    path = tmp_path / "colors.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "label", "split"])
        for line in src.read_text().splitlines():
            row = json.loads(line)
            for caption in row["text"]:
                w.writerow([row["image"], caption, row["label"], row["split"]])
    return f"csv:{path}?text=caption"


def test_train_test_only_csv_runs_every_rung(tmp_path, capsys):
    data = _train_test_csv(tmp_path)
    source = load_dataset(data)
    assert source.splits == ["test", "train"]
    common = ["--encoder", "test-color", "--data", data, "--store", str(tmp_path / "store"), "--n-boot", "100"]
    code = main(["compare", *common, "--shots", "1,2", "--seeds", "2", "--templates", "name", "--json",
                 "--out", str(tmp_path / "cmp")])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["skipped_rungs"] == {} and set(doc["rung_dirs"]) == set(DEFAULT)
    info = doc["data"]["split_info"]
    assert info["method"] == "carved" and info["from_split"] == "train" and info["base"] == {"method": "source"}
    assert info["items"] == 3  # 10 % of each class's 10 train items
    assert doc["data"]["splits"]["val"]["items"] == 3 and doc["data"]["splits"]["train"]["items"] == 27
    test_ids = sorted(source.select_split("test").table["id"])
    for name in ("linear", "knn", "tip"):
        res = read_run(tmp_path / "cmp" / name)
        assert res.data["splits"]["test"]["items"] == len(test_ids)  # test is never touched
        assert any("carved out of train" in n for n in res.config["notes"])
        assert all(s["val_items"] > 0 for s in res.extra["settings"])
    # the single-rung command says so too, instead of "split 'val' has no usable items"
    assert main(["probe", "--method", "linear", *common, "--out", str(tmp_path / "lin")]) == 0
    captured = capsys.readouterr()
    assert "carved out of train" in captured.err and "full" in captured.out
    # align chooses its epoch on val too: the same carve serves it
    assert main(["align", "--vision", "test-color", "--text", "test-color", "--data", data, "--store",
                 str(tmp_path / "store"), "--out", str(tmp_path / "aligned"), "--epochs", "2", "--dim", "4",
                 "--n-boot", "100", "--json"]) == 0
    aligned = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "aligned" / "encoderlab.json").read_text())
    assert saved["train"]["data"]["split_info"]["method"] == "carved" and "test_retrieval" in aligned
    # deterministic: the same carve every time, and a different one for another seed
    first = set(load_dataset(data).ensure_validation().select_split("val").table["id"])
    assert set(load_dataset(data).ensure_validation().select_split("val").table["id"]) == first
    other = set(load_dataset(data).ensure_validation(seed=5).select_split("val").table["id"])
    assert len(other) == 3 and other != first


def test_carve_keeps_a_training_item_per_class_and_ignores_unlabelled(color_data):
    ds = color_data.subset(color_data.table["split"] != "val")
    carved = ds.ensure_validation(fraction=0.5, seed=1)
    counts = carved.table.groupby(["label", "split"]).size().unstack(fill_value=0)
    assert (counts["train"] >= 1).all() and (counts["val"] >= 1).all()
    assert carved.ensure_validation() is carved  # already has val: unchanged
    with pytest.raises(EncoderlabError, match="fraction"):
        ds.ensure_validation(fraction=1.5)


def test_cli_lists_the_registry(capsys):
    assert main(["rungs", "list", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in doc["rungs"]] == BUILTIN
    assert next(r for r in doc["rungs"] if r["name"] == "tip")["needs"] == ["dual", "labels"]
    assert main(["rungs", "list", "lin"]) == 0
    text = capsys.readouterr().out
    assert "linear" in text and "knn" not in text


def test_a_head_rung_that_cannot_run_says_why_before_fitting(color_data, store):
    enc = ImageOnly()
    emb = labelled_embeddings(enc, color_data, store, progress=False)
    with pytest.raises(EncoderlabError, match=r"--method tip needs a dual encoder.*use --method knn or linear"):
        run_probe(enc, emb, store, method="tip")
    with pytest.raises(EncoderlabError, match="does not fit a head.*knn, linear, tip"):
        run_probe(enc, emb, store, method="retrieval")


def test_zeroshot_reports_on_every_labelled_item_with_split_all(color_data, store):
    enc = create_encoder("test-color", device="cpu")
    emb = labelled_embeddings(enc, color_data, store, progress=False)
    from encoderlab.rungs import run_zeroshot

    r = run_zeroshot(enc, emb, store, templates="name", split="all", n_boot=50, compare_templates=True)
    assert r.data["used"]["all"]["items"] == int((emb.y >= 0).sum()) == 36 and r.metrics["top1"] == 1.0
    assert "all_top1" in r.extra["templates"][0]


def test_a_class_without_training_items_is_named_and_counted_as_errors(color_data, store, tmp_path, capsys):
    # every "blue" item of train goes to val: blue has no training items, its test items can only be errors
    table = color_data.table.copy()
    table.loc[(table["label"] == "blue_thing") & (table["split"] == "train"), "split"] = "val"
    ds = color_data.derive(table)
    enc = create_encoder("test-color", device="cpu")
    comp = run_comparison(enc, ds, store, shots=[1, 2], seeds=2, n_boot=50, templates="name", progress=False)
    assert set(comp.results) == set(DEFAULT) and not comp.skipped  # nothing is lost
    assert any("'blue_thing' has no training items" in n for n in comp.result.config["notes"])
    linear = comp.results["linear"]
    assert linear.metrics["top1"] == pytest.approx(4 / 6)  # the 2 blue test items are errors, the rest right
    assert linear.metrics["recall/blue_thing"] == 0.0
    assert comp.results["zeroshot"].metrics["top1"] == 1.0  # zero-shot needs no training items
    assert comp.results["tip"].metrics["top1"] == 1.0  # nor does Tip-Adapter, which keeps the prompt of every class
    # the val items of the untrained class were left out of choosing (they could only add a constant)
    assert all(s["val_items"] <= 4 for s in linear.extra["settings"] if s["setting"] == "full")
    assert "p<0.02" in comp.format() or "p=" in comp.format()


def test_unlabelled_items_are_counted_and_reported(color_data, store):
    table = color_data.table.copy()
    table.loc[table.index[::4], "label"] = None  # 9 of 36 items lose their label
    ds = color_data.derive(table)
    enc = create_encoder("test-color", device="cpu")
    comp = run_comparison(enc, ds, store, rungs=["zeroshot", "linear"], shots=[1], seeds=2, n_boot=50,
                          templates="name", progress=False)
    note = next(n for n in comp.result.config["notes"] if "no label" in n)
    assert note.startswith("9 item(s) have no label and were left out of classification")
    assert comp.result.data["unlabelled"] == 9
    assert note in comp.results["linear"].config["notes"] and note in comp.results["zeroshot"].config["notes"]
    assert f"note: {note}" in comp.format()


class TrainedColor(ColorEncoder):
    """The colour encoder pretending encoderlab trained it on the train split's images and captions."""

    def __init__(self, seen: TrainingItems) -> None:
        super().__init__()
        self.spec, self._seen = "trained-color", seen

    def training_items(self) -> TrainingItems:
        return self._seen


def test_evaluating_on_items_the_model_was_trained_on_warns_and_counts(color_data, store):
    from encoderlab.hashing import image_key, text_key

    train = color_data.select_split("train").table
    seen = TrainingItems(train={"image": frozenset(image_key(p) for p in train["image"]),
                                "text": frozenset(text_key(t) for ts in train["texts"] for t in ts)},
                         val={}, source="colours")
    enc = TrainedColor(seen)
    comp = run_comparison(enc, color_data, store, shots=[1], seeds=2, n_boot=50, templates="name", progress=False)
    clean = comp.results["zeroshot"].data["seen_in_training"]
    assert clean == {"items": 0, "of": 6, "modality": "image", "warning": ""}  # test items were never seen
    assert not any(n.startswith("warning:") for n in comp.result.config["notes"])
    # the caption shared by every image was seen in training: counted, not warned about
    assert comp.results["retrieval"].data["seen_in_training"]["text"]["items"] == 1
    # the same model evaluated on its training split
    emb = labelled_embeddings(enc, color_data, store, progress=False)
    from encoderlab.rungs import run_zeroshot

    on_train = run_zeroshot(enc, emb, store, templates="name", split="train", n_boot=50)
    assert on_train.data["seen_in_training"]["items"] == 24 == on_train.data["seen_in_training"]["of"]
    assert any(n.startswith("warning: 24 of 24 train items were used to train or select trained-color")
               for n in on_train.config["notes"])
    rt = run_retrieval(enc, color_data, store, split="train", n_boot=50, progress=False)
    assert rt.data["seen_in_training"]["image"]["items"] == 24
    assert rt.data["seen_in_training"]["text"]["items"] == rt.metrics["texts"]  # every train caption was seen
    assert len(rt.config["notes"]) == 1 and "24 of 24 train images" in rt.config["notes"][0]
    # a re-split under another seed puts some training items into test: counted, and the table says so
    resplit = load_dataset(color_spec(color_dataset(color_data.root, seed=0)), splits={"train": 0.5, "test": 0.5},
                           seed=3)
    comp = run_comparison(enc, resplit, store, rungs=["zeroshot", "knn"], n_boot=50, shots=[1], seeds=2,
                          templates="name", progress=False)
    n = comp.results["zeroshot"].data["seen_in_training"]["items"]
    assert n > 0 and any(f"warning: {n} of" in note for note in comp.result.config["notes"])


def test_test_items_with_an_identical_copy_in_train_are_reported(tmp_path, store):
    import shutil

    path = color_dataset(tmp_path / "colors")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    train_row = next(r for r in rows if r["split"] == "train")
    copy = tmp_path / "colors" / "renamed_copy.png"
    shutil.copy(train_row["image"], copy)  # the same bytes under another name, in test
    rows.append({**train_row, "image": str(copy), "split": "test"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    enc = create_encoder("test-color", device="cpu")
    emb = labelled_embeddings(enc, load_dataset(color_spec(path)), store, progress=False)
    assert emb.test_items_with_copies() == 1
    assert any(n.startswith("1 test item(s) have an identical copy") for n in emb.notes())
    clean = labelled_embeddings(enc, load_dataset(color_spec(color_dataset(tmp_path / "clean"))), store,
                                progress=False)
    assert clean.test_items_with_copies() == 0 and clean.notes() == []
