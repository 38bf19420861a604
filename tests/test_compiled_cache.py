"""The compiled-network cache stays under its budget: least recently used graphs go first, graphs in use stay.

Each test has its own ``ENCODERLAB_HOME`` (the session's home links the real compiled folder, which a tiny budget
here must never touch).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest
import torch

from encoderlab.cli import main
from encoderlab.encoders import compiled_cache, create_encoder, hf_onnx
from encoderlab.errors import EncoderlabError


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCODERLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(compiled_cache.MAX_ENV, raising=False)
    monkeypatch.delenv("ENCODERLAB_ONNXRUNTIME", raising=False)
    hf_onnx.EXPORTS.clear()


def _graph(name: str, size: int, age_s: float):
    """A fake exported graph of ``size`` bytes last used ``age_s`` seconds ago."""
    root = compiled_cache.compiled_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_bytes(b"x" * size)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_prune_removes_least_recently_used_first_and_leaves_other_entries():
    old, mid, new = _graph("old.onnx", 400, 300), _graph("mid.onnx", 300, 200), _graph("new.onnx", 200, 100)
    other = compiled_cache.compiled_dir() / "all-mpnet-base-v2-0123"  # the unzipped packaged model: not a graph
    other.mkdir()
    (other / "model.onnx").write_bytes(b"y" * 5000)
    temp = _graph(".new.onnx.abc.tmp", 5000, 1000)  # a writer still running
    assert [g.path.name for g in compiled_cache.graphs()] == ["old.onnx", "mid.onnx", "new.onnx"]

    dry = compiled_cache.prune(250, dry_run=True)
    assert [r["name"] for r in dry["removed"]] == ["old.onnx", "mid.onnx"] and old.exists()
    assert dry["bytes"] == 200 and dry["freed_bytes"] == 700

    out = compiled_cache.prune(250)
    assert [r["name"] for r in out["removed"]] == ["old.onnx", "mid.onnx"]
    assert not old.exists() and not mid.exists() and new.exists() and other.exists() and temp.exists()
    assert compiled_cache.prune(None)["removed"] == []  # no limit: nothing goes
    assert compiled_cache.prune(200)["removed"] == []  # at the limit: nothing goes


def test_loading_a_graph_moves_it_to_the_back_and_keeps_it_for_this_process():
    first = _graph("first.onnx", 300, 300)
    _graph("second.onnx", 300, 200)
    compiled_cache.mark_used(first)  # what every ONNX Runtime session load does
    assert [g.path.name for g in compiled_cache.graphs()] == ["second.onnx", "first.onnx"]
    first_old = time.time() - 10_000
    os.utime(first, (first_old, first_old))  # even when it looks oldest, this process still uses it
    out = compiled_cache.prune(0)
    assert [r["name"] for r in out["removed"]] == ["second.onnx"] and first.exists()
    assert out["bytes"] == 300  # over the limit by what is in use, and says so


def test_budget_from_the_environment(monkeypatch):
    assert compiled_cache.max_bytes() == compiled_cache.DEFAULT_MAX_BYTES
    for text, expected in [("500M", 500 << 20), ("2G", 2 << 30), ("0", None), ("0G", None), ("0B", None)]:
        monkeypatch.setenv(compiled_cache.MAX_ENV, text)
        assert compiled_cache.max_bytes() == expected, text
    monkeypatch.setenv(compiled_cache.MAX_ENV, "lots")
    with pytest.raises(EncoderlabError, match="ENCODERLAB_COMPILED_MAX='lots'") as e:
        compiled_cache.max_bytes()
    assert "10G" in e.value.fix
    with pytest.raises(EncoderlabError, match="--max-size='-3M'"):
        compiled_cache.max_bytes("-3M")


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="exports need the onnx extra")
def test_an_export_brings_the_cache_under_its_budget(tiny_clip_dir, monkeypatch):
    stale = [_graph(f"stale-{i}.onnx", 1 << 20, 1000 - i) for i in range(3)]  # 3 MiB of other weights' graphs
    monkeypatch.setenv(compiled_cache.MAX_ENV, "2M")
    enc = create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    from PIL import Image

    pixels = torch.stack([enc.image_transform()(Image.new("RGB", (40, 28), (200, 30, 30)))] * 2)
    first = enc.encode_pixels(pixels, normalize=True)
    assert enc.runtime == "onnxruntime"
    exported = [g for g in compiled_cache.graphs() if g.path.name.startswith("hf-clip-image")]
    assert len(exported) == 1 and exported[0].bytes < (1 << 20)
    # the two oldest stale graphs went (the export is ~100 KB, so 2 MiB holds the youngest and it)
    assert [p.exists() for p in stale] == [False, False, True]
    assert sum(g.bytes for g in compiled_cache.graphs()) <= 2 << 20
    torch.testing.assert_close(enc.encode_pixels(pixels, normalize=True), first)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="exports need the onnx extra")
@pytest.mark.parametrize("spec", ["hf", "efficientnet-lite0"])
def test_a_bad_budget_is_the_users_error_not_a_silent_pytorch_fallback(spec, tiny_clip_dir, monkeypatch):
    enc = create_encoder(f"hf:{tiny_clip_dir}" if spec == "hf" else spec, device="cpu")
    monkeypatch.setenv(compiled_cache.MAX_ENV, "lots")
    from PIL import Image

    pixels = torch.stack([enc.image_transform()(Image.new("RGB", (40, 28), (200, 30, 30)))])
    with pytest.raises(EncoderlabError, match="ENCODERLAB_COMPILED_MAX='lots'"):
        enc.encode_pixels(pixels)
    assert compiled_cache.graphs() == []  # nothing written


def test_cache_commands(capsys):
    _graph("a.onnx", 3000, 300)
    _graph("b.onnx", 1000, 100)
    assert main(["cache", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [g["name"] for g in listed["graphs"]] == ["a.onnx", "b.onnx"] and listed["bytes"] == 4000
    assert listed["limit"] == compiled_cache.DEFAULT_MAX_BYTES
    assert main(["cache", "prune", "--max-size", "2K", "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in pruned["removed"]] == ["a.onnx"] and pruned["bytes"] == 1000
    assert main(["cache", "prune", "--all", "--dry-run"]) == 0
    assert "would remove b.onnx" in capsys.readouterr().out and (compiled_cache.compiled_dir() / "b.onnx").exists()
    assert main(["cache", "prune", "--all"]) == 0
    assert compiled_cache.graphs() == []
    assert main(["cache", "prune", "--max-size", "lots"]) != 0
    assert "--max-size='lots'" in capsys.readouterr().err
