"""Curation: pair scores are normalized cosines, the rules keep what they say, duplicates match brute force, the
outputs load back, swapped captions are caught, filter-compare runs, and bad input fails fast."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from encoderlab.cli import main
from encoderlab.curate import (
    RULES,
    FilterConfig,
    cosine_scores,
    filter_dataset,
    keep_one,
    near_duplicates,
    score_pairs,
    swap_check,
)
from encoderlab.curate import duplicates as dup_mod
from encoderlab.curate.rules import Verdict, priority, score_rules
from encoderlab.curate.run import decide
from encoderlab.data import load_dataset
from encoderlab.encoders import create_encoder
from encoderlab.errors import EncoderlabError
from encoderlab.store import EmbeddingStore
from encoderlab.testing import COLORS, ColorEncoder, color_dataset, color_spec, registered_color_encoder

#: the filter with every rule but the score cut off, so a test sees one rule at a time
PLAIN = dict(blank_std=None, exact_duplicates=False, near_dup=None, caption_duplicates=False)


@pytest.fixture
def color(tmp_path: Path):
    with registered_color_encoder() as name:
        yield name, color_spec(color_dataset(tmp_path / "colors"))


def _put(store: EmbeddingStore, fp: str, keys: list[str], X: np.ndarray):
    space = store.space(fp)
    with space.writer() as w:
        w.add(keys, X.astype(np.float32))
    return space


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}"


def _solid(path: Path, rgb: tuple[int, int, int], noise: int = 0, seed: int = 0, size: int = 16) -> str:
    arr = np.tile(np.asarray(rgb, np.int16), (size, size, 1))
    if noise:
        arr = arr + np.random.default_rng(seed).integers(-noise, noise + 1, arr.shape)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
    return str(path)


# ---------------------------------------------------------------------------------------------- pair scores


def test_score_is_the_cosine_of_normalized_embeddings_and_ignores_scale(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 50, 8
    img, txt = rng.normal(size=(n, d)) * 7.0, rng.normal(size=(n, d)) * 0.1
    store = EmbeddingStore(tmp_path / "store")
    ik, tk = [f"i{k}" for k in range(n)], [f"t{k}" for k in range(n)]
    got = cosine_scores(_put(store, "img", ik, img), _put(store, "txt", tk, txt), ik, tk, chunk_size=7)
    naive = np.array([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(img, txt)])
    np.testing.assert_allclose(got, naive, atol=1e-6)
    assert not np.allclose(got, np.einsum("ij,ij->i", img, txt), atol=1e-3)  # not the raw (logit-like) dot product
    scales = rng.uniform(0.01, 100.0, size=(n, 1))  # each row scaled by its own factor: the score must not move
    scaled = cosine_scores(_put(store, "img2", ik, img * scales), _put(store, "txt2", tk, txt / scales), ik, tk)
    np.testing.assert_allclose(scaled, got, atol=1e-6)


def test_every_caption_of_an_image_is_scored_and_scores_are_cached(color, tmp_path):
    name, spec = color
    ds = load_dataset(spec)
    enc = create_encoder(name, device="cpu")
    store = EmbeddingStore(tmp_path / "store")
    first = score_pairs(enc, ds, store, progress=False)
    p = first.pairs
    assert len(p) == 2 * len(ds) and set(p["text_index"]) == {0, 1}  # two captions per image, two pairs each
    assert first.computed == len(p) and first.cached == 0
    # the naive oracle straight from the encoder: mean colour vs the colour word's RGB, both normalized
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32).mean(axis=(0, 1)) / 255 - 0.5
                       for f in p["image"]])
    words = np.stack([enc.encode_texts([t]).numpy()[0] for t in p["text"]])
    naive = np.einsum("ij,ij->i", pixels, words) / np.linalg.norm(pixels, axis=1) / np.linalg.norm(words, axis=1)
    np.testing.assert_allclose(p["score"].to_numpy(), naive, atol=1e-4)
    again = score_pairs(enc, ds, store, progress=False)
    assert again.cached == len(p) and again.computed == 0
    np.testing.assert_array_equal(again.pairs["score"].to_numpy(), p["score"].to_numpy())


# ---------------------------------------------------------------------------------------------- score rules


def _pairs(scores: list[float]) -> pd.DataFrame:
    n = len(scores)
    return pd.DataFrame({"row": np.arange(n), "id": [f"r{k}" for k in range(n)], "text_index": np.zeros(n, int),
                         "text": [f"caption {k}" for k in range(n)], "image": [f"/x/{k}.png" for k in range(n)],
                         "label": ["a"] * n, "split": ["train"] * n, "image_key": [f"i{k}" for k in range(n)],
                         "text_key": [f"t{k}" for k in range(n)], "score": np.asarray(scores, np.float32)})


@pytest.mark.parametrize("keep_top, expect", [(0.8, 8), (0.5, 5), (0.25, 3), (1.0, 10), (0.01, 1)])
def test_keep_top_keeps_exactly_the_best_fraction_with_ties_broken_by_row(keep_top, expect):
    scores = [0.9, 0.1, 0.5, 0.5, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6]
    pairs = _pairs(scores)
    v, found = decide(pairs, FilterConfig.merged(keep_top=keep_top, **PLAIN), unreadable={}, stats=None,
                      reader_for=None)
    kept = np.flatnonzero(v.open)
    assert len(kept) == expect
    best = sorted(range(10), key=lambda i: (-scores[i], i))[:expect]  # ties (the 0.5s) go to the earlier row
    assert sorted(kept) == sorted(best)
    assert found["cuts"]["keep_top_cut"] == pytest.approx(scores[best[-1]])
    assert set(v.reason[~v.open]) <= {"keep-top"}


def test_min_score_keeps_pairs_at_or_above_and_quota_caps_each_class():
    scores = [0.9, 0.1, 0.5, 0.5, 0.3, 0.8]
    pairs = _pairs(scores).assign(label=["a", "a", "a", "b", "b", "b"])
    v, _ = decide(pairs, FilterConfig.merged(min_score=0.5, **PLAIN), unreadable={}, stats=None, reader_for=None)
    assert list(np.flatnonzero(v.open)) == [0, 2, 3, 5]
    v, _ = decide(pairs, FilterConfig.merged(min_score=0.2, per_class_quota=1, **PLAIN), unreadable={}, stats=None,
                  reader_for=None)
    assert list(np.flatnonzero(v.open)) == [0, 5]  # the best of each class
    assert list(v.reason) == [None, "min-score", "class-quota", "class-quota", "class-quota", None]


# ---------------------------------------------------------------------------------------------- near-duplicates


def _clustered(n_seeds: int = 60, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_seeds, d))
    copies = [base]
    for spread in (0.05, 0.15, 0.3):  # near copies at several distances, so some fall just either side of 0.95
        pick = rng.choice(n_seeds, size=n_seeds // 2, replace=False)
        copies.append(base[pick] + spread * rng.normal(size=(len(pick), d)))
    X = np.concatenate(copies)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def _brute(X: np.ndarray, t: float) -> set[tuple[int, int]]:
    S = X @ X.T
    i, j = np.nonzero(np.triu(S >= t, k=1))
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("kind", ["flat", "numpy", "ivf-all-lists"])
def test_near_duplicate_pairs_equal_brute_force(kind, monkeypatch):
    X = _clustered()
    t = 0.95
    read = lambda a, b: X[a:b]  # noqa: E731
    if kind == "numpy":
        monkeypatch.setattr(dup_mod, "faiss_available", lambda: False)
    opts = {"kind": "ivf", "nprobe": 10_000} if kind == "ivf-all-lists" else {"kind": "flat"}
    near = near_duplicates(read, len(X), X.shape[1], t, chunk=37, **opts)
    got = set(zip(near.pair_i.tolist(), near.pair_j.tolist()))
    want = _brute(X, t)
    assert len(want) > 20 and got == want
    S = X @ X.T
    np.fill_diagonal(S, -np.inf)
    np.testing.assert_allclose(near.nn_similarity, S.max(axis=1), atol=1e-5)
    np.testing.assert_allclose(near.pair_sim, S[near.pair_i, near.pair_j], atol=1e-5)


def test_keep_one_keeps_the_best_of_each_group_and_no_two_kept_duplicates():
    from scipy.sparse.csgraph import connected_components

    X = _clustered(seed=1)
    t = 0.95
    near = near_duplicates(lambda a, b: X[a:b], len(X), X.shape[1], t, kind="flat")
    rank = np.random.default_rng(3).permutation(len(X))  # a random score order
    k = keep_one(len(X), near.pair_i, near.pair_j, near.pair_sim, rank)
    S = X @ X.T
    adj = (S >= t) & ~np.eye(len(X), dtype=bool)
    _, comp = connected_components(adj, directed=False)
    for c in np.unique(comp[adj.any(axis=1)]):
        members = np.flatnonzero(comp == c)
        best = members[np.argmin(rank[members])]
        assert k.kept[best]  # the best-scored image of every group is kept
        assert len(set(k.group[members])) == 1 and k.group[best] >= 0
    kept = np.flatnonzero(k.kept)
    assert not adj[np.ix_(kept, kept)].any()  # no two kept images are near-duplicates
    for i in np.flatnonzero(~k.kept):  # each dropped image names a better-ranked kept duplicate
        j = k.duplicate_of[i]
        assert k.kept[j] and rank[j] < rank[i] and S[i, j] >= t
    assert (k.group[~adj.any(axis=1)] == -1).all()


@pytest.mark.parametrize("rank, kept, dup_of", [([0, 1, 2], [True, False, True], [-1, 0, -1]),
                                                 ([1, 0, 2], [False, True, False], [1, -1, 1])])
def test_keep_one_on_a_chain_drops_only_duplicates_of_kept_images(rank, kept, dup_of):
    # A ~ B and B ~ C (cosine 0.955) but A !~ C (0.825): with A best, B goes and C stays, since B is not kept
    X = np.array([[np.cos(a), np.sin(a)] for a in (0.0, 0.3, 0.6)], np.float32)
    near = near_duplicates(lambda a, b: X[a:b], 3, 2, 0.95, kind="flat")
    assert set(zip(near.pair_i.tolist(), near.pair_j.tolist())) == {(0, 1), (1, 2)}
    k = keep_one(3, near.pair_i, near.pair_j, near.pair_sim, np.asarray(rank))
    assert k.kept.tolist() == kept and k.duplicate_of.tolist() == dup_of and k.group.tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------------- other rules


def test_exact_caption_and_repeated_caption_duplicates(tmp_path):
    d = tmp_path / "dups"
    d.mkdir()
    red = _solid(d / "red.png", COLORS["red"], noise=30)
    shutil.copy(red, d / "red_copy.png")  # the same bytes under another name: one content key
    blue = _solid(d / "blue.png", COLORS["blue"], noise=30, seed=1)
    green = _solid(d / "green.png", COLORS["green"], noise=30, seed=2)
    spec = _jsonl(d / "data.jsonl", [
        {"image": red, "text": ["a red square"], "split": "train"},
        {"image": str(d / "red_copy.png"), "text": ["a red thing", "blue"], "split": "train"},
        {"image": blue, "text": ["A blue square!", "a blue square", "a green square"], "split": "train"},
        {"image": green, "text": ["a green square"], "split": "train"},
    ])
    with registered_color_encoder() as name:
        enc, ds = create_encoder(name, device="cpu"), load_dataset(spec)
        store = EmbeddingStore(tmp_path / "store")
        cfg = FilterConfig.merged(blank_std=None, near_dup=None, max_per_caption=1)
        p = filter_dataset(enc, ds, store, cfg, split="all", progress=False).pairs.set_index(["id", "text_index"])
    assert p.loc[("red_copy.png", 0), "reason"] == "exact-duplicate"  # both red captions score the same:
    assert p.loc[("red.png", 0), "kept"]  # ties go to the earlier row
    assert p.loc[("red_copy.png", 0), "duplicate_of"] == "red.png"
    assert p.loc[("blue.png", 0), "kept"] and p.loc[("blue.png", 1), "reason"] == "caption-duplicate"
    # "a green square" is on the blue image (scores low) and the green one (scores high): the green one keeps it
    assert p.loc[("blue.png", 2), "reason"] == "caption-repeated" and p.loc[("green.png", 0), "kept"]


def test_blank_images_are_dropped_and_textured_ones_kept(tmp_path):
    d = tmp_path / "blank"
    d.mkdir()
    rows = [{"image": _solid(d / f"tex{k}.png", COLORS["red"], noise=60, seed=k), "text": "a red square"}
            for k in range(3)]
    rows.append({"image": _solid(d / "white.png", (255, 255, 255)), "text": "a red square"})
    rows.append({"image": _solid(d / "almost.png", (30, 200, 40), noise=1), "text": "a green square"})
    with registered_color_encoder() as name:
        res = filter_dataset(create_encoder(name, device="cpu"), load_dataset(_jsonl(d / "d.jsonl", rows)),
                             EmbeddingStore(tmp_path / "store"), FilterConfig(near_dup=None), split="all",
                             progress=False)
    reasons = dict(zip(res.pairs["id"], res.pairs["reason"]))
    assert reasons == {"tex0.png": None, "tex1.png": None, "tex2.png": None, "white.png": "blank-image",
                       "almost.png": "blank-image"}


def test_the_kept_manifest_loads_as_a_data_spec_and_every_pair_has_one_decision(color, tmp_path, capsys):
    name, spec = color
    out, store = tmp_path / "out", str(tmp_path / "store")
    argv = ["filter", "--encoder", name, "--data", spec, "--store", store, "--keep-top", "0.8", "--blank-std", "0",
            "--near-dup", "0.999", "--no-progress", "--json"]
    assert main([*argv, "--out", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["task"] == "filter" and doc["spec"] == f"jsonl:{out / 'kept.jsonl'}"
    for f in ("kept.jsonl", "dropped.parquet", "pairs.parquet", "scores.png", "near_duplicates.png", "report.html"):
        assert (out / f).is_file(), f
    pairs, dropped = pd.read_parquet(out / "pairs.parquet"), pd.read_parquet(out / "dropped.parquet")
    src, kept = load_dataset(spec), load_dataset(doc["spec"])
    assert set(pairs["split"]) == {"train"} and len(pairs) == 2 * len(src.select_split("train"))  # val/test unscored
    n_kept = int(kept.select_split("train").table["texts"].map(len).sum())
    assert n_kept == int(pairs["kept"].sum()) == doc["metrics"]["kept_pairs"]
    assert n_kept + len(dropped) == len(pairs) and dropped["reason"].isin(list(RULES)).all()
    assert dropped["reason"].notna().all() and pairs.loc[pairs["kept"], "reason"].isna().all()
    assert sum(doc["counts"].values()) == len(dropped)
    for s in ("val", "test"):  # the held-out splits pass through unchanged
        a, b = src.select_split(s).table, kept.select_split(s).table
        assert a[["id", "image", "label"]].equals(b[["id", "image", "label"]]) and a["texts"].equals(b["texts"])
    assert "Retrieval" in (out / "report.html").read_text()
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0  # a rerun reads the cached scores
    assert json.loads(capsys.readouterr().out)["costs"]["scores_cached"] == len(pairs)


# ---------------------------------------------------------------------------------------------- controlled check


def test_swapped_captions_are_caught_by_the_score_cut(tmp_path):
    d = tmp_path / "swap"
    d.mkdir()
    rows = [{"image": _solid(d / f"{c}{k}.png", rgb, noise=25, seed=k), "text": f"a photo of a {c} square",
             "split": "train"} for c, rgb in COLORS.items() for k in range(30)]
    with registered_color_encoder() as name:
        check = swap_check(create_encoder(name, device="cpu"), load_dataset(_jsonl(d / "d.jsonl", rows)),
                           EmbeddingStore(tmp_path / "store"), fraction=0.15, keep_tops=(0.9, 0.8), seed=0)
    # same-colour swaps leave the caption as it was (not wrong); the others are wrong pairs
    assert 0 < check["wrong_pairs"] <= check["rows_swapped"] == 14
    assert check["score_wrong_mean"] < 0 < check["score_right_mean"]
    at = {r["keep_top"]: r for r in check["by_keep_top"]}
    assert at[0.8]["recall"] >= 0.9 and at[0.8]["chance_recall"] == pytest.approx(0.2)
    assert at[0.9]["precision"] >= 0.9  # what the tighter cut drops is almost all wrong


# ---------------------------------------------------------------------------------------------- filter-compare


def test_filter_compare_trains_three_arms_on_the_same_budget_and_writes_its_table(color, tmp_path, capsys):
    name, spec = color
    out = tmp_path / "cmp"
    assert main(["filter-compare", "--encoder", name, "--data", spec, "--store", str(tmp_path / "store"), "--out",
                 str(out), "--keep-top", "0.75", "--blank-std", "0", "--near-dup", "none", "--epochs", "2",
                 "--dim", "3", "--batch-size", "4", "--n-boot", "200", "--no-progress", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    table = {r["arm"]: r for r in doc["table"]}
    assert set(table) == {"all", "filtered", "random"}
    assert table["filtered"]["pairs"] == table["random"]["pairs"] == 36 < table["all"]["pairs"] == 48
    assert table["filtered"]["steps"] == table["random"]["steps"] >= table["all"]["steps"]  # the same budget
    assert {(p["a"], p["b"]) for p in doc["paired"]} == {("filtered", "random"), ("filtered", "all")}
    assert doc["metrics"]["test_images"] == 6 and 0 <= doc["metrics"]["filtered_i2t_R@1"] <= 1
    filtered = pd.read_parquet(out / "filter" / "pairs.parquet")
    assert set(filtered["split"]) == {"train"}  # the filter never read val or test
    for f in ("compare.png", "report.html", "results.json", "filter/kept.jsonl"):
        assert (out / f).is_file(), f


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "abc", "nan"])
def test_keep_top_outside_0_1_is_refused_while_parsing(value, capsys):
    assert main(["filter", "--encoder", "x", "--data", "y", "--keep-top", value]) == 2
    err = capsys.readouterr().err
    assert "--keep-top" in err and "(0, 1]" in err and repr(value) in err


def test_library_refuses_bad_settings():
    with pytest.raises(EncoderlabError, match=r"keep_top must be a fraction in \(0, 1\], got 0"):
        FilterConfig.merged(keep_top=0)
    with pytest.raises(EncoderlabError, match="min_words=5 is above max_words=2"):
        FilterConfig.merged(min_words=5, max_words=2)
    with pytest.raises(EncoderlabError, match="did you mean keep_top"):
        FilterConfig.merged(keeptop=0.5)


def test_data_without_captions_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    d = tmp_path / "nocap"
    d.mkdir()
    spec = _jsonl(d / "d.jsonl", [{"image": _solid(d / "a.png", (1, 2, 3))}, {"image": _solid(d / "b.png", (4, 5, 6))}])
    import encoderlab.cli.curate as cli_curate

    monkeypatch.setattr(cli_curate, "make_encoder", lambda args: pytest.fail("the model was loaded"))
    with registered_color_encoder() as name:
        assert main(["filter", "--encoder", name, "--data", spec, "--out", str(tmp_path / "o"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert "has no captions" in doc["error"] and spec in doc["error"] and "?text=" in doc["fix"]
    assert not (tmp_path / "o").exists()  # the run directory made for it is removed again


def test_a_single_tower_encoder_is_refused_with_the_fix(color, tmp_path, capsys):
    from encoderlab.encoders.base import EncoderInfo
    from encoderlab.encoders.registry import register_encoder, unregister_encoder

    class ImageOnly(ColorEncoder):
        def __init__(self, device="cpu", precision="fp32"):
            super().__init__(device, precision)
            self.spec, self.modalities = "test-image-only", ("image",)

    _, spec = color
    register_encoder(EncoderInfo("test-image-only", ("image",)), lambda t, device, precision: ImageOnly(device))
    try:
        assert main(["filter", "--encoder", "test-image-only", "--data", spec, "--store", str(tmp_path / "s"),
                     "--out", str(tmp_path / "o"), "--json"]) == 1
    finally:
        unregister_encoder("test-image-only")
    doc = json.loads(capsys.readouterr().out)
    assert "dual image-text encoder" in doc["error"] and "'test-image-only' encodes only image" in doc["error"]
    assert "encoderlab align" in doc["fix"]


def test_score_rules_alone_need_no_embeddings():
    pairs = _pairs([0.3, 0.2, 0.1])
    v = Verdict(len(pairs))
    cuts = score_rules(pairs, v, FilterConfig.merged(keep_top=0.5, **PLAIN), priority(pairs))
    assert cuts["keep_top_n"] == 2 and list(v.open) == [True, True, False]


def test_a_class_quota_without_labels_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import encoderlab.cli.curate as cli_curate

    d = tmp_path / "nolabel"
    d.mkdir()
    spec = _jsonl(d / "d.jsonl", [{"image": _solid(d / "a.png", (1, 2, 3)), "text": "a red square"}])
    monkeypatch.setattr(cli_curate, "make_encoder", lambda args: pytest.fail("the model was loaded"))
    with registered_color_encoder() as name:
        assert main(["filter", "--encoder", name, "--data", spec, "--per-class-quota", "5", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert "--per-class-quota needs labels" in doc["error"] and "?label=" in doc["fix"]
