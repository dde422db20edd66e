"""File helpers of the export: the store's read lock, the output folder, atomic byte writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from wsiseg.errors import WsisegError
from wsiseg.store import StoreLock


@contextlib.contextmanager
def read_lock(store_path: Path) -> Iterator[None]:
    """Hold the store lock so no refine or undo changes ``refined`` mid-export; a store on a
    read-only file system cannot be changed anyway and is exported without it."""
    try:
        lock = StoreLock(store_path, "export")
        lock.__enter__()
    except PermissionError:
        yield
        return
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def ensure_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".wsiseg-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise WsisegError(f"{out_dir}: cannot write the output directory ({reason})") from None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
