"""Data-parallel training (``train.distributed``): 2 CPU processes with gloo give the single-process loss, gradients
and fitted weights on the same global batches; only rank 0 writes checkpoints; a resume is exact on every rank.

The 2-process checks run in one ``torch.multiprocessing.spawn`` (starting processes dominates their cost); each rank
computes the single-process reference itself (the data and inits are seeded) and saves its differences for the
parent to assert on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from encoderlab.errors import EncoderlabError
from encoderlab.train import LoopSettings, decay_groups, fit
from encoderlab.train import checkpoint as ckpt_mod
from encoderlab.train import distributed as dp
from encoderlab.train.checkpoint import CHECKPOINT_NAME
from encoderlab.train.losses import (
    contrastive_targets,
    sigmoid_loss,
    sigmoid_loss_global,
    symmetric_infonce,
    symmetric_infonce_global,
)

GLOO = dist.is_available() and dist.is_gloo_available()
needs_gloo = pytest.mark.skipif(not GLOO, reason="this torch build has no gloo backend (torch.distributed)")

N_PAIRS, D_IMG, D_TXT, D_EMB = 48, 12, 10, 8
TOL = 1e-5


# ---- a tiny two-tower contrastive problem -------------------------------------------------------------------


def problem() -> dict[str, torch.Tensor]:
    """Random tower features; 48 pairs over 40 images and 30 captions, so batches hold shared captions and images."""
    g = torch.Generator().manual_seed(7)
    pair_img = torch.cat([torch.arange(40), torch.randint(0, 40, (8,), generator=g)])
    pair_txt = torch.cat([torch.arange(30), torch.randint(0, 30, (18,), generator=g)])
    order = torch.randperm(N_PAIRS, generator=g)  # spread the duplicates over every batch
    return {"img": torch.randn(40, D_IMG, generator=g), "txt": torch.randn(30, D_TXT, generator=g),
            "pair_img": pair_img[order], "pair_txt": pair_txt[order]}


class TwoTower(torch.nn.Module):
    """Linear heads on both towers and CLIP's log temperature."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.image = torch.nn.Linear(D_IMG, D_EMB, bias=False)
        self.text = torch.nn.Linear(D_TXT, D_EMB)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x_img: torch.Tensor, x_txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(x_img), self.text(x_txt)


