"""Contours of a map still being written: chunk rows traced as soon as they are final."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import shapely
from numpy.typing import NDArray

from wsiseg.contours.mask import ArrayLike2D, _block_shape, _check_threshold
from wsiseg.contours.merge import _finished, _Merger


class RowStreamTracer:
    """:func:`tumor_polygons_and_means` of a whole map that is being written top to bottom:
    each row of chunks is traced as soon as it is final, on one background thread, so that
    tracing overlaps whatever writes the map (GuideNet's bands) and little is left at the end.

    ``rows_final(row1)`` says that rows ``[0, row1)`` of ``prob`` will not change any more;
    :meth:`result` traces the rest and returns exactly what :func:`tumor_polygons_and_means`
    returns for the finished array (same parameters). Use as a context manager: leaving it
    early stops the thread.
    """

    def __init__(self, prob: ArrayLike2D, *, threshold: float = 0.5,
                 chunk_px: int | None = None, simplify_px: float = 1.0,
                 min_area_px: float = 0.0) -> None:
        _check_threshold(threshold)
        height, width = prob.shape
        self._merger = _Merger(prob, threshold, _block_shape(prob, chunk_px),
                               [(0, 0, height, width)])
        self._simplify_px, self._min_area_px = simplify_px, min_area_px
        self._next_row = 0  # first chunk row not yet submitted
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wsiseg-contours")
        self._futures: list[Any] = []
        # tumors spanning chunks, spliced as soon as traced whole (by their pieces' ids)
        self._spliced: dict[tuple[int, ...], tuple[shapely.Polygon | None, float]] = {}

    def __enter__(self) -> RowStreamTracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def rows_final(self, row1: int) -> None:
        """Queue every chunk row that lies entirely above ``row1`` (or reaches the end)."""
        block_rows, grid_rows = self._merger.block[0], self._merger.grid[0]
        height = self._merger.prob.shape[0]
        while self._next_row < grid_rows and min((self._next_row + 1) * block_rows,
                                                   height) <= row1:
            self._futures.append(self._pool.submit(self._trace_row, self._next_row))
            self._next_row += 1

    def _trace_row(self, i: int) -> None:
        first_piece = self._merger.n_pieces + 1  # the ids this row's pieces will get
        for j in range(self._merger.grid[1]):
            self._merger.process(i, j)
        if self._simplify_px > 0 and i + 1 < self._merger.grid[0]:
            self._splice_closed(first_piece)

    def _splice_closed(self, first_piece: int) -> None:
        """Splice, now, the tumors spanning chunks that the row just traced closed: those with
        a piece in it (ids from ``first_piece``) and none waiting at a chunk side. Only the
        tumors reaching the last row are then left for :meth:`result`."""
        merger = self._merger
        border = np.fromiter(merger.border_pieces, dtype=np.int64,
                             count=len(merger.border_pieces))  # ascending ids
        if not len(border) or border[-1] < first_piece:
            return
        component = merger._components()
        waiting = [ids[ids > 0] for ids in merger.pending.values()]
        open_ = np.unique(component[np.concatenate(waiting)]) if waiting else []
        closing = np.setdiff1d(component[border[border >= first_piece]], open_)
        of_border = component[border]
        chosen = np.isin(of_border, closing)
        ids, owner = border[chosen], of_border[chosen]
        order = np.argsort(owner, kind="stable")  # by tumor; ids stay ascending in each
        for group in np.split(ids[order], np.flatnonzero(np.diff(owner[order])) + 1):
            if len(group) > 1:
                gids = group.tolist()
                self._spliced[tuple(gids)] = merger.spliced(gids, self._simplify_px)

    def result(self) -> tuple[list[shapely.Polygon], NDArray[np.float64]]:
        self.rows_final(self._merger.prob.shape[0])
        for future in self._futures:
            future.result()  # re-raises a tracing error
        self._pool.shutdown(wait=True)
        return _finished(self._merger, self._simplify_px, self._min_area_px, self._spliced)
