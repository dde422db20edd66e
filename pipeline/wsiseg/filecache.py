"""Arrays read from files that are written once, kept in this process while the files are the
same ones.

A server opens a slide's store again for every stroke (another process may have changed it),
and every open read the store's tissue mask again: 2.5 ms for the 1024² mask of a 67-Mpx
slide, which is written when the store is created and never after (a store run again is
made anew, with new files). An array read here is kept under the identity of the files it
was read from — each one's inode, device, size, modification and change times — and read
again when any of them differs. Files younger than :data:`SETTLED_S` are read every time:
file times tick in steps of a few ms, so a file rewritten within one tick, to the same
size, would keep its identity (the "racy" rule of git's index).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

#: Seconds a file must have been left alone before its identity stands for its bytes.
SETTLED_S = 2.0
#: Memory the kept arrays may hold, least recently used dropped first.
BUDGET_BYTES = 64 * 2**20

Identity = tuple[tuple[str | int, ...], ...]  # per file: its path, inode, device, size, times

_ARRAYS: OrderedDict[str, tuple[Identity, np.ndarray]] = OrderedDict()
_BYTES = 0
_LOCK = threading.Lock()


def read_once(folder: Path, read: Callable[[], np.ndarray]) -> np.ndarray:
    """``read()``, the array held by the files under ``folder``; kept, read-only, and
    returned again while those files are the same ones and settled."""
    identity = _identity(folder)
    key = str(folder)
    with _LOCK:
        kept = _ARRAYS.get(key)
        if kept is not None and identity is not None and kept[0] == identity:
            _ARRAYS.move_to_end(key)
            return kept[1]
    array = read()
    array.flags.writeable = False
    if identity is not None and identity == _identity(folder):  # not written meanwhile
        _keep(key, identity, array)
    return array


def clear() -> None:
    """Forget every kept array."""
    global _BYTES
    with _LOCK:
        _ARRAYS.clear()
        _BYTES = 0


def _identity(folder: Path) -> Identity | None:
    """The identities of the files under ``folder``, by path; None when there are none or
    one of them is not settled."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            out.append((path, st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    now = time.time_ns()
    if not out or any(now - max(f[4], f[5]) <= SETTLED_S * 1e9 for f in out):
        return None
    return tuple(sorted(out))


def _keep(key: str, identity: Identity, array: np.ndarray) -> None:
    global _BYTES
    if array.nbytes > BUDGET_BYTES:
        return
    with _LOCK:
        old = _ARRAYS.pop(key, None)
        if old is not None:
            _BYTES -= old[1].nbytes
        _ARRAYS[key] = (identity, array)
        _BYTES += array.nbytes
        while _BYTES > BUDGET_BYTES:
            _, (_, dropped) = _ARRAYS.popitem(last=False)
            _BYTES -= dropped.nbytes
