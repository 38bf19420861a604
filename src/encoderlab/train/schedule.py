"""Learning-rate schedules as pure functions of the step: linear warmup, then cosine decay to zero or constant.

Pure functions (no optimizer state) so a resumed or re-run fit computes exactly the same rates, and tests can check
them by hand.
"""

from __future__ import annotations

import math
from typing import Literal

from ..errors import EncoderlabError

Schedule = Literal["cosine", "constant"]
SCHEDULES: tuple[str, ...] = ("cosine", "constant")


def check_schedule(schedule: str) -> None:
    """Fail early on a schedule name ``lr_at`` does not know."""
    if schedule not in SCHEDULES:
        raise EncoderlabError(f"unknown schedule {schedule!r}", f"use {' or '.join(SCHEDULES)}")


def lr_at(step: int, total_steps: int, base_lr: float, warmup: int, schedule: str) -> float:
    """Learning rate of one step: linear warmup, then cosine to zero (or constant); a pure function of the step."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    """Batches per epoch: near-equal batches of at most ``batch_size`` items, at least one."""
    return max(1, math.ceil(n_items / batch_size))


def capped_warmup(warmup_steps: int, total_steps: int) -> int:
    """The warmup actually used: at most a tenth of training, so a short run is not all warmup."""
    return min(warmup_steps, total_steps // 10)
