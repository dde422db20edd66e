"""Scribble geometries → label raster, and accumulation of rounds.

Scribbles arrive as shapely geometries in *working* pixels ``(x, y)`` (pixel ``(i, j)`` covers
``[i, i+1) × [j, j+1)``, so its centre is ``(i + 0.5, j + 0.5)``), each with a label
``+1`` (tumor) or ``-1`` (non-tumor). The raster is the slide store's ``scribbles`` array
convention: int8, 0 none, +1 tumor, −1 non-tumor; where both classes claim a pixel it is 0
(a conflict carries no information, so it is left unlabeled).

Drawing rules, by geometry family:

- areas (Polygon, MultiPolygon): a pixel is drawn when its centre lies inside the area or on
  its boundary; holes stay empty;
- lines (LineString, LinearRing, MultiLineString): buffered to ``line_width_px`` (at least
  1 px), plus the pixels the line itself passes through, so even a line thinner than a pixel
  or shorter than one is drawn, 8-connected;
- points (Point, MultiPoint): discs of ``point_radius_px`` (at least 1 px, so a disc always
  holds a pixel centre);
- GeometryCollection: each member by its own family.

Only the part of each geometry inside the window is drawn, at a cost in proportion to the
geometry's bounding box intersected with the window, never to the slide.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import shapely
from numpy.typing import NDArray
from skimage import draw

Window = tuple[int, int, int, int]
"""``(row0, col0, rows, cols)`` in working pixels."""

# Areas are filled in square blocks of this many pixels a side: a block whose pixel centres
# the area covers entirely is filled at once, one it misses is skipped, and only blocks on the
# area's boundary test their pixel centres one by one. A large brush area then costs in
# proportion to its perimeter rather than its bounding box, and temporaries stay small.
_BLOCK_PX = 64

_POINT, _LINESTRING, _LINEARRING, _POLYGON = 0, 1, 2, 3


def rasterize_labels(
    shapes: Iterable[tuple[shapely.Geometry, int]],
    window: Window,
    *,
    line_width_px: float,
    point_radius_px: float,
) -> NDArray[np.int8]:
    """Rasterise labelled scribble geometries into one window of the working frame.

    Parameters
    ----------
    shapes : iterable of (shapely.Geometry, int)
        Geometries in working pixels ``(x, y)``, each with label +1 (tumor) or −1 (non-tumor).
        Any geometry type; invalid areas are repaired with :func:`shapely.make_valid`; empty
        geometries are skipped.
    window : (int, int, int, int)
        ``(row0, col0, rows, cols)``: the window of the working frame to draw, in pixels.
        Geometries partly or wholly outside it are clipped.
    line_width_px : float
        Width of line scribbles, working pixels (values below 1 are drawn 1 px wide).
    point_radius_px : float
        Radius of point scribbles, working pixels (values below 1 are drawn with radius 1).

    Returns
    -------
    ndarray of int8, shape (rows, cols)
        +1 tumor, −1 non-tumor, 0 where nothing was drawn or both classes were drawn.

    Raises
    ------
    ValueError
        A label other than ±1, a negative window size, or a non-positive width or radius.
    """
    row0, col0, rows, cols = (int(v) for v in window)
    if rows < 0 or cols < 0:
        raise ValueError(f"window size must be non-negative, got {window}")
    for name, value in (("line_width_px", line_width_px), ("point_radius_px", point_radius_px)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value}")
    window = (row0, col0, rows, cols)
    half_width = max(float(line_width_px), 1.0) / 2
    radius = max(float(point_radius_px), 1.0)

    drawn = {1: np.zeros((rows, cols), bool), -1: np.zeros((rows, cols), bool)}
    for geometry, label in shapes:
        if label not in drawn:
            raise ValueError(f"scribble label must be +1 or -1, got {label!r}")
        mask = drawn[int(label)]
        for part in _simple_parts(geometry):
            kind = shapely.get_type_id(part)
            if kind == _POLYGON:
                _draw_area(part, mask, window)
            elif kind in (_LINESTRING, _LINEARRING):
                _draw_line(part, mask, window, half_width)
            elif kind == _POINT:
                _draw_disc(part, mask, window, radius)
    tumor, non_tumor = drawn[1], drawn[-1]
    labels = np.zeros((rows, cols), np.int8)
    labels[tumor & ~non_tumor] = 1
    labels[non_tumor & ~tumor] = -1
    return labels


def merge_scribbles(existing: NDArray[np.int8], new: NDArray[np.int8]) -> NDArray[np.int8]:
    """Accumulate a new round of scribbles onto the existing ones.

    A labelled pixel keeps its label; a new label on an unlabeled pixel is added; a new label
    opposite to the existing one makes the pixel 0 (conflict → ignored). ``merge(x, x) == x``.

    Merge each round's raster once, onto the raster the round started from: a pixel zeroed by
    a conflict is indistinguishable from one never labelled, so merging the same new raster a
    second time onto the result gives it the new label.

    Parameters
    ----------
    existing, new : ndarray of int8, shape (H, W)
        Label rasters (0 none, +1 tumor, −1 non-tumor).

    Returns
    -------
    ndarray of int8, shape (H, W)
        A new array; the inputs are not modified.
    """
    existing = np.asarray(existing)
    new = np.asarray(new)
    if existing.shape != new.shape:
        raise ValueError(f"scribble shapes differ: existing {existing.shape}, new {new.shape}")
    merged = existing.astype(np.int8, copy=True)
    unlabeled = existing == 0
    merged[unlabeled] = new[unlabeled]
    merged[(new != 0) & (new == -existing)] = 0
    return merged


def new_scribble_pixels(existing: NDArray[np.int8], merged: NDArray[np.int8]) -> NDArray[np.bool_]:
    """Pixels a merge changed (labels added, or cleared by a conflict).

    Parameters
    ----------
    existing, merged : ndarray of int8, shape (H, W)

    Returns
    -------
    ndarray of bool, shape (H, W)
        True where ``merged`` differs from ``existing``.
    """
    existing = np.asarray(existing)
    merged = np.asarray(merged)
    if existing.shape != merged.shape:
        raise ValueError(
            f"scribble shapes differ: existing {existing.shape}, merged {merged.shape}"
        )
    return existing != merged


def _simple_parts(geometry: shapely.Geometry) -> list[shapely.Geometry]:
    """Single-part geometries (Point, LineString, LinearRing, Polygon) of any geometry."""
    if geometry is None or shapely.is_empty(geometry):
        return []
    kind = shapely.get_type_id(geometry)
    if kind == _POLYGON and not shapely.is_valid(geometry):
        # Keep only the area: slivers collapsed to lines would otherwise be drawn as lines.
        geometry = shapely.make_valid(geometry, method="structure", keep_collapsed=False)
        kind = shapely.get_type_id(geometry)
    if kind in (_POINT, _LINESTRING, _LINEARRING, _POLYGON):
        return [geometry]
    return [p for part in shapely.get_parts(geometry) for p in _simple_parts(part)]


def _clip(geometry: shapely.Geometry, window: Window, margin_px: float) -> shapely.Geometry:
    """The part of a geometry inside the window grown by a margin (keeps edges exact)."""
    row0, col0, rows, cols = window
    return shapely.clip_by_rect(
        geometry,
        col0 - margin_px,
        row0 - margin_px,
        col0 + cols + margin_px,
        row0 + rows + margin_px,
    )


def _draw_area(area: shapely.Geometry, mask: NDArray[np.bool_], window: Window) -> None:
    """Set the pixels of ``mask`` whose centres lie in ``area`` (closed), within the window."""
    row0, col0, rows, cols = window
    area = _clip(area, window, 1.0)
    if area.is_empty:
        return
    xmin, ymin, xmax, ymax = area.bounds
    # Pixel c has its centre at c + 0.5: the centres inside [xmin, xmax] are these columns.
    c_lo = max(col0, math.ceil(xmin - 0.5))
    c_hi = min(col0 + cols, math.floor(xmax - 0.5) + 1)
    r_lo = max(row0, math.ceil(ymin - 0.5))
    r_hi = min(row0 + rows, math.floor(ymax - 0.5) + 1)
    if c_lo >= c_hi or r_lo >= r_hi:
        return
    shapely.prepare(area)
    c_starts = np.arange(c_lo, c_hi, _BLOCK_PX)
    c_stops = np.minimum(c_starts + _BLOCK_PX, c_hi)
    for r_start in range(r_lo, r_hi, _BLOCK_PX):
        r_stop = min(r_hi, r_start + _BLOCK_PX)
        # The rectangle spanned by each block's pixel centres (degenerate when 1 px thin).
        centre_boxes = shapely.box(c_starts + 0.5, r_start + 0.5, c_stops - 0.5, r_stop - 0.5)
        thin = (c_stops - c_starts < 2) | (r_stop - r_start < 2)
        full = shapely.covers(area, centre_boxes) & ~thin
        mixed = (shapely.intersects(area, centre_boxes) | thin) & ~full
        rows_out = slice(r_start - row0, r_stop - row0)
        y_centres = np.arange(r_start, r_stop, dtype=np.float64)[:, None] + 0.5
        for c_start, c_stop in zip(c_starts[full], c_stops[full], strict=True):
            mask[rows_out, c_start - col0 : c_stop - col0] = True
        for c_start, c_stop in zip(c_starts[mixed], c_stops[mixed], strict=True):
            # Only the boundary near this block matters: testing against it is faster.
            local = shapely.clip_by_rect(area, c_start - 1, r_start - 1, c_stop + 1, r_stop + 1)
            x_centres = np.arange(c_start, c_stop, dtype=np.float64)[None, :] + 0.5
            inside = shapely.intersects_xy(local, x_centres, y_centres)
            mask[rows_out, c_start - col0 : c_stop - col0] |= inside


def _draw_line(
    line: shapely.Geometry, mask: NDArray[np.bool_], window: Window, half_width: float
) -> None:
    """Buffer a line to ``2 * half_width`` and draw it, plus the pixels the line runs through."""
    row0, col0, rows, cols = window
    line = _clip(line, window, half_width + 1.0)
    if line.is_empty:
        return
    _draw_area(shapely.buffer(line, half_width), mask, window)
    # A buffer only 1 px wide may hold no pixel centre near a vertex (or at all, for a line
    # shorter than a pixel): the line's own pixels keep it present and connected.
    for part in shapely.get_parts(line):
        pixels = np.floor(shapely.get_coordinates(part)).astype(np.int64)
        pixels -= (col0, row0)
        if len(pixels) == 1:
            pixels = np.repeat(pixels, 2, axis=0)
        for (c0, r0), (c1, r1) in zip(pixels[:-1], pixels[1:], strict=True):
            rr, cc = draw.line(r0, c0, r1, c1)
            keep = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
            mask[rr[keep], cc[keep]] = True


def _draw_disc(
    point: shapely.Geometry, mask: NDArray[np.bool_], window: Window, radius: float
) -> None:
    """Set the pixels whose centres lie closer than ``radius`` to the point."""
    row0, col0, _, _ = window
    # skimage's disc is centred in index coordinates, where pixel centres are integers.
    centre = (point.y - 0.5 - row0, point.x - 0.5 - col0)
    rr, cc = draw.disk(centre, radius, shape=mask.shape)
    mask[rr, cc] = True
