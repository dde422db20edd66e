"""The one atomic file write: a temporary file beside the target, fsync, rename.

A reader of ``path`` sees the old file or the new one, never half of one, and a process
killed mid-write leaves at most a hidden temporary ``.<name>.<random>.tmp`` beside it
(:func:`temporaries_of` finds those, for clean-up). The file gets the permissions a plain
``open(path, "w")`` would leave: a replaced file keeps its own, a new one gets ``0666`` less
the process umask (``0644`` under the usual umask 022) — not ``mkstemp``'s private ``0600``,
which would lock a pathologist out of files a service account wrote.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from wsiseg.errors import WsisegError

_TMP_SUFFIX = ".tmp"

#: Which paths the caller's commit makes durable (:func:`synced_by_commit`); None: every
#: atomic write makes itself durable.
_SYNCED_BY_COMMIT: contextvars.ContextVar[Callable[[Path], bool] | None] = (
    contextvars.ContextVar("wsiseg_synced_by_commit", default=None))


@contextlib.contextmanager
def synced_by_commit(covers: Callable[[Path], bool]) -> Iterator[None]:
    """Inside the block (this thread or task), :func:`atomic_path` leaves the fsync of a
    file that ``covers`` accepts, and of its folder, to the caller.

    For a transaction (:class:`wsiseg.journal.Transaction`): its journal undoes such a write
    until the commit, and the commit fsyncs the file and its folder, once for all of its
    writes, instead of each write flushing on its own (ten fsyncs fewer in a refine round).
    ``covers`` must accept only paths for which both hold.
    """
    token = _SYNCED_BY_COMMIT.set(covers)
    try:
        yield
    finally:
        _SYNCED_BY_COMMIT.reset(token)


def umask() -> int:
    """The process umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting (racy with threads)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """Permission bits of a new regular file: ``0o666 & ~umask``."""
    return 0o666 & ~umask()


def _mode_for(path: Path) -> int:
    """The permissions ``open(path, "w")`` would leave: an existing file's own, else
    :func:`default_mode`."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return default_mode()


def temporary_name(path: Path) -> Path:
    """A fresh hidden temporary path beside ``path`` (see :func:`temporaries_of`)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")


def temporaries_of(path: Path) -> list[Path]:
    """Temporary files an interrupted :func:`atomic_write` of ``path`` may have left."""
    try:
        return sorted(path.parent.glob(f".{_glob_escape(path.name)}.*{_TMP_SUFFIX}"))
    except OSError:
        return []


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary path to write (by name: tifffile, PIL, safetensors) that replaces
    ``path`` atomically when the block ends.

    Parameters
    ----------
    path : path-like
        The file to (re)place; its folder must exist.
    mode : int, optional
        Permission bits; by default those of the file replaced, or ``0o666`` less the
        umask for a new one.

    On an exception inside the block the temporary file is removed and ``path`` is
    left as it was. Inside :func:`synced_by_commit` a path it covers is not fsync'd here.
    """
    path = Path(path)
    tmp = temporary_name(path)
    covers = _SYNCED_BY_COMMIT.get()
    durable_later = covers is not None and covers(path)
    try:
        yield tmp
        if not durable_later:
            with open(tmp, "rb") as f:  # fsync needs no write access on Linux
                os.fsync(f.fileno())
        wanted = _mode_for(path) if mode is None else mode
        if os.stat(tmp).st_mode & 0o7777 != wanted:  # (a chmod may drop a setgid bit)
            os.chmod(tmp, wanted)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not durable_later:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: int | None = None) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` atomically when the block ends (see
    :func:`atomic_path`)."""
    with atomic_path(path, mode) as tmp, open(tmp, "xb") as f:
        yield f


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, mode) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_copy(src: str | Path, dst: str | Path, mode: int | None = None) -> None:
    """Copy ``src`` over ``dst`` atomically."""
    with open(src, "rb") as fin, atomic_writer(dst, mode) as fout:
        while block := fin.read(1 << 20):
            fout.write(block)


def atomic_link(source: str | Path, path: str | Path) -> bool:
    """Make ``path`` another name of the file ``source`` (a hard link, renamed over
    ``path``: atomic as a write), durably. Returns False, ``path`` untouched, where the file
    system refuses (another device, no hard links) or the file cannot be read or replaced.

    Only for files that are never rewritten in place (each is replaced by a rename, as
    these functions do): a write into one would change both names.
    """
    with contextlib.suppress(OSError):
        if os.path.samefile(source, path):
            return True  # (a rename onto another name of its own file would do nothing)
    try:
        # the file's own permissions: the temporary's chmod must not change them
        with atomic_path(path, mode=os.stat(source).st_mode & 0o7777) as tmp:
            os.link(source, tmp)
    except OSError:
        return False
    return True


def holds_bytes(path: str | Path, data: bytes) -> bool:
    """Whether the file ``path`` holds exactly ``data`` (False when it is missing)."""
    try:
        if os.stat(path).st_size != len(data):  # the usual answer, without reading it
            return False
        with open(path, "rb") as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False


def atomic_write_or_link(path: str | Path, data: bytes, twin: str | Path) -> bool:
    """Replace ``path`` with ``data`` atomically: as a hard link to ``twin`` when that file
    holds exactly these bytes (nothing written: see :func:`atomic_link` for which files
    may share), else written (:func:`atomic_write_bytes`). Returns whether it was linked."""
    if holds_bytes(twin, data) and atomic_link(twin, path):
        return True
    atomic_write_bytes(path, data)
    return False


def fsync_dir(path: str | Path) -> None:
    """Make a rename or creation in folder ``path`` durable (ignored where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def ensure_out_dir(out_dir: Path) -> None:
    """Make ``out_dir`` and prove it writable before any work, or a one-line WsisegError."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".wsiseg-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise WsisegError(f"{out_dir}: cannot write the output directory ({reason})") from None
