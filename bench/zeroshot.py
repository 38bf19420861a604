"""Zero-shot classification throughput from cached embeddings: items/s, against two baselines in the same run.

    python bench/zeroshot.py                       # synthetic embeddings shaped like a real job
    python bench/zeroshot.py --encoder local:DIR --data emoji   # real cached embeddings (computed if missing)

What is timed (classifying every item, prompts already encoded and cached):
  encoderlab     ZeroShotClassifier: the template ensemble averaged once into one class matrix, one batched matmul;
  per-item loop  the straightforward loop: for each item, cosine with each class's ensemble vector in Python;
  logit ensemble score every template separately and average the logits (what one does without averaging the
                 normalized prompt embeddings first): T times the work at inference.
Also printed: the encoder's own items/s on the same machine, i.e. what a run without an embedding cache would pay.
Writes bench/results/zeroshot.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from encoderlab.heads.zeroshot import ZeroShotClassifier


def timed(fn, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_item_loop(X: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    out = np.empty(len(X), dtype=np.int64)
    for i, x in enumerate(X):
        x = x / np.linalg.norm(x)
        best, arg = -np.inf, -1
        for c, w in enumerate(class_emb):
            s = float(np.dot(x, w))
            if s > best:
                best, arg = s, c
        out[i] = arg
    return out


def logit_ensemble(X: np.ndarray, prompt_emb: np.ndarray) -> np.ndarray:
    x = X / np.linalg.norm(X, axis=1, keepdims=True)
    p = prompt_emb / np.linalg.norm(prompt_emb, axis=-1, keepdims=True)
    logits = np.zeros((len(X), p.shape[0]), dtype=np.float32)
    for t in range(p.shape[1]):
        logits += 100.0 * x @ p[:, t].T
    return np.argmax(logits / p.shape[1], axis=1)


def real_embeddings(spec: str, data: str, templates: str) -> tuple[np.ndarray, np.ndarray, float]:
    from encoderlab.data import load_dataset
    from encoderlab.data.prompts import class_display_names, class_prompts, load_templates
    from encoderlab.encoders import create_encoder
    from encoderlab.extract import image_embeddings, text_embeddings
    from encoderlab.paths import store_dir
    from encoderlab.rungs.costs import encoder_ms_per_item
    from encoderlab.store import EmbeddingStore

    enc = create_encoder(spec, device="cpu")
    ds = load_dataset(data)
    store = EmbeddingStore(store_dir())
    X = image_embeddings(enc, ds, store, progress=True).X
    names = class_display_names(ds.classes)
    tl = load_templates(templates)
    prompts = [p for row in class_prompts(names, tl) for p in row]
    P = text_embeddings(enc, prompts, store).reshape(len(names), len(tl), -1)
    return X, P, encoder_ms_per_item(enc, ds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", help="dual encoder spec for real embeddings (default: synthetic)")
    ap.add_argument("--data", default="emoji")
    ap.add_argument("--templates", default="clip80")
    ap.add_argument("--items", type=int, default=20000, help="synthetic: items")
    ap.add_argument("--classes", type=int, default=100, help="synthetic: classes")
    ap.add_argument("--dim", type=int, default=512, help="synthetic: embedding size")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "zeroshot.json"))
    args = ap.parse_args()
    enc_ms = None
    if args.encoder:
        X, P, enc_ms = real_embeddings(args.encoder, args.data, args.templates)
        label = f"{args.encoder} on {args.data}"
    else:
        rng = np.random.default_rng(0)
        X = rng.normal(size=(args.items, args.dim)).astype(np.float32)
        P = rng.normal(size=(args.classes, 80, args.dim)).astype(np.float32)
        label = f"synthetic {args.items} x {args.dim}, {args.classes} classes x 80 templates"
    head = ZeroShotClassifier().fit(P, list(range(P.shape[0])))
    ours = head.predict(X).astype(np.int64)
    loop_n = min(len(X), 2000)  # the loop is slow; time it on a prefix and scale per item
    assert (per_item_loop(X[:loop_n], head.class_embeddings_) == ours[:loop_n]).all()
    t_ours = timed(lambda: head.predict(X))
    t_loop = timed(lambda: per_item_loop(X[:loop_n], head.class_embeddings_), repeats=1) * len(X) / loop_n
    t_logit = timed(lambda: logit_ensemble(X, P), repeats=3)
    agree = float((logit_ensemble(X, P) == ours).mean())
    rows = {
        "encoderlab": len(X) / t_ours,
        "per-item loop": len(X) / t_loop,
        "logit ensemble": len(X) / t_logit,
    }
    print(f"zero-shot classification from cached embeddings: {label}")
    print(f"{'method':<16} {'items/s':>12} {'encoderlab is':>14}")
    for name, ips in rows.items():
        print(f"{name:<16} {ips:>12,.0f} {rows['encoderlab'] / ips:>13.1f}x")
    if enc_ms:
        print(f"{'encoder forward':<16} {1000.0 / enc_ms:>12,.1f} {rows['encoderlab'] * enc_ms / 1000.0:>13.0f}x"
              "   (decode + preprocess + forward; what every item costs without the cache)")
    print(f"logit-ensemble predictions equal ours on {agree:.1%} of items (averaging logits is not the same "
          f"classifier as averaging normalized prompt embeddings)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"label": label, "items_per_s": rows, "encoder_ms_per_item": enc_ms,
                               "logit_ensemble_agreement": agree}, indent=2) + "\n")


if __name__ == "__main__":
    main()
