"""Finishing whole components: small ones dropped, outlines simplified within tolerance, valid.

See the package docstring (step 6) for why rings are simplified as lines.
"""

from __future__ import annotations

import numpy as np
import shapely
from numpy.typing import NDArray


def _finish(
    exact: list[shapely.Polygon], simplify_px: float, min_area_px: float
) -> tuple[list[shapely.Polygon], NDArray[np.intp]]:
    """Whole components → dropped below ``min_area_px``, simplified, valid (vectorised).

    Returns the polygons and, for each, the index in ``exact`` of the component it came from.
    """
    polygons = np.asarray(exact, dtype=object)
    source = np.flatnonzero(shapely.area(polygons) >= min_area_px)
    polygons = polygons[source]
    if simplify_px <= 0 or len(polygons) == 0:
        return polygons.tolist(), source
    simple, ok = _simplify_rings(polygons, simplify_px)
    out, owner = simple[ok].tolist(), source[ok].tolist()
    for k in np.flatnonzero(~ok):  # rare: a ring collapsed or the rings crossed
        fallback = shapely.simplify(polygons[k], simplify_px / 2.0, preserve_topology=True)
        if not fallback.is_valid:
            fallback = shapely.make_valid(fallback, method="structure")
        parts = [p for p in shapely.get_parts(fallback)
                 if isinstance(p, shapely.Polygon) and p.area > 0]
        out.extend(parts)
        owner.extend([source[k]] * len(parts))
    return out, np.asarray(owner, dtype=np.intp)


def _simplify_rings(
    polygons: NDArray[np.object_], tolerance_px: float
) -> tuple[NDArray[np.object_], NDArray[np.bool_]]:
    """Topology-preserving Douglas–Peucker, at most ``tolerance_px`` (Hausdorff) from the input.

    GEOS simplifies a polygon's rings and may then drop a ring's start point when it lies
    within the tolerance of its new neighbours' chord, which can put the outline up to twice
    the tolerance away there. Simplifying each polygon's rings as the closed lines of one
    MultiLineString keeps their start points and still keeps the lines from crossing. Returns
    the rebuilt polygons and whether each is usable (no ring collapsed, valid); the caller
    falls back to the polygon simplifier at half the tolerance (twice half is the tolerance)
    for the others.
    """
    rings, ring_owner = shapely.get_rings(polygons, return_index=True)
    coords, coord_ring = shapely.get_coordinates(rings, return_index=True)
    lines = shapely.multilinestrings(shapely.linestrings(coords, indices=coord_ring),
                                     indices=ring_owner)
    lines = shapely.simplify(lines, tolerance_px, preserve_topology=True)
    parts, part_owner = shapely.get_parts(lines, return_index=True)
    n_polygons = len(polygons)
    ok = np.bincount(part_owner, minlength=n_polygons) == np.bincount(ring_owner,
                                                                      minlength=n_polygons)
    sizes = shapely.get_num_coordinates(parts)
    ok &= np.bincount(part_owner, weights=sizes < 4, minlength=n_polygons) == 0
    keep = ok[part_owner]
    coords, coord_part = shapely.get_coordinates(parts[keep], return_index=True)
    simple = np.full(n_polygons, None, dtype=object)
    if keep.any():
        new_rings = shapely.linearrings(coords, indices=coord_part)
        simple[ok] = shapely.polygons(new_rings, indices=_dense(part_owner[keep]))
        ok[ok] = shapely.is_valid(simple[ok]) & (shapely.area(simple[ok]) > 0)
    return simple, ok


def _dense(sorted_ids: NDArray[np.intp]) -> NDArray[np.intp]:
    """0, 0, 1, 2, 2, ... for sorted ids with gaps (5, 5, 7, 9, 9, ...)."""
    return np.concatenate([[0], np.cumsum(np.diff(sorted_ids) != 0)]).astype(np.intp)
