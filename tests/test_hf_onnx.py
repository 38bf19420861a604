"""The ONNX Runtime image path of ``hf:`` dual encoders: equal to PyTorch, cached, switchable, self-healing.

Every test runs with its own ``ENCODERLAB_HOME`` so the compiled-model cache starts empty and export counts are
exact. Models are the tiny random CLIP / SigLIP of conftest, loaded through the real ``hf:`` path.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from encoderlab.encoders import create_encoder, hf_onnx
from encoderlab.errors import EncoderlabError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="the ONNX path needs the onnx extra (onnxruntime + onnx)",
)

EQUAL = 1e-5  # max |difference| on L2-normalised embeddings


@pytest.fixture(autouse=True)
def _fresh_compiled_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCODERLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ENCODERLAB_ONNXRUNTIME", raising=False)
    hf_onnx.EXPORTS.clear()


def _pixels(encoder, n: int = 3) -> torch.Tensor:
    from PIL import Image

    colours = [(200, 30, 30), (20, 180, 60), (40, 40, 220), (250, 250, 10)]
    return torch.stack([encoder.image_transform()(Image.new("RGB", (40, 28), colours[i % 4])) for i in range(n)])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _torch_reference(encoder, pixels: torch.Tensor) -> torch.Tensor:
    """What the PyTorch path computes, straight from transformers (no encoderlab runtime choice involved)."""
    with torch.inference_mode():
        tower = hf_onnx.TowerFeatures(encoder.model, "image", ["pixel_values"], encoder.family.first_token)
        return _unit(tower(pixels))


def _compiled(tmp_path, tower: str = "image"):
    return sorted((tmp_path / "home" / "compiled").glob(f"hf-*-{tower}-*.onnx"))


@pytest.mark.parametrize("fixture", ["tiny_clip_dir", "tiny_siglip_dir"])
def test_onnx_image_path_equals_pytorch(request, fixture, monkeypatch):
    path = request.getfixturevalue(fixture)
    enc = create_encoder(f"hf:{path}", device="cpu")
    pixels = _pixels(enc)
    got = enc.encode_pixels(pixels, normalize=True)
    assert enc.runtime == "onnxruntime"
    assert float((got - _torch_reference(enc, pixels)).abs().max()) <= EQUAL
    monkeypatch.setenv("ENCODERLAB_ONNXRUNTIME", "0")
    eager = enc.encode_pixels(pixels, normalize=True)  # the switch is read per call
    assert float((got - eager).abs().max()) <= EQUAL
    assert not torch.equal(got, eager)  # the two really are different runtimes (not bit-identical)


@pytest.mark.parametrize("fixture", ["tiny_clip_dir", "tiny_siglip_dir"])
def test_onnx_text_path_equals_pytorch(request, fixture, monkeypatch, tmp_path):
    path = request.getfixturevalue(fixture)
    enc = create_encoder(f"hf:{path}", device="cpu")
    assert not _compiled(tmp_path, "text")  # the load-time sanity check runs in PyTorch: nothing exported yet
    texts = ["a cat", "a photo of a dog on a sofa", "the stock market report", "a red car"]
    got = [_unit(enc.encode_text_batch(texts[:k])) for k in (4, 1, 2)]  # several batch sizes and lengths
    assert enc.text_runtime == "onnxruntime" and len(_compiled(tmp_path, "text")) == 1
    monkeypatch.setenv("ENCODERLAB_ONNXRUNTIME", "0")
    for g, k in zip(got, (4, 1, 2)):
        assert float((g - _unit(enc.encode_text_batch(texts[:k]))).abs().max()) <= EQUAL
    if fixture == "tiny_siglip_dir":  # SigLIP keeps its recipe: ids padded to max_length, no mask
        assert set(enc.tokenize(texts)) == {"input_ids"} and enc.tokenize(texts)["input_ids"].shape[1] == 16


def test_export_is_cached_across_loads(tiny_clip_dir, tmp_path):
    first = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    first.encode_pixels(_pixels(first))
    files = _compiled(tmp_path)
    assert len(files) == 1 and sum(hf_onnx.EXPORTS.values()) == 1
    inode = files[0].stat().st_ino  # an export replaces the file (atomic write): a new inode
    second = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    second.encode_pixels(_pixels(second))
    assert second.runtime == "onnxruntime"
    assert sum(hf_onnx.EXPORTS.values()) == 1 and files[0].stat().st_ino == inode  # loaded, not re-exported


def test_switch_off_uses_pytorch_and_writes_nothing(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ENCODERLAB_ONNXRUNTIME", "0")
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    pixels = _pixels(enc)
    assert torch.equal(enc.encode_pixels(pixels, normalize=True), _torch_reference(enc, pixels))
    assert enc.runtime == "torch" and not _compiled(tmp_path) and not hf_onnx.EXPORTS


@pytest.mark.parametrize("damage", ["truncated", "other-model"])
def test_damaged_cached_export_is_detected_and_replaced(tiny_clip_dir, tiny_siglip_dir, tmp_path, damage):
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    enc.encode_pixels(_pixels(enc))
    (target,) = _compiled(tmp_path)
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:  # a readable ONNX file of another model under this name: only the probe check can tell
        siglip = create_encoder(f"hf:{tiny_siglip_dir}", device="cpu")
        siglip.encode_pixels(_pixels(siglip))
        other = next(p for p in _compiled(tmp_path) if p != target)
        target.write_bytes(other.read_bytes())
    again = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    pixels = _pixels(again)
    with pytest.warns(UserWarning, match="exporting it again"):
        got = again.encode_pixels(pixels, normalize=True)
    assert again.runtime == "onnxruntime" and hf_onnx.EXPORTS[target.name] == 2
    assert float((got - _torch_reference(again, pixels)).abs().max()) <= EQUAL


def test_export_failure_falls_back_to_pytorch_with_a_warning(tiny_clip_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(hf_onnx, "export_tower", broken)
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    pixels = _pixels(enc)
    with pytest.warns(UserWarning, match="using PyTorch"):
        got = enc.encode_pixels(pixels, normalize=True)
    assert enc.runtime == "torch"
    assert torch.equal(got, _torch_reference(enc, pixels))
    with pytest.warns(UserWarning, match="using PyTorch"):
        enc.encode_text_batch(["a cat", "a dog"])
    assert enc.text_runtime == "torch"


def test_fingerprint_is_the_same_with_and_without_onnx(tiny_clip_dir, monkeypatch):
    on = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    on.encode_pixels(_pixels(on))
    assert on.runtime == "onnxruntime"
    monkeypatch.setenv("ENCODERLAB_ONNXRUNTIME", "0")
    off = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    off.encode_pixels(_pixels(off))
    assert off.runtime == "torch"
    assert on.fingerprint("image") == off.fingerprint("image")


def test_weights_written_in_place_are_not_served_from_the_old_export(tiny_clip_dir, tmp_path):
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    pixels = _pixels(enc)
    before = enc.encode_pixels(pixels, normalize=True)
    fingerprint = enc.fingerprint("image")
    with torch.no_grad():
        enc.model.visual_projection.weight.mul_(-1.0)  # as an optimizer step would: in place
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new export under a new key, not a "damaged" old one
        after = enc.encode_pixels(pixels, normalize=True)
    assert float((after + before).abs().max()) <= EQUAL  # the projection flipped the embedding's sign
    assert float((after - _torch_reference(enc, pixels)).abs().max()) <= EQUAL
    assert len(_compiled(tmp_path)) == 2 and enc.fingerprint("image") != fingerprint


def test_fingerprint_follows_load_state_dict_before_any_encoding(tiny_clip_dir, monkeypatch):
    """A digest taken before ``load_state_dict`` must not name the new weights: embeddings of other weights would
    land in the old weights' store space (and the old export would be looked up for them)."""
    monkeypatch.setenv("ENCODERLAB_ONNXRUNTIME", "0")
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    original = {k: v.clone() for k, v in enc.model.state_dict().items()}
    fp = enc.fingerprint("image")
    enc.model.load_state_dict({k: (v * 0.5 if v.is_floating_point() else v) for k, v in original.items()})
    assert enc.fingerprint("image") != fp
    enc.model.load_state_dict(original)
    assert enc.fingerprint("image") == fp  # the same weights, the same space


