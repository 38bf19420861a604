"""The extraction loop: equals a direct forward, reuses the store by content, skips bad files, resumes after kill -9."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoderlab.data import load_dataset
from encoderlab.encoders import create_encoder
from encoderlab.errors import EncoderlabError
from encoderlab.extract import extract_images, extract_texts
from encoderlab.hashing import text_key
from encoderlab.store import EmbeddingStore

SRC = str(Path(__file__).resolve().parents[1] / "src")


def make_folder(root: Path, n_per_class: int = 5, classes=("cat", "dog"), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            h, w = rng.integers(20, 60, size=2)
            arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{c}_{i}.png")
    return root


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return create_encoder(f"hf:{tiny_clip_dir}", device="cpu")


def direct_image_features(model_dir: Path, paths: list[str]) -> np.ndarray:
    """The reference: transformers' own processor and model, no encoderlab code."""
    from transformers import AutoImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(str(model_dir)).eval()
    proc = AutoImageProcessor.from_pretrained(str(model_dir))
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        out = model.get_image_features(**proc(images=images, return_tensors="pt"))
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return out.numpy()


@pytest.mark.parametrize("workers", [0, 2])
def test_extraction_equals_direct_forward(tmp_path, clip, tiny_clip_dir, workers):
    ds = load_dataset(f"folder:{make_folder(tmp_path / 'imgs')}")
    store = EmbeddingStore(tmp_path / "store")
    r = extract_images(clip, ds, store, batch_size=3, num_workers=workers, progress=False)
    assert (r.items, r.encoded, r.cached, r.skipped) == (10, 10, 0, [])
    got = store.space(clip.fingerprint("image")).get(r.keys)
    want = direct_image_features(tiny_clip_dir, list(ds.table["image"]))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_text_extraction_equals_direct_forward_and_dedupes(tmp_path, clip, tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    texts = ["a photo of a cat", "a dog", "a photo of a cat", "an extremely long caption about a small red boat"]
    store = EmbeddingStore(tmp_path / "store")
    r = extract_texts(clip, texts, store, progress=False)
    assert (r.items, r.encoded, r.cached) == (4, 3, 0)
    got = store.space(clip.fingerprint("text")).get([text_key(t) for t in texts])
    model = CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_clip_dir))
    with torch.no_grad():
        want = [model.get_text_features(**tok([t], truncation=True, return_tensors="pt")) for t in texts]
    want = torch.cat([w if isinstance(w, torch.Tensor) else w.pooler_output for w in want]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert extract_texts(clip, texts, store, progress=False).encoded == 0


def test_store_is_keyed_by_content(tmp_path, clip):
    a = make_folder(tmp_path / "a")
    store = EmbeddingStore(tmp_path / "store")
    first = extract_images(clip, load_dataset(f"folder:{a}"), store, num_workers=0, progress=False)
    assert first.encoded == 10
    # same images under other names in another dataset: nothing recomputed
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for p in sorted(b.rglob("*.png")):
        p.rename(p.with_name("renamed_" + p.name))
    again = extract_images(clip, load_dataset(f"folder:{b}"), store, num_workers=0, progress=False)
    assert (again.encoded, again.cached) == (0, 10)
    # one changed file: exactly one recomputed, and its embedding differs
    changed = sorted(b.rglob("*.png"))[0]
    Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(changed)
    third = extract_images(clip, load_dataset(f"folder:{b}"), store, num_workers=0, progress=False)
    assert (third.encoded, third.cached) == (1, 9)


def test_bad_files_are_skipped_and_reported(tmp_path, clip):
    root = make_folder(tmp_path / "imgs", n_per_class=3)
    (root / "cat" / "empty.png").write_bytes(b"")
    good = (root / "cat" / "cat_0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "text.jpg").write_text("not an image")
    ds = load_dataset(f"folder:{root}")
    store = EmbeddingStore(tmp_path / "store")
    r = extract_images(clip, ds, store, num_workers=0, progress=False)
    reasons = {Path(s["path"]).name: s["reason"] for s in r.skipped + ds.skipped}
    assert reasons == {"empty.png": "zero-byte", "truncated.png": "truncated", "text.jpg": "not-an-image"}
    assert r.encoded == 6
    by_name = dict(zip(ds.table["image"].map(lambda p: Path(p).name), r.keys))
    assert by_name["truncated.png"] is None and by_name["cat_1.png"] is not None
    with pytest.raises(EncoderlabError, match="--strict"):
        extract_images(clip, ds, EmbeddingStore(tmp_path / "s2"), num_workers=0, progress=False, strict=True)


def test_resume_after_kill_computes_only_what_is_missing(tmp_path, tiny_clip_dir):
    root = make_folder(tmp_path / "imgs", n_per_class=10)
    store_dir = tmp_path / "store"
    # A child process embeds with 2-row shards and kills itself (SIGKILL) during the 4th batch.
    child = textwrap.dedent(f"""
        import os, signal
        from encoderlab.data import load_dataset
        from encoderlab.encoders import create_encoder
        from encoderlab.extract import extract_images
        from encoderlab.store import EmbeddingStore
        enc = create_encoder({f"hf:{tiny_clip_dir}"!r}, device="cpu")
        calls = [0]
        real = enc.encode_pixels
        def dying(x, normalize=False):
            calls[0] += 1
            if calls[0] == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(x, normalize=normalize)
        enc.encode_pixels = dying
        extract_images(enc, load_dataset({f"folder:{root}"!r}), EmbeddingStore({str(store_dir)!r}),
                       batch_size=2, shard_size=2, num_workers=0, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", child], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    ds = load_dataset(f"folder:{root}")
    r = extract_images(enc, ds, EmbeddingStore(store_dir), num_workers=0, progress=False)
    assert (r.cached, r.encoded) == (6, 14)  # three committed batches survived, the rest computed once
    fresh = extract_images(enc, ds, EmbeddingStore(tmp_path / "fresh"), num_workers=0, progress=False)
    space = EmbeddingStore(store_dir).space(enc.fingerprint("image"))
    np.testing.assert_allclose(space.get(r.keys), EmbeddingStore(tmp_path / "fresh").space(
        enc.fingerprint("image")).get(fresh.keys), atol=1e-6)


def test_modality_mismatch_is_a_clear_error(tmp_path, tiny_vit_dir):
    vit = create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu")
    with pytest.raises(EncoderlabError, match="no text tower"):
        extract_texts(vit, ["a"], EmbeddingStore(tmp_path), progress=False)


def test_run_summary_is_json_serializable(tmp_path, clip):
    ds = load_dataset(f"folder:{make_folder(tmp_path / 'imgs', n_per_class=2)}")
    r = extract_images(clip, ds, EmbeddingStore(tmp_path / "s"), num_workers=0, progress=False)
    s = json.loads(json.dumps(r.summary()))
    assert s["encoded"] == 4 and s["items_per_s"] > 0


def test_out_of_memory_halves_the_batch_instead_of_failing(tmp_path, clip):
    ds = load_dataset(f"folder:{make_folder(tmp_path / 'imgs', n_per_class=4)}")
    ref = extract_images(clip, ds, EmbeddingStore(tmp_path / "ref"), batch_size=8, num_workers=0, progress=False)
    real = clip.encode_pixels
    sizes: list[int] = []

    def small_gpu(x, normalize=False):
        sizes.append(len(x))
        if len(x) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x, normalize=normalize)

    clip.encode_pixels = small_gpu
    try:
        r = extract_images(clip, ds, EmbeddingStore(tmp_path / "oom"), batch_size=8, num_workers=0, progress=False)
    finally:
        del clip.encode_pixels
    assert r.encoded == 8 and sizes[:3] == [8, 4, 2]
    got = EmbeddingStore(tmp_path / "oom").space(clip.fingerprint("image")).get(r.keys)
    np.testing.assert_allclose(got, EmbeddingStore(tmp_path / "ref").space(clip.fingerprint("image")).get(ref.keys),
                               atol=1e-6)
    clip.encode_pixels = lambda x, normalize=False: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    try:  # any other error is not swallowed
        with pytest.raises(RuntimeError, match="shape mismatch"):
            extract_images(clip, ds, EmbeddingStore(tmp_path / "x"), batch_size=8, num_workers=0, progress=False)
    finally:
        del clip.encode_pixels
