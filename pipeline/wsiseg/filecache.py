"""Arrays read from files that are written once, kept in this process while the files are the
same ones.

A server opens a slide's store again for every stroke (another process may have changed it),
and every open read the store's tissue mask again: 2.5 ms for the 1024² mask of a 67-Mpx
slide, which is written when the store is created and never after (a store run again is
made anew, with new files). An array read here is kept under the identity of the files it
was read from — each one's inode, device, size, modification and change times — and read
again when any of them differs. Files younger than :data:`SETTLED_S` are read every time:
file times tick in steps of a few ms, so a file rewritten within one tick, to the same
size, would keep its identity (the "racy" rule of git's index). The stamps and that rule
(:func:`file_stamp`, :func:`settled`) are also those of the trace memo's chunk files
(:mod:`wsiseg.contours.cache`).
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

Stamp = tuple[int, ...]  # a file's inode, device, size, modification and change times (ns)
Identity = tuple[tuple[str | int, ...], ...]  # per file: its path and stamp

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


def file_stamp(path: str | Path) -> Stamp | None:
    """The identity of a file now: inode, device, size, modification and change times in
    ns; None when there is no file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def settled(stamp: Stamp, seconds: float) -> bool:
    """Whether the file of ``stamp`` had been left alone for ``seconds`` when stamped."""
    return time.time_ns() - max(stamp[3], stamp[4]) > seconds * 1e9


def _identity(folder: Path) -> Identity | None:
    """The stamps of the files under ``folder``, by path; None when there are none or one
    of them is gone or not settled."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            stamp = file_stamp(path)
            if stamp is None or not settled(stamp, SETTLED_S):
                return None
            out.append((path, *stamp))
    return tuple(sorted(out)) or None


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
