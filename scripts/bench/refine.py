"""Benchmark a refine round: latency by number of scribbled windows, on a small and a large slide.

For each of two generated slides (:mod:`wsiseg.synth`), the 1× ``--size`` and one of
``--area-factor`` × its area, a slide store is built with :func:`wsiseg.tiling.tile_slide` and
round 0 published (:func:`wsiseg.cohort.publish_run`). Its ``guide`` is the slide's ground
truth blurred (σ = 8 working px), squeezed into [0.3, 0.7] plus noise (σ = 0.05): the random
walker (seeded where the guide is within 0.4 of 0 or 1) has an uncertain band around every
tumor border and scattered unseeded pixels everywhere to solve, like a real GuideNet output (a
GuideNet pass over the large slide would cost minutes on a CPU and change nothing below).
Then, for 1, 4 and 16 scribbled windows (``--windows``), a QuPath-style GeoJSON export with
one brush stroke in the core of each of that many refine windows (alternately Tumor and
Stroma) is refined with :func:`wsiseg.refine.refine_round` (what ``wsiseg refine`` runs), once
with RefineNet (random weights, ``wsiseg models init``) and once with ``--refiner
randomwalk``; each round is undone (:func:`wsiseg.rounds.undo`) before the next, so every
round starts from the same store.

A round should cost in proportion to the scribbled windows, not the slide: the two slides'
rows should match at equal windows.

RefineNet runs through :func:`wsiseg.runtime.load_network` (``--runtime``, ``--precision``;
OpenVINO on CPU by default). Two more measurements (issue 17, issue 15 point 9), each in a
fresh process (``runtime_phases.py``):

- one RefineNet window (6 channels, ``window_px``² of the default workflow) alone, and per
  window in a batch;
- peak memory of a round whose scribble covers the whole tissue of the demo slide
  (``--memory-size``, ``demo`` workflow) and of one with ``--memory-factor`` × its area:
  windows are encoded and refined batch by batch, so the second should not need more.

    .venv/bin/python scripts/bench/refine.py --size 4096x4096 --mpp 1.0 --area-factor 16
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import runtime_phases  # noqa: E402
from common import fmt, markdown_table  # noqa: E402

STAGES = (  # (module, function, label): the parts of a round, wrapped where refine_round calls
    ("wsiseg.refine.round", "load_scribbles", "parse"),
    ("wsiseg.refine.round", "rasterize_new", "rasterise"),
    ("wsiseg.rounds", "save_backup", "backup"),
    ("wsiseg.refine.round", "blend_windows", "blend"),
    ("wsiseg.rounds", "load_round_contours", "read previous contours"),
    ("wsiseg.rounds", "recontour", "re-contour"),
    ("wsiseg.rounds", "write_round_geojson", "write GeoJSON"),
    ("wsiseg.rounds", "annotations_for", "  of which annotations"),
    ("wsiseg.refine.round", "measurements", "measurements"),
)


def build_store(slide, store_path: Path, workflow: str | None = None):
    """Tile the slide and publish round 0 with a guide made from its ground truth."""
    import numpy as np
    from scipy import ndimage

    from wsiseg.cohort import publish_run
    from wsiseg.config import load_workflow
    from wsiseg.store import SlideStore
    from wsiseg.synth import read_truth_mask
    from wsiseg.tiling import tile_slide

    if store_path.exists():
        store = SlideStore.open(store_path)
        if store.stage("export") == "done":
            return store
        raise SystemExit(f"{store_path}: an unfinished store from an earlier run; remove it")
    wf = load_workflow(workflow)
    t0 = time.perf_counter()
    store = tile_slide(slide.slide_path, store_path, wf).store
    rows, cols = store.frame.working_shape
    truth = read_truth_mask(slide.truth_mask_path, (rows, cols))
    band, margin = store.chunk_px, 32  # blurred band by band (margin 4σ): bounded memory
    rng = np.random.default_rng(0)
    for r0 in range(0, rows, band):
        a0, a1 = max(0, r0 - margin), min(rows, r0 + band + margin)
        p = ndimage.gaussian_filter(truth[a0:a1].astype(np.float32), sigma=8.0)
        p = p[r0 - a0 : r0 - a0 + min(band, rows - r0)]
        noise = rng.normal(0.0, 0.05, p.shape).astype(np.float32)
        guide = np.clip(np.rint(255 * (0.3 + 0.4 * p + noise)), 0, 255).astype(np.uint8)
        store["guide"][r0 : r0 + guide.shape[0]] = guide
        store["refined"][r0 : r0 + guide.shape[0]] = guide
    store.set_stage("guide", "done")
    publish_run(store, store_path.parent, store_path.name.removesuffix(".zarr"))
    common.log(f"built {store_path.name} ({cols}×{rows} working px) in "
               f"{time.perf_counter() - t0:.1f} s")
    return store


def core_centres(store, rng) -> list[tuple[float, float]]:
    """Working-px (x, y) centres of refine-window cores that lie wholly on tissue, shuffled."""

    wf = store.workflow
    window, context = wf.refinenet.window_px, wf.refinenet.context_px
    stride = window - 2 * context
    rows, cols = store.frame.working_shape
    tissue = store.tissue_mask
    sy, sx = tissue.shape[0] / rows, tissue.shape[1] / cols
    out = []
    for i in range(max(0, (rows - window) // stride)):
        for j in range(max(0, (cols - window) // stride)):
            r0, c0 = i * stride + context, j * stride + context  # the core's corner
            t = tissue[int(r0 * sy) : math.ceil((r0 + stride) * sy),
                       int(c0 * sx) : math.ceil((c0 + stride) * sx)]
            if t.size and t.all():
                out.append((c0 + stride / 2, r0 + stride / 2))
    order = rng.permutation(len(out))
    return [out[k] for k in order]


def write_scribbles(store, path: Path, centres: list[tuple[float, float]]) -> Path:
    """A QuPath export: one 80-px brush stroke (8 px wide) per centre, Tumor / Stroma."""
    import shapely

    from wsiseg.qupath import Annotation, write_annotations

    annotations = []
    for k, (x, y) in enumerate(centres):
        stroke = shapely.LineString([(x - 40, y - 8), (x, y + 8), (x + 40, y)]).buffer(4)
        annotations.append(Annotation(
            geometry=store.frame.transform_geometry(stroke, "working", "qupath"),
            class_name="Tumor" if k % 2 == 0 else "Stroma"))
    write_annotations(path, annotations)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=common.parse_size, default=(4096, 4096), metavar="WxH",
                        help="level-0 size of the 1× slide (default 4096x4096)")
    parser.add_argument("--mpp", type=float, default=1.0, help="level-0 µm/px (default 1.0)")
    parser.add_argument("--area-factor", type=int, default=16,
                        help="area of the large slide over the 1× slide (default 16)")
    parser.add_argument("--windows", default="1,4,16", help="scribbled windows per round")
    parser.add_argument("--refiners", default="refinenet,randomwalk")
    parser.add_argument("--device", default="cpu", help="RefineNet's device (default cpu)")
    parser.add_argument("--runtime", default="auto", choices=["auto", "openvino", "torch"])
    parser.add_argument("--precision", default="auto", choices=["auto", "f32", "bf16"])
    parser.add_argument("--memory-size", type=common.parse_size, default=(4096, 3072),
                        metavar="WxH", help="level-0 size of the 1× memory slide at 0.5 µm/px "
                        "(default 4096x3072: the demo slide)")
    parser.add_argument("--memory-factor", type=int, default=4,
                        help="area of the larger memory slide over the 1× (default 4)")
    parser.add_argument("--skip-latency", action="store_true",
                        help="only the window and memory measurements")
    parser.add_argument("--skip-memory", action="store_true")
    common.add_common_args(parser)
    args = parser.parse_args(argv)

    import importlib

    import numpy as np

    from wsiseg.config import load_workflow
    from wsiseg.refine import randomwalk_refiner, refine_round, refinenet_refiner
    from wsiseg.rounds import undo
    from wsiseg.runtime import load_network

    counts = [int(n) for n in args.windows.split(",")]
    edge = math.sqrt(args.area_factor)
    sizes = [("1×", args.size),
             (f"{args.area_factor}×", (round(args.size[0] * edge), round(args.size[1] * edge)))]
    wf = load_workflow()
    rows = []
    tables = []
    with common.scratch(args.work, "wsiseg-bench-refine-") as work:
        weights = work / "refinenet-random.safetensors"
        if not weights.exists():
            common.refinenet_weights(weights, wf)
        common.log("RefineNet window alone ...")
        win = runtime_phases.run("window", weights=str(weights), runtime=args.runtime,
                                 precision=args.precision, batch_size=wf.refinenet.batch_size)
        tables.append(window_table(win))
        if not args.skip_memory:
            tables.append(memory_table(args, work))
        refiners = {}
        for name in ([] if args.skip_latency else args.refiners.split(",")):
            if name == "refinenet":
                net = load_network(weights, role="refinenet", workflow=wf, device=args.device,
                                   runtime=args.runtime, precision=args.precision)
                refiners[name] = refinenet_refiner(net, wf.refinenet.batch_size)
                common.log(f"RefineNet: {net.runtime} {net.precision}")
            elif name == "randomwalk":
                refiners[name] = randomwalk_refiner(wf.refinenet.randomwalk_beta,
                                                    wf.refinenet.confident_margin)
            else:
                parser.error(f"--refiners: unknown refiner {name!r}")
        for label, size in (sizes if refiners else []):
            slide = common.generated_slide(args.cache, size, args.mpp, args.seed)
            store_path = work / f"{slide.slide_path.stem}.zarr"
            store = build_store(slide, store_path)
            slide_id = store_path.name.removesuffix(".zarr")
            centres = core_centres(store, np.random.default_rng(args.seed))
            if len(centres) < max(counts) + 1:
                raise SystemExit(f"{slide.slide_path.name}: only {len(centres)} window cores "
                                 f"on tissue; use a larger --size")
            srows, scols = store.frame.working_shape
            for name, refiner in refiners.items():
                # Warm-up round (1 window, not reported): first-call costs of the network.
                warm = write_scribbles(store, work / f"{slide_id}-{name}-warm.geojson",
                                       centres[-1:])
                refine_round(store, warm, work, slide_id, refiner, name)
                undo(store, work, slide_id)
                for n in counts:
                    path = write_scribbles(store, work / f"{slide_id}-{name}-{n}.geojson",
                                           centres[:n])
                    timer = common.StageTimer()
                    for module, func, stage in STAGES:
                        timer.wrap(importlib.import_module(module), func, stage)
                    try:
                        result = refine_round(store, path, work, slide_id, refiner, name)
                    finally:
                        timer.restore()
                    undo(store, work, slide_id)
                    st = {k: v["seconds"] for k, v in timer.as_dict().items()}
                    rows.append([
                        label, f"{scols}×{srows}", name, len(result.windows),
                        fmt(result.seconds, 2), fmt(result.refine_s, 2),
                        fmt(result.seconds - result.refine_s, 2),
                        *(fmt(st.get(s), 2) for _, _, s in STAGES),
                    ])
                    common.log(f"{label} {name} {n} windows: {result.seconds:.2f} s")
    headers = ["slide", "working px", "refiner", "windows", "round (s)", "refiner (s)",
               "rest (s)", *(s.strip() for _, _, s in STAGES)]
    if rows:
        tables.append(
            ("One brush stroke per window core; each round undone before the next. 'rest' is "
             "the round minus the refiner: reading and rasterising the scribbles, the undo "
             "record, blending, re-contouring and writing the round's GeoJSON.",
             markdown_table(headers, rows)))
    common.print_report("wsiseg refine: a RefineNet window, round latency by scribbled "
                        "windows and slide size, memory of a slide-wide scribble", tables)
    return 0


def window_table(win: common.ChildResult) -> tuple[str, str]:
    d = win.data
    if "single_ms" not in d:
        return ("RefineNet window: failed", f"```\n{d.get('error') or win.stderr_tail}\n```")
    return (
        f"One RefineNet window ({d['window_px']}², 6 channels), {d['runtime']} "
        f"{d['precision']}, best of 10 (goal ≤ 40 ms):",
        markdown_table(["input", "ms per window"],
                       [["1 window", fmt(d["single_ms"], 1)],
                        [f"batch of {d['batch_size']}", fmt(d["batch_ms_per_window"], 1)]]),
    )


def tissue_scribble(store, path: Path) -> Path:
    """A QuPath export with one Tumor annotation covering the store's whole tissue mask."""
    import numpy as np
    import shapely

    from wsiseg.qupath import Annotation, write_annotations

    tissue = store.tissue_mask
    rows, cols = store.frame.working_shape
    sy, sx = rows / tissue.shape[0], cols / tissue.shape[1]
    boxes = []
    for r in range(tissue.shape[0]):  # runs of tissue pixels, row by row
        line = np.concatenate([[0], tissue[r].astype(np.int8), [0]])
        starts, stops = np.nonzero(np.diff(line) == 1)[0], np.nonzero(np.diff(line) == -1)[0]
        boxes += [shapely.box(a * sx, r * sy, b * sx, (r + 1) * sy)
                  for a, b in zip(starts, stops, strict=True)]
    area = shapely.union_all(boxes)
    write_annotations(path, [Annotation(
        geometry=store.frame.transform_geometry(area, "working", "qupath"),
        class_name="Tumor")])
    return path


