"""Slide → slide store: tissue mask, then one Dask task per tissue chunk of ``image``.

Each task reads its chunk's box from the pyramid level nearest above the working resolution,
resamples it with antialiasing (:mod:`wsiseg.slide.resample`), writes the chunk, then marks
it in the ``tiled`` array. Memory is bounded by chunk size × workers; a rerun skips marked
chunks, so a run killed at any point (even ``kill -9``) finishes identically when restarted.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np

from wsiseg.config import Workflow
from wsiseg.errors import WsisegError
from wsiseg.slide.frame import Frame
from wsiseg.slide.reader import SlideError, SlideInfo, SlideReader, open_slide
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


def make_frame(info: SlideInfo, workflow: Workflow, mpp: float | None = None) -> Frame:
    """The slide's Frame; ``mpp`` overrides the file's (missing or wrong) metadata."""
    level0_mpp = mpp if mpp is not None else info.mpp
    if level0_mpp is None:
        raise SlideError(
            f"{info.path}: the slide does not say its microns per pixel; give it with --mpp"
        )
    if not level0_mpp > 0:
        raise SlideError(f"{info.path}: --mpp must be a positive number, got {level0_mpp}")
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
    frame = store.frame
    chunk = store.chunk_px
    todo = tissue_chunks(store.tissue_mask, frame.working_shape, chunk)
    done = np.asarray(store["tiled"][...], dtype=bool)
    todo &= ~done
    tile = dask.delayed(tile_chunk, pure=False)
    return [
        tile(str(slide_path), str(store.path), frame.scale, int(i), int(j), chunk)
        for i, j in zip(*np.nonzero(todo), strict=True)
    ]


def tile_chunk(
    slide_path: str, store_path: str, downsample: float, i: int, j: int, chunk_px: int
) -> tuple[int, int]:
    """Read, resample and write chunk (i, j) of ``image``, then mark it complete."""
    import zarr

    group = zarr.open_group(store_path, mode="r+")
    image = group["image"]
    rows, cols = image.shape[:2]
    r0, c0 = i * chunk_px, j * chunk_px
    box = (r0, c0, min(chunk_px, rows - r0), min(chunk_px, cols - c0))
    pixels = read_box(_reader(slide_path), downsample, box)
    image[r0 : r0 + box[2], c0 : c0 + box[3]] = pixels
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
                dask.compute(*tasks, scheduler="threads", num_workers=n)
        else:
            dask.compute(*tasks, scheduler="threads", num_workers=n)
    if store.stage("tiling") != "done":
        store.set_stage("tiling", "done")
    return TilingResult(store=store, chunks_total=total, chunks_written=len(tasks))


@functools.lru_cache(maxsize=16)
def _reader(path: str) -> SlideReader:
    """One open reader per slide and process (OpenSlide handles are thread-safe)."""
    return open_slide(path)


def clear_reader_cache() -> None:
    _reader.cache_clear()
