"""File helpers of the export: the store's read lock and the output folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from wsiseg.store import StoreLock


@contextlib.contextmanager
def read_lock(store_path: Path) -> Iterator[None]:
    """Hold the store's shared lock so no refine or undo changes ``refined`` mid-export;
    it needs no write access, so a read-only store is exported too."""
    with StoreLock(store_path, "export", shared=True):
        yield


