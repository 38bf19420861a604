"""Commits by time (a killed extraction keeps its work) and compaction (short shards merged, nothing lost)."""

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

import encoderlab.store.compact as compact_mod
import encoderlab.store.writer as writer_mod
from encoderlab.cli import main
from encoderlab.data import load_dataset
from encoderlab.errors import EncoderlabError
from encoderlab.extract import extract_images
from encoderlab.store import EmbeddingSpace, EmbeddingStore
from encoderlab.store import shards as shards_mod
from encoderlab.testing import ColorEncoder, color_dataset, color_spec

SRC = str(Path(__file__).resolve().parents[1] / "src")
DIM = 5


def new_space(tmp_path: Path, fp: str = "cafe") -> EmbeddingSpace:
    return EmbeddingStore(tmp_path / "store").space(fp)


def reopen(space: EmbeddingSpace) -> EmbeddingSpace:
    """The same space as another process would open it (its own index, maps and cache)."""
    return EmbeddingStore(space.path.parent).space(space.fingerprint)


def keys_of(prefix: str, n: int, start: int = 0) -> list[str]:
    return [f"{prefix}{i:08d}" for i in range(start, start + n)]


def rows_for(keys: list[str], salt: int = 0) -> np.ndarray:
    """Values that differ per key (and per salt), reproducible."""
    rng = np.random.default_rng(salt)
    base = rng.standard_normal((1, DIM)).astype(np.float32)
    return base + np.array([[int(k[-8:]) + j / 10 for j in range(DIM)] for k in keys], dtype=np.float32)


def n_shards(space: EmbeddingSpace) -> int:
    return len(list(space.shards_dir.glob("shard-*.json")))


class FakeClock:
    """Stands in for time.monotonic inside the writer, so commit timing is exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(writer_mod.time, "monotonic", c)
    return c


def snapshot(space: EmbeddingSpace) -> dict[str, bytes]:
    """Every key's value as raw float32 bytes, read by a fresh reader: what "bit-identical" is checked against."""
    fresh = reopen(space)
    keys = fresh.keys()
    values = fresh.get(keys)
    return {k: values[i].tobytes() for i, k in enumerate(keys)}


# ------------------------------------------------------------------------------------------- commits by time


def test_writer_commits_after_commit_seconds_whichever_comes_first(tmp_path, clock):
    sp = new_space(tmp_path)
    keys = keys_of("i", 40)
    x = rows_for(keys)
    with sp.writer(shard_size=10, commit_seconds=5) as w:
        w.add(keys[:3], x[:3])  # the clock starts with the first buffered row
        clock.now += 4.9
        w.add(keys[3:6], x[3:6])
        assert n_shards(sp) == 0 and w.pending == 6
        clock.now += 0.1  # 5 s since the first buffered row: everything buffered is committed
        w.add(keys[6:8], x[6:8])
        assert n_shards(sp) == 1 and w.pending == 0 and len(reopen(sp)) == 8
        w.add(keys[8:20], x[8:20])  # 12 rows: the row limit commits 10 first, the 2 left wait from now
        assert n_shards(sp) == 2 and w.pending == 2
        clock.now += 4
        w.add(keys[20:21], x[20:21])
        assert w.pending == 3
        clock.now += 1
        w.add(keys[21:22], x[21:22])
        assert n_shards(sp) == 3 and w.pending == 0 and w.timed_commits == 2
        clock.now += 100  # nothing buffered: an idle writer does not commit empty shards
        w.add(keys[22:23], x[22:23])
        assert w.pending == 1
    assert [json.loads(p.read_text())["rows"] for p in sorted(sp.shards_dir.glob("*.json"))] == [8, 10, 4, 1]
    np.testing.assert_array_equal(reopen(sp).get(keys[:23]), x[:23])


def test_commit_seconds_comes_from_the_argument_the_environment_or_the_default(tmp_path, monkeypatch):
    sp = new_space(tmp_path)
    monkeypatch.delenv(writer_mod.COMMIT_SECONDS_ENV, raising=False)
    assert sp.writer().commit_seconds == writer_mod.COMMIT_SECONDS == 30.0
    monkeypatch.setenv(writer_mod.COMMIT_SECONDS_ENV, "0.25")
    assert sp.writer().commit_seconds == 0.25
    assert sp.writer(commit_seconds=7).commit_seconds == 7.0  # the argument wins
    monkeypatch.setenv(writer_mod.COMMIT_SECONDS_ENV, "inf")
    assert sp.writer().commit_seconds == float("inf")
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv(writer_mod.COMMIT_SECONDS_ENV, bad)
        with pytest.raises(EncoderlabError, match=f"ENCODERLAB_COMMIT_SECONDS={bad!r}.*unset it"):
            sp.writer()
    monkeypatch.delenv(writer_mod.COMMIT_SECONDS_ENV)
    for bad in (0, -1.0, "30", True):
        with pytest.raises(EncoderlabError, match="commit_seconds must be a positive number"):
            sp.writer(commit_seconds=bad)


