"""EmbeddingStore: round trips against a dict oracle, crash recovery, corruption, concurrency."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import encoderlab.store.key_index as index_mod
import encoderlab.store.space as space_mod
from encoderlab.errors import CorruptStoreError, EncoderlabError
from encoderlab.store import EmbeddingSpace, EmbeddingStore, MissingEmbeddingsError, ShardRecord
from encoderlab.store import shards as shards_mod
from encoderlab.store.key_index import KeyIndex, encode_query

SRC = str(Path(__file__).resolve().parents[1] / "src")
DIM = 6

# Deterministic embedding of a key, reproducible in a subprocess (the same code is sent there).
EMB_CODE = """
import hashlib
import numpy as np

def emb(keys, dim, salt=""):
    out = np.empty((len(keys), dim), dtype=np.float32)
    for i, k in enumerate(keys):
        seed = int(hashlib.blake2b((salt + k).encode(), digest_size=8).hexdigest(), 16)
        out[i] = np.random.default_rng(seed).standard_normal(dim)
    return out
"""
exec(EMB_CODE)


def ckeys(prefix: str, n: int, start: int = 0) -> list[str]:
    """Content-style keys ("i" + 32 hex)."""
    digest = lambda i: hashlib.blake2b(f"{prefix}{i}".encode(), digest_size=16).hexdigest()  # noqa: E731
    return [prefix + digest(i) for i in range(start, start + n)]


def new_space(tmp_path: Path, fp: str = "f00d", meta: dict | None = None) -> EmbeddingSpace:
    return EmbeddingStore(tmp_path / "store").space(fp, meta)


def reopen(space: EmbeddingSpace) -> EmbeddingSpace:
    """The same space as a fresh process would see it (no in-memory index)."""
    return EmbeddingStore(space.path.parent).space(space.fingerprint)


def shard_files(space: EmbeddingSpace) -> list[Path]:
    return sorted(space.shards_dir.glob("shard-*.npy"))


def sidecars(space: EmbeddingSpace) -> list[Path]:
    return sorted(space.shards_dir.glob("shard-*.json"), key=lambda p: shards_mod.shard_seq(p.stem))


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------------------- basics


def test_round_trip_aligned_to_request_order_with_repeats(tmp_path):
    sp = new_space(tmp_path)
    keys = ckeys("i", 100)
    x = emb(keys, DIM)
    with sp.writer(shard_size=16) as w:
        w.add(keys[:40], x[:40])
        w.add(keys[40:], x[40:])
    assert len(sp) == 100 and sp.dim == DIM and sp.keys() == keys
    rng = np.random.default_rng(0)
    req = rng.integers(0, 100, 300)
    got = sp.get([keys[i] for i in req])
    assert got.dtype == np.float32 and got.shape == (300, DIM)
    np.testing.assert_array_equal(got, x[req])
    assert sp.get([]).shape == (0, DIM)
    assert keys[5] in sp and "t" + "0" * 32 not in sp and 5 not in sp


def test_get_returns_an_owned_writable_copy(tmp_path):
    sp = new_space(tmp_path)
    keys = ckeys("i", 20)
    sp.put(keys, emb(keys, DIM))
    got = sp.get([keys[3], keys[1]])
    assert isinstance(got, np.ndarray) and got.flags.writeable and got.flags.c_contiguous
    got[:] = 0
    np.testing.assert_array_equal(sp.get([keys[3]]), emb([keys[3]], DIM))


def test_missing_is_ordered_unique_and_exact(tmp_path):
    sp = new_space(tmp_path)
    have = ckeys("i", 10)
    sp.put(have, emb(have, DIM))
    new = ckeys("t", 3)
    req = [new[2], have[0], new[0], new[2], have[9], new[1], new[0]]
    assert sp.missing(req) == [new[2], new[0], new[1]]
    assert sp.missing(have) == []
    assert sp.missing([]) == []
    sp.put(["plain", "naïve"], np.ones((2, DIM)))
    assert sp.missing(["plain\x00", "naïve", "plain"]) == ["plain\x00"]  # bytes arrays drop trailing NULs
    with pytest.raises(MissingEmbeddingsError) as e:
        sp.get([have[0], new[1], new[1], new[2]])
    assert isinstance(e.value, KeyError) and isinstance(e.value, EncoderlabError)
    assert "2 of 4 requested keys" in str(e.value) and new[1] in str(e.value)
    assert e.value.missing_keys == [new[1], new[2]]


def test_content_keys_shared_across_datasets_are_encoded_once(tmp_path):
    sp = new_space(tmp_path)
    shared = ckeys("i", 5)
    dataset_a = shared + ckeys("i", 5, start=100)
    dataset_b = ckeys("i", 4, start=200) + shared  # the same images, other file names
    sp.put(dataset_a, emb(dataset_a, DIM))
    todo = sp.missing(dataset_b)
    assert todo == dataset_b[:4]
    written = sp.put(todo, emb(todo, DIM))
    assert written == 4
    np.testing.assert_array_equal(sp.get(dataset_b), emb(dataset_b, DIM))
    rows = sum(json.loads(p.read_text())["rows"] for p in sidecars(sp))
    assert rows == len(set(dataset_a) | set(dataset_b)) == len(sp)
    # writing a key again is a no-op: content keys name the same embedding
    assert sp.put(shared, emb(shared, DIM, salt="other")) == 0
    np.testing.assert_array_equal(sp.get(shared), emb(shared, DIM))


def test_writer_commits_every_shard_size_rows(tmp_path):
    sp = new_space(tmp_path)
    keys = ckeys("i", 35)
    x = emb(keys, DIM)
    with sp.writer(shard_size=10) as w:
        for lo in range(0, 35, 7):
            w.add(keys[lo : lo + 7], x[lo : lo + 7])
        assert len(sidecars(sp)) == 3 and w.pending == 5
        assert len(reopen(sp)) == 30  # committed shards are visible to other readers already
    assert [json.loads(p.read_text())["rows"] for p in sidecars(sp)] == [10, 10, 10, 5]
    assert w.rows_written == 35 and len(w.shards_written) == 4
    np.testing.assert_array_equal(reopen(sp).get(keys), x)


def test_writer_keeps_computed_rows_when_the_block_raises(tmp_path):
    sp = new_space(tmp_path)
    keys = ckeys("i", 8)
    with pytest.raises(RuntimeError, match="decode failed"):
        with sp.writer(shard_size=100) as w:
            w.add(keys, emb(keys, DIM))
            raise RuntimeError("decode failed")
    assert reopen(sp).missing(keys) == []


def test_duplicates_within_a_batch_keep_the_first_row(tmp_path):
    sp = new_space(tmp_path)
    k = ckeys("i", 3)
    x = emb(k + [k[0]], DIM, salt="dup")
    assert sp.put(k + [k[0]], x) == 3
    np.testing.assert_array_equal(sp.get([k[0]]), x[:1])


def test_float16_shards_read_back_as_float32(tmp_path):
    sp = new_space(tmp_path)
    keys = ckeys("i", 50)
    x = emb(keys, DIM)
    sp.put(keys, x, dtype="float16")
    got = reopen(sp).get(keys[::-1])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, x[::-1], atol=2e-3, rtol=2e-3)
    assert json.loads(sidecars(sp)[0].read_text())["dtype"] == "float16"


def test_bad_input_is_refused_with_the_value(tmp_path):
    sp = new_space(tmp_path)
    k = ckeys("i", 4)
    sp.put(k, emb(k, DIM))
    with pytest.raises(EncoderlabError, match=f"embedding dim 3 does not match dim {DIM}"):
        sp.put(ckeys("t", 2), np.zeros((2, 3)))
    with pytest.raises(EncoderlabError, match="2 keys but 3 embedding rows"):
        sp.put(ckeys("t", 2), np.zeros((3, DIM)))
    with pytest.raises(EncoderlabError, match="2-D"):
        sp.put(ckeys("t", 2), np.zeros(DIM))
    with pytest.raises(EncoderlabError, match="NaN or inf"):
        sp.put(ckeys("t", 2), np.full((2, DIM), np.nan))
    with pytest.raises(EncoderlabError, match="invalid embedding key"):
        sp.put(["a\nb"], np.zeros((1, DIM)))
    with pytest.raises(EncoderlabError, match="must be strings"):
        sp.get([1, 2])
    with pytest.raises(EncoderlabError, match="single str"):
        sp.missing("iabc")
    with pytest.raises(EncoderlabError, match="invalid encoder fingerprint"):
        EmbeddingStore(tmp_path / "s").space("../escape")
    with pytest.raises(EncoderlabError, match="dtype"):
        sp.writer(dtype="int8")
    with pytest.raises(EncoderlabError, match="overflow float16"):
        sp.put(ckeys("t", 1), np.full((1, DIM), 1e6), dtype="float16")
    assert len(reopen(sp)) == 4


def test_meta_dim_is_enforced_before_the_first_write(tmp_path):
    sp = new_space(tmp_path, meta={"spec": "hf:tiny", "dim": 8, "modality": "image"})
    assert sp.dim == 8
    with pytest.raises(EncoderlabError, match="embedding dim 4 does not match dim 8"):
        sp.put(["ia"], np.zeros((1, 4)))


def test_space_meta_is_written_once_and_spaces_are_listed(tmp_path):
    store = EmbeddingStore(tmp_path / "store")
    a = store.space("aa11", {"spec": "hf:one", "dim": DIM})
    store.space("aa11", {"spec": "something else"})
    assert reopen(a).meta == {"spec": "hf:one", "dim": DIM}
    b = store.space("bb22", {"spec": "hf:two"})
    ka, kb = ckeys("i", 7), ckeys("t", 3)
    a.put(ka, emb(ka, DIM))
    b.put(kb, emb(kb, 4))
    listed = {s["fingerprint"]: s for s in EmbeddingStore(tmp_path / "store").spaces()}
    assert listed["aa11"]["items"] == 7 and listed["bb22"]["items"] == 3 and listed["bb22"]["dim"] == 4
    assert listed["aa11"]["meta"]["spec"] == "hf:one"
    stats = EmbeddingStore(tmp_path / "store").stats()
    assert stats["spaces"] == 2 and stats["items"] == 10 and stats["shards"] == 2 and stats["bytes"] > 0


# ----------------------------------------------------------------------------------- crash recovery

CRASH_CODE = EMB_CODE + """
import os, signal, sys
from encoderlab.store import EmbeddingStore, shards

