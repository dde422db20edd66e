"""Where a served stroke's time goes, function by function, on a slide and on one 16× larger.

Both slides of ``serve.py --area-factor 16`` (generated, ``--size`` and 4× each side, at
``--mpp``) are built and served in this process as ``wsiseg serve`` builds them; their
strokes (``serve.py``'s simulated corrections) go in turns through the function the
server's POST runs (:func:`wsiseg.serve.rounds.serve_round`, no HTTP), with wall-clock
timers around the functions named in :data:`TIMED` (no profiler: the timings are real).
Prints, per slide, the strokes' p50 and p95, then per kind of stroke — those that changed no
contour and those that replaced features — the median milliseconds of each function, and
the strokes nearest the p50 one by one.

    .venv/bin/python scripts/bench/serve_split.py --cache /tmp/wbserve/cache --strokes 60

Timers nest (``recontour`` holds ``process``, which holds ``trace_mask``): read a function's
time against its caller's, and compare the two slides row by row.
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from serve import build_store, in_copy, paired_note, stroke_export  # noqa: E402

#: (module, function or Class.method), where the round looks them up; reported by the
#: last name.
TIMED = [
    ("wsiseg.rounds", "recontour"), ("wsiseg.rounds", "round_contours"),
    ("wsiseg.contours.merge", "_Merger.process"), ("wsiseg.contours.merge", "trace_mask"),
    ("wsiseg.contours.merge", "piece_sums"),
    ("wsiseg.contours.merge", "_Merger.leaks"), ("wsiseg.contours.polygons", "_finished"),
    ("wsiseg.contours.merge", "_Merger.spliced"), ("wsiseg.contours.merge", "splice"),
    ("wsiseg.contours.merge", "fragment"), ("wsiseg.rounds", "_mostly_covered"),
    ("wsiseg.rounds", "write_round_geojson"), ("wsiseg.rounds", "annotations_for"),
    ("wsiseg.rounds", "annotation_features"), ("wsiseg.qupath.write", "geometry_json"),
    ("wsiseg.qupath.snap", "_lattice_rounded"), ("wsiseg.qupath.snap", "canonical_polygon_text"),
    ("wsiseg.rounds", "atomic_write_or_link"),
    ("wsiseg.rounds", "write_round_index"), ("wsiseg.rounds", "publish_round"),
    ("wsiseg.slide.frame", "Frame.transform_geometry"), ("wsiseg.rounds", "save_backup"),
    ("wsiseg.refine.round", "measurements"), ("wsiseg.refine.round", "tissue_covered_px"),
    ("wsiseg.store", "SlideStore.update_attrs"), ("wsiseg.journal", "Transaction.protect"),
    ("wsiseg.journal", "Transaction.commit"), ("wsiseg.refine.round", "rasterize_new"),
    ("wsiseg.refine.round", "load_scribbles"), ("wsiseg.serve.rounds", "_contours_answer"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--size", type=common.parse_size, default=(4096, 4096))
    parser.add_argument("--mpp", type=float, default=1.0)
    parser.add_argument("--workflow", default="default")
    parser.add_argument("--strokes", type=int, default=60)
    parser.add_argument("--refinenet", choices=("trained", "random"), default="trained",
                        help="RefineNet's weights (serve.py --refinenet)")
    parser.add_argument("--mosaic", action="store_true",
                        help="the 16x slide is the first one repeated 4 × 4, its strokes "
                             "the first's replayed in one copy (serve.py --mosaic)")
    args = parser.parse_args(argv)

    from wsiseg.config import load_workflow
    from wsiseg.contours.cache import TRACES
    from wsiseg.serve.main import ServeOptions, build_app, freeze_startup_objects
    from wsiseg.serve.rounds import RoundRefused, serve_round, serve_undo

    seconds: dict[str, float] = collections.defaultdict(float)
    for module, path in TIMED:
        _time_calls(module, path, seconds)
    w, h = args.size
    with common.scratch(args.work, "wsiseg-bench-serve-split-") as work:
        wf = load_workflow(args.workflow)
        if args.refinenet == "trained":
            weights = common.trained_refinenet(args.cache, (w, h), args.mpp, wf, args.seed)
        else:
            weights = common.refinenet_weights(work / "refinenet.safetensors", wf)
        slides = {}
        for label, size in (("1x", (w, h)), ("16x", (4 * w, 4 * h))):
            folder = work / label
            (folder / "run").mkdir(parents=True)
            (folder / "scratch").mkdir()
            mosaic = 4 if args.mosaic and label == "16x" else 1
            slide = common.generated_slide(args.cache, (w, h) if mosaic > 1 else size, args.mpp,
                                           args.seed)
            store, truth = build_store(slide, folder / "run" / "slide.zarr", wf, args.workflow,
                                       mosaic)
            app, _, _ = build_app(ServeOptions(paths=[folder / "run"], refiner="refinenet",
                                               refinenet=str(weights)), folder / "scratch")
            state = app.app.state.wsiseg
            slides[label] = (state, state.registry.get("slide"), store, truth,
                             np.random.default_rng(args.seed))
        freeze_startup_objects()  # as `wsiseg serve` does before it listens
        TRACES.clear()
        for state, ref, *_ in slides.values():  # the server's warm-up of each slide
            state.warmer.warm(ref)
            if not state.warmer.wait(ref.id):
                raise RuntimeError("the trace memo's warm-up of a bench slide failed")
        rows: dict[str, list[tuple[float, bool, dict[str, float]]]] = {k: [] for k in slides}
        for k in range(args.strokes + 1):  # the first stroke of each warms up: not counted
            if args.mosaic:  # the first slide's stroke, then the same one in the mosaic's copy
                done = replayed_stroke(slides, seconds, serve_round, serve_undo, RoundRefused)
            else:
                done = {label: one_stroke(slide, seconds, serve_round, RoundRefused)[:3]
                        for label, slide in slides.items()}
            if k:
                for label, row in done.items():
                    rows[label].append(row)
    for label, got in rows.items():
        _report(label, got)
    if args.mosaic:
        first, mosaic = ([{"total": total, "replaced": replaced} for total, replaced, _ in got]
                         for got in (rows["1x"], rows["16x"]))
        print("\n" + paired_note("refinenet", first, mosaic))
    return 0


def one_stroke(slide, seconds, serve_round, refused, body: bytes | None = None):
    """A stroke drawn on ``slide`` (state, ref, store, truth, rng), or ``body``, served:
    (seconds, whether features were replaced, seconds per function); None when ``body`` was
    refused (a drawn stroke that is refused is drawn again)."""
    state, ref, store, truth, rng = slide
    while True:
        stroke = body or stroke_export(store, truth, rng)
        if stroke is None:
            raise RuntimeError("no stroke left to simulate")
        seconds.clear()
        t0 = time.perf_counter()
        try:
            answer = serve_round(ref, stroke, state.choice, state.scratch, 0.0, "changed")
        except refused:  # a stroke off tissue
            if body is not None:
                return None
            continue
        total = time.perf_counter() - t0
        changed = bool(answer["changed"]["added"] or answer["changed"]["removed"])
        return total, changed, dict(seconds), stroke


def replayed_stroke(slides, seconds, serve_round, serve_undo, refused):
    """A stroke drawn on the 1x slide and served there, then moved into the mosaic's copy
    (``serve.in_copy``) and served there. Each slide's tissue mask is its own: a stroke at
    the tissue's edge that the mosaic refuses is undone on the 1x slide and drawn again."""
    while True:
        *first, body = one_stroke(slides["1x"], seconds, serve_round, refused)
        second = one_stroke(slides["16x"], seconds, serve_round, refused,
                            in_copy(body, slides["16x"][2], 4))
        if second is not None:
            return {"1x": tuple(first), "16x": second[:3]}
        serve_undo(slides["1x"][1], 0.0)


