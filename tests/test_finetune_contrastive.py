"""Contrastive fine-tuning (``finetune --objective contrastive``, FLYP-style): what trains, the loss, shared captions,
the toy optimum, save / load as local:DIR, the CLI's early refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import encoderlab.encoders.finetuned  # noqa: F401 - registers the "finetuned" kind
from encoderlab.data.manifest import Dataset
from encoderlab.encoders import create_encoder
from encoderlab.encoders.trainable import as_trainable
from encoderlab.errors import EncoderlabError
from encoderlab.rungs.finetune import run_finetune_contrastive, save_finetune_contrastive
from encoderlab.store import EmbeddingStore
from encoderlab.train.finetune_contrastive import (
    ContrastiveConfig,
    pair_split,
    plan_contrastive,
    prepare_towers,
)
from encoderlab.train.losses import contrastive_targets, sigmoid_loss, symmetric_infonce

#: colour -> its caption (words the tiny tokenizers know); SHARED is a caption of every train image
CLASSES = {(220, 30, 30): "a photo of a cat", (30, 200, 40): "a photo of a dog", (30, 40, 220): "a red car"}
SHARED = "a cup of coffee on a table"


def _toy(root: Path, per_class: int = 6) -> Dataset:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, (rgb, caption) in enumerate(CLASSES.items()):
        for i in range(per_class):
            split = "train" if i < per_class // 2 else "val" if i < per_class - 1 else "test"
            path = root / f"c{c}_{i}.png"
            shade = np.clip(np.asarray(rgb) + 4 * i, 0, 255).astype(np.uint8)
            Image.fromarray(np.broadcast_to(shade, (32, 32, 3)).copy()).save(path)
            texts = [caption, SHARED] if split == "train" else [caption]
            rows.append({"id": f"c{c}_{i}", "image": str(path), "texts": texts, "label": f"k{c}", "split": split})
    return Dataset(pd.DataFrame(rows), source="toy-captions")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-contrastive")
    return {"ds": _toy(root / "img"), "store": EmbeddingStore(root / "store"), "root": root}


def _state(enc) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in enc.model.state_dict().items()}


# ---- refusals before work -----------------------------------------------------------------------------------


def test_heads_and_uncaptioned_data_are_refused_before_work(tiny_clip_dir, toy):
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    with pytest.raises(EncoderlabError, match="--train heads") as err:
        ContrastiveConfig(train="heads").check()
    assert "last:N" in err.value.fix
    with pytest.raises(EncoderlabError, match="unknown --lock"):
        ContrastiveConfig(lock="both").check()
    with pytest.raises(EncoderlabError, match="last:9.*only"):
        plan_contrastive(enc, ContrastiveConfig(train="last:9"))
    bare = Dataset(toy["ds"].table.assign(texts=[[] for _ in range(len(toy["ds"]))]), source="no-captions")
    before = _state(enc)
    with pytest.raises(EncoderlabError, match="'no-captions' has no captioned images") as err:
        run_finetune_contrastive(enc, bare, toy["store"], copy=False, config=ContrastiveConfig(epochs=1))
    assert "captions" in err.value.fix and "--objective classify" in err.value.fix
    assert all(torch.equal(before[k], v) for k, v in _state(enc).items())


# ---- the loss -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_loss_is_the_pretraining_loss_and_a_shared_caption_is_positive(family, request, toy):
    enc = create_encoder(f"hf:{request.getfixturevalue(f'tiny_{family}_dir')}", device="cpu")
    config = ContrastiveConfig(train="last:1", batch_size=4)
    model = prepare_towers(enc, plan_contrastive(enc, config), config).eval()
    tr = pair_split(enc, toy["ds"], "train")
    assert len(tr.captions) == 4 and len(tr) == 18  # 3 class captions + the shared one, 9 images x 2
    idx = np.asarray([0, 1, 9, 10, 2, 3])  # pairs of images 0, 0(shared), 4(shared), ...
    pi, pt = tr.pair_img[idx], tr.pair_txt[idx]
    with torch.no_grad():
        zi = model.image(tr.items.pixels(pi.tolist()))
        zt = model.text(as_trainable(enc).tokenize([tr.captions[t] for t in pt]))
        mask = contrastive_targets(torch.from_numpy(tr.img_ids[pi]), torch.from_numpy(pt))
        got = model.loss(zi, zt, mask)
        shared = [i for i, t in enumerate(pt) if tr.captions[t] == SHARED]
        assert len(shared) >= 2 and all(mask[a, b] > 0 for a in shared for b in shared)  # not a negative
        if family == "clip":
            want = symmetric_infonce(zi, zt, enc.model.logit_scale.exp(), mask)
            naive = symmetric_infonce(zi, zt, enc.model.logit_scale.exp())
        else:
            want = sigmoid_loss(zi, zt, enc.model.logit_scale.exp(), enc.model.logit_bias, mask)
            naive = sigmoid_loss(zi, zt, enc.model.logit_scale.exp(), enc.model.logit_bias)
    assert abs(float(got) - float(want)) < 1e-6 and abs(float(got) - float(naive)) > 1e-6


# ---- what trains, the toy optimum, save / load ----------------------------------------------------------------


@pytest.mark.parametrize("family,lock", [("clip", "text"), ("siglip", "none")])
def test_only_requested_parameters_change_and_the_model_round_trips(family, lock, request, toy, tmp_path):
    spec = f"hf:{request.getfixturevalue(f'tiny_{family}_dir')}"
    enc = create_encoder(spec, device="cpu")
    before = _state(enc)
    config = ContrastiveConfig(train="last:1", lock=lock, epochs=3, batch_size=6, lr=1e-2, warmup_steps=0,
                               patience=3)
    groups = {t: {id(p) for p in as_trainable(enc).parameter_groups(t)[-1][1]} for t in ("image", "text")}
    names = {t: {n for n, p in enc.model.named_parameters() if id(p) in groups[t]} for t in groups}
    allowed = names["image"] | (names["text"] if lock == "none" else set()) | {"logit_scale", "logit_bias"}
    result, ft = run_finetune_contrastive(enc, toy["ds"], toy["store"], copy=False, config=config, n_boot=50)
    changed = {k for k, v in _state(enc).items() if not torch.equal(before[k], v)}
    assert changed and changed <= allowed and set(ft.tower_state) == changed
    assert changed & names["image"] and bool(changed & names["text"]) == (lock == "none")
    assert "logit_scale" in changed
    assert not any(p.requires_grad for p in enc.model.parameters())
    assert float(enc.model.logit_scale.exp()) <= 100.0 + 1e-4
    history = [h["val_metric"] for h in ft.fitted.history]
    assert ft.fitted.best_metric == max(history) >= history[0]  # early stopping on val: never worse than epoch 1
    assert result.task == "retrieval" and "i2t_R@1" in result.metrics and result.config["objective"] == "contrastive"
    out = save_finetune_contrastive(tmp_path / "model", ft, toy["ds"], result)
    cfg = json.loads((out / "encoderlab.json").read_text())
    assert cfg["classifier"] is None and cfg["train"]["objective"] == "contrastive"
    assert not (out / "classifier.safetensors").exists()
    loaded = create_encoder(f"local:{out}", device="cpu")
    x = pair_split(enc, toy["ds"], "test").items.pixels(range(3))
    torch.testing.assert_close(loaded.encode_pixels(x), enc.encode_pixels(x))
    torch.testing.assert_close(loaded.encode_texts(["a photo of a cat"]), enc.encode_texts(["a photo of a cat"]))
    assert loaded.logit_scale == pytest.approx(enc.logit_scale)
    if family == "siglip":
        assert loaded.logit_bias == pytest.approx(enc.logit_bias)
    items = loaded.training_items()
    assert items is not None and len(items.train["image"]) == 9 and len(items.train["text"]) == 4
    with pytest.raises(EncoderlabError, match="no classifier"):
        loaded.classifier()


def test_val_retrieval_improves_on_a_reachable_toy_task(tiny_clip_dir, toy):
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    config = ContrastiveConfig(train="all", epochs=6, batch_size=6, lr=3e-3, warmup_steps=0, patience=6)
    _, ft = run_finetune_contrastive(enc, toy["ds"], toy["store"], copy=False, config=config, n_boot=50)
    history = [h["val_metric"] for h in ft.fitted.history]
    # epoch 1 is at chance (1/3 on 3 captions); the best kept epoch is above it (0.83 when written)
    assert ft.fitted.best_metric == max(history) > history[0] and ft.fitted.best_metric > 0.5


# ---- the CLI ------------------------------------------------------------------------------------------------


def _cli(argv, monkeypatch):
    from encoderlab.cli import main

    return main(argv)


def test_cli_refuses_heads_and_uncaptioned_data(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "img"
    for c, rgb in enumerate(CLASSES):
        (data / f"k{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.broadcast_to(np.asarray(rgb, np.uint8), (32, 32, 3)).copy()).save(
                data / f"k{c}" / f"{i}.png")
    common = ["--data", f"folder:{data}", "--store", str(tmp_path / "store"), "--device", "cpu", "--json",
              "--split-ratios", "train=0.5,val=0.25,test=0.25"]
    code = _cli(["finetune", "--encoder", f"hf:{tiny_clip_dir}", "--objective", "contrastive", "--train", "heads",
                 "--out", str(tmp_path / "m1"), *common], monkeypatch)
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and "--train heads" in doc["error"] and not (tmp_path / "m1").exists()
    code = _cli(["finetune", "--encoder", f"hf:{tiny_clip_dir}", "--objective", "contrastive", "--train", "last:1",
                 "--out", str(tmp_path / "m2"), *common], monkeypatch)
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and "no captioned images" in doc["error"] and not (tmp_path / "m2").exists()


def test_cli_trains_saves_and_the_model_loads_as_local_dir(tiny_clip_dir, toy, tmp_path, monkeypatch, capsys):
    import pandas as pd  # a jsonl of the toy captions, read back through the real data path

    rows = toy["ds"].table[["id", "image", "texts", "label", "split"]].to_dict("records")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({**r, "text": r.pop("texts")}) + "\n" for r in rows))
    out = tmp_path / "tuned"
    code = _cli(["finetune", "--encoder", f"hf:{tiny_clip_dir}", "--objective", "contrastive", "--train", "last:1",
                 "--epochs", "2", "--batch-size", "4", "--data", f"jsonl:{path}", "--store", str(tmp_path / "store"),
                 "--device", "cpu", "--n-boot", "100", "--out", str(out), "--json"], monkeypatch)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(captured.out)
    assert "i2t_R@1" in json.dumps(doc) and (out / "encoderlab.json").exists()
    tuned = create_encoder(f"local:{out}", device="cpu")
    base = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    x = torch.randn(2, 3, 32, 32)
    assert float((tuned.encode_pixels(x) - base.encode_pixels(x)).abs().max()) > 0  # the image tower was tuned
    assert torch.allclose(tuned.encode_texts(["a cat"]), base.encode_texts(["a cat"]), atol=1e-6)  # text locked
    assert pd.notna(tuned.logit_scale)
