"""WiSE-FT (Wortsman et al. 2022): the α grid, θ(α) in place and restored, exact endpoints, α chosen on val only,
the also-eval forgetting column, the saved chosen-α model, and the CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_finetune import _cli, _toy

import encoderlab.encoders.finetuned  # noqa: F401 - registers the "finetuned" kind
from encoderlab.encoders import create_encoder
from encoderlab.errors import EncoderlabError
from encoderlab.extract import labelled_embeddings
from encoderlab.rungs.finetune import run_finetune, save_finetune
from encoderlab.rungs.zeroshot import zeroshot_classifier
from encoderlab.store import EmbeddingStore
from encoderlab.train.finetune import FinetuneConfig, split_items
from encoderlab.train.wise_ft import (
    apply_alpha,
    check_wise_ft,
    endpoints,
    interpolated,
    parse_alpha_grid,
    wise_ft_curve,
)

TEMPLATES = ["a photo of a {}."]
HAS_PEFT = importlib.util.find_spec("peft") is not None


@pytest.fixture(scope="module")
def tuned(tiny_clip_dir, tmp_path_factory):
    """A zero-shot tiny CLIP, a fine-tuned copy (last:1) and the curve over three alphas."""
    root = tmp_path_factory.mktemp("wise")
    ds, store = _toy(root / "img"), EmbeddingStore(root / "store")
    base = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    emb = labelled_embeddings(base, ds, store, progress=False)
    result, ft = run_finetune(base, emb, store, templates=TEMPLATES, n_boot=100,
                              config=FinetuneConfig(train="last:1", epochs=2, batch_size=4, lr=5e-2))
    curve = wise_ft_curve(base, ft, emb, store, [0.0, 0.5, 1.0], templates=TEMPLATES)
    return {"base": base, "emb": emb, "store": store, "result": result, "ft": ft, "curve": curve, "root": root}


# ---- the grid -----------------------------------------------------------------------------------------------


def test_alpha_grid_parses_and_bad_specs_fail_naming_them():
    assert parse_alpha_grid("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    grid = parse_alpha_grid("0:1:0.1")
    assert len(grid) == 11 and grid[3] == 0.3 and grid[-1] == 1.0
    assert parse_alpha_grid("0.5:1:0.3") == [0.5, 0.8, 1.0]  # STOP is always on the grid
    for bad in ("1:0:0.1", "0:1:0", "0:1:-0.1", "0:1", "a:b:c", "-0.1:1:0.1", "0:1.5:0.5", "0:1:1e-5", "0:1:nan"):
        with pytest.raises(EncoderlabError, match="--wise-ft") as err:
            parse_alpha_grid(bad)
        assert repr(bad) in err.value.message and "0:1:" in err.value.fix


def test_checks_before_training(tuned, tiny_vit_dir):
    emb = tuned["emb"]
    no_val = dataclasses.replace(emb, split=np.where(emb.split == "val", "train", emb.split))
    with pytest.raises(EncoderlabError, match="val split"):
        check_wise_ft(tuned["base"], no_val, [0.0, 1.0])
    with pytest.raises(EncoderlabError, match="\\[0, 1\\]"):
        check_wise_ft(tuned["base"], emb, [0.0, 1.5])
    vit = create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu")
    with pytest.raises(EncoderlabError, match="needs a dual encoder"):
        check_wise_ft(vit, emb, [0.0, 1.0], also_eval=emb)
    unlabelled = dataclasses.replace(emb, y=np.full_like(emb.y, -1))
    with pytest.raises(EncoderlabError, match="no labelled images"):
        check_wise_ft(tuned["base"], emb, [0.0, 1.0], also_eval=unlabelled)
    with pytest.raises(EncoderlabError, match="--also-eval"):
        run_finetune(tuned["base"], emb, tuned["store"], also_eval=emb)  # without --wise-ft: before any training


# ---- θ(α) in place ------------------------------------------------------------------------------------------


def test_interpolated_applies_the_mix_and_restores_exactly():
    layer = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    theta0 = {"weight": torch.zeros(2, 3), "bias": torch.ones(2)}
    theta1 = {"weight": torch.full((2, 3), 4.0), "bias": torch.full((2,), 3.0)}
    with interpolated(layer, theta0, theta1, 0.25):
        torch.testing.assert_close(layer.weight, torch.full((2, 3), 1.0), rtol=0, atol=0)
        torch.testing.assert_close(layer.bias, torch.full((2,), 1.5), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"), interpolated(layer, theta0, theta1, 0.7):
        raise RuntimeError("boom")  # an error inside still restores
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="unknown"):
        with interpolated(layer, {"nope": torch.zeros(1)}, {"nope": torch.zeros(1)}, 0.5):
            pass


def test_curve_leaves_the_fine_tuned_model_exactly_as_it_was(tuned):
    ft = tuned["ft"]
    ends = endpoints(tuned["base"], ft)
    assert ends.tower_keys and not any(k.startswith("text_model.") for k in ends.tower_keys)
    state = dict(ends.module.named_parameters())
    for k, v in ends.theta1.items():  # theta1 was taken after the curve ran: it must still be the trained model
        assert torch.equal(state[k], v)
    assert any(not torch.equal(ends.theta0[f"model.{k}"], ends.theta1[f"model.{k}"]) for k in ends.tower_keys)


# ---- the endpoints ------------------------------------------------------------------------------------------


def test_alpha_0_is_zero_shot_and_alpha_1_the_fine_tuned_model(tuned):
    base, emb, ft, store = tuned["base"], tuned["emb"], tuned["ft"], tuned["store"]
    test = emb.index("test")
    x = split_items(ft.encoder, emb, test).pixels(range(len(test)))
    with torch.no_grad():
        tuned_logits = ft.model.eval()(x).numpy()
    ends = endpoints(base, ft)
    base_state = dict(base.model.named_parameters())
    with interpolated(ends.module, ends.theta0, ends.theta1, 0.0), torch.no_grad():
        for k in ends.tower_keys:  # the zero-shot tower, bit for bit
            assert torch.equal(dict(ft.encoder.model.named_parameters())[k], base_state[k])
        zero = ft.model(x).numpy()
    with interpolated(ends.module, ends.theta0, ends.theta1, 1.0), torch.no_grad():
        one = ft.model(x).numpy()
    zs = zeroshot_classifier(base, emb.classes, store, TEMPLATES)[0]
    zs_logits = zs.decision_function(emb.X[test])
    assert (zero.argmax(1) == zs_logits.argmax(1)).all()
    np.testing.assert_allclose(zero, zs_logits, rtol=1e-4, atol=1e-4)  # pixels vs cached features: same path
    np.testing.assert_allclose(one, tuned_logits, rtol=0, atol=1e-6)
    rows = {r["alpha"]: r for r in tuned["curve"]["curve"]}
    assert rows[0.0]["test_top1"] == pytest.approx(float((zs_logits.argmax(1) == emb.y[test]).mean()), abs=1e-6)
    assert rows[1.0]["test_top1"] == pytest.approx(tuned["result"].metrics["top1"], abs=1e-6)


def test_curve_from_the_frozen_prefix_equals_the_full_forward(tiny_aligned_dir, tmp_path):
    """An aligned pair's last:1 trains its projection: every α reuses the tower's outputs, with the same curve."""
    ds, store = _toy(tmp_path / "img"), EmbeddingStore(tmp_path / "store")
    base = create_encoder(f"local:{tiny_aligned_dir}", device="cpu")
    emb = labelled_embeddings(base, ds, store, progress=False)
    _, ft = run_finetune(base, emb, store, templates=TEMPLATES, n_boot=100,
                         config=FinetuneConfig(train="last:1", epochs=2, batch_size=4, lr=5e-2))
    assert ft.prefix_cache["enabled"] and ft.prefix_cache["cut"] == "head", ft.prefix_cache
    grid = [0.0, 0.5, 1.0]
    fast = wise_ft_curve(base, ft, emb, store, grid, templates=TEMPLATES)
    slow = wise_ft_curve(base, ft, emb, store, grid, templates=TEMPLATES, prefix_cache=False)
    assert [r["test_top1"] for r in fast["curve"]] == [r["test_top1"] for r in slow["curve"]]
    np.testing.assert_allclose(fast["scores"], slow["scores"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(slow["scores"], wise_ft_curve(base, ft, emb, store, [0.0], templates=TEMPLATES)["scores"])


# ---- the curve and the choice -------------------------------------------------------------------------------


def test_curve_has_one_row_per_alpha_and_alpha_is_chosen_on_val_only(tuned):
    curve = tuned["curve"]
    assert [r["alpha"] for r in curve["curve"]] == [0.0, 0.5, 1.0] == curve["alphas"]
    assert all({"alpha", "val_top1", "test_top1"} <= set(r) for r in curve["curve"])
    best_val = max(r["val_top1"] for r in curve["curve"])
    assert curve["alpha"] == min(r["alpha"] for r in curve["curve"] if r["val_top1"] == best_val)  # ties: smaller
    assert curve["chosen_by"].startswith("val") and curve["scores"].shape == (4, 2)
    emb = tuned["emb"]
    test = emb.index("test")
    flipped = emb.y.copy()
    flipped[test] = 1 - flipped[test]  # every test label wrong: test top-1 turns to 1 - top-1
    other = wise_ft_curve(tuned["base"], tuned["ft"], dataclasses.replace(emb, y=flipped), tuned["store"],
                          [0.0, 0.5, 1.0], templates=TEMPLATES)
    assert other["alpha"] == curve["alpha"]
    assert [r["val_top1"] for r in other["curve"]] == [r["val_top1"] for r in curve["curve"]]
    assert [r["test_top1"] for r in other["curve"]] == pytest.approx([1 - r["test_top1"] for r in curve["curve"]])


def test_also_eval_reports_zero_shot_accuracy_on_a_second_dataset(tuned):
    from encoderlab.data.manifest import Dataset

    table = _toy(tuned["root"] / "other").table.copy()
    table["label"] = table["label"].map({"red": "crimson", "blue": "navy"})
    other = labelled_embeddings(tuned["base"], Dataset(table, source="toy-other"), tuned["store"], progress=False)
    curve = wise_ft_curve(tuned["base"], tuned["ft"], tuned["emb"], tuned["store"], [0.0, 1.0], also_eval=other,
                          templates=TEMPLATES)
    zs = zeroshot_classifier(tuned["base"], other.classes, tuned["store"], TEMPLATES)[0]
    want = float((zs.decision_function(other.X).argmax(1) == other.y).mean())
    assert curve["curve"][0]["also_eval_top1"] == pytest.approx(want, abs=1e-6)  # α = 0: plain zero-shot
    assert curve["also_eval"]["items"] == 16 and "also_eval_top1" in curve["curve"][1]


# ---- the run, the saved model, the CLI ----------------------------------------------------------------------


@pytest.mark.parametrize("train", ["last:1", pytest.param("lora:2", marks=pytest.mark.skipif(
    not HAS_PEFT, reason="peft (the finetune extra) is not installed"))])
def test_run_reports_the_curve_and_saves_the_chosen_alpha(train, tuned, tiny_clip_dir, tmp_path):
    base, emb, store = tuned["base"], tuned["emb"], tuned["store"]
    config = FinetuneConfig(train=train, epochs=1, batch_size=4, lr=5e-2, lora_dropout=0.0)
    result, ft = run_finetune(base, emb, store, templates=TEMPLATES, n_boot=100, config=config,
                              wise_ft=[0.0, 0.5, 1.0])
    alpha = result.metrics["wise_ft/alpha"]
    assert alpha in (0.0, 0.5, 1.0) and len(result.extra["wise_ft"]["curve"]) == 3
    assert "scores" not in result.extra["wise_ft"] and json.dumps(result.extra["wise_ft"])
    row = {r["alpha"]: r for r in result.extra["wise_ft"]["curve"]}[alpha]
    assert result.metrics["wise_ft/top1"] == pytest.approx(row["test_top1"])
    assert ft.wise_ft["alpha"] == alpha
    if alpha == 1.0:  # the mix that is saved must be a real one: force α = 0.5 (apply_alpha is what the run calls)
        _, ft = run_finetune(base, emb, store, templates=TEMPLATES, n_boot=100, config=config)
        apply_alpha(base, ft, 0.5)
        ft.wise_ft, alpha = {"alpha": 0.5, "test": {"top1": None}}, 0.5
    out = save_finetune(tmp_path / "model", ft, emb, result)
    cfg = json.loads((out / "encoderlab.json").read_text())
    assert cfg["wise_ft"]["alpha"] == alpha
    loaded = create_encoder(f"local:{out}", device="cpu")
    x = split_items(ft.encoder, emb, emb.index("test")).pixels(range(4))
    with torch.no_grad():
        want = ft.model.eval()(x).numpy()
    np.testing.assert_allclose(loaded.classifier().decision_function(loaded.encode_pixels(x)), want,
                               rtol=1e-5, atol=1e-5)
    if alpha == 0.0:  # the zero-shot tower itself
        torch.testing.assert_close(loaded.encode_pixels(x), base.encode_pixels(x), rtol=0, atol=1e-6)


def test_cli_wise_ft_and_bad_specs(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "img"
    for row in _toy(tmp_path / "flat").table.itertuples():
        (data / row.label).mkdir(parents=True, exist_ok=True)
        Path(row.image).rename(data / row.label / Path(row.image).name)
    common = ["--encoder", f"hf:{tiny_clip_dir}", "--data", f"folder:{data}", "--store", str(tmp_path / "store"),
              "--device", "cpu", "--n-boot", "100", "--split-ratios", "train=0.5,val=0.25,test=0.25",
              "--templates", "simple", "--train", "heads", "--epochs", "1", "--batch-size", "4"]
    assert _cli(["finetune", *common, "--wise-ft", "1:0:0.1", "--out", str(tmp_path / "bad")], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "argument --wise-ft" in err and "'1:0:0.1'" in err and "0:1:0.1" in err
    assert _cli(["finetune", *common, "--also-eval", f"folder:{data}", "--out", str(tmp_path / "bad"), "--json"],
                monkeypatch) == 1
    assert "--wise-ft" in json.loads(capsys.readouterr().out)["fix"]
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "model"
    code = _cli(["finetune", *common, "--wise-ft", "0:1:0.5", "--also-eval", f"folder:{data}", "--out", str(out)],
                monkeypatch)
    text = capsys.readouterr().out
    assert code == 0 and "WiSE-FT: alpha" in text and "also-eval" in text
    cfg = json.loads((out / "encoderlab.json").read_text())
    assert cfg["wise_ft"]["alphas"] == [0.0, 0.5, 1.0] and cfg["wise_ft"]["alpha"] in (0.0, 0.5, 1.0)
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["metrics"]["wise_ft/alpha"] == cfg["wise_ft"]["alpha"]
    assert len(results["wise_ft"]["curve"]) == 3  # extra sections are top-level keys of results.json
