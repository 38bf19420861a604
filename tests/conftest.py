"""Shared fixtures: tiny random Hugging Face models saved to disk the way the hub stores them.

Each fixture builds a model from a small config (hidden size 32, 2 layers, 32x32 images, patch 8), writes a real
tokenizer (BPE / WordPiece / SentencePiece files with a tiny vocabulary) and a ``preprocessor_config.json`` shaped
like the published ones, and ``save_pretrained``s everything into a session temp dir. Loading them back goes through
the same ``from_pretrained`` code a user's hub download would, with no network.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

#: a few sentences so every tokenizer has real sub-word pieces, not only characters
CORPUS = [
    "a photo of a cat",
    "a photo of a dog",
    "a kitten sitting on a sofa",
    "a cup of coffee on a table",
    "the stock market report",
    "a red car parked on the street",
    "an astronaut in a white suit",
    "a bird flying over the water",
]

TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
TINY_VISION = dict(image_size=32, patch_size=8, num_channels=3, **TINY_TEXT)


@pytest.fixture(autouse=True, scope="session")
def _runs_in_a_temporary_home(tmp_path_factory):
    """Tests never write into the user's runs or store: ENCODERLAB_HOME is a temporary directory for the session.

    The fetched data sets and the compiled-model cache are the real ones (symlinked, read-mostly), so real-data
    tests find the packaged sets. The default store is a store of the tests' own, kept between runs beside the
    user's (``$ENCODERLAB_HOME/test-store``), so the spaces of the temporary models tests train never land in the
    user's store, and real-data tests extract the packaged sets once, not per run.
    """
    from encoderlab import paths

    real = paths.home()
    home = tmp_path_factory.mktemp("encoderlab-home")
    for name, target in (("data", "data"), ("compiled", "compiled"), ("store", "test-store")):
        (real / target).mkdir(parents=True, exist_ok=True)
        (home / name).symlink_to(real / target, target_is_directory=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("ENCODERLAB_HOME", str(home))
    yield home
    patch.undo()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2))


def _words() -> list[str]:
    return sorted({w for line in CORPUS for w in line.split()})


# ---- tokenizers ----------------------------------------------------------------------------------------
def _save_clip_tokenizer(out: Path, max_length: int) -> int:
    """Byte-level BPE in CLIP's format (vocab.json + merges.txt, ``</w>`` word ends); returns the eos id."""
    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase)
    vocab: list[str] = letters + [c + "</w>" for c in letters]
    merges = ["#version: 0.2"]
    for word in ("photo", "cat", "dog", "sofa", "coffee", "the", "of", "on"):  # merge a few whole words
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
                if merged not in vocab:
                    vocab.append(merged)
            pieces = [merged] + pieces[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    _write_json(out / "vocab.json", {tok: i for i, tok in enumerate(vocab)})
    (out / "merges.txt").write_text("\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(str(out), model_max_length=max_length)
    tok.save_pretrained(str(out))
    return tok.eos_token_id


def _save_bert_tokenizer(out: Path, max_length: int) -> int:
    """WordPiece vocab.txt with the corpus words and single characters; returns the vocab size."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _words()
    vocab += [c for c in string.ascii_lowercase if c not in vocab] + ["##" + c for c in string.ascii_lowercase]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer.from_pretrained(str(out), model_max_length=max_length)
    tok.save_pretrained(str(out))
    return len(vocab)


def _save_siglip_tokenizer(out: Path, max_length: int) -> int:
    """A SentencePiece model laid out like Google's SigLIP ``spiece.model`` (pad 0, eos 1, unk 2)."""
    spm = pytest.importorskip("sentencepiece", reason="SigLIP's tokenizer needs sentencepiece")
    pytest.importorskip("google.protobuf", reason="SigLIP's tokenizer needs protobuf")
    import io

    from transformers import SiglipTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=model,
        vocab_size=64,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (out / "spiece.model").write_bytes(model.getvalue())
    tok = SiglipTokenizer.from_pretrained(str(out), model_max_length=max_length)
    tok.save_pretrained(str(out))
    return tok.vocab_size


# ---- models --------------------------------------------------------------------------------------------
def _save_model(model, out: Path) -> None:
    model.eval()
    model.save_pretrained(str(out))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CLIP: BPE tokenizer trimmed to the longest prompt; resize shorter side + center crop 32."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    out = tmp_path_factory.mktemp("tiny-clip")
    eos = _save_clip_tokenizer(out, max_length=24)
    vocab_size = len(json.loads((out / "vocab.json").read_text()))
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=24, eos_token_id=eos, **TINY_TEXT),
        vision_config=dict(**TINY_VISION),
        projection_dim=16,
    )
    torch.manual_seed(0)
    _save_model(CLIPModel(config), out)
    _write_json(
        out / "preprocessor_config.json",
        {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": 32},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": 32, "width": 32},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "do_convert_rgb": True,
        },
    )
    return out


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SigLIP: SentencePiece tokenizer padded to max_length 16; square resize to 32; mean/std 0.5."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    out = tmp_path_factory.mktemp("tiny-siglip")
    vocab_size = _save_siglip_tokenizer(out, max_length=16)
    config = SiglipConfig(
        text_config=dict(
            vocab_size=vocab_size,
            max_position_embeddings=16,
            pad_token_id=1,
            eos_token_id=1,
            bos_token_id=None,
            **TINY_TEXT,
        ),
        vision_config=dict(**TINY_VISION),
    )
    torch.manual_seed(0)
    model = SiglipModel(config)
    with torch.no_grad():  # init sets both to 0; distinct values make the test meaningful
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.7)
    _save_model(model, out)
    _write_json(
        out / "preprocessor_config.json",
        {
            "image_processor_type": "SiglipImageProcessor",
            "do_resize": True,
            "size": {"height": 32, "width": 32},
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    )
    return out


@pytest.fixture(scope="session")
def tiny_align_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ALIGN: BERT text tower + a two-block EfficientNet; EfficientNet processor with rescale offset."""
    import torch
    from transformers import AlignConfig, AlignModel

    out = tmp_path_factory.mktemp("tiny-align")
    vocab_size = _save_bert_tokenizer(out, max_length=32)
    vision = dict(
        image_size=32,
        width_coefficient=0.25,
        depth_coefficient=0.25,
        kernel_sizes=[3, 3],
        in_channels=[32, 16],
        out_channels=[16, 24],
        strides=[1, 2],
        num_block_repeats=[1, 1],
        expand_ratios=[1, 2],
        hidden_dim=16,
    )
    config = AlignConfig(
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=32, **TINY_TEXT),
        vision_config=vision,
        projection_dim=_align_vision_dim(vision),
        temperature_init_value=0.05,
    )
    torch.manual_seed(0)
    _save_model(AlignModel(config), out)
    _write_json(
        out / "preprocessor_config.json",
        {
            "image_processor_type": "EfficientNetImageProcessor",
            "do_resize": True,
            "size": {"height": 36, "width": 36},
            "resample": 0,
            "do_center_crop": True,
            "crop_size": {"height": 32, "width": 32},
            "do_rescale": True,
            "rescale_factor": 1 / 127.5,
            "rescale_offset": True,
            "do_normalize": False,
            "include_top": False,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    )
    return out


def _align_vision_dim(vision: dict) -> int:
    """Channels of ALIGN's pooled image output (= its image embedding), which the projection size must match."""
    import torch
    from transformers import AlignVisionConfig, AlignVisionModel

    model = AlignVisionModel(AlignVisionConfig(**vision)).eval()
    size = vision["image_size"]
    with torch.no_grad():
        return int(model(pixel_values=torch.zeros(1, 3, size, size)).pooler_output.shape[1])


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ViT backbone (CLS token + 16 patch tokens), square resize to 32, mean/std 0.5."""
    import torch
    from transformers import ViTConfig, ViTModel

    out = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    _save_model(ViTModel(ViTConfig(**TINY_VISION)), out)
    _write_json(
        out / "preprocessor_config.json",
        {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": 32, "width": 32},
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    )
    return out


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DINOv2 backbone; BitImageProcessor (shorter side 36, crop 32) as the published checkpoints use."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    out = tmp_path_factory.mktemp("tiny-dinov2")
    torch.manual_seed(0)
    _save_model(Dinov2Model(Dinov2Config(**TINY_VISION)), out)
    _write_json(
        out / "preprocessor_config.json",
        {
            "image_processor_type": "BitImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": 36},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": 32, "width": 32},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": IMAGENET_MEAN,
            "image_std": IMAGENET_STD,
            "do_convert_rgb": True,
        },
    )
    return out


@pytest.fixture(scope="session")
def tiny_resnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet backbone (two basic stages); ConvNextImageProcessor with crop_pct as microsoft/resnet-50 uses."""
    import torch
    from transformers import ResNetConfig, ResNetModel

    out = tmp_path_factory.mktemp("tiny-resnet")
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    torch.manual_seed(0)
    _save_model(ResNetModel(config), out)
    _write_json(
        out / "preprocessor_config.json",
        {
            "image_processor_type": "ConvNextImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": 32},
            "crop_pct": 0.875,
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": IMAGENET_MEAN,
            "image_std": IMAGENET_STD,
        },
    )
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BERT text encoder with a WordPiece tokenizer; max length 32."""
    import torch
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    vocab_size = _save_bert_tokenizer(out, max_length=32)
    torch.manual_seed(0)
    _save_model(BertModel(BertConfig(vocab_size=vocab_size, max_position_embeddings=32, **TINY_TEXT)), out)
    return out


@pytest.fixture(scope="session")
def tiny_aligned_dir(tmp_path_factory: pytest.TempPathFactory, tiny_vit_dir: Path, tiny_bert_dir: Path) -> Path:
    """An aligned pair (``local:DIR``): the tiny ViT and BERT towers with seeded random linear heads to 8 dims."""
    import torch

    from encoderlab.encoders import create_encoder
    from encoderlab.encoders.aligned import save_aligned

    specs = {"image": f"hf-vision:{tiny_vit_dir}", "text": f"hf-text:{tiny_bert_dir}"}
    dims = {m: create_encoder(s, device="cpu").embed_dim for m, s in specs.items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {f"{m}.weight": torch.randn(8, d, generator=gen) / d**0.5 for m, d in dims.items()}
    config = {"kind": "aligned", "format_version": 1, "vision": specs["image"], "text": specs["text"], "dim": 8,
              "head": "linear", "logit_scale": 10.0, "input_dims": dims, "input_normalize": True}
    return save_aligned(tmp_path_factory.mktemp("aligned") / "pair", config, tensors)


@pytest.fixture(scope="session")
def tiny_flava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FLAVA: ViT image / BERT text / multimodal towers, WordPiece tokenizer (max length 32); resize + crop 32."""
    import torch
    from transformers import FlavaConfig, FlavaModel

    out = tmp_path_factory.mktemp("tiny-flava")
    vocab_size = _save_bert_tokenizer(out, max_length=32)
    config = FlavaConfig(
        image_config=dict(**TINY_VISION),
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=32, **TINY_TEXT),
        multimodal_config=dict(**TINY_TEXT),
        hidden_size=32,  # FlavaForPreTraining's heads (the contrastive reference)
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = FlavaModel(config)
    with torch.no_grad():  # init sets log(1/0.07); a distinct value shows the scale is read from the weights
        model.logit_scale.fill_(2.1)
    _save_model(model, out)
    _write_json(
        out / "preprocessor_config.json",
        {
            "image_processor_type": "FlavaImageProcessor",
            "do_resize": True,
            "size": {"height": 36, "width": 36},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": 32, "width": 32},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": CLIP_MEAN,  # FLAVA_IMAGE_MEAN / STD are OpenAI CLIP's
            "image_std": CLIP_STD,
        },
    )
    return out