def _time_calls(module: str, path: str, seconds: dict[str, float]) -> None:
    """Wrap ``module.path`` to add its wall-clock seconds to ``seconds`` under its name."""
    import importlib

    owner = importlib.import_module(module)
    *classes, name = path.split(".")
    for cls in classes:
        owner = getattr(owner, cls)
    function = getattr(owner, name)

    @functools.wraps(function)
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - t0

    setattr(owner, name, timed)


def _report(label: str, rows: list[tuple[float, bool, dict[str, float]]]) -> None:
    totals = np.array([t for t, _, _ in rows])
    print(f"\n## {label}: {len(rows)} strokes, p50 {np.median(totals):.3f} s, "
          f"p95 {np.percentile(totals, 95):.3f} s")
    names = [path.rpartition(".")[2] for _, path in TIMED]
    kinds = (("no contour changed", [r for r in rows if not r[1]]),
             ("features replaced", [r for r in rows if r[1]]))
    print("\n| function (ms, median) | " + " | ".join(
        f"{kind} ({len(group)}; {np.median([r[0] for r in group]) if group else 0:.3f} s)"
        for kind, group in kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for name in names:
        print(f"| {name} | " + " | ".join(
            f"{np.median([r[2].get(name, 0.0) for r in group]) * 1e3:.1f}" if group else ""
            for _, group in kinds) + " |")
    middle = sorted(rows, key=lambda r: r[0])[len(rows) // 2 - 5: len(rows) // 2 + 5]
    print("\nstrokes nearest the p50 (s, replaced features?, recontour / write_round_geojson "
          "/ geometry_json ms):")
    for total, changed, s in middle:
        print(f"  {total:.3f} {'yes' if changed else 'no '} "
              f"{s.get('recontour', 0) * 1e3:5.1f} {s.get('write_round_geojson', 0) * 1e3:5.1f} "
              f"{s.get('geometry_json', 0) * 1e3:5.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
