"""The refine windows: which a scribble affects, reading them, blending them back."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import shapely

from wsiseg.errors import WsisegError
from wsiseg.store import pad_value

log = logging.getLogger(__name__)



def affected_windows(
    new_pixels: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int],
    window_px: int, context_px: int,
) -> list[tuple[int, int]]:
    """Origins (row, col) of the windows whose core holds a new scribble pixel.

    Parameters
    ----------
    new_pixels : ndarray of bool, shape (box rows, box cols)
    box : (row0, col0, rows, cols)
        Where ``new_pixels`` lies in the slide, working px.
    shape : (rows, cols)
        The slide's working shape.
    """
    stride = window_px - 2 * context_px
    if stride <= 0:
        raise WsisegError(f"refinenet.context_px must be below half of window_px ({window_px})")
    rr, cc = np.nonzero(new_pixels)
    if rr.size == 0:
        return []
    rr = rr + box[0]
    cc = cc + box[1]
    wr = _window_index(rr, stride, context_px, shape[0], window_px)
    wc = _window_index(cc, stride, context_px, shape[1], window_px)
    keys = np.unique(np.stack([wr, wc], axis=1), axis=0)
    return [
        (_window_origin(int(i), stride, shape[0], window_px),
         _window_origin(int(j), stride, shape[1], window_px))
        for i, j in keys
    ]


def _window_index(coord: np.ndarray, stride: int, context: int, size: int, window: int):
    last = max(0, math.ceil((size - window) / stride))
    return np.clip((coord - context) // stride, 0, last)


def _window_origin(index: int, stride: int, size: int, window: int) -> int:
    # The last window is pulled inside the slide; a slide smaller than a window starts at 0.
    return int(max(0, min(index * stride, size - window)))


def window_regions(
    windows: list[tuple[int, int]], window_px: int, shape: tuple[int, int]
) -> list[tuple[tuple[int, int, int, int], list[tuple[int, int]]]]:
    """Group overlapping windows: ``[(region (row0, col0, rows, cols), windows), ...]``."""
    if not windows:
        return []
    origins = np.asarray(windows, dtype=float)
    bounds = np.stack([origins[:, 1], origins[:, 0], origins[:, 1] + window_px,
                       origins[:, 0] + window_px], axis=1)
    out = []
    for x0, y0, x1, y1 in clusters(bounds, 0.0):
        r0, c0 = int(y0), int(x0)
        r1, c1 = min(shape[0], int(y1)), min(shape[1], int(x1))
        members = [w for w in windows if r0 <= w[0] < r1 and c0 <= w[1] < c1]
        out.append(((r0, c0, r1 - r0, c1 - c0), members))
    return out


def feather_weight(window_px: int, context_px: int) -> np.ndarray:
    """float32 (P, P): 1 in the core, falling linearly to ~0 at the window's border."""
    ramp = np.minimum(1.0, (np.arange(window_px) + 0.5) / max(1, context_px))
    ramp = np.minimum(ramp, ramp[::-1]).astype(np.float32)
    return np.minimum.outer(ramp, ramp)


def read_window(array, origin: tuple[int, int], window_px: int, margin: int = 0) -> np.ndarray:
    """A window (plus margin) of a store array, rows and columns its last two axes: RGB
    ``image`` (3, H, W) gives (3, P, P), the others (H, W) give (P, P). Beyond the slide
    it reads as glass (white) for ``image``, as the fill value (0) for the others."""
    rows, cols = array.shape[-2:]
    r0, c0 = origin[0] - margin, origin[1] - margin
    size = window_px + 2 * margin
    out = np.full((*array.shape[:-2], size, size), pad_value(array), dtype=array.dtype)
    rs, cs = max(0, r0), max(0, c0)
    re, ce = min(rows, r0 + size), min(cols, c0 + size)
    if re > rs and ce > cs:
        out[..., rs - r0 : re - r0, cs - c0 : ce - c0] = array[..., rs:re, cs:ce]
    return out


def blend_windows(
    old: np.ndarray, region: tuple[int, int, int, int], windows: Iterable[tuple[int, int]],
    probs: Iterable[np.ndarray], window_px: int, context_px: int,
) -> np.ndarray:
    """Feathered blend of refined windows into ``old`` (uint8, the region's ``refined``)."""
    r0, c0, rows, cols = region
    acc = np.zeros((rows, cols), np.float32)
    wsum = np.zeros((rows, cols), np.float32)
    weight = feather_weight(window_px, context_px)
    for (wr, wc), prob in zip(windows, probs, strict=True):
        rs, cs = wr - r0, wc - c0
        h, w = min(window_px, rows - rs), min(window_px, cols - cs)
        acc[rs : rs + h, cs : cs + w] += weight[:h, :w] * prob[:h, :w]
        wsum[rs : rs + h, cs : cs + w] += weight[:h, :w]
    new = np.divide(acc, wsum, out=np.zeros_like(acc), where=wsum > 0)
    alpha = np.minimum(wsum, 1.0)  # 1 inside, ramping to 0 at the union's border
    out = alpha * new + (1.0 - alpha) * (old.astype(np.float32) / 255.0)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def box_slices(box: tuple[int, int, int, int]) -> tuple[slice, slice]:
    return slice(box[0], box[0] + box[2]), slice(box[1], box[1] + box[3])


def clusters(bounds: np.ndarray, pad: float) -> list[tuple[float, float, float, float]]:
    """Bounding boxes of groups of overlapping (padded) boxes, (x0, y0, x1, y1)."""
    boxes = shapely.box(bounds[:, 0] - pad, bounds[:, 1] - pad, bounds[:, 2] + pad,
                        bounds[:, 3] + pad)
    merged = shapely.get_parts(shapely.union_all(boxes))
    return [tuple(b) for b in shapely.bounds(merged)]
