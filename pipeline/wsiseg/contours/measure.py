"""Per-polygon measures: area and mean tumor probability over the pixels inside; the
filled outline that finds what a polygon may meet."""

from __future__ import annotations

import math

import numpy as np
import shapely
from numpy.typing import NDArray

from wsiseg.contours.mask import ArrayLike2D, _as_probability, _block_shape

_STATS_TILE_PX = 64  # polygon_stats tests whole tiles first, pixel centres only on the outline


def polygon_stats(prob: ArrayLike2D, polygon: shapely.Polygon) -> dict[str, float]:
    """Area and mean tumor probability of one polygon.

    Parameters
    ----------
    prob : ArrayLike2D
        (H, W) probability (uint8 × 255, floating in [0, 1] or bool), working resolution.
    polygon : shapely.Polygon or shapely.MultiPolygon
        In working px (the frame of :func:`tumor_polygons`).

    Returns
    -------
    dict
        ``area_px``: polygon area in working px²; ``mean_probability``: mean probability in
        [0, 1] over the pixels whose centres ``(i + 0.5, j + 0.5)`` lie strictly inside the
        polygon (NaN when there is none). Only the polygon's bounding box is read, one block
        at a time.
    """
    height, width = prob.shape
    stats = {"area_px": float(polygon.area), "mean_probability": float("nan")}
    if polygon.is_empty:
        return stats
    minx, miny, maxx, maxy = polygon.bounds
    col0, row0 = max(math.floor(minx), 0), max(math.floor(miny), 0)
    col1, row1 = min(math.ceil(maxx), width), min(math.ceil(maxy), height)
    if col1 <= col0 or row1 <= row0:
        return stats
    shapely.prepare(polygon)
    bh, bw = _block_shape(prob, None)
    total, count = 0.0, 0
    for r in range(row0, row1, bh):
        for c in range(col0, col1, bw):
            r_end, c_end = min(r + bh, row1), min(c + bw, col1)
            values = _as_probability(np.asarray(prob[r:r_end, c:c_end]))
            inside = _centres_inside(polygon, r, c, values.shape)
            total += float(values[inside].sum(dtype=np.float64))
            count += int(inside.sum())
    if count:
        stats["mean_probability"] = total / count
    return stats



def _centres_inside(
    polygon: shapely.Geometry, row0: int, col0: int, shape: tuple[int, int]
) -> NDArray[np.bool_]:
    """Pixels of a block whose centres lie strictly inside a (prepared) polygon.

    Whole tiles inside or outside are decided with one predicate each; only the tiles that the
    outline crosses test their pixel centres one by one.
    """
    inside = np.zeros(shape, dtype=bool)
    t = _STATS_TILE_PX
    tiles = [(r, c) for r in range(0, shape[0], t) for c in range(0, shape[1], t)]
    # the box through the tile's first and last pixel centres
    boxes = shapely.box(
        [col0 + c + 0.5 for _, c in tiles],
        [row0 + r + 0.5 for r, _ in tiles],
        [col0 + min(c + t, shape[1]) - 0.5 for _, c in tiles],
        [row0 + min(r + t, shape[0]) - 0.5 for r, _ in tiles],
    )
    full = shapely.contains_properly(polygon, boxes)
    partial = shapely.intersects(polygon, boxes) & ~full
    for (r, c), is_full, is_partial in zip(tiles, full, partial, strict=True):
        if is_full:
            inside[r:r + t, c:c + t] = True
        elif is_partial:
            rows = np.arange(r, min(r + t, shape[0]))
            cols = np.arange(c, min(c + t, shape[1]))
            yy, xx = np.meshgrid(row0 + rows + 0.5, col0 + cols + 0.5, indexing="ij")
            inside[r:r + t, c:c + t] = shapely.contains_xy(polygon, xx, yy)
    return inside


def outer_filled(geoms: NDArray[np.object_]) -> NDArray[np.object_]:
    """Each polygon of ``geoms`` as its outer ring filled (other geometries as they are).

    What a polygon meets, it meets inside its outer ring: an STRtree query with the filled
    rings finds a superset of the pairs the polygons themselves would, to be measured
    exactly afterwards. A query prepares each query geometry, at ~0.6 µs per vertex, and a
    traced tumor's holes hold most of its vertices (the 67-Mpx bench slide's largest: 9 343
    holes, 48 000 of 61 000 vertices): 2–3 ms per query instead of 18–35.
    """
    filled = geoms.copy()
    polygon = shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON
    filled[polygon] = shapely.polygons(shapely.get_exterior_ring(geoms[polygon]))
    return filled
