"""Many slides: slide ids, the per-slide run on Dask distributed, ledger, summary, report.

A slide is *done* only when its store says so and all of its outputs exist; a rerun skips
done slides (``--force`` redoes them). One slide's failure never stops the others: it
becomes a row of ``summary.csv`` with a one-line reason, and the exit status is 1.

Scale-out: one Dask task per slide (tiling, GuideNet, contours and outputs all run inside the
worker). By default a LocalCluster sized to the machine is started and closed by the run (one
worker per GPU, each pinned to its device and carrying a ``GPU`` resource; on CPU one worker
per 4 cores and 3 GiB); ``--scheduler ADDRESS`` joins an existing cluster instead. Each worker
process loads GuideNet once per weights file and device. A worker that dies mid-slide has the
slide retried on another worker; a slide whose worker dies twice is failed with its reason.
The driving process alone writes ``ledger.json`` (workers send a ``start`` event), and writes
``summary.csv`` and ``report.html``. Outputs go to a local path or ``file://`` URL that every
worker can reach (a shared filesystem on a multi-machine cluster), or to any fsspec URL
(``s3://``, ``gs://``, ...): then each slide runs into a local staging directory of its worker
and is uploaded once finished (:mod:`wsiseg.destination`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import os
import queue
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from wsiseg.atomic import atomic_write_text
from wsiseg.config import Workflow, load_workflow
from wsiseg.destination import Destination
from wsiseg.errors import UsageError, WsisegError
from wsiseg.ledger import LEDGER_NAME, Ledger, format_status, now_iso
from wsiseg.lock import is_locked, read_holder
from wsiseg.logs import configure_worker_logging
from wsiseg.report import REPORT_NAME, write_report
from wsiseg.store import STORE_FORMAT, SlideStore, SourceInfo, file_fingerprint, source_differs

log = logging.getLogger(__name__)

SUMMARY_FIELDS = (
    "slide", "slide_id", "status", "reason", "tissue_mm2", "tumor_mm2", "tumor_fraction",
    "seconds", "runtime", "precision",
)


@dataclass(frozen=True)
class RunOptions:
    """Options of ``wsiseg run``.

    ``out_dir`` is a path, a ``file://`` URL or another fsspec URL. ``workers``: ``None``
    sizes a LocalCluster to the machine (a single-worker cluster runs in this process
    instead), ``0`` runs in this process, ``N`` starts N workers (at most one per GPU).
    ``threads_per_worker``: slides a worker runs at once (default 1). ``scheduler`` joins an
    existing Dask cluster.
    """

    out_dir: Path | str
    workflow: str | None = None
    guidenet: str | None = None
    mpp: float | None = None
    device: str = "auto"
    force: bool = False
    scheduler: str | None = None
    tta: bool = False
    export_mask: bool = False
    progress: bool = True
    workers: int | None = None
    threads_per_worker: int | None = None
    runtime: str | None = None  # None: the workflow's inference.runtime
    precision: str | None = None  # None: the workflow's inference.precision


@dataclass
class SlideRow:
    slide: str
    slide_id: str
    status: str  # "done" | "skipped" (already done) | "failed"
    reason: str = ""
    tissue_mm2: float | None = None
    tumor_mm2: float | None = None
    tumor_fraction: float | None = None
    seconds: float = 0.0
    runtime: str = ""  # the inference runtime GuideNet ran on (openvino, torch)
    precision: str = ""  # what it computed in (f32, bf16, fp16)
    extra: dict = field(default_factory=dict)

    def csv_row(self) -> dict[str, str]:
        d = asdict(self)
        d.pop("extra")
        return {k: "" if d[k] is None else str(d[k]) for k in SUMMARY_FIELDS}


# -- slide ids --------------------------------------------------------------------------------
def assign_slide_ids(slides: Sequence[Path], out: Path | Destination) -> dict[Path, str]:
    """Store names: the file stem, made unique when two slides would share one.

    Two slides with the same stem in different folders get ``<stem>-<8 hex of the path>``.
    A stem whose existing store belongs to another slide (another fingerprint) does too,
    so a store is never taken over by a different slide.
    """
    dest = out if isinstance(out, Destination) else Destination.parse(out)
    by_stem: dict[str, list[Path]] = {}
    for path in slides:
        by_stem.setdefault(_stem(path), []).append(path)
    ids: dict[Path, str] = {}
    for stem, paths in by_stem.items():
        for path in paths:
            unique = len(paths) == 1 and not _store_of_other_slide(dest, stem, path)
            ids[path] = stem if unique else f"{stem}-{_path_hash(path)}"
    return ids


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _path_hash(path: Path) -> str:
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]


def _store_of_other_slide(dest: Destination, slide_id: str, slide: Path) -> bool:
    source = _stored_source(dest.store_attrs(slide_id))
    if source is None or Path(source.path) == slide.resolve():
        return False
    try:
        return file_fingerprint(slide) != source.fingerprint
    except OSError:
        return True


def _stored_source(attrs: dict | None) -> SourceInfo | None:
    """The source slide recorded in a store's attributes (None: no store of this format)."""
    if attrs is None or attrs.get("format") != STORE_FORMAT:
        return None
    try:
        return SourceInfo.from_dict(attrs["source"])
    except (KeyError, TypeError):
        return None


