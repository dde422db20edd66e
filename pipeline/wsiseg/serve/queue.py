"""One round at a time per slide, in arrival order; different slides in parallel.

Each slide has its own single-thread executor: jobs submitted from the event loop run one
after another in the order their requests arrived (an executor's queue is FIFO), so two
clients posting to one slide at once get two rounds, never interleaved, none lost. The store
lock (:class:`wsiseg.store.StoreLock`) still guards against a ``wsiseg refine`` run from the
command line at the same time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class SlideQueues:
    """Per-slide FIFO executors, created on first use and shut down with :meth:`close`."""

    def __init__(self) -> None:
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    def _pool(self, slide_id: str) -> ThreadPoolExecutor:
        with self._lock:
            pool = self._pools.get(slide_id)
            if pool is None:
                pool = ThreadPoolExecutor(1, thread_name_prefix=f"wsiseg-round-{slide_id}")
                self._pools[slide_id] = pool
            return pool

    async def run(self, slide_id: str, fn: Callable[[float], T]) -> T:
        """Run ``fn(queued_s)`` on the slide's queue and wait for it without blocking the
        event loop; ``queued_s`` is how long the job waited for the rounds before it."""
        submitted = time.perf_counter()
        future = self._pool(slide_id).submit(lambda: fn(time.perf_counter() - submitted))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=True)