KILL_CODE = """
import sys, time
from pathlib import Path
from encoderlab.data import load_dataset
from encoderlab.extract import extract_images
from encoderlab.store import EmbeddingStore
from encoderlab.testing import ColorEncoder

class SlowColorEncoder(ColorEncoder):
    def encode_pixels(self, pixel_values, normalize=False):
        Path(sys.argv[3]).touch()  # tells the parent that encoding has started
        time.sleep(0.25)
        return super().encode_pixels(pixel_values, normalize)

data, store, marker = sys.argv[1:4]
extract_images(SlowColorEncoder(), load_dataset(data), EmbeddingStore(store), batch_size=4, num_workers=0,
               progress=False)
print("finished")
"""


def test_an_extraction_killed_with_sigkill_keeps_the_rows_of_its_last_seconds(tmp_path):
    data = color_spec(color_dataset(tmp_path / "colors", n_per_class=24))  # 72 images: 18 batches of 0.25 s
    ds = load_dataset(data)
    store_dir, marker = tmp_path / "store", tmp_path / "encoding-started"
    env = {**os.environ, "PYTHONPATH": SRC, writer_mod.COMMIT_SECONDS_ENV: "0.5"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_CODE, data, str(store_dir), str(marker)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), proc.communicate(timeout=10)
        time.sleep(2.0)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and "finished" not in out, err

    store = EmbeddingStore(store_dir)
    space = store.space(ColorEncoder().fingerprint("image"))
    uninterrupted = extract_images(ColorEncoder(), ds, EmbeddingStore(tmp_path / "ref"), batch_size=4, num_workers=0,
                                   progress=False)
    total = uninterrupted.encoded
    committed = len(space)
    assert 0 < committed < total - 8  # about 2 s of 0.25 s batches, committed every 0.5 s
    assert not [p for p in space.verify() if p["kind"] == "corrupt"]

    again = extract_images(ColorEncoder(), ds, store, batch_size=4, num_workers=0, progress=False)
    assert (again.encoded, again.cached) == (total - committed, committed)  # only the rest is encoded
    reference = EmbeddingStore(tmp_path / "ref").space(space.fingerprint)
    np.testing.assert_array_equal(reopen(space).get(again.keys), reference.get(again.keys))


# ------------------------------------------------------------------------------------------------ compaction


def _many_small_shards(tmp_path: Path) -> tuple[EmbeddingSpace, list[str], np.ndarray]:
    sp = new_space(tmp_path)
    keys = keys_of("i", 300)
    x = rows_for(keys)
    for lo in range(0, 300, 20):  # 15 shards of 20 rows
        sp.put(keys[lo : lo + 20], x[lo : lo + 20])
    return sp, keys, x


def test_compaction_keeps_every_key_and_value_bit_identical(tmp_path):
    sp, keys, x = _many_small_shards(tmp_path)
    late = keys_of("h", 30)
    sp.put(late, rows_for(late, salt=1), dtype="float16")  # another dtype: merged only with its own kind
    sp.put(late[:10], rows_for(late[:10], salt=2), dtype="float16")  # all known already: no shard at all
    before, shards_before = snapshot(sp), n_shards(sp)
    assert shards_before == 16

    done = sp.compact(min_rows=100)
    assert (done["merged"], done["into"], done["shards_before"], done["shards_after"]) == (15, 3, 16, 4)
    assert n_shards(sp) == 4 and done["rows"] == 300 and not done["busy"]
    assert snapshot(sp) == before  # every key, every value, to the bit
    assert sp.verify() == [] and reopen(sp).verify(deep=True) == []
    np.testing.assert_array_equal(reopen(sp).get(keys), x)
    dtypes = sorted(json.loads(p.read_text())["dtype"] for p in sp.shards_dir.glob("*.json"))
    assert dtypes == ["float16", "float32", "float32", "float32"]
    # nothing left to do; a later write still lands after the merged shards
    assert sp.compact(min_rows=100)["merged"] == 0
    more = keys_of("j", 5)
    sp.put(more, rows_for(more))
    np.testing.assert_array_equal(reopen(sp).get(more + keys[:3]), np.concatenate([rows_for(more), x[:3]]))