def ensure_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".wsiseg-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise WsisegError(f"{out_dir}: cannot write the output directory ({reason})") from None


# -- tile ------------------------------------------------------------------------------------
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
    from wsiseg.nets import missing_weights_error

    wf = load_workflow(options.workflow)
    if not options.guidenet:
        raise UsageError(str(missing_weights_error("guidenet")))
    _check_cluster_options(options)
    dest = Destination.parse(options.out_dir)
    # Loaded here, before any slide or worker, so bad weights are one error, not N failures
    # (and an OpenVINO conversion is done once, into the cache every worker then reads).
    model, card = cached_guidenet(options.guidenet, wf, options.device, options)
    paths = list({Path(s).resolve(): Path(s) for s in slides}.values())  # each slide once
    with contextlib.ExitStack() as stack:
        out_dir = stack.enter_context(_driver_dir(dest))
        stack.enter_context(_run_lock(dest, out_dir))
        # Workers get a local directory, or the URL they upload finished slides to.
        options = replace(options, out_dir=dest.url if dest.remote else out_dir)
        ids = assign_slide_ids(paths, dest)
        cohort = _Cohort(dest, out_dir, Ledger.load(out_dir), options.progress)
        todo = cohort.start(paths, ids, options)
        serial = not todo or _runs_in_process(options, len(todo))
        try:
            if serial:
                cohort.set_cluster("in process", 1 if todo else 0)
                _run_in_process(todo, ids, wf, model, card, options, cohort)
            else:
                _run_on_cluster(todo, ids, wf, options, cohort)
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
    (downloaded first; uploaded by ``_Cohort`` after each change)."""
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


class _Cohort:
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
                row = _done_row(self.dest, path, slide_id, options.export_mask)
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
    todo: Sequence[Path], ids: dict[Path, str], wf: Workflow, model, card, options: RunOptions,
    cohort: _Cohort,
) -> None:
    for path in todo:
        cohort.started(ids[path], "in process")
        cohort.finished(run_one(path, ids[path], wf, model, card, options), "in process")


# -- Dask distributed ------------------------------------------------------------------------
#: Topic of the events a slide task sends when it starts (the ledger counts attempts by them).
EVENT_TOPIC = "wsiseg-slide"

#: Modules a worker process needs; imported once by the forkserver, then forked per worker.
_WORKER_PRELOAD = ("distributed", "numpy", "torch", "segmentation_models_pytorch", "skimage",
                   "openslide", "PIL", "safetensors", "wsiseg.cohort",
                   "wsiseg.nets", "wsiseg.runtime", "wsiseg.infer", "wsiseg.tiling",
                   "wsiseg.outputs")

# Sizing of the default LocalCluster on CPU: a slide task uses several cores (tiling threads,
# torch threads) and a few GiB (torch, the model, chunk-sized buffers).
_CORES_PER_CPU_WORKER = 4
_WORKER_MEMORY = 3 * 2**30


@dataclass(frozen=True)
class ClusterPlan:
    """The default LocalCluster for a run.

    Attributes
    ----------
    workers : int
        Worker processes.
    threads_per_worker : int
        Slides a worker runs at once.
    cpu_threads : int
        Torch intra-op threads and tiling threads of one slide task.
    memory_limit : int
        Bytes per worker (the nanny restarts a worker above 95 %).
    gpus : tuple of str
        CUDA devices, one worker each (pinned with ``CUDA_VISIBLE_DEVICES``); empty on CPU.
    """

    workers: int
    threads_per_worker: int
    cpu_threads: int
    memory_limit: int
    gpus: tuple[str, ...] = ()


def plan_local_cluster(
    device: str, slides: int, workers: int | None = None, threads_per_worker: int | None = None
) -> ClusterPlan:
    """Size a LocalCluster to this machine: one worker per GPU, else per 4 cores and 3 GiB.

    ``workers`` caps the count (never above the GPUs on CUDA); there are never more workers
    than ``slides``.
    """
    import psutil

    from wsiseg.infer import resolve_device

    cores = _usable_cores()
    memory = int(psutil.virtual_memory().total)
    threads = threads_per_worker or 1
    resolved = resolve_device(device)
    gpus: tuple[str, ...] = ()
    if resolved.type == "cuda":
        import torch

        ordinals = ([resolved.index] if resolved.index is not None
                    else list(range(torch.cuda.device_count())))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = visible.split(",") if visible else None
        gpus = tuple(names[i].strip() if names else str(i) for i in ordinals)
        n = len(gpus) if workers is None else min(workers, len(gpus))
    else:
        n = workers or max(1, min(cores // _CORES_PER_CPU_WORKER, memory // _WORKER_MEMORY))
    n = max(1, min(n, slides))
    return ClusterPlan(
        workers=n, threads_per_worker=threads, cpu_threads=max(1, cores // (n * threads)),
        memory_limit=memory // n, gpus=gpus[:n],
    )


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _check_cluster_options(options: RunOptions) -> None:
    if options.workers is not None and options.workers < 0:
        raise UsageError(f"--workers: must be 0 (in this process) or more, got {options.workers}")
    if options.threads_per_worker is not None and options.threads_per_worker < 1:
        raise UsageError(
            f"--threads-per-worker: must be 1 or more, got {options.threads_per_worker}")
    if options.scheduler and options.workers == 0:
        raise UsageError("--scheduler and --workers 0 contradict each other: pick one")


def _runs_in_process(options: RunOptions, todo: int) -> bool:
    """No cluster: ``workers == 0``, or a default cluster would have a single worker."""
    if options.scheduler:
        return False
    if options.workers is not None:
        return options.workers == 0
    plan = plan_local_cluster(options.device, todo, None, options.threads_per_worker)
    return plan.workers <= 1


def _run_on_cluster(
    todo: Sequence[Path], ids: dict[Path, str], wf: Workflow, options: RunOptions,
    cohort: _Cohort,
) -> None:
    """One task per slide on Dask distributed; results recorded as they complete."""
    from distributed import as_completed

    with _cluster_client(options, len(todo)) as (client, setup):
        print(f"dask: {setup.description}", file=sys.stderr)
        cohort.set_cluster(setup.description, setup.workers)
        events: queue.SimpleQueue = queue.SimpleQueue()
        client.subscribe_topic(EVENT_TOPIC, events.put)
        task_options = replace(options, device=setup.device)
        # Largest slides first, so that the cohort does not end waiting on one big slide.
        futures = {
            client.submit(
                slide_task, str(path), ids[path], wf, task_options, setup.cpu_threads,
                key=f"wsiseg-slide-{ids[path]}-{uuid.uuid4().hex[:8]}", pure=False,
                resources=setup.resources, retries=1, priority=_size_mib(path),
            ): path
            for path in todo
        }
        try:
            pending = as_completed(futures)
            while not pending.is_empty():
                _drain_events(events, cohort, wait_s=0.25)
                for future in pending.next_batch(block=False):
                    path = futures[future]
                    row = _task_row(future, path, ids[path])
                    _drain_events(events, cohort, wait_s=0.0)  # its start before its end
                    cohort.finished(row)
        except KeyboardInterrupt:
            client.cancel(list(futures), force=True)
            raise
        finally:
            client.unsubscribe_topic(EVENT_TOPIC)


def _size_mib(path: Path) -> int:
    try:
        return path.stat().st_size >> 20
    except OSError:
        return 0


def _drain_events(events: queue.SimpleQueue, cohort: _Cohort, wait_s: float) -> None:
    try:
        event = events.get(timeout=wait_s) if wait_s > 0 else events.get_nowait()
        while True:
            _, msg = event
            if isinstance(msg, dict) and msg.get("event") == "start":
                cohort.started(msg["slide_id"], msg.get("worker", ""), msg.get("time"))
            event = events.get_nowait()
    except queue.Empty:
        return


def _task_row(future, path: Path, slide_id: str) -> SlideRow:
    """The row a slide task returned, or a failed row saying why the task did not return."""
    from distributed import KilledWorker

    try:
        return future.result()
    except KilledWorker:
        reason = (f"{path}: the worker running this slide died on every attempt (out of "
                  "memory, killed or crashed); see the worker logs")
    except Exception as exc:  # noqa: BLE001 - any task error is this slide's failure only
        reason = f"{path}: {type(exc).__name__}: {exc}".splitlines()[0]
    return SlideRow(str(path), slide_id, "failed", reason=reason)


@dataclass(frozen=True)
class _ClusterSetup:
    description: str
    workers: int
    cpu_threads: int | None
    resources: dict[str, float] | None
    device: str


@contextlib.contextmanager
def _cluster_client(options: RunOptions, todo: int) -> Iterator[tuple[object, _ClusterSetup]]:
    """A client on ``options.scheduler``, or on a LocalCluster started (and closed) here."""
    import dask
    from distributed import Client

    if options.scheduler:
        try:
            client = _connect(options.scheduler)
        except (OSError, TimeoutError, ValueError) as exc:
            raise WsisegError(f"--scheduler {options.scheduler}: cannot reach the Dask "
                              f"scheduler ({type(exc).__name__}: {exc})") from None
        try:
            workers = client.scheduler_info(n_workers=-1).get("workers", {})
            gpu_workers = sum(1 for w in workers.values() if w.get("resources", {}).get("GPU"))
            use_gpu = gpu_workers > 0 and options.device != "cpu"
            description = (f"scheduler {options.scheduler}, {_plural(len(workers), 'worker')}"
                           f"{f' ({gpu_workers} with a GPU resource)' if gpu_workers else ''}"
                           f", dashboard {client.dashboard_link}")
            if not workers:
                description += "; no workers yet: slides wait until some join"
            yield client, _ClusterSetup(description, len(workers), None,
                                        {"GPU": 1} if use_gpu else None, options.device)
        finally:
            client.close()
        return

    plan = plan_local_cluster(options.device, todo, options.workers, options.threads_per_worker)
    config = {
        # A slide whose worker dies twice is failed (KilledWorker) rather than retried on.
        "distributed.scheduler.allowed-failures": 1,
        "distributed.worker.multiprocessing-method": _start_method(),
    }
    with dask.config.set(config):  # for the whole run: restarted workers start the same way
        cluster = _local_cluster(plan)
        client = Client(cluster)
        try:
            kind = f"{len(plan.gpus)} GPU(s) {', '.join(plan.gpus)}" if plan.gpus else "CPU"
            description = (
                f"LocalCluster, {_plural(plan.workers, 'worker')} × "
                f"{_plural(plan.threads_per_worker, 'thread')}, "
                f"{kind}, {plan.cpu_threads} torch thread(s) per slide, "
                f"dashboard {client.dashboard_link}"
            )
            yield client, _ClusterSetup(
                description, plan.workers, plan.cpu_threads,
                {"GPU": 1} if plan.gpus else None, "cuda" if plan.gpus else options.device,
            )
        finally:
            client.close()
            cluster.close()


def _connect(scheduler: str):
    """A client on a scheduler address (``tcp://host:8786``) or a scheduler file (``*.json``,
    as ``dask scheduler --scheduler-file`` writes it)."""
    from distributed import Client

    if scheduler.endswith(".json"):
        if not Path(scheduler).is_file():
            raise WsisegError(f"--scheduler {scheduler}: no such scheduler file")
        return Client(scheduler_file=scheduler, timeout="30s")
    return Client(scheduler, timeout="30s")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _local_cluster(plan: ClusterPlan):
    """Worker processes on loopback: a LocalCluster, or one pinned worker per GPU."""
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    if not plan.gpus:
        return LocalCluster(
            n_workers=plan.workers, threads_per_worker=plan.threads_per_worker,
            processes=True, memory_limit=plan.memory_limit, host="127.0.0.1",
            dashboard_address=":0",
        )
    # Like dask-cuda's LocalCUDACluster: each worker sees only its GPU, also after a restart.
    workers = {
        f"gpu-{gpu}": {"cls": Nanny, "options": {
            "host": "127.0.0.1", "nthreads": plan.threads_per_worker,
            "memory_limit": plan.memory_limit, "resources": {"GPU": 1},
            "env": {"CUDA_VISIBLE_DEVICES": gpu},
        }}
        for gpu in plan.gpus
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="wsiseg")


def _start_method() -> str:
    """``forkserver`` where there is one: torch and wsiseg are imported once by the fork
    server, so workers (and workers restarted after a crash) start in about a second."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    import dask
    from distributed.utils import get_mp_context

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        context = get_mp_context()  # distributed sets its own preload list once, first
    context.set_forkserver_preload(list(_WORKER_PRELOAD))  # no effect once the server runs
    return "forkserver"


