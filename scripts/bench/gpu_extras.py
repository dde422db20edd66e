"""On the GPU machine after gpu.py --work W: decode-only time, network variants, refine stroke.

``scripts/bench/gpu.py`` measures ``wsiseg run`` end to end, the network alone and TIAToolbox.
This script answers what that leaves open, on the stores that run left in ``--work``:

(d) decode only: every tissue chunk of the slide read from the pyramid level ``wsiseg run``
    reads (the same ``read_region`` boxes as :func:`wsiseg.slide.resample.read_box`), with as
    many threads as the tiling uses, without resampling or writing — the floor of a run that
    has to decode its slide; and read + resample with the same threads;
(n) the network alone on the store's tissue patches, device-resident, bf16 autocast and
    channels-last: eager at batch 16 / 64 / 256, eager captured in a CUDA graph, and
    ``torch.compile`` (default mode) — which of them pays;
(r) RefineNet on one 384² window (6 channels) on the GPU, p50 / p95 of 50 calls (eager fp32
    as ``wsiseg refine`` runs it, and bf16), and whole refine rounds (``refine_round``, one
    brush stroke in one window core, undone after each) — p50 / p95 over ``--rounds``.

    python3 scripts/bench/gpu_extras.py --work /tmp/gpuwork
    .venv/bin/python scripts/bench/gpu_extras.py --work W --device cpu --quick   # plumbing check

Each part prints its table as soon as it is done, so a call cut short still reports.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import fmt, markdown_table  # noqa: E402
from refine import core_centres, write_scribbles  # noqa: E402


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def decode_only(store_path: Path, slide_path: Path, threads: int) -> list[list]:
    """(d): wall seconds to decode, and to decode + resample, every tissue chunk."""
    import numpy as np

    from wsiseg.slide.reader import open_slide
    from wsiseg.slide.resample import read_box, source_box
    from wsiseg.store import SlideStore
    from wsiseg.tiling import tissue_chunks

    store = SlideStore.open(store_path, mode="r")
    chunk = store.chunk_px
    rows, cols = store.frame.working_shape
    todo = tissue_chunks(store.tissue_mask, (rows, cols), chunk)
    boxes = [(int(i) * chunk, int(j) * chunk, min(chunk, rows - int(i) * chunk),
              min(chunk, cols - int(j) * chunk)) for i, j in zip(*np.nonzero(todo), strict=True)]
    downsample = store.frame.scale
    readers = {}

    def reader():  # one handle per thread, as the tiling's cached readers
        import threading

        key = threading.get_ident()
        if key not in readers:
            readers[key] = open_slide(slide_path)
        return readers[key]

    def decode(box):  # the very read of read_box, without resampling
        r = reader()
        level, level0_xy, size_px, _, _ = source_box(r.info, downsample, box)
        return r.read_region(level0_xy, level, size_px).nbytes

    out = []
    for label, fn in (("decode only", decode),
                      ("decode + resample", lambda box: read_box(reader(), downsample, box))):
        with ThreadPoolExecutor(threads) as pool:
            t0 = time.perf_counter()
            list(pool.map(fn, boxes))
            seconds = time.perf_counter() - t0
        out.append([label, len(boxes), threads, fmt(seconds, 2),
                    fmt(len(boxes) * chunk * chunk / 1e6 / seconds, 1)])
    return out


def network_variants(store_path: Path, weights: Path, device, quick: bool) -> list[list]:
    """(n): the network alone, eager / CUDA graph / torch.compile, at several batch sizes."""
    import torch

    from wsiseg.config import load_workflow
    from wsiseg.infer import _autocast_dtype, prepare_model
    from wsiseg.nets import load_weights, normalise_rgb

    g = load_workflow().guidenet
    model, card = load_weights(weights, role="guidenet", device=device)
    model = prepare_model(model, device)
    _, pixels = common.store_patches(store_path, g.patch_px, g.stride_px)
    if quick:
        pixels = pixels[:64]
    patches = torch.from_numpy(pixels).to(device)
    dtype = _autocast_dtype(device)
    n = len(patches)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward(net, batch):
        x = normalise_rgb(batch.permute(0, 3, 1, 2), card)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = net(x)
        return torch.sigmoid(out[:, 0].float())

    def timed(run_batch, bs) -> float:
        best = math.inf
        for _ in range(1 if quick else 3):
            sync()
            t0 = time.perf_counter()
            for i in range(0, n - bs + 1, bs):
                run_batch(patches[i : i + bs])
            sync()
            best = min(best, time.perf_counter() - t0)
        return best * n / ((n // bs) * bs)  # full batches only, scaled to every patch

    rows = []
    with torch.inference_mode():
        for bs in (16, 64, 256):
            if bs > n:
                continue
            forward(model, patches[:bs])
            s = timed(lambda b: forward(model, b), bs)
            rows.append(["eager", bs, n, fmt(s, 3), fmt(1e3 * s / n, 3)])
            common.log(f"eager batch {bs}: {s:.3f} s")
        if device.type == "cuda":
            for bs in (16, 64):
                static = patches[:bs].clone()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        forward(model, static)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    forward(model, static)

                def replay(batch, static=static, graph=graph):
                    static.copy_(batch)
                    graph.replay()

                s = timed(replay, bs)
                rows.append(["eager, CUDA graph", bs, n, fmt(s, 3), fmt(1e3 * s / n, 3)])
                common.log(f"CUDA graph batch {bs}: {s:.3f} s")
    if device.type == "cuda" and not quick:
        try:
            compiled = torch.compile(model)
            t0 = time.perf_counter()
            with torch.inference_mode():
                for bs in (16, 64):
                    forward(compiled, patches[:bs])
                    forward(compiled, patches[:bs])
            compile_s = time.perf_counter() - t0
            with torch.inference_mode():
                for bs in (16, 64):
                    s = timed(lambda b: forward(compiled, b), bs)
                    rows.append([f"torch.compile (compile {compile_s:.0f} s)", bs, n,
                                 fmt(s, 3), fmt(1e3 * s / n, 3)])
                    common.log(f"compiled batch {bs}: {s:.3f} s")
        except Exception as exc:  # report, don't lose the other parts
            rows.append([f"torch.compile failed: {type(exc).__name__}: {exc}"[:120],
                         "", n, "", ""])
    return rows


def refine_stroke(store_path: Path, work: Path, device, rounds: int) -> list[list]:
    """(r): one RefineNet window, and whole refine rounds with one stroke each."""
    import numpy as np
    import torch

    from wsiseg.config import load_workflow
    from wsiseg.nets import load_weights
    from wsiseg.refine import refine_round, refinenet_refiner
    from wsiseg.rounds import undo
    from wsiseg.store import SlideStore

    wf = load_workflow()
    weights = work / "refinenet-random.safetensors"
    if not weights.exists():
        common.refinenet_weights(weights, wf)
    model, card = load_weights(weights, role="refinenet", workflow=wf, device=device)
    window = wf.refinenet.window_px
    x = torch.randn(1, 6, window, window, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    with torch.inference_mode():
        for label, dtype in (("fp32 (as wsiseg refine)", None), ("bf16 autocast", "bf16")):
            times = []
            for k in range(55):
                sync()
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None):
                    torch.sigmoid(model(x)).float().cpu()
                sync()
                if k >= 5:
                    times.append(time.perf_counter() - t0)
            rows.append([f"RefineNet, one {window}² window, {label}", len(times),
                         fmt(1e3 * statistics.median(times), 1), fmt(1e3 * _p(times, 0.95), 1)])
    store = SlideStore.open(store_path)
    slide_id = store_path.name.removesuffix(".zarr")
    out_dir = store_path.parent
    refiner = refinenet_refiner(model, card, device, wf.refinenet.batch_size)
    centres = core_centres(store, np.random.default_rng(0))
    times, refine_times = [], []
    start = store.attrs["rounds"][-1]["round"]
    for k in range(rounds + 1):
        # A new file name and stroke place each time: an export seen before refines nothing.
        path = write_scribbles(store, work / f"stroke-{time.time_ns()}.geojson",
                               [centres[k % len(centres)]])
        result = refine_round(store, path, out_dir, slide_id, refiner, "refinenet")
        if result.round == start:
            raise SystemExit(f"{path}: the round refined nothing ({result.new_pixels} px)")
        undo(store, out_dir, slide_id)
        if k:  # the first round pays first-call costs
            times.append(result.seconds)
            refine_times.append(result.refine_s)
    rows.append([f"refine round, one stroke ({len(times)} rounds, each undone)", len(times),
                 fmt(1e3 * statistics.median(times), 0), fmt(1e3 * _p(times, 0.95), 0)])
    rows.append(["  of which the refiner (encode + RefineNet)", len(times),
                 fmt(1e3 * statistics.median(refine_times), 0),
                 fmt(1e3 * _p(refine_times, 0.95), 0)])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True,
                        help="the --work folder of a finished scripts/bench/gpu.py run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="decode threads (default: one per CPU, as the tiling)")
    parser.add_argument("--rounds", type=int, default=20, help="refine rounds timed")
    parser.add_argument("--parts", default="d,n,r", help="which parts: d, n, r")
    parser.add_argument("--quick", action="store_true", help="few patches, one repeat")
    args = parser.parse_args(argv)

    from wsiseg.infer import resolve_device

    device = resolve_device(args.device)
    stores = sorted((args.work / "run").glob("*.zarr"))
    slides = sorted((args.work / "slides").glob("*"))
    weights = args.work / "guidenet-random.safetensors"
    if not stores or not slides or not weights.exists():
        raise SystemExit(f"{args.work}: no finished gpu.py run there (run/, slides/, weights)")
    parts = set(args.parts.split(","))
    if "d" in parts:
        common.print_report("(d) decode only vs decode + resample, every tissue chunk", [(
            f"{slides[0].name}, {args.threads} threads, one reader per thread.",
            markdown_table(["what", "chunks", "threads", "seconds", "working Mpx/s"],
                           decode_only(stores[0], slides[0], args.threads)))])
    if "n" in parts:
        common.print_report(f"(n) GuideNet alone on {device}: eager, CUDA graph, compile", [(
            "Tissue patches of one store, device-resident; bf16 autocast, channels-last on "
            "CUDA; best of 3 passes.",
            markdown_table(["variant", "batch", "patches", "seconds", "ms / patch"],
                           network_variants(stores[-1], weights, device, args.quick)))])
    if "r" in parts:
        common.print_report(f"(r) a refine stroke on {device}", [(
            "Random RefineNet weights; the round is refine_round (what `wsiseg refine` and "
            "`wsiseg serve` run), undone after each.",
            markdown_table(["what", "n", "p50 (ms)", "p95 (ms)"],
                           refine_stroke(stores[-1], args.work, device, args.rounds)))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
