"""Mixed precision of ``train.loop.fit`` on CUDA: a few epochs in fp32, bf16 and fp16 (+ GradScaler), and a resume.

    python bench/gpu_check.py            # needs a CUDA device; exits 2 without one, 1 when a check fails

For each precision it prints the per-epoch train losses, the seconds and the peak GPU memory
(``torch.cuda.max_memory_allocated``); 16 batches of 256 an epoch, a step every 2. Then a bf16 run interrupted at
a step (after a mid-epoch checkpoint) is resumed and compared with the uninterrupted run (max |weight difference|;
GPU kernels need not be bitwise deterministic, so this is reported, with a loose bound). Checks: every loss is
finite, the last epoch's loss is below the first's, autocast really ran in the asked dtype.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from encoderlab.train.loop import FitResult, LoopSettings, decay_groups, fit

N, D_IN, D_HIDDEN, D_OUT = 4096, 256, 1024, 64


def run(precision: str, ckdir: Path | None = None, fail_at: int = 0) -> tuple[torch.nn.Module, FitResult, set, float]:
    """One fit of a 2-layer MLP regression on fixed random CUDA data; the step raises at call ``fail_at``."""
    torch.manual_seed(0)
    X = torch.randn(N, D_IN, device="cuda")
    Y = torch.tanh(X @ torch.randn(D_IN, D_OUT, device="cuda") / D_IN**0.5)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, D_HIDDEN), torch.nn.GELU(), torch.nn.Linear(D_HIDDEN, D_OUT))
    model.cuda()
    dtypes: set[torch.dtype] = set()
    calls = [0]

    def step(idx: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == fail_at:
            raise KeyboardInterrupt
        out = model(X[idx.cuda()])
        dtypes.add(out.dtype)
        return ((out.float() - Y[idx.cuda()]) ** 2).mean()

    def evaluate() -> tuple[float, dict[str, float]]:
        with torch.no_grad():
            return -float(((model(X).float() - Y) ** 2).mean()), {}

    settings = LoopSettings(epochs=4, batch_size=256, lr=3e-3, patience=4, warmup_steps=4, max_norm=1.0,
                            accumulate=2, precision=precision)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fit(model, step, N, decay_groups(model.named_parameters(), 0.01), evaluate, settings,
                 checkpoint_dir=ckdir, checkpoint_every=3)
    torch.cuda.synchronize()
    return model, result, dtypes, time.perf_counter() - t0


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device, nothing checked")
        return 2
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    ok = True
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    finals: dict[str, torch.nn.Module] = {}
    for precision in ("fp32", "bf16", "fp16"):
        model, r, dtypes, seconds = run(precision)
        losses = [h["train_loss"] for h in r.history]
        good = all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] and dtypes == {want[precision]}
        ok &= good
        print(f"{precision}: ran as {r.precision}, dtypes {sorted(map(str, dtypes))}, losses "
              f"{[round(x, 5) for x in losses]}, {seconds:.2f} s, peak {torch.cuda.max_memory_allocated() / 2**20:.1f}"
              f" MiB{'' if good else '  FAILED'}")
        finals[precision] = model
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run("bf16", Path(tmp), fail_at=2 * 16 + 9)  # batch 9 of epoch 3: after the checkpoint at step 18
        except KeyboardInterrupt:
            pass
        resumed, r, _, _ = run("bf16", Path(tmp))
        diff = max((a - b).abs().max().item() for a, b in zip(finals["bf16"].state_dict().values(),
                                                               resumed.state_dict().values()))
        good = r.resumed_at > 0 and diff < 1e-2
        ok &= good
        print(f"bf16 resume: from step {r.resumed_at}, max |weight diff| vs uninterrupted {diff:.3g}"
              f"{'' if good else '  FAILED'}")
    print("gpu_check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
