"""A refine round is a transaction: an exception, Ctrl-C or kill -9 at any point leaves the
store and the published files exactly as before, byte for byte (issue 15.3)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import shapely

import wsiseg.outputs
import wsiseg.refine.round
import wsiseg.rounds
from wsiseg import journal
from wsiseg.atomic import atomic_write_bytes
from wsiseg.refine import randomwalk_refiner, refine_round
from wsiseg.rounds import undo
from wsiseg.store import SlideStore

from conftest import CMU_SVS, REPO, real
from storekit import (
    blobs,
    feature,
    one_tumor,
    refined_low,
    run_store,
    stroke_away_from_the_tumor,
    write_export,
)

SLIDE_ID = "cmu"


def dir_snapshot(*folders: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every file and folder under ``folders``: relative path → (mode, bytes); the lock
    file's content (who held it last) is not part of the store."""
    snap: dict[str, tuple[int, bytes | None]] = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            rel = f"{folder.name}/{p.relative_to(folder)}"
            if p.name == ".lock":
                continue
            mode = p.stat().st_mode & 0o7777
            snap[rel] = (mode, p.read_bytes() if p.is_file() else None)
    return snap


def diff(before: dict, after: dict) -> list[str]:
    keys = sorted(set(before) | set(after))
    return [k for k in keys if before.get(k) != after.get(k)]