def test_readers_opened_before_compaction_still_read_correct_values(tmp_path):
    sp, keys, x = _many_small_shards(tmp_path)
    mapped = reopen(sp)
    np.testing.assert_array_equal(mapped.get(keys), x)  # every old shard memory-mapped already
    unmapped = reopen(sp)
    assert len(unmapped) == 300  # index read, no shard opened yet
    reopen(sp).compact(min_rows=1000)  # another process compacts
    assert n_shards(sp) == 1
    np.testing.assert_array_equal(mapped.get(keys[::-1]), x[::-1])
    np.testing.assert_array_equal(unmapped.get(keys[::-1]), x[::-1])  # refreshes once, then reads the merged shard
    assert unmapped.missing(keys) == [] and len(unmapped.shard_records()) == 1


def test_a_shard_whose_keys_are_all_stored_earlier_is_removed_and_values_kept(tmp_path):
    sp = new_space(tmp_path)
    keys = keys_of("i", 12)
    sp.put(keys[:4], rows_for(keys[:4]))
    a, b = reopen(sp), reopen(sp)  # two writers with the same view race on the same keys, with other values
    assert len(a) == len(b) == 4
    a.put(keys[4:], rows_for(keys[4:], salt=1))
    b.put(keys[4:], rows_for(keys[4:], salt=2))
    assert n_shards(sp) == 3 and len(reopen(sp)) == 12
    before = snapshot(sp)
    done = reopen(sp).compact(min_rows=100)
    assert (done["removed_dead"], done["merged"], done["into"]) == (1, 2, 1) and n_shards(sp) == 1
    assert snapshot(sp) == before and sp.verify() == []


def _same_seq_shards(k: list[str]) -> list[tuple[str, list[str], int]]:
    """Two shards with one sequence number (racing writers), the second holding another value of k0, then one more."""
    return [
        ("shard-000005-000001-1-00000000", k[:2], 0),  # short, holds k0 first
        ("shard-000005-aaaaaa-1-00000000", k[:1] + k[2:5], 1),  # 4 rows: not short at min_rows=4; k0 again (loses)
        ("shard-000006-000001-1-00000000", k[5:], 0),  # short
    ]


def test_two_shards_with_one_sequence_number_merge_without_changing_a_value(tmp_path):
    sp = new_space(tmp_path)
    sp.shards_dir.mkdir(parents=True)
    k = keys_of("i", 6)
    for name, keys, salt in _same_seq_shards(k):
        shards_mod.write_shard(sp.shards_dir, name, keys, rows_for(keys, salt))
    before = snapshot(sp)
    # Named as compaction names it, the merged shard sorts first and the group is merged ...
    done = reopen(sp).compact(min_rows=4)
    assert (done["merged"], done["into"]) == (2, 1) and n_shards(sp) == 2 and snapshot(sp) == before


def test_a_group_whose_keys_would_resolve_elsewhere_is_left_alone(tmp_path, monkeypatch):
    """... but were it named to sort after the losing copy of k0, k0's value would change: the plan refuses."""
    sp = new_space(tmp_path)
    sp.shards_dir.mkdir(parents=True)
    k = keys_of("i", 6)
    for name, keys, salt in _same_seq_shards(k):
        shards_mod.write_shard(sp.shards_dir, name, keys, rows_for(keys, salt))
    before = snapshot(sp)
    monkeypatch.setattr(compact_mod, "merged_name", lambda seq, taken: "shard-000005-ffffff-1-00000000")
    done = reopen(sp).compact(min_rows=4)
    assert done["merged"] == 0 and n_shards(sp) == 3 and snapshot(sp) == before


