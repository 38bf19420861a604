"""The GPU paths of extraction, locally and through the Ray engine: fp16/bf16 autocast, decode workers keeping the
GPU fed, one GPU per Ray actor, GPU utilisation while it runs.

    python bench/gpu_ray_check.py [--images 2048] [--precision fp16]   # exits 2 without CUDA, 1 when a check fails

A random ViT-B/32-shaped CLIP (bench/extract.py's ``make_random_clip``: no download) embeds the same generated
224x224 JPEGs four ways: local fp32 (the reference), local at --precision, and ``--engine ray`` at --precision with
one actor per GPU. Printed per case: images/s, mean GPU utilisation (nvidia-smi sampled every 0.2 s), peak GPU
memory (local cases), and the cosine to the fp32 embeddings (min over images; check: >= 0.995 for fp16/bf16, and
the Ray run equal to the local run at the same precision to 1e-3). Results: bench/results/gpu_ray_check.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


class GpuSampler:
    """Mean utilisation of GPU 0 from nvidia-smi while the block runs (None when nvidia-smi is missing)."""

    def __enter__(self) -> GpuSampler:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def make_images(root: Path, n: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        p = root / f"{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(p, quality=90)
        rows.append({"image": str(p)})
    (root / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{root / 'images.jsonl'}"


def embed(spec: str, data: str, store: Path, precision: str, engine=None) -> tuple[dict, np.ndarray]:
    import torch

    from encoderlab.data import load_dataset
    from encoderlab.encoders import create_encoder
    from encoderlab.extract import embed_dataset
    from encoderlab.extract.loop import space_for
    from encoderlab.store import EmbeddingStore

    encoder = create_encoder(spec, device="cuda", precision=precision)
    ds = load_dataset(data)
    torch.cuda.reset_peak_memory_stats()
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        summary = embed_dataset(encoder, ds, EmbeddingStore(store), "image", progress=False, batch_size=256,
                                engine=engine)
        seconds = time.perf_counter() - t0
    space = space_for(EmbeddingStore(store), encoder, "image")
    X = space.get(sorted(space.keys()))
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    return {"precision": precision, "engine": "ray" if engine else "local", "images_per_s": round(len(X) / seconds, 1),
            "seconds": round(seconds, 2), "gpu_util_mean": gpu.mean,
            "peak_gpu_mb": None if engine else round(torch.cuda.max_memory_allocated() / 2**20),
            "skipped": len(summary["skipped"])}, X


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--precision", default="fp16", choices=["fp16", "bf16"])
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    sys.path.insert(0, str(HERE))
    from extract import make_random_clip

    from encoderlab.extract.ray_engine import RayEngine

    work = Path(tempfile.mkdtemp(prefix="gpu-ray-check-"))
    (work / "img").mkdir()
    spec = f"hf:{make_random_clip(work / 'clip-b32')}"
    data = make_images(work / "img", args.images)
    rows, failures = [], []
    ref_row, ref = embed(spec, data, work / "s-fp32", "fp32")
    low_row, low = embed(spec, data, work / "s-low", args.precision)
    with RayEngine() as eng:
        plan = eng.plan()
        ray_row, on_ray = embed(spec, data, work / "s-ray", args.precision, engine=eng)
    ray_row["plan"] = plan
    for row, X in ((ref_row, ref), (low_row, low), (ray_row, on_ray)):
        row["min_cosine_to_fp32"] = round(float(np.min(np.sum(X * ref, axis=1))), 5)
        rows.append(row)
    if plan["gpus_per_worker"] != 1:
        failures.append(f"the Ray plan gave no GPU per actor: {plan}")
    if low_row["min_cosine_to_fp32"] < 0.995:
        failures.append(f"{args.precision} embeddings drift from fp32: min cosine {low_row['min_cosine_to_fp32']}")
    if float(np.abs(on_ray - low).max()) > 1e-3:
        failures.append(f"Ray and local {args.precision} differ by {float(np.abs(on_ray - low).max()):.2e}")
    for r in rows:
        print(json.dumps(r))
    doc = {"images": args.images, "cases": rows, "failures": failures, "gpu": torch.cuda.get_device_name(0)}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "gpu_ray_check.json").write_text(json.dumps(doc, indent=2) + "\n")
    print("FAILED: " + "; ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
