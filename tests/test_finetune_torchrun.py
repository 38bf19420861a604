"""``torchrun --nproc_per_node 2 -m encoderlab finetune``: 2 CPU processes (gloo) save the model one process saves on
the same global batches, print one JSON result and write one run directory; a bad option fails every rank at once.

The runs are real subprocesses (torchrun's launcher, or the two ranks started by hand with its environment), on the
tiny random models of ``conftest`` and a few generated images, with item counts that 2 processes share evenly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_finetune import _toy as colour_toy
from test_finetune_contrastive import _toy as caption_toy

from encoderlab.encoders import create_encoder
from encoderlab.errors import EncoderlabError
from encoderlab.train import distributed as dp

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no gloo backend (torch.distributed)")
pytestmark = needs_gloo

TOL = 1e-5
TIMEOUT_S = 240  # a hang fails the test instead of stalling the suite


def _env(**extra: str) -> dict[str, str]:
    """This process's environment (ENCODERLAB_HOME of the session included), one thread each, no torchrun vars."""
    env = {k: v for k, v in os.environ.items() if k not in dp.ENV_VARS}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **extra)
    return env


def _launch(args: list[str], nproc: int = 1) -> subprocess.Popen[str]:
    """``encoderlab finetune ARGS`` started in a subprocess; with ``nproc`` > 1 under torchrun on a free port."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(dp.free_port()), "-m", "encoderlab"] if nproc > 1
              else [sys.executable, "-m", "encoderlab"])
    return subprocess.Popen([*launch, "finetune", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())


def _finish(procs: list[subprocess.Popen[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Wait for every process (a hang fails after ``TIMEOUT_S``, and nothing is left running)."""
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT_S)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _jsonl(ds: Any, path: Path, *, captions: bool) -> Path:
    """The toy dataset's rows as a jsonl source (its splits kept), read back through the real data path."""
    rows = ds.table[["id", "image", "label", "split", *(["texts"] if captions else [])]].to_dict("records")
    path.write_text("".join(json.dumps({**r, **({"text": r.pop("texts")} if captions else {})}) + "\n"
                            for r in rows))
    return path


def _one_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The single JSON object a ``--json`` run printed on stdout (every other rank stays silent there)."""
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout + proc.stderr[-3000:]
    return json.loads(lines[0])


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(model_dir / "tower.safetensors"))
    if (model_dir / "classifier.safetensors").is_file():
        tensors.update({f"classifier.{k}": v for k, v in load_file(str(model_dir / "classifier.safetensors")).items()})
    return tensors


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _check_pair(root: Path, spec: str, args: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``args`` with 2 processes and, at the same time, with 1 (own stores and model dirs); check the outputs."""
    runs_before = _runs()
    where = {n: root / f"p{n}" for n in (2, 1)}
    procs = []
    for n, path in where.items():
        path.mkdir()
        procs.append(_launch([*args, "--store", str(path / "store"), "--out", str(path / "model")], nproc=n))
    docs = {}
    for (n, path), proc in zip(where.items(), _finish(procs)):
        assert proc.returncode == 0, proc.stderr[-4000:]
        docs[n] = doc = _one_json(proc)  # rank 1's result is not printed
        assert doc["processes"] == n and doc["model_dir"] == str(path / "model")
        assert sorted(p.name for p in path.iterdir()) == ["model", "store"]  # the checkpoint dir is gone
        assert [p.name for p in (path / "model").iterdir() if p.is_dir()] == ["eval"]  # one run directory
        assert (path / "model" / "eval" / "results.json").is_file()
        assert "%|" not in proc.stderr  # --json: no progress bars, from any rank
    assert _runs() == runs_before  # nothing went to the default runs directory
    two, one = _weights(where[2] / "model"), _weights(where[1] / "model")
    base = create_encoder(spec, device="cpu").model.state_dict()
    moved = max(float((one[k] - base[k]).abs().max()) for k in one if k in base)
    assert moved > 100 * TOL  # training changed the tower: an equality below is not one of untouched weights
    assert _max_diff(two, one) < TOL, _max_diff(two, one)
    for path in where.values():  # both load as local:DIR
        assert create_encoder(f"local:{path / 'model'}", device="cpu").spec == f"local:{path / 'model'}"
    return docs[2], docs[1]


def _runs() -> list[str]:
    runs = Path(os.environ["ENCODERLAB_HOME"]) / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


# ---- two processes train what one does -------------------------------------------------------------------


