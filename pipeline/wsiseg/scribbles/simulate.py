"""Simulated scribbles: the papers' two simulators and the iterative-training correction rule.

Two simulators, both plain functions on (H, W) masks, seeded through a
:class:`numpy.random.Generator` passed in (same seed → identical output):

- :func:`deepscribble_scribbles` — DeepScribble §2.2.3: for every false-positive and
  false-negative region, distance transform → keep the core → skeletonise ("the user generally
  draws on the centre of the mislabelled region").
- :func:`human_scribbles` — Interactive Scribble Segmentation §2.3: per connected component,
  points sampled tile by tile from distance × dilated skeleton with a minimum spacing, minimum
  spanning tree with the length outside the label costing 3×, edge-drop augmentation, longest
  paths fitted with B-splines and drawn with a round brush of radius 2.

On top of them: :func:`correction_scribble` (the iterative-training / interactive-evaluation
rule of §2.4: one scribble where the prediction is most wrong), :func:`simulate_scribbles` (the
per-sample mix RefineNet training draws from), :func:`limit_scribble_size` (the 0.05 %-of-pixels
cap of DeepScribble's interactive protocol) and :func:`preview_png` (``wsiseg scribbles
simulate``).

Label rasters follow the slide store's convention: int8, +1 tumor, −1 non-tumor, 0 none.
Coordinates inside are ``(row, col)`` pixels of the array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage
from scipy.interpolate import splev, splprep
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import minimum_spanning_tree, shortest_path
from scipy.spatial import cKDTree
from skimage.morphology import disk, skeletonize
from skimage.segmentation import find_boundaries

from wsiseg.atomic import atomic_writer
from wsiseg.errors import WsisegError

__all__ = [
    "correction_scribble",
    "deepscribble_scribbles",
    "human_scribbles",
    "limit_scribble_size",
    "preview_png",
    "simulate_scribbles",
]

# 8-connectivity: a diagonal step keeps a region (and a 1-px stroke) in one piece.
_EIGHT = np.ones((3, 3), dtype=bool)

# Edge-drop augmentation (ISS §2.3): remove 1, 2 or 3 edges with these probabilities.
_DROP_COUNTS = np.array([1, 2, 3])
_DROP_PROBS = np.array([1 / 2, 1 / 3, 1 / 6])

# Above this many points per component the MST is built from k-nearest-neighbour candidate
# edges instead of all pairs, so cost stays linear in the points (only huge previews get here).
_ALL_PAIRS_MAX_POINTS = 64
_KNN = 8

# Preview colours (RGB).
_GREY_TUMOR, _GREY_OTHER = 170, 70
_RED, _GREEN, _BLUE = (230, 20, 20), (20, 200, 20), (40, 90, 255)


# --------------------------------------------------------------------------------------------
# DeepScribble
# --------------------------------------------------------------------------------------------


def deepscribble_scribbles(
    truth: NDArray[np.bool_],
    prediction: NDArray,
    *,
    rng: np.random.Generator,
    distance_threshold: float = 0.5,
    max_pixels: int | None = None,
    threshold_jitter: float = 0.1,
    min_region_px: int = 16,
) -> NDArray[np.int8]:
    """DeepScribble's automatic correction scribbles: skeletons of the error regions' cores.

    For each false-negative (tumor missed) and false-positive region — 8-connected components
    of ``truth & ~prediction`` and ``prediction & ~truth`` — the Euclidean distance to the
    region's border is computed; pixels farther than ``t × (the region's maximum distance)``
    form the core, and the core is skeletonised. The paper says "thresholded to reduce its
    size" without a value; here the threshold is relative to each region's own maximum so thin
    slivers and large blobs both keep a central core, and ``t`` is drawn per region from
    ``distance_threshold ± threshold_jitter`` (the only randomness) as augmentation. Scribbles
    are the 1-px skeleton, as in the paper (no brush width): RefineNet sees them only through
    their distance maps.

    Parameters
    ----------
    truth : (H, W) bool
        Ground truth tumor mask.
    prediction : (H, W) bool or float
        Predicted tumor mask; a float map is a probability, thresholded at 0.5.
    rng : numpy.random.Generator
        Source of all randomness.
    distance_threshold : float
        Relative core threshold ``t`` in [0, 1).
    max_pixels : int, optional
        Cap on scribbled pixels (see :func:`limit_scribble_size`).
    threshold_jitter : float
        Half-width of the uniform jitter of ``t`` per region.
    min_region_px : int
        Error regions smaller than this many pixels get no scribble.

    Returns
    -------
    (H, W) int8
        +1 on false-negative regions, −1 on false-positive regions, 0 elsewhere; every
        scribbled pixel lies inside the error region it corrects.
    """
    truth, pred = _pair(truth, prediction)
    out = np.zeros(truth.shape, dtype=np.int8)
    for sign, errors in ((1, truth & ~pred), (-1, pred & ~truth)):
        labels, n = ndimage.label(errors, structure=_EIGHT)
        if n == 0:
            continue
        area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        distance = _inner_distance(errors)
        # Per-region maximum (ndimage.maximum sorts every pixel: ~10× slower here).
        peak = np.zeros(n + 1)
        np.maximum.at(peak, labels.ravel(), distance.ravel())
        peak = peak[1:]
        rel = np.clip(
            distance_threshold + rng.uniform(-threshold_jitter, threshold_jitter, size=n),
            0.0,
            0.95,
        )
        # Per-label lookup tables (index 0 = background: never kept).
        cut = np.concatenate([[np.inf], np.where(area >= min_region_px, rel * peak, np.inf)])
        core = distance > cut[labels]
        # The maximum itself always passes (rel < 1), so every kept region has a core.
        out[skeletonize(core)] = sign
    if max_pixels is not None:
        out = limit_scribble_size(out, max_pixels, rng=rng)
    return out


# --------------------------------------------------------------------------------------------
# Interactive Scribble Segmentation: the human-like simulator
# --------------------------------------------------------------------------------------------


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
    components, n = ndimage.label(label, structure=_EIGHT)
    if n == 0:
        return centre
    areas = np.bincount(components.ravel(), minlength=n + 1)[1:]
    if not np.any(areas >= min_component_px):
        return centre
    # One distance transform and one skeleton for the whole label: a pixel's distance to the
    # background and the medial axis of a component do not depend on the other components.
    distance = _inner_distance(label)
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


def _inner_distance(mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Euclidean distance of each mask pixel to the nearest pixel outside it or the image.

    The image edge counts as a border: a scribble is drawn on what is visible, away from the
    patch edge, and a mask that fills the patch still has a centre.
    """
    return ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


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


