"""The store lock excludes (15.8), read-only stores are refused or read in one line (20.3),
and ``wsiseg status`` tells a killed run from a live one (20.7)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import wsiseg.lock
from test_txn import dir_snapshot, scribble_export
from wsiseg.cli import main
from wsiseg.cohort import print_status
from wsiseg.ledger import Ledger
from wsiseg.lock import StoreLock, is_locked, read_holder
from wsiseg.store import SlideStore, StoreError

from conftest import CMU_SVS, REPO, real
from storekit import blobs, run_store

SLIDE_ID = "cmu"

_CONTENDER = """
import os, sys, time
from pathlib import Path
from wsiseg.lock import StoreLock
folder, log, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
for _ in range(n):
    with StoreLock(folder, "contender", wait_s=60):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        os.write(fd, f"+{os.getpid()}\\n".encode())
        time.sleep(0.002)
        os.write(fd, f"-{os.getpid()}\\n".encode())
        os.close(fd)
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO / "pipeline"))


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), text=True)


def test_six_processes_never_hold_the_lock_at_once(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("")
    procs = [_python(_CONTENDER, str(tmp_path), str(log), "40") for _ in range(6)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:  # all start together
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
        p.stdout.close()
        p.stderr.close()
        p.stdin.close()
    events = log.read_text().split()
    assert len(events) == 6 * 40 * 2
    holder = None
    for ev in events:  # strictly +a -a +b -b …: never two holders
        if ev.startswith("+"):
            assert holder is None, "two processes held the lock at once"
            holder = ev[1:]
        else:
            assert holder == ev[1:]
            holder = None
    assert (tmp_path / ".lock").exists()  # never deleted: deleting would break exclusion


def test_a_killed_holder_releases_the_lock_and_is_named(tmp_path):
    code = ("import sys, time\nfrom wsiseg.lock import StoreLock\n"
            "with StoreLock(sys.argv[1], 'refine'):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    proc = _python(code, str(tmp_path))
    assert proc.stdout.readline().strip() == "held"
    assert is_locked(tmp_path)
    busy = rf"another wsiseg process.*pid {proc.pid}.*refine"
    with pytest.raises(StoreError, match=busy), StoreLock(tmp_path, "refine"):
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    proc.stderr.close()
    proc.stdin.close()
    assert not is_locked(tmp_path)
    assert read_holder(tmp_path).pid == proc.pid  # the dead holder, for messages
    with StoreLock(tmp_path, "refine"):  # taken at once, no stale-file guessing
        assert is_locked(tmp_path)


def test_shared_locks_exclude_writers_but_not_each_other(tmp_path):
    with (StoreLock(tmp_path, "export", shared=True), StoreLock(tmp_path, "export", shared=True),
          pytest.raises(StoreError, match="another wsiseg process"),
          StoreLock(tmp_path, "refine")):
        pass


@pytest.fixture()
def cmu_run(tmp_path, small_workflow):
    out = tmp_path / "out"
    store = run_store(real(CMU_SVS), out, SLIDE_ID, small_workflow, blobs)
    return store, out


def test_a_second_refine_stops_with_one_line_naming_the_holder(cmu_run, tmp_path, capsys):
    store, out = cmu_run
    export = scribble_export(store, tmp_path / "s.geojson")
    before = dir_snapshot(store.path, out)
    with StoreLock(store.path, "refine"):
        code = main(["refine", str(store.path), "--scribbles", str(export),
                     "--refiner", "randomwalk"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "another wsiseg process is using this store" in err and str(os.getpid()) in err
    assert dir_snapshot(store.path, out) == before


@pytest.fixture()
def make_read_only(monkeypatch):
    """Make a folder read-only: chmod -R a-w, or, for root (whom permissions do not stop),
    a file system that answers EROFS to every write below it."""
    chmodded: list[Path] = []

    def make(root: Path) -> None:
        root = root.resolve()
        if os.geteuid() != 0:
            for p in [root, *root.rglob("*")]:
                p.chmod(p.stat().st_mode & ~0o222)
            chmodded.append(root)
            return
        real_access, real_open = os.access, os.open

        def below(path) -> bool:
            try:
                return Path(os.fspath(path)).resolve().is_relative_to(root)
            except TypeError:
                return False

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and below(path):
                return False
            return real_access(path, mode, *args, **kwargs)

        def open_(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and below(path):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
        monkeypatch.setattr(os, "open", open_)

    yield make
    for root in chmodded:
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


def test_read_only_store_refine_and_undo_refuse_in_one_line_export_works(
        cmu_run, tmp_path, capsys, make_read_only):
    store, out = cmu_run
    export = scribble_export(store, tmp_path / "s.geojson")
    before = dir_snapshot(store.path, out)
    make_read_only(store.path)
    for argv in (["refine", str(store.path), "--scribbles", str(export), "--refiner",
                  "randomwalk"], ["undo", str(store.path)]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err == f"error: store is read-only: {store.path}", err
    assert dir_snapshot(store.path, out) == before
    exported = tmp_path / "exported"
    assert main(["export", str(store.path), "--out", str(exported),
                 "--what", "geojson,measurements"]) == 0, capsys.readouterr().err
    assert (exported / f"{SLIDE_ID}.r0.geojson").is_file()


def test_export_of_a_read_only_store_without_a_lock_file(cmu_run, tmp_path, make_read_only):
    store, _ = cmu_run
    (store.path / ".lock").unlink(missing_ok=True)  # e.g. a store copied onto read-only media
    make_read_only(store.path)
    with StoreLock(store.path, "export", shared=True):
        pass
    with pytest.raises(StoreError, match="store is read-only"), StoreLock(store.path, "refine"):
        pass
    assert SlideStore.open(store.path, mode="r").attrs["rounds"]


def test_lock_open_failure_eroFS_is_the_read_only_error(tmp_path, monkeypatch):
    """A mount that says EROFS only when the lock is opened (os.access said yes)."""
    real_open = os.open

    def erofs(path, flags, *args, **kwargs):
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(wsiseg.lock.os, "open", erofs)
    with pytest.raises(StoreError, match=f"store is read-only: {tmp_path}$"), StoreLock(
            tmp_path, "undo"):
        pass


_RUN = """
import sys, time
from pathlib import Path
from wsiseg.ledger import Ledger
from wsiseg.lock import StoreLock
out = Path(sys.argv[1])
with StoreLock(out, "wsiseg run"):
    ledger = Ledger.load(out)
    ledger.runs.append({"started": "now"})
    for sid in ("a", "b"):
        ledger.mark_pending(sid, f"/slides/{sid}.svs")
    ledger.mark_started("a", "worker-1")
    ledger.save()
    print("running", flush=True)
    time.sleep(600)
"""


def test_status_after_kill_9_says_the_run_is_gone(tmp_path, capsys):
    proc = _python(_RUN, str(tmp_path))
    assert proc.stdout.readline().strip() == "running", proc.stderr.read()
    assert print_status(tmp_path) == 0  # alive: running is the truth
    alive = capsys.readouterr().out
    assert "gone" not in alive and "running" in alive.splitlines()[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    proc.stderr.close()
    proc.stdin.close()
    assert print_status(tmp_path) == 1
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("a "))
    assert "interrupted" in row and "rerun" in row
    assert f"pid {proc.pid}" in text and "run that is gone" in text
    # The ledger itself is not rewritten by a status query.
    data = json.loads((tmp_path / "ledger.json").read_text())
    assert data["slides"]["a"]["status"] == "running"
    assert Ledger.load(tmp_path).entries["b"].status == "pending"