def test_classify_last1_with_two_processes_saves_the_single_process_model(tiny_vit_dir, tmp_path):
    data = _jsonl(colour_toy(tmp_path / "img"), tmp_path / "colours.jsonl", captions=False)  # 8 train items
    spec = f"hf-vision:{tiny_vit_dir}"
    two, one = _check_pair(tmp_path, spec, [
        "--encoder", spec, "--data", f"jsonl:{data}", "--objective", "classify", "--train", "last:1", "--epochs",
        "2", "--batch-size", "4", "--lr", "1e-3", "--device", "cpu", "--n-boot", "100", "--json"])
    assert two["metrics"]["top1"] == pytest.approx(one["metrics"]["top1"])
    saved = json.loads((tmp_path / "p2" / "model" / "encoderlab.json").read_text())["train"]
    assert saved["history"][-1]["train_loss"] == pytest.approx(
        json.loads((tmp_path / "p1" / "model" / "encoderlab.json").read_text())["train"]["history"][-1]["train_loss"],
        abs=TOL)


def test_contrastive_with_two_processes_uses_global_negatives(tiny_clip_dir, tmp_path):
    # 9 train images x 2 captions = 18 pairs (a caption shared by all): 3 global batches of 6, 3 pairs a rank
    data = _jsonl(caption_toy(tmp_path / "img"), tmp_path / "pairs.jsonl", captions=True)
    spec = f"hf:{tiny_clip_dir}"
    two, one = _check_pair(tmp_path, spec, [
        "--encoder", spec, "--data", f"jsonl:{data}", "--objective", "contrastive", "--train", "last:1",
        "--epochs", "2", "--batch-size", "6", "--lr", "1e-3", "--device", "cpu", "--n-boot", "100", "--json"])
    assert two["metrics"]["i2t_R@1"] == pytest.approx(one["metrics"]["i2t_R@1"])
    # a local-only loss (each rank's 3 pairs as the whole batch) trains another model: the check above can fail
    hist = [json.loads((tmp_path / f"p{n}" / "model" / "encoderlab.json").read_text())["train"]["history"]
            for n in (2, 1)]
    assert [h["train_loss"] for h in hist[0]] == pytest.approx([h["train_loss"] for h in hist[1]], abs=TOL)


# ---- a bad option fails every rank, at once ---------------------------------------------------------------


def _ranks_by_hand(args: list[str], envs: list[dict[str, str]]) -> list[subprocess.CompletedProcess[str]]:
    """The 2 processes torchrun would start (its variables set by hand), so each rank's exit code is seen."""
    port = str(dp.free_port())
    return _finish([subprocess.Popen([sys.executable, "-m", "encoderlab", "finetune", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                              MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **envs[r]))
                    for r in range(2)])


def test_a_bad_option_fails_every_rank_at_once(tiny_clip_dir, tmp_path):
    (tmp_path / "taken").write_text("a file, not a model directory")
    args = ["--encoder", f"hf:{tiny_clip_dir}", "--data", "jsonl:missing.jsonl", "--device", "cpu", "--json",
            "--train", "last:1", "--out", str(tmp_path / "taken")]
    ranks = _ranks_by_hand(args, [{}, {}])  # checked before joining: no rank waits for another
    assert [p.returncode for p in ranks] == [1, 1], [p.stderr for p in ranks]  # each rank fails by itself
    assert "is a file" in _one_json(ranks[0])["error"] and ranks[1].stdout == ""  # rank 0 reports
    assert all("is a file" in p.stderr for p in ranks)


def test_a_rank_failing_alone_after_joining_fails_the_others(tiny_clip_dir, tmp_path):
    """Rank 1 cannot open its store (its home's ``store`` is a file); rank 0 must not go on into training alone."""
    home = tmp_path / "home1"
    home.mkdir()
    (home / "store").write_text("not a directory")
    data = _jsonl(caption_toy(tmp_path / "img"), tmp_path / "pairs.jsonl", captions=True)
    args = ["--encoder", f"hf:{tiny_clip_dir}", "--data", f"jsonl:{data}", "--objective", "contrastive", "--train",
            "last:1", "--epochs", "1", "--batch-size", "6", "--device", "cpu", "--json", "--out",
            str(tmp_path / "model")]
    ranks = _ranks_by_hand(args, [{}, {"ENCODERLAB_HOME": str(home)}])
    assert [p.returncode for p in ranks] == [1, 1], [p.stderr[-2000:] for p in ranks]
    assert "another process of the run failed" in _one_json(ranks[0])["error"]
    assert "store" in ranks[1].stderr and ranks[1].stdout == ""
    assert not (tmp_path / "model").exists()


# ---- the helpers, in-process ------------------------------------------------------------------------------


