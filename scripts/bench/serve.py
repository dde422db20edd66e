"""Benchmark ``wsiseg serve``: simulated correction strokes posted over HTTP, and tiles/s.

For each workflow (``--workflows``, default ``demo`` and ``default``) a generated slide
(:mod:`wsiseg.synth`, ``--size`` at ``--mpp``) is tiled into a store whose ``guide`` is the
slide's ground truth blurred (σ = 8 working px) and squeezed into [0.3, 0.7] plus noise (as
``refine.py`` does: a GuideNet pass would cost minutes and change nothing here). A server —
the app ``wsiseg serve`` runs (:func:`wsiseg.serve.main.build_app`), on uvicorn, on a
loopback port, in this process — is started once per refiner (RefineNet, trained on another
generated slide of the same size the first time and cached, or with random weights from
``wsiseg models init`` with ``--refinenet random``; and the random walker), the slide opened
as a client opens it
(GET its contours: the server traces it once in the background to warm its trace memo, and
the strokes wait for that; the table's last column), and warmed by one stroke.

Then ``--strokes`` correction strokes are posted one after another over HTTP, each drawn by
the interactive evaluation's simulator (:func:`wsiseg.evaluate.interactive.
correction_on_largest_error`) on the largest error of the current ``refined`` in a random
refine window on tissue (at most 0.05 % of the window, DeepScribble's budget), turned into a
QuPath-style brush polygon (Tumor / Stroma). Each request's time from send to answer is
split into the round's stages, timed where ``refine_round`` calls them (this process wraps
them, as ``refine.py`` does): parse (``load_scribbles``), rasterise (``rasterize_new``),
network (the refiner), stitch (``blend_windows``), trace (``recontour``), write (undo record,
GeoJSON, measurements, attributes), and rest (the rest of send → answer: HTTP, queue,
opening the store, reading the previous contours, the answer). Finally ``--tiles`` random Deep Zoom
tiles of the image and the heat map are fetched twice (cold: read from the store; warm: the
tile cache) for tiles/s.

    .venv/bin/python scripts/bench/serve.py --size 4096x4096 --mpp 1.0 --area-factor 16

``--area-factor 16`` adds a slide of 16× the area (first workflow only): a stroke should cost
about the same there (the round's work follows the scribbled windows, not the slide). Run
one after the other, the two slides' p50s see different minutes of a shared machine (±20 %
between runs); ``--interleave`` serves both slides at once, each from its own server as
``wsiseg serve`` runs it, and posts their strokes in turns, so that their ratio does not
follow the load:

    .venv/bin/python scripts/bench/serve.py --size 4096x4096 --mpp 1.0 --area-factor 16 \
        --interleave --workflows default --refiners refinenet --answer changed

A generated slide of 16× the area has other tumors than the first one (on the default bench
slides: 22.8 % of the tissue against 5.6 %, one tumor of 60 000 vertices and 9 343 holes),
and a stroke on a larger tumor costs more wherever it lies. ``--mosaic`` makes the larger
slide of the first one repeated (4 × 4 copies for 16×): the same tumors on 16× the area and
with 16× the features, the control for the slide's size alone. Its strokes are the first
slide's, drawn there and replayed in one copy (:func:`replayed_rounds`): strokes drawn on
each slide on its own would land on other tumors in other states (on the mosaic mostly on
copies no stroke had touched yet, where more of them replace features), and the p50s would
compare different work. The report then also gives the strokes' ratios one by one.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import StageTimer, fmt, markdown_table  # noqa: E402


def stage_owners() -> list[tuple[object, str, str]]:
    """(owner, function, stage): wrapped where ``refine_round`` looks them up."""
    import wsiseg.refine.round
    import wsiseg.rounds
    import wsiseg.store

    return [
        (wsiseg.refine.round, "load_scribbles", "parse"),
        (wsiseg.refine.round, "rasterize_new", "rasterise"),
        (wsiseg.refine.round, "blend_windows", "stitch"),
        (wsiseg.rounds, "recontour", "trace"),
        (wsiseg.rounds, "save_backup", "write"),
        (wsiseg.rounds, "write_round_geojson", "write"),
        (wsiseg.refine.round, "measurements", "write"),
        (wsiseg.store.SlideStore, "update_attrs", "write"),
    ]


COLUMNS = ("parse", "rasterise", "network", "stitch", "trace", "write", "rest")


def build_store(slide, store_path: Path, workflow, name: str, mosaic: int = 1):
    """Tile the slide (``mosaic`` > 1: the slide repeated ``mosaic`` × ``mosaic`` times,
    :func:`common.mosaic_slide`) and publish round 0 with a guide made from its ground
    truth."""
    from scipy import ndimage

    from wsiseg.cohort import publish_run
    from wsiseg.synth import read_truth_mask
    from wsiseg.tiling import tile_slide

    t0 = time.perf_counter()
    source = (slide.slide_path if mosaic == 1
              else common.mosaic_slide(slide.slide_path.parent, slide, mosaic))
    store = tile_slide(source, store_path, workflow).store
    rows, cols = store.frame.working_shape
    # a mosaic's truth and guide are the first slide's repeated: each copy starts as that
    # slide does, so a stroke replayed in one copy meets the very same pixels
    truth = read_truth_mask(slide.truth_mask_path, (rows // mosaic, cols // mosaic))
    rng = np.random.default_rng(0)
    p = ndimage.gaussian_filter(truth.astype(np.float32), sigma=8.0)
    noise = rng.normal(0.0, 0.05, p.shape).astype(np.float32)
    guide = np.clip(np.rint(255 * (0.3 + 0.4 * p + noise)), 0, 255).astype(np.uint8)
    truth, guide = np.tile(truth, (mosaic, mosaic)), np.tile(guide, (mosaic, mosaic))
    store["guide"][...] = guide
    store["refined"][...] = guide
    store.set_stage("guide", "done")
    publish_run(store, store_path.parent, store_path.name.removesuffix(".zarr"))
    common.log(f"built {store_path.name} ({cols}×{rows} working px, {name}) in "
               f"{time.perf_counter() - t0:.1f} s")
    return store, truth


def stroke_export(store, truth: np.ndarray, rng: np.random.Generator) -> bytes | None:
    """One simulated correction stroke as a QuPath FeatureCollection (None: no error)."""
    import json

    import shapely

    from wsiseg.evaluate.interactive import correction_on_largest_error

    wf = store.workflow
    window = wf.refinenet.window_px
    rows, cols = truth.shape
    tissue = store.tissue_mask
    for _ in range(50):
        r0 = int(rng.integers(0, max(1, rows - window)))
        c0 = int(rng.integers(0, max(1, cols - window)))
        tr = tissue[int(r0 * tissue.shape[0] / rows), int(c0 * tissue.shape[1] / cols)]
        if not tr:
            continue
        t = truth[r0 : r0 + window, c0 : c0 + window]
        pred = np.asarray(store["refined"][r0 : r0 + window, c0 : c0 + window]) >= 128
        scribble = correction_on_largest_error(
            t, pred, rng=rng, max_pixels=max(8, int(0.0005 * window * window)), radius_px=2)
        if not scribble.any():
            continue
        rr, cc = np.nonzero(scribble)
        brush = shapely.union_all(shapely.box(cc + c0, rr + r0, cc + c0 + 1, rr + r0 + 1))
        brush = shapely.simplify(brush, 0.5)
        geom = store.frame.transform_geometry(brush, "working", "qupath")
        geom = shapely.set_precision(geom, 0.01)
        name = "Tumor" if scribble[rr[0], cc[0]] > 0 else "Stroma"
        feature = {"type": "Feature", "id": f"stroke-{rng.integers(1 << 62)}",
                   "geometry": json.loads(shapely.to_geojson(geom)),
                   "properties": {"objectType": "annotation",
                                  "classification": {"name": name, "color": [200, 0, 0]}}}
        return json.dumps({"type": "FeatureCollection", "features": [feature]}).encode()
    return None


@contextlib.contextmanager
def running(app):
    import uvicorn

    # IPPROTO_TCP given: asyncio sets TCP_NODELAY only on sockets that say so (else Nagle and
    # delayed ACKs add ~40 ms to every keep-alive request); uvicorn's own binding does.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


@contextlib.contextmanager
def stage_timer():
    """A :class:`StageTimer` around the round's stages (:func:`stage_owners`)."""
    timer = StageTimer()
    for owner, name, label in stage_owners():
        timer.wrap(owner, name, label)
    try:
        yield timer
    finally:
        timer.restore()


