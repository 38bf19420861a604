"""FAISS indexes (encoderlab.retrieval) and the `index` / `search` commands: kinds, recall, files, adds, queries."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("faiss", reason="indexes need faiss-cpu (pip install 'encoderlab[index]')")

from encoderlab.cli import main  # noqa: E402
from encoderlab.errors import EncoderlabError  # noqa: E402
from encoderlab.retrieval import (  # noqa: E402
    ArrayVectors,
    StoreVectors,
    build_index,
    choose_plan,
    open_index,
    parse_memory,
    read_meta,
    recall_at_k,
)
from encoderlab.retrieval.build import add_vectors  # noqa: E402
from encoderlab.store import EmbeddingStore  # noqa: E402
from encoderlab.testing import ColorEncoder, color_dataset, color_spec, registered_color_encoder  # noqa: E402


def clustered(n: int, d: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    X = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, d))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def items_for(n: int, prefix: str = "k") -> pd.DataFrame:
    return pd.DataFrame({"id": [f"item{i}" for i in range(n)], "key": [f"{prefix}{i}" for i in range(n)],
                         "label": [f"c{i % 5}" for i in range(n)]})


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory) -> tuple[StoreVectors, np.ndarray]:
    """4,000 clustered 32-d vectors in a real store space, read back through StoreVectors (chunked)."""
    X = clustered(4000)
    space = EmbeddingStore(tmp_path_factory.mktemp("store")).space("synthetic", meta={"spec": "test:synthetic"})
    keys = [f"k{i}" for i in range(len(X))]
    space.put(keys, X)
    return StoreVectors(space, keys), X


def run_json(capsys, argv: list[str]) -> dict:
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def run_fail(capsys, argv: list[str], code: int = 1) -> str:
    got = main(argv)
    _, err = capsys.readouterr()
    assert got == code, err
    return err


# ---------------------------------------------------------------------------------------------------- rule


def test_auto_rule_by_count_and_memory():
    assert choose_plan(10_000, 512).kind == "flat"
    big = choose_plan(1_000_000, 512, memory="4G")
    assert big.kind == "hnsw" and big.params["M"] == 32
    assert choose_plan(1_000_000, 512, memory="2.1G").kind == "ivf-flat"  # HNSW's graph no longer fits
    sq = choose_plan(1_000_000, 512, memory="1G")
    assert sq.kind == "sq8" and sq.params["nlist"] == 4096  # 4*sqrt(1M) = 4000 -> 4096
    pq = choose_plan(10_000_000, 512, memory="4G")
    assert pq.kind == "ivf-pq" and pq.params["refine"] == "none" and pq.estimated_bytes <= 4 << 30
    assert pq.params["m"] == 128 and pq.factory == "IVF16384,PQ128x4fs"
    assert choose_plan(100_000_000, 512, memory="4G").params["m"] == 64  # a smaller code to fit
    with pytest.raises(EncoderlabError, match="raise --memory to at least"):
        choose_plan(100_000_000, 512, memory="100M")
    named = choose_plan(1_000_000, 512, kind="ivf-pq", memory="4G")
    assert named.params["refine"] == "fp16" and named.factory.endswith(",Refine(SQfp16)")
    assert parse_memory("512M") == 512 << 20 and parse_memory("1.5GB") == int(1.5 * 2**30)
    with pytest.raises(EncoderlabError, match="did you mean 'hnsw'"):
        choose_plan(10, 4, kind="hnws")
    with pytest.raises(EncoderlabError, match="cannot read the memory budget"):
        parse_memory("lots")


def test_auto_falls_back_to_ivf_when_hnsw_misses_the_target(monkeypatch, tmp_path):
    from encoderlab.retrieval import kinds, measure

    monkeypatch.setattr(kinds, "FLAT_BELOW", 1000)
    monkeypatch.setattr(kinds, "HNSW_M", 4)  # a sparse graph searched with a short list: recall stays low
    monkeypatch.setattr(measure, "EF_GRID", (4,))
    X = clustered(3000, d=16)
    doc = build_index(ArrayVectors(X), items_for(len(X)), tmp_path / "ix", n_eval=200, n_tune=100,
                      recall_target=0.99)
    fb = doc["choice"]["fallback_from"]
    assert fb["kind"] == "hnsw" and fb["recall_at_10"] < 0.99
    assert doc["kind"] == "ivf-flat" and doc["metrics"]["target_met"] is True


def test_recall_oracle_leaves_the_query_itself_out():
    truth = np.array([[0, 1, 2, 3], [1, 0, 2, 3]])
    found = np.array([[0, 2, 3, 1], [3, 2, 1, 0]])
    # query 0: true others {1,2,3}[:2] = {1,2}; found others [2,3] -> 1/2. query 1: {0,2} vs [3,2] -> 1/2
    assert recall_at_k(found, truth, np.array([0, 1]), k=2) == pytest.approx(0.5)
    assert recall_at_k(truth, truth, np.array([0, 1]), k=3) == 1.0
    assert recall_at_k(found[:0], truth[:0], np.array([], dtype=np.int64)) is None


# ---------------------------------------------------------------------------------------------------- build


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf-flat", "sq8", "ivf-pq"])
def test_every_kind_builds_measures_and_reaches_the_target(kind, synthetic_store, tmp_path):
    source, X = synthetic_store
    doc = build_index(source, items_for(len(X)), tmp_path / kind, kind=kind, n_eval=400, n_tune=200,
                      recall_target=0.95)
    m = doc["metrics"]
    assert doc["kind"] == kind and doc["count"] == len(X)
    assert m["queries"] == 400 and m["tuning_queries"] == 200
    assert m["recall_at_10"] >= 0.95 and m["target_met"] is True, (doc["search"], doc["tuning"])
    assert m["qps"] > 0 and m["bytes_per_vector"] > 0 and m["build_seconds"] >= 0
    if kind == "flat":
        assert m["recall_at_10"] == 1.0 and doc["search"] == {}
    else:
        assert doc["tuning"] and set(doc["search"]) <= {"efSearch", "nprobe", "k_factor"}
    if kind in ("ivf-flat", "sq8", "ivf-pq"):
        assert doc["params"]["nlist"] >= 2 and m["train_seconds"] > 0
    assert {p.name for p in (tmp_path / kind).iterdir()} == {"index.faiss", "items.parquet", "index.json"}
    index = open_index(tmp_path / kind)  # memory-mapped
    hits = index.search_vectors(X[7], 10)
    assert index.mmapped and hits.columns()["id"][0] == "item7" and len(hits) == 10


def test_build_streams_the_vectors_in_chunks(tmp_path):
    class Counted(ArrayVectors):
        reads: list[int] = []
        takes: list[int] = []

        def read(self, start, stop):
            self.reads.append(stop - start)
            return super().read(start, stop)

        def take(self, rows):
            self.takes.append(len(rows))
            return super().take(rows)

    X = clustered(6000)
    source = Counted(X)
    doc = build_index(source, items_for(len(X)), tmp_path / "ix", kind="ivf-flat", chunk=512, n_eval=200, n_tune=100)
    assert max(source.reads) == 512 and sum(source.reads) >= 2 * len(X)  # added, then streamed for exact search
    assert max(source.takes) <= 40 * doc["params"]["nlist"] < len(X)  # the training sample and the query samples


def test_flat_equals_brute_force_numpy(synthetic_store, tmp_path):
    source, X = synthetic_store
    build_index(source, items_for(len(X)), tmp_path / "flat", kind="flat", n_eval=50, n_tune=10)
    index = open_index(tmp_path / "flat")
    Q = clustered(5, seed=3)
    scores, rows = index.search_batch(Q, 25)
    S = Q @ X.T
    want = np.argsort(-S, axis=1, kind="stable")[:, :25]
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(scores, np.take_along_axis(S, want, 1), rtol=1e-5, atol=1e-5)


def test_metadata_round_trips_and_mmap_matches_a_full_load(synthetic_store, tmp_path):
    source, X = synthetic_store
    meta = {"modality": "vector", "data": {"source": "synthetic"}}
    doc = build_index(source, items_for(len(X)), tmp_path / "ix", kind="hnsw", meta=meta, n_eval=100, n_tune=50)
    on_disk = read_meta(tmp_path / "ix")
    assert on_disk == json.loads(json.dumps(doc)) and on_disk["data"] == {"source": "synthetic"}
    assert on_disk["params"]["efSearch"] == on_disk["search"]["efSearch"]
    mapped, whole = open_index(tmp_path / "ix"), open_index(tmp_path / "ix", mmap=False)
    assert mapped.info()["count"] == len(X) and mapped.info()["kind"] == "hnsw"
    Q = clustered(20, seed=4)
    np.testing.assert_array_equal(mapped.search_batch(Q, 10)[1], whole.search_batch(Q, 10)[1])
    items = mapped.items
    assert items.names[:8] == ["id", "key", "modality", "image", "text", "captions", "label", "split"]
    assert items.column("label")[:3].tolist() == ["c0", "c1", "c2"]
    with pytest.raises(EncoderlabError, match="already holds an index"):
        build_index(source, items_for(len(X)), tmp_path / "ix", kind="flat")


OPEN_AND_MEASURE = """
import sys
from encoderlab.retrieval import open_index

