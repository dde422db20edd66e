"""Where a served stroke's time goes: ``serve.py``'s strokes, profiled in this thread.

The slide store of ``serve.py`` (a generated slide, ``--size`` at ``--mpp``, its guide made
from the ground truth) is built once and traced once (the server's warm-up); then
``--strokes`` simulated correction strokes go through the function the server's POST runs
(:func:`wsiseg.serve.rounds.serve_round`, no HTTP), each under cProfile. Prints each
stroke's seconds and features added, and the cumulative profile of the strokes slower than
the median (on the bench slide: those on its large tumors) and of the others.

    .venv/bin/python scripts/bench/serve_profile.py --size 16384x16384 --strokes 30

Profiles are not timings (cProfile adds ~30 %): compare stages, and time with ``serve.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from serve import build_store, stroke_export  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--size", type=common.parse_size, default=(16384, 16384))
    parser.add_argument("--mpp", type=float, default=1.0)
    parser.add_argument("--workflow", default="default")
    parser.add_argument("--strokes", type=int, default=30)
    parser.add_argument("--lines", type=int, default=40, help="profile lines printed")
    args = parser.parse_args(argv)

    from wsiseg.config import load_workflow
    from wsiseg.contours.cache import TRACES
    from wsiseg.serve.main import ServeOptions, build_app, freeze_startup_objects
    from wsiseg.serve.rounds import RoundRefused, serve_round

    with common.scratch(args.work, "wsiseg-bench-serve-profile-") as work:
        slide = common.generated_slide(args.cache, args.size, args.mpp, args.seed)
        wf = load_workflow(args.workflow)
        (work / "run").mkdir()
        store, truth = build_store(slide, work / "run" / "slide.zarr", wf, args.workflow)
        weights = work / "refinenet.safetensors"
        common.refinenet_weights(weights, wf)
        (work / "scratch").mkdir()
        app, _, _ = build_app(ServeOptions(paths=[work / "run"], refiner="refinenet",
                                           refinenet=str(weights)), work / "scratch")
        freeze_startup_objects()  # as `wsiseg serve` does before it listens
        state = app.app.state.wsiseg
        slide_ref = state.registry.get("slide")
        TRACES.clear()
        t0 = time.perf_counter()
        state.warmer.warm(slide_ref)  # the server's warm-up, as when a client opens it
        if not state.warmer.wait(slide_ref.id):
            raise RuntimeError("the trace memo's warm-up of the bench slide failed")
        common.log(f"traced once in {time.perf_counter() - t0:.2f} s")
        rng = np.random.default_rng(args.seed)
        rows: list[tuple[float, cProfile.Profile]] = []
        warmed = False
        while len(rows) < args.strokes:
            body = stroke_export(store, truth, rng)
            if body is None:
                break
            profile = cProfile.Profile()
            t0 = time.perf_counter()
            try:
                with profile:
                    answer = serve_round(slide_ref, body, state.choice, state.scratch, 0.0,
                                         "changed")
            except RoundRefused:  # a stroke off tissue: drawn again
                continue
            seconds = time.perf_counter() - t0
            if not warmed:  # the first one warms up, not counted
                warmed = True
                continue
            rows.append((seconds, profile))
            common.log(f"{seconds:.3f} s, added {len(answer['changed']['added'])}, "
                       f"network {answer['timings']['network_s']:.3f} s")
    seconds = np.array([s for s, _ in rows])
    median = float(np.median(seconds))
    print(f"p50 {median:.3f} s, p95 {np.percentile(seconds, 95):.3f} s (under cProfile)")
    for label, group in (("slower than the median", [p for s, p in rows if s > median]),
                         ("the others", [p for s, p in rows if s <= median])):
        if not group:
            continue
        out = io.StringIO()
        stats = pstats.Stats(group[0], stream=out)
        for profile in group[1:]:
            stats.add(profile)
        stats.sort_stats("cumulative").print_stats(args.lines)
        print(f"\n## {len(group)} strokes {label}\n{out.getvalue()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