def post_stroke(http, url: str, slide_id: str, body: bytes, contours: str,
                timer: StageTimer) -> dict | None:
    """Post one stroke; its row (seconds per stage, total, windows, whether features were
    replaced), or None when the server refused it (422, e.g. a stroke mostly off tissue)."""
    before = dict(timer.seconds)
    t0 = time.perf_counter()
    r = http.post(f"{url}/slides/{slide_id}/scribbles?contours={contours}",
                  content=body, headers={"Content-Type": "application/geo+json"})
    total = time.perf_counter() - t0
    if r.status_code == 422:
        common.log(f"refused: {r.json()['detail']}")
        return None
    r.raise_for_status()
    answer = r.json()
    row = {k: timer.seconds.get(k, 0.0) - before.get(k, 0.0)
           for k in ("parse", "rasterise", "stitch", "trace", "write")}
    row["network"] = answer["timings"]["network_s"]
    row["rest"] = total - sum(row.values())
    row["total"] = total
    row["windows"] = answer["windows"]
    changed = answer.get("changed") or {}
    row["replaced"] = bool(changed.get("added") or changed.get("removed"))
    return row


def posted_strokes(targets: list[tuple[str, Callable[[bytes], bytes]]], slide_id: str, store,
                   truth, n: int, seed: int, contours: str,
                   timer: StageTimer) -> Iterator[list[dict]]:
    """Strokes drawn on ``store`` and posted to each target (url, how a stroke is moved
    there), the first target first on even strokes and last on odd ones; yields each
    stroke's rows, one per target (the first stroke warms the servers up: the callers drop
    it). A stroke refused is drawn again; one that some target took and another refused
    (each slide's tissue mask is its own: a stroke at the tissue's edge) is undone where
    it was taken."""
    import httpx

    rng = np.random.default_rng(seed)
    answered = refused = 0
    with httpx.Client(timeout=600) as http:
        while answered < n + 1 and refused < n:
            body = stroke_export(store, truth, rng)
            if body is None:
                return
            rows: dict[int, dict] = {}
            for i in range(len(targets))[:: -1 if answered % 2 else 1]:
                url, move = targets[i]
                row = post_stroke(http, url, slide_id, move(body), contours, timer)
                if row is None:
                    break
                rows[i] = row
            if len(rows) < len(targets):
                for i in rows:
                    http.post(f"{targets[i][0]}/slides/{slide_id}/undo",
                              json={}).raise_for_status()
                refused += 1
                continue
            answered += 1
            yield [rows[i] for i in range(len(targets))]


