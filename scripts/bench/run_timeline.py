"""When each stage of ``wsiseg run`` happens, and which threads spend the CPU (issue 17).

Each run is a fresh process with the packages imported before the clock, as ``run.py``'s
(b). A run prints when its stages start and end, in seconds after the command
(``common.phases``' stage timers; a stage called many times shows its first start and its
last end), GuideNet's forward passes (the first, the second, the last one's end), and the
CPU seconds each thread spent, by thread name, read from ``/proc/self/task`` every 50 ms
(a thread that ends between two readings is undercounted; unnamed threads are native ones:
OpenVINO's workers). The medians over the runs close the report.

    .venv/bin/python scripts/bench/run_timeline.py --runs 4 --cache /tmp/wb/cache \\
        [--guidenet W]

To compare with another commit, run it again from the main checkout with
``PYTHONPATH=<worktree>/pipeline`` (a ``git worktree`` of that commit), in turns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def child(slide: str, weights: str) -> dict[str, Any]:
    """One ``wsiseg run`` in this (fresh) process, timed."""
    import segmentation_models_pytorch  # noqa: F401  (imports are not the run's cost)
    from common.phases import _instrument_pipeline

    import wsiseg.cli
    import wsiseg.infer.stream
    import wsiseg.runtime

    timer = common.StageTimer()
    _instrument_pipeline(timer)
    timer.wrap(wsiseg.runtime, "load_network", "load network (thread)")
    timer.wrap(wsiseg.infer.stream, "forward_batch", "forward")
    with tempfile.TemporaryDirectory() as out, common.ThreadCPU() as threads:
        t0 = time.perf_counter()
        status = wsiseg.cli.main(["run", slide, "--out", out, "--guidenet", weights,
                                  "--device", "cpu"])
        wall = time.perf_counter() - t0
    timer.restore()
    spans = {label: [(a - t0, b - t0) for a, b in sorted(s)] for label, s in timer.spans.items()}
    return {"status": status, "wall_s": wall, "spans": spans, "threads": threads.by_name()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=common.parse_size, default=(6144, 4096),
                        metavar="WxH", help="level-0 size of the generated slide")
    common.add_common_args(parser)
    parser.add_argument("--mpp", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--guidenet", help="GuideNet weights (default: random)")
    parser.add_argument("--child", nargs=2, metavar=("SLIDE", "WEIGHTS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0

    slide = common.generated_slide(args.cache, args.size, args.mpp, args.seed)
    with common.scratch(args.work, "wsiseg-bench-timeline-") as work:
        weights = args.guidenet or common.guidenet_weights(work / "guidenet.safetensors")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [os.environ.get("PYTHONPATH"), str(Path(__file__).parent)]))}
        runs = []
        for k in range(args.runs):
            common.log(f"run {k + 1}/{args.runs} ...")
            proc = subprocess.run([sys.executable, __file__, "--child", str(slide.slide_path),
                                   str(weights)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    tables = [(f"Run {k}: {run['wall_s']:.3f} s", common.markdown_table(
        ["stage", "calls", "first start", "last end", "sum"], _stage_rows(run["spans"])))
        for k, run in enumerate(runs, start=1)]
    tables.append((f"Medians over the {len(runs)} runs (seconds after the command)",
                   common.markdown_table(["measure", "seconds"], _summary_rows(runs))))
    names = sorted({n for r in runs for n in r["threads"]},
                   key=lambda n: -statistics.median(r["threads"].get(n, 0.0) for r in runs))
    tables.append(("CPU by thread (median over the runs; unnamed: native threads)",
                   common.markdown_table(["thread", "CPU-s"], [
                       [n, f"{statistics.median(r['threads'].get(n, 0.0) for r in runs):.2f}"]
                       for n in names])))
    w, h = args.size
    common.print_report(
        "wsiseg run: timeline and CPU by thread", tables,
        [f"Slide {w}×{h} at {args.mpp} µm/px; each run a fresh process, the packages "
         f"imported before its clock."])
    return 0


def _stage_rows(spans: dict[str, list[list[float]]]) -> list[list[str]]:
    rows = []
    for label, s in sorted(spans.items(), key=lambda kv: kv[1][0][0]):
        total = sum(b - a for a, b in s)
        rows.append([label, str(len(s)), f"{s[0][0]:.3f}", f"{max(b for _, b in s):.3f}",
                     f"{total:.3f}"])
    return rows


def _summary_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    def median(value) -> str:
        values = [value(r) for r in runs if value(r) is not None]
        return f"{statistics.median(values):.3f}" if values else "–"

    def span(label: str, index: int, end: bool):
        return lambda r: (r["spans"][label][index][1 if end else 0]
                          if label in r["spans"] and len(r["spans"][label]) > abs(index)
                          else None)

    def length(label: str, index: int):
        return lambda r: (span(label, index, True)(r) - span(label, index, False)(r)
                          if span(label, index, True)(r) is not None else None)

    return [
        ["wall", median(lambda r: r["wall_s"])],
        ["network loaded", median(span("load network (thread)", 0, True))],
        ["first forward starts", median(span("forward", 0, False))],
        ["first forward", median(length("forward", 0))],
        ["second forward", median(length("forward", 1))],
        ["last forward ends", median(span("forward", -1, True))],
        ["forward, sum", median(lambda r: sum(b - a for a, b in r["spans"]["forward"]))],
        ["contours: rest after inference", median(length("contours: rest after inference",
                                                          0))],
        ["publish", median(length("publish (wall)", 0))],
    ]


if __name__ == "__main__":
    raise SystemExit(main())