def scribble_export(store: SlideStore, path: Path, at: tuple[int, int] = (1, 3)) -> Path:
    """A tumor brush and a non-tumor stroke on tissue (at ``at`` fifths of its pixels), in
    QuPath-frame coordinates."""
    from scipy import ndimage

    tissue = ndimage.binary_erosion(store.tissue_mask, iterations=3)
    rr, cc = np.nonzero(tissue)
    rows, cols = store.frame.working_shape
    pts = [((cc[i] + 0.5) * cols / tissue.shape[1], (rr[i] + 0.5) * rows / tissue.shape[0])
           for i in ((at[0] * len(rr)) // 5, (at[1] * len(rr)) // 5)]
    (x0, y0), (x1, y1) = pts
    brush = shapely.box(x0 - 15, y0 - 15, x0 + 15, y0 + 15)
    line = shapely.LineString([(x1 - 25, y1), (x1, y1 + 6), (x1 + 25, y1 - 6)])
    q = store.frame.transform_geometry
    return write_export(path, [feature(q(brush, "working", "qupath"), "Tumor"),
                               feature(q(line, "working", "qupath"), "Stroma")])


@pytest.fixture()
def cmu_store(tmp_path, small_workflow):
    out = tmp_path / "out"
    store = run_store(real(CMU_SVS), out, SLIDE_ID, small_workflow, blobs)
    return store, out


class Boom(Exception):
    pass


def _after(fn, exc=Boom):
    """``fn`` doing its work, then failing: the partial writes are on disk."""
    def wrapped(*args, **kwargs):
        fn(*args, **kwargs)
        raise exc("injected")
    return wrapped


def _instead(exc=Boom):
    def wrapped(*args, **kwargs):
        raise exc("injected")
    return wrapped


def _nth_call_fails(fn, n: int):
    calls = {"k": 0}

    def wrapped(*args, **kwargs):
        calls["k"] += 1
        if calls["k"] == n:
            raise Boom("injected")
        return fn(*args, **kwargs)
    return wrapped


# (module, name, replacement factory): every stage of a round, failing after its writes.
STAGES = [
    (wsiseg.rounds, "save_backup", lambda f: _after(f)),
    (wsiseg.refine.round, "blend_windows", lambda f: _nth_call_fails(f, 1)),
    (wsiseg.rounds, "recontour", lambda f: _after(f)),
    (wsiseg.rounds, "atomic_write_or_link", lambda f: _after(f)),
    (wsiseg.rounds, "write_round_index", lambda f: _after(f)),
    (wsiseg.outputs, "atomic_write_bytes", lambda f: _nth_call_fails(f, 2)),  # r<k> out
    (wsiseg.rounds, "write_round_geojson", lambda f: _after(f)),
    (wsiseg.refine.round, "measurements", lambda f: _after(f)),
    (SlideStore, "update_attrs", lambda f: _after(f)),
    (journal.Transaction, "commit", lambda f: _instead(KeyboardInterrupt)),
    (journal, "fsync_dir", lambda f: _nth_call_fails(f, 3)),
]


def test_a_failure_at_every_step_leaves_store_and_files_byte_for_byte(cmu_store, tmp_path,
                                                                      monkeypatch):
    store, out = cmu_store
    export = scribble_export(store, tmp_path / "scribbles.geojson")
    before = dir_snapshot(store.path, out)

    def good(s, windows, window_px):  # the refiner's result does not matter here
        return [np.full((window_px, window_px), 0.9, np.float32) for _ in windows]

    def refiner_fails_after_merge(s, windows, window_px):
        assert (np.asarray(s["scribbles"][...]) != 0).any()  # the merge is on disk
        raise MemoryError("injected: out of memory in the refiner")

    failures = [(None, "refiner", None)] + STAGES
    for module, name, make in failures:
        with monkeypatch.context() as m:
            refiner = good
            if module is None:
                refiner = refiner_fails_after_merge
            else:
                m.setattr(module, name, make(getattr(module, name)))
            with pytest.raises((Boom, MemoryError, KeyboardInterrupt)):
                refine_round(store, export, out, SLIDE_ID, refiner, "randomwalk")
        assert diff(before, dir_snapshot(store.path, out)) == [], f"failure in {name}"
        assert store.attrs["rounds"][-1]["round"] == 0, name
    # The same export then refines: nothing of it was recorded.
    result = refine_round(store, export, out, SLIDE_ID, good, "randomwalk")
    assert result.round == 1 and result.new_pixels > 0
    assert not journal.pending(store.path)
    # Round 2 (the undo record group exists now): failures still change nothing.
    after = dir_snapshot(store.path, out)
    second = scribble_export(store, tmp_path / "second.geojson", at=(2, 4))
    for module, name, make in STAGES[:1] + STAGES[-3:]:
        with monkeypatch.context() as m:
            m.setattr(module, name, make(getattr(module, name)))
            with pytest.raises((Boom, KeyboardInterrupt)):
                refine_round(store, second, out, SLIDE_ID, good, "fixed")
        assert diff(after, dir_snapshot(store.path, out)) == [], f"round 2, failure in {name}"
    # Undo is a transaction too: failing at its last write changes nothing.
    with monkeypatch.context() as m:
        m.setattr(SlideStore, "update_attrs", _after(SlideStore.update_attrs))
        with pytest.raises(Boom):
            undo(store, out, SLIDE_ID)
    assert diff(after, dir_snapshot(store.path, out)) == []
    assert undo(store, out, SLIDE_ID) == 0


def test_a_failing_round_that_changes_no_contour_leaves_everything_as_before(
        tmp_path, small_workflow, monkeypatch):
    """Such a round's record and index are hard links to the round before's and its latest
    published file is left as it was: failing at each step, it still changes nothing."""
    out = tmp_path / "out"
    store = run_store(real(CMU_SVS), out, SLIDE_ID, small_workflow, one_tumor)
    for k in (1, 2):  # round 2 links both its record and its index (see test_round_index)
        export = stroke_away_from_the_tumor(store, tmp_path / f"s{k}.geojson", k)
        if k == 2:
            before = dir_snapshot(store.path, out)
            for module, name, make in [s for s in STAGES if s[1] != "atomic_write_bytes"]:
                with monkeypatch.context() as m:
                    m.setattr(module, name, make(getattr(module, name)))
                    with pytest.raises((Boom, KeyboardInterrupt)):
                        refine_round(store, export, out, SLIDE_ID, refined_low, "fixed")
                assert diff(before, dir_snapshot(store.path, out)) == [], f"failure in {name}"
        assert refine_round(store, export, out, SLIDE_ID, refined_low, "fixed").round == k
    record = [wsiseg.rounds.round_geojson_path(store, k) for k in (1, 2)]
    assert os.path.samefile(*record)


def test_a_file_replaced_by_rename_is_backed_up_by_a_hard_link(tmp_path, monkeypatch):
    """``protect(..., replaced_by_rename=True)`` keeps the old file under the backup's name
    (no copy); a rollback restores it. Where hard links are refused, it is copied."""
    root = tmp_path / "store"
    root.mkdir()
    published, inside = tmp_path / "slide.geojson", root / "zarr.json"
    published.write_bytes(b"round 0")
    inside.write_bytes(b"{}")
    with journal.Transaction(root, "test") as txn:
        txn.protect([inside])
        txn.protect([published], replaced_by_rename=True)
        backups = sorted((root / journal.JOURNAL_NAME).glob("b*"))
        assert [os.path.samefile(b, published) for b in backups] == [False, True]
        atomic_write_bytes(published, b"round 1")
        inside.write_bytes(b"{changed in place}")
    assert published.read_bytes() == b"round 0" and inside.read_bytes() == b"{}"

    def refused(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refused)
    with pytest.raises(Boom), journal.Transaction(root, "test") as txn:
        txn.protect([published], replaced_by_rename=True)
        (backup,) = (root / journal.JOURNAL_NAME).glob("b*")
        assert backup.read_bytes() == b"round 0" and not os.path.samefile(backup, published)
        atomic_write_bytes(published, b"round 1")
        raise Boom("injected")
    assert published.read_bytes() == b"round 0"
    assert not journal.needs_recovery(root)


class _Calls(list):
    inodes: list[tuple[int, str]]


def _recording_fsyncs(monkeypatch) -> _Calls:
    """Each fsync's file or folder, in order, from now on."""
    calls: _Calls = _Calls()
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        inodes.append((os.fstat(fd).st_ino, calls[-1]))
        return real_fsync(fd)

    inodes = calls.inodes = []  # each call's inode and name

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_a_transaction_makes_its_atomic_writes_durable_at_its_commit(tmp_path, monkeypatch):
    """Inside a transaction an atomic write of a path it protects is not fsync'd before its
    rename: the journal undoes it until the commit, which fsyncs the file and its folder
    once. A path it does not protect is made durable by its write, as outside one; so are
    a roll-back's restored files."""
    root = tmp_path / "store"
    root.mkdir()
    protected, other = root / "r1.geojson", tmp_path / "notes.txt"
    protected.write_bytes(b"round 0")
    calls = _recording_fsyncs(monkeypatch)
    with journal.Transaction(root, "test") as txn:
        txn.protect([protected])
        journal_syncs = len(calls)
        atomic_write_bytes(protected, b"round 1")
        atomic_write_bytes(other, b"unprotected")
        assert calls[journal_syncs:] == [next(p for p in calls if ".notes.txt." in p),
                                         str(tmp_path)]  # only the unprotected write's
        before_commit = len(calls)
        txn.commit()
    at_commit = calls[before_commit:]
    assert at_commit.count(str(protected)) == 1 and at_commit.count(str(root)) >= 1
    assert at_commit.index(str(protected)) < at_commit.index(str(root))
    assert protected.read_bytes() == b"round 1"

    calls.clear()
    with pytest.raises(Boom), journal.Transaction(root, "test") as txn:
        txn.protect([protected])
        atomic_write_bytes(protected, b"round 2")
        written = len(calls)
        raise Boom("injected")
    assert protected.read_bytes() == b"round 1"
    restored = calls[written:]  # the roll-back's copy is fsync'd before its rename
    assert any(f".{protected.name}." in p for p in restored) and str(root) in restored


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_paths_protected_together_are_recorded_with_one_flush(tmp_path, monkeypatch):
    """``protecting()``: the backups and manifest lines of several ``protect`` calls are
    made durable once, at the block's end; a roll-back restores them all."""
    root = tmp_path / "store"
    root.mkdir()
    a, b, new = root / "a", tmp_path / "b.geojson", root / "sub" / "c"
    a.write_bytes(b"a0")
    b.write_bytes(b"b0")
    calls = _recording_fsyncs(monkeypatch)
    with pytest.raises(Boom), journal.Transaction(root, "test") as txn:
        start = len(calls)
        with txn.protecting():
            txn.protect([a])
            txn.protect([b], replaced_by_rename=True)
            txn.protect([new])
            assert calls[start:] == []  # nothing flushed inside the block
        manifest = str(root / journal.JOURNAL_NAME / "manifest.jsonl")
        assert calls[start:].count(manifest) == 1
        assert calls[start:].count(str(root / journal.JOURNAL_NAME)) == 1
        a.write_bytes(b"a1")
        atomic_write_bytes(b, b"b1")
        new.parent.mkdir()
        new.write_bytes(b"c1")
        raise Boom("injected")
    assert a.read_bytes() == b"a0" and b.read_bytes() == b"b0" and not new.parent.exists()
    assert not journal.needs_recovery(root)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_a_write_inside_a_protecting_block_flushes_itself(tmp_path, monkeypatch):
    """Until a ``protecting()`` block ends its paths are not in the manifest: an atomic
    write there is not left to the commit (it is fsync'd before its rename), and protections
    whose block raised are dropped, not left looking recorded."""
    root = tmp_path / "store"
    root.mkdir()
    path = root / "r1.geojson"
    path.write_bytes(b"round 0")
    calls = _recording_fsyncs(monkeypatch)
    with journal.Transaction(root, "test") as txn:
        with txn.protecting():
            txn.protect([path])
            start = len(calls)
            atomic_write_bytes(path, b"too early")
            assert any(f".{path.name}." in p for p in calls[start:])  # flushed itself
        with pytest.raises(Boom), txn.protecting():
            txn.protect([root / "r2.geojson"])
            raise Boom("injected")
        assert root / "r2.geojson" not in txn._protected
        assert len(list((root / journal.JOURNAL_NAME).glob("b*"))) == 1  # r1's backup only
        txn.commit()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_a_roll_back_makes_its_removals_and_a_commit_its_new_folders_durable(
        tmp_path, monkeypatch):
    """A file the transaction created is removed by its roll-back, and the removal is
    flushed in its folder (else a crash could bring it back, empty); a folder it created is
    flushed at the commit at every depth, not only at its top."""
    root = tmp_path / "store"
    (root / "rounds").mkdir(parents=True)
    created = root / "rounds" / "r1.geojson"
    calls = _recording_fsyncs(monkeypatch)
    with pytest.raises(Boom), journal.Transaction(root, "test") as txn:
        txn.protect([created])
        created.write_bytes(b"round 1")
        start = len(calls)
        raise Boom("injected")
    assert not created.exists() and str(root / "rounds") in calls[start:]
    deep = root / "history" / "r1" / "c" / "0"
    calls.clear()
    with journal.Transaction(root, "test") as txn:
        txn.protect([deep / "0"])
        deep.mkdir(parents=True)
        (deep / "0").write_bytes(b"chunk")
        txn.commit()
    for folder in (deep, deep.parent, deep.parent.parent, root / "history", root):
        assert str(folder) in calls, folder


def test_a_protect_call_that_fails_part_way_protects_none_of_its_paths(tmp_path,
                                                                        monkeypatch):
    """A backup that cannot be made (a full disk) fails the whole ``protect`` call: none of
    its paths counts as protected, so protecting one again records it (its write is rolled
    back), and a later backup never takes the name of one still on disk (a hard link to a
    published file, which a copy through that name would overwrite)."""
    root, out = tmp_path / "store", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    p, x, y, z = (out / f"{name}.geojson" for name in "pxyz")
    for path in (p, x, y, z):
        path.write_text(path.name)
    real_copyfile = shutil.copyfile

    def full_disk_for_y(src, dst, *args, **kwargs):
        if Path(src) == y:
            raise OSError(28, "No space left on device")
        return real_copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(journal.shutil, "copyfile", full_disk_for_y)
    monkeypatch.setattr(journal, "_linked", lambda path, backup: False if path == y else (
        os.link(path, backup) or True))
    with pytest.raises(Boom), journal.Transaction(root, "test") as txn:
        with pytest.raises(OSError), txn.protecting():
            txn.protect([p], replaced_by_rename=True)
            txn.protect([x, y], replaced_by_rename=True)  # x linked, then y fails
        assert txn._protected == {} and not list(txn.dir.glob("b*"))
        txn.protect([z], replaced_by_rename=True)
        assert x.read_text() == "x.geojson"  # not written through a reused backup name
        with pytest.raises(OSError):
            txn.protect([x, y])  # not batched: the same
        txn.protect([x])
        x.write_text("new")
        raise Boom("injected")
    assert x.read_text() == "x.geojson" and z.read_text() == "z.geojson"


def test_a_refine_round_fsyncs_each_file_it_writes_once(cmu_store, tmp_path, monkeypatch):
    """A round's atomic writes (its GeoJSON, index, published files, attributes) leave
    their flushes to the round's commit: no file of the round is fsync'd twice."""
    store, out = cmu_store
    export = stroke_away_from_the_tumor(store, tmp_path / "s1.geojson", 1)
    calls = _recording_fsyncs(monkeypatch)
    refine_round(store, export, out, SLIDE_ID, randomwalk_refiner(130.0, 0.4), "rw")
    # by inode: an atomic write's temporary is the file its rename puts in place
    files = [(ino, p) for ino, p in calls.inodes
             if journal.JOURNAL_NAME not in p and not Path(p).is_dir()]
    twice = sorted({p for ino, p in files if [i for i, _ in files].count(ino) > 1})
    assert files and not twice, twice


def test_an_interrupted_round_is_rolled_back_and_said_by_the_next_open(cmu_store, tmp_path,
                                                                       caplog):
    """A journal left by a killed process (simulated: the transaction's state mid-round,
    copied before its rollback) is played back by the next open, which says so."""
    store, out = cmu_store
    export = scribble_export(store, tmp_path / "s.geojson")
    before = dir_snapshot(store.path, out)
    frozen = tmp_path / "frozen"

    def freeze(s, windows, window_px):  # mid-round: scribbles merged, journal live
        shutil.copytree(s.path, frozen / s.path.name)
        shutil.copytree(out, frozen / "out", ignore=shutil.ignore_patterns("*.zarr"))
        raise Boom("killed here")

    with pytest.raises(Boom):
        refine_round(store, export, out, SLIDE_ID, freeze, "rw")
    # Put the killed state back in place, as kill -9 would have left it.
    shutil.rmtree(store.path)
    shutil.copytree(frozen / store.path.name, store.path)
    assert journal.pending(store.path)
    assert diff(before, dir_snapshot(store.path, out))  # scribbles are merged on disk
    with caplog.at_level("WARNING"):
        reopened = SlideStore.open(store.path)
    assert "refine round 1" in caplog.text and "rolled back" in caplog.text
    assert diff(before, dir_snapshot(store.path, out)) == []
    result = refine_round(reopened, export, out, SLIDE_ID, randomwalk_refiner(130.0, 0.4), "rw")
    assert result.round == 1 and result.new_pixels > 0


def test_a_journal_killed_while_being_written_is_cleared_by_the_next_open(cmu_store, caplog):
    """kill -9 between the journal's staging folder and its rename leaves
    ``.wsiseg-txn.new-*`` and an unchanged store: the next open removes it, silently."""
    store, out = cmu_store
    before = dir_snapshot(store.path, out)
    staging = store.path / f"{journal.JOURNAL_NAME}.new-0123abcd"
    staging.mkdir()
    (staging / "intent.json").write_text("{")  # cut short by the kill
    with caplog.at_level("WARNING"):
        SlideStore.open(store.path)
    assert not staging.exists()
    assert "rolled back" not in caplog.text
    assert diff(before, dir_snapshot(store.path, out)) == []


_HARNESS = """
import sys
from wsiseg.cli import main
import wsiseg.refine, wsiseg.session, skimage.segmentation  # imported before "go"
print("ready", flush=True)
sys.stdin.readline()
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    # One BLAS thread: the random walker's solver is slower with more on a busy machine.
    return dict(os.environ, PYTHONPATH=str(REPO / "pipeline"), OMP_NUM_THREADS="1",
                OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _spawn(args: list[str]) -> subprocess.Popen:
    """A ``wsiseg`` process with its modules imported, waiting for "go" on stdin."""
    return subprocess.Popen([sys.executable, "-c", _HARNESS, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                            text=True)


def _go(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline().strip() == "ready"
    proc.stdin.write("go\n")
    proc.stdin.flush()


def test_kill_9_at_random_moments_never_leaves_half_a_round(cmu_store, tmp_path):
    """≥ 20 kills of ``wsiseg refine`` at random moments of its round: every time the store
    is, once reopened, exactly as before the round or holds the whole round; then the same
    export refines."""
    store, out = cmu_store
    export = scribble_export(store, tmp_path / "s.geojson")
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    before = dir_snapshot(store.path, out)
    args = ["refine", str(store.path), "--scribbles", str(export), "--refiner", "randomwalk"]

    def reset():
        shutil.rmtree(out)
        shutil.copytree(pristine, out)

    # One whole round, timed from "go", sets the window the kills fall in.
    proc = _spawn(args)
    _go(proc)
    t0 = time.monotonic()
    assert proc.wait(120) == 0, proc.stderr.read()
    round_s = time.monotonic() - t0
    reset()
    rng = random.Random(15)
    outcomes = {"before": 0, "after": 0, "rolled back": 0}
    kills = 22
    waiting = _spawn(args)  # the next process imports while the current one runs
    for k in range(kills):
        proc = waiting
        _go(proc)
        waiting = _spawn(args) if k + 1 < kills else None
        time.sleep(rng.uniform(0.0, 1.2 * round_s))  # some land after the commit
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
        proc.stdin.close()
        outcomes["rolled back"] += journal.pending(store.path)
        reopened = SlideStore.open(store.path)  # recovers
        assert not journal.pending(store.path)
        if len(reopened.attrs["rounds"]) == 1:
            assert diff(before, dir_snapshot(store.path, out)) == []
            outcomes["before"] += 1
        else:
            assert [r["round"] for r in reopened.attrs["rounds"]] == [0, 1]
            latest = (out / f"{SLIDE_ID}.geojson").read_bytes()
            assert latest == (out / f"{SLIDE_ID}.r1.geojson").read_bytes()
            assert latest == (store.path / "rounds" / "r1.geojson").read_bytes()
            outcomes["after"] += 1
            reset()
    print(outcomes)
    assert outcomes["rolled back"] >= 3, outcomes  # kills did land inside rounds
    done = subprocess.run([sys.executable, "-m", "wsiseg.cli", *args], capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("round 1:"), done.stdout