# --------------------------------------------------------------------------------------------
# Iterative training / interactive evaluation
# --------------------------------------------------------------------------------------------


def correction_scribble(
    truth: NDArray[np.bool_],
    prediction: NDArray,
    *,
    rng: np.random.Generator,
    radius_px: int = 2,
    min_error_fraction: float = 0.01,
) -> NDArray[np.int8]:
    """One correction scribble where the prediction is wrong (ISS §2.4, iterative training).

    1. Errors are ``FP = prediction & ~truth`` and ``FN = truth & ~prediction`` (a float
       prediction is thresholded at 0.5, the paper's "difference thresholded at 0.5"). If
       ``|FP| + |FN| < min_error_fraction × H × W`` nothing is added. The paper measures the
       1 % against "the segmentation area"; for pathology patches, where either class can
       fill most of the patch, the patch area is the stable reference, so that is used here.
    2. More FP than FN → a negative (−1) scribble, otherwise positive (+1), as in the paper.
    3. The temporary label is the largest 8-connected error region of that kind, dilated by
       "the approximate radius of the ground truth segmentation" — ``√(area / π)`` of the truth
       class the scribble asserts — but at most the region's own ``√(area / π)``: in a patch
       where tumor covers half of 384², the paper's radius alone (≈150 px) would spread the
       scribble over the whole class instead of the error. The dilated region is clipped to the
       truth class and only its parts touching the error region are kept.
    4. :func:`human_scribbles` on the temporary label, clipped to the truth class. If it draws
       nothing (a region too small for a stroke), a dot of ``radius_px`` at the region's
       deepest pixel, so an error above the threshold always gets a scribble.

    Parameters
    ----------
    truth : (H, W) bool
        Ground truth tumor mask.
    prediction : (H, W) bool or float
        Current prediction (float: probability).
    rng : numpy.random.Generator
        Source of all randomness.
    radius_px : int
        Brush radius in pixels.
    min_error_fraction : float
        Errors below this fraction of the patch get no scribble.

    Returns
    -------
    (H, W) int8
        The additional scribble, +1 or −1 on its pixels (all one sign), 0 elsewhere; it lies
        inside the truth class it asserts.
    """
    truth, pred = _pair(truth, prediction)
    out = np.zeros(truth.shape, dtype=np.int8)
    fn = truth & ~pred
    fp = pred & ~truth
    n_fn, n_fp = int(fn.sum()), int(fp.sum())
    if n_fn + n_fp == 0 or n_fn + n_fp < min_error_fraction * truth.size:
        return out
    sign, errors, asserted = (-1, fp, ~truth) if n_fp > n_fn else (1, fn, truth)

    labels, n = ndimage.label(errors, structure=_EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    region = labels == int(np.argmax(sizes)) + 1
    grow_px = min(np.sqrt(asserted.sum() / np.pi), np.sqrt(region.sum() / np.pi))
    temp = (ndimage.distance_transform_edt(~region) <= grow_px) & asserted
    parts, _ = ndimage.label(temp, structure=_EIGHT)
    touching = np.unique(parts[region])
    temp = np.isin(parts, touching[touching > 0])

    stroke = human_scribbles(temp, rng=rng, radius_px=radius_px) & asserted
    if not stroke.any():
        depth = ndimage.distance_transform_edt(region)
        r, c = np.unravel_index(np.argmax(depth), depth.shape)
        stroke[r, c] = True
        if radius_px > 0:
            stroke = ndimage.binary_dilation(stroke, structure=disk(radius_px)) & asserted
    out[stroke] = sign
    return out


def simulate_scribbles(
    truth: NDArray[np.bool_],
    prediction: NDArray,
    *,
    rng: np.random.Generator,
    mix: float = 0.5,
    max_fraction: float | None = None,
    confirm_prob: float = 0.3,
    radius_px: int = 2,
) -> NDArray[np.int8]:
    """Correction scribbles for one RefineNet training sample.

    With probability ``mix``: :func:`deepscribble_scribbles`. Otherwise human-like ones: a
    :func:`human_scribbles` stroke set inside the false-negative regions (+1) and inside the
    false-positive regions (−1), each clipped to the truth class it asserts; and, with
    probability ``confirm_prob``, one stroke on a correctly predicted region (tumor or
    non-tumor at random), as a pathologist sometimes marks what is already right — so the
    network learns that a scribble does not always mean "flip this".

    Parameters
    ----------
    truth : (H, W) bool
        Ground truth tumor mask.
    prediction : (H, W) bool or float
        GuideNet's prediction (float: probability, thresholded at 0.5).
    rng : numpy.random.Generator
        Source of all randomness.
    mix : float
        Probability of DeepScribble's automatic scribbles.
    max_fraction : float, optional
        Cap on scribbled pixels as a fraction of the patch (DeepScribble's interactive protocol
        uses 0.0005); strokes are dropped or trimmed to stay under it.
    confirm_prob : float
        Probability of the extra stroke on a correct region (human-like branch only).
    radius_px : int
        Brush radius of human-like strokes.

    Returns
    -------
    (H, W) int8
        +1 tumor, −1 non-tumor, 0 none; never a label that contradicts ``truth``.
    """
    truth, pred = _pair(truth, prediction)
    if rng.random() < mix:
        out = deepscribble_scribbles(truth, pred, rng=rng)
    else:
        out = _human_corrections(truth, pred, rng=rng, radius_px=radius_px)
        if rng.random() < confirm_prob:
            choices = [(s, m) for s, m in ((1, truth & pred), (-1, ~truth & ~pred)) if m.any()]
            if choices:
                sign, correct = choices[rng.integers(len(choices))]
                asserted = truth if sign > 0 else ~truth
                strokes = human_scribbles(correct, rng=rng, radius_px=radius_px) & asserted
                pieces, n = ndimage.label(strokes, structure=_EIGHT)
                if n:
                    out[(pieces == rng.integers(1, n + 1)) & (out == 0)] = sign
    if max_fraction is not None:
        out = limit_scribble_size(out, int(max_fraction * out.size), rng=rng)
    return out


def _human_corrections(
    truth: NDArray[np.bool_],
    pred: NDArray[np.bool_],
    *,
    rng: np.random.Generator,
    radius_px: int,
) -> NDArray[np.int8]:
    """Human-like strokes on every FN (+1) and FP (−1) region, clipped to the truth class."""
    out = np.zeros(truth.shape, dtype=np.int8)
    out[human_scribbles(truth & ~pred, rng=rng, radius_px=radius_px) & truth] = 1
    out[human_scribbles(pred & ~truth, rng=rng, radius_px=radius_px) & ~truth] = -1
    return out


def limit_scribble_size(
    scribbles: NDArray, max_pixels: int, *, rng: np.random.Generator
) -> NDArray:
    """Drop or trim strokes so at most ``max_pixels`` pixels stay scribbled.

    Strokes (8-connected pieces of one sign) are visited in random order and kept whole while
    they fit; the first one that does not fit is trimmed to the remaining budget, keeping the
    pixels nearest (Euclidean) to a random pixel of it — a contiguous piece of a stroke, as if
    the brush had been lifted early — and the rest are dropped.

    Parameters
    ----------
    scribbles : (H, W) int8 or bool
        Scribble raster (nonzero = scribbled; signs are kept).
    max_pixels : int
        Largest number of scribbled pixels allowed (≥ 0).
    rng : numpy.random.Generator
        Source of all randomness.

    Returns
    -------
    (H, W) array, same dtype as ``scribbles``
        At most ``max_pixels`` nonzero pixels, each with its original value.
    """
    if max_pixels < 0:
        raise ValueError(f"max_pixels must be >= 0, got {max_pixels}")
    scribbles = np.asarray(scribbles)
    if np.count_nonzero(scribbles) <= max_pixels:
        return scribbles.copy()
    strokes: list[NDArray[np.intp]] = []
    for value in np.unique(scribbles[scribbles != 0]):
        pieces, n = ndimage.label(scribbles == value, structure=_EIGHT)
        order = np.argsort(pieces, axis=None, kind="stable")
        bounds = np.searchsorted(pieces.ravel()[order], np.arange(1, n + 2))
        strokes += [order[bounds[k] : bounds[k + 1]] for k in range(n)]
    out = np.zeros_like(scribbles)
    flat_in, flat_out = scribbles.ravel(), out.ravel()
    budget = max_pixels
    for k in rng.permutation(len(strokes)):
        if budget == 0:
            break
        stroke = strokes[k]
        if len(stroke) > budget:
            rows, cols = np.divmod(stroke, scribbles.shape[1])
            seed = rng.integers(len(stroke))
            gap = np.hypot(rows - rows[seed], cols - cols[seed])
            stroke = stroke[np.argsort(gap, kind="stable")[:budget]]
        flat_out[stroke] = flat_in[stroke]
        budget -= len(stroke)
    return out


# --------------------------------------------------------------------------------------------
# Preview (wsiseg scribbles simulate)
# --------------------------------------------------------------------------------------------


def preview_png(
    mask_path: Path, out_png: Path, *, seed: int = 0, prediction_path: Path | None = None
) -> None:
    """Draw simulated scribbles over a mask image and write a PNG.

    Without a prediction: human-like scribbles inside the mask (tumor) and inside its
    complement (non-tumor). With one: human-like correction strokes on its false negatives
    (tumor) and false positives (non-tumor), and the prediction's outline in blue. The PNG shows
    the mask in grey (light = tumor), red = tumor strokes, green = non-tumor strokes; it is
    written atomically.

    Parameters
    ----------
    mask_path : Path
        Mask image (PNG, JPEG, TIFF, ...); a pixel whose grey value is > 127 is tumor (JPEG
        masks are blurred at the edges, the midpoint splits them).
    out_png : Path
        PNG to write; its folder is created if needed.
    seed : int
        Random seed.
    prediction_path : Path, optional
        Predicted mask image of the same size, read the same way.

    Raises
    ------
    WsisegError
        A mask or prediction that cannot be read, is empty, or does not match in size.
    """
    truth = _read_mask(Path(mask_path))
    rng = np.random.default_rng(seed)
    canvas = np.where(truth, _GREY_TUMOR, _GREY_OTHER).astype(np.uint8)
    rgb = np.repeat(canvas[..., None], 3, axis=2)
    if prediction_path is None:
        tumor = human_scribbles(truth, rng=rng) & truth
        other = human_scribbles(~truth, rng=rng) & ~truth
    else:
        pred = _read_mask(Path(prediction_path))
        if pred.shape != truth.shape:
            raise WsisegError(
                f"{prediction_path}: prediction is {pred.shape[1]}×{pred.shape[0]} px, "
                f"mask {mask_path} is {truth.shape[1]}×{truth.shape[0]} px"
            )
        labels = _human_corrections(truth, pred, rng=rng, radius_px=2)
        tumor, other = labels > 0, labels < 0
        rgb[find_boundaries(pred, mode="inner")] = _BLUE
    rgb[tumor] = _RED
    rgb[other] = _GREEN
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out_png) as f:
        Image.fromarray(rgb).save(f, format="PNG")


