"""Benchmark phases through the inference runtime (issue 17), each in a fresh process.

    python scripts/bench/runtime_phases.py --phase NAME '<json arguments>'

``network``     GuideNet alone (:func:`wsiseg.runtime.load_network`, OpenVINO or torch) on a
                store's tissue patches, pre-extracted, with the normalisation ``wsiseg run``
                applies: (a′), the limit ``wsiseg run`` is measured against;
``pipeline``    ``wsiseg run`` with ``--runtime`` / ``--precision`` (common.phase_pipeline);
``window``      one RefineNet window (6 channels, ``window_px``²) per call, and a batch;
``refine_memory``  peak RSS of a refine round whose scribble covers a store's whole tissue.

Used by run.py and refine.py; the child prints one JSON line (common.run_phase's protocol).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def run(phase: str, env: dict[str, str] | None = None, **kwargs: Any) -> common.ChildResult:
    """This file's ``--phase PHASE`` in a fresh interpreter (``env`` added to os.environ)."""
    return common.run_phase(phase, command=[str(Path(__file__).resolve())], env=env, **kwargs)


def phase_network(store: str, weights: str, runtime: str, precision: str, batch_size: int,
                  patch_px: int, stride_px: int, repeats: int = 1,
                  threads: int | None = None) -> dict[str, Any]:
    """GuideNet alone on the store's tissue patches, as infer.py feeds it."""
    import torch

    from wsiseg.infer.network import forward_batch
    from wsiseg.nets import normalise_rgb
    from wsiseg.runtime import load_network

    t0 = time.perf_counter()
    net = load_network(Path(weights), role="guidenet", device="cpu", runtime=runtime,
                       precision=precision, threads=threads)
    load_s = time.perf_counter() - t0
    _, pixels = common.store_patches(Path(store), patch_px, stride_px)
    patches = torch.from_numpy(pixels)  # (N, 3, P, P) uint8

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return forward_batch(net, lambda t: normalise_rgb(t, net.card), batch, tta=False)

    n = len(patches)
    with torch.inference_mode():
        forward(patches[:batch_size])  # warm-up
        times, cpu = [], []
        for _ in range(max(1, repeats)):
            t0, cpu0 = time.perf_counter(), common.process_cpu_s()
            for i in range(0, n, batch_size):
                forward(patches[i : i + batch_size])
            times.append(time.perf_counter() - t0)
            cpu.append(common.process_cpu_s() - cpu0)
    return {"patches": n, "seconds": min(times), "all_seconds": times, "load_s": load_s,
            "cpu_s": cpu[times.index(min(times))],
            "runtime": net.runtime, "precision": net.precision, "batch_size": batch_size,
            "threads": threads, "torch_threads": torch.get_num_threads()}


def phase_pipeline(runtime: str, precision: str, **kwargs: Any) -> dict[str, Any]:
    """common.phase_pipeline, with ``--runtime`` and ``--precision`` added to the command."""
    import wsiseg.cli
    import wsiseg.runtime

    main = wsiseg.cli.main
    wsiseg.cli.main = lambda argv: main([*argv, "--runtime", runtime, "--precision", precision])
    timer = common.StageTimer()
    timer.wrap(wsiseg.runtime, "load_network", "load network (thread, beside tiling)")
    try:
        result = common.phase_pipeline(**kwargs)
    finally:
        timer.restore()
        wsiseg.cli.main = main
    result["stages"] = {**timer.as_dict(), **result["stages"]}
    return result


def phase_window(weights: str, runtime: str, precision: str, batch_size: int,
                 repeats: int = 10, threads: int | None = None) -> dict[str, Any]:
    """RefineNet on random 6-channel windows: ms per single window, and per window in a
    batch of ``batch_size`` (the best of ``repeats``)."""
    import numpy as np

    from wsiseg.runtime import load_network

    net = load_network(Path(weights), role="refinenet", device="cpu", runtime=runtime,
                       precision=precision, threads=threads)
    size = net.card.patch_px
    x = np.random.default_rng(0).normal(size=(batch_size, 6, size, size)).astype(np.float32)

    def best(batch: np.ndarray) -> float:
        net(batch)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(batch)
            times.append(time.perf_counter() - t0)
        return min(times)

    return {"window_px": size, "runtime": net.runtime, "precision": net.precision,
            "single_ms": best(x[:1]) * 1000, "batch_ms_per_window": best(x) * 1000 / batch_size,
            "batch_size": batch_size}


def phase_refine_memory(store: str, scribbles: str, weights: str, runtime: str,
                        precision: str) -> dict[str, Any]:
    """Peak RSS of one refine round (RefineNet) in this process, and before it."""
    from wsiseg.refine import refine_round, refinenet_refiner
    from wsiseg.runtime import load_network
    from wsiseg.store import SlideStore

    s = SlideStore.open(Path(store))
    wf = s.workflow
    net = load_network(Path(weights), role="refinenet", workflow=wf, device="cpu",
                       runtime=runtime, precision=precision)
    refiner = refinenet_refiner(net, wf.refinenet.batch_size)
    out = Path(store).parent
    with common.PeakRSS(children=False) as rss:
        t0 = time.perf_counter()
        result = refine_round(s, Path(scribbles), out, Path(store).stem, refiner, "refinenet")
        seconds = time.perf_counter() - t0
    return {"windows": len(result.windows), "new_pixels": result.new_pixels,
            "seconds": seconds, "refine_s": result.refine_s, "peak_rss_mib": rss.peak_mib,
            "start_rss_mib": rss.start_mib, "working_shape": list(s.frame.working_shape)}


PHASES = {"network": phase_network, "pipeline": phase_pipeline, "window": phase_window,
          "refine_memory": phase_refine_memory}


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=sorted(PHASES), required=True)
    parser.add_argument("arguments", help="JSON object of the phase's keyword arguments")
    args = parser.parse_args(argv)
    with common.PeakRSS() as rss:
        result = PHASES[args.phase](**json.loads(args.arguments))
    result.setdefault("peak_rss_mib", rss.peak_mib)
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
