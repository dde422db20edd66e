"""Inside a worker: one slide task, GuideNet loaded once per process, its start event."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from wsiseg.cohort.one_slide import run_one, worker_address
from wsiseg.cohort.rows import RunOptions, SlideRow
from wsiseg.config import Workflow
from wsiseg.errors import WsisegError
from wsiseg.ledger import now_iso
from wsiseg.logs import configure_worker_logging

log = logging.getLogger(__name__)

#: Topic of the events a slide task sends when it starts (the ledger counts attempts by them).
EVENT_TOPIC = "wsiseg-slide"


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
    worker = worker_address()
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


def _send_start(slide_id: str, worker: str) -> None:
    try:
        from distributed import get_worker

        get_worker().log_event(EVENT_TOPIC, {"event": "start", "slide_id": slide_id,
                                             "worker": worker, "time": now_iso()})
    except (ImportError, ValueError):
        pass
