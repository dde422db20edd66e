"""A component's simplified polygon spliced from its chunks' fragments.

Simplification is local to a chunk (:mod:`~wsiseg.contours.simplify`): a ring is cut into
runs at its vertices on the chunk grid lines and where rings touch, and a polygon's runs in one
chunk are simplified together. So a component's simplified outline is its chunks' simplified
runs, linked end to start on the grid lines, with the stretches along the lines between them.
A *fragment* is that part of one chunk: the runs of the component's pieces there, simplified,
and the pieces' edges along the chunk's sides. It depends on the chunk's tumor mask and on which
of its pieces the component holds, so the memo of :mod:`~wsiseg.contours.cache` keeps it; a refine
round that changes one chunk of a large tumor computes one fragment and links a few hundred
runs, instead of joining and simplifying the tumor's tens of thousands of vertices.

:func:`splice` gives the very polygon that :func:`~wsiseg.contours.join.join_pieces` followed
by simplification gives (the same runs, in the same groups, in the same order; the same ring
starts and ring order): on the grid lines the pieces' edges cancel where two pieces face each
other (interval arithmetic per line instead of unit edges), and the runs and the edges left are
linked by :func:`~wsiseg.contours.join.linked`, which decides at a pinch corner from the
directions of the exact edges that meet there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import shapely
from numpy.typing import NDArray

from wsiseg.contours.cache import TRACES
from wsiseg.contours.join import linked, ring_neighbours, ring_polygons
from wsiseg.contours.simplify import cut_runs, simplify_runs, without_collinear

_Y = np.int64(1) << 32  # vertex key y·2³² + x: the (y, x) order of integer vertices


class Fragment(NamedTuple):
    """One chunk's part of a component's outline: its runs (each from a kept vertex, or a
    vertex kept from collapsing a chord, to the next), simplified, and its edges on the grid.
    """

    start: NDArray[np.int64]  # (k, 2) each run's first vertex
    end: NDArray[np.int64]  # (k, 2) the vertex closing it
    heading_out: NDArray[np.int64]  # (k, 2) the unit direction of its first exact edge
    heading_in: NDArray[np.int64]  # (k, 2) ... and of its last
    twice_area: NDArray[np.float64]  # (k,) its share of the rings' twice signed area (exact)
    lowest: NDArray[np.int64]  # (k,) its smallest vertex key, closing vertex excluded
    lowest_first: NDArray[np.bool_]  # (k,) ... at its first vertex
    anchor: NDArray[np.bool_]  # (k,) its first vertex is one that can start a ring
    simple: NDArray[np.int64]  # (m, 2) the simplified runs' vertices, closing ones included
    simple_sizes: NDArray[np.intp]  # (k,) each run's vertex count in ``simple``
    grid_start: NDArray[np.int64]  # (g, 2) the pieces' edges along grid lines
    grid_end: NDArray[np.int64]  # (g, 2)


def fragment(pieces: Sequence[shapely.Polygon], block: tuple[int, int], tolerance_px: float,
             key: bytes | None = None) -> Fragment:
    """The fragment of a component's ``pieces`` in one chunk of the grid ``block`` (rows,
    cols), simplified by ``tolerance_px``. ``key``: what identifies the chunk's trace and
    these pieces in it; the fragment is then looked up in (and added to) the memo."""
    if key is not None:
        digest = hashlib.blake2b(key, digest_size=20)
        digest.update(np.asarray([*block], dtype=np.int64).tobytes())
        digest.update(np.float64(tolerance_px).tobytes())
        memo_key = b"fragment" + digest.digest()
        hit = TRACES.get(memo_key)
        if hit is not None:
            return hit
    runs = cut_runs(np.asarray(pieces, dtype=object), block, one=True)
    simple, simple_sizes = simplify_runs(runs, tolerance_px, memo=False)
    xy, first, closing, size = runs.xy, runs.first, runs.closing, runs.size
    # each vertex's successor in its ring, for the exact area and the last edges' directions
    nxt = xy[ring_neighbours(runs.vertex_ring)[1]]
    cross = (xy[:, 0] * nxt[:, 1] - nxt[:, 0] * xy[:, 1]).astype(np.float64)
    vertex_key = xy[:, 1] * _Y + xy[:, 0]
    twice_area = np.add.reduceat(cross, first)
    lowest = np.minimum.reduceat(vertex_key, first)
    before_closing = first + size - 2  # the last vertex before the closing one
    g = runs.groups
    # a ring starts at its first kept vertex (not at a cut that keeps a chord from
    # collapsing), or a ring without one (one closed run) at its own start
    anchor = runs.kept[first[g]] | (closing[g] == first[g])
    frag = Fragment(
        start=xy[first[g]], end=xy[closing[g]],
        heading_out=np.sign(nxt[first[g]] - xy[first[g]]),
        heading_in=np.sign(xy[closing[g]] - xy[before_closing[g]]),
        twice_area=twice_area[g], lowest=lowest[g],
        lowest_first=vertex_key[first[g]] == lowest[g], anchor=anchor,
        simple=simple, simple_sizes=simple_sizes,
        grid_start=xy[first[runs.along_line]], grid_end=xy[closing[runs.along_line]],
    )
    if key is not None:
        TRACES.put(memo_key, frag, sum(a.nbytes for a in frag) + 1_000)
    return frag


def splice(fragments: Sequence[Fragment]) -> tuple[shapely.Polygon | None, float]:
    """The component's simplified polygon from its fragments, and its exact area (px²).

    The polygon is None where a ring would fall below three vertices (the caller keeps the
    exact outline, as :func:`~wsiseg.contours.simplify._finish` does).
    """
    parts = [np.concatenate([getattr(f, name) for f in fragments])
             for name in Fragment._fields]
    frag = Fragment(*parts)
    g_start, g_end = _unshared_on_grid(frag.grid_start, frag.grid_end)
    heading = np.sign(g_end - g_start)
    g_key = g_start[:, 1] * _Y + g_start[:, 0]
    start = np.concatenate([frag.start, g_start])
    end = np.concatenate([frag.end, g_end])
    twice = np.r_[frag.twice_area,
                  (g_start[:, 0] * g_end[:, 1] - g_end[:, 0] * g_start[:, 1]).astype(float)]
    lowest = np.r_[frag.lowest, g_key]
    lowest_first = np.r_[frag.lowest_first, np.ones(len(g_key), dtype=bool)]
    anchor = np.r_[frag.anchor, np.ones(len(g_key), dtype=bool)]
    walk, ring_id = linked(start, end, np.concatenate([frag.heading_out, heading]),
                           np.concatenate([frag.heading_in, heading]))

    # each ring from its first anchor at or after its smallest vertex, rings by that vertex
    n_rings = int(ring_id[-1]) + 1
    ring_first = np.searchsorted(ring_id, np.arange(n_rings))
    ring_len = np.diff(np.r_[ring_first, len(walk)])
    position = np.arange(len(walk)) - ring_first[ring_id]
    low = lowest[walk]
    ring_low = np.minimum.reduceat(low, ring_first)
    big = np.int64(len(walk) + 1)
    at_low = np.minimum.reduceat(np.where(low == ring_low[ring_id], position, big), ring_first)
    from_ = at_low + ~lowest_first[walk[ring_first + at_low]]  # past it when inside a run
    ahead = (position - from_[ring_id]) % ring_len[ring_id]
    shift = np.minimum.reduceat(np.where(anchor[walk], ahead, big), ring_first)
    begin = (from_ + shift) % ring_len
    rotated = walk[ring_first[ring_id] + (position + begin[ring_id]) % ring_len[ring_id]]
    twice_ring = np.bincount(ring_id, weights=twice[walk], minlength=n_rings)
    shells = np.flatnonzero(twice_ring > 0)
    if len(shells) != 1:  # would mean pixels that are not one 4-connected component
        raise AssertionError(f"spliced fragments have {len(shells)} shells, expected 1")
    holes = np.flatnonzero(twice_ring < 0)
    rank = np.empty(n_rings, dtype=np.intp)
    order = np.r_[shells, holes[np.argsort(ring_low[holes])]]
    rank[order] = np.arange(n_rings)
    by_rank = np.argsort(rank[ring_id], kind="stable")
    paths, path_ring = rotated[by_rank], rank[ring_id][by_rank]

    # the paths' simplified vertices, each without its last (the next path's first)
    n_runs = len(frag.start)
    sizes = np.r_[frag.simple_sizes, 2]  # (a last one for grid edges: no run may exist)
    offsets = np.cumsum(sizes) - sizes
    runs = paths < n_runs
    count = np.where(runs, sizes[np.minimum(paths, n_runs)] - 1, 1)
    origin = np.where(runs, offsets[np.minimum(paths, n_runs)], paths - n_runs)
    at = np.repeat(origin - np.cumsum(count) + count, count) + np.arange(count.sum())
    from_runs = np.repeat(runs, count)
    xy = np.empty((len(at), 2), dtype=np.int64)
    xy[from_runs] = frag.simple[at[from_runs]]
    xy[~from_runs] = g_start[at[~from_runs]]
    xy, vertex_ring = without_collinear(xy, np.repeat(path_ring, count))
    area = float(twice_ring.sum()) / 2
    if (np.bincount(vertex_ring, minlength=n_rings) < 3).any():
        return None, area
    return ring_polygons(xy, vertex_ring, np.arange(n_rings))[0], area


def _unshared_on_grid(start: NDArray[np.int64], end: NDArray[np.int64]
                      ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The stretches of these edges along grid lines that no edge of the opposite direction
    covers (two pieces facing each other there), cut wherever an edge on the line ends.

    On one line the edges of one direction are disjoint (they bound distinct pixels of
    one side), so each stretch between two consecutive ends is covered by at most one edge
    of each direction: it stays when exactly one covers it.
    """
    if len(start) == 0:
        return start, end
    vertical = start[:, 0] == end[:, 0]
    line = np.where(vertical, start[:, 0], start[:, 1]) * 2 + ~vertical
    p0 = np.where(vertical, start[:, 1], start[:, 0])
    p1 = np.where(vertical, end[:, 1], end[:, 0])
    lo, hi, up = np.minimum(p0, p1), np.maximum(p0, p1), p1 > p0
    span = int(hi.max()) + 1
    cut = np.unique(np.r_[line * span + lo, line * span + hi])
    at_lo, at_hi = np.searchsorted(cut, line * span + lo), np.searchsorted(cut, line * span + hi)
    cover = np.zeros((2, len(cut) + 1), dtype=np.int64)  # edges heading up / down the line
    np.add.at(cover, (up.astype(np.intp), at_lo), 1)
    np.add.at(cover, (up.astype(np.intp), at_hi), -1)
    cover = np.cumsum(cover, axis=1)[:, :len(cut)]  # over [cut[k], cut[k + 1])
    stays = np.flatnonzero(cover[0, :-1] != cover[1, :-1])
    heads_up = cover[1][stays] > 0
    line_of, a = np.divmod(cut[stays], span)
    b = cut[stays + 1] % span
    a, b = np.where(heads_up, a, b), np.where(heads_up, b, a)
    value, is_row = np.divmod(line_of, 2)
    start_out = np.where(is_row[:, None], np.column_stack([a, value]), np.column_stack([value, a]))
    end_out = np.where(is_row[:, None], np.column_stack([b, value]), np.column_stack([value, b]))
    return start_out.astype(np.int64), end_out.astype(np.int64)