# -- inside a worker -------------------------------------------------------------------------
_MODELS: dict[tuple, tuple] = {}  # this worker process's GuideNets: (path, stat, device) → …


def slide_task(
    slide: str, slide_id: str, wf: Workflow, options: RunOptions, cpu_threads: int | None
) -> SlideRow:
    """One slide inside a Dask worker: tiling, GuideNet, contours, outputs.

    Sends a ``start`` event first (the ledger's attempt counter), loads GuideNet once per
    worker process and device, and never raises for the slide's own problems (a failed row).
    """
    import torch

    configure_worker_logging()  # the driver's quiet (or -v) set-up, before any library logs
    worker = _worker_address()
    _send_start(slide_id, worker)
    # WSISEG_TORCH_THREADS in a worker's environment overrides the plan (or sets the count on
    # a joined cluster, whose nannies start workers with OMP_NUM_THREADS=1).
    threads = int(os.environ.get("WSISEG_TORCH_THREADS", "0") or 0) or cpu_threads
    if threads:
        torch.set_num_threads(threads)
    try:
        model, card = cached_guidenet(options.guidenet, wf, options.device, options,
                                      threads=threads or None)
    except WsisegError as exc:
        row = SlideRow(slide, slide_id, "failed", reason=str(exc))
    else:
        row = run_one(Path(slide), slide_id, wf, model, card, options,
                      tile_workers=threads or None)
    row.extra["worker"] = worker
    return row


