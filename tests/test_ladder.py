"""Frozen rungs end to end: zero-shot, probes, retrieval and the comparison, through the library and the CLI.

A mock dual encoder with a known answer (images are solid colours, the image tower returns the mean RGB, the text
tower returns the colour named in the text) makes the expected numbers exact; tiny random CLIP/SigLIP models check
the real adapters run through the same code.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from encoderlab.cli import main
from encoderlab.data import load_dataset
from encoderlab.data.prompts import class_display_names, humanize, load_class_names, load_templates
from encoderlab.encoders import create_encoder
from encoderlab.errors import EncoderlabError
from encoderlab.extract import labelled_embeddings
from encoderlab.heads.zeroshot import ZeroShotClassifier
from encoderlab.ladder import run_comparison
from encoderlab.rungs import run_probe, run_retrieval, run_zeroshot
from encoderlab.store import EmbeddingStore
from encoderlab.testing import color_dataset, color_spec, registered_color_encoder


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


def test_prompts_templates_and_names(tmp_path):
    assert len(load_templates("clip80")) == 80
    assert "{}" in load_templates("simple")[0]
    assert humanize("sea_lion") == "sea lion" and humanize("TVMonitor") == "TV Monitor"
    f = tmp_path / "t.txt"
    f.write_text("# comment\na {} photo\n\na {} photo\n")
    assert load_templates(str(f)) == ["a {} photo"]
    f.write_text("no placeholder here\n")
    with pytest.raises(EncoderlabError, match="exactly one"):
        load_templates(str(f))
    with pytest.raises(EncoderlabError, match="unknown template set 'clip8'.*clip80"):
        load_templates("clip8")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"b_c": "bee"}))
    assert class_display_names(["a_b", "b_c"], load_class_names(names)) == ["a b", "bee"]
    with pytest.raises(EncoderlabError, match="unknown label 'b_d'.*b_c"):
        class_display_names(["a_b", "b_c"], {"b_d": "x"})


def test_zeroshot_ensemble_is_mean_of_normalized_prompts():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 5, 8)).astype(np.float32)
    emb[:, 0] *= 100.0  # one long prompt with a huge norm must not dominate the class embedding
    head = ZeroShotClassifier().fit(emb, ["a", "b", "c", "d"])
    unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    want = unit.mean(1) / np.linalg.norm(unit.mean(1), axis=-1, keepdims=True)
    np.testing.assert_allclose(head.class_embeddings_, want, rtol=1e-5, atol=1e-6)
    x = rng.normal(size=(6, 8))
    p = head.predict_proba(x)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    sig = ZeroShotClassifier("sigmoid", logit_scale=10.0, logit_bias=-5.0).fit(emb, list("abcd"))
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ want.T
    np.testing.assert_allclose(sig.predict_proba(x), 1 / (1 + np.exp(-(10 * cos - 5))), rtol=1e-4)
    assert (sig.predict(x) == head.predict(x)).all()  # scale and bias never change the argmax


def test_zeroshot_mock_encoder_is_exact_and_cached(color_data, store, tmp_path):
    enc = create_encoder("test-color", device="cpu")
    prep = labelled_embeddings(enc, color_data, store, progress=False)
    r = run_zeroshot(enc, prep, store, templates="simple", compare_templates=True, n_boot=200)
    assert r.metrics["top1"] == 1.0 and r.metrics["balanced_accuracy"] == 1.0 and r.metrics["macro_f1"] == 1.0
    assert r.metrics["top1_ci_low"] <= 1.0 <= r.metrics["top1_ci_high"]
    assert {"recall/red_thing", "recall/green_thing", "recall/blue_thing"} <= set(r.metrics)
    assert "top5" not in r.metrics  # 3 classes: top-5 would be trivially 1
    assert r.config["class_names"]["red_thing"] == "red thing"
    assert r.costs["trainable_params"] == 0 and r.costs["predict_ms_per_item_with_encoder"] > 0
    assert r.extra["templates"][0]["template"].startswith("ensemble")
    assert len(r.extra["templates"]) == len(load_templates("simple")) + 1
    # the second run reads every prompt and image from the store: nothing is encoded again
    before = {s["fingerprint"]: s["items"] for s in store.spaces()}
    run_zeroshot(enc, labelled_embeddings(enc, color_data, store, progress=False), store, templates="simple", n_boot=50)
    assert {s["fingerprint"]: s["items"] for s in store.spaces()} == before


@pytest.mark.parametrize("method", ["linear", "knn", "tip"])
def test_probe_full_and_few_shot(color_data, store, method):
    enc = create_encoder("test-color", device="cpu")
    prep = labelled_embeddings(enc, color_data, store, progress=False)
    r = run_probe(enc, prep, store, method=method, shots=[1, 2], seeds=2, n_boot=100, templates="simple")
    assert r.metrics["top1"] >= 0.99  # colours are perfectly separable
    for k in (1, 2):
        assert f"{k}-shot/top1" in r.metrics and f"{k}-shot/top1_std" in r.metrics
        assert r.metrics[f"{k}-shot/top1_ci_low"] <= r.metrics[f"{k}-shot/top1"] <= r.metrics[f"{k}-shot/top1_ci_high"]
    shots = [s for s in r.extra["settings"] if s["setting"] == "1-shot"]
    assert len(shots) == 2 and all(s["train_items"] == 3 for s in shots)  # one per class, per seed
    assert set(r.predictions["setting"]) == {"full", "1-shot seed 0", "2-shot seed 0"}
    assert {"fit_seconds", "predict_ms_per_item", "predict_ms_per_item_with_encoder", "peak_rss_mb",
            "trainable_params"} <= set(r.costs)


def test_test_split_never_chooses(color_data, store):
    """Scrambling the test labels changes the reported accuracy but none of the choices made."""
    enc = create_encoder("test-color", device="cpu")
    prep = labelled_embeddings(enc, color_data, store, progress=False)
    a = run_probe(enc, prep, store, method="linear", shots=[2], seeds=2, n_boot=50)
    test = prep.index("test")
    prep.y[test] = np.roll(prep.y[test], 1)
    b = run_probe(enc, prep, store, method="linear", shots=[2], seeds=2, n_boot=50)
    strip = [{k: v for k, v in s.items() if k not in ("fit_seconds", "top1")} for s in a.extra["settings"]]
    assert strip == [{k: v for k, v in s.items() if k not in ("fit_seconds", "top1")} for s in b.extra["settings"]]
    assert b.metrics["top1"] < a.metrics["top1"]


def test_retrieval_counts_shared_caption_once(color_data, store):
    enc = create_encoder("test-color", device="cpu")
    r = run_retrieval(enc, color_data, store, split="test", n_boot=100, progress=False)
    # 6 test images; captions: 6 specific + 1 shared by all 6 -> 7 distinct texts, 12 pairs
    assert (r.metrics["images"], r.metrics["texts"], r.metrics["pairs"]) == (6, 7, 12)
    assert r.metrics["i2t_R@10"] == 1.0
    assert r.metrics["t2i_queries"] == 7 and r.metrics["i2t_queries"] == 6
    preds = r.predictions
    assert set(preds["direction"]) == {"i2t", "t2i"} and (preds["rank"] >= 1).all()


def test_retrieval_and_zeroshot_need_dual_encoder(color_data, store, tiny_vit_dir):
    enc = create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu")
    with pytest.raises(EncoderlabError, match="dual encoder"):
        run_retrieval(enc, color_data, store, progress=False)
    prep = labelled_embeddings(enc, color_data, store, progress=False)
    with pytest.raises(EncoderlabError, match="dual encoder"):
        run_zeroshot(enc, prep, store)
    comp = run_comparison(enc, color_data, store, shots=[1], seeds=2, n_boot=50, progress=False)
    assert set(comp.results) == {"knn", "linear"} and set(comp.skipped) == {"zeroshot", "tip", "clap", "retrieval"}


def test_unknown_split_is_named(color_data, store):
    enc = create_encoder("test-color", device="cpu")
    prep = labelled_embeddings(enc, color_data, store, progress=False)
    with pytest.raises(EncoderlabError, match="split 'tset'.*'test'"):
        run_zeroshot(enc, prep, store, split="tset")


@pytest.mark.parametrize("model", ["clip", "siglip"])
def test_tiny_real_adapters_run_every_rung(tmp_path, color_data, store, tiny_clip_dir, tiny_siglip_dir, model):
    path = tiny_clip_dir if model == "clip" else tiny_siglip_dir
    enc = create_encoder(f"hf:{path}", device="cpu")
    comp = run_comparison(enc, color_data, store, shots=[1], seeds=2, n_boot=50, progress=False,
                          templates="simple", out_dir=tmp_path / "cmp")
    assert set(comp.results) == {"zeroshot", "knn", "linear", "tip", "clap", "retrieval"}
    assert comp.results["zeroshot"].config["score_kind"] == ("softmax" if model == "clip" else "sigmoid")
    for name in comp.results:
        res = json.loads((tmp_path / "cmp" / name / "results.json").read_text())
        assert {"task", "metrics", "costs", "config", "data"} <= set(res)
        assert res["data"]["splits"]["test"]["items"] == 6
        assert (tmp_path / "cmp" / name / "predictions.parquet").exists()
    zs_rows = [r for r in comp.rows if r["rung"] == "linear"]
    assert all("delta_vs_zeroshot" in r for r in zs_rows)


def test_cli_zeroshot_probe_retrieval_compare(tmp_path, capsys):
    path = color_dataset(tmp_path / "colors")
    data = f"jsonl:{path}?image=image&text=text&label=label&split=split"
    common = ["--encoder", "test-color", "--data", data, "--store", str(tmp_path / "store"), "--n-boot", "100"]

    def run(argv: list[str]) -> dict:
        code = main([*argv, *common, "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out)

    zs = run(["zeroshot", "--templates", "name", "--out", str(tmp_path / "zs")])
    assert zs["metrics"]["top1"] == 1.0 and zs["task"] == "zeroshot"
    saved = json.loads((tmp_path / "zs" / "results.json").read_text())
    assert saved["metrics"] == zs["metrics"]
    preds = pd.read_parquet(tmp_path / "zs" / "predictions.parquet")
    assert {"id", "label", "prediction", "topk_labels", "topk_scores"} <= set(preds.columns) and len(preds) == 6
    pr = run(["probe", "--method", "knn", "--shots", "1,2", "--seeds", "2", "--out", str(tmp_path / "knn")])
    assert "2-shot/top1_std" in pr["metrics"]
    rt = run(["retrieval", "--out", str(tmp_path / "rt")])
    assert rt["primary"] == "i2t_R@1" and "t2i_mrr_ci_low" in rt["metrics"]
    cmp = run(["compare", "--shots", "1", "--seeds", "2", "--templates", "name", "--out", str(tmp_path / "cmp")])
    assert {r["rung"] for r in cmp["table"]} == {"zeroshot", "knn", "linear", "tip", "clap"}
    assert (tmp_path / "cmp" / "results.json").exists()
    # human output is a table, and a mistake is one line with the fix
    assert main(["compare", *common, "--shots", "1", "--seeds", "2", "--templates", "name"]) == 0
    text = capsys.readouterr().out
    assert "top-1 [95% CI]" in text and "R@1 [95% CI]" in text
    assert main(["probe", *common, "--shots", "0,2"]) != 0
    assert "positive integers" in capsys.readouterr().err
    assert main(["zeroshot", *common, "--templates", "clip8"]) == 1
    assert "did you mean clip80" in capsys.readouterr().err


def test_cli_align_then_use_everywhere(tmp_path, capsys, tiny_vit_dir, tiny_bert_dir):
    path = color_dataset(tmp_path / "colors")
    data = f"jsonl:{path}?image=image&text=text&label=label&split=split"
    model = tmp_path / "aligned"
    common = ["--data", data, "--store", str(tmp_path / "store"), "--n-boot", "100"]
    align = ["align", "--vision", f"hf-vision:{tiny_vit_dir}", "--text", f"hf-text:{tiny_bert_dir}", "--out",
             str(model), "--dim", "8", "--epochs", "3", *common, "--json"]

    def run(argv: list[str]) -> dict:
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out)

    first = run(align)
    assert first["up_to_date"] is False and first["epochs_run"] == 3
    assert (model / "heads.safetensors").exists() and (model / "eval" / "results.json").exists()
    assert first["test_retrieval"]["i2t_queries"] == 6
    again = run(align)  # same towers, split and settings: nothing to train
    assert again["up_to_date"] is True and again["test_retrieval"] == first["test_retrieval"]
    assert run([*align[:-1], "--epochs", "2", "--json"])["up_to_date"] is False  # a changed setting retrains
    assert run([*align, "--force"])["up_to_date"] is False
    zs = run(["zeroshot", "--encoder", f"local:{model}", "--templates", "name", *common, "--json"])
    assert zs["config"]["encoder"] == f"local:{model}" and 0.0 <= zs["metrics"]["top1"] <= 1.0
    cmp = run(["compare", "--encoder", f"local:{model}", "--shots", "1", "--seeds", "2", "--templates", "name",
               *common, "--json"])
    features = {r["rung"]: r["features"] for r in cmp["table"]}
    assert features == {"zeroshot": "joint", "knn": "tower", "linear": "tower", "tip": "joint", "clap": "joint"}
    # held-out test items are new to the model; its own training split is not, and every result says so
    assert not any(n.startswith("warning:") for n in cmp["config"]["notes"])
    on_train = run(["retrieval", "--encoder", f"local:{model}", "--split", "train", *common, "--json"])
    assert on_train["data"]["seen_in_training"]["image"]["items"] == 24 == on_train["metrics"]["images"]
    assert any(n.startswith("warning: 24 of 24 train images were used to train or select")
               for n in on_train["config"]["notes"])
    assert main(["align", "--vision", "efficientnet-lite", "--text", "minilm-l6", "--out", str(model), *common]) == 1
    err = capsys.readouterr().err
    assert "did you mean" in err and "efficientnet-lite0" in err.split("did you mean")[1].split(";")[0]
