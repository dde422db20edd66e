"""Geometry on QuPath's grid: what the writer writes for one annotation's geometry.

QuPath ≥ 0.6 snaps every imported vertex to a 0.01-px grid and rejects what the snap makes
invalid (``qupath-geojson.md`` §2.4), so the writer snaps first and writes only valid
geometry. Rounding each coordinate (:func:`rounded`) is what GEOS's snap does where it keeps
the geometry valid, without GEOS's snap-rounding overlay; whether it does is checked by GEOS
(``is_valid``), or, for a geometry its maker vouches is valid, by a clearance bound
(:func:`proven_rounding`): GEOS 3.13–3.14's check of a polygon with many holes scans
the whole shell once per hole (0.35 s for a traced tumor of 60 000 vertices and 9 343 holes,
which a refine round writes again whenever a stroke touches it); the bound costs 0.13 s.
For traced contours, whose vertices are pixel corners of the working grid, the same bound
follows from lattice arithmetic without a spatial search (:func:`lattice_rounding`, 21 ms
for that tumor on a 2-core EPYC; its history in ``docs/benchmarks.md`` §7), and their
canonical text from their arrays (:func:`~wsiseg.qupath.text.canonical_polygon_text`).
"""

from __future__ import annotations

import math

import numpy as np
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from wsiseg.qupath.geometry import _polygonal
from wsiseg.qupath.text import canonical_polygon_text, geometry_text

#: QuPath ≥ 0.6 snaps imported vertices to this grid (``qupath-geojson.md`` §2.4).
PRECISION_PX = 0.01

_POLYGONAL = ("Polygon", "MultiPolygon")


def geometry_json(geometry: shapely.Geometry | None, where: str, valid: bool = False,
                  grid: tuple[float, float, float] | None = None) -> str | None:
    """GeoJSON geometry text by the writer checklist of §4.1, or None when no area is left.

    Parameters
    ----------
    geometry : shapely.Geometry or None
        QuPath-frame level-0 px, any type (only its polygonal part is written).
    where : str
        Names the annotation in errors.
    valid : bool
        The caller vouches that ``geometry`` is valid (traced contours are, by
        construction): its rounding is then written when :func:`lattice_rounding` (with
        ``grid``) or :func:`proven_rounding` proves it valid, without GEOS's validity check;
        otherwise as for any geometry.
    grid : (spacing, x0, y0), optional
        The lattice the vertices of a ``valid`` geometry lie on, where they do (traced
        contours: the working grid's pixel corners); checked, not trusted.

    Raises
    ------
    ValueError
        A non-finite coordinate.
    """
    if geometry is None or geometry.is_empty:
        return None
    if not np.isfinite(shapely.get_coordinates(geometry)).all():
        raise ValueError(f"{where}: geometry has non-finite coordinates")
    # Fast path: a polygonal geometry whose rounding is valid is written as rounded.
    # Otherwise the repair: the polygonal part of the valid input, snapped by GEOS
    # (set_precision's default mode returns valid geometry).
    snapped = None
    if geometry.geom_type in _POLYGONAL:
        if valid and grid is not None:
            on_grid = _lattice_rounded(geometry, grid)
            if on_grid is not None:
                # a traced contour's rings turn the RFC 7946 way: its canonical order and
                # text come from its arrays, its unchanged rings' text remembered
                text = (canonical_polygon_text(*on_grid[:2])
                        if geometry.geom_type == "Polygon" else None)
                if text is not None:
                    return text
                snapped = _rebuilt(geometry, *on_grid)
        if valid and snapped is None:
            snapped = proven_rounding(geometry)
        if snapped is None:
            snapped = rounded(geometry)
            if not snapped.is_valid:
                snapped = None
    if snapped is None:
        polygonal = _polygonal(shapely.make_valid(geometry) if not geometry.is_valid
                               else geometry)
        if polygonal is None:
            return None
        snapped = shapely.set_precision(polygonal, PRECISION_PX)
        if snapped.geom_type not in _POLYGONAL:
            snapped = _polygonal(snapped)
    if snapped is None or not snapped.area > 0:
        return None
    # Canonical vertex order (a re-export writes the same bytes), then RFC 7946's right-hand
    # rule; QuPath itself ignores orientation.
    return geometry_text(shapely.orient_polygons(shapely.normalize(snapped)))


