"""Fine-tuning with a classifier: single-tower layouts, what trains, FLYP / LP-FT inits, the toy optimum,
save / load as local:DIR, the rung and the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import encoderlab.encoders.finetuned  # noqa: F401 - registers the "finetuned" kind (until local.py lists it)
from encoderlab.data.manifest import Dataset
from encoderlab.encoders import create_encoder
from encoderlab.encoders.trainable import as_trainable
from encoderlab.errors import EncoderlabError
from encoderlab.extract import labelled_embeddings
from encoderlab.rungs.finetune import run_finetune, save_finetune
from encoderlab.store import EmbeddingStore
from encoderlab.train.finetune import (
    FinetuneConfig,
    FinetuneModel,
    initial_head,
    parse_train_spec,
    plan_training,
    prepare_tower,
    split_items,
)

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220)}


def _toy(root: Path, per_class: int = 8) -> Dataset:
    """Two classes of solid-colour squares (half train, a quarter val, a quarter test each)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in COLOURS.items():
        for i in range(per_class):
            split = "train" if i < per_class // 2 else "val" if i < 3 * per_class // 4 else "test"
            path = root / f"{name}{i}.png"
            shade = np.clip(np.asarray(rgb) + 3 * i, 0, 255).astype(np.uint8)
            Image.fromarray(np.broadcast_to(shade, (32, 32, 3)).copy()).save(path)
            rows.append({"id": f"{name}{i}", "image": str(path), "texts": [], "label": name, "split": split})
    return Dataset(pd.DataFrame(rows), source="toy-colours")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {"ds": _toy(root / "img"), "store": EmbeddingStore(root / "store"), "root": root}


def _setup(spec: str, toy: dict):
    enc = create_encoder(spec, device="cpu")
    return enc, labelled_embeddings(enc, toy["ds"], toy["store"], progress=False)


# ---- single-tower layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["vit", "dinov2", "resnet", "bert"])
def test_single_towers_are_trainable_with_ordered_groups(family, request):
    path = request.getfixturevalue(f"tiny_{family}_dir")
    tower = "text" if family == "bert" else "image"
    enc = as_trainable(create_encoder(f"{'hf-text' if family == 'bert' else 'hf-vision'}:{path}", device="cpu"))
    names = [n for n, _ in enc.parameter_groups(tower)]
    blocks = [n for n in names if n.startswith("block.")]
    assert names[0] == "embeddings" and blocks == [f"block.{i}" for i in range(len(blocks))] and len(blocks) == 2
    # the poolers' weights are unused by mean / CLS pooling: no group holds them (last:1 must train something)
    assert names[-1] == {"vit": "layernorm", "dinov2": "layernorm", "resnet": "block.1", "bert": "block.1"}[family]
    grouped = [p for _, ps in enc.parameter_groups(tower) for p in ps]
    used = [p for n, p in enc.model.named_parameters() if not n.startswith("pooler.")]
    assert len({id(p) for p in grouped}) == len(grouped) == len(used)  # every used parameter, once
    module = enc.image_module() if tower == "image" else enc.text_module()
    inputs = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) if tower == "image"
              else enc.tokenize(["a photo of a cat", "a dog"]))
    module.train()
    module(inputs).square().sum().backward()
    module.eval()
    dead = [n for n, ps in enc.parameter_groups(tower) if not any(p.grad is not None and p.grad.abs().sum() > 0
                                                                   for p in ps)]
    assert dead == []  # every group the embedding depends on
    with torch.no_grad():
        if tower == "image":
            x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(enc.image_module().eval()(x), enc.encode_pixels(x), atol=1e-5, rtol=1e-5)
        else:
            texts = ["a photo of a cat", "the stock market report"]
            torch.testing.assert_close(enc.text_module().eval()(enc.tokenize(texts)), enc.encode_texts(texts),
                                       atol=1e-5, rtol=1e-5)


# ---- bad specs fail before work -----------------------------------------------------------------------------


def test_bad_specs_fail_before_any_work(tiny_clip_dir, tiny_resnet_dir, tiny_vit_dir, monkeypatch):
    for bad, match in (("bogus", "unknown --train spec 'bogus'"), ("last:0", "whole number"),
                       ("lora:x", "whole number"), ("last", "unknown --train")):
        with pytest.raises(EncoderlabError, match=match) as err:
            parse_train_spec(bad)
        assert "last:N" in err.value.fix
    with pytest.raises(EncoderlabError, match="objective 'contrastive'"):
        FinetuneConfig(objective="contrastive").check()
    with pytest.raises(EncoderlabError, match="label-smoothing"):
        FinetuneConfig(label_smoothing=1.5).check()
    clip = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    with pytest.raises(EncoderlabError, match="last:99.* has only 5 parameter groups") as err:
        plan_training(clip, FinetuneConfig(train="last:99"))
    assert "last:1 .. last:5" in err.value.fix
    resnet = create_encoder(f"hf-vision:{tiny_resnet_dir}", device="cpu")
    with pytest.raises(EncoderlabError, match="no attention q/k/v"):
        plan_training(resnet, FinetuneConfig(train="lora:2"))
    with pytest.raises(EncoderlabError, match="zero-shot head needs a dual encoder"):
        plan_training(resnet, FinetuneConfig(head_init="zeroshot"))
    from encoderlab.encoders import hf

    vit = create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu")
    monkeypatch.delitem(hf.SINGLE_LAYOUTS, "vit")
    with pytest.raises(EncoderlabError, match="'vit' model, which has no block map") as err:
        plan_training(vit, FinetuneConfig(train="last:1"))
    assert "--train heads" in err.value.fix
    assert plan_training(vit, FinetuneConfig(train="heads")).head_init == "probe"  # heads needs no block map