def kill_at(n, step):
    real_npy, real_sidecar = shards._write_npy, shards._write_sidecar
    calls = []
    def write_npy(path, data):
        if step == "npy" and len(calls) + 1 == n:  # die half way through the temp file
            from encoderlab.atomic import atomic_open
            with atomic_open(path, "wb") as f:
                f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        real_npy(path, data)
    def write_sidecar(path, obj):
        calls.append(path)
        if step == "sidecar" and len(calls) == n:  # .npy renamed into place, sidecar never written
            os.kill(os.getpid(), signal.SIGKILL)
        real_sidecar(path, obj)
    shards._write_npy, shards._write_sidecar = write_npy, write_sidecar

root, fp, step, keys = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
kill_at(3, step)
space = EmbeddingStore(root).space(fp)
with space.writer(shard_size=10) as w:
    for lo in range(0, len(keys), 4):
        w.add(keys[lo : lo + 4], emb(keys[lo : lo + 4], 6))
"""


@pytest.mark.parametrize("step", ["sidecar", "npy"])
def test_resume_after_kill_9_keeps_committed_shards_and_recomputes_the_rest(tmp_path, step):
    sp = new_space(tmp_path)
    keys = ckeys("i", 45)
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_CODE, str(sp.path.parent), sp.fingerprint, step, ",".join(keys)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p.name for p in sp.shards_dir.iterdir() if not p.name.endswith(".json")]
    if step == "sidecar":
        assert len(shard_files(sp)) == 3 and len(sidecars(sp)) == 2  # one orphan .npy
    else:
        assert any(n.endswith(".tmp") for n in leftovers) and len(shard_files(sp)) == 2

    sp = reopen(sp)
    assert len(sp) == 20
    assert sp.missing(keys) == keys[20:]  # exactly the uncommitted keys
    np.testing.assert_array_equal(sp.get(keys[:20]), emb(keys[:20], DIM))
    problems = sp.verify()
    assert problems and all(p["kind"] == "orphan" for p in problems)

    with sp.writer(shard_size=10) as w:
        todo = sp.missing(keys)
        w.add(todo, emb(todo, DIM))
    assert w.rows_written == 25
    fresh = reopen(sp)
    np.testing.assert_array_equal(fresh.get(keys), emb(keys, DIM))
    assert fresh.verify() == []  # the dead writer's leftovers were cleaned up by the next write
    assert not [p for p in sp.shards_dir.iterdir() if p.name.endswith(".tmp")]


def test_orphans_of_a_live_writer_are_kept(tmp_path):
    sp = new_space(tmp_path)
    k = ckeys("i", 3)
    sp.put(k, emb(k, DIM))
    mine = sp.shards_dir / (shards_mod.new_shard_name(99) + ".npy")  # this (live) process's name
    mine.write_bytes(b"in flight")
    assert sp.clean_orphans() == [] and mine.exists()
    assert [p["problem"] for p in sp.verify()] == ["orphan-npy"]
    old = 10 * shards_mod.ORPHAN_GRACE_S
    os.utime(mine, (mine.stat().st_atime - old, mine.stat().st_mtime - old))
    assert sp.clean_orphans() == [str(mine)]


# ------------------------------------------------------------------------------------------ integrity


def _two_shard_space(tmp_path: Path) -> tuple[EmbeddingSpace, list[str], Path]:
    sp = new_space(tmp_path)
    keys = ckeys("i", 20)
    sp.put(keys[:10], emb(keys[:10], DIM))
    sp.put(keys[10:], emb(keys[10:], DIM))
    return sp, keys, sidecars(sp)[1]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda npy: npy.write_bytes(npy.read_bytes()[:-12]), "size-mismatch"),
        (_flip_byte, "checksum-mismatch"),
        (lambda npy: npy.unlink(), "missing-npy"),
        (lambda npy: npy.write_bytes(npy.read_bytes()[:20] + b"X" * (npy.stat().st_size - 20)), "bad-header"),
    ],
    ids=["truncated", "flipped-byte", "deleted-npy", "bad-header"],
)
def test_corrupt_shard_is_refused_then_repaired(tmp_path, damage, problem):
    sp, keys, bad_sidecar = _two_shard_space(tmp_path)
    npy = bad_sidecar.with_suffix(".npy")
    damage(npy)
    sp = reopen(sp)
    np.testing.assert_array_equal(sp.get(keys[:10]), emb(keys[:10], DIM))  # the healthy shard still reads
    with pytest.raises(CorruptStoreError) as e:
        sp.get([keys[0], keys[15]])
    assert npy.name in str(e.value) and "repair" in str(e.value)
    assert [(p["problem"], Path(p["path"]).name) for p in sp.verify()] == [(problem, npy.name)]

    removed = sp.repair()
    assert [r["problem"] for r in removed] == [problem] and str(bad_sidecar) in removed[0]["removed"]
    assert sp.missing(keys) == keys[10:]
    sp.put(keys[10:], emb(keys[10:], DIM))
    np.testing.assert_array_equal(reopen(sp).get(keys), emb(keys, DIM))
    assert reopen(sp).verify() == []


def test_invalid_sidecar_is_reported_by_name(tmp_path):
    sp, keys, bad_sidecar = _two_shard_space(tmp_path)
    bad_sidecar.write_text('{"rows": 10, "keys": ')
    sp = reopen(sp)
    with pytest.raises(CorruptStoreError, match=bad_sidecar.name):
        sp.missing(keys)
    with pytest.raises(CorruptStoreError, match="repair"):
        len(sp)
    problems = sp.verify(deep=False)
    assert [(p["problem"], Path(p["path"]).name) for p in problems] == [("invalid-sidecar", bad_sidecar.name)]
    listed = EmbeddingStore(sp.path.parent).spaces()
    assert listed[0]["items"] is None and bad_sidecar.name in listed[0]["problem"]
    sp.repair()
    assert sp.missing(keys) == keys[10:] and not bad_sidecar.with_suffix(".npy").exists()


def test_wrong_key_count_in_sidecar_is_invalid(tmp_path):
    sp, keys, bad_sidecar = _two_shard_space(tmp_path)
    obj = json.loads(bad_sidecar.read_text())
    obj["keys"] = "\n".join(obj["keys"].split("\n")[:-1])
    bad_sidecar.write_text(json.dumps(obj))
    assert [p["problem"] for p in reopen(sp).verify()] == ["invalid-sidecar"]


def test_a_verified_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    sp, keys, _ = _two_shard_space(tmp_path)
    calls = []
    real = shards_mod.file_checksum
    monkeypatch.setattr(shards_mod, "file_checksum", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(space_mod, "OPEN_SHARDS", 1)  # force re-opening the maps
    sp = reopen(sp)
    for _ in range(3):
        sp.get(keys[::3])
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------ concurrency


def _concurrent_writer(root: str, fp: str, keys: list[str], salt: str, barrier) -> None:
    from encoderlab.store import EmbeddingStore as Store

    space = Store(root).space(fp)
    barrier.wait()
    with space.writer(shard_size=7) as w:
        for lo in range(0, len(keys), 5):
            w.add(keys[lo : lo + 5], emb(keys[lo : lo + 5], DIM, salt=salt))


def test_two_processes_writing_at_once_both_commit(tmp_path):
    sp = new_space(tmp_path)
    a, b, both = ckeys("i", 120), ckeys("t", 120), ckeys("i", 40, start=500)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_concurrent_writer, args=(str(sp.path.parent), sp.fingerprint, a + both, "A", barrier)),
        ctx.Process(target=_concurrent_writer, args=(str(sp.path.parent), sp.fingerprint, both + b, "B", barrier)),
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    sp.refresh()
    assert len(sp) == 280 and sp.missing(a + b + both) == []
    np.testing.assert_array_equal(sp.get(a), emb(a, DIM, salt="A"))
    np.testing.assert_array_equal(sp.get(b), emb(b, DIM, salt="B"))
    got = sp.get(both)  # written by both: one copy wins, the same one in every process
    from_a, from_b = emb(both, DIM, salt="A"), emb(both, DIM, salt="B")
    assert all((g == x).all() or (g == y).all() for g, x, y in zip(got, from_a, from_b))
    np.testing.assert_array_equal(reopen(sp).get(both), got)
    assert sp.verify() == []


def test_reader_sees_shards_committed_later_after_refresh(tmp_path):
    writer_side = new_space(tmp_path)
    k1, k2 = ckeys("i", 5), ckeys("i", 5, start=5)
    writer_side.put(k1, emb(k1, DIM))
    reader = reopen(writer_side)
    assert len(reader) == 5
    writer_side.put(k2, emb(k2, DIM))
    assert reader.missing(k2) == k2
    reader.refresh()
    np.testing.assert_array_equal(reader.get(k2 + k1), emb(k2 + k1, DIM))


def test_a_late_shard_that_sorts_first_wins_in_every_process():
    def rec(name: str, n: int) -> ShardRecord:
        return ShardRecord(name, n, 2, "float32", 128, "sha256:0")

    late = shards_mod.new_shard_name(3)
    early = shards_mod.new_shard_name(5)
    idx = KeyIndex().added([rec(early, 2)], [np.array([b"a", b"b"])])
    idx = idx.added([rec(late, 2)], [np.array([b"c", b"a"])])  # committed later, sorts first
    shard, row = idx.lookup(encode_query(["a", "b", "c"]))
    assert [idx.shards[s].name for s in shard] == [late, early, late] and row.tolist() == [1, 1, 0]
    assert len(idx) == 3 and idx.keys_in_order() == ["c", "a", "b"]


# ---------------------------------------------------------------------------- oracle, index, scaling


@pytest.mark.parametrize("collide", [False, True], ids=["hash", "all-collisions"])
def test_get_matches_a_dict_oracle(tmp_path, monkeypatch, collide):
    if collide:  # every key in one of 3 hash buckets: the full-key comparison must still find the right row
        real = index_mod.key_hash
        monkeypatch.setattr(index_mod, "key_hash", lambda k: real(k) % np.uint64(3))
    monkeypatch.setattr(space_mod, "PERSIST_MIN_ROWS", 150)  # exercise the on-disk index cache too
    rng = np.random.default_rng(1)
    universe = ckeys("i", 300) + ckeys("t", 100) + ["short", "a much longer key with spaces and é"]
    sp = new_space(tmp_path)
    oracle: dict[str, np.ndarray] = {}
    for round_ in range(8):
        batch = [universe[i] for i in rng.integers(0, len(universe), rng.integers(1, 90))]
        x = rng.standard_normal((len(batch), DIM)).astype(np.float32)
        with sp.writer(shard_size=int(rng.integers(5, 40))) as w:
            for lo in range(0, len(batch), 13):
                w.add(batch[lo : lo + 13], x[lo : lo + 13])
        for k, row in zip(batch, x):
            oracle.setdefault(k, row)  # first write wins; later writes of a key are skipped
        view = sp if round_ % 2 else reopen(sp)
        req = [universe[i] for i in rng.integers(0, len(universe), 200)]
        assert view.missing(req) == list(dict.fromkeys(k for k in req if k not in oracle))
        present = [k for k in req if k in oracle]
        np.testing.assert_array_equal(view.get(present), np.array([oracle[k] for k in present]).reshape(-1, DIM))
        assert len(view) == len(oracle) and set(view.keys()) == set(oracle)
    assert (sp.index_dir / "index.json").exists()


def test_index_cache_is_used_and_dropped_when_a_shard_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(space_mod, "PERSIST_MIN_ROWS", 10)
    sp = new_space(tmp_path)
    keys = ckeys("i", 60)
    with sp.writer(shard_size=20) as w:
        w.add(keys, emb(keys, DIM))
    cached = json.loads((sp.index_dir / "index.json").read_text())
    assert cached["items"] == 60
    for p in sidecars(sp):  # the cache alone must answer: no sidecar is read
        p.rename(p.with_suffix(".json.bak"))
        p.write_text("{}")
    monkeypatch.setattr(shards_mod, "read_sidecar", lambda p: pytest.fail(f"read {p}"))
    np.testing.assert_array_equal(reopen(sp).get(keys[::-1]), emb(keys[::-1], DIM))
    monkeypatch.undo()
    for p in sidecars(sp):
        p.with_suffix(".json.bak").rename(p)
    positions = next(sp.index_dir.glob("index-*.positions.npy"))
    positions.write_bytes(positions.read_bytes()[:128] + os.urandom(positions.stat().st_size - 128))
    np.testing.assert_array_equal(reopen(sp).get(keys), emb(keys, DIM))  # a damaged cache is ignored
    first = sidecars(sp)[0]
    first.unlink()  # a shard removed (e.g. by repair elsewhere): the cache no longer covers the disk
    first.with_suffix(".npy").unlink()
    assert reopen(sp).missing(keys) == keys[:20]


def test_get_of_a_few_keys_touches_only_their_shards(tmp_path, monkeypatch):
    sp = new_space(tmp_path)
    n, shard = 40_000, 1000
    keys = [f"k{i:07d}" for i in range(n)]
    x = np.arange(n, dtype=np.float32)[:, None].repeat(16, axis=1)
    with sp.writer(shard_size=shard) as w:
        w.add(keys, x)
    hashed = []
    real = shards_mod.file_checksum
    monkeypatch.setattr(shards_mod, "file_checksum", lambda p: hashed.append(p) or real(p))
    sp = reopen(sp)
    got = sp.get([keys[39_999], keys[5], keys[20_500]])
    np.testing.assert_array_equal(got[:, 0], [39_999, 5, 20_500])
    assert len(hashed) == 3  # opening read no data; only the three shards holding the rows were verified
