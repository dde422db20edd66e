"""Merging chunk pieces into whole components (:class:`_Merger`).

Chunks are traced one at a time with no halo; the labels along each chunk side wait for the
neighbour across it, and pieces that face each other join (union–find). See the package
docstring (step 5); :mod:`~wsiseg.contours.polygons` drives it and finishes the components.
"""

from __future__ import annotations

import math

import numpy as np
import shapely
from numpy.typing import NDArray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from wsiseg.contours.cache import TRACES, array_identity, chunk_file, chunk_stamp
from wsiseg.contours.join import join_pieces
from wsiseg.contours.mask import ArrayLike2D, tumor_mask
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
