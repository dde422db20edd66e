"""Benchmark ``wsiseg tile``: throughput by worker count, and peak memory against slide area.

Tiles generated slides (:mod:`wsiseg.synth`) into fresh slide stores with
:func:`wsiseg.tiling.tile_slide` (what ``wsiseg tile`` runs), each in a fresh process whose
peak resident memory is sampled (``python -m common --phase tile``):

1. the ``--size`` slide with 1, 2, ... workers (``--workers``): working Mpx/s, where a working
   pixel is one written into the store's ``image`` at the working resolution (tissue chunks);
2. the same with a slide of ``--area-factor`` × the area (edge × √factor) at the largest worker
   count: peak memory must not grow with the area (bounded by chunk size × workers).

    .venv/bin/python scripts/bench/tiling.py --size 8192x8192 --mpp 1.0 --workers 1,2

The slides are written at ``--mpp`` directly: 1.0 µm/px is the level a 0.25 µm/px scan is
read from for the 2.0 µm/px working resolution, so the work per working pixel is that of a real
40× slide (decode 4 source pixels, area-average 2×2).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import fmt, markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=common.parse_size, default=(8192, 8192), metavar="WxH",
                        help="level-0 size of the 1× slide (default 8192x8192)")
    parser.add_argument("--mpp", type=float, default=1.0, help="level-0 µm/px (default 1.0)")
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--area-factor", type=int, default=4,
                        help="area of the large slide over the 1× slide (default 4)")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    edge = math.sqrt(args.area_factor)
    big_size = (round(args.size[0] * edge), round(args.size[1] * edge))

    small = common.generated_slide(args.cache, args.size, args.mpp, args.seed)
    big = common.generated_slide(args.cache, big_size, args.mpp, args.seed)
    runs = [(small, "1×", n) for n in workers] + [(big, f"{args.area_factor}×", max(workers))]
    results = []
    with common.scratch(args.work, "wsiseg-bench-tiling-") as work:
        for k, (slide, label, n) in enumerate(runs):
            common.log(f"tile {slide.slide_path.name} with {n} worker(s) ...")
            r = common.run_phase("tile", slide=str(slide.slide_path),
                                 store=str(work / f"store-{k}.zarr"), workers=n)
            if "seconds" not in r.data:
                print(f"tiling failed: {r.data}\n{r.stderr_tail}", file=sys.stderr)
                return 1
            results.append((slide, label, n, r))

    rows = []
    for slide, label, n, r in results:
        d = r.data
        st = d["stages"]
        rows.append([
            label, f"{slide.level0_size[0]}×{slide.level0_size[1]}",
            f"{d['working_shape'][1]}×{d['working_shape'][0]}", d["chunks"], n,
            fmt(d["seconds"], 2), fmt(d["written_px"] / 1e6 / d["seconds"], 2),
            fmt(st.get("read_region (thread-s)", {}).get("seconds"), 2),
            fmt(st.get("resample (thread-s)", {}).get("seconds"), 2),
            fmt(st.get("tissue mask (wall)", {}).get("seconds"), 2),
            fmt(r.peak_rss_mib, 0), fmt(d["peak_rss_mib"] - d["start_rss_mib"], 0),
        ])
    base = [r for s, lab, n, r in results if lab == "1×" and n == max(workers)][0]
    big_r = results[-1][3]
    growth = (big_r.data["peak_rss_mib"] - big_r.data["start_rss_mib"]) / max(
        1.0, base.data["peak_rss_mib"] - base.data["start_rss_mib"])
    speedup = ""
    if len(workers) > 1:
        s1 = [r for s, lab, n, r in results if lab == "1×" and n == min(workers)][0]
        speedup = (f"{max(workers)} workers vs {min(workers)}: "
                   f"{s1.data['seconds'] / base.data['seconds']:.2f}× faster. ")
    common.print_report(
        "wsiseg tile: throughput and memory",
        [(f"Chunks of {results[0][3].data['chunk_px']}² working px; working Mpx/s counts the "
          "tissue chunks written. read_region / resample are thread-seconds summed over "
          "workers; peak RSS is the whole child process (numpy, scipy, zarr, OpenSlide "
          "loaded), 'above start' what tiling added.",
          markdown_table(["slide", "level-0 px", "working px", "tissue chunks", "workers",
                          "seconds", "working Mpx/s", "read_region (s)", "resample (s)",
                          "tissue mask (s)", "peak RSS (MiB)", "above start (MiB)"], rows))],
        [f"{speedup}Memory above start at {args.area_factor}× the area: {growth:.2f}× that of "
         "the 1× slide (bounded: it should stay near 1)."],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
