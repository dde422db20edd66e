"""Slide → slide store: tissue mask, then one Dask task per tissue chunk of ``image``.

Each task reads its chunk's box from the pyramid level nearest above the working resolution,
resamples it with antialiasing (:mod:`wsiseg.slide.resample`), writes the chunk, then marks
it in the ``tiled`` array. Memory is bounded by chunk size × workers; a rerun skips marked
chunks, so a run killed at any point (even ``kill -9``) finishes identically when restarted.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.threaded
import numpy as np

from wsiseg.config import Workflow, mpp_problem
from wsiseg.errors import WsisegError
from wsiseg.slide.frame import Frame
from wsiseg.slide.reader import (
    SlideError,
    SlideInfo,
    SlideReader,
    cached_reader,
)
from wsiseg.slide.reader import clear_reader_cache as clear_reader_cache  # tests use it here
from wsiseg.slide.resample import read_box, read_thumbnail
from wsiseg.slide.tissue import tissue_mask
from wsiseg.store import (
    SlideStore,
    SourceInfo,
    StoreError,
    chunk_grid_shape,
    retire_store,
    source_changed,
)

log = logging.getLogger(__name__)


class NoTissueError(WsisegError):
    """The slide has no tissue the detector can find."""


@dataclass(frozen=True)
class TilingResult:
    store: SlideStore
    chunks_total: int  # tissue chunks of the slide
    chunks_written: int  # written by this call (the rest were already complete)


_UPSCALE_WARNED: set[tuple[str, float, float]] = set()  # said once per slide and process

# Dask's threaded scheduler passed as a function, not by name: a name makes every
# ``dask.compute`` import ``distributed`` to look for a client (≈ 1 s of CPU, holding the
# GIL, inside a run that has no cluster).
_THREADS = dask.threaded.get


def make_frame(info: SlideInfo, workflow: Workflow, mpp: float | None = None) -> Frame:
    """The slide's Frame; ``mpp`` overrides the file's (missing or wrong) metadata."""
    level0_mpp = mpp if mpp is not None else info.mpp
    if level0_mpp is None:
        raise SlideError(
            f"{info.path}: the slide does not say its microns per pixel; give it with --mpp"
        )
    if (problem := mpp_problem(level0_mpp)) is not None:
        where = "--mpp" if mpp is not None else "the file's mpp (give the right one with --mpp)"
        raise SlideError(f"{info.path}: {where}: {problem}")
    upscale = level0_mpp / workflow.working_mpp
    if upscale > 1.01 and (info.path, level0_mpp, workflow.working_mpp) not in _UPSCALE_WARNED:
        _UPSCALE_WARNED.add((info.path, level0_mpp, workflow.working_mpp))
        log.warning("%s: level 0 is %.3g µm/px, coarser than the workflow's %.3g µm/px: "
                    "upscaled %.1f×, so the networks see no more detail than the file has",
                    info.path, level0_mpp, workflow.working_mpp, upscale)
    return Frame(
        level0_size=info.level0_size,
        level0_mpp=float(level0_mpp),
        working_mpp=workflow.working_mpp,
        bounds_offset=info.bounds_offset,
    )


def detect_tissue(reader: SlideReader, frame: Frame, workflow: Workflow) -> np.ndarray:
    """Tissue mask of the whole slide at ``workflow.tissue.mask_mpp`` (bool (h, w))."""
    cfg = workflow.tissue
    downsample = cfg.mask_mpp / frame.level0_mpp
    w0, h0 = frame.level0_size
    shape = (max(1, round(h0 / downsample)), max(1, round(w0 / downsample)))
    thumb = read_thumbnail(reader, downsample, shape)
    return tissue_mask(
        thumb, mpp=cfg.mask_mpp, min_saturation=cfg.min_saturation,
        min_area_um2=cfg.min_area_um2,
    )


def tissue_chunks(tissue: np.ndarray, shape: tuple[int, int], chunk_px: int) -> np.ndarray:
    """Bool (chunk rows, chunk cols): chunks of the working grid that hold any tissue."""
    grid = chunk_grid_shape(shape, chunk_px)
    th, tw = tissue.shape
    sy, sx = th / shape[0], tw / shape[1]  # tissue px per working px
    out = np.zeros(grid, dtype=bool)
    for i in range(grid[0]):
        r0 = int(np.floor(i * chunk_px * sy))
        r1 = max(r0 + 1, int(np.ceil(min((i + 1) * chunk_px, shape[0]) * sy)))
        for j in range(grid[1]):
            c0 = int(np.floor(j * chunk_px * sx))
            c1 = max(c0 + 1, int(np.ceil(min((j + 1) * chunk_px, shape[1]) * sx)))
            out[i, j] = tissue[r0:r1, c0:c1].any()
    return out


def prepare_store(
    slide_path: Path, store_path: Path, workflow: Workflow, mpp: float | None = None
) -> SlideStore:
    """Open the store of ``slide_path`` if it still matches, else (re)create it.

    A store whose slide changed, or that was built with another working resolution or
    chunk size, is moved aside (``*.stale-<time>``), never deleted, and rebuilt.
    """
    reader = _reader(str(slide_path))
    frame = make_frame(reader.info, workflow, mpp)
    if store_path.exists():
        reason = None
        try:
            store = SlideStore.open(store_path)
            reason = source_changed(store, slide_path)
            if reason is None and (
                store.frame != frame or store.chunk_px != workflow.tiling.chunk_px
            ):
                reason = "built with another frame (mpp) or chunk size"
        except StoreError as exc:
            reason = str(exc)
        if reason is None:
            return store
        moved = retire_store(store_path)
        log.warning("%s: rebuilding the store (%s); old store kept as %s",
                    store_path, reason, moved.name)
    tissue = detect_tissue(reader, frame, workflow)
    if not tissue.any():
        raise NoTissueError(f"{slide_path}: no tissue found (the slide looks blank)")
    info = reader.info
    return SlideStore.create(
        store_path,
        frame=frame,
        source=SourceInfo.of(slide_path),
        workflow=workflow,
        tissue=tissue,
        slide_info={
            "backend": info.backend, "vendor": info.vendor, "mpp_in_file": info.mpp,
            "mpp_override": mpp, "objective_power": info.objective_power,
            "level_dimensions": [list(d) for d in info.level_dimensions],
        },
    )


def tiling_tasks(store: SlideStore, slide_path: Path) -> list:
    """One ``dask.delayed`` task per tissue chunk not yet complete."""
    return [_tile_task(store, slide_path, i, j) for i, j in chunks_to_tile(store)]


def chunks_to_tile(store: SlideStore) -> list[tuple[int, int]]:
    """(row, col) of the tissue chunks not yet complete, in raster order."""
    todo = tissue_chunks(store.tissue_mask, store.frame.working_shape, store.chunk_px)
    todo &= ~np.asarray(store["tiled"][...], dtype=bool)
    return [(int(i), int(j)) for i, j in zip(*np.nonzero(todo), strict=True)]


def _tile_task(store: SlideStore, slide_path: Path, i: int, j: int):
    return dask.delayed(tile_chunk, pure=False)(
        str(slide_path), str(store.path), store.frame.scale, i, j, store.chunk_px
    )


def tile_chunk(
    slide_path: str, store_path: str, downsample: float, i: int, j: int, chunk_px: int
) -> tuple[int, int]:
    """Read, resample and write chunk (i, j) of ``image``, then mark it complete."""
    import zarr

    group = zarr.open_group(store_path, mode="r+")
    image = group["image"]
    rows, cols = image.shape[1:]
    r0, c0 = i * chunk_px, j * chunk_px
    box = (r0, c0, min(chunk_px, rows - r0), min(chunk_px, cols - c0))
    pixels = read_box(_reader(slide_path), downsample, box)  # (h, w, 3), as decoded
    # Channel first as stored, transposed once here: zarr copies a strided view more slowly
    # (≈ 1.5 ms more per 512² chunk) than this copy costs (≈ 0.2 ms).
    image[:, r0 : r0 + box[2], c0 : c0 + box[3]] = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    group["tiled"][i, j] = 1  # only after the chunk itself is written
    return i, j


def tile_slide(
    slide_path: str | Path,
    store_path: str | Path,
    workflow: Workflow,
    *,
    mpp: float | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> TilingResult:
    """Build (or finish) the slide store of one slide with Dask's threaded scheduler."""
    slide_path, store_path = Path(slide_path), Path(store_path)
    store = prepare_store(slide_path, store_path, workflow, mpp)
    total = int(tissue_chunks(store.tissue_mask, store.frame.working_shape, store.chunk_px).sum())
    tasks = tiling_tasks(store, slide_path)
    if tasks:
        store.set_stage("tiling", "running")
        n = workers or workflow.tiling.workers or os.cpu_count() or 1
        if progress:
            from tqdm.dask import TqdmCallback

            with TqdmCallback(desc=f"tiling {slide_path.name}", leave=False):
                dask.compute(*tasks, scheduler=_THREADS, num_workers=n)
        else:
            dask.compute(*tasks, scheduler=_THREADS, num_workers=n)
        _check_unchanged(store, slide_path)
    if store.stage("tiling") != "done":
        store.set_stage("tiling", "done")
    return TilingResult(store=store, chunks_total=total, chunks_written=len(tasks))


