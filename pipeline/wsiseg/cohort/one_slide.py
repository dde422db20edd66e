"""One slide, start to finish: tile → GuideNet → contours → published files, as one row."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsiseg.cohort.ids import stored_source
from wsiseg.cohort.rows import RunOptions, SlideRow
from wsiseg.config import Workflow
from wsiseg.destination import Destination
from wsiseg.errors import WsisegError
from wsiseg.store import SlideStore, source_differs

if TYPE_CHECKING:
    import numpy as np

    from wsiseg.outputs import SlideMeasurements

log = logging.getLogger(__name__)


def worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "in process"


def _crash_for_tests() -> None:
    """TEST-ONLY hook: kill the worker process once, mid-slide.

    With ``WSISEG_TEST_CRASH_ONCE=<file>`` in a Dask worker's environment, the first slide
    task to get here (its tiling started, GuideNet not yet) creates ``<file>`` and exits the worker
    process with ``os._exit(1)``, as a kill or an out-of-memory would; later tasks see the
    file and go on. Never acts outside a Dask worker. Used by ``tests/test_cohort.py``.
    """
    marker = os.environ.get("WSISEG_TEST_CRASH_ONCE")
    if not marker or worker_address() == "in process":
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


def slide_outputs(out_dir: Path, slide_id: str, export_mask: bool = False) -> list[Path]:
    paths = [out_dir / f"{slide_id}.geojson", out_dir / f"{slide_id}.png"]
    if export_mask:
        paths.append(out_dir / f"{slide_id}.r0.mask.ome.tif")
    return paths


def run_one(
    slide: Path, slide_id: str, wf: Workflow, model, card, options: RunOptions,
    tile_workers: int | None = None,
) -> SlideRow:
    """Run one slide; never raises (a failure is a row with its reason).

    ``model``: GuideNet (:func:`wsiseg.runtime.load_network`), or a future of it, waited for
    only once the slide's tiling has started. ``tile_workers``: threads reading the slide
    (default: the workflow's, else all cores).
    """
    t0 = time.perf_counter()
    try:
        dest = Destination.parse(options.out_dir)
        if dest.remote:
            row = _run_one_staged(dest, slide, slide_id, wf, model, card, options, tile_workers)
        else:
            row = _run_one(slide, slide_id, wf, model, card, options, tile_workers)
    except WsisegError as exc:
        row = SlideRow(str(slide), slide_id, "failed", reason=str(exc))
    except Exception as exc:  # a bug or an unforeseen file problem: still one row
        row = SlideRow(str(slide), slide_id, "failed",
                       reason=f"{slide}: {type(exc).__name__}: {exc}".splitlines()[0],
                       extra={"traceback": traceback.format_exc()})  # shown with -v
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


def _run_one_staged(
    dest: Destination, slide: Path, slide_id: str, wf: Workflow, model, card,
    options: RunOptions, tile_workers: int | None,
) -> SlideRow:
    """Run the slide into a local staging directory, then upload it (see
    :mod:`wsiseg.destination`). The staging directory is removed either way."""
    staging = Path(tempfile.mkdtemp(prefix=f"wsiseg-{slide_id}-"))
    try:
        row = _run_one(slide, slide_id, wf, model, card, replace(options, out_dir=staging),
                       tile_workers)
        try:
            dest.upload_slide(staging, slide_id)
        except Exception as exc:  # noqa: BLE001 - every fsspec backend raises its own types
            raise WsisegError(f"{slide}: cannot upload its outputs to {dest.url} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        return row
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run_one(
    slide: Path, slide_id: str, wf: Workflow, model, card, options: RunOptions,
    tile_workers: int | None = None,
) -> SlideRow:
    from wsiseg.infer import infer_to_store
    from wsiseg.nets import normalise_rgb, weights_hash
    from wsiseg.outputs import round_tracer, thumbnail_image
    from wsiseg.store import retire_store, source_changed
    from wsiseg.tiling import BackgroundTiling

    out_dir = options.out_dir
    store_path = out_dir / f"{slide_id}.zarr"
    if not slide.is_file():
        from wsiseg.slide.reader import open_slide

        open_slide(slide)  # raises the one-line reason (missing, directory, ...)
    if store_path.exists() and not options.force:
        done = done_row(Destination.parse(out_dir), slide, slide_id, options.export_mask)
        if done is not None:
            return done
    if options.force and store_path.exists():
        retire_store(store_path)
    # Tiling runs beside inference: GuideNet reads each row of chunks as soon as it is written,
    # and each row of the probability map is contoured as soon as GuideNet has written it.
    contours = None
    thumb: Future[np.ndarray] | None = None
    # The pool is entered first so that it is left last, after the tiling has stopped: a
    # thumbnail read waiting for tiles then ends (with the tiling's error) instead of
    # waiting for the whole slide to be tiled when inference or tracing failed.
    with (ThreadPoolExecutor(1, thread_name_prefix="wsiseg-thumbnail") as pool,
          BackgroundTiling(slide, store_path, wf, mpp=options.mpp,
                           workers=tile_workers) as tiling):
        store = tiling.store
        if source_changed(store, slide):  # pragma: no cover - prepare_store rebuilt it
            raise WsisegError(f"{slide}: changed while running")
        _crash_for_tests()
        stats = None
        if store.stage("guide") != "done":
            if isinstance(model, Future):  # loaded beside the tissue mask and first tiles
                model = model.result()
            store.set_stage("export", "pending")
            with round_tracer(store) as tracer:
                stats = infer_to_store(
                    tiling.image, [store["guide"], store["refined"]],
                    model=model, normalise=lambda t: normalise_rgb(t, card),
                    tissue=store.tissue_mask, patch_px=wf.guidenet.patch_px,
                    stride_px=wf.guidenet.stride_px, batch_size=wf.guidenet.batch_size,
                    device=model.device, band_px=store.chunk_px, tta=options.tta,
                    clip_to_tissue=True, on_rows=tracer.rows_final,
                )
                # The network is done: the thumbnail is decoded on the core the last
                # contours leave idle (its reads wait for any tiling still running).
                thumb = pool.submit(thumbnail_image, store, image=tiling.image)
                contours = tracer.result()
        tiling.finish()  # every chunk written (or the tiling's error) before guide is done
    if stats is not None:
        store.update_attrs(models={"guidenet": {
            "card": card.to_dict(),
            "sha256": model.weights_sha256 or weights_hash(Path(options.guidenet)),
            "path": str(Path(options.guidenet).resolve()),
        }}, inference={"patches": stats.patches, "forward_s": round(stats.forward_s, 3),
                       "total_s": round(stats.total_s, 3), "tta": options.tta,
                       **model.describe()})
        store.set_stage("guide", "done")
    m = publish_run(store, out_dir, slide_id, export_mask=options.export_mask,
                    contours=contours, thumb=thumb)
    used = store.attrs.get("inference") or {}
    return SlideRow(str(slide), slide_id, "done", tissue_mm2=m.tissue_mm2,
                    tumor_mm2=m.tumor_mm2, tumor_fraction=m.tumor_fraction,
                    runtime=used.get("runtime", ""), precision=used.get("precision", ""),
                    extra={"foci": m.foci})


def publish_run(store: SlideStore, out_dir: Path, slide_id: str, export_mask: bool = False,
                contours: tuple[list, Any] | None = None,
                thumb: Future[np.ndarray] | None = None) -> SlideMeasurements:
    """Round 0 of a store whose ``guide``/``refined`` are complete: GeoJSON, thumbnail,
    measurements; the slide counts as done only after this. ``contours``: the polygons and
    mean probabilities of ``refined`` when already traced (beside inference), else traced
    here; ``thumb``: the thumbnail's pixels (:func:`~wsiseg.outputs.thumbnail_image`) when
    already being read."""
    from wsiseg.outputs import measurements, thumbnail_image, write_thumbnail
    from wsiseg.rounds import write_round_geojson

    png = out_dir / f"{slide_id}.png"
    # The network is done: the thumbnail is decoded on a spare core while the contours are
    # traced (or, traced already, drawn and written there with the measurements while the
    # GeoJSON is written).
    with ThreadPoolExecutor(1, thread_name_prefix="wsiseg-thumbnail") as pool:
        if contours is not None:
            polygons, means = contours

            def draw_and_measure() -> SlideMeasurements:
                write_thumbnail(store, png, polygons,
                                thumb=thumb.result() if thumb is not None else None)
                return measurements(store, polygons, 0)

            drawn = pool.submit(draw_and_measure)
            write_round_geojson(store, out_dir, slide_id, 0, polygons, means=means)
            m = drawn.result()
        else:
            if thumb is None:
                thumb = pool.submit(thumbnail_image, store)
            _, polygons = write_round_geojson(store, out_dir, slide_id, 0)
            write_thumbnail(store, png, polygons, thumb=thumb.result())
            m = measurements(store, polygons, 0)
    if not store.attrs.get("rounds"):
        store.update_attrs(rounds=[{
            "round": 0, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": "run",
            "tumor_mm2": m.tumor_mm2, "windows": 0, "scribbles": {},
            "measurements": asdict(m),
        }])
    store.update_attrs(measurements=asdict(m))
    if export_mask:
        from wsiseg.export import export_store

        export_store(store.path, round_k=0, what={"mask"}, out_dir=out_dir, force=True)
    store.set_stage("export", "done")  # last: only now does the slide count as done
    return m


def done_row(
    dest: Destination, slide: Path, slide_id: str, export_mask: bool
) -> SlideRow | None:
    """The ``skipped`` row of a slide whose store (local or remote) is done and whose
    outputs all exist; None when it has to run."""
    attrs = dest.store_attrs(slide_id)
    source = stored_source(attrs)
    if source is None or attrs is None or attrs.get("stages", {}).get("export") != "done":
        return None
    if source_differs(source, slide):
        return None
    if not all(dest.exists(p.name) for p in slide_outputs(Path(), slide_id, export_mask)):
        return None
    m = attrs.get("measurements", {})
    used = attrs.get("inference") or {}
    return SlideRow(str(slide), slide_id, "skipped", reason="already done",
                    tissue_mm2=m.get("tissue_mm2"), tumor_mm2=m.get("tumor_mm2"),
                    tumor_fraction=m.get("tumor_fraction"), runtime=used.get("runtime", ""),
                    precision=used.get("precision", ""), extra={"foci": m.get("foci")})