def test_clip_text_padding_trimmed_equals_full_padding(tiny_clip_dir):
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    texts = ["a cat", "a photo of a dog on a sofa", "the stock market report"]
    trimmed = enc.tokenize(texts)
    full = enc.tokenization.tokenizer(texts, padding="max_length", max_length=24, truncation=True,
                                      return_tensors="pt")
    assert trimmed["input_ids"].shape[1] < full["input_ids"].shape[1] == 24
    with torch.inference_mode():
        ref = hf_onnx.output_tensor(enc.model.get_text_features(**dict(full)))
    assert float((_unit(enc.encode_text_batch(texts)) - _unit(ref)).abs().max()) <= EQUAL


def test_int8_is_opt_in_close_to_fp32_with_its_own_image_fingerprint(tiny_clip_dir, monkeypatch):
    fp32 = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    monkeypatch.setenv("ENCODERLAB_INT8", "1")
    int8 = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    pixels = _pixels(int8, 4)
    got, ref = int8.encode_pixels(pixels, normalize=True), fp32.encode_pixels(pixels, normalize=True)
    assert int8.runtime == "onnxruntime" and any(k.endswith("-int8dyn.onnx") for k in hf_onnx.EXPORTS)
    assert float((got * ref).sum(-1).min()) >= 0.99 and float((got - ref).abs().max()) > EQUAL
    assert int8.fingerprint("image") != fp32.fingerprint("image")
    assert int8.fingerprint("text") == fp32.fingerprint("text")  # the text tower is not quantized
    monkeypatch.setenv("ENCODERLAB_ONNXRUNTIME", "0")
    with pytest.raises(EncoderlabError, match="ENCODERLAB_INT8"):
        int8.encode_pixels(pixels)  # never fp32 embeddings under the int8 fingerprint
    with pytest.raises(EncoderlabError, match="ENCODERLAB_INT8"):
        create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