def _read_mask(path: Path) -> NDArray[np.bool_]:
    """A mask image as bool (grey > 127), or WsisegError naming the file."""
    if not path.is_file():
        raise WsisegError(f"{path}: mask file not found")
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))
    except Exception as exc:  # PIL raises many types for unreadable files
        grey = _read_tiff_grey(path, exc)
    if grey.ndim != 2 or grey.size == 0:
        raise WsisegError(f"{path}: not a 2-D mask image (shape {grey.shape})")
    return grey > 127


def _read_tiff_grey(path: Path, pil_error: Exception) -> NDArray[np.uint8]:
    """TIFFs PIL cannot open (tiled, BigTIFF, exotic compression) through tifffile."""
    if path.suffix.lower() not in {".tif", ".tiff"}:
        raise WsisegError(f"{path}: cannot read mask image ({pil_error})") from pil_error
    import tifffile

    try:
        data = np.asarray(tifffile.imread(path))
    except Exception as exc:
        raise WsisegError(f"{path}: cannot read mask image ({exc})") from exc
    if data.ndim == 3:
        data = data.max(axis=2) if data.shape[2] <= 4 else data[0]
    if data.dtype == bool:
        return data.astype(np.uint8) * 255
    return np.clip(data, 0, 255).astype(np.uint8)


def _pair(truth: NDArray, prediction: NDArray) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Truth and prediction as bool masks of one 2-D shape (float prediction: > 0.5)."""
    truth = np.asarray(truth, dtype=bool)
    prediction = np.asarray(prediction)
    pred = prediction > 0.5 if prediction.dtype.kind == "f" else prediction.astype(bool)
    if truth.ndim != 2 or truth.shape != pred.shape:
        raise ValueError(
            f"truth and prediction must be 2-D of one shape, got {truth.shape}, {pred.shape}"
        )
    return truth, pred
