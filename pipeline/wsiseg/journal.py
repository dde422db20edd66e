"""All-or-nothing changes to a store and its published files: an undo journal.

A :class:`Transaction` keeps, inside the store, ``.wsiseg-txn/``: a manifest of every path
it is about to change and a copy of each one that existed (a hard link, for files the
caller only ever replaces by a rename). A path is *protected* (copied,
fsync'd, then listed in the manifest) before anything writes it, so the manifest always
covers every change made so far. :meth:`Transaction.commit` makes the changes durable and
then renames the journal away — one atomic rename is the moment the change happens.
Until then, an exception, Ctrl-C or kill -9 leaves a journal that :func:`recover` plays
back, in reverse: files copied back byte for byte, paths that did not exist removed
(with the hidden temporaries an interrupted atomic write or zarr chunk write left beside
them). Playing back twice gives the same result, so a crash during recovery is harmless.

Paths inside the store are recorded relative to it (a moved store keeps its journal);
others, such as the published files of the output folder, absolutely. The caller holds the
store lock (:mod:`wsiseg.lock`) for the whole transaction and for recovery.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import zarr

from wsiseg.atomic import (
    atomic_copy,
    atomic_write_bytes,
    fsync_dir,
    synced_by_commit,
    temporaries_of,
)

JOURNAL_NAME = ".wsiseg-txn"
_MANIFEST = "manifest.jsonl"
_INTENT = "intent.json"


class Transaction:
    """Changes under ``root`` (a store) and beside it that all happen or none does.

    Use in a ``with`` block; call :meth:`protect` before each write and :meth:`commit` at
    the end. Leaving the block without :meth:`commit` (an exception, Ctrl-C, an early
    return) rolls every protected path back.
    """

    def __init__(self, root: str | Path, what: str):
        self.root = Path(root)
        self.what = what
        self.dir = self.root / JOURNAL_NAME
        self._protected: dict[Path, bool] = {}  # path → existed
        # protected, not yet recorded: manifest lines, backups, paths
        self._pending: tuple[list[dict], list[Path], list[Path]] = ([], [], [])
        self._batching = False
        self._backup_names = itertools.count()  # (not len(_protected): entries are dropped)
        self._syncs = contextlib.ExitStack()
        self._manifest = None
        self._done = False

    def __enter__(self) -> Transaction:
        if self.dir.exists():  # the caller recovers first; two journals would not nest
            raise RuntimeError(f"{self.dir}: an unfinished transaction is in the way")
        staging = self.root / f"{JOURNAL_NAME}.new-{secrets.token_hex(4)}"
        staging.mkdir()
        intent = {"what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_bytes(staging / _INTENT, json.dumps(intent).encode())
        os.rename(staging, self.dir)  # the journal exists whole or not at all
        fsync_dir(self.root)
        self._manifest = open(self.dir / _MANIFEST, "ab")  # noqa: SIM115 (closed in exit)
        self._syncs.enter_context(synced_by_commit(self._synced_by_commit))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._syncs.close()  # a roll-back's own writes are durable each
        if self._manifest is not None:
            self._manifest.close()
            self._manifest = None
        if not self._done:
            _play_back(self.root, self.dir)
            _remove_journal(self.root, self.dir)

    # -- before writing ------------------------------------------------------------------
    def protect(self, paths: Iterable[str | Path], replaced_by_rename: bool = False) -> None:
        """Record ``paths`` (files or folders, existing or not) before they are written.

        The backups are copied and made durable first, then their manifest lines written
        and made durable, one fsync each for the lot: until its line is in the manifest, a
        path is not written. ``replaced_by_rename``: the caller promises that these files are
        only ever replaced by a rename while the transaction runs (the published GeoJSON
        files), never written in place; their backups are then hard links to them where the
        file system allows (the old file stays whole under the backup's name), not copies.
        Another program writing such a file in place meanwhile (an editor saving over it)
        writes the backup too: a rollback then restores what that program wrote.
        """
        added: dict[Path, dict] = {}  # this call's paths and their manifest lines
        backups = []
        try:
            for path in paths:
                path = Path(path).absolute()
                top = _highest_missing(path)
                key = top if top is not None else path
                if any(p in self._protected or p in added for p in (key, *key.parents)):
                    continue  # already covered (a folder is restored or removed whole)
                entry: dict = {"path": self._name(key), "existed": top is None}
                if top is None:
                    backup = self.dir / f"b{next(self._backup_names)}"
                    backups.append(backup)
                    if key.is_dir():
                        shutil.copytree(key, backup)
                        entry["dir"] = True
                    else:
                        if not (replaced_by_rename and _linked(key, backup)):
                            shutil.copyfile(key, backup)
                        entry["mode"] = key.stat().st_mode & 0o7777
                    entry["backup"] = backup.name
                added[key] = entry
        except BaseException:  # none of this call's paths is protected: as before it
            for backup in backups:
                with contextlib.suppress(OSError):
                    _remove(backup)
            raise
        self._protected.update({key: entry["existed"] for key, entry in added.items()})
        self._pending[0].extend(added.values())
        self._pending[1].extend(backups)
        self._pending[2].extend(added)
        if not self._batching:
            self._record_pending()

    @contextlib.contextmanager
    def protecting(self) -> Iterator[None]:
        """Protect several groups of paths (:meth:`protect` calls inside the block) with one
        flush of their backups and manifest lines, at the block's end: nothing they cover
        may be written inside it."""
        self._batching = True
        try:
            yield
        except BaseException:
            self._drop_pending()  # never recorded: nothing covers them
            raise
        finally:
            self._batching = False
        self._record_pending()

    def _drop_pending(self) -> None:
        _, backups, keys = self._pending
        self._pending = ([], [], [])
        for key in keys:
            del self._protected[key]
        for backup in backups:
            with contextlib.suppress(OSError):
                _remove(backup)

    def _record_pending(self) -> None:
        """Make the pending backups durable, then their manifest lines (one fsync each for
        the lot): until its line is in the manifest, a path is not written."""
        entries, backups, _ = self._pending
        self._pending = ([], [], [])
        if not entries:
            return
        for backup in backups:
            _fsync_tree(backup)
        if backups:
            fsync_dir(self.dir)
        assert self._manifest is not None
        self._manifest.write(b"".join(json.dumps(e).encode() + b"\n" for e in entries))
        self._manifest.flush()
        os.fsync(self._manifest.fileno())

    def protect_chunks(self, array: zarr.Array, array_dir: Path,
                       boxes: Iterable[tuple[int, int, int, int]]) -> None:
        """Protect the chunk files of ``array`` (stored in ``array_dir``) that writes of
        ``boxes`` = (row0, col0, rows, cols), in array px, touch."""
        ch, cw = array.chunks[:2]
        rest = [0] * (array.ndim - 2)
        keys = {array.metadata.encode_chunk_key((i, j, *rest))
                for r0, c0, rows, cols in boxes if rows > 0 and cols > 0
                for i in range(r0 // ch, (r0 + rows - 1) // ch + 1)
                for j in range(c0 // cw, (c0 + cols - 1) // cw + 1)}
        self.protect(array_dir / key for key in sorted(keys))

    def _synced_by_commit(self, path: Path) -> bool:
        """Whether an atomic write of ``path`` (on this transaction's thread) may leave its
        fsyncs to :meth:`commit`: the path is protected and recorded (the journal undoes the
        write until then), so it lies in what the commit flushes."""
        key = Path(path).absolute()
        if self._done or self._pending[0]:  # (pending: protected in a batch, not recorded)
            return False
        return key in self._protected or any(p in self._protected for p in key.parents)

    # -- the end ---------------------------------------------------------------------------
    def commit(self) -> None:
        """Make every protected change durable, then drop the journal (atomically)."""
        self._syncs.close()
        for path in self._protected:  # (and what atomic writes left to it: it lies in them)
            _fsync_tree(path)
        for folder in {p.parent for p in self._protected}:
            fsync_dir(folder)
        if self._manifest is not None:
            self._manifest.close()
            self._manifest = None
        _remove_journal(self.root, self.dir)
        self._done = True

    def _name(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root.absolute()))
        except ValueError:
            return str(path)


def pending(root: str | Path) -> bool:
    """Whether ``root`` holds an interrupted transaction."""
    return (Path(root) / JOURNAL_NAME).is_dir()


def needs_recovery(root: str | Path) -> bool:
    """Whether ``root`` holds an interrupted transaction or the leftovers of one that never
    started (killed while its journal was being written) or had committed."""
    return any(Path(root).glob(f"{JOURNAL_NAME}*"))


def recover(root: str | Path) -> str | None:
    """Roll back an interrupted transaction of ``root`` (the caller holds the lock).

    Returns what was interrupted (``"refine round 3 (pid 123 on host, started …)"``), or
    None when there was nothing to roll back. Leftovers of transactions that never started
    or had committed are removed either way.
    """
    root = Path(root)
    journal = root / JOURNAL_NAME
    said = None
    if journal.is_dir():
        try:
            intent = json.loads((journal / _INTENT).read_text())
            said = (f"{intent['what']} (pid {intent['pid']} on {intent['host']}, started "
                    f"{intent['started']})")
        except (OSError, ValueError, KeyError, TypeError):
            said = "a change"
        _play_back(root, journal)
        _remove_journal(root, journal)
    for stale in root.glob(f"{JOURNAL_NAME}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    return said


def _play_back(root: Path, journal: Path) -> None:
    entries = []
    try:
        with open(journal / _MANIFEST, "rb") as f:
            for line in f:
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    break  # a line cut by a kill: its path was never written
    except FileNotFoundError:
        return
    for entry in reversed(entries):
        path = Path(entry["path"])
        path = path if path.is_absolute() else root / path
        for tmp in _temporaries(path):
            tmp.unlink(missing_ok=True)
        if not entry["existed"]:
            _remove(path)
            fsync_dir(path.parent)  # else the removed file may come back after a crash
        elif entry.get("dir"):
            _remove(path)
            shutil.copytree(journal / entry["backup"], path)
            _fsync_tree(path)  # whole before the journal that could restore it again goes
            fsync_dir(path.parent)
        else:
            atomic_copy(journal / entry["backup"], path, mode=entry["mode"])


def _remove_journal(root: Path, journal: Path) -> None:
    if not journal.exists():
        return
    gone = root / f"{JOURNAL_NAME}.done-{secrets.token_hex(4)}"
    os.rename(journal, gone)  # the commit point: after this nothing is played back
    fsync_dir(root)
    shutil.rmtree(gone, ignore_errors=True)


def _highest_missing(path: Path) -> Path | None:
    """The outermost folder (or ``path`` itself) of ``path`` that does not exist yet."""
    if path.exists():
        return None
    top = path
    while not top.parent.exists():
        top = top.parent
    return top


def _temporaries(path: Path) -> list[Path]:
    """Hidden temporaries of our atomic writes and zarr's ``<stem>.<hex>.partial``."""
    found = temporaries_of(path)
    with contextlib.suppress(OSError):
        found += path.parent.glob(f"{path.stem if path.suffix else path.name}.*.partial")
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _linked(path: Path, backup: Path) -> bool:
    """Whether ``backup`` could be made a hard link to ``path``."""
    try:
        os.link(path, backup)
    except OSError:  # another device, or no hard links there: copied instead
        return False
    return True


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for sub in path.rglob("*"):
            if sub.is_file():
                _fsync_file(sub)
            elif sub.is_dir():  # its entries, as the top folder's
                fsync_dir(sub)
        fsync_dir(path)
    elif path.is_file():
        _fsync_file(path)
