"""Merging chunk pieces into whole components, and the entry point :func:`tumor_polygons`.

Chunks are traced one at a time with no halo; the labels along each chunk side wait for the
neighbour across it, and pieces that face each other join (union–find). See the package
docstring (step 5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import shapely
from numpy.typing import NDArray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from wsiseg.contours.cache import TRACES, array_identity, chunk_file, chunk_stamp
from wsiseg.contours.join import join_pieces
from wsiseg.contours.mask import (
    ArrayLike2D,
    _block_shape,
    _check_threshold,
    chunks_spanned,
    tumor_mask,
)
from wsiseg.contours.simplify import _finish
from wsiseg.contours.splice import fragment, splice
from wsiseg.contours.trace import (
    ChunkTrace,
    chunk_side,
    piece_sums,
    trace_chunk,
    trace_mask,
    trace_nbytes,
)

# side name → (row step, column step) to the neighbouring chunk, and the side facing back
_SIDES: dict[str, tuple[int, int]] = {"top": (-1, 0), "bottom": (1, 0), "left": (0, -1),
                                      "right": (0, 1)}
_OPPOSITE = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}


class _Merger:
    """Chunk-by-chunk tracing with the pieces that meet across chunk sides joined."""

    def __init__(self, prob: ArrayLike2D, threshold: float, block: tuple[int, int],
                 regions: list[tuple[int, int, int, int]], memo: bool = False) -> None:
        self.prob = prob
        self.memo = memo
        self.threshold = threshold
        self.block = block
        self.chunks = tuple(getattr(prob, "chunks", ()) or ())  # the stored chunk shape
        self.identity = array_identity(prob) if memo and chunk_file(prob, (0, 0)) else ""
        self.regions = regions
        self.grid = (-(-prob.shape[0] // block[0]), -(-prob.shape[1] // block[1]))
        self.done: set[tuple[int, int]] = set()
        self.pending: dict[tuple[int, int, str], NDArray[np.int64]] = {}
        self.pairs: list[NDArray[np.int64]] = []
        self.border_pieces: dict[int, shapely.Polygon] = {}  # may continue in another chunk
        self.piece_place: dict[int, tuple[tuple[int, int], int]] = {}  # its chunk and label
        self.trace_keys: dict[tuple[int, int], bytes] = {}  # with memo: each chunk's key
        self.finished: dict[int, shapely.Polygon] = {}  # whole components inside one chunk
        self.in_region: set[int] = set()
        self.n_pieces = 0
        # per piece (index: piece id, 0 unused): sum of the probability over its pixels and
        # their count, so each component's mean costs one bincount per chunk, no second read
        self.sums: list[NDArray[np.float64]] = [np.zeros(1)]
        self.counts: list[NDArray[np.int64]] = [np.zeros(1, dtype=np.int64)]

    def chunks_in(self, row0: int, col0: int, rows: int, cols: int) -> set[tuple[int, int]]:
        bh, bw = self.block
        return {
            (i, j)
            for i in range(row0 // bh, -(-(row0 + rows) // bh))
            for j in range(col0 // bw, -(-(col0 + cols) // bw))
        }

    def process(self, i: int, j: int) -> None:
        bh, bw = self.block
        r0, c0 = i * bh, j * bw
        r1, c1 = min(r0 + bh, self.prob.shape[0]), min(c0 + bw, self.prob.shape[1])
        labels, polygons, sums, counts, side_labels = self._traced(np.s_[r0:r1, c0:c1], (i, j))
        offset = self.n_pieces
        self.n_pieces += len(polygons)
        self.done.add((i, j))
        if polygons:
            self.sums.append(sums)
            self.counts.append(counts)

        on_border = []
        for side, (di, dj) in _SIDES.items():
            ni, nj = i + di, j + dj
            if not (0 <= ni < self.grid[0] and 0 <= nj < self.grid[1]):
                continue
            present = side_labels[side]
            facing = (self.pending.pop((ni, nj, _OPPOSITE[side]), None)
                      if (ni, nj) in self.done else None)
            if not len(present):
                continue
            on_border.append(present)
            local = chunk_side(labels, side)
            ids = np.where(local > 0, local.astype(np.int64) + offset, 0)
            if facing is not None:
                both = (ids > 0) & (facing > 0)
                self.pairs.append(np.column_stack([ids[both], facing[both]]))
            elif (ni, nj) not in self.done:
                self.pending[(i, j, side)] = ids

        in_region: set[int] = set()
        for rr0, cc0, rrows, rcols in self.regions:
            if rr0 >= r1 or cc0 >= c1 or rr0 + rrows <= r0 or cc0 + rcols <= c0:
                continue  # (most chunks of a large tumor lie away from the windows)
            window = labels[max(rr0 - r0, 0): max(rr0 + rrows - r0, 0),
                            max(cc0 - c0, 0): max(cc0 + rcols - c0, 0)]
            in_region.update(np.unique(window[window > 0]).tolist())
        # only the pieces on a side or in a region are kept: a chunk of a large tumor holds
        # hundreds of pieces, most of them neither (specks inside it), not looked at one by one
        border = np.unique(np.concatenate(on_border)).tolist() if on_border else []
        for label in border:
            self.border_pieces[offset + label] = polygons[label - 1]
            self.piece_place[offset + label] = ((i, j), label)
            if label in in_region:
                self.in_region.add(offset + label)
        for label in sorted(in_region.difference(border)):
            self.finished[offset + label] = polygons[label - 1]

    def _traced(self, box: tuple[slice, slice], chunk: tuple[int, int]) -> ChunkTrace:
        """One chunk's labels, pieces, per piece the probability's sum and pixel count, and
        the labels on each of its sides.

        With ``memo``, from :data:`TRACES`, in two entries: the probability's sums under
        the digest of its pixels (with the place and threshold), and the rest under the
        digest of its tumor mask (with the place), which a stroke's small change of
        probability mostly keeps: such a chunk is not traced again, only summed. The
        pixels' digest is found by the chunk file's stamp without reading the chunk when
        the block is one stored chunk whose file the memo saw."""
        r0, c0 = box[0].start, box[1].start
        if not self.memo:
            return self._trace(np.asarray(self.prob[box]), r0, c0)
        file = chunk_file(self.prob, chunk) if self.block == self.chunks else None
        stamp = chunk_stamp(file) if file is not None else None
        # a digest covers the pixels, the place and the threshold; so must the stamp's key
        where = f"{file} at threshold {self.threshold!r} of {self.identity}"
        key = TRACES.key_by_stamp(where, stamp)
        values = None
        if key is None or (hit := self._summed(key)) is None:
            values = np.asarray(self.prob[box])
            key = TRACES.key(values, r0, c0, self.threshold)
            if file is not None and chunk_stamp(file) == stamp:  # not written meanwhile
                TRACES.remember_stamp(where, stamp, key)
            hit = self._summed(key)
        if hit is None:
            mask = tumor_mask(values, self.threshold)
            mask_key = TRACES.mask_key(mask, r0, c0)
            shape = TRACES.get(mask_key)
            if shape is None:
                shape = trace_mask(mask, r0, c0)
                TRACES.put(mask_key, shape if shape.polygons else shape._replace(labels=None),
                           trace_nbytes(shape))
            sums = piece_sums(shape, mask, values)
            TRACES.put(key, (mask_key, sums), sums.nbytes + 400)  # (measured: ≈ 350 B)
            hit = mask_key, shape, sums
        mask_key, shape, sums = hit
        self.trace_keys[chunk] = mask_key  # (a fragment depends on the pieces alone)
        if shape.labels is None:  # a chunk without tumor: no (zero) labels kept
            shape = shape._replace(labels=np.zeros((box[0].stop - r0, box[1].stop - c0),
                                                   np.uint8))
        return shape._replace(sums=sums)

    @staticmethod
    def _summed(key: bytes) -> tuple[bytes, ChunkTrace, NDArray[np.float64]] | None:
        """The memo's trace of a chunk by the digest of its pixels: its mask's digest, the
        mask's trace and the pieces' sums; None when either entry is not (or no longer)
        held."""
        summed = TRACES.get(key)
        shape = TRACES.get(summed[0]) if summed is not None else None
        return None if shape is None else (summed[0], shape, summed[1])

    def _trace(self, values: np.ndarray, r0: int, c0: int) -> ChunkTrace:
        return trace_chunk(values, self.threshold, r0, c0)

    def components(self) -> NDArray[np.intp]:
        n = self.n_pieces + 1
        pairs = np.concatenate(self.pairs) if self.pairs else np.zeros((0, 2), dtype=np.int64)
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        return connected_components(graph, directed=False)[1]

    def leaks(self) -> set[tuple[int, int]]:
        """Unprocessed chunks that a component touching the region continues into."""
        if not self.pending:
            return set()
        component = self.components()
        wanted = np.unique(component[sorted(self.in_region)]) if self.in_region else []
        out = set()
        for (i, j, side), ids in self.pending.items():
            if np.isin(component[ids[ids > 0]], wanted).any():
                di, dj = _SIDES[side]
                out.add((i + di, j + dj))
        return out

    def finished_early(self) -> dict[int, shapely.Polygon | None]:
        """Singles (see :meth:`whole_components`) finished already, by index; None: dropped."""
        return {}

    def whole_components(self) -> tuple[list[shapely.Polygon], list[list[int]],
                                        NDArray[np.float64]]:
        """The components with a pixel in the region: the exact polygons of those inside one
        chunk, the pieces (ids) of the others, and the mean probability over each
        component's pixels (those inside one chunk first)."""
        component = self.components()
        sums, counts = np.concatenate(self.sums), np.concatenate(self.counts)
        groups: dict[int, list[int]] = {}
        wanted = {int(component[g]) for g in self.in_region}
        for gid in self.border_pieces:
            if int(component[gid]) in wanted:
                groups.setdefault(int(component[gid]), []).append(gid)
        singles = list(self.finished.values())
        means = [sums[g] / counts[g] for g in self.finished]
        for gids in groups.values():
            # fsum: the mean must not depend on the order the pieces were met in (a refine
            # round meets them from its windows outward, a whole-map trace in raster order)
            means.append(math.fsum(sums[gids]) / counts[gids].sum())
        return singles, list(groups.values()), np.asarray(means, dtype=np.float64)

    def joined(self, gids: list[int]) -> shapely.Polygon:
        """The exact polygon of the component of these pieces."""
        if len(gids) == 1:
            return self.border_pieces[gids[0]]
        return join_pieces([self.border_pieces[g] for g in gids], self.block)

    def spliced(self, gids: list[int], simplify_px: float) -> tuple[shapely.Polygon | None,
                                                                     float]:
        """The simplified polygon of the component of these pieces, and its exact area
        (:func:`~wsiseg.contours.splice.splice`; None: keep the exact polygon)."""
        by_chunk: dict[tuple[int, int], list[int]] = {}
        for gid in gids:
            by_chunk.setdefault(self.piece_place[gid][0], []).append(gid)
        fragments = []
        for chunk, ids in sorted(by_chunk.items()):
            labels = sorted(self.piece_place[g][1] for g in ids)
            trace_key = self.trace_keys.get(chunk)
            key = (None if trace_key is None
                   else trace_key + np.asarray(labels, dtype=np.int64).tobytes())
            fragments.append(fragment([self.border_pieces[g] for g in sorted(ids)], self.block,
                                      simplify_px, key))
        return splice(fragments)


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
