"""GeoJSON text of polygonal geometry whose coordinates lie on QuPath's 0.01-px grid.

Each coordinate is written as its shortest decimal, without the ".0" of integers, as QuPath
writes them (pixel-edge contours are mostly integers). Two writers of the same text:

- :func:`geometry_text` for a shapely geometry, through GEOS's WKT writer;
- :func:`canonical_polygon_text` for a polygon's rings as coordinate arrays, in the
  canonical order the writer gives every geometry (GEOS's ``normalize``, then RFC 7946's
  orientation), found with array operations and written ring by ring, each ring's text
  remembered in refine rounds (:func:`remembering_ring_texts`): a stroke on a tumor of 9 000
  holes changes a few rings, and the text of the others is the same as in the round before.
  For the 61 000 vertices of the 67-Mpx bench slide's largest tumor, GEOS's normalisation,
  orientation and text took 4.6 + 1.5 + 12 ms; from the arrays, its rings' texts known, 8.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

import numpy as np
import shapely
from numpy.typing import NDArray


def geometry_text(polygonal: shapely.Geometry) -> str:
    """GeoJSON text of a non-empty Polygon or MultiPolygon on the 0.01 grid, of no empty
    part (the writer drops those first).

    GEOS's WKT writer with two decimals, trailing zeros trimmed — the shortest decimal of a
    coordinate on the grid — with its punctuation made GeoJSON's: 0.6 s/M vertices against
    GEOS's GeoJSON writer's 1.1 s (its JSON document built first), the same text but for
    -0, written 0.
    """
    wkt = shapely.to_wkt(polygonal, rounding_precision=2, trim=True)
    if polygonal.geom_type == "Polygon":  # POLYGON ((x y, x y), (x y, ...))
        kind, depth = "Polygon", 2
    else:  # MULTIPOLYGON (((x y, ...)), ((...), (...)))
        kind, depth = "MultiPolygon", 3
        wkt = wkt.replace(")), ((", "]]],[[[")
    body = wkt[wkt.index("(") + depth - 1: len(wkt) - depth + 1]  # "(x y, ..., x y)"
    body = body.replace("), (", "]],[[").replace(", ", "],[").replace(" ", ",")
    brackets = depth + 1
    return (f'{{"type":"{kind}","coordinates":{"[" * brackets}{body[1:-1]}'
            f'{"]" * brackets}}}')


#: Bytes of Python objects and dict slot per remembered ring, besides its key and text.
_ENTRY_OVERHEAD = 130


class _RingTexts:
    """Ring texts by the bytes of the ring's coordinates, within a budget of bytes;
    safe across threads. Two generations instead of a least-recently-used order (which cost
    half the lookups' time): texts found are carried into the current generation, and the
    previous one is dropped whole when the current one fills half the budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._texts: dict[bytes, str] = {}  # the current generation
        self._older: dict[bytes, str] = {}
        self._bytes = 0  # the current generation's (keys, texts, overhead)
        self._lock = threading.Lock()

    def get_many(self, keys: list[bytes]) -> list[str | None]:
        with self._lock:
            found = [self._texts.get(key) for key in keys]
            if self._older:
                for k, text in enumerate(found):
                    if text is None and (text := self._older.get(keys[k])) is not None:
                        found[k] = text
                        self._add(keys[k], text)
        return found

    def put_many(self, keys: list[bytes], texts: list[str]) -> None:
        with self._lock:
            for key, text in zip(keys, texts, strict=True):
                self._add(key, text)

    def _add(self, key: bytes, text: str) -> None:
        if key in self._texts:
            return
        size = len(key) + len(text) + _ENTRY_OVERHEAD
        if size > self.budget_bytes // 2:
            return
        if self._bytes + size > self.budget_bytes // 2:
            self._older, self._texts, self._bytes = self._texts, {}, 0
        self._texts[key] = text
        self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._texts, self._older, self._bytes = {}, {}, 0


#: The process's ring texts: 64 MiB, dozens of large tumors' worth; kept only
#: inside :func:`remembering_ring_texts` (refine rounds: a batch run writes each tumor once).
RING_TEXTS = _RingTexts(64 * 2**20)
_REMEMBERING = contextvars.ContextVar("wsiseg_remembering_ring_texts", default=False)


@contextlib.contextmanager
def remembering_ring_texts() -> Iterator[None]:
    """Inside the block (this thread or task), :func:`canonical_polygon_text` looks ring
    texts up in :data:`RING_TEXTS` and adds the ones it writes."""
    token = _REMEMBERING.set(True)
    try:
        yield
    finally:
        _REMEMBERING.reset(token)


def canonical_polygon_text(xy: NDArray[np.float64], ring: NDArray[np.intp]) -> str | None:
    """GeoJSON text of the Polygon whose rings these are, in canonical order: the text of
    ``geometry_text(orient_polygons(normalize(polygon)))``; None when the shell does not
    turn counter-clockwise, a hole does not turn clockwise or the area is nil (write the
    geometry through GEOS then).

    GEOS's normalisation starts each ring at its smallest coordinate (by x, then y),
    turns the shell clockwise and the holes counter-clockwise, and sorts the holes by
    their coordinates so turned, largest first (more coordinates first, then coordinate by
    coordinate); the orientation then turns each ring back. So rings already turning the
    RFC 7946 way (traced contours do) are only started at their smallest coordinate.

    Parameters
    ----------
    xy : (n, 2) float64
        The rings' coordinates one ring after the other, each ring closed (its first
        coordinate repeated last), on the 0.01 grid; the shell first.
    ring : (n,) int
        Each coordinate's ring, 0, 1, … non-decreasing.
    """
    sizes = np.bincount(ring)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    if (sizes < 4).any():
        return None
    x, y = xy[:, 0], xy[:, 1]
    cross = np.r_[x[:-1] * y[1:] - x[1:] * y[:-1], 0.0]  # the edge from each coordinate
    cross[ends - 1] = 0.0  # (a ring's last coordinate starts no edge of it)
    twice_area = np.add.reduceat(cross, starts)
    if not (twice_area[0] > 0 and (twice_area[1:] < 0).all() and twice_area.sum() > 0):
        return None
    # each coordinate's place by (x, y), exact: the coordinates are hundredths
    k = np.rint(xy * 100).astype(np.int64)
    k -= k.min(axis=0)
    if (int(k[:, 0].max()) + 1) * (int(k[:, 1].max()) + 1) >= 2**62:
        return None  # (beyond 3e7 px both ways: no slide; the key below would overflow)
    place = k[:, 0] * (int(k[:, 1].max()) + 1) + k[:, 1]
    place[ends - 1] = np.iinfo(np.int64).max  # a ring's closing coordinate is its first
    ring_start = starts[ring]
    position = np.arange(len(xy)) - ring_start
    lowest = np.minimum.reduceat(place, starts)
    first = np.minimum.reduceat(np.where(place == lowest[ring], position, len(xy)), starts)
    at = ring_start + (first[ring] + position) % (sizes - 1)[ring]
    xy = xy[at]
    order = _holes_in_order(place[at], starts, sizes)
    remember = _REMEMBERING.get()
    if remember:
        data = xy.tobytes()
        keys = [data[16 * a: 16 * b] for a, b in zip(starts.tolist(), ends.tolist(),
                                                         strict=True)]
        texts = RING_TEXTS.get_many(keys)
    else:
        texts = [None] * len(sizes)
    missing = [r for r, text in enumerate(texts) if text is None]
    if missing:
        chosen = np.asarray(missing, dtype=np.intp)
        n = sizes[chosen]
        rows = np.repeat(starts[chosen] - np.cumsum(n) + n, n) + np.arange(n.sum())
        lines = shapely.linestrings(xy[rows], indices=np.repeat(np.arange(len(chosen)), n))
        made = [_line_text(w) for w in shapely.to_wkt(lines, rounding_precision=2, trim=True)]
        for r, text in zip(missing, made, strict=True):
            texts[r] = text
        if remember:
            RING_TEXTS.put_many([keys[r] for r in missing], made)
    rings = ",".join([texts[0], *(texts[r] for r in order)])  # type: ignore[misc]
    return f'{{"type":"Polygon","coordinates":[{rings}]}}'


def _holes_in_order(place: NDArray[np.int64], starts: NDArray[np.intp],
                    sizes: NDArray[np.intp]) -> list[int]:
    """The holes (rings 1, 2, …) in GEOS's order, given each coordinate's place (x, then
    y) with each ring started at its smallest: by size, then by the ring turned
    counter-clockwise (from its smallest coordinate backwards), coordinate by coordinate,
    largest first."""
    holes = np.arange(1, len(sizes))
    if len(holes) == 0:
        return []
    by = np.lexsort((-place[starts[holes]], -sizes[holes]))  # the last key first
    ranked = holes[by]
    key = np.column_stack([sizes[ranked], place[starts[ranked]]])
    tie = np.flatnonzero((key[1:] == key[:-1]).all(axis=1))
    if len(tie) == 0:  # the usual case: the size and the smallest coordinate decide
        return ranked.tolist()
    # holes of one size meeting at their smallest coordinate: compared whole
    out = ranked.tolist()
    group_start = np.flatnonzero(np.r_[True, ~(key[1:] == key[:-1]).all(axis=1)])
    group_end = np.r_[group_start[1:], len(ranked)]
    for a, b in zip(group_start.tolist(), group_end.tolist(), strict=True):
        if b - a > 1:
            def turned(r: int) -> list[int]:
                seq = place[starts[r]: starts[r] + sizes[r] - 1]
                return [int(seq[0]), *seq[:0:-1].tolist()]
            out[a:b] = sorted(out[a:b], key=turned, reverse=True)
    return out


def _line_text(wkt: str) -> str:
    """GeoJSON coordinates of a WKT ``LINESTRING (x y, x y, ...)``: ``[[x,y],[x,y],...]``."""
    body = wkt[wkt.index("(") + 1: -1].replace(", ", "],[").replace(" ", ",")
    return f"[[{body}]]"