def _check_unchanged(store: SlideStore, slide_path: Path) -> None:
    """Refuse a tiling during which the slide file was replaced: its chunks would mix two
    scans (readers reopen a changed file). The store is left unfinished, so the next run
    sees the change and rebuilds it."""
    try:
        why = source_changed(store, slide_path)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
    if why is not None:
        raise SlideError(f"{slide_path}: changed while it was being tiled ({why}); run again")


class BackgroundTiling:
    """Tile a slide on a background thread while its ``image`` is already being read.

    ``image`` slices like ``store["image"]`` (3, H, W), but a read waits until every tissue
    chunk it touches is written, so GuideNet can start on the top rows while the Dask tasks
    still tile the bottom ones (rows of chunks are tiled top to bottom, as inference reads
    them). Use as a context manager; :meth:`finish` waits for the tiling and raises its
    error, if any::

        with BackgroundTiling(slide, store_path, workflow) as tiling:
            infer_to_store(tiling.image, ...)
            tiling.finish()
    """

    def __init__(
        self,
        slide_path: str | Path,
        store_path: str | Path,
        workflow: Workflow,
        *,
        mpp: float | None = None,
        workers: int | None = None,
    ) -> None:
        self.slide_path = Path(slide_path)
        self.store = prepare_store(self.slide_path, Path(store_path), workflow, mpp)
        self._expected = tissue_chunks(
            self.store.tissue_mask, self.store.frame.working_shape, self.store.chunk_px
        )
        # Read once, before any task runs: afterwards completions are learnt from the tasks.
        self._complete = np.asarray(self.store["tiled"][...], dtype=bool)
        self._todo = chunks_to_tile(self.store)
        self._workers = workers or workflow.tiling.workers or os.cpu_count() or 1
        self._changed = threading.Condition()
        self._finished = False
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="wsiseg-tiling", daemon=True)
        self.image = _TiledImage(self)

    def __enter__(self) -> BackgroundTiling:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:  # inference failed or Ctrl-C: stop after the current row
            self._stop.set()
        self._thread.join()  # a row's Dask tasks cannot be cancelled; each is one chunk

    def finish(self) -> TilingResult:
        """Wait for the tiling; mark the store's tiling stage done or raise its error."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._todo:
            _check_unchanged(self.store, Path(self.slide_path))
        if self.store.stage("tiling") != "done":
            self.store.set_stage("tiling", "done")
        return TilingResult(self.store, int(self._expected.sum()), len(self._todo))

    def _run(self) -> None:
        from dask.callbacks import Callback

        def posttask(key, result, dsk, state, worker_id) -> None:
            if isinstance(result, tuple) and len(result) == 2:  # a tile_chunk's (i, j)
                with self._changed:
                    self._complete[result] = True
                    self._changed.notify_all()

        try:
            if self._todo:
                self.store.set_stage("tiling", "running")
            # One Dask computation per row of chunks, top to bottom: the order in which
            # inference reads (Dask's own order among independent tasks is not raster).
            for _, row in itertools.groupby(self._todo, key=lambda ij: ij[0]):  # raster order
                if self._stop.is_set():
                    return
                tasks = [_tile_task(self.store, self.slide_path, i, j) for i, j in row]
                with Callback(posttask=posttask):
                    dask.compute(*tasks, scheduler=_THREADS, num_workers=self._workers)
        except BaseException as error:  # handed to the reading threads and to finish()
            self._error = error
        finally:
            with self._changed:
                self._finished = True
                self._changed.notify_all()

    def wait_for(self, rows: slice, cols: slice) -> None:
        """Block until the tissue chunks under ``image[rows, cols]`` are written."""
        chunk = self.store.chunk_px
        height, width = self.store.frame.working_shape
        r0, r1, _ = rows.indices(height)
        c0, c1, _ = cols.indices(width)
        grid = np.s_[r0 // chunk : -(-r1 // chunk), c0 // chunk : -(-c1 // chunk)]
        with self._changed:
            while (self._expected[grid] & ~self._complete[grid]).any():
                if self._finished:
                    raise self._error or WsisegError(
                        f"{self.slide_path}: tiling ended with chunks missing"
                    )
                self._changed.wait(timeout=1.0)


class _TiledImage:
    """``store["image"]`` whose reads wait for the background tiling (see BackgroundTiling)."""

    def __init__(self, tiling: BackgroundTiling) -> None:
        self._tiling = tiling
        self._array = tiling.store["image"]
        self.shape = tuple(self._array.shape)
        self.dtype = self._array.dtype
        self.chunks = self._array.chunks

    def __getitem__(self, key: Any) -> Any:
        _, rows, cols = (tuple(key) + (slice(None),) * 3)[:3]  # (channels, rows, cols)
        if not (isinstance(rows, slice) and isinstance(cols, slice)):
            raise TypeError("a tiled image is read by row and column slices")
        self._tiling.wait_for(rows, cols)
        return self._array[key]


def _reader(path: str | Path) -> SlideReader:
    """One open reader per slide and process, reopened when the file changed."""
    return cached_reader(path)