def anon():
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("RssAnon:"))

index = open_index(sys.argv[1], mmap=False)  # warm-up: imports, Arrow pools, the items table
del index
before = anon()
index = open_index(sys.argv[1], mmap=sys.argv[2] == "1", gpu=False)
scores, rows = index.search_batch(index.vector_of(5), 10)
print(anon() - before, int(rows[0][0]))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
def test_mmap_load_keeps_the_index_out_of_private_memory(tmp_path):
    import subprocess

    X = np.random.default_rng(0).standard_normal((60_000, 128)).astype(np.float32)
    doc = build_index(ArrayVectors(X), items_for(len(X)), tmp_path / "ix", kind="flat", n_eval=20, n_tune=10)
    size = doc["metrics"]["index_bytes"]
    grown = {}
    for mmap in ("1", "0"):  # a fresh process each: freed memory is not returned to the system in-process
        out = subprocess.run([sys.executable, "-c", OPEN_AND_MEASURE, str(tmp_path / "ix"), mmap], check=True,
                             capture_output=True, text=True).stdout.split()
        grown[mmap] = int(out[0])
        assert out[1] == "5"
    assert grown["1"] < 0.25 * size and grown["0"] > 0.9 * size, (grown, size)


def test_add_vectors_appends_to_every_kind_and_search_finds_them(tmp_path):
    X, new = clustered(1500), clustered(300, seed=9)
    for kind in ("flat", "hnsw", "ivf-pq"):
        build_index(ArrayVectors(X), items_for(len(X)), tmp_path / kind, kind=kind, n_eval=50, n_tune=20)
        doc = add_vectors(tmp_path / kind, ArrayVectors(new), items_for(300, prefix="new").assign(
            id=[f"new{i}" for i in range(300)]), note={"data": "more"})
        assert doc["count"] == len(X) + 300 and doc["adds"][-1]["added"] == 300
        index = open_index(tmp_path / kind)
        assert len(index) == len(X) + 300 and index.search_vectors(new[42], 3).columns()["id"][0] == "new42"