def stroke_rounds(url: str, slide_id: str, store, truth, n: int, seed: int, contours: str,
                  timer: StageTimer) -> Iterator[dict]:
    """Post strokes drawn on ``store`` one after another (:func:`posted_strokes`); yield
    each answered stroke's row."""
    for (row,) in posted_strokes([(url, bytes)], slide_id, store, truth, n, seed, contours,
                                 timer):
        yield row


#: The copy of a mosaic (row, column) that replays the first slide's strokes: one with
#: copies on every side.
MOSAIC_COPY = (1, 2)


def in_copy(body: bytes, mosaic_store, side: int, copy: tuple[int, int] = MOSAIC_COPY) -> bytes:
    """A stroke drawn on a slide, moved into copy ``copy`` of that slide's ``side`` × ``side``
    mosaic (QuPath's frame: level-0 px, whole copies, so the move is exact).

    The copy's windows and chunks are the slide's when a copy is a whole number of both
    (2048 working px here: windows every 256, chunks of 512). A window the slide clamps at
    its edge is not clamped in an inner copy and reaches into the neighbour: on the bench
    slide no tumor lies within those bands. The copy's pixels are the slide's JPEG tiles
    encoded again (the mosaic file), within a few levels."""
    import json

    width, height = mosaic_store.frame.level0_size
    dx, dy = copy[1] * (width // side), copy[0] * (height // side)

    def moved(coords: list) -> list:
        if coords and isinstance(coords[0], (int, float)):
            return [coords[0] + dx, coords[1] + dy]
        return [moved(c) for c in coords]

    collection = json.loads(body)
    for feature in collection["features"]:
        feature["geometry"]["coordinates"] = moved(feature["geometry"]["coordinates"])
    return json.dumps(collection).encode()


def replayed_rounds(servers: list[tuple[str, Any, np.ndarray]], n: int, seed: int,
                    contours: str, timer: StageTimer, side: int) -> Iterator[list[dict]]:
    """Strokes drawn on the first slide and posted to it and, moved into one copy
    (:func:`in_copy`), to its mosaic (:func:`posted_strokes`): both rows of each stroke. The
    copy then goes through the first slide's states stroke by stroke: the same windows,
    tumors and features, on ``side²`` times the area."""
    (url, store, truth), (mosaic_url, mosaic_store, _) = servers
    return posted_strokes([(url, bytes), (mosaic_url, lambda body: in_copy(body, mosaic_store,
                                                                           side))],
                          "slide", store, truth, n, seed, contours, timer)


def strokes_over_http(url: str, slide_id: str, store, truth, n: int, seed: int,
                      contours: str = "all") -> list[dict]:
    with stage_timer() as timer:
        return list(stroke_rounds(url, slide_id, store, truth, n, seed, contours, timer))[1:]


def strokes_interleaved(servers: list[tuple[str, Any, np.ndarray]], n: int, seed: int,
                        contours: str, mosaic_side: int = 0) -> list[list[dict]]:
    """``n`` strokes to each (url, store, truth) server, taking turns stroke by stroke, so
    that a change in the machine's load falls on every slide alike. ``mosaic_side``: the
    second slide is the first one's mosaic of that side, and gets the first one's strokes
    (:func:`replayed_rounds`)."""
    with stage_timer() as timer:
        if mosaic_side:
            pairs = list(replayed_rounds(servers, n, seed, contours, timer, mosaic_side))[1:]
            return [[a for a, _ in pairs], [b for _, b in pairs]]
        turns = [stroke_rounds(url, "slide", store, truth, n, seed, contours, timer)
                 for url, store, truth in servers]
        rows: list[list[dict]] = [[] for _ in servers]
        live = set(range(len(servers)))
        while live:
            for i, turn in enumerate(turns):
                if i in live:
                    row = next(turn, None)
                    if row is None:
                        live.discard(i)
                    else:
                        rows[i].append(row)
    return [r[1:] for r in rows]


def open_slide(url: str, slide_id: str, app) -> float:
    """What a client does first (GET the contours), then the seconds until the server's
    background warm-up of the slide's trace memo has finished. The strokes wait for it, as
    they do in the viewer or QuPath's live mode while the pathologist looks at the slide; a
    one-shot QuPath run posts its first round at once, beside the warm-up (not measured)."""
    import httpx

    t0 = time.perf_counter()
    httpx.get(f"{url}/slides/{slide_id}/contours", timeout=600).raise_for_status()
    app.app.state.wsiseg.warmer.wait(slide_id)  # app: the guard around the FastAPI app
    return time.perf_counter() - t0


def tiles_per_second(url: str, slide_id: str, store, n: int, seed: int) -> dict[str, float]:
    import httpx

    from wsiseg.serve.tiles import Pyramid

    rows, cols = store.frame.working_shape
    pyramid = Pyramid(cols, rows)
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(n):
        level = int(rng.integers(max(0, pyramid.top - 3), pyramid.top + 1))
        w, h = pyramid.level_size(level)
        picks.append((level, int(rng.integers(0, math.ceil(w / 256))),
                      int(rng.integers(0, math.ceil(h / 256)))))
    out = {}
    with httpx.Client(timeout=600) as http:
        for layer, ext in (("image", "jpeg"), ("heatmap", "png")):
            for label in ("cold", "warm"):
                t0 = time.perf_counter()
                for level, col, row in picks:
                    http.get(f"{url}/slides/{slide_id}/{layer}_files/{level}/{col}_{row}.{ext}"
                             ).raise_for_status()
                out[f"{layer} {label}"] = n / (time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--size", type=common.parse_size, default=(4096, 4096))
    parser.add_argument("--mpp", type=float, default=1.0)
    parser.add_argument("--workflows", default="demo,default")
    parser.add_argument("--refiners", default="refinenet,randomwalk")
    parser.add_argument("--strokes", type=int, default=50)
    parser.add_argument("--tiles", type=int, default=200)
    parser.add_argument("--refinenet", choices=("trained", "random"), default="trained",
                        help="RefineNet's weights: trained on another generated slide (a few "
                             "minutes the first time, then cached) or random (every window "
                             "below the threshold)")
    parser.add_argument("--answer", choices=("all", "changed"), default="all",
                        help="the answer's contours: the slide's whole (the default answer) "
                             "or only the features a round added (?contours=changed)")
    parser.add_argument("--area-factor", type=int, default=1,
                        help="also a slide of this many times the area (a square: 4, 16), "
                             "with the first workflow")
    parser.add_argument("--interleave", action="store_true",
                        help="with --area-factor: serve both slides at once and post their "
                             "strokes in turns (one here, one there), so that the ratio of "
                             "their p50s is taken over the same minutes of the machine")
    parser.add_argument("--mosaic", action="store_true",
                        help="with --area-factor: the larger slide is the first one repeated "
                             "(4 × 4 copies for 16), the same tumors on 16× the area, instead "
                             "of a generated slide of that size (other, larger tumors); the "
                             "first slide's strokes are replayed in one copy (implies "
                             "--interleave)")
    args = parser.parse_args(argv)
    if args.mosaic and args.area_factor <= 1:
        parser.error("--mosaic needs --area-factor 4 or more")
    args.interleave = args.interleave or args.mosaic  # the mosaic replays the first's strokes
    if args.interleave and args.area_factor <= 1:
        parser.error("--interleave needs --area-factor 4 or more")

    w, h = args.size
    side = math.isqrt(args.area_factor)
    sizes = [(w, h)] + ([(w * side, h * side)] if args.area_factor > 1 else [])
    rows_out, tile_rows, notes = [], [], []
    with common.scratch(args.work, "wsiseg-bench-serve-") as work:
        for size in sizes if not args.interleave else []:
            big = size != sizes[0]
            for wf_name in args.workflows.split(",")[: 1 if big else None]:
                run, store, truth, mpx = bench_slide(args, work, size, wf_name)
                for refiner in args.refiners.split(","):
                    weights = (refinenet_weights(args, work, store.workflow)
                               if refiner == "refinenet" else None)
                    with serving([run], refiner, weights, work) as [(url, warm_s)]:
                        common.log(f"{wf_name} {mpx:.0f} working Mpx / {refiner}: opened, "
                                   f"traces warmed in {warm_s:.1f} s; {args.strokes} strokes")
                        rows = strokes_over_http(url, "slide", store, truth, args.strokes,
                                                 args.seed, args.answer)
                        if refiner == args.refiners.split(",")[0] and not big:
                            tiles = tiles_per_second(url, "slide", store, args.tiles,
                                                     args.seed)
                            tile_rows.append([wf_name, *(fmt(tiles[k], 0) for k in (
                                "image cold", "image warm", "heatmap cold", "heatmap warm"))])
                    rows_out.append(table_row(wf_name, mpx, refiner, rows, warm_s))
        if args.interleave:
            rows_out, notes = interleaved(args, work, sizes)
    common.print_report("wsiseg serve: strokes over HTTP", [
        ("Seconds from sending a stroke to its answer; stage columns are medians"
         + (", the slides' strokes posted in turns." if args.interleave else "."),
         markdown_table(["workflow", "working Mpx", "refiner", "strokes", "p50 s", "p95 s",
                         *(f"{k} p50" for k in COLUMNS), "windows p50", "warm-up s"],
                        rows_out)),
        ("Deep Zoom tiles per second (one client, sequential; cold: read from the store, "
         "warm: the tile cache).",
         markdown_table(["workflow", "image cold", "image warm", "heat map cold",
                         "heat map warm"], tile_rows)),
    ][: 1 if args.interleave else None], notes)
    return 0


def table_row(wf_name: str, mpx: float, refiner: str, rows: list[dict],
              warm_s: float) -> list[str]:
    """The report's row of one slide's strokes (and the slowest three, logged)."""
    totals = np.array([r["total"] for r in rows])
    common.log("  strokes, sorted: " + " ".join(f"{t:.3f}" for t in sorted(totals)))
    for r in sorted(rows, key=lambda r: -r["total"])[:3]:  # what the p95 is
        common.log("  slow stroke: " + ", ".join(f"{k} {r[k]:.3f}" for k in ("total", *COLUMNS)))
    p50 = {k: np.median([r[k] for r in rows]) for k in COLUMNS}
    return [wf_name, fmt(mpx, 1), refiner, str(len(rows)), fmt(np.percentile(totals, 50), 3),
            fmt(np.percentile(totals, 95), 3), *(fmt(p50[k], 3) for k in COLUMNS),
            fmt(np.median([r["windows"] for r in rows]), 0), fmt(warm_s, 1)]


def bench_slide(args: argparse.Namespace, work: Path, size: tuple[int, int],
                wf_name: str) -> tuple[Path, Any, np.ndarray, float]:
    """The generated slide of ``size`` as a served run folder: (folder, store, truth mask,
    working Mpx)."""
    from wsiseg.config import load_workflow

    mosaic = size[0] // args.size[0] if args.mosaic else 1
    slide = common.generated_slide(args.cache, args.size if mosaic > 1 else size, args.mpp,
                                   args.seed)
    run = work / f"{wf_name}-{size[0]}x{size[1]}"
    run.mkdir(parents=True, exist_ok=True)
    store, truth = build_store(slide, run / "slide.zarr", load_workflow(wf_name), wf_name,
                               mosaic)
    rows, cols = store.frame.working_shape
    return run, store, truth, rows * cols / 1e6


def refinenet_weights(args: argparse.Namespace, work: Path, wf) -> Path:
    """RefineNet weights for the workflow ``wf``: trained on another generated slide of the
    bench's size (:func:`common.trained_refinenet`, cached), or random
    (``--refinenet random``: :func:`common.refinenet_weights`, made once)."""
    if args.refinenet == "trained":
        return common.trained_refinenet(args.cache, args.size, args.mpp, wf, args.seed)
    weights = work / f"refinenet-{wf.name}.safetensors"
    if not weights.exists():
        common.refinenet_weights(weights, wf)
    return weights


@contextlib.contextmanager
def serving(runs: list[Path], refiner: str, weights: Path | None,
            work: Path) -> Iterator[list[tuple[str, float]]]:
    """A server for each run folder, built and started as ``wsiseg serve`` does (its
    start-up objects frozen), the trace memo cleared (each starts cold, as a new server
    does) and its slide opened: yields (url, warm-up seconds) per run."""
    from wsiseg.contours.cache import TRACES
    from wsiseg.serve.main import ServeOptions, build_app, freeze_startup_objects

    apps = []
    for i, run in enumerate(runs):
        options = ServeOptions(paths=[run], refiner=refiner,
                               refinenet=str(weights) if refiner == "refinenet" else None)
        scratch = work / f"scratch-{i}"
        scratch.mkdir(exist_ok=True)
        apps.append(build_app(options, scratch)[0])
    freeze_startup_objects()  # as `wsiseg serve` does before it listens
    try:
        with contextlib.ExitStack() as stack:
            urls = [stack.enter_context(running(app)) for app in apps]
            TRACES.clear()
            yield [(url, open_slide(url, "slide", app))
                   for url, app in zip(urls, apps, strict=True)]
    finally:
        gc.unfreeze()  # the next row's servers freeze their own start-up


def interleaved(args: argparse.Namespace, work: Path,
                sizes: list[tuple[int, int]]) -> tuple[list[list[str]], list[str]]:
    """The first workflow's slides at every size served at once, their strokes in turns:
    the report's rows and, per refiner, the ratio of the largest slide's p50 (and p95) to
    the first's."""
    wf_name = args.workflows.split(",")[0]
    slides = [bench_slide(args, work, size, wf_name) for size in sizes]
    weights = (refinenet_weights(args, work, slides[0][1].workflow)
               if "refinenet" in args.refiners.split(",") else None)
    rows_out, notes = [], []
    for refiner in args.refiners.split(","):
        with serving([run for run, *_ in slides], refiner, weights, work) as opened:
            common.log(f"{wf_name} / {refiner}: {len(slides)} slides opened; "
                       f"{args.strokes} strokes each, in turns")
            per_slide = strokes_interleaved(
                [(url, store, truth) for (url, _), (_, store, truth, _) in
                 zip(opened, slides, strict=True)], args.strokes, args.seed, args.answer,
                math.isqrt(args.area_factor) if args.mosaic else 0)
        for (*_, mpx), rows, (_, warm_s) in zip(slides, per_slide, opened, strict=True):
            rows_out.append(table_row(wf_name, mpx, refiner, rows, warm_s))
        first, last = (np.array([r["total"] for r in rows]) for rows in
                       (per_slide[0], per_slide[-1]))
        notes.append(
            f"{refiner}: {slides[-1][3]:.1f} against {slides[0][3]:.1f} working Mpx"
            f"{' (the first slide repeated)' if args.mosaic else ''}, strokes "
            f"in turns: p50 {np.percentile(last, 50) / np.percentile(first, 50):.2f}×, "
            f"p95 {np.percentile(last, 95) / np.percentile(first, 95):.2f}× (goal: p50 ≤ 1.2×)")
        if args.mosaic:
            notes.append(paired_note(refiner, per_slide[0], per_slide[-1]))
    return rows_out, notes


def paired_note(refiner: str, first: list[dict], mosaic: list[dict]) -> str:
    """The mosaic's strokes against the same strokes on the first slide, one by one: the
    median of their ratios, and the p50 ratio of each kind of stroke."""
    ratio = np.array([b["total"] / a["total"] for a, b in zip(first, mosaic, strict=True)])
    same = sum(a["replaced"] == b["replaced"] for a, b in zip(first, mosaic, strict=True))
    kinds = []
    for label, replaced in (("no contour changed", False), ("features replaced", True)):
        pairs = [(a["total"], b["total"]) for a, b in zip(first, mosaic, strict=True)
                 if a["replaced"] == replaced]
        if pairs:
            a, b = np.array(pairs).T
            kinds.append(f"{label} {len(pairs)}: p50 {np.median(b) / np.median(a):.2f}×")
    return (f"{refiner}, the same strokes on the mosaic's copy {MOSAIC_COPY}: median of the "
            f"per-stroke ratios {np.median(ratio):.2f}× (quartiles "
            f"{np.percentile(ratio, 25):.2f}–{np.percentile(ratio, 75):.2f}); {same} of "
            f"{len(ratio)} strokes replaced features on both slides or on neither; by the "
            f"first slide's kind: {'; '.join(kinds)}")


if __name__ == "__main__":
    raise SystemExit(main())
