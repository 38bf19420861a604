"""Aligned pairs (two towers + projection heads, ``local:DIR``) are trainable past their heads: the contract, the
classify and contrastive objectives, the frozen-prefix cache cut at the head, WiSE-FT, save / load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_finetune import _toy as colour_toy
from test_finetune_contrastive import _toy as caption_toy

import encoderlab.encoders.finetuned  # noqa: F401 - registers the "finetuned" kind
from encoderlab.encoders import create_encoder
from encoderlab.encoders.trainable import as_trainable, trainable_module
from encoderlab.extract import labelled_embeddings
from encoderlab.rungs.finetune import run_finetune, run_finetune_contrastive, save_finetune, save_finetune_contrastive
from encoderlab.store import EmbeddingStore
from encoderlab.train.finetune import FinetuneConfig, split_items
from encoderlab.train.finetune_contrastive import ContrastiveConfig, pair_split

TEXTS = ["a photo of a cat", "a cup of coffee on a table"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-aligned")
    return {"colours": colour_toy(root / "colours"), "captions": caption_toy(root / "captions"),
            "store": EmbeddingStore(root / "store")}


def _pair(tiny_aligned_dir):
    return create_encoder(f"local:{tiny_aligned_dir}", device="cpu")


def _state(enc) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainable_module(enc).state_dict().items()}


def test_modules_reproduce_the_pair_and_groups_end_at_the_head(tiny_aligned_dir):
    pair = _pair(tiny_aligned_dir)
    enc = as_trainable(pair)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(enc.image_module().eval()(x), pair.encode_pixels(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.text_module().eval()(enc.tokenize(TEXTS)), pair.encode_texts(TEXTS),
                                   atol=1e-5, rtol=1e-5)
    seen = set()
    for tower, module in (("image", enc.image_module()), ("text", enc.text_module())):
        groups = enc.parameter_groups(tower)
        assert groups[-1][0] == "head" and groups[0][0] == "embeddings"
        assert {id(p) for p in pair.heads[tower].parameters()} == {id(p) for p in groups[-1][1]}
        ids = {id(p) for _, ps in groups for p in ps}
        unused = {n for n, p in module.named_parameters() if id(p) not in ids}
        assert ids <= {id(p) for p in module.parameters()} and not ids & seen
        assert all(".pooler." in f".{n}" for n in unused)  # mean / CLS pooling never reaches the pooler
        seen |= ids
    names = {n for n, p in trainable_module(pair).named_parameters() if id(p) not in seen and ".pooler." not in n}
    assert names == {"logit_scale"}  # only the temperature belongs to no tower
    assert float(trainable_module(pair).logit_scale.exp()) == pytest.approx(pair.logit_scale)


@pytest.mark.parametrize("train", ["last:1", "last:2"])
def test_classify_trains_only_the_image_side_and_round_trips(train, tiny_aligned_dir, data, tmp_path):
    pair, base = _pair(tiny_aligned_dir), _pair(tiny_aligned_dir)
    emb = labelled_embeddings(pair, data["colours"], data["store"], progress=False)
    before = _state(pair)
    result, ft = run_finetune(pair, emb, data["store"], copy=False, templates="simple", n_boot=50,
                              config=FinetuneConfig(train=train, epochs=2, batch_size=4, lr=1e-2))
    changed = {k for k, v in _state(pair).items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(("image_head.", "image.")) for k in changed)
    assert any(k.startswith("image.") for k in changed) == (train == "last:2")  # last:1 is the projection alone
    # the frozen-prefix cache: at the head, the whole tower runs once per image
    assert ft.prefix_cache["enabled"] == (train == "last:1")
    if train == "last:1":
        assert ft.prefix_cache["cut"] == "head"
    out = save_finetune(tmp_path / "m", ft, emb, result)
    assert json.loads((out / "encoderlab.json").read_text())["base"] == f"local:{tiny_aligned_dir}"
    loaded = create_encoder(f"local:{out}", device="cpu")
    x = split_items(pair, emb, emb.index("test")).pixels(range(3))
    torch.testing.assert_close(loaded.encode_pixels(x), pair.encode_pixels(x))
    assert not torch.allclose(loaded.encode_pixels(x), base.encode_pixels(x))
    torch.testing.assert_close(loaded.encode_texts(TEXTS), base.encode_texts(TEXTS))  # text side untouched
    assert loaded.fingerprint("image") != base.fingerprint("image")
    with torch.no_grad():
        np.testing.assert_allclose(loaded.classifier().decision_function(loaded.encode_pixels(x)),
                                   ft.model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_wise_ft_ends_are_zero_shot_and_the_fine_tuned_pair(tiny_aligned_dir, data):
    pair = _pair(tiny_aligned_dir)
    emb = labelled_embeddings(pair, data["colours"], data["store"], progress=False)
    result, ft = run_finetune(pair, emb, data["store"], templates="simple", n_boot=50, wise_ft=[0.0, 0.5, 1.0],
                              config=FinetuneConfig(train="last:2", epochs=2, batch_size=4, lr=1e-2))
    curve = {row["alpha"]: row for row in result.extra["wise_ft"]["curve"]}
    from encoderlab.rungs.zeroshot import run_zeroshot

    zero = _pair(tiny_aligned_dir)
    zemb = labelled_embeddings(zero, data["colours"], data["store"], progress=False)
    zs = run_zeroshot(zero, zemb, data["store"], templates="simple", n_boot=50)
    assert curve[0.0]["test_top1"] == pytest.approx(zs.metrics["top1"])
    assert curve[1.0]["test_top1"] == pytest.approx(result.metrics["top1"])


def test_contrastive_trains_both_heads_and_the_temperature(tiny_aligned_dir, data, tmp_path):
    pair = _pair(tiny_aligned_dir)
    before = _state(pair)
    config = ContrastiveConfig(train="last:1", lock="none", epochs=2, batch_size=6, lr=1e-2, warmup_steps=0)
    result, ft = run_finetune_contrastive(pair, data["captions"], data["store"], copy=False, config=config, n_boot=50)
    changed = {k for k, v in _state(pair).items() if not torch.equal(before[k], v)}
    assert changed == {"image_head.weight", "text_head.weight", "logit_scale"} == set(ft.tower_state)
    assert pair.logit_scale == pytest.approx(float(trainable_module(pair).logit_scale.exp()))
    out = save_finetune_contrastive(tmp_path / "m", ft, data["captions"], result)
    loaded = create_encoder(f"local:{out}", device="cpu")
    x = pair_split(pair, data["captions"], "test").items.pixels(range(3))
    torch.testing.assert_close(loaded.encode_pixels(x), pair.encode_pixels(x))
    torch.testing.assert_close(loaded.encode_texts(TEXTS), pair.encode_texts(TEXTS))
    assert loaded.logit_scale == pytest.approx(pair.logit_scale) and loaded.logit_scale != pytest.approx(10.0)


def test_contrastive_from_the_prefix_cache_equals_uncached(tiny_aligned_dir, data):
    """lock text, last:1: the image tower runs once per image (cut at the head); same weights as the full forward."""
    from encoderlab.train.finetune_contrastive import finetune_contrastive

    states, records = {}, {}
    for cached in (False, True):
        pair = _pair(tiny_aligned_dir)
        config = ContrastiveConfig(train="last:1", lock="text", epochs=2, batch_size=6, lr=1e-2, warmup_steps=0)
        ft = finetune_contrastive(pair, data["captions"], config, store=data["store"], prefix_cache=cached)
        states[cached], records[cached] = ft.tower_state, ft.prefix_cache
    assert records[True]["enabled"] and records[True]["cut"] == "head" and not records[False]["enabled"]
    assert set(states[True]) == set(states[False]) == {"image_head.weight", "logit_scale"}
    for k in states[True]:
        torch.testing.assert_close(states[True][k], states[False][k], atol=1e-5, rtol=1e-5)


def test_contrastive_leaves_out_undecodable_images_by_name(tiny_aligned_dir, data, tmp_path):
    import pandas as pd

    ds = data["captions"]
    bad = tmp_path / "truncated.png"
    good = ds.table["image"].iloc[0]
    bad.write_bytes(open(good, "rb").read()[:40])  # a PNG cut short
    row = ds.table.iloc[[0]].assign(id="bad", image=str(bad), split="train")
    broken = ds.derive(pd.concat([ds.table, row]))
    config = ContrastiveConfig(train="last:1", lock="text", epochs=1, batch_size=6, lr=1e-2, warmup_steps=0)
    with pytest.warns(UserWarning, match="left out of the pairs"):
        result, ft = run_finetune_contrastive(_pair(tiny_aligned_dir), broken, data["store"], config=config,
                                              n_boot=50)
    assert [s["path"] for s in ft.splits["train"].skipped] == [str(bad)]
    assert any(s.get("path") == str(bad) for s in result.skipped)
    assert str(bad) not in ft.splits["train"].items.paths