def memory_table(args, work: Path) -> tuple[str, str]:
    """Peak RSS of a refine round whose scribble covers the whole tissue, at 1× and k× area."""
    from wsiseg.config import load_workflow

    wf = load_workflow("demo")
    weights = work / "refinenet-demo-random.safetensors"
    if not weights.exists():
        common.refinenet_weights(weights, wf)
    from wsiseg.runtime import load_network

    # Converted here, once, so both measured processes load the same cached model.
    load_network(weights, device="cpu", runtime=args.runtime, precision=args.precision)
    edge = math.sqrt(args.memory_factor)
    w, h = args.memory_size
    rows, peaks = [], []
    for label, size in (("1×", (w, h)),
                        (f"{args.memory_factor}×", (round(w * edge), round(h * edge)))):
        slide = common.generated_slide(args.cache, size, 0.5, args.seed)
        store_path = work / f"memory-{label}-{slide.slide_path.stem}.zarr"
        store = build_store(slide, store_path, "demo")
        scribbles = tissue_scribble(store, work / f"memory-{label}.geojson")
        common.log(f"memory {label}: refine round over the whole tissue ...")
        r = runtime_phases.run("refine_memory", store=str(store_path), scribbles=str(scribbles),
                               weights=str(weights), runtime=args.runtime,
                               precision=args.precision)
        d = r.data
        if "peak_rss_mib" not in d or "windows" not in d:
            return ("memory: failed", f"```\n{d.get('error') or r.stderr_tail}\n```")
        peaks.append(d["peak_rss_mib"])
        srows, scols = d["working_shape"]
        rows.append([label, f"{scols}×{srows}", d["windows"], d["new_pixels"],
                     fmt(d["seconds"], 1), fmt(d["start_rss_mib"], 0),
                     fmt(d["peak_rss_mib"], 0),
                     fmt(d["peak_rss_mib"] - d["start_rss_mib"], 0)])
    rows.append(["ratio", "", "", "", "", "", fmt(peaks[1] / peaks[0], 2), ""])
    return (
        f"A scribble covering the whole tissue of a generated slide (demo workflow, "
        f"{wf.working_mpp:g} µm/px, RefineNet {wf.refinenet.window_px}², batch "
        f"{wf.refinenet.batch_size}), one refine round in a fresh process; RSS before the "
        f"round (network loaded) and its peak (goal: {args.memory_factor}× area ≤ 1.1× the "
        f"peak at 1×):",
        markdown_table(["area", "working px", "windows", "scribbled px", "round (s)",
                        "RSS before (MiB)", "peak RSS (MiB)", "peak − before (MiB)"], rows),
    )


if __name__ == "__main__":
    sys.exit(main())
