"""CPU thread policy for small training problems.

Fitting heads on cached features runs many small matrix products (a few hundred by a few hundred). Splitting
each across threads saves little, and when another process holds a core the threads wait on each other for whole
scheduler slices: one epoch of ``align`` on OpenClipart features took 0.55 s with one torch thread and 14 s with two
on a 2-core machine that was busy with another job. Such fits therefore run on one thread by default;
``ENCODERLAB_FIT_THREADS=N`` overrides it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

FIT_THREADS_ENV = "ENCODERLAB_FIT_THREADS"


def fit_threads() -> int:
    """Threads for small fits: ``$ENCODERLAB_FIT_THREADS`` if set to a positive integer, else 1."""
    value = os.environ.get(FIT_THREADS_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


@contextlib.contextmanager
def small_fit_threads(device: torch.device | str = "cpu") -> Iterator[None]:
    """Limit torch's intra-op threads while a small CPU fit runs; restores the previous setting afterwards."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, fit_threads()))
    try:
        yield
    finally:
        torch.set_num_threads(before)
