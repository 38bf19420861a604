"""The Ray engine: on a local 2-CPU Ray cluster, ``embed`` / ``filter`` / ``index build`` give what the local
engine gives (keys, embeddings to 1e-5, skip reports, summaries); a killed worker and a killed driver leave nothing
half-written and the rerun encodes only what is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from encoderlab.cli import main  # noqa: E402
from encoderlab.curate import FilterConfig, filter_dataset  # noqa: E402
from encoderlab.data import load_dataset  # noqa: E402
from encoderlab.encoders import create_encoder  # noqa: E402
from encoderlab.errors import EncoderlabError  # noqa: E402
from encoderlab.extract import embed_dataset  # noqa: E402
from encoderlab.extract.loop import space_for  # noqa: E402
from encoderlab.extract.ray_engine import FAULT_ENV, RayEngine  # noqa: E402
from encoderlab.store import EmbeddingStore  # noqa: E402

N_IMAGES = 240
TIMING = ("seconds", "items_per_s")


@pytest.fixture(scope="module")
def engine():
    with RayEngine(num_cpus=2, block_rows=48) as eng:
        yield eng


@pytest.fixture(scope="module")
def pairs_spec(tmp_path_factory) -> str:
    """240 generated images with captions, plus what a real crawl has: a corrupt file, a truncated PNG, a file
    that is missing, and the same bytes under two names."""
    d = tmp_path_factory.mktemp("ray-pairs")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        arr = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        p = d / f"img{i:03d}.png"
        Image.fromarray(arr).save(p)
        rows.append({"image": str(p), "text": [f"picture number {i}", f"another caption {i % 7}"],
                     "split": "train" if i % 5 else "test"})
    (d / "copy.png").write_bytes((d / "img007.png").read_bytes())
    (d / "corrupt.png").write_bytes(b"not an image at all")
    (d / "truncated.png").write_bytes((d / "img001.png").read_bytes()[:60])
    for name in ("copy.png", "corrupt.png", "truncated.png", "missing.png"):
        rows.append({"image": str(d / name), "text": [f"odd file {name}"], "split": "train"})
    path = d / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}"


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _same_space(a: EmbeddingStore, b: EmbeddingStore, encoder, modality: str) -> int:
    sa, sb = space_for(a, encoder, modality), space_for(b, encoder, modality)
    keys = sorted(sa.keys())
    assert keys == sorted(sb.keys()) and keys
    np.testing.assert_allclose(sa.get(keys), sb.get(keys), atol=1e-5, rtol=0)
    return len(keys)


def test_embed_on_ray_equals_the_local_engine(engine, pairs_spec, tiny_clip_dir, tmp_path):
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    ds = load_dataset(pairs_spec)
    local_store, ray_store = EmbeddingStore(tmp_path / "local"), EmbeddingStore(tmp_path / "ray")
    local = embed_dataset(enc, ds, local_store, "both", progress=False, batch_size=16)
    on_ray = embed_dataset(enc, ds, ray_store, "both", progress=False, batch_size=16, engine=engine)
    assert on_ray["engine"]["engine"] == "ray" and on_ray["engine"]["cpus"] == 2
    assert on_ray["engine"]["runs"][-2]["blocks"] > 1  # the images really were split over several blocks
    la, ra = local.pop("results"), on_ray.pop("results")
    for key in ("engine", "store"):
        local.pop(key), on_ray.pop(key)
    assert _without_timing(on_ray) == _without_timing(local)  # counts, skips (same order), fingerprints
    assert [r.keys for r in ra] == [r.keys for r in la]
    reasons = {Path(s["path"]).name: s["reason"] for s in on_ray["skipped"]}
    assert set(reasons) == {"corrupt.png", "truncated.png", "missing.png"}, reasons
    assert local["encoded"] == N_IMAGES + len({t for r in ds.table["texts"] for t in r})  # copy.png shares a key
    assert _same_space(local_store, ray_store, enc, "image") == N_IMAGES
    _same_space(local_store, ray_store, enc, "text")
    again = embed_dataset(enc, ds, ray_store, "both", progress=False, batch_size=16, engine=engine)
    assert again["encoded"] == 0 and again["cached"] == local["encoded"]  # a rerun encodes nothing


def test_an_aligned_pair_on_ray_encodes_its_towers_on_workers_and_derives_heads(engine, pairs_spec,
                                                                                tiny_aligned_dir, tmp_path):
    enc = create_encoder(f"local:{tiny_aligned_dir}", device="cpu")
    ds = load_dataset(pairs_spec)
    local_store, ray_store = EmbeddingStore(tmp_path / "local"), EmbeddingStore(tmp_path / "ray")
    embed_dataset(enc, ds, local_store, "image", progress=False)
    runs = len(engine.runs)
    embed_dataset(enc, ds, ray_store, "image", progress=False, engine=engine)
    assert engine.runs[runs]["modality"] == "image"  # the tower went through the actors
    base = enc.feature_source("image").base
    assert _same_space(local_store, ray_store, base, "image") == N_IMAGES
    assert _same_space(local_store, ray_store, enc, "image") == N_IMAGES


def test_a_killed_worker_is_restarted_and_its_block_finishes_without_losing_or_redoing_work(
        engine, pairs_spec, tiny_clip_dir, tmp_path, monkeypatch):
    from encoderlab.extract.loop import extract_images

    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    ds = load_dataset(pairs_spec)
    reference = EmbeddingStore(tmp_path / "reference")
    want = extract_images(enc, ds, reference, progress=False, batch_size=8)
    store = EmbeddingStore(tmp_path / "store")
    # the first life of the actor kills itself (SIGKILL) once it has committed 2 shards, mid-block
    monkeypatch.setenv(FAULT_ENV, "kill-actor-after-commits:2")
    monkeypatch.setenv("ENCODERLAB_COMMIT_SECONDS", "0.001")  # a shard per batch of 8
    runs = len(engine.runs)
    got = extract_images(enc, ds, store, progress=False, batch_size=8, engine=engine)
    run = engine.runs[runs]
    assert len(run["worker_pids"]) >= 1 and run["blocks_after_restart"] >= 1, run  # it died and came back
    assert run["rows_resumed"] >= 16, run  # the retried block kept the 2 shards its dead actor had committed
    assert got.keys == want.keys and got.encoded == want.encoded == N_IMAGES
    assert [s["path"] for s in got.skipped] == [s["path"] for s in want.skipped]
    assert _same_space(reference, store, enc, "image") == N_IMAGES
    assert space_for(store, enc, "image").verify() == []


def test_strict_and_worker_errors_come_back_as_the_users_error(engine, pairs_spec, tiny_clip_dir, tmp_path):
    from encoderlab.extract.loop import extract_images

    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    ds = load_dataset(pairs_spec)
    ds = ds.derive(ds.table[ds.table["image"].map(lambda p: "corrupt" in str(p) or "img00" in str(p))])
    with pytest.raises(EncoderlabError, match="--strict: .*corrupt.png"):  # raised on a worker, re-raised here
        extract_images(enc, ds, EmbeddingStore(tmp_path / "s"), progress=False, strict=True, engine=engine)


def test_filter_and_index_build_on_ray_equal_local(engine, pairs_spec, tiny_clip_dir, tmp_path):
    from encoderlab.retrieval.collection import index_dataset

    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    ds = load_dataset(pairs_spec)
    cfg = FilterConfig(near_dup=None)
    a = filter_dataset(enc, ds, EmbeddingStore(tmp_path / "a"), cfg, split="all", progress=False, cache=False)
    b = filter_dataset(enc, ds, EmbeddingStore(tmp_path / "b"), cfg, split="all", progress=False, cache=False,
                       engine=engine)
    cols = ["id", "text", "image_key", "text_key", "kept", "reason"]
    assert a.pairs[cols].equals(b.pairs[cols])
    np.testing.assert_allclose(a.pairs["score"], b.pairs["score"], atol=1e-5)
    assert a.counts == b.counts
    da, _ = index_dataset(enc, ds, EmbeddingStore(tmp_path / "a"), tmp_path / "ia", progress=False)
    db, _ = index_dataset(enc, ds, EmbeddingStore(tmp_path / "b"), tmp_path / "ib", progress=False, engine=engine)
    assert da["count"] == db["count"] == N_IMAGES and da["kind"] == db["kind"]


def test_ray_scoring_in_tasks_equals_local_scoring(engine, tmp_path):
    from encoderlab.curate import cosine_scores

    rng = np.random.default_rng(1)
    n, d = 5000, 16
    store = EmbeddingStore(tmp_path / "s")
    ik, tk = [f"i{k}" for k in range(n)], [f"t{k}" for k in range(n)]
    img, txt = store.space("img"), store.space("txt")
    img.put(ik, rng.normal(size=(n, d)).astype(np.float32) * 3)
    txt.put(tk, rng.normal(size=(n, d)).astype(np.float32))
    want = cosine_scores(img, txt, ik, tk, chunk_size=500)
    got = engine.cosine_scores(img, txt, ik, tk, chunk_size=500)  # 5000 > 2 chunks: Ray tasks score it
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_cli_embed_with_engine_ray_writes_the_same_summary_and_skips(pairs_spec, tiny_clip_dir, tmp_path, capsys,
                                                                     engine):
    outs = {}
    for eng in ("local", "ray"):
        rc = main(["embed", "--encoder", f"hf:{tiny_clip_dir}", "--data", pairs_spec, "--store",
                   str(tmp_path / f"store-{eng}"), "--out", str(tmp_path / f"run-{eng}"), "--engine", eng,
                   "--no-progress", "--json", "--device", "cpu"])
        assert rc == 0
        outs[eng] = json.loads(capsys.readouterr().out)
    assert outs["ray"]["engine"]["engine"] == "ray" and outs["local"]["engine"] == {"engine": "local"}
    for k in ("items", "encoded", "cached", "skipped", "split_info"):
        assert outs["ray"][k] == outs["local"][k], k
    skipped = [(tmp_path / f"run-{e}" / "skipped.jsonl").read_text() for e in ("local", "ray")]
    assert skipped[0] == skipped[1] and "corrupt.png" in skipped[0]


def test_ray_options_fail_fast_with_the_fix(tmp_path, capsys):
    rc = main(["embed", "--encoder", "efficientnet-lite0", "--data", "emoji", "--ray-address", "auto", "--json",
               "--store", str(tmp_path / "s")])
    doc = json.loads(capsys.readouterr().out)
    assert rc != 0 and "--engine ray" in doc["error"] + doc["fix"]
    with pytest.raises(EncoderlabError, match="workers must be a positive integer"):
        RayEngine(workers=0)


def test_a_killed_driver_leaves_only_whole_shards_and_the_rerun_encodes_only_what_is_missing(
        engine, pairs_spec, tiny_clip_dir, tmp_path):
    store_dir = tmp_path / "store"
    cmd = [sys.executable, "-m", "encoderlab", "embed", "--encoder", f"hf:{tiny_clip_dir}", "--data", pairs_spec,
           "--modality", "image", "--store", str(store_dir), "--out", str(tmp_path / "run1"), "--engine", "ray",
           "--batch-size", "4", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "ENCODERLAB_COMMIT_SECONDS": "0.001"}  # a shard per batch of 4: 60 of them
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    sidecars: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        sidecars = list(store_dir.glob("*/shards/shard-*.json"))
        if len(sidecars) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started (its local cluster, the actors)
    proc.wait()
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    store = EmbeddingStore(store_dir)
    space = space_for(store, enc, "image")
    # a shard either exists whole or not at all: at most the temp file of the one being written is left, which no
    # reader sees and the next writer removes (its owner is dead)
    problems = space.verify()
    assert all(p["kind"] == "orphan" for p in problems), problems
    committed = len(space)
    assert 0 < committed < N_IMAGES
    from encoderlab.extract.loop import extract_images

    again = extract_images(enc, load_dataset(pairs_spec), store, progress=False, engine=engine)
    assert again.cached == committed and again.encoded == N_IMAGES - committed
    after = space_for(EmbeddingStore(store_dir), enc, "image")
    assert len(after) == N_IMAGES and after.verify() == []


def test_on_several_nodes_the_encoder_actors_hash_the_files(engine, pairs_spec, tiny_clip_dir, tmp_path,
                                                           monkeypatch):
    from encoderlab.extract.loop import _hash_images

    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    paths = list(load_dataset(pairs_spec).table["image"]) + [str(tmp_path / "gone.png")]
    monkeypatch.setitem(engine.info, "nodes", 2)  # what a multi-node cluster reports: hashing leaves the driver
    monkeypatch.setattr("encoderlab.extract.ray_engine.HASH_BLOCK", 50)
    got = engine.hash_images(paths, False, encoder=enc)
    assert got == _hash_images(paths, False)
    assert got[1][-1] == {"path": str(tmp_path / "gone.png"), "reason": "missing"}


def test_the_plan_gives_each_actor_a_gpu_or_a_share_and_one_cpu_each_on_cpus_only(engine, monkeypatch):
    assert engine.plan() == {"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0}  # 2 CPUs, no GPU
    monkeypatch.setitem(engine.info, "gpus", 2)
    monkeypatch.setitem(engine.info, "cpus", 16)
    assert engine.plan() == {"workers": 2, "cpus_per_worker": 8, "gpus_per_worker": 1}
    monkeypatch.setattr(engine, "workers_asked", 4)
    assert engine.plan() == {"workers": 4, "cpus_per_worker": 4, "gpus_per_worker": 0.5}