# ---- what trains --------------------------------------------------------------------------------------------


#: LoRA goes through peft (the finetune extra, which `make test` installs); without it those cases skip, naming it
LORA = pytest.param("lora:2", marks=pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                                        reason="peft (the finetune extra) is not installed"))


def _state(enc) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in enc.model.state_dict().items()}


@pytest.mark.parametrize("train", ["heads", "last:1", LORA])
def test_only_the_requested_parameters_change(train, tiny_clip_dir, toy):
    enc, emb = _setup(f"hf:{tiny_clip_dir}", toy)
    before = _state(enc)
    last = {id(p) for p in as_trainable(enc).parameter_groups("image")[-1][1]}
    last_names = {n for n, p in enc.model.named_parameters() if id(p) in last}
    _, ft = run_finetune(enc, emb, toy["store"], copy=False, templates="simple", n_boot=100,
                         config=FinetuneConfig(train=train, epochs=1, batch_size=4, lr=1e-2, lora_dropout=0.0))
    after = _state(enc)
    assert set(after) == set(before)  # LoRA merged away: the same plain model
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("text_model.") for k in changed)
    if train == "heads":
        assert changed == set() and ft.tower_state == {}
    elif train == "last:1":
        assert changed and changed <= last_names and set(ft.tower_state) == changed
    else:
        assert changed and all(k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj") for k in changed)
        assert all(k.startswith("vision_model.") for k in changed)
        assert set(ft.tower_state) == {f"lora.{k[:-len('.weight')]}.{m}" for k in changed for m in "AB"}
    if train != "heads":  # heads never touches the tower's parameters
        assert not any(p.requires_grad for p in enc.model.parameters())  # left frozen after training


# ---- the inits ----------------------------------------------------------------------------------------------


def test_zero_shot_init_equals_the_zero_shot_classifier(tiny_clip_dir, toy):
    from encoderlab.rungs.zeroshot import zeroshot_classifier

    enc, emb = _setup(f"hf:{tiny_clip_dir}", toy)
    templates = ["a photo of a {}.", "{}"]
    config = FinetuneConfig(train="last:1")
    head, init = initial_head(enc, emb, toy["store"], "zeroshot", templates=templates)
    model = FinetuneModel(prepare_tower(enc, plan_training(enc, config), config), head).eval()
    test = emb.index("test")
    with torch.no_grad():
        logits = model(split_items(enc, emb, test).pixels(range(len(test)))).numpy()
    zs = zeroshot_classifier(enc, emb.classes, toy["store"], templates)[0]
    np.testing.assert_allclose(logits, zs.decision_function(emb.X[test]), rtol=1e-4, atol=1e-4)
    assert init["init"] == "zeroshot"


def test_lp_ft_init_equals_the_fitted_probe(tiny_vit_dir, toy):
    enc, emb = _setup(f"hf-vision:{tiny_vit_dir}", toy)
    config = FinetuneConfig(train="all")
    plan = plan_training(enc, config)
    assert plan.head_init == "probe"
    head, init = initial_head(enc, emb, toy["store"], "probe", templates=[])
    model = FinetuneModel(prepare_tower(enc, plan, config), head).eval()
    with torch.no_grad():
        logits = model(split_items(enc, emb, np.arange(len(emb.y))).pixels(range(len(emb.y)))).numpy()
    np.testing.assert_allclose(logits, init["probe"].decision_function(emb.X), rtol=1e-4, atol=1e-4)


# ---- the toy optimum ----------------------------------------------------------------------------------------


def test_head_training_separates_what_zero_shot_cannot(tiny_clip_dir, toy):
    enc, emb = _setup(f"hf:{tiny_clip_dir}", toy)
    result, ft = run_finetune(enc, emb, toy["store"], templates="simple", n_boot=100,
                              config=FinetuneConfig(train="heads", epochs=4, batch_size=4, lr=0.2, patience=4))
    from encoderlab.rungs.zeroshot import zeroshot_classifier

    zs = zeroshot_classifier(enc, emb.classes, toy["store"], ["{}"])[0]
    va = emb.index("val")
    zs_val = float((zs.decision_function(emb.X[va]).argmax(1) == emb.y[va]).mean())
    history = [h["val_top1"] for h in ft.fitted.history]
    assert zs_val <= 0.5 and max(history) == 1.0 and ft.fitted.best_metric > zs_val
    assert result.metrics["top1"] == 1.0 and result.per_item["full"].shape == (4,)
    for key in ("fit_seconds", "trainable_params", "peak_rss_mb", "predict_ms_per_item",
                "predict_ms_per_item_with_encoder"):
        assert key in result.costs
    assert result.costs["trainable_params"] == 2 * enc.embed_dim  # the cosine head's W only


# ---- save / load --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", ["heads", "last:1", LORA])
def test_saved_model_loads_as_local_dir_with_identical_logits(train, tiny_clip_dir, toy, tmp_path):
    base = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    enc, emb = _setup(f"hf:{tiny_clip_dir}", toy)
    result, ft = run_finetune(enc, emb, toy["store"], copy=False, templates="simple", n_boot=100,
                              config=FinetuneConfig(train=train, epochs=1, batch_size=4, lr=1e-2))
    out = save_finetune(tmp_path / "model", ft, emb, result)
    cfg = json.loads((out / "encoderlab.json").read_text())
    assert cfg["kind"] == "finetuned" and cfg["train"]["spec"] == train and cfg["base"] == f"hf:{tiny_clip_dir}"
    assert cfg["train"]["data"]["splits"]["train"]["fingerprint"] and cfg["train"]["best_epoch"] == 1
    loaded = create_encoder(f"local:{out}", device="cpu")
    x = split_items(enc, emb, emb.index("test")).pixels(range(4))
    with torch.no_grad():
        want = ft.model(x).numpy()
    got = loaded.classifier().decision_function(loaded.encode_pixels(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    tuned = train != "heads"
    assert torch.allclose(loaded.encode_pixels(x), base.encode_pixels(x)) != tuned
    torch.testing.assert_close(loaded.encode_texts(["red"]), base.encode_texts(["red"]))  # text tower unchanged
    assert loaded.fingerprint() != base.fingerprint()
    items = loaded.training_items()
    assert items is not None and len(items.train["image"]) == 8 and len(items.val["image"]) == 4


# ---- the rung and the CLI -----------------------------------------------------------------------------------


def test_rung_is_registered_at_level_4_and_runs_on_a_copy(tiny_clip_dir, toy):
    from dataclasses import replace

    import encoderlab.rungs.finetune as rung_module
    from encoderlab.rungs.base import RungInputs, RungOptions

    rung = rung_module.RUNG
    assert (rung.level, rung.needs, rung.knobs) == (4, ("labels",), ("epochs",))
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    before = enc.fingerprint("image")
    inputs = RungInputs(enc, toy["ds"], toy["store"], progress=False)
    old = rung_module.RUNG_CONFIG
    rung_module.RUNG_CONFIG = replace(old, epochs=1, batch_size=4)
    try:
        result = rung.run(inputs, RungOptions(n_boot=100, progress=False, templates="simple"))
    finally:
        rung_module.RUNG_CONFIG = old
    assert result.task == "finetune" and result.config["train"] == "all" and "full" in result.per_item
    assert result.extra["settings"][0]["setting"] == "full" and "top1_ci_low" in result.metrics
    assert enc.fingerprint("image") == before  # the caller's encoder stays frozen


def _cli(argv, monkeypatch):
    """``encoderlab ARGV`` with the finetune command registered (until cli/__init__ lists it)."""
    import encoderlab.cli as cli
    from encoderlab.cli import finetune

    if finetune not in cli.COMMAND_GROUPS:
        monkeypatch.setattr(cli, "COMMAND_GROUPS", (*cli.COMMAND_GROUPS, finetune))
    return cli.main(argv)


def test_cli_trains_saves_and_zeroshot_runs_on_the_model(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "img"
    for row in _toy(tmp_path / "flat").table.itertuples():
        (data / row.label).mkdir(parents=True, exist_ok=True)
        Path(row.image).rename(data / row.label / Path(row.image).name)
    common = ["--data", f"folder:{data}", "--store", str(tmp_path / "store"), "--device", "cpu", "--json",
              "--n-boot", "100", "--split-ratios", "train=0.5,val=0.25,test=0.25", "--templates", "simple"]
    out = tmp_path / "model"
    code = _cli(["finetune", "--encoder", f"hf:{tiny_clip_dir}", "--objective", "classify", "--train", "last:1",
                 "--epochs", "1", "--batch-size", "4", "--out", str(out), *common], monkeypatch)
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["spec"] == f"local:{out}" and doc["metrics"]["top1"] is not None
    assert (out / "eval" / "results.json").is_file() and (out / "tower.safetensors").is_file()
    assert not (tmp_path / ".model.train").exists()  # the checkpoint work dir is removed once saved
    code = _cli(["zeroshot", "--encoder", f"local:{out}", "--split", "all", *common], monkeypatch)
    zs = json.loads(capsys.readouterr().out)
    assert code == 0 and zs["data"]["seen_in_training"]["items"] > 0
    code = _cli(["finetune", "--encoder", f"hf:{tiny_clip_dir}", "--train", "last:9", "--out",
                 str(tmp_path / "m2"), *common], monkeypatch)
    assert code == 1 and "parameter groups" in json.loads(capsys.readouterr().out)["error"]
    assert not (tmp_path / "m2").exists()
