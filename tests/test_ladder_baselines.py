"""Baselines of the ladder: majority, pixels / colour histogram, TF-IDF and the caption-frequency retrieval prior,
each checked against data built so that the answer is known (a skewed class count, colour or words that decide the
class, caption counts one can rank by hand)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from encoderlab.data import load_dataset
from encoderlab.data.manifest import Dataset
from encoderlab.errors import EncoderlabError
from encoderlab.ladder.baselines import (
    caption_prior_baseline,
    image_baselines,
    majority_baseline,
    run_baselines,
    tfidf_baseline,
)
from encoderlab.testing import color_dataset, color_spec


def _table(labels, splits, texts=None, images=None, **meta) -> Dataset:
    n = len(labels)
    table = pd.DataFrame({"id": [f"item{i:03d}" for i in range(n)],
                          "image": images if images is not None else [None] * n,
                          "texts": texts if texts is not None else [[] for _ in range(n)],
                          "label": labels, "split": splits, **meta})
    return Dataset(table, source="constructed")


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return load_dataset(color_spec(color_dataset(tmp_path_factory.mktemp("colors"), n_per_class=16)))


def test_majority_predicts_the_commonest_train_class():
    labels = ["a"] * 10 + ["b"] * 3 + ["a", "b"] + ["b"] * 4 + ["a"]
    splits = ["train"] * 13 + ["val"] * 2 + ["test"] * 5
    b = majority_baseline(_table(labels, splits))
    assert b.chosen == {"class": "a"} and b.selection == "fixed"
    assert b.predictions.tolist() == [0] * 5
    assert b.metrics["top1"] == pytest.approx(1 / 5)
    assert b.val_metric == pytest.approx(0.5)
    assert b.metrics["top1_ci_low"] <= b.metrics["top1"] <= b.metrics["top1_ci_high"]
    json.dumps(b.to_json())


def test_majority_tie_goes_to_the_first_class_and_test_rows_align():
    ds = _table(["b", "a", "a", "b", "a", "b"], ["train"] * 4 + ["val", "test"])
    b = majority_baseline(ds, test_rows=[5, 0])
    assert b.chosen == {"class": "a"} and b.test_rows.tolist() == [5, 0] and b.predictions.tolist() == [0, 0]


def test_pixel_and_histogram_baselines_beat_majority_where_colour_decides(colors):
    found = {b.name: b for b in run_baselines(colors, modality="image")}
    assert list(found) == ["majority", "pixels-16x16", "color-histogram", "caption-prior"]
    majority = found["majority"].metrics["top1"]
    for name in ("pixels-16x16", "color-histogram"):
        b = found[name]
        assert b.unavailable is None and b.selection == "val" and b.chosen["C"] in [s["C"] for s in b.sweep]
        assert b.metrics["top1"] == 1.0 > majority + 0.5
        assert b.val_metric == max(s["val_top1"] for s in b.sweep)
        assert len(b.predictions) == len(b.test_rows) == int((colors.table["split"] == "test").sum())


def test_choices_never_read_test_labels(colors):
    """Scrambling the test labels changes the test numbers, never what was chosen on val."""
    table = colors.table.copy()
    test = table["split"] == "test"
    table.loc[test, "label"] = np.random.default_rng(3).permutation(table.loc[test, "label"].to_numpy())[::-1]
    scrambled = colors.derive(table)
    for a, b in zip(image_baselines(colors), image_baselines(scrambled)):
        assert a.chosen == b.chosen and a.sweep == b.sweep and a.val_metric == b.val_metric
        assert a.predictions.tolist() == b.predictions.tolist()


def test_a_corrupt_image_is_skipped_and_named(tmp_path, colors):
    table = colors.table.copy()
    bad_train, bad_test = tmp_path / "broken_train.png", tmp_path / "broken_test.png"
    bad_train.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    bad_test.write_bytes(b"not an image at all")
    train_row = int(np.flatnonzero(table["split"] == "train")[0])
    test_row = int(np.flatnonzero(table["split"] == "test")[0])
    table.loc[train_row, "image"], table.loc[test_row, "image"] = str(bad_train), str(bad_test)
    pixels, hist = image_baselines(colors.derive(table))
    for b in (pixels, hist):
        assert {s["path"] for s in b.skipped} == {str(bad_train), str(bad_test)}
        assert any("broken_train.png" in n and "broken_test.png" in n for n in b.notes)
        assert len(b.predictions) == len(b.test_rows)
        assert b.metrics["top1"] >= 5 / 6  # the unreadable test item gets the majority class, the rest stay right
        assert any("majority class" in n for n in b.notes)


WORDS = {"sport": ["goal", "match", "team", "score", "league"], "food": ["recipe", "oven", "bake", "salt", "flour"],
         "space": ["orbit", "rocket", "planet", "comet", "nasa"]}
FILLER = ["the", "a", "today", "news", "about", "new", "some", "with", "and", "story"]


def test_tfidf_reads_the_words_that_decide_the_class():
    rng = np.random.default_rng(0)
    labels, texts, splits = [], [], []
    for c, words in WORDS.items():
        for i in range(40):
            picked = list(rng.choice(FILLER, 5)) + list(rng.choice(words, 2))
            texts.append([" ".join(rng.permutation(picked))])
            labels.append(c)
            splits.append((("train",) * 6 + ("val",) * 2 + ("test",) * 2)[i % 10])
    ds = _table(labels, splits, texts=texts)
    found = {b.name: b for b in run_baselines(ds, modality="text")}
    assert list(found) == ["majority", "tfidf"]  # no images: no retrieval prior
    assert found["tfidf"].metrics["top1"] >= 0.9 > found["majority"].metrics["top1"] + 0.4
    assert found["tfidf"].selection == "val"
    direct = tfidf_baseline(ds)
    assert direct.predictions.tolist() == found["tfidf"].predictions.tolist()


def test_caption_prior_matches_a_hand_ranking():
    # train frequencies: a 3, b 2, c 1; test gallery {b, c, a, d}; d never seen in train
    captions = [["a", "b"], ["a", "b"], ["a", "c"], ["b"], ["c", "a"], ["d"]]
    splits = ["train", "train", "train", "test", "test", "test"]
    ds = _table(["x"] * 6, splits, texts=captions, images=[f"/nowhere/{i}.png" for i in range(6)])
    b = caption_prior_baseline(ds, ks=(1, 2))
    order = sorted({"b", "c", "a", "d"}, key=lambda t: -{"a": 3, "b": 2, "c": 1, "d": 0}[t])
    ranks = [1 + min(order.index(c) for c in caps) for caps in captions[3:]]
    assert ranks == [2, 1, 4]
    assert b.metrics["i2t_R@1"] == pytest.approx(np.mean([r <= 1 for r in ranks]))
    assert b.metrics["i2t_R@2"] == pytest.approx(np.mean([r <= 2 for r in ranks]))
    assert b.metrics["i2t_mrr"] == pytest.approx(np.mean([1 / r for r in ranks]))
    assert b.kind == "retrieval" and b.predictions is None and b.selection == "fixed"
    json.dumps(b.to_json())


def test_caption_prior_does_not_win_ties():
    """With no caption seen in train, every caption ties: the prior must score like chance, not R@1 = 1."""
    n = 30
    ds = _table(["x"] * (2 * n), ["train"] * n + ["test"] * n, texts=[[f"caption {i}"] for i in range(2 * n)],
                images=[f"/nowhere/{i}.png" for i in range(2 * n)])
    b = caption_prior_baseline(ds)
    assert b.metrics["i2t_R@1"] <= 0.2 and b.metrics["i2t_R@10"] < 0.7


def test_run_baselines_refuses_unknown_modality_and_explains_missing_inputs(colors):
    with pytest.raises(EncoderlabError, match="modality"):
        run_baselines(colors, modality="audio")
    text_only = _table(["a", "b"] * 4, ["train"] * 4 + ["val", "val", "test", "test"])
    pixels, hist = image_baselines(text_only)
    assert pixels.unavailable and hist.unavailable and pixels.predictions is None
