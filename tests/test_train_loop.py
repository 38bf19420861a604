"""The shared training loop: schedule, early stopping with the best state, decay groups, clipping, gradient
accumulation, precision, the progress bar; model-directory writes (``atomic.replace_entries``)."""

from __future__ import annotations

import math
import os
import stat
import warnings

import pytest
import torch

from encoderlab.atomic import process_umask, replace_entries
from encoderlab.errors import EncoderlabError
from encoderlab.train import LoopSettings, decay_groups, fit, lr_at
from encoderlab.train.schedule import capped_warmup, steps_per_epoch

# ---- schedule ------------------------------------------------------------------------------------------


def test_schedule_matches_a_hand_computation():
    # warmup 4 of 20 steps at base 0.2: 0.05, 0.10, 0.15, 0.20; then cosine over the remaining 16 steps
    assert [lr_at(s, 20, 0.2, 4, "cosine") for s in range(4)] == pytest.approx([0.05, 0.10, 0.15, 0.20])
    assert lr_at(4, 20, 0.2, 4, "cosine") == pytest.approx(0.2)
    assert lr_at(12, 20, 0.2, 4, "cosine") == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))  # 0.1
    assert lr_at(20, 20, 0.2, 4, "cosine") == pytest.approx(0.0)
    assert lr_at(99, 20, 0.2, 4, "cosine") == pytest.approx(0.0)  # past the end: stays at zero
    assert lr_at(12, 20, 0.2, 4, "constant") == 0.2
    assert lr_at(7, 20, 0.2, 4, "cosine") == lr_at(7, 20, 0.2, 4, "cosine")  # pure: same inputs, same rate
    assert steps_per_epoch(10, 4) == 3 and steps_per_epoch(0, 4) == 1
    assert capped_warmup(50, 100) == 10 and capped_warmup(5, 100) == 5


# ---- the loop ------------------------------------------------------------------------------------------


