"""The store lock: ``flock`` on ``<store>/.lock``, exclusive to change, shared to read.

The kernel holds the lock, not the file: it is released when its holder exits, however it
exits (kill -9 included), so there is no stale lock to guess about, and the file is never
deleted (deleting a locked file would let a second process lock a new one beside it). The
exclusive holder writes who it is into the file (pid, host, what, since) for messages; a
process that finds the file but can take the lock knows that writer is gone.

Linux ``flock`` also excludes across hosts on NFS (it is emulated with POSIX locks there).
A store on a read-only mount can still be read: a shared lock needs only to open the file
for reading, and where even that file is missing nothing can change the store anyway.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from wsiseg.errors import StoreError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"

# errno values that mean "this file system or folder may not be written".
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)

# How often a waiting lock retries (s).
_POLL_S = 0.2


@dataclass(frozen=True)
class Holder:
    """What the last exclusive holder wrote into the lock file."""

    pid: int
    host: str
    what: str
    since: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, {self.what} since {self.since}"

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        parts = text.strip().split("\t")
        if len(parts) != 4 or not parts[0].isdigit():
            return None
        return cls(int(parts[0]), parts[1], parts[2], parts[3])


def read_only_error(path: Path) -> StoreError:
    return StoreError(f"store is read-only: {path}")


def is_writable(path: Path) -> bool:
    """Whether this process may create files in folder ``path`` (False on a read-only
    mount, and for a folder without write permission unless running as root)."""
    return os.access(path, os.W_OK)


class StoreLock:
    """Hold the lock of the store (or output folder) ``path`` in a ``with`` block.

    Parameters
    ----------
    path : Path
        The store folder; the lock file is ``path / ".lock"``.
    what : str
        What the holder does (``"refine"``, ``"undo"``), for messages.
    shared : bool
        A reader's lock: many readers at once, no writer meanwhile. Works on a read-only
        store. An exclusive lock on a read-only store is ``StoreError("store is read-only:
        PATH")``.
    wait_s : float
        How long to wait for a busy lock, logging once who holds it; 0 (default): a busy
        lock is a ``StoreError`` at once.
    """

    def __init__(self, path: str | Path, what: str, *, shared: bool = False,
                 wait_s: float = 0.0):
        self.store_path = Path(path)
        self.path = self.store_path / LOCK_NAME
        self.what = what
        self.shared = shared
        self.wait_s = wait_s
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        self._fd = self._open()
        if self._fd is None:
            return self  # a read-only store without a lock file: nobody can change it
        try:
            self._acquire()
            if not self.shared:
                self._write_holder()
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            # Closing releases the lock; the file stays (see the module docstring).
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int | None:
        if not self.shared and not is_writable(self.store_path):
            if not self.store_path.is_dir():
                raise StoreError(f"{self.store_path}: no such store")
            raise read_only_error(self.store_path)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # umask applies
        except OSError as exc:
            if exc.errno not in _READ_ONLY:
                raise StoreError(f"{self.path}: cannot open the store lock ({exc.strerror})"
                                 ) from None
            if not self.shared:
                raise read_only_error(self.store_path) from None
        try:
            return os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot open the store lock ({exc.strerror})"
                             ) from None

    def _acquire(self) -> None:
        assert self._fd is not None
        op = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + self.wait_s
        told = False
        while True:
            try:
                fcntl.flock(self._fd, op)
                return
            except BlockingIOError:
                pass
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"{self.store_path}: another wsiseg process is using this store "
                    f"({self._holder_text()}); wait for it to finish"
                ) from None
            if not told:
                log.warning("%s: waiting up to %.0f s for another wsiseg process (%s)",
                            self.store_path, self.wait_s, self._holder_text())
                told = True
            time.sleep(_POLL_S)

    def _holder_text(self) -> str:
        holder = read_holder(self.store_path)
        return holder.describe() if holder is not None else "holder unknown"

    def _write_holder(self) -> None:
        assert self._fd is not None
        text = "\t".join([str(os.getpid()), socket.gethostname(), self.what,
                          time.strftime("%Y-%m-%dT%H:%M:%S%z")]) + "\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode(), 0)


def read_holder(path: str | Path) -> Holder | None:
    """The last exclusive holder written in ``path``'s lock file (None when unknown)."""
    try:
        return Holder.parse((Path(path) / LOCK_NAME).read_text(errors="replace"))
    except OSError:
        return None


def is_locked(path: str | Path) -> bool:
    """Whether some process holds ``path``'s lock now (exclusively: a writer)."""
    try:
        fd = os.open(Path(path) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe's own shared lock
    return False
