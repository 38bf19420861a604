"""Data-parallel ``loop.fit`` on GPUs: 2 processes against 1 on the same global batches, with NCCL where it can.

    python bench/ddp_check.py            # 2+ GPUs: nccl, one GPU each; 1 GPU: gloo, both on it; none: gloo on CPU

Two processes (``torch.multiprocessing.spawn``, rendezvous on 127.0.0.1) each take half of a global batch of a
two-tower contrastive problem (linear heads on random features, shared captions and images in every batch) and
compare with one process on the whole batch: the gathered loss (``symmetric_infonce_global``), the head gradients
after ``distributed.average_gradients`` and after torch's ``DistributedDataParallel``, and the weights after a
3-epoch fp32 ``fit`` (clipping, accumulation, warmup). Also: only rank 0 wrote the checkpoint, and a run
interrupted mid-epoch and resumed ends with the uninterrupted run's weights. Prints the max differences; exits 0
when they are within ``TOL`` (GPU reductions need not be bitwise equal across batch shapes), 1 otherwise.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from encoderlab.train import LoopSettings, decay_groups, fit
from encoderlab.train import checkpoint as ckpt_mod
from encoderlab.train import distributed as dp
from encoderlab.train.checkpoint import CHECKPOINT_NAME
from encoderlab.train.losses import contrastive_targets, symmetric_infonce, symmetric_infonce_global

N_PAIRS, N_IMG, N_TXT, D_IMG, D_TXT, D_EMB = 1024, 900, 600, 384, 256, 128
SETTINGS = LoopSettings(epochs=3, batch_size=256, lr=1e-3, patience=5, warmup_steps=2, max_norm=1.0, accumulate=2,
                        seed=3, precision="fp32")
TOL = 1e-4  # fp32 on GPU: the same sums in other shapes and orders


def problem(device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    pair_img = torch.cat([torch.arange(N_IMG), torch.randint(0, N_IMG, (N_PAIRS - N_IMG,), generator=g)])
    pair_txt = torch.cat([torch.arange(N_TXT), torch.randint(0, N_TXT, (N_PAIRS - N_TXT,), generator=g)])
    order = torch.randperm(N_PAIRS, generator=g)
    data = {"img": torch.randn(N_IMG, D_IMG, generator=g), "txt": torch.randn(N_TXT, D_TXT, generator=g),
            "pair_img": pair_img[order], "pair_txt": pair_txt[order]}
    return {k: v.to(device) for k, v in data.items()}


class TwoTower(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(D_IMG, D_EMB, bias=False)
        self.text = torch.nn.Linear(D_TXT, D_EMB)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x_img: torch.Tensor, x_txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(x_img), self.text(x_txt)


def losses(model: torch.nn.Module, data: dict[str, torch.Tensor], idx: torch.Tensor, gathered: bool,
           noise: float = 0.0) -> torch.Tensor:
    idx = idx.to(data["pair_img"].device)
    pi, pt = data["pair_img"][idx], data["pair_txt"][idx]
    x_img = data["img"][pi]
    if noise:  # each rank's own global RNG
        x_img = x_img + noise * torch.randn_like(x_img)
    zi, zt = model(x_img, data["txt"][pt])
    scale = (model.module if hasattr(model, "module") else model).logit_scale.exp()
    if gathered:
        return symmetric_infonce_global(zi, zt, scale, pi, pt)
    return symmetric_infonce(zi, zt, scale, contrastive_targets(pi, pt))


def grad_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((pa.grad - pb.grad).abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))


def weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def run_fit(data: dict[str, torch.Tensor], device: torch.device, gathered: bool, ckdir: Path | None = None,
            fail_at: int = 0, noise: float = 0.0) -> tuple[TwoTower, Any]:
    model = TwoTower().to(device)
    calls = [0]

    def step(idx: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == fail_at:
            raise KeyboardInterrupt
        return losses(model, data, idx, gathered, noise)

    def evaluate() -> tuple[float, dict[str, float]]:
        with torch.no_grad():
            return -float(losses(model, data, torch.arange(N_PAIRS), gathered=False)), {}

    result = fit(model, step, N_PAIRS, decay_groups(model.named_parameters(), 0.1), evaluate, SETTINGS,
                 distributed=gathered, checkpoint_dir=ckdir, checkpoint_every=1)
    return model, result


def worker(rank: int, world: int, port: int, backend: str, device: str, out: str) -> None:
    out_dir, res = Path(out), {}
    with dp.launched(rank, world, port, device=device, backend=backend) as info:
        dev = info.device
        data = problem(dev)
        idx = torch.arange(SETTINGS.batch_size)
        local = dp.shard_indices(idx, rank, world)
        ref = TwoTower().to(dev)
        ref_loss = losses(ref, data, idx, gathered=False)
        ref_loss.backward()
        model = TwoTower().to(dev)
        loss = losses(model, data, local, gathered=True)
        loss.backward()
        dp.average_gradients(list(model.parameters()))
        res["loss"] = abs(dp.sum_float(loss.item(), dev) / world - ref_loss.item())
        res["grads"] = grad_diff(model, ref)
        ddp = torch.nn.parallel.DistributedDataParallel(TwoTower().to(dev),
                                                        device_ids=[dev.index] if dev.type == "cuda" else None)
        losses(ddp, data, local, gathered=True).backward()
        res["ddp_grads"] = grad_diff(ddp.module, ref)

        writes, real_save = [], ckpt_mod.save
        ckpt_mod.save = lambda d, p: (writes.append(rank), real_save(d, p))[1]
        try:
            t0 = time.perf_counter()
            fitted, _ = run_fit(data, dev, gathered=True, ckdir=out_dir / "ck")
            res["fit_seconds_2proc"] = round(time.perf_counter() - t0, 3)
        finally:
            ckpt_mod.save = real_save
        single, _ = run_fit(data, dev, gathered=False)
        res["fit_weights"] = weight_diff(fitted, single)
        res["writes"] = len(writes)

        torch.manual_seed(100 + rank)
        whole, _ = run_fit(data, dev, True, out_dir / "whole", noise=0.05)
        torch.manual_seed(100 + rank)
        try:
            run_fit(data, dev, True, out_dir / "cut", fail_at=8, noise=0.05)  # after a mid-epoch step
        except KeyboardInterrupt:
            pass
        torch.manual_seed(999)
        resumed, r = run_fit(data, dev, True, out_dir / "cut", noise=0.05)
        res["resume_weights"], res["resumed_at"] = weight_diff(resumed, whole), r.resumed_at
        res["backend"], res["device"] = info.backend, str(dev)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res))


def main() -> int:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend, device = ("nccl", "cuda") if gpus >= 2 else ("gloo", "cuda" if gpus == 1 else "cpu")
    print(f"{gpus} GPU(s): 2 processes, backend {backend}, device {device}")
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(worker, args=(2, dp.free_port(), backend, device, tmp), nprocs=2, join=True)
        results = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
        wrote = (Path(tmp) / "ck" / CHECKPOINT_NAME).is_file()
    ok = wrote and results[0]["writes"] > 0 and results[1]["writes"] == 0
    for rank, res in enumerate(results):
        print(f"rank {rank}: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) and k != "fit_seconds_2proc"
                                            else f"{k} {v}" for k, v in res.items()))
        ok &= all(res[k] <= TOL for k in ("loss", "grads", "ddp_grads", "fit_weights", "resume_weights"))
        ok &= res["resumed_at"] > 0
    print(f"checkpoint written by rank 0 only: {wrote and results[1]['writes'] == 0}")
    print("OK" if ok else f"FAILED (tolerance {TOL})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