def rounded(polygonal: shapely.Geometry, step: float = PRECISION_PX) -> shapely.Geometry:
    """``polygonal`` with each coordinate rounded half up to the ``step`` grid, as GEOS
    rounds: where that stays valid (it did for all of 9,620 real and rescaled contours
    tried) the output is ``shapely.set_precision``'s, without its snap-rounding overlay
    (2–3× the cost)."""
    return shapely.remove_repeated_points(
        shapely.transform(polygonal, lambda xy: _on_grid(xy, step)), 0.0)


def _on_grid(xy: np.ndarray, step: float) -> np.ndarray:
    """Coordinates rounded half up to the ``step`` grid, as GEOS rounds."""
    steps = 1.0 / step
    return np.floor(xy * steps + 0.5) / steps


def proven_rounding(polygonal: shapely.Geometry, step: float = PRECISION_PX
                    ) -> shapely.Geometry | None:
    """``polygonal`` rounded to the ``step`` grid, when a clearance bound proves that the
    rounding keeps a valid geometry valid with the same topology; else None (which says
    nothing: check the rounding otherwise).

    Rounding moves a vertex by at most m = step / √2, and so every point of a segment by at
    most m. When every segment is longer than 2m and every vertex lies farther than 2m from
    each segment it is not an end of (vertices at one place count as one), no two segments
    that did not meet can meet anywhere along the straight path from the old coordinates to
    the new ones (the distance of two segments is reached at an end of one of them), and no
    segment can fold onto its neighbour or vanish: the rings keep their arrangement.

    A vertex lying on another segment, away from its ends (rings touching at a point that is
    a vertex of one of them only; simplified outlines have a few), is first made a vertex of
    that segment too: the same point set, the touch then at a shared vertex, which rounding
    keeps as one. "On" is up to float error, so a join may close a gap of ~1e-10 × the
    coordinates; one join between two rings is harmless, two would cut the interior, so
    joins are refused when they and the touches already there link rings in a cycle.

    Parameters
    ----------
    polygonal : shapely.Polygon or shapely.MultiPolygon
        Valid, in the units of ``step``.
    step : float
        The grid spacing.
    """
    xy, ring, part_of_ring = _coordinates(polygonal)
    # 2m, m from the largest move per axis: step / 2, and the float error of rounding
    scale = max(1.0, float(np.abs(xy).max())) if len(xy) else 1.0
    reach = 2 * math.sqrt(2) * (step / 2 + 4 * float(np.spacing(scale)))
    first = np.flatnonzero(ring[1:] == ring[:-1])  # segment k: xy[first[k]] → xy[first[k] + 1]
    start, end = xy[first], xy[first + 1]
    if len(first) == 0 or (np.hypot(*(end - start).T) <= reach).any():
        return None
    vertex, segment = shapely.STRtree(_segments(start, end)).query(
        shapely.points(start), predicate="dwithin", distance=reach)
    near = ~_is_end(start[vertex], start[segment], end[segment])
    if near.any():
        noded = _noded(xy, ring, first, vertex[near], segment[near], reach, scale)
        if noded is None:
            return None
        polygonal = _rebuilt(polygonal, *noded, part_of_ring)
    return rounded(polygonal, step)


def lattice_rounding(polygonal: shapely.Geometry, grid: tuple[float, float, float],
                     step: float = PRECISION_PX) -> shapely.Geometry | None:
    """``polygonal`` rounded to the ``step`` grid, when its vertices are points of the
    lattice ``grid`` and the lattice proves the bound of :func:`proven_rounding`; else None
    (which says nothing: check the rounding otherwise).

    A traced outline's vertices are pixel corners of the working grid: in QuPath's frame,
    ``(x0 + spacing·i, y0 + spacing·j)`` for integers i, j. On a lattice the bound needs no
    search. Take a segment from p to q = p + g·u, u a primitive integer vector (g the gcd of
    q − p): in lattice units the cross product of q − p with r − p, r any lattice point, is
    an integer multiple of g, so a lattice point off the segment's line lies at least
    ``spacing / |u|`` from it, and one on the line beyond its ends at least
    ``spacing·|u|``. So the bound holds when ``spacing / |u|`` exceeds 2m (plus the
    coordinates' float error) for every segment, once the vertices on the segments'
    interiors — the lattice points p + k·u, 0 < k < g, found exactly — are made vertices of
    those segments too (the pieces keep u; touches that would link rings in a cycle are
    refused, as in :func:`proven_rounding`). The coordinates must be the lattice points to
    float error, and those at one lattice point equal (else None: rounding could merge
    different coordinates there unchecked).

    Parameters
    ----------
    polygonal : shapely.Polygon or shapely.MultiPolygon
        Valid, in the units of ``step``.
    grid : (spacing, x0, y0)
        The lattice, spacing > 0.
    step : float
        The rounding grid's spacing.
    """
    on_grid = _lattice_rounded(polygonal, grid, step)
    return None if on_grid is None else _rebuilt(polygonal, *on_grid)


