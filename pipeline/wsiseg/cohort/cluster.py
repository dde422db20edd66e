"""Dask distributed: the local cluster's plan, joining one, and one task per slide."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from wsiseg.cohort.rows import RunOptions, SlideRow
from wsiseg.cohort.worker import EVENT_TOPIC, slide_task
from wsiseg.config import Workflow
from wsiseg.errors import UsageError, WsisegError

if TYPE_CHECKING:
    from wsiseg.cohort.driver import Cohort

log = logging.getLogger(__name__)



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


def check_cluster_options(options: RunOptions) -> None:
    if options.workers is not None and options.workers < 0:
        raise UsageError(f"--workers: must be 0 (in this process) or more, got {options.workers}")
    if options.threads_per_worker is not None and options.threads_per_worker < 1:
        raise UsageError(
            f"--threads-per-worker: must be 1 or more, got {options.threads_per_worker}")
    if options.scheduler and options.workers == 0:
        raise UsageError("--scheduler and --workers 0 contradict each other: pick one")


def runs_in_process(options: RunOptions, todo: int) -> bool:
    """No cluster: ``workers == 0``, or a default cluster would have a single worker."""
    if options.scheduler:
        return False
    if options.workers is not None:
        return options.workers == 0
    plan = plan_local_cluster(options.device, todo, None, options.threads_per_worker)
    return plan.workers <= 1


def run_on_cluster(
    todo: Sequence[Path], ids: dict[Path, str], wf: Workflow, options: RunOptions,
    cohort: Cohort,
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


def _drain_events(events: queue.SimpleQueue, cohort: Cohort, wait_s: float) -> None:
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
