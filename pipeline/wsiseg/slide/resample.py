"""Reading a box of the slide at any resolution, with antialiasing.

The slide is read from the pyramid level nearest above the wanted resolution, then resampled
with exact sub-pixel coordinates, so neighbouring boxes meet without seams: output pixel
centres map to the same level-0 positions whatever box they were computed in.

OpenCV does the arithmetic (``cv2.resize`` with ``INTER_AREA`` for the integer block
averages, ``cv2.GaussianBlur``, ``cv2.remap``): 15–90× faster than ``scipy.ndimage`` on a
chunk (docs/benchmarks.md). ``cv2.remap`` places its bilinear weights on a 1/32-pixel
lattice; the sampling positions are rounded to that lattice in *global* coordinates, so a
pixel gets the very same weights whichever box computes it, and boxes still meet exactly.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from numpy.typing import NDArray

from wsiseg.slide.reader import SlideInfo, SlideReader, best_level_for

# Source pixels read beyond the box on each side, so interpolation and the antialiasing
# filter see real neighbours instead of a border (in source pixels of the chosen level).
_MARGIN = 3

# cv2.remap's sub-pixel resolution (INTER_TAB_SIZE): positions are multiples of 1/32.
_REMAP_STEPS = 32


def read_box(
    reader: SlideReader, downsample: float, box: tuple[int, int, int, int]
) -> NDArray[np.uint8]:
    """Read a box of the slide at ``downsample`` (level-0 px per output px).

    Parameters
    ----------
    reader : SlideReader
        An open slide.
    downsample : float
        Level-0 pixels per output pixel (e.g. ``frame.scale`` for the working resolution).
        May be below 1 (upsampling) for slides coarser than the wanted resolution.
    box : (row0, col0, rows, cols)
        The box in output pixels.

    Returns
    -------
    ndarray of uint8, shape (rows, cols, 3)
        RGB, antialiased (area-like Gaussian prefilter, bilinear sampling at pixel centres).
    """
    level, level0_xy, size_px, origin, factor = source_box(reader.info, downsample, box)
    region = reader.read_region(level0_xy, level, size_px)
    return resample(region, origin, factor, box)


def source_box(
    info: SlideInfo, downsample: float, box: tuple[int, int, int, int]
) -> tuple[int, tuple[int, int], tuple[int, int], tuple[int, int], float]:
    """What :func:`read_box` reads from the slide for ``box`` (row0, col0, rows, cols; output px).

    Returns
    -------
    level : int
        Pyramid level read (the nearest above the wanted resolution).
    level0_xy : (int, int)
        The read's top-left corner in level-0 px, as ``read_region`` takes it.
    size_px : (int, int)
        (width, height) read, in level px.
    origin : (int, int)
        (row, col) of the read's top-left corner in level px, for :func:`resample`.
    factor : float
        Level px per output px.
    """
    row0, col0, rows, cols = box
    level = best_level_for(info, downsample)
    level_ds = info.level_downsamples[level]
    factor = downsample / level_ds  # source (level) px per output px
    # Source box in level px, covering every output pixel centre plus a margin.
    margin = _MARGIN + math.ceil(factor)
    # Start on the global block grid of `resample`, so every box averages the same blocks.
    block = max(1, math.floor(factor))
    sx0 = (math.floor(col0 * factor) - margin) // block * block
    sy0 = (math.floor(row0 * factor) - margin) // block * block
    sx1 = math.ceil((col0 + cols) * factor) + margin
    sy1 = math.ceil((row0 + rows) * factor) + margin
    level0_xy = (round(sx0 * level_ds), round(sy0 * level_ds))
    return level, level0_xy, (sx1 - sx0, sy1 - sy0), (sy0, sx0), factor


def resample(
    region: NDArray[np.uint8],
    region_origin: tuple[float, float],
    factor: float,
    box: tuple[int, int, int, int],
) -> NDArray[np.uint8]:
    """Resample ``region`` (source pixels) onto the output pixel grid of ``box``.

    Parameters
    ----------
    region : ndarray of uint8, shape (h, w, 3)
        Source pixels; ``region[0, 0]`` is source pixel ``region_origin`` = (row, col).
    region_origin : (float, float)
        Source (row, col) of the region's top-left pixel.
    factor : float
        Source pixels per output pixel (> 1 shrinks, < 1 enlarges).
    box : (row0, col0, rows, cols)
        Output pixels to produce.
    """
    row0, col0, rows, cols = box
    oy, ox = float(region_origin[0]), float(region_origin[1])
    # Integer block averaging first: exact area averaging, and cheap. In float32, so the
    # rounding below is numpy's (half to even), whatever the path.
    block = max(1, math.floor(factor))
    if block > 1:
        h = region.shape[0] // block * block
        w = region.shape[1] // block * block
        img = cv2.resize(region[:h, :w].astype(np.float32), (w // block, h // block),
                         interpolation=cv2.INTER_AREA)
    else:
        img = region.astype(np.float32)
    rest = factor / block  # remaining shrink factor in [1, 2) (or < 1 when enlarging)
    if rest > 1.0:
        sigma = (rest - 1.0) / 2.0  # scikit-image's antialiasing rule
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma,
                               borderType=cv2.BORDER_REPLICATE)
    # Output pixel centre (r + 0.5) sits at source coordinate (row0 + r + 0.5) * factor;
    # in the (block-reduced) array whose pixel centres are at index + 0.5.
    scale = factor / block
    offset = -oy / block - 0.5 + (row0 + 0.5) * scale, -ox / block - 0.5 + (col0 + 0.5) * scale
    if scale == 1.0 and offset[0].is_integer() and offset[1].is_integer():
        # An integer factor on the block grid (e.g. 1.0 → 2.0 µm/px): output pixels are the
        # block averages themselves, and bilinear sampling would be an identity shift that
        # costs half of the chunk's time. Slice instead when the box lies inside.
        r, c = int(offset[0]), int(offset[1])
        if r >= 0 and c >= 0 and r + rows <= img.shape[0] and c + cols <= img.shape[1]:
            return np.clip(np.rint(img[r : r + rows, c : c + cols]), 0, 255).astype(np.uint8)
    # Bilinear sampling on an axis-aligned lattice; edges clamp (replicate).
    map_y = _sample_positions(row0, rows, scale, oy / block)
    map_x = _sample_positions(col0, cols, scale, ox / block)
    out = cv2.remap(img, np.broadcast_to(map_x[None, :], (rows, cols)).copy(),
                    np.broadcast_to(map_y[:, None], (rows, cols)).copy(),
                    interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _sample_positions(start: int, count: int, scale: float, origin: float) -> NDArray:
    """float32 source positions of output pixels ``start … start + count − 1`` on one axis,
    relative to a region starting at ``origin`` (block-reduced px, an integer).

    The global position ``(i + 0.5)·scale − 0.5`` is rounded to cv2.remap's 1/32 lattice
    before the region's origin is subtracted, so it does not depend on the box.
    """
    index = np.arange(start, start + count, dtype=np.float64)
    global_pos = np.rint(((index + 0.5) * scale - 0.5) * _REMAP_STEPS) / _REMAP_STEPS
    return (global_pos - origin).astype(np.float32)


def read_thumbnail(
    reader: SlideReader, downsample: float, shape: tuple[int, int], block_px: int = 1024
) -> NDArray[np.uint8]:
    """The whole slide at ``downsample``, read block by block (bounded memory).

    Returns uint8 (rows, cols, 3) with ``(rows, cols) = shape``.
    """
    rows, cols = shape
    out = np.empty((rows, cols, 3), dtype=np.uint8)
    for r in range(0, rows, block_px):
        for c in range(0, cols, block_px):
            box = (r, c, min(block_px, rows - r), min(block_px, cols - c))
            out[r : r + box[2], c : c + box[3]] = read_box(reader, downsample, box)
    return out
