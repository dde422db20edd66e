"""A bounded memo of traced chunks, keyed by their tumor masks (and their pieces' sums by
their pixels): a refine round re-traces only the chunks whose mask changed.

A stroke that touches a large tumor makes its whole component be traced again (every chunk
it spans; see :func:`wsiseg.rounds.recontour`), though only the chunks under the refined
windows changed. A chunk's trace is a pure function of its tumor mask and position, so it
is kept here under a digest of those, and its pieces' probability sums under a digest of its
pixels, position and threshold (:meth:`TraceMemo.mask_key`, :meth:`TraceMemo.key`; a
stroke changes the probability of a whole window, the mask of few of its chunks); a server
answering strokes on one slide then traces only what changed. Entries are dropped, least
recently used first, past :data:`BUDGET_BYTES`.

Reading a chunk to hash it costs ~1.5 ms (zarr's read, 1 ms, and the digest), so a stroke on
a tumor of 100 chunks would pay 0.15 s only to learn that 96 of them did not change. For a
zarr array on a local disk the memo therefore also remembers, per chunk file, which digest
its pixels had and the file's identity then (:func:`chunk_stamp`: inode, size, modification
and change times): a chunk whose file has the same stamp again has the same pixels, and is
looked up without being read. A stamp is only remembered once the file has been left alone
for :data:`SETTLED_S` (the "racy" rule of git's index): file times tick in steps (4 ms on
this machine's kernel), so a file written twice within one tick, to the same size, would
keep its stamp; a file older than that cannot be rewritten without its times moving past it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from wsiseg.filecache import Stamp, file_stamp, settled

#: Memory the memo may hold: about 500 traced 512² chunks with tumor (labels as uint16).
BUDGET_BYTES = 256 * 2**20
#: Chunk files whose digest the memo remembers by stamp (~200 B each).
MAX_STAMPS = 2**16
#: Seconds a chunk file must have been left alone before its stamp stands for its pixels.
SETTLED_S = 2.0


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
        # chunk (file, threshold, array metadata) → (its file's stamp, its digest then)
        self._stamps: OrderedDict[str, tuple[Stamp, bytes]] = OrderedDict()

    @staticmethod
    def key(values: np.ndarray, row0: int, col0: int, threshold: float) -> bytes:
        """The key of a chunk's pixels ``values`` at working px (row0, col0), compared with
        ``threshold``."""
        digest = hashlib.blake2b(digest_size=20)
        digest.update(np.asarray([row0, col0, *values.shape], dtype=np.int64).tobytes())
        digest.update(np.float64(threshold).tobytes() + values.dtype.str.encode())
        digest.update(np.ascontiguousarray(values).data)
        return digest.digest()

    @staticmethod
    def mask_key(mask: np.ndarray, row0: int, col0: int) -> bytes:
        """The key of a chunk's tumor mask (bool) at working px (row0, col0)."""
        digest = hashlib.blake2b(digest_size=20)
        digest.update(np.asarray([row0, col0, *mask.shape], dtype=np.int64).tobytes())
        digest.update(np.packbits(mask).data)
        return b"mask" + digest.digest()

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

    def key_by_stamp(self, where: str, stamp: Stamp | None) -> bytes | None:
        """The digest a chunk (``where``: its file, and whatever else the digest covers)
        had when its file last had this stamp."""
        if stamp is None:
            return None
        with self._lock:
            known = self._stamps.get(where)
            if known is None or known[0] != stamp:
                return None
            self._stamps.move_to_end(where)
            return known[1]

    def remember_stamp(self, where: str, stamp: Stamp | None, key: bytes) -> None:
        """Remember that the chunk ``where`` has digest ``key`` while its file has
        ``stamp`` (taken before its pixels were read, and again after); ignored while the
        file is not settled."""
        if stamp is None or not settled(stamp, SETTLED_S):
            return
        with self._lock:
            self._stamps[where] = (stamp, key)
            self._stamps.move_to_end(where)
            while len(self._stamps) > MAX_STAMPS:
                self._stamps.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._stamps.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


def array_identity(array: Any) -> str:
    """What, besides its chunk files, decides a zarr array's pixels: its metadata (shape,
    chunk grid, dtype, fill value, codecs); part of a chunk's place in the stamp map, so a
    store re-created or resized at the same path is not taken for the old one."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(array.metadata.to_dict(), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def chunk_file(array: Any, index: tuple[int, ...]) -> Path | None:
    """The file that holds chunk ``index`` of ``array``, a zarr array on a local disk (None
    for anything else: numpy arrays, remote stores, sharded arrays)."""
    if not isinstance(array, zarr.Array) or not isinstance(array.store, LocalStore):
        return None
    if array.metadata.zarr_format != 3 or array.shards is not None:
        return None
    key = array.metadata.encode_chunk_key(index)
    return Path(array.store.root) / array.store_path.path / key


def chunk_stamp(file: Path) -> Stamp | None:
    """The identity of a chunk file now (:func:`wsiseg.filecache.file_stamp`); None when
    there is no file (zarr leaves chunks of the fill value unwritten; a missing file has no
    times to tell whether it was there a moment ago, so such a chunk is read, which costs
    little: nothing is decoded)."""
    return file_stamp(file)


#: The process's memo, used when tracing regions (refine rounds), not whole maps.
TRACES = TraceMemo()
