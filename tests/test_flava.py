"""FLAVA through ``hf:`` against transformers on a tiny random model, and SigLIP's unmasked text convention.

FLAVA's ``get_image_features`` / ``get_text_features`` project every token; the contrastive embedding is the CLS
token of that sequence (what ``FlavaForPreTraining`` scores: ``logit_scale.exp() * cos``). SigLIP's ``hf:`` text
inputs are ids padded to ``max_length`` with the pad (= eos) token and no attention mask, as it was trained.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from encoderlab.encoders import create_encoder
from encoderlab.encoders.trainable import as_trainable
from encoderlab.errors import EncoderlabError

TEXTS = ["a photo of a cat", "a dog", "a kitten sitting on a sofa", "the stock market report"]


def _images() -> list[Image.Image]:
    rng = np.random.RandomState(0)
    sizes = [(45, 67), (64, 40), (32, 32)]
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for w, h in sizes]


def _processor(path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(path), backend="pil")


@pytest.fixture(scope="module")
def flava(tiny_flava_dir):
    return create_encoder(f"hf:{tiny_flava_dir}", device="cpu")


@pytest.fixture(scope="module")
def flava_reference(tiny_flava_dir):
    """(FlavaModel, FlavaForPreTraining sharing its weights, tokenizer, pixel values of ``_images()``)."""
    from transformers import AutoTokenizer, FlavaForPreTraining, FlavaModel

    model = FlavaModel.from_pretrained(str(tiny_flava_dir)).eval()
    config = model.config
    config.init_codebook = False  # the codebook only serves masked-image modelling
    pretraining = FlavaForPreTraining(config).eval()
    pretraining.flava.load_state_dict(model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_flava_dir))
    processor = _processor(tiny_flava_dir)
    pixels = torch.cat([processor(images=im, return_tensors="pt")["pixel_values"] for im in _images()])
    return model, pretraining, tokenizer, pixels


def test_flava_loads_as_a_softmax_dual_encoder(flava):
    assert flava.modalities == ("image", "text")
    assert flava.model_type == "flava" and flava.score_kind == "softmax" and flava.logit_bias is None
    assert flava.logit_scale == pytest.approx(float(np.exp(2.1)), rel=1e-5)
    assert flava.embed_dim == 16  # projection_dim
    tokens = flava.tokenize(["a cat", "a photo of a cat"])
    assert "attention_mask" in tokens  # BERT tower: padding trimmed to the longest, masked


def test_flava_features_are_the_projected_cls_tokens(flava, flava_reference):
    model, _, tokenizer, pixels = flava_reference
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=pixels).pooler_output[:, 0]
        batch = tokenizer(TEXTS, padding="max_length", max_length=32, return_tensors="pt")  # trimming must not matter
        ref_txt = model.get_text_features(**batch).pooler_output[:, 0]
    torch.testing.assert_close(flava.encode_images(_images()), ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flava.encode_texts(TEXTS), ref_txt, atol=1e-5, rtol=1e-5)


def test_flava_logits_equal_flava_contrastive_logits(flava, flava_reference):
    _, pretraining, tokenizer, pixels = flava_reference
    n = pixels.shape[0]
    batch = tokenizer(TEXTS[:n], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = pretraining(pixel_values=pixels, input_ids_masked=batch["input_ids"], return_loss=False, **batch)
    img = flava.encode_images(_images(), normalize=True)
    txt = flava.encode_texts(TEXTS[:n], normalize=True)
    logits = flava.logit_scale * img @ txt.T
    torch.testing.assert_close(logits, out.contrastive_logits_per_image.float(), atol=1e-4, rtol=1e-4)


def test_flava_zero_shot_follows_the_contrastive_logits(flava, tmp_path):
    from encoderlab.rungs.zeroshot import zeroshot_classifier
    from encoderlab.store import EmbeddingStore

    classes = ["cat", "dog", "sofa"]
    head, emb, _ = zeroshot_classifier(flava, classes, EmbeddingStore(tmp_path / "store"), ["a photo of a {}"])
    img = flava.encode_images(_images(), normalize=True)
    txt = flava.encode_texts([f"a photo of a {c}" for c in classes], normalize=True)
    expected = torch.softmax(flava.logit_scale * img @ txt.T, dim=1).numpy()
    np.testing.assert_allclose(head.predict_proba(img.numpy()), expected, atol=1e-5)


def test_flava_trainable_layout(flava):
    enc = as_trainable(flava)
    x = torch.stack([flava.image_transform()(im) for im in _images()])
    seen: set[int] = set()
    for tower, module, inputs, ref in (("image", enc.image_module(), x, flava.encode_pixels(x)),
                                       ("text", enc.text_module(), enc.tokenize(TEXTS), flava.encode_texts(TEXTS))):
        groups = enc.parameter_groups(tower)
        names = [n for n, _ in groups]
        assert names[0] == "embeddings" and names[-3:] == ["pooler", "final_norm", "projection"]
        assert sum(n.startswith("block.") for n in names) == 2
        grouped = {id(p) for _, ps in groups for p in ps}
        assert grouped == {id(p) for p in module.parameters()} and not grouped & seen
        seen |= grouped
        with torch.no_grad():
            torch.testing.assert_close(module(inputs).cpu(), ref, atol=1e-5, rtol=1e-5)
        flava.model.zero_grad(set_to_none=True)
        module(inputs).sum().backward()
        assert all(p.grad is not None for p in groups[-1][1])  # the projection
        flava.model.zero_grad(set_to_none=True)
    rest = {n.split(".")[0] for n, p in flava.model.named_parameters() if id(p) not in seen}
    assert rest == {"logit_scale", "multimodal_model", "image_to_mm_projection", "text_to_mm_projection"}


def test_flava_under_hf_vision_points_to_hf(tiny_flava_dir):
    with pytest.raises(EncoderlabError, match="dual image-text encoder") as err:
        create_encoder(f"hf-vision:{tiny_flava_dir}", device="cpu")
    assert f"hf:{tiny_flava_dir}" in err.value.fix


# ---- SigLIP: the unmasked convention --------------------------------------------------------------------------


def test_siglip_equals_siglip_model_called_without_a_mask(tiny_siglip_dir):
    """``hf:`` SigLIP = ``SiglipModel`` on ids padded to max_length with pad (= eos) and no mask; a mask changes it."""
    from transformers import AutoTokenizer, SiglipModel

    enc = create_encoder(f"hf:{tiny_siglip_dir}", device="cpu")
    model = SiglipModel.from_pretrained(str(tiny_siglip_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_siglip_dir))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    tokens = enc.tokenize(TEXTS)
    assert set(tokens) == {"input_ids"} and tokens["input_ids"].shape[1] == enc.text_max_length
    batch = tokenizer(TEXTS, padding="max_length", max_length=enc.text_max_length, return_tensors="pt")
    assert torch.equal(tokens["input_ids"], batch["input_ids"])
    pixels = torch.cat([_processor(tiny_siglip_dir)(images=im, return_tensors="pt")["pixel_values"]
                        for im in _images()])
    with torch.no_grad():
        unmasked = model(input_ids=batch["input_ids"], pixel_values=pixels)
        masked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels)
    txt = enc.encode_texts(TEXTS)
    torch.testing.assert_close(txt, unmasked.text_embeds * txt.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5)
    img = enc.encode_images(_images(), normalize=True)
    logits = enc.logit_scale * img @ normalize(txt).T + enc.logit_bias
    torch.testing.assert_close(logits, unmasked.logits_per_image, atol=1e-4, rtol=1e-4)
    # the masked call (what transformers 5's zero-shot pipeline does) gives other text embeddings and logits
    cos = (masked.text_embeds * unmasked.text_embeds).sum(-1)
    assert float(cos.min()) < 0.999
    assert not torch.allclose(masked.logits_per_image, unmasked.logits_per_image, atol=1e-3)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)