def cached_guidenet(
    weights: str | Path, wf: Workflow, device: str, options: RunOptions | None = None,
    threads: int | None = None,
):
    """GuideNet (a :class:`wsiseg.runtime.Network`) and its card, loaded once per process for
    a weights file, device, runtime, precision and thread count, and reused across slides."""
    from wsiseg.infer import resolve_device
    from wsiseg.runtime import load_network

    path = Path(weights).resolve()
    try:
        stat = path.stat()
    except OSError as exc:
        raise WsisegError(f"{weights}: cannot read the GuideNet weights on this worker "
                          f"({exc.strerror or type(exc).__name__})") from None
    resolved = resolve_device(device)
    runtime, precision = inference_choice(wf, options)
    key = (str(path), stat.st_mtime_ns, stat.st_size, str(resolved), runtime, precision,
           threads)
    if key not in _MODELS:
        for old in [k for k in _MODELS if k[0] == key[0] or len(_MODELS) >= 4]:
            del _MODELS[old]  # weights replaced on disk, or too many kept
        net = load_network(path, role="guidenet", workflow=wf, device=resolved,
                           runtime=runtime, precision=precision, threads=threads)
        _MODELS[key] = (net, net.card)
    return _MODELS[key]


def inference_choice(wf: Workflow, options: RunOptions | None) -> tuple[str, str]:
    """(runtime, precision): the command line's, else the workflow's ``inference`` keys."""
    runtime = (options.runtime if options else None) or wf.inference.runtime
    precision = (options.precision if options else None) or wf.inference.precision
    return runtime, precision


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "in process"


