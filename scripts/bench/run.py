"""Benchmark ``wsiseg run`` against the network alone and against TIAToolbox, on one slide.

One generated slide (:mod:`wsiseg.synth`) and random GuideNet weights with a model card
(``wsiseg models init``; speed does not depend on the weights' values). Four phases, each in
a fresh process (``python -m common`` / ``runtime_phases.py --phase``) whose peak resident memory is
its own:

(b) ``pipeline``   ``wsiseg run SLIDE --out DIR --guidenet W --device D --runtime R
                   --precision P`` end to end (fresh store: tissue mask, tiling, GuideNet,
                   contours, GeoJSON, thumbnail); R = OpenVINO on CPU by default;
(a) ``network``    the torch network alone (eager, channels-last: the runtime before issue 17)
                   on the very patches (b) computed, pre-extracted into memory, same batch
                   size, eval / inference mode;
(a′) ``network``   the same through the runtime (b) uses (OpenVINO, its precision printed):
                   the limit (b) is measured against;
(c) ``tiatoolbox`` TIAToolbox 2.1's ``SemanticSegmentor`` on the same slide with the same
                   network (our smp U-Net wrapped in a TIAToolbox ``ModelABC``), patch, stride
                   and resolution (mpp), writing its probability map and QuPath contours.

Reports (a′)/(b) (1 = the pipeline costs no more than its network; goal ≥ 0.7) and (c)/(b)
(how many times faster than TIAToolbox; goal ≥ 8), seconds per slide, working Mpx/s and peak
memory.

    .venv/bin/python scripts/bench/run.py --size 6144x4096 --mpp 1.0 --device cpu

The slide is written at ``--mpp`` directly: 1.0 µm/px is the level a 0.25 µm/px scan is read
from for the 2.0 µm/px working resolution (its pyramid level 1), so decoding and resampling
cost what they cost on a real 40× slide, at 1/16 of the generation time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import runtime_phases  # noqa: E402
from common import fmt, markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=common.parse_size, default=(6144, 4096), metavar="WxH",
                        help="level-0 size of the generated slide (default 6144x4096)")
    parser.add_argument("--mpp", type=float, default=1.0, help="level-0 µm/px (default 1.0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--tia-workers", type=int, default=os.cpu_count() or 1,
                        help="TIAToolbox DataLoader workers (default: one per CPU, as wsiseg's "
                             "tiling threads)")
    parser.add_argument("--skip-tiatoolbox", action="store_true")
    parser.add_argument("--guidenet", type=Path, default=None,
                        help="GuideNet weights (default: random, from `wsiseg models init`; "
                             "the time of the contours and of TIAToolbox's output then "
                             "follows what random weights draw)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of (b), (a), (c), interleaved; the fastest of each phase "
                             "counts (use 2+ on a shared machine)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="passes of the network alone within one (a) (the fastest counts)")
    parser.add_argument("--runtime", default="auto", choices=["auto", "openvino", "torch"],
                        help="(b)'s and (a′)'s runtime (default auto: OpenVINO on CPU)")
    parser.add_argument("--precision", default="auto", choices=["auto", "f32", "bf16"])
    parser.add_argument("--infer-threads", type=int, default=None,
                        help="OpenVINO inference threads in (a′) and (b) (default: all cores)")
    parser.add_argument("--skip-torch-network", action="store_true", help="skip (a)")
    common.add_common_args(parser)
    args = parser.parse_args(argv)

    from wsiseg.config import load_workflow

    wf = load_workflow()
    g = wf.guidenet
    slide = common.generated_slide(args.cache, args.size, args.mpp, args.seed)
    with common.scratch(args.work, "wsiseg-bench-run-") as work:
        weights = args.guidenet or common.guidenet_weights(work / "guidenet-random.safetensors")
        (slide_path,) = common.slide_copies(slide.slide_path, work / "slides", 1)
        from wsiseg.runtime import load_network

        # Convert once before any clock starts (a user pays this once per weights file).
        load_network(weights, device=args.device, runtime=args.runtime, precision=args.precision)
        bs, as_, a2s, cs = [], [], [], []
        env = ({"WSISEG_INFER_THREADS": str(args.infer_threads)} if args.infer_threads
               else None)
        for k in range(args.rounds):  # interleaved, so a change of load hits every phase
            out = work / f"run-{k}"
            common.log(f"round {k + 1}/{args.rounds}: (b) wsiseg run ...")
            b = runtime_phases.run("pipeline", env=env, runtime=args.runtime,
                                   precision=args.precision, slides=[str(slide_path)],
                                   out=str(out), weights=str(weights), device=args.device)
            if "error" in b.data or b.data.get("status") != 0:
                print(f"wsiseg run failed: {b.data.get('error') or b.data.get('slides')}\n"
                      f"{b.stderr_tail}", file=sys.stderr)
                return 1
            bs.append(b)
            store = str(out / f"{slide_path.stem}.zarr")
            common.log("(a′) network alone through the runtime ...")
            a2s.append(runtime_phases.run(
                "network", store=store, weights=str(weights), runtime=args.runtime,
                precision=args.precision, batch_size=g.batch_size, patch_px=g.patch_px,
                stride_px=g.stride_px, repeats=args.repeats, threads=args.infer_threads))
            if not args.skip_torch_network:
                common.log("(a) torch network alone ...")
                as_.append(common.run_phase(
                    "network", store=store, weights=str(weights), device=args.device,
                    batch_size=g.batch_size, patch_px=g.patch_px, stride_px=g.stride_px,
                    repeats=args.repeats))
            if not args.skip_tiatoolbox:
                common.log("(c) TIAToolbox SemanticSegmentor ...")
                cs.append(common.run_phase(
                    "tiatoolbox", slide=str(slide_path), out=str(work / f"tia-{k}"),
                    weights=str(weights), device=args.device, batch_size=g.batch_size,
                    patch_px=g.patch_px, stride_px=g.stride_px, mpp=wf.working_mpp,
                    workers=args.tia_workers))
        b, a2 = common.fastest(bs), common.fastest(a2s)
        a = common.fastest(as_) if as_ else common.ChildResult({}, 0.0, 0.0, 0, "")
        c = common.fastest(cs) if cs else None

    from wsiseg.slide.frame import Frame

    frame = Frame(level0_size=slide.level0_size, level0_mpp=slide.mpp,
                  working_mpp=wf.working_mpp)
    rows_px, cols_px = frame.working_shape
    mpx = rows_px * cols_px / 1e6
    b_s = b.data["seconds"]
    stats = b.data["infer_stats"]
    patches = stats[0]["patches"] if stats else a.data.get("patches")
    used = (b.data.get("slides") or [{}])[0]
    table = [
        ["(a) torch network alone", a.data.get("patches"), fmt(a.data.get("seconds"), 2),
         fmt(a.data.get("cpu_s"), 2),
         fmt(mpx / a.data["seconds"], 2) if "seconds" in a.data else "–",
         fmt(a.peak_rss_mib, 0), fmt(a.data["seconds"] / b_s, 2) if "seconds" in a.data
         else "–", ""],
        [f"(a′) {a2.data.get('runtime')} {a2.data.get('precision')} network alone",
         a2.data.get("patches"), fmt(a2.data.get("seconds"), 2), fmt(a2.data.get("cpu_s"), 2),
         fmt(mpx / a2.data["seconds"], 2) if "seconds" in a2.data else "–",
         fmt(a2.peak_rss_mib, 0), fmt(a2.data["seconds"] / b_s, 2) if "seconds" in a2.data
         else "–", ""],
        [f"(b) wsiseg run ({used.get('runtime', '?')} {used.get('precision', '?')})", patches,
         fmt(b_s, 2), fmt(b.data.get("cpu_s"), 2), fmt(mpx / b_s, 2), fmt(b.peak_rss_mib, 0),
         "1.00", "1.00"],
    ]
    notes = []
    if c is None:
        notes.append("(c) TIAToolbox: not run (--skip-tiatoolbox).")
    elif "seconds" in c.data:
        c_s = c.data["seconds"]
        table.append(["(c) TIAToolbox SemanticSegmentor", c.data["patches"], fmt(c_s, 2),
                      fmt(c.data.get("cpu_s"), 2), fmt(mpx / c_s, 2), fmt(c.peak_rss_mib, 0),
                      "", fmt(c_s / b_s, 2)])
    else:
        reason = c.data.get("skipped") or c.data.get("error") or c.stderr_tail[-500:]
        notes.append(f"(c) TIAToolbox could not run: {reason}")
    tables = [(
        f"Slide: {slide.level0_size[0]}×{slide.level0_size[1]} px at {slide.mpp:g} µm/px → "
        f"working {cols_px}×{rows_px} px ({mpx:.1f} Mpx) at {wf.working_mpp:g} µm/px; "
        f"GuideNet {g.patch_px}² patches, stride {g.stride_px}, batch {g.batch_size}, "
        f"device {args.device}, OpenVINO threads "
        f"{args.infer_threads or 'all cores'}.",
        markdown_table(["run", "patches", "seconds", "CPU-s", "working Mpx/s",
                        "peak RSS (MiB)", "seconds / (b)", "(b) speed-up"], table),
    ), (
        "Where (b)'s time goes (wall: share of the run; thread-s: summed over threads, "
        "overlapping the rest; CPU-s: what the calling thread computed, the rest of the time "
        "it waited or was descheduled):",
        markdown_table(["stage", "calls", "seconds", "CPU-s (calling thread)", "share"],
                       common.stage_rows(b.data["stages"], stats, b_s)),
    )]
    if c is not None and "stages" in c.data:
        tables.append((
            f"Where (c)'s time goes (TIAToolbox {c.data['version']}, {c.data['workers']} "
            f"DataLoader workers, output {c.data['output_type']} + probabilities):",
            markdown_table(["stage", "calls", "seconds"],
                           [[k, v["calls"], fmt(v["seconds"], 2)]
                            for k, v in c.data["stages"].items()]),
        ))
    notes.append(f"(a′)/(b) = {fmt(a2.data.get('seconds', 0) / b_s, 2)} (goal ≥ 0.7); "
                 f"(a)/(b) = {fmt(a.data.get('seconds', 0) / b_s, 2)}; "
                 + (f"(c)/(b) = {fmt(c.data['seconds'] / b_s, 2)}" if c and "seconds" in c.data
                    else "(c)/(b) = –")
                 + f"; the network's own time inside (b) / (b) = "
                 f"{fmt(sum(st['forward_s'] for st in stats) / b_s, 2)} (one process: immune "
                 f"to load changing between phases); {b_s:.1f} s per slide. Process start and "
                 f"imports are not counted "
                 f"(child wall: (a) {a.wall_s:.1f} s, (b) {b.wall_s:.1f} s"
                 + (f", (c) {c.wall_s:.1f} s" if c else "") + ").")
    if args.rounds > 1:
        def secs(rs: list[common.ChildResult]) -> str:
            return ", ".join(fmt(r.data.get("seconds"), 1) for r in rs) or "–"

        notes.append(f"All rounds, seconds: (a) {secs(as_)}; (a′) {secs(a2s)}; (b) {secs(bs)}; "
                     f"(c) {secs(cs)}. "
                     "The fastest of each phase is reported.")
    if "infer (wall)" not in b.data["stages"]:
        notes.append("warning: no stage was timed: `wsiseg run` ran its slides in Dask worker "
                     "processes, out of reach of the benchmark's timers (seconds per slide "
                     "still hold; the breakdown does not).")
    common.print_report("wsiseg run vs the network alone vs TIAToolbox", tables, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
