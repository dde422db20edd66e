"""A bounded memo of traced chunks, keyed by their pixels: a refine round re-traces only
the chunks whose pixels changed.

A stroke that touches a large tumor makes its whole component be traced again (every chunk
it spans; see :func:`wsiseg.rounds.recontour`), though only the chunks under the refined
windows changed. A chunk's trace is a pure function of its pixels, position and threshold,
so it is kept here under a digest of those; a server answering strokes on one slide then
traces only what changed. Entries are dropped, least recently used first, past
:data:`BUDGET_BYTES`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

#: Memory the memo may hold: about 500 traced 512² chunks with tumor (labels as uint16).
BUDGET_BYTES = 256 * 2**20


class TraceMemo:
    """Least-recently-used traces of chunks within a byte budget; safe across threads."""

    def __init__(self, budget_bytes: int = BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        #: How many entries were dropped to stay within the budget, ever: a warm-up done
        #: before the count last moved may have lost some of its entries.
        self.evictions = 0

    @staticmethod
    def key(values: np.ndarray, row0: int, col0: int, threshold: float) -> bytes:
        digest = hashlib.blake2b(digest_size=20)
        digest.update(np.asarray([row0, col0, *values.shape], dtype=np.int64).tobytes())
        digest.update(np.float64(threshold).tobytes() + values.dtype.str.encode())
        digest.update(np.ascontiguousarray(values).data)
        return digest.digest()

    def get(self, key: bytes) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: bytes, value: Any, size_bytes: int) -> None:
        if size_bytes > self.budget_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, size_bytes)
            self._bytes += size_bytes
            while self._bytes > self.budget_bytes:
                _, (_, size) = self._entries.popitem(last=False)
                self._bytes -= size
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


#: The process's memo, used when tracing regions (refine rounds), not whole maps.
TRACES = TraceMemo()
