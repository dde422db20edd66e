"""Pixel-edge tracing of one chunk: the exact staircase outline of each tumor component.

See the package docstring (steps 2–4) for how marching squares become pixel edges, why tumor
is 4-connected and how rings are nested. Hand-written instead of ``shapely``/``cv2`` contours:
its outlines are area-exact and pieces in neighbouring chunks share their border edges exactly,
which the merge across chunks relies on.
"""

from __future__ import annotations

import numpy as np
import shapely
from numpy.typing import NDArray
from scipy import ndimage as ndi
from skimage.measure import find_contours

from wsiseg.contours.join import relinked


def _trace_block(
    mask: NDArray[np.bool_], row0: int, col0: int
) -> tuple[NDArray[np.int32], list[shapely.Polygon]]:
    """Pixel-edge polygons of the 4-connected components of one chunk.

    Returns the label image (0 background, k ≥ 1 component k) and the polygons, the k-th
    (0-based ``k - 1``) for label k, in global working px (the chunk's pixel (0, 0) is
    ``(col0, row0)``).
    """
    labels, n_labels = ndi.label(mask)  # default structure: 4-connectivity
    if n_labels == 0:
        return labels, []
    if n_labels == 1 and mask.all():
        h, w = mask.shape
        return labels, [shapely.box(col0, row0, col0 + w, row0 + h)]
    # trace only the bounding box of the tumor pixels (find_contours visits every cell)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    padded = np.pad(mask[r0:r1, c0:c1], 1).view(np.uint8)
    contours = find_contours(padded, 0.5, fully_connected="low")
    row0, col0 = row0 + r0, col0 + c0
    sizes = np.array([len(c) for c in contours])  # closed: first point == last point
    points = np.concatenate(contours)  # (row, col) in padded pixel-centre coordinates

    # each segment P_t → P_{t+1} becomes the pixel corner at the centre of its marching-squares
    # cell: floor of the segment midpoint (padded centre coords → unpadded edge coords).
    ends = np.cumsum(sizes)
    seg = np.ones(len(points) - 1, dtype=bool)
    seg[ends[:-1] - 1] = False  # no segment between two contours
    mids = (points[:-1][seg] + points[1:][seg]) / 2.0
    corners = np.floor(mids).astype(np.int64)  # (row, col) pixel corners
    ring_sizes = sizes - 1
    ring_of = np.repeat(np.arange(len(contours)), ring_sizes)
    starts = np.concatenate([[0], np.cumsum(ring_sizes)[:-1]])

    # drop corners where the outline goes straight on (every ring keeps its ≥ 4 turns)
    idx = np.arange(len(corners))
    first = starts[ring_of]
    last = first + ring_sizes[ring_of] - 1
    nxt = np.where(idx == last, first, idx + 1)
    prv = np.where(idx == first, last, idx - 1)
    turns = np.any((corners[idx] - corners[prv]) != (corners[nxt] - corners[idx]), axis=1)
    corners, ring_of = corners[turns], ring_of[turns]

    # the component each ring belongs to: the tumor pixel beside the contour's first vertex
    padded_labels = np.pad(labels[r0:r1, c0:c1], 1)
    r, c = points[starts + np.arange(len(contours))].T
    label_of = np.maximum(
        padded_labels[np.floor(r).astype(int), np.floor(c).astype(int)],
        padded_labels[np.ceil(r).astype(int), np.ceil(c).astype(int)],
    )
    # per component the largest ring is the shell, the others are holes
    y, x = corners[:, 0].astype(np.float64), corners[:, 1].astype(np.float64)
    counts = np.bincount(ring_of, minlength=len(contours))
    ring_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    nxt = np.arange(len(x)) + 1
    nxt[ring_start + counts - 1] = ring_start
    twice_area = np.bincount(ring_of, weights=x * y[nxt] - x[nxt] * y, minlength=len(contours))
    order = np.lexsort((-np.abs(twice_area), label_of))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))

    vertex_order = np.argsort(rank[ring_of], kind="stable")
    rings = shapely.linearrings(
        np.column_stack([x[vertex_order] + col0, y[vertex_order] + row0]),
        indices=rank[ring_of][vertex_order],
    )
    polygons = shapely.polygons(rings, indices=label_of[order] - 1)
    invalid = ~shapely.is_valid(polygons)
    if invalid.any():  # rings that visit a pixel corner twice (see module docstring)
        polygons[invalid] = [relinked(p) for p in polygons[invalid]]
    return labels, list(polygons)
