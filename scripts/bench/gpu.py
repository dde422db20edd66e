"""Benchmark ``wsiseg run`` on a GPU: slides per hour, the network's limit, TIAToolbox, GPU use.

Made for the GPU machine (``scripts/gpu/install_and_bench.sh`` installs the wheels and runs
it); it also runs on a CPU with a tiny ``--size``. One generated slide of realistic size
(default 100000×80000 px at 0.25 µm/px, i.e. 25 × 20 mm, processed at the workflow's 2.0
µm/px: 12500×10000 = 125 working Mpx) and random GuideNet weights with a model card
(``wsiseg models init``). Phases, each in a fresh process (``python -m common``):

(b) ``wsiseg run`` of ``--slides`` names of that slide in one invocation (one store each), with
    the GPU utilisation sampled in a thread and timers around the package's stages: read
    (OpenSlide decode), resample, tiling, the inference loop (network, reader thread, writer
    thread, waiting for input), contours, annotations, thumbnail;
(a) the network alone on the very patches of one slide, pre-loaded on the GPU, same batch
    size, bf16 autocast and channels-last as :mod:`wsiseg.infer` runs it: the limit;
(c) TIAToolbox 2.1's ``SemanticSegmentor`` with the same network (wrapped in a ``ModelABC``,
    same autocast and layout), patch, stride and mpp, when TIAToolbox can be imported;
    otherwise skipped with the reason.

Reports (a)/(b) (goal ≥ 0.85), (c)/(b) (goal ≥ 5), seconds per slide and slides per hour
(goal ≥ 500 slides/h of 125 Mpx on one H100), from the slides after the first (the first also
pays cuDNN's autotuning and the allocator's warm-up).

    python scripts/bench/gpu.py                       # on the GPU machine
    .venv/bin/python scripts/bench/gpu.py --size 8192x6144 --mpp 0.5 --write-mpp 1.0 \\
        --device cpu --slides 2 --skip-tiatoolbox    # a CPU check of the plumbing

The slide is written at ``--write-mpp`` (default 1.0 µm/px) with the physical extent of
``--size`` at ``--mpp``: a 0.25 µm/px scan with a 4× pyramid is read from its 1.0 µm/px level
for the 2.0 µm/px working resolution, so the pixels decoded and resampled are the same, and
generating 0.5 Gpx instead of 8 Gpx fits the GPU machine's time limits. ``--write-mpp 0.25``
writes the full level 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import fmt, markdown_table  # noqa: E402

GOAL_SLIDES_PER_H = 500
GOAL_MPX = 125
GOAL_VS_NETWORK = 0.85
GOAL_VS_TIATOOLBOX = 5.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=common.parse_size, default=(100_000, 80_000),
                        metavar="WxH", help="level-0 size at --mpp (default 100000x80000)")
    parser.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px (default 0.25)")
    parser.add_argument("--write-mpp", type=float, default=1.0,
                        help="µm/px the slide is written at, same extent (default 1.0)")
    parser.add_argument("--slides", type=int, default=3,
                        help="slides in the `wsiseg run` cohort (default 3)")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (default auto)")
    parser.add_argument("--tia-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="TIAToolbox DataLoader workers (default min(8, CPUs))")
    parser.add_argument("--skip-tiatoolbox", action="store_true")
    parser.add_argument("--repeats", type=int, default=3,
                        help="passes of the network alone (the fastest counts; default 3)")
    common.add_common_args(parser)
    args = parser.parse_args(argv)

    from wsiseg.config import load_workflow
    from wsiseg.infer import resolve_device

    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    wf = load_workflow()
    g = wf.guidenet
    scale = args.mpp / args.write_mpp
    written = (max(256, round(args.size[0] * scale)), max(256, round(args.size[1] * scale)))
    slide = common.generated_slide(args.cache, written, args.write_mpp, args.seed)

    with common.scratch(args.work, "wsiseg-bench-gpu-") as work:
        weights = common.guidenet_weights(work / "guidenet-random.safetensors")
        names = common.slide_copies(slide.slide_path, work / "slides", args.slides)
        out = work / "run"
        if (out / "ledger.json").exists():  # a rerun would skip every slide: nothing to time
            raise SystemExit(f"{work}: already holds a finished run; give a new --work")
        common.log(f"(b) wsiseg run of {len(names)} slides on {device} ...")
        b = common.run_phase("pipeline", slides=[str(p) for p in names], out=str(out),
                             weights=str(weights), device=str(device), sample_gpu=on_cuda)
        if "error" in b.data or b.data.get("status") != 0:
            print(f"wsiseg run failed: {b.data.get('error') or b.data.get('slides')}\n"
                  f"{b.stderr_tail}", file=sys.stderr)
            return 1
        common.log("(a) network alone ...")
        a = common.run_phase("network", store=str(out / f"{names[-1].stem}.zarr"),
                             weights=str(weights), device=str(device),
                             batch_size=g.batch_size, patch_px=g.patch_px,
                             stride_px=g.stride_px, repeats=args.repeats)
        c = None
        if not args.skip_tiatoolbox:
            common.log("(c) TIAToolbox SemanticSegmentor ...")
            c = common.run_phase("tiatoolbox", slide=str(names[0]), out=str(work / "tia"),
                                 weights=str(weights), device=str(device),
                                 batch_size=g.batch_size, patch_px=g.patch_px,
                                 stride_px=g.stride_px, mpp=wf.working_mpp,
                                 workers=args.tia_workers, stub_simpleitk=True)

    from wsiseg.slide.frame import Frame

    frame = Frame(level0_size=written, level0_mpp=args.write_mpp, working_mpp=wf.working_mpp)
    rows_px, cols_px = frame.working_shape
    mpx = rows_px * cols_px / 1e6
    per_slide = [float(r["seconds"]) for r in b.data["slides"]]
    steady = per_slide[1:] or per_slide
    slide_s = statistics.median(steady)
    stats = b.data["infer_stats"]
    n = len(per_slide)
    patches = stats[-1]["patches"] if stats else None
    a_s = a.data.get("seconds")
    # The network's share is compared with the inference of one steady slide, and with the
    # whole steady slide.
    table = [
        ["(a) network alone", a.data.get("patches"), fmt(a_s, 2),
         fmt(mpx / a_s, 1) if a_s else "–", fmt(3600 / a_s, 0) if a_s else "–",
         fmt(a.peak_rss_mib, 0)],
        [f"(b) wsiseg run, per slide (median of {len(steady)})", patches, fmt(slide_s, 2),
         fmt(mpx / slide_s, 1), fmt(3600 / slide_s, 0), fmt(b.peak_rss_mib, 0)],
    ]
    notes = []
    c_s = None
    if c is None:
        notes.append("(c) TIAToolbox: not run (--skip-tiatoolbox).")
    elif "seconds" in c.data:
        c_s = c.data["seconds"]
        table.append(["(c) TIAToolbox SemanticSegmentor", c.data["patches"], fmt(c_s, 2),
                      fmt(mpx / c_s, 1), fmt(3600 / c_s, 0), fmt(c.peak_rss_mib, 0)])
        if c.data.get("simpleitk_stubbed"):
            notes.append("(c) ran with SimpleITK stubbed (imported by TIAToolbox for "
                         "registration only; not installed here).")
    else:
        reason = c.data.get("skipped") or c.data.get("error") or c.stderr_tail[-500:]
        notes.append(f"(c) TIAToolbox skipped: {reason}")

    # Where the time goes, per slide (sums over the cohort divided by the slide count).
    stages = b.data["stages"]
    where = []
    for label in ("load weights (wall)", "tile (wall)", "tissue mask (wall)",
                  "read_region (thread-s)", "resample (thread-s)", "infer (wall)",
                  "publish (wall)", "contours", "annotations", "thumbnail"):
        if label in stages:
            where.append([label, fmt(stages[label]["seconds"] / n, 2),
                          f"{100 * stages[label]['seconds'] / sum(per_slide):.0f} %"
                          if "(wall)" in label else ""])
    for key, label in (("forward_s", "infer: network (device time)"),
                       ("read_s", "infer: reader thread (decode + cut + pin, thread-s)"),
                       ("write_s", "infer: writer thread (zarr encode + write, thread-s)"),
                       ("wait_s", "infer: network waiting for input")):
        where.append([label, fmt(sum(s[key] for s in stats) / n, 2), ""])
    util = b.data.get("gpu_util") or {}
    gpu_line = ("GPU utilisation: not sampled (CPU run)." if not on_cuda else
                f"GPU utilisation ({util.get('source')}, {util.get('samples')} samples): "
                f"{fmt(util.get('mean_run'), 0)} % over the whole run, "
                f"{fmt(util.get('mean_infer'), 0)} % during inference, "
                f"{fmt(util.get('mean_outside_infer'), 0)} % outside it"
                + (f"; peak GPU memory {b.data['cuda_max_allocated_mib']:.0f} MiB"
                   if "cuda_max_allocated_mib" in b.data else "")
                + (f" ({util['error']})" if util.get("error") and not util.get("samples")
                   else "") + ".")
    infer_s = stages.get("infer (wall)", {}).get("seconds", 0.0) / n
    vs_network = a_s / slide_s if a_s else None
    notes += [
        f"Per-slide seconds of the cohort: {', '.join(f'{s:.1f}' for s in per_slide)} "
        f"(the first includes warm-up). Slides/h = 3600 / median of the others.",
        gpu_line,
        f"(a)/(b) = {fmt(vs_network, 2)} of the whole slide (goal ≥ {GOAL_VS_NETWORK}); "
        f"(a)/inference = {fmt(a_s / infer_s if a_s and infer_s else None, 2)}; the "
        f"network's own time inside (b) / (b) = "
        f"{fmt(sum(s['forward_s'] for s in stats) / sum(per_slide), 2)} over the cohort; "
        f"(c)/(b) = {fmt(c_s / slide_s if c_s else None, 2)} (goal ≥ {GOAL_VS_TIATOOLBOX:g}); "
        f"{3600 / slide_s:.0f} slides/h of {mpx:.0f} working Mpx (goal ≥ {GOAL_SLIDES_PER_H} "
        f"of {GOAL_MPX} Mpx on one H100, i.e. ≤ {3600 / GOAL_SLIDES_PER_H:.1f} s per slide).",
        "The host → device copy of each batch is not timed apart: it is queued on the "
        "stream before the network's events and overlaps the previous batch.",
    ]
    if "infer (wall)" not in b.data["stages"]:
        notes.append("warning: no stage was timed: `wsiseg run` ran its slides in Dask worker "
                     "processes, out of reach of the benchmark's timers (seconds per slide "
                     "still hold; the breakdown does not).")
    common.print_report(
        "wsiseg run on the GPU: slides per hour, the network's limit, TIAToolbox",
        [(f"Slide: {args.size[0]}×{args.size[1]} px at {args.mpp:g} µm/px, written as "
          f"{written[0]}×{written[1]} px at {args.write_mpp:g} µm/px → working "
          f"{cols_px}×{rows_px} px ({mpx:.1f} Mpx) at {wf.working_mpp:g} µm/px; GuideNet "
          f"{g.patch_px}² patches, stride {g.stride_px}, batch {g.batch_size}, device {device}"
          + (", bf16 autocast, channels-last." if on_cuda else ", float32."),
          markdown_table(["run", "patches", "seconds", "working Mpx/s", "slides/h",
                          "peak RSS (MiB)"], table)),
         ("Where (b)'s time goes, per slide (wall: share of the slide; thread-s: summed over "
          "threads, overlapping the rest):",
          markdown_table(["stage", "seconds", "share"], where))],
        notes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
