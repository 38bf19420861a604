"""Checkpoints of ``loop.fit``: a run killed mid-epoch and resumed ends exactly where an uninterrupted one does;
other settings are refused before any work; writes are atomic; only the trainable state is saved."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from encoderlab.errors import EncoderlabError
from encoderlab.train import LoopSettings, decay_groups, fit
from encoderlab.train import checkpoint as ckpt_mod
from encoderlab.train.checkpoint import CHECKPOINT_NAME, work_dir

# A small regression with dropout (torch's global RNG), numpy and python noise in the loss (their RNGs), gradient
# accumulation, clipping, warmup and mid-epoch checkpoints: everything a resume has to restore to be exact.
WORKER = textwrap.dedent('''
    import os, random, signal, sys
    import numpy as np, torch
    from encoderlab.train import LoopSettings, decay_groups, fit

    out, ckdir, kill_at = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
    torch.manual_seed(0); np.random.seed(0); random.seed(0)
    X = torch.randn(90, 6)
    Y = X @ torch.randn(6, 2) + 0.1 * torch.randn(90, 2)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2))
    calls = 0

    def step(idx):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        noise = 1e-3 * np.random.normal() + 1e-3 * random.random()
        return ((model(X[idx]) - Y[idx]) ** 2).mean() + noise

    def evaluate():
        with torch.no_grad():
            return -float(((model(X) - Y) ** 2).mean()), {"draw": random.random()}

    settings = LoopSettings(epochs=6, batch_size=8, lr=0.01, patience=10, warmup_steps=5, max_norm=1.0,
                            accumulate=2, seed=1)
    r = fit(model, step, 90, decay_groups(model.named_parameters(), 0.1), evaluate, settings,
            checkpoint_dir=ckdir, checkpoint_every=2)
    torch.save({"state": model.state_dict(), "history": r.history, "best": r.best_epoch,
                "resumed_at": r.resumed_at, "calls": calls}, out)
''')


def _without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ck = tmp_path / "ck"

    def start(out: str, ckdir: str, kill_at: int) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny matmuls; two workers share the cores
        return subprocess.Popen([sys.executable, str(script), str(tmp_path / out), ckdir, str(kill_at)],
                                stderr=subprocess.PIPE, text=True, env=env)

    # 12 batches an epoch, an optimizer step every 2, a checkpoint every 2 steps: the 33rd batch is batch 9 of
    # epoch 3, after the checkpoint at step 16 (8 batches into epoch 3), before the next one
    ref, killed = start("ref.pt", "", 0), start("killed.pt", str(ck), 33)
    assert killed.wait(timeout=60) == -9, killed.stderr.read()
    assert (ck / CHECKPOINT_NAME).is_file() and not (tmp_path / "killed.pt").exists()
    saved = torch.load(ck / CHECKPOINT_NAME, weights_only=True)
    assert (saved["run"]["epoch"], saved["run"]["position"], saved["optimizer"]["steps"]) == (3, 8, 16)
    resumed = start("resumed.pt", str(ck), 0)
    assert resumed.wait(timeout=60) == 0, resumed.stderr.read()
    assert ref.wait(timeout=60) == 0, ref.stderr.read()
    a, b = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "resumed.pt")
    assert b["resumed_at"] == 16 and b["calls"] == 6 * 12 - 32  # it did resume, and ran only what was left
    for name, value in a["state"].items():
        assert torch.equal(value, b["state"][name]), name  # bitwise
    assert _without_seconds(a["history"]) == _without_seconds(b["history"]) and a["best"] == b["best"]
    assert len(a["history"]) == 6


class Net(torch.nn.Module):
    """A frozen 'backbone' (not saved), a trainable head with a norm buffer, and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Linear(5, 8).requires_grad_(False)
        self.head = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.1),
                                        torch.nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def train(ck: Path | None, fail_at: int = 0, *, lr: float = 0.05, epochs: int = 4, **kw):
    """One fit in its own global-RNG sandbox; the step raises at call ``fail_at``. Returns (model, result, calls)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        X, y = torch.randn(40, 5), torch.randn(40, 1)
        model, calls = Net(), [0]

        def step(idx: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == fail_at:
                raise KeyboardInterrupt  # Ctrl-C in the middle of an epoch
            return ((model(X[idx]) - y[idx]) ** 2).mean()

        def evaluate() -> tuple[float, dict[str, float]]:
            with torch.no_grad():
                return -float(((model(X) - y) ** 2).mean()), {}

        settings = LoopSettings(epochs=epochs, batch_size=6, lr=lr, patience=2, seed=2)
        result = fit(model, step, 40, decay_groups(model.named_parameters(), 0.01), evaluate, settings,
                     checkpoint_dir=ck, checkpoint_every=3, run_config={"data": "toy-v1"}, **kw)
    return model, result, calls[0]


def test_an_exception_at_step_k_resumes_identically(tmp_path):
    ref_model, ref, _ = train(None)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "ck", fail_at=12)  # 7 batches an epoch: step 12 is in epoch 2, after step 9's checkpoint
    model, result, calls = train(tmp_path / "ck")
    assert result.resumed_at == 9 and calls == len(ref.history) * 7 - 9
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert _without_seconds(result.history) == _without_seconds(ref.history)
    assert result.best_epoch == ref.best_epoch and result.best_metric == ref.best_metric


def test_other_settings_fail_before_any_work_and_no_resume_starts_over(tmp_path):
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        train(ck, fail_at=5, lr=0.01)
    step_calls = []
    with pytest.raises(EncoderlabError, match=r"checkpoint in .*ck' was written by a run with different settings "
                                              r"\(checkpoint vs this run: lr 0.01 vs 0.005\) \(pass a new --out or "
                                              r"--no-resume"):
        step_calls.append(train(ck, lr=0.005))
    assert step_calls == []
    with pytest.raises(EncoderlabError, match="data toy-v1 vs toy-v2"):
        with torch.random.fork_rng(devices=[]):
            model = Net()
            fit(model, lambda idx: model(torch.randn(len(idx), 5)).sum(), 40, decay_groups(model.named_parameters(),
                0.01), lambda: (0.0, {}), LoopSettings(epochs=4, batch_size=6, lr=0.01, patience=2, seed=2),
                checkpoint_dir=ck, run_config={"data": "toy-v2"})
    _, fresh, calls = train(ck, lr=0.005, resume=False)
    assert fresh.resumed_at == 0 and calls == len(fresh.history) * 7
    _, ref, _ = train(None, lr=0.005)
    assert _without_seconds(fresh.history) == _without_seconds(ref.history)


def test_a_completed_run_is_not_trained_again(tmp_path):
    ck = tmp_path / "ck"
    model, first, calls = train(ck)
    assert calls > 0 and torch.load(ck / CHECKPOINT_NAME, weights_only=True)["run"]["complete"] is True
    again_model, again, calls = train(ck)
    assert calls == 0 and again.history == first.history and again.best_epoch == first.best_epoch
    for a, b in zip(model.state_dict().values(), again_model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(EncoderlabError, match="epochs 4 vs 6"):  # more epochs are another run, not a resume
        train(ck, epochs=6)


def test_only_the_trainable_state_is_saved(tmp_path):
    train(tmp_path / "ck")
    saved = torch.load(tmp_path / "ck" / CHECKPOINT_NAME, weights_only=True)
    assert not any(k.startswith("backbone.") for k in saved["model"])
    assert {"head.0.weight", "head.1.running_mean", "head.1.num_batches_tracked", "head.3.bias"} <= set(saved["model"])
    assert set(saved["rng"]) == {"loop", "torch", "cuda", "numpy", "python"}
    assert set(saved["settings"]) == {"loop", "items", "client", "trainable"} and saved["settings"]["items"] == 40


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        train(ck, fail_at=12)
    before = (ck / CHECKPOINT_NAME).read_bytes()
    real_save = torch.save

    def half_save(obj, f):  # writes part of the file, then the disk fills up
        f.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", half_save)
    with pytest.raises(OSError, match="No space"):
        train(ck)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert (ck / CHECKPOINT_NAME).read_bytes() == before and sorted(p.name for p in ck.iterdir()) == [CHECKPOINT_NAME]
    (ck / f".{CHECKPOINT_NAME}.x1y2.tmp").write_bytes(b"what a SIGKILL mid-write leaves")
    _, result, _ = train(ck)
    assert result.resumed_at == 9 and sorted(p.name for p in ck.iterdir()) == [CHECKPOINT_NAME]


def test_a_damaged_checkpoint_is_named_with_the_fix(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderlabError, match=r"checkpoint '.*checkpoint.pt' cannot be read.*--no-resume"):
        train(ck)
    assert train(ck, resume=False)[1].resumed_at == 0


def test_work_dir_is_a_hidden_sibling(tmp_path):
    assert work_dir(tmp_path / "models" / "aligned") == tmp_path / "models" / ".aligned.train"
    assert work_dir(str(tmp_path / "m") + "/") == tmp_path / ".m.train"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_trains_and_resumes(tmp_path, precision):
    torch.manual_seed(0)
    X, y = torch.randn(64, 16, device="cuda"), torch.randn(64, 1, device="cuda")
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1)).cuda()
    dtypes: list[torch.dtype] = []

    def step(idx: torch.Tensor) -> torch.Tensor:
        out = model(X[idx.cuda()])
        dtypes.append(out.dtype)
        return ((out.float() - y[idx.cuda()]) ** 2).mean()

    settings = LoopSettings(epochs=3, batch_size=8, lr=1e-2, patience=3, max_norm=1.0, precision=precision)
    r = fit(model, step, 64, decay_groups(model.named_parameters(), 0.0), lambda: (0.0, {}), settings,
            checkpoint_dir=tmp_path / "ck")
    assert r.precision == precision and set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float16}
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in r.history)
    scaler = torch.load(tmp_path / "ck" / CHECKPOINT_NAME, weights_only=True)["optimizer"]["scaler"]
    assert bool(scaler) == (precision == "fp16")  # the GradScaler's scale is saved for fp16 only


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_mixed_precision_path_on_cpu_autocast(tmp_path, monkeypatch, precision):
    """The CUDA code path (autocast, GradScaler scale/unscale/step/update, its checkpoint) run on CPU autocast."""
    import encoderlab.train.loop as loop

    monkeypatch.setattr(loop, "resolve_precision", lambda p, device: p)  # what a CUDA device would get
    dtypes: list[torch.dtype] = []

    def train_amp(ck: Path, fail_at: int = 0):
        torch.manual_seed(0)
        X, y = torch.randn(32, 8), torch.randn(32, 1)
        model, calls = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)), [0]

        def step(idx: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == fail_at:
                raise KeyboardInterrupt
            out = model(X[idx])
            dtypes.append(out.dtype)
            return ((out.float() - y[idx]) ** 2).mean()

        settings = LoopSettings(epochs=3, batch_size=4, lr=0.01, patience=3, max_norm=0.5, precision=precision)
        return model, fit(model, step, 32, decay_groups(model.named_parameters(), 0.0), lambda: (0.0, {}), settings,
                          checkpoint_dir=ck, checkpoint_every=3)

    ref_model, ref = train_amp(tmp_path / "ref")
    assert ref.precision == precision and set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float16}
    scaler = torch.load(tmp_path / "ref" / CHECKPOINT_NAME, weights_only=True)["optimizer"]["scaler"]
    assert bool(scaler) == (precision == "fp16") and (not scaler or scaler["scale"] > 0)
    with pytest.raises(KeyboardInterrupt):
        train_amp(tmp_path / "ck", fail_at=13)
    model, resumed = train_amp(tmp_path / "ck")
    assert resumed.resumed_at == 12
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
