"""Epoch time of ``finetune --train last:1`` on EfficientNet-Lite0 (256 emoji images): without the frozen-prefix
cache, with it (built in the store on the first run, read back by a second run with another seed), and steps/s
against a naive PyTorch loop (decode + transform + full forward + backward every step).

Target (issue 9): epoch time with the cache >= 3x faster than without. Writes bench/results/finetune.json."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from encoderlab.data import load_dataset
from encoderlab.data.images import load_image
from encoderlab.encoders import create_encoder
from encoderlab.extract import labelled_embeddings
from encoderlab.store import EmbeddingStore
from encoderlab.train.finetune import FinetuneConfig, finetune_classifier

N, BATCH, EPOCHS = 256, 32, 2


def main() -> None:
    ds = load_dataset("emoji")
    ds.table = ds.table.iloc[:N].assign(split=["train"] * (N * 3 // 4) + ["val"] * (N - N * 3 // 4))
    store = EmbeddingStore(Path(tempfile.mkdtemp(prefix="encoderlab-bench-store-")))  # a cold cache every run
    out: dict = {"n_images": N, "batch_size": BATCH, "epochs": EPOCHS, "threads": torch.get_num_threads()}
    for key, cached, seed in (("uncached", False, 0), ("cached", True, 0), ("cached_from_store", True, 1)):
        enc = create_encoder("efficientnet-lite0", device="cpu")
        emb = labelled_embeddings(enc, ds, store, progress=False)
        cfg = FinetuneConfig(train="last:1", epochs=EPOCHS, batch_size=BATCH, patience=EPOCHS + 1, seed=seed)
        res = finetune_classifier(enc, emb, store, cfg, prefix_cache=None if cached else False)
        epochs = [h["seconds"] for h in res.fitted.history]
        out[key] = {"fit_seconds": round(res.fit_seconds, 2), "epoch_seconds": round(sum(epochs) / len(epochs), 3),
                    "cache_seconds": res.prefix_cache.get("seconds", 0.0), "prefix_cache": res.prefix_cache}
        print(key, out[key], flush=True)
    # naive: decode + transform + full forward + backward of the unfolded network, trained stage + head unfrozen
    enc = create_encoder("efficientnet-lite0", device="cpu")
    net, tf = enc.trainable_model, enc.image_transform()
    for name, ps in enc.parameter_groups("image")[-1:]:
        for p in ps:
            p.requires_grad_(True)
    head = torch.nn.Linear(1280, 64)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-5)
    paths = [str(p) for p in ds.table["image"].iloc[: N * 3 // 4]]
    steps, t0 = 0, time.perf_counter()
    for s in range(0, len(paths), BATCH):
        x = torch.stack([tf(load_image(p)) for p in paths[s:s + BATCH]]).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(head(net.extract_features(x).mean((2, 3))), torch.zeros(len(x), dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    naive = steps / (time.perf_counter() - t0)
    per_epoch = -(-(N * 3 // 4) // BATCH)
    out["naive_steps_per_s"] = round(naive, 3)
    for key in ("cached", "uncached"):
        out[key]["steps_per_s"] = round(per_epoch * EPOCHS / out[key]["fit_seconds"], 3)
    un, ca, st = out["uncached"], out["cached"], out["cached_from_store"]
    out["ratio_epoch_cached_vs_uncached"] = round(un["epoch_seconds"] / ca["epoch_seconds"], 2)  # target >= 3
    out["ratio_fit_incl_cache_build"] = round(un["fit_seconds"] / ca["fit_seconds"], 2)
    out["ratio_fit_cache_from_store"] = round(un["fit_seconds"] / st["fit_seconds"], 2)
    out["ratio_cached_vs_naive"] = round(out["cached"]["steps_per_s"] / naive, 2)
    print(json.dumps(out, indent=1))
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/finetune.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
