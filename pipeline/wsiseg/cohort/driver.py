"""The driver of a cohort run: ledger, summary, report, run lock, and where slides run."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from wsiseg.atomic import ensure_out_dir
from wsiseg.cohort.cluster import check_cluster_options, run_on_cluster, runs_in_process
from wsiseg.cohort.ids import assign_slide_ids
from wsiseg.cohort.one_slide import done_row, run_one
from wsiseg.cohort.rows import RunOptions, SlideRow, write_summary
from wsiseg.cohort.worker import cached_guidenet, inference_choice
from wsiseg.config import Workflow, load_workflow
from wsiseg.destination import Destination
from wsiseg.errors import UsageError, WsisegError
from wsiseg.ledger import LEDGER_NAME, Ledger, format_status, now_iso
from wsiseg.lock import is_locked, read_holder
from wsiseg.report import REPORT_NAME, write_report

log = logging.getLogger(__name__)


def tile_cohort(
    slides: Sequence[str], out_dir: Path, *, workflow: str | None = None,
    mpp: float | None = None, force: bool = False,
) -> int:
    """``wsiseg tile``: build the slide stores; a row per slide on stdout."""
    from wsiseg.store import retire_store
    from wsiseg.tiling import tile_slide

    wf = load_workflow(workflow)
    ensure_out_dir(out_dir)
    paths = [Path(s) for s in slides]
    ids = assign_slide_ids(paths, out_dir)
    status = 0
    for path in paths:
        store_path = out_dir / f"{ids[path]}.zarr"
        try:
            if force and store_path.exists():
                retire_store(store_path)
            t0 = time.perf_counter()
            result = tile_slide(path, store_path, wf, mpp=mpp, progress=True)
            print(
                f"{path}: {store_path} ({result.chunks_total} tissue chunks, "
                f"{result.chunks_written} written, {time.perf_counter() - t0:.1f} s)"
            )
        except WsisegError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    return status


# -- run -------------------------------------------------------------------------------------
def run_cohort(slides: Sequence[str], options: RunOptions) -> int:
    """``wsiseg run``: every slide to store + GeoJSON + thumbnail; ``summary.csv``,
    ``ledger.json`` and ``report.html``.

    Slides already done (store and outputs complete) are recorded, not recomputed. The others
    run on Dask distributed, one task per slide (see the module docstring for the cluster),
    or in this process when ``options.workers == 0`` or a cluster would have a single worker.
    Ctrl-C puts the slides that were running back to ``pending`` in the ledger and re-raises.

    Returns
    -------
    int
        0 when every slide is done, 1 when some slide failed.
    """
    from wsiseg.nets import missing_weights_error, weights_card  # torch: not for `status`
    from wsiseg.runtime import resolve_choice

    wf = load_workflow(options.workflow)
    if not options.guidenet:
        raise UsageError(str(missing_weights_error("guidenet")))
    check_cluster_options(options)
    dest = Destination.parse(options.out_dir)
    # The card and the runtime choice are checked here, before any slide or worker, so bad
    # weights or a bad --precision are one error, not N failures (and OpenVINO is imported
    # on this thread, with wsiseg.runtime: see resolve_choice). The network itself loads on
    # a thread beside the first slide's tissue mask and first tiles (0.2–0.3 s of a run);
    # the cluster path waits for it, so an OpenVINO conversion is done once, into the cache
    # every worker then reads.
    card = weights_card(Path(options.guidenet), role="guidenet", workflow=wf)
    resolve_choice(options.device, *inference_choice(wf, options))
    paths = list({Path(s).resolve(): Path(s) for s in slides}.values())  # each slide once
    with contextlib.ExitStack() as stack:
        loader = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="wsiseg-load"))
        model = loader.submit(lambda: cached_guidenet(options.guidenet, wf, options.device,
                                                      options)[0])
        out_dir = stack.enter_context(_driver_dir(dest))
        stack.enter_context(_run_lock(dest, out_dir))
        # Workers get a local directory, or the URL they upload finished slides to.
        options = replace(options, out_dir=dest.url if dest.remote else out_dir)
        ids = assign_slide_ids(paths, dest)
        cohort = Cohort(dest, out_dir, Ledger.load(out_dir), options.progress)
        todo = cohort.start(paths, ids, options)
        serial = not todo or runs_in_process(options, len(todo))
        try:
            if serial:
                cohort.set_cluster("in process", 1 if todo else 0)
                _run_in_process(todo, ids, wf, model, card, options, cohort)
            else:
                model.result()
                run_on_cluster(todo, ids, wf, options, cohort)
        except KeyboardInterrupt:
            back = cohort.interrupt()
            print(f"interrupted: {len(back)} running slide(s) back to pending in "
                  f"{cohort.ledger.path}", file=sys.stderr)
            raise
        except WsisegError:  # e.g. the scheduler cannot be reached: the ledger stays true
            cohort.interrupt()
            raise
        rows = cohort.finish()
    failed = [r for r in rows if r.status == "failed"]
    for r in failed:
        print(f"failed: {r.reason}", file=sys.stderr)
        if r.extra.get("traceback"):  # a bug, not the slide's own problem: -v shows where
            log.info("%s failed here:\n%s", r.slide_id, r.extra["traceback"].rstrip())
    done = len(rows) - len(failed)
    where = dest.url.rstrip("/") if dest.remote else str(out_dir)
    print(f"{done} of {len(rows)} slides done; summary: {where}/summary.csv, "
          f"report: {where}/{REPORT_NAME}")
    return 1 if failed else 0


def print_status(out_dir: Path | str) -> int:
    """``wsiseg status DIR``: the run ledger as a table plus totals.

    Returns 0; 1 with a one-line message when ``DIR`` has no ledger, and 1 when slides
    are marked running by a run that is gone (killed: no process holds its lock).
    """
    try:
        dest = Destination.parse(out_dir)
        with tempfile.TemporaryDirectory(prefix="wsiseg-status-") as tmp:
            local = dest.local_dir or Path(tmp)
            if dest.remote:
                dest.download(LEDGER_NAME, local / LEDGER_NAME)
            if not (local / LEDGER_NAME).is_file():
                raise WsisegError(f"{dest.url}: no run ledger here ({LEDGER_NAME}); "
                                  "is it the --out directory of a wsiseg run?")
            ledger = Ledger.load(local)
    except WsisegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    gone = _dead_run(dest, ledger)
    print(format_status(ledger, run_gone=gone))
    return 0 if gone is None else 1


def _dead_run(dest: Destination, ledger: Ledger) -> str | None:
    """Who held the run lock, when the ledger has slides ``running`` but no live process
    holds it (a killed run); None when a run is alive or nothing is running. A remote
    destination has no kernel lock to ask: its ledger is taken as it stands."""
    if dest.remote or dest.local_dir is None:
        return None
    if not any(e.status == "running" for e in ledger.entries.values()):
        return None
    if is_locked(dest.local_dir):
        return None
    holder = read_holder(dest.local_dir)
    return holder.describe() if holder is not None else "no process holds its lock"


@contextlib.contextmanager
def _driver_dir(dest: Destination) -> Iterator[Path]:
    """The directory the driving process writes ledger, summary and report in: the output
    directory itself, or for a remote destination a local mirror of those three files
    (downloaded first; uploaded by ``Cohort`` after each change)."""
    if not dest.remote:
        assert dest.local_dir is not None
        ensure_out_dir(dest.local_dir)
        yield dest.local_dir
        return
    dest.check_writable()
    with tempfile.TemporaryDirectory(prefix="wsiseg-run-") as tmp:
        mirror = Path(tmp)
        for name in (LEDGER_NAME, "summary.csv"):
            dest.download(name, mirror / name)
        yield mirror


#: The lock object of a run on a remote destination (object stores have no file locks).
REMOTE_LOCK = ".wsiseg-run.lock"


@contextlib.contextmanager
def _run_lock(dest: Destination, out_dir: Path) -> Iterator[None]:
    from wsiseg.store import StoreError, StoreLock

    if dest.remote:
        held = dest.read_bytes(REMOTE_LOCK)
        if held is not None:
            raise WsisegError(
                f"{dest.url}: another wsiseg run is using this output location "
                f"({held.decode(errors='replace').strip()}); wait for it to finish (or remove "
                f"{REMOTE_LOCK} there if that run is gone)")
        fs, _ = dest.filesystem()
        fs.pipe_file(dest.join(REMOTE_LOCK),
                     f"{os.uname().nodename} pid {os.getpid()} since {now_iso()}".encode())
        try:
            yield
        finally:
            fs.rm_file(dest.join(REMOTE_LOCK))
        return
    lock = StoreLock(out_dir, "wsiseg run")
    try:
        lock.__enter__()
    except StoreError as exc:
        if "another wsiseg process" not in str(exc):
            raise  # read-only, or no such folder: said as it is
        holder = read_holder(out_dir)
        raise WsisegError(
            f"{out_dir}: another wsiseg run is using this output directory "
            f"({holder.describe() if holder else 'holder unknown'}); wait for it to finish"
        ) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


class Cohort:
    """The driving side of a run: ledger, summary rows and progress, one writer."""

    def __init__(self, dest: Destination, out_dir: Path, ledger: Ledger, progress: bool):
        self.dest, self.out_dir, self.ledger, self.progress = dest, out_dir, ledger, progress
        self.rows: list[SlideRow] = []
        self.run: dict = {}
        self.bar = None
        self.t0 = time.perf_counter()

    def start(self, paths: Sequence[Path], ids: dict[Path, str], options: RunOptions
              ) -> list[Path]:
        """Record done slides (not recomputed), queue the others; returns those to run."""
        todo = []
        for path in paths:
            slide_id = ids[path]
            row = None
            if not options.force and path.is_file():
                row = done_row(self.dest, path, slide_id, options.export_mask)
            if row is None:
                todo.append(path)
                self.ledger.mark_pending(slide_id, str(path))
            else:
                self.rows.append(row)
                self.ledger.mark_done_before(slide_id, str(path), _measurements(row))
        self.run = {"started": now_iso(), "finished": "", "wall_s": None, "slides": len(paths),
                    "skipped": len(paths) - len(todo), "done": 0, "failed": 0,
                    "interrupted": False, "cluster": "", "workers": 0}
        self.ledger.runs = [*self.ledger.runs[-(_RUNS_KEPT - 1):], self.run]
        self.ledger.save()
        if self.rows:
            write_summary(self.out_dir / "summary.csv", self.rows)
        self._upload(LEDGER_NAME, "summary.csv")
        from tqdm import tqdm

        self.bar = tqdm(total=len(todo), desc="slides", unit="slide",
                        disable=not self.progress, file=sys.stderr)
        return todo

    def set_cluster(self, description: str, workers: int) -> None:
        self.run.update(cluster=description, workers=workers)
        self.ledger.save()
        self._upload(LEDGER_NAME)

    def started(self, slide_id: str, worker: str, when: str | None = None) -> None:
        self.ledger.mark_started(slide_id, worker, when)
        self.ledger.save()
        self._upload(LEDGER_NAME)

    def finished(self, row: SlideRow, worker: str = "") -> None:
        ok = row.status != "failed"
        self.ledger.mark_finished(row.slide_id, ok=ok, reason=row.reason, seconds=row.seconds,
                                  worker=worker or row.extra.get("worker", ""),
                                  measurements=_measurements(row))
        self.run["done" if ok else "failed"] += 1
        self.rows.append(row)
        self.ledger.save()
        write_summary(self.out_dir / "summary.csv", self.rows)
        self._upload(LEDGER_NAME, "summary.csv")
        if self.bar is not None:
            self.bar.set_postfix_str(row.slide_id)
            self.bar.update(1)

    def interrupt(self) -> list[str]:
        back = self.ledger.mark_interrupted()
        self.run.update(interrupted=True, finished=now_iso())
        self._close()
        return back

    def finish(self) -> list[SlideRow]:
        self.run.update(finished=now_iso(), wall_s=round(time.perf_counter() - self.t0, 3))
        self._close()
        return self.rows

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.ledger.save()
        write_summary(self.out_dir / "summary.csv", self.rows)
        if self.dest.remote:  # the report links the outputs that are there now
            write_report(self.out_dir, self.ledger, names=self.dest.names(),
                         location=self.dest.url)
        else:
            write_report(self.out_dir, self.ledger)
        self._upload(LEDGER_NAME, "summary.csv", REPORT_NAME)

    def _upload(self, *names: str) -> None:
        """Remote destination: put the driver's files there after they changed."""
        if self.dest.remote:
            for name in names:
                if (self.out_dir / name).is_file():
                    self.dest.upload(self.out_dir / name, name)


_RUNS_KEPT = 100  # run records kept in the ledger


def _measurements(row: SlideRow) -> dict:
    m = {"tissue_mm2": row.tissue_mm2, "tumor_mm2": row.tumor_mm2,
         "tumor_fraction": row.tumor_fraction, "foci": row.extra.get("foci")}
    return {k: v for k, v in m.items() if v is not None}


def _run_in_process(
    todo: Sequence[Path], ids: dict[Path, str], wf: Workflow, model: Future, card,
    options: RunOptions, cohort: Cohort,
) -> None:
    """Run ``todo`` one after another; ``model`` is GuideNet still loading (a future)."""
    for path in todo:
        cohort.started(ids[path], "in process")
        row = run_one(path, ids[path], wf, model, card, options)
        if model.done() and model.exception() is not None:
            raise model.exception()  # weights that cannot load: one error, not one per slide
        cohort.finished(row, "in process")
    model.result()  # bad weights are an error even when no slide needed them
