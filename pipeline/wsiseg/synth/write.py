"""Writing a generated slide: its pyramidal tiled JPEG TIFF, drawn tile by tile.

The slide is a generic tiled pyramidal TIFF (JPEG, YCbCr 4:2:0, 256² tiles, downsample 4 per
level down to ≤ 1024 px) with its resolution in pixels per centimetre, which OpenSlide 4
reports as ``openslide.mpp-x``/``mpp-y``. tifffile is handed tile generators, so memory stays
at a few tiles whatever the slide size.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

from wsiseg.synth.layout import Layout
from wsiseg.synth.render import TILE_PX, Style, render_tile

JPEG_QUALITY = 85
LEVEL_DOWNSAMPLE = 4
SMALLEST_LEVEL_PX = 1024
BUFFER_TILES = 16  # tiles handed to the encoder at a time


def _level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    sizes = [(width, height)]
    while max(sizes[-1]) > SMALLEST_LEVEL_PX:
        ds = LEVEL_DOWNSAMPLE ** len(sizes)
        sizes.append((max(1, math.ceil(width / ds)), max(1, math.ceil(height / ds))))
    return sizes


def _ordered_map(
    func: Callable[[tuple[int, int]], np.ndarray], items: Iterable[tuple[int, int]], workers: int
) -> Iterator[np.ndarray]:
    """``map(func, items)`` on a thread pool, in order, with a bounded look-ahead."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(func, item))
            if len(pending) >= 4 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _workers() -> int:
    """Threads for drawing (and, separately, encoding) tiles: the usable cores, at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))


def write_slide(
    path: Path,
    layout: Layout,
    style: Style,
    size: tuple[int, int],
    mpp: float,
    description: str,
) -> None:
    width, height = size
    levels = _level_sizes(width, height)
    workers = _workers()
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**29) as tif:
        for level, (lw, lh) in enumerate(levels):
            pixel_um = mpp * LEVEL_DOWNSAMPLE**level
            grid = itertools.product(range(-(-lh // TILE_PX)), range(-(-lw // TILE_PX)))

            def draw(rc: tuple[int, int], pixel_um: float = pixel_um, level: int = level):
                return render_tile(layout, style, pixel_um, level, *rc)

            px_per_cm = 1e4 / pixel_um
            tif.write(
                data=_ordered_map(draw, grid, workers),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(TILE_PX, TILE_PX),
                photometric="rgb",  # stored as YCbCr 4:2:0 JPEG
                compression="jpeg",
                compressionargs={"level": JPEG_QUALITY},
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                description=description if level == 0 else None,
                metadata=None,
                software="wsiseg",
                maxworkers=workers,
                # tifffile otherwise buffers up to 256 MB of tiles per batch.
                buffersize=BUFFER_TILES * TILE_PX * TILE_PX * 3,
            )
