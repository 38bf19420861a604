"""One thread runs every request that touches the model, one request at a time, behind a bounded queue.

Encoding a query (and decoding an uploaded image) is what costs memory; doing it for one request at a time keeps
the peak at one query's worth whatever the number of clients, and the model's own intra-op threads still use
every core. Requests wait in a queue of at most ``max_pending``; past that the service answers 503 at once
instead of piling up bodies in memory. ``peak_pending`` records the deepest the queue has been.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import RequestError

T = TypeVar("T")
MAX_PENDING = 64


class ModelWorker:
    """Runs callables on a single thread; ``await worker.run(fn, *args)`` from the event loop."""

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoderlab-model")
        self._lock = threading.Lock()
        self.pending = 0
        self.peak_pending = 0
        self.done = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self.pending >= self.max_pending:
                raise RequestError(503, f"the service is busy ({self.pending} queries waiting)",
                                   "retry in a moment")
            self.pending += 1
            self.peak_pending = max(self.peak_pending, self.pending)
        try:
            return await asyncio.wrap_future(self._pool.submit(fn, *args))
        finally:
            with self._lock:
                self.pending -= 1
                self.done += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"pending": self.pending, "peak_pending": self.peak_pending, "done": self.done,
                    "max_pending": self.max_pending}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