def _helpers_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    res: dict[str, Any] = {}
    marker = Path(out) / "written-by-rank0"

    def fill() -> tuple[int, bool]:  # what rank 0 writes, the others find
        seen = marker.exists()
        if rank == 0:
            marker.write_text("x")
        return rank, seen

    with dp.launched(rank, world, port):
        res["order"] = dp.main_first(fill, "filling")
        try:
            with dp.together("testing"):
                if rank == 1:
                    raise ValueError("rank 1 alone")
        except EncoderlabError as e:
            res["together"] = ("EncoderlabError", e.message)
        except ValueError as e:
            res["together"] = ("ValueError", str(e))
        try:
            dp.main_first(lambda: 1 / 0 if rank == 0 else 1, "failing first")
        except EncoderlabError as e:
            res["main_first"] = ("EncoderlabError", e.message)
        except ZeroDivisionError:
            res["main_first"] = ("ZeroDivisionError", "")
        res["all_ok"] = (dp.all_ok(True), dp.all_ok(rank == 0))
        res["loss"] = _contrastive_loss_diffs(rank, world)
    torch.save(res, Path(out) / f"rank{rank}.pt")


def _contrastive_loss_diffs(rank: int, world: int) -> dict[str, float]:
    """``ContrastiveModel.loss`` inside the group against the 1-process loss of the global batch of 8 pairs.

    ``self`` is duck-typed (the loss reads only the score kind, scale and bias). Caption 0 is in both ranks' halves
    and image 2 twice in rank 0's: positives across ranks come only from the gathered ids.
    """
    from types import SimpleNamespace

    from encoderlab.train.finetune_contrastive import ContrastiveModel
    from encoderlab.train.losses import contrastive_targets, sigmoid_loss, symmetric_infonce

    g = torch.Generator().manual_seed(0)
    zi_all, zt_all = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    img_ids, txt_ids = torch.tensor([0, 1, 2, 2, 3, 4, 5, 6]), torch.tensor([0, 1, 2, 3, 4, 5, 0, 6])
    mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
    diffs: dict[str, float] = {}
    for kind in ("softmax", "sigmoid"):
        fake = SimpleNamespace(score_kind=kind, scale=lambda: 3.0, bias=lambda: -1.0)
        zi, zt = zi_all[mine].clone().requires_grad_(), zt_all[mine].clone().requires_grad_()
        loss = ContrastiveModel.loss(fake, zi, zt, img_ids=img_ids[mine], txt_ids=txt_ids[mine])
        loss.backward()
        ri, rt = zi_all.clone().requires_grad_(), zt_all.clone().requires_grad_()
        pos = contrastive_targets(img_ids, txt_ids)
        ref = sigmoid_loss(ri, rt, 3.0, -1.0, pos) if kind == "sigmoid" else symmetric_infonce(ri, rt, 3.0, pos)
        ref.backward()
        mean = dp.sum_float(loss.item(), torch.device("cpu")) / world  # the ranks' mean is the global loss
        diffs[kind] = max(abs(mean - ref.item()), float((zi.grad / world - ri.grad[mine]).abs().max()),
                          float((zt.grad / world - rt.grad[mine]).abs().max()))
    try:
        ContrastiveModel.loss(fake, zi, zt, contrastive_targets(img_ids[mine], txt_ids[mine]))
    except ValueError as e:  # a local positives matrix cannot make the global loss
        diffs["without_ids"] = "img_ids" in str(e)
    return diffs


def test_helpers_fail_on_every_rank_and_the_contrastive_loss_is_global(tmp_path):
    torch.multiprocessing.spawn(_helpers_worker, args=(2, dp.free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["order"] == (0, False) and r1["order"] == (1, True)  # rank 1 ran after rank 0 wrote the marker
    assert r1["together"] == ("ValueError", "rank 1 alone")
    assert r0["together"][0] == "EncoderlabError" and "another process" in r0["together"][1]
    assert r0["main_first"] == ("ZeroDivisionError", "") and r1["main_first"][0] == "EncoderlabError"
    assert r0["all_ok"] == r1["all_ok"] == (True, False)
    for res in (r0, r1):  # the loss the contrastive fine-tune trains with: global negatives, gathered positives
        assert res["loss"]["softmax"] < TOL and res["loss"]["sigmoid"] < TOL and res["loss"]["without_ids"], res


def test_without_torchrun_the_helpers_are_plain_calls(monkeypatch):
    for name in dp.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    with dp.joined("cpu") as info:
        assert info == dp.DistInfo() and not dist.is_initialized()
        assert dp.main_first(lambda: 7, "x") == 7 and dp.all_ok(True) and not dp.all_ok(False)
        with pytest.raises(ValueError, match="plain"), dp.together("x"):
            raise ValueError("plain")