def _send_start(slide_id: str, worker: str) -> None:
    try:
        from distributed import get_worker

        get_worker().log_event(EVENT_TOPIC, {"event": "start", "slide_id": slide_id,
                                             "worker": worker, "time": now_iso()})
    except (ImportError, ValueError):
        pass


def _crash_for_tests() -> None:
    """TEST-ONLY hook: kill the worker process once, mid-slide.

    With ``WSISEG_TEST_CRASH_ONCE=<file>`` in a Dask worker's environment, the first slide
    task to get here (its tiling started, GuideNet not yet) creates ``<file>`` and exits the worker
    process with ``os._exit(1)``, as a kill or an out-of-memory would; later tasks see the
    file and go on. Never acts outside a Dask worker. Used by ``tests/test_cohort.py``.
    """
    marker = os.environ.get("WSISEG_TEST_CRASH_ONCE")
    if not marker or _worker_address() == "in process":
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


# -- one slide -----------------------------------------------------------------------------
def slide_outputs(out_dir: Path, slide_id: str, export_mask: bool = False) -> list[Path]:
    paths = [out_dir / f"{slide_id}.geojson", out_dir / f"{slide_id}.png"]
    if export_mask:
        paths.append(out_dir / f"{slide_id}.r0.mask.ome.tif")
    return paths


