"""The trainable-encoder contract on tiny random CLIP / SigLIP / ALIGN models, an open_clip layout, local kinds."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from encoderlab.encoders import create_encoder
from encoderlab.encoders.local import LOCAL_KINDS, register_local_kind
from encoderlab.encoders.trainable import TrainableEncoder, as_trainable, is_trainable
from encoderlab.errors import EncoderlabError

TEXTS = ["a photo of a cat", "a dog", "a cup of coffee on a table"]


@pytest.fixture(params=["clip", "siglip", "align"])
def dual(request):
    path = request.getfixturevalue(f"tiny_{request.param}_dir")
    return create_encoder(f"hf:{path}", device="cpu")


def _pixels(encoder, n: int = 2) -> torch.Tensor:
    size = getattr(encoder.processor, "crop_size", None) or encoder.processor.size
    h = size.get("height") or size.get("shortest_edge")
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, h, size.get("width") or h, generator=g)


def test_modules_reproduce_the_encoder_outputs(dual):
    enc = as_trainable(dual)
    assert isinstance(dual, TrainableEncoder) and is_trainable(dual)
    x = _pixels(dual)
    image, text = enc.image_module().eval(), enc.text_module().eval()
    with torch.no_grad():
        torch.testing.assert_close(image(x).cpu(), dual.encode_pixels(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text(enc.tokenize(TEXTS)).cpu(), dual.encode_texts(TEXTS), atol=1e-5, rtol=1e-5)


def test_groups_are_ordered_and_cover_each_parameter_once(dual):
    enc = as_trainable(dual)
    seen: dict[int, str] = {}
    for tower in ("image", "text"):
        groups = enc.parameter_groups(tower)
        names = [n for n, _ in groups]
        blocks = [n for n in names if n.startswith("block.")]
        assert names[0] == "embeddings" and blocks == [f"block.{i}" for i in range(len(blocks))] and len(blocks) >= 2
        tail = {"clip": ["final_norm", "projection"], "siglip": ["final_norm", "projection"]}.get(dual.model_type)
        if dual.model_type == "align":  # EfficientNet features are pooled blocks; BERT's pooler sits before the proj
            tail = [blocks[-1]] if tower == "image" else ["pooler", "projection"]
        assert names[-len(tail):] == tail
        module = enc.image_module() if tower == "image" else enc.text_module()
        grouped = [p for _, ps in groups for p in ps]
        assert len(grouped) == len({id(p) for p in grouped}) and {id(p) for p in grouped} == {
            id(p) for p in module.parameters()}
        for p in grouped:
            assert id(p) not in seen, f"a parameter is in both towers ({seen.get(id(p))})"
            seen[id(p)] = tower
    rest = [n for n, p in dual.model.named_parameters() if id(p) not in seen]
    assert set(rest) <= {"logit_scale", "logit_bias", "temperature"}  # only the shared scores are in no tower


def test_gradients_reach_the_last_group(dual):
    enc = as_trainable(dual)
    for tower, module, inputs in (("image", enc.image_module(), _pixels(dual)),
                                  ("text", enc.text_module(), enc.tokenize(TEXTS))):
        dual.model.zero_grad(set_to_none=True)
        module.train()
        module(inputs).square().sum().backward()
        module.eval()
        last = enc.parameter_groups(tower)[-1][1]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in last), tower


def test_state_dict_round_trip_reproduces_outputs(tiny_clip_dir):
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    before = enc.fingerprint("image")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stands in for training (random: a constant shift of a projection after a norm cancels)
        for p in enc.parameter_groups("image")[-1][1]:
            p.add_(torch.randn(p.shape, generator=g))
    for _, ps in enc.parameter_groups("text"):
        for p in ps:
            p.requires_grad_(False)  # frozen parameters stay out of the trainable state
    state = enc.trainable_state_dict()
    assert state and not any(k.startswith("text_model.") for k in state)
    x = _pixels(enc)
    want = enc.encode_pixels(x)
    fresh = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    assert not torch.allclose(fresh.encode_pixels(x), want)
    fresh.load_trainable_state_dict(state)
    torch.testing.assert_close(fresh.encode_pixels(x), want)
    assert fresh.fingerprint("image") != before  # the cached weight digest was dropped
    with pytest.raises(EncoderlabError, match="has no parameters"):
        fresh.load_trainable_state_dict({"nope.weight": torch.zeros(1)})


def test_non_trainable_encoders_are_refused_by_name(tiny_vit_dir):
    from encoderlab.testing import ColorEncoder

    assert is_trainable(create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu"))  # single towers opt in too
    mock = ColorEncoder()  # an encoder with no torch network to train
    assert not is_trainable(mock)
    with pytest.raises(EncoderlabError, match=r"test-color.* is not trainable") as err:
        as_trainable(mock)
    assert "CLIP, SigLIP, ALIGN" in err.value.fix and "open_clip" in err.value.fix


# ---- open_clip: its ViT layout on a fake backend (open_clip is optional) -------------------------------------


class _Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.mlp = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln_1(x))


class _Transformer(torch.nn.Module):
    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.resblocks = torch.nn.ModuleList(_Block(d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class _FakeVisual(torch.nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, d, 16, 16, bias=False)
        self.class_embedding = torch.nn.Parameter(torch.randn(d))
        self.positional_embedding = torch.nn.Parameter(torch.randn(5, d))
        self.ln_pre, self.transformer, self.ln_post = torch.nn.LayerNorm(d), _Transformer(d, 2), torch.nn.LayerNorm(d)
        self.proj = torch.nn.Parameter(torch.randn(d, 4))
        self.preprocess_cfg = {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "resize_mode": "squash"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv1(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_embedding.expand(len(x), 1, -1), tokens], 1) + self.positional_embedding
        return self.ln_post(self.transformer(self.ln_pre(tokens))[:, 0]) @ self.proj


class _FakeViTClip(torch.nn.Module):
    """open_clip's ``CLIP`` parameter layout: ``visual.*`` and a top-level text transformer."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.visual = _FakeVisual(d)
        self.token_embedding = torch.nn.Embedding(100, d)
        self.positional_embedding = torch.nn.Parameter(torch.randn(6, d))
        self.transformer, self.ln_final = _Transformer(d, 3), torch.nn.LayerNorm(d)
        self.text_projection = torch.nn.Parameter(torch.randn(d, 4))
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.visual(x)

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.transformer(self.token_embedding(ids) + self.positional_embedding)
        return self.ln_final(x)[:, -1] @ self.text_projection