@pytest.mark.parametrize("deleted", [0, 1, 7, "half-of-one"])
def test_a_crash_in_the_middle_of_compaction_leaves_everything_readable(tmp_path, monkeypatch, deleted):
    sp, keys, x = _many_small_shards(tmp_path)
    before = snapshot(sp)
    real = compact_mod.remove_shard
    calls: list[str] = []

    def crash(directory: Path, name: str) -> None:
        if deleted == "half-of-one":  # died between removing a sidecar and its .npy
            (directory / (name + ".json")).unlink()
            raise KeyboardInterrupt("killed")
        if len(calls) == deleted:
            raise KeyboardInterrupt("killed")
        calls.append(name)
        real(directory, name)

    monkeypatch.setattr(compact_mod, "remove_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        sp.compact(min_rows=100)  # merged shards are written and registered; removing the old ones dies
    monkeypatch.undo()
    assert snapshot(sp) == before
    assert not [p for p in reopen(sp).verify() if p["kind"] == "corrupt"]
    np.testing.assert_array_equal(sp.get(keys), x)  # the compacting process's own view too

    done = reopen(sp).compact(min_rows=100)  # the next compaction finishes the job
    assert snapshot(sp) == before and n_shards(sp) == 3
    assert done["removed_dead"] + done["merged"] > 0


KILL_COMPACT_CODE = """
import os, signal, sys
import encoderlab.store.compact as c
from encoderlab.store import EmbeddingStore

real = c.remove_shard
count = []
def remove_then_die(directory, name):
    if len(count) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    count.append(name)
    real(directory, name)
c.remove_shard = remove_then_die
EmbeddingStore(sys.argv[1]).space(sys.argv[2]).compact(min_rows=100)
"""


def test_compaction_killed_with_sigkill_loses_nothing_and_does_not_block_the_next(tmp_path):
    sp, keys, x = _many_small_shards(tmp_path)
    before = snapshot(sp)
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", KILL_COMPACT_CODE, str(sp.path.parent), sp.fingerprint],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert n_shards(sp) == 15 + 3 - 2  # three merged shards written, two old ones removed
    assert snapshot(sp) == before
    done = reopen(sp).compact(min_rows=100)  # the dead process's lock went with it
    assert not done["busy"] and n_shards(sp) == 3 and snapshot(sp) == before


def test_writer_compacts_its_short_timed_shards_on_close(tmp_path, clock):
    sp = new_space(tmp_path)
    keys = keys_of("i", 100)
    x = rows_for(keys)
    with sp.writer(shard_size=50, commit_seconds=1) as w:
        for lo in range(0, 100, 5):
            w.add(keys[lo : lo + 5], x[lo : lo + 5])
            clock.now += 1  # a second per batch: a 10-row shard every other batch
        assert n_shards(sp) == 10 and w.timed_commits == 10
    assert w.compaction is not None and (w.compaction["merged"], w.compaction["into"]) == (10, 2)
    assert n_shards(sp) == 2
    np.testing.assert_array_equal(reopen(sp).get(keys), x)
    # a writer that only fills shards, or one leaving after an error, does not compact
    with pytest.raises(RuntimeError):
        with sp.writer(shard_size=50, commit_seconds=1) as w2:
            more = keys_of("j", 5)
            w2.add(more, rows_for(more))
            clock.now += 1
            w2.add(keys_of("j", 5, 5), rows_for(keys_of("j", 5, 5)))
            raise RuntimeError("decode failed")
    assert w2.compaction is None and reopen(sp).missing(keys_of("j", 10)) == []


def test_compaction_refuses_bad_min_rows_and_reports_busy(tmp_path):
    sp, keys, _ = _many_small_shards(tmp_path)
    for bad in (1, 0, "100", 2.5):
        with pytest.raises(EncoderlabError, match="min_rows must be an integer >= 2"):
            sp.compact(min_rows=bad)
    with compact_mod.exclusive(sp.path / compact_mod.LOCK_NAME) as got:
        assert got
        done = reopen(sp).compact(min_rows=100)
    assert done["busy"] and done["merged"] == 0 and n_shards(sp) == 15


def test_cli_verify_compact_reports_merged_shards(tmp_path, capsys):
    sp, keys, x = _many_small_shards(tmp_path)
    before = snapshot(sp)
    assert main(["store", "verify", "--compact", "--min-rows", "100", "--store", str(sp.path.parent), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["problems"] == []
    assert (out["compacted"]["merged"], out["compacted"]["into"]) == (15, 3)
    assert out["compacted"]["spaces"][0]["shards_after"] == 3 and snapshot(sp) == before
    assert main(["store", "verify", "--compact", "--store", str(sp.path.parent)]) == 0
    text = capsys.readouterr().out
    assert "compacted: merged 3 shard(s) into 1" in text and "3 -> 1 shards" in text
    assert main(["store", "verify", "--min-rows", "10", "--store", str(sp.path.parent)]) == 1
    assert "--min-rows only applies to compaction" in capsys.readouterr().err