def test_allowed_rows_restrict_the_results(synthetic_store, tmp_path):
    source, X = synthetic_store
    build_index(source, items_for(len(X)), tmp_path / "ix", kind="ivf-flat", n_eval=100, n_tune=50)
    index = open_index(tmp_path / "ix")
    allowed = index.items.rows_where(label="c3")
    hits = index.search_vectors(X[0], 50, allowed=allowed)
    assert len(hits) == 50 and set(hits.columns()["label"]) == {"c3"}


def test_large_k_is_vectorised(tmp_path):
    X = clustered(20_000)
    build_index(ArrayVectors(X), items_for(len(X)), tmp_path / "ix", kind="flat", n_eval=50, n_tune=10)
    index = open_index(tmp_path / "ix")

    def timed(k: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        hits = index.search_vectors(X[1], k)
        json.dumps(hits.columns())
        return time.perf_counter() - t0, len(hits)

    timed(10)
    small = min(timed(10)[0] for _ in range(3))
    big, count = min(timed(10_000) for _ in range(3))
    assert count == 10_000
    assert big < 0.5, big  # per-result Python work would show up here (and as a large ratio to k=10)
    assert big < 100 * small + 0.1, (big, small)


def test_ivf_returns_k_results_for_a_large_k(synthetic_store, tmp_path):
    source, X = synthetic_store
    build_index(source, items_for(len(X)), tmp_path / "ix", kind="ivf-flat", n_eval=100, n_tune=50)
    hits = open_index(tmp_path / "ix").search_vectors(X[0], 3000)  # far more than nprobe lists hold
    assert len(hits) == 3000 and len(set(hits.rows.tolist())) == 3000


def test_missing_faiss_says_how_to_install(monkeypatch):
    from encoderlab.retrieval import backend

    monkeypatch.setattr(backend, "_faiss", None)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(EncoderlabError, match=r"pip install 'encoderlab\[index\]'"):
        backend.require_faiss()


def test_gpu_is_used_only_when_faiss_sees_one(synthetic_store, tmp_path):
    from encoderlab.retrieval.backend import gpu_count, to_gpu_if_available

    if gpu_count() == 0:
        marker = object()
        assert to_gpu_if_available(marker) is marker  # faiss-cpu: the CPU index, untouched
        return
    source, X = synthetic_store
    build_index(source, items_for(len(X)), tmp_path / "ix", kind="flat", n_eval=20, n_tune=10)
    assert open_index(tmp_path / "ix").search_vectors(X[3], 5).columns()["id"][0] == "item3"


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def colors(tmp_path):
    with registered_color_encoder():
        yield color_spec(color_dataset(tmp_path / "colors")), tmp_path


def test_cli_build_info_and_search_text_image_like(capsys, colors):
    spec, tmp = colors
    store = ["--store", str(tmp / "store")]
    built = run_json(capsys, ["index", "build", "--encoder", "test-color", "--data", spec, "--out",
                              str(tmp / "ix"), *store, "--kind", "flat"])
    assert built["count"] == 36 and built["modality"] == "image" and built["metrics"]["recall_at_10"] == 1.0
    assert built["encoder"]["spec"] == "test-color" and built["encoder"]["fingerprint"] == ColorEncoder(
    ).fingerprint("image")
    info = run_json(capsys, ["index", "info", "--index", str(tmp / "ix")])
    assert info["metrics"] == built["metrics"] and info["data"]["indexed"] == 36
    assert main(["index", "info", "--index", str(tmp / "ix")]) == 0
    assert "recall@10" in capsys.readouterr().out
    text = run_json(capsys, ["search", "--index", str(tmp / "ix"), "--text", "something red", "--k", "5"])
    assert text["count"] == 5 and set(text["results"]["label"]) == {"red_thing"}
    assert text["results"]["rank"] == [1, 2, 3, 4, 5] and text["results"]["score"] == sorted(
        text["results"]["score"], reverse=True)
    image = run_json(capsys, ["search", "--index", str(tmp / "ix"), "--image", str(tmp / "colors" / "blue_3.png")])
    assert image["results"]["id"][0] == "blue_3.png" and set(image["results"]["label"]) == {"blue_thing"}
    like = run_json(capsys, ["search", "--index", str(tmp / "ix"), "--like", "green_2.png", "--k", "3",
                             "--label", "green_thing"])
    assert like["results"]["id"][0] == "green_2.png" and like["results"]["score"][0] == pytest.approx(1.0)
    assert main(["search", "--index", str(tmp / "ix"), "--text", "red"]) == 0
    assert "red_thing" in capsys.readouterr().out


def test_cli_image_to_text_on_a_caption_index(capsys, colors):
    spec, tmp = colors
    built = run_json(capsys, ["index", "build", "--encoder", "test-color", "--data", spec, "--modality", "text",
                              "--out", str(tmp / "ixt"), "--store", str(tmp / "store")])
    # 36 numbered captions + the one shared by every image (indexed once)
    assert built["count"] == 37 and built["data"]["duplicates"] == 35
    hits = run_json(capsys, ["search", "--index", str(tmp / "ixt"), "--image", str(tmp / "colors" / "green_1.png"),
                             "--k", "3"])
    assert all("green" in t for t in hits["results"]["text"]) and hits["modality"] == "text"


def test_cli_add_appends_skips_present_and_search_finds_new(capsys, colors):
    spec, tmp = colors
    store = ["--store", str(tmp / "store")]
    run_json(capsys, ["index", "build", "--encoder", "test-color", "--data", spec, "--split-ratios",
                      "train=0.5,test=0.5", "--split", "train", "--out", str(tmp / "ix"), *store])
    first = read_meta(tmp / "ix")["count"]
    added = run_json(capsys, ["index", "add", "--index", str(tmp / "ix"), "--data", spec, *store])
    assert added["added"] == 36 - first and added["already_present"] == first and added["count"] == 36
    again = run_json(capsys, ["index", "add", "--index", str(tmp / "ix"), "--data", spec, *store])
    assert (again["added"], again["already_present"], again["count"]) == (0, 36, 36)
    ids = set(pd.read_parquet(tmp / "ix" / "items.parquet")["id"])
    assert len(ids) == 36
    doc = read_meta(tmp / "ix")
    assert doc["adds"][0]["added"] == 36 - first
    main(["index", "add", "--index", str(tmp / "ix"), "--data", spec, *store])
    assert "skipped 36 already in the index" in capsys.readouterr().out


def test_another_encoders_fingerprint_is_refused(capsys, colors):
    from encoderlab.encoders.base import EncoderInfo
    from encoderlab.encoders.registry import register_encoder, unregister_encoder

    class OtherColor(ColorEncoder):
        def fingerprint_parts(self) -> dict:
            return {"kind": "other-color", "version": 2}

    spec, tmp = colors
    run_json(capsys, ["index", "build", "--encoder", "test-color", "--data", spec, "--out", str(tmp / "ix"),
                      "--store", str(tmp / "store")])
    register_encoder(EncoderInfo("test-color-v2", ("image", "text"), "another mock"),
                     lambda target, device, precision: OtherColor(device, precision))
    try:
        err = run_fail(capsys, ["search", "--index", str(tmp / "ix"), "--text", "red", "--encoder", "test-color-v2"])
        assert "test-color-v2" in err and "'test-color'" in err and "fingerprint" in err and "rebuild" in err
        err = run_fail(capsys, ["index", "add", "--index", str(tmp / "ix"), "--data", spec, "--encoder",
                                "test-color-v2", "--store", str(tmp / "store")])
        assert "test-color-v2" in err and "'test-color'" in err
    finally:
        unregister_encoder("test-color-v2")
    index = open_index(tmp / "ix")
    with pytest.raises(EncoderlabError, match="other-color|fingerprint"):
        index.use_encoder(OtherColor())


def test_bad_query_image_and_bad_k_fail_clearly(capsys, colors):
    spec, tmp = colors
    run_json(capsys, ["index", "build", "--encoder", "test-color", "--data", spec, "--out", str(tmp / "ix"),
                      "--store", str(tmp / "store")])
    bad = tmp / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    err = run_fail(capsys, ["search", "--index", str(tmp / "ix"), "--image", str(bad)])
    assert str(bad) in err and "Traceback" not in err
    assert any(reason in err for reason in ("truncated", "corrupt", "not-an-image"))
    err = run_fail(capsys, ["search", "--index", str(tmp / "ix"), "--image", str(tmp / "nope.png")])
    assert "nope.png" in err and "missing" in err
    for k in ("0", "-3", "ten"):
        err = run_fail(capsys, ["search", "--index", str(tmp / "ix"), "--text", "red", "--k", k], code=2)
        assert "--k" in err and k in err
    err = run_fail(capsys, ["search", "--index", str(tmp / "nowhere"), "--text", "red"])
    assert "does not exist" in err and "index build" in err
    err = run_fail(capsys, ["search", "--index", str(tmp / "ix"), "--like", "no-such-id"])
    assert "no-such-id" in err


def test_search_with_a_tiny_hf_dual_encoder(capsys, tmp_path, tiny_clip_dir):
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        rows.append({"image": str(path), "text": f"a photo of a cat number {i}", "label": f"c{i % 2}"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"jsonl:{tmp_path / 'pairs.jsonl'}"
    enc = f"hf:{tiny_clip_dir}"
    common = ["--store", str(tmp_path / "store"), "--device", "cpu"]
    built = run_json(capsys, ["index", "build", "--encoder", enc, "--data", spec, "--out", str(tmp_path / "ix"),
                              *common])
    assert built["count"] == 12 and built["encoder"]["precision"] == "fp32"
    text = run_json(capsys, ["search", "--index", str(tmp_path / "ix"), "--text", "a photo of a dog", "--k", "4",
                             "--device", "cpu"])
    image = run_json(capsys, ["search", "--index", str(tmp_path / "ix"), "--image", rows[5]["image"], "--k", "4",
                              "--device", "cpu"])
    like = run_json(capsys, ["search", "--index", str(tmp_path / "ix"), "--like", image["results"]["id"][0],
                             "--k", "4"])
    assert text["count"] == image["count"] == like["count"] == 4
    assert image["results"]["image"][0] == rows[5]["image"]
    assert image["results"]["score"][0] == pytest.approx(1, abs=1e-4)
    assert like["results"]["row"] == image["results"]["row"]
