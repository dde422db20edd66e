"""File helpers of the export: the store's read lock and the output folder."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from wsiseg.errors import WsisegError
from wsiseg.store import StoreLock


@contextlib.contextmanager
def read_lock(store_path: Path) -> Iterator[None]:
    """Hold the store's shared lock so no refine or undo changes ``refined`` mid-export;
    it needs no write access, so a read-only store is exported too."""
    with StoreLock(store_path, "export", shared=True):
        yield


def ensure_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".wsiseg-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise WsisegError(f"{out_dir}: cannot write the output directory ({reason})") from None

