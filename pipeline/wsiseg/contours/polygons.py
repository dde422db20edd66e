"""A probability map's tumor polygons: :func:`tumor_polygons_and_means`, the entry point.

It drives :class:`~wsiseg.contours.merge._Merger` over the chunks a call needs (all of them,
or those of a refine round's windows and the components they continue into), then finishes
the whole components (:func:`_finished`: dropped below the minimum area, simplified or
spliced, ordered). See the package docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from numpy.typing import NDArray

from wsiseg.contours.mask import ArrayLike2D, _block_shape, _check_threshold, chunks_spanned
from wsiseg.contours.merge import _Merger
from wsiseg.contours.simplify import _finish


def tumor_polygons(
    prob: ArrayLike2D,
    *,
    threshold: float = 0.5,
    chunk_px: int | None = None,
    simplify_px: float = 1.0,
    min_area_px: float = 0.0,
    region: tuple[int, int, int, int] | None = None,
    regions: Sequence[tuple[int, int, int, int]] | None = None,
) -> list[shapely.Polygon]:
    """Tumor outlines of a probability map, one polygon (with holes) per tumor component;
    :func:`tumor_polygons_and_means` with the means left out (same parameters)."""
    return tumor_polygons_and_means(
        prob, threshold=threshold, chunk_px=chunk_px, simplify_px=simplify_px,
        min_area_px=min_area_px, region=region, regions=regions,
    )[0]


def tumor_polygons_and_means(
    prob: ArrayLike2D,
    *,
    threshold: float = 0.5,
    chunk_px: int | None = None,
    simplify_px: float = 1.0,
    min_area_px: float = 0.0,
    region: tuple[int, int, int, int] | None = None,
    regions: Sequence[tuple[int, int, int, int]] | None = None,
    spans: Sequence[shapely.Geometry] = (),
) -> tuple[list[shapely.Polygon], NDArray[np.float64]]:
    """Tumor outlines of a probability map, one polygon (with holes) per tumor component.

    Parameters
    ----------
    prob : ArrayLike2D
        (H, W) probability at the working resolution: uint8 × 255, floating in [0, 1], or bool.
        Any array with numpy slicing (``zarr.Array``, ``numpy.ndarray``); read one block at a
        time, never whole.
    threshold : float
        θ: a pixel is tumor iff probability ``>= threshold``; for uint8 iff
        ``value >= ceil(255 θ)`` (:func:`uint8_threshold`; 128 for θ = 0.5).
    chunk_px : int or None
        Edge of the processing block in pixels. ``None``: the array's chunk shape if it has
        ``.chunks`` (reads are then chunk-aligned: each stored chunk is decoded once), else 1024.
    simplify_px : float
        Douglas–Peucker tolerance in working px (topology-preserving); 0 keeps the exact
        pixel-edge outline (area == pixel count).
    min_area_px : float
        Components whose pixel count (exact area, before simplification) is below this are
        dropped — ``min_area_um2 / working_mpp²`` from the workflow.
    region : (row0, col0, rows, cols) or None
        Only return the components with at least one pixel in this window, each one whole:
        the work starts with the chunks overlapping the window and grows, chunk by chunk, into
        every chunk that such a component continues into, until all of them are closed.
    regions : sequence of (row0, col0, rows, cols), optional
        Several windows at once (instead of ``region``): the components touching any of them,
        each traced once however many windows it touches.
    spans : sequence of shapely geometries, optional
        With ``region(s)``: where the components touching them are expected to lie (working
        px; a refine round gives the previous round's outlines there). Every chunk they
        meet is processed at once with the windows' own, instead of wave after wave as the
        components are found to continue (one search of the pieces met so far per wave:
        16 waves on the 67-Mpx bench slide's largest tumor). A hint only: the polygons are
        the same whatever it holds.

    Returns
    -------
    polygons : list of shapely.Polygon
        Valid polygons in working px (x = column, y = row, pixel edges on integers), one per
        4-connected tumor component, sorted by area, largest first.
    means : ndarray
        (len(polygons),) float64: the mean probability in [0, 1] over the pixels of each
        polygon's component (its tumor pixels, at or above the threshold), summed while
        tracing: the map is read once for both.

    Notes
    -----
    Memory: one block of pixels (plus its labels and its outline's edges), the
    labels along the sides of chunks not yet met, and the polygons; never O(H × W). With
    ``region`` or ``regions`` (a refine round) each chunk's trace is also kept in the
    process's bounded memo (:mod:`~wsiseg.contours.cache`, 256 MiB), keyed by its tumor
    mask (its pieces' sums by its pixels), so the next round traces only the chunks whose
    mask changed, sums those whose pixels changed (and, on a zarr array on a local disk,
    reads only those: the others are found by their files' stamps).
    """
    shape = tuple(prob.shape)
    if len(shape) != 2:
        raise ValueError(f"probability must be a 2-D array, got shape {shape}")
    _check_threshold(threshold)
    if not (0.0 <= simplify_px <= 1.0):
        raise ValueError(f"simplify_px must be within [0, 1] working px, got {simplify_px}")
    height, width = shape
    if region is not None and regions is not None:
        raise ValueError("give region or regions, not both")
    # a region or regions: a refine round, whose unchanged chunks the rounds before traced
    memo = region is not None or regions is not None
    if regions is None:
        regions = [(0, 0, height, width) if region is None else region]
    boxes = []
    for box in regions:
        row0, col0, rows, cols = (int(v) for v in box)
        if rows < 0 or cols < 0:
            raise ValueError(f"region must have a non-negative size, got {box}")
        row1, col1 = min(row0 + rows, height), min(col0 + cols, width)
        row0, col0 = max(row0, 0), max(col0, 0)
        if row1 > row0 and col1 > col0:
            boxes.append((row0, col0, row1 - row0, col1 - col0))
    if not boxes:
        return [], np.zeros(0)

    merger = _Merger(prob, threshold, _block_shape(prob, chunk_px), boxes, memo=memo)
    todo = set().union(*(merger.chunks_in(*box) for box in boxes))
    if memo and len(spans):
        todo |= chunks_spanned(spans, merger.block, merger.grid)
    while todo:
        for i, j in sorted(todo):  # raster order keeps few chunk sides pending
            merger.process(i, j)
        todo = merger.leaks() - merger.done

    return _finished(merger, simplify_px, min_area_px)


def _finished(merger: _Merger, simplify_px: float, min_area_px: float
              ) -> tuple[list[shapely.Polygon], NDArray[np.float64]]:
    """The merger's whole components, finished and sorted by area, largest first: those
    inside one chunk simplified (unless finished early), the others spliced from their
    chunks' fragments (the same polygons as joining and simplifying them whole)."""
    singles, groups, means = merger.whole_components()
    early = merger.finished_early()  # single index → its polygon, finished (None: dropped)
    spliced = {k: p for k, p in early.items() if p is not None}  # component index → polygon
    exact_owner = [k for k in range(len(singles)) if k not in early]
    exact = [singles[k] for k in exact_owner]
    for k, gids in enumerate(groups, start=len(singles)):
        if len(gids) > 1 and simplify_px > 0:
            polygon, area = merger.spliced(gids, simplify_px)
            if area >= min_area_px:
                spliced[k] = polygon if polygon is not None else merger.joined(gids)
        else:
            exact.append(merger.joined(gids))
            exact_owner.append(k)
    finished, owner = _finish(exact, simplify_px, min_area_px, merger.block, merger.memo)
    by_owner = dict(zip((exact_owner[o] for o in owner), finished, strict=True)) | spliced
    kept = sorted(by_owner)
    out = np.asarray([by_owner[k] for k in kept], dtype=object)
    if len(out) == 0:
        return [], np.zeros(0)
    # Largest first, ties top-left first, then by the other corner and the geometry: an
    # order of the polygons alone, never of the order their chunks were met in.
    key = np.column_stack([-shapely.area(out), shapely.bounds(out)[:, [1, 0, 3, 2]]])
    order = np.lexsort(key.T[::-1])
    ranked = key[order]
    if (ranked[1:] == ranked[:-1]).all(axis=1).any():
        order = np.asarray(sorted(order, key=lambda k: (*key[k], shapely.to_wkb(out[k]))))
    return out[order].tolist(), means[np.asarray(kept, dtype=np.intp)][order]
