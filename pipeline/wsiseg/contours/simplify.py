"""Finishing whole components: small ones dropped, outlines simplified chunk by chunk, valid.

Douglas–Peucker with topology preserved (GEOS's ``TopologyPreservingSimplifier``), but local:
each ring is cut into *runs* at its vertices on the chunk grid lines and at the corners where
two rings touch (those vertices are kept), and a polygon's runs inside one chunk are
simplified together, as the lines of one MultiLineString (GEOS keeps a line's end points and
keeps the lines from crossing). So a chunk's simplified outline is a function of that
chunk's outline alone: a refine round simplifies only the chunks it changed (the others come
from the memo of :mod:`~wsiseg.contours.cache`), however large the tumor it touches, and a
from-scratch run gives the very same polygons.

Why the result is valid without a check of the whole polygon: a simplified segment joins two
vertices of one run, and every vertex of a run but its ends lies strictly inside the run's
chunk, so a segment lies inside the chunk but for an end on a grid line. Segments of
different chunks therefore meet only at kept vertices, where their rings met before; within
a chunk GEOS keeps the lines apart. The one way out — a run whose two ends lie on the same
grid line shrinking to the chord between them, along the line — is closed by also keeping
the run's vertex farthest from that line. A closed run (a ring inside one
chunk) that would collapse below a triangle is kept exact.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import shapely
from numpy.typing import NDArray

from wsiseg.contours.cache import TRACES
from wsiseg.contours.join import ring_neighbours, ring_polygons


def _finish(
    exact: list[shapely.Polygon], simplify_px: float, min_area_px: float,
    block: tuple[int, int], memo: bool = False,
) -> tuple[list[shapely.Polygon], NDArray[np.intp]]:
    """Whole components → dropped below ``min_area_px``, simplified by ``simplify_px`` on the
    chunk grid of ``block`` (rows, cols). ``memo``: look each chunk's simplified runs up in
    (and add them to) :data:`~wsiseg.contours.cache.TRACES`.

    Returns the polygons and, for each, the index in ``exact`` of the component it came from.
    """
    polygons = np.asarray(exact, dtype=object)
    source = np.flatnonzero(shapely.area(polygons) >= min_area_px)
    polygons = polygons[source]
    if simplify_px <= 0 or len(polygons) == 0:
        return polygons.tolist(), source
    return _simplified(polygons, simplify_px, block, memo).tolist(), source


def _simplified(polygons: NDArray[np.object_], tolerance_px: float, block: tuple[int, int],
                memo: bool) -> NDArray[np.object_]:
    """Pixel-edge polygons (integer vertices) simplified run by run; see the module."""
    runs = cut_runs(polygons, block)
    simple_all, simple_sizes = simplify_runs(runs, tolerance_px, memo)

    # rings again: each run without its last vertex (the next run's first), in ring order;
    # a run along a grid line is its first vertex alone
    xy, groups = runs.xy, runs.groups
    kept_len = np.ones(len(runs.first), dtype=np.intp)
    source = runs.first.copy()  # where a run's vertices start: in xy, or in simple_all
    from_simple = np.zeros(len(runs.first), dtype=bool)
    kept_len[groups] = simple_sizes - 1
    source[groups] = np.cumsum(simple_sizes) - simple_sizes
    from_simple[groups] = True
    start = np.cumsum(kept_len) - kept_len
    run_of = np.repeat(np.arange(len(runs.first)), kept_len)
    offset = np.arange(len(run_of)) - start[run_of]
    take = source[run_of] + offset
    along = ~from_simple[run_of]
    ring_xy = np.empty((len(run_of), 2), dtype=np.int64)
    ring_xy[along] = xy[take[along]]
    ring_xy[~along] = simple_all[take[~along]]
    ring_id = runs.ring[run_of]
    ring_xy, ring_id = without_collinear(ring_xy, ring_id)
    n_rings = len(runs.ring_poly)
    counts = np.bincount(ring_id, minlength=n_rings)
    out = polygons.copy()
    good = np.bincount(runs.ring_poly, weights=counts < 3, minlength=len(polygons)) == 0
    keep = good[runs.ring_poly[ring_id]]  # the vertices of the good polygons' rings
    if keep.any():
        rings_kept = np.flatnonzero(good[runs.ring_poly])  # (every such ring has vertices)
        out[good] = ring_polygons(ring_xy[keep], _dense(ring_id[keep]),
                                  np.arange(len(rings_kept)), _dense(runs.ring_poly[rings_kept]))
    return out


class Runs(NamedTuple):
    """Rings cut into runs (see the module): vertices in ring order, each ring from its first
    kept vertex (else its top-left one), and per run where it starts and ends."""

    xy: NDArray[np.int64]  # (n, 2) the rings' vertices, grid crossings added
    vertex_ring: NDArray[np.intp]  # (n,) each vertex's ring
    kept: NDArray[np.bool_]  # (n,) on a grid line, or where rings touch: a run ends there
    ring_poly: NDArray[np.intp]  # (rings,) each ring's polygon
    first: NDArray[np.intp]  # (runs,) each run's first vertex in xy
    closing: NDArray[np.intp]  # (runs,) the vertex closing it: the next run's first
    size: NDArray[np.intp]  # (runs,) its vertex count, the closing one included
    ring: NDArray[np.intp]  # (runs,) its ring
    along_line: NDArray[np.bool_]  # (runs,) one segment along a grid line: never moves
    groups: NDArray[np.intp]  # the other runs, by chunk and start (the simplifier's order)
    group_edges: NDArray[np.intp]  # where each chunk's runs start in ``groups``, and the end


def cut_runs(polygons: NDArray[np.object_], block: tuple[int, int], one: bool = False
             ) -> Runs:
    """The rings of pixel-edge ``polygons`` cut into runs on the chunk grid of ``block``;
    ``one``: the polygons are pieces of one (their rings touch as one polygon's)."""
    rings, ring_poly = shapely.get_rings(polygons, return_index=True)
    if one:
        ring_poly = np.zeros_like(ring_poly)
    coords, vertex_ring = shapely.get_coordinates(rings, return_index=True)
    open_ = np.r_[vertex_ring[1:] != vertex_ring[:-1], True]  # drop each closing vertex
    xy, vertex_ring = _with_grid_crossings(coords[~open_].astype(np.int64),
                                           vertex_ring[~open_], block)
    n_rings = len(rings)
    ring_start = np.searchsorted(vertex_ring, np.arange(n_rings))
    ring_len = np.diff(np.r_[ring_start, len(xy)])

    width = int(xy.max()) + 2
    cell = xy[:, 1] * width + xy[:, 0]
    kept = _on_grid(xy, block) | _touching(cell + ring_poly[vertex_ring] * width * width)
    order = _rotated(cell, kept, vertex_ring, ring_start, ring_len)
    xy, kept = xy[order], kept[order]  # each ring from its first kept (else top-left) vertex
    is_start = np.zeros(len(xy), dtype=bool)
    is_start[ring_start] = True
    cut = kept | is_start
    cut[_farthest_on_chords(xy, cut, vertex_ring, ring_start, ring_len, block)] = True

    run_first = np.flatnonzero(cut)
    run_ring = vertex_ring[run_first]
    run_last = np.r_[run_first[1:], len(xy)]  # exclusive
    ring_end = ring_start + ring_len
    closing = np.where(run_last == ring_end[run_ring], ring_start[run_ring], run_last)
    run_size = run_last - run_first + 1  # with the vertex that closes it (next run's first)
    # a run's chunk: where its second vertex lies (strictly inside: it is no kept vertex),
    # or for a run of one segment its midpoint; a segment along a grid line is in no chunk
    # (it cannot change, and no simplified segment of either side can cross it)
    a, b = xy[run_first], xy[closing]
    second = np.where((run_size > 2)[:, None], xy[np.minimum(run_first + 1, len(xy) - 1)], b)
    twice_inside = np.where((run_size > 2)[:, None], 2 * second, a + b)
    step = np.array([block[1], block[0]])
    chunk_xy = twice_inside // (2 * step)
    n_cols = -(-width // block[1]) + 1
    run_cell = (ring_poly[run_ring] * (-(-width // block[0]) + 1) + chunk_xy[:, 1]
                ) * n_cols + chunk_xy[:, 0]
    along_line = (run_size <= 2) & (((a[:, 0] == b[:, 0]) & (a[:, 0] % block[1] == 0))
                                    | ((a[:, 1] == b[:, 1]) & (a[:, 1] % block[0] == 0)))

    movable = np.flatnonzero(~along_line)
    # by chunk, and within one by where each run starts and heads: GEOS's result depends on
    # the order of the lines, which must not depend on how the polygon's rings were listed
    groups = movable[np.lexsort((second[movable, 0], second[movable, 1], a[movable, 0],
                                 a[movable, 1], run_cell[movable]))]
    bounds = np.flatnonzero(np.diff(run_cell[groups])) + 1
    return Runs(xy, vertex_ring, kept, ring_poly, run_first, closing, run_size, run_ring,
                along_line, groups, np.r_[0, bounds, len(groups)])


def simplify_runs(runs: Runs, tolerance_px: float, memo: bool
                  ) -> tuple[NDArray[np.int64], NDArray[np.intp]]:
    """The runs of ``runs.groups`` simplified chunk by chunk: their vertices one after the
    other (each run's closing vertex included) and each one's vertex count."""
    groups = runs.groups
    # each run's vertices and the one closing it, one after the other
    sizes = runs.size[groups]
    ends = np.cumsum(sizes)
    at = np.arange(ends[-1] if len(ends) else 0) + np.repeat(runs.first[groups] - ends + sizes,
                                                             sizes)
    at[ends - 1] = runs.closing[groups]
    flat = runs.xy[at]
    vertex_edges = np.r_[0, ends][runs.group_edges]
    simple_xy, simple_sizes = [np.zeros((0, 2), dtype=np.int64)], [np.zeros(0, dtype=np.intp)]
    for g in range(len(runs.group_edges) - 1):
        if runs.group_edges[g] == runs.group_edges[g + 1]:
            continue
        runs_xy, runs_sizes = _chunk_simplified(
            flat[vertex_edges[g]:vertex_edges[g + 1]],
            sizes[runs.group_edges[g]:runs.group_edges[g + 1]], tolerance_px, memo)
        simple_xy.append(runs_xy)
        simple_sizes.append(runs_sizes)
    return np.concatenate(simple_xy), np.concatenate(simple_sizes)


def _with_grid_crossings(xy: NDArray[np.int64], vertex_ring: NDArray[np.intp],
                         block: tuple[int, int]) -> tuple[NDArray[np.int64], NDArray[np.intp]]:
    """Each ring with a vertex added where an edge crosses a grid line (pixel-edge rings
    have only axis-parallel edges), so that no run reaches into two chunks."""
    nxt = xy[ring_neighbours(vertex_ring)[1]]
    lo, hi = np.minimum(xy, nxt), np.maximum(xy, nxt)
    step = np.array([block[1], block[0]])  # (x, y) spacing of the lines
    crossings = np.maximum((hi - 1) // step - lo // step, 0).sum(axis=1)  # one axis moves
    if not crossings.any():
        return xy, vertex_ring
    owner = np.repeat(np.arange(len(xy)), crossings + 1)
    k = np.arange(len(owner)) - np.repeat(np.cumsum(crossings + 1) - crossings - 1,
                                          crossings + 1)  # 0: the vertex, 1..n: crossings
    direction = np.sign(nxt - xy)[owner]
    start = xy[owner]
    # the k-th line after the start in the direction of travel
    first_line = np.where(direction > 0, (start // step + 1) * step,
                          ((start - 1) // step) * step)
    line = first_line + (k[:, None] - 1) * step * direction
    out = np.where((k[:, None] > 0) & (direction != 0), line, start)
    return out, vertex_ring[owner]


def _on_grid(xy: NDArray[np.int64], block: tuple[int, int]) -> NDArray[np.bool_]:
    return (xy[:, 0] % block[1] == 0) | (xy[:, 1] % block[0] == 0)


def _touching(key: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Vertices that a polygon's rings pass more than once (``key``: polygon and vertex):
    where two rings touch, or one ring passes a corner twice."""
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    return counts[inverse] > 1


def _rotated(cell: NDArray[np.int64], kept: NDArray[np.bool_], vertex_ring: NDArray[np.intp],
             ring_start: NDArray[np.intp], ring_len: NDArray[np.intp]) -> NDArray[np.intp]:
    """Vertex order with each ring starting at its first kept vertex, or at its smallest
    (y, x) vertex when none is kept (a ring inside one chunk: the start DP keeps)."""
    position = np.arange(len(cell)) - ring_start[vertex_ring]
    big = np.int64(1) << 24  # > any position in a ring
    # cell * big + position must fit in int64: maps up to ~740 000 px a side
    if ring_len.max() > big or cell.max() >= np.iinfo(np.int64).max // big - 1:
        raise ValueError("contour too large to simplify: a ring of more than 2**24 "
                         "vertices, or a map over ~740 000 px a side")
    first_kept = np.minimum.reduceat(np.where(kept, position, big), ring_start)
    top_left = np.minimum.reduceat(cell * big + position, ring_start) % big
    offset = np.where(first_kept < big, first_kept, top_left)
    return ring_start[vertex_ring] + (position + offset[vertex_ring]) % ring_len[vertex_ring]


def _farthest_on_chords(xy, cut, vertex_ring, ring_start, ring_len, block) -> list[int]:
    """For each run whose two ends lie on one grid line, its vertex farthest from the line
    (the first such): kept too, so that the run cannot shrink onto the line."""
    first = np.flatnonzero(cut)
    last = np.r_[first[1:], len(xy)]
    ring = vertex_ring[first]
    end = np.where(last == ring_start[ring] + ring_len[ring], ring_start[ring], last)
    a, b = xy[first], xy[end]
    same_col = (a[:, 0] == b[:, 0]) & (a[:, 0] % block[1] == 0)
    same_row = (a[:, 1] == b[:, 1]) & (a[:, 1] % block[0] == 0)
    same = (a == b).all(axis=1)
    # (a run whose ends coincide is a closed line, kept from collapsing by _chunk_simplified)
    bad = np.flatnonzero((same_col | same_row) & ~same & (last - first >= 2))
    out = []
    for r in bad.tolist():
        inner = xy[first[r] + 1:last[r]]
        axis = 0 if same_col[r] else 1
        distance = np.abs(inner[:, axis] - a[r, axis])
        out.append(int(first[r]) + 1 + int(np.argmax(distance)))
    return out


def _chunk_simplified(flat: NDArray[np.int64], sizes: NDArray[np.intp], tolerance_px: float,
                      memo: bool) -> tuple[NDArray[np.int64], NDArray[np.intp]]:
    """One polygon's runs inside one chunk, simplified together (topology preserved); a
    closed run that would fall below a triangle stays as it is.

    The runs come, and go, as their vertices one after the other and each one's vertex
    count: ``flat`` (n, 2) and ``sizes``; the memo hashes each once, and the lines are
    split only when it misses.
    """
    key = b""
    if memo:
        digest = hashlib.blake2b(np.float64(tolerance_px).tobytes(), digest_size=20)
        digest.update(np.ascontiguousarray(sizes, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(flat).tobytes())
        key = b"runs" + digest.digest()
        hit = TRACES.get(key)
        if hit is not None:
            return hit
    run_of_vertex = np.repeat(np.arange(len(sizes)), sizes)
    collection = shapely.multilinestrings(shapely.linestrings(flat, indices=run_of_vertex))
    parts = shapely.get_parts(shapely.simplify(collection, tolerance_px,
                                               preserve_topology=True))
    simple, run_of_simple = shapely.get_coordinates(parts, return_index=True)
    simple_sizes = np.bincount(run_of_simple, minlength=len(sizes))
    # a closed run simplified below a triangle stays as it was
    starts = np.cumsum(sizes) - sizes
    closed = (flat[starts] == flat[starts + sizes - 1]).all(axis=1)
    as_was = closed & (simple_sizes < 4)
    if as_was.any():
        keep = np.r_[~as_was[run_of_simple], as_was[run_of_vertex]]
        order = np.argsort(np.r_[run_of_simple, run_of_vertex], kind="stable")
        runs = np.concatenate([simple.astype(np.int64), flat])[order]
        result = (runs[keep[order]], np.where(as_was, sizes, simple_sizes).astype(np.intp))
    else:
        result = (simple.astype(np.int64), simple_sizes.astype(np.intp))
    if memo:
        # an entry's objects (key, tuple, two arrays) ≈ 400 B besides the data
        TRACES.put(key, result, result[0].nbytes + result[1].nbytes + 400)
    return result


def without_collinear(xy: NDArray[np.int64], ring_id: NDArray[np.intp]
                       ) -> tuple[NDArray[np.int64], NDArray[np.intp]]:
    """Drop vertices where the ring goes straight on (exact: integer coordinates); such
    vertices are left where a straight stretch crossed a grid line."""
    previous, following = ring_neighbours(ring_id)
    d_in = xy - xy[previous]
    d_out = xy[following] - xy
    cross = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]
    straight = (cross == 0) & ((d_in * d_out).sum(axis=1) > 0)
    return xy[~straight], ring_id[~straight]


def _dense(sorted_ids: NDArray[np.intp]) -> NDArray[np.intp]:
    """0, 0, 1, 2, 2, ... for sorted ids with gaps (5, 5, 7, 9, 9, ...)."""
    return np.concatenate([[0], np.cumsum(np.diff(sorted_ids) != 0)]).astype(np.intp)