def batch(data: dict[str, torch.Tensor], idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tower features and content ids of the pairs ``idx``."""
    pi, pt = data["pair_img"][idx], data["pair_txt"][idx]
    return data["img"][pi], data["txt"][pt], pi, pt


def loss_global(model: torch.nn.Module, data: dict[str, torch.Tensor], idx: torch.Tensor,
                noise: float = 0.0) -> torch.Tensor:
    x_img, x_txt, pi, pt = batch(data, idx)
    if noise:  # draws from the global RNG, different on every rank: a resume must restore each rank's own
        x_img = x_img + noise * torch.randn_like(x_img)
    zi, zt = model(x_img, x_txt)
    return symmetric_infonce_global(zi, zt, model.logit_scale.exp(), pi, pt)


def loss_single(model: torch.nn.Module, data: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    x_img, x_txt, pi, pt = batch(data, idx)
    zi, zt = model(x_img, x_txt)
    return symmetric_infonce(zi, zt, model.logit_scale.exp(), contrastive_targets(pi, pt))


def max_grad_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((pa.grad - pb.grad).abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


SETTINGS = LoopSettings(epochs=3, batch_size=16, lr=0.05, patience=5, warmup_steps=2, max_norm=1.0, accumulate=2,
                        seed=3)


def run_fit(data: dict[str, torch.Tensor], step_loss: Any, *, distributed: bool | None = None,
            ckdir: Path | None = None, fail_at: int = 0, noise: float = 0.0) -> tuple[TwoTower, Any]:
    """A 3-epoch fit (3 global batches of 16 an epoch, a step every 2, clipping, warmup, decay); raises at a call."""
    model = TwoTower()
    calls = [0]

    def step(idx: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == fail_at:
            raise KeyboardInterrupt
        return step_loss(model, data, idx, noise) if noise else step_loss(model, data, idx)

    def evaluate() -> tuple[float, dict[str, float]]:
        with torch.no_grad():  # the full set as a "val set": the same on every rank
            return -float(loss_single(model, data, torch.arange(N_PAIRS))), {"scale": float(model.logit_scale)}

    result = fit(model, step, N_PAIRS, decay_groups(model.named_parameters(), 0.1), evaluate, SETTINGS,
                 distributed=distributed, checkpoint_dir=ckdir, checkpoint_every=1)
    return model, result


# ---- the 2-process worker ---------------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    out_dir = Path(out)
    data = problem()
    res: dict[str, Any] = {}
    with dp.launched(rank, world, port) as info:
        res["info"] = (info.rank, info.world, info.backend, dp.is_main())
        # one global batch of 16 pairs (with duplicates); this rank takes its half
        idx = torch.arange(16)
        local = dp.shard_indices(idx, rank, world)
        ref = TwoTower()
        ref_loss = loss_single(ref, data, idx)
        ref_loss.backward()

        model = TwoTower()
        loss = loss_global(model, data, local)
        loss.backward()
        dp.average_gradients(list(model.parameters()))
        res["loss_diff"] = abs(dp.sum_float(loss.item(), torch.device("cpu")) / world - ref_loss.item())
        res["grad_diff"] = max_grad_diff(model, ref)

        # the same through torch's DistributedDataParallel wrapper, whose all-reduce averages
        ddp = torch.nn.parallel.DistributedDataParallel(TwoTower())
        x_img, x_txt, pi, pt = batch(data, local)
        zi, zt = ddp(x_img, x_txt)
        symmetric_infonce_global(zi, zt, ddp.module.logit_scale.exp(), pi, pt).backward()
        res["ddp_grad_diff"] = max_grad_diff(ddp.module, ref)

        # the sigmoid loss: rows of the local images against every caption
        ref, model = TwoTower(), TwoTower()
        x_img, x_txt, pi, pt = batch(data, idx)
        ref_sig = sigmoid_loss(*ref(x_img, x_txt), ref.logit_scale.exp(), -2.0, contrastive_targets(pi, pt))
        ref_sig.backward()
        x_img, x_txt, pi, pt = batch(data, local)
        sig = sigmoid_loss_global(*model(x_img, x_txt), model.logit_scale.exp(), -2.0, pi, pt)
        sig.backward()
        dp.average_gradients(list(model.parameters()))
        res["sig_loss_diff"] = abs(dp.sum_float(sig.item(), torch.device("cpu")) / world - ref_sig.item())
        res["sig_grad_diff"] = max_grad_diff(model, ref)

        # a 2-process fit against a 1-process fit of the same global batches; count who writes checkpoints
        writes: list[int] = []
        real_save = ckpt_mod.save

        def counting_save(directory: Path, payload: dict[str, Any]) -> None:
            writes.append(rank)
            real_save(directory, payload)

        ckpt_mod.save = counting_save
        try:
            torch.manual_seed(100 + rank)
            model, fitted = run_fit(data, loss_global, ckdir=out_dir / "ck")
        finally:
            ckpt_mod.save = real_save
        res["writes"] = len(writes)
        res["world"] = fitted.world
        ref_model, ref_fit = run_fit(data, loss_single, distributed=False)
        res["fit_weight_diff"] = max_weight_diff(model.state_dict(), ref_model.state_dict())
        res["fit_loss_diff"] = max(abs(a["train_loss"] - b["train_loss"])
                                   for a, b in zip(fitted.history, ref_fit.history))
        res["epochs"] = (len(fitted.history), len(ref_fit.history), fitted.best_epoch, ref_fit.best_epoch)

        # exact resume: feature noise from each rank's own global RNG, interrupted mid-epoch 2, resumed
        torch.manual_seed(100 + rank)
        whole, _ = run_fit(data, loss_global, ckdir=out_dir / "whole", noise=0.05)
        torch.manual_seed(100 + rank)
        with pytest.raises(KeyboardInterrupt):
            run_fit(data, loss_global, ckdir=out_dir / "cut", fail_at=6, noise=0.05)  # after a mid-epoch step
        torch.manual_seed(999)  # whatever this process's RNG holds now: the checkpoint's states win
        resumed, resumed_fit = run_fit(data, loss_global, ckdir=out_dir / "cut", noise=0.05)
        res["resumed_at"] = resumed_fit.resumed_at
        res["resume_diff"] = max_weight_diff(resumed.state_dict(), whole.state_dict())
        dp.barrier()
        if rank == 0:  # a single process may not continue a 2-process run (other shards, other batches)
            with pytest.raises(EncoderlabError, match="2 process"):
                run_fit(data, loss_single, distributed=False, ckdir=out_dir / "whole")
    torch.save(res, out_dir / f"rank{rank}.pt")


@needs_gloo
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    port = dp.free_port()
    torch.multiprocessing.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["info"] == (rank, 2, "gloo", rank == 0)
        assert res["loss_diff"] < TOL and res["grad_diff"] < TOL, res  # the gathered loss and averaged gradients
        assert res["ddp_grad_diff"] < TOL, res  # DDP's averaging gives the same: no loss scaling by the world
        assert res["sig_loss_diff"] < TOL and res["sig_grad_diff"] < TOL, res
        assert res["fit_weight_diff"] < TOL and res["fit_loss_diff"] < TOL, res
        assert res["epochs"] == (3, 3, res["epochs"][3], res["epochs"][3]) and res["world"] == 2
        assert res["resumed_at"] > 0 and res["resume_diff"] < 1e-7, res  # each rank restored its own RNG
    assert results[0]["writes"] > 0 and results[1]["writes"] == 0  # only rank 0 wrote the checkpoint
    assert (tmp_path / "ck" / CHECKPOINT_NAME).is_file()


# ---- single-process parts -----------------------------------------------------------------------------------


def test_shards_are_equal_strided_and_drop_the_remainder():
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    shards = [dp.shard_indices(perm, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert sorted(torch.cat(shards).tolist()) == sorted(perm[:9].tolist())  # the last 11 % 3 items are left out
    # each rank's batch b together: a contiguous block of the permutation
    blocks = [torch.tensor_split(s, 3) for s in shards]
    assert sorted(torch.cat([blocks[r][1] for r in range(3)]).tolist()) == sorted(perm[3:6].tolist())
    assert torch.equal(dp.shard_indices(perm, 0, 1), perm)
    with pytest.raises(EncoderlabError, match="cannot be shared"):
        dp.shard_indices(perm[:1], 0, 2)


def test_without_a_process_group_the_global_losses_are_the_single_process_ones():
    data = problem()
    idx = torch.arange(16)
    x_img, x_txt, pi, pt = batch(data, idx)
    zi, zt = TwoTower()(x_img, x_txt)
    mask = contrastive_targets(pi, pt)
    assert torch.allclose(symmetric_infonce_global(zi, zt, 5.0, pi, pt), symmetric_infonce(zi, zt, 5.0, mask))
    assert torch.allclose(symmetric_infonce_global(zi, zt, 5.0), symmetric_infonce(zi, zt, 5.0))
    assert torch.allclose(sigmoid_loss_global(zi, zt, 5.0, -1.0, pi, pt), sigmoid_loss(zi, zt, 5.0, -1.0, mask))
    assert dp.all_gather_with_grad(zi) is zi and dp.world() == 1 and dp.is_main()


def test_init_from_env_outside_torchrun_is_a_single_process(monkeypatch):
    for name in dp.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert dp.init_from_env("cpu") == dp.DistInfo()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(EncoderlabError, match="WORLD_SIZE must be an integer"):
        dp.init_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(EncoderlabError, match="MASTER_ADDR is not set"):
        dp.init_from_env("cpu")
    assert not dist.is_initialized()


def test_fit_distributed_true_needs_a_process_group():
    model = TwoTower()
    with pytest.raises(EncoderlabError, match="initialised process group"):
        fit(model, lambda idx: model.logit_scale * 0, 8, decay_groups(model.named_parameters(), 0.0),
            lambda: (0.0, {}), LoopSettings(epochs=1, batch_size=4, lr=0.1, patience=1), distributed=True)


def test_fit_refuses_fewer_items_or_a_smaller_batch_than_processes(monkeypatch):
    monkeypatch.setattr(dp, "active", lambda: True)  # a pretend group of 4: the checks come before any collective
    monkeypatch.setattr(dp, "world", lambda: 4)
    monkeypatch.setattr(dp, "rank", lambda: 0)
    model = TwoTower()
    groups = decay_groups(model.named_parameters(), 0.0)
    with pytest.raises(EncoderlabError, match="3 items cannot be shared by 4"):
        fit(model, lambda idx: model.logit_scale * 0, 3, groups, lambda: (0.0, {}),
            LoopSettings(epochs=1, batch_size=4, lr=0.1, patience=1))
    with pytest.raises(EncoderlabError, match="batch_size 2 is smaller than the 4 processes"):
        fit(model, lambda idx: model.logit_scale * 0, 8, groups, lambda: (0.0, {}),
            LoopSettings(epochs=1, batch_size=2, lr=0.1, patience=1))