def test_open_clip_vit_is_trainable_with_a_fake_backend(monkeypatch):
    model = _FakeViTClip()
    fake = types.ModuleType("open_clip")
    fake.list_models = lambda: ["ViT-B-32"]
    fake.list_pretrained_tags_by_model = lambda name: ["openai"]
    fake.create_model = lambda name, pretrained=None: model
    fake.get_tokenizer = lambda name: (lambda texts: torch.tensor([[len(t) % 100] * 6 for t in texts]))
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    enc = as_trainable(create_encoder("open_clip:ViT-B-32/openai", device="cpu"))
    image = [n for n, _ in enc.parameter_groups("image")]
    text = [n for n, _ in enc.parameter_groups("text")]
    assert image == ["embeddings", "block.0", "block.1", "final_norm", "projection"]
    assert text == ["embeddings", "block.0", "block.1", "block.2", "final_norm", "projection"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.image_module().eval()(x), enc.encode_pixels(x))
        torch.testing.assert_close(enc.text_module()(enc.tokenize(TEXTS)), enc.encode_texts(TEXTS))
    grouped = {id(p) for tower in ("image", "text") for _, ps in enc.parameter_groups(tower) for p in ps}
    assert {n for n, p in model.named_parameters() if id(p) not in grouped} == {"logit_scale"}


# ---- saved model kinds ----------------------------------------------------------------------------------


def test_register_local_kind_loads_local_dirs(tmp_path):
    (tmp_path / "encoderlab.json").write_text('{"kind": "test-kind"}')
    calls = []

    def loader(path, *, device, precision):
        calls.append(path)
        return "loaded"

    assert "aligned" in LOCAL_KINDS.names()  # the builtin kind registers on first use
    with pytest.raises(EncoderlabError, match="names model kind 'test-kind'"):
        create_encoder(f"local:{tmp_path}", device="cpu")
    register_local_kind("test-kind", loader, description="a test")
    try:
        from encoderlab.encoders.local import load_local

        assert load_local(str(tmp_path), device=torch.device("cpu"), precision="fp32") == "loaded"
        assert calls == [tmp_path] and LOCAL_KINDS.get("test-kind").description == "a test"
    finally:
        LOCAL_KINDS.unregister("test-kind")
