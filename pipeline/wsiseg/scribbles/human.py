"""The human-like scribble simulator of Interactive Scribble Segmentation (§2.3).

Per connected component, points sampled tile by tile from distance × dilated skeleton with a
minimum spacing, minimum spanning tree with the length outside the label costing 3×,
edge-drop augmentation, longest paths fitted with B-splines and drawn with a round brush of
radius 2. Seeded through the :class:`numpy.random.Generator` passed in (same seed → identical
output).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.interpolate import splev, splprep
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import minimum_spanning_tree, shortest_path
from scipy.spatial import cKDTree
from skimage.morphology import disk, skeletonize

from wsiseg.scribbles._masks import EIGHT, inner_distance

__all__ = ["human_scribbles"]

# Edge-drop augmentation (ISS §2.3): remove 1, 2 or 3 edges with these probabilities.
_DROP_COUNTS = np.array([1, 2, 3])
_DROP_PROBS = np.array([1 / 2, 1 / 3, 1 / 6])

# Above this many points per component the MST is built from k-nearest-neighbour candidate
# edges instead of all pairs, so cost stays linear in the points (only huge previews get here).
_ALL_PAIRS_MAX_POINTS = 64
_KNN = 8


def human_scribbles(
    label: NDArray[np.bool_],
    *,
    rng: np.random.Generator,
    radius_px: int = 2,
    spacing_px: float = 16.0,
    tile_px: int = 64,
    edge_drop_prob: float = 0.2,
    outside_cost: float = 3.0,
    min_component_px: int | None = None,
) -> NDArray[np.bool_]:
    """Human-like scribbles inside a label (Interactive Scribble Segmentation, §2.3).

    Per 8-connected component of ``label``:

    1. Tiles: the component's bounding box is cut into ``round(height / tile_px)`` ×
       ``round(width / tile_px)`` equal tiles (at least 1 × 1), so the grid follows the
       component's own size as the paper says.
    2. Points: tiles are visited in random order; a tile gets a point when the sum of the
       (current) distance field over the component's pixels in it is at least half its equal
       share (``½ × component sum / number of tiles``: the paper's "threshold based on the size
       of the total label", value chosen here). The point is drawn with probability ∝ distance
       × skeleton dilated by ``spacing_px / 4``; then every pixel within ``spacing_px`` of it
       becomes background and the distance field is updated — analytically, as
       ``min(d, max(0, |x − p| − spacing_px))``, which is what a fresh distance transform of the
       label minus the disc gives, without recomputing one per point.
    3. Connectivity: minimum spanning tree over the points; an edge costs its length, with the
       part outside the label (sampled every pixel along the segment) counted ``outside_cost``
       times.
    4. Edge drop: with probability ``edge_drop_prob`` remove 1, 2 or 3 edges (p = 1/2, 1/3,
       1/6), each between two points of valence ≥ 2, so no point is cut off alone.
    5. Strokes: repeatedly take the longest path (most edges; breadth-first) left in the graph,
       remove its edges, fit a B-spline through its points (cubic where there are ≥ 4 points;
       smoothing ``s = number of points``, i.e. about a pixel of slack per point) and draw it.

    A component left with a single point gets a dot. The drawn centre-line is clipped to the
    label (a spline may overshoot a concave border; those samples are not drawn), then widened
    with a disc of ``radius_px``: strokes stay within ``radius_px`` of the label, as a round
    brush does. Components smaller than ``min_component_px`` (default: the brush's bounding
    square, ``(2 radius_px + 1)²``, at least 9) get nothing.

    Parameters
    ----------
    label : (H, W) bool
        Region to scribble inside (a tumor mask, or its complement for non-tumor scribbles).
    rng : numpy.random.Generator
        Source of all randomness.
    radius_px : int
        Brush radius in pixels (0: the 1-px centre-line only).
    spacing_px : float
        Minimum distance between sampled points (the paper's ``r``), pixels.
    tile_px : int
        Approximate tile side, pixels.
    edge_drop_prob : float
        Share of graphs that lose edges.
    outside_cost : float
        Cost multiplier for the length of an edge outside the label.
    min_component_px : int, optional
        Components smaller than this get no scribble.

    Returns
    -------
    (H, W) bool
        Stroke mask.
    """
    label = np.asarray(label, dtype=bool)
    if label.ndim != 2:
        raise ValueError(f"label must be 2-D, got shape {label.shape}")
    centre = np.zeros(label.shape, dtype=bool)
    if min_component_px is None:
        min_component_px = max(9, (2 * radius_px + 1) ** 2)
    components, n = ndimage.label(label, structure=EIGHT)
    if n == 0:
        return centre
    areas = np.bincount(components.ravel(), minlength=n + 1)[1:]
    if not np.any(areas >= min_component_px):
        return centre
    # One distance transform and one skeleton for the whole label: a pixel's distance to the
    # background and the medial axis of a component do not depend on the other components.
    distance = inner_distance(label)
    density = distance * _ridge(label, max(1, round(spacing_px / 4)))

    for k, box in enumerate(ndimage.find_objects(components)):
        if box is None or areas[k] < min_component_px:
            continue
        mine = components[box] == k + 1
        points = _sample_points(
            np.where(mine, distance[box], 0.0),
            np.where(mine, density[box], 0.0),
            rng=rng,
            spacing_px=spacing_px,
            tile_px=tile_px,
        )
        if len(points) == 0:
            continue
        points = points + np.array([box[0].start, box[1].start])
        if len(points) == 1:
            r, c = points[0].astype(int)
            centre[r, c] = True
            continue
        edges = _spanning_edges(points, label, outside_cost)
        edges = _drop_edges(edges, len(points), rng=rng, prob=edge_drop_prob)
        for path in _longest_paths(edges, len(points)):
            _draw_spline(centre, points[path], label)

    if radius_px > 0:
        return ndimage.binary_dilation(centre, structure=disk(radius_px))
    return centre


def _ridge(label: NDArray[np.bool_], ridge_px: int) -> NDArray[np.bool_]:
    """The label's skeleton dilated by a disc of ``ridge_px``.

    The skeleton is only used widened, so from ``ridge_px >= 2`` on it is computed at half
    resolution (2 × 2 max-pooled label, which keeps 1-px parts) and dilated there by half the
    radius: the Zhang thinning is the simulator's most expensive step, and this makes it 4×
    cheaper. Pixels of the ridge outside the label carry no weight (distance 0 there).
    """
    if ridge_px < 2:
        return ndimage.binary_dilation(skeletonize(label), structure=disk(ridge_px))
    h, w = label.shape
    padded = np.pad(label, ((0, h % 2), (0, w % 2)))
    pooled = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).any(axis=(1, 3))
    ridge = ndimage.binary_dilation(skeletonize(pooled), structure=disk(round(ridge_px / 2)))
    return np.repeat(np.repeat(ridge, 2, axis=0), 2, axis=1)[:h, :w]


def _sample_points(
    distance: NDArray[np.float64],
    density: NDArray[np.float64],
    *,
    rng: np.random.Generator,
    spacing_px: float,
    tile_px: int,
) -> NDArray[np.float64]:
    """Points of one component (crop coordinates), one per accepted tile; (n, 2) row, col."""
    h, w = distance.shape
    # A component at least two spacings long gets at least two tiles along its long side, so
    # small blobs get a short stroke rather than a single dot.
    tile = max(min(tile_px, max(h, w) / 2), spacing_px)
    row_edges = np.linspace(0, h, max(1, round(h / tile)) + 1).round().astype(int)
    col_edges = np.linspace(0, w, max(1, round(w / tile)) + 1).round().astype(int)
    tiles = [
        (slice(r0, r1), slice(c0, c1))
        for r0, r1 in zip(row_edges[:-1], row_edges[1:], strict=True)
        for c0, c1 in zip(col_edges[:-1], col_edges[1:], strict=True)
    ]
    threshold = 0.5 * distance.sum() / len(tiles)
    points: list[tuple[int, int]] = []
    for t in rng.permutation(len(tiles)):
        rs, cs = tiles[t]
        d = distance[rs, cs]
        p = density[rs, cs]
        if points:
            # Distance field of the label minus discs of radius `spacing_px` at the points.
            rr, cc = np.mgrid[rs, cs]
            pts = np.asarray(points, dtype=float)
            gap = np.hypot(rr[..., None] - pts[:, 0], cc[..., None] - pts[:, 1]).min(axis=-1)
            free = np.maximum(gap - spacing_px, 0.0)
            p = p * np.minimum(1.0, np.divide(free, d, out=np.ones_like(d), where=d > 0))
            d = np.minimum(d, free)
        if d.sum() < threshold or not np.any(p > 0):
            continue
        i = _draw_index(p.ravel(), rng)
        points.append((rs.start + i // p.shape[1], cs.start + i % p.shape[1]))
    if not points:
        # Every tile fell under the share (a thin, sprawling component): one point anywhere.
        weights = density if np.any(density > 0) else distance
        if not np.any(weights > 0):
            return np.zeros((0, 2))
        i = _draw_index(weights.ravel(), rng)
        points.append((i // w, i % w))
    return np.asarray(points, dtype=float)


def _draw_index(weights: NDArray[np.float64], rng: np.random.Generator) -> int:
    """One index drawn with probability ∝ weights (non-negative, not all zero)."""
    cdf = np.cumsum(weights)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def _spanning_edges(
    points: NDArray[np.float64], label: NDArray[np.bool_], outside_cost: float
) -> NDArray[np.intp]:
    """Minimum spanning tree (forest) edges ``(m, 2)`` over the points."""
    n = len(points)
    if n <= _ALL_PAIRS_MAX_POINTS:
        i, j = np.triu_indices(n, k=1)
    else:
        _, nearest = cKDTree(points).query(points, k=min(_KNN + 1, n))
        i = np.repeat(np.arange(n), nearest.shape[1] - 1)
        j = nearest[:, 1:].ravel()
        i, j = np.minimum(i, j), np.maximum(i, j)
        keep = np.unique(i * n + j)
        i, j = keep // n, keep % n
    delta = points[j] - points[i]
    length = np.hypot(delta[:, 0], delta[:, 1])
    samples = int(np.ceil(length.max())) + 1
    t = np.linspace(0.0, 1.0, samples)
    along = points[i][:, None, :] + t[None, :, None] * delta[:, None, :]
    rows = np.clip(np.rint(along[..., 0]).astype(int), 0, label.shape[0] - 1)
    cols = np.clip(np.rint(along[..., 1]).astype(int), 0, label.shape[1] - 1)
    inside = label[rows, cols].mean(axis=1)
    cost = length * (inside + outside_cost * (1.0 - inside))
    # Points are at least a pixel apart, so every cost is > 0 (0 would mean "no edge").
    graph = coo_matrix((np.maximum(cost, 1e-6), (i, j)), shape=(n, n)).tocsr()
    tree = minimum_spanning_tree(graph).tocoo()
    return np.stack([tree.row, tree.col], axis=1).astype(np.intp)


def _drop_edges(
    edges: NDArray[np.intp], n: int, *, rng: np.random.Generator, prob: float
) -> NDArray[np.intp]:
    """Edge-drop augmentation: with probability ``prob`` remove 1–3 inner edges."""
    if rng.random() >= prob:
        return edges
    count = int(rng.choice(_DROP_COUNTS, p=_DROP_PROBS))
    for _ in range(count):
        valence = np.bincount(edges.ravel(), minlength=n)
        inner = np.flatnonzero((valence[edges[:, 0]] >= 2) & (valence[edges[:, 1]] >= 2))
        if len(inner) == 0:
            break
        edges = np.delete(edges, rng.choice(inner), axis=0)
    return edges


def _longest_paths(edges: NDArray[np.intp], n: int) -> list[NDArray[np.intp]]:
    """Decompose the forest into paths, longest (most edges) first, as node index arrays."""
    remaining = {tuple(sorted(e)) for e in edges.tolist()}
    paths: list[NDArray[np.intp]] = []
    while remaining:
        rows, cols = np.array(sorted(remaining)).T
        graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)).tocsr()
        hops, pred = shortest_path(graph, directed=False, unweighted=True, return_predecessors=True)
        hops[~np.isfinite(hops)] = -1
        start, end = np.unravel_index(np.argmax(hops), hops.shape)
        path = [end]
        while path[-1] != start:
            path.append(pred[start, path[-1]])
        path_arr = np.asarray(path[::-1], dtype=np.intp)
        for a, b in zip(path_arr[:-1], path_arr[1:], strict=True):
            remaining.discard((min(a, b), max(a, b)))
        paths.append(path_arr)
    return paths


def _draw_spline(
    centre: NDArray[np.bool_], points: NDArray[np.float64], label: NDArray[np.bool_]
) -> None:
    """Rasterise a B-spline through ``points`` into ``centre``, only where ``label`` holds."""
    degree = min(3, len(points) - 1)
    tck, _ = splprep([points[:, 0], points[:, 1]], k=degree, s=float(len(points)))
    polyline = np.hypot(*np.diff(points, axis=0).T).sum()
    u = np.linspace(0.0, 1.0, int(np.ceil(2 * polyline)) + 2)
    rows, cols = splev(u, tck)
    rows = np.rint(rows).astype(int)
    cols = np.rint(cols).astype(int)
    ok = (rows >= 0) & (rows < centre.shape[0]) & (cols >= 0) & (cols < centre.shape[1])
    rows, cols = rows[ok], cols[ok]
    inside = label[rows, cols]
    centre[rows[inside], cols[inside]] = True
