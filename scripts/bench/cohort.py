"""Benchmark ``wsiseg run`` on a cohort: in process versus Dask LocalClusters of N workers.

One generated cohort (distinct slides, :mod:`wsiseg.synth`, cached) and random GuideNet
weights. For the in-process path (``workers=0``) and for each ``--workers`` count, a fresh
output folder and:

- slides per hour: slides / wall time of ``run_cohort`` (the cluster is started first and
  timed apart, as a joined ``--scheduler`` cluster would be);
- in-task seconds: the sum over slides of the time inside the slide task (the ledger's
  ``seconds``: tiling, GuideNet, contours, outputs);
- overhead per slide: worker-seconds not spent inside slide tasks,
  ``(wall × workers − Σ in-task) / slides``: scheduling, model loading (once per worker),
  first-call costs in a fresh process, and workers idle at the end of the cohort;
- peak resident memory per worker process (``getrusage`` in each worker through
  ``client.run``; for the in-process path, this process).

``--s3``: each cluster size again with ``--out s3://...`` on an S3 server on loopback (moto's,
a dev dependency): the cost of staging each slide and uploading it.

Not run in CI::

    .venv/bin/python scripts/bench/cohort.py --slides 6 --size 4096x3072 --workers 1 2 --s3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import fmt, markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--slides", type=int, default=6, help="slides in the cohort (6)")
    parser.add_argument("--size", type=common.parse_size, default=(4096, 3072),
                        help="level-0 WIDTHxHEIGHT of each slide (4096x3072)")
    parser.add_argument("--mpp", type=float, default=0.5, help="level-0 µm/px (0.5)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="LocalCluster sizes to measure (1 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--no-serial", action="store_true",
                        help="skip the in-process baseline (workers=0)")
    parser.add_argument("--s3", action="store_true",
                        help="also write to an S3 server on loopback (moto)")
    args = parser.parse_args(argv)

    args.cache.mkdir(parents=True, exist_ok=True)
    slides = [common.generated_slide(args.cache, args.size, args.mpp, seed=args.seed + i)
              .slide_path for i in range(args.slides)]
    results = []
    with common.scratch(args.work, "wsiseg-bench-cohort-") as work:
        weights = common.guidenet_weights(work / "guidenet.safetensors")
        if not args.no_serial:
            results.append(measure_in_process(slides, weights, work / "serial", args.device))
        for n in args.workers:
            results.append(measure_cluster(slides, weights, str(work / f"workers-{n}"),
                                           args.device, n))
        if args.s3:
            with local_s3() as env:
                for n in args.workers:
                    results.append(measure_cluster(slides, weights, f"s3://bench/workers-{n}",
                                                   args.device, n, env))
    rows = [[
        r["config"], r["threads"], fmt(r["start_s"]), fmt(r["wall_s"]),
        fmt(r["slides_per_hour"], 0), fmt(r["in_task_s"]), fmt(r["in_task_s"] / r["slides"]),
        fmt(r["overhead_s"], 2), fmt(r["peak_rss_mib"], 0),
    ] for r in results]
    table = markdown_table(
        ["run", "torch threads per slide", "cluster start s", "wall s", "slides/hour",
         "Σ in-task s", "in-task s/slide", "overhead s/slide", "peak RSS per worker MiB"],
        rows,
    )
    w, h = args.size
    common.print_report(
        f"wsiseg run on a cohort of {args.slides} generated slides "
        f"({w}×{h} px at {args.mpp} µm/px, device {args.device})",
        [("", table)],
        ["overhead s/slide = (wall × workers − Σ in-task) / slides; the in-process row has one "
         "worker (this process). Cluster start is not in the wall time.",
         json.dumps(results)],
    )
    return 0


def measure_in_process(slides: list[Path], weights: Path, out: Path, device: str) -> dict:
    import torch

    from wsiseg.cohort import RunOptions, run_cohort

    common.log(f"in process: {len(slides)} slides")
    t0 = time.perf_counter()
    status = run_cohort([str(s) for s in slides], RunOptions(
        out_dir=out, guidenet=str(weights), device=device, workers=0, progress=False))
    wall = time.perf_counter() - t0
    in_task = _in_task_seconds(out)
    return _result("in process (workers=0)", torch.get_num_threads(), status, len(slides),
                   None, wall, 1, in_task, [_peak_rss_mib()])


def measure_cluster(slides: list[Path], weights: Path, out: str, device: str, n: int,
                    env: dict[str, str] | None = None) -> dict:
    import dask
    from distributed import Client

    from wsiseg.cohort import RunOptions, run_cohort
    from wsiseg.cohort.cluster import _local_cluster, _start_method, plan_local_cluster

    plan = plan_local_cluster(device, len(slides), n)
    common.log(f"LocalCluster of {plan.workers} workers: {len(slides)} slides")
    config = {"distributed.scheduler.allowed-failures": 1,
              "distributed.worker.multiprocessing-method": _start_method()}
    with dask.config.set(config):
        t0 = time.perf_counter()
        cluster = _local_cluster(plan)
        client = Client(cluster)
        start = time.perf_counter() - t0
        try:
            client.run(_set_threads, plan.cpu_threads)
            client.run(_set_env, env or {})
            t0 = time.perf_counter()
            status = run_cohort([str(s) for s in slides], RunOptions(
                out_dir=out, guidenet=str(weights), device=device,
                scheduler=cluster.scheduler_address, progress=False))
            wall = time.perf_counter() - t0
            peaks = list(client.run(_peak_rss_mib).values())
        finally:
            client.close()
            cluster.close()
    where = ", to S3 (loopback)" if out.startswith("s3://") else ""
    return _result(f"LocalCluster, {plan.workers} worker(s){where}", plan.cpu_threads, status,
                   len(slides), start, wall, plan.workers, _in_task_seconds(out), peaks)


def _result(config: str, threads: int, status: int, slides: int, start: float | None,
            wall: float, workers: int, in_task: float, peaks: list[float]) -> dict:
    if status != 0:
        common.log(f"warning: {config}: exit status {status} (see its summary.csv)")
    return {
        "config": config, "threads": threads, "status": status, "slides": slides,
        "start_s": start, "wall_s": wall, "workers": workers, "in_task_s": in_task,
        "slides_per_hour": slides / wall * 3600.0,
        "overhead_s": (wall * workers - in_task) / slides,
        "peak_rss_mib": max(peaks), "peak_rss_each_mib": peaks,
    }


def _in_task_seconds(out: Path | str) -> float:
    from wsiseg.destination import Destination

    ledger = json.loads(Destination.parse(out).read_bytes("ledger.json") or b"{}")
    return sum(e["seconds"] or 0.0 for e in ledger["slides"].values())


@contextlib.contextmanager
def local_s3() -> Iterator[dict[str, str]]:
    """moto's S3 server on a free loopback port with a bucket ``bench``; yields the
    environment that points boto / s3fs there (set here, and by the caller on workers)."""
    import socket

    import fsspec
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    try:
        fsspec.filesystem("s3").mkdir("bench")
        yield env
    finally:
        server.stop()


def _set_env(env: dict[str, str]) -> None:
    """On each worker: the object-store environment (endpoint, credentials)."""
    os.environ.update(env)


def _set_threads(n: int) -> None:
    """On each worker: the torch threads of a slide task (as the run's own cluster sets)."""
    os.environ["WSISEG_TORCH_THREADS"] = str(n)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


if __name__ == "__main__":
    sys.exit(main())
