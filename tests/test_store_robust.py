"""What a new user hits in the first hour: damaged index caches, unwritable stores, corrupt shards during embed,
typos in --store, and cleaning spaces up (``store rm`` / ``store gc``)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import encoderlab.store.embedding_store as es_mod
import encoderlab.store.key_index as index_mod
import encoderlab.store.space as space_mod
from encoderlab.cli import main
from encoderlab.errors import EncoderlabError
from encoderlab.store import EmbeddingSpace, EmbeddingStore
from encoderlab.store import shards as shards_mod
from encoderlab.store.key_index import Segment, save_cache
from encoderlab.testing import color_dataset, color_spec, registered_color_encoder

DIM = 4


def emb(keys: list[str]) -> np.ndarray:
    """A deterministic row per key."""
    out = np.empty((len(keys), DIM), dtype=np.float32)
    for i, k in enumerate(keys):
        out[i] = np.random.default_rng(int(hashlib.blake2b(k.encode(), digest_size=8).hexdigest(), 16)).random(DIM)
    return out


def ckeys(prefix: str, n: int) -> list[str]:
    return [prefix + hashlib.blake2b(f"{prefix}{i}".encode(), digest_size=16).hexdigest() for i in range(n)]


def reopen(space: EmbeddingSpace) -> EmbeddingSpace:
    return EmbeddingStore(space.path.parent).space(space.fingerprint)


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------ 10: index cache


@pytest.fixture
def cached_space(tmp_path, monkeypatch) -> tuple[EmbeddingSpace, list[str]]:
    """A space of 300 keys in 3 shards whose consolidated index is cached on disk."""
    monkeypatch.setattr(space_mod, "PERSIST_MIN_ROWS", 10)
    sp = EmbeddingStore(tmp_path / "store").space("f00d")
    keys = ckeys("i", 300)
    with sp.writer(shard_size=100) as w:
        w.add(keys, emb(keys))
    assert (sp.index_dir / "index.json").exists()
    return sp, keys


def _part(sp: EmbeddingSpace, part: str) -> Path:
    return next(sp.index_dir.glob(f"index-*.{part}.npy"))


def _flip(path: Path, start: int = 128) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(start, len(raw), 7):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def _edit_doc(sp: EmbeddingSpace, change) -> None:
    doc = json.loads((sp.index_dir / "index.json").read_text())
    change(doc)
    (sp.index_dir / "index.json").write_text(json.dumps(doc))


DAMAGE = {
    "truncate-keys": lambda sp: _part(sp, "keys").write_bytes(_part(sp, "keys").read_bytes()[:-40]),
    "truncate-positions": lambda sp: _part(sp, "positions").write_bytes(_part(sp, "positions").read_bytes()[:200]),
    "flip-keys": lambda sp: _flip(_part(sp, "keys")),
    "flip-hashes": lambda sp: _flip(_part(sp, "hashes")),
    "flip-positions": lambda sp: _flip(_part(sp, "positions")),
    "edit-items": lambda sp: _edit_doc(sp, lambda d: d.update(items=d["items"] - 1)),
    "edit-shard-rows": lambda sp: _edit_doc(sp, lambda d: d["shards"][0].update(rows=d["shards"][0]["rows"] + 1)),
    "garbage-json": lambda sp: (sp.index_dir / "index.json").write_text("{not json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_index_cache_is_reported_ignored_and_never_duplicates_keys(cached_space, damage):
    sp, keys = cached_space
    DAMAGE[damage](sp)
    for deep in (False, True):
        found = reopen(sp).verify(deep=deep)
        assert [p["kind"] for p in found] == ["cache"], found
        assert found[0]["path"] == str(sp.index_dir / "index.json") and "--repair" in found[0]["detail"]
    reader = reopen(sp)
    assert reader.missing(keys) == [] and len(reader) == 300
    np.testing.assert_array_equal(reader.get(keys), emb(keys))
    # The writer that follows must see every key as stored: the space holds each distinct key once.
    more = ckeys("n", 20)
    with reopen(sp).writer(shard_size=100) as w:
        w.add(keys + more, emb(keys + more))
        assert w.rows_written == 0 or w.pending == 20
    assert len(reopen(sp)) == 320
    assert reopen(sp).verify() == []  # dropped by the reader, rebuilt from the sidecars


def test_the_first_write_after_damage_does_not_inflate_the_space(cached_space):
    # The report: 119,998 items for 60,000 keys after a write on top of a cache with damaged keys.
    sp, keys = cached_space
    _flip(_part(sp, "keys"))
    sp2 = reopen(sp)
    assert sp2.put(keys, emb(keys)) == 0
    assert len(reopen(sp)) == len(keys)


def test_repair_drops_a_damaged_cache(cached_space):
    sp, keys = cached_space
    _flip(_part(sp, "hashes"))
    removed = reopen(sp).repair()
    assert [r["kind"] for r in removed] == ["cache"] and str(sp.index_dir / "index.json") in removed[0]["removed"]
    assert not (sp.index_dir / "index.json").exists()
    np.testing.assert_array_equal(reopen(sp).get(keys), emb(keys))


def _resave(sp: EmbeddingSpace, seg: Segment) -> None:
    for p in sp.index_dir.iterdir():
        p.unlink()
    save_cache(sp.index_dir, seg)


def test_a_consistent_cache_that_disagrees_with_a_sidecar_is_dropped_by_the_reader(cached_space):
    sp, keys = cached_space
    seg = sp.index().consolidated().segments[0]
    wrong = [shards_mod.ShardRecord(**{**r.to_json(), "checksum": "sha256:" + "0" * 64}) for r in seg.shards]
    _resave(sp, Segment(wrong, seg.keys, seg.hashes, seg.positions))  # valid digests, wrong shard records
    problems = reopen(sp).verify(deep=False)
    assert [p["problem"] for p in problems] == ["index-cache-mismatch"]
    reader = reopen(sp)
    np.testing.assert_array_equal(reader.get(keys), emb(keys))  # a shard "failing" a wrong record is not corrupt
    assert all(shards_mod.check_shard(sp.shards_dir, r, deep=True) is None for r in reader.shard_records())
    assert reopen(sp).verify() == []


def test_deep_verify_compares_the_cache_with_every_sidecar(cached_space):
    sp, keys = cached_space
    seg = sp.index().consolidated().segments[0]
    swapped = seg.keys.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # two keys trade rows: every digest and self-check still holds
    _resave(sp, Segment.build(seg.shards, [swapped], []))
    assert reopen(sp).verify(deep=False) == []
    assert [p["problem"] for p in reopen(sp).verify(deep=True)] == ["index-cache-mismatch"]


def test_cli_verify_reports_a_damaged_cache_and_repair_drops_it(capsys, cached_space):
    sp, _ = cached_space
    _flip(_part(sp, "keys"))
    store = str(sp.path.parent)
    code, out, err = run(capsys, ["store", "verify", "--store", store])
    assert code == 1 and "cache" in out and "index.json" in out and "--repair" in err
    code, out, err = run(capsys, ["store", "verify", "--store", store, "--repair", "--json"])
    assert code == 0 and json.loads(out)["removed"]
    assert run(capsys, ["store", "verify", "--store", store])[0] == 0


# ------------------------------------------------------------------------ 13: files, disk full, read-only


def test_a_store_that_is_a_file_fails_at_construction(tmp_path):
    f = tmp_path / "store.txt"
    f.write_text("x")
    for root in (f, f / "sub"):
        with pytest.raises(EncoderlabError, match="is a file") as e:
            EmbeddingStore(root)
        assert str(root) in str(e.value) and "--store" in str(e.value)


@pytest.fixture
def colors(tmp_path):
    with registered_color_encoder() as name:
        yield name, color_spec(color_dataset(tmp_path / "colors"))


def _embed(name: str, data: str, store: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["embed", "--encoder", name, "--data", data, "--store", str(store), "--out", str(tmp_path / "run"),
            "--workers", "0", "--modality", "image", "--no-progress", *extra]


def test_cli_store_that_is_a_file_is_one_clear_line(capsys, tmp_path, colors):
    f = tmp_path / "store.txt"
    f.write_text("x")
    for argv in (["store", "list", "--store", str(f)], _embed(*colors, f, tmp_path)):
        code, _, err = run(capsys, argv)
        assert code == 1 and "is a file" in err and "internal error" not in err


def _disk_full(path, data):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_during_a_write_names_the_file(tmp_path, monkeypatch):
    sp = EmbeddingStore(tmp_path / "store").space("f00d")
    monkeypatch.setattr(shards_mod, "_write_npy", _disk_full)
    keys = ckeys("i", 5)
    with pytest.raises(EncoderlabError, match="disk full") as e:
        sp.put(keys, emb(keys))
    assert str(sp.shards_dir) in str(e.value) and "free space" in str(e.value)


def test_cli_embed_on_a_full_disk_is_one_clear_line(capsys, tmp_path, monkeypatch, colors):
    monkeypatch.setattr(shards_mod, "_write_npy", _disk_full)
    code, _, err = run(capsys, _embed(*colors, tmp_path / "store", tmp_path))
    assert code == 1 and "disk full" in err and "internal error" not in err


def _deny_writes(monkeypatch, store: Path):
    """Writes into ``store`` are refused, as on a read-only mount (os.access is global: limit it to the store)."""
    real = os.access

    def access(p, mode, **kw):
        inside = Path(p) == store or store in Path(p).parents
        return False if inside and mode & os.W_OK else real(p, mode, **kw)

    monkeypatch.setattr(os, "access", access)


def test_a_read_only_store_serves_reads_and_refuses_new_items_up_front(tmp_path, monkeypatch):
    sp = EmbeddingStore(tmp_path / "store").space("f00d")
    keys = ckeys("i", 5)
    sp.put(keys, emb(keys))
    _deny_writes(monkeypatch, sp.path.parent)
    ro = reopen(sp)
    np.testing.assert_array_equal(ro.get(keys), emb(keys))
    assert ro.put(keys, emb(keys)) == 0  # nothing new: nothing to write
    with pytest.raises(EncoderlabError, match="is read-only") as e:
        ro.writer()  # before the caller computes anything
    assert str(sp.path.parent) in str(e.value) and "--store" in str(e.value)
    new = ckeys("n", 2)
    with pytest.raises(EncoderlabError, match="is read-only"):
        ro.put(new, emb(new))


def test_permission_denied_at_commit_is_read_only(tmp_path, monkeypatch):
    sp = EmbeddingStore(tmp_path / "store").space("f00d")

    def denied(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(shards_mod, "_write_npy", denied)
    keys = ckeys("i", 3)
    with pytest.raises(EncoderlabError, match=r"store .* is read-only: cannot write .*shard-"):
        sp.put(keys, emb(keys))


def test_cli_embed_into_a_read_only_store_fails_before_encoding(capsys, tmp_path, monkeypatch, colors):
    (tmp_path / "store").mkdir()
    _deny_writes(monkeypatch, tmp_path / "store")
    code, _, err = run(capsys, _embed(*colors, tmp_path / "store", tmp_path))
    assert code == 1 and "is read-only" in err and "internal error" not in err
    assert not list((tmp_path / "store").rglob("shard-*"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes despite chmod")
def test_a_chmod_read_only_store_is_refused_by_name(tmp_path):
    sp = EmbeddingStore(tmp_path / "store").space("f00d")
    keys = ckeys("i", 3)
    sp.put(keys, emb(keys))
    for p in (sp.path.parent, sp.path, sp.shards_dir):
        p.chmod(0o555)
    try:
        new = ckeys("n", 2)
        with pytest.raises(EncoderlabError, match="is read-only"):
            reopen(sp).put(new, emb(new))
    finally:
        for p in (sp.path.parent, sp.path, sp.shards_dir):
            p.chmod(0o755)


# --------------------------------------------------------------------------- 14: corrupt shard during embed


def _corrupt(shard: Path) -> None:
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF  # a data byte: only the checksum notices
    shard.write_bytes(bytes(raw))


def test_embed_recomputes_the_items_of_a_corrupt_shard(capsys, tmp_path, monkeypatch, colors):
    monkeypatch.setenv("ENCODERLAB_COMMIT_SECONDS", "1e-9")  # one shard per batch
    store = tmp_path / "store"
    argv = [*_embed(*colors, store, tmp_path, "--batch-size", "12"), "--json"]
    code, out, err = run(capsys, argv)
    assert code == 0, err
    assert json.loads(out)["encoded"] == 36
    shards = sorted(store.rglob("shard-*.npy"))
    assert len(shards) == 3
    _corrupt(shards[1])
    with pytest.warns(UserWarning, match="removed corrupt embedding shard"):
        code, out, err = run(capsys, argv)
    assert code == 0, err
    again = json.loads(out)
    assert (again["encoded"], again["cached"]) == (12, 24)
    assert again["modalities"]["image"]["repaired_shards"] == 1
    assert run(capsys, ["store", "verify", "--store", str(store)])[0] == 0
    code, out, err = run(capsys, argv)  # healed: everything is cached and sound
    assert code == 0 and (json.loads(out)["encoded"], json.loads(out)["cached"]) == (0, 36)


def test_a_corrupt_shard_that_cannot_be_removed_fails_with_the_repair_fix(tmp_path, monkeypatch):
    sp = EmbeddingStore(tmp_path / "store").space("f00d")
    keys = ckeys("i", 10)
    sp.put(keys, emb(keys))
    _corrupt(next(sp.shards_dir.glob("shard-*.npy")))

    def no_unlink(self, *a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", no_unlink)
    with pytest.raises(EncoderlabError, match="encoderlab store verify --repair"):
        reopen(sp).verify_holding(keys, repair=True)


def test_holding_shards_are_hashed_once_per_process(tmp_path, monkeypatch):
    sp = EmbeddingStore(tmp_path / "store").space("f00d")
    keys = ckeys("i", 30)
    with sp.writer(shard_size=10) as w:
        w.add(keys, emb(keys))
    hashed = []
    real = shards_mod.file_checksum
    monkeypatch.setattr(shards_mod, "file_checksum", lambda p: hashed.append(p) or real(p))
    assert reopen(sp).verify_holding(keys[:15]) == []
    assert len(hashed) == 2  # only the two shards holding those keys
    assert reopen(sp).verify_holding(keys) == [] and len(hashed) == 3
    reopen(sp).get(keys)
    assert len(hashed) == 3  # reads trust what this process verified


# --------------------------------------------------------------------------------- 15: typo in --store


@pytest.mark.parametrize("action", ["list", "verify"])
def test_a_store_path_that_does_not_exist_is_an_error(capsys, tmp_path, action):
    code, _, err = run(capsys, ["store", action, "--store", str(tmp_path / "stor")])
    assert code == 1 and f"no store at {tmp_path / 'stor'}" in err and "embed" in err
    assert not (tmp_path / "stor").exists()


def test_store_list_shows_a_corrupt_space_in_the_table(capsys, tmp_path):
    store = EmbeddingStore(tmp_path / "store")
    for fp in ("aaaa", "bbbb"):
        keys = ckeys(fp, 4)
        store.space(fp, {"spec": "x", "modality": "image"}).put(keys, emb(keys))
    next((tmp_path / "store" / "bbbb" / "shards").glob("shard-*.json")).write_text("{broken")
    code, out, err = run(capsys, ["store", "list", "--store", str(store.root)])
    assert code == 0 and "problem" in out.splitlines()[0]
    row = next(line for line in out.splitlines() if line.startswith("bbbb"))
    assert "cannot be read" in row and "store verify" in err
    assert next(line for line in out.splitlines() if line.startswith("aaaa")).rstrip().endswith("-")


# ------------------------------------------------------------------------------------------- 19: rm, gc


def _store_with(tmp_path: Path, specs: dict[str, str]) -> EmbeddingStore:
    store = EmbeddingStore(tmp_path / "store")
    for fp, spec in specs.items():
        keys = ckeys(fp, 6)
        store.space(fp, {"spec": spec, "modality": "image"}).put(keys, emb(keys))
    return store


def test_remove_space_renames_aside_then_deletes_and_readers_see_missing_keys(tmp_path):
    store = _store_with(tmp_path, {"aaaa1": "x"})
    reader = EmbeddingStore(store.root).space("aaaa1")
    keys = reader.keys()
    out = store.remove_space("aaaa1")
    assert out["removed"] and out["bytes"] > 0 and out["files"] >= 3
    assert not (store.root / "aaaa1").exists() and not list(store.root.iterdir())
    with pytest.raises(EncoderlabError, match="not in embedding space"):
        reader.get(keys)  # a reader that opened before: missing keys, not a crash


def test_an_interrupted_remove_leaves_nothing_listed_and_gc_finishes_it(tmp_path, monkeypatch):
    store = _store_with(tmp_path, {"aaaa1": "x"})
    monkeypatch.setattr(es_mod.shutil, "rmtree", lambda *a, **kw: None)  # killed right after the rename
    store.remove_space("aaaa1")
    monkeypatch.undo()
    assert store.space_names() == [] and [p.name[:10] for p in store.root.iterdir()] == [".removing-"]
    out = store.gc()
    assert [o["kind"] for o in out["orphans"]] == ["removed-space"] and not list(store.root.iterdir())


def test_cli_rm_by_prefix_refuses_ambiguity_and_supports_dry_run(capsys, tmp_path):
    store = _store_with(tmp_path, {"aaaa1": "enc-a", "aaab2": "enc-b", "cccc3": "enc-c"})
    root = str(store.root)
    code, _, err = run(capsys, ["store", "rm", "aaa", "cccc", "--store", root])
    assert code == 1 and "matches 2 spaces" in err and "aaaa1" in err and "aaab2" in err
    assert store.space_names() == ["aaaa1", "aaab2", "cccc3"]  # nothing removed, not even cccc3
    code, _, err = run(capsys, ["store", "rm", "zz", "--store", root])
    assert code == 1 and "no space 'zz'" in err
    code, out, _ = run(capsys, ["store", "rm", "aaaa", "cccc", "--store", root, "--dry-run", "--json"])
    dry = json.loads(out)
    assert code == 0 and dry["dry_run"] and [r["fingerprint"] for r in dry["removed"]] == ["aaaa1", "cccc3"]
    assert dry["bytes"] > 0 and store.space_names() == ["aaaa1", "aaab2", "cccc3"]
    code, out, _ = run(capsys, ["store", "rm", "aaaa", "cccc", "--store", root])
    assert code == 0 and "enc-a" in out and "removed 2 space(s)" in out
    assert store.space_names() == ["aaab2"]


def test_gc_removes_dead_writers_files_and_spaces_of_deleted_model_dirs(capsys, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    gone = tmp_path / "deleted-model"
    store = _store_with(tmp_path, {"aaaa1": f"local:{gone}", "bbbb2": f"hf:{gone}?pool=mean",
                                   "cccc3": f"local:{model}", "dddd4": "hf:openai/clip-vit-base-patch32",
                                   "eeee5": "local:relative/dir"})
    orphan = store.root / "cccc3" / "shards" / (shards_mod.new_shard_name(99) + ".npy")
    orphan.write_bytes(b"x" * 100)
    old = time.time() - shards_mod.ORPHAN_GRACE_S - 10
    os.utime(orphan, (old, old))
    code, out, _ = run(capsys, ["store", "gc", "--store", str(store.root), "--dry-run", "--json"])
    dry = json.loads(out)
    assert code == 0 and sorted(s["fingerprint"] for s in dry["spaces"]) == ["aaaa1", "bbbb2"]
    assert [o["path"] for o in dry["orphans"]] == [str(orphan)] and dry["bytes"] > 100
    assert orphan.exists() and len(store.space_names()) == 5
    code, out, _ = run(capsys, ["store", "gc", "--store", str(store.root)])
    assert code == 0 and "freed" in out and str(gone) in out
    assert store.space_names() == ["cccc3", "dddd4", "eeee5"] and not orphan.exists()


@pytest.mark.parametrize("action", ["rm", "gc"])
def test_rm_and_gc_help_have_examples(capsys, action):
    with pytest.raises(SystemExit) as e:
        main(["store", action, "--help"])
    assert e.value.code == 0 and f"encoderlab store {action}" in capsys.readouterr().out.split("example:")[1]


def test_remove_space_refuses_an_unknown_fingerprint(tmp_path):
    store = _store_with(tmp_path, {"aaaa1": "x"})
    with pytest.raises(EncoderlabError, match="no space 'aaaa'"):
        store.remove_space("aaaa")  # the library takes exact fingerprints; prefixes go through resolve()


def test_load_cache_reads_a_good_cache_and_none_without_one(cached_space):
    sp, _ = cached_space
    assert index_mod.load_cache(sp.index_dir, set(shards_mod.list_shard_files(sp.shards_dir)[0])) is not None
    shutil.rmtree(sp.index_dir)
    assert index_mod.load_cache(sp.index_dir, set()) is None


def test_dropping_a_bad_cache_keeps_one_committed_meanwhile(cached_space):
    sp, _ = cached_space
    judged = b"{not json"  # what a reader read and rejected; another process has since committed a good cache
    assert index_mod.drop_cache(sp.index_dir, raw=judged) == []
    assert index_mod.drop_cache(sp.index_dir, token="00000000") == []
    assert (sp.index_dir / "index.json").exists() and len(list(sp.index_dir.glob("index-*.npy"))) == 3