class Scripted(torch.nn.Module):
    """One weight; the evaluation reads a scripted metric per epoch, so the best epoch is known in advance."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 2))


def scripted_fit(metrics: list[float], patience: int, **kw):
    model = Scripted()
    seen: list[torch.Tensor] = []

    def step(idx: torch.Tensor) -> torch.Tensor:
        return ((model.w - 1.0) ** 2).sum() * len(idx)

    def evaluate() -> tuple[float, dict[str, float]]:
        seen.append(model.w.detach().clone())
        return metrics[len(seen) - 1], {"w": float(model.w.detach().sum())}

    settings = LoopSettings(epochs=len(metrics), batch_size=4, lr=0.1, patience=patience, **kw)
    result = fit(model, step, 8, decay_groups(model.named_parameters(), 0.0), evaluate, settings)
    return model, result, seen


def test_early_stopping_keeps_the_best_epochs_state():
    model, result, seen = scripted_fit([0.1, 0.5, 0.3, 0.2, 0.9], patience=2)
    assert result.best_epoch == 2 and result.best_metric == 0.5
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]  # two epochs without improvement: stop
    assert {"train_loss", "val_metric", "w", "lr", "seconds"} <= set(result.history[0])
    assert torch.equal(model.w.detach(), seen[1]) and torch.equal(result.best_state["w"], seen[1])
    assert not torch.equal(seen[1], seen[3])  # it did train past the best epoch, then went back


def test_fit_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _, a, _ = scripted_fit([0.1, 0.2, 0.3], patience=5, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    _, b, _ = scripted_fit([0.1, 0.2, 0.3], patience=5, seed=3)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]


def test_bad_settings_name_the_value():
    with pytest.raises(EncoderlabError, match="patience must be a positive integer"):
        LoopSettings(epochs=1, batch_size=2, lr=0.1, patience=0).check()
    with pytest.raises(EncoderlabError, match="unknown schedule 'step'"):
        LoopSettings(epochs=1, batch_size=2, lr=0.1, patience=1, schedule="step").check()


def test_decay_groups_exclude_biases_norms_and_the_temperature():
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 3)
            self.norm = torch.nn.LayerNorm(3)
            self.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
            self.frozen = torch.nn.Linear(3, 3, bias=False).requires_grad_(False)
            self.norm_proj = torch.nn.Parameter(torch.ones(3, 3))  # 2-D, but its name says norm
            self.prompt_learner = torch.nn.Module()
            self.prompt_learner.ctx = torch.nn.Parameter(torch.zeros(4, 3))  # CoOp's learned context: no decay

    groups = decay_groups(Net().named_parameters(), 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert groups[0]["names"] == ["proj.weight"]
    assert sorted(groups[1]["names"]) == ["logit_scale", "norm.bias", "norm.weight", "norm_proj", "proj.bias",
                                          "prompt_learner.ctx"]
    assert decay_groups(Net().named_parameters(), 0.1, no_decay=())[0]["names"] == ["norm_proj", "proj.weight",
                                                                                    "prompt_learner.ctx"]
    torch.optim.AdamW(groups, lr=1e-3)  # the extra "names" key is accepted by the optimizer


def test_clipping_bounds_the_gradient_norm():
    def grad_norm_after_one_step(max_norm: float | None) -> float:
        model = Scripted()
        norms: list[float] = []

        def step(idx: torch.Tensor) -> torch.Tensor:
            return 1000.0 * ((model.w - 1.0) ** 2).sum()  # gradient norm 4000 at w = 0

        def record() -> None:
            norms.append(float(model.w.grad.norm()))

        settings = LoopSettings(epochs=1, batch_size=8, lr=0.1, patience=1, max_norm=max_norm)
        fit(model, step, 8, decay_groups(model.named_parameters(), 0.0), lambda: (0.0, {}), settings,
            after_step=record)
        return norms[0]

    assert grad_norm_after_one_step(None) == pytest.approx(4000.0)
    assert grad_norm_after_one_step(1.0) == pytest.approx(1.0, rel=1e-5)


def regression_fit(batch_size: int, accumulate: int, epochs: int = 3, **kw):
    """A linear regression on fixed data; mean-squared loss per batch."""
    torch.manual_seed(0)
    X, y = torch.randn(48, 5), torch.randn(48, 1)
    model = torch.nn.Linear(5, 1)
    grads: list[torch.Tensor] = []

    def step(idx: torch.Tensor) -> torch.Tensor:
        return ((model(X[idx]) - y[idx]) ** 2).mean()

    settings = LoopSettings(epochs=epochs, batch_size=batch_size, lr=0.05, patience=epochs, warmup_steps=10,
                            accumulate=accumulate, **kw)
    result = fit(model, step, 48, decay_groups(model.named_parameters(), 0.0), lambda: (0.0, {}), settings,
                 after_step=lambda: grads.append(model.weight.grad.clone()))
    model.grads = grads  # the gradient each optimizer step used
    return model, result


def test_accumulating_two_batches_equals_one_batch_of_twice_the_size():
    # 48 items: 6 batches of 8 accumulated by 2 visit the same 16 items per step as 3 batches of 16 (same order)
    big, one = regression_fit(16, 1)
    small, acc = regression_fit(8, 2)
    assert acc.total_steps == one.total_steps == 9 and acc.warmup_steps == 0  # the schedule counts optimizer steps
    assert len(small.grads) == 9
    torch.testing.assert_close(small.grads[0], big.grads[0])  # the mean over 16 items, not the sum of two means
    torch.testing.assert_close(small.weight, big.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(small.bias, big.bias, rtol=1e-6, atol=1e-6)
    unaccumulated, plain = regression_fit(8, 1)
    assert plain.total_steps == 18 and not torch.allclose(unaccumulated.weight, big.weight, atol=1e-4)


def test_a_short_last_group_still_steps_on_its_mean():
    # 7 batches a group of 3: steps after batches 3, 6 and 7, each on the mean of its group's losses
    _, r = regression_fit(7, 3, epochs=2)  # 48 items in 7 batches
    assert r.total_steps == 2 * 3
    with pytest.raises(EncoderlabError, match="accumulate must be a positive integer, got 0"):
        regression_fit(8, 0)


def test_precision_is_fp32_on_cpu_and_checked():
    _, r = regression_fit(16, 1, precision="auto", epochs=1)
    assert r.precision == "fp32"
    with pytest.warns(UserWarning, match="precision bf16 is for CUDA; training on cpu runs in fp32"):
        _, r = regression_fit(16, 1, precision="bf16", epochs=1)
    assert r.precision == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regression_fit(16, 1, precision="fp32", epochs=1)
    with pytest.raises(EncoderlabError, match="unknown precision 'half'.*auto, fp32, bf16, fp16"):
        regression_fit(16, 1, precision="half")


def test_progress_bar_shows_epoch_loss_val_and_eta(capsys):
    model = Scripted()
    settings = LoopSettings(epochs=2, batch_size=4, lr=0.1, patience=2)
    fit(model, lambda idx: ((model.w - 1.0) ** 2).sum(), 8, decay_groups(model.named_parameters(), 0.0),
        lambda: (0.25, {}), settings, progress=True, desc="demo")
    err = capsys.readouterr().err
    assert "demo" in err and "epoch=2/2" in err and "loss=" in err and "val=0.250" in err and "best=1" in err
    assert "4/4" in err and "<" in err  # batches done of all, elapsed<remaining (the ETA)


# ---- replace_entries: the one writer of model directories ------------------------------------------------


OWNED = {"model.json", "weights.bin"}


def test_replace_entries_swaps_only_owned_entries_with_umask_permissions(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.json").write_text("old")
    (out / "weights.bin").write_text("old weights")
    (out / "notes.txt").write_text("mine")  # the user's file: never touched
    with replace_entries(out, OWNED, commit="model.json") as tmp:
        assert tmp.parent == tmp_path and tmp != out and not any(tmp.iterdir())
        (tmp / "model.json").write_text("new")
        assert (out / "model.json").read_text() == "old"  # readers still see the old one while it is written
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "notes.txt"]  # stale weights.bin removed
    assert (out / "model.json").read_text() == "new" and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary or swapped-out directory left
    with replace_entries(tmp_path / "fresh" / "deep", OWNED, commit="model.json") as tmp:
        (tmp / "model.json").write_text("a")
    fresh = tmp_path / "fresh" / "deep"
    assert (fresh / "model.json").read_text() == "a"
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o777 & ~process_umask()


def test_replace_entries_failure_keeps_the_previous_content(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.json").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), replace_entries(out, OWNED, commit="model.json") as tmp:
        (tmp / "model.json").write_text("new")
        raise RuntimeError("boom")
    assert (out / "model.json").read_text() == "old"
    # a failure in the middle of the swap moves everything back
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith("weights.bin"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"), replace_entries(out, OWNED, commit="model.json") as tmp:
        (tmp / "model.json").write_text("new")
        (tmp / "weights.bin").write_text("new weights")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["model.json"] and (out / "model.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(EncoderlabError, match="is a file"), replace_entries(tmp_path / "file", OWNED, commit="a"):
        pass