def _lattice_rounded(polygonal: shapely.Geometry, grid: tuple[float, float, float],
                     step: float = PRECISION_PX
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`lattice_rounding` as the rounded coordinates, each one's ring and each ring's
    part (as :func:`_coordinates` gives them, with the touches' vertices inserted)."""
    spacing, x0, y0 = (float(v) for v in grid)
    xy, ring, part_of_ring = _coordinates(polygonal)
    if not (spacing > 0 and len(xy)):
        return None
    origin = np.array([x0, y0])
    ij = np.rint((xy - origin) / spacing)
    scale = max(1.0, float(np.abs(xy).max()), float(np.abs(origin).max()))
    float_error = 16 * float(np.spacing(scale))  # the frame transform's few roundings
    if not (np.abs(ij * spacing + origin - xy) <= float_error).all():
        return None  # not on the lattice (e.g. clipped at the slide's edge)
    if np.abs(ij).max() >= 2**31:
        return None  # beyond what the int64 keys below hold
    ij = ij.astype(np.int64)
    reach = 2 * math.sqrt(2) * (step / 2 + 4 * float(np.spacing(scale))) + 4 * float_error
    first = np.flatnonzero(ring[1:] == ring[:-1])  # segment k: ij[first[k]] → ij[first[k] + 1]
    along = ij[first + 1] - ij[first]
    g = np.gcd(along[:, 0], along[:, 1])
    if len(first) == 0 or (g == 0).any():
        return None
    unit = along // g[:, None]
    if spacing / math.sqrt(float((unit.astype(np.float64) ** 2).sum(axis=1).max())) <= reach:
        return None  # a long, steep segment: a lattice point may come too near it
    n_inside = g - 1
    if n_inside.sum() > 10 * len(xy) + 1_000_000:
        return None  # lattice points on segments far outnumber vertices: not worth it
    touches = _lattice_touches(ij, ring, first, unit, n_inside)
    if touches is None:
        return None
    on, vertex, keys, by_place = touches
    # The bound holds for the lattice points; the coordinates are within float error of
    # them, which rounding could merge: two different coordinates at one lattice point
    # would become one place that no check saw. Refused: traced vertices at one place are
    # computed from the same pixel corner, so they are equal. (A ring's closing vertex is
    # its first one: ``first`` leaves it out.)
    place_of, at = by_place
    same_place = np.flatnonzero(place_of[1:] == place_of[:-1])
    if (xy[first[at[same_place]]] != xy[first[at[same_place + 1]]]).any():
        return None
    if len(on):
        n_rings = int(ring.max()) + 1
        if not _places_form_a_forest(keys // n_rings, keys % n_rings):
            return None
        xy, ring = _inserted(xy, ring, first, on, xy[first[vertex]])[:2]
    # Rounded, with nothing to remove: a segment's ends are distinct lattice points (g > 0
    # above), ≥ spacing > 2m apart, so they round to distinct points (:func:`rounded`,
    # which looks for repeated points, costs 3× as much).
    return _on_grid(xy, step), ring, part_of_ring


def _lattice_touches(ij: np.ndarray, ring: np.ndarray, first: np.ndarray, unit: np.ndarray,
                     n_inside: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                tuple[np.ndarray, np.ndarray]] | None:
    """The vertices lying inside segments, exactly, on the lattice: (segment, vertex) index
    pairs into ``first`` (one vertex per place), the keys place · n_rings + ring of the
    vertices and of these touches, sorted (n_rings: ``ring.max() + 1``), and the vertices'
    places in that order with the indices into ``first`` that sort them; or None when a ring
    touches itself (no valid polygon's ring does) or the keys would not fit in int64.

    ``ij``: int64 lattice coordinates; segment k runs from ``ij[first[k]]`` in steps of
    ``unit[k]``, with ``n_inside[k]`` lattice points strictly inside it.
    """
    low = ij.min(axis=0)
    span = ij.max(axis=0) - low + 1
    n_rings = int(ring.max()) + 1
    if float(span[0]) * float(span[1]) * n_rings >= 2.0**62:
        return None

    def key(points: np.ndarray) -> np.ndarray:
        return (points[:, 0] - low[0]) * span[1] + (points[:, 1] - low[1])

    on = np.repeat(np.arange(len(first)), n_inside)
    k = np.arange(len(on)) - np.repeat(np.cumsum(n_inside) - n_inside, n_inside) + 1
    inside = key(ij[first[on]] + k[:, None] * unit[on])
    # the vertices by (place, ring), searched instead of np.isin (hashing: 4× the time)
    vertex_ring_key = key(ij[first]) * n_rings + ring[first]
    by_key = np.argsort(vertex_ring_key)
    sorted_key = vertex_ring_key[by_key]
    at = np.minimum(np.searchsorted(sorted_key, inside * n_rings), len(sorted_key) - 1)
    touch = sorted_key[at] // n_rings == inside  # some vertex lies there
    on, inside, at = on[touch], inside[touch], at[touch]
    same = np.minimum(np.searchsorted(sorted_key, inside * n_rings + ring[first[on]]),
                      len(sorted_key) - 1)
    if (sorted_key[same] == inside * n_rings + ring[first[on]]).any():
        return None  # a ring touching itself
    by_place = (sorted_key // n_rings, by_key)
    if len(on):  # the touches' keys merged into the vertices' sorted ones
        touch_key = np.sort(inside * n_rings + ring[first[on]])
        sorted_key = np.insert(sorted_key, np.searchsorted(sorted_key, touch_key), touch_key)
    return on, by_key[at], sorted_key, by_place


def _coordinates(polygonal: shapely.Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ring's coordinates (closing vertex included), each one's ring, and each ring's
    part (polygon) of ``polygonal``."""
    if polygonal.geom_type == "Polygon":  # its one part (get_parts would copy it: 1 ms)
        rings = shapely.get_rings(polygonal)
        part_of_ring = np.zeros(len(rings), dtype=np.intp)
    else:
        rings, part_of_ring = shapely.get_rings(shapely.get_parts(polygonal),
                                                return_index=True)
    xy, ring = shapely.get_coordinates(rings, return_index=True)
    return xy, ring, part_of_ring


def _rebuilt(polygonal: shapely.Geometry, xy: np.ndarray, ring: np.ndarray,
             part_of_ring: np.ndarray) -> shapely.Geometry:
    """``polygonal`` (of the type it is) from coordinates as :func:`_coordinates` gives
    them, with vertices inserted."""
    ring_ends = np.cumsum(np.bincount(ring))  # rings and parts numbered in order, from 0
    part_ends = np.cumsum(np.bincount(part_of_ring))
    polygons = shapely.from_ragged_array(  # one call, not a linear ring object per ring
        shapely.GeometryType.POLYGON, np.ascontiguousarray(xy, dtype=np.float64),
        (np.r_[0, ring_ends].astype(np.int64), np.r_[0, part_ends].astype(np.int64)))
    return polygons[0] if polygonal.geom_type == "Polygon" else shapely.multipolygons(polygons)


def _segments(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    return shapely.linestrings(np.stack([start, end], axis=1))


def _is_end(at: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    return (at == start).all(axis=1) | (at == end).all(axis=1)


def _noded(xy: np.ndarray, ring: np.ndarray, first: np.ndarray, vertex: np.ndarray,
           segment: np.ndarray, reach: float, scale: float
           ) -> tuple[np.ndarray, np.ndarray] | None:
    """Coordinates and ring ids with each ``vertex`` (the start of that segment) that lies on
    ``segment`` (to rounding error, away from its ends) inserted into it; None when one of
    them is only near it, when the touches would link rings in a cycle, or when a piece or
    a vertex near a piece breaks the bound. ``scale``: the coordinates' largest magnitude
    (at least 1), which sets the float error of "on"."""
    at, at_ring, on_ring = xy[first[vertex]], ring[first[vertex]], ring[first[segment]]
    start, end = xy[first[segment]], xy[first[segment] + 1]
    on = shapely.distance(shapely.points(at), _segments(start, end))
    ends_apart = np.minimum(np.hypot(*(at - start).T), np.hypot(*(at - end).T)) > reach
    if not ((on <= 1e-10 * scale) & ends_apart).all():
        return None
    # a vertex within float error of a segment may be a touch or a gap: joining a gap is
    # harmless unless it closes a cycle of touching rings (which cuts the interior)
    if (at_ring == on_ring).any() or not _touches_form_a_forest(
            xy[first], ring[first], at, on_ring):
        return None
    noded, noded_ring, inserted = _inserted(xy, ring, first, segment, at)
    # every piece of a split segment ends at an inserted vertex: check those pieces alone
    # (the other pairs were checked above, and an inserted vertex is one that was there)
    k = np.flatnonzero((noded_ring[1:] == noded_ring[:-1]) & (inserted[1:] | inserted[:-1]))
    a, b = noded[k], noded[k + 1]
    if (np.hypot(*(b - a).T) <= reach).any():
        return None
    piece, vertex = shapely.STRtree(shapely.points(noded)).query(
        _segments(a, b), predicate="dwithin", distance=reach)
    if not _is_end(noded[vertex], a[piece], b[piece]).all():
        return None
    return noded, noded_ring


def _inserted(xy: np.ndarray, ring: np.ndarray, first: np.ndarray, segment: np.ndarray,
              at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates and ring ids with each point ``at`` (lying on ``segment``, away from its
    ends) inserted into that segment, once per place, and which vertices were inserted."""
    start, end = xy[first[segment]], xy[first[segment] + 1]
    along = end - start
    t = ((at - start) * along).sum(axis=1) / (along * along).sum(axis=1)
    keys = np.unique(np.column_stack([first[segment] + t, at]), axis=0)  # one per place
    order = np.argsort(np.r_[np.arange(len(xy), dtype=np.float64), keys[:, 0]], kind="stable")
    inserted = (order >= len(xy))
    noded = np.concatenate([xy, keys[:, 1:]])[order]
    noded_ring = np.r_[ring, ring[np.floor(keys[:, 0]).astype(np.intp)]][order]
    return noded, noded_ring, inserted


def _touches_form_a_forest(xy: np.ndarray, ring: np.ndarray, at: np.ndarray,
                           at_ring: np.ndarray) -> bool:
    """Whether the places where rings meet — each vertex ``xy`` of ring ``ring`` shared with
    another ring, and each ``at`` put on ring ``at_ring`` — link no rings in a cycle (those
    of a valid polygon do not: a cycle would cut its interior in two)."""
    places, rings = np.concatenate([xy, at]), np.r_[ring, at_ring].astype(np.int64)
    order = np.lexsort((rings, places[:, 1], places[:, 0]))
    places, rings = places[order], rings[order]
    new_place = np.r_[True, (places[1:] != places[:-1]).any(axis=1)]
    return _places_form_a_forest(np.cumsum(new_place), rings)


def _places_form_a_forest(place: np.ndarray, rings: np.ndarray) -> bool:
    """:func:`_touches_form_a_forest` of ids: ``place`` (int64, one id per place) and
    ``rings`` (int64), sorted by (place, ring)."""
    new_place = np.r_[True, place[1:] != place[:-1]]
    pair = new_place | np.r_[True, rings[1:] != rings[:-1]]  # each ring once per place
    links = np.column_stack([(np.cumsum(new_place) - 1)[pair], rings[pair]])
    links = links[np.bincount(links[:, 0])[links[:, 0]] > 1]  # places of several rings
    if len(links) == 0:
        return True
    # the graph of rings and places, each ring linked to the places on it: a forest iff
    # links = nodes − components
    ring_node = np.unique(links[:, 1], return_inverse=True)[1].ravel()
    place_node = np.unique(links[:, 0], return_inverse=True)[1].ravel()
    n_rings, n_nodes = ring_node.max() + 1, ring_node.max() + 1 + place_node.max() + 1
    graph = coo_matrix((np.ones(len(links)), (ring_node, n_rings + place_node)),
                       shape=(n_nodes, n_nodes))
    return len(links) == n_nodes - connected_components(graph, directed=False)[0]