def run_one(
    slide: Path, slide_id: str, wf: Workflow, model, card, options: RunOptions,
    tile_workers: int | None = None,
) -> SlideRow:
    """Run one slide; never raises (a failure is a row with its reason).

    ``tile_workers``: threads reading the slide (default: the workflow's, else all cores).
    """
    t0 = time.perf_counter()
    try:
        dest = Destination.parse(options.out_dir)
        if dest.remote:
            row = _run_one_staged(dest, slide, slide_id, wf, model, card, options, tile_workers)
        else:
            row = _run_one(slide, slide_id, wf, model, card, options, tile_workers)
    except WsisegError as exc:
        row = SlideRow(str(slide), slide_id, "failed", reason=str(exc))
    except Exception as exc:  # a bug or an unforeseen file problem: still one row
        row = SlideRow(str(slide), slide_id, "failed",
                       reason=f"{slide}: {type(exc).__name__}: {exc}".splitlines()[0],
                       extra={"traceback": traceback.format_exc()})  # shown with -v
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


def _run_one_staged(
    dest: Destination, slide: Path, slide_id: str, wf: Workflow, model, card,
    options: RunOptions, tile_workers: int | None,
) -> SlideRow:
    """Run the slide into a local staging directory, then upload it (see
    :mod:`wsiseg.destination`). The staging directory is removed either way."""
    staging = Path(tempfile.mkdtemp(prefix=f"wsiseg-{slide_id}-"))
    try:
        row = _run_one(slide, slide_id, wf, model, card, replace(options, out_dir=staging),
                       tile_workers)
        try:
            dest.upload_slide(staging, slide_id)
        except Exception as exc:  # noqa: BLE001 - every fsspec backend raises its own types
            raise WsisegError(f"{slide}: cannot upload its outputs to {dest.url} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        return row
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run_one(
    slide: Path, slide_id: str, wf: Workflow, model, card, options: RunOptions,
    tile_workers: int | None = None,
) -> SlideRow:
    from wsiseg.infer import infer_to_store
    from wsiseg.nets import normalise_rgb, weights_hash
    from wsiseg.outputs import round_tracer
    from wsiseg.store import retire_store, source_changed
    from wsiseg.tiling import BackgroundTiling

    out_dir = options.out_dir
    store_path = out_dir / f"{slide_id}.zarr"
    if not slide.is_file():
        from wsiseg.slide.reader import open_slide

        open_slide(slide)  # raises the one-line reason (missing, directory, ...)
    if store_path.exists() and not options.force:
        done = _done_row(Destination.parse(out_dir), slide, slide_id, options.export_mask)
        if done is not None:
            return done
    if options.force and store_path.exists():
        retire_store(store_path)
    # Tiling runs beside inference: GuideNet reads each row of chunks as soon as it is written,
    # and each row of the probability map is contoured as soon as GuideNet has written it.
    contours = None
    with BackgroundTiling(slide, store_path, wf, mpp=options.mpp, workers=tile_workers) as tiling:
        store = tiling.store
        if source_changed(store, slide):  # pragma: no cover - prepare_store rebuilt it
            raise WsisegError(f"{slide}: changed while running")
        _crash_for_tests()
        stats = None
        if store.stage("guide") != "done":
            store.set_stage("export", "pending")
            with round_tracer(store) as tracer:
                stats = infer_to_store(
                    tiling.image, [store["guide"], store["refined"]],
                    model=model, normalise=lambda t: normalise_rgb(t, card),
                    tissue=store.tissue_mask, patch_px=wf.guidenet.patch_px,
                    stride_px=wf.guidenet.stride_px, batch_size=wf.guidenet.batch_size,
                    device=model.device, band_px=store.chunk_px, tta=options.tta,
                    clip_to_tissue=True, on_rows=tracer.rows_final,
                )
                contours = tracer.result()
        tiling.finish()  # every chunk written (or the tiling's error) before guide is done
    if stats is not None:
        store.update_attrs(models={"guidenet": {
            "card": card.to_dict(),
            "sha256": model.weights_sha256 or weights_hash(Path(options.guidenet)),
            "path": str(Path(options.guidenet).resolve()),
        }}, inference={"patches": stats.patches, "forward_s": round(stats.forward_s, 3),
                       "total_s": round(stats.total_s, 3), "tta": options.tta,
                       **model.describe()})
        store.set_stage("guide", "done")
    m = publish_run(store, out_dir, slide_id, export_mask=options.export_mask,
                    contours=contours)
    used = store.attrs.get("inference") or {}
    return SlideRow(str(slide), slide_id, "done", tissue_mm2=m.tissue_mm2,
                    tumor_mm2=m.tumor_mm2, tumor_fraction=m.tumor_fraction,
                    runtime=used.get("runtime", ""), precision=used.get("precision", ""),
                    extra={"foci": m.foci})


def publish_run(store: SlideStore, out_dir: Path, slide_id: str, export_mask: bool = False,
                contours: tuple[list, Any] | None = None):
    """Round 0 of a store whose ``guide``/``refined`` are complete: GeoJSON, thumbnail,
    measurements; the slide counts as done only after this. ``contours``: the polygons and
    mean probabilities of ``refined`` when already traced (beside inference), else traced
    here."""
    from concurrent.futures import ThreadPoolExecutor

    from wsiseg.outputs import measurements, thumbnail_image, write_thumbnail
    from wsiseg.rounds import write_round_geojson

    png = out_dir / f"{slide_id}.png"
    # The network is done: the thumbnail is decoded on a spare core while the contours are
    # traced (or, traced already, drawn and written there while the GeoJSON is written).
    with ThreadPoolExecutor(1, thread_name_prefix="wsiseg-thumbnail") as pool:
        if contours is not None:
            polygons, means = contours
            drawn = pool.submit(write_thumbnail, store, png, polygons)
            write_round_geojson(store, out_dir, slide_id, 0, polygons, means=means)
            drawn.result()
        else:
            thumb = pool.submit(thumbnail_image, store)
            _, polygons = write_round_geojson(store, out_dir, slide_id, 0)
            write_thumbnail(store, png, polygons, thumb=thumb.result())
    m = measurements(store, polygons, 0)
    if not store.attrs.get("rounds"):
        store.update_attrs(rounds=[{
            "round": 0, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": "run",
            "tumor_mm2": m.tumor_mm2, "windows": 0, "scribbles": {},
            "measurements": asdict(m),
        }])
    store.update_attrs(measurements=asdict(m))
    if export_mask:
        from wsiseg.export import export_store

        export_store(store.path, round_k=0, what={"mask"}, out_dir=out_dir, force=True)
    store.set_stage("export", "done")  # last: only now does the slide count as done
    return m


def _done_row(
    dest: Destination, slide: Path, slide_id: str, export_mask: bool
) -> SlideRow | None:
    """The ``skipped`` row of a slide whose store (local or remote) is done and whose
    outputs all exist; None when it has to run."""
    attrs = dest.store_attrs(slide_id)
    source = _stored_source(attrs)
    if source is None or attrs is None or attrs.get("stages", {}).get("export") != "done":
        return None
    if source_differs(source, slide):
        return None
    if not all(dest.exists(p.name) for p in slide_outputs(Path(), slide_id, export_mask)):
        return None
    m = attrs.get("measurements", {})
    used = attrs.get("inference") or {}
    return SlideRow(str(slide), slide_id, "skipped", reason="already done",
                    tissue_mm2=m.get("tissue_mm2"), tumor_mm2=m.get("tumor_mm2"),
                    tumor_fraction=m.get("tumor_fraction"), runtime=used.get("runtime", ""),
                    precision=used.get("precision", ""), extra={"foci": m.get("foci")})


def write_summary(path: Path, rows: Sequence[SlideRow]) -> None:
    """Write ``summary.csv`` atomically, keeping rows of slides not in this run."""
    previous: dict[str, dict[str, str]] = {}
    if path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r.get("slide_id"):
                    previous[r["slide_id"]] = {k: r.get(k, "") for k in SUMMARY_FIELDS}
    for row in rows:
        previous[row.slide_id] = row.csv_row()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for key in sorted(previous):
        writer.writerow(previous[key])
    atomic_write_text(path, buf.getvalue())
